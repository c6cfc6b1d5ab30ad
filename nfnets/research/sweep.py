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
instead, for a cluster.
"""

import contextlib
import copy
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

RESULT_FILE = 'sweep_result.json'
ERROR_LOG = 'sweep_error.log'
STATUS_OK, STATUS_DIVERGED, STATUS_FAILED = 'ok', 'diverged', 'failed'


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A grid of config overrides on top of a base config file.

  Attributes:
    name: short name, used in titles.
    base_config: path of a config file, optionally with ':arg' (as for
      `--config`), relative to the working directory.
    axes: ordered (dotted key, values) pairs; the grid is their product.
    overrides: dotted key -> value applied to every point first.
    metrics: metric names to collect (keys of the `TrainResult.metrics`,
      e.g. 'eval/top1', 'train/loss').
    plot_metric: metric of the Markdown pivot table and the plot.
    labels: optional display names of axis values: key -> {value: label}
      (e.g. clipping 0.0 -> 'none').
  """

  name: str
  base_config: str
  axes: Sequence[tuple[str, Sequence[Any]]]
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  metrics: Sequence[str] = ('eval/top1', 'train/loss')
  plot_metric: str = 'eval/top1'
  labels: Mapping[str, Mapping[Any, str]] = dataclasses.field(
    default_factory=dict
  )


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: its directory name and its overrides (axis order)."""

  name: str
  overrides: dict[str, Any]


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file {path!r} does not exist.')
  module_name = '_sweep_' + re.sub(r'\W', '_', os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> Sweep:
  """Imports a sweep file and returns its `get_sweep()`.

  Args:
    path: path of a Python file defining `get_sweep() -> Sweep`.

  Returns:
    The `Sweep`.
  """
  module = _load_module(path, 'Sweep')
  if not hasattr(module, 'get_sweep'):
    raise ValueError(
      f'{path} defines no get_sweep(); see nfnets/research/sweep.py.'
    )
  sweep = module.get_sweep()
  if not sweep.axes:
    raise ValueError(f'Sweep {sweep.name!r} has no axes.')
  return sweep


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` the way `--config=path[:arg]` does.

  Args:
    spec: config file path, optionally followed by ':arg'.

  Returns:
    The file's `get_config(arg)` (or `get_config()` without an arg).
  """
  path, _, arg = spec.partition(':')
  module = _load_module(path, 'Config')
  return module.get_config(arg) if arg else module.get_config()


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, list | tuple):
    return 'x'.join(_format_value(v) for v in value)
  return str(value)


def point_name(overrides: Mapping[str, Any]) -> str:
  """A directory-safe name, e.g. 'clipping=0.01,batch_size=64'.

  Args:
    overrides: dotted key -> value, in axis order.

  Returns:
    Each key's last component (the full key where two last components
    coincide) with its value, joined by commas.
  """
  last = [key.rsplit('.', 1)[-1] for key in overrides]
  parts = [
    f'{short if last.count(short) == 1 else key}={_format_value(value)}'
    for short, (key, value) in zip(last, overrides.items(), strict=True)
  ]
  return re.sub(r'[^\w.,=+-]', '_', ','.join(parts))


