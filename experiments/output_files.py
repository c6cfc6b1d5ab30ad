"""Result files the commands write: checked when flags are parsed.

A benchmark or an evaluation writes its file after minutes or hours; a
path that cannot be written is refused at once instead, and an existing
file is replaced only when it is an earlier result of the same command
(`validate_output_file` with a `replaceable` test), so that a mistyped path
cannot replace a weights file or a run's config.json.
"""

import json
import os

from absl import flags

_SEPARATORS = tuple(filter(None, (os.sep, os.altsep)))


def validate_output_file(holder, replaceable=None, kind: str = '') -> None:
  """Checks a result-file flag when flags are parsed, not after the work.

  A benchmark or an evaluation writes its file at the end, after minutes or
  hours; a path that cannot be written (a directory, a path ending in a
  separator, a folder that is a file) is refused at once (exit 2) instead
  of losing the results then. A missing folder is made when the file is
  written (`make_parent`).

  Args:
    holder: the string flag's holder ('' = no file).
    replaceable: optional `path -> bool`: whether an existing file may be
      overwritten (e.g. it is an earlier result of the command); other
      existing files are refused, so that a mistyped path cannot replace a
      weights file or a run's config.json. Default: any file may be.
    kind: what `replaceable` accepts, for the refusal message (e.g. 'a
      metrics file of experiments.evaluate').
  """

  def check(path: str) -> bool:
    if not path:
      return True
    # absl's message starts "flag --name=value: ".
    path = os.path.expanduser(path)
    if os.path.isdir(path) or path.endswith(_SEPARATORS):
      # A missing 'dir/' passes every other check, then fails to open.
      what = 'is a directory' if os.path.isdir(path) else 'names a folder'
      example = os.path.join(path, 'result.json')
      raise flags.ValidationError(
        f'{what}; pass a file path in it (e.g. {example}).'
      )
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
      folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
      raise flags.ValidationError(
        f'{folder} is a file, not a folder: pick another path.'
      )
    if (
      replaceable is not None
      and os.path.isfile(path)
      and os.path.getsize(path) > 0  # An empty file (mktemp) holds nothing.
      and not replaceable(path)
    ):
      raise flags.ValidationError(
        f'the file exists and is not {kind or "a result file"}, so it is '
        'not replaced: pick another path.'
      )
    return True

  flags.register_validator(holder, check)


def is_json_result(path: str, looks_right) -> bool:
  """Whether `path` holds JSON for which `looks_right(value)` is True."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return False
  return bool(looks_right(value))


def is_png(path: str) -> bool:
  """Whether `path` is a PNG image (an earlier plot)."""
  try:
    with open(path, 'rb') as f:
      return f.read(8) == b'\x89PNG\r\n\x1a\n'
  except OSError:
    return False


def is_metrics_file(path: str) -> bool:
  """Whether `path` holds metrics an earlier `experiments.evaluate` wrote.

  Only such a file may be replaced by its `--output`: a mistyped path
  naming the weights being evaluated or a run's config.json would
  otherwise be lost. Evaluate writes a JSON object of numbers keyed 'step'
  and '<params>/<metric>' ('eval/top1', 'eval_ema/loss', ...).
  """
  return is_json_result(path, _looks_like_eval_metrics)


def _looks_like_eval_metrics(metrics) -> bool:
  return (
    isinstance(metrics, dict)
    and any(key.endswith('/top1') for key in metrics)
    and all(
      # A train record ('train/top1', 'lr') of a one-line metrics.jsonl is
      # valid JSON too, and not evaluate's.
      (key == 'step' or (key.startswith('eval') and '/' in key))
      and isinstance(value, int | float)
      and not isinstance(value, bool)
      for key, value in metrics.items()
    )
  )


def make_parent(path: str) -> str:
  """Makes the folder `path` is to be written in; returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return path
