"""The evaluation preprocessing in JAX, for exported serving programs.

`eval_preprocess` takes a batch of uint8 images [N, H, W, 3] of any size and
returns the model input: the host pipeline's deterministic eval transform
(`nfnets.data.preprocess.eval_preprocess`: `tf.image.resize`'s bicubic
resize, then a centre crop) followed by the ImageNet normalisation, to
float32 rounding.

The resize is two dense matrix products whose weights are computed from
iotas (`resize_weights` reproduces TensorFlow's `ResizeBicubic`, whose
kernel table rounds sampling positions to 1/1024 pixel; `jax.image.resize`
does not round and differs from it by up to 0.15 grey levels). Built this
way the program has no gathers, which TFLite's converter cannot lower when
H and W are symbolic, so one exported program serves every image size.
"""

import jax
import jax.numpy as jnp

from nfnets.pretrained.inference import CROP_PADDING, MEAN_RGB, STDDEV_RGB

# The eval transforms that are pure resizes (and crops of a fixed margin):
# 'resize_crop_32' (the NFNet reference's) and 'resize' (the digits').
EVAL_MODES = ('resize_crop_32', 'resize')

# Keys' cubic convolution with a = -0.5, the kernel of TensorFlow's and
# JAX's 'bicubic'.
_CUBIC_A = -0.5
# TensorFlow's ResizeBicubic rounds sampling positions to 1/1024 pixel.
_TABLE_SIZE = 1024


def _keys_cubic(t: jax.Array) -> jax.Array:
  """Keys' cubic kernel at distances `t` (zero for |t| >= 2)."""
  t = jnp.abs(t)
  a = _CUBIC_A
  near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
  far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
  return jnp.where(t < 1.0, near, jnp.where(t < 2.0, far, 0.0))


def resize_weights(in_size, out_size: int) -> jax.Array:
  """The [out, in] matrix of TensorFlow's bicubic resize along one axis.

  `tf.image.resize(..., 'bicubic')` (the `ResizeBicubic` op with half-pixel
  centres) maps output pixel `o` to input position
  `f = (o + 0.5) * in / out - 0.5`, rounds the fraction `f - floor(f)` to
  1/1024 (its table of kernel values) and weights the four pixels around
  `f` by Keys' kernel at their distances; taps outside the image get weight
  0 and the others are renormalised to sum to 1.

  Args:
    in_size: input length (an int or a symbolic dimension).
    out_size: output length.

  Returns:
    float32 [out_size, in_size].
  """
  scale = jnp.asarray(in_size, jnp.float32) / jnp.float32(out_size)
  position = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5
  base = jnp.floor(position)
  fraction = jnp.round((position - base) * _TABLE_SIZE) / _TABLE_SIZE
  pixels = jnp.arange(in_size, dtype=jnp.float32)
  # Distances are multiples of 1/1024 below 4: exact in float32.
  distance = pixels[None, :] - base[:, None] - fraction[:, None]
  weights = _keys_cubic(distance)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def resize_bicubic(
  images: jax.Array, size: int, crop: tuple[int, int] | None = None
) -> jax.Array:
  """Bicubic resize of float [N, H, W, C] to size x size (unclamped).

  Args:
    images: float32 images; N, H and W may be symbolic.
    size: output height and width.
    crop: optional (offset, length): keep only these rows and columns of
      the resized image (a centre crop), computed as a smaller product.

  Returns:
    float32 [N, size, size, C] (or [N, length, length, C] with `crop`),
    like `tf.image.resize(..., 'bicubic')` followed by the crop.
  """
  rows = resize_weights(images.shape[1], size)
  cols = resize_weights(images.shape[2], size)
  if crop is not None:
    # lax.slice on the static axis: a NumPy-style slice of an array with
    # symbolic dimensions lowers to a gather TFLite cannot convert.
    offset, length = crop
    rows = jax.lax.slice_in_dim(rows, offset, offset + length, axis=0)
    cols = jax.lax.slice_in_dim(cols, offset, offset + length, axis=0)
  out = jnp.einsum('oh,nhwc->nowc', rows, images, precision='highest')
  return jnp.einsum('pw,nowc->nopc', cols, out, precision='highest')


def normalize(images: jax.Array) -> jax.Array:
  """Maps 0..255 float images to zero mean and unit variance per channel."""
  mean = jnp.asarray(MEAN_RGB, images.dtype)
  std = jnp.asarray(STDDEV_RGB, images.dtype)
  return (images - mean) / std


def check_eval_mode(mode: str) -> None:
  """Raises a ValueError for an eval transform not in `EVAL_MODES`."""
  if mode not in EVAL_MODES:
    raise ValueError(
      f'Eval preprocessing {mode!r} cannot be exported; exported programs '
      f'support {list(EVAL_MODES)} (export with preprocess none instead).'
    )


def eval_preprocess(
  images: jax.Array, image_size: int, mode: str = 'resize_crop_32'
) -> jax.Array:
  """uint8 images [N, H, W, 3] -> normalised float32 [N, S, S, 3].

  Args:
    images: a batch of uint8 RGB images of one size (H and W may be
      symbolic in an exported program).
    image_size: the model's input size S.
    mode: 'resize_crop_32' (resize to (S+32)^2 ignoring the aspect ratio,
      centre crop S: the reference's) or 'resize' (resize to S).

  Returns:
    The model input, as the host eval pipeline computes it.

  Raises:
    ValueError: for another mode.
  """
  check_eval_mode(mode)
  x = images.astype(jnp.float32)
  if mode == 'resize':
    return normalize(resize_bicubic(x, image_size))
  crop = (CROP_PADDING // 2, image_size)
  return normalize(resize_bicubic(x, image_size + CROP_PADDING, crop))
