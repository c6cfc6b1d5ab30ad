"""The TensorFlow-free loader (`config.data.loader='python'`).

References are independent of the code under test: TensorFlow's own ops
(`tf.image.resize`, `sample_distorted_bounding_box`), the tf.data pipeline's
eval batches on the same files, and folders whose every file is one flat
colour written here, so each output row tells which file it came from.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_digits

from nfnets import data
from nfnets.data import (
  folder_source,
  numpy_preprocess,
  preprocess,
  python_loader,
  recipe,
)

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
STD = np.asarray(recipe.STDDEV_RGB, np.float32)
# One grey level in normalised units is 1/STD; this is 1e-3 of a level.
LEVEL = 1.0 / STD.max()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  # The folder check's cache lives in the user's cache dir; keep it in tmp.
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))


def _photo(name, size):
  img = getattr(skimage.data, name)()[..., :3]
  return np.asarray(Image.fromarray(img).resize(size))


def _photo_folder(root, ext):
  """train/ and validation/ of 3 classes; photos of varied aspect."""
  names = ('chelsea', 'coffee', 'astronaut', 'rocket')
  sizes = ((64, 48), (50, 70), (90, 40), (41, 41))
  for split, n in (('train', 6), ('validation', 7)):
    for i in range(n):
      path = root / split / f'class{i % 3}' / f'{i}.{ext}'
      os.makedirs(path.parent, exist_ok=True)
      Image.fromarray(_photo(names[i % 4], sizes[i % 4])).save(path)
  return root


def _colour(i):
  return np.asarray([20 + 23 * i, 230 - 19 * i, 60 + 13 * (i % 7)], np.uint8)


def _colour_folder(root, n=10):
  """train/ of n flat-colour PNGs (file i: `_colour(i)`), labels i % 3."""
  for i in range(n):
    path = root / 'train' / f'c{i % 3}' / f'{i:02d}.png'
    os.makedirs(path.parent, exist_ok=True)
    image = np.broadcast_to(_colour(i), (30 + i, 44 - i, 3))
    Image.fromarray(np.ascontiguousarray(image)).save(path)
  return root


def _which_file(images, n=10):
  """File index of each uint8 row: the nearest flat colour."""
  means = images.reshape(len(images), -1, 3).mean(axis=1)
  colours = np.stack([_colour(i) for i in range(n)]).astype(np.float32)
  dist = np.abs(means[:, None] - colours[None]).max(axis=-1)
  assert dist.min(axis=1).max() < 1.0  # Flat colours stay flat.
  return dist.argmin(axis=1)


def _config(root=None, **kwargs):
  config = data.default_config()
  if root is not None:
    config.update(name='folder', folder_root=str(root))
  config.update(train_image_size=16, eval_image_size=16, loader='python')
  config.update(kwargs)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# Image ops against TensorFlow's.


@pytest.mark.parametrize('name', ['chelsea', 'coffee'])
@pytest.mark.parametrize('size', [37, 224, 700])
def test_bicubic_resize_matches_tensorflow(name, size):
  image = getattr(skimage.data, name)()  # 300x451, 400x600: down and up.
  want = tf.image.resize(tf.cast(image, tf.float32), [size, size], 'bicubic')
  got = numpy_preprocess.resize_bicubic(image, size)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-3)
  crop = image[17:211, 40:175]  # An odd-sized box, as the Inception crop.
  want = tf.image.resize(tf.cast(crop, tf.float32), [size, size], 'bicubic')
  got = numpy_preprocess.resize_bicubic(crop, size)
  np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-3)


def test_bicubic_centre_crop_matches_resize_then_crop():
  image = skimage.data.coffee()
  want = tf.image.resize(tf.cast(image, tf.float32), [96, 96], 'bicubic')
  got = numpy_preprocess.resize_bicubic(image, 96, crop=(16, 64))
  np.testing.assert_allclose(got, want.numpy()[16:80, 16:80], atol=1e-3)


@pytest.mark.parametrize('size', [16, 32, 50])
def test_digits_bilinear_upscale_is_tensorflow_bit_for_bit(size):
  small = load_digits().images.astype(np.float32) * np.float32(255 / 16)
  want = tf.image.resize(small[..., None], [size, size], 'bilinear')
  got = numpy_preprocess.resize_bilinear(small, size)
  np.testing.assert_array_equal(got, want.numpy()[..., 0])


def _tf_boxes(shape, num, size):
  boxes = []
  for i in range(num):
    box = preprocess.distorted_box(
      tf.constant(shape), tf.constant([7, i]), size
    )
    boxes.append([int(v) for v in box])
  return np.asarray(boxes)


def _np_boxes(shape, num, size):
  return np.asarray(
    [
      numpy_preprocess.distorted_box(shape, np.random.default_rng([3, i]), size)
      for i in range(num)
    ]
  )


@pytest.mark.parametrize('shape', [(300, 451), (48, 64), (120, 40)])
def test_crop_boxes_have_tensorflows_distribution(shape):
  height, width = shape
  size = 24
  fallback = numpy_preprocess.center_crop_box(shape, size)
  got = _np_boxes(shape, 2000, size)
  want = _tf_boxes(shape, 600, size)
  for boxes in (got, want):
    y, x, h, w = boxes.T
    sampled = ~np.all(boxes == fallback, axis=1)
    assert np.all((y >= 0) & (x >= 0) & (h > 0) & (w > 0))
    assert np.all((y + h <= height) & (x + w <= width))
    area = (h * w / (height * width))[sampled]
    assert area.min() >= recipe.MIN_OBJECT_COVERED
    assert area.max() <= 1.0
    # Width is the rounded height x aspect: within half a pixel of range.
    aspect = (w / h)[sampled]
    lo, hi = recipe.ASPECT_RATIO_RANGE
    assert np.all(aspect >= lo - 0.5 / h[sampled])
    assert np.all(aspect <= hi + 0.5 / h[sampled])
    # TensorFlow's offsets never let a smaller box touch the far edge.
    assert np.all((y + h < height) | (h == height))
  for stat in (
    lambda b: np.mean(b[:, 2] * b[:, 3]) / (height * width),
    lambda b: np.mean(b[:, 3] / b[:, 2]),
    lambda b: np.mean(np.all(b == fallback, axis=1)),
    lambda b: np.mean((b[:, 0] + b[:, 2] / 2) / height),
  ):
    assert abs(stat(got) - stat(want)) < 0.04


def test_crop_falls_back_to_tensorflows_centre_crop():
  # 10x400: no box of the allowed aspect covers 8% of the image. The
  # centre crop, by hand: side int(10 * 64 / 96) = 6 at ((10 - 6 + 1) // 2,
  # (400 - 6 + 1) // 2).
  shape, size = (10, 400), 64
  want = [int(v) for v in preprocess.distorted_box(shape, [1, 2], size)]
  assert want == [2, 197, 6, 6]
  for seed in range(20):
    rng = np.random.default_rng(seed)
    box = numpy_preprocess.distorted_box(shape, rng, size)
    assert box == want


def test_flip_rate_is_one_half():
  # The crop of a 10x400 ramp is always its centre, so a flip shows as a
  # decreasing ramp.
  ramp = np.broadcast_to(np.arange(400, dtype=np.uint8)[None, :, None] // 2,
                         (10, 400, 3))  # fmt: skip
  flips = 0
  for seed in range(400):
    out = numpy_preprocess.train_image(
      np.ascontiguousarray(ramp), np.random.default_rng([9, seed]), 8
    )
    flips += out[0, 0, 0] > out[0, -1, 0]
  assert 160 <= flips <= 240  # 0.5 +- 4 standard deviations.


# Eval batches against tf.data's.


def _image_pairs(got, want, num_batches):
  """Checks labels, masks and batch counts; returns the image pairs."""
  assert len(got) == len(want) == num_batches
  for g, w in zip(got, want, strict=True):
    assert set(g) == set(w) == {'images', 'labels', 'mask'}
    np.testing.assert_array_equal(g['labels'], w['labels'])
    np.testing.assert_array_equal(g['mask'], w['mask'])
    assert g['images'].dtype == np.float32
  return [(g['images'], w['images']) for g, w in zip(got, want, strict=True)]


@pytest.mark.parametrize('mode', ['resize_crop_32', 'crop_resize', 'resize'])
def test_eval_batches_equal_tf_data_on_png(tmp_path, mode):
  root = _photo_folder(tmp_path, 'png')
  for index in (0, 1):  # Two processes: shards and padding as tf.data's.
    kwargs = dict(global_batch_size=6, process_index=index, process_count=2)
    config = _config(root, eval_preproc=mode)
    got = list(data.make_eval_iterator(config, **kwargs))
    config.loader = 'tf'
    want = list(data.make_eval_iterator(config, **kwargs))
    for g, w in _image_pairs(got, want, 2):  # ceil(7 / 6) batches each.
      np.testing.assert_allclose(g, w, atol=1e-3 * LEVEL)


def test_eval_batches_on_jpeg_differ_only_by_decoding(tmp_path):
  # tf.data decodes JPEG with libjpeg's fast integer DCT, PIL with the
  # accurate one; measured: up to 5.6 levels, 0.75-1.0 on average.
  root = _photo_folder(tmp_path, 'jpg')
  config = _config(root)
  got = list(data.make_eval_iterator(config, global_batch_size=4))
  config.loader = 'tf'
  want = list(data.make_eval_iterator(config, global_batch_size=4))
  for g, w in _image_pairs(got, want, 2):
    levels = np.abs(g - w) * STD
    assert levels.max() < 7.0
    assert levels.mean() < 1.5


def test_digits_match_tf_data():
  config = _config(train_image_size=32, eval_image_size=32)
  got = next(data.make_eval_iterator(config, global_batch_size=16))
  info = data.dataset_info(config)
  config.loader = 'tf'
  want = next(data.make_eval_iterator(config, global_batch_size=16))
  assert info == data.dataset_info(config)
  np.testing.assert_array_equal(got['images'], want['images'])
  np.testing.assert_array_equal(got['labels'], want['labels'])


# Training batches.


def test_train_batches_shapes_labels_and_epochs(tmp_path):
  root = _colour_folder(tmp_path)
  config = _config(root, augment_on='device', train_image_size=12)
  batches = _take(data.make_train_iterator(config, global_batch_size=5), 4)
  for b in batches:
    assert set(b) == {'images', 'labels'}
    assert b['images'].shape == (5, 12, 12, 3)
    assert b['images'].dtype == np.uint8
    assert b['labels'].dtype == np.int32
  files = np.concatenate([_which_file(b['images']) for b in batches])
  labels = np.concatenate([b['labels'] for b in batches])
  np.testing.assert_array_equal(labels, files % 3)
  # Each epoch (10 examples) is a full permutation, a different one.
  assert sorted(files[:10]) == sorted(files[10:]) == list(range(10))
  assert list(files[:10]) != list(files[10:])


def test_reference_pairing_ships_two_images_per_output(tmp_path):
  root = _colour_folder(tmp_path)
  config = _config(
    root,
    augment_on='device',
    mixup_alpha=0.2,
    cutmix=True,
    randaugment='205',
    mix_pairing='reference',
  )
  batch = next(data.make_train_iterator(config, global_batch_size=4))
  assert batch['images'].shape == (8, 16, 16, 3)
  assert set(batch) == {'images', 'labels'}


def test_host_placement_without_augmentation_is_normalised(tmp_path):
  root = _colour_folder(tmp_path)
  config = _config(root, augment_on='host', train_preproc='resize')
  batch = next(data.make_train_iterator(config, global_batch_size=4))
  assert batch['images'].dtype == np.float32
  pixels = batch['images'] * STD + np.asarray(recipe.MEAN_RGB, np.float32)
  files = _which_file(np.round(pixels))
  # A flat image stays flat and unrounded through the resize.
  want = np.stack([_colour(i) for i in files]).astype(np.float32)
  np.testing.assert_allclose(pixels[:, 3, 5], want, atol=0.5)


def test_host_augmentation_is_refused(tmp_path):
  root = _colour_folder(tmp_path)
  config = _config(root, augment_on='host', mixup_alpha=0.2)
  with pytest.raises(ValueError, match="augment_on='device'"):
    data.make_train_iterator(config, global_batch_size=4)


def test_same_seed_same_batches_other_seed_others(tmp_path):
  root = _photo_folder(tmp_path, 'jpg')
  config = _config(root, augment_on='device')
  a = _take(data.make_train_iterator(config, global_batch_size=4), 3)
  b = _take(data.make_train_iterator(config, global_batch_size=4), 3)
  c = _take(data.make_train_iterator(config, global_batch_size=4, seed=1), 3)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['images'], y['images'])
    np.testing.assert_array_equal(x['labels'], y['labels'])
  differ = [
    not np.array_equal(x['images'], z['images'])
    for x, z in zip(a, c, strict=True)
  ]
  assert any(differ)


@pytest.mark.parametrize('augment_on', ['device', 'host'])
def test_start_batch_equals_skipping(tmp_path, augment_on):
  root = _photo_folder(tmp_path, 'jpg')  # 6 examples: batch 2 spans epochs.
  config = _config(root, augment_on=augment_on)
  skipped = _take(data.make_train_iterator(config, global_batch_size=4), 5)
  started = _take(
    data.make_train_iterator(config, global_batch_size=4, start_batch=3), 2
  )
  for x, y in zip(skipped[3:], started, strict=True):
    np.testing.assert_array_equal(x['images'], y['images'])
    np.testing.assert_array_equal(x['labels'], y['labels'])


def test_start_batch_on_the_digits_equals_skipping():
  config = _config(train_image_size=32)
  skipped = _take(data.make_train_iterator(config, global_batch_size=700), 4)
  started = data.make_train_iterator(
    config, global_batch_size=700, start_batch=3
  )
  np.testing.assert_array_equal(skipped[3]['images'], next(started)['images'])


def test_processes_get_disjoint_examples(tmp_path):
  root = _colour_folder(tmp_path)
  config = _config(root, augment_on='device')
  seen = []
  for index in (0, 1):
    it = data.make_train_iterator(
      config, global_batch_size=10, process_index=index, process_count=2
    )
    files = _which_file(next(it)['images'])  # One epoch of its 5 files.
    assert len(set(files)) == 5
    seen.append(set(files))
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == set(range(10))


# Sources.


def test_folder_check_decodes_with_pil(tmp_path):
  root = _photo_folder(tmp_path, 'jpg')
  bad = root / 'train' / 'class0' / 'broken.jpg'
  raw = (root / 'train' / 'class0' / '0.jpg').read_bytes()
  bad.write_bytes(raw[: len(raw) // 3])
  source = folder_source.FolderSource(str(root), decoder='pil')
  with pytest.raises(ValueError, match='broken.jpg'):
    source.num_examples('train')


def test_corrupt_file_mid_run_is_named(tmp_path):
  root = _photo_folder(tmp_path, 'jpg')
  config = _config(root, augment_on='device')
  records = folder_source.FolderSource(str(root), 'pil').records(
    'train', process_index=0, process_count=1
  )
  path = records[0][0]
  it = python_loader.make_train_iterator(config, global_batch_size=6)
  with open(path, 'wb') as f:  # Changed after the check at start.
    f.write(b'not an image')
  with pytest.raises(ValueError, match=os.path.basename(path)):
    next(it)


@pytest.fixture(scope='module')
def tfds_dirs(tmp_path_factory):
  """A 3-class tfds dataset of flat-colour PNGs, prepared in both formats.

  Returns:
    {file_format: data_dir}; image i of a split is filled with 10 * i
    (+ 100 in 'validation') and labelled i % 3.
  """
  import tensorflow_datasets as tfds  # noqa: PLC0415

  class PythonLoaderColours(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      features = tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(
            shape=(None, None, 3), encoding_format='png'
          ),
          'label': tfds.features.ClassLabel(names=['a', 'b', 'c']),
        }
      )
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {
        'train': self._generate_examples(6, 0),
        'validation': self._generate_examples(5, 100),
      }

    def _generate_examples(self, n, offset):
      for i in range(n):
        image = np.full((20 + i, 30, 3), 10 * i + offset, np.uint8)
        yield i, {'image': image, 'label': i % 3}

  dirs = {}
  for file_format in ('array_record', 'tfrecord'):
    dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
    PythonLoaderColours(
      data_dir=dirs[file_format], file_format=file_format
    ).download_and_prepare()
  return dirs


def _tfds_config(data_dir):
  return _config(
    name='tfds/python_loader_colours', data_dir=data_dir, augment_on='device'
  )


def test_tfds_array_record_reads_like_tf_data(tfds_dirs):
  config = _tfds_config(tfds_dirs['array_record'])
  info = data.dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (6, 5)
  assert info.class_names == ('a', 'b', 'c')
  got = list(data.make_eval_iterator(config, global_batch_size=4))
  config = _tfds_config(tfds_dirs['tfrecord'])
  config.loader = 'tf'
  want = list(data.make_eval_iterator(config, global_batch_size=4))
  for g, w in _image_pairs(got, want, 2):
    np.testing.assert_allclose(g, w, atol=1e-3 * LEVEL)
  config = _tfds_config(tfds_dirs['array_record'])
  batch = next(data.make_train_iterator(config, global_batch_size=6))
  fill = batch['images'][:, 0, 0, 0].astype(int)  # 10 * i for example i.
  assert sorted(fill) == [0, 10, 20, 30, 40, 50]
  np.testing.assert_array_equal(batch['labels'], (fill // 10) % 3)


def test_tfds_tfrecord_needs_tensorflow_or_array_record(tfds_dirs):
  config = _tfds_config(tfds_dirs['tfrecord'])
  with pytest.raises(ValueError, match="file_format='array_record'"):
    next(data.make_eval_iterator(config, global_batch_size=4))


# The trainer without TensorFlow.

_TRAIN_WITHOUT_TF = """
import json, os, sys
sys.modules['tensorflow'] = None
sys.modules['tensorflow_datasets'] = None
sys.path.insert(0, {root!r})
from experiments import common, train

