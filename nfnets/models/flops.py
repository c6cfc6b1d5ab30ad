"""FLOP and parameter counts of NFNets, as the paper reports them.

The NFNet paper's "#FLOPs" (Table 3) are multiply-adds of the convolutions
and linear layers only, counted by DeepMind's reference `count_flops` at the
test resolution: a conv producing `C_out` channels at (H, W) / stride costs
`C_out * H * W / (sH * sW) * (C_in / groups) * kh * kw` (H, W kept as floats,
so sizes not divisible by 32 give fractional counts); squeeze-excite adds
`2 * hidden * C` per image and the classifier `C_final * num_classes`.
Activations, pooling, additions and the weight standardisation are free.

Three counters:

* `count_flops(variant, image_size)`: the paper's formula, read off the
  architecture description (`nfnets.models.nfnet.block_specs`), no tracing.
* `count_model_flops(fn, *args)`: multiply-adds of every convolution and
  matrix product in the traced computation of any JAX function (e.g. a
  transformed Haiku model's apply); works for every model family and equals
  the paper's count whenever the image size is divisible by the stride.
  Depthwise convolutions count `kh * kw` per output in both of their forms
  (`nfnets.ops.depthwise_conv2d`: a grouped convolution, or the shifted
  multiply-adds, found by the name of their call).
* `count_model_macs(model_config, image_size)`: the traced count of one
  image's eval-mode forward pass of any registry model (`config.model`):
  NF-ResNets, NF-RegNets, BN/SE-ResNets, NFNets, EfficientNets and the
  SkipInit and Fixup ResNets. BatchNorm, like every other elementwise or
  pooling op, costs nothing in this convention.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets import models, ops
from nfnets.models import (
  checks,
  common,
  efficientnet,
  nf_regnet,
  nfnet,
  registry,
)


def conv_macs(
  in_ch: float,
  out_ch: float,
  h: float,
  w: float,
  kernel: int = 1,
  stride: int = 1,
  groups: int = 1,
) -> float:
  """Multiply-adds of a square-kernel conv at input size (h, w), paper-style.

  Args:
    in_ch: input channels.
    out_ch: output channels.
    h: input height (may be fractional, as in the reference counter).
    w: input width.
    kernel: kernel size k of a k x k kernel.
    stride: spatial stride (output size is h / stride, unrounded).
    groups: feature groups.

  Returns:
    The number of multiply-adds for one image.
  """
  outputs = out_ch * h * w / (stride * stride)
  return outputs * (in_ch / groups) * kernel * kernel


def _stem_macs(stem_ch: int, h: float, w: float) -> tuple[float, float, float]:
  """MACs of the 4-conv stem and the spatial size after it."""
  total, ch = 0.0, 3
  channels = (*nfnet.STEM_CHANNELS, stem_ch)
  for out_ch, stride in zip(channels, nfnet.STEM_STRIDES, strict=True):
    total += conv_macs(ch, out_ch, h, w, 3, stride)
    h, w, ch = h / stride, w / stride, out_ch
  return total, h, w


def _block_macs(
  spec: common.BlockSpec,
  h: float,
  w: float,
  se_ratio: float,
  use_two_convs: bool,
) -> float:
  """MACs of one NFBlock whose input is (h, w); see the module docstring."""
  macs = conv_macs(spec.in_ch, spec.width, h, w, 1)  # conv0
  macs += conv_macs(spec.width, spec.width, h, w, 3, spec.stride, spec.groups)
  h, w = h / spec.stride, w / spec.stride
  if use_two_convs:  # conv1b
    macs += conv_macs(spec.width, spec.width, h, w, 3, 1, spec.groups)
  if spec.use_projection:  # conv_shortcut
    macs += conv_macs(spec.in_ch, spec.out_ch, h, w, 1)
  macs += conv_macs(spec.width, spec.out_ch, h, w, 1)  # conv2
  hidden = max(1, int(spec.out_ch * se_ratio))
  return macs + 2 * hidden * spec.out_ch  # Squeeze-excite on pooled input.


def count_flops(
  variant: str = 'F0',
  image_size: int | Sequence[int] | None = None,
  *,
  num_classes: int = 1000,
  width: float = 1.0,
  depth: Sequence[int] | None = None,
  se_ratio: float = 0.5,
  use_two_convs: bool = True,
  final_conv_mult: float | None = 2,
  final_conv_ch: int | None = None,
  group_size: int = 128,
) -> float:
  """Multiply-adds of one forward pass of an NFNet, as in the paper.

  `count_flops('F0') / 1e9` is 12.38 (Table 3, at the test resolution 256).
  The keyword arguments mirror `nfnets.NFNet`.

  Args:
    variant: key of `nfnets.VARIANTS`.
    image_size: int or (height, width); default the variant's test_imsize.
    num_classes: classifier outputs.
    width: block width multiplier.
    depth: blocks per stage overriding the variant's.
    se_ratio: squeeze-excite hidden ratio.
    use_two_convs: whether blocks have conv1b.
    final_conv_mult: final conv width as a multiple of the last block's.
    final_conv_ch: explicit final conv width (takes precedence).
    group_size: channels per group of the 3x3 convs.

  Returns:
    Multiply-adds per image (a float; fractional for sizes not divisible
    by 32, exactly as the reference counts them).

  Raises:
    ValueError: for a height or width under 32, which the model refuses.
  """
  config = nfnet.get_variant(variant)
  if image_size is None:
    image_size = config['test_imsize']
  h, w = (image_size, image_size) if np.isscalar(image_size) else image_size
  if min(h, w) < nfnet.TOTAL_STRIDE:  # The rule of `common.check_images`.
    raise ValueError(
      f'Image size {image_size} is too small: NFNet downsamples by '
      f'{nfnet.TOTAL_STRIDE}, so height and width must be >= '
      f'{nfnet.TOTAL_STRIDE}.'
    )
  specs = nfnet.block_specs(variant, width, depth=depth, group_size=group_size)
  total, h, w = _stem_macs(config['width'][0] // 2, h, w)
  for spec in specs:
    total += _block_macs(spec, h, w, se_ratio, use_two_convs)
    h, w = h / spec.stride, w / spec.stride
  final_ch = nfnet.final_conv_channels(
    specs[-1].out_ch, final_conv_mult, final_conv_ch
  )
  total += conv_macs(specs[-1].out_ch, final_ch, h, w, 1)
  return total + final_ch * num_classes


def count_params(params) -> int:
  """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def _sub_jaxprs(eqn) -> list:
  """The jaxprs nested in an equation's params (pjit, remat, cond, ...)."""
  found = []
  for value in eqn.params.values():
    items = value if isinstance(value, (list, tuple)) else (value,)
    for item in items:
      inner = getattr(item, 'jaxpr', item)  # ClosedJaxpr -> Jaxpr.
      if hasattr(inner, 'eqns'):
        found.append(inner)
  return found


