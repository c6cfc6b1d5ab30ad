"""Normalizer-Free RegNets B0-B8 (Brock, De & Smith, ICLR 2021).

`NFRegNet` reproduces `deepmind-research/nfnets/nf_regnet.py` with the same
Haiku names: `NF_RegNet/~/initial_conv`, `NF_RegNet/~/nf_block`,
`nf_block_1`, ... (each with `conv0`, `conv1`, `conv2`, `conv_shortcut` on
projection blocks and `squeeze_excite`), `NF_RegNet/~/final_conv` and
`NF_RegNet/~/linear`.

Architecture: one 3x3/2 WSConv stem of int(width[0] * 0.75) channels; four
stages whose first block has stride 2; inverted-bottleneck blocks whose
expanded width is int(in_ch * 2.25) (1 for the very first block, as in
EfficientNet) rounded down to a multiple of the group size 8; a grouped 3x3
conv carrying the stride; squeeze-excite on the expanded width *between*
the 3x3 conv and the last 1x1 conv (unlike NFNet-F, where it follows the
block); an average-pool + 1x1 conv shortcut on strided blocks; a final 1x1
conv to int(1280 * ch // 440) channels; a zero-initialised classifier.
"""

import dataclasses
import math
from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import layers
from nfnets.models.nf_resnet import check_images

# Registry of variants (the reference's `base.nf_regnet_params`): stage
# widths (before the 0.75 width multiplier), blocks per stage, train/test
# image sizes and dropout rate.
VARIANTS = {
  'B0': dict(
    width=(48, 104, 208, 440),
    depth=(1, 3, 6, 6),
    train_imsize=192,
    test_imsize=224,
    drop_rate=0.2,
  ),
  'B1': dict(
    width=(48, 104, 208, 440),
    depth=(2, 4, 7, 7),
    train_imsize=224,
    test_imsize=256,
    drop_rate=0.2,
  ),
  'B2': dict(
    width=(56, 112, 232, 488),
    depth=(2, 4, 8, 8),
    train_imsize=240,
    test_imsize=272,
    drop_rate=0.3,
  ),
  'B3': dict(
    width=(56, 128, 248, 528),
    depth=(2, 5, 9, 9),
    train_imsize=288,
    test_imsize=320,
    drop_rate=0.3,
  ),
  'B4': dict(
    width=(64, 144, 288, 616),
    depth=(2, 6, 11, 11),
    train_imsize=320,
    test_imsize=384,
    drop_rate=0.4,
  ),
  'B5': dict(
    width=(80, 168, 336, 704),
    depth=(3, 7, 14, 14),
    train_imsize=384,
    test_imsize=456,
    drop_rate=0.4,
  ),
  'B6': dict(
    width=(88, 184, 376, 792),
    depth=(3, 8, 16, 16),
    train_imsize=448,
    test_imsize=528,
    drop_rate=0.5,
  ),
  'B7': dict(
    width=(96, 208, 416, 880),
    depth=(4, 10, 19, 19),
    train_imsize=512,
    test_imsize=600,
    drop_rate=0.5,
  ),
  'B8': dict(
    width=(104, 232, 456, 968),
    depth=(4, 11, 22, 22),
    train_imsize=600,
    test_imsize=672,
    drop_rate=0.5,
  ),
}

# The reference's weight decay per variant (experiment_nf_regnets.py); it
# defines none for B6-B8.
WEIGHT_DECAY = {
  'B0': 5e-5,
  'B1': 6e-5,
  'B2': 7e-5,
  'B3': 8e-5,
  'B4': 9e-5,
  'B5': 1e-4,
}

TOTAL_STRIDE = 32


