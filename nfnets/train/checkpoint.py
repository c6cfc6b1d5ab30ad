"""Orbax checkpointing of the whole train state.

Checkpoints live in `<workdir>/checkpoints/<step>`; Orbax writes each one to
a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoints intact and the partial one is ignored.

Restoring (`Checkpointer.restore`) works on any device count: the state is
placed replicated over the devices of the restoring process, whatever the
checkpoint was written on. A checkpoint that cannot be read is diagnosed:
`DamagedCheckpointError` for one that is incomplete or damaged (an empty
step folder, a missing or truncated file), `CheckpointMismatchError` for one
written by another model or optimizer config. The newest readable
checkpoint is restored, with a warning naming each damaged one passed over;
damaged checkpoints are never deleted (the trainer moves them to
`<workdir>/checkpoints.damaged/` so Orbax's retention never removes them).
"""

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Callable, Mapping

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Not re-exported by Orbax (pinned in requirements.txt); its default array
# handler is built with this store.
from orbax.checkpoint._src.metadata import (
  array_metadata_store as array_metadata_lib,
)

from nfnets.train import checkpoint_checks as checks
from nfnets.train import mesh as mesh_lib

DAMAGED_SUFFIX = '.damaged'
_MAX_LISTED = 5


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored; the message says what to do.

  A runtime failure, not a usage error: the commands exit with
  `exit_status`, as for a missing file.
  """

  exit_status = 1


class DamagedCheckpointError(CheckpointError):
  """Incomplete or damaged checkpoint files."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint written by another model or optimizer config."""


class CheckpointReadError(CheckpointError):
  """A sound checkpoint this process cannot read now (memory, permission)."""


