"""scripts/gpu_checks.sh and scripts/gpu_benchmark.sh, with a stand-in Python.

PYTHON names a stub that records where it ran and exits 0, so the scripts'
own logic runs here without a GPU: they run from the repository root
wherever they are called from, take a relative results folder from the
caller, and gpu_checks.sh deletes its end-to-end workdir only when it made
it.
"""

import os
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
CHECKS = os.path.join(ROOT, 'scripts', 'gpu_checks.sh')
BENCHMARK = os.path.join(ROOT, 'scripts', 'gpu_benchmark.sh')


@pytest.mark.parametrize('script', [CHECKS, BENCHMARK])
def test_the_scripts_parse(script):
  subprocess.run(['bash', '-n', script], check=True, timeout=60)


@pytest.fixture
def stub(tmp_path):
  """A PYTHON that appends its working directory and arguments to a log."""
  log = tmp_path / 'calls.log'
  path = tmp_path / 'python'
  path.write_text(f'#!/bin/sh\necho "$PWD $*" >> {log}\nexit 0\n')
  path.chmod(0o755)
  return path, log


def _run(script, cwd, env, *args):
  return subprocess.run(
    ['bash', script, *args], cwd=cwd, env={**os.environ, **env},
    capture_output=True, text=True, check=False, timeout=120,
  )  # fmt: skip


def test_gpu_checks_never_deletes_a_workdir_it_did_not_make(tmp_path, stub):
  python, log = stub
  run = tmp_path / 'real_run'
  run.mkdir()
  (run / 'config.json').write_text('{}')  # Someone's training run.
  env = {'PYTHON': str(python), 'CHECKS': 'e2e', 'E2E_WORKDIR': str(run)}
  proc = _run(CHECKS, tmp_path, env, 'out')
  assert proc.returncode == 1
  assert (run / 'config.json').read_text() == '{}'
  assert 'e2e: skipped: E2E_WORKDIR=' in proc.stdout
  assert 'set E2E_WORKDIR to a new folder' in proc.stdout
  assert not log.exists()  # Nothing of the check ran.


def test_gpu_checks_reuses_its_own_workdir_from_the_repo_root(tmp_path, stub):
  python, log = stub
  e2e = tmp_path / 'e2e'
  env = {'PYTHON': str(python), 'CHECKS': 'e2e', 'E2E_WORKDIR': 'e2e'}
  for _ in range(2):  # The second run replaces what the first made.
    proc = _run(CHECKS, tmp_path, env, 'out')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.listdir(e2e) == ['.gpu_checks_e2e']
  calls = log.read_text().splitlines()
  assert calls and all(line.startswith(f'{ROOT} ') for line in calls)
  # Relative paths were the caller's: results and workdir under tmp_path.
  assert f'--workdir={e2e} ' in calls[1]
  assert (tmp_path / 'out' / 'e2e_train.log').is_file()


def test_gpu_benchmark_runs_from_the_repo_root(tmp_path, stub):
  python, log = stub
  env = {'PYTHON': str(python), 'LIMIT_S': '30'}
  proc = _run(BENCHMARK, tmp_path, env, 'out', 'F0')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (call,) = log.read_text().splitlines()
  assert call.startswith(f'{ROOT} -m experiments.benchmark')
  assert f'--json_out={tmp_path}/out/F0.json' in call
  assert (tmp_path / 'out' / 'F0.log').is_file()
