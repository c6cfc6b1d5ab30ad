"""Writing a weights file whole or not at all.

A weights file is written under a temporary name beside its destination and
renamed when complete, so an interrupted write never leaves a truncated
file under the final name; a failed one leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path to write; renames it to `path` on success.

  Args:
    path: the destination file.

  Yields:
    The temporary path (`<path>.tmp-<pid>`), in the destination's folder.

  Raises:
    IsADirectoryError: `path` is a directory (checked before any writing).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(
      f'{path!r} is a directory; name a file in it to write the weights to.'
    )
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    # After a failure (a full disk, an error, Ctrl-C) only the temporary
    # file is removed; a complete one was renamed already.
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
