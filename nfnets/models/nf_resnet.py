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

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import checks, common, layers

# Registry of depth variants: name -> dict(depth=blocks per stage), shared
# with the BN baselines (`nfnets.models.resnet`).
VARIANTS = common.RESNET_VARIANTS

STAGE_MULTIPLIERS = common.RESNET_STAGE_MULTIPLIERS
STAGE_STRIDES = common.STAGE_STRIDES
STEM_MULTIPLIER = common.RESNET_STEM_MULTIPLIER
TOTAL_STRIDE = 32
BOTTLENECK_RATIO = 0.25


def get_variant(name: str) -> dict:
  """Returns the `VARIANTS` entry `name`; the error lists valid names."""
  return common.get_variant(VARIANTS, name, 'ResNet')


def resolve_depth(variant: str, depth: Sequence[int] | None) -> tuple:
  """Blocks per stage: `depth` if given (for small models), else the variant's.

  Args:
    variant: key of `VARIANTS`.
    depth: optional override, four positive ints.

  Returns:
    A tuple of four ints.
  """
  return common.resolve_depth(get_variant(variant), depth)


def _bottleneck(index: int, in_ch: int, out_ch: int) -> tuple[int, int]:
  """Bottleneck width (a quarter of the output) and groups (always 1)."""
  del index, in_ch
  return max(1, int(out_ch * BOTTLENECK_RATIO)), 1


def block_specs(
  variant: str = 'ResNet50',
  width: float = 4,
  alpha: float = 0.2,
  stochdepth_rate: float = 0.1,
  depth: Sequence[int] | None = None,
) -> list[common.BlockSpec]:
  """The per-block hyperparameters of an NF-ResNet, in order.

  Betas follow `common.residual_betas`, exactly as in the reference.

  Args:
    variant: key of `VARIANTS`.
    width: multiplier of (64, 128, 256, 512) and of the 16-channel stem.
    alpha: residual branch scale.
    stochdepth_rate: block i of N (from 0) gets rate * i / N.
    depth: blocks per stage overriding the variant's.

  Returns:
    One `common.BlockSpec` per block.
  """
  return common.make_block_specs(
    stem_ch=int(STEM_MULTIPLIER * width),
    stage_widths=[int(mult * width) for mult in STAGE_MULTIPLIERS],
    depth=resolve_depth(variant, depth),
    stage_strides=STAGE_STRIDES,
    alpha=alpha,
    stochdepth_rate=stochdepth_rate,
    block_width=_bottleneck,
  )


class NFResBlock(common.NFResidualBlock):
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
    spec: common.BlockSpec,
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
    super().__init__(
      spec,
      alpha=alpha,
      activation=activation,
      pool_shortcut=False,
      skip_init=hk.initializers.Constant(skipinit_gain),
      name=name,
    )
    self.conv0 = layers.WSConv2D(spec.width, 1, name='conv0')
    self.conv1 = layers.WSConv2D(
      spec.width, 3, stride=spec.stride, name='conv1'
    )
    self.conv2 = layers.WSConv2D(spec.out_ch, 1, name='conv2')
    self.se = None
    if use_se:
      self.se = layers.SqueezeExcite(spec.out_ch, spec.out_ch, se_ratio)

  def branch(self, out: jax.Array, *, in_loop: bool = False) -> jax.Array:
    """conv0 -> act -> conv1 -> act -> conv2 [-> squeeze-excite]."""
    out = self.conv0(out, in_loop=in_loop)
    out = self.conv1(self.activation(out), in_loop=in_loop)
    out = self.conv2(self.activation(out), in_loop=in_loop)
    return out if self.se is None else self.se(out)


class NFResNet(hk.Module):
  """Normalizer-Free pre-activation ResNet (NF-ResNet-50 ... 600).

  Called as `model(images, is_training, return_metrics=False,
  return_features=False)` on NHWC float images; returns a dict with
  'logits', 'pool'; with `return_metrics`, the signal-propagation metrics
  `avg_sq_mean_i`, `avg_var_i` (stem output i=0, block k output i=k+1) and
  `res_avg_var_k`; with `return_features`, 'features': the four stages'
  outputs at strides 4-32, before any activation (as in
  `nfnets.models.nfnet.NFNet`; the stem's max pool brings stage 1 to 4).

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
      stochdepth_rate: stochastic-depth schedule: block i of N (from 0)
        gets rate * i / N.
      drop_rate: dropout before the classifier (None = 0).
      activation: key of `nfnets.models.layers.ACTIVATIONS` (reference: 'relu').
      fc_init: classifier weight initialiser; default N(0, 0.01).
      skipinit_gain: initial value of every block's `skip_gain` (0 as in
        the reference; 1 shows the branches' contribution in SPPs).
      use_se: squeeze-excite in every block (NF-SE-ResNets).
      se_ratio: squeeze-excite hidden width as a fraction of the block's
        output channels, in (0, 1].
      depth: blocks per stage overriding the variant's (for small models).
      name: Haiku module name; 'NF_ResNet' as in the reference.
    """
    super().__init__(name=name)
    self.num_classes = num_classes
    self.drop_rate = 0.0 if drop_rate is None else drop_rate
    checks.check_model_args(
      'NF_ResNet', num_classes, width=width, drop_rate=self.drop_rate,
      stochdepth_rate=stochdepth_rate, narrowest=STEM_MULTIPLIER,
      se_ratio=se_ratio,
    )  # fmt: skip
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
    common.check_images(x, 'NF-ResNet', TOTAL_STRIDE)
    ends = self.stage_ends if return_features else ()
    outputs = {}
    out = self.initial_conv(x)
    out = hk.max_pool(out, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    out = common.apply_blocks(
      self.blocks, out, lambda block, y: block(y, is_training), outputs,
      return_metrics, ends,
    )  # fmt: skip
    pool = jnp.mean(self.activation(out), axis=(1, 2))
    return common.classifier_head(
      pool, self.fc, self.drop_rate, is_training, outputs
    )
