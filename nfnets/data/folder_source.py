"""Image folders as a source: `root/<split>/<class>/<image>`.

`FolderSource` gives both loaders one process's share of a split's files
(every `process_count`-th file, so every process has every class), checks
every file decodes before training starts, and leaves the reading to the
loader: the tf.data pipeline reads a file after shuffling the paths.
"""

import os

import numpy as np

from nfnets.data import image_files, sources
from nfnets.data import records as records_lib


class FolderSource:
  """Images laid out as `root/<split>/<class>/<image>`.

  Class names are the sorted union of class folders over all splits, so a
  class missing from one split keeps its label. Hidden files and folders
  (`.x`, macOS `._x`) are skipped. The first time a split is listed, every
  file is decoded once (in parallel, cached per file; see `image_files`),
  so undecodable files and image formats TensorFlow cannot read are
  reported, with their paths, before training starts. The check decodes
  with the loader's decoder: TensorFlow's ('tf') or PIL ('pil').
  """

  name = 'folder'
  natural_images = True

  def __init__(self, root, decoder='tf'):
    if not root or not os.path.isdir(root):
      raise FileNotFoundError(
        f'config.data.folder_root={root!r} is not a directory; point it at '
        'a folder laid out as ROOT/<split>/<class>/<image>.jpg.'
      )
    self.root = root
    self.decoder = decoder
    self._splits = _subdirs(root)
    classes = set()
    for split in self._splits:
      classes.update(_subdirs(os.path.join(root, split)))
    if not classes:
      raise ValueError(f'No ROOT/<split>/<class>/ folders found in {root!r}.')
    self.class_names = tuple(sorted(classes))
    names = [s for s in ('validation', 'val', 'test') if s in self._splits]
    self.default_eval_split = names[0] if names else 'validation'
    self._files = {}  # split -> (paths, labels), checked.

  def _list(self, split):
    """Returns (paths, labels, unsupported paths) of a split, unchecked."""
    split_dir = os.path.join(self.root, split)
    if split not in self._splits:
      raise ValueError(
        f'Folder dataset {self.root!r} has no split {split!r}; its splits '
        f'are {self._splits}.'
      )
    paths, labels, unsupported = [], [], []
    for label, name in enumerate(self.class_names):
      class_dir = os.path.join(split_dir, name)
      if not os.path.isdir(class_dir):
        continue
      for f in image_files.list_dir(class_dir):
        kind = image_files.classify(f)
        if kind == 'image':
          paths.append(os.path.join(class_dir, f))
          labels.append(label)
        elif kind == 'unsupported':
          unsupported.append(os.path.join(class_dir, f))
    return paths, np.asarray(labels, np.int32), unsupported

  def files(self, split):
    """Returns (sorted file paths, int32 labels) of a split.

    Raises:
      image_files.ImageCheckError: (a ValueError) if a file cannot be
        decoded or has an image format TensorFlow cannot read.
    """
    if split not in self._files:
      paths, labels, unsupported = self._list(split)
      if not paths and not unsupported:
        split_dir = os.path.join(self.root, split)
        raise ValueError(
          f'No images {image_files.SUPPORTED_EXTENSIONS} found in '
          f'{split_dir!r}.'
        )
      image_files.check_images(
        os.path.join(self.root, split),
        paths,
        unsupported,
        decoder=self.decoder,
      )
      self._files[split] = (paths, labels)
    return self._files[split]

  def num_examples(self, split):
    return len(self.files(split)[0])

  def read(self, split, *, process_index, process_count, **_):
    """Returns this process's Shard of `split` (files read after shuffling)."""
    paths, labels = self._process_files(split, process_index, process_count)
    tf = sources.tf_module()
    ds = tf.data.Dataset.from_tensor_slices(
      {
        'path': tf.constant(paths, tf.string, shape=[len(paths)]),
        'label': tf.constant(labels, tf.int32, shape=[len(paths)]),
      }
    )
    return sources.Shard(ds, len(paths), in_memory=True, load=_read_file)

  def records(self, split, *, process_index, process_count, **_):
    """Returns this process's Records of `split` (file paths, read later)."""
    paths, labels = self._process_files(split, process_index, process_count)
    return records_lib.Records(paths, labels)

  def _process_files(self, split, process_index, process_count):
    """This process's (paths, labels): every `process_count`-th file.

    The files are listed class by class, so a contiguous share would give
    each process a block of classes (MixUp and CutMix would pair within
    it); every n-th file gives each process every class.
    """
    sources.check_process(process_index, process_count)
    paths, labels = self.files(split)
    rows = slice(process_index, None, process_count)
    return paths[rows], labels[rows]

  def find_corrupt_files(self, split):
    """Returns the files of `split` that the decoder cannot decode now.

    Not cached: used when decoding fails mid-run (a file changed after the
    check at start).
    """
    paths = self._list(split)[0]
    return list(image_files.find_undecodable(paths, decoder=self.decoder))


def _read_file(example):
  """`{'path', 'label'}` -> `{'image': the file's bytes, 'label'}`."""
  return {
    'image': sources.tf_module().io.read_file(example['path']),
    'label': example['label'],
  }


def _subdirs(path):
  """Sorted non-hidden subdirectories of `path`."""
  return [
    d
    for d in image_files.list_dir(path)
    if os.path.isdir(os.path.join(path, d))
  ]
