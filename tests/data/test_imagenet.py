"""A tiny ImageNet in the real manual-download layout, prepared by tfds.

The module fixture writes ILSVRC2012_img_train.tar (per-synset tars of
JPEGs) and a flat ILSVRC2012_img_val.tar from the photos that ship with
scikit-image, runs `prepare_imagenet` (tfds's own imagenet2012 builder),
then reads it through our pipelines. Labels are checked against tfds's
label files read here directly, and images against PIL.
"""

import io
import os
import tarfile

import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from nfnets import data
from nfnets.data import prepare

PHOTOS = (
  'astronaut',
  'chelsea',
  'coffee',
  'rocket',
  'immunohistochemistry',
  'camera',  # Greyscale: stored as RGB JPEG with equal channels.
  'hubble_deep_field',
  'colorwheel',
)
SIZES = ((64, 48), (80, 60), (52, 70), (90, 50))  # (w, h): varied aspect.
SYNSET_INDICES = (3, 10, 500)  # Labels of our three training classes.
NUM_VAL = 5
S = 32
MEAN = np.array(data.MEAN_RGB, np.float32)
STD = np.array(data.STDDEV_RGB, np.float32)


def _photo(i):
  img = getattr(skimage.data, PHOTOS[i])()
  if img.ndim == 2:
    img = np.stack([img] * 3, -1)
  return np.asarray(Image.fromarray(img[..., :3]).resize(SIZES[i % 4]))


def _label_files():
  root = os.path.join(os.path.dirname(tfds.__file__), 'datasets/imagenet2012')
  with open(os.path.join(root, 'labels.txt')) as f:
    synsets = f.read().split()
  with open(os.path.join(root, 'validation_labels.txt')) as f:
    val = f.read().split()
  return synsets, val


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """Returns (data_dir, {split: [(decoded JPEG array, label)]})."""
  tmp = tmp_path_factory.mktemp('tiny_imagenet')
  synsets, val_synsets = _label_files()
  photos = [_photo(i) for i in range(len(PHOTOS))]
  groups = (photos[0:3], photos[3:5], photos[5:8])
  train = {synsets[i]: g for i, g in zip(SYNSET_INDICES, groups, strict=True)}
  train_tar, val_tar = prepare.write_imagenet_tars(
    tmp / 'manual', train, photos[:NUM_VAL]
  )
  prepare.prepare_imagenet(str(tmp / 'manual'), str(tmp / 'data'))
  expected = {'train': [], 'validation': []}
  # Decode what was actually written (JPEG is lossy) with PIL.
  with tarfile.open(train_tar) as outer:
    for member in outer.getmembers():
      inner = tarfile.open(fileobj=outer.extractfile(member))
      label = synsets.index(member.name[: -len('.tar')])
      for m in inner.getmembers():
        expected['train'].append((_decode(inner.extractfile(m)), label))
  with tarfile.open(val_tar) as tar:
    for k, m in enumerate(sorted(tar.getmembers(), key=lambda m: m.name)):
      label = synsets.index(val_synsets[k])
      expected['validation'].append((_decode(tar.extractfile(m)), label))
  return str(tmp / 'data'), expected


def _decode(f):
  return np.asarray(Image.open(io.BytesIO(f.read())).convert('RGB'))


def _config(data_dir, **overrides):
  config = data.default_config()
  config.update(
    name='imagenet2012',
    data_dir=data_dir,
    train_image_size=40,
    eval_image_size=S,
  )
  config.update(overrides)
  return config


def _reference_eval_crop(image):
  big = Image.fromarray(image).resize((S + 32, S + 32), Image.BICUBIC)
  return np.asarray(big.crop((16, 16, 16 + S, 16 + S)), np.float32)


def test_dataset_info(tiny):
  data_dir, expected = tiny
  info = data.dataset_info(_config(data_dir))
  synsets, _ = _label_files()
  assert info.num_classes == 1000
  assert info.num_train_examples == len(expected['train']) == 8
  assert info.num_eval_examples == NUM_VAL
  assert info.class_names[SYNSET_INDICES[1]] == synsets[SYNSET_INDICES[1]]
  generic = data.dataset_info(_config(data_dir, name='tfds/imagenet2012'))
  assert generic == info


@pytest.mark.parametrize('split', ['validation', 'train'])
def test_eval_images_and_labels_match_the_source_photos(tiny, split):
  data_dir, expected = tiny
  config = _config(data_dir, eval_split=split)
  batches = list(data.make_eval_iterator(config, global_batch_size=3))
  images = np.concatenate([b['images'] for b in batches])
  labels = np.concatenate([b['labels'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert images.dtype == np.float32 and images.shape[1:] == (S, S, 3)
  assert labels.dtype == np.int32 and mask.sum() == len(expected[split])
  refs = [_reference_eval_crop(img) for img, _ in expected[split]]
  matched = []
  for image, label in zip(images[mask > 0], labels[mask > 0], strict=True):
    pixels = image * STD + MEAN
    dists = [np.abs(pixels - ref).mean() for ref in refs]
    k = int(np.argmin(dists))
    # Same photo: within rounding (two JPEG decoders, two resizers).
    assert dists[k] < 2.5 and sorted(dists)[1] > 10
    assert label == expected[split][k][1]
    matched.append(k)
  assert sorted(matched) == list(range(len(expected[split])))


def test_train_batches_with_the_f0_recipe(tiny):
  data_dir, _ = tiny
  config = _config(data_dir, mixup_alpha=0.2, cutmix=True, randaugment='405')
  it = data.make_train_iterator(config, global_batch_size=4)
  valid = set(SYNSET_INDICES)
  for _ in range(3):
    batch = next(it)
    assert batch['images'].shape == (4, 40, 40, 3)
    assert batch['images'].dtype == np.float32
    assert set(batch['labels']) <= valid and set(batch['mix_labels']) <= valid
    assert batch['ratio'].dtype == np.float32
    assert ((batch['ratio'] >= 0) & (batch['ratio'] <= 1)).all()
    pixels = batch['images'] * STD + MEAN
    assert pixels.min() > -0.5 and pixels.max() < 255.5


def test_train_batches_without_mixing(tiny):
  data_dir, _ = tiny
  it = data.make_train_iterator(_config(data_dir), global_batch_size=8)
  labels = np.concatenate([next(it)['labels'] for _ in range(4)])
  assert set(labels) == set(SYNSET_INDICES)  # 32 draws from 8 images.
  pixels = next(it)['images'] * STD + MEAN
  # Bicubic overshoot is unclamped but small.
  assert -60 < pixels.min() and pixels.max() < 320


def test_eval_shards_cover_the_split_once(tiny):
  data_dir, expected = tiny
  seen = []
  for p in range(2):
    batches = list(
      data.make_eval_iterator(
        _config(data_dir), global_batch_size=4, process_index=p, process_count=2
      )
    )
    assert len(batches) == 2  # ceil(5 / 4) on every process.
    for b in batches:
      seen += [im.tobytes() for im in b['images'][b['mask'] > 0]]
  assert len(seen) == len(set(seen)) == NUM_VAL


def test_prepare_imagenet_without_tars_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match='image-net.org'):
    prepare.prepare_imagenet(str(tmp_path), str(tmp_path / 'out'))
  # Tars that are not tars (a failed download): named, with what to check.
  for name in (prepare.TRAIN_TAR, prepare.VAL_TAR):
    (tmp_path / name).write_bytes(b'<html>Session expired</html>' * 40)
  with pytest.raises(OSError, match='damaged or incomplete'):
    prepare.prepare_imagenet(str(tmp_path), str(tmp_path / 'out'))
