"""Input pipelines: digits, ImageNet, any tfds or folder dataset.

Public API (see docs/data.md):

  default_config()            the `config.data` section
  dataset_info(data_config)   DatasetInfo(num_classes, num_train_examples,
                              num_eval_examples, class_names)
  make_train_iterator(...)    infinite NumPy batches for this process
  make_eval_iterator(...)     one padded, masked pass over the eval split
  make_batch_fn(data_config)  the train step's augmentation on the device
                              (None when the host augments)

The config, the device-side augmentation and the normalisation statistics
import no TensorFlow; the names backed by tf.data and tfds (the pipelines,
the sources) are imported on first use, so `import nfnets.data` works, and
stays fast, on an accelerator host without TensorFlow.
"""

import importlib

from nfnets.data.config import default_config
from nfnets.data.device_augment import make_batch_fn
from nfnets.data.recipe import MEAN_RGB, STDDEV_RGB

# Name -> module of the TensorFlow-backed public names.
_LAZY = {
  'dataset_info': 'pipeline',
  'eval_num_batches': 'pipeline',
  'make_eval_dataset': 'pipeline',
  'make_eval_iterator': 'pipeline',
  'make_train_dataset': 'pipeline',
  'make_train_iterator': 'pipeline',
  'SOURCES': 'sources',
  'DatasetInfo': 'sources',
}

__all__ = [
  'MEAN_RGB',
  'SOURCES',
  'STDDEV_RGB',
  'DatasetInfo',
  'dataset_info',
  'default_config',
  'eval_num_batches',
  'make_batch_fn',
  'make_eval_dataset',
  'make_eval_iterator',
  'make_train_dataset',
  'make_train_iterator',
]


def __getattr__(name):
  """Imports a TensorFlow-backed public name on first use (PEP 562)."""
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
  globals()[name] = value
  return value
