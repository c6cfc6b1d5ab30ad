"""Tests for research.sweep_spec: a sweep file's shape, its grid, its names.

Mistakes in a sweep file are one-line ValueErrors (the CLI's exit status 2)
when the sweep is made or expanded, before any point trains.
"""

import pytest

from nfnets.research import sweep_spec

QUICKSTART = 'configs/quickstart.py'


def _sweep(*axes, **kwargs):
  return sweep_spec.Sweep(name='s', base_config=QUICKSTART, axes=axes, **kwargs)


def test_distinct_floats_get_distinct_names():
  # '%g' named both 0.3 and 0.3000001 'lr=0.3': one workdir, one result.
  points = sweep_spec.expand(_sweep(('optimizer.lr', (0.3, 0.3000001))))
  assert [p.name for p in points] == ['lr=0.3', 'lr=0.3000001']
  assert [p.overrides['optimizer.lr'] for p in points] == [0.3, 0.3000001]
  # A float '%g' shows exactly keeps its short name (existing workdirs).
  points = sweep_spec.expand(_sweep(('optimizer.clipping', (0.0, 1e-05, 0.1))))
  assert [p.name for p in points] == [
    'clipping=0', 'clipping=1e-05', 'clipping=0.1'
  ]  # fmt: skip


def test_repeated_values_and_shared_workdirs_are_refused():
  with pytest.raises(ValueError) as error:
    sweep_spec.expand(_sweep(('optimizer.lr', (0.3, 0.3000001, 0.3))))
  assert str(error.value) == (
    "Sweep axis 'optimizer.lr' repeats the value 0.3: give each value once "
    '(a point is trained once).'
  )
  # Different values whose names coincide once made directory-safe.
  with pytest.raises(ValueError) as error:
    sweep_spec.expand(_sweep(('data.folder_root', ('/d/a b', '/d/a_b'))))
  assert str(error.value) == (
    "Sweep points {'data.folder_root': '/d/a b'} and {'data.folder_root': "
    "'/d/a_b'} would share the workdir 'folder_root=_d_a_b': make the "
    "values differ in letters, digits or '.,=+-'."
  )


def test_axis_values_must_be_a_list_or_tuple():
  # A string was a grid over its letters; a number a TypeError traceback.
  with pytest.raises(ValueError) as error:
    _sweep(('optimizer.name', 'sgd'))
  assert str(error.value) == (
    "Sweep axis 'optimizer.name': its values must be a list or tuple, got "
    "str 'sgd'; write ('sgd',) for one value."
  )
  with pytest.raises(ValueError, match=r"'optimizer.lr'.*write \(0.1,\)"):
    _sweep(('optimizer.lr', 0.1))
  with pytest.raises(ValueError, match='not a .dotted key, values. pair'):
    sweep_spec.Sweep(name='s', base_config='', axes=(('optimizer.lr',),))


def test_list_values_become_tuples():
  # A list was unhashable in the tables (TypeError after the first point).
  sweep = _sweep(('model.kwargs.depth', ([1, 1, 1, 1], [1, 2, 1, 1])))
  assert sweep.axes == (('model.kwargs.depth', ((1, 1, 1, 1), (1, 2, 1, 1))),)
  points = sweep_spec.expand(sweep)
  assert [p.name for p in points] == ['depth=1x1x1x1', 'depth=1x2x1x1']
  config = sweep_spec.point_configs(sweep)[1][1]
  assert config.model.kwargs.depth == (1, 2, 1, 1)


def test_plot_metric_must_be_a_metric():
  # It was a KeyError traceback once the first point had trained.
  with pytest.raises(ValueError) as error:
    _sweep(
      ('optimizer.lr', (0.1,)),
      metrics=('eval/top1',),
      plot_metric='eval/top-1',
    )
  assert str(error.value) == (
    "Sweep 's': plot_metric 'eval/top-1' is not one of its metrics "
    "('eval/top1',); add it to metrics or plot one of them."
  )
  with pytest.raises(ValueError, match='metrics must be a tuple'):
    _sweep(('optimizer.lr', (0.1,)), metrics='eval/top1')


def test_point_configs_are_checked_as_the_trainer_checks_them():
  # 'adamw_typo' used to pass --launch and fail in every launched job.
  sweep = _sweep(
    ('optimizer.lr', (0.1,)), overrides={'optimizer.name': 'adamw_typo'}
  )
  with pytest.raises(ValueError) as error:
    sweep_spec.point_configs(sweep)
  assert str(error.value).startswith(
    "Sweep point lr=0.1: Unknown optimizer.name 'adamw_typo'; valid names: "
  )
  sweep = _sweep(('train.batch_size', (16, 0)))
  with pytest.raises(ValueError, match='Sweep point batch_size=0: .*positive'):
    sweep_spec.point_configs(sweep)
