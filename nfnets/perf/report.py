"""The benchmark's result record, its software environment, and its table.

A `BenchmarkResult` holds every measurement of one run and is written as
JSON by `experiments.benchmark --json_out`; `format_table` prints results
as a Markdown table shaped like the NFNet paper's Table 3.
"""

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jaxlib

from nfnets import atomic_files, ops
from nfnets.train import runtime


@dataclasses.dataclass
class BenchmarkResult:
  """Measurements of one model at one batch size, resolution and dtype.

  Attributes:
    model: display name, e.g. 'NFNet-F0'.
    device: the device kind, e.g. 'cpu' or 'NVIDIA H100 80GB HBM3'.
    num_devices: devices used (the benchmark runs on one).
    batch_size: images per step (per device).
    image_size: square input resolution.
    dtype: compute dtype of the forward and backward pass.
    params: number of parameters.
    macs_per_image: multiply-adds of one forward pass of one image.
    compile_s: seconds to lower and compile the train step.
    compile_cpu_s: CPU seconds of this process during compilation (robust
      to other processes competing for the cores).
    init_s: seconds from nothing to the initial train state on the device:
      compiling and running the jitted parameter init and the optimizer
      state's init (on a GPU, `ptxas` time for the init's kernels counts).
    step_ms: median train step time.
    step_cpu_ms: mean CPU time of this process per timed train step (all
      threads, warm-up steps excluded; on a shared machine a
      load-independent cross-check).
    step_ms_min: fastest train step.
    step_ms_iqr: interquartile range of the train step times.
    steps: number of timed train steps.
    images_per_s: batch_size / median step time.
    tflops: achieved TFLOP/s of the train step, counting one forward and
      one backward pass (3 x forward FLOPs) per step: SAM's extra passes
      are not counted, so with SAM on it understates the work done.
    forward_ms: median forward-only (eval mode) time; NaN if skipped.
    peak_memory_gb: peak memory of the train step (see `memory_source`).
    memory_source: how `peak_memory_gb` was measured: the allocator's
      peak only where no earlier work in the process had set one
      (`nfnets.perf.measure.peak_memory`).
    xla_memory_gb: XLA's accounting of the compiled train step's buffers
      (arguments + outputs + temporaries - donated), on every backend.
    peak_rss_gb: the process's peak resident set size so far.
    fusions: fusion instructions of the compiled train step.
    distinct_kernels: distinct fused computations among them: XLA:CPU
      generates code once per distinct kernel, which is most of its compile
      time (`nfnets.perf.kernel_census`).
    kernels_by_source: {forward, backward, other, unnamed} -> [fusions,
      distinct kernels].
    remat: whether blocks were rematerialised.
    options: other options of the run: the model kwargs (grouped conv,
      ...), `augment`, `sam`, `warmup`, `forward_steps` and
      `compiler_options`.
    environment: what else changes the numbers (`environment()`): jax and
      jaxlib versions, `XLA_FLAGS`, the persistent compilation cache, the
      host malloc settings and the host CPU.
  """

  model: str
  device: str
  num_devices: int
  batch_size: int
  image_size: int
  dtype: str
  params: int
  macs_per_image: float
  compile_s: float
  compile_cpu_s: float
  init_s: float
  step_ms: float
  step_cpu_ms: float
  step_ms_min: float
  step_ms_iqr: float
  steps: int
  images_per_s: float
  tflops: float
  forward_ms: float
  peak_memory_gb: float
  memory_source: str
  xla_memory_gb: float
  peak_rss_gb: float
  fusions: int
  distinct_kernels: int
  kernels_by_source: dict
  remat: bool
  options: dict = dataclasses.field(default_factory=dict)
  environment: dict = dataclasses.field(default_factory=dict)
  # With `trace_compile`: XLA's compile events summed by name, longest
  # first (`nfnets.perf.compile_trace`), as [name, seconds, count] lists.
  compile_events: list = dataclasses.field(default_factory=list)
  # With `profile_steps`: the train step's time by kind of kernel
  # (`nfnets.perf.op_profile.KindTime` as dicts), longest first.
  kernel_time: list = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict:
    """Returns the result as a JSON-serialisable dict."""
    return dataclasses.asdict(self)


def is_benchmark_results(value) -> bool:
  """Whether JSON `value` is what `experiments.benchmark --json_out` wrote.

  A list of results (`BenchmarkResult.to_dict`, keyed 'model') or of
  paper-table rows (keyed 'result'); only such a file is replaced.
  """
  return isinstance(value, list) and all(
    isinstance(row, dict) and ('model' in row or 'result' in row)
    for row in value
  )


def environment() -> dict[str, Any]:
  """The software settings and host CPU a result depends on.

  Returns:
    The jax and jaxlib versions, `XLA_FLAGS`, the persistent compilation
    cache directory in use (`compilation_cache_dir`, '' = off: a warm
    cache makes compiles fast), whether the host malloc settings of
    `nfnets.train.runtime` were applied, and the host CPU's
    model, AVX2/AVX-512/AMX flags and the CPU convolution form they select
    (`nfnets.ops.cpu_summary`; CPU speed differs several-fold between
    CPU classes).
  """
  return {
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'compilation_cache_dir': _compilation_cache_dir(),
    'malloc_kept': runtime.settings_applied(),
    **ops.cpu_summary(),
  }


