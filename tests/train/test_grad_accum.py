"""Gradient accumulation and the batch hook of the train step.

`make_train_step(..., grad_accum_steps=k)` must give the update of one
full-batch step: the references are the same step at k = 1 (whose
arithmetic tests/train/test_step.py checks against NumPy) and, for
BatchNorm, a hand-written loop over the micro-batches with `jax.grad`.

Tolerance of the k = 4 against k = 1 comparisons (float32 throughout):
the two compute the same per-example gradient terms and sum them in a
different grouping (four sums of 4 rows, then a sum of four, against one
sum of 16), so each gradient differs by a few float32 roundings of its
terms (a relative 1e-7 each). Three updates of a smooth loss at a small LR
carry that through without amplifying it much: the largest difference
measured (weights, momentum, EMA and metrics after 3 steps, plain, MixUp
and SAM) is 1.2e-7 absolute, one float32 rounding of a number near 1.
The tests allow `RTOL = 1e-5`, `ATOL = 2e-6`: over ten times that, and far
below what a real error moves (leaving out the division by k, or one
micro-batch, changes the weights by over 1e-3).
"""

import os
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import optim
from nfnets.train import config as config_lib
from nfnets.train import gradients as gradients_lib
from nfnets.train import losses, train_and_evaluate
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib
from tests.support.train_harness import tiny_config
from tests.train.test_hyperparam_step import NUM_CLASSES, _conv_model

BATCH = 16
RTOL, ATOL = 1e-5, 2e-6
REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _bn_model():
  """Conv + BatchNorm: each forward pass normalises with its rows' stats."""

  def forward(images, is_training):
    x = hk.Conv2D(4, 3, stride=2, with_bias=False)(images)
    x = hk.BatchNorm(True, True, decay_rate=0.9)(x, is_training)
    x = jax.nn.relu(x).mean(axis=(1, 2))
    return {'logits': hk.Linear(NUM_CLASSES)(x)}

  return hk.transform_with_state(forward)


def _opt_config(**overrides):
  """SGD + Nesterov + AGC + weight decay + EMA, with a warmup."""
  config = optim.default_config()
  config.update(dict(lr=0.4, warmup_steps=2, ema_decay=0.9, clipping=0.01))
  config.update(overrides)
  return config


def _hyperparams(opt_config, smoothing=0.1):
  values = optim.hyperparams(
    opt_config, steps_per_epoch=4.0, total_steps=40, global_batch_size=BATCH
  )
  values.update(losses.label_smoothing_inputs(smoothing, NUM_CLASSES))
  return values


def _batch(seed, mixup=False, size=BATCH):
  rng = np.random.RandomState(seed)
  batch = {
    'images': rng.randn(size, 6, 6, 3).astype(np.float32),
    'labels': rng.randint(0, NUM_CLASSES, size).astype(np.int32),
  }
  if mixup:
    batch['mix_labels'] = rng.randint(0, NUM_CLASSES, size).astype(np.int32)
    batch['ratio'] = rng.uniform(size=size).astype(np.float32)
  return batch


def _state(model, opt_config):
  params, model_state = model.init(
    jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)), True
  )
  tx, _ = optim.build_optimizer(opt_config, _hyperparams(opt_config))
  return state_lib.make_train_state(
    params, model_state, tx, jax.random.PRNGKey(1),
    ema=opt_config.ema_decay > 0,
  )  # fmt: skip


def _step(model, opt_config, k, **kw):
  step = step_lib.make_train_step(
    model, num_classes=NUM_CLASSES, opt_config=opt_config,
    compute_dtype='float32', grad_accum_steps=k, **kw,
  )  # fmt: skip
  return jax.jit(step)


def _close(a, b):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b
  )


@pytest.mark.parametrize(
  'mixup, overrides, unroll',
  [
    (False, {}, True),
    (True, {}, True),
    (False, {'sam_rho': 0.05}, True),
    (True, {'sam_rho': 0.05}, False),
  ],
  ids=['plain', 'mixup', 'sam', 'mixup_sam_loop'],
)
def test_four_micro_batches_give_the_full_batch_steps(
  mixup, overrides, unroll, monkeypatch
):
  # CPU unrolls the micro-batches; GPUs and TPUs loop (`lax.scan`).
  monkeypatch.setattr(gradients_lib, 'unroll_micro_batches', lambda: unroll)
  model, opt_config = _conv_model(), _opt_config(**overrides)
  values = _hyperparams(opt_config)
  full, accum = _step(model, opt_config, 1), _step(model, opt_config, 4)
  a = b = _state(model, opt_config)
  for i in range(3):
    a, metrics_a = full(a, _batch(i, mixup), values)
    b, metrics_b = accum(b, _batch(i, mixup), values)
    _close(metrics_a, metrics_b)
  assert float(metrics_a['agc_clip_fraction']) > 0  # AGC is active.
  assert int(b.step) == 3
  _close(a, b)  # Weights, momentum, EMA.
  # The comparison can fail: the first step alone moves the weights by more.
  moved = jax.tree.map(
    lambda x, y: np.max(np.abs(x - y)),
    a.params,
    _state(model, opt_config).params,
  )
  assert max(jax.tree.leaves(moved)) > 100 * ATOL


