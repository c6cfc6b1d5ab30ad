"""Tests for nfnets.train.step: loss, targets, top-k, the train/eval steps.

References are NumPy re-derivations: for a linear softmax classifier the
gradient of the cross-entropy is `X^T (softmax(XW + b) - Y) / B`, so one SGD
step, an EMA step and a SAM step can be computed by hand.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nfnets.train import step as step_lib

NUM_CLASSES = 5
FEATURES = 6


def _opt_config(**kw):
  base = dict(
    sam_rho=0.0, ema_decay=0.0, clipping=0.0, eps=1e-3, agc_exclude=()
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _linear_model():
  def forward(images, is_training):
    del is_training
    x = images.reshape(images.shape[0], -1)
    return {'logits': hk.Linear(NUM_CLASSES, name='linear')(x)}

  return hk.transform(forward)


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


def _state(model, tx, ema=False):
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 1, FEATURES)), 1)
  # Non-zero bias so its gradient path is exercised.
  params = jax.tree.map(lambda p: p + 0.1, params)
  return step_lib.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema_params=jax.tree.map(jnp.copy, params) if ema else None,
    rng=jax.random.PRNGKey(1),
  )


def _step(model, tx, opt_config, smoothing=0.1, dtype='float32'):
  return jax.jit(
    step_lib.make_train_step(
      model,
      tx,
      lambda s: 0.5 * jnp.ones_like(s, jnp.float32),
      num_classes=NUM_CLASSES,
      opt_config=opt_config,
      compute_dtype=dtype,
      label_smoothing=smoothing,
    )
  )


def test_make_targets_matches_hand_mixing_and_smoothing():
  b = _batch(mixed=True)
  got = step_lib.make_targets(b, NUM_CLASSES, 0.1)
  want = _np_targets(b['labels'], b['mix_labels'], b['ratio'], 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(np.sum(got, -1), 1.0, rtol=1e-6)


def test_cross_entropy_and_topk_match_numpy():
  rng = np.random.RandomState(3)
  logits = rng.randn(16, 10).astype(np.float32)
  labels = rng.randint(0, 10, 16)
  targets = np.eye(10)[labels]
  want = -np.log(_np_softmax(logits.astype(np.float64))[np.arange(16), labels])
  got = step_lib.softmax_cross_entropy(jnp.asarray(logits), targets)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  ranks = np.argsort(-logits, axis=-1)
  for k in (1, 3, 5):
    want_k = np.any(ranks[:, :k] == labels[:, None], axis=-1)
    got_k = step_lib.topk_correct(jnp.asarray(logits), jnp.asarray(labels), k)
    np.testing.assert_array_equal(got_k, want_k.astype(np.float32))


def test_sgd_step_matches_hand_gradient():
  model, tx = _linear_model(), optax.sgd(0.5)
  state = _state(model, tx)
  b = _batch(mixed=True)
  new, metrics = _step(model, tx, _opt_config())(state, b)
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
  model, tx = _linear_model(), optax.sgd(0.5)
  state = _state(model, tx, ema=True)
  new, _ = _step(model, tx, _opt_config(ema_decay=0.999))(state, _batch())
  # At step 0 the decay is min(0.999, (1 + 0) / (10 + 0)) = 0.1.
  for k in ('w', 'b'):
    want = 0.1 * state.params['linear'][k] + 0.9 * new.params['linear'][k]
    np.testing.assert_allclose(new.ema_params['linear'][k], want, atol=1e-7)


def test_sam_step_uses_gradient_at_ascent_point():
  model, tx, rho = _linear_model(), optax.sgd(1.0), 0.3
  state = _state(model, tx)
  b = _batch(seed=1)
  new, _ = _step(model, tx, _opt_config(sam_rho=rho), smoothing=0.0)(state, b)
  w, bias = (np.asarray(state.params['linear'][k], np.float64) for k in 'wb')
  x = b['images'].reshape(len(b['labels']), -1).astype(np.float64)
  y = _np_targets(b['labels'])
  gw, gb = _np_grads(w, bias, x, y)
  scale = rho / np.sqrt(np.sum(gw**2) + np.sum(gb**2))
  gw2, gb2 = _np_grads(w + scale * gw, bias + scale * gb, x, y)
  np.testing.assert_allclose(new.params['linear']['w'], w - gw2, atol=1e-6)
  np.testing.assert_allclose(new.params['linear']['b'], bias - gb2, atol=1e-6)


def test_bfloat16_compute_keeps_float32_master_weights():
  model, tx = _linear_model(), optax.sgd(0.5)
  state = _state(model, tx)
  b = _batch(mixed=True)
  f32, m32 = _step(model, tx, _opt_config())(state, b)
  bf16, m16 = _step(model, tx, _opt_config(), dtype='bfloat16')(state, b)
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
  model, tx = _linear_model(), optax.sgd(0.5)
  params = _state(model, tx).params
  b = _batch(seed=2, n=8)
  b['mask'] = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  sums = jax.jit(step_lib.make_eval_step(model, NUM_CLASSES))(params, b)
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
  out = step_lib.cast_floats(tree, jnp.dtype(dtype))
  assert out['w'].dtype == jnp.dtype(dtype)
  assert out['i'].dtype == jnp.int32
