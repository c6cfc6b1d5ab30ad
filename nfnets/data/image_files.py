"""Which files of an image folder are images, and a one-time decode check.

A folder dataset is read lazily: a file is decoded when a batch needs it,
which for a corrupt file can be hours into a run. `check_images` decodes
every file once, in parallel, with the decoder the input loader uses
(TensorFlow's for tf.data, PIL's for the TensorFlow-free loader), before
the first step, and reports every file that cannot be used.

The verdicts are cached per file in the user's cache directory
(`$XDG_CACHE_HOME/nfnets/image_checks/`, default `~/.cache`), one JSON file
per folder and decoder, keyed by each file's relative path, size and
modification time: a later run re-checks only new or changed files, and
nothing is ever written into the dataset folder (it may be read-only or
shared, and it is the user's data). Only files that decoded are recorded,
so a fixed file is checked again.

File rules:

* hidden files and folders (names starting with '.', including macOS
  `._*` resource forks and `.DS_Store`) are skipped;
* `SUPPORTED_EXTENSIONS` are read (TensorFlow decodes JPEG, PNG, BMP, GIF
  and WebP by content);
* `UNSUPPORTED_EXTENSIONS` (TIFF, HEIC, AVIF, ...) are image formats that
  TensorFlow cannot decode: they are reported, never skipped silently;
* any other file (e.g. `labels.txt`, `Thumbs.db`) is not an image and is
  ignored.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import re

SUPPORTED_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
UNSUPPORTED_EXTENSIONS = (
  '.tif',
  '.tiff',
  '.heic',
  '.heif',
  '.avif',
  '.jp2',
  '.jxl',
  '.ico',
  '.psd',
)
# How many offending paths an error message lists before "and N more".
MAX_LISTED = 10


class ImageCheckError(ValueError):
  """Some files of a folder dataset cannot be used; the message lists them."""


def is_hidden(name):
  """True for names the folder reader skips ('.x', '._x', '.DS_Store')."""
  return name.startswith('.')


def list_dir(path):
  """Sorted non-hidden entries of a directory."""
  return sorted(n for n in os.listdir(path) if not is_hidden(n))


def classify(name):
  """Returns 'image', 'unsupported' or 'other' for a file name."""
  lower = name.lower()
  if lower.endswith(SUPPORTED_EXTENSIONS):
    return 'image'
  if lower.endswith(UNSUPPORTED_EXTENSIONS):
    return 'unsupported'
  return 'other'


def cache_dir():
  """The directory of the check caches (`$XDG_CACHE_HOME/nfnets/...`)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
  return os.path.join(os.path.expanduser(base), 'nfnets', 'image_checks')


def _cache_path(folder, decoder):
  # One cache per decoder: a file one decoder reads the other may not.
  name = os.path.abspath(folder) + ('' if decoder == 'tf' else f'\0{decoder}')
  key = hashlib.sha256(name.encode()).hexdigest()[:20]
  return os.path.join(cache_dir(), f'{key}.json')


def _signature(path):
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def _load_cache(folder, decoder):
  try:
    with open(_cache_path(folder, decoder)) as f:
      cached = json.load(f)
  except (OSError, ValueError):
    return {}
  if cached.get('folder') != os.path.abspath(folder):
    return {}  # A hash collision or a foreign file: start afresh.
  return cached.get('files', {})


def _save_cache(folder, good, decoder):
  path = _cache_path(folder, decoder)
  record = {'folder': os.path.abspath(folder), 'files': good}
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(record, f)
    os.replace(tmp, path)  # Atomic: concurrent processes never see half.
  except OSError as e:
    # Only the cache is lost: the next run checks the files again.
    logging.warning('Cannot write the image check cache %s: %s', path, e)


def _reason(message):
  """TensorFlow's error text without its op and device decorations."""
  text = message.strip().splitlines()[-1] if message.strip() else ''
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', text)
  return re.sub(r'\s*\[Op:[^\]]*\].*$', '', text) or 'cannot be decoded'


DECODERS = ('tf', 'pil')


