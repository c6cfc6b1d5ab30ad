"""BatchNorm ResNet baselines (pre- and post-activation, optionally SE).

`ResNet` reproduces `deepmind-research/nfnets/resnet.py`, the baselines the
NF-ResNet and NFNet papers compare against, with the same Haiku names:
`ResNet/~/initial_conv`, `initial_bn` (post-activation only),
`res_block_v2` / `res_block_v1` (numbered `_1`, `_2`, ...) with `bn0`,
`conv0`, `bn1`, `conv1`, `bn2`, `conv2`, `conv_shortcut` and
`squeeze_excite` (as `<block>/~/<layer>`), plus `<block>/shortcut_bn` on
post-activation projection blocks (built in `__call__`, as the reference
does), then `final_bn` (pre-activation only) and `linear`.

BatchNorm keeps running statistics in Haiku *state*, so build the network
with `hk.transform_with_state` (see `make_transformed`); `apply` returns
`(outputs, new_state)`. BatchNorm is `hk.BatchNorm(create_scale=True,
create_offset=True, decay_rate=0.9)` as in the reference config. Convs are
plain convolutions without bias (`nfnets.models.conv.Conv2D`: `hk.Conv2D`'s
parameters, the convolution forms of `nfnets.ops`); the classifier is
zero-initialised.

`norm='none'` removes every normalisation layer. With `conv_init='he'` this
is the unnormalised, unscaled ResNet whose residual stream variance doubles
with every block, the counter-example of the signal-propagation plots.
"""

import functools
from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import checks, common, conv, layers

# The depth variants are the NF-ResNets' (ResNet50 ... ResNet600).
VARIANTS = common.RESNET_VARIANTS
TOTAL_STRIDE = 32
NORMS = ('batch_norm', 'none')
BN_DECAY = 0.9

# The plain (not gamma-scaled) element-wise activations a BN ResNet takes,
# by their `jax.nn` names (the reference looks the name up in `jax.nn`,
# where 'one_hot' or 'initializers' would also resolve).
ACTIVATIONS = {
  name: getattr(jax.nn, name)
  for name in (
    'celu', 'elu', 'gelu', 'hard_sigmoid', 'hard_silu', 'hard_swish',
    'hard_tanh', 'leaky_relu', 'log_sigmoid', 'relu', 'relu6', 'selu',
    'sigmoid', 'silu', 'soft_sign', 'softplus', 'swish', 'tanh',
  )
}  # fmt: skip

# Conv initialisers: 'default' is hk.Conv2D's (truncated normal with std
# 1/sqrt(fan_in), as in the reference); 'he' preserves the second moment
# through ReLU (std sqrt(2/fan_in)), the usual choice without normalisation.
CONV_INITS = ('default', 'he')


def make_conv_init(conv_init: str) -> hk.initializers.Initializer | None:
  """Returns the kernel initialiser named `conv_init` (None = Haiku's)."""
  if conv_init not in CONV_INITS:
    raise ValueError(
      f'Unknown conv_init {conv_init!r}; choose one of {CONV_INITS}.'
    )
  if conv_init == 'he':
    return hk.initializers.VarianceScaling(2.0, 'fan_in', 'truncated_normal')
  return None


class _NoNorm:
  """Stands in for a norm layer when `norm='none'` (no parameters)."""

  def __init__(self, name: str | None = None):
    del name

  def __call__(self, x, is_training, test_local_stats=False):
    del is_training, test_local_stats
    return x


def make_norm(norm: str, bn_decay: float = BN_DECAY) -> Callable:
  """Returns a constructor `(name=...) -> norm layer` for `norm`.

  Args:
    norm: 'batch_norm' or 'none'.
    bn_decay: BatchNorm moving-average decay.

  Returns:
    A callable building a module `m(x, is_training, test_local_stats)`.
  """
  if norm not in NORMS:
    raise ValueError(f'Unknown norm {norm!r}; choose one of {NORMS}.')
  if norm == 'none':
    return _NoNorm
  return functools.partial(
    hk.BatchNorm, create_scale=True, create_offset=True, decay_rate=bn_decay
  )


