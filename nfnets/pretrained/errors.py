"""The errors of reading and checking weights files.

Every problem with a weights file is a `WeightsError` (a `ValueError`), so
callers can catch one class; the subclasses say which check failed.
`unreadable_as_weights_error` turns what the safetensors and numpy readers
raise for a damaged file into one, and `check_not_directory` says what to
pass instead of a directory.
"""

import contextlib
import os
import pickle
import zipfile

from safetensors import SafetensorError


class WeightsError(ValueError):
  """A weights file is unreadable, unsafe or does not fit the model."""


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
  """A pickle referenced a global outside the numpy-array allow-list."""


class PretrainedMismatchError(WeightsError):
  """Parameter names or shapes do not match the requested model."""


def check_not_directory(path: str | os.PathLike) -> None:
  """Raises a `WeightsError` for a directory, such as a training run's.

  Opening one would raise a bare `IsADirectoryError`, which says nothing
  about the weights a run's directory holds or how to use them.

  Args:
    path: the path passed as a weights file.
  """
  if os.path.isdir(path):
    raise WeightsError(
      f'{os.fspath(path)!r} is a directory, not a weights file. For a '
      'training run, convert its checkpoint with `python -m '
      'experiments.convert_weights --workdir=DIR` or fine-tune from it with '
      'config.model.init_from=DIR.'
    )


# What the readers raise for a truncated or damaged file: safetensors for a
# header that does not cover the file; zipfile, EOFError and numpy's
# ValueError for a cut-off or corrupt `.npz` archive or member.
_DAMAGED_FILE_ERRORS = (
  SafetensorError,
  zipfile.BadZipFile,
  EOFError,
  ValueError,
)


@contextlib.contextmanager
def unreadable_as_weights_error(path: str | os.PathLike, kind: str):
  """Re-raises a reader's error for a damaged file as a `WeightsError`.

  The format was already told from the file's first bytes, so a reader that
  then fails means the rest of the file is cut off or damaged; its own error
  (e.g. 'incomplete metadata', 'File is not a zip file') does not say so.

  Args:
    path: the file being read, named in the message.
    kind: its format, e.g. '.safetensors'.

  Yields:
    Nothing; wraps the reading code.
  """
  try:
    yield
  except WeightsError:
    raise
  except _DAMAGED_FILE_ERRORS as e:
    raise WeightsError(
      f'Could not read {os.fspath(path)!r} as a {kind} weights file '
      f'({type(e).__name__}: {e}); it is truncated, damaged or not a '
      'weights file. Download or convert it again.'
    ) from e
