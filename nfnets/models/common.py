"""What the model families share: variants, block schedules, checks, heads.

Every family (`nfnet`, `nf_resnet`, `nf_regnet`, `resnet`) is a stem, four
stages of residual blocks and a classifier head. This module holds the
pieces that are the same in all of them:

* variant tables and their lookup (`variant_table`, `get_variant`,
  `resolve_depth`), and the ResNet depth table that NF-ResNets and the BN
  baselines share (`RESNET_VARIANTS`);
* `BlockSpec` and `make_block_specs`: per-block hyperparameters, with the
  normalizer-free residual-variance schedule (`residual_betas`) and the
  group-rounded block width (`grouped_width`);
* `NFResidualBlock`, the base of the normalizer-free residual blocks
  (shortcut, beta, stochastic depth, skip_gain);
* the network-level pieces: input checks (`check_images`), the block loop
  with its signal-propagation metrics and multi-scale feature maps
  (`apply_blocks`, `stage_ends`, `record_feature`, `FEATURE_STRIDES`) and
  the pooled classifier head (`classifier_head`).
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import checks, layers

# Strides of the four stages (NFNets, NF-ResNets and BN ResNets; the
# NF-RegNets stride every stage).
STAGE_STRIDES = (1, 2, 2, 2)

# The feature maps a network returns with `return_features=True`: the name
# of each stage's output and its stride from the input. The stems stride 4
# before stage 1 (NFNet: 2 x 2 in the 4-conv stem; NF-ResNet and ResNet: a
# /2 conv and a /2 max pool), or 2 before a first stage that strides itself
# (NF-RegNet), so every family's stage k ends at stride 2 ** (k + 1).
FEATURE_STRIDES = {'stage1': 4, 'stage2': 8, 'stage3': 16, 'stage4': 32}

# The ResNet layout of NF-ResNets and the BN baselines: depth variants
# (name -> dict(depth=blocks per stage)), stage widths and stem width as
# multiples of the width multiplier.
RESNET_VARIANTS = {
  'ResNet50': dict(depth=(3, 4, 6, 3)),
  'ResNet101': dict(depth=(3, 4, 23, 3)),
  'ResNet152': dict(depth=(3, 8, 36, 3)),
  'ResNet200': dict(depth=(3, 24, 36, 3)),
  'ResNet288': dict(depth=(24, 24, 24, 24)),
  'ResNet600': dict(depth=(50, 50, 50, 50)),
}
RESNET_STAGE_MULTIPLIERS = (64, 128, 256, 512)
RESNET_STEM_MULTIPLIER = 16


# --- Variants --------------------------------------------------------------


def variant_table(
  fields: Sequence[str], rows: Mapping[str, Sequence]
) -> dict[str, dict]:
  """Builds a variant registry from compact rows.

  Args:
    fields: the key of each column.
    rows: variant name -> one value per field.

  Returns:
    name -> dict(field=value, ...), in the order of `rows`.
  """
  return {
    name: dict(zip(fields, row, strict=True)) for name, row in rows.items()
  }


def get_variant(variants: Mapping[str, dict], name: str, family: str) -> dict:
  """Returns `variants[name]`; the error lists the valid names.

  Args:
    variants: a family's registry of variants.
    name: the variant asked for.
    family: the family's name, for the message.

  Returns:
    The variant's dict.

  Raises:
    ValueError: for a name not in `variants`.
  """
  if name not in variants:
    raise ValueError(
      f'Unknown {family} variant {name!r}; choose one of {list(variants)}.'
    )
  return variants[name]


def resolve_depth(
  config: Mapping, depth: Sequence[int] | None
) -> tuple[int, ...]:
  """Blocks per stage: `depth` if given (for small models), else the variant's.

  Args:
    config: a variant's dict (with key 'depth').
    depth: optional override, four positive ints.

  Returns:
    A tuple of four ints.

  Raises:
    ValueError: for anything but four positive ints.
  """
  resolved = config['depth'] if depth is None else depth
  try:
    resolved = tuple(resolved)
  except TypeError:  # An int (depth=1) gets the ValueError below too.
    pass
  if not (
    isinstance(resolved, tuple)
    and len(resolved) == 4
    and all(map(checks.is_positive_int, resolved))
  ):
    raise ValueError(f'depth must be 4 positive ints, got {resolved!r}.')
  return resolved


# --- Block schedules -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Hyperparameters of one residual block, derived from the variant.

  Attributes:
    index: position of the block in the network, from 0.
    in_ch: input channels.
    out_ch: output channels.
    width: width of the block's inner convs (bottleneck or expanded).
    stride: spatial stride of the block.
    beta: 1 / expected std of the block's input (`residual_betas`).
    stochdepth_rate: the block's stochastic-depth rate.
    is_transition: whether the block is the first of its stage.
    groups: feature groups of the block's 3x3 convs.
  """

  index: int
  in_ch: int
  out_ch: int
  width: int
  stride: int
  beta: float
  stochdepth_rate: float
  is_transition: bool
  groups: int = 1

  @property
  def use_projection(self) -> bool:
    """Whether the shortcut needs a conv (the shape changes)."""
    return self.stride > 1 or self.in_ch != self.out_ch


