"""Tests for the synthetic ImageNet-like folders (nfnets.data.synthetic)."""

import os

import numpy as np
from PIL import Image

from nfnets.data import folder_source, synthetic


def test_photos_have_imagenet_sizes_and_differ():
  photos = synthetic.imagenet_like_photos(4, seed=1)
  for photo in photos:
    h, w, c = photo.shape
    assert 340 <= h <= 410 and 450 <= w <= 550 and c == 3
    assert photo.dtype == np.uint8
  # Crops of different photos, not copies.
  assert len({p.tobytes() for p in photos}) == 4
  again = synthetic.imagenet_like_photos(4, seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(photos, again, strict=True))


def test_folder_has_the_layout_and_jpeg_sizes_of_imagenet(tmp_path):
  root = str(tmp_path / 'synth')
  total = synthetic.write_image_folder(
    root, 3, {'train': 2, 'validation': 1}, workers=1
  )
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  assert len(files) == 3 * (2 + 1)
  assert total == sum(os.path.getsize(f) for f in files)
  # ImageNet's JPEGs average about 110 KB.
  assert 60e3 < total / len(files) < 200e3
  with Image.open(files[0]) as image:
    assert image.format == 'JPEG' and image.mode == 'RGB'
  source = folder_source.FolderSource(root)
  assert source.class_names == ('c0000', 'c0001', 'c0002')
  assert source.num_examples('train') == 6
  assert source.num_examples('validation') == 3
