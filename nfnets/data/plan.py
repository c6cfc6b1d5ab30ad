"""What both input loaders agree on, free of TensorFlow.

The tf.data pipeline (`pipeline.py`) and the TensorFlow-free loader
(`python_loader.py`) share these rules: a dataset's sizes and class names
(`dataset_info`), each process's share of a global batch (`local_batch`),
the number of padded eval batches every process yields
(`eval_num_batches`) and the preprocessing modes that 'auto' resolves to
(`resolve_modes`, `eval_preproc_mode`). Prediction and export use them
too, so a run's eval transform is known on a host without TensorFlow.
"""

import math

from nfnets.data import config as config_lib
from nfnets.data import recipe, sources


def dataset_info(data_config):
  """Returns DatasetInfo(num_classes, num_train/eval_examples, class_names).

  Args:
    data_config: the `config.data` ConfigDict.

  Returns:
    A `sources.DatasetInfo`.

  Raises:
    ValueError: `data_config` is invalid (`config.validate_data_config`).
  """
  config_lib.validate_data_config(data_config)
  source = sources.make_source(data_config)
  train_split, eval_split = sources.resolve_splits(data_config, source)
  return sources.DatasetInfo(
    num_classes=len(source.class_names),
    num_train_examples=source.num_examples(train_split),
    num_eval_examples=source.num_examples(eval_split),
    class_names=tuple(source.class_names),
    natural_images=bool(source.natural_images),
  )


def local_batch(global_batch_size, process_index, process_count):
  """This process's share of `global_batch_size` (checked to divide evenly).

  Args:
    global_batch_size: examples per step over all processes.
    process_index: this process.
    process_count: number of processes.

  Returns:
    global_batch_size // process_count.

  Raises:
    ValueError: for a bad process index or an uneven split.
  """
  sources.check_process(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f'global_batch_size={global_batch_size} must be a positive multiple '
      f'of process_count={process_count}.'
    )
  return global_batch_size // process_count


def eval_num_batches(num_examples, global_batch_size):
  """Batches per process for one padded pass over `num_examples`."""
  return math.ceil(num_examples / global_batch_size)


def resolve_modes(data_config, natural_images: bool):
  """Returns (train mode, eval mode) with 'auto' resolved for the dataset.

  Args:
    data_config: the `config.data` ConfigDict.
    natural_images: the dataset's source's `natural_images` (photos, not
      digits-like images), which decides 'auto'.

  Returns:
    A `recipe.TRAIN_PREPROCS` and a `recipe.EVAL_PREPROCS` mode: 'auto' is
    'inception_crop_flip' / 'resize_crop_32' for photos and 'resize' /
    'resize' for digits-like sets.

  Raises:
    ValueError: for an unknown mode.
  """
  train, evl = data_config.train_preproc, data_config.eval_preproc
  if train == 'auto':
    train = 'inception_crop_flip' if natural_images else 'resize'
  if evl == 'auto':
    evl = 'resize_crop_32' if natural_images else 'resize'
  if train not in recipe.TRAIN_PREPROCS:
    raise ValueError(
      f'Unknown train_preproc {train!r}; valid: '
      f'{["auto", *recipe.TRAIN_PREPROCS]}.'
    )
  if evl not in recipe.EVAL_PREPROCS:
    raise ValueError(
      f'Unknown eval_preproc {evl!r}; valid: {["auto", *recipe.EVAL_PREPROCS]}.'
    )
  return train, evl


def eval_preproc_mode(data_config, natural_images: bool | None = None):
  """The eval preprocessing a dataset's eval pipeline uses ('auto' resolved).

  Args:
    data_config: the `config.data` ConfigDict.
    natural_images: the dataset's `DatasetInfo.natural_images` (e.g. a
      training run's record), or None to read the dataset for it.

  Returns:
    A `recipe.EVAL_PREPROCS` mode: for 'auto', 'resize_crop_32' for
    photos and 'resize' for digits-like sets, as both loaders do.
  """
  if natural_images is None:
    natural_images = sources.make_source(data_config).natural_images
  return resolve_modes(data_config, natural_images)[1]
