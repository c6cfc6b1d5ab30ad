"""The per-image preprocessing of `preprocess.py` in NumPy and PIL.

The TensorFlow-free loader (`python_loader.py`) decodes with PIL and crops,
flips and resizes with NumPy, reproducing tf.data's transforms:

* `resize_bicubic` is `tf.image.resize(..., 'bicubic')` (TensorFlow's
  `ResizeBicubic` with half-pixel centres): one pass per axis, four taps
  per output pixel (`resize_taps`: the non-zeros of the matrices
  `nfnets.export.preprocess.resize_weights` builds in JAX). It agrees with
  TensorFlow to float32 rounding.
* `resize_bilinear` is `tf.image.resize(..., 'bilinear')` with
  TensorFlow's arithmetic, bit for bit (the digits' upscaling).
* `distorted_box` samples the Inception crop with the algorithm of
  TensorFlow's `sample_distorted_bounding_box` and the reference's
  centre-crop fallback: the same distribution of boxes, from a NumPy
  random stream instead of TensorFlow's.

Decoded images are uint8 [H, W, 3]; the transforms return float32 images
in the 0..255 range, unclamped, as `preprocess.py` does.
"""

import io

import numpy as np
import scipy.sparse
from PIL import Image

from nfnets.data.recipe import (
  AREA_RANGE,
  ASPECT_RATIO_RANGE,
  CROP_PADDING,
  EVAL_PREPROCS,
  MAX_ATTEMPTS,
  MEAN_RGB,
  MIN_OBJECT_COVERED,
  STDDEV_RGB,
  TRAIN_PREPROCS,
)

# Keys' cubic convolution with a = -0.5, the kernel of TensorFlow's
# 'bicubic'.
_CUBIC_A = -0.5
# TensorFlow's ResizeBicubic rounds sampling positions to 1/1024 pixel.
_TABLE_SIZE = 1024
# TensorFlow's slack when it shrinks a crop that rounds wider than the image.
_EPS = 1e-7


def decode(image):
  """Returns uint8 [H, W, 3] from a file path, encoded bytes or an array.

  PIL decodes (it releases the GIL while decoding, so threads overlap) and
  `to_rgb` makes the pixels what TensorFlow's `decode_image(channels=3)`
  makes them; GIFs give their first frame.

  Args:
    image: a path (str), encoded bytes, or a uint8 [H, W, 3] array (passed
      through).

  Returns:
    uint8 [H, W, 3].

  Raises:
    UnsupportedPixelsError: the image's pixels have no 0..255 scale.
  """
  if isinstance(image, np.ndarray):
    return image
  source = io.BytesIO(image) if isinstance(image, bytes) else image
  with Image.open(source) as img:
    return to_rgb(img)


class UnsupportedPixelsError(ValueError):
  """An image whose pixel values have no 0..255 scale (float, 32-bit)."""


