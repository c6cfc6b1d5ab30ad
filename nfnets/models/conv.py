"""`Conv2D`: Haiku's `hk.Conv2D` with the convolution forms of `nfnets.ops`.

The baselines (BN-/SE-ResNets, SkipInit and Fixup ResNets, EfficientNets)
are built from plain convolutions. With `hk.Conv2D` they would run every
convolution as `lax.conv_general_dilated`, whose 1x1 and large-map kernel
gradients take XLA:CPU's slow path (51 GFLOP/s for ResNet-50's 1x1
convolutions, against about 240 for the same products as matrix
multiplies), while the normalizer-free models' `WSConv2D` gets
`nfnets.ops.grouped_conv2d`. That would make a CPU comparison of the
families measure the implementations rather than the architectures, so
the baselines use this module.

It is `hk.Conv2D` with its parameters unchanged (`w` HWIO, optional `b`, the
same default initialiser and the same module name, so checkpoints and
initial values are the same for a given key); only the convolution is
`grouped_conv2d` in the mode `ops.resolve_grouped_conv` picks for the
backend ('split' on CPU, XLA's native convolution elsewhere). Forms it does
not cover (unbatched inputs, NCHW, input dilation, masks, an explicit
`precision`) fall back to `hk.Conv2D` itself.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import ops


class Conv2D(hk.Conv2D):
  """`hk.Conv2D` (NHWC) whose convolution is `nfnets.ops.grouped_conv2d`."""

  def __init__(self, *args, grouped_conv: str = 'auto', **kwargs):
    """Creates the module.

    Args:
      *args: `hk.Conv2D`'s arguments.
      grouped_conv: 'auto' | 'split' | 'native' (see
        `nfnets.ops.resolve_grouped_conv`).
      **kwargs: `hk.Conv2D`'s keyword arguments.
    """
    super().__init__(*args, **kwargs)
    ops.resolve_grouped_conv(grouped_conv)  # Validates the name early.
    self.grouped_conv = grouped_conv

  def _covered(self, inputs: jax.Array, precision) -> bool:
    """Whether `grouped_conv2d` computes this call exactly as hk.Conv2D."""
    return (
      precision is None
      and self.mask is None
      and inputs.ndim == 4
      and self.channel_index == -1
      and tuple(self.lhs_dilation) == (1, 1)
    )

  def __call__(self, inputs: jax.Array, *, precision=None) -> jax.Array:
    """Applies the convolution (and bias) to an NHWC batch.

    Args:
      inputs: input, shape (N, H, W, C).
      precision: as in `hk.Conv2D`; given, `hk.Conv2D` itself runs.

    Returns:
      The output, shape (N, H', W', output_channels).
    """
    inputs = jnp.asarray(inputs)
    if not self._covered(inputs, precision):
      return super().__call__(inputs, precision=precision)
    groups = self.feature_group_count
    if inputs.shape[-1] % groups:
      raise ValueError(
        f'Inputs channels {inputs.shape[-1]} should be a multiple of '
        f'feature_group_count {groups}'
      )
    w_shape = (*self.kernel_shape, inputs.shape[-1] // groups)
    w_shape = (*w_shape, self.output_channels)
    w_init = self.w_init or hk.initializers.TruncatedNormal(
      stddev=1.0 / np.sqrt(np.prod(w_shape[:-1]))
    )
    w = hk.get_parameter('w', w_shape, inputs.dtype, init=w_init)
    out = self._conv(inputs, w)
    if self.with_bias:
      b = hk.get_parameter(
        'b', (self.output_channels,), inputs.dtype, init=self.b_init
      )
      out = out + b
    return out

  def _conv(self, x: jax.Array, w: jax.Array) -> jax.Array:
    """The convolution alone: what a precision policy recasts
    (`nfnets.models.precision`)."""
    return ops.grouped_conv2d(
      x,
      w,
      stride=tuple(self.stride),
      padding=self.padding,
      rate=tuple(self.kernel_dilation),
      groups=self.feature_group_count,
      mode=ops.resolve_grouped_conv(self.grouped_conv),
    )
