"""Tests for nfnets.train.runtime: freed memory is reused, not re-faulted."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from nfnets.train import runtime

# Applies the settings as programs do (for the CPU backend), then mallocs,
# writes and frees a 64 MB block twice; prints the minor page faults of the
# second round. Without the settings glibc maps a fresh block
# (16,384 faults of 4 KiB); with them the freed block is reused.
_PROBE = textwrap.dedent(
  """
  import ctypes, resource, sys
  from nfnets.train import runtime
  on = sys.argv[1] == 'on'
  applied = runtime.keep_freed_memory_on_cpu() if on else None
  libc = ctypes.CDLL('libc.so.6')
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = (ctypes.c_void_p,)

  def touch():  # As XLA does with its temp buffer: malloc, write, free.
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)

  touch()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  touch()
  print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  """
)


def _second_round_faults(mode: str) -> tuple[str, int]:
  out = subprocess.run(
    [sys.executable, '-c', _PROBE, mode],
    capture_output=True, text=True, check=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},  # Also where a GPU is.
  ).stdout.split()  # fmt: skip
  return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_blocks_are_reused_not_faulted_in_again():
  _, faults_default = _second_round_faults('off')
  applied, faults_kept = _second_round_faults('on')
  assert applied == 'True'
  pages = (64 << 20) // 4096
  assert faults_default > pages // 2  # glibc mmaps a fresh block each time.
  assert faults_kept < pages // 100  # The same pages, already mapped.


@pytest.fixture
def set_platforms():
  """Sets `jax_platforms` (what `JAX_PLATFORMS` sets) for one test."""
  old = jax.config.jax_platforms
  yield lambda platforms: jax.config.update('jax_platforms', platforms)
  jax.config.update('jax_platforms', old)


@pytest.mark.parametrize(
  ('platforms', 'expected'),
  [('cpu', False), ('cuda', True), ('tpu', True), ('cuda,cpu', True)],
)
def test_explicit_platforms_decide_the_backend(set_platforms, platforms,
                                               expected):  # fmt: skip
  set_platforms(platforms)
  assert runtime.accelerator_expected() == expected


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
  """A `jax_plugins` namespace package holding one (unimported) plugin."""
  package = tmp_path / 'site' / 'jax_plugins' / 'xla_fake_gpu'
  package.mkdir(parents=True)
  (package / '__init__.py').write_text('')
  monkeypatch.syspath_prepend(str(tmp_path / 'site'))
  saved = sys.modules.pop('jax_plugins', None)  # Found again, with the fake.
  yield
  sys.modules.pop('jax_plugins', None)
  if saved is not None:
    sys.modules['jax_plugins'] = saved


def test_a_plugin_counts_only_with_its_device_present(
  tmp_path, fake_plugin, set_platforms
):
  set_platforms(None)
  dev = tmp_path / 'dev'
  dev.mkdir()
  assert not runtime.accelerator_expected(str(dev))  # Plugin, no device.
  (dev / 'nvidiactl').touch()
  assert runtime.accelerator_expected(str(dev))


def test_a_device_without_a_plugin_is_not_used_by_jax(tmp_path, set_platforms):
  set_platforms(None)
  if runtime._accelerator_plugin_installed():
    pytest.skip('an accelerator plugin is installed here')
  (tmp_path / 'nvidiactl').touch()
  assert not runtime.accelerator_expected(str(tmp_path))


def test_settings_are_skipped_when_an_accelerator_is_expected(set_platforms):
  set_platforms('cuda')
  assert runtime.keep_freed_memory_on_cpu() is False
