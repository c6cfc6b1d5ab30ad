"""Tests for models.nf_regnet: parameter counts, names and block structure.

Expected counts come from a hand formula over the reference's layer
definitions (dm-reference.md section 7 and the B0-B8 width/depth table in
paper-numbers.md section 7.4), written independently of the model code.
A block's forward pass is checked against a hand-written `jax.lax` version
of the reference's (Scaled WS convs, gamma-scaled SiLU, SE between the 3x3
and the last 1x1 conv, avg-pool shortcut) on perturbed parameters.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.models import common, nf_regnet
from tests.support.perturb import perturb

# The reference's gamma of SiLU (dm-reference.md section 2.6).
SILU_GAMMA = 1.7881293296813965

# (widths, depths) from the reference's `nf_regnet_params`.
TABLE = {
  'B0': ((48, 104, 208, 440), (1, 3, 6, 6)),
  'B3': ((56, 128, 248, 528), (2, 5, 9, 9)),
}


# Haiku's init compiles 2-3x faster on CPU with an RngBitGenerator key.
def _fast_key():
  return jax.random.key(0, impl='unsafe_rbg')


def _ws_conv(k, cin, cout, groups=1):
  return k * k * (cin // groups) * cout + 2 * cout


def _linear(cin, cout):
  return cin * cout + cout


def expected_nf_regnet_params(widths, depths, num_classes=1000):
  """Hand count with width 0.75, expansion 2.25, groups of 8, SE 0.5."""
  ch = int(widths[0] * 0.75)
  total = _ws_conv(3, 3, ch)
  first = True
  for stage_width, blocks in zip(widths, depths, strict=True):
    out_ch = int(stage_width * 0.75)
    for b in range(blocks):
      expanded = int(ch * (1 if first else 2.25)) // 8 * 8
      first = False
      hidden = int(expanded * 0.5)
      total += _ws_conv(1, ch, expanded)
      total += _ws_conv(3, expanded, expanded, groups=expanded // 8)
      total += _linear(expanded, hidden) + _linear(hidden, expanded)
      total += _ws_conv(1, expanded, out_ch) + 1  # + skip_gain
      if b == 0 or ch != out_ch:
        total += _ws_conv(1, ch, out_ch)
      ch = out_ch
  final = 1280 * ch // 440
  return total + _ws_conv(1, ch, final) + _linear(final, num_classes)


def _param_shapes(variant, **kwargs):
  def forward(x):
    return nf_regnet.NFRegNet(1000, variant=variant, **kwargs)(x, True)

  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(hk.transform(forward).init, jax.random.PRNGKey(0), x)


def _count(params):
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


@pytest.mark.parametrize('variant', sorted(TABLE))
def test_param_count_matches_hand_formula(variant):
  params = _param_shapes(variant, grouped_conv='native')
  assert _count(params) == expected_nf_regnet_params(*TABLE[variant])


def test_b0_names_and_shapes():
  params = _param_shapes('B0', grouped_conv='native')
  assert _count(params) == 8_595_372  # The hand formula's value for B0.
  assert params['NF_RegNet/~/initial_conv']['w'].shape == (3, 3, 3, 36)
  # First block: expansion 1, 36 -> 32 channels (4 groups of 8).
  block0 = 'NF_RegNet/~/nf_block/~/'
  assert params[block0 + 'conv1']['w'].shape == (3, 3, 8, 32)
  assert params[block0 + 'squeeze_excite/~/linear']['w'].shape == (32, 16)
  # Block 1: 36 * 2.25 = 81 -> 80 channels in 10 groups, stride 2.
  assert params['NF_RegNet/~/nf_block_1/~/conv0']['w'].shape == (1, 1, 36, 80)
  assert params['NF_RegNet/~/final_conv']['w'].shape == (1, 1, 330, 960)
  assert params['NF_RegNet/~/linear']['w'].shape == (960, 1000)
  blocks = [k for k in params if k.count('/~/') == 1 and 'nf_block' in k]
  assert len(blocks) == 16


def test_block_specs_structure():
  specs = nf_regnet.block_specs('B0')
  assert [s.stride for s in specs].count(2) == 4  # Each stage's first.
  assert all(s.width % 8 == 0 for s in specs)
  assert specs[0].width == 32 and specs[1].width == 80
  # Same beta/alpha bookkeeping as the NF-ResNets.
  assert specs[2].beta == pytest.approx(1 / math.sqrt(1 + 0.04))
  assert nf_regnet.final_conv_channels(330) == 960


def test_variants_and_errors():
  assert list(nf_regnet.VARIANTS) == [f'B{i}' for i in range(9)]
  assert nf_regnet.VARIANTS['B8']['depth'] == (4, 11, 22, 22)
  with pytest.raises(ValueError, match='B0'):
    nf_regnet.get_variant('B9')


def test_bad_constructor_arguments_give_clear_errors():
  def build(**kwargs):
    args = dict(num_classes=10, width=0.25, depth=(1, 1, 1, 1)) | kwargs
    hk.transform(lambda: nf_regnet.NFRegNet(**args)).init(None)

  for kwargs, match in [
    (dict(group_size=0), 'group_size must be a positive int'),
    (dict(width=-1.0), 'width must be a number > 0'),
    (dict(num_classes='10'), 'num_classes must be a positive int'),
    (dict(drop_rate=1.0), r'drop_rate must be in \[0, 1\)'),
    # 0 would build 1-channel layers; -2 failed deep inside with a TypeError.
    (dict(expansion=0.0), 'expansion must be a number > 0, got 0.0'),
    (dict(expansion=-2.0), 'expansion must be a number > 0, got -2.0'),
    (dict(se_ratio=-1.0), r'se_ratio must be in \(0, 1\], got -1.0'),
  ]:
    with pytest.raises(ValueError, match=match):
      build(**kwargs)
  for name, variant in nf_regnet.VARIANTS.items():  # Every variant's dropout.
    build(variant=name, drop_rate=variant['drop_rate'])


def test_forward_tiny_zero_init_classifier():
  def forward(x):
    model = nf_regnet.NFRegNet(
      7, width=0.25, depth=(1, 1, 1, 1), stochdepth_rate=0.0
    )
    return model(x, is_training=False, return_metrics=True)

  net = hk.transform(forward)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = jax.jit(net.init)(_fast_key(), x)
  out = jax.jit(net.apply)(params, None, x)
  # The reference zero-initialises the NF-RegNet classifier.
  assert out['logits'].shape == (2, 7)
  assert float(jnp.abs(out['logits']).max()) == 0.0
  assert {'avg_var_0', 'avg_var_4', 'res_avg_var_3'} <= set(out)


def _hand_ws_conv(x, p, stride=1, groups=1):
  """Scaled WS conv (dm-reference.md section 2.7) with lax."""
  w = p['w']
  fan_in = w.shape[0] * w.shape[1] * w.shape[2]
  mean, var = jnp.mean(w, axis=(0, 1, 2)), jnp.var(w, axis=(0, 1, 2))
  w = (w - mean) * p['gain'] / jnp.sqrt(jnp.maximum(fan_in * var, 1e-4))
  y = jax.lax.conv_general_dilated(
    x, w, (stride, stride), 'SAME', feature_group_count=groups,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )  # fmt: skip
  return y + p['bias']


def hand_regnet_block(p, x, *, beta, alpha, groups):
  """A strided NF-RegNet block as the reference computes it (section 7)."""
  act = lambda v: jax.nn.silu(v) * SILU_GAMMA
  b = 'nf_block/~/'
  out = act(x) * beta
  n, h, w, c = out.shape  # 2x2/2 average pool of the shortcut (even H, W).
  pooled = out.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  shortcut = _hand_ws_conv(pooled, p[b + 'conv_shortcut'])
  y = _hand_ws_conv(out, p[b + 'conv0'])
  y = _hand_ws_conv(act(y), p[b + 'conv1'], 2, groups)
  fc0, fc1 = (
    p[b + 'squeeze_excite/~/linear'],
    p[b + 'squeeze_excite/~/linear_1'],
  )
  s = jax.nn.relu(jnp.mean(y, axis=(1, 2)) @ fc0['w'] + fc0['b'])
  y = y * 2 * jax.nn.sigmoid(s @ fc1['w'] + fc1['b'])[:, None, None, :]
  y = _hand_ws_conv(act(y), p[b + 'conv2'])
  return y * p['nf_block']['skip_gain'] * alpha + shortcut


def test_block_forward_is_the_references():
  # A transition block: stride 2, 16 -> 24 channels, expanded to
  # int(16 * 2.25) = 36 -> 32 channels in 4 groups of 8.
  spec = common.BlockSpec(
    index=1, in_ch=16, out_ch=24, width=32, stride=2, beta=0.8,
    stochdepth_rate=0.0, is_transition=True, groups=4,
  )  # fmt: skip
  net = hk.transform(
    lambda x: nf_regnet.NFRegNetBlock(spec, alpha=0.2, name='nf_block')(
      x, is_training=False
    )[0]
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  params = perturb(jax.jit(net.init)(_fast_key(), x))
  # A skip gain of the branch's own scale (alpha 0.2), so that the branch
  # is as large as the shortcut and any error in it shows.
  params['nf_block'] = {'skip_gain': jnp.float32(5.0)}
  got = jax.jit(net.apply)(params, None, x)
  want = hand_regnet_block(params, x, beta=0.8, alpha=0.2, groups=4)
  assert got.shape == (2, 4, 4, 24)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The branch is a sizeable part of the output, not a rounding error.
  branch = want - hand_regnet_block(
    {**params, 'nf_block': {'skip_gain': 0.0}}, x, beta=0.8, alpha=0.2,
    groups=4,
  )  # fmt: skip
  assert float(jnp.std(branch)) > 0.5 * float(jnp.std(want))
