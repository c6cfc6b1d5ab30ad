"""A dense convolution whose gradients stay fast on XLA:CPU.

`conv2d_im2col_grad` is `lax.conv_general_dilated` (NHWC/HWIO) with a
custom VJP: the kernel gradient is one im2col matmul and the input
gradient a transposed convolution written out as a plain NHWC/HWIO
convolution. XLA:CPU computes the kernel gradient `jax.vjp` gives as a
convolution whose window is the whole feature map, 2-4x slower on large
maps, and inside loop bodies it runs both of `jax.vjp`'s gradients as
naive loop nests, 25x slower (jax-ml/jax#12868). Results agree with
`jax.vjp`'s to float32 rounding.
"""

import functools

import jax
import jax.numpy as jnp

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def dense_conv(x, w, stride, pads, rate=(1, 1)):
  """`lax.conv_general_dilated` with NHWC inputs and HWIO kernels."""
  return jax.lax.conv_general_dilated(
    x, w, stride, pads, rhs_dilation=rate,
    dimension_numbers=_DIMENSION_NUMBERS,
  )  # fmt: skip


def im2col(x, kernel, stride, pads, out_hw):
  """Patches (N * Ho * Wo, kh * kw * C) of `x`, ordered like HWIO kernels."""
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_hw
  taps = [
    xp[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw, :]
    for i in range(kh)
    for j in range(kw)
  ]
  return jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_im2col_grad(x, w, stride, pads):
  """A dense NHWC/HWIO conv whose weight gradient is one im2col matmul.

  Same forward pass as `lax.conv_general_dilated`; the input gradient is
  the transposed convolution written out (`_conv_input_grad`) and the
  kernel gradient is one matmul, `patches(x)^T @ dy`.

  Args:
    x: input (N, H, W, C).
    w: kernel (kh, kw, C, O).
    stride: (sh, sw).
    pads: explicit ((lo, hi), (lo, hi)) spatial padding.

  Returns:
    The convolution output (N, Ho, Wo, O).
  """
  return dense_conv(x, w, stride, pads)


def _im2col_grad_fwd(x, w, stride, pads):
  return dense_conv(x, w, stride, pads), (x, w)


def _conv_input_grad(dy, w, stride, pads, in_hw):
  """The input gradient of `dense_conv` as a plain NHWC/HWIO convolution.

  It is the transposed convolution: `dy` dilated by the stride, convolved
  with the kernel flipped in space and with its in/out channels swapped.
  `jax.vjp` expresses the same thing through the convolution's dimension
  labels instead (`b01f_01oi`), which XLA:CPU only turns back into its fast
  (Eigen) convolution outside loops: inside a `scan` body it falls back to
  a naive loop nest. Written out like this, it stays fast in both places.
  """
  kernel = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  grad_pads = []
  for size, (lo, hi), k, s in zip(
    in_hw, pads, w.shape[:2], stride, strict=True
  ):
    leftover = (size + lo + hi - k) % s  # Input rows no output reads.
    grad_pads.append((k - 1 - lo, k - 1 - hi + leftover))
  return jax.lax.conv_general_dilated(
    dy, kernel, (1, 1), grad_pads, lhs_dilation=stride,
    dimension_numbers=_DIMENSION_NUMBERS,
  )  # fmt: skip


def _im2col_grad_bwd(stride, pads, residuals, dy):
  x, w = residuals
  dx = _conv_input_grad(dy, w, stride, pads, x.shape[1:3])
  patches = im2col(x, w.shape[:2], stride, pads, dy.shape[1:3])
  # dy^T @ patches, transposed afterwards: XLA:CPU's GEMM is ~1.6x slower
  # when its left operand is the transposed (huge) patch matrix.
  dw = jnp.dot(dy.reshape(-1, dy.shape[-1]).T, patches).T
  return dx, dw.reshape(w.shape).astype(w.dtype)


conv2d_im2col_grad.defvjp(_im2col_grad_fwd, _im2col_grad_bwd)