class ResBlock(hk.Module):
  """Bottleneck block 1x1 -> 3x3 (strided) -> 1x1, pre- or post-activation.

  Pre-activation (v2): `out = act(bn0(x))`; shortcut = strided 1x1 conv of
  `out` on projection blocks, else `x`; branch = conv0 -> act(bn1) -> conv1
  -> act(bn2) -> conv2 [-> SE]; returns `branch + shortcut`.
  Post-activation (v1): shortcut = shortcut_bn(conv_shortcut(x)) or `x`;
  branch = act(bn0(conv0 x)) -> act(bn1(conv1)) -> bn2(conv2) [-> SE];
  returns `act(branch + shortcut)`. The SE gate is a plain sigmoid (no x2).
  Both also return the branch's average channel variance.
  """

  def __init__(
    self,
    out_ch: int,
    stride: int = 1,
    use_projection: bool = False,
    preactivation: bool = True,
    activation: Callable = jax.nn.relu,
    which_norm: Callable = hk.BatchNorm,
    use_se: bool = False,
    se_ratio: float = 0.25,
    w_init: hk.initializers.Initializer | None = None,
    name: str | None = None,
  ):
    """Creates the block (see the class docstring for the two orders)."""
    super().__init__(name=name)
    self.stride, self.use_projection = stride, use_projection
    self.preactivation = preactivation
    self.activation, self.which_norm = activation, which_norm
    width = max(1, out_ch // 4)
    make_conv = functools.partial(
      conv.Conv2D, with_bias=False, padding='SAME', w_init=w_init
    )
    self.bn0 = which_norm(name='bn0')
    self.conv0 = make_conv(width, 1, name='conv0')
    self.bn1 = which_norm(name='bn1')
    self.conv1 = make_conv(width, 3, stride=stride, name='conv1')
    self.bn2 = which_norm(name='bn2')
    self.conv2 = make_conv(out_ch, 1, name='conv2')
    if use_projection:
      self.conv_shortcut = make_conv(
        out_ch, 1, stride=stride, name='conv_shortcut'
      )
    self.se = None
    if use_se:
      self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio, gate_scale=1.0)

  def __call__(self, x, is_training: bool, test_local_stats: bool = False):
    """Applies the block to NHWC `x`; returns (output, res_avg_var)."""
    norm_args = (is_training, test_local_stats)
    if self.preactivation:
      out = self.activation(self.bn0(x, *norm_args))
      shortcut = self.conv_shortcut(out) if self.use_projection else x
      out = self.conv0(out)
      out = self.conv1(self.activation(self.bn1(out, *norm_args)))
      out = self.conv2(self.activation(self.bn2(out, *norm_args)))
    else:
      shortcut = x
      if self.use_projection:
        shortcut = self.which_norm(name='shortcut_bn')(
          self.conv_shortcut(x), *norm_args
        )
      out = self.activation(self.bn0(self.conv0(x), *norm_args))
      out = self.activation(self.bn1(self.conv1(out), *norm_args))
      out = self.bn2(self.conv2(out), *norm_args)
    if self.se is not None:
      out = self.se(out)
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    out = out + shortcut
    if not self.preactivation:
      out = self.activation(out)
    return out, res_avg_var


def _make_blocks(
  width, depth, preactivation, activation, which_norm, use_se, se_ratio, w_init
) -> list[ResBlock]:
  """The ResNet's blocks, named `res_block_v2[_k]` or `res_block_v1[_k]`."""
  name = 'res_block_v2' if preactivation else 'res_block_v1'
  blocks = []
  for mult, stage_depth, stride in zip(
    common.RESNET_STAGE_MULTIPLIERS, depth, common.STAGE_STRIDES, strict=True
  ):
    for block_index in range(stage_depth):
      blocks.append(
        ResBlock(
          int(mult * width),
          stride=stride if block_index == 0 else 1,
          use_projection=block_index == 0,
          preactivation=preactivation,
          activation=activation,
          which_norm=which_norm,
          use_se=use_se,
          se_ratio=se_ratio,
          w_init=w_init,
          name=name,
        )
      )
  return blocks


