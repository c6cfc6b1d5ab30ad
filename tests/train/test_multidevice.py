"""Data parallelism and preemption, each run in its own process.

The device count is fixed when JAX starts, so every run here is a
subprocess of `tests/support/train_harness.py` with its own
`--xla_force_host_platform_device_count` (never set for the test process).
All runs train the same tiny NFNet (dropout and stochastic depth on) with
the same global batch, so the losses and parameters must agree up to float
reassociation in the cross-device sums.

Compiling dominates each run, so the runs share the session's compilation
cache, and the 1-device and 8-device runs are made once (module fixtures)
and serve both as each other's reference and as the single-process
reference of the 2-process run.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HARNESS = os.path.join(REPO, 'tests', 'support', 'train_harness.py')
TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return env


def _command(workdir, out, devices, cache_dir, *extra):
  return [
    sys.executable,
    HARNESS,
    f'--devices={devices}',
    f'--workdir={workdir}',
    f'--out={out}',
    f'--cache_dir={cache_dir}',
    *extra,
  ]


def _run(tmp_path, name, devices, cache_dir, *extra):
  """Runs the harness to the end; returns (its --out arrays, its stdout)."""
  workdir, out = tmp_path / name, tmp_path / f'{name}.npz'
  proc = subprocess.run(
    _command(workdir, out, devices, cache_dir, *extra),
    env=_env(),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return dict(np.load(out)), proc.stdout


def _params(result):
  return {k: v for k, v in result.items() if k.startswith('params/')}


def _assert_same_run(a, b, rtol=2e-4, atol=2e-6):
  assert a['losses'].shape == b['losses'].shape == (6,)
  np.testing.assert_allclose(a['losses'], b['losses'], rtol=rtol)
  pa, pb = _params(a), _params(b)
  assert sorted(pa) == sorted(pb)
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], rtol=rtol, atol=atol, err_msg=k)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def one_device(tmp_path_factory, compilation_cache_dir):
  """The default harness run on 1 device: (arrays, stdout)."""
  tmp_path = tmp_path_factory.mktemp('one_device')
  return _run(tmp_path, 'one', 1, compilation_cache_dir)


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory, compilation_cache_dir):
  """The default harness run on 8 devices in 1 process: (arrays, stdout).

  The arrays also hold the run's 'workdir'.
  """
  tmp_path = tmp_path_factory.mktemp('eight_devices')
  arrays, stdout = _run(tmp_path, 'eight', 8, compilation_cache_dir)
  arrays['workdir'] = str(tmp_path / 'eight')
  return arrays, stdout


def test_8_devices_match_1_device(one_device, eight_devices):
  one, _ = one_device
  eight, stdout = eight_devices
  assert '8 device(s) in 1 process(es)' in stdout
  _assert_same_run(one, eight)
  # The update really moved the params (the comparison is not vacuous).
  assert not np.allclose(one['losses'][0], one['losses'][-1], rtol=1e-4)
  assert 'BAD_BATCH_ERROR:' in stdout
  assert 'not divisible by the number of devices (8)' in stdout


@pytest.mark.parametrize('devices', [1, 2])
def test_evaluate_restores_an_8_device_run_on_fewer_devices(
  eight_devices, compilation_cache_dir, devices
):
  """`experiments.evaluate --workdir` alone, on 1 and 2 devices.

  The reference is the run's own final eval on 8 devices: the restored
  params are the same, so is top-1 (the eval sums differ only in order).
  """
  run, _ = eight_devices
  env = _env()
  env['XLA_FLAGS'] = ' '.join(
    [
      env.get('XLA_FLAGS', ''),
      f'--xla_force_host_platform_device_count={devices}',
    ]
  )
  env['JAX_COMPILATION_CACHE_DIR'] = compilation_cache_dir
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.evaluate',
      f'--workdir={run["workdir"]}',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'Topology' not in proc.stderr and 'delete' not in proc.stderr
  line = next(ln for ln in proc.stdout.splitlines() if ln.startswith('eval:'))
  top1 = float(line.split('top-1 ')[1].split('%')[0]) / 100
  assert top1 == pytest.approx(float(run['eval_top1']), abs=1e-4)


def test_batchnorm_statistics_are_over_the_global_batch(
  tmp_path, compilation_cache_dir
):
  """A BN train step on 8 devices equals the 1-device step (sync BN)."""
  run, _ = _run(tmp_path, 'bn', 8, compilation_cache_dir, '--bn_step_check')
  names = sorted(k.split('/', 1)[1] for k in run if k.startswith('single/'))
  assert any('mean_ema' in k for k in names)
  for name in names:
    np.testing.assert_allclose(
      run[f'sharded/{name}'], run[f'single/{name}'], rtol=2e-5, atol=1e-6,
      err_msg=name,
    )  # fmt: skip
  # Statistics of one device's rows alone differ: the test is not vacuous.
  mean = 'state/batch_norm/~/mean_ema/average'
  assert not np.allclose(run[f'sharded/{mean}'], run[f'local/{mean}'])


def test_2_processes_match_1_process(
  tmp_path, compilation_cache_dir, eight_devices
):
  # 2 processes of 4 devices against 1 process of 8 (the same mesh size).
  # 'slice': every host builds the same global batches and keeps its rows,
  # so the data does not depend on the number of processes (with one
  # process, 'slice' and the default 'shard' read the same batches).
  port = _free_port()
  procs = [
    subprocess.Popen(
      _command(
        tmp_path / 'multi',
        tmp_path / 'multi.npz',
        4,
        compilation_cache_dir,
        '--num_processes=2',
        f'--process_id={i}',
        f'--port={port}',
        '--set=train.host_input=slice',
      ),
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-5000:]
  assert '8 device(s) in 2 process(es)' in outputs[0]
  multi = dict(np.load(tmp_path / 'multi.npz'))
  single, _ = eight_devices
  _assert_same_run(single, multi)
  np.testing.assert_allclose(single['eval_top1'], multi['eval_top1'])


def _wait_for_step(metrics_path, step, proc, deadline):
  while time.time() < deadline:
    if proc.poll() is not None:
      return False
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        if any(f'"step": {step},' in line for line in f):
          return True
    time.sleep(0.05)
  return False


def test_sigterm_then_resume_matches_uninterrupted_run(
  tmp_path, compilation_cache_dir
):
  cache_dir = compilation_cache_dir
  # 'skip' replays the data order after a restart, so the resumed run sees
  # exactly the batches the uninterrupted one did.
  steps = ['--set=train.num_steps=60', '--set=train.data_resume="skip"']
  full, _ = _run(tmp_path, 'full', 1, cache_dir, *steps)
  workdir = tmp_path / 'preempted'
  proc = subprocess.Popen(
    _command(workdir, tmp_path / 'first.npz', 1, cache_dir, *steps),
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  reached = _wait_for_step(
    workdir / 'metrics.jsonl', 3, proc, time.time() + TIMEOUT_S
  )
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=TIMEOUT_S)[0]
  assert reached and proc.returncode == 0, out[-5000:]
  first = dict(np.load(tmp_path / 'first.npz'))
  assert first['preempted'] and 3 <= int(first['step']) < 60, out[-3000:]
  assert 'Stopped by SIGTERM' in out
  resumed, stdout = _run(tmp_path, 'preempted', 1, cache_dir, *steps)
  assert f'Resuming from {workdir}/checkpoints at step {first["step"]}' in (
    stdout
  )
  assert int(resumed['step']) == 60
  for k, v in _params(full).items():
    np.testing.assert_array_equal(resumed[k], v, err_msg=k)
