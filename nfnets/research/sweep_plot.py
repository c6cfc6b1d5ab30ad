"""The plot of a sweep's results (`results.png`), for `sweep_tables`.

Apart from the tables to keep both modules small; matplotlib is imported
only when a plot is drawn.
"""

import math
from collections.abc import Mapping, Sequence

from nfnets.research import sweep_point
from nfnets.research import sweep_spec as spec_lib


def plot_results(
  sweep: spec_lib.Sweep, rows: Sequence[Mapping], path: str
) -> None:
  """Plots `plot_metric` against the last axis, one line per other value.

  Diverged or failed points are drawn as red crosses at the bottom.

  Args:
    sweep: the sweep.
    rows: `run_sweep`'s rows (in grid order).
    path: output PNG.
  """
  import matplotlib  # noqa: PLC0415  (plotting is optional at import time)

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  x_key, x_vals = sweep.axes[-1]
  series = _series(sweep, rows)
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  xs = range(len(x_vals))
  for k, (label, by_x) in enumerate(series.items()):
    ys = [_metric_or_nan(by_x.get(i), sweep.plot_metric) for i in xs]
    (line,) = ax.plot(xs, ys, marker='o', label=label)
    bad = [i for i in xs if _is_bad(by_x.get(i))]
    # Crosses in the series' colour, staggered so coincident ones show.
    offset = 0.08 * (k - (len(series) - 1) / 2)
    ax.plot(
      [i + offset for i in bad], [0.0] * len(bad), 'x',
      color=line.get_color(), markersize=9, markeredgewidth=2,
    )  # fmt: skip
  ax.set_xticks(list(xs), [spec_lib.label(sweep, x_key, v) for v in x_vals])
  ax.set_xlabel(x_key)
  ax.set_ylabel(sweep.plot_metric)
  ax.set_title(f'{sweep.name}\n(x at 0: diverged or failed)', fontsize=8)
  if len(series) > 1:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _series(sweep: spec_lib.Sweep, rows: Sequence[Mapping]) -> dict[str, dict]:
  """Groups rows by all axes but the last: label -> {x index: row}.

  Rows come in grid order (the last axis fastest), so a row's position
  gives its x: values need not be hashable (a dict of model kwargs).
  """
  num_x = len(sweep.axes[-1][1])
  other = [key for key, _ in sweep.axes[:-1]]
  series = {}
  for i, row in enumerate(rows):
    label = ', '.join(f'{k}={spec_lib.label(sweep, k, row[k])}' for k in other)
    series.setdefault(label or sweep.plot_metric, {})[i % num_x] = row
  return series


def _is_bad(row: Mapping | None) -> bool:
  return row is not None and row['status'] != sweep_point.STATUS_OK


def _metric_or_nan(row: Mapping | None, metric: str) -> float:
  if row is None or row['status'] != sweep_point.STATUS_OK:
    return math.nan
  return row[metric]
