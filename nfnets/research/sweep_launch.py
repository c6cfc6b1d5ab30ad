"""A sweep as `python -m experiments.train` command lines, for a cluster.

Each line sets the point's overrides as `--config.<key>=<value>` flags
that `ml_collections.config_flags` (which `experiments.train` uses) parses
back to the same config: a string field takes the text as it is, every
other field a Python literal (`("linear", "bias")`, `{"width": 0.25}`),
and every word is quoted for a POSIX shell (`shlex.quote`).
"""

import json
import os
import shlex
from typing import Any

import ml_collections
from ml_collections.config_flags import config_path

from nfnets.research import sweep_spec as spec_lib


def _literal(value: Any) -> str:
  """A Python literal of `value`, its strings in double quotes.

  Double quotes leave the single quotes to the shell: the printed word is
  '--config.k=("linear", "bias")', not a tangle of '"'"'.
  """
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, str):
    return json.dumps(value)  # Its escapes are Python's too.
  if isinstance(value, tuple):
    items = [_literal(v) for v in value]
    return f'({", ".join(items)}{"," if len(items) == 1 else ""})'
  if isinstance(value, list):
    return f'[{", ".join(_literal(v) for v in value)}]'
  if isinstance(value, dict):
    items = (f'{_literal(k)}: {_literal(v)}' for k, v in value.items())
    return '{' + ', '.join(items) + '}'
  return repr(value)


def flag_text(base: ml_collections.ConfigDict, key: str, value: Any) -> str:
  """The text of `--config.<key>=` that config_flags parses back to `value`.

  Args:
    base: the config file's config (config_flags reads the field's type
      there, not in the point's config).
    key: the dotted key.
    value: the value in the point's config.
  """
  if config_path.get_type(key, base) is str and isinstance(value, str):
    return value  # A str field is parsed as the text itself.
  return _literal(value)


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
        f'--config.{key}={flag_text(base, key, _get(config, key))}'
        for key in keys
      ),
    ]  # fmt: skip
    lines.append(' '.join(shlex.quote(word) for word in words))
  return lines
