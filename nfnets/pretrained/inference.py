"""Classifying image files with pretrained NFNets.

`predict_files` classifies images with DeepMind's demo preprocessing (as in
their Colab: a bicubic resize to (S+32)^2 ignoring the aspect ratio, a centre
crop of S, then per-channel normalisation) and labels 1000-class outputs with
the bundled ImageNet class names. It uses PIL rather than TensorFlow, so
prediction starts fast and runs wherever jax does. For dataset evaluation see
`nfnets.train.evaluation`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import haiku as hk
import jax
import numpy as np
import PIL.Image

from nfnets.models import nfnet
from nfnets.pretrained import formats, loading

# ImageNet channel statistics in 0..255, as in nfnets.data.preprocess (not
# imported from there: that module pulls in TensorFlow).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_PADDING = 32

CLASS_NAMES_FILE = os.path.join(
  os.path.dirname(__file__), 'assets', 'imagenet_classes.txt'
)


SYNSETS_FILE = os.path.join(
  os.path.dirname(__file__), 'assets', 'imagenet_synsets.txt'
)


def _read_lines(path: str) -> list[str]:
  with open(path) as f:
    return [line.rstrip('\n') for line in f]


def imagenet_class_names() -> list[str]:
  """The 1000 ImageNet class names, in the synset order of tfds's labels."""
  return _read_lines(CLASS_NAMES_FILE)


def imagenet_synsets() -> list[str]:
  """The 1000 ImageNet synset IDs: tfds's imagenet2012 labels, in order."""
  return _read_lines(SYNSETS_FILE)


def readable_class_names(names: Sequence[str]) -> list[str]:
  """`names`, with ImageNet synset IDs replaced by readable class names.

  tfds's ImageNet datasets (imagenet2012, imagenet_resized, imagenette,
  ...) name their classes by WordNet synset ('n01440764'), each in its own
  order. A list made only of ImageNet synsets gets the bundled names
  ('tench'), synset by synset, so any order or subset is named right; any
  other list comes back unchanged.

  Args:
    names: a dataset's class names.

  Returns:
    The names to print.
  """
  readable = dict(zip(imagenet_synsets(), imagenet_class_names(), strict=True))
  if names and all(name in readable for name in names):
    return [readable[name] for name in names]
  return list(names)


# ----------------------------------------------------------------------------
# Prediction on image files.
# ----------------------------------------------------------------------------


def model_spec(path: str, variant: str | None, model_kwargs: Mapping | None):
  """Variant and NFNet kwargs: the file's metadata, updated by explicit values.

  Files written by `nfnets.pretrained.save_params` may record `variant` and
  a JSON `model_kwargs`; DeepMind's pickles record nothing (variant F0
  assumed). Explicit kwargs update the recorded ones rather than replace
  them: `{"grouped_conv": "native"}` keeps the file's width and depths (set
  a recorded key to its default to undo it). Unknown keys are refused here,
  before any weights are read.

  Args:
    path: the weights file.
    variant: explicit variant, or None to read it from the file.
    model_kwargs: NFNet kwargs set over the file's, or None.

  Returns:
    (variant, model_kwargs dict).

  Raises:
    ValueError: the file records another model than an NFNet (a training
      run's params, `convert_weights --workdir`), or a kwarg is not one of
      NFNet's.
  """
  metadata = formats.read_metadata(path)
  model = metadata.get('model', 'NFNet')
  if model != 'NFNet':
    raise ValueError(
      f'{path} holds the params of a {model}; this takes NFNets. Use the '
      "training run's workdir (--workdir) instead."
    )
  if variant is None:
    variant = metadata.get('variant', 'F0')
  recorded = json.loads(metadata.get('model_kwargs', '{}'))
  loading.check_model_kwargs(model_kwargs or {}, '--model_kwargs')
  loading.check_model_kwargs(recorded, f'The model_kwargs {path} records')
  return variant, {**recorded, **(model_kwargs or {})}


def make_forward(
  variant: str, num_classes: int, *, return_metrics: bool = True, **kwargs
):
  """Returns a jitted inference `(params, images) -> outputs dict`.

  Args:
    variant: NFNet variant.
    num_classes: classifier width.
    return_metrics: also return the signal-propagation metrics
      (`avg_sq_mean_i`, `avg_var_i`, `res_avg_var_k`).
    **kwargs: further `NFNet` constructor arguments.

  Returns:
    The jitted apply function; outputs hold 'logits' and 'pool' too.
  """

  def forward(images):
    net = nfnet.NFNet(num_classes=num_classes, variant=variant, **kwargs)
    return net(images, is_training=False, return_metrics=return_metrics)

  return jax.jit(hk.without_apply_rng(hk.transform(forward)).apply)


class UnreadableImageError(FileNotFoundError):
  """An image file is missing, not an image, or truncated or damaged."""


