"""A sweep's tables: `results.csv` and `results.md` (and `results.png`).

Rows are `nfnets.research.sweep.run_sweep`'s, in grid order. Every file is
written whole to a temporary file and then renamed over the old one, so an
error while writing one (or a kill) leaves the previous table as it was.
"""

import csv
import io
import os
from collections.abc import Mapping, Sequence

from nfnets import atomic_files
from nfnets.research import sweep_point
from nfnets.research import sweep_spec as spec_lib


def csv_text(sweep: spec_lib.Sweep, rows: Sequence[Mapping]) -> str:
  """results.csv: one row per point (axis values, status, seconds, metrics)."""
  keys = [key for key, _ in sweep.axes]
  columns = [*keys, 'status', 'seconds', *sweep.metrics]
  out = io.StringIO()
  writer = csv.DictWriter(out, columns)
  writer.writeheader()
  for row in rows:
    writer.writerow({c: row.get(c, '') for c in columns})
  return out.getvalue()


def write_results(
  sweep: spec_lib.Sweep, rows: Sequence[Mapping], outdir: str
) -> None:
  """Writes results.csv, results.md and results.png for `rows`.

  Args:
    sweep: the sweep.
    rows: `run_sweep`'s rows so far.
    outdir: output directory.
  """
  os.makedirs(outdir, exist_ok=True)
  # Both texts first: a table that cannot be made replaces nothing.
  texts = {'results.csv': csv_text(sweep, rows)}
  texts['results.md'] = markdown_table(sweep, rows)
  for name, text in texts.items():
    atomic_files.write_text(os.path.join(outdir, name), text)
  from nfnets.research import sweep_plot  # noqa: PLC0415  (matplotlib)

  with atomic_files.atomic_output(os.path.join(outdir, 'results.png')) as tmp:
    sweep_plot.plot_results(sweep, rows, tmp)


def _cell(row: Mapping | None, metric: str) -> str:
  if row is None:
    return ''
  if row['status'] != sweep_point.STATUS_OK:
    return row['status']
  return f'{row[metric]:.4f}'


def _pivot(sweep: spec_lib.Sweep, rows: Sequence[Mapping]) -> list[str]:
  """The `plot_metric` of a two-axis sweep: first axis x last axis."""
  (row_key, row_vals), (col_key, col_vals) = sweep.axes
  lines = [
    f'| {row_key} \\ {col_key} | '
    + ' | '.join(spec_lib.label(sweep, col_key, v) for v in col_vals)
    + ' |',
    '|---' * (len(col_vals) + 1) + '|',
  ]
  for i, rv in enumerate(row_vals):
    cells = []
    for j in range(len(col_vals)):
      k = i * len(col_vals) + j  # Rows come in grid order.
      cells.append(_cell(rows[k] if k < len(rows) else None, sweep.plot_metric))
    lines.append(
      f'| {spec_lib.label(sweep, row_key, rv)} | ' + ' | '.join(cells) + ' |'
    )
  return lines


def markdown_table(sweep: spec_lib.Sweep, rows: Sequence[Mapping]) -> str:
  """Markdown: a pivot of `plot_metric` (first axis x last axis) + all rows.

  Args:
    sweep: the sweep.
    rows: `run_sweep`'s rows (in grid order, possibly only the first ones).

  Returns:
    The Markdown text.
  """
  keys = [key for key, _ in sweep.axes]
  lines = [f'## {sweep.name}: {sweep.plot_metric}', '']
  if len(keys) == 2:
    lines += [*_pivot(sweep, rows), '', '## All points', '']
  header = [*keys, 'status', *sweep.metrics, 'seconds']
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|---' * len(header) + '|')
  for row in rows:
    cells = [spec_lib.label(sweep, k, row[k]) for k in keys] + [row['status']]
    ok = row['status'] == sweep_point.STATUS_OK
    cells += [_cell(row, m) if ok else '-' for m in sweep.metrics]
    cells.append(f'{row["seconds"]}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
