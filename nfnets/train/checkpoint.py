"""Orbax checkpointing of the whole train state, and SIGTERM handling.

Checkpoints live in `<workdir>/checkpoints/<step>`; Orbax writes each one to
a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoints intact and the partial one is ignored.
`PreemptionGuard` turns SIGTERM into a flag the loop polls between steps, so
the loop can save after the current step and stop cleanly.
"""

import os
import signal
import threading
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class _OlderCheckpointError(ValueError):
  """A checkpoint from before `TrainState.model_state`, for a stateful model."""


class Checkpointer:
  """Saves and restores `TrainState` pytrees in one directory.

  All processes must call every method (Orbax coordinates the hosts; only
  process 0 writes the metadata).
  """

  def __init__(self, directory: str, *, max_to_keep: int):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: absolute path of the checkpoint directory.
      max_to_keep: how many of the newest checkpoints to keep.
    """
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    # The handler lets `item_metadata` read checkpoints of earlier runs.
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers=ocp.StandardCheckpointHandler(),
    )

  def latest_step(self) -> int | None:
    """Returns the newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def restore(self, state):
    """Restores the newest checkpoint into the structure of `state`.

    Checkpoints written before the train state carried the Haiku state (no
    `model_state` entry) are restored too when `state`'s model state is
    empty (every normalizer-free model): `model_state` and
    `ema_model_state` are then taken from `state`.

    Args:
      state: a state with the run's tree structure, shapes and shardings
        (e.g. the freshly initialised one); its values are not used, except
        the (empty) model state of an older checkpoint.

    Returns:
      The restored state, or None if the directory has no checkpoint.

    Raises:
      ValueError: if the checkpoint does not fit `state` (another config was
        used in this workdir) or cannot be read.
    """
    step = self.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      if self._predates_model_state(step, state):
        return self._restore_without_model_state(step, abstract, state)
      return self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract)
      )
    except _OlderCheckpointError:
      raise
    except Exception as e:  # Orbax raises many types; all mean the same here.
      raise ValueError(
        f'Could not restore the checkpoint at step {step} in '
        f'{self.directory}: {e}\nIt was probably written with another model '
        'or optimizer config. Use a fresh --workdir, or delete that step '
        'directory to fall back to an older checkpoint.'
      ) from e

  def _predates_model_state(self, step: int, state) -> bool:
    """Whether checkpoint `step` has no `model_state` but `state` does."""
    if 'model_state' not in getattr(state, '_fields', ()):
      return False
    metadata = self._manager.item_metadata(step)
    tree = getattr(metadata, 'tree', metadata)
    return isinstance(tree, Mapping) and 'model_state' not in tree

  def _restore_without_model_state(self, step: int, abstract, state):
    """Restores an older checkpoint; the model state comes from `state`."""
    if jax.tree.leaves(state.model_state):
      raise _OlderCheckpointError(
        f'The checkpoint at step {step} in {self.directory} was written '
        'before the train state carried the Haiku state (BatchNorm '
        'statistics), which this model needs. Train it in a fresh --workdir.'
      )
    fields = {
      k: v
      for k, v in abstract._asdict().items()
      if k not in ('model_state', 'ema_model_state')
    }
    restored = self._manager.restore(
      step, args=ocp.args.StandardRestore(fields)
    )
    return state._replace(**restored)

  def save(self, step: int, state) -> None:
    """Starts saving `state` as checkpoint `step` (asynchronously).

    Args:
      step: the step number (the number of updates in `state`).
      state: the train state.
    """
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self) -> None:
    """Blocks until every pending save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Context manager turning SIGTERM into a flag polled by the train loop.

  Inside the context, SIGTERM no longer kills the process; `requested()`
  returns True from then on, on every process once any process got the
  signal. The previous handler is restored on exit. Signal handlers can only
  be installed from the main thread; elsewhere the guard does nothing.
  """

  def __init__(self, enabled: bool = True):
    """Creates the guard.

    Args:
      enabled: when False, the guard installs nothing and never fires.
    """
    self._enabled = enabled
    self._flag = threading.Event()
    self._previous = None

  def __enter__(self):
    if self._enabled and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    return False

  def _handle(self, signum, frame):
    del signum, frame
    self._flag.set()

  def requested(self) -> bool:
    """Whether a SIGTERM arrived (on any process; collective if >1)."""
    local = self._flag.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    return bool(np.any(flags))
