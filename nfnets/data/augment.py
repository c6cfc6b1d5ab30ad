"""RandAugment with the reference's 16 ops and magnitude mapping.

DeepMind's NFNets use the TPU EfficientNet RandAugment: each of `num_layers`
layers picks one of 16 ops uniformly and always applies it at magnitude M
(on uint8 images, out-of-image pixels filled with grey 128). The level string
'405' means 4 layers at magnitude 5.

The reference has three quirks. With `quirks=True` (the default, for
fidelity) they are reproduced; `quirks=False` gives the evident intent:

- Color, Contrast, Brightness, Sharpness factor. quirks=True: the reference's
  M/10*1.8+0.1, which is exactly 1 (an identity) at M=5. quirks=False:
  1 +- M/10*0.9 with a random sign (0.55 or 1.45 at M=5).
- Solarize threshold. quirks=True: int(M/10*256) wrapped mod 256, which is
  what TF does with the reference's `uint8_image < 256` (measured on TF 2.21:
  256 -> 0 inverts every pixel at M=10, 384 -> 128 at M=15). quirks=False:
  256 - int(M/10*256) clamped to [0, 256], so it gets stronger with M.
- Contrast grey level. quirks=True: pixel count / 256 (the reference sums
  the histogram instead of weighting it by the bin values). quirks=False:
  the rounded mean of the greyscale image, as PIL's ImageEnhance.Contrast.

At M=5 (F0) both settings give the same Solarize (threshold 128).
"""

import functools
import math

import tensorflow as tf

from nfnets.data.recipe import (
  CUTOUT_CONST,
  MAX_LEVEL,
  REPLACE,
  SOLARIZE_ADD_THRESHOLD,
  TRANSLATE_CONST,
  solarize_threshold,
)


def _f32(x):
  return tf.cast(x, tf.float32)


def _to_uint8(x):
  # Truncating cast after clipping, as the reference's blend does.
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def blend(degenerate, image, factor):
  """degenerate + factor * (image - degenerate), clipped to uint8."""
  d = _f32(degenerate)
  return _to_uint8(d + factor * (_f32(image) - d))


def _grey(image):
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


# ---------------------------------------------------------------- the ops.


def autocontrast(image):
  """Stretches each channel's [min, max] to [0, 255] (flat ones kept)."""
  x = _f32(image)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return _to_uint8(x * scale + offset)


