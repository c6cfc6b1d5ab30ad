"""Depthwise 2-D convolutions, implemented per backend.

`depthwise_conv2d` computes an NHWC depthwise convolution (one k x k filter
per channel, kernel shape (kh, kw, 1, C)) in the form that runs fastest on
the backend. GPUs and TPUs have depthwise kernels behind
`feature_group_count=C` (mode 'native'). XLA:CPU lowers that to a grouped
convolution which trains 2.5-16x slower than writing the convolution out as
kh * kw shifted multiply-adds of the padded input (mode 'shifted'; measured
in docs/models.md), whose gradients autodiff turns into the same kind of
element-wise work. Both forms give the same results from the same kernel.

The shifted form is traced as one `jax.jit` call named `SHIFTED_NAME`, so
that counters of multiply-adds (`nfnets.models.flops`) can find it in a
jaxpr: it has no convolution primitive of its own.
"""

import functools

import jax
import jax.numpy as jnp

from nfnets.ops import dispatch

DEPTHWISE_CONV_MODES = ('auto', 'shifted', 'native')

# The name of the shifted form's `pjit` equation in a jaxpr.
SHIFTED_NAME = 'depthwise_conv2d_shifted'


def resolve_depthwise_conv(mode: str) -> str:
  """Maps a depthwise-conv mode to the implementation used on this backend.

  Args:
    mode: 'shifted' (kh * kw shifted multiply-adds), 'native'
      (`feature_group_count`), or 'auto': shifted on CPU, native elsewhere.

  Returns:
    'shifted' or 'native'.

  Raises:
    ValueError: for an unknown mode; the message lists the valid ones.
  """
  # XLA:CPU's grouped convolution is 2.5-16x slower in training than the
  # shifted form; GPUs and TPUs have dedicated depthwise kernels.
  return dispatch.resolve_mode(
    mode, name='depthwise_conv', modes=DEPTHWISE_CONV_MODES, cpu='shifted'
  )


@functools.partial(jax.jit, static_argnums=(2, 3))
def depthwise_conv2d_shifted(x, w, stride, pads):
  """The depthwise conv as a sum of kh * kw shifted, scaled input views.

  Args:
    x: input, shape (N, H, W, C).
    w: kernel, shape (kh, kw, 1, C).
    stride: (sh, sw).
    pads: explicit ((lo, hi), (lo, hi)) spatial padding.

  Returns:
    The convolution output, shape (N, Ho, Wo, C).
  """
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  (kh, kw), (sh, sw) = w.shape[:2], stride
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = xp[
        :, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw
      ]
      term = tap * w[i, j, 0]
      out = term if out is None else out + term
  return out


def depthwise_conv2d(
  x: jax.Array,
  w: jax.Array,
  *,
  stride: tuple[int, int] = (1, 1),
  padding: str = 'SAME',
  mode: str = 'native',
) -> jax.Array:
  """An NHWC depthwise convolution with a (kh, kw, 1, C) kernel.

  Args:
    x: input, shape (N, H, W, C).
    w: kernel, shape (kh, kw, 1, C): one filter per channel.
    stride: spatial strides.
    padding: 'SAME' or 'VALID'.
    mode: 'native' (`feature_group_count=C`) or 'shifted' (kh * kw shifted
      multiply-adds, the XLA:CPU-friendly form). Same result.

  Returns:
    The convolution output, shape (N, H', W', C).

  Raises:
    ValueError: for a kernel that is not (kh, kw, 1, C) or an unknown mode.
  """
  channels = x.shape[-1]
  if w.ndim != 4 or w.shape[2] != 1 or w.shape[3] != channels:
    raise ValueError(
      f'A depthwise kernel for {channels} channels has shape (kh, kw, 1, '
      f'{channels}); got {w.shape}.'
    )
  if mode == 'native':
    return jax.lax.conv_general_dilated(
      x, w, stride, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=channels,
    )  # fmt: skip
  if mode != 'shifted':
    raise ValueError(f"mode must be 'native' or 'shifted', got {mode!r}.")
  pads = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], stride, padding)
  pads = tuple(tuple(p) for p in pads)
  return depthwise_conv2d_shifted(x, w, tuple(stride), pads)
