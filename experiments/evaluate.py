r"""Evaluates NFNet weights or a training run on a dataset split.

    # DeepMind's F0 weights on ImageNet (validation, 256 px, top-1/top-5):
    python -m experiments.evaluate --config=configs/f0.py \
      --weights=pretrained/F0_haiku.npz \
      --config.data.data_dir=/path/to/tensorflow_datasets

    # The raw and EMA params of the newest checkpoint of a training run:
    python -m experiments.evaluate --config=configs/quickstart.py \
      --workdir=runs/quickstart

The model, dataset, split, image size (the variant's test size in the
variant configs) and batch size come from the config; override any of them
with --config.x.y=value. --output writes the metrics as JSON. See
docs/pretrained.md.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file (configs/*.py[:arg]).',
  lock_config=True,
)  # fmt: skip
_WEIGHTS = flags.DEFINE_string(
  'weights', '', 'Weights file (DeepMind F*_haiku.npz, .safetensors, .npz).'
)
_WORKDIR = flags.DEFINE_string(
  'workdir', '', 'Training workdir: evaluates its newest checkpoint.'
)
_OUTPUT = flags.DEFINE_string('output', '', 'Optional JSON file for metrics.')
flags.mark_flags_as_required(['config'])


def _parse_flags(argv):
  """Parses flags; a bad `--config.*` override gets a short message."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    sys.stderr.write(f'Error in the command-line config overrides: {e}\n')
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(_WEIGHTS.value) == bool(_WORKDIR.value):
    raise app.UsageError('Pass exactly one of --weights and --workdir.')
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every checkpoint operation at INFO.
    logging.set_verbosity(logging.WARNING)
  # Deferred so --help and flag errors stay fast.
  from nfnets.train import evaluation

  try:
    results = evaluation.evaluate_from(
      _CONFIG.value, weights=_WEIGHTS.value, workdir=_WORKDIR.value
    )
  except (FileNotFoundError, ValueError) as e:
    # Each says what to do: a missing or mismatched weights file (a
    # pretrained.WeightsError is a ValueError), a BN model given --weights,
    # a checkpoint of another config.
    sys.stderr.write(f'{e}\n')
    sys.exit(1)
  for prefix in ('eval', 'eval_ema'):
    if f'{prefix}/top1' in results:
      print(
        f'{prefix}: top-1 {100 * results[f"{prefix}/top1"]:.2f}%  '
        f'top-5 {100 * results[f"{prefix}/top5"]:.2f}%  '
        f'loss {results[f"{prefix}/loss"]:.4f}  '
        f'({int(results[f"{prefix}/num_examples"])} images)'
      )
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
