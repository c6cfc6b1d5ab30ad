"""Preparing ImageNet for tfds, and writing archives in its download layout.

ImageNet cannot be downloaded by code: get `ILSVRC2012_img_train.tar` (138
GB) and `ILSVRC2012_img_val.tar` (6.3 GB) from image-net.org into a
"manual dir", then `prepare_imagenet(manual_dir, data_dir)` (or
`scripts/prepare_imagenet.sh`) converts them once into tfds records in
`data_dir`. Nothing is ever fetched from the network.

`write_imagenet_tars` writes archives in exactly that layout (a train tar of
per-synset tars of JPEGs, and a flat validation tar) from arrays you give
it; the tests and `experiments/benchmark_input.py` use it with the photos
that ship with scikit-image to build a tiny ImageNet.
"""

import io
import os
import tarfile
import time

import numpy as np

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'


def imagenet_synsets():
  """Returns the 1,000 synset ids in tfds's label order (label = index)."""
  return list(_read_tfds_imagenet_file('labels.txt'))


def imagenet_validation_synsets():
  """Returns the synset of each validation image, in file-name order."""
  return list(_read_tfds_imagenet_file('validation_labels.txt'))


def _read_tfds_imagenet_file(name):
  import tensorflow_datasets as tfds

  path = os.path.join(
    os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', name
  )
  with open(path) as f:
    return tuple(line.strip() for line in f if line.strip())


def _jpeg_bytes(image, quality):
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(
    buf, format='JPEG', quality=quality
  )
  return buf.getvalue()


def _add_bytes(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 0
  tar.addfile(info, io.BytesIO(data))


def write_imagenet_tars(manual_dir, train_images, val_images, quality=90):
  """Writes ImageNet's manual-download tars from uint8 arrays.

  Args:
    manual_dir: output folder (created).
    train_images: dict synset id (e.g. 'n01440764') -> list of uint8
      [H, W, 3] arrays; stored as <synset>.tar of <synset>_<i>.JPEG inside
      ILSVRC2012_img_train.tar.
    val_images: list of uint8 arrays, stored flat as
      ILSVRC2012_val_<8 digits>.JPEG (numbered from 1) in
      ILSVRC2012_img_val.tar. tfds labels them with the first
      len(val_images) entries of `imagenet_validation_synsets()`.
    quality: JPEG quality.

  Returns:
    The paths of the two tar files written.
  """
  os.makedirs(manual_dir, exist_ok=True)
  train_path = os.path.join(manual_dir, TRAIN_TAR)
  with tarfile.open(train_path, 'w') as outer:
    for synset, images in sorted(train_images.items()):
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode='w') as inner:
        for i, image in enumerate(images):
          name = f'{synset}_{i + 1}.JPEG'
          _add_bytes(inner, name, _jpeg_bytes(image, quality))
      _add_bytes(outer, f'{synset}.tar', buf.getvalue())
  val_path = os.path.join(manual_dir, VAL_TAR)
  with tarfile.open(val_path, 'w') as tar:
    for i, image in enumerate(val_images):
      name = f'ILSVRC2012_val_{i + 1:08d}.JPEG'
      _add_bytes(tar, name, _jpeg_bytes(image, quality))
  return train_path, val_path


def prepare_imagenet(manual_dir, data_dir, file_format='tfrecord'):
  """Converts the ImageNet tars in `manual_dir` into tfds records.

  Args:
    manual_dir: folder holding ILSVRC2012_img_train.tar and
      ILSVRC2012_img_val.tar (ILSVRC2012_img_test.tar is optional).
    data_dir: tfds data dir to write `imagenet2012/<version>/` into; use the
      same value as `config.data.data_dir`.
    file_format: 'tfrecord' (read by our tf.data pipeline).

  Returns:
    The tfds DatasetInfo of the prepared dataset.
  """
  import tensorflow_datasets as tfds

  missing = [
    f
    for f in (TRAIN_TAR, VAL_TAR)
    if not os.path.isfile(os.path.join(manual_dir, f))
  ]
  if missing:
    raise FileNotFoundError(
      f'{missing} not found in {manual_dir!r}. Download them (after '
      'registering) from https://image-net.org/download-images and put them '
      'there; no code can download ImageNet for you.'
    )
  os.makedirs(data_dir, exist_ok=True)
  builder = tfds.builder(
    'imagenet2012', data_dir=data_dir, file_format=file_format
  )
  start = time.time()
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False
      )
    )
  except (tarfile.ReadError, EOFError) as e:
    # Deep in tfds's extraction; a truncated download is the usual cause.
    raise OSError(
      f'An ImageNet tar in {manual_dir!r} cannot be read ({e}): it is '
      'damaged or incomplete. Check it against the size and checksum '
      'image-net.org lists, and download it again if they differ.'
    ) from e
  print(
    f'Prepared imagenet2012 in {builder.data_dir} in '
    f'{time.time() - start:.1f}s: '
    + ', '.join(f'{k}={v.num_examples}' for k, v in builder.info.splits.items())
  )
  return builder.info