def test_batchnorm_normalises_each_micro_batch_and_carries_the_state():
  model = _bn_model()
  opt_config = _opt_config(
    name='sgd', lr=0.5, min_lr=0.5, scale_lr_by_batch=False, warmup_steps=0,
    momentum=0.0, nesterov=False, weight_decay=0.0, clipping=0.0,
    ema_decay=0.0,
  )  # fmt: skip
  values = _hyperparams(opt_config, smoothing=0.0)
  state0 = _state(model, opt_config)
  batch = _batch(0)
  batch['images'] = 1.0 + 2.0 * batch['images']
  got, _ = _step(model, opt_config, 2)(state0, batch, values)

  # By hand: two halves in turn, the state carried, gradients averaged.
  def loss_fn(params, model_state, rows):
    out, new_state = model.apply(
      params, model_state, None, rows['images'], True
    )
    onehot = jax.nn.one_hot(rows['labels'], NUM_CLASSES)
    logp = jax.nn.log_softmax(out['logits'])
    return -jnp.mean(jnp.sum(onehot * logp, -1)), new_state

  model_state, grads = state0.model_state, []
  for j in range(2):
    rows = {k: v[8 * j : 8 * (j + 1)] for k, v in batch.items()}
    g, model_state = jax.grad(loss_fn, has_aux=True)(
      state0.params, model_state, rows
    )
    grads.append(g)
  want = jax.tree.map(
    lambda p, g0, g1: p - 0.5 * (g0 + g1) / 2, state0.params, *grads
  )
  _close(got.params, want)
  _close(got.model_state, model_state)
  # Two moving-average updates per optimizer step, not one.
  counters = jax.tree.leaves(
    {m: {'counter': d['counter']} for m, d in got.model_state.items()
     if 'counter' in d}
  )  # fmt: skip
  assert counters and all(int(c) == 2 for c in counters)
  # Full-batch statistics give other weights: the check above can fail.
  full, _ = _step(model, opt_config, 1)(state0, batch, values)
  diff = jax.tree.map(
    lambda x, y: np.max(np.abs(x - y)), full.params, got.params
  )
  assert max(jax.tree.leaves(diff)) > 100 * ATOL


def test_split_keeps_each_devices_rows():
  rows = np.arange(24)
  batch = {'x': rows, 'y': np.stack([rows, -rows], axis=1)}
  got = gradients_lib.split_micro_batches(batch, 3, 2)
  # Two devices hold rows 0-11 and 12-23; micro-batch j takes rows
  # 4j..4j+3 of each.
  want = np.stack([np.r_[4 * j : 4 * j + 4, 12 + 4 * j : 16 + 4 * j]
                   for j in range(3)])  # fmt: skip
  np.testing.assert_array_equal(got['x'], want)
  np.testing.assert_array_equal(got['y'][..., 1], -want)
  with pytest.raises(ValueError, match='batch_size=24 .*=5 x 2 devices'):
    gradients_lib.split_micro_batches(batch, 5, 2)


def test_batch_fn_runs_in_the_step_on_the_global_batch_with_its_own_key():
  """A mixing transform (2b uint8 rows -> b float rows) with key noise."""
  model, opt_config = _conv_model(), _opt_config()
  values = _hyperparams(opt_config)

  def batch_fn(batch, key):
    x = batch['images'].astype(jnp.float32) / 255.0
    half = x.shape[0] // 2
    noise = jax.random.uniform(key, x[:half].shape)
    return {
      'images': 0.5 * (x[:half] + x[half:]) + noise,
      'labels': batch['labels'][:half],
      'mix_labels': batch['labels'][half:],
      'ratio': jnp.full((half,), 0.5, jnp.float32),
    }

  rng = np.random.RandomState(3)
  raw = {
    'images': rng.randint(0, 256, (2 * BATCH, 6, 6, 3)).astype(np.uint8),
    'labels': rng.randint(0, NUM_CLASSES, 2 * BATCH).astype(np.int32),
  }
  hooked = _step(model, opt_config, 4, batch_fn=batch_fn)
  plain = _step(model, opt_config, 1)
  a = b = _state(model, opt_config)
  for i in range(2):
    # The documented key: the step's key folded with the hook's tag.
    key = jax.random.fold_in(
      jax.random.fold_in(a.rng, i), step_lib.BATCH_FN_KEY_TAG
    )
    a, metrics_a = plain(a, jax.jit(batch_fn)(raw, key), values)
    b, metrics_b = hooked(b, raw, values)
    _close(metrics_a, metrics_b)
  _close(a, b)


