"""Pipelines on the digits set and an image folder; errors for bad input."""

import os

import numpy as np
import pytest
import skimage.data
from PIL import Image
from sklearn.datasets import load_digits

from nfnets import data
from nfnets.data import sources

MEAN = np.array(data.MEAN_RGB, np.float32)
STD = np.array(data.STDDEV_RGB, np.float32)


def _config(**overrides):
  config = data.default_config()
  config.update(overrides)
  return config


def _pixels(images):
  """Undoes the normalisation: back to 0..255."""
  return images * STD + MEAN


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_digits_info_and_fixed_split():
  info = data.dataset_info(_config())
  assert info.num_classes == 10
  assert (info.num_train_examples, info.num_eval_examples) == (1437, 360)
  assert info.class_names == tuple('0123456789')


def test_digits_eval_images_are_upscaled_digits():
  # Independent reference: PIL's bilinear upscale of sklearn's raw digits.
  raw = load_digits()
  batch = next(data.make_eval_iterator(_config(), global_batch_size=8))
  for i in range(8):  # The test split is every fifth image, in order.
    small = Image.fromarray(raw.images[5 * i] * 255.0 / 16.0)
    want = np.asarray(small.resize((32, 32), Image.BILINEAR))
    got = _pixels(batch['images'][i])
    np.testing.assert_allclose(got[..., 0], want, atol=1.01)
    np.testing.assert_allclose(got[..., 0], got[..., 2], atol=1e-3)
    assert batch['labels'][i] == raw.target[5 * i]


def test_digits_train_batches_shapes_and_values():
  it = data.make_train_iterator(_config(), global_batch_size=32)
  batch = next(it)
  assert set(batch) == {'images', 'labels'}
  assert batch['images'].shape == (32, 32, 32, 3)
  assert batch['images'].dtype == np.float32
  assert batch['labels'].dtype == np.int32
  pixels = _pixels(batch['images'])
  assert pixels.min() > -0.5 and pixels.max() < 255.5
  assert set(batch['labels']) <= set(range(10))


def test_train_order_is_seeded():
  config = _config()
  a = _take(data.make_train_iterator(config, global_batch_size=16, seed=1), 3)
  b = _take(data.make_train_iterator(config, global_batch_size=16, seed=1), 3)
  c = _take(data.make_train_iterator(config, global_batch_size=16, seed=2), 3)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['images'], y['images'])
  assert not np.array_equal(a[0]['labels'], c[0]['labels'])


def test_each_process_reads_its_own_shard():
  config = _config()
  seen = []
  for p in range(2):
    it = data.make_train_iterator(
      config, global_batch_size=64, process_index=p, process_count=2
    )
    batches = _take(it, 5)  # 160 of each process's ~718 examples.
    assert batches[0]['images'].shape[0] == 32
    seen.append({im.tobytes() for b in batches for im in b['images']})
  assert not seen[0] & seen[1]


def test_mixing_and_randaugment_outputs():
  config = _config(mixup_alpha=0.2, cutmix=True, randaugment='405')
  batch = next(data.make_train_iterator(config, global_batch_size=16))
  assert set(batch) == {'images', 'labels', 'mix_labels', 'ratio'}
  assert batch['images'].shape == (16, 32, 32, 3)
  assert batch['mix_labels'].dtype == np.int32
  assert ((batch['ratio'] >= 0) & (batch['ratio'] <= 1)).all()
  # RandAugment clips to uint8 and the mix of two such images stays inside.
  pixels = _pixels(batch['images'])
  assert pixels.min() > -0.5 and pixels.max() < 255.5


def _nearest_centroid_correct(batches, centroids):
  correct = 0.0
  for b in batches:
    x = b['images'].reshape(len(b['images']), -1)
    pred = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    correct += ((pred == b['labels']) * b['mask']).sum()
  return correct


