r"""Times training steps of registry models: `nfnets.perf.benchmark`'s CLI.

    python -m experiments.benchmark                      # NFNet-F0, b8, 192px
    python -m experiments.benchmark --model=NFNet --variant=F0,F1 \
      --batch_size=32 --image_size=192 --steps=50 --dtype=bfloat16 \
      --json_out=/tmp/bench.json
    python -m experiments.benchmark --model=NFNet:F0,NF_ResNet:ResNet50 \
      --steps=10
    python -m experiments.benchmark --table=paper --steps=5 \
      --plot_out=flops_vs_time.png       # the paper's Table 3, batch 32

`--model` is a comma-separated list of `nfnets.models.MODELS` names, each
optionally with a variant after ':'; NFNet entries without one take every
`--variant`. The default dtype is float32 on CPU and bfloat16 on GPU/TPU.
Prints a Markdown table shaped like the paper's Table 3; `--json_out`
writes every measurement, rewritten after each model so that a failure or
Ctrl-C keeps the earlier ones. `--table=paper` times the paper's six models
(ResNet-50, EfficientNet-B0, SE-ResNet-50, NFNet-F0/F1, EfficientNet-B4) at
their train resolutions and prints the paper's figures beside ours, where
each step's time goes by kind of kernel, and optionally a FLOPs-vs-time
plot (`nfnets.perf.paper_table`); it refuses the flags it does not use.
See docs/performance.md.
"""

import os

from absl import app, flags

from experiments import common, output_files

_MODEL = flags.DEFINE_list(
  'model', ['NFNet'], 'Registry names, each optionally `Name:variant`.'
)
_VARIANT = flags.DEFINE_list(
  'variant', ['F0'], 'NFNet variants for NFNet entries without one.'
)
_BATCH = flags.DEFINE_integer(
  'batch_size', None, 'Images per step (default 8; 32 with --table=paper).'
)
_SIZE = flags.DEFINE_integer(
  'image_size',
  None,
  "Square resolution; default the NFNet variant's train size, else 224.",
)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps.')
_WARMUP = flags.DEFINE_integer(
  'warmup', 2, 'Untimed steps after compile (at least one runs).'
)
_FWD = flags.DEFINE_integer(
  'forward_steps', None, 'Timed forward passes (default --steps; 0 = skip).'
)
common.validate_int_range(_BATCH, 1, meaning='images per step')
common.validate_int_range(_SIZE, 1, meaning='square resolution in pixels')
common.validate_int_range(_STEPS, 1, meaning='timed train steps')
common.validate_int_range(_WARMUP, 0, meaning='untimed train steps')
common.validate_int_range(_FWD, 0, meaning='timed forward passes; 0 = skip')
_DTYPE = flags.DEFINE_enum(
  'dtype', None, ['float32', 'bfloat16', 'bfloat16_convs'],
  'Compute dtype (config.train.compute_dtype); bfloat16_convs: float32 '
  'with bfloat16 conv operands. Default float32 on CPU, bfloat16 on '
  'accelerators.',
)  # fmt: skip
_REMAT = flags.DEFINE_bool('remat', None, 'Rematerialise every block.')
_GROUPED = flags.DEFINE_enum(
  'grouped_conv', None, ['auto', 'split', 'native'],
  'Grouped conv implementation (NFNet); default auto.',
)  # fmt: skip
_KWARGS = flags.DEFINE_string(
  'model_kwargs', '{}', 'JSON dict of extra constructor kwargs.'
)
_COMPILE_ONLY = flags.DEFINE_bool(
  'compile_only', False, 'Only compile and report compile time and memory.'
)
_CACHE = flags.DEFINE_string(
  'compilation_cache_dir', '',
  'Persistent compilation cache directory ("" = off, i.e. cold compiles).',
)  # fmt: skip
_COMPILER_OPTIONS = flags.DEFINE_string(
  'compiler_options', '{}',
  'JSON dict of XLA compiler options, e.g. '
  '\'{"xla_backend_optimization_level": 0}\'.',
)  # fmt: skip
_TRACE = flags.DEFINE_integer(
  'trace_compile', 0,
  'Print the N longest XLA compile events of each train step '
  '(nfnets.perf.compile_trace; 0 = off).',
)  # fmt: skip
_AUGMENT = flags.DEFINE_list(
  'augment',
  ['none'],
  "Augmentation in the step, one run each: 'none' (float batch), 'device' "
  "(F0 recipe's MixUp/CutMix/RandAugment on a uint8 batch, in-batch "
  "pairing), 'device_reference' (2b images mixed into b).",
)
_SAM = flags.DEFINE_list(
  'sam',
  ['off'],
  "SAM in the step (rho 0.05), one run each: 'off', 'sync' (ascent on "
  "every row, one ascent point) or 'paper' (ascent on 20% of each "
  "device's rows, per device; nfnets.train.sam).",
)
_JSON = flags.DEFINE_string('json_out', '', 'Write results to this JSON file.')
_TABLE = flags.DEFINE_enum(
  'table', None, ['paper'],
  "'paper': the NFNet paper's Table 3 models at their train resolutions "
  "with its figures beside ours (1 warm-up step, no forward timing); "
  'takes --batch_size, --steps, --dtype, --paper_models, --breakdown, '
  '--plot_out, --json_out and --compilation_cache_dir, and refuses the '
  'other step flags.',
)  # fmt: skip
_PAPER_MODELS = flags.DEFINE_list(
  'paper_models', None, 'With --table=paper: a subset, e.g. NFNet-F0,ResNet-50.'
)
_BREAKDOWN = flags.DEFINE_bool(
  'breakdown', None,
  'Profile the train step and print its time by kind of kernel (conv '
  'kinds, GEMM, element-wise, ...); default on with --table=paper only.',
)  # fmt: skip
_PLOT = flags.DEFINE_string(
  'plot_out',
  '',
  'With --table=paper: write the FLOPs-vs-time plot (PNG; an existing file '
  'is replaced only if it is a plot this command wrote).',
)


