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

The architecture is described by plain Python (`block_specs`), which both the
model and the FLOP counter (`nfnets.models.flops`) read.
"""

import dataclasses
import math
from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import layers

_BASE_WIDTH = (256, 512, 1536, 1536)
_PLUS_WIDTH = (384, 768, 2048, 2048)  # "FN+": slightly wider variants.
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


def _make_variants() -> dict[str, dict]:
  """Builds the F0-F7 and F0+-F7+ table (the reference's `nfnet_params`)."""
  table = {}
  for suffix, widths in (('', _BASE_WIDTH), ('+', _PLUS_WIDTH)):
    for name, (depth, train, test, ra, drop) in _BASE_VARIANTS.items():
      table[name + suffix] = dict(
        width=widths,
        depth=depth,
        train_imsize=train,
        test_imsize=test,
        RA_level=ra,
        drop_rate=drop,
      )
  return table


# Registry of variants: name -> dict(width, depth, train_imsize, test_imsize,
# RA_level, drop_rate). RA_level '405' means RandAugment 4 layers, magnitude 5.
VARIANTS = _make_variants()

STAGE_STRIDES = (1, 2, 2, 2)
STEM_CHANNELS = (16, 32, 64)  # The last stem conv has width[0] // 2.
STEM_STRIDES = (2, 1, 1, 2)
TOTAL_STRIDE = 32


def get_variant(name: str) -> dict:
  """Returns the `VARIANTS` entry for `name`, with a helpful error."""
  if name not in VARIANTS:
    raise ValueError(
      f'Unknown NFNet variant {name!r}; choose one of {list(VARIANTS)}.'
    )
  return VARIANTS[name]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Hyperparameters of one `NFBlock`, derived from the variant."""

  index: int
  in_ch: int
  out_ch: int
  width: int  # Bottleneck width, a multiple of the group size.
  groups: int
  stride: int
  beta: float
  stochdepth_rate: float
  is_transition: bool


def bottleneck_width(
  out_ch: int, expansion: float = 0.5, group_size: int = 128
) -> tuple[int, int]:
  """Bottleneck width and group count, rounded as in the reference.

  `int(out_ch * expansion)` rounded down to a multiple of `group_size`. Below
  one group (only for shrunken test models) one group of the unrounded width
  is used instead of the reference's width 0.

  Returns:
    (width, groups).
  """
  width = int(out_ch * expansion)
  groups = width // group_size
  if groups == 0:
    return max(width, 1), 1
  return group_size * groups, groups


def block_specs(
  variant: str = 'F0',
  width: float = 1.0,
  alpha: float = 0.2,
  stochdepth_rate: float = 0.1,
  depth: Sequence[int] | None = None,
  group_size: int = 128,
) -> list[BlockSpec]:
  """The per-block hyperparameters of an NFNet, in order.

  Args:
    variant: key of `VARIANTS`.
    width: multiplier of the block widths (not of the stem).
    alpha: residual branch scale.
    stochdepth_rate: rate of the last block; block i gets rate * i / N.
    depth: blocks per stage, overriding the variant's (e.g. for tiny models).
    group_size: channels per group of the 3x3 convs.

  Returns:
    One `BlockSpec` per block.
  """
  config = get_variant(variant)
  depth = tuple(config['depth'] if depth is None else depth)
  if len(depth) != 4 or min(depth) < 1:
    raise ValueError(f'depth must be 4 positive ints, got {depth}.')
  num_blocks = sum(depth)
  in_ch = config['width'][0] // 2
  expected_std, index, specs = 1.0, 0, []
  for stage_width, stage_depth, stride in zip(
    config['width'], depth, STAGE_STRIDES, strict=True
  ):
    out_ch = int(stage_width * width)
    bneck, groups = bottleneck_width(out_ch, 0.5, group_size)
    for block_index in range(stage_depth):
      specs.append(
        BlockSpec(
          index=index,
          in_ch=in_ch,
          out_ch=out_ch,
          width=bneck,
          groups=groups,
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


def final_conv_channels(
  last_ch: int, final_conv_mult: float | None, final_conv_ch: int | None
) -> int:
  """Width of `final_conv`: `final_conv_ch` if given, else mult * last_ch."""
  if final_conv_ch is not None:
    return final_conv_ch
  if final_conv_mult is None:
    raise ValueError('Give one of final_conv_mult or final_conv_ch.')
  return int(final_conv_mult * last_ch)


class NFBlock(hk.Module):
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
    in_ch: int,
    out_ch: int,
    width: int,
    groups: int,
    stride: int = 1,
    beta: float = 1.0,
    alpha: float = 0.2,
    se_ratio: float = 0.5,
    activation: str = 'gelu',
    stochdepth_rate: float = 0.0,
    use_two_convs: bool = True,
    grouped_conv: str = 'auto',
    name: str | None = None,
  ):
    """Creates the block; see `BlockSpec` for the meaning of the sizes."""
    super().__init__(name=name)
    self.in_ch, self.out_ch, self.width = in_ch, out_ch, width
    self.groups, self.stride = groups, stride
    self.beta, self.alpha = beta, alpha
    self.activation = layers.get_activation(activation)
    self.use_two_convs = use_two_convs
    conv = lambda ch, k, **kw: layers.WSConv2D(
      ch, k, grouped_conv=grouped_conv, **kw
    )
    self.conv0 = conv(width, 1, name='conv0')
    self.conv1 = conv(
      width, 3, stride=stride, feature_group_count=groups, name='conv1'
    )
    if use_two_convs:
      self.conv1b = conv(width, 3, feature_group_count=groups, name='conv1b')
    self.conv2 = conv(out_ch, 1, name='conv2')
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, name='conv_shortcut')
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio)
    self.stoch_depth = None
    if 0.0 < stochdepth_rate < 1.0:
      self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def _shortcut(self, x: jax.Array, out: jax.Array) -> jax.Array:
    if self.stride > 1:
      pooled = hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
      return self.conv_shortcut(pooled)
    if self.use_projection:
      return self.conv_shortcut(out)
    return x

  def __call__(
    self, x: jax.Array, is_training: bool
  ) -> tuple[jax.Array, jax.Array]:
    """Applies the block to NHWC `x`; returns (output, res_avg_var)."""
    out = self.activation(x) * self.beta
    shortcut = self._shortcut(x, out)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    if self.use_two_convs:
      out = self.conv1b(self.activation(out))
    out = self.conv2(self.activation(out))
    out = self.se(out)
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    skip_gain = hk.get_parameter('skip_gain', (), out.dtype, init=jnp.zeros)
    return out * skip_gain * self.alpha + shortcut, res_avg_var


def _drop_rate(block: NFBlock) -> float:
  return 0.0 if block.stoch_depth is None else block.stoch_depth.drop_rate


def _set_drop_rate(block: NFBlock, rate) -> None:
  if block.stoch_depth is not None:
    block.stoch_depth.drop_rate = rate


def _scan_signature(block: NFBlock) -> tuple | None:
  """What must agree for blocks to share one scanned body (None: never)."""
  if block.use_projection:  # Transition blocks: each one is different.
    return None
  return (block.in_ch, block.out_ch, block.width, block.groups,
          block.stoch_depth is None)  # fmt: skip


def _identical_runs(blocks: Sequence[NFBlock]) -> list[list[NFBlock]]:
  """Splits `blocks` into maximal runs of consecutive scannable blocks."""
  runs = []
  for block in blocks:
    sig = _scan_signature(block)
    if runs and sig is not None and sig == _scan_signature(runs[-1][-1]):
      runs[-1].append(block)
    else:
      runs.append([block])
  return runs


def _stack_block_params(params, prefixes: Sequence[str]) -> dict:
  """`{relative/param name: stacked array}` of the blocks named `prefixes`."""
  per_block = []
  for prefix in prefixes:
    leaves = {}
    for module, values in params.items():
      if module == prefix or module.startswith(prefix + '/'):
        for name, value in values.items():
          leaves[f'{module[len(prefix) :]}/{name}'] = value
    per_block.append(leaves)
  return {k: jnp.stack([b[k] for b in per_block]) for k in per_block[0]}


def _make_block(spec: BlockSpec, **kwargs) -> NFBlock:
  """Builds the block of `spec`, named as in the reference checkpoints."""
  name = 'nf_block' if spec.index == 0 else f'nf_block_{spec.index}'
  return NFBlock(
    spec.in_ch,
    spec.out_ch,
    spec.width,
    spec.groups,
    stride=spec.stride,
    beta=spec.beta,
    stochdepth_rate=spec.stochdepth_rate,
    name=name,
    **kwargs,
  )


class NFNet(hk.Module):
  """Normalizer-Free Network, F-series (F0-F7 and the wider F0+-F7+).

  Called as `model(images, is_training, return_metrics=False)` on NHWC float
  images; returns a dict with 'logits' (N, num_classes) and 'pool' (the
  pooled features, N, final_conv width) and, with `return_metrics`, the
  signal-propagation metrics (`avg_sq_mean_i`, `avg_var_i` for the stem
  (i=0) and after each block (i=k+1), and `res_avg_var_k` per block).

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
      stochdepth_rate: stochastic depth rate of the deepest block; block i of
        N gets rate * i / N.
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
        values): XLA compiles one block body per run, which halves F7's
        train-step compile on CPU, for more memory and a slower step.
        Initialisation and `return_metrics` always run unrolled.
      depth: blocks per stage overriding the variant's (for small models).
      group_size: channels per group in the 3x3 convs (128 in all variants).
      in_channels: expected image channels (3 for every released model).
      name: Haiku module name; 'NFNet' matches the released checkpoints.
    """
    super().__init__(name=name)
    config = get_variant(variant)
    self.variant, self.num_classes = variant, num_classes
    self.drop_rate = config['drop_rate'] if drop_rate is None else drop_rate
    self.activation = layers.get_activation(activation)
    self.remat = remat
    self.scan_blocks = scan_blocks
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
    block_kwargs = dict(
      alpha=alpha,
      se_ratio=se_ratio,
      activation=activation,
      use_two_convs=use_two_convs,
      grouped_conv=grouped_conv,
    )
    self.blocks = [_make_block(spec, **block_kwargs) for spec in self.specs]
    ch = final_conv_channels(
      self.specs[-1].out_ch, final_conv_mult, final_conv_ch
    )
    self.final_conv = layers.WSConv2D(
      ch, 1, grouped_conv=grouped_conv, name='final_conv'
    )
    fc_init = fc_init or hk.initializers.RandomNormal(0.01, 0.0)
    self.fc = hk.Linear(num_classes, w_init=fc_init, with_bias=True)

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(
        f'NFNet expects NHWC images of rank 4, got shape {x.shape}; add a '
        'batch axis (x[None]) for a single image.'
      )
    if x.shape[-1] != self.in_channels:
      raise ValueError(
        f'NFNet expects {self.in_channels} channels (NHWC), got shape '
        f'{x.shape}; convert grayscale to RGB or transpose NCHW to NHWC.'
      )
    if min(x.shape[1:3]) < TOTAL_STRIDE:
      raise ValueError(
        f'Image size {x.shape[1:3]} is too small: NFNet downsamples by '
        f'{TOTAL_STRIDE}, so height and width must be >= {TOTAL_STRIDE}.'
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
        f'NFNet expects normalised float images, got dtype {x.dtype}.'
      )

  def __call__(
    self, x: jax.Array, is_training: bool = True, return_metrics: bool = False
  ) -> dict[str, jax.Array]:
    """Runs the network on NHWC float images; see the class docstring."""
    self._check_input(x)
    outputs = {}
    out = x
    for i, conv in enumerate(self.stem_convs):
      out = conv(out)
      if i < len(self.stem_convs) - 1:  # No activation after the last one.
        out = self.activation(out)
    if return_metrics:
      outputs.update(layers.signal_metrics(out, 0))
    if self.scan_blocks and not return_metrics and not hk.running_init():
      out = self._scanned_blocks(out, is_training)
    else:
      for i, block in enumerate(self.blocks):
        out, res_var = self._apply_block(block, out, is_training)
        if return_metrics:
          outputs.update(layers.signal_metrics(out, i + 1))
          outputs[f'res_avg_var_{i}'] = res_var
    pool = jnp.mean(self.activation(self.final_conv(out)), axis=(1, 2))
    outputs['pool'] = pool
    if is_training and self.drop_rate > 0.0:
      pool = hk.dropout(hk.next_rng_key(), self.drop_rate, pool)
    outputs['logits'] = self.fc(pool)
    return outputs

  def _scanned_blocks(self, x, is_training):
    """All blocks, each stage's run of identical blocks under one scan."""
    params = hk.get_params()
    for run in _identical_runs(self.blocks):
      if len(run) == 1:
        x, _ = self._apply_block(run[0], x, is_training)
      else:
        x = self._scan_run(run, params, x, is_training)
    return x

  def _scan_run(self, run, params, x, is_training):
    """Applies `run[0]` once per block of `run`, with each block's weights.

    The weights keep their per-block Haiku names (checkpoints unchanged):
    they are stacked here, and a custom getter hands `run[0]` the slice of
    the current iteration. `beta` and the stochastic-depth rate differ per
    block and are scanned too. XLA then compiles one block body per run
    instead of one per block. Stochastic depth draws from the scan's split
    RNG keys, so its masks differ from the unrolled network's.
    """
    template = run[0]
    stacked = _stack_block_params(params, [b.module_name for b in run])
    betas = jnp.asarray([b.beta for b in run], x.dtype)
    rates = jnp.asarray([_drop_rate(b) for b in run], jnp.float32)

    def body(carry, xs):
      weights, beta, rate = xs

      def getter(next_getter, value, context):
        del next_getter, value
        return weights[context.full_name[len(template.module_name) :]]

      saved = template.beta, _drop_rate(template)
      template.beta = beta
      _set_drop_rate(template, rate)
      try:
        with hk.custom_getter(getter), layers.conv_grads_for_loops():
          out, _ = self._apply_block(template, carry, is_training)
      finally:  # The template is also the unrolled network's first block.
        template.beta = saved[0]
        _set_drop_rate(template, saved[1])
      return out, None

    out, _ = hk.scan(body, x, (stacked, betas, rates))
    return out

  def _apply_block(self, block, x, is_training):
    if not self.remat:
      return block(x, is_training)
    return hk.remat(lambda y: block(y, is_training))(x)