def residual_betas(depth: Sequence[int], alpha: float) -> list[float]:
  """`beta = 1 / expected_std` of every block's input, in order.

  The expected variance of the residual stream grows by alpha^2 per block
  and is reset to 1 after each stage's first (transition) block, whose
  shortcut sees the unit-scale `act(x) * beta`; as in the reference.

  Args:
    depth: blocks per stage.
    alpha: residual branch scale.

  Returns:
    One beta per block.
  """
  betas, expected_std = [], 1.0
  for stage_depth in depth:
    for block_index in range(stage_depth):
      betas.append(1.0 / expected_std)
      if block_index == 0:  # Transitions reset the residual stream variance.
        expected_std = 1.0
      expected_std = math.sqrt(expected_std**2 + alpha**2)
  return betas


def grouped_width(
  channels: int, ratio: float, group_size: int
) -> tuple[int, int]:
  """`int(channels * ratio)` rounded down to whole groups, as the reference.

  Below one group (only in shrunken test models) one group of the unrounded
  width is used instead of the reference's width 0.

  Args:
    channels: the channels the width derives from.
    ratio: bottleneck ratio or expansion.
    group_size: channels per group.

  Returns:
    (width, groups).
  """
  width = int(channels * ratio)
  groups = width // group_size
  if groups == 0:
    return max(width, 1), 1
  return group_size * groups, groups


def make_block_specs(
  *,
  stem_ch: int,
  stage_widths: Sequence[int],
  depth: Sequence[int],
  stage_strides: Sequence[int],
  alpha: float,
  stochdepth_rate: float,
  block_width: Callable[[int, int, int], tuple[int, int]],
) -> list[BlockSpec]:
  """The per-block hyperparameters of a four-stage residual network.

  Args:
    stem_ch: channels entering the first block.
    stage_widths: output channels of each stage.
    depth: blocks per stage.
    stage_strides: stride of each stage's first block (the others have 1).
    alpha: residual branch scale (for the betas).
    stochdepth_rate: the stochastic-depth schedule's rate: block i of N
      (from 0) gets rate * i / N, the deepest (N - 1) / N of it.
    block_width: `(index, in_ch, out_ch) -> (width, groups)` of a block.

  Returns:
    One `BlockSpec` per block.
  """
  betas = residual_betas(depth, alpha)
  num_blocks = len(betas)
  in_ch, specs = stem_ch, []
  for out_ch, stage_depth, stride in zip(
    stage_widths, depth, stage_strides, strict=True
  ):
    for block_index in range(stage_depth):
      index = len(specs)
      width, groups = block_width(index, in_ch, out_ch)
      specs.append(
        BlockSpec(
          index=index,
          in_ch=in_ch,
          out_ch=out_ch,
          width=width,
          stride=stride if block_index == 0 else 1,
          beta=betas[index],
          stochdepth_rate=stochdepth_rate * index / num_blocks,
          is_transition=block_index == 0,
          groups=groups,
        )
      )
      in_ch = out_ch
  return specs


