"""Tests for nfnets.flops against the paper's numbers and hand counts."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import flops, nfnet

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


def test_count_params():
  params = {
    'a': {'w': np.zeros((3, 4)), 'b': np.zeros(4)},
    'c': {'s': jax.ShapeDtypeStruct((), jnp.float32)},
  }
  assert flops.count_params(params) == 12 + 4 + 1
