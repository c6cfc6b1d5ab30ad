"""One trainer per workdir (`nfnets.train.workdir_lock`).

Two trainers on one workdir wrote every step twice into metrics.jsonl and
interleaved their checkpoints. `flock` locks conflict between two opens of
the file even in one process, so the second trainer is simulated here by a
held lock; a finished holder (closed file) must leave nothing to clear.
"""

import os

import pytest

from nfnets.train import train_and_evaluate, workdir_lock
from tests.support.train_harness import tiny_config


def test_a_held_workdir_is_refused_naming_its_holder(tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lock.exclusive(workdir):
    with pytest.raises(workdir_lock.WorkdirInUseError) as error:
      with workdir_lock.exclusive(workdir):
        pass
    assert f'pid {os.getpid()}' in str(error.value)
    # The trainer refuses before it builds or writes anything.
    with pytest.raises(workdir_lock.WorkdirInUseError, match='another'):
      train_and_evaluate(tiny_config(), workdir)
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]
    with workdir_lock.exclusive(workdir, enabled=False):  # Process > 0.
      pass
  with workdir_lock.exclusive(workdir):  # Released with its holder.
    pass
