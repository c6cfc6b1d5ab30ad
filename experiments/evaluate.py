r"""Evaluates NFNet weights or a training run on a dataset split.

    # A training run: its newest checkpoint's raw and EMA params (--step=N
    # for another of its checkpoints), with the config the run saved (model,
    # dataset, eval image size, ...):
    python -m experiments.evaluate --workdir=runs/quickstart

    # DeepMind's F0 weights on ImageNet (validation, 256 px, top-1/top-5):
    python -m experiments.evaluate --config=configs/f0.py \
      --weights=pretrained/F0_haiku.npz \
      --config.data.data_dir=/path/to/tensorflow_datasets

With --workdir alone the config is the run's `<workdir>/config.json`; with
--config it is that file. Override any field with --config.x.y=value; for a
run, the differences from its saved config are printed first. --output
writes the metrics as JSON; an existing file there is only replaced if it
holds earlier metrics (checked before the evaluation starts). User errors
exit with status 2 (usage, config) or 1 (missing files); NFNETS_TRACEBACK=1
shows their tracebacks. See docs/pretrained.md.
"""

import json
import os

from absl import app, flags

from experiments import common, output_files, weights_flags

_CONFIG = common.define_config_flag()
_WEIGHTS = flags.DEFINE_string(
  'weights', '', 'Weights file (DeepMind F*_haiku.npz, .safetensors, .npz).'
)
_WORKDIR = flags.DEFINE_string(
  'workdir', '', 'Training workdir: evaluates its newest checkpoint.'
)
_STEP = common.define_step_flag()
_OUTPUT = flags.DEFINE_string(
  'output',
  '',
  'Optional JSON file for the metrics (its folder is made if missing). An '
  'existing file is replaced only if it holds metrics evaluate wrote.',
)
output_files.validate_output_file(
  _OUTPUT,
  replaceable=output_files.is_metrics_file,
  kind='a metrics file of experiments.evaluate',
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(_WEIGHTS.value) == bool(_WORKDIR.value):
    raise app.UsageError('Pass exactly one of --weights and --workdir.')
  if _WEIGHTS.value and os.path.isdir(os.path.expanduser(_WEIGHTS.value)):
    raise app.UsageError(weights_flags.weights_directory_error(_WEIGHTS.value))
  if _WEIGHTS.value and _STEP.value is not None:
    raise app.UsageError('--step picks a checkpoint of a --workdir run.')
  if _CONFIG.value is None:
    raise app.UsageError(
      'Pass --config=configs/<name>.py for the model and dataset of --weights.'
    )
  # Deferred so --help and flag errors stay fast.
  from nfnets.train import evaluation

  if _WORKDIR.value:
    common.print_config_differences(_WORKDIR.value, _CONFIG.value)
  results = evaluation.evaluate_from(
    _CONFIG.value,
    weights=_WEIGHTS.value,
    workdir=_WORKDIR.value,
    step=_STEP.value,
  )
  if 'step' in results:  # Names the checkpoint, e.g. after a fallback.
    print(f'{_WORKDIR.value}: the checkpoint of step {int(results["step"])}')
  for prefix in ('eval', 'eval_ema'):
    if f'{prefix}/top1' in results:
      print(
        f'{prefix}: top-1 {100 * results[f"{prefix}/top1"]:.2f}%  '
        f'top-5 {100 * results[f"{prefix}/top5"]:.2f}%  '
        f'loss {results[f"{prefix}/loss"]:.4f}  '
        f'({int(results[f"{prefix}/num_examples"])} images)'
      )
  if _OUTPUT.value:
    output = output_files.make_parent(os.path.expanduser(_OUTPUT.value))
    with open(output, 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)


if __name__ == '__main__':
  common.run(main, prepare=common.use_run_config)
