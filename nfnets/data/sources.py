"""Where examples come from: digits, tfds datasets and image folders.

A source turns a dataset name and a split into one process's shard, in two
forms: `read` gives the tf.data pipeline a `tf.data.Dataset` of
`{'image', 'label'}` examples (`image` is the encoded file bytes, a scalar
string decoded later, fused with the crop, or a decoded uint8 [H, W, 3]
tensor for the in-memory digits; `label` is int32), and `records` gives the
TensorFlow-free loader a random-access sequence of (image, label) pairs
(`records.Records`; `image` a file path, encoded bytes or a uint8 array).

TensorFlow and tfds are imported only by the methods that need them, so
the digits and folder sources, `make_source` and `resolve_splits` work
without TensorFlow. Sources never download: tfds is always used with
`download=False`, and a dataset that is not prepared fails at once with
instructions.
"""

import contextlib
import dataclasses
import importlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from nfnets.data import config as config_lib
from nfnets.data import numpy_preprocess
from nfnets.data import records as records_lib

# The digits set has 1,797 images; every fifth one (index % 5 == 0) is the
# test split, so both splits cover all writers and classes (1,437 / 360).
DIGITS_TEST_EVERY = 5
PREPARE_IMAGENET_HINT = (
  'Prepare it once from the official tar files with '
  '`scripts/prepare_imagenet.sh MANUAL_DIR DATA_DIR` (see docs/data.md), '
  'then set config.data.data_dir=DATA_DIR.'
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer needs to know about a dataset.

  Attributes:
    num_classes: number of labels.
    num_train_examples: size of the configured training split.
    num_eval_examples: size of the configured evaluation split.
    class_names: one name per label index.
    natural_images: photos (resized and cropped), not digits-like images
      (resized whole); what `eval_preproc='auto'` resolves by.
  """

  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: tuple[str, ...]
  natural_images: bool = True


@dataclasses.dataclass(frozen=True)
class Shard:
  """One process's part of a split.

  Attributes:
    dataset: a `tf.data.Dataset` of examples `{'image', 'label'}` (or, with
      `load`, of what `load` turns into them), finite, in a fixed order.
    num_examples: how many examples `dataset` yields.
    in_memory: True when the whole shard is cheap to reshuffle each epoch
      (arrays or file paths), so the pipeline shuffles it fully.
    load: None, or the map from `dataset`'s elements (file paths) to
      examples, applied after shuffling so that only what the batches take
      is read (a full shuffle of read files would hold them all in memory).
  """

  dataset: Any
  num_examples: int
  in_memory: bool
  load: Any = None


def tf_module():
  """TensorFlow, imported on first use (only the tf.data path needs it)."""
  return importlib.import_module('tensorflow')


def _tfds():
  """tensorflow_datasets, imported on first use; a short error without it."""
  try:
    return importlib.import_module('tensorflow_datasets')
  except ImportError as e:
    raise ValueError(
      f'tfds datasets need tensorflow_datasets, which cannot be imported '
      f'({e}). Install it, or use name="folder" or "digits".'
    ) from e


def process_slice(n, process_index, process_count):
  """Returns (start, stop) of this process's contiguous share of n items.

  The rule of `tfds.even_splits` (the tf.data loader's): n // count items
  each, the first n % count processes one more, so both loaders give a
  process the same examples of a tfds split.
  """
  base, extra = divmod(n, process_count)
  start = base * process_index + min(process_index, extra)
  stop = base * (process_index + 1) + min(process_index + 1, extra)
  return start, stop


def check_process(process_index, process_count):
  """Raises ValueError unless 0 <= process_index < process_count."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f'process_index={process_index} must lie in [0, process_count='
      f'{process_count}); pass jax.process_index() and jax.process_count().'
    )


class DigitsSource:
  """scikit-learn's 8x8 handwritten digits, upscaled to RGB, in memory."""

  name = 'digits'
  natural_images = False
  default_eval_split = 'test'

  def __init__(self):
    from sklearn.datasets import load_digits  # Lazy: sklearn is slow to load.

    digits = load_digits()
    self._images = digits.images.astype(np.float32)  # [1797, 8, 8], 0..16.
    self._labels = digits.target.astype(np.int32)
    self.class_names = tuple(str(d) for d in range(10))

  def _indices(self, split):
    is_test = np.arange(len(self._labels)) % DIGITS_TEST_EVERY == 0
    if split == 'train':
      return np.flatnonzero(~is_test)
    if split == 'test':
      return np.flatnonzero(is_test)
    raise ValueError(
      f"Unknown digits split {split!r}; valid splits are 'train', 'test'."
    )

  def num_examples(self, split):
    return len(self._indices(split))

  def upscaled(self, split, image_size):
    """Returns (uint8 images [n, S, S, 3], int32 labels [n]) of a split.

    The 8x8 images (0..16) are scaled to 0..255 and bilinearly upscaled once,
    here, so the training loop only gathers ready-made arrays.
    """
    idx = self._indices(split)
    small = self._images[idx] * np.float32(255.0 / 16.0)
    big = numpy_preprocess.resize_bilinear(small, image_size)
    big = np.clip(np.round(big), 0, 255).astype(np.uint8)
    return np.repeat(big[..., None], 3, axis=-1), self._labels[idx]

  def read(self, split, *, image_size, process_index, process_count, **_):
    """Returns this process's Shard of `split` at `image_size` pixels."""
    images, labels = self.upscaled(split, image_size)
    start, stop = process_slice(len(labels), process_index, process_count)
    ds = tf_module().data.Dataset.from_tensor_slices(
      {'image': images[start:stop], 'label': labels[start:stop]}
    )
    return Shard(ds, stop - start, in_memory=True)

  def records(self, split, *, image_size, process_index, process_count):
    """Returns this process's Records of `split` at `image_size` pixels."""
    images, labels = self.upscaled(split, image_size)
    start, stop = process_slice(len(labels), process_index, process_count)
    return records_lib.Records(images[start:stop], labels[start:stop])


class _DropMissingInfoWarning(logging.Filter):
  """Drops tfds's "Variant folder ... has no dataset_info.json" warning."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'has no dataset_info.json' not in record.getMessage()


@contextlib.contextmanager
def _quiet_missing_dataset_info():
  """Silences tfds's warning about an unprepared dataset's folder.

  The builder's `is_prepared` logs it (through absl) for a dataset that is
  not prepared, just before `TfdsSource` raises an error that names the
  folder and says how to prepare it; the warning would only put noise
  above that error. Every other tfds message passes.
  """
  drop = _DropMissingInfoWarning()
  logger = logging.getLogger('absl')
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


class TfdsSource:
  """A prepared tfds image-classification dataset (never downloaded)."""

  natural_images = True

  def __init__(self, name, data_dir, image_key='image', label_key='label'):
    tfds = _tfds()
    self.name = name
    data_dir = data_dir or None
    if data_dir and not os.path.isdir(data_dir):
      raise FileNotFoundError(
        f'config.data.data_dir={data_dir!r} does not exist. '
        + self._prepare_hint(data_dir)
      )
    try:
      self._builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
        f'tfds has no dataset named {name!r}. Use a name from '
        '`tfds.list_builders()` (e.g. "tfds/cifar10"), "imagenet2012", '
        '"digits" or "folder".'
      ) from e
    with _quiet_missing_dataset_info():
      prepared = self._builder.is_prepared()
    if not prepared:
      raise FileNotFoundError(
        f'Dataset {name!r} is not prepared in '
        f'{self._builder.data_dir!r} (download=False: nothing is fetched). '
        + self._prepare_hint(data_dir)
      )
    features = self._builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(
          f'{name!r} has no feature {key!r}; its features are '
          f'{sorted(features.keys())}. Set config.data.image_key/label_key.'
        )
    self._image_key, self._label_key = image_key, label_key
    self.class_names = tuple(features[label_key].names)
    splits = self._builder.info.splits
    self.default_eval_split = 'validation' if 'validation' in splits else 'test'

  def _prepare_hint(self, data_dir):
    if self.name == 'imagenet2012':
      return PREPARE_IMAGENET_HINT
    return (
      f'Build it where there is internet (`tfds build {self.name} '
      f'--data_dir={data_dir or "~/tensorflow_datasets"}`) and copy the '
      'folder here, then set config.data.data_dir.'
    )

  def num_examples(self, split):
    try:
      return self._builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ValueError(
        f'{self.name!r} has no split {split!r}; its splits are '
        f'{sorted(self._builder.info.splits.keys())} (tfds slicing such as '
        '"train[10000:]" is allowed).'
      ) from e

  def read(self, split, *, process_index, process_count, shuffle, seed, **_):
    """Returns this process's Shard of `split`; files shuffled if asked."""
    tf, tfds = tf_module(), _tfds()
    self.num_examples(split)  # Validates the split name.
    if process_count > 1:
      split = tfds.even_splits(split, n=process_count)[process_index]
    num = self._builder.info.splits[split].num_examples
    image_feature = self._builder.info.features[self._image_key]
    decoders = None
    if isinstance(image_feature, tfds.features.Image):
      # Keep the bytes: decoding is fused with the random crop later.
      decoders = {self._image_key: tfds.decode.SkipDecoding()}
    ds = self._builder.as_dataset(
      split=split,
      shuffle_files=shuffle,
      decoders=decoders,
      read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
    )
    image_key, label_key = self._image_key, self._label_key
    ds = ds.map(
      lambda ex: {
        'image': ex[image_key],
        'label': tf.cast(ex[label_key], tf.int32),
      },
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    return Shard(ds, num, in_memory=False)

  def records(self, split, *, process_index, process_count, **_):
    """Returns this process's Records of `split` (array_record files only).

    Raises:
      ValueError: if the dataset is stored as TFRecord (sequential files,
        which only tf.data reads).
    """
    tfds = _tfds()
    num = self.num_examples(split)  # Validates the split name.
    formats = [str(getattr(f, 'value', f)) for f in self._file_formats()]
    if 'array_record' not in formats:
      raise ValueError(
        f'Dataset {self.name!r} is stored as {" and ".join(formats)} files, '
        "which only the tf loader reads: install tensorflow (loader='tf'), "
        "or prepare it again with file_format='array_record' for the python "
        'loader.'
      )
    decoders = None
    image_feature = self._builder.info.features[self._image_key]
    if isinstance(image_feature, tfds.features.Image):
      decoders = {self._image_key: tfds.decode.SkipDecoding()}
    data_source = self._builder.as_data_source(
      split=split, decoders=decoders, file_format='array_record'
    )
    start, stop = process_slice(num, process_index, process_count)
    return records_lib.TfdsRecords(
      data_source, start, stop, self._image_key, self._label_key
    )

  def _file_formats(self):
    """The file formats the prepared dataset is stored in."""
    info = self._builder.info
    formats = list(getattr(info, 'alternative_file_formats', ()) or ())
    return [info.file_format, *formats]


def _make_digits(data_config):
  del data_config
  return DigitsSource()


def _make_imagenet(data_config):
  return TfdsSource('imagenet2012', data_config.data_dir)


def _make_folder(data_config):
  # Imported here: folder_source builds on this module.
  from nfnets.data import folder_source  # noqa: PLC0415

  # The start-up check decodes as the loader will.
  loader = config_lib.resolve_loader(data_config)
  decoder = 'tf' if loader == 'tf' else 'pil'
  return folder_source.FolderSource(data_config.folder_root, decoder=decoder)


# Names accepted by config.data.name, besides 'tfds/<name>'.
SOURCES = {
  'digits': _make_digits,
  'imagenet2012': _make_imagenet,
  'folder': _make_folder,
}


def make_source(data_config):
  """Returns the source object named by `data_config.name`.

  Args:
    data_config: the `config.data` ConfigDict.

  Returns:
    A DigitsSource, TfdsSource or `folder_source.FolderSource`.
  """
  check_dataset_name(data_config)
  name = data_config.name
  if name.startswith('tfds/'):
    return TfdsSource(
      name[len('tfds/') :],
      data_config.data_dir,
      image_key=data_config.image_key,
      label_key=data_config.label_key,
    )
  return SOURCES[name](data_config)


def check_dataset_name(data_config) -> None:
  """Raises ValueError for a `data_config.name` no source reads (cheap)."""
  name = data_config.name
  if name not in SOURCES and not name.startswith('tfds/'):
    raise ValueError(
      f'Unknown dataset {name!r}; valid names are {sorted(SOURCES)} or '
      '"tfds/<name>" for any prepared tfds dataset.'
    )


def resolve_splits(data_config, source) -> Sequence[str]:
  """Returns (train_split, eval_split) with '' replaced by the default."""
  return (
    data_config.train_split or 'train',
    data_config.eval_split or source.default_eval_split,
  )
