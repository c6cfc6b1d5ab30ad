"""Tests for nfnets.train's step, losses and state modules.

Targets, loss and top-k; the train step (through its one factory, with the
optimizer's numbers bound as constants) and the eval step.

References are NumPy re-derivations: for a linear softmax classifier the
gradient of the cross-entropy is `X^T (softmax(XW + b) - Y) / B`, so one SGD
step, an EMA step and a SAM step can be computed by hand. For the Haiku state
a tiny BN-ResNet's first BatchNorm moving averages are re-derived from a
NumPy convolution of the batch.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nfnets import models, optim
from nfnets.train import losses
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib

NUM_CLASSES = 5
FEATURES = 6


def _opt_config(lr=0.5, **kw):
  """Plain SGD at a constant `lr`: no AGC, momentum, weight decay or warmup."""
  config = optim.default_config()
  config.update(
    name='sgd', lr=lr, min_lr=lr, scale_lr_by_batch=False, warmup_steps=0,
    momentum=0.0, nesterov=False, weight_decay=0.0, clipping=0.0,
    ema_decay=0.0,
  )  # fmt: skip
  config.update(kw)
  return config


def _hyperparams(opt_config, smoothing=0.0):
  values = optim.hyperparams(
    opt_config, steps_per_epoch=1, total_steps=10, global_batch_size=8
  )
  return {**values, **losses.label_smoothing_inputs(smoothing, NUM_CLASSES)}


def _optimizer(opt_config):
  return optim.build_optimizer(opt_config, _hyperparams(opt_config))[0]


def _linear_model():
  def forward(images, is_training):
    del is_training
    x = images.reshape(images.shape[0], -1)
    return {'logits': hk.Linear(NUM_CLASSES, name='linear')(x)}

  return hk.transform_with_state(forward)


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_targets(labels, mix_labels=None, ratio=None, smoothing=0.0):
  y = np.eye(NUM_CLASSES)[labels]
  if mix_labels is not None:
    y = (
      ratio[:, None] * y
      + (1 - ratio[:, None]) * np.eye(NUM_CLASSES)[mix_labels]
    )
  return (1 - smoothing) * y + smoothing / NUM_CLASSES


def _np_grads(w, b, x, targets):
  p = _np_softmax(x @ w + b)
  g = (p - targets) / x.shape[0]
  return x.T @ g, g.sum(0)


def _batch(seed=0, n=8, mixed=False):
  rng = np.random.RandomState(seed)
  batch = {
    'images': rng.randn(n, 1, 1, FEATURES).astype(np.float32),
    'labels': rng.randint(0, NUM_CLASSES, n).astype(np.int32),
  }
  if mixed:
    batch['mix_labels'] = rng.randint(0, NUM_CLASSES, n).astype(np.int32)
    batch['ratio'] = rng.uniform(size=n).astype(np.float32)
  return batch


def _state(model, opt_config, ema=False):
  params, model_state = model.init(
    jax.random.PRNGKey(0), jnp.zeros((1, 1, 1, FEATURES)), 1
  )
  assert model_state == {}
  # Non-zero bias so its gradient path is exercised.
  params = jax.tree.map(lambda p: p + 0.1, params)
  return state_lib.make_train_state(
    params, model_state, _optimizer(opt_config), jax.random.PRNGKey(1),
    ema=ema,
  )  # fmt: skip


def _step(model, opt_config, smoothing=0.1, dtype='float32'):
  """The train step with the numbers of `opt_config` bound, jitted."""
  step = step_lib.make_train_step(
    model, num_classes=NUM_CLASSES, opt_config=opt_config, compute_dtype=dtype
  )
  hyperparams = _hyperparams(opt_config, smoothing)
  return jax.jit(lambda state, batch: step(state, batch, hyperparams))


def test_make_targets_matches_hand_mixing_and_smoothing():
  b = _batch(mixed=True)
  smoothing = losses.label_smoothing_inputs(0.1, NUM_CLASSES)
  got = losses.make_targets(b, NUM_CLASSES, smoothing)
  want = _np_targets(b['labels'], b['mix_labels'], b['ratio'], 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(np.sum(got, -1), 1.0, rtol=1e-6)


def test_cross_entropy_and_topk_match_numpy():
  rng = np.random.RandomState(3)
  logits = rng.randn(16, 10).astype(np.float32)
  labels = rng.randint(0, 10, 16)
  targets = np.eye(10)[labels]
  want = -np.log(_np_softmax(logits.astype(np.float64))[np.arange(16), labels])
  got = losses.softmax_cross_entropy(jnp.asarray(logits), targets)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  ranks = np.argsort(-logits, axis=-1)
  for k in (1, 3, 5):
    want_k = np.any(ranks[:, :k] == labels[:, None], axis=-1)
    got_k = losses.topk_correct(jnp.asarray(logits), jnp.asarray(labels), k)
    np.testing.assert_array_equal(got_k, want_k.astype(np.float32))


def test_sgd_step_matches_hand_gradient():
  model, opt_config = _linear_model(), _opt_config()
  state = _state(model, opt_config)
  b = _batch(mixed=True)
  new, metrics = _step(model, opt_config)(state, b)
  w, bias = (np.asarray(state.params['linear'][k]) for k in ('w', 'b'))
  x = b['images'].reshape(len(b['labels']), -1).astype(np.float64)
  targets = _np_targets(b['labels'], b['mix_labels'], b['ratio'], 0.1)
  gw, gb = _np_grads(w, bias, x, targets)
  np.testing.assert_allclose(new.params['linear']['w'], w - 0.5 * gw, atol=1e-6)
  np.testing.assert_allclose(new.params['linear']['b'], bias - 0.5 * gb, 1e-5)
  p = _np_softmax(x @ w + bias)
  want_loss = -np.mean(np.sum(targets * np.log(p), -1))
  np.testing.assert_allclose(metrics['loss'], want_loss, rtol=1e-5)
  np.testing.assert_allclose(
    metrics['grad_norm'], np.sqrt(np.sum(gw**2) + np.sum(gb**2)), rtol=1e-5
  )
  new_w, new_b = w - 0.5 * gw, bias - 0.5 * gb
  np.testing.assert_allclose(
    metrics['param_norm'], np.sqrt(np.sum(new_w**2) + np.sum(new_b**2)), 1e-5
  )
  top1 = np.mean(np.argmax(p, -1) == b['labels'])
  np.testing.assert_allclose(metrics['top1'], top1)
  assert int(new.step) == 1
  np.testing.assert_array_equal(new.rng, state.rng)
  np.testing.assert_allclose(metrics['lr'], 0.5)


def test_ema_step_uses_warmup_decay():
  model, opt_config = _linear_model(), _opt_config(ema_decay=0.999)
  state = _state(model, opt_config, ema=True)
  new, _ = _step(model, opt_config)(state, _batch())
  # At step 0 the decay is min(0.999, (1 + 0) / (10 + 0)) = 0.1.
  for k in ('w', 'b'):
    want = 0.1 * state.params['linear'][k] + 0.9 * new.params['linear'][k]
    np.testing.assert_allclose(new.ema_params['linear'][k], want, atol=1e-7)


def test_sam_step_uses_gradient_at_ascent_point():
  model, rho = _linear_model(), 0.3
  opt_config = _opt_config(lr=1.0, sam_rho=rho)
  state = _state(model, opt_config)
  b = _batch(seed=1)
  new, _ = _step(model, opt_config, smoothing=0.0)(state, b)
  w, bias = (np.asarray(state.params['linear'][k], np.float64) for k in 'wb')
  x = b['images'].reshape(len(b['labels']), -1).astype(np.float64)
  y = _np_targets(b['labels'])
  gw, gb = _np_grads(w, bias, x, y)
  scale = rho / np.sqrt(np.sum(gw**2) + np.sum(gb**2))
  gw2, gb2 = _np_grads(w + scale * gw, bias + scale * gb, x, y)
  np.testing.assert_allclose(new.params['linear']['w'], w - gw2, atol=1e-6)
  np.testing.assert_allclose(new.params['linear']['b'], bias - gb2, atol=1e-6)


def test_bfloat16_compute_keeps_float32_master_weights():
  model, opt_config = _linear_model(), _opt_config()
  state = _state(model, opt_config)
  b = _batch(mixed=True)
  f32, m32 = _step(model, opt_config)(state, b)
  bf16, m16 = _step(model, opt_config, dtype='bfloat16')(state, b)
  for leaf in jax.tree.leaves(bf16.params):
    assert leaf.dtype == jnp.float32
  assert m16['loss'].dtype == jnp.float32
  # bf16 has an 8-bit mantissa: close to float32, but not equal.
  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=2e-2)
  dw16 = bf16.params['linear']['w'] - state.params['linear']['w']
  dw32 = f32.params['linear']['w'] - state.params['linear']['w']
  np.testing.assert_allclose(dw16, dw32, atol=3e-2 * np.abs(dw32).max())
  assert not np.array_equal(dw16, dw32)


def test_eval_step_ignores_masked_examples():
  model = _linear_model()
  params = _state(model, _opt_config()).params
  b = _batch(seed=2, n=8)
  b['mask'] = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  sums = jax.jit(step_lib.make_eval_step(model, NUM_CLASSES))(params, {}, b)
  x = b['images'].reshape(8, -1)
  logits = x @ np.asarray(params['linear']['w']) + np.asarray(
    params['linear']['b']
  )
  keep = b['mask'] > 0
  correct = np.argmax(logits, -1) == b['labels']
  assert float(sums['count']) == 5.0
  assert float(sums['top1']) == float(np.sum(correct[keep]))
  nll = -np.log(
    _np_softmax(logits.astype(np.float64))[np.arange(8), b['labels']]
  )
  np.testing.assert_allclose(sums['loss'], np.sum(nll[keep]), rtol=1e-5)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_cast_floats_casts_only_floats(dtype):
  tree = {'w': jnp.ones((2,), jnp.float32), 'i': jnp.ones((2,), jnp.int32)}
  out = state_lib.cast_floats(tree, jnp.dtype(dtype))
  assert out['w'].dtype == jnp.dtype(dtype)
  assert out['i'].dtype == jnp.int32


# ----------------------------------------------------------------------------
# Haiku state: a tiny post-activation BN-ResNet (initial_conv -> initial_bn).
# ----------------------------------------------------------------------------

BN_DECAY = 0.8  # Not hk.BatchNorm's or the ResNet's default, so it is read.
BN_EMA_DECAY = 0.999
BN_IMAGES = 32


def _bn_model():
  config = ml_collections.ConfigDict(
    dict(
      name='ResNet',
      kwargs=dict(
        width=0.25,
        depth=(1, 1, 1, 1),
        preactivation=False,
        bn_decay=BN_DECAY,
      ),
    )
  )
  return models.make_model(config, NUM_CLASSES)


def _bn_batch(seed):
  rng = np.random.RandomState(seed)
  shape = (8, BN_IMAGES, BN_IMAGES, 3)
  return {
    'images': (2.0 + 3.0 * rng.randn(*shape)).astype(np.float32),
    'labels': rng.randint(0, NUM_CLASSES, 8).astype(np.int32),
  }


def _np_conv7x7_s2_same(x, w):
  """NumPy 7x7 stride-2 'SAME' conv, NHWC x HWIO (TF's padding rule)."""
  out = x.shape[1] // 2
  pad = max((out - 1) * 2 + 7 - x.shape[1], 0)
  lo = pad // 2
  xp = np.pad(x, ((0, 0), (lo, pad - lo), (lo, pad - lo), (0, 0)))
  y = np.zeros((x.shape[0], out, out, w.shape[-1]))
  for a in range(7):
    for b in range(7):
      y += xp[:, a : a + 2 * out : 2, b : b + 2 * out : 2, :] @ w[a, b]
  return y


@pytest.fixture(scope='module')
def bn_run():
  """Two SGD steps (EMA on) of the tiny BN-ResNet: (model, [s0, s1, s2])."""
  model = _bn_model()
  # Haiku's init compiles 2-3x faster on CPU with an RngBitGenerator key.
  params, model_state = jax.jit(lambda r, x: model.init(r, x, True))(
    jax.random.key(0, impl='unsafe_rbg'),
    jnp.zeros((1, BN_IMAGES, BN_IMAGES, 3)),
  )
  opt_config = _opt_config(ema_decay=BN_EMA_DECAY)
  states = [
    state_lib.make_train_state(
      params, model_state, _optimizer(opt_config), jax.random.PRNGKey(1),
      ema=True,
    )
  ]  # fmt: skip
  step = _step(model, opt_config, 0.0)
  for seed in (0, 1):
    states.append(step(states[-1], _bn_batch(seed))[0])
  return model, jax.device_get(states)


def test_bn_step_updates_moving_averages_from_batch_statistics(bn_run):
  _, states = bn_run
  hidden = {'mean': 0.0, 'var': 0.0}
  for t, seed in enumerate((0, 1)):
    # The first BN layer normalises initial_conv(images) over N, H, W.
    w = np.asarray(states[t].params['ResNet/~/initial_conv']['w'], np.float64)
    x = _np_conv7x7_s2_same(_bn_batch(seed)['images'].astype(np.float64), w)
    stats = {'mean': x.mean((0, 1, 2)), 'var': x.var((0, 1, 2))}  # Biased.
    for name, value in stats.items():
      # hk.ExponentialMovingAverage with Adam-style zero debiasing.
      hidden[name] = BN_DECAY * hidden[name] + (1 - BN_DECAY) * value
      ema = states[t + 1].model_state[f'ResNet/~/initial_bn/~/{name}_ema']
      assert int(ema['counter']) == t + 1
      np.testing.assert_allclose(ema['hidden'].ravel(), hidden[name], 2e-5)
      want = hidden[name] / (1 - BN_DECAY ** (t + 1))
      np.testing.assert_allclose(ema['average'].ravel(), want, rtol=2e-5)
  # The weights are trained: the zero-initialised classifier first, then
  # (once it is non-zero) the convolutions behind it.
  fc = [s.params['ResNet/~/linear']['w'] for s in states]
  assert np.abs(fc[1] - fc[0]).max() > 0
  conv = [s.params['ResNet/~/initial_conv']['w'] for s in states]
  assert np.abs(conv[2] - conv[1]).max() > 0
  for leaf in jax.tree.leaves(states[2].model_state):
    assert leaf.dtype in (np.float32, np.int32)


def test_ema_of_model_state_follows_the_ema_formula(bn_run):
  _, states = bn_run
  ema = states[0].ema_model_state
  for t in (0, 1):
    # optim.ema_decay's warmup: min(decay, (1 + t) / (10 + t)).
    d = min(BN_EMA_DECAY, (1 + t) / (10 + t))
    new = states[t + 1].model_state

    def average(e, n, d=d):  # Counters (int32) are copied.
      return n if n.dtype == np.int32 else d * e + (1 - d) * n

    ema = jax.tree.map(average, ema, new)
    got = states[t + 1].ema_model_state
    assert jax.tree.structure(got) == jax.tree.structure(new)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(ema), strict=True):
      assert g.dtype == w.dtype
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8)
  # At step 0 the EMA starts as a copy of the initial state.
  jax.tree.map(np.testing.assert_array_equal, states[0].ema_model_state,
               states[0].model_state)  # fmt: skip


def test_eval_uses_moving_statistics_not_the_batch(bn_run):
  model, states = bn_run
  state = states[2]
  a, b = _bn_batch(5), _bn_batch(6)
  b['images'][0], b['labels'][0] = a['images'][0], a['labels'][0]
  mask = np.eye(8, dtype=np.float32)[0]  # Only example 0 counts.
  eval_step = jax.jit(step_lib.make_eval_step(model, NUM_CLASSES))
  sums = [
    eval_step(state.params, state.model_state, dict(x, mask=mask))
    for x in (a, b)
  ]
  # Example 0's eval loss does not depend on the other examples...
  np.testing.assert_allclose(sums[0]['loss'], sums[1]['loss'], rtol=1e-6)
  assert abs(float(sums[0]['loss']) - np.log(NUM_CLASSES)) > 1e-4
  # ...while in training mode (batch statistics) its features do.
  train_pool = [
    model.apply(state.params, state.model_state, None, x['images'], True)[0][
      'pool'
    ][0]
    for x in (a, b)
  ]
  assert np.abs(train_pool[0] - train_pool[1]).max() > 1e-3
