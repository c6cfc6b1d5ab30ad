"""Tests for nfnets.train.checkpoint: Orbax round trip, retention, SIGTERM."""

import os
import signal
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import state as state_lib


class _StateBeforeModelState(NamedTuple):
  """`TrainState` as checkpointed before it carried the Haiku state."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


def _model_state(rng):
  """A BatchNorm-like Haiku state: float averages and an int counter."""
  ema = {
    'average': jnp.asarray(rng.randn(1, 1, 1, 4), jnp.float32),
    'counter': jnp.asarray(rng.randint(1, 100), jnp.int32),
  }
  return {'net/~/bn/~/mean_ema': ema}


def _state(seed=0, ema=True, stateful=False):
  rng = np.random.RandomState(seed)
  params = {
    'net/~/conv': {'w': jnp.asarray(rng.randn(3, 3, 2, 4), jnp.float32)},
    'net/~/linear': {'b': jnp.asarray(rng.randn(4), jnp.float32)},
  }
  model_state = _model_state(rng) if stateful else {}
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  opt_state = jax.tree.map(
    lambda x: x + 1.5 if hasattr(x, 'dtype') else x, tx.init(params)
  )
  double = lambda t: jax.tree.map(lambda x: 2 * x, t)
  return state_lib.TrainState(
    step=jnp.asarray(7, jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=opt_state,
    ema_params=double(params) if ema else None,
    ema_model_state=double(model_state) if ema else None,
    rng=jax.random.PRNGKey(seed),
  )


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('ema,stateful', [(True, True), (False, False)])
def test_round_trip_is_exact_and_keeps_structure(tmp_path, ema, stateful):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=2)
  assert ckpt.latest_step() is None
  assert ckpt.restore(_state(ema=ema, stateful=stateful)) is None
  saved = _state(seed=1, ema=ema, stateful=stateful)
  ckpt.save(7, saved)
  ckpt.wait()
  restored = ckpt.restore(_state(seed=2, ema=ema, stateful=stateful))
  ckpt.close()
  assert isinstance(restored, state_lib.TrainState)
  # Optax's namedtuple states come back as namedtuples, not lists.
  assert type(restored.opt_state[0]) is type(saved.opt_state[0])
  _assert_same(restored, saved)


def test_keeps_only_the_newest_checkpoints(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, _state(seed=step))
  ckpt.wait()
  assert ckpt.latest_step() == 4
  restored = ckpt.restore(_state())
  ckpt.close()
  _assert_same(restored, _state(seed=4))
  steps = sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit())
  assert steps == [3, 4]


def test_restore_into_another_structure_fails_clearly(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1)
  ckpt.save(7, _state())
  ckpt.wait()
  other = _state()._replace(
    params={'net/~/linear': {'b': jnp.zeros((5,), jnp.float32)}}
  )
  with pytest.raises(ValueError, match='fresh --workdir'):
    ckpt.restore(other)
  ckpt.close()


def _save_state_before_model_state(directory, state):
  """Writes `state` as checkpoint 7 the way runs before model_state did."""
  old = _StateBeforeModelState(
    **{k: getattr(state, k) for k in _StateBeforeModelState._fields}
  )
  manager = ocp.CheckpointManager(directory)
  manager.save(7, args=ocp.args.StandardSave(old))
  manager.wait_until_finished()
  manager.close()


@pytest.mark.parametrize('ema', [True, False])
def test_checkpoint_from_before_model_state_restores_stateless(tmp_path, ema):
  saved = _state(seed=1, ema=ema)
  _save_state_before_model_state(str(tmp_path), saved)
  # A fresh process: a new Checkpointer on the directory.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
  restored = ckpt.restore(_state(seed=2, ema=ema))
  ckpt.close()
  assert isinstance(restored, state_lib.TrainState)
  assert restored.model_state == {}
  assert restored.ema_model_state == ({} if ema else None)
  _assert_same(restored, saved)


def test_checkpoint_from_before_model_state_refuses_stateful(tmp_path):
  _save_state_before_model_state(str(tmp_path), _state(seed=1))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
  with pytest.raises(ValueError, match='BatchNorm.*fresh --workdir'):
    ckpt.restore(_state(stateful=True))
  ckpt.close()


def test_sigterm_sets_flag_and_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  guard = ckpt_lib.PreemptionGuard()
  with guard:
    assert not guard.requested()
    os.kill(os.getpid(), signal.SIGTERM)  # Would kill us without the guard.
    assert guard.requested()
  assert signal.getsignal(signal.SIGTERM) is before


def test_disabled_guard_installs_nothing():
  before = signal.getsignal(signal.SIGTERM)
  with ckpt_lib.PreemptionGuard(enabled=False) as guard:
    assert signal.getsignal(signal.SIGTERM) is before
    assert not guard.requested()
