"""A sweep as `python -m experiments.train` command lines, for a cluster.

Each line sets the point's overrides as `--config.<key>=<value>` flags
that `ml_collections.config_flags` (which `experiments.train` uses) parses
back to the same config: a string field takes the text as it is, every
other field a Python literal (`("linear", "bias")`, `{"width": 0.25}`),
and every word is quoted for a POSIX shell (`shlex.quote`).
"""

import os
import shlex
from typing import Any

import ml_collections

from nfnets.research import sweep_spec as spec_lib
from nfnets.train import config_json


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split('.'):
    config = config[part]
  return config


def launch_lines(
  sweep: spec_lib.Sweep,
  outdir: str,
  base: ml_collections.ConfigDict | None = None,
) -> list[str]:
  """One `python -m experiments.train` command per point (for a cluster).

  The points' configs are checked first (`spec_lib.point_configs`): a
  value the trainer would refuse is an error here, not in every job.

  Args:
    sweep: the sweep.
    outdir: parent of the points' workdirs.
    base: the base config; loaded from `sweep.base_config` when None.

  Returns:
    Shell command lines.
  """
  base = spec_lib.load_config(sweep.base_config) if base is None else base
  lines = []
  for point, config in spec_lib.point_configs(sweep, base):
    keys = list(dict.fromkeys([*sweep.overrides, *point.overrides]))
    words = [
      'python', '-m', 'experiments.train',
      f'--config={sweep.base_config}',
      f'--workdir={os.path.join(outdir, point.name)}',
      *(
        f'--config.{key}={config_json.flag_text(base, key, _get(config, key))}'
        for key in keys
      ),
    ]  # fmt: skip
    lines.append(' '.join(shlex.quote(word) for word in words))
  return lines
