"""experiments/benchmark_input.py: the data it builds, reused or removed.

A --workdir keeps its dataset for the next run, which must not time data
built with other settings; a run without one must leave nothing behind.
The runs here time only the in-memory 'digits' pipeline, one batch.
"""

import json
import os
import subprocess
import sys

QUICK = ('--pipelines=digits', '--num_batches=1', '--batch_size=8')


def _run(*args, env=None):
  return subprocess.run(
    [sys.executable, '-m', 'experiments.benchmark_input', *QUICK, *args],
    capture_output=True, text=True, check=False, timeout=300,
    env=env,
  )  # fmt: skip


def _built_with(workdir, **settings):
  """A workdir as an earlier run left it: its record and a prepared split."""
  os.makedirs(workdir / 'data' / 'imagenet2012')
  record = {'num_images': 96, 'quality': 95, 'noise': 10.0, **settings}
  (workdir / 'bench_input_build.json').write_text(json.dumps(record))
  return workdir


def test_a_workdir_built_with_other_settings_is_refused(tmp_path):
  # Before, --num_images=24 timed the 96 images built earlier.
  workdir = _built_with(tmp_path / 'w')
  proc = _run(f'--workdir={workdir}', '--num_images=24')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[0] == (
    f'Error: --workdir={workdir} holds a dataset built with '
    '--num_images=96 --quality=95 --noise=10.0; pass those, or another '
    '--workdir for these settings.'
  )
  assert 'pipeline:' not in proc.stdout
  other = _run(f'--workdir={workdir}', '--quality=80')
  assert other.returncode == 2 and '--quality=95' in other.stderr


def test_a_workdir_with_data_but_no_record_is_refused(tmp_path):
  workdir = tmp_path / 'w'
  os.makedirs(workdir / 'manual')
  proc = _run(f'--workdir={workdir}')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[0] == (
    f'Error: --workdir={workdir} holds a dataset (manual/) without a record '
    'of the settings it was built with; pass another --workdir.'
  )


def test_a_run_without_workdir_leaves_nothing_in_the_temp_folder(tmp_path):
  # Before, each run left a bench_input_* folder with its JPEGs behind.
  tmp = tmp_path / 'tmp'
  tmp.mkdir()
  proc = _run('--num_images=8', env={**os.environ, 'TMPDIR': str(tmp)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'digits            pipeline:' in proc.stdout
  assert list(tmp.iterdir()) == []


def test_a_workdir_records_its_settings_and_is_reused(tmp_path):
  workdir = tmp_path / 'w'
  proc = _run(f'--workdir={workdir}', '--num_images=8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads((workdir / 'bench_input_build.json').read_text())
  assert record == {'num_images': 8, 'quality': 95, 'noise': 10.0}
  assert (workdir / 'data' / 'imagenet2012').is_dir()
  again = _run(f'--workdir={workdir}', '--num_images=8')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Wrote 8 JPEGs' in proc.stdout and 'Wrote' not in again.stdout