def expand(sweep: Sweep) -> list[Point]:
  """The grid's points, the last axis varying fastest.

  Args:
    sweep: the sweep.

  Returns:
    One `Point` per combination of axis values.
  """
  keys = [key for key, _ in sweep.axes]
  values = [list(vals) for _, vals in sweep.axes]
  for key, vals in zip(keys, values, strict=True):
    if not vals:
      raise ValueError(f'Sweep axis {key!r} has no values.')
  if len(set(keys)) != len(keys):
    raise ValueError(f'Sweep axes repeat a key: {keys}.')
  points = []
  for combo in itertools.product(*values):
    overrides = dict(zip(keys, combo, strict=True))
    points.append(Point(point_name(overrides), overrides))
  return points


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set, like `--config.a.b=value`.

  Args:
    config: the base config (not modified).
    overrides: dotted key -> value; every key must already exist.

  Returns:
    The new config.

  Raises:
    ValueError: for a key the config does not have (listing the valid
      ones): a mistake in the sweep file, reported before any point trains.
  """
  config = copy.deepcopy(config)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('.')
    node = config
    for i, part in enumerate([*parents, leaf]):
      group = isinstance(node, ml_collections.ConfigDict)
      if not group or part not in node:
        raise ValueError(
          f'Sweep key {dotted!r}: {".".join(parents[:i]) or "the config"} '
          f'has no {part!r}; valid keys there: {sorted(node) if group else []}'
          '. Fix the key in the sweep file.'
        )
      if i < len(parents):
        node = node[part]
    try:
      node[leaf] = value
    except TypeError as e:  # ConfigDict's type check: 'a' for an int.
      raise ValueError(f'Sweep key {dotted!r}: {e}') from e
  return config


def point_configs(
  sweep: Sweep, base: ml_collections.ConfigDict | None = None
) -> list[tuple[Point, ml_collections.ConfigDict]]:
  """Every point with its full config (checks all keys before any run).

  Args:
    sweep: the sweep.
    base: the base config; loaded from `sweep.base_config` when None.

  Returns:
    (point, config) pairs.
  """
  base = load_config(sweep.base_config) if base is None else base
  base = apply_overrides(base, sweep.overrides)
  return [(p, apply_overrides(base, p.overrides)) for p in expand(sweep)]


def _cli_value(value: Any) -> str:
  if isinstance(value, list | tuple):
    return "'(" + ','.join(str(v) for v in value) + ",)'"
  return str(value)


def launch_lines(sweep: Sweep, outdir: str) -> list[str]:
  """One `python -m experiments.train` command per point (for a cluster).

  Args:
    sweep: the sweep.
    outdir: parent of the points' workdirs.

  Returns:
    Shell command lines.
  """
  lines = []
  for point in expand(sweep):
    overrides = {**sweep.overrides, **point.overrides}
    flags = ' '.join(
      f'--config.{key}={_cli_value(value)}' for key, value in overrides.items()
    )
    workdir = os.path.join(outdir, point.name)
    lines.append(
      f'python -m experiments.train --config={sweep.base_config} '
      f"--workdir='{workdir}' {flags}"
    )
  return lines


def run_point(config, workdir: str, train_fn: Callable, log=print) -> dict:
  """Trains one point unless its workdir already holds a finished result.

  A 'failed' result is retried (the user reran after fixing the cause).

  Args:
    config: the point's full config.
    workdir: the point's workdir.
    train_fn: `(config, workdir) -> TrainResult`, normally
      `nfnets.train.train_and_evaluate`.
    log: progress printer.

  Returns:
    dict(status, metrics, seconds[, error]), also saved to
    `<workdir>/sweep_result.json`; a failure's traceback goes to
    `<workdir>/sweep_error.log`.
  """
  path = os.path.join(workdir, RESULT_FILE)
  error_log = os.path.join(workdir, ERROR_LOG)
  if os.path.exists(path):
    previous = _read_result(path)
    if previous.get('status') != STATUS_FAILED:
      log(f'  already done ({path}); skipping')
      return previous
    log(f'  retrying; it failed last time: {previous.get("error", "?")}')
    for stale in (path, error_log):  # If interrupted now, it is not done.
      with contextlib.suppress(FileNotFoundError):
        os.remove(stale)
  from nfnets.train import NonFiniteLossError, provenance  # noqa: PLC0415

  t0 = time.perf_counter()
  result = dict(status=STATUS_OK, metrics={})
  try:
    out = train_fn(config, workdir)
    if out.preempted:
      raise KeyboardInterrupt('Run preempted; rerun the sweep to continue.')
    result['metrics'] = {k: float(v) for k, v in out.metrics.items()}
  except NonFiniteLossError as e:
    result.update(status=STATUS_DIVERGED, error=str(e))
    step = re.search(r'at step (\d+)', str(e))
    if step:
      result['diverged_step'] = int(step.group(1))
  except (ValueError, RuntimeError, OSError) as e:
    # One line says all about a missing folder; a bug needs the traceback.
    result.update(status=STATUS_FAILED, error=f'{type(e).__name__}: {e}')
    os.makedirs(workdir, exist_ok=True)
    with open(error_log, 'w') as f:
      f.write(traceback.format_exc())
    log(f'  {result["error"].strip()}\n  (traceback in {error_log})')
  result['seconds'] = time.perf_counter() - t0
  os.makedirs(workdir, exist_ok=True)
  provenance.write_json(path, result)  # Never half a result.
  return result


def _read_result(path: str) -> dict:
  """A point's saved result; an unreadable one counts as failed (retried)."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    return {'status': STATUS_FAILED, 'error': f'{path} cannot be read: {e}'}


# Keys whose change on resume leaves a run's training alone, but not its
# result: a sweep point trained for another length is another point.
_RESULT_KEYS = ('train.num_steps', 'train.num_epochs')


def check_point_unchanged(config, workdir: str) -> None:
  """Refuses a point whose workdir holds a run of another config.

  The point names encode only the axis values, so after an edit of the
  sweep file (its base config or fixed overrides) a rerun would skip the
  finished points and tabulate their old results as the new sweep's.

  Raises:
    ValueError: naming the differences and what to do.
  """
  from nfnets.train import provenance, resume_rules  # noqa: PLC0415

  saved = provenance.previous_config(workdir, log=lambda _: None)
  if saved is None:
    return
  changed = resume_rules.unsafe_changes(saved, config, also=_RESULT_KEYS)
  if changed:
    listed = ''.join(f'\n  {line}' for line in changed[:10])
    raise ValueError(
      f'{workdir} holds a run of another config than this sweep gives '
      f'it:{listed}\nThe sweep file changed since that run: run it with '
      'another --outdir (the results there stay as they are), or undo the '
      'change.'
    )


