"""Per-image decoding, cropping, resizing and normalisation (the reference's).

Training: an Inception-style distorted-box crop fused with JPEG decoding, a
random horizontal flip and a bicubic resize, with values left unclamped (they
can overshoot [0, 255] a little, as in DeepMind's code). Evaluation:
'resize_crop_32' (resize to S+32 square, ignoring aspect ratio, then a centre
crop of S) or 'crop_resize' (an aspect-preserving centre crop of S/(S+32) of
the shorter side, then resize to S). All randomness is stateless, seeded per
example, so a pipeline with a fixed seed is reproducible.

Images arrive either as encoded bytes (a scalar tf.string) or as decoded
uint8 [H, W, 3]; outputs are float32 [S, S, 3] in the 0..255 range.
"""

import tensorflow as tf

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


def normalize(images):
  """Maps 0..255 float images to zero mean, unit variance per channel."""
  mean = tf.constant(MEAN_RGB, images.dtype)
  std = tf.constant(STDDEV_RGB, images.dtype)
  return (images - mean) / std


def _is_encoded(image):
  return image.dtype == tf.string


def image_shape(image):
  """Returns [height, width] (int32) of encoded bytes or a decoded image."""
  if not _is_encoded(image):
    return tf.shape(image)[:2]
  return tf.cond(
    tf.io.is_jpeg(image),
    lambda: tf.image.extract_jpeg_shape(image)[:2],
    lambda: tf.shape(_decode_full(image))[:2],
  )


def _decode_full(image_bytes):
  # decode_image handles PNG/GIF/BMP and greyscale; channels=3 forces RGB.
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_and_crop(image, box):
  """Decodes (if encoded) and crops `box` = [y, x, h, w] to uint8.

  A JPEG is decoded only inside the box (fused `decode_and_crop_jpeg`,
  the fast path the reference uses); other formats are decoded whole first.
  """
  y, x, h, w = box[0], box[1], box[2], box[3]
  if not _is_encoded(image):
    return image[y : y + h, x : x + w]

  def jpeg():
    out = tf.image.decode_and_crop_jpeg(image, tf.stack(box), channels=3)
    out.set_shape([None, None, 3])
    return out

  def other():
    return _decode_full(image)[y : y + h, x : x + w]

  return tf.cond(tf.io.is_jpeg(image), jpeg, other)


def decode(image):
  """Decodes encoded bytes to uint8 [H, W, 3]; passes arrays through."""
  if not _is_encoded(image):
    return image
  return _decode_full(image)


def center_crop_box(shape, image_size, padding=CROP_PADDING):
  """Returns the reference's centre box: S/(S+padding) of the shorter side.

  At least 1 pixel: the reference's box of a 1-pixel-wide image is empty.
  """
  h, w = shape[0], shape[1]
  frac = image_size / (image_size + padding)
  side = tf.cast(frac * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  return [(h - side + 1) // 2, (w - side + 1) // 2, side, side]


def distorted_box(shape, seed, image_size):
  """Samples the Inception-style crop box; falls back to a centre crop.

  Args:
    shape: [height, width] of the full image.
    seed: stateless seed, int32/int64 [2].
    image_size: output size S, used by the centre-crop fallback.

  Returns:
    [y, x, h, w] int32 scalars.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.concat([shape, [3]], 0),
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
    seed=seed,
    min_object_covered=MIN_OBJECT_COVERED,
    aspect_ratio_range=ASPECT_RATIO_RANGE,
    area_range=AREA_RANGE,
    max_attempts=MAX_ATTEMPTS,
    use_image_if_no_bounding_boxes=True,
  )
  # After 10 failed attempts the op returns the whole image; the reference
  # then uses its eval centre crop instead.
  failed = tf.reduce_all(tf.equal(size[:2], shape))
  fallback = tf.stack(center_crop_box(shape, image_size))
  sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
  box = tf.where(failed, fallback, sampled)
  return [box[0], box[1], box[2], box[3]]


def resize(image, image_size):
  """Bicubic resize to S x S in float32, not clamped (the reference's)."""
  image = tf.cast(image, tf.float32)
  static = image.shape[:2]
  if static[0] == image_size and static[1] == image_size:
    return image  # Already the right size (e.g. the upscaled digits).
  return tf.image.resize(image, [image_size, image_size], method='bicubic')


def train_preprocess(image, seed, image_size, mode='inception_crop_flip'):
  """One training image: crop, flip, resize. Float32 [S, S, 3], 0..255.

  Args:
    image: encoded bytes or uint8 [H, W, 3].
    seed: stateless seed [2] for this example.
    image_size: output size S.
    mode: 'inception_crop_flip', 'inception_crop' or 'resize'.

  Returns:
    float32 [S, S, 3], unclamped.
  """
  if mode not in TRAIN_PREPROCS:
    raise ValueError(
      f'Unknown train_preproc {mode!r}; valid: {sorted(TRAIN_PREPROCS)}.'
    )
  crop_seed, flip_seed = tf.unstack(
    tf.random.experimental.stateless_split(seed, 2)
  )
  if mode == 'resize':
    return resize(decode(image), image_size)
  box = distorted_box(image_shape(image), crop_seed, image_size)
  image = decode_and_crop(image, box)
  if mode == 'inception_crop_flip':
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return resize(image, image_size)


def eval_preprocess(image, image_size, mode='resize_crop_32'):
  """One evaluation image, deterministic. Float32 [S, S, 3], 0..255.

  Args:
    image: encoded bytes or uint8 [H, W, 3].
    image_size: output size S.
    mode: 'resize_crop_32' (resize to (S+32)^2 ignoring aspect, centre crop
      S; the NFNet reference), 'crop_resize' (aspect-preserving centre crop
      of S/(S+32) of the short side, then resize) or 'resize' (resize to S).

  Returns:
    float32 [S, S, 3], unclamped.
  """
  if mode == 'resize_crop_32':
    big = resize(decode(image), image_size + CROP_PADDING)
    off = CROP_PADDING // 2
    return big[off : off + image_size, off : off + image_size]
  if mode == 'crop_resize':
    box = center_crop_box(image_shape(image), image_size)
    return resize(decode_and_crop(image, box), image_size)
  if mode == 'resize':
    return resize(decode(image), image_size)
  raise ValueError(
    f'Unknown eval_preproc {mode!r}; valid: {sorted(EVAL_PREPROCS)}.'
  )
