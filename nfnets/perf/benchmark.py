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
* peak memory: on GPU/TPU the device allocator's `peak_bytes_in_use`
  where nothing in the process had used the device before this run (JAX
  cannot reset that peak, so in a later run of the process it could be an
  earlier run's); otherwise, and on CPU, which has no allocator statistics,
  XLA's own accounting of the compiled step (`memory_analysis()`:
  arguments + outputs + temporaries - aliased/donated bytes), i.e. the live
  buffers of one step (also on GPU/TPU after `compile_only`, when the step
  never ran). The process's peak RSS is reported beside it (it includes
  Python, the compiler and every other buffer the process ever held).

The timed train step is the one users train with, built by
`nfnets.perf.workload.make_workload` and jitted here with the state donated.
Measurements come from `nfnets.perf.measure` and are recorded in a
`nfnets.perf.report.BenchmarkResult`.
"""

import dataclasses
import time

import jax
import ml_collections

from nfnets.models import flops
from nfnets.perf import (
  compile_trace,
  kernel_census,
  measure,
  op_profile,
  report,
  workload,
)


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
  augment: str = 'none',
  sam: str = 'off',
  profile_steps: int = 0,
) -> report.BenchmarkResult:
  """Benchmarks the train step (and forward pass) of one registry model.

  Runs on the first device with synthetic data already on it. The train step
  is the trainer's, `nfnets.train.step.make_train_step` with the
  recipe's optimizer (AGC-SGD, EMA off), jitted with the state donated.

  Args:
    model_config: `config.model` (see `workload.make_model_config`).
    batch_size: images per step.
    image_size: square input resolution; None =
      `workload.default_image_size`.
    steps: timed train steps (the median is reported), at least 1.
    warmup: untimed train steps after compilation (at least one runs);
      neither their wall nor their CPU time is counted.
    dtype: compute dtype; None = `workload.default_dtype()`.
    num_classes: classifier width.
    forward_steps: timed forward passes (None = `steps`; 0 skips them).
    compile_only: only compile (and measure memory); step times are NaN.
    compiler_options: XLA options for this compilation, e.g.
      {'xla_backend_optimization_level': 0} (see docs/performance.md).
    trace_compile: record XLA's compile events (`compile_events`; the
      tracing makes the compile a little slower).
    augment: 'none', or 'device' / 'device_reference' to run the F0
      recipe's augmentation inside the step on a uint8 batch
      (`workload.make_workload`).
    sam: SAM in the step: 'off', 'sync' (ascent on every row) or 'paper'
      (20% of the rows, per device), rho 0.05 (`workload.SAMS`).
    profile_steps: after timing, profile this many train steps and record
      where their time goes by kind of kernel (`kernel_time`,
      `nfnets.perf.op_profile`); 0 = off.

  Returns:
    A `nfnets.perf.report.BenchmarkResult`; its `options` also record
    `warmup`, `forward_steps`, `compiler_options`, `augment` and `sam`.

  Raises:
    ValueError: for a batch size, image size or step count below 1, or a
      negative warmup or forward step count.
  """
  _check_counts(batch_size, image_size, steps, warmup, forward_steps)
  dtype = dtype or workload.default_dtype()
  if image_size is None:
    image_size = workload.default_image_size(model_config)
  forward_steps = steps if forward_steps is None else forward_steps
  device = jax.devices()[0]
  # The allocator's peak so far: JAX cannot reset it, so where earlier work
  # set one, the peak after this run's step may be that work's.
  earlier_peak = measure.device_peak_bytes(device)
  t_init = time.perf_counter()
  work = workload.make_workload(
    model_config, batch_size, image_size, dtype, num_classes, device,
    augment=augment, sam=sam,
  )  # fmt: skip
  jax.block_until_ready(work.state)
  init_s = time.perf_counter() - t_init
  compiled, events, compile_s = _compile(work, compiler_options, trace_compile)
  train = measure.summarize_times([float('nan')])
  train['cpu'] = float('nan')
  forward_ms = float('nan')
  if not compile_only:
    train = _time_train(compiled, work, steps, warmup)
    if profile_steps:
      kernel_time = op_profile.profile(
        _step_runner(compiled, work), compiled.as_text(), profile_steps
      )
    if forward_steps > 0:
      forward_ms = _time_forward(work, dtype, forward_steps)
  result = _result(
    model_config, work, compiled, device, train, forward_ms,
    batch_size=batch_size, image_size=image_size, num_classes=num_classes,
    dtype=dtype, compile_s=compile_s, init_s=init_s,
    steps=0 if compile_only else steps, earlier_peak=earlier_peak,
  )  # fmt: skip
  result.options.update(
    augment=augment, sam=sam, warmup=warmup, forward_steps=forward_steps,
    compiler_options=dict(compiler_options or {}),
  )  # fmt: skip
  result.compile_events = [[e.name, e.seconds, e.count] for e in events]
  if not compile_only and profile_steps:
    result.kernel_time = [dataclasses.asdict(k) for k in kernel_time]
  return result


def _check_counts(batch_size, image_size, steps, warmup, forward_steps):
  """Raises a ValueError for a count out of range (0 is no default)."""
  counts = {'batch_size': (batch_size, 1), 'steps': (steps, 1)}
  counts['warmup'] = (warmup, 0)
  if image_size is not None:
    counts['image_size'] = (image_size, 1)
  if forward_steps is not None:
    counts['forward_steps'] = (forward_steps, 0)
  for name, (value, lowest) in counts.items():
    if value < lowest:
      raise ValueError(f'{name} must be at least {lowest}, got {value}.')


def _step_runner(compiled, work: workload.Workload):
  """One call of the donated train step, carrying the state in `work`."""

  def run():
    work.state, metrics = compiled(work.state, work.batch, work.hyperparams)
    return metrics

  return run


def _compile(work: workload.Workload, compiler_options, trace_compile):
  """Compiles the donated train step.

  Returns:
    `(compiled, compile events, (wall seconds, CPU seconds))`.
  """
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = jax.jit(work.step, donate_argnums=0).lower(
    work.state, work.batch, work.hyperparams
  )  # fmt: skip
  events = []
  if trace_compile:
    compiled, events = compile_trace.compile_with_events(
      lowered, compiler_options
    )
  else:
    compiled = lowered.compile(compiler_options)
  seconds = (time.perf_counter() - t0, time.process_time() - c0)
  return compiled, events, seconds


def _time_train(compiled, work: workload.Workload, steps: int, warmup: int):
  """Times the donated train step; returns its timing summary.

  The warm-up steps (at least one) run before both clocks start, so the
  mean CPU time per step (`'cpu'`) covers the timed steps alone.
  """
  call = _step_runner(compiled, work)
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(call())
  c0 = time.process_time()
  times = measure.time_calls(call, steps, warmup=0)
  summary = measure.summarize_times(times)
  summary['cpu'] = (time.process_time() - c0) / len(times) * 1e3
  return summary


def _time_forward(work: workload.Workload, dtype: str, steps: int) -> float:
  """Median eval-mode forward time in ms (compiled and warmed up first)."""
  forward = jax.jit(workload.forward_fn(work.logits_fn, dtype))
  variables = (work.state.params, work.state.model_state)
  times = measure.time_calls(
    lambda: forward(variables, work.batch['images']), steps, warmup=1
  )
  return measure.summarize_times(times)['median']


def _result(model_config, work, compiled, device, train, forward_ms, *,
            batch_size, image_size, num_classes, dtype, compile_s,
            init_s, steps, earlier_peak):  # fmt: skip
  """Assembles the `BenchmarkResult` of one run."""
  macs = flops.count_model_macs(
    model_config, image_size, num_classes=num_classes
  )
  step_s = train['median'] / 1e3
  peak_gb, source = measure.peak_memory(
    compiled, device, step_ran=steps > 0, earlier_peak=earlier_peak
  )
  xla_bytes = measure.xla_memory_bytes(compiled)
  kernels = kernel_census.census(compiled.as_text())
  kwargs = dict(model_config.kwargs)
  return report.BenchmarkResult(
    model=workload.display_name(model_config),
    device=device.device_kind,
    num_devices=1,
    batch_size=batch_size,
    image_size=image_size,
    dtype=dtype,
    params=flops.count_params(work.state.params),
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
    peak_rss_gb=measure.peak_rss_gb(),
    fusions=kernels.fusions,
    distinct_kernels=kernels.distinct_kernels,
    kernels_by_source={k: list(v) for k, v in kernels.by_source.items()},
    remat=bool(kwargs.get('remat', False)),
    options={k: report.jsonable(v) for k, v in kwargs.items()},
    environment=report.environment(),
  )
