"""The small benchmark scripts refuse counts that mean nothing.

scripts/bench_depthwise.py, scripts/write_synthetic_folder.py and
scripts/bench_timm.py: a count of 0 (or below) divided by zero after the
work, printed 0 ms rows, or wrote "-96 JPEGs" after making folders; each
is now an argparse error (exit 2) before anything runs. bench_timm parses
its flags before it imports torch, so this runs without it.
"""

import os
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), '..', '..', 'scripts')


def _refused(script, *args):
  proc = subprocess.run(
    [sys.executable, os.path.join(SCRIPTS, script), *args],
    capture_output=True, text=True, check=False, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
  assert 'Traceback' not in proc.stderr
  return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
  'script, flag, error',
  [
    ('bench_depthwise.py', '--repeats=0', 'pass at least 1, got 0'),
    ('bench_depthwise.py', '--batch=0', 'pass at least 1, got 0'),
    ('bench_timm.py', '--steps=0', 'pass at least 1, got 0'),
    ('bench_timm.py', '--batch_size=0', 'pass at least 1, got 0'),
    ('bench_timm.py', '--warmup=-1', 'pass at least 0, got -1'),
    ('bench_timm.py', '--forward_steps=two', "'two' is not an integer"),
  ],
)
def test_counts_out_of_range_are_refused(script, flag, error):
  name = flag.split('=')[0]
  assert _refused(script, flag).endswith(f'argument {name}: {error}')


@pytest.mark.parametrize(
  'flag, error',
  [
    ('--classes=0', 'argument --classes: pass at least 1, got 0'),
    ('--classes=-3', 'argument --classes: pass at least 1, got -3'),
    ('--train_per_class=0', 'argument --train_per_class: pass at least 1'),
    ('--quality=101', 'argument --quality: pass 1 to 100, got 101'),
  ],
)
def test_write_synthetic_folder_refuses_before_making_folders(
  tmp_path, flag, error
):
  out = tmp_path / 'synth'
  line = _refused('write_synthetic_folder.py', f'--out={out}', flag)
  assert error in line
  assert not out.exists()
