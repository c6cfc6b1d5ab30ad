"""Tests of the pretrained-weights scripts: the download and the timm check.

The download runs with a stand-in `curl` first on PATH that records each
URL and writes a small file, so no test touches the network; what is
checked is which variants and folder the arguments select.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
DOWNLOAD = os.path.join(ROOT, 'scripts', 'download_pretrained.sh')
URL = 'https://storage.googleapis.com/dm-nfnets'


@pytest.fixture
def download(tmp_path):
  """Runs the download script in tmp_path; returns (proc, fetched URLs)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'fetched.txt'
  curl = bin_dir / 'curl'
  curl.write_text(
    '#!/usr/bin/env bash\n'
    'while [[ $# -gt 0 ]]; do case "$1" in\n'
    '  -o) out="$2"; shift 2 ;; -*) shift ;; *) url="$1"; shift ;;\n'
    'esac; done\n'
    f'echo "$url" >> {log}\n'
    'echo weights > "$out"\n'
  )
  curl.chmod(0o755)
  work = tmp_path / 'work'
  work.mkdir()

  def run(*args):
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}')
    proc = subprocess.run(
      ['bash', DOWNLOAD, *args], cwd=work, env=env, capture_output=True,
      text=True, timeout=60,
    )  # fmt: skip
    fetched = log.read_text().split() if log.exists() else []
    return proc, fetched, sorted(os.listdir(work))

  return run


def test_variants_and_one_folder_are_downloaded(download):
  proc, fetched, made = download('F2', 'f3', 'weights')
  assert proc.returncode == 0, proc.stderr
  assert fetched == [f'{URL}/F2_haiku.npz', f'{URL}/F3_haiku.npz']
  assert made == ['weights']
  proc, fetched, made = download()
  assert fetched[2:] == [f'{URL}/F0_haiku.npz'] and 'pretrained' in made


@pytest.mark.parametrize(
  'args, says',
  [
    # 'F8' was taken for the destination, and F0 downloaded into it.
    (('F8',), 'No released weights for F8: DeepMind published F0-F6.'),
    (('f10', 'out'), 'No released weights for f10'),
    (('F0+',), 'No released weights for F0+'),
    # 'a' was dropped silently, 'b' taken for the folder.
    (('F1', 'a', 'b'), 'Two destination folders, a and b: pass one.'),
    (('--dest=x',), 'Unknown option --dest=x.'),
  ],
)
def test_other_arguments_are_refused_before_downloading(download, args, says):
  proc, fetched, made = download(*args)
  assert proc.returncode == 2
  lines = proc.stderr.splitlines()
  assert lines[0].startswith(says)
  assert lines[1].startswith('Usage: ') and '[F0-F6 ...] [DEST_DIR]' in lines[1]
  assert fetched == [] and made == []


def test_timm_parity_check_without_timm_says_what_to_install():
  try:
    import timm  # noqa: F401, PLC0415
    import torch  # noqa: F401, PLC0415

    pytest.skip('torch and timm are installed here')
  except ImportError:
    pass
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'scripts', 'check_timm_parity.py')],
    cwd=ROOT, capture_output=True, text=True, timeout=120,
    env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'),
  )  # fmt: skip
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith('Error: this check needs torch and timm (')
  assert 'pip install torch timm' in line
