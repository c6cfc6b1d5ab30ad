"""docs/performance.md and the README's speed table agree with the tools.

The docs show what the commands print and the README summarises the docs'
tables: a header the code does not print, a section a script names that
does not exist, or a range that leaves out a measured row misleads.
"""

import os
import re

from nfnets.perf import paper_table

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')


def _read(*path):
  with open(os.path.join(ROOT, *path)) as f:
    return f.read()


def test_the_paper_table_header_is_what_the_code_prints():
  header = paper_table.format_paper_table([]).split('\n')[0]
  assert header in _read('docs', 'performance.md').splitlines()


def test_the_tflops_column_says_sams_extra_passes_are_not_counted():
  rows = [
    line
    for line in _read('docs', 'performance.md').splitlines()
    if line.startswith('| TFLOP/s |')
  ]
  (row,) = rows
  assert 'one forward + backward pass per step' in row
  assert '--sam=sync' in row and 'understates' in row


def test_the_sections_gpu_checks_names_exist():
  lines = _read('scripts', 'gpu_checks.sh').splitlines()
  header = ' '.join(
    line.lstrip('#').strip() for line in lines if line.startswith('#')
  )
  named = re.findall(r'docs/performance\.md, "([^"]+)"', header)
  assert len(named) == 2
  headings = {
    line.lstrip('#').strip()
    for line in _read('docs', 'performance.md').splitlines()
    if line.startswith('#')
  }
  assert set(named) <= headings


def _ms(cell: str) -> int:
  return int(re.search(r'\d+', cell).group())


def test_the_readme_amx_bf16_convs_range_covers_the_docs_runs():
  # Before, 1.91-2.21 s left out run A's 2333 ms.
  docs = _read('docs', 'performance.md')
  amx = docs.split('### CPU: NFNet-F0 against timm on an AVX-512/AMX Xeon')[1]
  amx = amx.split('\n### ')[0].splitlines()
  (row,) = [line for line in amx if line.startswith('| ours `bfloat16_convs`')]
  runs = [_ms(cell) for cell in row.strip('|').split('|')[1:]]
  low, high = min(runs) / 1000, max(runs) / 1000
  readme = _read('README.md').splitlines()
  (line,) = [
    line
    for line in readme
    if line.startswith('| 2 vCPU (Xeon, AVX-512 + AMX), same, bf16 convs')
  ]
  assert line.split('|')[2].strip() == f'{low:.2f}-{high:.2f} s'
