"""Tests for nfnets.train.checkpoint: round trip, retention, other device
counts, Orbax's default writer, damaged checkpoints."""

import asyncio
import errno
import gc
import glob
import logging
import os
import shutil
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import checkpoint_checks
from nfnets.train import state as state_lib

REPO = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


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


def test_a_step_asked_for_is_restored_or_named_missing(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, _big_state(seed=step))
  ckpt.close()
  _truncate_largest_array_file(str(tmp_path / '3'))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  try:
    _assert_same(ckpt.restore(_big_state(0), step=1), _big_state(seed=1))
    with pytest.raises(ValueError, match='its steps: 1, 2, 3') as error:
      ckpt.restore(_big_state(0), step=5)
    # A step the run does not have is a usage error (exit 2), not a failure.
    assert not isinstance(error.value, ckpt_lib.CheckpointError)
    lines = []  # A damaged step asked for: an error, no fallback.
    with pytest.raises(ckpt_lib.DamagedCheckpointError, match='3 is damaged'):
      ckpt.restore(_big_state(0), step=3, log=lines.append)
    assert not lines
  finally:
    ckpt.close()
  assert os.path.isdir(tmp_path / '3')


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


# Restoring on another device count.

_WRITE_ON_8_DEVICES = """
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, {repo!r})
import jax
import numpy as np
import orbax.checkpoint as ocp
from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import mesh as mesh_lib
assert jax.device_count() == 8
state = {{'w': np.arange(96, dtype=np.float32).reshape(16, 6),
          'step': np.int32(5)}}
replicated = jax.block_until_ready(
    mesh_lib.replicate(state, mesh_lib.make_mesh()))
compiles = []
def count(event, duration, **kwargs):
  if event == '/jax/core/compile/backend_compile_duration':
    compiles.append(event)
jax.monitoring.register_event_duration_secs_listener(count)
ckpt = ckpt_lib.Checkpointer({directory!r}, max_to_keep=2)
ckpt.save(5, replicated)
ckpt.close()
print('compiles while saving:', len(compiles))
# What Orbax's default handler writes: replica-parallel slices.
manager = ocp.CheckpointManager({orbax_directory!r})
manager.save(5, args=ocp.args.StandardSave(replicated))
manager.wait_until_finished()
manager.close()
"""


def test_replica_parallel_saves_only_across_hosts_and_not_on_gpus():
  for process_count, platform, expected in [
    (1, 'cpu', False),
    (1, 'gpu', False),
    (1, 'tpu', False),
    (2, 'cpu', True),
    (4, 'tpu', True),
    (8, 'gpu', False),
  ]:
    got = ckpt_lib.saves_replica_parallel(process_count, platform)
    assert got is expected, (process_count, platform)


def _assert_8_device_state(restored):
  """The state `_WRITE_ON_8_DEVICES` saves."""
  want = np.arange(96, dtype=np.float32).reshape(16, 6)
  np.testing.assert_array_equal(np.asarray(restored['w']), want)
  assert int(restored['step']) == 5


def test_checkpoint_of_8_devices_restores_on_this_one(tmp_path):
  ours, orbax_default = str(tmp_path / 'ckpt'), str(tmp_path / 'orbax')
  script = _WRITE_ON_8_DEVICES.format(
    repo=REPO, directory=ours, orbax_directory=orbax_default
  )
  proc = subprocess.run(
    [sys.executable, '-c', script], capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  # One process writes every replica; slicing them would compile programs.
  assert 'compiles while saving: 0' in proc.stdout
  # The target carries no sharding, as `abstract_train_state` gives it.
  target = {
    'w': jax.ShapeDtypeStruct((16, 6), np.float32),
    'step': jax.ShapeDtypeStruct((), np.int32),
  }
  for directory in (ours, orbax_default):
    ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=2)
    restored = ckpt.restore(target)
    ckpt.close()
    _assert_8_device_state(restored)
    assert restored['w'].sharding.device_set == set(jax.devices())
  # The same files as Orbax's default writer's (array metadata included).
  listing = lambda d: sorted(os.listdir(os.path.join(d, '5', 'default')))
  assert listing(ours) == listing(orbax_default)
  # Orbax's default handler reads ours as well.
  manager = ocp.CheckpointManager(ours)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  placed = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target
  )
  _assert_8_device_state(
    manager.restore(5, args=ocp.args.StandardRestore(placed))
  )
  manager.close()


