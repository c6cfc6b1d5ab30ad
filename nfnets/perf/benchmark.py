"""Speed and memory benchmark of the registry models, the paper's protocol.

The NFNet paper (Table 3) reports the median time of a full training step
over many steps, with the data already on the device, at a fixed per-device
batch size, in bf16 on accelerators. `run_benchmark` does the same for any
`nfnets.models.MODELS` entry and also measures:

* compile time of the train step (lowering + XLA compilation, cold unless
  a persistent compilation cache is enabled in the process);
* forward-only (eval-mode) step time;
* achieved FLOP/s: the model's multiply-adds (`nfnets.models.flops`, counted on
  the traced forward pass) x 2 FLOPs x 3 (forward + backward) x batch / median
  step time;
* peak memory: on GPU/TPU the device allocator's `peak_bytes_in_use`; on
  CPU, which has no allocator statistics, XLA's own accounting of the
  compiled step (`memory_analysis()`: arguments + outputs + temporaries -
  aliased/donated bytes), i.e. the live buffers of one step (also on
  GPU/TPU after `compile_only`, when the step never ran). The process's
  peak RSS is reported beside it (it includes Python, the compiler and every
  other buffer the process ever held).

The timed train step is the one users train with, for every model family:
`nfnets.train.step.make_hyperparam_train_step` (forward, backward, the
optimizer of `nfnets.optim.build_optimizer`, i.e. AGC + weight decay +
Nesterov SGD for the recipe, with its numbers as inputs, and the train
metrics), jitted with the state donated. For
BN-/SE-ResNets the state carries the BatchNorm statistics, updated by every
step as in training.
"""

import dataclasses
import inspect
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

from nfnets import models, optim
from nfnets.models import flops, nfnet
from nfnets.perf import compile_trace, kernel_census
from nfnets.train import runtime
from nfnets.train import step as step_lib


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
    step_cpu_ms: mean CPU time of this process per train step (all
      threads; on a shared machine a load-independent cross-check).
    step_ms_min: fastest train step.
    step_ms_iqr: interquartile range of the train step times.
    steps: number of timed train steps.
    images_per_s: batch_size / median step time.
    tflops: achieved TFLOP/s of the train step (3 x forward FLOPs).
    forward_ms: median forward-only (eval mode) time; NaN if skipped.
    peak_memory_gb: peak memory of the train step (see `memory_source`).
    memory_source: how `peak_memory_gb` was measured.
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
    options: other options of the run (model kwargs, grouped conv, ...).
    environment: what else changes the numbers: jax and jaxlib versions,
      `XLA_FLAGS`, and whether the host malloc settings of
      `nfnets.train.runtime` were applied.
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

  def to_dict(self) -> dict:
    """Returns the result as a JSON-serialisable dict."""
    return dataclasses.asdict(self)


def default_dtype() -> str:
  """'float32' on CPU (bf16 is slower there), 'bfloat16' on accelerators."""
  return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'


def make_model_config(
  name: str = 'NFNet', **kwargs: Any
) -> ml_collections.ConfigDict:
  """Returns a `config.model` for a registry model.

  Args:
    name: a key of `nfnets.models.MODELS`.
    **kwargs: constructor arguments; for NFNet they override the recipe's
      (`nfnets.models.nfnet_kwargs`: stochastic depth 0.25, the variant's
      dropout).

  Returns:
    A ConfigDict with `name` and `kwargs`, as `models.make_model` reads it.
  """
  models.get_constructor(name)  # Unknown names fail here, listing the valid.
  # JSON and flags give lists; the configs type sequences as tuples.
  kwargs = {
    k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()
  }
  if name == 'NFNet':
    model_kwargs = models.nfnet_kwargs(**kwargs)
  else:
    model_kwargs = ml_collections.ConfigDict(kwargs)
  return ml_collections.ConfigDict(dict(name=name, kwargs=model_kwargs))


def default_image_size(model_config: ml_collections.ConfigDict) -> int:
  """The variant's train resolution for NFNets (the paper times at it), else
  224, the ResNet-50 training resolution."""
  variant = model_config.kwargs.get('variant', None)
  if model_config.name == 'NFNet' and variant:
    return nfnet.get_variant(variant)['train_imsize']
  return 224


# Table labels of the registry models (variant 'ResNet50' -> '-50').
_FAMILY_LABELS = {'NF_ResNet': 'NF-ResNet', 'NF_RegNet': 'NF-RegNet'}