class Checkpointer:
  """Saves and restores `TrainState` pytrees in one directory.

  All processes must call every method (Orbax coordinates the hosts; only
  process 0 writes the metadata and moves damaged checkpoints).
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
    # Orbax reads every step's metadata here, warning about damaged ones.
    with _orbax_warnings_off():
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers=_item_handler(
          saves_replica_parallel(jax.process_count(), jax.default_backend())
        ),
      )

  def latest_step(self) -> int | None:
    """Returns the newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def restore(
    self,
    state,
    *,
    log: Callable[[str], None] = print,
    set_aside_damaged: bool = False,
    step: int | None = None,
  ):
    """Restores the newest readable checkpoint into the structure of `state`.

    Damaged checkpoints are passed over with a warning (`log`) naming each
    and what is wrong; with `set_aside_damaged` they are moved to
    `<directory>.damaged/<step>` once a readable one is found (for a run
    that writes new checkpoints).
    Checkpoints written before the train state carried the Haiku state (no
    `model_state` entry) are restored too when `state`'s model state is
    empty (every normalizer-free model).

    Args:
      state: a state with the run's tree structure, shapes and dtypes: the
        freshly initialised one, or `jax.ShapeDtypeStruct`s (e.g.
        `init_state.abstract_train_state`). Leaves without a sharding are
        restored replicated over all devices of this process's mesh.
      log: prints a warning line.
      set_aside_damaged: move damaged checkpoints out of the directory.
      step: restore this step's checkpoint, and no other.

    Returns:
      The restored state, or None if the directory has no checkpoint.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint does not fit
        `state` (another config was used in this workdir).
      DamagedCheckpointError: every checkpoint is damaged, or `step`'s.
      CheckpointReadError: a checkpoint this process cannot read now (out
        of memory, no permission); never passed over.
      ValueError: there is no checkpoint of `step` (a usage error).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    abstract = _abstract(state)
    if step is not None:
      if step not in steps:
        listed = ', '.join(map(str, sorted(steps)))
        raise ValueError(
          f'{self.directory} holds no checkpoint of step {step}; its steps: '
          f'{listed}.'
        )
      return self._restore_step(step, abstract, state)
    damaged = []
    for step in steps:
      try:
        restored = self._restore_step(step, abstract, state)
      except DamagedCheckpointError as e:
        damaged.append(step)
        log(f'Warning: {e} Falling back to an older checkpoint.')
        continue
      break
    else:
      restored = None
    if restored is None:  # Left in place: the user decides what to do.
      advice = (  # For a trainer (the one that sets damage aside).
        ' Use a fresh --workdir, or move those step folders out of the way '
        'to start this run from step 0.'
      )
      raise DamagedCheckpointError(
        f'No readable checkpoint in {self.directory} (damaged: steps '
        f'{", ".join(map(str, damaged))}; they are kept).'
        + (advice if set_aside_damaged else '')
      )
    if damaged and set_aside_damaged:
      self._set_aside(damaged, log)
    return restored

  def _restore_step(self, step: int, abstract, state):
    """Restores checkpoint `step`; raises a diagnosed CheckpointError."""
    where = os.path.join(self.directory, str(step))
    reason = checks.unreadable(where)
    if reason:
      raise CheckpointReadError(checks.host_fault_message(where, reason))
    problem = checks.missing_files(where)
    if problem:
      raise DamagedCheckpointError(
        f'Checkpoint {where} is incomplete or damaged: {problem}.'
      )
    restored, error = _quietly(lambda: self._try_restore(step, abstract, state))
    if error is not None:
      raise error
    return restored

  def _try_restore(self, step: int, abstract, state):
    """(the restored state, None), or (None, the diagnosed CheckpointError).

    The error is returned, not raised from Orbax's exception: that
    exception's traceback holds the failed read's unawaited coroutines,
    and returning lets them go while their noise is still silenced.
    """
    try:
      with _orbax_warnings_off():
        if self._predates_model_state(step, state):
          return self._restore_without_model_state(step, abstract, state), None
        restored = self._manager.restore(step, args=_restore_args(abstract))
        return restored, None
    except CheckpointError as e:
      return None, e
    except Exception as e:  # Orbax raises many types; diagnosed here.
      return None, self._diagnose(step, abstract, e)

  def _diagnose(self, step: int, abstract, error) -> CheckpointError:
    """Tells a config mismatch and a failing host from damage."""
    where = os.path.join(self.directory, str(step))
    if checks.host_fault(error):  # Not damage: never passed over or moved.
      return CheckpointReadError(
        checks.host_fault_message(where, checks.first_line(error))
      )
    try:
      with _orbax_warnings_off():
        metadata = self._manager.item_metadata(step)
    except Exception:  # noqa: BLE001  (unreadable metadata is damage)
      metadata = None
    tree = getattr(metadata, 'tree', metadata)
    if not isinstance(tree, Mapping):
      return DamagedCheckpointError(
        f'Checkpoint {where} is incomplete or damaged: its metadata '
        f'(default/_METADATA) cannot be read ({checks.first_line(error)}).'
      )
    differences = checks.tree_differences(tree, abstract)
    if differences:
      listed = '\n'.join(f'  {d}' for d in differences[:_MAX_LISTED])
      more = len(differences) - _MAX_LISTED
      if more > 0:
        listed += f'\n  ... and {more} more'
      return CheckpointMismatchError(
        f'Checkpoint {where} was written by another model or optimizer '
        f"config than this run's:\n{listed}\nRun with the config it was "
        "trained with (its workdir's config.json), or use a fresh --workdir."
      )
    return DamagedCheckpointError(
      f'Checkpoint {where} is damaged: its structure matches this run but '
      'its array data cannot be read (a truncated or corrupt file: '
      f'{checks.first_line(error)}).'
    )

  def _set_aside(self, steps, log) -> None:
    """Moves damaged step folders to `<directory>.damaged/` (process 0)."""
    target_dir = self.directory + DAMAGED_SUFFIX
    if jax.process_index() == 0:
      os.makedirs(target_dir, exist_ok=True)
      for step in steps:
        target = os.path.join(target_dir, str(step))
        if os.path.exists(target):
          target = _unused_name(target)
        os.replace(os.path.join(self.directory, str(step)), target)
        log(f'Moved the damaged checkpoint to {target}, where it is kept.')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('nfnets_checkpoint_set_aside')
    self._manager.reload()

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
      raise CheckpointMismatchError(
        f'The checkpoint at step {step} in {self.directory} was written '
        'before the train state carried the Haiku state (BatchNorm '
        'statistics), which this model needs. Train it in a fresh --workdir.'
      )
    fields = {
      k: v
      for k, v in abstract._asdict().items()
      if k not in ('model_state', 'ema_model_state')
    }
    restored = self._manager.restore(step, args=_restore_args(fields))
    return state._replace(**restored)

  def save(self, step: int, state) -> None:
    """Starts saving `state` as checkpoint `step` (asynchronously).

    Args:
      step: the step number (the number of updates in `state`).
      state: the train state.
    """
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.PyTreeSave(state), force=True)

  def wait(self) -> None:
    """Blocks until every pending save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def saves_replica_parallel(process_count: int, platform: str) -> bool:
  """Whether each replica saves a slice of a replicated array (Orbax's way).

  Orbax's default array handler saves "replica-parallel": each replica
  writes a slice, cut by a small program compiled per array shape and
  slice. Across hosts that spreads the writing. In one process there is
  one writer either way, and the slicing only costs compilation: the first
  save of a tiny NFNet's state replicated over 8 CPU devices compiled 1,938
  slices, 5-10 s on 2 cores, in every run. On GPUs Orbax turns it off
  itself, but only when `JAX_PLATFORMS` names the GPU, which it usually
  does not; the backend says it for certain.

  Args:
    process_count: `jax.process_count()`.
    platform: `jax.default_backend()` ('cpu', 'gpu' or 'tpu').
  """
  return process_count > 1 and platform not in ('gpu', 'cuda', 'rocm')


