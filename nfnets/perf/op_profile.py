"""Where a compiled step's time goes, by kind of operation.

The question "why is model A not faster than model B at fewer FLOPs?" is
answered by what the hardware runs, not by what the model code says:
XLA rewrites 1x1 convolutions into GEMMs, computes a grouped or depthwise
convolution's weight gradient as a dense convolution plus a mask, and
fuses element-wise work into loops, and on the CPU our depthwise
convolutions are shifted multiply-adds (recognised by the op names JAX
records). So this module classifies the *compiled* program's kernels:

* `classify(hlo_text)` maps every instruction of `compiled.as_text()` to a
  kind ('conv 3x3', 'conv 1x1', 'conv grouped', 'conv depthwise', 'GEMM',
  'reduction', 'data movement', 'element-wise') and the multiply-adds it
  performs (counted from the HLO shapes, so backward-pass convolutions
  count what they really compute);
* `profile(run, hlo_text, steps)` runs the program under JAX's profiler
  and sums the per-kernel trace events (XLA:CPU records one per executed
  thunk, named after its HLO instruction; GPU traces name the HLO op in
  the event's arguments) by kind: milliseconds per step, share of kernel
  time, and achieved GFLOP/s per kind.

Kernel time can exceed the step's wall time when independent kernels run
concurrently (XLA:CPU's thunk executor does, with 2+ threads); shares are of
the summed kernel time.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import tempfile

import jax

from nfnets.ops import depthwise
from nfnets.perf import compile_trace, kernel_census

_DEFINITION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]')
_NAME = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = ')
_OPCODE = re.compile(r'= (?:\(.*?\)|[\w\[\],{}:.\- ]*?) ([a-z][\w\-]*)\(')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OPERANDS = re.compile(r' convolution\(%([\w.\-]+), %([\w.\-]+)\)')
_DOT_OPERANDS = re.compile(r' dot\(%([\w.\-]+), %([\w.\-]+)\)')
_WINDOW = re.compile(r'window=\{size=([\dx]+)')
_DIM_LABELS = re.compile(r'dim_labels=(\w+)_(\w+)->(\w+)')
_GROUPS = re.compile(r'(?:feature|batch)_group_count=(\d+)')
_CONTRACTING = re.compile(r'lhs_contracting_dims=\{([\d,]*)\}')
_MOVEMENT = frozenset({
  'bitcast', 'broadcast', 'concatenate', 'copy', 'dynamic-slice',
  'dynamic-update-slice', 'pad', 'parameter', 'reshape', 'reverse', 'slice',
  'transpose', 'constant', 'iota', 'tuple', 'get-tuple-element',
})  # fmt: skip

KINDS = (
  'conv 3x3', 'conv kxk', 'conv 1x1', 'conv grouped', 'conv depthwise',
  'GEMM', 'reduction', 'element-wise', 'data movement',
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class OpInfo:
  """One executed instruction: its kind and multiply-adds per execution."""

  kind: str
  macs: float


@dataclasses.dataclass(frozen=True)
class KindTime:
  """Time and work of one kind of kernel, per step."""

  kind: str
  ms: float
  share: float
  gflop_per_s: float
  count: int


def _shapes(body: list[str]) -> dict[str, tuple[int, ...]]:
  """Instruction name -> result dims, for array-valued instructions."""
  shapes = {}
  for line in body:
    match = _DEFINITION.match(line)
    if match:
      dims = match.group(2)
      shapes[match.group(1)] = tuple(int(d) for d in dims.split(',') if d)
  return shapes


def _conv(line: str, shapes) -> OpInfo:
  """Kind and multiply-adds of one HLO convolution."""
  out = shapes[_DEFINITION.match(line).group(1)]
  _, rhs_name = _OPERANDS.search(line).groups()
  rhs = shapes.get(rhs_name, ())
  _, rhs_labels, out_labels = _DIM_LABELS.search(line).groups()
  macs = math.prod(out) * math.prod(rhs) / max(rhs[rhs_labels.index('o')], 1)
  groups = int((_GROUPS.search(line) or [0, 1])[1])
  if groups > 1:
    depthwise = groups == out[out_labels.index('f')]
    return OpInfo('conv depthwise' if depthwise else 'conv grouped', macs)
  size = _kernel_size(line, out, out_labels)
  if size == (1, 1):
    return OpInfo('conv 1x1', macs)
  return OpInfo('conv 3x3' if size == (3, 3) else 'conv kxk', macs)


def _kernel_size(line: str, out, out_labels: str) -> tuple[int, ...]:
  """The model's kernel size behind an HLO convolution.

  A weight gradient is a convolution whose window is the activation and
  whose output's spatial dims are the kernel's: its window is larger
  than its output.
  """
  window = tuple(int(w) for w in _WINDOW.search(line).group(1).split('x'))
  spatial = tuple(out[out_labels.index(d)] for d in '01' if d in out_labels)
  if math.prod(window) > math.prod(spatial):
    return spatial
  return window


def _dot(line: str, shapes) -> OpInfo:
  """Multiply-adds of one HLO dot."""
  out = shapes[_DEFINITION.match(line).group(1)]
  lhs = shapes.get(_DOT_OPERANDS.search(line).group(1), ())
  dims = _CONTRACTING.search(line).group(1)
  contracted = math.prod(lhs[int(d)] for d in dims.split(',') if d)
  return OpInfo('GEMM', math.prod(out) * contracted)


def _opcode(line: str) -> str:
  match = _OPCODE.search(line)
  return match.group(1) if match else ''


def _classify_body(body: list[str], shapes=None) -> OpInfo:
  """The kind of a kernel from the instructions it executes.

  Args:
    body: the instructions (a fused computation, or one instruction).
    shapes: result dims of the instructions `body` refers to; default
      those defined in `body`.
  """
  shapes = _shapes(body) if shapes is None else shapes
  heavy = []
  for line in body:
    opcode = _opcode(line)
    if opcode == 'convolution':
      heavy.append(_conv(line, shapes))
    elif opcode == 'dot':
      heavy.append(_dot(line, shapes))
  if heavy:
    return max(heavy, key=lambda info: info.macs)
  if any(f'jit({depthwise.SHIFTED_NAME})' in line for line in body):
    # CPU's depthwise conv: shifted multiply-adds (`nfnets.ops.depthwise`),
    # element-wise in HLO, told apart by the op names JAX records.
    return OpInfo('conv depthwise', 0.0)
  opcodes = {_opcode(line) for line in body} - {''}
  if any('matmul' in line or 'gemm' in line.lower() for line in body):
    return OpInfo('GEMM', 0.0)  # A library custom call.
  if opcodes & {'reduce', 'reduce-window', 'select-and-scatter'}:
    return OpInfo('reduction', 0.0)
  if opcodes <= _MOVEMENT:
    return OpInfo('data movement', 0.0)
  return OpInfo('element-wise', 0.0)


def classify(hlo_text: str) -> dict[str, OpInfo]:
  """Every instruction of a compiled program -> its kind and multiply-adds.

  Args:
    hlo_text: `compiled.as_text()` (the optimised HLO).

  Returns:
    Instruction name (as it appears in profiler events) -> `OpInfo`, for
    the instructions that run as kernels (not those inside a fusion). A
    fusion is classified by the instructions of the computation it calls.
  """
  bodies = kernel_census.computations(hlo_text)
  fused = {
    match.group(1)
    for body in bodies.values()
    for line in body
    if ' fusion(' in line and (match := _CALLS.search(line))
  }
  table = {}
  for name, body in bodies.items():
    if name in fused:
      continue  # Runs as part of its fusion, never as a kernel of its own.
    shapes = _shapes(body)
    for line in body:
      match = _NAME.match(line)
      if not match:
        continue
      calls = _CALLS.search(line)
      if calls and calls.group(1) in bodies and ' fusion(' in line:
        table[match.group(1)] = _classify_body(bodies[calls.group(1)])
      else:
        table[match.group(1)] = _classify_body([line], shapes)
  return table


def _event_instruction(event: dict, table) -> str | None:
  """The HLO instruction a trace event executed, if it is one."""
  if event.get('ph') != 'X':
    return None
  if event['name'] in table:
    return event['name']
  op = event.get('args', {}).get('hlo_op')
  return op if op in table else None


def summarize(events, table, steps: int) -> list[KindTime]:
  """Sums trace events by kind: per-step milliseconds and achieved rate.

  Args:
    events: trace events (Chrome trace format dicts).
    table: `classify`'s result for the program that ran.
    steps: how many times the program ran while tracing.

  Returns:
    One `KindTime` per kind that ran, longest first.
  """
  micros, macs, counts = (collections.Counter() for _ in range(3))
  for event in events:
    name = _event_instruction(event, table)
    if name is None:
      continue
    info = table[name]
    micros[info.kind] += event.get('dur', 0)
    macs[info.kind] += info.macs
    counts[info.kind] += 1
  total = sum(micros.values()) or 1
  rows = []
  for kind, us in micros.most_common():
    rate = 2 * macs[kind] / (us * 1e-6) / 1e9 if us else 0.0
    rows.append(
      KindTime(kind, us / 1e3 / steps, us / total, rate, counts[kind] // steps)
    )
  return rows


def profile(run, hlo_text: str, steps: int = 3) -> list[KindTime]:
  """Runs a compiled program under the profiler; time by kind of kernel.

  Args:
    run: runs the program once and returns its outputs, e.g.
      `lambda: compiled(*args)` (a donating program can thread its state
      through a closure).
    hlo_text: the program's `compiled.as_text()`.
    steps: traced runs (after one untraced warm-up).

  Returns:
    `summarize`'s rows.
  """
  jax.block_until_ready(run())
  options = jax.profiler.ProfileOptions()
  options.host_tracer_level = 2  # One event per executed kernel (thunk).
  options.python_tracer_level = 0
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(
      directory, create_perfetto_trace=True, profiler_options=options
    ):
      for _ in range(steps):
        jax.block_until_ready(run())
    events = compile_trace.read_trace(directory)
  return summarize(events, classify(hlo_text), steps)


def format_breakdown(rows: list[KindTime]) -> str:
  """A Markdown table of `profile`'s rows."""
  lines = [
    '| kind | ms/step | share | GFLOP/s | kernels/step |',
    '|---|---|---|---|---|',
  ]
  for r in rows:
    rate = f'{r.gflop_per_s:.3g}' if r.gflop_per_s else '-'
    lines.append(
      f'| {r.kind} | {r.ms:.1f} | {100 * r.share:.1f}% | {rate} | {r.count} |'
    )
  return '\n'.join(lines)
