"""SIGTERM and Ctrl-C as a flag the train loop polls between steps.

`PreemptionGuard` lets the loop save a checkpoint after the current step
and stop cleanly on a preemption notice (SIGTERM) or Ctrl-C; a second
Ctrl-C exits at once.
"""

import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

_SIGNAL_NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C (SIGINT)'}


class PreemptionGuard:
  """Context manager turning SIGTERM and SIGINT into a polled flag.

  Inside the context, SIGTERM and the first SIGINT (Ctrl-C) no longer stop
  the process; `requested()` returns True from then on, on every process
  once any process got a signal, and `signal_number` says which. A second
  SIGINT exits at once (status 130; in a notebook it raises
  KeyboardInterrupt instead, which stops the cell and keeps the kernel).
  The previous handlers are restored on exit. Signal handlers can only be
  installed from the main thread; elsewhere the guard does nothing.

  The Ctrl-C notices go to the terminal's stderr as it was when the guard
  was entered (a copy of file descriptor 2): while TensorFlow starts, the
  commands point descriptor 2 at a file to drop its start-up notices
  (`experiments/quiet_start.py`), and a notice written there would show
  only after the import, or never, as the second Ctrl-C exits at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True, *, saves: bool = True, err=None):
    """Creates the guard.

    Args:
      enabled: when False, the guard installs nothing and never fires.
      saves: whether the run saves a checkpoint when it stops (the Ctrl-C
        notice says so only then).
      err: stream for the Ctrl-C notices (default sys.stderr).
    """
    self._enabled = enabled
    self._saves = saves
    self._flag = threading.Event()
    self._previous = {}
    self._err = err
    self._stderr_fd = None
    self._interrupts = 0
    self.signal_number = None

  def __enter__(self):
    if self._enabled and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
      if self._err is None and _writes_to_fd_2(sys.stderr):
        self._stderr_fd = os.dup(2)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    if self._stderr_fd is not None:
      os.close(self._stderr_fd)
      self._stderr_fd = None
    return False

  def _notify(self, text: str) -> None:
    """Writes a notice at once, where the user sees it."""
    if self._stderr_fd is not None:
      sys.stderr.flush()
      os.write(self._stderr_fd, text.encode())
      return
    err = self._err or sys.stderr
    err.write(text)
    err.flush()

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1:
        if 'ipykernel' in sys.modules:
          # A notebook: interrupt the cell, not the kernel.
          raise KeyboardInterrupt
        self._notify('\nSecond Ctrl-C: exiting now, without a checkpoint.\n')
        os._exit(128 + signal.SIGINT)
      then = (
        'saving a checkpoint after the current step, then stopping'
        if self._saves
        else 'stopping after the current step; checkpoints are off, so '
        'nothing is saved'
      )
      self._notify(f'\nCtrl-C: {then} (press Ctrl-C again to exit at once).\n')
    if self.signal_number is None:
      self.signal_number = signum
    self._flag.set()

  def stop_message(self, step: int) -> str:
    """What a run stopped by this guard's signal at `step` tells the user."""
    name = _SIGNAL_NAMES.get(self.signal_number, 'a signal')
    if not self._saves:
      return (
        f'Stopped by {name} at step {step}; nothing saved '
        '(config.checkpoint.enabled=False), so a rerun starts from step 0.'
      )
    return (
      f'Stopped by {name} at step {step}; checkpoint saved. '
      'Rerun the same command to resume.'
    )

  def requested(self) -> bool:
    """Whether a signal arrived (on any process; collective if >1)."""
    local = self._flag.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    return bool(np.any(flags))


def _writes_to_fd_2(stream) -> bool:
  """Whether `stream` is the process's stderr file (not a notebook's)."""
  try:
    return stream.fileno() == 2
  except (AttributeError, OSError, ValueError):
    return False
