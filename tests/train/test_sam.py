"""SAM's ascent step on part of each replica's rows, synced or per replica.

References are NumPy re-derivations for the linear softmax classifier of
test_step.py (whose gradient is `X^T (softmax(XW + b) - Y) / B`): the ascent
gradient on the chosen rows, the ascent point, the descent gradient there,
and one SGD step. For BatchNorm, a hand-written loop over the devices with
`jax.grad` on one device. The 4-device runs are a subprocess (the device
count is fixed when JAX starts).

Tolerance: float32 against float64 NumPy on unit-scale inputs, one step:
`atol=1e-6` as test_step.py's SAM test (a wrong row choice or a missed
device moves the weights by over 1e-3).
"""

import json
import os
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import optim
from nfnets.train import sam, train_and_evaluate
from tests.support.train_harness import tiny_config
from tests.train import test_step as ts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
RHO, LR = 0.3, 1.0


def _sam_config(fraction, sync):
  return ts._opt_config(
    lr=LR, sam_rho=RHO, sam_ascent_fraction=fraction, sam_ascent_sync=sync
  )


def _np_step(params, batch, replicas, ascent_rows):
  """One SAM + SGD step by hand: (new w, new b, mean descent loss).

  Replica i takes its ascent gradient on the rows `ascent_rows[i]` and its
  descent gradient on `replicas[i]` at its own ascent point; the update
  averages the replicas' descent gradients (one replica: synced SAM).
  """
  w, b = (np.asarray(params['linear'][k], np.float64) for k in 'wb')
  x = batch['images'].reshape(len(batch['labels']), -1).astype(np.float64)
  y = ts._np_targets(batch['labels'])
  grads, losses = [], []
  for rows, ascent in zip(replicas, ascent_rows, strict=True):
    gw, gb = ts._np_grads(w, b, x[ascent], y[ascent])
    scale = RHO / np.sqrt(np.sum(gw**2) + np.sum(gb**2))
    w2, b2 = w + scale * gw, b + scale * gb
    grads.append(ts._np_grads(w2, b2, x[rows], y[rows]))
    p = ts._np_softmax(x[rows] @ w2 + b2)
    losses.append(-np.mean(np.sum(y[rows] * np.log(p), -1)))
  gw = np.mean([g[0] for g in grads], 0)
  gb = np.mean([g[1] for g in grads], 0)
  return w - LR * gw, b - LR * gb, float(np.mean(losses))


def _run_step(opt_config, batch, k):
  model = ts._linear_model()
  state = ts._state(model, opt_config)
  step = ts.step_lib.make_train_step(
    model, num_classes=ts.NUM_CLASSES, opt_config=opt_config,
    compute_dtype='float32', grad_accum_steps=k,
  )  # fmt: skip
  values = ts._hyperparams(opt_config)
  new, metrics = jax.jit(step)(state, batch, values)
  return state, new, metrics


@pytest.mark.parametrize('k', [1, 2])
def test_synced_ascent_on_a_fraction_of_each_replica(k):
  """8 rows, fraction 0.25: the first row(s) of each micro-batch ascend."""
  batch = ts._batch(seed=3)
  state, new, metrics = _run_step(_sam_config(0.25, True), batch, k)
  m = 8 // k
  r = sam.ascent_rows(m, 0.25)  # 2 of 8, or 1 of 4.
  ascent = [j * m + i for j in range(k) for i in range(r)]
  want_w, want_b, loss = _np_step(
    state.params, batch, [list(range(8))], [ascent]
  )
  np.testing.assert_allclose(new.params['linear']['w'], want_w, atol=1e-6)
  np.testing.assert_allclose(new.params['linear']['b'], want_b, atol=1e-6)
  # The metrics are the descent pass's, over every row at the ascent point.
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  # Ascending on every row instead moves the weights measurably.
  other_w, _, _ = _np_step(
    state.params, batch, [list(range(8))], [list(range(8))]
  )
  assert np.max(np.abs(other_w - want_w)) > 1e-3


def test_ascent_rows_round_to_nearest_and_keep_one():
  assert [sam.ascent_rows(m, 0.2) for m in (1, 2, 3, 8, 16, 32)] == [
    1, 1, 1, 2, 3, 6,
  ]  # fmt: skip
  assert sam.ascent_rows(8, 1.0) == 8


