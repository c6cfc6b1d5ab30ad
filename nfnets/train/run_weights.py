"""A training run as a source of weights, where its dataset is not.

A run's checkpoints are used far from its data: exported on a serving
machine, asked for predictions, fine-tuned from on another dataset
(`config.model.init_from=<workdir>`), converted to a weights file. What
those need of the dataset is small: the number of classes (the
classifier's width, to restore the checkpoint) and the class names (to
label predictions). The trainer records both in `<workdir>/dataset.json`
when a segment starts (`write_dataset_record`); `run_dataset_info` reads
them from there, and only a run without the record (written before it
existed) needs its dataset at hand. The record also says whether the
images are photos, which decides the eval preprocessing 'auto' stands for
(`nfnets.data.plan.eval_preproc_mode`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import NamedTuple

import jax

from nfnets import data
from nfnets.data import plan
from nfnets.train import evaluation, provenance

DATASET_FILE = 'dataset.json'
PARAM_SETS = ('ema', 'raw', 'auto')


def write_dataset_record(workdir: str, data_config, info) -> str:
  """Writes what the run knows of its dataset to `<workdir>/dataset.json`.

  Args:
    workdir: the run's workdir (it exists).
    data_config: the run's `config.data` (its name is recorded).
    info: the dataset's `nfnets.data.DatasetInfo`.

  Returns:
    The file's path.
  """
  record = {
    'name': data_config.name,
    'num_classes': int(info.num_classes),
    'class_names': [str(name) for name in info.class_names],
    'num_train_examples': int(info.num_train_examples),
    'num_eval_examples': int(info.num_eval_examples),
    'natural_images': bool(info.natural_images),
  }
  path = os.path.join(workdir, DATASET_FILE)
  tmp = f'{path}.tmp-{os.getpid()}'  # A reader never sees half a file.
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)
  return path


def read_dataset_record(workdir: str) -> data.DatasetInfo | None:
  """The dataset a run recorded, or None for a run without the record.

  Raises:
    ValueError: the record exists but cannot be read.
  """
  path = os.path.join(os.path.expanduser(workdir), DATASET_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    names = tuple(record['class_names'])
    info = data.DatasetInfo(
      num_classes=int(record['num_classes']),
      num_train_examples=int(record['num_train_examples']),
      num_eval_examples=int(record['num_eval_examples']),
      class_names=names,
      natural_images=bool(record['natural_images']),
    )
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f'{path!r} cannot be read ({type(e).__name__}: {e}); the trainer '
      'rewrites it when the run is resumed.'
    ) from e
  if len(names) != info.num_classes:
    raise ValueError(
      f'{path!r} names {len(names)} classes but records num_classes='
      f'{info.num_classes}; the trainer rewrites it when the run is resumed.'
    )
  return info


_RESUME_CLASSES_ADVICE = (
  'restore the dataset as it was, or train on this one in a fresh --workdir.'
)


def check_same_classes(
  workdir: str, info: data.DatasetInfo, advice: str = _RESUME_CLASSES_ADVICE
) -> None:
  """Refuses a run's checkpoints on a dataset whose classes changed.

  A class folder added to (or removed from) any split changes the class
  count and the labels, so the run's checkpoints no longer fit; the
  mismatch would otherwise surface as a checkpoint shape error that blames
  the config (or, with renamed classes, as wrong metrics).

  Args:
    workdir: the run's workdir (its `dataset.json`, if any, is compared).
    info: the dataset as it is now.
    advice: what to do instead (resuming, by default).
  """
  try:
    recorded = read_dataset_record(workdir)
  except ValueError:
    return  # A damaged record: rewritten when the segment starts.
  if recorded is None or recorded.class_names == tuple(info.class_names):
    return
  before, now = recorded.class_names, tuple(info.class_names)
  added = [n for n in now if n not in before]
  missing = [n for n in before if n not in now]
  changed = (('new', added), ('gone', missing))
  what = '; '.join(f'{label} {names[:5]}' for label, names in changed if names)
  what = what or 'the same classes in another order'
  raise ValueError(
    f'The dataset now has {len(now)} classes, the run in {workdir} was '
    f'trained on {len(before)} ({DATASET_FILE}): {what}. Its checkpoints '
    f'fit those classes only: {advice}'
  )


def run_dataset_info(config, workdir: str) -> data.DatasetInfo:
  """The run's classes: from its record, else from its dataset.

  Args:
    config: the run's config (its `data` section is read only for a run
      without `dataset.json`).
    workdir: the run's workdir.
  """
  recorded = read_dataset_record(workdir)
  return recorded if recorded is not None else data.dataset_info(config.data)


class RunParams(NamedTuple):
  """The params of a run's newest readable checkpoint, and what they are."""

  params: dict
  model_state: dict
  step: int
  params_set: str  # 'ema' or 'raw'.
  config: object  # The run's saved config.
  info: data.DatasetInfo

  @property
  def description(self) -> str:
    """E.g. 'the EMA params of step 300', for messages."""
    label = 'EMA' if self.params_set == 'ema' else 'raw'
    return f'the {label} params of step {self.step}'


