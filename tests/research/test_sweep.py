"""Tests for research.sweep: a real 2x2 sweep, reruns, refusals, failures.

The grid (`sweep_spec`), one point's workdir (`sweep_point`), the tables
and the launch lines have their own test files.
"""

import csv
import dataclasses
import json
import logging
import math
import os

import jax
import pytest

from nfnets.research import sweep as sweep_lib
from nfnets.train import provenance

SWEEP_FILE = 'configs/sweeps/agc_ablation.py'

# Shrinks the AGC ablation's base config to seconds per point.
TINY = {
  'model.kwargs.width': 0.25,
  'train.num_steps': 3,
  'optimizer.warmup_epochs': 0.0,
  'train.log_every_steps': 1,
  'eval.batch_size': 128,
}


@pytest.fixture(scope='module')
def ablation():
  return sweep_lib.load_sweep(SWEEP_FILE)


def test_ablation_file_defines_the_grid(ablation):
  points = sweep_lib.expand(ablation)
  assert len(points) == 8  # 4 clipping thresholds x 2 batch sizes.
  assert points[0].overrides == {
    'optimizer.clipping': 0.0,
    'train.batch_size': 64,
  }
  assert points[1].name == 'clipping=0,batch_size=256'  # Last axis fastest.
  configured = sweep_lib.point_configs(ablation)
  config = configured[-1][1]
  assert config.optimizer.clipping == 0.16 and config.train.batch_size == 256
  assert config.model.name == 'NF_ResNet'


def test_overrides_copy_and_reject_unknown_keys(ablation):
  base = sweep_lib.load_config(ablation.base_config)
  new = sweep_lib.apply_overrides(base, {'optimizer.lr': 0.5})
  assert new.optimizer.lr == 0.5 and base.optimizer.lr == 1.6
  # ValueErrors: the CLI's one-line error (exit 2), before any point trains.
  with pytest.raises(ValueError, match='clipping'):
    sweep_lib.apply_overrides(base, {'optimizer.cliping': 0.1})
  with pytest.raises(ValueError, match='optimizer'):
    sweep_lib.apply_overrides(base, {'optimiser.lr': 0.1})
  with pytest.raises(ValueError, match="'optimizer.lr'"):
    sweep_lib.apply_overrides(base, {'optimizer.lr': 'fast'})


def test_launch_lines(ablation):
  lines = sweep_lib.launch_lines(ablation, 'runs/agc')
  assert len(lines) == 8
  assert lines[3] == (
    'python -m experiments.train --config=configs/sweeps/agc_ablation.py '
    '--workdir=runs/agc/clipping=0.01,batch_size=256 '
    '--config.optimizer.clipping=0.01 --config.train.batch_size=256'
  )


@pytest.fixture
def cache_log(caplog):
  """Persistent-cache hits and misses by module name, for every compile."""
  key = 'jax_persistent_cache_min_compile_time_secs'
  before = getattr(jax.config, key)
  jax.config.update(key, 0.0)  # However fast the tiny step compiles.
  caplog.set_level(logging.DEBUG, logger='jax._src.compiler')
  yield caplog
  jax.config.update(key, before)


def _cache_events(caplog, module: str) -> tuple[int, int]:
  messages = [r.getMessage() for r in caplog.records]
  hits = sum(f"cache hit for '{module}'" in m for m in messages)
  misses = sum(f"CACHE MISS for '{module}'" in m for m in messages)
  return hits, misses


