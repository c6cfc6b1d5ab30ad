"""Tests for models.nf_resnet: parameter counts, names, beta schedule, forward.

Expected parameter counts are computed here from the reference's layer
definitions (dm-reference.md section 7) with a hand formula over the layer
shapes, and cross-checked against torchvision's published ResNet-50 count.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.models import nf_resnet

DEPTHS = {'ResNet50': (3, 4, 6, 3), 'ResNet101': (3, 4, 23, 3)}


# Haiku's init compiles 2-3x faster on CPU with an RngBitGenerator key.
def _fast_key():
  return jax.random.key(0, impl='unsafe_rbg')


def _ws_conv(k, cin, cout):
  """A WSConv2D: kernel plus per-channel gain and bias."""
  return k * k * cin * cout + 2 * cout


def _linear(cin, cout):
  return cin * cout + cout


def expected_nf_resnet_params(depth, width=4, num_classes=1000, se=None):
  """Hand count: 7x7 stem, bottlenecks of ratio 1/4, projections, fc."""
  total = _ws_conv(7, 3, 16 * width)
  in_ch = 16 * width
  for mult, blocks in zip((64, 128, 256, 512), depth, strict=True):
    out_ch = mult * width
    mid = out_ch // 4
    for b in range(blocks):
      total += _ws_conv(1, in_ch, mid) + _ws_conv(3, mid, mid)
      total += _ws_conv(1, mid, out_ch) + 1  # + skip_gain
      if b == 0:
        total += _ws_conv(1, in_ch, out_ch)
      if se is not None:
        hidden = int(out_ch * se)
        total += _linear(out_ch, hidden) + _linear(hidden, out_ch)
      in_ch = out_ch
  return total + _linear(512 * width, num_classes)


def _param_shapes(num_classes=1000, size=64, **kwargs):
  def forward(x):
    return nf_resnet.NFResNet(num_classes, **kwargs)(x, is_training=True)

  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(hk.transform(forward).init, jax.random.PRNGKey(0), x)


def _count(params):
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


@pytest.mark.parametrize('variant', ['ResNet50', 'ResNet101'])
def test_param_count_matches_hand_formula(variant):
  params = _param_shapes(variant=variant)
  assert _count(params) == expected_nf_resnet_params(DEPTHS[variant])


def test_nf_resnet50_count_is_resnet50_plus_skip_gains():
  # torchvision's published ResNet-50 has 25,557,032 parameters; an
  # NF-ResNet-50 swaps each BN's scale/offset for a WS gain/bias and adds
  # one scalar skip gain per block (16 blocks).
  assert expected_nf_resnet_params(DEPTHS['ResNet50']) == 25_557_032 + 16
  assert _count(_param_shapes()) == 25_557_048


def test_se_param_count():
  params = _param_shapes(use_se=True, variant='ResNet50')
  expected = expected_nf_resnet_params(DEPTHS['ResNet50'], se=0.25)
  assert _count(params) == expected


def test_reference_names_and_shapes():
  params = _param_shapes()
  blocks = [k for k in params if k.count('/~/') == 1 and 'nf_res_block' in k]
  assert len(blocks) == 16
  assert params['NF_ResNet/~/initial_conv']['w'].shape == (7, 7, 3, 64)
  assert params['NF_ResNet/~/nf_res_block']['skip_gain'].shape == ()
  shortcut = sorted(
    k.split('/~/')[1] for k in params if k.endswith('conv_shortcut')
  )
  # Projection blocks: the first of each stage (0, 3, 7, 13).
  assert shortcut == [
    'nf_res_block',
    'nf_res_block_13',
    'nf_res_block_3',
    'nf_res_block_7',
  ]
  conv1 = params['NF_ResNet/~/nf_res_block_13/~/conv1']
  assert conv1['w'].shape == (3, 3, 512, 512)
  assert params['NF_ResNet/~/linear']['w'].shape == (2048, 1000)


def test_beta_and_stochdepth_schedule():
  alpha = 0.2
  specs = nf_resnet.block_specs('ResNet50', alpha=alpha, stochdepth_rate=0.1)
  # Hand computation: block j>0 of a stage sees variance 1 + j * alpha^2
  # (reset after the transition); the very first block sees 1.
  expected_betas, stage_starts = [], {0, 3, 7, 13}
  var = 1.0
  for i in range(16):
    expected_betas.append(1.0 / math.sqrt(var))
    var = 1.0 + alpha**2 if i in stage_starts else var + alpha**2
  np.testing.assert_allclose([s.beta for s in specs], expected_betas)
  assert specs[4].beta == pytest.approx(1 / math.sqrt(1 + alpha**2))
  assert [s.stride for s in specs if s.is_transition] == [1, 2, 2, 2]
  assert specs[-1].stochdepth_rate == pytest.approx(0.1 * 15 / 16)


def test_non_transition_blocks_are_identity_at_init():
  """With skip_gain 0, a block that keeps its width passes x unchanged."""

  def forward(x):
    return nf_resnet.NFResNet(
      10, width=0.25, depth=(2, 1, 1, 1), stochdepth_rate=0.0
    )(x, is_training=False, return_metrics=True)

  net = hk.transform(forward)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  params = jax.jit(net.init)(_fast_key(), x)
  out = jax.jit(net.apply)(params, None, x)
  # Block 1 (second of stage 0) is the identity: same statistics as block 0.
  np.testing.assert_allclose(out['avg_var_2'], out['avg_var_1'], rtol=1e-6)
  assert out['logits'].shape == (2, 10)
  # N(0, 0.01) classifier: small but non-zero logits.
  assert 0 < float(jnp.abs(out['logits']).max()) < 1.0


def test_errors_say_what_to_do():
  with pytest.raises(ValueError, match='ResNet50'):
    nf_resnet.get_variant('ResNet51')
  with pytest.raises(ValueError, match='too small'):
    hk.transform(lambda x: nf_resnet.NFResNet(10, width=0.25)(x)).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))
    )


def test_bad_constructor_arguments_give_clear_errors():
  def build(**kwargs):
    args = dict(num_classes=10, width=0.25, depth=(1, 1, 1, 1)) | kwargs
    hk.transform(lambda: nf_resnet.NFResNet(**args)).init(None)

  for kwargs, match in [
    (dict(width=0), 'width must be a number > 0'),
    (dict(num_classes=0), 'num_classes must be a positive int'),
    (dict(stochdepth_rate=1.5), r'stochdepth_rate must be in \[0, 1\]'),
    (dict(drop_rate=-0.1), r'drop_rate must be in \[0, 1\)'),
    (dict(depth=3), 'depth must be 4 positive ints'),
  ]:
    with pytest.raises(ValueError, match=match):
      build(**kwargs)
  build(stochdepth_rate=1.0, drop_rate=None)
