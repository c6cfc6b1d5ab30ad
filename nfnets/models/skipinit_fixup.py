"""SkipInit and Fixup ResNets: unnormalised baselines of the NF papers.

Both are bottleneck ResNets without normalisation layers, trained in the
NF-ResNet paper as the earlier ways of training deep ResNets without
BatchNorm. They reproduce DeepMind's reference models (`skipinit_resnet.py`
and `fixup_resnet.py` of deepmind-research/nfnets) in parameter names,
shapes, initialisation and forward pass, so their checkpoints load as they
are:

* `SkipInitResNet` (Haiku name `SkipInit_ResNet`): pre-activation blocks
  `nf_res_block[_k]` whose residual branch is multiplied by a scalar
  `skip_gain` initialised to 0 (De & Smith, 2020). The block convs
  (`conv0`, `conv1`, `conv2`, `conv_shortcut`) have biases; the stem conv
  `initial_conv` does not. The head applies the activation, pools and
  classifies (`linear`, zero-initialised).
* `FixupResNet` (Haiku name `FixUp_ResNet`): post-activation blocks
  `res_block[_k]` with scalar biases `bias1a`, `bias1b`, `bias2a`,
  `bias2b`, `bias3a`, `bias3b` and a scalar `scale` (Zhang et al., 2019),
  bias-free convs with the Fixup initialisation (`conv0` and `conv1` scaled
  by L^-1/4 for L blocks, `conv2` zero), and scalar biases `bias1` after the
  stem conv and `bias2` before the classifier.

Both take the ResNet depth variants ('ResNet50' ... 'ResNet600'), stage
widths (64, 128, 256, 512) x `width` and a 16 x `width` stem, with stochastic
depth rising linearly over the blocks: block i of N (from 0) gets
`stochdepth_rate * i / N`, as in the references. They have no state.
"""

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import checks, common, conv, layers

VARIANTS = common.RESNET_VARIANTS
TOTAL_STRIDE = 32
BOTTLENECK_RATIO = 0.25

# The activations the reference models offer, by name (plain, unscaled).
ACTIVATIONS = {
  'swish': jax.nn.silu,
  'relu': jax.nn.relu,
  'identity': lambda x: x,
}


def _block_specs(
  family: str,
  variant: str,
  width: float,
  stochdepth_rate: float,
  depth: Sequence[int] | None,
) -> list[common.BlockSpec]:
  """Sizes, strides and stochastic-depth rates of the network's blocks."""
  depth = common.resolve_depth(
    common.get_variant(VARIANTS, variant, family), depth
  )
  return common.make_block_specs(
    stem_ch=int(common.RESNET_STEM_MULTIPLIER * width),
    stage_widths=[int(m * width) for m in common.RESNET_STAGE_MULTIPLIERS],
    depth=depth,
    stage_strides=common.STAGE_STRIDES,
    alpha=1.0,  # Unused: these blocks have no beta.
    stochdepth_rate=stochdepth_rate,
    block_width=lambda _, __, out: (int(out * BOTTLENECK_RATIO), 1),
  )


def _stoch_depth(spec: common.BlockSpec):
  """The block's stochastic depth, or None when its rate is 0."""
  if 0.0 < spec.stochdepth_rate < 1.0:
    return layers.StochDepth(spec.stochdepth_rate)
  return None


