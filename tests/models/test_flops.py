"""Tests for nfnets.models.flops against the paper's numbers and hand counts."""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nfnets.models import flops, nfnet

# Paper Table 3 / DeepMind README: multiply-adds at the test resolution.
TABLE3_GFLOPS = {
  'F0': 12.38,
  'F1': 35.54,
  'F2': 62.59,
  'F3': 114.76,
  'F4': 215.24,
  'F5': 289.76,
  'F6': 377.28,
}


@pytest.mark.parametrize('variant', list(TABLE3_GFLOPS))
def test_flops_match_paper_table3(variant):
  assert round(flops.count_flops(variant) / 1e9, 2) == TABLE3_GFLOPS[variant]


def test_flops_of_other_variants_and_train_resolution():
  # Counts from re-running the reference's count_flops (reference notes).
  want = {
    ('F7', None): 478.78,
    ('F0+', None): 19.52,
    ('F1+', None): 55.45,
    ('F7+', None): 740.16,
    ('F0', 192): 6.98,
    ('F1', 224): 17.44,
    ('F7+', 480): 461.44,
  }
  for (variant, size), gflops in want.items():
    got = flops.count_flops(variant, size) / 1e9
    assert round(got, 2) == gflops, (variant, size)


def test_conv_macs_hand_count():
  # 3x3 conv 4 -> 8 channels, 10x10 input, stride 2: 5*5*8 outputs x 36.
  assert flops.conv_macs(4, 8, 10, 10, 3, 2) == 5 * 5 * 8 * 36
  # Grouped: each output sees in / groups channels.
  assert flops.conv_macs(8, 8, 4, 4, 3, 1, groups=4) == 16 * 8 * 2 * 9


def test_jaxpr_counter_on_hand_examples():
  x = jax.ShapeDtypeStruct((2, 10, 10, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 2, 8), jnp.float32)

  def conv(x, w):  # Grouped (2 groups), 'SAME', stride 1.
    return jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=2,
    )  # fmt: skip

  assert flops.count_model_flops(conv, x, w) == 2 * 10 * 10 * 8 * 2 * 9
  a = jnp.ones((3, 5))
  b = jnp.ones((5, 7))
  assert flops.count_model_flops(jnp.dot, a, b) == 3 * 7 * 5

  def scanned(a, b):
    return jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=4)[1]

  assert flops.count_model_flops(scanned, a, b) == 4 * 3 * 7 * 5
  assert flops.count_model_flops(jax.jit(jnp.dot), a, b) == 105  # Nested.


@pytest.mark.parametrize(
  'variant,size,kwargs',
  [
    ('F0', 256, {}),
    ('F1', 64, dict(width=0.25, depth=(1, 2, 1, 1), use_two_convs=False)),
  ],
)
def test_formula_equals_traced_count(variant, size, kwargs):
  """The paper formula and the traced model agree (sizes divisible by 32)."""
  net = hk.transform(
    lambda x: nfnet.NFNet(1000, variant, grouped_conv='native', **kwargs)(
      x, is_training=False
    )
  )
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
  traced = flops.count_model_flops(
    lambda p, x: net.apply(p, None, x), params, x
  )
  assert traced == flops.count_flops(variant, size, **kwargs)
  # The split grouped convs count the same.
  net_split = hk.transform(
    lambda x: nfnet.NFNet(1000, variant, grouped_conv='split', **kwargs)(
      x, is_training=False
    )
  )
  split = flops.count_model_flops(
    lambda p, x: net_split.apply(p, None, x), params, x
  )
  assert split == traced


def test_non_divisible_size_counts_like_the_reference():
  """The reference keeps H / stride unrounded, so MACs = A * S^2 + C."""
  big, small = flops.count_flops('F0', 256), flops.count_flops('F0', 192)
  per_pixel = (big - small) / (256**2 - 192**2)
  const = small - per_pixel * 192**2
  assert flops.count_flops('F0', 200) == pytest.approx(
    per_pixel * 200**2 + const, rel=1e-12
  )
  # C is squeeze-excite (2 * (C/2) * C = C^2 per block) plus the classifier.
  se = 256**2 + 2 * 512**2 + 9 * 1536**2
  assert const == pytest.approx(se + 3072 * 1000, rel=1e-9)


def test_sizes_the_model_refuses_raise():
  """Sizes under 32 px used to give a count though NFNet refuses them."""
  for size in (0, -32, 16, 31, (32, 31), (16, 64)):
    with pytest.raises(ValueError, match='too small.*>= 32'):
      flops.count_flops('F0', size)
  assert flops.count_flops('F0', 32) > 0  # Like the model: 32 is enough,
  assert flops.count_flops('F0', (33, 47)) > 0  # and multiples are not needed.


def test_count_params():
  params = {
    'a': {'w': np.zeros((3, 4)), 'b': np.zeros(4)},
    'c': {'s': jax.ShapeDtypeStruct((), jnp.float32)},
  }
  assert flops.count_params(params) == 12 + 4 + 1


# ----------------------------------------------------------------------------
# Other model families, against hand counts of their layer definitions.
# ----------------------------------------------------------------------------

R50 = (3, 4, 6, 3)


def _model(name, **kwargs):
  return ml_collections.ConfigDict(dict(name=name, kwargs=kwargs))


