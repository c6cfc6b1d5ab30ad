"""Tests for research.sweep_tables: results.csv, .md and .png, written whole."""

import csv
import os

import pytest

from nfnets.research import sweep as sweep_lib
from nfnets.research import sweep_tables

BASE = 'configs/quickstart.py'


class _DepthTrain:
  """A train_fn whose 'eval/top1' is the sum of the model's depths / 10."""

  preempted = False

  def __call__(self, config, workdir):
    self.metrics = {'eval/top1': sum(config.model.kwargs.depth) / 10}
    return self


def test_list_valued_axes_are_tabulated(tmp_path):
  # Lists were unhashable: a TypeError after the first point trained.
  sweep = sweep_lib.Sweep(
    name='depths',
    base_config=BASE,
    axes=(
      ('optimizer.lr', [0.1, 0.2]),
      ('model.kwargs.depth', ([1, 1, 1, 1], [1, 2, 1, 1])),
    ),
    metrics=('eval/top1',),
    labels={'model.kwargs.depth': {(1, 2, 1, 1): 'deeper'}},
  )
  rows = sweep_lib.run_sweep(
    sweep, str(tmp_path), train_fn=_DepthTrain(), log=lambda *_: None
  )
  assert [r['eval/top1'] for r in rows] == [0.4, 0.5, 0.4, 0.5]
  markdown = (tmp_path / 'results.md').read_text()
  assert '| optimizer.lr \\ model.kwargs.depth | 1x1x1x1 | deeper |' in markdown
  assert '| 0.2 | 0.4000 | 0.5000 |' in markdown
  with open(tmp_path / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert table[1]['model.kwargs.depth'] == '(1, 2, 1, 1)'
  assert os.path.getsize(tmp_path / 'results.png') > 1000
  assert sorted(os.listdir(tmp_path / 'lr=0.2,depth=1x2x1x1')) == [
    'sweep_result.json'
  ]


def test_a_table_that_cannot_be_made_replaces_nothing(tmp_path):
  # results.md was opened for writing first: an error left it empty.
  sweep = sweep_lib.Sweep(
    name='s',
    base_config='',
    axes=(('a.x', (1, 2)),),
    metrics=('m',),
    plot_metric='m',
  )
  good = [{'a.x': 1, 'status': 'ok', 'seconds': 1.0, 'm': 0.5}]
  sweep_tables.write_results(sweep, good, str(tmp_path))
  before = {
    name: (tmp_path / name).read_bytes()
    for name in ('results.csv', 'results.md', 'results.png')
  }
  bad = [*good, {'a.x': 2, 'status': 'ok', 'seconds': 1.0}]  # No 'm'.
  with pytest.raises(KeyError):
    sweep_tables.write_results(sweep, bad, str(tmp_path))
  after = {name: (tmp_path / name).read_bytes() for name in before}
  assert after == before
  assert sorted(os.listdir(tmp_path)) == sorted(before)  # No temp files.
