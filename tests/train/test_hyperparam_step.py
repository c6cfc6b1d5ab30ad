"""The train step with the optimizer's and label smoothing's numbers as inputs.

The step of `make_train_step` must compute exactly what it
computes with the same numbers bound as Python constants (then it builds
the optimizer of `optim.make_optimizer`, checked against NumPy in
tests/optim/test_optim.py; the step itself is checked in test_step.py),
and its program must not depend on those numbers: that is what lets a
sweep over them reuse one compiled step.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import optim
from nfnets.train import losses
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib

NUM_CLASSES = 5
RUN = dict(steps_per_epoch=4.0, total_steps=40, global_batch_size=8)


def _conv_model():
  """A conv kernel (HWIO units), a bias and a classifier: AGC's leaf kinds."""

  def forward(images, is_training):
    del is_training
    x = jax.nn.relu(hk.Conv2D(4, 3, name='conv')(images))
    return {'logits': hk.Linear(NUM_CLASSES)(jnp.mean(x, axis=(1, 2)))}

  return hk.transform_with_state(forward)


def _opt_config(**overrides):
  config = optim.default_config()
  config.update(dict(warmup_epochs=1.5, ema_decay=0.9, clipping=0.02))
  config.update(overrides)
  return config


def _batch(seed):
  """A MixUp-style batch: the targets use labels, mix_labels and ratio."""
  rng = np.random.RandomState(seed)
  return {
    'images': rng.randn(8, 6, 6, 3).astype(np.float32),
    'labels': rng.randint(0, NUM_CLASSES, 8).astype(np.int32),
    'mix_labels': rng.randint(0, NUM_CLASSES, 8).astype(np.int32),
    'ratio': rng.uniform(size=8).astype(np.float32),
  }


def _initial_state(model, opt_config):
  params, model_state = model.init(
    jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)), True
  )
  tx, _ = optim.make_optimizer(opt_config, **RUN)
  ema = opt_config.ema_decay > 0
  return state_lib.make_train_state(
    params, model_state, tx, jax.random.PRNGKey(1), ema=ema
  )


def _values(opt_config, smoothing=0.1, **run):
  """The step's numbers as Python floats."""
  values = optim.hyperparams(opt_config, **{**RUN, **run})
  values.update(losses.label_smoothing_inputs(smoothing, NUM_CLASSES))
  return values


def _inputs(opt_config, smoothing=0.1, **run):
  """The step's numbers as float32 inputs."""
  values = _values(opt_config, smoothing, **run)
  return {k: jnp.float32(v) for k, v in values.items()}


def _bound(step, values):
  """`step` with `values` bound: the numbers are constants of its program."""
  return lambda state, batch: step(state, batch, values)


def _both_steps(model, opt_config):
  """(constant step, hyperparameter step), both jitted."""
  traced = step_lib.make_train_step(
    model, num_classes=NUM_CLASSES, opt_config=opt_config,
    compute_dtype='float32',
  )  # fmt: skip
  constant = _bound(traced, _values(opt_config))
  return jax.jit(constant), jax.jit(traced)


@pytest.mark.parametrize(
  'overrides',
  [
    {},  # AGC + weight decay + Nesterov SGD, warmup, EMA.
    {'name': 'adamw', 'clipping': 0.005, 'weight_decay': 0.05, 'sam_rho': 0.1},
    {'name': 'sgd', 'clipping': 0.0, 'nesterov': False, 'warmup_epochs': 0.0},
  ],
  ids=['sgd_agc', 'adamw_sam', 'sgd_plain'],
)
def test_inputs_give_the_bits_of_the_constant_step(overrides):
  model, opt_config = _conv_model(), _opt_config(**overrides)
  constant, traced = _both_steps(model, opt_config)
  inputs = _inputs(opt_config)
  a = b = _initial_state(model, opt_config)
  # Steps 0-6 cross the end of the warmup (1.5 epochs = 6 steps).
  for i in range(7):
    a, metrics_a = constant(a, _batch(i))
    b, metrics_b = traced(b, _batch(i), inputs)
    jax.tree.map(np.testing.assert_array_equal, metrics_a, metrics_b)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert float(metrics_b['lr']) > 0 and float(metrics_b['loss']) > 0


