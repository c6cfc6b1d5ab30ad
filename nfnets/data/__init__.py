"""Input pipelines: digits, ImageNet, any tfds or folder dataset.

Public API (see docs/data.md):

  default_config()            the `config.data` section
  validate_data_config(c)     its cheap checks (the iterators run them)
  dataset_info(data_config)   DatasetInfo(num_classes, num_train_examples,
                              num_eval_examples, class_names)
  make_train_iterator(...)    infinite NumPy batches for this process
  make_eval_iterator(...)     one padded, masked pass over the eval split
  make_batch_fn(data_config)  the train step's augmentation on the device
                              (None when the host augments)
  auto_choices(data_config)   what this host makes of the settings left
                              at 'auto' (loader, placement, pairing)

The iterators come from the loader `config.data.loader` names: tf.data
(`pipeline.py`, 'tf') or PIL and NumPy (`python_loader.py`, 'python');
'auto' takes tf.data when TensorFlow imports. Importing `nfnets.data`
never imports TensorFlow: the config, the sources, `dataset_info`, the
python loader and the device-side augmentation are free of it, and the
tf.data names (`make_train_dataset`, `make_eval_dataset`) are imported on
first use.
"""

import importlib

from nfnets.data import python_loader
from nfnets.data.config import (
  default_config,
  resolve_loader,
  validate_data_config,
)
from nfnets.data.device_augment import auto_choices, make_batch_fn
from nfnets.data.plan import dataset_info, eval_num_batches
from nfnets.data.recipe import MEAN_RGB, STDDEV_RGB
from nfnets.data.sources import SOURCES, DatasetInfo

# Name -> module of the tf.data-backed public names.
_LAZY = {
  'make_eval_dataset': 'pipeline',
  'make_train_dataset': 'pipeline',
}

__all__ = [
  'MEAN_RGB',
  'SOURCES',
  'STDDEV_RGB',
  'DatasetInfo',
  'auto_choices',
  'dataset_info',
  'default_config',
  'eval_num_batches',
  'make_batch_fn',
  'make_eval_dataset',
  'make_eval_iterator',
  'make_train_dataset',
  'make_train_iterator',
  'resolve_loader',
  'validate_data_config',
]


def _tf_pipeline():
  """The tf.data pipeline module; a short error when TensorFlow is absent."""
  try:
    return importlib.import_module(f'{__name__}.pipeline')
  except ImportError as e:
    raise ValueError(
      f"config.data.loader='tf' needs TensorFlow, which cannot be imported "
      f"({e}); install tensorflow, or set config.data.loader='python' (or "
      "'auto')."
    ) from e


def make_train_iterator(
  data_config,
  *,
  global_batch_size,
  process_index=0,
  process_count=1,
  seed=0,
  start_batch=0,
):
  """Returns an infinite iterator of this process's NumPy training batches.

  Args:
    data_config: the `config.data` ConfigDict.
    global_batch_size: examples per step over all processes; each process
      gets global_batch_size // process_count of them.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    seed: extra seed, e.g. the run's seed.
    start_batch: the first batch to yield; the iterator equals one started
      at 0 with `start_batch` batches skipped (the python loader skips
      without decoding them).

  Returns:
    Iterator of dicts (see `pipeline` and `python_loader`): `images`,
    int32 `labels`, and with host-side mixing `mix_labels` and `ratio`.

  Raises:
    ValueError: `data_config` is invalid (`validate_data_config`).
  """
  validate_data_config(data_config)
  kwargs = dict(
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
    seed=seed,
  )
  if resolve_loader(data_config) == 'python':
    return python_loader.make_train_iterator(
      data_config, start_batch=start_batch, **kwargs
    )
  it = _tf_pipeline().make_train_iterator(data_config, **kwargs)
  for _ in range(start_batch):
    next(it)
  return it


def make_eval_iterator(
  data_config, *, global_batch_size, process_index=0, process_count=1
):
  """Returns an iterator over one padded pass of the eval split.

  Args:
    data_config: the `config.data` ConfigDict.
    global_batch_size: examples per step over all processes.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    Iterator of dicts: `images` float32 [b, S, S, 3], `labels` int32 [b],
    `mask` float32 [b] (1 for real examples, 0 for padding).

  Raises:
    ValueError: `data_config` is invalid (`validate_data_config`).
  """
  validate_data_config(data_config)
  module = (
    python_loader if resolve_loader(data_config) == 'python' else _tf_pipeline()
  )
  return module.make_eval_iterator(
    data_config,
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
  )


def __getattr__(name):
  """Imports a tf.data-backed public name on first use (PEP 562)."""
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
  globals()[name] = value
  return value
