"""RandAugment in JAX: the host ops of `augment.py`, on the accelerator.

Each op maps one uint8 [H, W, 3] image to uint8 [H, W, 3] and matches its
TF counterpart in `augment.py` (same magnitudes, same quirks switch, same
rounding where TF's is known), so a run gives the same recipe whichever
side augments. The op of each layer is chosen with `lax.switch` (no Python
control flow on traced values, so it jits and shards like the rest of the
step). `randaugment_batch` runs the examples one of two ways, with one key
each and the same result: `vmap`, under which `lax.switch` computes all 16
ops for every example and selects (wide parallel work, what a GPU or TPU
wants), or `lax.map`, a loop over the examples in which `lax.switch` runs
only the chosen op. 'auto' picks `lax.map` on the CPU: on 2 idle cores
both take 12-18 ms at batch 32 and 192 px, but with the cores shared the
loop stays cheap (8.4 ms at batch 8) where the selected form did not (270
ms).
"""

import math

import jax
import jax.numpy as jnp

from nfnets.data import recipe

# The ops in the reference's order (`recipe.RANDAUGMENT_OP_NAMES`), so an
# op index means the same op on both sides.
OP_NAMES = recipe.RANDAUGMENT_OP_NAMES
# TF's rgb_to_grayscale weights.
_GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def _f32(x):
  return x.astype(jnp.float32)


def _to_uint8(x):
  # Truncating cast after clipping, as the host's blend does.
  return jnp.clip(x, 0.0, 255.0).astype(jnp.uint8)


def blend(degenerate, image, factor):
  """degenerate + factor * (image - degenerate), clipped to uint8."""
  d = _f32(degenerate)
  return _to_uint8(d + factor * (_f32(image) - d))


def grey(image):
  """TF's rgb_to_grayscale: weights on [0, 1] values, x 255.5, truncated."""
  x = _f32(image) * (1.0 / 255.0)
  g = jnp.tensordot(x, jnp.asarray(_GREY_WEIGHTS, jnp.float32), [[-1], [0]])
  return (g * 255.5).astype(jnp.uint8)[..., None]


def autocontrast(image):
  """Stretches each channel's [min, max] to [0, 255] (flat ones kept)."""
  x = _f32(image)
  lo = x.min(axis=(0, 1))
  hi = x.max(axis=(0, 1))
  scale = jnp.where(hi > lo, 255.0 / jnp.maximum(hi - lo, 1.0), 1.0)
  offset = jnp.where(hi > lo, -lo * scale, 0.0)
  return _to_uint8(x * scale + offset)