@pytest.mark.parametrize(
  'key, value, match',
  [
    ('sam_ascent_fraction', 0.0, r'in \(0, 1\]'),
    ('sam_ascent_fraction', 1.5, r'in \(0, 1\]'),
    ('sam_ascent_fraction', 'x', 'sam_ascent_fraction'),
    ('sam_ascent_sync', 1, 'True or False'),
  ],
)
def test_bad_ascent_settings_are_refused(key, value, match):
  config = optim.default_config()
  config.sam_rho = 0.05
  with config.ignore_type():
    config[key] = value
  with pytest.raises(ValueError, match=match):
    optim.validate(config)


_FOUR_DEVICES = """
import os, sys
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from nfnets.train import mesh as mesh_lib
from tests.train import test_sam as t

out = {}
mesh = mesh_lib.make_mesh()
for name, (model, config, batch, k) in t.four_device_cases().items():
  out.update(t.run_sharded(name, model, config, batch, k, mesh))
# Dropout: one device's rows alone, and the same rows on all 4 devices.
one = mesh_lib.make_mesh(jax.devices()[:1])
model, config, rows = t.dropout_case()
out.update(t.run_sharded('drop1', model, config, rows, 1, one))
tiled = {k: np.concatenate([v] * 4) for k, v in rows.items()}
out.update(t.run_sharded('drop4', model, config, tiled, 1, mesh))
# Synced SAM on a mesh of 2 of the 4 devices: the replicas are its own.
two = mesh_lib.make_mesh(jax.devices()[:2])
model, config, batch, k = t.four_device_cases()['synced']
out.update(t.run_sharded('synced2', model, config, batch, k, two))
np.savez(sys.argv[2], **out)
"""


def four_device_cases():
  """The steps the 4-device subprocess runs (model, config, batch, k)."""
  rng = np.random.RandomState(0)
  bn_batch = {
    'images': rng.randn(8, 6, 6, 3).astype(np.float32),
    'labels': rng.randint(0, ts.NUM_CLASSES, 8).astype(np.int32),
  }
  return {
    'linear': (
      ts._linear_model(),
      _sam_config(0.5, False),
      ts._batch(5, 16),
      2,
    ),
    'bn': (_bn_model(), _sam_config(0.5, False), bn_batch, 1),
    'synced': (ts._linear_model(), _sam_config(0.5, True), ts._batch(5, 16), 2),
  }


def dropout_case():
  """A linear classifier behind dropout, SAM per replica, one device's rows."""

  def forward(images, is_training):
    x = images.reshape(images.shape[0], -1)
    if is_training:
      x = hk.dropout(hk.next_rng_key(), 0.5, x)
    return {'logits': hk.Linear(ts.NUM_CLASSES, name='linear')(x)}

  return (
    hk.transform_with_state(forward),
    _sam_config(1.0, False),
    ts._batch(7, 4),
  )


def run_sharded(name, model, opt_config, batch, k, mesh):
  """One step on `mesh`, and the hand-written per-device reference for BN."""
  from nfnets.train import mesh as mesh_lib  # noqa: PLC0415

  state = _init(model, opt_config, batch)
  step = ts.step_lib.make_train_step(
    model, num_classes=ts.NUM_CLASSES, opt_config=opt_config,
    compute_dtype='float32', grad_accum_steps=k, mesh=mesh,
  )  # fmt: skip
  repl = mesh_lib.replicated_sharding(mesh)
  jitted = jax.jit(
    step,
    in_shardings=(repl, mesh_lib.batch_sharding(mesh), repl),
    out_shardings=(repl, repl),
  )
  new, metrics = jitted(state, batch, ts._hyperparams(opt_config))
  out = {f'{name}/loss': np.asarray(metrics['loss'])}
  for path, leaf in _leaves(state.params, 'params0'):
    out[f'{name}/{path}'] = leaf
  for path, leaf in _leaves(new.params, 'params'):
    out[f'{name}/{path}'] = leaf
  for path, leaf in _leaves(new.model_state, 'state'):
    out[f'{name}/{path}'] = leaf
  if name == 'bn':
    out.update(_bn_reference(model, state, batch, mesh.devices.size))
  return out


