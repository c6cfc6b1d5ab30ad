"""`python -m experiments.train` on a workdir: Ctrl-C, resume, refusal.

Each command runs in a subprocess on the tests' tiny config
(`tests/support/tiny_config.py`), sharing the session's compilation cache.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TIMEOUT_S = 300


def _command(workdir, cache_dir, *overrides):
  return [
    sys.executable,
    '-m',
    'experiments.train',
    '--config=tests/support/tiny_config.py',
    f'--workdir={workdir}',
    f'--config.train.compilation_cache_dir={cache_dir}',
    *overrides,
  ]


def _run(workdir, cache_dir, *overrides):
  return subprocess.run(
    _command(workdir, cache_dir, *overrides),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def _logged_steps(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  return [json.loads(line)['step'] for line in lines if line.endswith('}')]


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory, compilation_cache_dir):
  """A run stopped by Ctrl-C: (workdir, the process, its output, step)."""
  workdir = tmp_path_factory.mktemp('cli') / 'run'
  proc = subprocess.Popen(
    _command(workdir, compilation_cache_dir, '--config.train.num_steps=5000'),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline and proc.poll() is None:
    if len(_logged_steps(workdir / 'metrics.jsonl')) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=TIMEOUT_S)
  steps = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  return workdir, proc, out, err, max(steps, default=None)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(interrupted):
  _, proc, out, err, step = interrupted
  assert proc.returncode == 130, out[-3000:] + err[-3000:]
  assert step is not None and 3 <= step < 5000
  assert f'Stopped by Ctrl-C (SIGINT) at step {step}; checkpoint saved' in out
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err


def test_rerun_with_another_lr_is_refused_naming_it(
  interrupted, compilation_cache_dir
):
  workdir, _, _, _, step = interrupted
  before = sorted(os.listdir(workdir / 'configs'))
  proc = _run(
    workdir,
    compilation_cache_dir,
    '--config.train.num_steps=5000',
    '--config.optimizer.lr=0.3',
  )
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'optimizer.lr: 0.1 -> 0.3' in proc.stderr
  assert f'at step {step}' in proc.stderr
  assert '--allow_config_change' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert len(proc.stderr.splitlines()) <= 8, proc.stderr
  assert sorted(os.listdir(workdir / 'configs')) == before


def test_rerun_resumes_where_ctrl_c_stopped(interrupted, compilation_cache_dir):
  workdir, _, _, _, step = interrupted
  # A shorter run length is allowed on resume (and recorded).
  end = step + 2
  proc = _run(workdir, compilation_cache_dir, f'--config.train.num_steps={end}')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f'Resuming from {workdir}/checkpoints at step {step}.' in proc.stdout
  assert f'Final eval at step {end}' in proc.stdout
  steps = _logged_steps(workdir / 'metrics.jsonl')
  train_steps = [s for s in steps if s <= end]
  assert sorted(set(train_steps)) == list(range(1, end + 1))
  assert steps.count(end) == 2  # Its train record and the final eval.
  segments = sorted(os.listdir(workdir / 'configs'))
  assert segments[-1] == f'segment_001_step_{step}.json'
  with open(workdir / 'configs' / segments[-1]) as f:
    assert json.load(f)['changes'] == [f'train.num_steps: 5000 -> {end}']