def to_rgb(img):
  """The pixels of an open PIL image as TensorFlow decodes them to RGB.

  * 8-bit images (greyscale, palette, alpha, CMYK, ...): PIL's
    `convert('RGB')`, which is what `decode_image(channels=3)` gives.
  * 16-bit greyscale (PIL modes 'I;16*', and 'I' within 0..65535, e.g. a
    16-bit PNG): the high byte, `v >> 8`, as TensorFlow's decoder and its
    `convert_image_dtype` (uint16 -> uint8 is `v // 256`) make it. PIL's
    own conversion would clip every value to 255: a nearly white image.
  * Floating-point pixels (mode 'F', e.g. a float TIFF) and integers
    beyond 16 bits are refused: their range is not known, and any guess
    (0..1, 0..255, the image's min..max) could be silently wrong.

  Args:
    img: an open `PIL.Image.Image`.

  Returns:
    uint8 [H, W, 3].

  Raises:
    UnsupportedPixelsError: floating-point or wider than 16-bit pixels.
  """
  if img.mode == 'RGB':
    return np.asarray(img)
  if img.mode == 'F':
    raise UnsupportedPixelsError(
      "it holds floating-point pixels (PIL mode 'F'), which have no 0..255 "
      'scale: save it as an 8- or 16-bit PNG or as a JPEG'
    )
  if img.mode.startswith('I'):
    pixels = np.asarray(img).astype(np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
      raise UnsupportedPixelsError(
        'it holds integer pixels beyond 16 bits (PIL mode '
        f"'{img.mode}'): save it as an 8- or 16-bit PNG or as a JPEG"
      )
    grey = (pixels >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  return np.asarray(img.convert('RGB'))


def normalize(images):
  """Maps 0..255 images to float32 with zero mean, unit variance per channel."""
  mean = np.asarray(MEAN_RGB, np.float32)
  std = np.asarray(STDDEV_RGB, np.float32)
  return (np.asarray(images, np.float32) - mean) / std


def to_uint8(images):
  """Rounds and clips 0..255 float images to uint8 (the device placement)."""
  return np.clip(np.round(images), 0.0, 255.0).astype(np.uint8)


def _keys_cubic(t):
  """Keys' cubic kernel at distances `t` (zero for |t| >= 2)."""
  t = np.abs(t)
  a = _CUBIC_A
  near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
  far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
  return np.where(t < 1.0, near, np.where(t < 2.0, far, 0.0))


def resize_taps(in_size, out_size):
  """TensorFlow's bicubic resize along one axis as 4 taps per output pixel.

  Output pixel `o` samples input position `f = (o + 0.5) * in / out - 0.5`;
  the fraction `f - floor(f)` is rounded to 1/1024 (TensorFlow's kernel
  table) and the four pixels floor(f) - 1 .. floor(f) + 2 are weighted by
  Keys' kernel at their distances; taps outside the image get weight 0 and
  the others are renormalised to sum to 1. (The dense [out, in] matrix of
  these weights is `nfnets.export.preprocess.resize_weights`.)

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    (int64 indices [out_size, 4], clipped into the image; float32 weights
    [out_size, 4]).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  position = (np.arange(out_size, dtype=np.float32) + 0.5) * scale - 0.5
  base = np.floor(position)
  fraction = np.round((position - base) * _TABLE_SIZE) / _TABLE_SIZE
  offsets = np.arange(-1, 3, dtype=np.float32)
  index = (base[:, None] + offsets).astype(np.int64)
  # Distances are multiples of 1/1024 below 4: exact in float32.
  weights = _keys_cubic(offsets - fraction[:, None]).astype(np.float32)
  weights[(index < 0) | (index >= in_size)] = 0.0
  weights /= np.sum(weights, axis=1, keepdims=True)
  return np.clip(index, 0, in_size - 1), weights


def _taps_matrix(taps, in_size):
  """The [out, in] resize matrix of 4-tap `taps`, sparse (4 non-zeros a row).

  A sparse product applies the taps in one compiled pass; NumPy's gathers
  and multiply-adds per tap took twice as long for F0's 192 px crops.
  """
  index, weights = taps
  rows = np.repeat(np.arange(len(index)), index.shape[1])
  shape = (len(index), in_size)
  # Duplicate (clipped) indices carry weight 0; COO -> CSR sums them.
  return scipy.sparse.csr_matrix(
    (weights.ravel(), (rows, index.ravel())), shape
  )


def _taps_rows(taps, image):
  """Applies 4-tap `taps` along axis 0 of float32 [h, w, c]: [o, w, c]."""
  h, w, c = image.shape
  out = _taps_matrix(taps, h) @ image.reshape(h, w * c)
  return out.reshape(-1, w, c)


def _taps_cols(taps, image):
  """Applies 4-tap `taps` along axis 1 of float32 [h, w, c]: [h, o, c]."""
  return _taps_rows(taps, image.transpose(1, 0, 2)).transpose(1, 0, 2)


def resize_bicubic(image, size, crop=None):
  """Bicubic resize of [H, W, C] to size x size, float32, unclamped.

  Args:
    image: uint8 or float image [H, W, C].
    size: output height and width.
    crop: optional (offset, length): keep only these rows and columns of
      the resized image (a centre crop), computed for those pixels alone.

  Returns:
    float32 [size, size, C] (or [length, length, C] with `crop`), like
    `tf.image.resize(..., 'bicubic')` followed by the crop.
  """
  h, w = image.shape[:2]
  if crop is None and (h, w) == (size, size):
    # The identity (the kernel is 1 at 0 and 0 at +-1, +-2).
    return np.asarray(image, np.float32)
  rows, cols = resize_taps(h, size), resize_taps(w, size)
  if crop is not None:
    part = slice(crop[0], crop[0] + crop[1])
    rows = rows[0][part], rows[1][part]
    cols = cols[0][part], cols[1][part]
  image = np.asarray(image, np.float32)
  # Either axis first gives the same image; take the cheaper order.
  if len(rows[0]) * w <= h * len(cols[0]):
    return _taps_cols(cols, _taps_rows(rows, image))
  return _taps_rows(rows, _taps_cols(cols, image))


def _bilinear_taps(in_size, out_size):
  """TensorFlow's half-pixel bilinear taps: (lower, upper, lerp) per output."""
  scale = np.float32(in_size) / np.float32(out_size)
  position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
  position = position - np.float32(0.5)
  floor = np.floor(position)
  lower = np.maximum(floor, 0).astype(np.int64)
  upper = np.minimum(np.ceil(position), in_size - 1).astype(np.int64)
  return lower, upper, (position - floor).astype(np.float32)


def resize_bilinear(images, size):
  """`tf.image.resize(images, [size, size], 'bilinear')` of [..., H, W].

  Args:
    images: float32 [..., H, W] (the last two axes are resized).
    size: output height and width.

  Returns:
    float32 [..., size, size], computed with TensorFlow's operations in
    TensorFlow's order (equal to it bit for bit).
  """
  images = np.asarray(images, np.float32)
  y0, y1, dy = _bilinear_taps(images.shape[-2], size)
  x0, x1, dx = _bilinear_taps(images.shape[-1], size)
  top, bottom = images[..., y0, :], images[..., y1, :]
  top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
  bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
  return top + (bottom - top) * dy[:, None]


def center_crop_box(shape, image_size, padding=CROP_PADDING):
  """The reference's centre box [y, x, h, w]: S/(S+pad) of the short side.

  At least 1 pixel: the reference's box of a 1-pixel-wide image is empty.
  """
  h, w = int(shape[0]), int(shape[1])
  frac = np.float32(image_size / (image_size + padding))
  side = max(1, int(frac * np.float32(min(h, w))))
  return [(h - side + 1) // 2, (w - side + 1) // 2, side, side]


def _random_crop(height, width, aspect, rng):
  """One attempt of TensorFlow's crop sampler: [y, x, h, w] or None."""
  image_area = np.float32(height) * np.float32(width)
  min_area = np.float32(AREA_RANGE[0]) * image_area
  max_area = np.float32(AREA_RANGE[1]) * image_area
  h = int(np.rint(np.sqrt(min_area / aspect)))
  max_h = int(np.rint(np.sqrt(max_area / aspect)))
  if np.rint(max_h * aspect) > width:
    # The largest height whose rounded width still fits.
    max_h = int((width + 0.5 - _EPS) / aspect)
    if np.rint(max_h * aspect) > width:
      max_h -= 1
  max_h = min(max_h, height)
  h = min(h, max_h)
  if h < max_h:
    h += int(rng.integers(0, max_h - h + 1))
  w = int(np.rint(h * aspect))
  if w * h < min_area:  # Rounding undershot: one row more.
    h += 1
    w = int(np.rint(h * aspect))
  if w * h > max_area:  # Rounding overshot: one row less.
    h -= 1
    w = int(np.rint(h * aspect))
  area = w * h
  if not (min_area <= area <= max_area and 0 < w <= width and 0 < h <= height):
    return None
  # As TensorFlow's sampler: offsets in [0, size - crop), so a crop smaller
  # than the image never touches its bottom or right edge.
  y = int(rng.integers(0, height - h)) if h < height else 0
  x = int(rng.integers(0, width - w)) if w < width else 0
  return [y, x, h, w]


def distorted_box(shape, rng, image_size):
  """Samples the Inception-style crop box; falls back to a centre crop.

  Up to `MAX_ATTEMPTS` boxes of aspect ratio ~ U(ASPECT_RATIO_RANGE) and
  area in AREA_RANGE of the image; the first that covers at least
  MIN_OBJECT_COVERED of the image wins. When none does, or the box is the
  whole image, the reference's centre crop is used (`center_crop_box`).

  Args:
    shape: (height, width) of the full image.
    rng: a `np.random.Generator`.
    image_size: output size S, used by the centre-crop fallback.

  Returns:
    [y, x, h, w] ints.
  """
  height, width = int(shape[0]), int(shape[1])
  low, high = ASPECT_RATIO_RANGE
  for _ in range(MAX_ATTEMPTS):
    aspect = np.float32(rng.random() * (high - low) + low)
    box = _random_crop(height, width, aspect, rng)
    if box is None:
      continue
    covered = box[2] * box[3] / np.float32(height * width)
    if covered >= MIN_OBJECT_COVERED:
      if box[2:] == [height, width]:
        break  # tf.data cannot tell this from a failure: it falls back too.
      return box
  return center_crop_box(shape, image_size)


def train_image(image, rng, image_size, mode='inception_crop_flip'):
  """One training image: crop, flip, resize. Float32 [S, S, 3], 0..255.

  Args:
    image: a file path, encoded bytes or uint8 [H, W, 3].
    rng: this example's `np.random.Generator`.
    image_size: output size S.
    mode: 'inception_crop_flip', 'inception_crop' or 'resize'.

  Returns:
    float32 [S, S, 3], unclamped.
  """
  if mode not in TRAIN_PREPROCS:
    raise ValueError(
      f'Unknown train_preproc {mode!r}; valid: {sorted(TRAIN_PREPROCS)}.'
    )
  image = decode(image)
  if mode == 'resize':
    return resize_bicubic(image, image_size)
  flip = rng.random() < 0.5
  y, x, h, w = distorted_box(image.shape[:2], rng, image_size)
  image = image[y : y + h, x : x + w]
  if mode == 'inception_crop_flip' and flip:
    image = image[:, ::-1]
  return resize_bicubic(image, image_size)


def eval_image(image, image_size, mode='resize_crop_32'):
  """One evaluation image, as `preprocess.eval_preprocess`. Float32, 0..255.

  Args:
    image: a file path, encoded bytes or uint8 [H, W, 3].
    image_size: output size S.
    mode: 'resize_crop_32', 'crop_resize' or 'resize'.

  Returns:
    float32 [S, S, 3], unclamped.
  """
  image = decode(image)
  if mode == 'resize_crop_32':
    crop = (CROP_PADDING // 2, image_size)
    return resize_bicubic(image, image_size + CROP_PADDING, crop)
  if mode == 'crop_resize':
    y, x, h, w = center_crop_box(image.shape[:2], image_size)
    return resize_bicubic(image[y : y + h, x : x + w], image_size)
  if mode == 'resize':
    return resize_bicubic(image, image_size)
  raise ValueError(
    f'Unknown eval_preproc {mode!r}; valid: {sorted(EVAL_PREPROCS)}.'
  )