def image_paths(args: Sequence[str]) -> list[str]:
  """The files to classify: each file as given, each directory's images.

  A directory stands for its image files (by extension, as the folder
  dataset names them; hidden files skipped), sorted, not recursing.

  Args:
    args: file and directory paths from the command line.

  Returns:
    The file paths, in the order given.

  Raises:
    ValueError: a directory holds no image file.
  """
  from nfnets.data import image_files

  paths = []
  for arg in args:
    if not os.path.isdir(arg):
      paths.append(arg)
      continue
    found = [
      os.path.join(arg, name)
      for name in image_files.list_dir(arg)
      if image_files.classify(name) != 'other'
      and os.path.isfile(os.path.join(arg, name))
    ]
    if not found:
      raise ValueError(
        f'{arg!r} is a directory without image files '
        f'({", ".join(image_files.SUPPORTED_EXTENSIONS)}, ...); pass image '
        'files or a directory that holds some.'
      )
    paths.extend(found)
  return paths


def read_rgb(path: str) -> np.ndarray:
  """Decodes an image file to uint8 RGB [H, W, 3].

  The pixels are what TensorFlow's `decode_image(channels=3)` gives
  (`nfnets.data.numpy_preprocess.to_rgb`, which the training run's python
  loader uses too): greyscale, palette and alpha images become RGB, 16-bit
  greyscale keeps its high byte, and floating-point images are refused.

  Args:
    path: any image PIL reads.

  Returns:
    The pixels.

  Raises:
    UnreadableImageError: the file is missing, cannot be fully decoded, or
      holds pixels without a 0..255 scale (floating-point, 32-bit).
  """
  from nfnets.data import numpy_preprocess

  if not os.path.exists(path):
    raise UnreadableImageError(f'No image file at {path!r}.')
  try:
    with PIL.Image.open(path) as image:
      return numpy_preprocess.to_rgb(image)
  except numpy_preprocess.UnsupportedPixelsError as e:
    raise UnreadableImageError(f'{path!r} cannot be classified: {e}.') from e
  except PIL.UnidentifiedImageError as e:
    raise UnreadableImageError(
      f'{path!r} is not an image file PIL can read.'
    ) from e
  except PIL.Image.DecompressionBombError as e:  # Not an OSError.
    raise UnreadableImageError(
      f'{path!r} is too large to decode safely ({e}); shrink it first.'
    ) from e
  except OSError as e:
    # PIL raises a bare OSError for a truncated or corrupt image body.
    raise UnreadableImageError(
      f'{path!r} cannot be decoded ({e}); is it truncated or damaged?'
    ) from e


def load_image(path: str, image_size: int) -> np.ndarray:
  """Reads one image file into a normalised float32 [S, S, 3] array.

  Args:
    path: any image PIL reads (decoded by `read_rgb`).
    image_size: output size S (the variant's test_imsize by default).

  Returns:
    The image resized (bicubic) to (S+32)^2, centre-cropped to S and
    normalised with the ImageNet mean and standard deviation.

  Raises:
    UnreadableImageError: the file is missing or cannot be fully decoded.
  """
  image = PIL.Image.fromarray(read_rgb(path))
  big = image_size + CROP_PADDING
  image = image.resize((big, big), PIL.Image.Resampling.BICUBIC)
  off = CROP_PADDING // 2
  pixels = np.asarray(image, np.float32)[
    off : off + image_size, off : off + image_size
  ]
  return (pixels - np.float32(MEAN_RGB)) / np.float32(STDDEV_RGB)


def iter_classified(
  paths: Sequence[str],
  load: Callable[[str], np.ndarray],
  logits_fn: Callable[[np.ndarray], np.ndarray],
  class_names: Sequence[str],
  k: int = 5,
  batch_size: int = 16,
) -> Iterator[tuple[str, list | UnreadableImageError]]:
  """Top-k classes of each image file, a batch at a time, in order.

  Files are read `batch_size` images at a time, and each batch's results
  come out before the next batch is read: memory holds one batch whatever
  the number of files, and the first results appear after one batch. An
  unreadable file does not stop it.

  Args:
    paths: image files.
    load: `path -> float32 [S, S, 3]` (e.g. `load_image` with a size); it
      raises `UnreadableImageError` for a bad file.
    logits_fn: `[N, S, S, 3] images -> [N, C] logits`.
    class_names: C names.
    k: how many classes per image.
    batch_size: images per `logits_fn` call.

  Yields:
    `(path, result)` per path, in the order of `paths`: its top-k (class
    name, probability) list, best first, or the `UnreadableImageError` it
    raised.
  """
  pending, images = [], []  # Results in order; the batch's images.
  for path in paths:
    try:
      images.append(load(path))
      pending.append((path, None))
    except UnreadableImageError as e:
      pending.append((path, e))
    if len(images) == batch_size:
      yield from _classified(pending, images, logits_fn, class_names, k)
      pending, images = [], []
  yield from _classified(pending, images, logits_fn, class_names, k)


