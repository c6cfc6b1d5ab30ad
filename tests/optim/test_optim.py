"""Tests for nfnets.optim against NumPy re-derivations and hand computations.

The NumPy references below are written from the paper and from the
description of DeepMind's reference optimizer (`SGD_AGC`), not from our code:
they compute the same quantities independently, in float64.
"""

import functools
import math
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import nfnets
from nfnets import optim
from nfnets.models import layers

# ---------------------------------------------------------------------------
# NumPy references.
# ---------------------------------------------------------------------------


def np_unit_norm(x):
  """Paper/reference unit norms: whole tensor for scalars and vectors, per
  output unit (last axis) for (in, out) Linear and HWIO conv kernels."""
  x = np.asarray(x, np.float64)
  if np.squeeze(x).ndim <= 1:
    return np.sqrt(np.sum(x**2)) * np.ones_like(x)
  axes = {2: (0,), 4: (0, 1, 2)}[x.ndim]
  return np.sqrt(np.sum(x**2, axis=axes, keepdims=True)) * np.ones_like(x)


def np_agc(g, p, clipping, eps=1e-3):
  """Clip G_i to clipping * max(|W_i|, eps) where it is larger."""
  g = np.asarray(g, np.float64)
  max_norm = clipping * np.maximum(np_unit_norm(p), eps)
  g_norm = np_unit_norm(g)
  return np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)


def ref_groups(module, name):
  """The reference's groups: (clip, decay) for one parameter."""
  gain_or_bias = (
    name in ('scale', 'offset', 'b') or 'gain' in name or 'bias' in name
  )
  classifier_w = (
    not gain_or_bias and 'linear' in module and 'squeeze_excite' not in module
  )
  return not classifier_w, not gain_or_bias


def np_sgd_agc_step(params, bufs, grads, lr, wd, clipping, momentum=0.9):
  """One step of the reference SGD_AGC on {module: {name: array}} trees."""
  new_params, new_bufs = {}, {}
  for module, leaves in params.items():
    new_params[module], new_bufs[module] = {}, {}
    for name, p in leaves.items():
      clip, decay = ref_groups(module, name)
      g = np.asarray(grads[module][name], np.float64)
      if clip:
        g = np_agc(g, p, clipping)
      if decay:
        g = g + wd * p
      buf = momentum * bufs[module][name] + g
      new_bufs[module][name] = buf
      new_params[module][name] = p - lr * (g + momentum * buf)
  return new_params, new_bufs


def nfnet_like_tree(rng):
  """Every NFNet parameter group, with zero-initialised biases/skip gain."""
  normal = lambda *s: rng.normal(size=s) / math.sqrt(np.prod(s[:-1]))
  ws = lambda *s: {
    'w': normal(*s),
    'gain': np.ones(s[-1]),
    'bias': np.zeros(s[-1]),
  }
  return {
    'NFNet/~/stem_conv0': ws(3, 3, 3, 8),
    'NFNet/~/nf_block': {'skip_gain': np.zeros(())},
    'NFNet/~/nf_block/~/conv1': ws(3, 3, 4, 8),  # Two groups of 4.
    'NFNet/~/nf_block/~/squeeze_excite/~/linear': {
      'w': normal(8, 4),
      'b': np.zeros(4),
    },
    'NFNet/~/nf_block/~/squeeze_excite/~/linear_1': {
      'w': normal(4, 8),
      'b': np.zeros(8),
    },
    'NFNet/~/final_conv': ws(1, 1, 8, 16),
    'NFNet/~/linear': {'w': normal(16, 10), 'b': np.zeros(10)},
  }


def random_grads(rng, tree):
  """Gradients whose unit norms straddle the clipping threshold."""

  def grad(p):
    scale = 10.0 ** rng.uniform(-5, 0, size=np.shape(p)[-1:] or ())
    return rng.normal(size=np.shape(p)) * scale

  return jax.tree.map(grad, tree)


def to_f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


# ---------------------------------------------------------------------------
# AGC.
# ---------------------------------------------------------------------------

AGC_SHAPES = {
  'scalar': (),
  'vector': (16,),
  'linear': (32, 8),
  'conv_grouped': (3, 3, 4, 12),  # HWIO of a conv with 3 groups of 4.
  'conv_1x1': (1, 1, 24, 8),  # Most NFNet weights: reduced on a 2-D view.
}


