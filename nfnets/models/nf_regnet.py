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

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import checks, common, layers

# Registry of variants (the reference's `base.nf_regnet_params`): stage
# widths (before the 0.75 width multiplier), blocks per stage, train/test
# image sizes and dropout rate.
VARIANTS = common.variant_table(
  ('width', 'depth', 'train_imsize', 'test_imsize', 'drop_rate'),
  {
    'B0': ((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
    'B1': ((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
    'B2': ((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
    'B3': ((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
    'B4': ((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
    'B5': ((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
    'B6': ((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
    'B7': ((96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5),
    'B8': ((104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5),
  },
)

STAGE_STRIDES = (2, 2, 2, 2)  # Every stage halves the resolution.
TOTAL_STRIDE = 32


def get_variant(name: str) -> dict:
  """Returns the `VARIANTS` entry `name`; the error lists valid names."""
  return common.get_variant(VARIANTS, name, 'NF-RegNet')


def block_specs(
  variant: str = 'B0',
  width: float = 0.75,
  expansion: float = 2.25,
  group_size: int = 8,
  alpha: float = 0.2,
  stochdepth_rate: float = 0.1,
  depth: Sequence[int] | None = None,
) -> list[common.BlockSpec]:
  """The per-block hyperparameters of an NF-RegNet, in order.

  Expanded widths are `int(in_ch * expansion)` rounded down to whole groups
  (`common.grouped_width`); betas follow `common.residual_betas`.

  Args:
    variant: key of `VARIANTS`.
    width: multiplier of the stage widths (and of the stem).
    expansion: expanded width as a multiple of the block's *input* width;
      the network's first block uses 1.
    group_size: channels per group of the 3x3 convs.
    alpha: residual branch scale.
    stochdepth_rate: block i of N (from 0) gets rate * i / N.
    depth: blocks per stage overriding the variant's.

  Returns:
    One `common.BlockSpec` per block.
  """
  config = get_variant(variant)
  return common.make_block_specs(
    stem_ch=int(config['width'][0] * width),
    stage_widths=[int(w * width) for w in config['width']],
    depth=common.resolve_depth(config, depth),
    stage_strides=STAGE_STRIDES,
    alpha=alpha,
    stochdepth_rate=stochdepth_rate,
    block_width=lambda index, in_ch, out_ch: common.grouped_width(
      in_ch, 1.0 if index == 0 else expansion, group_size
    ),
  )


def final_conv_channels(last_ch: int) -> int:
  """Width of `final_conv`: the reference's `int(1280 * ch // 440)`."""
  return int(1280 * last_ch // 440)


class NFRegNetBlock(common.NFResidualBlock):
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
    spec: common.BlockSpec,
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
    super().__init__(
      spec,
      alpha=alpha,
      activation=activation,
      pool_shortcut=True,
      grouped_conv=grouped_conv,
      name=name,
    )
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
    self.se = layers.SqueezeExcite(spec.width, spec.width, se_ratio)

  def branch(self, out: jax.Array, *, in_loop: bool = False) -> jax.Array:
    """conv0 -> act -> conv1 -> squeeze-excite -> act -> conv2."""
    out = self.conv0(out, in_loop=in_loop)
    out = self.se(self.conv1(self.activation(out), in_loop=in_loop))
    return self.conv2(self.activation(out), in_loop=in_loop)


class NFRegNet(hk.Module):
  """Normalizer-Free RegNet, B0-B8.

  Called as `model(images, is_training, return_metrics=False,
  return_features=False)` on NHWC float images; returns a dict with
  'logits', 'pool'; with `return_metrics`, the signal-propagation metrics
  (`avg_sq_mean_i`, `avg_var_i`, `res_avg_var_k`); with `return_features`,
  'features': the four stages' outputs at strides 4-32, before any
  activation and before `final_conv` (all as in `nfnets.models.nfnet.NFNet`;
  the stem strides 2 and every stage 2 more).

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
      expansion: inverted-bottleneck expansion of the input width, > 0.
      group_size: channels per group in the 3x3 convs.
      se_ratio: squeeze-excite hidden width as a fraction of the expanded
        width, in (0, 1].
      alpha: residual branch scale.
      stochdepth_rate: stochastic-depth schedule: block i of N (from 0)
        gets rate * i / N.
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
    checks.check_model_args(
      'NF_RegNet', num_classes, width=width, drop_rate=self.drop_rate,
      stochdepth_rate=stochdepth_rate, group_size=group_size,
      narrowest=config['width'][0], se_ratio=se_ratio, expansion=expansion,
    )  # fmt: skip
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

  @property
  def stage_ends(self) -> tuple[int, ...]:
    """Index of each stage's last block (`common.stage_ends`)."""
    return common.stage_ends([s.is_transition for s in self.specs])

  def __call__(
    self,
    x: jax.Array,
    is_training: bool = True,
    return_metrics: bool = False,
    return_features: bool = False,
  ) -> dict[str, jax.Array]:
    """Runs the network on NHWC float images; see the class docstring."""
    common.check_images(x, 'NF-RegNet', TOTAL_STRIDE)
    ends = self.stage_ends if return_features else ()
    outputs = {}
    out = self.initial_conv(x)
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    out = common.apply_blocks(
      self.blocks, out, lambda block, y: block(y, is_training), outputs,
      return_metrics, ends,
    )  # fmt: skip
    pool = jnp.mean(self.activation(self.final_conv(out)), axis=(1, 2))
    return common.classifier_head(
      pool, self.fc, self.drop_rate, is_training, outputs
    )
