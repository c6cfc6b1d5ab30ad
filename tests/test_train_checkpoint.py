"""Tests for nfnets.train.checkpoint: Orbax round trip, retention, SIGTERM."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import step as step_lib


def _state(seed=0, ema=True):
  rng = np.random.RandomState(seed)
  params = {
    'net/~/conv': {'w': jnp.asarray(rng.randn(3, 3, 2, 4), jnp.float32)},
    'net/~/linear': {'b': jnp.asarray(rng.randn(4), jnp.float32)},
  }
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  opt_state = jax.tree.map(
    lambda x: x + 1.5 if hasattr(x, 'dtype') else x, tx.init(params)
  )
  return step_lib.TrainState(
    step=jnp.asarray(7, jnp.int32),
    params=params,
    opt_state=opt_state,
    ema_params=jax.tree.map(lambda x: 2 * x, params) if ema else None,
    rng=jax.random.PRNGKey(seed),
  )


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('ema', [True, False])
def test_round_trip_is_exact_and_keeps_structure(tmp_path, ema):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=2)
  assert ckpt.latest_step() is None
  assert ckpt.restore(_state(ema=ema)) is None
  saved = _state(seed=1, ema=ema)
  ckpt.save(7, saved)
  ckpt.wait()
  restored = ckpt.restore(_state(seed=2, ema=ema))
  ckpt.close()
  assert isinstance(restored, step_lib.TrainState)
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
