"""Checks the shape of the tree: module and function sizes, doc links.

Run by `make lint` and `make test` beside ruff:

    python scripts/check_structure.py

It fails (exit 1, one line per finding) when
  * a module in nfnets/ has more than MAX_MODULE_LINES lines;
  * a function in nfnets/ has more than MAX_FUNCTION_LINES lines of code
    (docstring, blank and comment lines not counted);
  * a relative link in README.md or docs/*.md names a file that does not
    exist, or an anchor (`file.md#heading`) that no heading of it gives.
Small modules and short functions keep the package readable; links that
resolve keep the docs usable.
"""

import ast
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
_LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
_HEADING = re.compile(r'^#+\s+(.*?)\s*$')


def _docstring_lines(node) -> range:
  body = node.body
  if (
    body
    and isinstance(body[0], ast.Expr)
    and isinstance(body[0].value, ast.Constant)
    and isinstance(body[0].value.value, str)
  ):
    return range(body[0].lineno, body[0].end_lineno + 1)
  return range(0)


def _code_lines(lines: list[str], node) -> int:
  """Lines of `node` that hold code: no docstring, blank or comment line."""
  doc = _docstring_lines(node)
  count = 0
  for number in range(node.lineno, node.end_lineno + 1):
    text = lines[number - 1].strip()
    if number not in doc and text and not text.startswith('#'):
      count += 1
  return count


def size_findings(package: pathlib.Path) -> list[str]:
  """Modules and functions of `package` over the size limits."""
  findings = []
  for path in sorted(package.rglob('*.py')):
    source = path.read_text()
    lines = source.split('\n')
    name = path.relative_to(ROOT)
    if len(lines) > MAX_MODULE_LINES:
      findings.append(f'{name}: {len(lines)} lines > {MAX_MODULE_LINES}')
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        n = _code_lines(lines, node)
        if n > MAX_FUNCTION_LINES:
          findings.append(
            f'{name}:{node.lineno} {node.name}: {n} lines of code '
            f'> {MAX_FUNCTION_LINES}'
          )
  return findings


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped."""
  text = re.sub(r'[`*]', '', heading.strip().lower())
  text = re.sub(r'[^\w\- ]', '', text)
  return text.replace(' ', '-')


def _anchors(path: pathlib.Path) -> set[str]:
  headings = (_HEADING.match(line) for line in path.read_text().split('\n'))
  return {_anchor(m.group(1)) for m in headings if m}


def link_findings(doc: pathlib.Path) -> list[str]:
  """Relative links of markdown file `doc` that do not resolve."""
  findings = []
  for target in _LINK.findall(doc.read_text()):
    if re.match(r'^[a-z]+:', target):  # http:, https:, mailto:
      continue
    file_part, _, anchor = target.partition('#')
    linked = (doc.parent / file_part).resolve() if file_part else doc
    name = doc.relative_to(ROOT)
    if not linked.exists():
      findings.append(f'{name}: link to missing {target}')
    elif anchor and linked.suffix == '.md' and anchor not in _anchors(linked):
      findings.append(f'{name}: no heading for anchor {target}')
  return findings


def main() -> int:
  findings = size_findings(ROOT / 'nfnets')
  for doc in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]:
    findings += link_findings(doc)
  for finding in findings:
    print(finding)
  return 1 if findings else 0


if __name__ == '__main__':
  sys.exit(main())
