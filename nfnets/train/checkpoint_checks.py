"""Why a checkpoint cannot be restored: damage, another config, the host.

Pure functions of the step folder, the saved tree and the error a restore
raised, for `nfnets.train.checkpoint`'s diagnosis: damage is passed over
(and set aside by a trainer), another config's checkpoint and a failing
host (out of memory, no permission) are not.
"""

import errno
import os

import jax


def unreadable(step_dir: str) -> str:
  """'no permission' for a step folder this process cannot read, else ''.

  Unreadable, it would look empty, and empty reads as damage.
  """
  for folder in (step_dir, os.path.join(step_dir, 'default')):
    if os.path.isdir(folder) and not os.access(folder, os.R_OK | os.X_OK):
      return 'no permission'
  return ''


def missing_files(step_dir: str) -> str:
  """What makes a step folder unrestorable at a glance ('' when nothing)."""
  item = os.path.join(step_dir, 'default')
  if not os.path.isdir(item) or not os.listdir(item):
    return 'the step folder holds no saved state (default/ is missing or empty)'
  if not os.path.isfile(os.path.join(item, '_METADATA')):
    return 'default/_METADATA, the list of its arrays, is missing'
  return ''


def _key_name(entry) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaf_shapes(tree) -> dict:
  """`{'a/b/0': shape}` for the array leaves of a pytree or metadata tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    '/'.join(_key_name(k) for k in path): tuple(getattr(leaf, 'shape', ()))
    for path, leaf in flat
    if leaf is not None
  }


def tree_differences(metadata_tree, abstract) -> list[str]:
  """Missing, unexpected and reshaped arrays of a checkpoint vs `abstract`."""
  saved, wanted = _leaf_shapes(metadata_tree), _leaf_shapes(abstract)
  lines = [
    f'missing from the checkpoint: {k}' for k in wanted if k not in saved
  ]
  lines += [f'not in this run: {k}' for k in saved if k not in wanted]
  lines += [
    f'{k}: checkpoint shape {saved[k]}, this run {wanted[k]}'
    for k in wanted
    if k in saved and saved[k] != wanted[k]
  ]
  return lines


# What a restore fails with when the host, not the files, is at fault:
# out of host or device memory, or no read permission (as TensorStore and
# the OS say it).
_HOST_FAULTS = ('resource_exhausted', 'permission_denied', 'out of memory')
_HOST_ERRNOS = (errno.ENOMEM, errno.EACCES, errno.EPERM)


def host_fault(error) -> bool:
  if isinstance(error, MemoryError | PermissionError):
    return True
  if isinstance(error, OSError) and error.errno in _HOST_ERRNOS:
    return True
  text = str(error).lower()
  return any(fault in text for fault in _HOST_FAULTS)


def host_fault_message(where: str, reason: str) -> str:
  return (
    f'Checkpoint {where} cannot be read here: {reason}. Its files are not '
    'at fault; free memory (or fix the permissions) and rerun.'
  )


def first_line(error) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  line = line.split(' See full TensorStore details')[0]  # A page of spec.
  return line if len(line) <= 200 else line[:200] + '...'