def test_two_by_two_sweep_end_to_end(
  tmp_path, ablation, compilation_cache_dir, cache_log, capsys
):
  # The optimizer's numbers are inputs of the train step, so with the
  # persistent compilation cache (on by default; here the session's, not the
  # user's ~/.cache) the four points compile the step at most once.
  tiny = sweep_lib.Sweep(
    name='tiny',
    base_config=ablation.base_config,
    overrides={
      **TINY,
      'train.batch_size': 16,
      'train.compilation_cache_dir': compilation_cache_dir,
      'checkpoint.enabled': True,  # The final step's, for a resume.
    },
    axes=(('optimizer.lr', (0.4, 0.8)), ('optimizer.clipping', (0.02, 0.04))),
    metrics=('eval/top1', 'train/loss'),
    labels={'optimizer.lr': {0.4: 'low'}},
  )
  rows = sweep_lib.run_sweep(tiny, str(tmp_path), log=lambda *_: None)
  assert [r['status'] for r in rows] == ['ok'] * 4
  for row in rows:
    assert 0.0 <= row['eval/top1'] <= 1.0
    assert math.isfinite(row['train/loss'])
  # Each point trained in its own workdir, which holds its result.
  with open(tmp_path / 'lr=0.8,clipping=0.04' / 'sweep_result.json') as f:
    assert json.load(f)['metrics']['eval/top1'] == rows[3]['eval/top1']
  with open(tmp_path / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [(r['optimizer.lr'], r['optimizer.clipping']) for r in table] == [
    ('0.4', '0.02'),
    ('0.4', '0.04'),
    ('0.8', '0.02'),
    ('0.8', '0.04'),
  ]
  # Different LRs give different runs, from one compiled train step.
  assert rows[0]['train/loss'] != rows[2]['train/loss']
  hits, misses = _cache_events(cache_log, 'jit_step')
  assert misses <= 1 and hits + misses == 4, (hits, misses)
  # The trainer tells which points loaded their step from the cache.
  printed = capsys.readouterr().out
  assert printed.count('came from the persistent compilation cache') == hits
  markdown = (tmp_path / 'results.md').read_text()
  assert '| optimizer.lr \\ optimizer.clipping | 0.02 | 0.04 |' in markdown
  row0 = f'| low | {rows[0]["eval/top1"]:.4f} | {rows[1]["eval/top1"]:.4f} |'
  assert row0 in markdown
  assert os.path.getsize(tmp_path / 'results.png') > 1000
  # Rerunning finds every result and trains nothing.
  again = sweep_lib.run_sweep(
    tiny, str(tmp_path), train_fn=_must_not_train, log=lambda *_: None
  )
  assert again == rows
  # A point stopped after its last checkpoint (Ctrl-C in the final eval),
  # or trained by a --launch line, resumes at its final step: it trains
  # nothing, and its train metrics are the ones its run logged.
  os.remove(tmp_path / 'lr=0.8,clipping=0.04' / 'sweep_result.json')
  again = sweep_lib.run_sweep(tiny, str(tmp_path), log=lambda *_: None)
  assert 'Nothing to train' in capsys.readouterr().out
  assert again[3]['train/loss'] == rows[3]['train/loss']
  assert again[3]['eval/top1'] == rows[3]['eval/top1']


def _must_not_train(config, workdir):
  raise AssertionError(f'{workdir} was trained again.')


def test_markdown_marks_diverged_points():
  sweep = sweep_lib.Sweep(
    name='s',
    base_config='',
    axes=(('a.x', (1, 2)), ('a.y', (3,))),
    metrics=('eval/top1',),
  )
  rows = [
    {'a.x': 1, 'a.y': 3, 'status': 'ok', 'seconds': 1.0, 'eval/top1': 0.5},
    {
      'a.x': 2,
      'a.y': 3,
      'status': 'diverged',
      'seconds': 1.0,
      'eval/top1': math.nan,
    },
  ]
  text = sweep_lib.markdown_table(sweep, rows)
  assert '| 1 | 0.5000 |' in text
  assert '| 2 | diverged |' in text


class _FakeTrain:
  """A train_fn that fails on the workdirs in `failing` and counts calls."""

  def __init__(self, failing=()):
    self.failing, self.trained = set(failing), []

  def __call__(self, config, workdir):
    self.trained.append(os.path.basename(workdir))
    if os.path.basename(workdir) in self.failing:
      raise FileNotFoundError(f'no folder {config.optimizer.lr}')
    return _FakeResult(metrics={'eval/top1': config.optimizer.lr})


class _FakeResult:
  preempted = False

  def __init__(self, metrics):
    self.metrics = metrics


def test_failed_points_are_reported_and_retried(tmp_path, ablation):
  base = sweep_lib.load_config(ablation.base_config)
  sweep = sweep_lib.Sweep(
    name='s',
    base_config='',
    axes=(('optimizer.lr', (0.1, 0.2, 0.3)),),
    metrics=('eval/top1',),
  )
  names = [p.name for p in sweep_lib.expand(sweep)]
  first = _FakeTrain(failing=names[1:])
  rows = sweep_lib.run_sweep(
    sweep, str(tmp_path), base=base, train_fn=first, log=lambda *_: None
  )
  assert [r['status'] for r in rows] == ['ok', 'failed', 'failed']
  assert (
    'FileNotFoundError' in (tmp_path / names[1] / 'sweep_error.log').read_text()
  )
  summary = sweep_lib.failed_summary(sweep, rows, str(tmp_path))
  assert summary.startswith(
    f'2 of 3 sweep points failed: {names[1]}, {names[2]}'
  )
  assert os.path.join(str(tmp_path), '<point>', 'sweep_error.log') in summary
  # The rerun retries only the failed points; the finished one is kept.
  second = _FakeTrain(failing=names[2:])
  rows = sweep_lib.run_sweep(
    sweep, str(tmp_path), base=base, train_fn=second, log=lambda *_: None
  )
  assert second.trained == names[1:]
  assert [r['status'] for r in rows] == ['ok', 'ok', 'failed']
  assert rows[1]['eval/top1'] == 0.2
  assert not (tmp_path / names[1] / 'sweep_error.log').exists()
  summary = sweep_lib.failed_summary(sweep, rows, str(tmp_path))
  assert str(tmp_path / names[2] / 'sweep_error.log') in summary
  third = _FakeTrain()
  rows = sweep_lib.run_sweep(
    sweep, str(tmp_path), base=base, train_fn=third, log=lambda *_: None
  )
  assert third.trained == names[2:]
  assert sweep_lib.failed_summary(sweep, rows, str(tmp_path)) is None


class _RecordingTrain(_FakeTrain):
  """A `_FakeTrain` that records its config as the trainer does."""

  def __call__(self, config, workdir):
    provenance.write_segment(
      workdir, config, start_step=0, changes=[], num_devices=1
    )
    return super().__call__(config, workdir)


def test_a_changed_sweep_file_is_refused_not_tabulated(tmp_path, ablation):
  # Point names encode only the axis values: an edited base config used to
  # skip the finished points and show their old results as the new ones.
  base = sweep_lib.load_config(ablation.base_config)
  sweep = sweep_lib.Sweep(
    name='s',
    base_config='',
    axes=(('optimizer.lr', (0.1, 0.2)),),
    metrics=('eval/top1',),
  )
  quiet = {'log': lambda *_: None}
  sweep_lib.run_sweep(
    sweep, str(tmp_path), base=base, train_fn=_RecordingTrain(), **quiet
  )
  first = tmp_path / sweep_lib.expand(sweep)[0].name
  for key, old, value in (
    ('optimizer.weight_decay', base.optimizer.weight_decay, 1e-3),
    # A resume may extend a run, evaluate it otherwise, or ignore new
    # initial weights; a sweep point's result changes with each.
    ('train.num_steps', base.train.num_steps, 7),
    ('data.eval_image_size', 32, 48),
    ('eval.ema', False, True),
    ('model.init_from', '', 'runs/pretrained'),
  ):
    edited = dataclasses.replace(sweep, overrides={key: value})
    again = _RecordingTrain()
    with pytest.raises(ValueError) as error:
      sweep_lib.run_sweep(
        edited, str(tmp_path), base=base, train_fn=again, **quiet
      )
    assert str(error.value) == (
      f'{first} holds a run of another config than this sweep gives it:\n'
      f'  {key}: {old!r} -> {value!r}\n'
      'The sweep file changed since that run: run it with another --outdir '
      '(the results there stay as they are), or undo the change.'
    )
    assert again.trained == []
  # What leaves a point's result alone is no change: the points are skipped.
  logging_only = dataclasses.replace(
    sweep,
    overrides={
      'train.log_every_steps': 5,
      'checkpoint.every_steps': 7,
      'data.num_threads': 1,
    },
  )
  again = _RecordingTrain()
  rows = sweep_lib.run_sweep(
    logging_only, str(tmp_path), base=base, train_fn=again, **quiet
  )
  assert again.trained == [] and [r['eval/top1'] for r in rows] == [0.1, 0.2]


def test_a_misspelt_metric_stops_the_sweep_after_its_first_point(
  tmp_path, ablation
):
  # It used to be a NaN column and exit status 0, after every point trained.
  base = sweep_lib.load_config(ablation.base_config)
  sweep = sweep_lib.Sweep(
    name='s',
    base_config='',
    axes=(('optimizer.lr', (0.1, 0.2)),),
    metrics=('eval/top1', 'eval/top-1'),
  )
  train = _FakeTrain()
  with pytest.raises(ValueError) as error:
    sweep_lib.run_sweep(
      sweep, str(tmp_path), base=base, train_fn=train, log=lambda *_: None
    )
  assert str(error.value) == (
    "Sweep metric(s) ['eval/top-1'] are not among those point lr=0.1 "
    "reported: ['eval/top1']. Fix metrics in the sweep file and rerun "
    '(finished points are kept).'
  )
  assert train.trained == ['lr=0.1']  # The second point did not train.
  # Fixed, the rerun keeps the first point's result and trains the second.
  fixed = dataclasses.replace(sweep, metrics=('eval/top1',))
  train = _FakeTrain()
  rows = sweep_lib.run_sweep(
    fixed, str(tmp_path), base=base, train_fn=train, log=lambda *_: None
  )
  assert train.trained == ['lr=0.2']
  assert [r['eval/top1'] for r in rows] == [0.1, 0.2]


class _OutOfMemoryAtLargeBatch(_RecordingTrain):
  """Records its config, then fails like XLA out of memory above batch 32."""

  def __call__(self, config, workdir):
    if config.train.batch_size > 32:
      provenance.write_segment(
        workdir, config, start_step=0, changes=[], num_devices=1
      )
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory')
    return super().__call__(config, workdir)


def test_a_failed_point_is_retried_after_the_sweep_file_is_fixed(
  tmp_path, ablation
):
  # The failure says 'Fix the cause and rerun'; the fix used to be refused
  # as 'a run of another config'.
  base = sweep_lib.load_config(ablation.base_config)
  sweep = sweep_lib.Sweep(
    name='s',
    base_config='',
    axes=(('optimizer.lr', (0.1,)),),
    overrides={'train.batch_size': 64},
    metrics=('eval/top1',),
  )
  quiet = {'base': base, 'log': lambda *_: None}
  rows = sweep_lib.run_sweep(
    sweep, str(tmp_path), train_fn=_OutOfMemoryAtLargeBatch(), **quiet
  )
  assert rows[0]['status'] == 'failed'
  workdir = tmp_path / 'lr=0.1'
  # Only the evaluation changed: retried in place (the run would resume).
  eval_only = dataclasses.replace(
    sweep, overrides={'train.batch_size': 64, 'eval.batch_size': 60}
  )
  rows = sweep_lib.run_sweep(
    eval_only, str(tmp_path), train_fn=_OutOfMemoryAtLargeBatch(), **quiet
  )
  assert rows[0]['status'] == 'failed'
  assert sorted(os.listdir(workdir)) == [
    'config.json', 'configs', 'sweep_error.log', 'sweep_result.json'
  ]  # fmt: skip
  fixed = dataclasses.replace(sweep, overrides={'train.batch_size': 16})
  train = _OutOfMemoryAtLargeBatch()
  rows = sweep_lib.run_sweep(fixed, str(tmp_path), train_fn=train, **quiet)
  assert train.trained == ['lr=0.1'] and rows[0]['status'] == 'ok'
  # The failed run of the other config is kept aside, not deleted.
  aside = workdir / 'failed_attempt_1'
  assert json.loads((aside / 'config.json').read_text())['train'] == {
    **json.loads((workdir / 'config.json').read_text())['train'],
    'batch_size': 64,
  }
  assert 'Out of memory' in (aside / 'sweep_error.log').read_text()
  assert len(os.listdir(aside / 'configs')) == 2  # Both failed segments.
  # The point is done now: an edit is refused again, not retried.
  with pytest.raises(ValueError, match='holds a run of another config'):
    sweep_lib.run_sweep(sweep, str(tmp_path), train_fn=train, **quiet)


def test_an_outdir_of_another_sweep_is_refused(tmp_path, ablation):
  # Its results.csv, .md and .png used to be overwritten without a word.
  base = sweep_lib.load_config(ablation.base_config)
  quiet = {'base': base, 'log': lambda *_: None, 'train_fn': _FakeTrain()}
  first = sweep_lib.Sweep(
    name='s',
    base_config='',
    axes=(('optimizer.lr', (0.1, 0.2)),),
    metrics=('eval/top1',),
  )
  sweep_lib.run_sweep(first, str(tmp_path), source='sweeps/lr.py', **quiet)
  table = (tmp_path / 'results.csv').read_text()
  other = dataclasses.replace(first, axes=(('optimizer.momentum', (0.8,)),))
  for sweep, source in ((other, 'sweeps/lr.py'), (first, 'sweeps/wd.py')):
    with pytest.raises(ValueError) as error:
      sweep_lib.run_sweep(sweep, str(tmp_path), source=source, **quiet)
    message = str(error.value)
    assert message.startswith(
      f"{tmp_path} holds the results of another sweep (file 'lr.py', axes "
      "['optimizer.lr']"
    )
    assert message.endswith('with another --outdir.')
    assert '\n' not in message
    assert (tmp_path / 'results.csv').read_text() == table
  # The same sweep with another value on its axis is that sweep, extended.
  extended = dataclasses.replace(first, axes=(('optimizer.lr', (0.1, 0.3)),))
  rows = sweep_lib.run_sweep(
    extended, str(tmp_path), source='other/place/lr.py', **quiet
  )
  assert [r['eval/top1'] for r in rows] == [0.1, 0.3]
