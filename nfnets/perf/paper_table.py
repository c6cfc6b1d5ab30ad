"""The NFNet paper's latency comparison (Table 3), measured here.

The paper times six models on a V100 (float16, batch 32) and a TPUv3
(bfloat16, batch 32 per core): ResNet-50, EfficientNet-B0, SE-ResNet-50,
NFNet-F0, NFNet-F1 and EfficientNet-B4, and concludes that NFNets train
fastest at a given accuracy even though they do the most FLOPs.
`PAPER_MODELS` lists those six with the paper's figures; `run_paper_table`
times them with `nfnets.perf.benchmark.run_benchmark` (the paper's protocol:
median full training step, data on the device) at each model's train
resolution and says where each step's time goes
(`nfnets.perf.op_profile`), and `format_paper_table` / `plot_flops_vs_time`
put our numbers beside the paper's.

    python -m experiments.benchmark --table=paper --batch_size=32 \
      --plot_out=docs/images/flops_vs_time.png
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from nfnets import atomic_files
from nfnets.perf import benchmark, op_profile, plot_stamp, report, workload


@dataclasses.dataclass(frozen=True)
class PaperModel:
  """One row of the paper's Table 3 and how to build it here.

  SENet-50 is the SE-ResNet-50 of Hu et al. (reduction 16: 28.1M
  parameters), not the SE ratio 0.25 of the NF blocks.

  Attributes:
    label: the paper's name for the model.
    name: its `nfnets.models.MODELS` name.
    kwargs: its constructor arguments.
    image_size: the train resolution the paper times it at.
    gmacs: the paper's "#FLOPs" (billions of multiply-adds, counted at the
      *test* resolution).
    params_m: the paper's parameter count, millions.
    tpu_ms: the paper's TPUv3 train step, ms.
    gpu_ms: the paper's V100 train step, ms.
  """

  label: str
  name: str
  kwargs: dict
  image_size: int
  gmacs: float
  params_m: float
  tpu_ms: float
  gpu_ms: float


PAPER_MODELS = (
  PaperModel('ResNet-50', 'ResNet', {'variant': 'ResNet50'}, 224,
             4.10, 26.0, 41.6, 35.3),
  PaperModel('EffNet-B0', 'EfficientNet', {'variant': 'B0'}, 224,
             0.39, 5.3, 51.1, 44.8),
  PaperModel('SENet-50', 'ResNet',
             {'variant': 'ResNet50', 'preactivation': False, 'use_se': True,
              'se_ratio': 1 / 16},
             224, 4.09, 28.0, 64.3, 59.4),
  PaperModel('NFNet-F0', 'NFNet', {'variant': 'F0'}, 192,
             12.38, 71.5, 73.3, 56.7),
  PaperModel('NFNet-F1', 'NFNet', {'variant': 'F1'}, 224,
             35.54, 132.6, 158.5, 133.9),
  PaperModel('EffNet-B4', 'EfficientNet', {'variant': 'B4'}, 380,
             4.20, 19.0, 245.9, 221.6),
)  # fmt: skip


@dataclasses.dataclass
class PaperRow:
  """Our measurement of one paper model, with its time breakdown."""

  paper: PaperModel
  result: report.BenchmarkResult
  breakdown: list[op_profile.KindTime]


def run_paper_table(
  *,
  batch_size: int = 32,
  steps: int = 5,
  dtype: str | None = None,
  labels: Sequence[str] | None = None,
  breakdown: bool = True,
  log=print,
  on_row=None,
) -> list[PaperRow]:
  """Times the paper's six models at their train resolutions.

  Args:
    batch_size: images per step (the paper's: 32).
    steps: timed steps per model (the median is reported).
    dtype: compute dtype; default `workload.default_dtype()`.
    labels: a subset of `PAPER_MODELS` labels (at least one); default all
      six.
    breakdown: also profile each step by kind of kernel.
    log: progress printer.
    on_row: optional `rows -> None`, called with the rows so far after
      each model (e.g. to save them, so a failure keeps the earlier ones).

  Returns:
    One `PaperRow` per model, in the paper's order.
  """
  valid = ', '.join(m.label for m in PAPER_MODELS)
  if labels is not None and not labels:
    raise ValueError(f'Name at least one paper model; valid: {valid}.')
  chosen = [m for m in PAPER_MODELS if labels is None or m.label in labels]
  unknown = set(labels or ()) - {m.label for m in PAPER_MODELS}
  if unknown:
    raise ValueError(f'Unknown paper models {sorted(unknown)}; valid: {valid}.')
  rows = []
  for model in chosen:
    log(f'Timing {model.label} at {model.image_size} px, batch {batch_size}')
    config = workload.make_model_config(model.name, **model.kwargs)
    result = benchmark.run_benchmark(
      config, batch_size=batch_size, image_size=model.image_size,
      steps=steps, warmup=1, dtype=dtype, forward_steps=0,
      profile_steps=2 if breakdown else 0,
    )  # fmt: skip
    kinds = [op_profile.KindTime(**k) for k in result.kernel_time]
    rows.append(PaperRow(model, result, kinds))
    if on_row is not None:
      on_row(rows)
  return rows


def row_dict(row: PaperRow) -> dict:
  """A `PaperRow` as JSON-serialisable dict (for `--json_out`)."""
  return {
    'paper': dataclasses.asdict(row.paper),
    'result': row.result.to_dict(),
    'breakdown': [dataclasses.asdict(t) for t in row.breakdown],
  }


def _relative(value: float, base: float | None) -> str:
  return f'{value / base:.2f}x' if base else '-'


def format_paper_table(rows: Sequence[PaperRow]) -> str:
  """Our measurements beside the paper's Table 3 columns.

  Times relative to NFNet-F0 compare the shape of the two tables across
  hardware: absolute milliseconds only hold for the machine measured.

  Args:
    rows: `run_paper_table`'s result.

  Returns:
    A Markdown table, followed by the device line.
  """
  f0 = {r.paper.label: r for r in rows}.get('NFNet-F0')
  ours_f0 = f0.result.step_ms if f0 else None
  paper_f0 = next(m for m in PAPER_MODELS if m.label == 'NFNet-F0')
  lines = [
    '| Model | Res | GMACs (paper) | Params M (paper) | ms/step | '
    'TFLOP/s | vs F0 | paper GPU ms | vs F0 | paper TPU ms | vs F0 |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    p, r = row.paper, row.result
    lines.append(
      f'| {p.label} | {r.image_size} | {r.macs_per_image / 1e9:.2f} '
      f'({p.gmacs:.2f}) | {r.params / 1e6:.1f} ({p.params_m:.1f}) | '
      f'{r.step_ms:.0f} | {r.tflops:.3f} | '
      f'{_relative(r.step_ms, ours_f0)} | {p.gpu_ms} | '
      f'{_relative(p.gpu_ms, paper_f0.gpu_ms)} | {p.tpu_ms} | '
      f'{_relative(p.tpu_ms, paper_f0.tpu_ms)} |'
    )
  devices = sorted({f'{r.result.device}, {r.result.dtype}' for r in rows})
  batch = sorted({r.result.batch_size for r in rows})
  lines += [
    '',
    f'Ours: {"; ".join(devices)}; batch {batch}. GMACs: ours at '
    "the train resolution, the paper's at the test resolution.",
  ]
  return '\n'.join(lines)


def format_breakdowns(rows: Sequence[PaperRow]) -> str:
  """Each model's step time by kind of kernel, as ms/step and share."""
  kinds = [
    k for k in op_profile.KINDS
    if any(t.kind == k for row in rows for t in row.breakdown)
  ]  # fmt: skip
  lines = [
    '| Model | ' + ' | '.join(kinds) + ' |',
    '|---' * (len(kinds) + 1) + '|',
  ]
  for row in rows:
    by_kind = {t.kind: t for t in row.breakdown}
    cells = [
      f'{by_kind[k].ms:.0f} ({100 * by_kind[k].share:.0f}%)'
      if k in by_kind else '-'
      for k in kinds
    ]  # fmt: skip
    lines.append(f'| {row.paper.label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_flops_vs_time(rows: Sequence[PaperRow], path: str) -> None:
  """Log-log plot of train FLOPs per image against time per image (PNG).

  Our points (measured step time / batch) and the paper's V100 points (its
  batch-32 step time / 32) share the FLOPs axis: our multiply-adds at the
  train resolution x 2 x 3 for forward and backward. A model above the
  line through the others gets less done per FLOP. The PNG carries the
  stamp of `nfnets.perf.plot_stamp`, which lets a later run replace it.

  Args:
    rows: `run_paper_table`'s result (at least one).
    path: the PNG to write.
  """
  if not rows:
    raise ValueError('No rows to plot: time at least one paper model.')
  import matplotlib  # noqa: PLC0415  (only the plot needs it)

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
  for row in rows:
    r = row.result
    gflop = 6 * r.macs_per_image / 1e9
    ours = r.step_ms / r.batch_size
    ax.scatter(gflop, ours, color='C0')
    ax.scatter(gflop, row.paper.gpu_ms / 32, color='C1', marker='s')
    ax.annotate(row.paper.label, (gflop, ours), fontsize=8,
                xytext=(4, 2), textcoords='offset points')  # fmt: skip
  ax.scatter([], [], color='C0', label=f'ours ({rows[0].result.device}, '
             f'{rows[0].result.dtype})')  # fmt: skip
  ax.scatter([], [], color='C1', marker='s', label='paper (V100, float16)')
  ax.set(xscale='log', yscale='log', xlabel='train GFLOP per image',
         ylabel='train ms per image')  # fmt: skip
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with atomic_files.atomic_output(path) as tmp:  # Whole or not at all.
    fig.savefig(tmp, metadata=plot_stamp.savefig_metadata())
  plt.close(fig)
