r"""Trains and evaluates an NFNet: a thin wrapper around `train_and_evaluate`.

    python -m experiments.train --config=configs/f0.py --workdir=runs/f0
    python -m experiments.train --config=configs/f0.py:plus ...   # F0+
    python -m experiments.train --config=configs/quickstart.py \
      --workdir=runs/quickstart --config.optimizer.clipping=0.02

Rerunning with the same --workdir resumes from its newest readable
checkpoint. A resume whose config changes how the run trains (model, data,
optimizer, batch, schedule, ...) is refused with the differences listed,
unless --allow_config_change is passed; the run length and the logging,
eval and checkpoint cadence may change freely. Every segment's config is
kept in <workdir>/configs/. Ctrl-C (SIGINT) and SIGTERM save a checkpoint
and exit with status 130 and 143; a second Ctrl-C exits at once. User
errors exit with status 2 (usage, config) or 1 (runtime);
NFNETS_TRACEBACK=1 shows their tracebacks. See docs/training.md.
"""

import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file (configs/*.py[:arg]).',
  lock_config=True,
)  # fmt: skip
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, metrics and the configs.'
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Resume even when the config changes how the run trains (model, data, '
  'optimizer, batch, schedule); the change is recorded in <workdir>/configs.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported after flag parsing so `--help` and flag errors stay fast.
  from nfnets.train import train_and_evaluate

  result = train_and_evaluate(
    _CONFIG.value,
    _WORKDIR.value,
    allow_config_change=_ALLOW_CONFIG_CHANGE.value,
  )
  if result.preempted:
    # 128 + the signal: tells a scheduler (or the shell) the run stopped
    # early; rerunning the same command resumes it.
    sys.exit(128 + (result.stop_signal or signal.SIGTERM))


if __name__ == '__main__':
  common.run(main)
