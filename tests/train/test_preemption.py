"""Tests for nfnets.train.preemption: SIGTERM, Ctrl-C and a second Ctrl-C."""

import io
import os
import signal
import subprocess
import sys

from nfnets.train import preemption

REPO = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def test_sigterm_sets_flag_and_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  guard = preemption.PreemptionGuard()
  with guard:
    assert not guard.requested()
    os.kill(os.getpid(), signal.SIGTERM)  # Would kill us without the guard.
    assert guard.requested()
  assert signal.getsignal(signal.SIGTERM) is before


def test_disabled_guard_installs_nothing():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionGuard(enabled=False) as guard:
    assert signal.getsignal(signal.SIGTERM) is before
    assert not guard.requested()


def test_sigint_sets_flag_and_handlers_are_restored():
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  err = io.StringIO()
  guard = preemption.PreemptionGuard(err=err)
  with guard:
    os.kill(os.getpid(), signal.SIGINT)  # A KeyboardInterrupt without it.
    assert guard.requested() and guard.signal_number == signal.SIGINT
    assert 'Ctrl-C: saving a checkpoint' in err.getvalue()
  assert {s: signal.getsignal(s) for s in before} == before
  assert guard.stop_message(7) == (
    'Stopped by Ctrl-C (SIGINT) at step 7; checkpoint saved. Rerun the same '
    'command to resume.'
  )


def test_a_run_without_checkpoints_says_nothing_is_saved():
  # It said "saving a checkpoint" and "checkpoint saved"; a rerun then
  # started from step 0.
  err = io.StringIO()
  with preemption.PreemptionGuard(saves=False, err=err) as guard:
    os.kill(os.getpid(), signal.SIGINT)
  assert err.getvalue() == (
    '\nCtrl-C: stopping after the current step; checkpoints are off, so '
    'nothing is saved (press Ctrl-C again to exit at once).\n'
  )
  assert guard.stop_message(7) == (
    'Stopped by Ctrl-C (SIGINT) at step 7; nothing saved '
    '(config.checkpoint.enabled=False), so a rerun starts from step 0.'
  )


_TWO_CTRL_C = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from nfnets.train import preemption
with preemption.PreemptionGuard() as guard:
  os.kill(os.getpid(), signal.SIGINT)
  print('first handled', guard.requested(), flush=True)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(5)
  print('not reached', flush=True)
"""


def test_second_ctrl_c_exits_at_once_with_130():
  proc = subprocess.run(
    [sys.executable, '-c', _TWO_CTRL_C.format(repo=REPO)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert 'first handled True' in proc.stdout
  assert 'not reached' not in proc.stdout
  assert 'Second Ctrl-C: exiting now' in proc.stderr
  assert 'Traceback' not in proc.stderr
