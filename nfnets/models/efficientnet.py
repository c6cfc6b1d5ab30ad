"""EfficientNet-B0 to B7: the BatchNorm networks the NFNet paper compares to.

The TPU EfficientNet architecture (Tan & Le, 2019): a 3x3 stride-2 stem,
seven stages of MBConv blocks and a 1x1 head conv, each conv followed by
BatchNorm (decay 0.99, eps 1e-3) and swish. An MBConv block is

    [1x1 expand conv -> BN -> swish]   (when the expansion ratio is not 1)
    kxk depthwise conv (strided) -> BN -> swish
    squeeze-excite: mean over HW -> se_reduce -> swish -> se_expand ->
      sigmoid gate (hidden width int(0.25 * the block's input channels))
    1x1 project conv -> BN
    [drop-connect, + input]            (stride 1, same channels)

B1-B7 scale the B0 stage widths by `width` (rounded to multiples of 8 by
`round_filters`) and the stage depths by `depth` (rounded up), and train at
their own resolution; `VARIANTS` lists the compound-scaling coefficients,
resolutions and classifier dropout. Drop-connect (per-example dropping of
the residual branch, rescaled by 1 / keep) rises linearly over the blocks:
block i of N (from 0) gets `drop_connect_rate * i / N`, so the first has
none and the last (N - 1) / N of `drop_connect_rate`, as in the TPU code.

Haiku names: `EfficientNet/~/stem_conv`, `stem_bn`, then one
`mb_conv_block[_k]` per block holding `expand_conv`, `expand_bn`,
`depthwise_conv`, `depthwise_bn`, `se_reduce`, `se_expand`, `project_conv`
and `project_bn`, then `head_conv`, `head_bn` and `linear`. Convolutions
have no bias (BatchNorm's offset follows); the squeeze-excite layers and
the classifier have one. BatchNorm keeps its moving statistics in Haiku
*state*, as in the BN `ResNet` baseline: build the network with
`hk.transform_with_state` (the registry's `make_model` does).
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import ops
from nfnets.models import checks, common, conv, layers

TOTAL_STRIDE = 32
BN_DECAY = 0.99
BN_EPS = 1e-3
SE_RATIO = 0.25
FILTER_DIVISOR = 8
STEM_CH = 32
HEAD_CH = 1280
DROP_CONNECT_RATE = 0.2

# Compound scaling: width and depth coefficients, train and test
# resolution (the same for EfficientNets), dropout before the classifier.
VARIANTS = common.variant_table(
  ('width', 'depth', 'train_imsize', 'test_imsize', 'drop_rate'),
  {
    'B0': (1.0, 1.0, 224, 224, 0.2),
    'B1': (1.0, 1.1, 240, 240, 0.2),
    'B2': (1.1, 1.2, 260, 260, 0.3),
    'B3': (1.2, 1.4, 300, 300, 0.3),
    'B4': (1.4, 1.8, 380, 380, 0.4),
    'B5': (1.6, 2.2, 456, 456, 0.4),
    'B6': (1.8, 2.6, 528, 528, 0.5),
    'B7': (2.0, 3.1, 600, 600, 0.5),
  },
)


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of B0: repeats of an MBConv block (the first one strided)."""

  repeats: int
  kernel: int
  stride: int
  expand_ratio: int
  in_ch: int
  out_ch: int


