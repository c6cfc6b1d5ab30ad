"""One process's part of a split as random-access (image, label) records.

What a source's `records` method returns to the TensorFlow-free loader
(`python_loader.py`): `records[i]` is (image, int label), `image` a file
path, encoded bytes or a uint8 [H, W, 3] array (`numpy_preprocess.decode`
takes each), and `len(records)` the shard's size.
"""

import numpy as np


class Records:
  """Records from parallel in-memory sequences of images and labels."""

  def __init__(self, images, labels):
    """Wraps parallel sequences of images and labels (equal lengths).

    Args:
      images: file paths, encoded bytes or a uint8 array [n, H, W, 3].
      labels: int32 [n].
    """
    if len(images) != len(labels):
      raise ValueError(f'{len(images)} images but {len(labels)} labels.')
    self.images, self.labels = images, np.asarray(labels, np.int32)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return self.images[i], int(self.labels[i])


class TfdsRecords:
  """Records of a tfds array_record data source (bytes read per example)."""

  def __init__(self, data_source, start, stop, image_key, label_key):
    """Wraps examples [start, stop) of a tfds data source.

    Args:
      data_source: `builder.as_data_source(split)` with images undecoded.
      start: first example of this process's shard.
      stop: one past its last example.
      image_key: the image feature's name.
      label_key: the label feature's name.
    """
    self._source, self._start, self._len = data_source, start, stop - start
    self._image_key, self._label_key = image_key, label_key

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    if not 0 <= i < self._len:
      raise IndexError(i)
    example = self._source[self._start + i]
    return example[self._image_key], int(example[self._label_key])