@pytest.mark.parametrize(
  'global_batch,processes', [(64, 1), (96, 3), (50, 2), (7, 1), (720, 1)]
)
def test_padded_eval_matches_unpadded_accuracy(global_batch, processes):
  config = _config()
  # Unpadded pass: 360 divides 360, so no padding at all.
  full = list(data.make_eval_iterator(config, global_batch_size=360))
  assert len(full) == 1 and full[0]['mask'].all()
  x, y = full[0]['images'].reshape(360, -1), full[0]['labels']
  centroids = np.stack([x[y == c].mean(0) for c in range(10)])
  want = _nearest_centroid_correct(full, centroids) / 360
  assert 0.5 < want < 1.0  # A real, imperfect classifier.
  correct, count, signatures, num_batches = 0.0, 0.0, [], set()
  for p in range(processes):
    batches = list(
      data.make_eval_iterator(
        config,
        global_batch_size=global_batch,
        process_index=p,
        process_count=processes,
      )
    )
    num_batches.add(len(batches))
    for b in batches:
      assert b['images'].shape[0] == global_batch // processes
      real = b['images'][b['mask'] > 0]
      signatures += [im.tobytes() for im in real]
    correct += _nearest_centroid_correct(batches, centroids)
    count += sum(b['mask'].sum() for b in batches)
  assert num_batches == {-(-360 // global_batch)}  # Same count everywhere.
  assert count == 360
  assert sorted(signatures) == sorted(im.tobytes() for im in full[0]['images'])
  assert correct / count == pytest.approx(want)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """ROOT/{train,val}/{cat,coffee}/ with PNG and JPEG photos."""
  root = tmp_path_factory.mktemp('folder')
  photos = {
    'cat': skimage.data.chelsea(),
    'coffee': skimage.data.coffee(),
  }
  for split, n in (('train', 3), ('val', 2)):
    for name, photo in photos.items():
      os.makedirs(root / split / name)
      for i in range(n):
        img = Image.fromarray(photo).resize((60 + 10 * i, 50))
        img.save(root / split / name / f'{i}.{"png" if i % 2 else "jpg"}')
  return root


def test_folder_dataset(folder):
  config = _config(name='folder', folder_root=str(folder))
  info = data.dataset_info(config)
  assert info.class_names == ('cat', 'coffee')
  assert (info.num_train_examples, info.num_eval_examples) == (6, 4)
  batch = next(data.make_train_iterator(config, global_batch_size=4))
  assert batch['images'].shape == (4, 32, 32, 3)
  evals = list(data.make_eval_iterator(config, global_batch_size=3))
  labels = np.concatenate([b['labels'] for b in evals])
  mask = np.concatenate([b['mask'] for b in evals])
  np.testing.assert_array_equal(labels[mask > 0], [0, 0, 1, 1])
  assert len(mask) == 6 and mask.sum() == 4


def test_corrupt_folder_image_is_named(folder, tmp_path):
  root = tmp_path / 'broken'
  os.makedirs(root / 'val' / 'cat')
  Image.open(folder / 'val' / 'cat' / '0.jpg').save(root / 'val/cat/ok.jpg')
  (root / 'val' / 'cat' / 'bad.jpg').write_bytes(b'not a jpeg at all')
  config = _config(name='folder', folder_root=str(root), eval_split='val')
  with pytest.raises(ValueError, match='bad.jpg'):
    list(data.make_eval_iterator(config, global_batch_size=2))


def test_bad_input_errors(tmp_path):
  with pytest.raises(ValueError, match="'digits'"):
    data.dataset_info(_config(name='imagenet'))
  with pytest.raises(ValueError, match='multiple of process_count'):
    data.make_train_iterator(_config(), global_batch_size=5, process_count=2)
  with pytest.raises(ValueError, match='process_index'):
    data.make_eval_iterator(
      _config(), global_batch_size=4, process_index=2, process_count=2
    )
  with pytest.raises(ValueError, match="'train', 'test'"):
    data.dataset_info(_config(eval_split='validation'))
  with pytest.raises(ValueError, match='crop_resize'):
    data.make_eval_iterator(_config(eval_preproc='center'), global_batch_size=4)
  with pytest.raises(ValueError, match='405'):
    data.make_train_iterator(_config(randaugment='ra'), global_batch_size=4)
  with pytest.raises(FileNotFoundError, match='folder_root'):
    data.dataset_info(_config(name='folder', folder_root=str(tmp_path / 'x')))


def test_missing_tfds_dataset_fails_fast(tmp_path, caplog):
  # download=False everywhere: no network, an immediate, actionable error.
  with pytest.raises(FileNotFoundError, match='not prepared'):
    data.dataset_info(_config(name='tfds/mnist', data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match='prepare_imagenet.sh'):
    data.dataset_info(_config(name='imagenet2012', data_dir=str(tmp_path)))
  # The error alone: not tfds's warning about the folder above it.
  assert 'dataset_info.json' not in caplog.text
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.dataset_info(
      _config(name='imagenet2012', data_dir=str(tmp_path / 'nope'))
    )
  with pytest.raises(ValueError, match='list_builders'):
    sources.make_source(_config(name='tfds/no_such_dataset_xyz'))
