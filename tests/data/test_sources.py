"""Folder datasets: which files count, and the one-time check of every file.

The files are real: JPEG, PNG and WebP written by PIL from a scikit-image
photo, a JPEG cut in half, a TIFF, macOS `._*` resource forks. The
references are independent of the code under test: PIL decodes the WebP
file for comparison, and the expected file lists are written by hand.
"""

import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from nfnets import data
from nfnets.data import folder_source, image_files, sources


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  # The check cache lives in the user's cache dir; keep it inside tmp.
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))


def _photo(size=(24, 20)):
  return np.asarray(Image.fromarray(skimage.data.chelsea()).resize(size))


def _write(path, fmt=None, size=(24, 20)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_photo(size)).save(path, format=fmt)
  return str(path)


def _truncate(path):
  raw = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(raw[: len(raw) // 2])


def _config(root, **kwargs):
  config = data.default_config()
  config.name = 'folder'
  config.folder_root = str(root)
  config.eval_split = 'val'
  config.train_image_size = config.eval_image_size = 16
  config.update(kwargs)
  return config


def _dataset(root):
  """train/{cat,dog} and val/{cat,dog}, two good JPEGs each."""
  for split in ('train', 'val'):
    for name in ('cat', 'dog'):
      for i in range(2):
        _write(root / split / name / f'{i}.jpg')
  return root


def test_hidden_and_resource_files_are_skipped(tmp_path):
  root = _dataset(tmp_path / 'ds')
  cat = root / 'train' / 'cat'
  (cat / '._0.jpg').write_bytes(b'\x00\x05\x16\x07 AppleDouble resource')
  (cat / '.DS_Store').write_bytes(b'Bud1')
  (cat / 'labels.txt').write_text('not an image')
  _write(root / 'train' / '.thumbnails' / '0.jpg')  # Hidden: not a class.
  _write(root / '.trash' / 'cat' / '0.jpg')  # Hidden: not a split.
  source = folder_source.FolderSource(str(root))
  assert source.class_names == ('cat', 'dog')
  paths, labels = source.files('train')
  rel = [os.path.relpath(p, root / 'train') for p in paths]
  assert rel == ['cat/0.jpg', 'cat/1.jpg', 'dog/0.jpg', 'dog/1.jpg']
  assert labels.tolist() == [0, 0, 1, 1]
  info = data.dataset_info(_config(root))
  assert (info.num_train_examples, info.num_eval_examples) == (4, 4)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_corrupt_image_is_reported_before_training(tmp_path, split):
  root = _dataset(tmp_path / 'ds')
  bad = root / split / 'dog' / '1.jpg'
  _truncate(bad)
  # dataset_info is what the trainer calls first, before any step.
  with pytest.raises(image_files.ImageCheckError) as e:
    data.dataset_info(_config(root))
  message = str(e.value)
  assert str(bad) in message
  assert '1 undecodable file(s)' in message
  assert 'Re-encode or replace' in message
  assert 'delete' not in message.lower()
  # Exactly the one bad file is named: no good file is listed.
  for good in ('cat/0.jpg', 'cat/1.jpg', 'dog/0.jpg'):
    assert str(root / split / good) not in message


def test_webp_is_read_and_decodes_like_pil(tmp_path):
  root = tmp_path / 'ds'
  _write(root / 'val' / 'cat' / 'a.jpg')
  webp = _write(root / 'val' / 'dog' / 'b.webp', size=(16, 16))
  config = _config(root, eval_preproc='resize')
  assert folder_source.FolderSource(str(root)).num_examples('val') == 2
  batch = next(data.make_eval_iterator(config, global_batch_size=2))
  assert batch['labels'].tolist() == [0, 1]
  # At 16 px 'resize' leaves the image alone: compare with PIL's decode.
  want = np.asarray(Image.open(webp).convert('RGB'), np.float32)
  want = (want - data.MEAN_RGB) / data.STDDEV_RGB
  np.testing.assert_allclose(batch['images'][1], want, atol=1e-4)


def test_tiff_is_reported_not_skipped(tmp_path):
  root = _dataset(tmp_path / 'ds')
  tiff = _write(root / 'train' / 'cat' / 'scan.TIFF', fmt='TIFF')
  with pytest.raises(image_files.ImageCheckError) as e:
    data.dataset_info(_config(root))
  message = str(e.value)
  assert tiff in message
  assert 'format TensorFlow cannot decode' in message
  assert 'Convert them to PNG or JPEG' in message


def test_long_lists_are_cut_with_a_count(tmp_path):
  root = tmp_path / 'ds'
  _write(root / 'train' / 'cat' / 'good.jpg')
  for i in range(13):
    (root / 'train' / 'cat' / f'bad{i:02d}.png').write_bytes(b'nope')
  with pytest.raises(image_files.ImageCheckError) as e:
    folder_source.FolderSource(str(root)).files('train')
  message = str(e.value)
  assert '13 undecodable file(s)' in message
  assert message.count('bad') == image_files.MAX_LISTED
  assert f'... and {13 - image_files.MAX_LISTED} more' in message


def test_find_undecodable_matches_pil(tmp_path):
  paths = [_write(tmp_path / f'{i}.png') for i in range(12)]
  for i in (2, 7, 11):
    _truncate(paths[i])
  want = []
  for p in paths:  # Independent reference: PIL's full decode.
    try:
      Image.open(p).load()
    except OSError:
      want.append(p)
  assert want == [paths[2], paths[7], paths[11]]
  assert list(image_files.find_undecodable(paths, num_threads=4)) == want


def test_check_is_cached_by_size_and_mtime(tmp_path):
  root = _dataset(tmp_path / 'ds')
  data.dataset_info(_config(root))
  caches = os.listdir(image_files.cache_dir())
  assert len(caches) == 2  # One per split folder; nothing in the dataset.
  assert sorted(os.listdir(root)) == ['train', 'val']
  # Same size and mtime, different bytes: the cached verdict is reused...
  path = root / 'train' / 'cat' / '0.jpg'
  st = os.stat(path)
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2 :] = bytes(len(raw) - len(raw) // 2)
  raw[:2] = b'XX'  # Not a JPEG any more.
  path.write_bytes(bytes(raw))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert data.dataset_info(_config(root)).num_train_examples == 4
  # ...and a changed mtime makes the file be checked again.
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  with pytest.raises(image_files.ImageCheckError, match='0.jpg'):
    data.dataset_info(_config(root))


def _classes_folder(root, classes=4, per_class=6, size=(8, 6)):
  """train/c<k>/ with `per_class` small PNGs each, listed class by class."""
  for k in range(classes):
    for i in range(per_class):
      _write(root / 'train' / f'c{k}' / f'{i}.png', size=size)
  return root


@pytest.mark.parametrize('count', [2, 3, 4])
def test_every_process_reads_every_class_of_a_folder(tmp_path, count):
  # The files are listed class by class: contiguous shares gave each
  # process a block of classes, so MixUp/CutMix paired within it.
  source = folder_source.FolderSource(str(_classes_folder(tmp_path)))
  tf_shards, python_shards = [], []
  for index in range(count):
    kwargs = dict(process_index=index, process_count=count)
    shard = source.read('train', **kwargs)
    tf_shards.append(
      [ex['path'].decode() for ex in shard.dataset.as_numpy_iterator()]
    )
    assert shard.num_examples == len(tf_shards[-1])
    python_shards.append(list(source.records('train', **kwargs).images))
    labels = source.records('train', **kwargs).labels
    assert set(labels) == {0, 1, 2, 3}, (index, labels)
  assert tf_shards == python_shards  # Both loaders shard alike.
  everything = sorted(p for shard in tf_shards for p in shard)
  assert everything == sorted(source.files('train')[0])  # Disjoint, complete.


def test_folder_files_are_read_after_shuffling_only_as_needed(
  tmp_path, monkeypatch
):
  # They were read before the full shuffle, whose buffer then held every
  # file of the shard before the first batch (all of ImageNet's JPEGs).
  import tensorflow as tf  # noqa: PLC0415

  root = _classes_folder(tmp_path, classes=2, per_class=150)
  reads = []

  def counted(example):
    def count(path):
      reads.append(path)
      return path

    path = tf.py_function(count, [example['path']], tf.string)
    return {'image': tf.io.read_file(path), 'label': example['label']}

  monkeypatch.setattr(folder_source, '_read_file', counted)
  config = _config(root, eval_split='train', train_image_size=8)
  batch = next(data.make_train_iterator(config, global_batch_size=4))
  assert batch['images'].shape[0] == 4
  assert len(reads) < 100, len(reads)  # Of 300; prefetching reads ahead.


def test_one_pixel_images_get_a_one_pixel_centre_crop(tmp_path):
  # The reference's box is int(S / (S + 32) * 1) = 0 pixels: an empty crop
  # failed mid-run in both loaders (the file itself is fine).
  from nfnets.data import numpy_preprocess, preprocess  # noqa: PLC0415

  for shape in ((1, 1), (1, 50), (50, 1)):
    y, x, h, w = numpy_preprocess.center_crop_box(shape, 224)
    assert (h, w) == (1, 1) and 0 <= y < shape[0] and 0 <= x < shape[1]
    tf_box = [int(v) for v in preprocess.center_crop_box(shape, 224)]
    assert tf_box == [y, x, h, w]
  assert numpy_preprocess.center_crop_box((256, 300), 224) == [16, 38, 224, 224]


def test_sixteen_bit_grey_png_decodes_as_tensorflow_does(tmp_path):
  # PIL's convert('RGB') clips 16-bit values to 255: nearly white images.
  import tensorflow as tf  # noqa: PLC0415

  from nfnets.data import numpy_preprocess  # noqa: PLC0415

  pixels = (np.arange(32 * 40).reshape(32, 40) * 51).astype(np.uint16)
  path = tmp_path / 'grey16.png'
  Image.fromarray(pixels).save(path)
  assert Image.open(path).mode == 'I;16'
  raw = path.read_bytes()
  ours = numpy_preprocess.decode(raw)
  want = tf.io.decode_image(raw, channels=3, expand_animations=False).numpy()
  np.testing.assert_array_equal(ours, want)
  np.testing.assert_array_equal(ours[..., 0], pixels >> 8)  # By hand.


def test_float_pixels_are_refused_not_read_as_black(tmp_path):
  # PIL's convert('RGB') turns floats in 0..1 into zeros: a black image,
  # silently. Both the python loader's decode and its PIL check refuse.
  from nfnets.data import numpy_preprocess  # noqa: PLC0415

  path = tmp_path / 'float.tiff'
  Image.fromarray(np.full((6, 7), 0.75, np.float32), mode='F').save(path)
  with pytest.raises(ValueError, match="floating-point pixels \\(PIL mode 'F'"):
    numpy_preprocess.decode(path.read_bytes())
  reason = image_files.pil_decode_error(str(path))
  assert reason.startswith("it holds floating-point pixels (PIL mode 'F')")
  # 8-bit images still read as before.
  good = _write(tmp_path / 'ok.png', size=(7, 6))
  assert image_files.pil_decode_error(str(good)) == ''
  assert numpy_preprocess.decode(str(good)).shape == (6, 7, 3)


def test_contiguous_shares_follow_tfds_even_splits():
  # The python loader's share of a tfds split must be the tf.data loader's
  # (tfds.even_splits: n // count each, the first n % count one more); a
  # rounded linspace gave 7/6/7 of 20 where tf.data read 7/7/6.
  want = {
    (20, 3): [(0, 7), (7, 14), (14, 20)],
    (10, 4): [(0, 3), (3, 6), (6, 8), (8, 10)],
    (3, 5): [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)],
    (1437, 2): [(0, 719), (719, 1437)],
  }
  for (n, count), shares in want.items():
    assert [sources.process_slice(n, i, count) for i in range(count)] == shares