def test_schedule_from_inputs_matches_constants_and_numpy():
  steps = jnp.arange(0, 45, dtype=jnp.int32)
  for run in (dict(), dict(total_steps=13), dict(steps_per_epoch=2.7)):
    for config in (_opt_config(), _opt_config(warmup_epochs=0, min_lr=1e-3)):
      values = optim.hyperparams(config, **{**RUN, **run})
      constant = jax.jit(optim.warmup_cosine(**_schedule_args(values)))(steps)
      from_inputs = jax.jit(
        lambda v, t: optim.warmup_cosine(**_schedule_args(v))(t)
      )(_inputs(config, **run), steps)
      np.testing.assert_array_equal(constant, from_inputs)
      np.testing.assert_allclose(
        from_inputs, _np_schedule(config, **{**RUN, **run}), rtol=2e-6,
        atol=1e-7,
      )  # fmt: skip


def _schedule_args(values):
  keys = ('lr_min', 'lr_half_range', 'lr_warmup_slope', 'warmup_steps')
  return {k: values[k] for k in (*keys, 'inv_decay_steps')}


def _np_schedule(config, *, steps_per_epoch, total_steps, global_batch_size):
  """The paper's schedule in float64, from the config alone."""
  peak = config.lr * global_batch_size / 256
  warmup = config.warmup_epochs * steps_per_epoch
  t = np.arange(0, 45, dtype=np.float64)
  frac = np.clip((t - warmup) / (total_steps - warmup), 0, 1)
  cos = config.min_lr + (peak - config.min_lr) * (1 + np.cos(np.pi * frac)) / 2
  if warmup == 0:
    return cos
  return np.where(t <= warmup, peak * t / warmup, cos)


def _lowered_text(step, *args):
  return jax.jit(step).lower(*args).as_text()


def test_program_does_not_depend_on_the_numbers():
  model = _conv_model()
  base = _opt_config()
  other = _opt_config(
    lr=0.37, clipping=0.08, weight_decay=1e-4, momentum=0.8, eps=1e-2,
    warmup_epochs=0.5, min_lr=1e-4, ema_decay=0.999,
  )  # fmt: skip
  state = _initial_state(model, base)
  batch = _batch(0)
  kw = dict(num_classes=NUM_CLASSES, compute_dtype='float32')
  texts, constant_texts = [], []
  for config, smoothing, run in (
    (base, 0.1, {}),
    (other, 0.2, {'total_steps': 99}),
  ):
    step = step_lib.make_train_step(model, opt_config=config, **kw)
    inputs = _inputs(config, smoothing, **run)
    texts.append(_lowered_text(step, state, batch, inputs))
    constant = _bound(step, _values(config, smoothing, **run))
    constant_texts.append(_lowered_text(constant, state, batch))
  assert texts[0] == texts[1]
  # The control: with the numbers as constants the programs differ.
  assert constant_texts[0] != constant_texts[1]


def test_structure_still_changes_the_program():
  model = _conv_model()
  state = _initial_state(model, _opt_config())
  texts = []
  for config in (_opt_config(), _opt_config(nesterov=False)):
    step = step_lib.make_train_step(
      model, num_classes=NUM_CLASSES, opt_config=config,
      compute_dtype='float32',
    )  # fmt: skip
    texts.append(_lowered_text(step, state, _batch(0), _inputs(config)))
  assert texts[0] != texts[1]


def test_hyperparams_checks_the_config():
  with pytest.raises(ValueError, match='momentum'):
    optim.hyperparams(_opt_config(momentum=1.0), **RUN)
  with pytest.raises(ValueError, match='clipping'):
    optim.hyperparams(_opt_config(clipping=-0.1), **RUN)
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.hyperparams(_opt_config(warmup_epochs=20.0), **RUN)
  values = optim.hyperparams(_opt_config(clipping=0.0, name='sgd'), **RUN)
  assert values['clipping'] == 0.0
  assert values['lr_peak'] == pytest.approx(0.1 * 8 / 256)
  assert values['inv_decay_steps'] == pytest.approx(1 / (40 - 1.5 * 4))
