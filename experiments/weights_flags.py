"""The flags that say which weights a command uses: a file or a run.

`define_weights_flags` gives evaluate, predict, export and convert_weights
the same `--weights` / `--workdir` choice (with `--params`, `--step`,
`--variant`, `--model_kwargs` and `--config`), and `WeightsFlags.check`
refuses a mix of them, or a directory passed as `--weights`, saying what
to pass instead (`weights_directory_error`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import app, flags

from experiments.common import (
  RUN_CONFIG_FILE,
  define_config_flag,
  define_step_flag,
  json_object_flag,
)


@dataclasses.dataclass(frozen=True)
class WeightsFlags:
  """The flags that say which weights a command uses: a file or a run.

  Attributes are absl flag holders: `config` (see `define_config_flag`),
  `weights`, `workdir`, `params` ('ema' or 'raw'), `step` (a checkpoint of
  the run), `variant` and `model_kwargs` (JSON).
  """

  config: Any
  weights: Any
  workdir: Any
  params: Any
  step: Any
  variant: Any
  model_kwargs: Any

  def check(self, images: bool = False) -> None:
    """Raises `app.UsageError` unless exactly one source is given, sanely.

    Args:
      images: the command takes image files too (a folder of them passed
        as --weights is then pointed after the flags).
    """
    weights, workdir = self.weights.value, self.workdir.value
    if bool(weights) == bool(workdir):
      raise app.UsageError('Pass exactly one of --weights and --workdir.')
    if weights and os.path.isdir(weights):
      raise app.UsageError(weights_directory_error(weights, images))
    if weights and self.step.value is not None:
      raise app.UsageError('--step picks a checkpoint of a --workdir run.')
    if workdir and (self.variant.value or self.model_kwargs.value):
      raise app.UsageError(
        '--variant and --model_kwargs are for --weights; with --workdir the '
        'model comes from the run (override with --config.model.*).'
      )

  def parsed_model_kwargs(self) -> dict | None:
    """`--model_kwargs` as a dict (None when not given)."""
    if not self.model_kwargs.value:
      return None
    return json_object_flag(self.model_kwargs)


def _run_dir_holding(path: str) -> str | None:
  """The training run (a folder with config.json) `path` is in, or None."""
  current = os.path.abspath(path)
  while True:
    if os.path.isfile(os.path.join(current, RUN_CONFIG_FILE)):
      return current
    parent = os.path.dirname(current)
    if parent == current:
      return None
    current = parent


def weights_directory_error(path: str, images: bool = False) -> str:
  """What to pass instead of a directory given as `--weights`.

  A training run's folder takes `--workdir`; so does a folder inside one
  (a checkpoint `checkpoints/N` with `--step=N`); a folder of images is
  what predict classifies, passed after the flags.

  Args:
    path: the `--weights` value, a directory.
    images: the command classifies images (predict).

  Returns:
    The message.
  """
  head = f'--weights={path} is a directory'
  run = _run_dir_holding(os.path.expanduser(path))
  if run is not None:
    shown = run if os.path.isabs(path) else os.path.relpath(run)
    inside = os.path.relpath(os.path.abspath(os.path.expanduser(path)), run)
    parts = inside.split(os.sep)
    if inside == '.':
      return f"{head}, a training run's; pass --workdir={shown} instead."
    if len(parts) == 2 and parts[0] == 'checkpoints' and parts[1].isdigit():
      return (
        f'{head}, a checkpoint of the training run {shown}; pass '
        f'--workdir={shown} --step={int(parts[1])} instead.'
      )
    return (
      f'{head} inside the training run {shown}; pass --workdir={shown} '
      'for its newest checkpoint instead.'
    )
  text = (
    f"{head}; pass a weights file (.safetensors, .npz or DeepMind's "
    'F*_haiku.npz)'
  )
  if images and _holds_images(path):
    text += ', and the image folder after the flags'
  return text + '.'


def _holds_images(path: str) -> bool:
  from nfnets.data import image_files

  try:
    names = image_files.list_dir(os.path.expanduser(path))
  except OSError:
    return False
  return any(image_files.classify(name) != 'other' for name in names)


def define_weights_flags(what_it_does: str) -> WeightsFlags:
  """Defines --config, --weights, --workdir, --params, --variant and
  --model_kwargs.

  Args:
    what_it_does: completes the --workdir help "Training workdir: ...",
      e.g. 'predicts with its newest checkpoint.'.
  """
  return WeightsFlags(
    config=define_config_flag(),
    weights=flags.DEFINE_string(
      'weights', None,
      'Weights file: DeepMind F*_haiku.npz, .safetensors, .npz.',
    ),
    workdir=flags.DEFINE_string(
      'workdir', None, f'Training workdir: {what_it_does}'
    ),
    params=flags.DEFINE_enum(
      'params', 'ema', ['ema', 'raw'],
      'With --workdir: the EMA or raw params.',
    ),
    step=define_step_flag(),
    variant=flags.DEFINE_string(
      'variant', None,
      'NFNet variant (F0..F7, F0+..); default: from the file.',
    ),
    model_kwargs=flags.DEFINE_string(
      'model_kwargs', None,
      'JSON of extra NFNet kwargs, e.g. {"width": 0.5}.',
    ),
  )  # fmt: skip