def display_name(model_config: ml_collections.ConfigDict) -> str:
  """A table label: 'NFNet-F0', 'NF-ResNet-50', 'BN-ResNet-50', ...

  Args:
    model_config: `config.model`.

  Returns:
    The label.
  """
  name, kwargs = model_config.name, model_config.kwargs
  variant = kwargs.get('variant', None)
  if variant is None:  # The constructor's default, e.g. 'ResNet50'.
    param = inspect.signature(models.get_constructor(name)).parameters
    variant = getattr(param.get('variant'), 'default', None)
  variant = '' if variant in (None, inspect.Parameter.empty) else str(variant)
  if name == 'NFNet':
    return f'NFNet-{variant}'
  if name == 'ResNet':
    prefix = 'SE-' if kwargs.get('use_se', False) else ''
    norm = 'BN-' if kwargs.get('norm', 'batch_norm') != 'none' else 'NoNorm-'
    label = f'{prefix or norm}ResNet'
  else:
    label = _FAMILY_LABELS.get(name, name)
  number = variant.removeprefix('ResNet')
  return f'{label}-{number}' if number else label


def make_optimizer_config(ema_decay: float = 0.0) -> ml_collections.ConfigDict:
  """The recipe's optimizer (AGC 0.01 + wd 2e-5 + Nesterov SGD).

  Args:
    ema_decay: EMA of the weights in the step (0 = off; the recipe's 0.99999
      adds one more pass over the parameters).

  Returns:
    A `config.optimizer` ConfigDict.
  """
  config = optim.default_config()
  config.ema_decay = ema_decay
  return config


def _synthetic_batch(batch_size, image_size, num_classes, seed=0) -> dict:
  """Random normalised images and labels, as numpy arrays."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, image_size, image_size, 3)
  return {
    'images': rng.standard_normal(shape, dtype=np.float32),
    'labels': rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
  }


def time_calls(
  fn: Callable[[], Any], steps: int, warmup: int = 1
) -> list[float]:
  """Times `steps` calls of `fn` after `warmup` untimed ones.

  Each call's result is waited for (`jax.block_until_ready`) before the
  clock stops, so asynchronous dispatch cannot hide device time.

  Args:
    fn: a no-argument function returning JAX arrays (or pytrees of them).
    steps: number of timed calls.
    warmup: untimed calls first (compilation, allocator warm-up).

  Returns:
    The per-call wall times in seconds.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def summarize_times(times: Sequence[float]) -> dict[str, float]:
  """Median, min and interquartile range of `times`, in milliseconds."""
  ms = np.asarray(times, np.float64) * 1e3
  q1, q3 = np.percentile(ms, [25, 75])
  return {
    'median': float(statistics.median(ms)),
    'min': float(ms.min()),
    'iqr': float(q3 - q1),
  }


def _peak_rss_gb() -> float:
  """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  scale = 1 if sys.platform == 'darwin' else 1024  # macOS reports bytes.
  return peak * scale / 2**30


def xla_memory_bytes(compiled) -> int | None:
  """Live bytes of one call of a compiled function, by XLA's accounting.

  Arguments + outputs + temporaries, minus the outputs that alias donated
  arguments (they share buffers). None when the backend gives no analysis.

  Args:
    compiled: a `jax.stages.Compiled`.

  Returns:
    Bytes, or None.
  """
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if stats is None:
    return None
  return int(
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )


def device_peak_bytes(device) -> int | None:
  """The allocator's peak bytes in use on `device`; None on CPU."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return int(stats['peak_bytes_in_use'])


def _peak_memory(compiled, device, step_ran: bool) -> tuple[float, str]:
  """(GB, source) of the train step's peak memory; see the module doc.

  The allocator's peak only covers the step once it has run: after a
  compile-only run it holds just the initial state, so XLA's analysis of
  the compiled step is reported instead.
  """
  peak = device_peak_bytes(device) if step_ran else None
  if peak is not None:
    return peak / 2**30, 'device peak_bytes_in_use'
  estimate = xla_memory_bytes(compiled)
  if estimate is not None:
    return estimate / 2**30, 'XLA memory_analysis (args+outputs+temps)'
  return float('nan'), 'unavailable'


@dataclasses.dataclass
class _Setup:
  """The pieces of one benchmark: jitted step, state, batch, forward."""

  step: Callable  # (state, batch, hyperparams) -> (state, metrics).
  state: Any  # The newest train state (the older ones are donated).
  batch: dict
  hyperparams: dict  # The optimizer's numbers, float32 inputs of the step.
  logits_fn: Callable  # ((params, model_state), images) -> logits, eval.


