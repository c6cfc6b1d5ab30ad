"""Normalizer-Free ResNets (Brock, De & Smith, ICLR 2021), as in the reference.

`NFResNet` reproduces `deepmind-research/nfnets/nf_resnet.py`: pre-activation
bottleneck ResNets without normalisation, with Scaled Weight Standardisation
(`nfnets.models.layers.WSConv2D`), gamma-scaled activations and the beta/alpha
variance bookkeeping of the paper. Haiku names match the reference:
`NF_ResNet/~/initial_conv`, `NF_ResNet/~/nf_res_block`, `nf_res_block_1`, ...
(each with `conv0`, `conv1`, `conv2`, `conv_shortcut` on projection blocks
and `squeeze_excite` when `use_se`), and `NF_ResNet/~/linear`.

Architecture: a 7x7/2 WSConv stem with 16 * width channels and a 3x3/2 max
pool; four stages of widths (64, 128, 256, 512) * width (256..2048 at the
default width 4) with strides (1, 2, 2, 2); bottleneck blocks of ratio 0.25
whose stride sits on the 3x3 conv; a strided 1x1 WSConv projection shortcut
(no average pool) on `act(x) * beta`; then act, global mean pool, dropout
and a linear classifier. There is no final conv.
"""

import dataclasses
import math
from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import layers

# Registry of depth variants: name -> dict(depth=blocks per stage).
VARIANTS = {
  'ResNet50': dict(depth=(3, 4, 6, 3)),
  'ResNet101': dict(depth=(3, 4, 23, 3)),
  'ResNet152': dict(depth=(3, 8, 36, 3)),
  'ResNet200': dict(depth=(3, 24, 36, 3)),
  'ResNet288': dict(depth=(24, 24, 24, 24)),
  'ResNet600': dict(depth=(50, 50, 50, 50)),
}

STAGE_MULTIPLIERS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
STEM_MULTIPLIER = 16
TOTAL_STRIDE = 32
BOTTLENECK_RATIO = 0.25


def get_variant(name: str) -> dict:
  """Returns the `VARIANTS` entry `name`; the error lists valid names."""
  if name not in VARIANTS:
    raise ValueError(
      f'Unknown ResNet variant {name!r}; choose one of {list(VARIANTS)}.'
    )
  return VARIANTS[name]


