"""Data-parallel device mesh and sharding helpers.

One `('data',)` mesh spans every device of every host. Parameters and
optimizer state are replicated (`P()`); batches are sharded on their leading
axis (`P('data')`). Each host feeds only its own share of a global batch
(`jax.make_array_from_process_local_data`), and the jitted step averages
gradients across the mesh because the loss is a mean over the global batch
(the compiler inserts the all-reduce).
"""

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """Returns a 1-D `('data',)` mesh over all devices of all processes.

  The mesh uses `AxisType.Auto` (the behaviour of `jax.sharding.Mesh`), so
  plain `jax.jit` partitions the step and unsharded inputs are accepted.

  Args:
    devices: devices to use; defaults to `jax.devices()` (global).

  Returns:
    The mesh.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding that puts a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding that splits the leading (batch) axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises a clear error if `batch_size` does not split over the mesh.

  Args:
    batch_size: a global batch size.
    mesh: the data mesh.
    what: the config key, named in the error (e.g. 'config.train.batch_size').

  Raises:
    ValueError: if `batch_size` is not a multiple of the device count or of
      the process count.
  """
  n = mesh.devices.size
  if batch_size % n:
    lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
    valid = ' or '.join(str(b) for b in (lower, upper) if b > 0)
    raise ValueError(
      f'{what}={batch_size} is not divisible by the number of devices ({n}).'
      f' Use a multiple of {n}, e.g. {valid}.'
    )
  if batch_size % jax.process_count():
    raise ValueError(
      f'{what}={batch_size} is not divisible by the number of processes '
      f'({jax.process_count()}).'
    )


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` on all devices of `mesh` (a full copy).

  Args:
    tree: a pytree of arrays that is identical on every process.
    mesh: the data mesh.

  Returns:
    The same tree with global, replicated `jax.Array` leaves.
  """
  sharding = replicated_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  # Across hosts each process supplies its (identical) full copy.
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), np.shape(x)
    ),
    tree,
  )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Builds global batch arrays from this process's share.

  Args:
    batch: numpy arrays for this process, each with leading size
      `global_batch / process_count`.
    mesh: the data mesh.

  Returns:
    A dict of global `jax.Array`s sharded over the batch axis.
  """
  sharding = batch_sharding(mesh)
  n_proc = jax.process_count()

  def _put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * n_proc, *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return {k: _put(v) for k, v in batch.items()}