def _recipe_optimizer(batch_size, num_classes):
  """The recipe's optimizer and the step's inputs (label smoothing 0.1)."""
  opt_config = make_optimizer_config()
  hyperparams = optim.hyperparams(
    opt_config, steps_per_epoch=1000, total_steps=100000,
    global_batch_size=batch_size,
  )  # fmt: skip
  optimizer, _ = optim.build_optimizer(opt_config, hyperparams)
  hyperparams.update(step_lib.label_smoothing_inputs(0.1, num_classes))
  return opt_config, optimizer, hyperparams


def _build(model_config, batch_size, image_size, dtype, num_classes, device):
  """Initialises the model and the recipe's train step on `device`."""
  opt_config, optimizer, hyperparams = _recipe_optimizer(
    batch_size, num_classes
  )
  batch = jax.device_put(
    _synthetic_batch(batch_size, image_size, num_classes), device
  )
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))
  model = models.make_model(model_config, num_classes)
  # The trainer's step: the optimizer's numbers are inputs, not constants.
  step = step_lib.make_hyperparam_train_step(
    model, num_classes=num_classes, opt_config=opt_config,
    compute_dtype=dtype,
  )  # fmt: skip
  params, model_state = jax.jit(model.init, static_argnums=2)(
    init_rng, batch['images'][:1], True
  )
  # On `device` (the default device), like the batch and the init above.
  state = jax.jit(
    lambda p, s, r: step_lib.make_train_state(p, s, optimizer, r, ema=False)
  )(params, model_state, jax.device_put(train_rng, device))

  def logits_fn(variables, x):  # Eval mode: BatchNorm's moving averages.
    return model.apply(*variables, None, x, False)[0]['logits']

  inputs = jax.device_put(
    {k: np.float32(v) for k, v in hyperparams.items()}, device
  )
  return _Setup(step, state, batch, inputs, logits_fn)


def _forward_fn(logits_fn, dtype):
  """Eval-mode forward pass in the compute dtype, returning the logits."""

  def forward(variables, images):
    variables = step_lib.cast_floats(variables, jnp.dtype(dtype))
    return logits_fn(variables, images.astype(dtype))

  return forward


def run_benchmark(
  model_config: ml_collections.ConfigDict,
  *,
  batch_size: int = 8,
  image_size: int | None = None,
  steps: int = 10,
  warmup: int = 2,
  dtype: str | None = None,
  num_classes: int = 1000,
  forward_steps: int | None = None,
  compile_only: bool = False,
  compiler_options: dict | None = None,
  trace_compile: bool = False,
) -> BenchmarkResult:
  """Benchmarks the train step (and forward pass) of one registry model.

  Runs on the first device with synthetic data already on it. The train step
  is the trainer's, `nfnets.train.step.make_hyperparam_train_step` with the
  recipe's optimizer (AGC-SGD, EMA off), jitted with the state donated.

  Args:
    model_config: `config.model` (see `make_model_config`).
    batch_size: images per step.
    image_size: square input resolution; None = `default_image_size`.
    steps: timed train steps (the median is reported).
    warmup: untimed train steps after compilation (at least one runs).
    dtype: compute dtype; None = `default_dtype()`.
    num_classes: classifier width.
    forward_steps: timed forward passes (default `steps`; 0 skips them).
    compile_only: only compile (and measure memory); step times are NaN.
    compiler_options: XLA options for this compilation, e.g.
      {'xla_backend_optimization_level': 0} (see docs/performance.md).
    trace_compile: record XLA's compile events (`compile_events`; the
      tracing makes the compile a little slower).

  Returns:
    A `BenchmarkResult`.
  """
  if batch_size < 1 or (image_size or 1) < 1 or steps < 1:
    raise ValueError(
      'batch_size, image_size and steps must be positive, got '
      f'{batch_size}, {image_size}, {steps}.'
    )
  dtype = dtype or default_dtype()
  image_size = image_size or default_image_size(model_config)
  device = jax.devices()[0]
  t_init = time.perf_counter()
  setup = _build(
    model_config, batch_size, image_size, dtype, num_classes, device
  )
  jax.block_until_ready(setup.state)
  init_s = time.perf_counter() - t_init
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = jax.jit(setup.step, donate_argnums=0).lower(
    setup.state, setup.batch, setup.hyperparams
  )  # fmt: skip
  events = []
  if trace_compile:
    compiled, events = compile_trace.compile_with_events(
      lowered, compiler_options
    )
  else:
    compiled = lowered.compile(compiler_options)
  compile_s = time.perf_counter() - t0
  compile_cpu_s = time.process_time() - c0
  train = summarize_times([float('nan')])
  train['cpu'] = float('nan')
  forward_ms = float('nan')
  if not compile_only:
    train, setup.state = _time_train(compiled, setup, steps, warmup)
    forward_steps = steps if forward_steps is None else forward_steps
    if forward_steps > 0:
      forward_ms = _time_forward(setup, dtype, forward_steps)
  result = _result(
    model_config, setup, compiled, device, train, forward_ms,
    batch_size=batch_size, image_size=image_size, num_classes=num_classes,
    dtype=dtype, compile_s=(compile_s, compile_cpu_s), init_s=init_s,
    steps=0 if compile_only else steps,
  )  # fmt: skip
  result.compile_events = [[e.name, e.seconds, e.count] for e in events]
  return result