def _init(model, opt_config, batch):
  params, model_state = model.init(
    jax.random.PRNGKey(0), jnp.zeros((1, *batch['images'].shape[1:])), True
  )
  params = jax.tree.map(lambda p: p + 0.1, params)
  return ts.state_lib.make_train_state(
    params, model_state, ts._optimizer(opt_config), jax.random.PRNGKey(1),
    ema=False,
  )  # fmt: skip


def _leaves(tree, prefix):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in flat:
    yield prefix + jax.tree_util.keystr(path), np.asarray(leaf)


def _bn_model():
  def forward(images, is_training):
    x = hk.Conv2D(4, 3, stride=2, with_bias=False)(images)
    x = hk.BatchNorm(True, True, decay_rate=0.9)(x, is_training)
    x = jax.nn.relu(x).mean(axis=(1, 2))
    return {'logits': hk.Linear(ts.NUM_CLASSES, name='linear')(x)}

  return hk.transform_with_state(forward)


def _bn_reference(model, state, batch, devices):
  """Per device: ascend on its first half, descend on its rows; average."""
  n = len(batch['labels']) // devices
  grads, states = [], []
  for d in range(devices):
    rows = {k: v[d * n : (d + 1) * n] for k, v in batch.items()}
    g, new_state = _bn_replica(model, state, rows)
    grads.append(g)
    states.append(new_state)

  def mean(*xs):
    return sum(xs) / len(xs)

  params = jax.tree.map(lambda p, *g: p - LR * mean(*g), state.params, *grads)
  out = dict(_leaves(params, 'bn/want_params'))
  out.update(_leaves(jax.tree.map(mean, *states), 'bn/want_state'))
  return out


def _bn_replica(model, state, rows):
  """One replica's descent gradient and state, with `jax.grad` by hand."""

  def loss_fn(params, rows):
    out, new_state = model.apply(
      params, state.model_state, None, rows['images'], True
    )
    y = jax.nn.one_hot(rows['labels'], ts.NUM_CLASSES)
    logp = jax.nn.log_softmax(out['logits'])
    return -jnp.mean(jnp.sum(y * logp, -1)), new_state

  first = {k: v[: len(v) // 2] for k, v in rows.items()}
  g = jax.grad(lambda p: loss_fn(p, first)[0])(state.params)
  norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda p, x: p + RHO * x / norm, state.params, g)
  (_, new_state), g2 = jax.value_and_grad(
    lambda p: loss_fn(p, rows), has_aux=True
  )(perturbed)
  return g2, new_state


@pytest.fixture(scope='module')
def four_devices(tmp_path_factory):
  path = tmp_path_factory.mktemp('sam') / 'out.npz'
  proc = subprocess.run(
    [sys.executable, '-c', _FOUR_DEVICES, REPO, str(path)],
    capture_output=True, text=True, check=False, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(path))


def test_each_replica_ascends_on_its_own_rows(four_devices):
  """16 rows, 4 devices, 2 micro-batches: 8 replicas of 2 rows, 1 ascends."""
  out = four_devices
  params = {
    'linear': {k: out[f"linear/params0['linear']['{k}']"] for k in 'wb'}
  }
  replicas = [
    [4 * d + 2 * j, 4 * d + 2 * j + 1] for d in range(4) for j in (0, 1)
  ]
  ascent = [rows[:1] for rows in replicas]
  want_w, want_b, loss = _np_step(params, ts._batch(5, 16), replicas, ascent)
  np.testing.assert_allclose(
    out["linear/params['linear']['w']"], want_w, atol=1e-6
  )
  np.testing.assert_allclose(
    out["linear/params['linear']['b']"], want_b, atol=1e-6
  )
  np.testing.assert_allclose(out['linear/loss'], loss, rtol=1e-5)
  # One synced ascent point instead moves the weights measurably.
  synced_w, _, _ = _np_step(
    params, ts._batch(5, 16), [sum(replicas, [])], [sum(ascent, [])]
  )
  assert np.max(np.abs(synced_w - want_w)) > 1e-3


def test_batchnorm_state_is_the_mean_of_the_replicas(four_devices):
  for tree in ('params[', 'state['):
    _assert_same_tree(four_devices, f'bn/{tree}', f'bn/want_{tree}')


def _assert_same_tree(out, got_prefix, want_prefix):
  """The leaves under two key prefixes of `out` agree, key by key."""
  got, want = _under(out, got_prefix), _under(out, want_prefix)
  assert got.keys() == want.keys() and got
  for key in got:
    np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=key)


