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
from nfnets.data import image_files, sources


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
  source = sources.FolderSource(str(root))
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
  assert sources.FolderSource(str(root)).num_examples('val') == 2
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
    sources.FolderSource(str(root)).files('train')
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
