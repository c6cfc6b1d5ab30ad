"""Tests for nfnets.models.resnet: the BatchNorm ResNet baselines.

Parameter counts are checked against torchvision's published ResNet-50
count and a hand formula over the reference's layer definitions
(dm-reference.md section 7: BN after/before each conv, no conv biases).
The v1 and v2 blocks' forward passes (with squeeze-excite) are checked
against hand-written `jax.lax` versions of the reference's on perturbed
parameters.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nfnets import models
from nfnets.models import resnet
from tests.support.perturb import perturb

R50 = (3, 4, 6, 3)


# Haiku's init compiles 2-3x faster on CPU with an RngBitGenerator key.
def _fast_key():
  return jax.random.key(0, impl='unsafe_rbg')


def _bn(c):
  return 2 * c  # scale + offset


def expected_resnet_params(
  depth, preactivation, se=None, width=4, classes=1000
):
  """Hand count of a (pre- or post-activation) BN ResNet."""
  total = 7 * 7 * 3 * 16 * width
  total += 0 if preactivation else _bn(16 * width)  # initial_bn
  in_ch = 16 * width
  for mult, blocks in zip((64, 128, 256, 512), depth, strict=True):
    out_ch, mid = mult * width, mult * width // 4
    for b in range(blocks):
      total += in_ch * mid + 9 * mid * mid + mid * out_ch
      # v2 normalises each conv's input (bn0 on in_ch, bn1/bn2 on mid); v1
      # each conv's output (bn0/bn1 on mid, bn2 on out_ch).
      if preactivation:
        total += _bn(in_ch) + 2 * _bn(mid)
      else:
        total += 2 * _bn(mid) + _bn(out_ch)
      if b == 0:
        total += in_ch * out_ch + (0 if preactivation else _bn(out_ch))
      if se is not None:
        hidden = int(out_ch * se)
        total += out_ch * hidden + hidden + hidden * out_ch + out_ch
      in_ch = out_ch
  total += _bn(in_ch) if preactivation else 0  # final_bn
  return total + in_ch * classes + classes


def _shapes(**kwargs):
  net = resnet.make_transformed(1000, **kwargs)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(
    lambda r, x: net.init(r, x, True), jax.random.PRNGKey(0), x
  )


def _count(tree):
  return sum(math.prod(p.shape) for p in jax.tree.leaves(tree))


def test_post_activation_resnet50_matches_torchvision_count():
  params, state = _shapes(preactivation=False)
  # torchvision.models.resnet50: 25,557,032 parameters.
  assert _count(params) == 25_557_032
  assert _count(params) == expected_resnet_params(R50, preactivation=False)
  assert state, 'BatchNorm keeps its moving averages in Haiku state'


@pytest.mark.parametrize('use_se', [False, True])
def test_pre_activation_counts(use_se):
  params, _ = _shapes(preactivation=True, use_se=use_se)
  se = 0.25 if use_se else None
  assert _count(params) == expected_resnet_params(R50, True, se=se)


def test_reference_names():
  params, _ = _shapes(preactivation=True)
  assert 'ResNet/~/final_bn' in params and 'ResNet/~/initial_bn' not in params
  assert 'ResNet/~/res_block_v2_15/~/bn2' in params
  assert 'ResNet/~/res_block_v2/~/conv_shortcut' in params
  params, _ = _shapes(preactivation=False)
  # The reference builds shortcut_bn inside __call__, hence no '~'.
  assert 'ResNet/~/res_block_v1_3/shortcut_bn' in params
  assert 'ResNet/~/final_bn' not in params
  conv = params['ResNet/~/res_block_v1_3/~/conv1']
  assert set(conv) == {'w'}  # No conv bias.


def test_batchnorm_normalises_block_outputs_in_training():
  """Post-activation BN ResNet: each branch output has unit variance."""
  net = resnet.make_transformed(
    5, width=0.25, depth=(1, 1, 1, 1), preactivation=False
  )
  x = 3.0 + 5.0 * jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  init = jax.jit(lambda r, x: net.init(r, x, True))
  params, state = init(_fast_key(), x)
  apply = jax.jit(
    lambda p, s, x: net.apply(p, s, None, x, True, return_metrics=True)
  )
  out, new_state = apply(params, state, x)
  # bn2 (scale 1, offset 0 at init) normalises each branch channel over the
  # batch: the average channel variance is 1 up to BN's eps.
  for i in range(4):
    np.testing.assert_allclose(out[f'res_avg_var_{i}'], 1.0, rtol=1e-3)
  assert float(jnp.abs(out['logits']).max()) == 0.0  # Zero-init classifier.
  # Training updates the moving averages kept in state.
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state, new_state)
  assert any(jax.tree.leaves(changed))


def test_registry_builds_bn_resnets_with_state():
  config = models.default_config()
  config.unlock()
  config.name = 'ResNet'
  config.kwargs = dict(width=0.25, depth=(1, 1, 1, 1), use_se=True)
  model = models.make_model(config, 10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params, state = jax.eval_shape(
    lambda r, x: model.init(r, x, True), jax.random.PRNGKey(0), x
  )
  # Pre-activation: bn0, bn1, bn2 in each of the 4 blocks and final_bn, each
  # keeping a mean and a variance EMA in the state.
  bn_layers = {k.rsplit('/~/', 1)[0] for k in state}
  assert len(bn_layers) == 4 * 3 + 1
  assert len(state) == 2 * len(bn_layers)
  names = ('bn0', 'bn1', 'bn2', 'final_bn')
  assert bn_layers == {k for k in params if k.rsplit('/', 1)[-1] in names}
  # A normalizer-free model has an empty state.
  config.kwargs = dict(width=0.25, depth=(1, 1, 1, 1), norm='none')
  _, state = jax.eval_shape(
    lambda r, x: models.make_model(config, 10).init(r, x, True),
    jax.random.PRNGKey(0),
    x,
  )
  assert state == {}


def test_registry_names_kwargs_of_another_model():
  config = models.default_config()  # NFNet kwargs.
  config.name = 'ResNet'
  with pytest.raises(ValueError, match=r"\['alpha'.*--config.model.kwargs="):
    models.make_model(config, 10)
  with pytest.raises(ValueError, match='batch_norm'):
    resnet.make_norm('layer_norm')


def test_make_model_refuses_bad_num_classes_and_whole_configs():
  config = models.default_config()
  for num_classes in (None, 0, '10', 10.0, True):
    with pytest.raises(ValueError, match='num_classes must be a positive int'):
      models.make_model(config, num_classes)
  whole = ml_collections.ConfigDict(dict(model=config, seed=0))
  for wrong in (whole, whole.to_dict()):
    with pytest.raises(ValueError, match='pass config.model, not the whole'):
      models.make_model(wrong, 10)
  with pytest.raises(ValueError, match="its name is one of \\['NFNet'"):
    models.make_model({}, 10)
  # A plain dict `config.model` works like the ConfigDict.
  kwargs = dict(width=0.25, depth=(1, 1, 1, 1))
  model = models.make_model(dict(name='ResNet', kwargs=kwargs), 10)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  jax.eval_shape(lambda r, x: model.init(r, x, True), jax.random.PRNGKey(0), x)


def test_bad_constructor_arguments_and_eval_mode_init_say_what_to_do():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

  def init(is_training, **kwargs):
    config = ml_collections.ConfigDict(dict(name='ResNet', kwargs=kwargs))
    model = models.make_model(config, 10)
    init = lambda r, x: model.init(r, x, is_training)
    return jax.eval_shape(init, jax.random.PRNGKey(0), x)

  tiny = dict(width=0.25, depth=(1, 1, 1, 1))
  with pytest.raises(ValueError, match='width must be a number > 0'):
    init(True, width=0, depth=(1, 1, 1, 1))
  with pytest.raises(ValueError, match=r'drop_rate must be in \[0, 1\)'):
    init(True, drop_rate=1.0, **tiny)
  with pytest.raises(ValueError, match='depth must be 4 positive ints'):
    init(True, width=0.25, depth=1)
  with pytest.raises(ValueError, match=r'se_ratio must be in \(0, 1\]'):
    init(True, use_se=True, se_ratio=-1.0, **tiny)
  with pytest.raises(ValueError, match=r'bn_decay must be in \[0, 1\)'):
    init(True, bn_decay=1.5, **tiny)
  # Eval mode reads moving averages that only training mode creates.
  with pytest.raises(ValueError, match='initialise it with is_training=True'):
    init(False, **tiny)
  _, state = init(False, norm='none', **tiny)  # No BatchNorm, no averages.
  assert state == {}


def _hand_conv(x, p, stride=1):
  return jax.lax.conv_general_dilated(
    x, p['w'], (stride, stride), 'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )  # fmt: skip


def _hand_bn(x, p, eps=1e-5):
  """Training-mode BatchNorm: the batch's own statistics per channel."""
  mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
  return (x - mean) / jnp.sqrt(var + eps) * p['scale'] + p['offset']