def _is_earlier_result(path: str) -> bool:
  from nfnets.perf import report  # noqa: PLC0415  (deferred: fast --help)

  return output_files.is_json_result(path, report.is_benchmark_results)


output_files.validate_output_file(
  _JSON,
  replaceable=_is_earlier_result,
  kind='an earlier result of experiments.benchmark',
)


def _is_earlier_plot(path: str) -> bool:
  from nfnets.perf import plot_stamp  # noqa: PLC0415  (deferred: fast --help)

  return plot_stamp.is_stamped_png(path)


output_files.validate_output_file(
  _PLOT,
  replaceable=_is_earlier_plot,
  kind=(
    'a plot experiments.benchmark stamped as its own (to regenerate an '
    'older plot, move it aside first)'
  ),
)


def _register_non_empty(holder, what: str) -> None:
  """Refuses an empty list flag (`--model=`): it would time nothing."""

  def check(value) -> bool:
    if value is not None and not value:
      raise flags.ValidationError(f'name at least one {what}.')
    return True

  flags.register_validator(holder, check)


_register_non_empty(_MODEL, 'model, e.g. --model=NFNet:F0')
_register_non_empty(_VARIANT, 'variant, e.g. --variant=F0')
_register_non_empty(_AUGMENT, 'augmentation, e.g. --augment=none')
_register_non_empty(_SAM, 'SAM form, e.g. --sam=off')
_register_non_empty(_PAPER_MODELS, 'paper model, e.g. NFNet-F0')
# What --table=paper does not use: it times each model its own way.
_NOT_PAPER = (
  _MODEL, _VARIANT, _SIZE, _AUGMENT, _SAM, _COMPILE_ONLY, _WARMUP, _FWD,
  _REMAT, _GROUPED, _KWARGS, _COMPILER_OPTIONS, _TRACE,
)  # fmt: skip


def _check_paper_flags() -> None:
  """Refuses flags that would do nothing with or without --table=paper."""
  if _TABLE.value == 'paper':
    given = [f'--{h.name}' for h in _NOT_PAPER if flags.FLAGS[h.name].present]
    if given:
      raise app.UsageError(
        f"--table=paper times the paper's models its own way and does not "
        f'use {", ".join(given)}; drop {"them" if given[1:] else "it"}, or '
        'time a model without --table=paper.'
      )
    return
  for holder in (_PLOT, _PAPER_MODELS):
    if holder.value:
      raise app.UsageError(
        f'--{holder.name} only applies with --table=paper; add --table=paper '
        f'or drop --{holder.name}.'
      )


def _model_specs() -> list[tuple[str, dict]]:
  """(registry name, kwargs) for every benchmarked model."""
  extra = common.json_object_flag(_KWARGS)
  if _REMAT.value is not None:
    extra['remat'] = _REMAT.value
  if _GROUPED.value is not None:
    extra['grouped_conv'] = _GROUPED.value
  specs = []
  for entry in _MODEL.value:
    name, _, variant = entry.partition(':')
    if variant:
      specs.append((name, dict(extra, variant=variant)))
    elif name == 'NFNet':
      specs += [(name, dict(extra, variant=v)) for v in _VARIANT.value]
    else:
      specs.append((name, dict(extra)))
  return specs


def _checked_configs(workload) -> list:
  """Every model's config, all checked before the first is timed.

  A typo in the last --model, --variant, --model_kwargs key, --augment or
  --sam value would otherwise fail after the others were timed, losing
  them.
  """
  try:
    for augment in _AUGMENT.value:
      workload.check_augment(augment)
    for sam in _SAM.value:
      workload.check_sam(sam)
    return [workload.make_model_config(n, **k) for n, k in _model_specs()]
  except ValueError as e:  # A flag's mistake: no traceback hint.
    raise app.UsageError(str(e)) from e