def run_sweep(
  sweep: Sweep,
  outdir: str,
  *,
  base: ml_collections.ConfigDict | None = None,
  train_fn: Callable | None = None,
  log=print,
) -> list[dict]:
  """Runs every point of `sweep` in `outdir/<point>` and writes the tables.

  Args:
    sweep: the sweep.
    outdir: output directory (results.csv, results.md, results.png).
    base: base config; loaded from `sweep.base_config` when None.
    train_fn: `(config, workdir) -> TrainResult`; default
      `nfnets.train.train_and_evaluate`.
    log: progress printer.

  Returns:
    One row per point: the axis values, 'status', 'seconds' and the metrics.
  """
  if train_fn is None:
    from nfnets.train import train_and_evaluate  # noqa: PLC0415

    train_fn = train_and_evaluate
  configured = point_configs(sweep, base)
  for point, config in configured:
    check_point_unchanged(config, os.path.join(outdir, point.name))
  rows = []
  for i, (point, config) in enumerate(configured):
    log(f'[{i + 1}/{len(configured)}] {sweep.name}: {point.name}')
    result = run_point(config, os.path.join(outdir, point.name), train_fn, log)
    row = {**point.overrides, 'status': result['status']}
    if 'diverged_step' in result:
      row['status'] += f' (step {result["diverged_step"]})'
    row['seconds'] = round(result.get('seconds', 0.0), 1)
    for metric in sweep.metrics:
      row[metric] = result['metrics'].get(metric, math.nan)
    rows.append(row)
    log(f'  -> {_summary(row, sweep)}')
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


def write_results(sweep: Sweep, rows: Sequence[Mapping], outdir: str) -> None:
  """Writes results.csv, results.md and results.png for `rows`.

  Args:
    sweep: the sweep.
    rows: `run_sweep`'s rows so far.
    outdir: output directory.
  """
  os.makedirs(outdir, exist_ok=True)
  keys = [key for key, _ in sweep.axes]
  columns = [*keys, 'status', 'seconds', *sweep.metrics]
  with open(os.path.join(outdir, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({c: row.get(c, '') for c in columns})
  with open(os.path.join(outdir, 'results.md'), 'w') as f:
    f.write(markdown_table(sweep, rows))
  from nfnets.research import sweep_plot  # noqa: PLC0415  (matplotlib)

  sweep_plot.plot_results(sweep, rows, os.path.join(outdir, 'results.png'))


def label(sweep: Sweep, key: str, value: Any) -> str:
  """How tables and plots show an axis value (`Sweep.labels` or the value)."""
  return sweep.labels.get(key, {}).get(value, _format_value(value))


def _cell(row: Mapping | None, metric: str) -> str:
  if row is None:
    return ''
  if row['status'] != STATUS_OK:
    return row['status']
  return f'{row[metric]:.4f}'


def markdown_table(sweep: Sweep, rows: Sequence[Mapping]) -> str:
  """Markdown: a pivot of `plot_metric` (first axis x last axis) + all rows.

  Args:
    sweep: the sweep.
    rows: `run_sweep`'s rows.

  Returns:
    The Markdown text.
  """
  keys = [key for key, _ in sweep.axes]
  lines = [f'## {sweep.name}: {sweep.plot_metric}', '']
  if len(keys) == 2:
    (row_key, row_vals), (col_key, col_vals) = sweep.axes
    lines.append(
      f'| {row_key} \\ {col_key} | '
      + ' | '.join(label(sweep, col_key, v) for v in col_vals)
      + ' |'
    )
    lines.append('|---' * (len(col_vals) + 1) + '|')
    for rv in row_vals:
      cells = []
      for cv in col_vals:
        match = [r for r in rows if r[row_key] == rv and r[col_key] == cv]
        cells.append(_cell(match[0] if match else None, sweep.plot_metric))
      lines.append(
        f'| {label(sweep, row_key, rv)} | ' + ' | '.join(cells) + ' |'
      )
    lines += ['', '## All points', '']
  header = [*keys, 'status', *sweep.metrics, 'seconds']
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|---' * len(header) + '|')
  for row in rows:
    cells = [label(sweep, k, row[k]) for k in keys] + [row['status']]
    ok = row['status'] == STATUS_OK
    cells += [_cell(row, m) if ok else '-' for m in sweep.metrics]
    cells.append(f'{row["seconds"]}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