def _item_handler(replica_parallel: bool):
  """Orbax's tree handler, with or without replica-parallel saving.

  Without it, the files are those Orbax's default handler writes (its
  per-host array metadata store included, as Orbax builds its default
  handler); only the Zarr chunks of replicated arrays are whole arrays.
  """
  if replica_parallel:
    return ocp.PyTreeCheckpointHandler()
  standard = [
    (t, ocp.type_handlers.get_type_handler(t))
    for t in ocp.type_handlers.supported_types()
    if t is not jax.Array
  ]
  arrays = ocp.type_handlers.ArrayHandler(
    use_replica_parallel=False,
    array_metadata_store=array_metadata_lib.Store(),
  )
  registry = ocp.type_handlers.create_type_handler_registry(
    *standard, (jax.Array, arrays)
  )
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract):
  """Orbax restore arguments placing every leaf as `abstract`'s sharding."""
  return ocp.args.PyTreeRestore(
    abstract,
    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
  )


def _abstract(state):
  """Shape/dtype/sharding targets; replicated where `state` has none."""
  replicated = None

  def target(x):
    nonlocal replicated
    struct = ocp.utils.to_shape_dtype_struct(x)
    if getattr(struct, 'sharding', None) is not None:
      return struct
    # The writer's device count is in the checkpoint; restoring onto it
    # would fail elsewhere, so the target names this process's devices.
    if replicated is None:
      replicated = mesh_lib.replicated_sharding(mesh_lib.make_mesh())
    return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=replicated)

  return jax.tree.map(target, state)


def _unused_name(path: str) -> str:
  n = 1
  while os.path.exists(f'{path}.{n}'):
    n += 1
  return f'{path}.{n}'


def _quietly(read):
  """`read() -> (result, error)`, silencing what a failed read leaves.

  A failed Orbax read leaves its other read coroutines unawaited, and
  Python prints each one's exception (a page of TensorStore spec) when it
  is collected: thousands of lines for one damaged checkpoint of a real
  model, burying the diagnosis, which says it all. `read` returns its
  error instead of raising it, which releases Orbax's exception and the
  coroutines its traceback holds; they are collected here, silently. Only
  a failure is followed by a collection (0.2 s or more in a process that
  holds TensorFlow and JAX).
  """
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    result, error = read()
    if error is not None:
      # The failed reads' tasks may be dropped later, on Orbax's thread.
      _drop_orbax_read_failures(logging.getLogger('asyncio'))
      gc.collect()
    return result, error
  finally:
    sys.unraisablehook = previous


def _drop_orbax_read_failures(logger) -> None:
  """Keeps asyncio's 'exception was never retrieved' of Orbax reads quiet.

  asyncio logs a page for every task or future of a failed read that is
  collected with its exception unread, whenever and on whichever thread
  that happens; the diagnosis of the damaged checkpoint says it all. Other
  records pass.
  """
  if not any(isinstance(f, _OrbaxReadFailures) for f in logger.filters):
    logger.addFilter(_OrbaxReadFailures())


class _OrbaxReadFailures(logging.Filter):
  """Drops asyncio's records of unread exceptions of checkpoint reads."""

  _MARKS = ('orbax', 'OCDBT', 'TensorStore', 'tensorstore')

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if 'exception was never retrieved' not in message:
      return True
    return not any(mark in message for mark in self._MARKS)


@contextlib.contextmanager
def _orbax_warnings_off():
  """Orbax's warnings about damaged steps; the diagnosis says more."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)
