"""One trainer per workdir: an advisory lock on `<workdir>/.trainer.lock`.

Two trainers started on one workdir (a command run twice, a job requeued
while the old one still runs) would both resume the same checkpoint, write
every step twice into `metrics.jsonl` and interleave their checkpoints. The
lock is `fcntl.flock`: the kernel drops it when its process ends, however
it ends, so a crash leaves no stale lock to clear by hand. Only process 0
of a multi-process run takes it. On a filesystem without `flock` (some
network mounts) the run goes on unlocked, as before.
"""

import contextlib
import fcntl
import os
import socket

LOCK_FILE = '.trainer.lock'


class WorkdirInUseError(OSError):
  """Another live process trains in this workdir."""


@contextlib.contextmanager
def exclusive(workdir: str, enabled: bool = True):
  """Holds the workdir's lock for the `with` block.

  Args:
    workdir: the run's workdir (made if missing).
    enabled: False on the processes that do not lock (all but process 0).

  Raises:
    WorkdirInUseError: another process holds the lock; it is named.
  """
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_FILE), 'a+') as f:
    if _lock(f, workdir):
      f.seek(0)
      f.truncate()
      f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
      f.flush()
    yield  # Closing the file releases the lock.


def _lock(f, workdir: str) -> bool:
  """Takes the lock; False where the filesystem has no flock."""
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or 'another process'
    raise WorkdirInUseError(
      f'Another trainer ({holder}) is training in {workdir}: wait for it '
      'to finish or stop it, or use another --workdir.'
    ) from None
  except OSError:
    return False
  return True
