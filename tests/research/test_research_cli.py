"""The research command lines' flag checks: `experiments.spp` and
`scripts.agc_stability`.

Bad flags are a one-line error naming the flag (exit status 2) at flag
parsing, before any model is built; each command runs in a subprocess, as
a user runs it.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _run(module, *args):
  proc = subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  return proc.returncode, proc.stderr


@pytest.mark.parametrize(
  'args, message',
  [
    # 0 computed everything, then failed in the plot's log scale.
    (['--batch_size=0'], 'flag --batch_size=0: pass at least 1 (images in '),
    (['--image_size=-2'], 'flag --image_size=-2: pass at least 1 (pixels '),
    # It said 'Set folder_root', a name no flag has.
    (['--inputs=folder'], 'pass --folder_root=ROOT'),
  ],
)
def test_spp_flags(tmp_path, args, message):
  code, err = _run('experiments.spp', *args, f'--outdir={tmp_path}/spp')
  assert code == 2, err
  assert err.startswith('Error: flag') and message in err.splitlines()[0]
  assert not os.path.exists(tmp_path / 'spp')


@pytest.mark.parametrize(
  'args, message',
  [
    # max() of no losses, after the first compile.
    (['--steps=0'], 'flag --steps=0: pass at least 1 (training steps'),
    (['--lrs=fast'], "'fast' is not a number > 0."),
    (['--clippings=0,-0.1'], "'-0.1' is not a number >= 0."),
    (['--seeds=a'], "'a' is not an integer >= 0."),
    # A missing folder lost the finished study when it wrote --out.
    (['--out=/nonexistent/dir/study.json'], 'its folder /nonexistent/dir '),
  ],
)
def test_agc_stability_flags(args, message):
  code, err = _run('scripts.agc_stability', *args)
  assert code == 2, err
  assert err.startswith('Error: flag') and message in err.splitlines()[0]
  assert 'Traceback' not in err


def test_sweep_file_mistakes_are_one_line_errors(tmp_path):
  # A string of values was a grid over its letters ('s', 'g', 'd').
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(
    'from nfnets.research import sweep\n'
    'def get_sweep():\n'
    "  return sweep.Sweep(name='s', base_config='configs/quickstart.py',\n"
    "                     axes=(('optimizer.name', 'sgd'),))\n"
  )
  code, err = _run(
    'experiments.sweep', f'--sweep={sweep_file}', f'--outdir={tmp_path}/o'
  )
  assert code == 2, err
  assert err == (
    "Error: Sweep axis 'optimizer.name': its values must be a list or tuple, "
    "got str 'sgd'; write ('sgd',) for one value. (set NFNETS_TRACEBACK=1 to "
    'see the traceback)\n'
  )