def _under(out, prefix):
  return {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if 'train/grad_norm' in r]


def test_one_replica_on_one_device_is_synced_sam():
  """With one device and k = 1 the only replica is the batch."""
  batch = ts._batch(seed=4)
  _, synced, _ = _run_step(_sam_config(1.0, True), batch, 1)
  _, alone, _ = _run_step(_sam_config(1.0, False), batch, 1)
  for k in 'wb':
    np.testing.assert_allclose(
      alone.params['linear'][k], synced.params['linear'][k], atol=1e-7
    )


def test_trainer_runs_sam_per_replica(tmp_path, compilation_cache_dir):
  """The trainer's jitted step (mesh, shardings) takes the shard_map."""
  config = tiny_config(compilation_cache_dir)
  config.train.num_steps = 2
  config.checkpoint.enabled = False
  config.optimizer.update(
    sam_rho=0.05, sam_ascent_fraction=0.5, sam_ascent_sync=False
  )
  train_and_evaluate(config, str(tmp_path / 'run'))
  records = _metrics(str(tmp_path / 'run'))
  assert [r['step'] for r in records] == [1, 2]
  for record in records:
    assert np.isfinite(record['train/loss']) and record['train/grad_norm'] > 0


def test_synced_ascent_takes_the_first_rows_of_every_device_and_micro_batch(
  four_devices,
):
  """16 rows, 4 devices, 2 micro-batches, fraction 0.5: one ascent point
  from rows 4d + 2j (the first of each replica), every row descends."""
  out = four_devices
  params = {
    'linear': {k: out[f"synced/params0['linear']['{k}']"] for k in 'wb'}
  }
  ascent = [4 * d + 2 * j for d in range(4) for j in (0, 1)]
  want_w, want_b, loss = _np_step(
    params, ts._batch(5, 16), [list(range(16))], [ascent]
  )
  got = out["synced/params['linear']['w']"]
  np.testing.assert_allclose(got, want_w, atol=1e-6)
  np.testing.assert_allclose(
    out["synced/params['linear']['b']"], want_b, atol=1e-6
  )
  np.testing.assert_allclose(out['synced/loss'], loss, rtol=1e-5)
  # The first rows of the batch instead (rows 0-7) move it measurably.
  other_w, _, _ = _np_step(
    params, ts._batch(5, 16), [list(range(16))], [list(range(8))]
  )
  assert np.max(np.abs(other_w - want_w)) > 1e-3


def test_each_device_draws_its_own_dropout_masks(four_devices):
  """The same rows on 4 devices do not repeat one device's step: each
  replica's masks come from the step's key folded with its device."""
  one = four_devices["drop1/params['linear']['w']"]
  four = four_devices["drop4/params['linear']['w']"]
  assert np.max(np.abs(one - four)) > 1e-4


def test_synced_ascent_takes_its_replicas_from_the_steps_mesh(four_devices):
  """The same 16 rows on a 2-device mesh (of 4 devices): replicas of 4
  rows, 2 of which ascend (rows 8d + 4j + {0, 1}), not the 4-device
  layout's."""
  out = four_devices
  params = {
    'linear': {k: out[f"synced2/params0['linear']['{k}']"] for k in 'wb'}
  }
  ascent = [8 * d + 4 * j + i for d in (0, 1) for j in (0, 1) for i in (0, 1)]
  want_w, _, _ = _np_step(params, ts._batch(5, 16), [list(range(16))], [ascent])
  got = out["synced2/params['linear']['w']"]
  np.testing.assert_allclose(got, want_w, atol=1e-6)
  four = [4 * d + 2 * j for d in range(4) for j in (0, 1)]
  other_w, _, _ = _np_step(params, ts._batch(5, 16), [list(range(16))], [four])
  assert np.max(np.abs(other_w - want_w)) > 1e-3