def _compilation_cache_dir() -> str:
  """JAX's persistent compilation cache directory, '' when off."""
  if not getattr(jax.config, 'jax_enable_compilation_cache', True):
    return ''
  return getattr(jax.config, 'jax_compilation_cache_dir', None) or ''


def write_json(path: str, value: Any) -> None:
  """Writes a result file whole (`nfnets.atomic_files.write_json`)."""
  atomic_files.write_json(path, value)


def jsonable(value: Any) -> Any:
  """A config value as a plain JSON type (tuples become lists)."""
  if isinstance(value, tuple):
    return list(value)
  return value


# (header, format, BenchmarkResult -> value) of the printed table's columns.
TABLE_COLUMNS = (
  ('Model', '{}', lambda r: r.model),
  ('Res', '{}', lambda r: r.image_size),
  ('Params', '{:.1f}M', lambda r: r.params / 1e6),
  ('GMACs', '{:.2f}', lambda r: r.macs_per_image / 1e9),
  ('Batch', '{}', lambda r: r.batch_size),
  ('dtype', '{}', lambda r: r.dtype),
  ('Remat', '{}', lambda r: 'yes' if r.remat else 'no'),
  ('Train ms/step', '{:.1f}', lambda r: r.step_ms),
  ('IQR ms', '{:.1f}', lambda r: r.step_ms_iqr),
  ('img/s', '{:.1f}', lambda r: r.images_per_s),
  ('TFLOP/s', '{:.3f}', lambda r: r.tflops),
  ('Fwd ms', '{:.1f}', lambda r: r.forward_ms),
  ('Compile s', '{:.1f}', lambda r: r.compile_s),
  ('Init s', '{:.1f}', lambda r: r.init_s),
  ('Peak GB', '{:.2f}', lambda r: r.peak_memory_gb),
)


def _cell(fmt: str, value: Any) -> str:
  """One table cell; '-' for a number not measured (NaN, e.g. with
  `--forward_steps=0` or `--compile_only`)."""
  if isinstance(value, float) and math.isnan(value):
    return '-'
  return fmt.format(value)


# Shown after 'Remat' when a run timed the step with augmentation or SAM:
# rows that differ only in them would otherwise look like repeated
# measurements. (option, its default, column header).
OPTION_COLUMNS = (('augment', 'none', 'Augment'), ('sam', 'off', 'SAM'))


def _columns(shown: dict, results) -> tuple:
  """The table's columns: each option column where `shown` asks for it or,
  by default, where any result was timed with that option set."""
  extra = []
  for option, default, header in OPTION_COLUMNS:
    show = shown.get(option)
    if show is None:
      show = any(r.options.get(option, default) != default for r in results)
    if show:
      extra.append((header, '{}', _option_getter(option, default)))
  at = [c[0] for c in TABLE_COLUMNS].index('Remat') + 1
  return TABLE_COLUMNS[:at] + tuple(extra) + TABLE_COLUMNS[at:]


def _option_getter(option: str, default: str):
  return lambda r: r.options.get(option, default)


def format_table(
  results: Sequence[BenchmarkResult],
  augment_column: bool | None = None,
  sam_column: bool | None = None,
) -> str:
  """A Markdown table of results, shaped like the paper's Table 3.

  GMACs are forward multiply-adds per image at the benchmarked resolution
  (the paper's "FLOPs" column counts the same quantity at the test
  resolution); TFLOP/s counts 2 FLOPs per MAC and 3x the forward pass for a
  training step. The device and memory source follow the table.

  Args:
    results: the rows.
    augment_column: whether to show the step's augmentation ('none',
      'device', ...); by default where any result has one.
    sam_column: whether to show the step's SAM form ('off', 'sync',
      'paper'); by default where any result has SAM on.

  Returns:
    The table as text.
  """
  columns = _columns({'augment': augment_column, 'sam': sam_column}, results)
  headers = [c[0] for c in columns]
  rows = [[_cell(fmt, get(r)) for _, fmt, get in columns] for r in results]
  lines = [
    '| ' + ' | '.join(headers) + ' |',
    '|' + '|'.join('---' for _ in headers) + '|',
  ]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  notes = sorted({f'{r.device} x{r.num_devices}' for r in results})
  lines.append('')
  lines.append(f'Device: {", ".join(notes)}. Peak memory: {_sources(results)}.')
  return '\n'.join(lines)


def _sources(results: Sequence[BenchmarkResult]) -> str:
  """How Peak GB was measured; by row where the rows differ (a GPU run's
  later rows report XLA's analysis: the allocator's peak is process-wide)."""
  rows = {}
  for i, r in enumerate(results, 1):
    rows.setdefault(r.memory_source, []).append(str(i))
  if len(rows) == 1:
    return next(iter(rows))
  return '; '.join(
    f'{source} (row{"s" if len(i) > 1 else ""} {", ".join(i)})'
    for source, i in rows.items()
  )