# B0's seven stages; the other variants scale channels and repeats.
STAGES = (
  StageSpec(1, 3, 1, 1, 32, 16),
  StageSpec(2, 3, 2, 6, 16, 24),
  StageSpec(2, 5, 2, 6, 24, 40),
  StageSpec(3, 3, 2, 6, 40, 80),
  StageSpec(3, 5, 1, 6, 80, 112),
  StageSpec(4, 5, 2, 6, 112, 192),
  StageSpec(1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class MBConvSpec:
  """Sizes of one MBConv block.

  Attributes:
    in_ch: input channels.
    out_ch: output channels.
    expand_ratio: expanded width as a multiple of `in_ch`.
    kernel: depthwise kernel size.
    stride: depthwise stride.
    drop_connect_rate: the block's drop-connect rate.
  """

  in_ch: int
  out_ch: int
  expand_ratio: int
  kernel: int
  stride: int
  drop_connect_rate: float

  @property
  def expanded_ch(self) -> int:
    """Channels of the depthwise conv."""
    return self.in_ch * self.expand_ratio

  @property
  def se_ch(self) -> int:
    """Squeeze-excite hidden width: a ratio of the block's input channels."""
    return max(1, int(self.in_ch * SE_RATIO))

  @property
  def has_skip(self) -> bool:
    """Whether the block adds its input (same shape in and out)."""
    return self.stride == 1 and self.in_ch == self.out_ch


def round_filters(filters: int, width: float) -> int:
  """Channels scaled by `width`, rounded to the nearest multiple of 8.

  Never rounds below 8 channels, nor more than 10% down.

  Args:
    filters: B0's channels.
    width: the width coefficient.

  Returns:
    The scaled channel count.
  """
  scaled = filters * width
  rounded = max(
    FILTER_DIVISOR,
    int(scaled + FILTER_DIVISOR / 2) // FILTER_DIVISOR * FILTER_DIVISOR,
  )
  if rounded < 0.9 * scaled:
    rounded += FILTER_DIVISOR
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  """A stage's blocks scaled by the depth coefficient, rounded up."""
  return int(math.ceil(depth * repeats))


def block_specs(
  width: float, depth: float, drop_connect_rate: float = DROP_CONNECT_RATE
) -> list[MBConvSpec]:
  """The MBConv blocks of the network with the given coefficients.

  Args:
    width: width coefficient (channels, via `round_filters`).
    depth: depth coefficient (repeats, via `round_repeats`).
    drop_connect_rate: the rate the schedule rises towards: block i of N
      (from 0) has rate * i / N, the last (N - 1) / N of it.

  Returns:
    One `MBConvSpec` per block, in order.
  """
  layout = []
  for stage in STAGES:
    in_ch = round_filters(stage.in_ch, width)
    out_ch = round_filters(stage.out_ch, width)
    for i in range(round_repeats(stage.repeats, depth)):
      stride = stage.stride if i == 0 else 1
      layout.append((in_ch if i == 0 else out_ch, out_ch, stage, stride))
  return [
    MBConvSpec(
      in_ch=in_ch,
      out_ch=out_ch,
      expand_ratio=stage.expand_ratio,
      kernel=stage.kernel,
      stride=stride,
      drop_connect_rate=drop_connect_rate * index / len(layout),
    )
    for index, (in_ch, out_ch, stage, stride) in enumerate(layout)
  ]


def get_variant(variant: str) -> dict:
  """Returns `VARIANTS[variant]`; the error lists the valid names."""
  return common.get_variant(VARIANTS, variant, 'EfficientNet')


# Initialisers of the TPU implementation: convs from N(0, 2 / fan_out)
# (fan_out = kh * kw * out; a depthwise filter's is kh * kw), the
# classifier from U(-1/sqrt(out), 1/sqrt(out)).
CONV_INIT = hk.initializers.VarianceScaling(2.0, 'fan_out', 'normal')
DENSE_INIT = hk.initializers.VarianceScaling(1.0 / 3.0, 'fan_out', 'uniform')


def _conv2d(
  out_ch: int, kernel: int, stride: int = 1, name: str | None = None
) -> conv.Conv2D:
  """A bias-free NHWC/HWIO convolution with 'SAME' padding (kernel `w`),
  in the backend's fast form (`nfnets.models.conv.Conv2D`)."""
  return conv.Conv2D(
    out_ch, kernel, stride=stride, with_bias=False, padding='SAME',
    w_init=CONV_INIT, name=name,
  )  # fmt: skip


class DepthwiseConv2D(hk.Module):
  """A bias-free depthwise conv, kernel `w` of shape (k, k, 1, channels).

  Runs through `nfnets.ops.depthwise_conv2d` in the form `mode` resolves
  to (`nfnets.ops.resolve_depthwise_conv`).
  """

  def __init__(
    self,
    kernel: int,
    stride: int = 1,
    mode: str = 'auto',
    name: str | None = None,
  ):
    """Creates the module (square kernel size, stride, conv mode)."""
    super().__init__(name=name)
    self.kernel, self.stride = kernel, stride
    self.mode = ops.resolve_depthwise_conv(mode)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Convolves each channel of NHWC `x` with its own filter."""
    shape = (self.kernel, self.kernel, 1, x.shape[-1])
    init = hk.initializers.RandomNormal(math.sqrt(2.0 / self.kernel**2))
    w = hk.get_parameter('w', shape, x.dtype, init=init)
    return ops.depthwise_conv2d(
      x,
      w.astype(x.dtype),
      stride=(self.stride, self.stride),
      padding='SAME',
      mode=self.mode,
    )


class MBConvBlock(hk.Module):
  """Mobile inverted bottleneck with squeeze-excite (see module docstring).

  Calling it returns the output and the branch's average channel variance
  (before drop-connect).
  """

  def __init__(
    self,
    spec: MBConvSpec,
    which_norm: Callable,
    depthwise_conv: str = 'auto',
    name: str | None = 'mb_conv_block',
  ):
    """Creates the block's layers.

    Args:
      spec: the block's sizes.
      which_norm: constructor `(name=...) -> BatchNorm`.
      depthwise_conv: depthwise conv mode (`nfnets.ops`).
      name: Haiku module name.
    """
    super().__init__(name=name)
    self.spec = spec
    self.expand_conv = self.expand_bn = None
    if spec.expand_ratio != 1:
      self.expand_conv = _conv2d(spec.expanded_ch, 1, name='expand_conv')
      self.expand_bn = which_norm(name='expand_bn')
    self.depthwise_conv = DepthwiseConv2D(
      spec.kernel, spec.stride, depthwise_conv, name='depthwise_conv'
    )
    self.depthwise_bn = which_norm(name='depthwise_bn')
    self.se_reduce = hk.Linear(spec.se_ch, w_init=CONV_INIT, name='se_reduce')
    self.se_expand = hk.Linear(
      spec.expanded_ch, w_init=CONV_INIT, name='se_expand'
    )
    self.project_conv = _conv2d(spec.out_ch, 1, name='project_conv')
    self.project_bn = which_norm(name='project_bn')
    self.drop_connect = None
    if spec.has_skip and spec.drop_connect_rate > 0.0:
      self.drop_connect = layers.StochDepth(
        spec.drop_connect_rate, scale_by_keep=True, name='drop_connect'
      )

  def __call__(self, x, is_training: bool, test_local_stats: bool = False):
    """Applies the block to NHWC `x`; returns (output, res_avg_var)."""
    norm_args = (is_training, test_local_stats)
    out = x
    if self.expand_conv is not None:
      out = jax.nn.swish(self.expand_bn(self.expand_conv(out), *norm_args))
    out = jax.nn.swish(self.depthwise_bn(self.depthwise_conv(out), *norm_args))
    gate = jax.nn.swish(self.se_reduce(jnp.mean(out, axis=(1, 2))))
    gate = jax.nn.sigmoid(self.se_expand(gate))
    out = out * gate[:, None, None, :]
    out = self.project_bn(self.project_conv(out), *norm_args)
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    if self.spec.has_skip:
      if self.drop_connect is not None:
        out = self.drop_connect(out, is_training)
      out = out + x
    return out, res_avg_var


def make_norm(bn_decay: float = BN_DECAY, bn_eps: float = BN_EPS) -> Callable:
  """Returns the BatchNorm constructor `(name=...) -> hk.BatchNorm`."""
  return functools.partial(
    hk.BatchNorm,
    create_scale=True,
    create_offset=True,
    decay_rate=bn_decay,
    eps=bn_eps,
  )


class EfficientNet(hk.Module):
  """EfficientNet-B0 ... B7 with BatchNorm (see the module docstring).

  Called as `model(images, is_training, test_local_stats=False,
  return_metrics=False)`, like the BN `ResNet`; returns a dict with
  'logits', 'pool' and, with `return_metrics`, the signal-propagation
  metrics of the NF models (per block). Needs `hk.transform_with_state`.
  """

  def __init__(
    self,
    num_classes: int,
    variant: str = 'B0',
    width: float | None = None,
    depth: float | None = None,
    drop_rate: float | None = None,
    drop_connect_rate: float = DROP_CONNECT_RATE,
    bn_decay: float = BN_DECAY,
    bn_eps: float = BN_EPS,
    depthwise_conv: str = 'auto',
    name: str = 'EfficientNet',
  ):
    """Creates the model.

    Args:
      num_classes: number of output classes.
      variant: key of `VARIANTS` ('B0', ..., 'B7').
      width: width coefficient overriding the variant's (small test
        models), > 0.
      depth: compound-scaling depth coefficient overriding the variant's:
        a number > 0 multiplying every stage's repeats (rounded up), not
        the blocks per stage of the ResNet-style families.
      drop_rate: dropout before the classifier; None = the variant's.
      drop_connect_rate: in [0, 1); block i of N (from 0) gets
        drop_connect_rate * i / N, the last (N - 1) / N of it.
      bn_decay: BatchNorm moving-average decay (TensorFlow's momentum), in
        [0, 1).
      bn_eps: BatchNorm epsilon, > 0.
      depthwise_conv: 'auto' | 'shifted' | 'native' (see
        `nfnets.ops.resolve_depthwise_conv`).
      name: Haiku module name.
    """
    super().__init__(name=name)
    config = get_variant(variant)
    width = config['width'] if width is None else width
    depth = config['depth'] if depth is None else depth
    self.drop_rate = config['drop_rate'] if drop_rate is None else drop_rate
    checks.check_model_args(
      'EfficientNet', num_classes, width=width, drop_rate=self.drop_rate,
      drop_connect_rate=drop_connect_rate, bn_decay=bn_decay, bn_eps=bn_eps,
    )  # fmt: skip
    checks.check_depth_coefficient('EfficientNet', depth)
    which_norm = make_norm(bn_decay, bn_eps)
    self.stem_conv = _conv2d(
      round_filters(STEM_CH, width), 3, stride=2, name='stem_conv'
    )
    self.stem_bn = which_norm(name='stem_bn')
    # Built by a plain function: Haiku would prefix the names of modules
    # created in another method with '~_<method>'.
    self.blocks = _make_blocks(
      block_specs(width, depth, drop_connect_rate), which_norm, depthwise_conv
    )
    self.head_conv = _conv2d(round_filters(HEAD_CH, width), 1, name='head_conv')
    self.head_bn = which_norm(name='head_bn')
    self.fc = hk.Linear(num_classes, w_init=DENSE_INIT)

  def __call__(
    self,
    x: jax.Array,
    is_training: bool = True,
    test_local_stats: bool = False,
    return_metrics: bool = False,
  ) -> dict[str, jax.Array]:
    """Runs the network on NHWC float images; see the class docstring."""
    common.check_images(x, 'EfficientNet', TOTAL_STRIDE)
    checks.check_bn_init('EfficientNet', is_training, test_local_stats)
    norm_args = (is_training, test_local_stats)
    outputs = {}
    out = jax.nn.swish(self.stem_bn(self.stem_conv(x), *norm_args))
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    out = common.apply_blocks(
      self.blocks, out, lambda block, y: block(y, *norm_args), outputs,
      return_metrics,
    )  # fmt: skip
    out = jax.nn.swish(self.head_bn(self.head_conv(out), *norm_args))
    pool = jnp.mean(out, axis=(1, 2))
    return common.classifier_head(
      pool, self.fc, self.drop_rate, is_training, outputs
    )


def _make_blocks(specs, which_norm, depthwise_conv) -> list[MBConvBlock]:
  """The network's MBConv blocks, named `mb_conv_block[_k]`."""
  return [MBConvBlock(spec, which_norm, depthwise_conv) for spec in specs]