def decode_error(path):
  """Returns why TensorFlow cannot decode `path` as the pipeline does, or ''.

  Args:
    path: an image file.

  Returns:
    '' when the file decodes to an RGB image, else a one-line reason.
  """
  import tensorflow as tf  # noqa: PLC0415  (lazy: only folder datasets)

  try:
    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  except (
    tf.errors.InvalidArgumentError,  # Not an image, truncated, bad data.
    tf.errors.UnknownError,
    tf.errors.NotFoundError,  # Removed since it was listed.
    tf.errors.PermissionDeniedError,
  ) as e:
    return _reason(e.message)
  if 0 in image.shape:
    return f'decodes to an empty image {tuple(image.shape)}'
  return ''


def pil_decode_error(path):
  """Returns why PIL cannot decode `path` as the python loader does, or ''.

  Args:
    path: an image file.

  Returns:
    '' when the file decodes to an RGB image, else a one-line reason.
  """
  from PIL import Image  # noqa: PLC0415  (lazy: only folder datasets)

  from nfnets.data import numpy_preprocess  # noqa: PLC0415

  try:
    shape = numpy_preprocess.decode(path).shape[:2]
  # PIL's decode errors (ValueError also for pixels without a 0..255
  # scale); DecompressionBombError: too many pixels.
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    return (
      str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    )
  if 0 in shape:
    return f'decodes to an empty image {tuple(shape)}'
  return ''


def find_undecodable(paths, num_threads=None, decoder='tf'):
  """Returns {path: reason} for the paths the decoder cannot decode.

  Args:
    paths: image files.
    num_threads: decoding threads (TensorFlow and PIL release the GIL while
      decoding); None uses one per CPU.
    decoder: 'tf' (TensorFlow's, the tf.data loader's) or 'pil' (the
      python loader's).

  Returns:
    The failures, in the order of `paths`.
  """
  if decoder not in DECODERS:
    raise ValueError(f'decoder={decoder!r}; valid: {list(DECODERS)}.')
  if not paths:
    return {}
  check = decode_error if decoder == 'tf' else pil_decode_error
  workers = num_threads or min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    reasons = list(pool.map(check, paths))
  return {p: r for p, r in zip(paths, reasons, strict=True) if r}


def _listing(paths, what):
  shown = ''.join(f'\n  {p}' for p in paths[:MAX_LISTED])
  rest = len(paths) - MAX_LISTED
  more = f'\n  ... and {rest} more' if rest > 0 else ''
  return f'{len(paths)} {what}:{shown}{more}'


def check_images(folder, paths, unsupported=(), decoder='tf'):
  """Decodes every file once (cached) and raises if any cannot be used.

  Args:
    folder: the directory the files lie under (keys the cache).
    paths: image files to check.
    unsupported: files with an image extension TensorFlow cannot decode.
    decoder: 'tf' or 'pil', as `find_undecodable`.

  Raises:
    ImageCheckError: listing undecodable and unsupported files, with what
      to do about each.
  """
  cached = _load_cache(folder, decoder)
  good, todo = {}, []
  for path in paths:
    rel = os.path.relpath(path, folder)
    sig = _signature(path)
    if cached.get(rel) == sig:
      good[rel] = sig
    else:
      todo.append((path, rel, sig))
  if todo:
    logging.info('Checking %d new image(s) in %s once.', len(todo), folder)
  bad = find_undecodable([path for path, _, _ in todo], decoder=decoder)
  good.update({rel: sig for path, rel, sig in todo if path not in bad})
  if todo:
    _save_cache(folder, good, decoder)
  if not bad and not unsupported:
    return
  parts = [f'The image folder {folder!r} has files that cannot be read.']
  if bad:
    parts.append(
      _listing([f'{p}  ({r})' for p, r in bad.items()], 'undecodable file(s)')
      + '\nRe-encode or replace these files (e.g. from the original source), '
      'or move them out of the dataset folder.'
    )
  if unsupported:
    parts.append(
      _listing(
        list(unsupported), 'file(s) in a format TensorFlow cannot decode'
      )
      + '\nConvert them to PNG or JPEG (e.g. PIL: '
      "Image.open(p).convert('RGB').save(p_png)), then move the originals "
      'out of the dataset folder.'
    )
  raise ImageCheckError('\n'.join(parts))