# --- Normalizer-free residual blocks ---------------------------------------


class NFResidualBlock(hk.Module):
  """Base of the normalizer-free residual blocks of every NF family.

  `out = act(x) * beta`; the shortcut is a 1x1 conv of `out` on projection
  blocks (a stride or width change), else the raw `x`; the output is
  `branch(out) * skip_gain * alpha + shortcut`, with per-example stochastic
  depth on the branch in training. A family's block creates its branch's
  layers in `__init__` and defines `branch`.

  Calling the block returns the output and the branch's average channel
  variance (before stochastic depth and skip_gain).
  """

  def __init__(
    self,
    spec: BlockSpec,
    *,
    alpha: float,
    activation: str,
    pool_shortcut: bool,
    skip_init: hk.initializers.Initializer = jnp.zeros,
    grouped_conv: str = 'auto',
    name: str | None = None,
  ):
    """Creates the block's shortcut conv and stochastic depth.

    Args:
      spec: the block's sizes, stride, beta and stochastic depth rate.
      alpha: residual branch scale.
      activation: key of `layers.ACTIVATIONS`.
      pool_shortcut: strided blocks average-pool `out` 2x2 before an
        unstrided shortcut conv (NFNets, NF-RegNets) rather than striding
        the conv (NF-ResNets).
      skip_init: initialiser of the scalar `skip_gain` (zeros: every block
        is the identity at init, as in the reference).
      grouped_conv: grouped-conv mode of the block's convs.
      name: Haiku module name.
    """
    super().__init__(name=name)
    self.spec, self.alpha = spec, alpha
    self.activation = layers.get_activation(activation)
    self.pool_shortcut, self.skip_init = pool_shortcut, skip_init
    self.conv_shortcut = None
    if spec.use_projection:
      self.conv_shortcut = layers.WSConv2D(
        spec.out_ch,
        1,
        stride=1 if pool_shortcut else spec.stride,
        grouped_conv=grouped_conv,
        name='conv_shortcut',
      )
    self.stoch_depth = None
    if 0.0 < spec.stochdepth_rate < 1.0:
      self.stoch_depth = layers.StochDepth(spec.stochdepth_rate)

  def branch(self, out: jax.Array, *, in_loop: bool = False) -> jax.Array:
    """The residual branch applied to `act(x) * beta`; see subclasses."""
    raise NotImplementedError

  def _shortcut(self, x, out, in_loop):
    if self.conv_shortcut is None:
      return x
    if self.pool_shortcut and self.spec.stride > 1:
      out = hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
    return self.conv_shortcut(out, in_loop=in_loop)

  def __call__(
    self,
    x: jax.Array,
    is_training: bool,
    *,
    beta=None,
    drop_rate=None,
    in_loop: bool = False,
  ) -> tuple[jax.Array, jax.Array]:
    """Applies the block to NHWC `x`.

    Args:
      x: the block's input.
      is_training: stochastic depth drops only in training.
      beta: input scale instead of `spec.beta` (may be traced: one block
        applied in a scan over blocks, see `nfnets.models.scan`).
      drop_rate: stochastic-depth rate instead of the spec's (may be
        traced).
      in_loop: whether the call is traced inside a loop body (passed to
        the convs, see `layers.WSConv2D`).

    Returns:
      (output, res_avg_var).
    """
    beta = self.spec.beta if beta is None else beta
    out = self.activation(x) * beta
    shortcut = self._shortcut(x, out, in_loop)
    out = self.branch(out, in_loop=in_loop)
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training, drop_rate=drop_rate)
    skip_gain = hk.get_parameter(
      'skip_gain', (), out.dtype, init=self.skip_init
    )
    return out * skip_gain * self.alpha + shortcut, res_avg_var