def get_variant(name: str) -> dict:
  """Returns the `VARIANTS` entry `name`; the error lists valid names."""
  if name not in VARIANTS:
    raise ValueError(
      f'Unknown NF-RegNet variant {name!r}; choose one of {list(VARIANTS)}.'
    )
  return VARIANTS[name]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Hyperparameters of one NF-RegNet block."""

  index: int
  in_ch: int
  out_ch: int
  width: int  # Expanded width, a multiple of the group size.
  groups: int
  stride: int
  beta: float
  stochdepth_rate: float


def expanded_width(
  in_ch: int, expansion: float, group_size: int
) -> tuple[int, int]:
  """`int(in_ch * expansion)` rounded down to whole groups; (width, groups).

  Below one group (only in shrunken test models) one group of the unrounded
  width is used instead of the reference's width 0.
  """
  width = int(in_ch * expansion)
  groups = width // group_size
  if groups == 0:
    return max(width, 1), 1
  return group_size * groups, groups


def block_specs(
  variant: str = 'B0',
  width: float = 0.75,
  expansion: float = 2.25,
  group_size: int = 8,
  alpha: float = 0.2,
  stochdepth_rate: float = 0.1,
  depth: Sequence[int] | None = None,
) -> list[BlockSpec]:
  """The per-block hyperparameters of an NF-RegNet, in order.

  Args:
    variant: key of `VARIANTS`.
    width: multiplier of the stage widths (and of the stem).
    expansion: expanded width as a multiple of the block's *input* width;
      the network's first block uses 1.
    group_size: channels per group of the 3x3 convs.
    alpha: residual branch scale.
    stochdepth_rate: rate of the deepest block; block i of N gets rate*i/N.
    depth: blocks per stage overriding the variant's.

  Returns:
    One `BlockSpec` per block.
  """
  config = get_variant(variant)
  depth = tuple(config['depth'] if depth is None else depth)
  if len(depth) != 4 or min(depth) < 1:
    raise ValueError(f'depth must be 4 positive ints, got {depth}.')
  num_blocks = sum(depth)
  in_ch = int(config['width'][0] * width)
  expected_std, index, specs = 1.0, 0, []
  for stage_width, stage_depth in zip(config['width'], depth, strict=True):
    out_ch = int(stage_width * width)
    for block_index in range(stage_depth):
      bneck, groups = expanded_width(
        in_ch, 1.0 if index == 0 else expansion, group_size
      )
      specs.append(
        BlockSpec(
          index=index,
          in_ch=in_ch,
          out_ch=out_ch,
          width=bneck,
          groups=groups,
          stride=2 if block_index == 0 else 1,
          beta=1.0 / expected_std,
          stochdepth_rate=stochdepth_rate * index / num_blocks,
        )
      )
      in_ch, index = out_ch, index + 1
      if block_index == 0:  # Transitions reset the residual stream variance.
        expected_std = 1.0
      expected_std = math.sqrt(expected_std**2 + alpha**2)
  return specs


def final_conv_channels(last_ch: int) -> int:
  """Width of `final_conv`: the reference's `int(1280 * ch // 440)`."""
  return int(1280 * last_ch // 440)


class NFRegNetBlock(hk.Module):
  """Normalizer-free RegNet (inverted bottleneck) block.

  `out = act(x) * beta`; shortcut = avg-pool 2x2 + 1x1 conv of `out` when
  strided, 1x1 conv of `out` when the width changes, else the raw `x`;
  branch = conv0 (1x1 expand) -> act -> conv1 (3x3 grouped, strided) ->
  squeeze-excite (2 * sigmoid gate) -> act -> conv2 (1x1) -> stochastic
  depth -> * skip_gain (init 0). Returns `branch * alpha + shortcut` and the
  branch's average channel variance.
  """

  def __init__(
    self,
    spec: BlockSpec,
    alpha: float = 0.2,
    se_ratio: float = 0.5,
    activation: str = 'silu',
    grouped_conv: str = 'auto',
    name: str | None = None,
  ):
    """Creates the block.

    Args:
      spec: the block's sizes, stride, beta and stochastic depth rate.
      alpha: residual branch scale.
      se_ratio: squeeze-excite hidden width as a fraction of the expanded
        width.
      activation: key of `nfnets.models.layers.ACTIVATIONS`.
      grouped_conv: 'auto' | 'split' | 'native' grouped-conv implementation.
      name: Haiku module name.
    """
    super().__init__(name=name)
    self.spec, self.alpha = spec, alpha
    self.activation = layers.get_activation(activation)
    conv = lambda ch, k, **kw: layers.WSConv2D(
      ch, k, grouped_conv=grouped_conv, **kw
    )
    self.conv0 = conv(spec.width, 1, name='conv0')
    self.conv1 = conv(
      spec.width,
      3,
      stride=spec.stride,
      feature_group_count=spec.groups,
      name='conv1',
    )
    self.conv2 = conv(spec.out_ch, 1, name='conv2')
    self.use_projection = spec.stride > 1 or spec.in_ch != spec.out_ch
    if self.use_projection:
      self.conv_shortcut = conv(spec.out_ch, 1, name='conv_shortcut')
    self.se = layers.SqueezeExcite(spec.width, spec.width, se_ratio)
    self.stoch_depth = None
    if 0.0 < spec.stochdepth_rate < 1.0:
      self.stoch_depth = layers.StochDepth(spec.stochdepth_rate)

  def _shortcut(self, x: jax.Array, out: jax.Array) -> jax.Array:
    if self.spec.stride > 1:
      pooled = hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
      return self.conv_shortcut(pooled)
    if self.use_projection:
      return self.conv_shortcut(out)
    return x

  def __call__(
    self, x: jax.Array, is_training: bool
  ) -> tuple[jax.Array, jax.Array]:
    """Applies the block to NHWC `x`; returns (output, res_avg_var)."""
    out = self.activation(x) * self.spec.beta
    shortcut = self._shortcut(x, out)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.se(out)
    out = self.conv2(self.activation(out))
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    skip_gain = hk.get_parameter('skip_gain', (), out.dtype, init=jnp.zeros)
    return out * skip_gain * self.alpha + shortcut, res_avg_var


class NFRegNet(hk.Module):
  """Normalizer-Free RegNet, B0-B8.

  Called as `model(images, is_training, return_metrics=False)` on NHWC float
  images; returns a dict with 'logits', 'pool' and, with `return_metrics`,
  the signal-propagation metrics (`avg_sq_mean_i`, `avg_var_i`,
  `res_avg_var_k`, as in `nfnets.models.nfnet.NFNet`).

  The reference's constructor default activation 'swish' was missing from
  its activation table (its training config passes 'silu'); the default
  here is 'silu', the same function with the reference's gamma.
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = 'B0',
    width: float = 0.75,
    expansion: float = 2.25,
    group_size: int = 8,
    se_ratio: float = 0.5,
    alpha: float = 0.2,
    stochdepth_rate: float = 0.1,
    drop_rate: float | None = None,
    activation: str = 'silu',
    fc_init: hk.initializers.Initializer | None = None,
    depth: Sequence[int] | None = None,
    grouped_conv: str = 'auto',
    name: str = 'NF_RegNet',
  ):
    """Creates the model.

    Args:
      num_classes: number of output classes.
      variant: key of `VARIANTS` ('B0'..'B8').
      width: multiplier of the stage widths (the reference's 0.75).
      expansion: inverted-bottleneck expansion of the input width.
      group_size: channels per group in the 3x3 convs.
      se_ratio: squeeze-excite hidden width ratio.
      alpha: residual branch scale.
      stochdepth_rate: stochastic depth rate of the deepest block.
      drop_rate: dropout before the classifier; None uses the variant's.
      activation: key of `nfnets.models.layers.ACTIVATIONS`.
      fc_init: classifier weight initialiser; default zeros (reference).
      depth: blocks per stage overriding the variant's (for small models).
      grouped_conv: 'auto' | 'split' | 'native' grouped-conv implementation.
      name: Haiku module name; 'NF_RegNet' as in the reference.
    """
    super().__init__(name=name)
    config = get_variant(variant)
    self.num_classes = num_classes
    self.drop_rate = config['drop_rate'] if drop_rate is None else drop_rate
    self.activation = layers.get_activation(activation)
    self.specs = block_specs(
      variant, width, expansion, group_size, alpha, stochdepth_rate, depth
    )
    self.initial_conv = layers.WSConv2D(
      int(config['width'][0] * width), 3, stride=2, name='initial_conv'
    )
    self.blocks = [
      NFRegNetBlock(
        spec,
        alpha=alpha,
        se_ratio=se_ratio,
        activation=activation,
        grouped_conv=grouped_conv,
        name='nf_block',  # Haiku numbers repeats: nf_block_1, ...
      )
      for spec in self.specs
    ]
    self.final_conv = layers.WSConv2D(
      final_conv_channels(self.specs[-1].out_ch), 1, name='final_conv'
    )
    self.fc = hk.Linear(num_classes, w_init=fc_init or jnp.zeros)

  def __call__(
    self, x: jax.Array, is_training: bool = True, return_metrics: bool = False
  ) -> dict[str, jax.Array]:
    """Runs the network on NHWC float images; see the class docstring."""
    check_images(x, 'NF-RegNet', TOTAL_STRIDE)
    outputs = {}
    out = self.initial_conv(x)
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    for i, block in enumerate(self.blocks):
      out, res_var = block(out, is_training)
      if return_metrics:
        outputs.update(layers.signal_metrics(out, i + 1))
        outputs[f'res_avg_var_{i}'] = res_var
    out = self.activation(self.final_conv(out))
    pool = jnp.mean(out, axis=(1, 2))
    outputs['pool'] = pool
    if is_training and self.drop_rate > 0.0:
      pool = hk.dropout(hk.next_rng_key(), self.drop_rate, pool)
    outputs['logits'] = self.fc(pool)
    return outputs