def _is_shifted_depthwise(eqn) -> bool:
  """Whether `eqn` is the call of `nfnets.ops.depthwise_conv2d_shifted`."""
  return (
    eqn.primitive.name in ('jit', 'pjit')
    and eqn.params.get('name') == ops.depthwise.SHIFTED_NAME
  )


def _eqn_macs(eqn) -> float:
  """Multiply-adds of a conv, dot_general or depthwise call; else 0."""
  name = eqn.primitive.name
  if _is_shifted_depthwise(eqn):
    # The depthwise conv written out as multiply-adds: kh * kw per output.
    kh, kw = eqn.invars[1].aval.shape[:2]
    return math.prod(eqn.outvars[0].aval.shape) * kh * kw
  if name == 'conv_general_dilated':
    rhs_shape = eqn.invars[1].aval.shape
    rhs_spec = eqn.params['dimension_numbers'].rhs_spec
    # rhs_spec = (out feature dim, in feature dim, *spatial dims).
    per_output = math.prod(rhs_shape[d] for d in rhs_spec[1:])
    return math.prod(eqn.outvars[0].aval.shape) * per_output
  if name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return math.prod(eqn.outvars[0].aval.shape) * contracted
  return 0


def _jaxpr_macs(jaxpr) -> float:
  """Sums `_eqn_macs` over a jaxpr, recursing into nested jaxprs."""
  total = 0
  for eqn in jaxpr.eqns:
    subs = [_jaxpr_macs(sub) for sub in _sub_jaxprs(eqn)]
    if eqn.primitive.name == 'cond':
      total += max(subs, default=0)  # Only one branch runs.
    elif eqn.primitive.name == 'scan':
      total += eqn.params['length'] * sum(subs)
    else:
      total += sum(subs)
    total += _eqn_macs(eqn)
  return total


