"""Grouped 2-D convolutions, implemented per backend.

`grouped_conv2d` computes one NHWC/HWIO convolution in the form that runs
fastest on the backend: GPU and TPU have fast grouped kernels
(`feature_group_count`, mode 'native'); XLA:CPU trains 5-20x faster with
one dense convolution per group plus a concat (mode 'split'), with the
gradients of large maps, and of every conv inside a loop body, taken by
`conv2d_im2col_grad`. 1x1 convolutions run as a matmul on every backend;
on x86 CPUs with AVX2, 'split' mode runs them as float32-accumulated GEMMs
with a custom gradient (`nfnets.ops.matmul_f32acc`; the plan is
`nfnets.ops.cpu_conv_plan`'s, which can also put the larger kernels'
gradients on GEMMs, `conv2d_gemm`). All forms give the same results from
the same kernel.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nfnets.ops import cpu_features, dispatch, gemm_conv
from nfnets.ops.im2col import conv2d_im2col_grad, dense_conv

GROUPED_CONV_MODES = ('auto', 'split', 'native')

# Output positions (Ho * Wo) from which a split conv outside a loop body
# takes `conv2d_im2col_grad`; below it XLA's own gradient is as fast and
# compiles faster.
IM2COL_GRAD_MIN_POSITIONS = 16 * 16


def resolve_grouped_conv(mode: str) -> str:
  """Maps a grouped-conv mode to the implementation used on this backend.

  Args:
    mode: 'split' (one dense conv per group, then concat), 'native'
      (`feature_group_count`), or 'auto': split on CPU, native elsewhere.

  Returns:
    'split' or 'native'.

  Raises:
    ValueError: for an unknown mode; the message lists the valid ones.
  """
  # XLA:CPU runs grouped convs 5-20x slower than dense ones in training;
  # GPU and TPU have fast grouped kernels.
  return dispatch.resolve_mode(
    mode, name='grouped_conv', modes=GROUPED_CONV_MODES, cpu='split'
  )


def _subsample(x, stride):
  """Every `stride`-th row and column of NHWC `x`, from the first."""
  if tuple(stride) == (1, 1):
    return x
  x = jax.lax.slice_in_dim(x, 0, x.shape[1], stride[0], axis=1)
  return jax.lax.slice_in_dim(x, 0, x.shape[2], stride[1], axis=2)


def _cpu_plan() -> cpu_features.ConvPlan:
  """Which 'split' convs run as float32-accumulated GEMMs here."""
  if jax.default_backend() != 'cpu':
    return cpu_features.ConvPlan(matmul_1x1=False, gemm_grads=False)
  return cpu_features.cpu_conv_plan()


def _split_dense_conv(x, w, stride, padding, rate, in_loop):
  """One dense conv of the split implementation, with the fast gradient."""
  pads = padding
  if isinstance(padding, str):
    # 'SAME' pads for the dilated kernel's extent, as XLA's conv does.
    extent = [(k - 1) * r + 1 for k, r in zip(w.shape[:2], rate, strict=True)]
    pads = jax.lax.padtype_to_pads(x.shape[1:3], extent, stride, padding)
  pads = tuple(tuple(p) for p in pads)
  if rate == (1, 1) and _cpu_plan().gemm_grads:
    return gemm_conv.conv2d_gemm(x, w, tuple(stride), pads)
  out_hw = [
    (size + lo + hi - k) // s + 1
    for size, (lo, hi), k, s in zip(
      x.shape[1:3], pads, w.shape[:2], stride, strict=True
    )
  ]
  large = out_hw[0] * out_hw[1] >= IM2COL_GRAD_MIN_POSITIONS
  if rate == (1, 1) and (large or in_loop):
    return conv2d_im2col_grad(x, w, tuple(stride), pads)
  return dense_conv(x, w, stride, pads, rate)


def grouped_conv2d(
  x: jax.Array,
  w: jax.Array,
  *,
  stride: tuple[int, int],
  padding: str | Sequence[tuple[int, int]],
  rate: tuple[int, int] = (1, 1),
  groups: int = 1,
  mode: str = 'native',
  in_loop: bool = False,
) -> jax.Array:
  """An NHWC/HWIO convolution, with groups run natively or split.

  Args:
    x: input, shape (N, H, W, C).
    w: kernel, shape (kh, kw, C // groups, out).
    stride: spatial strides.
    padding: 'SAME', 'VALID' or explicit ((lo, hi), (lo, hi)) pairs.
    rate: kernel dilation.
    groups: number of feature groups.
    mode: 'native' (one conv with `feature_group_count`) or 'split' (one
      dense conv per group, concatenated, with the kernel gradient of large
      feature maps as an im2col matmul, see `conv2d_im2col_grad`): the
      XLA:CPU-friendly form; where `nfnets.ops.cpu_conv_plan` says so (1x1
      convs on AVX2/AVX-512 CPUs; undilated convs' gradients on request),
      those are float32-accumulated GEMMs (`matmul_f32acc`,
      `conv2d_gemm`). Same result, same parameters.
    in_loop: whether the conv is traced inside a loop body (`hk.scan`,
      `lax.scan`). XLA:CPU runs the gradients `jax.vjp` gives a convolution
      as naive loop nests there, 25x slower than outside a loop, whatever
      the feature-map size (jax-ml/jax#12868), so in 'split' mode every
      undilated conv then takes `conv2d_im2col_grad`, whose gradients are
      plain convolutions and matmuls.

  Returns:
    The convolution output, shape (N, H', W', out).
  """
  if w.shape[:2] == (1, 1) and groups == 1 and isinstance(padding, str):
    # A 1x1 conv is a matmul over channels (after subsampling for stride,
    # which 'SAME' and 'VALID' agree on); XLA:CPU runs its backward pass
    # about 3x faster as a dot than as a convolution. The subsampling is a
    # static strided slice: indexing with `::s` lowers to a gather when the
    # batch is symbolic (an export), which TFLite cannot convert.
    x = _subsample(x, stride)
    if mode == 'split' and _cpu_plan().matmul_1x1:
      return gemm_conv.matmul_f32acc(x, w[0, 0])
    return jnp.dot(x, w[0, 0])
  if mode == 'native':
    return jax.lax.conv_general_dilated(
      x, w, stride, padding, rhs_dilation=rate,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups,
    )  # fmt: skip
  if groups == 1:
    return _split_dense_conv(x, w, stride, padding, rate, in_loop)
  xs = jnp.split(x, groups, axis=-1)
  ws = jnp.split(w, groups, axis=-1)
  return jnp.concatenate(
    [
      _split_dense_conv(xi, wi, stride, padding, rate, in_loop)
      for xi, wi in zip(xs, ws, strict=True)
    ],
    axis=-1,
  )