def _print_compile_events(events) -> None:
  from nfnets.perf import compile_trace  # noqa: PLC0415

  print('XLA compile events (seconds summed by name; they nest and overlap):')
  rows = [compile_trace.CompileEvent(*event) for event in events]
  print(compile_trace.format_events(rows), flush=True)


def _print_kernel_time(kernel_time) -> None:
  from nfnets.perf import op_profile  # noqa: PLC0415

  rows = [op_profile.KindTime(**k) for k in kernel_time]
  print('Train step time by kind of kernel:')
  print(op_profile.format_breakdown(rows), flush=True)


def _paper_table():
  """--table=paper: the paper's six models, its figures beside ours."""
  from nfnets.perf import paper_table  # noqa: PLC0415

  def save(rows):  # After each model: a failure keeps the earlier ones.
    if _JSON.value:
      _write_json([paper_table.row_dict(r) for r in rows])

  rows = paper_table.run_paper_table(
    batch_size=32 if _BATCH.value is None else _BATCH.value,
    steps=_STEPS.value,
    dtype=_DTYPE.value,
    labels=_PAPER_MODELS.value,
    breakdown=_BREAKDOWN.value is not False,
    log=lambda message: print(message, flush=True),
    on_row=save,
  )
  print(paper_table.format_paper_table(rows))
  if _BREAKDOWN.value is not False:
    print('\nTrain step time by kind of kernel (ms/step, share):')
    print(paper_table.format_breakdowns(rows))
  if _PLOT.value:
    paper_table.plot_flops_vs_time(rows, output_files.make_parent(_PLOT.value))
    print(f'Wrote {_PLOT.value}')
  if _JSON.value:
    print(f'Wrote {_JSON.value}')


def _write_json(rows: list) -> None:
  """Writes --json_out whole, through a temporary file."""
  from nfnets.perf import report  # noqa: PLC0415

  report.write_json(output_files.make_parent(_JSON.value), rows)


def _time_models(benchmark, report, workload) -> None:
  """Times every --model x --augment x --sam run, printing each row."""
  results = []
  configs = _checked_configs(workload)
  compiler_options = common.json_object_flag(
    _COMPILER_OPTIONS, '{"xla_backend_optimization_level": 0}'
  )
  columns = dict(
    augment_column=any(a != 'none' for a in _AUGMENT.value),
    sam_column=any(s != 'off' for s in _SAM.value),
  )
  runs = [
    (c, a, s) for c in configs for a in _AUGMENT.value for s in _SAM.value
  ]
  for config, augment, sam in runs:
    print(
      f'Benchmarking {workload.display_name(config)} (augment={augment}, '
      f'sam={sam}) ...',
      flush=True,
    )
    result = benchmark.run_benchmark(
      config,
      batch_size=8 if _BATCH.value is None else _BATCH.value,
      image_size=_SIZE.value,
      steps=_STEPS.value,
      warmup=_WARMUP.value,
      dtype=_DTYPE.value,
      forward_steps=_FWD.value,
      compile_only=_COMPILE_ONLY.value,
      compiler_options=compiler_options or None,
      trace_compile=_TRACE.value > 0,
      augment=augment,
      sam=sam,
      profile_steps=2 if _BREAKDOWN.value else 0,
    )
    results.append(result)
    if _JSON.value:  # After each model: a failure keeps the earlier ones.
      _write_json([r.to_dict() for r in results])
    _print_result(report.format_table([result], **columns), result)
  print(report.format_table(results))
  if _JSON.value:
    print(f'Wrote {_JSON.value}')


def _print_result(table: str, result) -> None:
  """One model's row, kernel census, and breakdown or compile events."""
  print(table.split('\n')[2], flush=True)
  print(
    f'  compiled step: {result.fusions} fusions, {result.distinct_kernels}'
    f' distinct kernels; by source (fusions, distinct): '
    f'{result.kernels_by_source}',
    flush=True,
  )
  if result.kernel_time:
    _print_kernel_time(result.kernel_time)
  if _TRACE.value:
    _print_compile_events(result.compile_events[: _TRACE.value])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _check_paper_flags()
  from nfnets.train import runtime  # noqa: PLC0415

  runtime.keep_freed_memory_on_cpu()  # Before JAX starts a backend.
  import jax  # noqa: PLC0415  (after flag parsing: fast --help)

  from nfnets.perf import benchmark, report, workload  # noqa: PLC0415

  if _CACHE.value:
    jax.config.update(
      'jax_compilation_cache_dir', os.path.expanduser(_CACHE.value)
    )
  else:  # Cold compiles, even where JAX_COMPILATION_CACHE_DIR names a cache.
    jax.config.update('jax_enable_compilation_cache', False)
  if _TABLE.value == 'paper':
    return _paper_table()
  return _time_models(benchmark, report, workload)


if __name__ == '__main__':
  common.run(main)