@pytest.mark.parametrize('zero_param', [False, True])
@pytest.mark.parametrize('kind', sorted(AGC_SHAPES))
def test_agc_matches_numpy(kind, zero_param):
  rng = np.random.default_rng(0)
  shape = AGC_SHAPES[kind]
  p = np.zeros(shape) if zero_param else rng.normal(size=shape)
  # Per-unit gradient scales from tiny to huge: some units clip, some not.
  scale = 10.0 ** np.linspace(-7, 1, shape[-1]) if shape else 10.0
  g = rng.normal(size=shape) * scale
  tx = optim.adaptive_grad_clip(0.01, eps=1e-3)
  out, _ = jax.jit(tx.update)(to_f32(g), tx.init(p), to_f32(p))
  expected = np_agc(g, p, 0.01)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-30)
  # The clipped units end at exactly clipping * max(|W_i|, eps).
  ratio = np_unit_norm(out) / np.maximum(np_unit_norm(p), 1e-3)
  assert np.all(ratio <= 0.01 * (1 + 1e-6))
  if len(shape) >= 2 and not zero_param:
    assert 0 < np.mean(np.isclose(ratio, 0.01, rtol=1e-5)) < 1


def test_global_and_unit_norms_match_numpy():
  rng = np.random.default_rng(1)
  tree = {k: rng.normal(size=shape) for k, shape in AGC_SHAPES.items()}
  np_total = math.sqrt(sum(float(np.sum(x**2)) for x in tree.values()))
  got = jax.jit(optim.global_norm)(to_f32(tree))
  np.testing.assert_allclose(got, np_total, rtol=1e-6)
  for x in tree.values():
    unit = np.asarray(optim.unitwise_norm(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(
      np.broadcast_to(unit, np.shape(x)), np_unit_norm(x), rtol=1e-6
    )


def test_grad_norm_metric_shares_agc_unit_norms_in_compiled_step():
  # The train step's `grad_norm` sums the unit norms AGC takes anyway. If
  # XLA folds that sum into its own reduction of g**2, it materialises g**2
  # for the two reductions: a second full-size array per kernel besides
  # AGC's clipped output. This fails without the barrier in `global_norm`.
  shapes = {'conv': (3, 3, 64, 128), 'linear': (256, 512)}

  def agc_and_grad_norm(grads, params):
    tx = optim.adaptive_grad_clip(0.01, eps=1e-3)
    clipped, _ = tx.update(grads, tx.init(params), params)
    return clipped, optim.global_norm(grads)

  tree = {k: jnp.ones(s, jnp.float32) for k, s in shapes.items()}
  hlo = jax.jit(agc_and_grad_norm).lower(tree, tree).compile().as_text()
  entry = hlo[hlo.index('ENTRY') :].splitlines()
  for shape in shapes.values():
    full_size = 'f32[' + ','.join(map(str, shape)) + ']'
    defines_full_size = re.compile(r'\s*\S+ = ' + re.escape(full_size))
    produced = [
      line
      for line in entry
      if defines_full_size.match(line) and 'parameter(' not in line
    ]
    assert len(produced) == 1, produced


def test_agc_zero_init_bias_moves_by_clipping_times_eps():
  tx = optim.adaptive_grad_clip(0.01, eps=1e-3)
  p, g = jnp.zeros(4), jnp.ones(4)
  out, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(np.linalg.norm(out), 0.01 * 1e-3, rtol=1e-6)


def test_agc_accepts_numpy_scalar_leaves_and_needs_params():
  tx = optim.adaptive_grad_clip(0.01)
  p = {'m': {'skip_gain': np.float32(0.5)}}
  g = {'m': {'skip_gain': np.float32(2.0)}}
  out, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(out['m']['skip_gain'], 0.005, rtol=1e-6)
  with pytest.raises(ValueError, match='needs the parameters'):
    tx.update(g, tx.init(p))


def test_agc_exclude_leaves_classifier_weight_unclipped():
  p = to_f32(nfnet_like_tree(np.random.default_rng(1)))
  g = jax.tree.map(lambda x: jnp.full_like(x, 3.0), p)
  tx = optim.adaptive_grad_clip(0.01, exclude=optim.AGC_EXCLUDE)
  out, _ = jax.jit(tx.update)(g, tx.init(p), p)
  np.testing.assert_array_equal(out['NFNet/~/linear']['w'], 3.0)
  for name in ('b',):  # The classifier bias is still clipped.
    assert np.all(np.abs(out['NFNet/~/linear'][name]) < 1e-4)
  se = out['NFNet/~/nf_block/~/squeeze_excite/~/linear']['w']
  assert np.all(np.abs(se) < 1.0)


def test_agc_clip_fraction_hand_computed():
  params = {
    'fc': {'w': jnp.ones((2, 4)), 'b': jnp.zeros(4)},
    'NFNet/~/linear': {'w': jnp.ones((2, 3))},
  }
  grads = {
    # Unit norms 0, 0, sqrt(2), sqrt(2) against 0.01 * sqrt(2): 2 clip.
    'fc': {'w': jnp.array([[0, 0, 1, 1]] * 2, jnp.float32)},
    'NFNet/~/linear': {'w': jnp.ones((2, 3))},  # Masked out below.
  }
  # One unit, norm 2e-6 below 0.01 * 1e-3: not clipped.
  grads['fc']['b'] = jnp.full(4, 1e-6)
  mask = optim.agc_mask(params)
  fraction = jax.jit(
    lambda g, p: optim.agc_clip_fraction(g, p, 0.01, 1e-3, mask)
  )
  np.testing.assert_allclose(fraction(grads, params), 2 / 5, rtol=1e-6)
  all_units = optim.agc_clip_fraction(grads, params, 0.01, 1e-3)
  np.testing.assert_allclose(all_units, 5 / 8, rtol=1e-6)


# ---------------------------------------------------------------------------
# The whole SGD + AGC chain.
# ---------------------------------------------------------------------------


def _run_chain(tx, params, grads_per_step):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for grads in grads_per_step:
    params, state = step(params, state, to_f32(grads))
  return params


def _reference_run(params, grads_per_step, lrs, wd, clipping):
  bufs = jax.tree.map(np.zeros_like, params)
  for grads, lr in zip(grads_per_step, lrs, strict=True):
    params, bufs = np_sgd_agc_step(params, bufs, grads, lr, wd, clipping)
  return params


def _chain_from_config(num_steps):
  config = optim.default_config()
  config.lr, config.warmup_epochs, config.weight_decay = 0.1, 1.0, 1e-2
  tx, schedule = optim.make_optimizer(
    config, steps_per_epoch=2, total_steps=num_steps, global_batch_size=512
  )
  return tx, schedule


@pytest.mark.parametrize('build', ['sgd_agc', 'make_optimizer'])
def test_sgd_agc_chain_matches_numpy_reference(build):
  rng = np.random.default_rng(0)
  params = nfnet_like_tree(rng)
  num_steps = 5
  grads = [random_grads(rng, params) for _ in range(num_steps)]
  # Peak 0.1 * 512 / 256 = 0.2, warmup over 2 steps, cosine to 0 at step 5.
  peak = 0.2
  lrs = [0.0, 0.1, 0.2, peak * 0.5 * (1 + math.cos(math.pi / 3)), 0.05]
  if build == 'sgd_agc':
    schedule = optim.make_lr_schedule(
      0.1,
      total_steps=num_steps,
      warmup_steps=2,
      global_batch_size=512,
      scale_by_batch=True,
    )
    tx = optim.sgd_agc(schedule, weight_decay=1e-2, clipping=0.01)
  else:
    tx, schedule = _chain_from_config(num_steps)
  np.testing.assert_allclose(
    [schedule(t) for t in range(num_steps)], lrs, rtol=1e-6
  )
  got = _run_chain(tx, to_f32(params), grads)
  want = _reference_run(params, grads, lrs, 1e-2, 0.01)
  for (path, g), w in zip(
    jax.tree_util.tree_flatten_with_path(got)[0],
    jax.tree.leaves(want),
    strict=True,
  ):
    err = np.linalg.norm(g - w) / np.linalg.norm(w)
    assert err < 1e-6, (optim.leaf_name(path), err)


def test_sgd_chain_order_differs_from_decay_before_clipping():
  """Guards the order: decaying before AGC would give a different result."""
  p = {'m': {'w': jnp.full((2, 2), 10.0)}}
  g = {'m': {'w': jnp.zeros((2, 2))}}
  tx = optim.sgd_agc(1.0, momentum=0.0, weight_decay=0.1, clipping=0.01)
  updates, _ = tx.update(g, tx.init(p), p)
  # AGC sees a zero gradient; decay then adds 0.1 * 10 = 1 unclipped.
  np.testing.assert_allclose(updates['m']['w'], -1.0, rtol=1e-6)


def np_adam_steps(p, grads, lr, wd, decoupled, clipping, b1=0.9, b2=0.999):
  m = v = np.zeros_like(p)
  for t, g in enumerate(grads, start=1):
    g = np_agc(g, p, clipping)
    if not decoupled:
      g = g + wd * p
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + 1e-8)
    if decoupled:
      u = u + wd * p
    p = p - lr * u
  return p


@pytest.mark.parametrize('name', ['adam', 'adamw'])
def test_adam_with_agc_matches_numpy(name):
  rng = np.random.default_rng(3)
  p = rng.normal(size=(3, 3, 2, 4)) * 0.3
  grads = [rng.normal(size=p.shape) * 10.0 ** rng.uniform(-4, 0, 4)] * 3
  config = optim.default_config()
  config.update(name=name, clipping=0.005, weight_decay=0.1, lr=0.01)
  config.update(scale_lr_by_batch=False, warmup_steps=0)
  tx, _ = optim.make_optimizer(
    config, steps_per_epoch=1, total_steps=10**6, global_batch_size=256
  )
  got = _run_chain(
    tx, {'conv': {'w': to_f32(p)}}, [{'conv': {'w': g}} for g in grads]
  )
  want = np_adam_steps(p, grads, 0.01, 0.1, name == 'adamw', 0.005)
  # Compare the moves (about 0.01 per step); float32 Adam is exact to ~1e-7.
  np.testing.assert_allclose(
    got['conv']['w'] - p, want - p, rtol=1e-4, atol=1e-6
  )


# ---------------------------------------------------------------------------
# Parameter groups on the real F0 tree.
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def f0_shapes():
  init = hk.transform(lambda x: nfnets.NFNet(1000)(x, is_training=False)).init
  image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(init, jax.random.PRNGKey(0), image)


def test_f0_groups_match_reference(f0_shapes):
  names = optim.select_leaves(f0_shapes, '')
  # 57 WS convs (4 stem + 12 blocks x 4 + 4 shortcuts + final) x (w, gain,
  # bias), 12 skip gains, 12 SE blocks x 2 Linears x (w, b), classifier (w, b).
  assert len(names) == 57 * 3 + 12 + 24 * 2 + 2 == 233
  assert optim.select_leaves(f0_shapes, optim.AGC_EXCLUDE) == [
    'NFNet/~/linear/w'
  ]
  no_wd = optim.select_leaves(f0_shapes, optim.WD_EXCLUDE)
  last = [n.rsplit('/', 1)[1] for n in no_wd]
  counts = {k: last.count(k) for k in set(last)}
  # Gains and biases of 57 convs, 12 skip gains, 24 SE biases + classifier b.
  assert counts == {'gain': 57, 'bias': 57, 'skip_gain': 12, 'b': 25}
  assert len(no_wd) == 151
  # The masks agree with the name lists.
  agc = jax.tree_util.tree_flatten_with_path(optim.agc_mask(f0_shapes))[0]
  assert [optim.leaf_name(p) for p, on in agc if not on] == ['NFNet/~/linear/w']
  wd = jax.tree.leaves(optim.weight_decay_mask(f0_shapes))
  assert sum(wd) == 233 - 151 == 57 + 24 + 1


def test_groups_follow_reference_rules_on_other_names():
  tree = {
    'NF_ResNet/~/linear': {'w': 0, 'b': 0},
    'outer/~/NFNet/~/linear': {'w': 0},
    'NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1': {'w': 0, 'b': 0},
    'NFNet/~/nf_block_3': {'skip_gain': 0},
    'norm': {'scale': 0, 'offset': 0},
    'NFNet/~/gain_module': {'w': 0},  # 'gain' in the module only: decayed.
  }
  assert sorted(optim.select_leaves(tree, optim.AGC_EXCLUDE)) == [
    'NF_ResNet/~/linear/w',
    'outer/~/NFNet/~/linear/w',
  ]
  assert set(optim.select_leaves(tree, optim.WD_EXCLUDE)) == {
    'NF_ResNet/~/linear/b',
    'NFNet/~/nf_block_3/skip_gain',
    'NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1/b',
    'norm/offset',
    'norm/scale',
  }


# ---------------------------------------------------------------------------
# Schedule and EMA.
# ---------------------------------------------------------------------------


def test_schedule_reference_boundaries():
  # The paper's F0 run: batch 4096, 0.1 per 256, 5 warmup epochs, 360 epochs.
  steps_per_epoch = 1281167 / 4096
  total = 1281167 * 360 // 4096
  assert total == 112602
  warmup = 5 * steps_per_epoch  # 1563.92 steps, fractional as in the code.
  s = optim.make_lr_schedule(
    0.1,
    total_steps=total,
    warmup_steps=warmup,
    global_batch_size=4096,
    scale_by_batch=True,
  )
  expect = {
    0: 0.0,
    782: 1.6 * 782 / warmup,  # Mid-warmup.
    1563: 1.6 * 1563 / warmup,  # Last warmup step.
    1564: 0.8 * (1 + math.cos(math.pi * (1564 - warmup) / (total - warmup))),
    57083: 0.8 * (1 + math.cos(math.pi * (57083 - warmup) / (total - warmup))),
    total: 0.0,
  }
  for step, value in expect.items():
    np.testing.assert_allclose(s(step), value, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s(57083), 0.8, rtol=1e-4)  # Mid-cosine.


def test_schedule_round_numbers_and_min_lr():
  s = optim.make_lr_schedule(1.6, total_steps=1100, warmup_steps=100)
  got = [float(s(t)) for t in (0, 50, 100, 600, 1100)]
  np.testing.assert_allclose(got, [0, 0.8, 1.6, 0.8, 0], atol=1e-6)
  s = optim.make_lr_schedule(
    1.6, total_steps=1100, warmup_steps=100, min_lr=0.1
  )
  got = [float(s(t)) for t in (0, 100, 600, 1100, 2000)]
  np.testing.assert_allclose(got, [0, 1.6, 0.85, 0.1, 0.1], atol=1e-6)
  s = optim.make_lr_schedule(0.4, total_steps=10)  # No warmup.
  np.testing.assert_allclose(s(0), 0.4)


def test_make_optimizer_warmup_from_epochs_or_steps():
  config = optim.default_config()
  kw = dict(steps_per_epoch=10, total_steps=1000, global_batch_size=1024)
  _, s = optim.make_optimizer(config, **kw)
  np.testing.assert_allclose(s(25), 0.4 * 25 / 50, rtol=1e-6)
  config.warmup_steps = 100
  _, s = optim.make_optimizer(config, **kw)
  np.testing.assert_allclose(s(25), 0.4 * 25 / 100, rtol=1e-6)


def test_ema_decay_warmup_and_update():
  d = 0.99999
  got = [float(optim.ema_decay(t, d)) for t in (0, 1, 8, 90, 112602)]
  want = [1 / 10, 2 / 11, 9 / 18, 91 / 100, 112603 / 112612]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The target decay takes over only after ~900k steps.
  np.testing.assert_allclose(optim.ema_decay(10**7, d), d, rtol=1e-7)
  assert optim.ema_decay(800_000, d) < d
  ema = {'m': {'w': jnp.array([1.0, 3.0])}}
  new = {'m': {'w': jnp.array([0.0, 1.0])}}
  out = optim.ema_update(ema, new, 0, d)  # decay 0.1 at step 0.
  np.testing.assert_allclose(out['m']['w'], [0.1, 0.1 * 3 + 0.9], rtol=1e-6)


# ---------------------------------------------------------------------------
# SAM.
# ---------------------------------------------------------------------------


def test_sam_perturb_matches_numpy():
  rng = np.random.default_rng(0)
  params = {'a': {'w': rng.normal(size=(3, 4))}, 'b': {'b': rng.normal(size=4)}}
  grads = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
  g_norm = math.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grads)))
  out = optim.sam_perturb(to_f32(params), to_f32(grads), 0.05)
  for o, p, g in zip(
    jax.tree.leaves(out),
    jax.tree.leaves(params),
    jax.tree.leaves(grads),
    strict=True,
  ):
    np.testing.assert_allclose(o, p + 0.05 * g / g_norm, rtol=1e-6)
  zero = jax.tree.map(np.zeros_like, grads)
  same = optim.sam_perturb(to_f32(params), to_f32(zero), 0.05)
  np.testing.assert_allclose(same['a']['w'], params['a']['w'], rtol=1e-6)


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('clipping', [0.0, -0.01, float('nan')])
def test_agc_rejects_non_positive_clipping(clipping):
  with pytest.raises(ValueError, match='clipping must be > 0'):
    optim.adaptive_grad_clip(clipping)
  with pytest.raises(ValueError, match='clipping must be > 0'):
    optim.sgd_agc(0.1, clipping=clipping)