def run_params(
  workdir: str,
  params_set: str = 'auto',
  *,
  config=None,
  step: int | None = None,
  log: Callable[[str], None] = evaluation.warn,
) -> RunParams:
  """Restores the params of a run's newest readable checkpoint.

  The run's config gives the model; its `dataset.json` the classes. The
  arrays come back on the host (NumPy).

  Args:
    workdir: a training run's workdir.
    params_set: 'ema', 'raw', or 'auto': the EMA params when the run keeps
      them (what its evaluations report as `eval_ema`), else the raw ones.
    config: the run's config, e.g. with a user's overrides; default: the
      one it saved (`provenance.load_run_config`).
    step: the checkpoint to restore (default: the newest readable one).
    log: prints a warning (a damaged checkpoint passed over; default to
      stderr).

  Raises:
    FileNotFoundError: `workdir` is not a training run, or has no
      complete checkpoint.
    ValueError: 'ema' for a run without an EMA.
  """
  if params_set not in PARAM_SETS:
    raise ValueError(f'params_set={params_set!r}: use one of {PARAM_SETS}.')
  if config is None:
    config = provenance.load_run_config(workdir)
  info = run_dataset_info(config, workdir)
  step, sets = evaluation.restore_workdir(
    config, workdir, info.num_classes, step=step, log=log
  )
  if params_set == 'auto':
    params_set = 'ema' if 'eval_ema' in sets else 'raw'
  key = 'eval_ema' if params_set == 'ema' else 'eval'
  if key not in sets:
    raise ValueError(
      f'{workdir!r} keeps no EMA params (its config.optimizer.ema_decay '
      'is 0): use the raw ones (--params=raw).'
    )
  params, model_state = jax.device_get(sets[key])
  return RunParams(params, model_state, step, params_set, config, info)


def weights_metadata(run: RunParams) -> dict[str, str]:
  """What a weights file of a run's params records about them.

  `nfnets.pretrained.save_params` stores string metadata. For an NFNet,
  `variant` and `model_kwargs` (JSON) are what `predict --weights` and
  `nfnets.pretrained.load` build the model from; `class_names` (JSON),
  `image_size` and `eval_preproc` label and size its inputs as the run's
  evaluations did; `model`, `num_classes` and `source` say what the file
  is.

  Raises:
    ValueError: for a model with Haiku state (BatchNorm statistics), which
      weights files do not hold.
  """
  config = run.config
  if run.model_state:
    raise ValueError(
      f'A {config.model.name} keeps BatchNorm statistics, which a weights '
      "file cannot hold; use the run's workdir itself (--workdir for "
      'evaluate and predict; config.model.init_from=DIR to fine-tune).'
    )
  kwargs = dict(config.model.kwargs)
  metadata = {
    'model': config.model.name,
    'num_classes': str(run.info.num_classes),
    'class_names': json.dumps(list(run.info.class_names)),
    'image_size': str(config.data.eval_image_size),
    'eval_preproc': plan.eval_preproc_mode(
      config.data, run.info.natural_images
    ),
    'source': f'{run.description} of a run of {config.data.name}',
  }
  if config.model.name == 'NFNet':
    metadata['variant'] = str(kwargs.pop('variant', 'F0'))
  metadata['model_kwargs'] = json.dumps(kwargs)
  return metadata