class ResNet(hk.Module):
  """BatchNorm (or unnormalised) ResNet, v2 (pre-act) or v1 (post-act).

  Called as `model(images, is_training, test_local_stats=False,
  return_metrics=False, return_features=False)`; returns a dict with
  'logits', 'pool'; with `return_metrics`, the same signal-propagation
  metrics as the NF models; with `return_features`, 'features': the four
  stages' outputs at strides 4-32 (as in the NF models; v2's are before
  `final_bn` and its activation, v1's after each block's own activation).
  Needs `hk.transform_with_state` when `norm='batch_norm'`.
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = 'ResNet50',
    width: float = 4,
    preactivation: bool = True,
    use_se: bool = False,
    se_ratio: float = 0.25,
    norm: str = 'batch_norm',
    bn_decay: float = BN_DECAY,
    activation: str = 'relu',
    drop_rate: float = 0.0,
    fc_init: hk.initializers.Initializer | None = None,
    conv_init: str = 'default',
    depth: Sequence[int] | None = None,
    name: str = 'ResNet',
  ):
    """Creates the model.

    Args:
      num_classes: number of output classes.
      variant: key of `VARIANTS` ('ResNet50', ..., 'ResNet600').
      width: multiplier of (64, 128, 256, 512) and of the 16-channel stem.
      preactivation: True for ResNet v2 (BN-ReLU-conv), False for v1.
      use_se: squeeze-excite in every block (SE-ResNets).
      se_ratio: squeeze-excite hidden width as a fraction of the block's
        output channels, in (0, 1].
      norm: 'batch_norm' or 'none' (no normalisation at all).
      bn_decay: BatchNorm moving-average decay, in [0, 1).
      activation: key of `ACTIVATIONS` (plain `jax.nn` functions, not
        gamma-scaled).
      drop_rate: dropout before the classifier.
      fc_init: classifier weight initialiser; default zeros (reference).
      conv_init: 'default' (Haiku's, the reference) or 'he' (see
        `CONV_INITS`).
      depth: blocks per stage overriding the variant's (for small models).
      name: Haiku module name; 'ResNet' as in the reference.
    """
    super().__init__(name=name)
    depth = common.resolve_depth(
      common.get_variant(VARIANTS, variant, 'ResNet'), depth
    )
    checks.check_model_args(
      'ResNet', num_classes, width=width, drop_rate=drop_rate,
      narrowest=common.RESNET_STEM_MULTIPLIER, se_ratio=se_ratio,
      bn_decay=bn_decay,
    )  # fmt: skip
    self.norm = norm
    self.activation = checks.get_choice(
      'ResNet', 'activation', activation, ACTIVATIONS
    )
    self.preactivation, self.drop_rate = preactivation, drop_rate
    self.which_norm = make_norm(norm, bn_decay)
    w_init = make_conv_init(conv_init)
    self.initial_conv = conv.Conv2D(
      int(common.RESNET_STEM_MULTIPLIER * width),
      7,
      stride=2,
      with_bias=False,
      padding='SAME',
      w_init=w_init,
      name='initial_conv',
    )
    if not preactivation:
      self.initial_bn = self.which_norm(name='initial_bn')
    # Built by a plain function: Haiku would prefix the names of modules
    # created in another method with '~_<method>'.
    self.blocks = _make_blocks(
      width, depth, preactivation, self.activation, self.which_norm,
      use_se, se_ratio, w_init,
    )  # fmt: skip
    self.stage_ends = common.stage_ends(
      [block.use_projection for block in self.blocks]
    )
    if preactivation:
      self.final_bn = self.which_norm(name='final_bn')
    self.fc = hk.Linear(num_classes, w_init=fc_init or jnp.zeros)

  def __call__(
    self,
    x: jax.Array,
    is_training: bool = True,
    test_local_stats: bool = False,
    return_metrics: bool = False,
    return_features: bool = False,
  ) -> dict[str, jax.Array]:
    """Runs the network on NHWC float images; see the class docstring."""
    common.check_images(x, 'ResNet', TOTAL_STRIDE)
    if self.norm == 'batch_norm':
      checks.check_bn_init('ResNet', is_training, test_local_stats)
    ends = self.stage_ends if return_features else ()
    norm_args = (is_training, test_local_stats)
    outputs = {}
    out = self.initial_conv(x)
    if not self.preactivation:
      out = self.activation(self.initial_bn(out, *norm_args))
    out = hk.max_pool(out, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    out = common.apply_blocks(
      self.blocks, out, lambda block, y: block(y, *norm_args), outputs,
      return_metrics, ends,
    )  # fmt: skip
    if self.preactivation:
      out = self.activation(self.final_bn(out, *norm_args))
    pool = jnp.mean(out, axis=(1, 2))
    return common.classifier_head(
      pool, self.fc, self.drop_rate, is_training, outputs
    )


def make_transformed(num_classes: int, **kwargs) -> hk.TransformedWithState:
  """`hk.transform_with_state` of a `ResNet(num_classes, **kwargs)` forward.

  Args:
    num_classes: classifier width.
    **kwargs: `ResNet` constructor arguments.

  Returns:
    Transformed `forward(images, is_training, test_local_stats=False,
    return_metrics=False)`; `init(rng, images, is_training)` gives
    `(params, state)` and `apply(params, state, rng, images, is_training)`
    gives `(outputs, state)`.
  """

  def forward(images, is_training, test_local_stats=False, **call_kwargs):
    model = ResNet(num_classes=num_classes, **kwargs)
    return model(images, is_training, test_local_stats, **call_kwargs)

  return hk.transform_with_state(forward)