def _make(**overrides):
  config = optim.default_config()
  config.update(overrides)
  return optim.make_optimizer(
    config, steps_per_epoch=10, total_steps=100, global_batch_size=256
  )


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(name='lamb'), r"valid names: \['adam', 'adamw', 'sgd', 'sgd_agc'\]"),
    (dict(momentum=1.0), r'momentum must be in \[0, 1\)'),
    (dict(momentum=-0.1), r'momentum must be in \[0, 1\)'),
    (dict(clipping=-0.01), 'clipping must be > 0'),
    (dict(clipping=0.0), "name='sgd' with clipping=0"),
    (dict(weight_decay=-1e-5), 'weight_decay must be >= 0'),
    (dict(ema_decay=1.0), r'ema_decay must be in \[0, 1\)'),
    (dict(sam_rho=-0.05), 'sam_rho must be >= 0'),
    (dict(warmup_steps=100), 'warmup_steps < total_steps'),
    (dict(agc_exclude=('linear(',)), 'Invalid parameter-group regex'),
    (dict(lr=float('nan')), 'LRs must be >= 0 and finite'),
    (dict(lr=float('inf')), 'LRs must be >= 0 and finite'),
    (dict(clipping=float('inf')), 'clipping must be > 0 and finite'),
    (dict(sam_rho=float('inf')), 'sam_rho must be >= 0 and finite'),
    (dict(name='adam', adam_eps=float('nan')), 'Adam eps must be >= 0'),
  ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _make(**overrides)


