"""Convolution products as GEMMs with float32 accumulation.

`matmul_f32acc` is a 1x1 convolution: a matrix product whose bfloat16
operands are accumulated in float32 (XLA:CPU sends that form to the AMX
tile units: ~765 GFLOP/s on a 2-core Intel Xeon, against ~290 with a
bfloat16 result), with a custom gradient that keeps both backward products
in the same form and computes the kernel gradient in the faster GEMM
orientation. At F0's 1x1 shapes on that Xeon its forward + backward pass
takes 0.4-0.6x the time of `jnp.dot`'s in float32 at 48x48 and in bfloat16
at 12x12 and below (docs/performance.md).

`conv2d_gemm` is `lax.conv_general_dilated` (NHWC/HWIO, undilated, float32
accumulation) whose backward pass is two float32-accumulated GEMMs: the
input gradient `col2im(dy @ w^T)` and the kernel gradient
`patches(x)^T @ dy`. At F0's 3x3 shapes it measured 1.0-2.0x slower than
XLA's own gradients (the im2col/col2im copies cost more than the faster
GEMM saves), so `nfnets.ops.cpu_conv_plan` selects it only on request.

Results agree with `jax.vjp` of `lax.conv_general_dilated` / `jnp.dot` to
float32 rounding; with bfloat16 operands the float32 accumulator rounds
once, at the end.
"""

import functools

import jax
import jax.numpy as jnp

from nfnets.ops.im2col import im2col


def _dot_f32(a, b):
  """`a @ b` accumulated (and returned) in float32."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def matmul_f32acc(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b` over the last axis of `a`, accumulated in float32.

  The output has `a`'s dtype; the gradients are float32-accumulated
  matrix products as well, so bfloat16 operands stay on the bfloat16 GEMM
  units in the backward pass too.

  Args:
    a: (..., K) operand.
    b: (K, N) operand.

  Returns:
    (..., N), dtype of `a`.
  """
  return _dot_f32(a, b).astype(a.dtype)


def _matmul_fwd(a, b):
  return matmul_f32acc(a, b), (a, b)


def _matmul_bwd(residuals, g):
  a, b = residuals
  g = g.astype(a.dtype)
  da = _dot_f32(g, b.T).astype(a.dtype)
  a2d, g2d = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
  # g^T @ a, transposed afterwards: XLA:CPU's GEMM is slower when its left
  # operand is the transposed tall matrix.
  db = _dot_f32(g2d.T, a2d).T
  return da, db.astype(b.dtype)


matmul_f32acc.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_gemm(x, w, stride, pads):
  """A dense NHWC/HWIO convolution whose gradients are f32-accumulated GEMMs.

  Args:
    x: input (N, H, W, C).
    w: kernel (kh, kw, C, O), same dtype as `x`.
    stride: (sh, sw).
    pads: explicit ((lo, hi), (lo, hi)) spatial padding.

  Returns:
    The convolution output (N, Ho, Wo, O), dtype of `x`.
  """
  return _conv_fwd(x, w, stride, pads)[0]


def _conv_fwd(x, w, stride, pads):
  # The forward pass stays XLA's convolution (float32 accumulation): an
  # im2col GEMM pays for writing out the patches, which costs more than the
  # faster GEMM saves at every F0 shape.
  y = jax.lax.conv_general_dilated(
    x, w, stride, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    preferred_element_type=jnp.float32,
  )  # fmt: skip
  return y.astype(x.dtype), (x, w)


def col2im(dpatches, in_shape, kernel, stride, pads, out_hw):
  """The adjoint of `im2col`: sums patch gradients back onto the input.

  Args:
    dpatches: (N * Ho * Wo, kh * kw * C), ordered like `im2col`'s patches.
    in_shape: (N, H, W, C) of the convolution input.
    kernel: (kh, kw).
    stride: (sh, sw).
    pads: ((lo, hi), (lo, hi)) spatial padding of the convolution.
    out_hw: (Ho, Wo).

  Returns:
    The input gradient (N, H, W, C), dtype of `dpatches`.
  """
  n, h, w, c = in_shape
  (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_hw
  hp, wp = h + sum(pads[0]), w + sum(pads[1])
  taps = dpatches.reshape(n, ho, wo, kh * kw, c)
  zero = jnp.zeros((), dpatches.dtype)
  total = None
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    # Tap (i, j) read rows i, i + sh, ...: scatter it back there with an
    # interior-padded pad, which XLA fuses into one sum over the taps.
    config = (
      (0, 0, 0),
      (i, hp - i - (ho - 1) * sh - 1, sh - 1),
      (j, wp - j - (wo - 1) * sw - 1, sw - 1),
      (0, 0, 0),
    )
    placed = jax.lax.pad(taps[:, :, :, t, :], zero, config)
    total = placed if total is None else total + placed
  (top, _), (left, _) = pads
  return total[:, top : top + h, left : left + w, :]


def _conv_bwd(stride, pads, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  out_hw = dy.shape[1:3]
  dy2d = dy.reshape(-1, dy.shape[-1])
  w2d = w.reshape(-1, w.shape[-1])
  dpatches = _dot_f32(dy2d, w2d.T)
  dx = col2im(dpatches, x.shape, w.shape[:2], stride, pads, out_hw)
  patches = im2col(x, w.shape[:2], stride, pads, out_hw)
  dw = _dot_f32(dy2d.T, patches).T
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


conv2d_gemm.defvjp(_conv_fwd, _conv_bwd)
