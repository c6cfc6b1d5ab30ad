"""NFNet-F models (Brock et al., 2021), faithful to DeepMind's reference.

`NFNet` reproduces `deepmind-research/nfnets/nfnet.py`: the same
architecture, initialisers and Haiku parameter names and shapes, so the
released `F{0..6}_haiku.npz` params dicts apply to it unchanged.

Architecture in brief: a 4-conv stem (stride 4), four stages of `NFBlock`
bottleneck residual blocks (stride 32 overall), a 1x1 `final_conv` to twice
the last width, global average pooling, dropout and a linear classifier.
Each block computes `x + alpha * skip_gain * branch(act(x) * beta)`, where
`beta = 1 / expected_std` tracks the analytic variance of the residual
stream; transition blocks (first of a stage) use a projection shortcut on
`act(x) * beta` and reset the variance to 1.

The architecture is described by plain Python (`block_specs`, built by
`nfnets.models.common.make_block_specs`), which both the model and the FLOP
counter (`nfnets.models.flops`) read. With `scan_blocks`, runs of identical
blocks go through `nfnets.models.scan`.
"""

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import checks, common, layers, scan

_BASE_WIDTH = (256, 512, 1536, 1536)
_PLUS_WIDTH = (384, 768, 2048, 2048)  # "FN+": slightly wider variants.
_VARIANT_FIELDS = (
  'width',
  'depth',
  'train_imsize',
  'test_imsize',
  'RA_level',
  'drop_rate',
)
_BASE_VARIANTS = {
  # name: (depth, train_imsize, test_imsize, RA_level, drop_rate)
  'F0': ((1, 2, 6, 3), 192, 256, '405', 0.2),
  'F1': ((2, 4, 12, 6), 224, 320, '410', 0.3),
  'F2': ((3, 6, 18, 9), 256, 352, '410', 0.4),
  'F3': ((4, 8, 24, 12), 320, 416, '415', 0.4),
  'F4': ((5, 10, 30, 15), 384, 512, '415', 0.5),
  'F5': ((6, 12, 36, 18), 416, 544, '415', 0.5),
  'F6': ((7, 14, 42, 21), 448, 576, '415', 0.5),
  'F7': ((8, 16, 48, 24), 480, 608, '415', 0.5),
}

# Registry of variants: name -> dict(width, depth, train_imsize, test_imsize,
# RA_level, drop_rate), F0-F7 then F0+-F7+ (the reference's `nfnet_params`).
# RA_level '405' means RandAugment 4 layers, magnitude 5.
VARIANTS = common.variant_table(
  _VARIANT_FIELDS,
  {
    name + suffix: (widths, *row)
    for suffix, widths in (('', _BASE_WIDTH), ('+', _PLUS_WIDTH))
    for name, row in _BASE_VARIANTS.items()
  },
)

STAGE_STRIDES = common.STAGE_STRIDES
STEM_CHANNELS = (16, 32, 64)  # The last stem conv has width[0] // 2.
STEM_STRIDES = (2, 1, 1, 2)
TOTAL_STRIDE = 32
BOTTLENECK_RATIO = 0.5


def get_variant(name: str) -> dict:
  """Returns the `VARIANTS` entry `name`; the error lists valid names."""
  return common.get_variant(VARIANTS, name, 'NFNet')


def block_specs(
  variant: str = 'F0',
  width: float = 1.0,
  alpha: float = 0.2,
  stochdepth_rate: float = 0.1,
  depth: Sequence[int] | None = None,
  group_size: int = 128,
) -> list[common.BlockSpec]:
  """The per-block hyperparameters of an NFNet, in order.

  Bottleneck widths are `int(out_ch * 0.5)` rounded down to whole groups
  (`common.grouped_width`).

  Args:
    variant: key of `VARIANTS`.
    width: multiplier of the block widths (not of the stem).
    alpha: residual branch scale.
    stochdepth_rate: block i of N (from 0) gets rate * i / N.
    depth: blocks per stage, overriding the variant's (e.g. for tiny models).
    group_size: channels per group of the 3x3 convs.

  Returns:
    One `common.BlockSpec` per block.

  Raises:
    ValueError: for an unknown variant or an argument out of its range.
  """
  config = get_variant(variant)
  checks.check_model_args(
    'NFNet', width=width, stochdepth_rate=stochdepth_rate,
    group_size=group_size, narrowest=min(config['width']),
  )  # fmt: skip
  return common.make_block_specs(
    stem_ch=config['width'][0] // 2,
    stage_widths=[int(w * width) for w in config['width']],
    depth=common.resolve_depth(config, depth),
    stage_strides=STAGE_STRIDES,
    alpha=alpha,
    stochdepth_rate=stochdepth_rate,
    block_width=lambda index, in_ch, out_ch: common.grouped_width(
      out_ch, BOTTLENECK_RATIO, group_size
    ),
  )


