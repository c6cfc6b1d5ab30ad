"""Config sweeps: a grid of overrides, one training run per point, a table.

A sweep file is a Python file with `get_sweep()` returning a `Sweep`: a base
config file plus an ordered grid of dotted config keys and their values
(e.g. `optimizer.clipping` x `train.batch_size`). `run_sweep` expands the
grid, trains every point with `nfnets.train.train_and_evaluate` in its own
workdir `<outdir>/<point>` (sequentially, in this process), and collects
the final metrics into `results.csv`, `results.md` and `results.png`.

A point whose workdir has a finished `sweep_result.json` is not run
again, so an interrupted sweep continues where it stopped. A NaN/Inf loss
is recorded as 'diverged' (a result, not an error, in a stability
ablation). A point whose training raises (a missing dataset folder) is
recorded as 'failed', its traceback in `<point>/sweep_error.log`; the other
points still run, and a rerun retries it (`failed_summary` names them).
`launch_lines` prints one `python -m experiments.train` command per point
instead, for a cluster; running the sweep afterwards collects their
results. `<outdir>/sweep.json` records which sweep the outdir belongs to.

The parts: `sweep_spec` (the `Sweep`, its grid and point configs),
`sweep_point` (one point's training, result and workdir checks),
`sweep_tables` and `sweep_plot` (the results files), `sweep_launch` (the
command lines); their public names are also this module's.
"""

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import ml_collections

from nfnets.research.sweep_launch import launch_lines
from nfnets.research.sweep_point import (
  ERROR_LOG,
  RESULT_FILE,
  STATUS_DIVERGED,
  STATUS_FAILED,
  STATUS_OK,
  check_point_unchanged,
  read_result,
  run_point,
)
from nfnets.research.sweep_spec import (
  Point,
  Sweep,
  apply_overrides,
  expand,
  label,
  load_config,
  load_sweep,
  point_configs,
  point_name,
)
from nfnets.research.sweep_tables import markdown_table, write_results

__all__ = [
  'ERROR_LOG', 'RESULT_FILE', 'STATUS_DIVERGED', 'STATUS_FAILED',
  'STATUS_OK', 'SWEEP_RECORD', 'Point', 'Sweep', 'apply_overrides',
  'check_outdir', 'check_point_unchanged', 'expand', 'failed_summary',
  'label', 'launch_lines', 'load_config', 'load_sweep', 'markdown_table',
  'point_configs', 'point_name', 'read_result', 'run_point', 'run_sweep',
  'write_results',
]  # fmt: skip

SWEEP_RECORD = 'sweep.json'


def _identity(sweep: Sweep, source: str) -> dict:
  return {
    'file': os.path.basename(source),
    'name': sweep.name,
    'axes': [[key, list(values)] for key, values in sweep.axes],
  }


def check_outdir(sweep: Sweep, outdir: str, source: str = '') -> dict:
  """Refuses an outdir that holds another sweep's results.

  `<outdir>/sweep.json` (written by `run_sweep`) records the sweep file's
  name and the axes; another file or other axis keys would overwrite that
  sweep's results.csv, .md and .png. More or fewer values on the same
  axes are the same sweep, extended.

  Args:
    sweep: the sweep.
    outdir: its output directory.
    source: the sweep file's path ('' for a `Sweep` made in code).

  Returns:
    The record to write for this sweep.

  Raises:
    ValueError: for another sweep's outdir, suggesting another --outdir.
  """
  mine = _identity(sweep, source)
  path = os.path.join(outdir, SWEEP_RECORD)
  try:
    with open(path) as f:
      theirs = json.load(f)
  except (FileNotFoundError, ValueError):  # None yet, or cut: rewritten.
    return mine
  if not isinstance(theirs, dict):
    return mine
  if theirs.get('file') != mine['file'] or _keys(theirs) != _keys(mine):
    raise ValueError(
      f'{outdir} holds the results of another sweep (file '
      f'{theirs.get("file")!r}, axes {_keys(theirs)}; see {path}); run '
      f'this one (file {mine["file"]!r}, axes {_keys(mine)}) with another '
      '--outdir.'
    )
  return mine