def _equalize_channel(channel):
  channel = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(channel, minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  safe = tf.maximum(step, 1)
  lut = (tf.cumsum(hist) + safe // 2) // safe
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.where(step == 0, channel, tf.gather(lut, channel))


def equalize(image):
  """Histogram equalisation per channel (PIL's ImageOps.equalize)."""
  channels = [_equalize_channel(image[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, -1), tf.uint8)


def invert(image):
  """255 - image."""
  return 255 - image


def posterize(image, bits):
  """Keeps the `bits` most significant bits of each value."""
  shift = 8 - int(bits)
  if shift >= 8:
    return tf.zeros_like(image)
  x = tf.cast(image, tf.int32)
  return tf.cast(
    tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8
  )


def solarize(image, threshold):
  """Inverts the values >= threshold."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, x, 255 - x), tf.uint8)


def solarize_add(image, addition, threshold=SOLARIZE_ADD_THRESHOLD):
  """Adds `addition` (clipped to 255) to the values < threshold."""
  x = tf.cast(image, tf.int32)
  added = tf.clip_by_value(x + addition, 0, 255)
  return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def color(image, factor):
  """Blends with the greyscale image (0 = grey, 1 = unchanged)."""
  return blend(_grey(image), image, factor)


def contrast(image, factor, quirks=True):
  """Blends with a flat grey image (0 = flat, 1 = unchanged)."""
  grey = tf.image.rgb_to_grayscale(image)
  if quirks:
    mean = _f32(tf.size(grey)) / 256.0
  else:
    mean = tf.round(tf.reduce_mean(_f32(grey)))
  flat = tf.fill(tf.shape(image), tf.clip_by_value(mean, 0.0, 255.0))
  return blend(tf.cast(flat, tf.uint8), image, factor)


def brightness(image, factor):
  """Blends with black (0 = black, 1 = unchanged)."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blends with a 3x3-smoothed image whose 1-pixel border is the original."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(
    _f32(image)[None], kernel, [1, 1, 1, 1], 'VALID'
  )[0]
  smooth = tf.pad(_to_uint8(smooth), [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  ys = tf.range(h)[:, None]
  xs = tf.range(w)[None, :]
  interior = (ys > 0) & (ys < h - 1) & (xs > 0) & (xs < w - 1)
  degenerate = tf.where(interior[..., None], smooth, image)
  return blend(degenerate, image, factor)


def transform(image, matrix, replace=REPLACE):
  """Projective transform (output -> input coordinates), nearest, grey fill.

  Args:
    image: uint8 [H, W, 3].
    matrix: 8 floats [a0, a1, a2, b0, b1, b2, c0, c1]; output pixel (x, y)
      reads input (a0 x + a1 y + a2, b0 x + b1 y + b2) / (c0 x + c1 y + 1).
    replace: value for pixels that fall outside the input.

  Returns:
    uint8 [H, W, 3].
  """
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=tf.reshape(tf.cast(matrix, tf.float32), [1, 8]),
    output_shape=tf.shape(image)[:2],
    fill_value=tf.constant(replace, tf.float32),
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )
  return out[0]


def rotate(image, degrees, replace=REPLACE):
  """Rotates counter-clockwise by `degrees` about the image centre."""
  theta = _f32(degrees) * math.pi / 180.0
  h, w = _f32(tf.shape(image)[0]) - 1.0, _f32(tf.shape(image)[1]) - 1.0
  cos, sin = tf.cos(theta), tf.sin(theta)
  x_off = (w - (cos * w - sin * h)) / 2.0
  y_off = (h - (sin * w + cos * h)) / 2.0
  return transform(
    image, tf.stack([cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0]), replace
  )


def shear_x(image, level, replace=REPLACE):
  """Output (x, y) reads input (x + level * y, y)."""
  return transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], replace)


def shear_y(image, level, replace=REPLACE):
  """Output (x, y) reads input (x, y + level * x)."""
  return transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0], replace)


def translate_x(image, pixels, replace=REPLACE):
  """Shifts the content right by `pixels` (left if negative)."""
  return transform(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0], replace)


def translate_y(image, pixels, replace=REPLACE):
  """Shifts the content down by `pixels` (up if negative)."""
  return transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0], replace)