def check():
  loaded = [m for m, v in sys.modules.items()
            if v is not None and m.split('.')[0] == 'tensorflow']
  print(json.dumps({{'tensorflow_modules': loaded}}))

import atexit
atexit.register(check)
sys.argv = ['train'] + {argv!r}
common.run(train.main)
"""


def test_trainer_runs_without_tensorflow(tmp_path, compilation_cache_dir):
  root = _photo_folder(tmp_path / 'data', 'jpg')
  workdir = tmp_path / 'run'
  argv = [
    '--config=tests/support/tiny_config.py',
    f'--workdir={workdir}',
    f'--config.train.compilation_cache_dir={compilation_cache_dir}',
    '--config.data.name=folder',
    f'--config.data.folder_root={root}',
    '--config.data.train_image_size=32',
    '--config.data.eval_image_size=32',
    '--config.data.augment_on=device',
    '--config.data.mixup_alpha=0.2',
    '--config.data.cutmix=True',
    '--config.data.randaugment=205',
    '--config.train.batch_size=4',
    '--config.eval.batch_size=4',
    '--config.train.num_steps=2',
  ]
  script = textwrap.dedent(_TRAIN_WITHOUT_TF).format(root=ROOT, argv=argv)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-c', script],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report == {'tensorflow_modules': []}
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == [1, 2]
  assert any(r.get('eval/num_examples') == 7 for r in records)
  # TensorBoard logs need no TensorFlow either; read back here with it.
  (events,) = (workdir / 'tensorboard').glob('events.out.tfevents.*')
  losses = [
    e.step
    for e in tf.compat.v1.train.summary_iterator(str(events))
    if any(v.tag == 'train/loss' for v in e.summary.value)
  ]
  assert losses == [1, 2]
