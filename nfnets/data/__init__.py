"""Input pipelines: digits, ImageNet, any tfds or folder dataset.

Public API (see docs/data.md):

  default_config()            the `config.data` section
  dataset_info(data_config)   DatasetInfo(num_classes, num_train_examples,
                              num_eval_examples, class_names)
  make_train_iterator(...)    infinite NumPy batches for this process
  make_eval_iterator(...)     one padded, masked pass over the eval split
  make_batch_fn(data_config)  the train step's augmentation on the device
                              (None when the host augments)
"""

from nfnets.data.device_augment import make_batch_fn
from nfnets.data.pipeline import (
  dataset_info,
  default_config,
  eval_num_batches,
  make_eval_dataset,
  make_eval_iterator,
  make_train_dataset,
  make_train_iterator,
)
from nfnets.data.preprocess import MEAN_RGB, STDDEV_RGB
from nfnets.data.sources import SOURCES, DatasetInfo

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