def _hand_se(x, p0, p1):
  """Plain squeeze-excite: x * sigmoid(fc1(relu(fc0(mean_hw(x)))))."""
  s = jax.nn.relu(jnp.mean(x, axis=(1, 2)) @ p0['w'] + p0['b'])
  return x * jax.nn.sigmoid(s @ p1['w'] + p1['b'])[:, None, None, :]


def hand_block(p, x, preactivation, stride=2):
  """The reference's strided projection block with SE (dm-reference.md
  section 7; He et al. 2016 v1 / v2 orders)."""
  relu, b = jax.nn.relu, 'res_block/~/'
  se = lambda y: _hand_se(
    y, p[b + 'squeeze_excite/~/linear'], p[b + 'squeeze_excite/~/linear_1']
  )
  if preactivation:  # BN-ReLU-conv; the shortcut sees act(bn0(x)) too.
    out = relu(_hand_bn(x, p[b + 'bn0']))
    shortcut = _hand_conv(out, p[b + 'conv_shortcut'], stride)
    y = _hand_conv(out, p[b + 'conv0'])
    y = _hand_conv(relu(_hand_bn(y, p[b + 'bn1'])), p[b + 'conv1'], stride)
    y = _hand_conv(relu(_hand_bn(y, p[b + 'bn2'])), p[b + 'conv2'])
    return se(y) + shortcut
  shortcut = _hand_conv(x, p[b + 'conv_shortcut'], stride)
  shortcut = _hand_bn(shortcut, p['res_block/shortcut_bn'])
  y = relu(_hand_bn(_hand_conv(x, p[b + 'conv0']), p[b + 'bn0']))
  y = relu(_hand_bn(_hand_conv(y, p[b + 'conv1'], stride), p[b + 'bn1']))
  y = _hand_bn(_hand_conv(y, p[b + 'conv2']), p[b + 'bn2'])
  return relu(se(y) + shortcut)


@pytest.mark.parametrize('preactivation', [True, False], ids=['v2', 'v1'])
def test_se_block_forward_is_the_references(preactivation):
  def forward(x):
    block = resnet.ResBlock(
      16, stride=2, use_projection=True, preactivation=preactivation,
      which_norm=resnet.make_norm('batch_norm'), use_se=True,
      name='res_block',
    )  # fmt: skip
    return block(x, is_training=True)[0]

  net = hk.transform_with_state(forward)
  x = 1.0 + jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 8))
  params, state = jax.jit(net.init)(_fast_key(), x)
  params = perturb(params)
  got, _ = jax.jit(net.apply)(params, state, None, x)
  want = hand_block(params, x, preactivation)
  assert got.shape == (4, 4, 4, 16)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