def test_indivisible_batch_is_refused_with_a_valid_choice(tmp_path):
  with pytest.raises(ValueError) as e:
    gradients_lib.check_grad_accum(100, 3, 8)
  message = str(e.value)
  for part in ('batch_size=100', 'grad_accum_steps=3', '8 devices', '96',
               '120'):  # fmt: skip
    assert part in message, message
  gradients_lib.check_grad_accum(96, 3, 8)
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match='grad_accum_steps must be an int'):
      gradients_lib.check_grad_accum(96, bad, 1)
  # The trainer refuses at start-up, before it compiles or trains.
  config = tiny_config()
  config.train.grad_accum_steps = 3  # 16 rows on 1 device.
  with pytest.raises(ValueError, match='batch_size=16 .* 15 or 18'):
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'metrics.jsonl')
  config.train.grad_accum_steps = 0
  with pytest.raises(ValueError, match='grad_accum_steps must be an int'):
    config_lib.validate_config(config)


def _losses(workdir):
  import json  # noqa: PLC0415

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [r['train/loss'] for r in records if 'train/loss' in r]


def test_trainer_logs_the_same_losses_with_accumulation(
  tmp_path, compilation_cache_dir
):
  runs = {}
  for k in (1, 4):
    config = tiny_config(compilation_cache_dir)
    # No dropout or stochastic depth: micro-batches draw other masks.
    config.model.kwargs.stochdepth_rate = 0.0
    config.model.kwargs.drop_rate = 0.0
    config.train.num_steps = 3
    config.checkpoint.enabled = False
    config.train.grad_accum_steps = k
    train_and_evaluate(config, str(tmp_path / f'k{k}'))
    runs[k] = _losses(str(tmp_path / f'k{k}'))
  assert len(runs[1]) == 3
  np.testing.assert_allclose(runs[4], runs[1], rtol=RTOL, atol=ATOL)


_SHARDED_SCRIPT = """
import os, re, sys
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
sys.path.insert(0, sys.argv[1])
import jax
from nfnets.train import gradients as gradients_lib
from nfnets.train import mesh as mesh_lib
from tests.train import test_grad_accum as t

model, opt_config = t._conv_model(), t._opt_config()
values = t._hyperparams(opt_config)
mesh = mesh_lib.make_mesh()
repl = mesh_lib.replicated_sharding(mesh)
state = mesh_lib.replicate(t._state(model, opt_config), mesh)
batch = t._batch(0)
for k, unroll in ((1, True), (4, True), (4, False)):
  gradients_lib.unroll_micro_batches = lambda: unroll
  step = t._step(model, opt_config, k)
  sharded = jax.jit(step, in_shardings=(repl, mesh_lib.batch_sharding(mesh),
                                        repl), out_shardings=(repl, repl))
  text = sharded.lower(state, batch, values).compile().as_text()
  moves = re.findall(
    r'= (\\S+) (?:all-gather|all-to-all|collective-permute)\\(', text)
  print(f'moves{k}{unroll}', ' '.join(sorted(moves)) or 'none')
  new, metrics = sharded(state, batch, values)
  print(f'loss{k}{unroll}', float(metrics['loss']))
"""


def test_sharded_micro_batches_move_no_rows_across_devices():
  """On 4 devices the split is local: no image or label changes device.

  The only cross-device copies are the logits `top_k` gathers (the k = 1
  step has the same, for the whole batch); splitting with a plain reshape
  to [k, B / k] instead gathers the images and labels of every micro-batch.
  """
  out = subprocess.run(
    [sys.executable, '-c', _SHARDED_SCRIPT, REPO],
    capture_output=True, text=True, check=False, timeout=300,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(' ', 1) for line in out.stdout.splitlines())
  assert lines['moves1True'] == 'f32[16,5]{1,0}', out.stdout
  for unroll in ('True', 'False'):  # CPU's unrolled form, and the loop.
    assert set(lines['moves4' + unroll].split()) == {'f32[4,5]{1,0}'}, (
      out.stdout
    )
    assert float(lines['loss4' + unroll]) == pytest.approx(
      float(lines['loss1True']), rel=RTOL, abs=ATOL
    )
