"""Fine-tuning with the stem and the first stages frozen.

The frozen set (`optim.frozen_mask`) is checked against each family's block
layout written out by hand: the stem modules and the blocks up to each
stage's last one, counted from `DEPTH`. The optimizer is checked through
the real train step (`make_train_step` with `config.optimizer`): frozen
parameters bit-identical after several steps, the rest moving, the
optimizer state sized by the trainable parameters alone, the trainable
parameters' first update equal to the unfrozen optimizer's, and the EMA;
and the step's multiply-adds, which show no gradient work for the frozen
part.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nfnets import models, optim
from nfnets.models import flops
from nfnets.train import losses
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib

DEPTH = (1, 2, 1, 2)
STAGE_LAST_BLOCK = (0, 2, 3, 5)  # Cumulative DEPTH minus one.
NUM_CLASSES = 5

NFNET_STEM = [f'NFNet/~/stem_conv{i}' for i in range(4)]

# name -> (config.model, stem modules, block module base name).
FAMILIES = {
  'NFNet': (
    dict(name='NFNet', kwargs=dict(width=0.125, group_size=16, depth=DEPTH)),
    NFNET_STEM,
    'NFNet/~/nf_block',
  ),
  # At width 0.5 stage 1's first block keeps its width: no conv_shortcut.
  'NFNet_w0.5': (
    dict(name='NFNet', kwargs=dict(width=0.5, group_size=64, depth=DEPTH)),
    NFNET_STEM,
    'NFNet/~/nf_block',
  ),
  'NF_ResNet': (
    dict(name='NF_ResNet', kwargs=dict(width=0.25, depth=DEPTH)),
    ['NF_ResNet/~/initial_conv'],
    'NF_ResNet/~/nf_res_block',
  ),
  'NF_RegNet': (
    dict(name='NF_RegNet', kwargs=dict(width=0.25, depth=DEPTH)),
    ['NF_RegNet/~/initial_conv'],
    'NF_RegNet/~/nf_block',
  ),
  'ResNet_v1': (
    dict(
      name='ResNet', kwargs=dict(width=0.25, depth=DEPTH, preactivation=False)
    ),
    ['ResNet/~/initial_conv', 'ResNet/~/initial_bn'],
    'ResNet/~/res_block_v1',
  ),
  'SkipInit_ResNet': (
    dict(name='SkipInit_ResNet', kwargs=dict(width=0.25, depth=DEPTH)),
    ['SkipInit_ResNet/~/initial_conv'],
    'SkipInit_ResNet/~/nf_res_block',
  ),
  'Fixup_ResNet': (
    dict(name='Fixup_ResNet', kwargs=dict(width=0.25, depth=DEPTH)),
    ['FixUp_ResNet/~/initial_conv'],
    'FixUp_ResNet/~/res_block',
  ),
}


def _model(model_config):
  config = ml_collections.ConfigDict(model_config)
  return models.make_model(config, NUM_CLASSES)


def _param_shapes(model_config, size=32):
  model = _model(model_config)
  images = jnp.zeros((1, size, size, 3))
  init = lambda rng: model.init(rng, images, True)
  return jax.eval_shape(init, jax.random.PRNGKey(0))[0]


def _names(tree, keep=lambda flag: True):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {optim.leaf_name(path) for path, flag in flat if keep(flag)}


def _expected_frozen(names, stems, block, num_stages):
  """Leaves under a stem module or a block of the first `num_stages`."""
  if num_stages == 0:
    return set()
  last = STAGE_LAST_BLOCK[num_stages - 1]
  blocks = [block + ('' if i == 0 else f'_{i}') for i in range(last + 1)]
  prefixes = [m + '/' for m in stems + blocks]
  # Fixup's scalar bias after the stem conv belongs to the network module.
  fixup_stem_bias = {n for n in names if n == 'FixUp_ResNet/bias1'}
  return fixup_stem_bias | {
    n for n in names if any(n.startswith(p) for p in prefixes)
  }


@pytest.mark.parametrize('family', list(FAMILIES))
def test_frozen_mask_is_the_stem_and_the_first_stages(family):
  model_config, stems, block = FAMILIES[family]
  params = _param_shapes(model_config)
  names = _names(params)
  has_shortcut = any(n.startswith(f'{block}/~/conv_shortcut/') for n in names)
  assert has_shortcut == (family != 'NFNet_w0.5')
  for num_stages in range(5):
    mask = optim.frozen_mask(params, num_stages)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    want = _expected_frozen(names, stems, block, num_stages)
    assert _names(mask, keep=bool) == want, num_stages
  # With all four stages frozen only the head is left.
  top = block.split('/')[0]
  head = ('final_conv', 'final_bn', 'linear', 'bias2')  # Fixup's bias2.
  assert all(n.startswith(f'{top}/') for n in names - want)
  rest = {n[len(top) + 1 :].removeprefix('~/') for n in names - want}
  assert {n.split('/')[0] for n in rest} <= set(head)


def test_frozen_mask_errors():
  params = {'linear': {'w': jnp.zeros((2, 2))}}
  assert not any(jax.tree.leaves(optim.frozen_mask(params, 0)))
  with pytest.raises(ValueError, match='Cannot freeze 1 stages'):
    optim.frozen_mask(params, 1)
  efficientnet = dict(name='EfficientNet', kwargs=dict(variant='B0'))
  with pytest.raises(ValueError, match="EfficientNet's blocks have no stages"):
    optim.frozen_mask(_param_shapes(efficientnet), 1)


def _config(**entries):
  """`config.optimizer` with `entries` set or (value None) removed."""
  values = {**optim.default_config().to_dict(), **entries}
  return ml_collections.ConfigDict(
    {k: v for k, v in values.items() if v is not None or k not in entries}
  )


@pytest.mark.parametrize('bad', [-1, 5, 1.5, True, '2'])
def test_config_rejects_bad_freeze_stages(bad):
  assert optim.default_config().freeze_stages == 0
  for good in range(5):
    optim.validate(_config(freeze_stages=good))
  with pytest.raises(ValueError, match='freeze_stages'):
    optim.validate(_config(freeze_stages=bad))


@pytest.mark.parametrize('bad', [-1, 5, 1.5, True])
def test_library_freeze_rejects_bad_stage_counts(bad):
  # The config's check, shared: -1 used to act as 0 and 1.5 as 1.
  tx = optim.sgd_agc(0.1)
  with pytest.raises(ValueError, match='num_stages must be an integer in 0'):
    optim.with_frozen_stages(tx, bad)
  with pytest.raises(ValueError, match='num_stages must be an integer in 0'):
    optim.stop_frozen_gradients({'m': {'w': np.ones(2)}}, bad)
  assert optim.with_frozen_stages(tx, 0) is tx


def _sizes(tree) -> int:
  """Number of float scalars in a tree of arrays or shapes."""
  return sum(
    math.prod(x.shape)
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.floating)
  )


@pytest.mark.parametrize('name', ['sgd_agc', 'adamw'])
def test_state_holds_only_the_trainable_parameters(name):
  params = _param_shapes(FAMILIES['NF_RegNet'][0])
  trainable = _sizes(params) - sum(
    math.prod(p.shape)
    for p, f in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(optim.frozen_mask(params, 3)),
      strict=True,
    )
    if f
  )
  assert 0 < trainable < _sizes(params)
  slots = 1 if name == 'sgd_agc' else 2  # Momentum; Adam's two moments.
  config = optim.default_config()
  config.name = name
  kw = dict(steps_per_epoch=1.0, total_steps=100, global_batch_size=8)
  plain, _ = optim.make_optimizer(config, **kw)
  config.freeze_stages = 3
  frozen, _ = optim.make_optimizer(config, **kw)
  assert _sizes(jax.eval_shape(plain.init, params)) == slots * _sizes(params)
  assert _sizes(jax.eval_shape(frozen.init, params)) == slots * trainable


def test_freeze_zero_keeps_the_optimizer_and_its_state_structure():
  params = _param_shapes(FAMILIES['NF_ResNet'][0])
  kw = dict(steps_per_epoch=1.0, total_steps=100, global_batch_size=8)
  state = lambda config: jax.eval_shape(
    optim.make_optimizer(config, **kw)[0].init, params
  )
  # A config without the key (an older run's) builds the same optimizer.
  without_key = state(_config(freeze_stages=None))
  assert jax.tree.structure(state(_config())) == jax.tree.structure(without_key)
  assert _sizes(without_key) == _sizes(params)
  chain = optim.sgd_agc(0.1)
  assert optim.with_frozen_stages(chain, 0) is chain


# --- Through the train step ------------------------------------------------


def _opt_config(freeze_stages):
  """The recipe (AGC, weight decay, Nesterov) at a constant LR, with EMA."""
  config = optim.default_config()
  config.update(
    dict(
      lr=0.4,
      min_lr=0.4,
      warmup_steps=0,
      ema_decay=0.9,
      weight_decay=1e-3,
      freeze_stages=freeze_stages,
    )
  )
  return config


@functools.cache
def _run(freeze_stages, num_steps=3):
  """(states after 0..num_steps steps, metrics) of a tiny NF-ResNet."""
  model = _model(FAMILIES['NF_ResNet'][0])
  opt_config = _opt_config(freeze_stages)
  hyperparams = optim.hyperparams(
    opt_config, steps_per_epoch=1.0, total_steps=100, global_batch_size=8
  )
  hyperparams.update(losses.label_smoothing_inputs(0.1, NUM_CLASSES))
  tx, _ = optim.build_optimizer(opt_config, hyperparams)
  images = jnp.zeros((1, 32, 32, 3))
  init = jax.jit(model.init, static_argnums=2)
  params, model_state = init(jax.random.PRNGKey(0), images, True)
  # Every block's branch on from the start, so every weight gets gradients.
  params = jax.tree_util.tree_map_with_path(
    lambda path, p: p + 0.5 if 'skip_gain' in optim.leaf_name(path) else p,
    params,
  )
  state = state_lib.make_train_state(
    params, model_state, tx, jax.random.PRNGKey(1), ema=True
  )
  train_step = step_lib.make_train_step(
    model, num_classes=NUM_CLASSES, opt_config=opt_config,
    compute_dtype='float32',
  )  # fmt: skip
  step = jax.jit(lambda s, b: train_step(s, b, hyperparams))
  rng = np.random.RandomState(0)
  states, metrics = [state], []
  for _ in range(num_steps):
    batch = {
      'images': rng.randn(8, 32, 32, 3).astype(np.float32),
      'labels': rng.randint(0, NUM_CLASSES, 8).astype(np.int32),
    }
    state, m = step(state, batch)
    states.append(state)
    metrics.append(m)
  return states, metrics


def test_train_steps_leave_frozen_parameters_bit_identical():
  states, metrics = _run(freeze_stages=2)
  start, end = states[0], states[-1]
  mask = optim.frozen_mask(start.params, 2)
  frozen = _names(mask, keep=bool)
  assert frozen and len(frozen) < len(_names(mask))
  flat = lambda tree: dict(
    (optim.leaf_name(p), np.asarray(x))
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  )
  p0, p3, ema3 = flat(start.params), flat(end.params), flat(end.ema_params)
  for name in p0:
    if name in frozen:
      np.testing.assert_array_equal(p3[name], p0[name], err_msg=name)
      np.testing.assert_array_equal(ema3[name], p0[name], err_msg=name)
    else:
      assert np.any(p3[name] != p0[name]), f'{name} did not move'
      assert np.any(ema3[name] != p3[name]), name
  # No optimizer state for the frozen parameters: one momentum buffer per
  # trainable scalar, nothing more.
  trainable = sum(p0[n].size for n in p0 if n not in frozen)
  assert _sizes(end.opt_state) == trainable
  assert all(np.isfinite(m['loss']) for m in metrics)


def test_trainable_parameters_get_the_unfrozen_update():
  """AGC, weight decay and momentum act on them as without the freeze."""
  frozen_states, _ = _run(freeze_stages=2)
  plain_states, _ = _run(freeze_stages=0)
  start = frozen_states[0].params
  mask = optim.frozen_mask(start, 2)

  def check(is_frozen, p0, p_frozen, p_plain):
    if is_frozen:
      np.testing.assert_array_equal(p_frozen, p0)
      assert np.any(p_plain != p0)  # The unfrozen run moves them.
    else:
      np.testing.assert_allclose(p_frozen, p_plain, rtol=1e-6, atol=1e-9)

  jax.tree.map(
    check, mask, start, frozen_states[1].params, plain_states[1].params
  )


def _train_step_macs(family, freeze_stages, batch_size=8):
  """(multiply-adds of one train step, of its forward pass; params)."""
  model = _model(FAMILIES[family][0])
  images = jnp.zeros((batch_size, 32, 32, 3))
  rng = jax.random.PRNGKey(0)
  params, model_state = model.init(rng, images[:1], True)
  forward = flops.count_model_flops(
    lambda p, s, x: model.apply(p, s, rng, x, True), params, model_state, images
  )
  opt_config = _opt_config(freeze_stages)
  hyperparams = optim.hyperparams(
    opt_config, steps_per_epoch=1.0, total_steps=100, global_batch_size=8
  )
  hyperparams.update(losses.label_smoothing_inputs(0.1, NUM_CLASSES))
  tx, _ = optim.build_optimizer(opt_config, hyperparams)
  state = state_lib.make_train_state(params, model_state, tx, rng, ema=True)
  train_step = step_lib.make_train_step(
    model, num_classes=NUM_CLASSES, opt_config=opt_config,
    compute_dtype='float32',
  )  # fmt: skip
  batch = {'images': images, 'labels': jnp.zeros(batch_size, jnp.int32)}
  step = flops.count_model_flops(
    lambda st, b: train_step(st, b, hyperparams), state, batch
  )
  return step, forward, params


@pytest.mark.parametrize('family', ['NF_ResNet', 'ResNet_v1'])
def test_frozen_parameters_gradients_are_never_computed(family):
  """The step's backward pass stops at the first trainable layer.

  With all four stages and the stem frozen only the classifier trains, so
  the step's multiply-adds are the forward pass's plus the classifier's
  kernel gradient (batch x features x classes), by hand; each stage
  frozen removes work.
  """
  macs = [_train_step_macs(family, n) for n in range(5)]
  _, forward, params = macs[0]
  features = params[f'{family.split("_v")[0]}/~/linear']['w'].shape[0]
  assert macs[4][0] == forward + 8 * features * NUM_CLASSES
  steps = [m[0] for m in macs]
  assert all(a > b for a, b in zip(steps, steps[1:], strict=False)), steps


def test_ema_of_an_unchanged_leaf_stays_equal_to_it():
  p = jax.random.normal(jax.random.PRNGKey(0), (10_000,))
  for step in (0, 1, 100, 10**6):
    for decay in (0.9, 0.99999):
      out = optim.ema_update({'w': p}, {'w': p}, step, decay)
      np.testing.assert_array_equal(out['w'], p)
  # Elsewhere it is still the average, `ema * d + new * (1 - d)`.
  q = p + 1.0
  out = optim.ema_update({'w': p}, {'w': q}, 0, 0.99999)  # d = 0.1
  np.testing.assert_allclose(out['w'], 0.1 * p + 0.9 * q, rtol=1e-6)