def cutout(image, pad_size, seed, replace=REPLACE):
  """Greys a (2 pad_size)^2 square (clipped) at a random centre."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  cy = tf.random.stateless_uniform([], s1, 0, h, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], s2, 0, w, dtype=tf.int32)
  ys = tf.range(h)[:, None]
  xs = tf.range(w)[None, :]
  inside = (
    (ys >= cy - pad_size)
    & (ys < cy + pad_size)
    & (xs >= cx - pad_size)
    & (xs < cx + pad_size)
  )
  return tf.where(inside[..., None], tf.cast(replace, image.dtype), image)


# ------------------------------------------- magnitude -> argument mapping.


def _signed(value, seed):
  """value with a random sign (the reference's _randomly_negate_tensor)."""
  coin = tf.random.stateless_uniform([], seed) < 0.5
  return tf.where(coin, -_f32(value), _f32(value))


def enhance_factor(magnitude, seed, quirks=True):
  """Enhance-op factor: the reference's M/10*1.8+0.1, or 1 +- M/10*0.9."""
  if quirks:
    return magnitude / MAX_LEVEL * 1.8 + 0.1
  return 1.0 + _signed(magnitude / MAX_LEVEL * 0.9, seed)


RANDAUGMENT_OPS = {
  'AutoContrast': lambda x, m, s, q: autocontrast(x),
  'Equalize': lambda x, m, s, q: equalize(x),
  'Invert': lambda x, m, s, q: invert(x),
  'Rotate': lambda x, m, s, q: rotate(x, _signed(m / MAX_LEVEL * 30.0, s)),
  'Posterize': lambda x, m, s, q: posterize(x, int(m / MAX_LEVEL * 4)),
  'Solarize': lambda x, m, s, q: solarize(x, solarize_threshold(m, q)),
  'Color': lambda x, m, s, q: color(x, enhance_factor(m, s, q)),
  'Contrast': lambda x, m, s, q: contrast(x, enhance_factor(m, s, q), q),
  'Brightness': lambda x, m, s, q: brightness(x, enhance_factor(m, s, q)),
  'Sharpness': lambda x, m, s, q: sharpness(x, enhance_factor(m, s, q)),
  'ShearX': lambda x, m, s, q: shear_x(x, _signed(m / MAX_LEVEL * 0.3, s)),
  'ShearY': lambda x, m, s, q: shear_y(x, _signed(m / MAX_LEVEL * 0.3, s)),
  'TranslateX': lambda x, m, s, q: translate_x(
    x, _signed(m / MAX_LEVEL * TRANSLATE_CONST, s)
  ),
  'TranslateY': lambda x, m, s, q: translate_y(
    x, _signed(m / MAX_LEVEL * TRANSLATE_CONST, s)
  ),
  'Cutout': lambda x, m, s, q: cutout(x, int(m / MAX_LEVEL * CUTOUT_CONST), s),
  'SolarizeAdd': lambda x, m, s, q: solarize_add(x, int(m / MAX_LEVEL * 110)),
}
"""The reference's 16 ops: name -> fn(image, magnitude, seed, quirks)."""


def apply_op(name, image, magnitude, seed, quirks=True):
  """Applies one named RandAugment op at `magnitude` to a uint8 image."""
  if name not in RANDAUGMENT_OPS:
    raise ValueError(
      f'Unknown RandAugment op {name!r}; valid: {list(RANDAUGMENT_OPS)}.'
    )
  return RANDAUGMENT_OPS[name](image, magnitude, seed, quirks)


def randaugment(image, seed, num_layers, magnitude, quirks=True):
  """Applies `num_layers` uniformly drawn ops at `magnitude`.

  Args:
    image: uint8 [H, W, 3].
    seed: stateless seed [2].
    num_layers: ops applied in sequence.
    magnitude: the shared magnitude M (0..30; 10 is the nominal maximum).
    quirks: reproduce the reference's quirks (see the module docstring).

  Returns:
    uint8 [H, W, 3].
  """
  if image.dtype != tf.uint8:
    raise ValueError(f'randaugment needs a uint8 image, got {image.dtype}.')
  if num_layers <= 0:
    return image
  fns = list(RANDAUGMENT_OPS.values())
  seeds = tf.random.experimental.stateless_split(seed, num_layers)

  def layer(i, image):
    op_seed, arg_seed = tf.unstack(
      tf.random.experimental.stateless_split(seeds[i], 2)
    )
    index = tf.random.stateless_uniform(
      [], op_seed, 0, len(fns), dtype=tf.int32
    )
    branches = [
      functools.partial(fn, image, magnitude, arg_seed, quirks) for fn in fns
    ]
    out = tf.switch_case(index, branches)
    out.set_shape(image.shape)
    return i + 1, out

  # A loop traces the 16 branches once, not once per layer (graph build
  # time dominates pipeline start-up otherwise).
  _, image = tf.while_loop(
    lambda i, _: i < num_layers,
    layer,
    (tf.constant(0), image),
    maximum_iterations=num_layers,
  )
  return image
