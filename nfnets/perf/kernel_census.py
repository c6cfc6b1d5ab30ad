"""How many kernels a compiled XLA program has, and where they come from.

XLA:CPU optimises and generates machine code once per *distinct* fused
computation and reuses it for every fusion instruction that calls an
identical one; names and metadata do not make two fusions differ,
constants and shapes do. Every copy still costs its IR emission, HLO
passes and thunk (docs/performance.md, 2 cores: ~25-39 ms per distinct
kernel, ~1-11 ms per identical copy depending on its size; F1 has 1.9x
F0's fusions, 1.12x its distinct kernels and compiles 2x as long). These
two counts explain compile time where op counts do not:

    compiled = jax.jit(step).lower(state, batch).compile()
    print(census(compiled.as_text()))

`by_source` splits the counts by the op names JAX records in each fused
computation: the forward pass (`jvp(...)`), the backward pass
(`transpose(jvp(...))`), everything else that JAX named (the optimizer, the
metrics, the loss) and XLA's own unnamed kernels.
"""

import collections
import dataclasses
import re

_METADATA = re.compile(r',? metadata=\{[^}]*\}')
_NAME = re.compile(r'%[\w.\-]+')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r' fusion\(.*calls=(%?[\w.\-]+)')


@dataclasses.dataclass(frozen=True)
class KernelCensus:
  """Fusion instructions and distinct fused computations of one program.

  Attributes:
    fusions: fusion instructions (kernel launches, or thunks on CPU).
    distinct_kernels: distinct fused computations among them.
    by_source: source -> (fusions, distinct kernels), for the sources
      'forward', 'backward', 'other' and 'unnamed'.
  """

  fusions: int
  distinct_kernels: int
  by_source: dict

  def __str__(self) -> str:
    parts = ', '.join(
      f'{source} {n}/{d}' for source, (n, d) in self.by_source.items()
    )
    return (
      f'{self.fusions} fusions, {self.distinct_kernels} distinct kernels '
      f'(fusions/distinct: {parts})'
    )


def computations(hlo_text: str) -> dict[str, list[str]]:
  """Splits HLO text into computations: name -> body lines."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    if current is None:
      if line.endswith('{') and not line.startswith((' ', 'HloModule')):
        words = line.split()
        name = words[1] if words[0] == 'ENTRY' else words[0]
        current = name.lstrip('%')
        bodies[current] = []
    elif line.startswith('}'):
      current = None
    else:
      bodies[current].append(line)
  return bodies


def canonical(body: list[str]) -> str:
  """A fused computation without metadata, its names numbered in order."""
  names = {}

  def rename(match):
    return names.setdefault(match.group(0), f'%v{len(names)}')

  return '\n'.join(
    _NAME.sub(rename, _METADATA.sub('', line)).strip() for line in body
  )


def _source(body: list[str]) -> str:
  op_names = ' '.join(_OP_NAME.findall('\n'.join(body)))
  if not op_names:
    return 'unnamed'
  if 'transpose(jvp(' in op_names:
    return 'backward'
  if 'jvp(' in op_names:
    return 'forward'
  return 'other'


def census(hlo_text: str) -> KernelCensus:
  """Counts the fusions and distinct kernels of a compiled program.

  Args:
    hlo_text: `compiled.as_text()` of a jitted function (the optimised HLO,
      after fusion).

  Returns:
    A `KernelCensus`.
  """
  bodies = computations(hlo_text)
  called = [m.group(1).lstrip('%') for m in _CALLS.finditer(hlo_text)]
  fusions = collections.Counter()
  kernels = collections.defaultdict(set)
  for name in called:
    body = bodies[name]
    source = _source(body)
    fusions[source] += 1
    kernels[source].add(canonical(body))
  order = ('forward', 'backward', 'other', 'unnamed')
  return KernelCensus(
    fusions=len(called),
    distinct_kernels=len(set().union(*kernels.values())),
    by_source={s: (fusions[s], len(kernels[s])) for s in order if fusions[s]},
  )