def test_make_optimizer_rejects_a_zero_batch_size():
  # `global_batch_size or 1` used to let 0 through as 1: a peak LR of 0.
  with pytest.raises(ValueError, match='global_batch_size must be > 0'):
    optim.make_optimizer(
      optim.default_config(),
      steps_per_epoch=10,
      total_steps=100,
      global_batch_size=0,
    )
  with pytest.raises(ValueError, match='global_batch_size must be > 0'):
    optim.make_lr_schedule(0.1, total_steps=10, global_batch_size=0)


NAN, INF = float('nan'), float('inf')


@pytest.mark.parametrize(
  'build, message',
  [
    (lambda: optim.sgd_agc(-0.1), 'learning_rate must be >= 0'),
    (lambda: optim.sgd_agc(NAN), 'learning_rate must be >= 0 and finite'),
    (lambda: optim.adam_agc(INF), 'learning_rate must be >= 0 and finite'),
    (lambda: optim.sgd_agc('0.1'), "learning_rate must be a number, got '0"),
    (lambda: optim.sgd_agc(0.1, clipping='0.01'), 'clipping must be a number'),
    (lambda: optim.sgd_agc(0.1, clipping=INF), 'clipping must be > 0 and f'),
    (lambda: optim.sgd_agc(0.1, eps=NAN), 'AGC eps must be > 0'),
    (lambda: optim.sgd_agc(0.1, weight_decay=INF), 'weight_decay must be >= 0'),
    (lambda: optim.sgd_agc(0.1, momentum='0.9'), 'momentum must be a number'),
    (lambda: optim.adam_agc(1e-3, eps=-1e-8), 'Adam eps must be >= 0'),
    (lambda: optim.adaptive_grad_clip(INF), 'clipping must be > 0 and finite'),
    (lambda: optim.make_lr_schedule(NAN, total_steps=9), 'LRs must be >= 0'),
    (lambda: optim.make_lr_schedule(0.1, total_steps=INF), 'total_steps must'),
    (lambda: optim.scaled_lr(NAN, 256), 'learning_rate must be >= 0'),
  ],
)
def test_direct_builders_reject_bad_numbers(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_direct_builders_still_take_arrays_traced_lrs_and_schedules():
  params = {'m': {'w': jnp.ones((2, 2))}}
  optim.sgd_agc(jnp.float32(0.1), momentum=np.float32(0.9)).init(params)
  optim.sgd_agc(optim.make_lr_schedule(0.1, total_steps=10)).init(params)
  init = jax.jit(lambda lr: optim.sgd_agc(lr).init(params))
  jax.tree.map(np.testing.assert_array_equal, init(0.1), init(0.2))
  with pytest.raises(ValueError, match='learning_rate'):  # Not traced.
    optim.sgd_agc(-1.0)


def test_sgd_without_agc_from_config():
  tx, _ = _make(name='sgd', clipping=0.0, warmup_steps=0, weight_decay=0.0)
  p = {'m': {'w': jnp.ones((2, 2))}}
  g = {'m': {'w': jnp.full((2, 2), 5.0)}}
  updates, _ = tx.update(g, tx.init(p), p)
  # lr 0.1 at step 0, Nesterov direction (1 + 0.9) * g, nothing clipped.
  np.testing.assert_allclose(updates['m']['w'], -0.1 * 1.9 * 5.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# The paper's stability claim, at small scale.
# ---------------------------------------------------------------------------

ALPHA = 0.2


def tiny_nf_resnet(x):
  """A 3-block normalizer-free ResNet: WS convs, scaled GELU, skip gains."""
  act = layers.get_activation('gelu')
  h = layers.WSConv2D(32, 3, stride=2, name='stem_conv')(x)
  expected_std = 1.0
  for i in range(3):
    out = act(h) / expected_std
    branch = layers.WSConv2D(32, 3, name=f'block{i}_conv0')(out)
    branch = layers.WSConv2D(32, 3, name=f'block{i}_conv1')(act(branch))
    gain = hk.get_parameter(f'block{i}_skip_gain', (), init=jnp.zeros)
    h = h + ALPHA * gain * branch
    expected_std = math.sqrt(expected_std**2 + ALPHA**2)
  pooled = act(h).mean((1, 2))
  w_init = hk.initializers.RandomNormal(0.01)
  return hk.Linear(10, w_init=w_init, name='linear')(pooled)


def digits_16px():
  digits = load_digits()
  x = digits.images.astype(np.float32) / 16.0
  x = np.repeat(np.repeat(x, 2, 1), 2, 2)[..., None]
  return (x - x.mean()) / x.std(), digits.target.astype(np.int32)


@functools.cache
def _tiny_net_fns():
  """The tiny net and its jitted loss/grad and predict functions, compiled
  once and shared by the runs with and without AGC."""
  net = hk.without_apply_rng(hk.transform(tiny_nf_resnet))

  def loss_fn(params, images, labels):
    logits = net.apply(params, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses.mean()

  predict = lambda params, images: jnp.argmax(net.apply(params, images), -1)
  return net, jax.jit(jax.value_and_grad(loss_fn)), jax.jit(predict)


def _train(clipping, lr=4.0, steps=80, seed=0, batch_size=64):
  """SGD (Nesterov, no weight decay) on digits; returns losses, accuracy."""
  net, grad_fn, predict = _tiny_net_fns()
  x, y = digits_16px()
  x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
  params = net.init(jax.random.PRNGKey(seed), x[:1])
  tx = optim.sgd_agc(lr, weight_decay=0.0, clipping=clipping)
  state = tx.init(params)

  @jax.jit
  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.RandomState(seed)
  losses = []
  for _ in range(steps):
    idx = rng.randint(0, len(x_train), batch_size)
    loss, grads = grad_fn(params, x_train[idx], y_train[idx])
    params, state = update(params, state, grads)
    losses.append(float(loss))
    if not np.isfinite(losses[-1]):
      break  # Diverged; no need to go on.
  return np.array(losses), float(np.mean(predict(params, x_test) == y_test))


@pytest.mark.slow
def test_agc_makes_high_lr_training_stable():
  # Same net, data order and seed; lr 4 is 40x the paper's per-256 rate.
  losses, _ = _train(clipping=None)
  assert not np.all(np.isfinite(losses)) or losses.max() > 1e3, losses
  losses, accuracy = _train(clipping=0.01)
  assert np.all(np.isfinite(losses)) and losses.max() < 5.0, losses
  assert losses[-10:].mean() < losses[0] - 0.5, losses
  assert accuracy > 0.35, accuracy  # Chance is 0.1.
