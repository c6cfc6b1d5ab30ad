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


class PreemptionGuard:
  """Context manager turning SIGTERM and SIGINT into a polled flag.

  Inside the context, SIGTERM and the first SIGINT (Ctrl-C) no longer stop
  the process; `requested()` returns True from then on, on every process
  once any process got a signal, and `signal_number` says which. A second
  SIGINT exits at once (status 130; in a notebook it raises
  KeyboardInterrupt instead, which stops the cell and keeps the kernel).
  The previous handlers are restored on exit. Signal handlers can only be
  installed from the main thread; elsewhere the guard does nothing.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True, *, err=None):
    """Creates the guard.

    Args:
      enabled: when False, the guard installs nothing and never fires.
      err: stream for the Ctrl-C notices (default sys.stderr).
    """
    self._enabled = enabled
    self._flag = threading.Event()
    self._previous = {}
    self._err = err
    self._interrupts = 0
    self.signal_number = None

  def __enter__(self):
    if self._enabled and threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    del frame
    err = self._err or sys.stderr
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1:
        if 'ipykernel' in sys.modules:
          # A notebook: interrupt the cell, not the kernel.
          raise KeyboardInterrupt
        err.write('\nSecond Ctrl-C: exiting now, without a checkpoint.\n')
        err.flush()
        os._exit(128 + signal.SIGINT)
      err.write(
        '\nCtrl-C: saving a checkpoint after the current step, then '
        'stopping (press Ctrl-C again to exit at once).\n'
      )
      err.flush()
    if self.signal_number is None:
      self.signal_number = signum
    self._flag.set()

  def requested(self) -> bool:
    """Whether a signal arrived (on any process; collective if >1)."""
    local = self._flag.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    return bool(np.any(flags))
