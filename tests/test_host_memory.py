"""Tests for nfnets.host_memory: freed memory is reused, not re-faulted."""

import subprocess
import sys
import textwrap

import pytest

# Mallocs, writes and frees a 64 MB block twice; prints the minor page
# faults of the second round. Without the settings glibc maps a fresh block
# (16,384 faults of 4 KiB); with them the freed block is reused.
_PROBE = textwrap.dedent(
  """
  import ctypes, resource, sys
  from nfnets import host_memory
  applied = host_memory.keep_freed_memory() if sys.argv[1] == 'on' else None
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