def _keys(record: Mapping) -> list:
  axes = record.get('axes')
  return [axis[0] for axis in axes if axis] if isinstance(axes, list) else []


def _check_metrics(sweep: Sweep, point: Point, result: Mapping) -> None:
  """After the first 'ok' point: every metric of the sweep must exist."""
  available = result['metrics']
  missing = [m for m in sweep.metrics if m not in available]
  if missing:
    raise ValueError(
      f'Sweep metric(s) {missing} are not among those point {point.name} '
      f'reported: {sorted(available)}. Fix metrics in the sweep file and '
      'rerun (finished points are kept).'
    )


def _row(sweep: Sweep, point: Point, result: Mapping) -> dict:
  row = {**point.overrides, 'status': result['status']}
  if 'diverged_step' in result:
    row['status'] += f' (step {result["diverged_step"]})'
  row['seconds'] = round(result.get('seconds', 0.0), 1)
  for metric in sweep.metrics:
    row[metric] = result['metrics'].get(metric, math.nan)
  return row


def run_sweep(
  sweep: Sweep,
  outdir: str,
  *,
  base: ml_collections.ConfigDict | None = None,
  train_fn: Callable | None = None,
  source: str = '',
  log=print,
) -> list[dict]:
  """Runs every point of `sweep` in `outdir/<point>` and writes the tables.

  Args:
    sweep: the sweep.
    outdir: output directory (results.csv, results.md, results.png).
    base: base config; loaded from `sweep.base_config` when None.
    train_fn: `(config, workdir) -> TrainResult`; default
      `nfnets.train.train_and_evaluate`.
    source: the sweep file's path, recorded in `<outdir>/sweep.json`.
    log: progress printer.

  Returns:
    One row per point: the axis values, 'status', 'seconds' and the metrics.
  """
  if train_fn is None:
    from nfnets.train import train_and_evaluate  # noqa: PLC0415

    train_fn = train_and_evaluate
  configured = point_configs(sweep, base)
  record = check_outdir(sweep, outdir, source)
  for point, config in configured:
    workdir = os.path.join(outdir, point.name)
    saved = read_result(workdir)
    if saved is None or saved.get('status') != STATUS_FAILED:
      check_point_unchanged(config, workdir)  # A failed one is retried.
  from nfnets.train import provenance  # noqa: PLC0415

  os.makedirs(outdir, exist_ok=True)
  provenance.write_json(os.path.join(outdir, SWEEP_RECORD), record)
  rows, checked = [], False
  for i, (point, config) in enumerate(configured):
    log(f'[{i + 1}/{len(configured)}] {sweep.name}: {point.name}')
    result = run_point(config, os.path.join(outdir, point.name), train_fn, log)
    if result['status'] == STATUS_OK and not checked:
      _check_metrics(sweep, point, result)
      checked = True
    rows.append(_row(sweep, point, result))
    log(f'  -> {_summary(rows[-1], sweep)}')
    write_results(sweep, rows, outdir)
  return rows


def failed_summary(sweep: Sweep, rows: Sequence[Mapping], outdir: str):
  """One line naming the failed points (`run_sweep`'s rows) or None.

  The sweep goes on past a failed point, to tabulate the others; this is
  what the command says at the end, with where the tracebacks are.
  """
  points = expand(sweep)
  statuses = [row['status'] for row in rows]
  failed = [
    p.name for p, s in zip(points, statuses, strict=True) if s == STATUS_FAILED
  ]
  if not failed:
    return None
  point = failed[0] if len(failed) == 1 else '<point>'
  logs = os.path.join(outdir, point, ERROR_LOG)
  return (
    f'{len(failed)} of {len(points)} sweep points failed: '
    f'{", ".join(failed)} (tracebacks in {logs}). Fix the cause and '
    'rerun the same command (finished points are skipped, failed ones '
    'retried).'
  )


def _summary(row: Mapping, sweep: Sweep) -> str:
  if row['status'] != STATUS_OK:
    return row['status']
  return ', '.join(f'{m} {row[m]:.4f}' for m in sweep.metrics)