def resnet_macs(depth=R50, width=4, size=224, se_ratio=None, classes=1000):
  """Hand count of a bottleneck ResNet (BN, or NF: the same convs).

  A 7x7/2 stem conv of 16 * width channels, a 3x3/2 max pool, stages of
  (64, 128, 256, 512) * width channels with strides (1, 2, 2, 2) whose
  blocks are 1x1 (at the input size) -> 3x3 (carrying the stride) -> 1x1
  at a quarter of the width, a strided 1x1 projection on each stage's first
  block, optional SE (two matrix products on the pooled map), then the
  classifier. `size` must be divisible by 32.
  """
  h = size // 2
  stem = 16 * width
  total = h * h * stem * 7 * 7 * 3
  h, in_ch = h // 2, stem
  stages = zip((64, 128, 256, 512), depth, (1, 2, 2, 2), strict=True)
  for mult, blocks, stride in stages:
    out_ch = mult * width
    mid = out_ch // 4
    for b in range(blocks):
      ho = h // (stride if b == 0 else 1)
      total += h * h * in_ch * mid + ho * ho * mid * mid * 9
      total += ho * ho * mid * out_ch
      if b == 0:
        total += ho * ho * in_ch * out_ch
      if se_ratio:
        total += 2 * int(out_ch * se_ratio) * out_ch
      h, in_ch = ho, out_ch
  return total + in_ch * classes


def nf_regnet_b0_macs(size=224, classes=1000):
  """Hand count of NF-RegNet-B0 from its definition (module docstring).

  Stem 3x3/2 conv to int(48 * 0.75) = 36 channels; stages of int(w * 0.75)
  = 36, 78, 156, 330 channels and 1, 3, 6, 6 blocks, each stage's first
  block with stride 2; expanded width int(in * 2.25) (1.0 for the very
  first block) rounded down to groups of 8; a grouped 3x3 conv (8 input
  channels per output); SE of hidden int(width / 2) on the expanded width;
  a 1x1 shortcut (after a 2x2 average pool) on strided blocks; a final 1x1
  conv to int(1280 * 330 // 440) = 960 channels; the classifier.
  """
  h = size // 2
  total = h * h * 36 * 3 * 3 * 3
  in_ch, first = 36, True
  for out_ch, blocks in zip((36, 78, 156, 330), (1, 3, 6, 6), strict=True):
    for b in range(blocks):
      width = int(in_ch * (1.0 if first else 2.25)) // 8 * 8
      ho = h // 2 if b == 0 else h
      total += h * h * in_ch * width  # conv0
      total += ho * ho * width * 8 * 9  # conv1, groups of 8
      total += 2 * (width // 2) * width  # squeeze-excite
      total += ho * ho * width * out_ch  # conv2
      if b == 0 or in_ch != out_ch:
        total += ho * ho * in_ch * out_ch  # conv_shortcut
      h, in_ch, first = ho, out_ch, False
  return total + h * h * 330 * 960 + 960 * classes


@pytest.mark.parametrize('preactivation', [True, False])
def test_bn_resnet50_macs_match_hand_count_and_table3(preactivation):
  got = flops.count_model_macs(
    _model('ResNet', preactivation=preactivation), 224
  )
  assert got == resnet_macs() == 4_089_184_256
  # NFNet paper Table 3: ResNet-50 at 4.10B FLOPs.
  assert got / 1e9 == pytest.approx(4.10, abs=0.015)


def test_nf_resnet50_has_the_convs_of_resnet50():
  assert flops.count_model_macs(_model('NF_ResNet')) == resnet_macs()
  # SE adds two matrix products per block on the pooled features.
  se = _model('NF_ResNet', use_se=True)
  assert flops.count_model_macs(se) == resnet_macs(se_ratio=0.25)
  bn_se = _model('ResNet', use_se=True)
  assert flops.count_model_macs(bn_se) == resnet_macs(se_ratio=0.25)


def test_senet50_macs_match_hand_count_and_table3():
  # Hu et al.'s SE-ResNet-50: post-activation, SE reduction 16.
  senet = _model('ResNet', preactivation=False, use_se=True, se_ratio=1 / 16)
  got = flops.count_model_macs(senet)
  assert got == resnet_macs(se_ratio=1 / 16) == 4_091_699_200
  assert got / 1e9 == pytest.approx(4.09, abs=0.005)  # Table 3: 4.09B.


def test_tiny_resnet_macs_at_another_size():
  config = _model('ResNet', width=0.5, depth=(1, 2, 1, 1))
  got = flops.count_model_macs(config, 64, num_classes=10)
  assert got == resnet_macs((1, 2, 1, 1), width=0.5, size=64, classes=10)


def test_plain_dict_configs_and_bad_image_sizes():
  # make_model takes config.model as a plain dict; so do the counters.
  tiny = dict(name='ResNet', kwargs=dict(width=0.5, depth=(1, 2, 1, 1)))
  assert flops.reported_image_size(tiny) == 224
  got = flops.count_model_macs(tiny, 64, num_classes=10)
  assert got == resnet_macs((1, 2, 1, 1), width=0.5, size=64, classes=10)
  b3 = dict(name='NF_RegNet', kwargs=dict(variant='B3'))
  assert flops.reported_image_size(b3) == 320  # B3's test size.
  assert flops.reported_image_size(dict(name='EfficientNet')) == 224
  # 0 is not "use the reported size", and no size is silently replaced.
  for size in (0, -32, 64.0):
    with pytest.raises(ValueError, match='image_size must be a positive int'):
      flops.count_model_macs(tiny, size, num_classes=10)


def test_nf_regnet_b0_macs_match_hand_count():
  config = _model('NF_RegNet', variant='B0')
  assert flops.reported_image_size(config) == 224  # B0's test size.
  assert flops.count_model_macs(config) == nf_regnet_b0_macs()


def test_count_model_macs_of_nfnet_is_the_paper_count():
  config = _model('NFNet', variant='F0')
  assert flops.reported_image_size(config) == 256
  assert flops.count_model_macs(config) == flops.count_flops('F0')
