"""Tests for nfnets.models.efficientnet: EfficientNet-B0 to B7.

The sizes are checked against a hand count of the TPU EfficientNet
architecture written out below from its block strings (B0:
'r1_k3_s11_e1_i32_o16_se0.25', 'r2_k3_s22_e6_i16_o24_se0.25', ...), its
`round_filters` / `round_repeats` and its compound-scaling table, not from
our model code; the hand count must give the published figures (parameters
as Keras reports the trainable ones, e.g. B0 5,288,548; multiply-adds B0
0.386B at 224 px, B4 4.39B at 380 px), and our model must match it exactly.
An MBConv block's forward pass is checked against a hand-written `jax.lax`
version of the TPU implementation's on perturbed parameters.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nfnets import models
from nfnets.models import efficientnet, flops
from nfnets.train import train_and_evaluate
from tests.support.perturb import perturb
from tests.support.train_harness import tiny_config

# B0's stages: repeats, kernel, stride, expansion, input and output filters.
B0_STAGES = (
  (1, 3, 1, 1, 32, 16),
  (2, 3, 2, 6, 16, 24),
  (2, 5, 2, 6, 24, 40),
  (3, 3, 2, 6, 40, 80),
  (3, 5, 1, 6, 80, 112),
  (4, 5, 2, 6, 112, 192),
  (1, 3, 1, 6, 192, 320),
)
# (width, depth, resolution, dropout) of the TPU EfficientNet.
COEFFICIENTS = {
  'B0': (1.0, 1.0, 224, 0.2),
  'B1': (1.0, 1.1, 240, 0.2),
  'B2': (1.1, 1.2, 260, 0.3),
  'B3': (1.2, 1.4, 300, 0.3),
  'B4': (1.4, 1.8, 380, 0.4),
  'B5': (1.6, 2.2, 456, 0.4),
  'B6': (1.8, 2.6, 528, 0.5),
  'B7': (2.0, 3.1, 600, 0.5),
}
# Trainable parameters of the TensorFlow EfficientNets (1000 classes).
PUBLISHED_PARAMS = {
  'B0': 5_288_548,
  'B1': 7_794_184,
  'B2': 9_109_994,
  'B3': 12_233_232,
  'B4': 19_341_616,
  'B5': 30_389_784,
  'B6': 43_040_704,
  'B7': 66_347_960,
}
# Published multiply-adds (billions) at the variant's resolution.
PUBLISHED_GMACS = {'B0': 0.386, 'B4': 4.39}
# The NFNet paper's Table 3 (params in millions, GFLOPs), rounded.
TABLE3 = {'B0': (5.3, 0.39), 'B4': (19.0, 4.2), 'B5': (30, 9.9),
          'B7': (66, 37.0)}  # fmt: skip
# Table 3's GFLOPs relative to the architecture's multiply-adds, minus 1.
TABLE3_FLOPS_GAP = {'B0': 0.011, 'B4': -0.044, 'B5': -0.036, 'B7': -0.020}


def hand_round_filters(filters, width):
  scaled = filters * width
  rounded = max(8, int(scaled + 4) // 8 * 8)
  return rounded + 8 if rounded < 0.9 * scaled else rounded


def hand_count(variant, num_classes=1000):
  """(parameters, multiply-adds) of one image, BN moving stats excluded.

  Convs have no bias and are followed by BN (scale and offset: 2 per
  channel); SE layers and the classifier have biases. 'SAME' convs give
  ceil(h / stride). Multiply-adds count convs, SE and the classifier.
  """
  width, depth, size, _ = COEFFICIENTS[variant]
  stem = hand_round_filters(32, width)
  h = -(-size // 2)
  params, macs = 27 * stem + 2 * stem, h * h * 27 * stem
  for repeats, k, stride, expand, cin, cout in B0_STAGES:
    cin, cout = hand_round_filters(cin, width), hand_round_filters(cout, width)
    for i in range(math.ceil(depth * repeats)):
      c = cin if i == 0 else cout
      e = c * expand
      if expand != 1:
        params += c * e + 2 * e
        macs += h * h * c * e
      h = -(-h // (stride if i == 0 else 1))
      params += k * k * e + 2 * e  # Depthwise conv and its BN.
      macs += h * h * k * k * e
      se = max(1, int(c * 0.25))  # A quarter of the block's input filters.
      params += (e * se + se) + (se * e + e)
      macs += 2 * e * se
      params += e * cout + 2 * cout
      macs += h * h * e * cout
  head = hand_round_filters(1280, width)
  params += cout * head + 2 * head + head * num_classes + num_classes
  macs += h * h * cout * head + head * num_classes
  return params, macs


def _config(**kwargs):
  return ml_collections.ConfigDict(dict(name='EfficientNet', kwargs=kwargs))


def _init_shapes(model_config, size, num_classes=1000):
  model = models.make_model(model_config, num_classes)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(
    lambda r, x: model.init(r, x, True), jax.random.PRNGKey(0), x
  )


def test_hand_count_gives_the_published_figures_and_table3_rounding():
  for variant, want in PUBLISHED_PARAMS.items():
    assert hand_count(variant)[0] == want, variant
  for variant, gmacs in PUBLISHED_GMACS.items():
    # Published to 3 significant digits: within 0.1%.
    assert hand_count(variant)[1] / 1e9 == pytest.approx(gmacs, rel=1e-3)
  for variant, (mparams, gflops) in TABLE3.items():
    params, macs = hand_count(variant)
    assert params / 1e6 == pytest.approx(mparams, rel=0.02), variant
    # B0's is rounded up; B4's, B5's and B7's sit below the architecture.
    assert gflops / (macs / 1e9) - 1 == pytest.approx(
      TABLE3_FLOPS_GAP[variant], abs=1e-3
    ), variant


@pytest.mark.parametrize('variant', ['B0', 'B4'])
def test_model_params_state_and_macs_match_the_hand_count(variant):
  size = COEFFICIENTS[variant][2]
  config = _config(variant=variant)
  params, state = _init_shapes(config, size)
  want_params, want_macs = hand_count(variant)
  assert flops.count_params(params) == want_params == PUBLISHED_PARAMS[variant]
  # Every BN layer keeps its two moving averages in the state, not params.
  bn_layers = {k for k in params if k.endswith('_bn')}
  assert {k.rsplit('/~/', 1)[0] for k in state} == bn_layers
  assert all(set(params[k]) == {'scale', 'offset'} for k in bn_layers)
  repeats = [math.ceil(COEFFICIENTS[variant][1] * r[0]) for r in B0_STAGES]
  # Stem, head, depthwise + project per block, expand outside stage 1.
  assert len(bn_layers) == 2 + 2 * sum(repeats) + sum(repeats[1:])
  assert flops.reported_image_size(config) == size
  assert flops.count_model_macs(config) == want_macs


def test_variants_defaults_and_errors():
  for variant, (width, depth, size, drop) in COEFFICIENTS.items():
    got = efficientnet.VARIANTS[variant]
    assert (got['width'], got['depth'], got['drop_rate']) == (
      width, depth, drop,
    )  # fmt: skip
    assert got['train_imsize'] == got['test_imsize'] == size
  assert 'EfficientNet' in models.MODELS
  with pytest.raises(ValueError, match=r"Unknown EfficientNet variant 'B8'"):
    _init_shapes(_config(variant='B8'), 64)
  with pytest.raises(ValueError, match='does not take'):
    models.make_model(_config(variant='B0', alpha=0.2), 10)


def test_bad_arguments_and_eval_mode_init_say_what_to_do():
  tiny = dict(width=0.25, depth=0.1)
  with pytest.raises(ValueError, match='num_classes must be a positive int'):
    _init_shapes(_config(**tiny), 32, num_classes=0)
  with pytest.raises(ValueError, match='width must be a number > 0'):
    _init_shapes(_config(width=0.0, depth=0.1), 32)
  with pytest.raises(ValueError, match=r'drop_rate must be in \[0, 1\)'):
    _init_shapes(_config(drop_rate=1.5, **tiny), 32)
  bad = [
    # 5.0 would reach the blocks as rate 5.0 * i / N under another name.
    (dict(drop_connect_rate=5.0), r'drop_connect_rate must be in \[0, 1\)'),
    (dict(drop_connect_rate=-0.5), r'drop_connect_rate must be in \[0, 1\)'),
    (dict(bn_decay=1.5), r'bn_decay must be in \[0, 1\)'),
    (dict(bn_eps=-1.0), 'bn_eps must be a number > 0'),
    (dict(bn_eps=0.0), 'bn_eps must be a number > 0'),
  ]
  # 0 and -1 would build no MBConv block; (1, 1, 1, 1) is the other
  # families' blocks per stage.
  for depth in (0.0, -1.0, (1, 1, 1, 1), '1.0'):
    bad.append((dict(depth=depth), 'compound-scaling depth coefficient'))
  for kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      _init_shapes(_config(**{**tiny, **kwargs}), 32)
  # The smallest coefficient still keeps one block per stage.
  params, _ = _init_shapes(_config(width=0.25, depth=1e-6), 32)
  assert sum('depthwise_conv' in k for k in params) == len(B0_STAGES)
  # Eval mode reads moving averages that only training mode creates.
  model = models.make_model(_config(**tiny), 10)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  with pytest.raises(ValueError, match='initialise it with is_training=True'):
    jax.eval_shape(
      lambda r, x: model.init(r, x, False), jax.random.PRNGKey(0), x
    )


def test_train_mode_uses_batch_statistics_and_updates_the_averages():
  # Tiny and with native depthwise convs (both forms are checked against
  # each other in tests/ops/test_depthwise.py), to compile fast.
  config = _config(
    width=0.25, depth=0.1, drop_rate=0.0, drop_connect_rate=0.0,
    depthwise_conv='native',
  )  # fmt: skip
  model = models.make_model(config, 5)
  x = 2.0 + 3.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  params, state = jax.jit(model.init, static_argnums=2)(
    jax.random.PRNGKey(1), x, True
  )
  apply = jax.jit(model.apply, static_argnums=4)
  out, new_state = apply(params, state, None, x, True)
  avg = new_state['EfficientNet/~/stem_bn/~/mean_ema']
  assert int(avg['counter']) == 1
  # Haiku's EMA after one update from zero (debiased) is the batch mean
  # of the stem conv's output: recompute it with lax.
  w = params['EfficientNet/~/stem_conv']['w']
  y = jax.lax.conv_general_dilated(
    x, w, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  np.testing.assert_allclose(
    avg['average'].reshape(-1),
    jnp.mean(y, axis=(0, 1, 2)),
    rtol=1e-4,
    atol=1e-5,
  )
  assert out['logits'].shape == (4, 5)
  # Eval mode reads the averages and leaves them as they are.
  _, eval_state = apply(params, new_state, None, x, False)
  jax.tree.map(np.testing.assert_array_equal, eval_state, new_state)


def test_tiny_efficientnet_trains_through_the_trainer(
  tmp_path, compilation_cache_dir
):
  config = tiny_config(compilation_cache_dir)
  config.model.name = 'EfficientNet'
  config.model.kwargs = ml_collections.ConfigDict(
    dict(variant='B0', width=0.25, depth=0.1, depthwise_conv='native')
  )
  config.train.num_steps = 4
  config.train.log_every_steps = 2
  result = train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(result.state.step) == 4
  state = jax.device_get(result.state)
  for name in ('stem_bn', 'mb_conv_block_3/~/depthwise_bn', 'head_bn'):
    ema = state.model_state[f'EfficientNet/~/{name}/~/var_ema']
    assert int(ema['counter']) == 4  # One update per train step.
  assert np.isfinite(result.metrics['train/loss'])
  assert 0.0 <= result.metrics['eval/top1'] <= 1.0


def _hand_conv(x, w, groups=1):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', feature_group_count=groups,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )  # fmt: skip


def _hand_bn(x, p, eps=1e-3):
  """Training-mode BatchNorm (the TPU EfficientNet's eps 1e-3)."""
  mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
  return (x - mean) / jnp.sqrt(var + eps) * p['scale'] + p['offset']


def hand_mbconv(p, x):
  """An MBConv block with SE and skip (Tan & Le 2019; the TPU code's
  MBConvBlock): expand -> BN -> swish -> depthwise -> BN -> swish -> SE
  (swish hidden, sigmoid gate) -> project -> BN -> + x."""
  b = 'mb_conv_block/~/'
  swish = lambda v: v * jax.nn.sigmoid(v)
  y = swish(
    _hand_bn(_hand_conv(x, p[b + 'expand_conv']['w']), p[b + 'expand_bn'])
  )
  w = p[b + 'depthwise_conv']['w']  # (k, k, 1, C): one filter per channel.
  y = swish(
    _hand_bn(_hand_conv(y, w, groups=y.shape[-1]), p[b + 'depthwise_bn'])
  )
  reduce, expand = p[b + 'se_reduce'], p[b + 'se_expand']
  s = swish(jnp.mean(y, axis=(1, 2)) @ reduce['w'] + reduce['b'])
  y = y * jax.nn.sigmoid(s @ expand['w'] + expand['b'])[:, None, None, :]
  y = _hand_bn(_hand_conv(y, p[b + 'project_conv']['w']), p[b + 'project_bn'])
  return y + x


def test_mbconv_block_forward_is_the_references():
  # Expansion 6 (16 -> 96 channels), 3x3 depthwise, SE hidden 16 // 4 = 4,
  # stride 1 and the same width out: the skip connection is on.
  spec = efficientnet.MBConvSpec(
    in_ch=16, out_ch=16, expand_ratio=6, kernel=3, stride=1,
    drop_connect_rate=0.0,
  )  # fmt: skip

  def forward(x):
    block = efficientnet.MBConvBlock(spec, efficientnet.make_norm(), 'native')
    return block(x, is_training=True)[0]

  net = hk.transform_with_state(forward)
  x = 1.0 + jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 16))
  params, state = jax.jit(net.init)(jax.random.PRNGKey(1), x)
  params = perturb(params)
  got, _ = jax.jit(net.apply)(params, state, None, x)
  want = hand_mbconv(params, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The branch is a sizeable part of the output, not a rounding error.
  assert float(jnp.std(want - x)) > 0.5 * float(jnp.std(x))