def count_model_flops(fn: Callable, *args, **kwargs) -> float:
  """Multiply-adds of convs and matrix products in `fn(*args, **kwargs)`.

  The function is traced abstractly (nothing runs), so `args` may be
  `jax.ShapeDtypeStruct`s. Loops in `while` bodies count once.

  Args:
    fn: any JAX-traceable function, e.g.
      `lambda p, x: model.apply(p, None, x, is_training=False)`.
    *args: its positional arguments (arrays or ShapeDtypeStructs).
    **kwargs: keyword arguments, closed over (not traced).

  Returns:
    The total multiply-adds for the given batch (divide by the batch size
    for a per-image count).
  """
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  return float(_jaxpr_macs(closed.jaxpr))


# Resolution of the figures the papers report for families whose variants
# have no test size of their own: ResNets are compared at 224 px.
RESNET_IMAGE_SIZE = 224


def reported_image_size(model_config: ml_collections.ConfigDict) -> int:
  """The resolution at which a registry model's FLOPs are reported.

  Args:
    model_config: `config.model` (name and kwargs), a ConfigDict or a
      plain dict, as `make_model` takes it.

  Returns:
    The variant's test resolution for NFNets, NF-RegNets and EfficientNets
    (as in their papers' tables), else 224.
  """
  name, kwargs = registry.name_and_kwargs(model_config)
  variant = kwargs.get('variant', None)
  if name == 'NFNet':
    return nfnet.get_variant(variant or 'F0')['test_imsize']
  if name == 'NF_RegNet':
    return nf_regnet.get_variant(variant or 'B0')['test_imsize']
  if name == 'EfficientNet':
    return efficientnet.get_variant(variant or 'B0')['test_imsize']
  return RESNET_IMAGE_SIZE


def count_model_macs(
  model_config: ml_collections.ConfigDict,
  image_size: int | None = None,
  *,
  num_classes: int = 1000,
) -> float:
  """Multiply-adds of one image's forward pass of a registry model.

  The model is built with `nfnets.models.make_model` and traced abstractly
  in eval mode (nothing is allocated or run), so every family is counted
  the same way: convolutions and matrix products (squeeze-excite and the
  classifier included), nothing else. For NFNets this equals `count_flops`
  (the paper's figures) when the size is divisible by 32.

  Args:
    model_config: `config.model`, e.g. `ConfigDict(dict(name='ResNet',
      kwargs=dict(variant='ResNet50')))`, or the same as a plain dict.
    image_size: square input resolution, a positive int; None =
      `reported_image_size`.
    num_classes: classifier outputs.

  Returns:
    Multiply-adds per image.
  """
  model = models.make_model(model_config, num_classes)
  if image_size is None:
    size = reported_image_size(model_config)
  else:
    checks.check_positive_int('count_model_macs', 'image_size', image_size)
    size = image_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  # A concrete key: its shape depends on the configured PRNG implementation.
  params, state = jax.eval_shape(
    lambda r, x: model.init(r, x, True), jax.random.PRNGKey(0), x
  )
  return count_model_flops(
    lambda p, s, x: model.apply(p, s, None, x, False)[0]['logits'],
    params,
    state,
    x,
  )