def final_conv_channels(
  last_ch: int, final_conv_mult: float | None, final_conv_ch: int | None
) -> int:
  """Width of `final_conv`: `final_conv_ch` if given, else mult * last_ch."""
  if final_conv_ch is not None:
    return final_conv_ch
  if final_conv_mult is None:
    raise ValueError('Give one of final_conv_mult or final_conv_ch.')
  return int(final_conv_mult * last_ch)


class NFBlock(common.NFResidualBlock):
  """Normalizer-free bottleneck block of NFNet-F.

  `out = act(x) * beta`; shortcut = avg-pool 2x2 + 1x1 conv of `out` when
  strided, 1x1 conv of `out` when the width changes, else the raw `x`;
  branch = conv0 (1x1) -> act -> conv1 (3x3 grouped, strided) -> act ->
  conv1b (3x3 grouped) -> act -> conv2 (1x1) -> squeeze-excite ->
  stochastic depth -> * skip_gain (scalar, init 0). Returns
  `branch * alpha + shortcut` and the branch's average channel variance.
  """

  def __init__(
    self,
    spec: common.BlockSpec,
    alpha: float = 0.2,
    se_ratio: float = 0.5,
    activation: str = 'gelu',
    use_two_convs: bool = True,
    grouped_conv: str = 'auto',
    name: str | None = None,
  ):
    """Creates the block.

    Args:
      spec: the block's sizes, stride, beta and stochastic depth rate.
      alpha: residual branch scale.
      se_ratio: squeeze-excite hidden width as a fraction of out_ch.
      activation: key of `nfnets.models.layers.ACTIVATIONS`.
      use_two_convs: whether the block has the second 3x3 conv (conv1b).
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
    self.use_two_convs = use_two_convs
    conv = lambda ch, k, **kw: layers.WSConv2D(
      ch, k, grouped_conv=grouped_conv, **kw
    )
    width, groups = spec.width, spec.groups
    self.conv0 = conv(width, 1, name='conv0')
    self.conv1 = conv(
      width, 3, stride=spec.stride, feature_group_count=groups, name='conv1'
    )
    if use_two_convs:
      self.conv1b = conv(width, 3, feature_group_count=groups, name='conv1b')
    self.conv2 = conv(spec.out_ch, 1, name='conv2')
    self.se = layers.SqueezeExcite(spec.out_ch, spec.out_ch, se_ratio)

  def branch(self, out: jax.Array, *, in_loop: bool = False) -> jax.Array:
    """conv0 -> act -> conv1 -> act -> conv1b -> act -> conv2 -> SE."""
    act_conv = lambda conv, y: conv(self.activation(y), in_loop=in_loop)
    out = self.conv0(out, in_loop=in_loop)
    out = act_conv(self.conv1, out)
    if self.use_two_convs:
      out = act_conv(self.conv1b, out)
    return self.se(act_conv(self.conv2, out))


class NFNet(hk.Module):
  """Normalizer-Free Network, F-series (F0-F7 and the wider F0+-F7+).

  Called as `model(images, is_training, return_metrics=False,
  return_features=False)` on NHWC float images; returns a dict with
  'logits' (N, num_classes) and 'pool' (the pooled features, N, final_conv
  width); with `return_metrics`, the signal-propagation metrics
  (`avg_sq_mean_i`, `avg_var_i` for the stem (i=0) and after each block
  (i=k+1), and `res_avg_var_k` per block); with `return_features`,
  'features': the four stages' outputs {'stage1': stride 4, ...,
  'stage4': stride 32} (`common.FEATURE_STRIDES`), each (N, ceil(H /
  stride), ceil(W / stride), stage width); the same parameters either way.
  These are the residual stream at the end of each stage,
  before any activation and (stage 4) before `final_conv`: every block
  starts with its own `act(x) * beta`, so the stream is what the next stage
  (and `final_conv`) reads, and a head on top applies its own activation.
  Also with `scan_blocks` (a scanned run never crosses a stage boundary).

  Reference quirks kept as defaults: stochastic depth is not rescaled at
  train time; `stochdepth_rate` defaults to 0.1 (the training config uses
  0.25); the classifier is initialised N(0, 0.01), not zeros; GELU is the
  tanh approximation.
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = 'F0',
    width: float = 1.0,
    se_ratio: float = 0.5,
    alpha: float = 0.2,
    stochdepth_rate: float = 0.1,
    drop_rate: float | None = None,
    activation: str = 'gelu',
    fc_init: hk.initializers.Initializer | None = None,
    final_conv_mult: float | None = 2,
    final_conv_ch: int | None = None,
    use_two_convs: bool = True,
    grouped_conv: str = 'auto',
    remat: bool = False,
    scan_blocks: bool = False,
    depth: Sequence[int] | None = None,
    group_size: int = 128,
    in_channels: int = 3,
    name: str = 'NFNet',
  ):
    """Creates the model.

    Args:
      num_classes: number of output classes.
      variant: key of `VARIANTS` ('F0'..'F7', 'F0+'..'F7+').
      width: multiplier of the block widths (the stem is not scaled).
      se_ratio: squeeze-excite hidden width as a fraction of the block width.
      alpha: residual branch scale.
      stochdepth_rate: stochastic-depth schedule: block i of N (from 0)
        gets rate * i / N, the deepest (N - 1) / N of it.
      drop_rate: dropout before the classifier; None uses the variant's.
      activation: key of `nfnets.models.layers.ACTIVATIONS`.
      fc_init: classifier weight initialiser; default N(0, 0.01).
      final_conv_mult: final conv width as a multiple of the last block's.
      final_conv_ch: explicit final conv width; takes precedence over
        final_conv_mult when given (the reference ignored it unless
        final_conv_mult was None).
      use_two_convs: whether blocks have the second 3x3 conv (conv1b).
      grouped_conv: 'auto' | 'split' | 'native' grouped-conv implementation
        ('auto' = split on CPU, native on GPU/TPU); same params and results.
      remat: rematerialise each block in the backward pass to save memory.
      scan_blocks: run each stage's identical non-transition blocks as one
        `hk.scan` over their stacked weights (same parameter names and
        values; see `nfnets.models.scan`): XLA compiles one block body per
        run, which halves F7's train-step compile on CPU, for more memory
        and a slower step. Initialisation and `return_metrics` always run
        unrolled.
      depth: blocks per stage overriding the variant's (for small models).
      group_size: channels per group in the 3x3 convs (128 in all variants).
      in_channels: expected image channels (3 for every released model).
      name: Haiku module name; 'NFNet' matches the released checkpoints.
    """
    super().__init__(name=name)
    config = get_variant(variant)
    self.variant, self.num_classes = variant, num_classes
    self.drop_rate = config['drop_rate'] if drop_rate is None else drop_rate
    checks.check_model_args(
      'NFNet', num_classes, drop_rate=self.drop_rate, se_ratio=se_ratio
    )
    self.activation = layers.get_activation(activation)
    self.remat, self.scan_blocks = remat, scan_blocks
    self.in_channels = in_channels
    self.specs = block_specs(
      variant, width, alpha, stochdepth_rate, depth, group_size
    )
    # Submodules are created directly in __init__: Haiku names modules made
    # in other methods `NFNet/~_method/...`, which would break checkpoints.
    stem_channels = (*STEM_CHANNELS, config['width'][0] // 2)
    self.stem_convs = [
      layers.WSConv2D(
        ch, 3, stride=s, grouped_conv=grouped_conv, name=f'stem_conv{i}'
      )
      for i, (ch, s) in enumerate(zip(stem_channels, STEM_STRIDES, strict=True))
    ]
    self.blocks = [
      NFBlock(
        spec, alpha=alpha, se_ratio=se_ratio, activation=activation,
        use_two_convs=use_two_convs, grouped_conv=grouped_conv,
        name='nf_block',  # Haiku numbers repeats: nf_block_1, ...
      )
      for spec in self.specs
    ]  # fmt: skip
    ch = final_conv_channels(
      self.specs[-1].out_ch, final_conv_mult, final_conv_ch
    )
    self.final_conv = layers.WSConv2D(
      ch, 1, grouped_conv=grouped_conv, name='final_conv'
    )
    fc_init = fc_init or hk.initializers.RandomNormal(0.01, 0.0)
    self.fc = hk.Linear(num_classes, w_init=fc_init, with_bias=True)

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
    common.check_images(x, 'NFNet', TOTAL_STRIDE, self.in_channels)
    ends = self.stage_ends if return_features else ()
    outputs = {}
    out = x
    for i, conv in enumerate(self.stem_convs):
      out = conv(out)
      if i < len(self.stem_convs) - 1:  # No activation after the last one.
        out = self.activation(out)
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    apply_block = lambda block, y, **kw: self._apply_block(
      block, y, is_training, **kw
    )
    if self.scan_blocks and not return_metrics and not hk.running_init():
      out = scan.apply_scanned(
        self.blocks, out, apply_block, outputs=outputs, ends=ends
      )
    else:
      out = common.apply_blocks(
        self.blocks, out, apply_block, outputs, return_metrics, ends
      )
    pool = jnp.mean(self.activation(self.final_conv(out)), axis=(1, 2))
    return common.classifier_head(
      pool, self.fc, self.drop_rate, is_training, outputs
    )

  def _apply_block(self, block, x, is_training, **overrides):
    """`block(x, is_training, **overrides)`, rematerialised if `remat`."""
    if not self.remat:
      return block(x, is_training, **overrides)
    return hk.remat(lambda y: block(y, is_training, **overrides))(x)
