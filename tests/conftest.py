"""Shared pytest setup: quiet TensorFlow, keep JAX on the CPU, float32."""

import os

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


@pytest.fixture(scope='session')
def compilation_cache_dir(tmp_path_factory):
  """One persistent XLA compilation cache for all training runs of a session.

  The training tests compile the same programs (the tiny NFNet's init, train
  and eval steps for a device count and a schedule) several times, in this
  process and in subprocesses of `tests/train_harness.py`. Compiling
  dominates their cost, and JAX's cache key is the program and the compiler
  options (`--xla_force_host_platform_device_count` excluded), so every run
  after the first loads the executables from here. pytest-xdist workers
  share the directory (a half-written entry is a cache miss, not an error).
  """
  if os.environ.get('PYTEST_XDIST_WORKER'):
    path = tmp_path_factory.getbasetemp().parent / 'xla_cache'
    path.mkdir(exist_ok=True)
    return str(path)
  return str(tmp_path_factory.mktemp('xla_cache'))