class _BaselineResNet(hk.Module):
  """Stem conv, max-pool, blocks and head shared by both networks."""

  block_class = None  # Set by subclasses.
  family = ''  # The registry name, for messages.
  default_name = ''  # The reference's Haiku module name.

  def __init__(
    self,
    num_classes: int,
    variant: str = 'ResNet50',
    width: float = 4,
    stochdepth_rate: float = 0.1,
    drop_rate: float = 0.0,
    activation: str = 'relu',
    fc_init: hk.initializers.Initializer | None = None,
    depth: Sequence[int] | None = None,
    name: str | None = None,
  ):
    """Creates the model.

    Args:
      num_classes: number of output classes.
      variant: key of `VARIANTS` ('ResNet50', ..., 'ResNet600').
      width: multiplier of the stage widths (64, 128, 256, 512) and of the
        16-channel stem.
      stochdepth_rate: stochastic-depth rate the schedule rises towards:
        block i of N (from 0) gets stochdepth_rate * i / N.
      drop_rate: dropout before the classifier.
      activation: key of `ACTIVATIONS`.
      fc_init: classifier weight initialiser; default zeros (reference).
      depth: blocks per stage overriding the variant's (small models).
      name: Haiku module name; default the reference's (`default_name`).
    """
    super().__init__(name=name or self.default_name)
    self.activation = checks.get_choice(
      self.family, 'activation', activation, ACTIVATIONS
    )
    self.drop_rate = drop_rate
    checks.check_model_args(
      self.family, num_classes, width=width, drop_rate=drop_rate,
      stochdepth_rate=stochdepth_rate,
      narrowest=common.RESNET_STEM_MULTIPLIER,
    )  # fmt: skip
    specs = _block_specs(self.family, variant, width, stochdepth_rate, depth)
    self.initial_conv = conv.Conv2D(
      specs[0].in_ch, 7, stride=2, padding='SAME', with_bias=False,
      name='initial_conv',
    )  # fmt: skip
    # Built by a plain function: Haiku would prefix the names of modules
    # created in another method with '~_<method>'.
    self.blocks = _make_blocks(self.block_class, specs, self.activation)
    self.fc = hk.Linear(num_classes, w_init=fc_init or jnp.zeros)

  def stem(self, x: jax.Array) -> jax.Array:
    """The stem conv and what follows it before the max-pool."""
    return self.initial_conv(x)

  def pre_classifier(self, pool: jax.Array) -> jax.Array:
    """What the pooled features go through before the classifier."""
    return pool

  def pool(self, x: jax.Array) -> jax.Array:
    """The pooled features of the last block's output."""
    return jnp.mean(x, axis=(1, 2))

  def __call__(
    self,
    x: jax.Array,
    is_training: bool = True,
    return_metrics: bool = False,
  ) -> dict[str, jax.Array]:
    """Runs the network on NHWC float images.

    Args:
      x: images (N, H, W, 3).
      is_training: stochastic depth and dropout apply only in training.
      return_metrics: add the signal-propagation metrics of every block.

    Returns:
      A dict with 'logits', 'pool' and optionally the metrics.
    """
    common.check_images(x, self.family, TOTAL_STRIDE)
    outputs = {}
    out = hk.max_pool(self.stem(x), (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    out = common.apply_blocks(
      self.blocks, out, lambda block, y: block(y, is_training), outputs,
      return_metrics,
    )  # fmt: skip
    outputs['pool'] = pool = self.pool(out)
    if is_training and self.drop_rate > 0.0:
      pool = hk.dropout(hk.next_rng_key(), self.drop_rate, pool)
    outputs['logits'] = self.fc(self.pre_classifier(pool))
    return outputs


def _make_blocks(block_class, specs, activation) -> list[hk.Module]:
  """One block per spec, created while the network's `__init__` runs."""
  return [block_class(spec, len(specs), activation) for spec in specs]


class SkipInitBlock(hk.Module):
  """Pre-activation bottleneck block with a zero-initialised branch gain.

  `out = act(x)`; shortcut = 1x1 conv of `out` on projection blocks, else
  `x`; branch = conv0 -> act -> conv1 (strided) -> act -> conv2, then
  stochastic depth and `skip_gain`; returns `branch + shortcut` and the
  branch's average channel variance.
  """

  def __init__(self, spec, num_blocks, activation, name='nf_res_block'):
    """Creates the block from its `common.BlockSpec`."""
    super().__init__(name=name)
    del num_blocks
    self.activation = activation
    self.conv0 = conv.Conv2D(spec.width, 1, padding='SAME', name='conv0')
    self.conv1 = conv.Conv2D(
      spec.width, 3, stride=spec.stride, padding='SAME', name='conv1'
    )
    self.conv2 = conv.Conv2D(spec.out_ch, 1, padding='SAME', name='conv2')
    self.conv_shortcut = None
    if spec.use_projection:
      self.conv_shortcut = conv.Conv2D(
        spec.out_ch, 1, stride=spec.stride, padding='SAME',
        name='conv_shortcut',
      )  # fmt: skip
    self.stoch_depth = _stoch_depth(spec)

  def __call__(self, x: jax.Array, is_training: bool):
    """Applies the block to NHWC `x`; returns (output, res_avg_var)."""
    out = self.activation(x)
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv2(self.activation(out))
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    skip_gain = hk.get_parameter('skip_gain', (), out.dtype, init=jnp.zeros)
    return out * skip_gain + shortcut, res_avg_var


class SkipInitResNet(_BaselineResNet):
  """Pre-activation ResNet with SkipInit (see the module docstring)."""

  block_class = SkipInitBlock
  family = default_name = 'SkipInit_ResNet'

  def pool(self, x: jax.Array) -> jax.Array:
    """The activation of the last block's output, averaged over space."""
    return jnp.mean(self.activation(x), axis=(1, 2))


class FixupBlock(hk.Module):
  """Post-activation bottleneck block with Fixup's scalar biases and scale.

  shortcut = `x + bias1a`, through a 1x1 conv on projection blocks;
  branch = conv0(x + bias1a) -> act(+ bias1b) -> conv1(+ bias2a, strided)
  -> act(+ bias2b) -> conv2(+ bias3a) -> * scale + bias3b, then stochastic
  depth; returns `act(branch + shortcut)` and the branch's average channel
  variance.
  """

  def __init__(self, spec, num_blocks, activation, name='res_block'):
    """Creates the block; convs get Fixup's depth-scaled initialisation."""
    super().__init__(name=name)
    self.activation = activation
    normal = hk.initializers.RandomNormal
    depth_scale = num_blocks**-0.25
    self.conv0 = conv.Conv2D(
      spec.width, 1, padding='SAME', with_bias=False, name='conv0',
      w_init=normal((2 / spec.width) ** 0.5 * depth_scale),
    )  # fmt: skip
    self.conv1 = conv.Conv2D(
      spec.width, 3, stride=spec.stride, padding='SAME', with_bias=False,
      name='conv1', w_init=normal((2 / (spec.width * 9)) ** 0.5 * depth_scale),
    )  # fmt: skip
    self.conv2 = conv.Conv2D(
      spec.out_ch, 1, padding='SAME', with_bias=False, name='conv2',
      w_init=jnp.zeros,
    )  # fmt: skip
    self.conv_shortcut = None
    if spec.use_projection:
      self.conv_shortcut = conv.Conv2D(
        spec.out_ch, 1, stride=spec.stride, padding='SAME', with_bias=False,
        name='conv_shortcut', w_init=normal((2 / spec.out_ch) ** 0.5),
      )  # fmt: skip
    self.stoch_depth = _stoch_depth(spec)

  def __call__(self, x: jax.Array, is_training: bool):
    """Applies the block to NHWC `x`; returns (output, res_avg_var)."""
    names = ('bias1a', 'bias1b', 'bias2a', 'bias2b', 'bias3a', 'bias3b')
    bias = {n: hk.get_parameter(n, (), x.dtype, init=jnp.zeros) for n in names}
    scale = hk.get_parameter('scale', (), x.dtype, init=jnp.ones)
    out = x + bias['bias1a']
    shortcut = out if self.conv_shortcut is None else self.conv_shortcut(out)
    out = self.activation(self.conv0(out) + bias['bias1b'])
    out = self.activation(self.conv1(out + bias['bias2a']) + bias['bias2b'])
    out = self.conv2(out + bias['bias3a']) * scale + bias['bias3b']
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    return self.activation(out + shortcut), res_avg_var


class FixupResNet(_BaselineResNet):
  """Post-activation ResNet with Fixup (see the module docstring)."""

  block_class = FixupBlock
  family = 'Fixup_ResNet'
  default_name = 'FixUp_ResNet'

  def stem(self, x: jax.Array) -> jax.Array:
    """The stem conv, the scalar `bias1` and the activation."""
    out = self.initial_conv(x)
    bias1 = hk.get_parameter('bias1', (), x.dtype, init=jnp.zeros)
    return self.activation(out + bias1)

  def pre_classifier(self, pool: jax.Array) -> jax.Array:
    """The pooled features plus the scalar `bias2`."""
    return pool + hk.get_parameter('bias2', (), pool.dtype, init=jnp.zeros)