def _equalize_channel(channel):
  channel = channel.astype(jnp.int32)
  hist = jnp.zeros(256, jnp.int32).at[channel.ravel()].add(1)
  # Sum of the non-zero bins minus the last non-zero one (the brightest
  # value present), as PIL computes its step.
  step = (channel.size - hist[channel.max()]) // 255
  safe = jnp.maximum(step, 1)
  lut = (jnp.cumsum(hist) + safe // 2) // safe
  lut = jnp.clip(jnp.concatenate([jnp.zeros(1, jnp.int32), lut[:-1]]), 0, 255)
  return jnp.where(step == 0, channel, lut[channel])


def equalize(image):
  """Histogram equalisation per channel (PIL's ImageOps.equalize)."""
  channels = [_equalize_channel(image[..., c]) for c in range(3)]
  return jnp.stack(channels, -1).astype(jnp.uint8)


def invert(image):
  """255 - image."""
  return 255 - image


def posterize(image, bits):
  """Keeps the `bits` (a Python int) most significant bits of each value."""
  shift = 8 - int(bits)
  if shift >= 8:
    return jnp.zeros_like(image)
  return ((image >> shift) << shift).astype(jnp.uint8)


def solarize(image, threshold):
  """Inverts the values >= threshold."""
  x = image.astype(jnp.int32)
  return jnp.where(x < threshold, x, 255 - x).astype(jnp.uint8)


def solarize_add(image, addition, threshold=recipe.SOLARIZE_ADD_THRESHOLD):
  """Adds `addition` (clipped to 255) to the values < threshold."""
  x = image.astype(jnp.int32)
  added = jnp.clip(x + addition, 0, 255)
  return jnp.where(x < threshold, added, x).astype(jnp.uint8)


def color(image, factor):
  """Blends with the greyscale image (0 = grey, 1 = unchanged)."""
  return blend(jnp.broadcast_to(grey(image), image.shape), image, factor)


def contrast(image, factor, quirks=True):
  """Blends with a flat grey image (0 = flat, 1 = unchanged)."""
  g = grey(image)
  if quirks:
    mean = jnp.float32(g.size / 256.0)
  else:
    mean = jnp.round(jnp.mean(_f32(g)))
  flat = jnp.full(image.shape, jnp.clip(mean, 0.0, 255.0)).astype(jnp.uint8)
  return blend(flat, image, factor)


def brightness(image, factor):
  """Blends with black (0 = black, 1 = unchanged)."""
  return blend(jnp.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blends with a 3x3-smoothed image whose 1-pixel border is the original."""
  kernel = jnp.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13.0
  x = _f32(image)
  h, w = image.shape[:2]
  # A VALID 3x3 correlation, as nine shifted sums (the kernel is symmetric).
  smooth = sum(
    kernel[i, j] * x[i : h - 2 + i, j : w - 2 + j]
    for i in range(3)
    for j in range(3)
  )
  smooth = jnp.pad(_to_uint8(smooth), ((1, 1), (1, 1), (0, 0)))
  ys = jnp.arange(h)[:, None]
  xs = jnp.arange(w)[None, :]
  interior = (ys > 0) & (ys < h - 1) & (xs > 0) & (xs < w - 1)
  degenerate = jnp.where(interior[..., None], smooth, image)
  return blend(degenerate, image, factor)


def _round_half_away(x):
  # C's std::round, which TF's nearest-neighbour transform uses.
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def transform(image, matrix, replace=recipe.REPLACE):
  """Projective transform (output -> input coordinates), nearest, grey fill.

  Args:
    image: uint8 [H, W, 3].
    matrix: 8 floats [a0, a1, a2, b0, b1, b2, c0, c1]; output pixel (x, y)
      reads input (a0 x + a1 y + a2, b0 x + b1 y + b2) / (c0 x + c1 y + 1).
    replace: value for pixels that fall outside the input.

  Returns:
    uint8 [H, W, 3].
  """
  a0, a1, a2, b0, b1, b2, c0, c1 = (matrix[i] for i in range(8))
  h, w = image.shape[:2]
  ys = jnp.arange(h, dtype=jnp.float32)[:, None]
  xs = jnp.arange(w, dtype=jnp.float32)[None, :]
  proj = c0 * xs + c1 * ys + 1.0
  in_x = _round_half_away((a0 * xs + a1 * ys + a2) / proj)
  in_y = _round_half_away((b0 * xs + b1 * ys + b2) / proj)
  inside = (in_x >= 0) & (in_x < w) & (in_y >= 0) & (in_y < h)
  yi = jnp.clip(in_y, 0, h - 1).astype(jnp.int32)
  xi = jnp.clip(in_x, 0, w - 1).astype(jnp.int32)
  out = image[yi, xi]
  return jnp.where(inside[..., None], out, jnp.uint8(replace))


def rotate(image, degrees, replace=recipe.REPLACE):
  """Rotates counter-clockwise by `degrees` about the image centre."""
  theta = jnp.float32(degrees) * (math.pi / 180.0)
  h, w = float(image.shape[0] - 1), float(image.shape[1] - 1)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  x_off = (w - (cos * w - sin * h)) / 2.0
  y_off = (h - (sin * w + cos * h)) / 2.0
  zero = jnp.float32(0.0)
  return transform(
    image, jnp.stack([cos, -sin, x_off, sin, cos, y_off, zero, zero]), replace
  )


def _affine(a1=0.0, a2=0.0, b0=0.0, b2=0.0):
  one, zero = jnp.float32(1.0), jnp.float32(0.0)
  parts = (one, a1, a2, b0, one, b2, zero, zero)
  return jnp.stack([jnp.asarray(p, jnp.float32) for p in parts])


def shear_x(image, level, replace=recipe.REPLACE):
  """Output (x, y) reads input (x + level * y, y)."""
  return transform(image, _affine(a1=level), replace)


def shear_y(image, level, replace=recipe.REPLACE):
  """Output (x, y) reads input (x, y + level * x)."""
  return transform(image, _affine(b0=level), replace)


def translate_x(image, pixels, replace=recipe.REPLACE):
  """Shifts the content right by `pixels` (left if negative)."""
  return transform(image, _affine(a2=-pixels), replace)


def translate_y(image, pixels, replace=recipe.REPLACE):
  """Shifts the content down by `pixels` (up if negative)."""
  return transform(image, _affine(b2=-pixels), replace)


def cutout_at(image, cy, cx, pad_size, replace=recipe.REPLACE):
  """Greys the (2 pad_size)^2 square (clipped) centred at (cy, cx)."""
  h, w = image.shape[:2]
  ys = jnp.arange(h)[:, None]
  xs = jnp.arange(w)[None, :]
  inside = (
    (ys >= cy - pad_size)
    & (ys < cy + pad_size)
    & (xs >= cx - pad_size)
    & (xs < cx + pad_size)
  )
  return jnp.where(inside[..., None], jnp.uint8(replace), image)


def cutout(image, pad_size, key, replace=recipe.REPLACE):
  """Greys a (2 pad_size)^2 square (clipped) at a random centre."""
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, image.shape[0])
  cx = jax.random.randint(kx, (), 0, image.shape[1])
  return cutout_at(image, cy, cx, pad_size, replace)


def signed(value, key):
  """value with a random sign (the reference's _randomly_negate_tensor)."""
  coin = jax.random.uniform(key) < 0.5
  return jnp.where(coin, -jnp.float32(value), jnp.float32(value))


def enhance_factor(magnitude, key, quirks=True):
  """Enhance-op factor: the reference's M/10*1.8+0.1, or 1 +- M/10*0.9."""
  if quirks:
    return jnp.float32(magnitude / recipe.MAX_LEVEL * 1.8 + 0.1)
  return 1.0 + signed(magnitude / recipe.MAX_LEVEL * 0.9, key)


def op_branches(magnitude, quirks=True):
  """The 16 ops as `fn(image, key) -> image`, in `OP_NAMES` order."""
  m = magnitude / recipe.MAX_LEVEL

  def enhance(fn):
    return lambda x, k: fn(x, enhance_factor(magnitude, k, quirks))

  fns = {
    'AutoContrast': lambda x, k: autocontrast(x),
    'Equalize': lambda x, k: equalize(x),
    'Invert': lambda x, k: invert(x),
    'Rotate': lambda x, k: rotate(x, signed(m * 30.0, k)),
    'Posterize': lambda x, k: posterize(x, int(m * 4)),
    'Solarize': lambda x, k: solarize(
      x, recipe.solarize_threshold(magnitude, quirks)
    ),
    'Color': enhance(color),
    'Contrast': enhance(lambda x, f: contrast(x, f, quirks)),
    'Brightness': enhance(brightness),
    'Sharpness': enhance(sharpness),
    'ShearX': lambda x, k: shear_x(x, signed(m * 0.3, k)),
    'ShearY': lambda x, k: shear_y(x, signed(m * 0.3, k)),
    'TranslateX': lambda x, k: translate_x(
      x, signed(m * recipe.TRANSLATE_CONST, k)
    ),
    'TranslateY': lambda x, k: translate_y(
      x, signed(m * recipe.TRANSLATE_CONST, k)
    ),
    'Cutout': lambda x, k: cutout(x, int(m * recipe.CUTOUT_CONST), k),
    'SolarizeAdd': lambda x, k: solarize_add(x, int(m * 110)),
  }
  return [fns[name] for name in OP_NAMES]


def randaugment(image, key, num_layers, magnitude, quirks=True):
  """Applies `num_layers` uniformly drawn ops at `magnitude` to one image.

  Args:
    image: uint8 [H, W, 3].
    key: this example's PRNG key.
    num_layers: ops applied in sequence (a Python int).
    magnitude: the shared magnitude M (a Python number).
    quirks: reproduce the reference's quirks (see `augment.py`).

  Returns:
    uint8 [H, W, 3].
  """
  if num_layers <= 0:
    return image
  branches = op_branches(magnitude, quirks)

  def layer(image, layer_key):
    op_key, arg_key = jax.random.split(layer_key)
    index = jax.random.randint(op_key, (), 0, len(branches))
    return jax.lax.switch(index, branches, image, arg_key), None

  # A scan traces the 16 ops once, not once per layer (compile time).
  image, _ = jax.lax.scan(layer, image, jax.random.split(key, num_layers))
  return image


BATCH_STRATEGIES = ('auto', 'vmap', 'map')


def randaugment_batch(
  images, key, num_layers, magnitude, quirks=True, strategy='auto'
):
  """RandAugment per example of a uint8 [N, H, W, 3] batch, one key each.

  Args:
    images: uint8 [N, H, W, 3].
    key: the batch's PRNG key (split into one key per example).
    num_layers: ops applied to each image in sequence.
    magnitude: the shared magnitude M.
    quirks: reproduce the reference's quirks (see `augment.py`).
    strategy: 'vmap' (all ops computed, one selected: parallel work),
      'map' (a loop over examples running only the chosen ops), or 'auto'
      ('map' on the CPU, else 'vmap'). Results are identical.

  Returns:
    uint8 [N, H, W, 3].
  """
  if images.dtype != jnp.uint8:
    raise ValueError(f'randaugment needs uint8 images, got {images.dtype}.')
  if strategy not in BATCH_STRATEGIES:
    raise ValueError(
      f'Unknown RandAugment batch strategy {strategy!r}; valid: '
      f'{list(BATCH_STRATEGIES)}.'
    )
  if num_layers <= 0:
    return images
  if strategy == 'auto':
    strategy = 'map' if jax.default_backend() == 'cpu' else 'vmap'
  keys = jax.random.split(key, images.shape[0])
  one = lambda x, k: randaugment(x, k, num_layers, magnitude, quirks)  # noqa: E731
  if strategy == 'map':
    return jax.lax.map(lambda args: one(*args), (images, keys))
  return jax.vmap(one)(images, keys)
