r"""Trains and evaluates an NFNet: a thin wrapper around `train_and_evaluate`.

    python -m experiments.train --config=configs/f0.py --workdir=runs/f0
    python -m experiments.train --config=configs/f0.py:plus ...   # F0+
    python -m experiments.train --config=configs/quickstart.py \
      --workdir=runs/quickstart --config.optimizer.clipping=0.02

Rerunning with the same --workdir resumes from its newest checkpoint. See
docs/training.md.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file (configs/*.py[:arg]).',
  lock_config=True,
)  # fmt: skip
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, metrics and the config.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def _parse_flags(argv):
  """Parses flags; turns a bad `--config.*` override into a clear message."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # ml_collections raises these (not flags.Error) for an unknown key or a
    # value of the wrong type, which absl would print as a traceback.
    message = str(e).strip('\'"').replace('\\n', '\n')
    sys.stderr.write(
      f'Error in the command-line config overrides: {message}\n'
      'Check the key names against the config file; print the resolved '
      'config of a run in <workdir>/config.json.\n'
    )
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every checkpoint step at INFO; progress is printed anyway.
    logging.set_verbosity(logging.WARNING)
  # Imported after flag parsing so `--help` and flag errors stay fast.
  from nfnets.train import NonFiniteLossError, train_and_evaluate

  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except NonFiniteLossError as e:
    sys.stderr.write(f'{e}\n')
    sys.exit(1)
  if result.preempted:
    sys.exit(143)  # 128 + SIGTERM: tell the scheduler the job did not finish.


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
