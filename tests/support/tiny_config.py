"""The tests' tiny training config as a config file for the command lines.

    python -m experiments.train --config=tests/support/tiny_config.py \
      --workdir=W --config.train.compilation_cache_dir=DIR

`train_harness.tiny_config()`: a tiny NFNet on the digits, 6 steps of batch
16 at 32 px, so command-line tests train in seconds.
"""

import os
import sys

REPO = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from tests.support import train_harness  # noqa: E402


def get_config(arg=None):
  """Returns the locked tiny config (`arg` is unused)."""
  del arg
  return train_harness.tiny_config()