# Damaged checkpoints.


def _truncate_largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'default', '**', 'd', '*'))
  files += glob.glob(os.path.join(step_dir, 'default', 'd', '*'))
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)


def _empty_step_folder(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


def _remove_metadata(step_dir):
  os.remove(os.path.join(step_dir, 'default', '_METADATA'))


def _big_state(seed):
  """`_state` with an array large enough to live in its own data file."""
  state = _state(seed=seed)
  params = dict(state.params)
  rng = np.random.RandomState(seed)
  params['net/~/big'] = {'w': jnp.asarray(rng.randn(64, 512), jnp.float32)}
  return state._replace(params=params, ema_params=params)


DAMAGES = {
  'truncated array file': (_truncate_largest_array_file, 'damaged'),
  'empty step folder': (_empty_step_folder, 'incomplete or damaged'),
  'missing _METADATA': (_remove_metadata, 'incomplete or damaged'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
@pytest.mark.parametrize('set_aside', [False, True])
def test_damaged_newest_checkpoint_falls_back_and_is_kept(
  tmp_path, monkeypatch, damage, set_aside
):
  directory = tmp_path / 'checkpoints'
  ckpt = ckpt_lib.Checkpointer(str(directory), max_to_keep=3)
  ckpt.save(1, _big_state(seed=1))
  ckpt.save(2, _big_state(seed=2))
  ckpt.close()
  hurt, words = DAMAGES[damage]
  hurt(str(directory / '2'))
  files_before = sorted(
    os.path.relpath(p, directory / '2')
    for p in glob.glob(str(directory / '2' / '**'), recursive=True)
  )
  lines = []
  # A failed read leaves Orbax's other reads unawaited; each prints its
  # exception (a page of TensorStore spec) when collected, unless silenced.
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  ckpt = ckpt_lib.Checkpointer(str(directory), max_to_keep=3)
  restored = ckpt.restore(
    _big_state(seed=3), log=lines.append, set_aside_damaged=set_aside
  )
  assert ckpt.latest_step() == (1 if set_aside else 2)
  ckpt.close()
  gc.collect()
  assert not unraisable, [str(u.exc_value)[:200] for u in unraisable]
  _assert_same(restored, _big_state(seed=1))
  warning = '\n'.join(lines)
  assert f'{directory / "2"} is {words}' in warning
  assert 'another model' not in warning and 'delete' not in warning
  assert len(warning.splitlines()) <= 3, warning
  # Kept, file for file: in place, or moved next to the checkpoints.
  kept = (
    tmp_path / 'checkpoints.damaged' / '2' if set_aside else directory / '2'
  )
  assert os.path.isdir(kept)
  assert files_before == sorted(
    os.path.relpath(p, kept)
    for p in glob.glob(str(kept / '**'), recursive=True)
  )


def test_unread_exceptions_of_failed_reads_are_not_logged(tmp_path):
  """asyncio logs a task or future collected with its exception unread, at
  any time; after a failed read, those of checkpoint reads are dropped."""
  directory = str(tmp_path / 'checkpoints')
  ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=3)
  ckpt.save(1, _big_state(seed=1))
  ckpt.save(2, _big_state(seed=2))
  ckpt.close()
  _truncate_largest_array_file(os.path.join(directory, '2'))
  ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=3)
  ckpt.restore(_big_state(seed=3), log=lambda line: None)
  ckpt.close()
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger = logging.getLogger('asyncio')
  logger.addHandler(handler)
  try:
    for text in ('Error reading "w/0.0" in OCDBT database', 'another error'):
      loop = asyncio.new_event_loop()
      future = loop.create_future()
      future.set_exception(ValueError(text))
      del future  # Collected unread: asyncio logs it.
      gc.collect()
      loop.close()
  finally:
    logger.removeHandler(handler)
  (record,) = records
  assert 'another error' in record.getMessage()


def test_no_readable_checkpoint_is_a_short_error(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(4, _state())
  ckpt.close()
  _empty_step_folder(str(tmp_path / '4'))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  with pytest.raises(ckpt_lib.DamagedCheckpointError) as e:
    ckpt.restore(_state(), log=lambda line: None, set_aside_damaged=True)
  ckpt.close()
  assert 'No readable checkpoint' in str(e.value) and 'kept' in str(e.value)
  assert 'delete' not in str(e.value)
  assert os.path.isdir(tmp_path / '4')
  # A reader (evaluate, predict, export) gets no advice meant for a trainer.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  with pytest.raises(ckpt_lib.DamagedCheckpointError) as e:
    ckpt.restore(_state(), log=lambda line: None)
  ckpt.close()
  assert str(e.value) == (
    f'No readable checkpoint in {tmp_path} (damaged: steps 4; they are kept).'
  )


def test_another_config_is_told_from_damage(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1)
  ckpt.save(7, _state())
  ckpt.close()
  other = _state()._replace(
    params={
      'net/~/conv': {'w': jnp.zeros((3, 3, 2, 8), jnp.float32)},
      'net/~/linear': {'b': jnp.zeros((4,), jnp.float32)},
    }
  )
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ckpt.restore(other, log=lambda line: None)
  ckpt.close()
  message = str(e.value)
  assert 'another model or optimizer config' in message
  # The differing array and both shapes are named; few lines, no advice to
  # delete anything.
  assert (
    'net/~/conv/w: checkpoint shape (3, 3, 2, 4), this run (3, 3, 2, 8)'
    in (message)
  )
  assert len(message.splitlines()) <= 10 and 'delete' not in message


def test_a_failing_host_is_not_taken_for_damage(tmp_path, monkeypatch):
  # Out of memory while restoring used to read as a damaged checkpoint: the
  # sound newest one was moved aside and the run went back to an older one.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(2, _state())
  ckpt.save(4, _state())
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  faults = (
    MemoryError(),
    ValueError('RESOURCE_EXHAUSTED: Out of memory allocating 17.2GiB'),
  )
  for fault in faults:

    def fail(*args, fault=fault, **kwargs):
      raise fault

    monkeypatch.setattr(ckpt._manager, 'restore', fail)
    warnings = []
    with pytest.raises(ckpt_lib.CheckpointReadError) as e:
      ckpt.restore(_state(), log=warnings.append, set_aside_damaged=True)
    reason = checkpoint_checks.first_line(fault)
    assert str(e.value) == (
      f'Checkpoint {tmp_path / "4"} cannot be read here: {reason}. Its '
      'files are not at fault; free memory (or fix the permissions) and '
      'rerun.'
    )
    assert warnings == []  # Step 2 was not tried: 4 is not damaged.
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ['2', '4']
  assert not os.path.exists(str(tmp_path) + ckpt_lib.DAMAGED_SUFFIX)
  # And the checkpoint restores once the host can.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3)
  _assert_same(ckpt.restore(_state(), log=warnings.append), _state())
  ckpt.close()


def test_host_faults_are_told_from_damage_by_type_errno_and_text():
  host = (
    MemoryError(),
    PermissionError(errno.EACCES, 'Permission denied'),
    OSError(errno.ENOMEM, 'Cannot allocate memory'),
    ValueError('PERMISSION_DENIED: error opening file'),  # TensorStore's.
    RuntimeError('CUDA_ERROR_OUT_OF_MEMORY: Out of memory'),
  )
  damage = (
    ValueError('DATA_LOSS: Error reading "d/0": Unexpected end of file'),
    OSError(errno.EIO, 'Input/output error'),
    KeyError('params'),
  )
  assert all(checkpoint_checks.host_fault(e) for e in host)
  assert not any(checkpoint_checks.host_fault(e) for e in damage)