def _classified(pending, images, logits_fn, class_names, k):
  """`pending` with the top-k of `images` in place of its None results."""
  tops = iter(())
  if images:
    logits = np.asarray(logits_fn(np.stack(images)))
    tops = iter(top_k(logits, class_names, min(k, len(class_names))))
  for path, error in pending:
    yield path, error if error is not None else next(tops)


def classify_files(
  paths: Sequence[str],
  load: Callable[[str], np.ndarray],
  logits_fn: Callable[[np.ndarray], np.ndarray],
  class_names: Sequence[str],
  k: int = 5,
  batch_size: int = 16,
) -> list:
  """Top-k classes of each image file; an unreadable file does not stop it.

  Args:
    As `iter_classified`.

  Returns:
    Per path, in order: its top-k (class name, probability) list, best
    first, or the `UnreadableImageError` it raised.
  """
  return [
    result
    for _, result in iter_classified(
      paths, load, logits_fn, class_names, k, batch_size
    )
  ]


def top_k(logits: np.ndarray, class_names: Sequence[str], k: int = 5):
  """Top-k (class name, probability) per row of `logits`.

  Args:
    logits: [N, C] logits.
    class_names: C names.
    k: how many classes per row.

  Returns:
    N lists of k (name, softmax probability) pairs, most probable first.
  """
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return [[(class_names[i], float(p[i])) for i in row]
          for row, p in zip(order, probs, strict=True)]  # fmt: skip


def iter_predictions(
  paths: Sequence[str],
  weights: str,
  *,
  variant: str | None = None,
  model_kwargs: Mapping | None = None,
  image_size: int | None = None,
  k: int = 5,
) -> Iterator[tuple[str, list | UnreadableImageError]]:
  """Classifies image files with pretrained weights, a batch at a time.

  The weights are read and checked at once (a mismatch raises here); the
  images are read and classified as the iterator is consumed
  (`iter_classified`).

  Args:
    paths: image files.
    weights: any weights file `nfnets.pretrained.load` reads.
    variant: NFNet variant; None = the file's metadata, else 'F0'.
    model_kwargs: NFNet kwargs set over the file's metadata (`model_spec`).
    image_size: input size; None = the file's `image_size`, else the
      variant's test_imsize.
    k: how many classes to return per image.

  Returns:
    An iterator of `(path, result)` in the order of `paths`: the top-k
    (class name, probability), best first, or the `UnreadableImageError`
    of a file that could not be read. Names are the file's `class_names`
    (ImageNet synset IDs are given their readable names), else the
    ImageNet classes for 1000-class weights, else 'class_<i>'. A training
    run's file (`convert_weights --workdir`) records its names, eval size
    and eval preprocessing, which are used as the run used them.
  """
  metadata = formats.read_metadata(weights)
  variant, model_kwargs = model_spec(weights, variant, model_kwargs)
  params = loading.load(weights, variant, **model_kwargs)
  num_classes = params[loading.CLASSIFIER_MODULE]['b'].shape[0]
  names = _class_names(metadata, num_classes)
  size = (
    image_size
    or int(metadata.get('image_size', 0))
    or nfnet.get_variant(variant)['test_imsize']
  )
  forward = make_forward(
    variant, num_classes, return_metrics=False, **model_kwargs
  )
  return iter_classified(
    paths,
    _image_loader(metadata.get('eval_preproc'), size),
    lambda images: forward(params, images)['logits'],
    names,
    k,
  )


def predict_files(paths: Sequence[str], weights: str, **kwargs) -> list:
  """Classifies image files with pretrained weights.

  Args:
    paths: image files.
    weights: any weights file `nfnets.pretrained.load` reads.
    **kwargs: `variant`, `model_kwargs`, `image_size`, `k`, as
      `iter_predictions` takes them.

  Returns:
    Per image, the top-k (class name, probability), best first, or the
    `UnreadableImageError` of a file that could not be read.
  """
  return [result for _, result in iter_predictions(paths, weights, **kwargs)]


def _class_names(metadata: Mapping[str, str], num_classes: int) -> list:
  """The file's class names (synsets made readable), else ImageNet's for
  1000 classes, else indices."""
  names = json.loads(metadata.get('class_names', '[]'))
  if len(names) == num_classes:
    return readable_class_names(names)
  if num_classes == 1000:
    return imagenet_class_names()
  return [f'class_{i}' for i in range(num_classes)]


def _image_loader(eval_preproc: str | None, size: int):
  """`path -> image`: DeepMind's demo preprocessing, or a run's eval mode."""
  if eval_preproc is None:
    return lambda path: load_image(path, size)
  # The training run's own (TensorFlow-free) eval code, as predict
  # --workdir uses on a host without TensorFlow.
  from nfnets.data import numpy_preprocess

  return lambda path: numpy_preprocess.normalize(
    numpy_preprocess.eval_image(read_rgb(path), size, eval_preproc)
  )