def _time_train(compiled, setup: _Setup, steps: int, warmup: int):
  """Times the donated train step; returns (summary, final state)."""
  holder = {'state': setup.state}

  def call():
    holder['state'], metrics = compiled(
      holder['state'], setup.batch, setup.hyperparams
    )
    return metrics

  jax.block_until_ready(call())  # Warm-up outside the CPU-time window.
  c0 = time.process_time()
  times = time_calls(call, steps, max(warmup - 1, 0))
  summary = summarize_times(times)
  summary['cpu'] = (time.process_time() - c0) / len(times) * 1e3
  return summary, holder['state']


def _time_forward(setup: _Setup, dtype: str, steps: int) -> float:
  """Median eval-mode forward time in ms (compiled and warmed up first)."""
  forward = jax.jit(_forward_fn(setup.logits_fn, dtype))
  variables = (setup.state.params, setup.state.model_state)
  times = time_calls(
    lambda: forward(variables, setup.batch['images']), steps, warmup=1
  )
  return summarize_times(times)['median']


def _result(model_config, setup, compiled, device, train, forward_ms, *,
            batch_size, image_size, num_classes, dtype, compile_s,
            init_s, steps):  # fmt: skip
  """Assembles the `BenchmarkResult` of one run."""
  macs = flops.count_model_macs(
    model_config, image_size, num_classes=num_classes
  )
  step_s = train['median'] / 1e3
  peak_gb, source = _peak_memory(compiled, device, step_ran=steps > 0)
  xla_bytes = xla_memory_bytes(compiled)
  kernels = kernel_census.census(compiled.as_text())
  kwargs = dict(model_config.kwargs)
  return BenchmarkResult(
    model=display_name(model_config),
    device=device.device_kind,
    num_devices=1,
    batch_size=batch_size,
    image_size=image_size,
    dtype=dtype,
    params=flops.count_params(setup.state.params),
    macs_per_image=macs,
    compile_s=compile_s[0],
    compile_cpu_s=compile_s[1],
    init_s=init_s,
    step_ms=train['median'],
    step_cpu_ms=train['cpu'],
    step_ms_min=train['min'],
    step_ms_iqr=train['iqr'],
    steps=steps,
    images_per_s=batch_size / step_s,
    tflops=6 * macs * batch_size / step_s / 1e12,
    forward_ms=forward_ms,
    peak_memory_gb=peak_gb,
    memory_source=source,
    xla_memory_gb=float('nan') if xla_bytes is None else xla_bytes / 2**30,
    peak_rss_gb=_peak_rss_gb(),
    fusions=kernels.fusions,
    distinct_kernels=kernels.distinct_kernels,
    kernels_by_source={k: list(v) for k, v in kernels.by_source.items()},
    remat=bool(kwargs.get('remat', False)),
    options={k: _jsonable(v) for k, v in kwargs.items()},
    environment=_environment(),
  )


def _environment() -> dict:
  """The software settings a result depends on besides its options."""
  return {
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'malloc_kept': runtime.settings_applied(),
  }


def _jsonable(value):
  """Tuples and other config values as plain JSON types."""
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


def format_table(results: Sequence[BenchmarkResult]) -> str:
  """A Markdown table of results, shaped like the paper's Table 3.

  GMACs are forward multiply-adds per image at the benchmarked resolution
  (the paper's "FLOPs" column counts the same quantity at the test
  resolution); TFLOP/s counts 2 FLOPs per MAC and 3x the forward pass for a
  training step. The device and memory source follow the table.

  Args:
    results: the rows.

  Returns:
    The table as text.
  """
  headers = [c[0] for c in TABLE_COLUMNS]
  rows = [
    [fmt.format(get(r)) for _, fmt, get in TABLE_COLUMNS] for r in results
  ]
  lines = [
    '| ' + ' | '.join(headers) + ' |',
    '|' + '|'.join('---' for _ in headers) + '|',
  ]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  notes = sorted({f'{r.device} x{r.num_devices}' for r in results})
  sources = sorted({r.memory_source for r in results})
  lines.append('')
  lines.append(
    f'Device: {", ".join(notes)}. Peak memory: {"; ".join(sources)}.'
  )
  return '\n'.join(lines)
