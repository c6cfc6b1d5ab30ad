"""Files written whole or not at all.

Weights files, run records, sweep tables, benchmark results and the plots
of the benchmark, sweeps and signal-propagation studies are written
through here: under a temporary name beside the destination, then renamed
over it when complete. A reader, or a run killed while writing (Ctrl-C, a
full disk, an error), never sees half a file, an earlier complete file
stays until the new one is whole, and a failed write leaves no temporary
file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path to write; renames it to `path` on success.

  Args:
    path: the destination file.

  Yields:
    `<root>.tmp-<pid><ext>` in the destination's folder (the extension is
    kept, for writers that pick the format from it, e.g. matplotlib).

  Raises:
    IsADirectoryError: `path` is a directory (checked before any writing).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(
      f'{path!r} is a directory; name a file in it to write to.'
    )
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp-{os.getpid()}{ext}'
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    # After a failure only the temporary file is removed; a complete one
    # was renamed already.
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` whole (newlines as given)."""
  with atomic_output(path) as tmp, open(tmp, 'w', newline='') as f:
    f.write(text)


def write_json(path: str | os.PathLike, value: Any, **dump_kwargs) -> None:
  """Writes `value` as JSON to `path` whole, with a final newline.

  Args:
    path: the destination file.
    value: a JSON-serialisable value.
    **dump_kwargs: passed to `json.dumps` (default `indent=2`).
  """
  write_text(path, json.dumps(value, **{'indent': 2, **dump_kwargs}) + '\n')