# --- Networks --------------------------------------------------------------


def check_images(
  x: jax.Array, model: str, min_size: int, channels: int = 3
) -> None:
  """Raises a ValueError that says what to do for unusable image batches.

  Args:
    x: the model input.
    model: model name for the message.
    min_size: smallest height/width the model accepts (its total stride).
    channels: the image channels the model expects.
  """
  if x.ndim != 4:
    raise ValueError(
      f'{model} expects NHWC images of rank 4, got shape {x.shape}; add a '
      'batch axis (x[None]) for a single image.'
    )
  if x.shape[-1] != channels:
    raise ValueError(
      f'{model} expects {channels} channels (NHWC), got shape {x.shape}; '
      'convert grayscale to RGB or transpose NCHW to NHWC.'
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


def stage_ends(is_transition: Sequence[bool]) -> tuple[int, ...]:
  """The index of each stage's last block.

  Args:
    is_transition: per block, in order, whether it starts a stage (the
      first block always does).

  Returns:
    One index per stage, increasing; the last is `len(is_transition) - 1`.
  """
  starts = [i for i, first in enumerate(is_transition) if first]
  return tuple(s - 1 for s in starts[1:]) + (len(is_transition) - 1,)


def record_feature(
  outputs: dict, ends: Sequence[int], index: int, x: jax.Array
) -> None:
  """Stores block `index`'s output `x` if that block ends a stage.

  Args:
    outputs: the network's outputs dict; gains `outputs['features'][name]`,
      `name` being the stage's key of `FEATURE_STRIDES`.
    ends: `stage_ends(...)` of the network, or () to record nothing.
    index: the block's position in the network.
    x: the block's output.
  """
  if index in ends:
    name = list(FEATURE_STRIDES)[list(ends).index(index)]
    outputs.setdefault('features', {})[name] = x


def apply_blocks(
  blocks: Sequence[Callable],
  x: jax.Array,
  apply_block: Callable,
  outputs: dict,
  return_metrics: bool,
  ends: Sequence[int] = (),
) -> jax.Array:
  """Runs the blocks in order, recording metrics and stage outputs.

  Args:
    blocks: the network's residual blocks.
    x: the stem's output.
    apply_block: `(block, x) -> (output, res_avg_var)`.
    outputs: the network's outputs dict; with `return_metrics` it gains
      `avg_sq_mean_{k+1}`, `avg_var_{k+1}` and `res_avg_var_k` per block k,
      and with `ends` the stages' outputs (`record_feature`).
    return_metrics: whether to record the metrics.
    ends: `stage_ends(...)` to record the stages' outputs, () for none.

  Returns:
    The last block's output.
  """
  for i, block in enumerate(blocks):
    x, res_var = apply_block(block, x)
    if return_metrics:
      outputs.update(layers.signal_metrics(x, i + 1))
      outputs[f'res_avg_var_{i}'] = res_var
    record_feature(outputs, ends, i, x)
  return x


def classifier_head(
  pool: jax.Array,
  fc: Callable,
  drop_rate: float,
  is_training: bool,
  outputs: dict,
) -> dict:
  """Records 'pool', applies dropout (training only) and the classifier.

  Args:
    pool: the pooled features (N, C).
    fc: the classifier.
    drop_rate: dropout rate before the classifier.
    is_training: dropout applies only in training.
    outputs: the network's outputs dict; gains 'pool' and 'logits'.

  Returns:
    `outputs`.
  """
  outputs['pool'] = pool
  if is_training and drop_rate > 0.0:
    pool = hk.dropout(hk.next_rng_key(), drop_rate, pool)
  outputs['logits'] = fc(pool)
  return outputs