def resolve_depth(variant: str, depth: Sequence[int] | None) -> tuple:
  """Blocks per stage: `depth` if given (for small models), else the variant's.

  Args:
    variant: key of `VARIANTS`.
    depth: optional override, four positive ints.

  Returns:
    A tuple of four ints.
  """
  resolved = tuple(get_variant(variant)['depth'] if depth is None else depth)
  if len(resolved) != 4 or min(resolved) < 1:
    raise ValueError(f'depth must be 4 positive ints, got {resolved}.')
  return resolved


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Hyperparameters of one `NFResBlock`."""

  index: int
  in_ch: int
  out_ch: int
  width: int  # Bottleneck width.
  stride: int
  beta: float
  stochdepth_rate: float
  is_transition: bool


def block_specs(
  variant: str = 'ResNet50',
  width: float = 4,
  alpha: float = 0.2,
  stochdepth_rate: float = 0.1,
  depth: Sequence[int] | None = None,
) -> list[BlockSpec]:
  """The per-block hyperparameters of an NF-ResNet, in order.

  `beta = 1 / expected_std`, where the expected variance of the residual
  stream grows by alpha^2 per block and is reset to 1 after each stage's
  first (transition) block, exactly as in the reference.

  Args:
    variant: key of `VARIANTS`.
    width: multiplier of (64, 128, 256, 512) and of the 16-channel stem.
    alpha: residual branch scale.
    stochdepth_rate: rate of the deepest block; block i of N gets rate*i/N.
    depth: blocks per stage overriding the variant's.

  Returns:
    One `BlockSpec` per block.
  """
  depth = resolve_depth(variant, depth)
  num_blocks = sum(depth)
  in_ch = int(STEM_MULTIPLIER * width)
  expected_std, index, specs = 1.0, 0, []
  for mult, stage_depth, stride in zip(
    STAGE_MULTIPLIERS, depth, STAGE_STRIDES, strict=True
  ):
    out_ch = int(mult * width)
    for block_index in range(stage_depth):
      specs.append(
        BlockSpec(
          index=index,
          in_ch=in_ch,
          out_ch=out_ch,
          width=max(1, int(out_ch * BOTTLENECK_RATIO)),
          stride=stride if block_index == 0 else 1,
          beta=1.0 / expected_std,
          stochdepth_rate=stochdepth_rate * index / num_blocks,
          is_transition=block_index == 0,
        )
      )
      in_ch, index = out_ch, index + 1
      if block_index == 0:  # Transitions reset the residual stream variance.
        expected_std = 1.0
      expected_std = math.sqrt(expected_std**2 + alpha**2)
  return specs


class NFResBlock(hk.Module):
  """Normalizer-free pre-activation bottleneck block.

  `out = act(x) * beta`; shortcut = strided 1x1 conv of `out` on projection
  blocks (stride > 1 or a width change), else the raw `x`; branch = conv0
  (1x1) -> act -> conv1 (3x3, strided) -> act -> conv2 (1x1) -> optional
  squeeze-excite (2 * sigmoid gate) -> stochastic depth -> * skip_gain.
  Returns `branch * alpha + shortcut` and the branch's average channel
  variance (before stochastic depth and skip_gain).
  """

  def __init__(
    self,
    spec: BlockSpec,
    alpha: float = 0.2,
    activation: str = 'relu',
    skipinit_gain: float = 0.0,
    use_se: bool = False,
    se_ratio: float = 0.25,
    name: str | None = None,
  ):
    """Creates the block.

    Args:
      spec: the block's sizes, stride, beta and stochastic depth rate.
      alpha: residual branch scale.
      activation: key of `nfnets.models.layers.ACTIVATIONS`.
      skipinit_gain: initial value of the scalar `skip_gain` (the reference
        default 0 makes every block the identity at init).
      use_se: add a squeeze-excite on the branch output.
      se_ratio: squeeze-excite hidden width as a fraction of out_ch.
      name: Haiku module name.
    """
    super().__init__(name=name)
    self.spec, self.alpha = spec, alpha
    self.activation = layers.get_activation(activation)
    self.skipinit_gain = skipinit_gain
    self.conv0 = layers.WSConv2D(spec.width, 1, name='conv0')
    self.conv1 = layers.WSConv2D(
      spec.width, 3, stride=spec.stride, name='conv1'
    )
    self.conv2 = layers.WSConv2D(spec.out_ch, 1, name='conv2')
    self.use_projection = spec.stride > 1 or spec.in_ch != spec.out_ch
    if self.use_projection:
      self.conv_shortcut = layers.WSConv2D(
        spec.out_ch, 1, stride=spec.stride, name='conv_shortcut'
      )
    self.se = None
    if use_se:
      self.se = layers.SqueezeExcite(spec.out_ch, spec.out_ch, se_ratio)
    self.stoch_depth = None
    if 0.0 < spec.stochdepth_rate < 1.0:
      self.stoch_depth = layers.StochDepth(spec.stochdepth_rate)

  def __call__(
    self, x: jax.Array, is_training: bool
  ) -> tuple[jax.Array, jax.Array]:
    """Applies the block to NHWC `x`; returns (output, res_avg_var)."""
    out = self.activation(x) * self.spec.beta
    shortcut = self.conv_shortcut(out) if self.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv2(self.activation(out))
    if self.se is not None:
      out = self.se(out)
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    skip_gain = hk.get_parameter(
      'skip_gain',
      (),
      out.dtype,
      init=hk.initializers.Constant(self.skipinit_gain),
    )
    return out * skip_gain * self.alpha + shortcut, res_avg_var


def check_images(x: jax.Array, model: str, min_size: int) -> None:
  """Raises a ValueError that says what to do for unusable image batches.

  Args:
    x: the model input.
    model: model name for the message.
    min_size: smallest height/width the model accepts.
  """
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(
      f'{model} expects NHWC RGB images of shape (N, H, W, 3), got '
      f'{x.shape}; add a batch axis (x[None]) or transpose NCHW to NHWC.'
    )
  if min(x.shape[1:3]) < min_size:
    raise ValueError(
      f'Image size {x.shape[1:3]} is too small: {model} downsamples by '
      f'{min_size}, so height and width must be >= {min_size}.'
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
      f'{model} expects normalised float images, got dtype {x.dtype}.'
    )


class NFResNet(hk.Module):
  """Normalizer-Free pre-activation ResNet (NF-ResNet-50 ... 600).

  Called as `model(images, is_training, return_metrics=False)` on NHWC float
  images; returns a dict with 'logits', 'pool' and, with `return_metrics`,
  the signal-propagation metrics `avg_sq_mean_i`, `avg_var_i` (stem output
  i=0, block k output i=k+1) and `res_avg_var_k`.

  Deviation from the reference: its variant table has no drop rate, so
  `drop_rate=None` raised a KeyError there; here None means 0.
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = 'ResNet50',
    width: float = 4,
    alpha: float = 0.2,
    stochdepth_rate: float = 0.1,
    drop_rate: float | None = None,
    activation: str = 'relu',
    fc_init: hk.initializers.Initializer | None = None,
    skipinit_gain: float = 0.0,
    use_se: bool = False,
    se_ratio: float = 0.25,
    depth: Sequence[int] | None = None,
    name: str = 'NF_ResNet',
  ):
    """Creates the model.

    Args:
      num_classes: number of output classes.
      variant: key of `VARIANTS` ('ResNet50', ..., 'ResNet600').
      width: multiplier of the stage widths (64..512) and the 16-ch stem.
      alpha: residual branch scale.
      stochdepth_rate: stochastic depth rate of the deepest block.
      drop_rate: dropout before the classifier (None = 0).
      activation: key of `nfnets.models.layers.ACTIVATIONS` (reference: 'relu').
      fc_init: classifier weight initialiser; default N(0, 0.01).
      skipinit_gain: initial value of every block's `skip_gain` (0 as in
        the reference; 1 shows the branches' contribution in SPPs).
      use_se: squeeze-excite in every block (NF-SE-ResNets).
      se_ratio: squeeze-excite hidden width ratio.
      depth: blocks per stage overriding the variant's (for small models).
      name: Haiku module name; 'NF_ResNet' as in the reference.
    """
    super().__init__(name=name)
    self.num_classes = num_classes
    self.drop_rate = 0.0 if drop_rate is None else drop_rate
    self.activation = layers.get_activation(activation)
    self.specs = block_specs(variant, width, alpha, stochdepth_rate, depth)
    self.initial_conv = layers.WSConv2D(
      int(STEM_MULTIPLIER * width), 7, stride=2, name='initial_conv'
    )
    self.blocks = [
      NFResBlock(
        spec,
        alpha=alpha,
        activation=activation,
        skipinit_gain=skipinit_gain,
        use_se=use_se,
        se_ratio=se_ratio,
        name='nf_res_block',  # Haiku numbers repeats: nf_res_block_1, ...
      )
      for spec in self.specs
    ]
    fc_init = fc_init or hk.initializers.RandomNormal(0.01, 0.0)
    self.fc = hk.Linear(num_classes, w_init=fc_init, with_bias=True)

  def __call__(
    self, x: jax.Array, is_training: bool = True, return_metrics: bool = False
  ) -> dict[str, jax.Array]:
    """Runs the network on NHWC float images; see the class docstring."""
    check_images(x, 'NF-ResNet', TOTAL_STRIDE)
    outputs = {}
    out = self.initial_conv(x)
    out = hk.max_pool(out, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    for i, block in enumerate(self.blocks):
      out, res_var = block(out, is_training)
      if return_metrics:
        outputs.update(layers.signal_metrics(out, i + 1))
        outputs[f'res_avg_var_{i}'] = res_var
    pool = jnp.mean(self.activation(out), axis=(1, 2))
    outputs['pool'] = pool
    if is_training and self.drop_rate > 0.0:
      pool = hk.dropout(hk.next_rng_key(), self.drop_rate, pool)
    outputs['logits'] = self.fc(pool)
    return outputs
