"""experiments/benchmark.py's flags: what it refuses before timing anything.

A count of 0, an empty list or a flag `--table=paper` does not use would
otherwise time something other than what was asked (or nothing) and exit
0; a PNG this command did not write must not be replaced by its plot.
Every case here is refused when flags are parsed, before JAX starts.
"""

import subprocess
import sys

import pytest

from nfnets.perf import plot_stamp

TINY = '{"width": 0.125, "depth": [1, 1, 1, 1]}'
# A run that is cheap wherever a refusal were missing.
QUICK = (
  '--model=NFNet:F0', f'--model_kwargs={TINY}', '--image_size=32',
  '--batch_size=1', '--steps=1', '--warmup=0', '--forward_steps=0',
)  # fmt: skip


def _refused(*args) -> str:
  """Runs the benchmark; asserts a one-line usage error, returns it."""
  proc = subprocess.run(
    [sys.executable, '-m', 'experiments.benchmark', *args],
    capture_output=True, text=True, check=False, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
  assert 'Traceback' not in proc.stderr
  assert 'Benchmarking' not in proc.stdout and 'Timing' not in proc.stdout
  return proc.stderr.splitlines()[0]


def _with(flag: str) -> list[str]:
  """QUICK with `flag` in place of its own setting."""
  name = flag.split('=')[0]
  return [a for a in QUICK if a.split('=')[0] != name] + [flag]


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--batch_size=0', 'pass at least 1 (images per step)'),
    ('--image_size=0', 'pass at least 1 (square resolution'),
    ('--steps=0', 'pass at least 1 (timed train steps)'),
    ('--warmup=-1', 'pass at least 0 (untimed train steps)'),
    ('--forward_steps=-1', 'pass at least 0 (timed forward passes'),
  ],
)
def test_counts_out_of_range_are_refused(flag, message):
  # Before, --batch_size=0 and --image_size=0 timed the defaults (8, the
  # variant's size) and negative warm-up or forward counts ran none.
  line = _refused(*_with(flag))
  assert line.startswith(f'Error: flag {flag}: {message}')


@pytest.mark.parametrize(
  'flag, what',
  [
    ('--model=', 'name at least one model'),
    ('--variant=', 'name at least one variant'),
    ('--augment=', 'name at least one augmentation'),
    ('--sam=', 'name at least one SAM form'),
  ],
)
def test_empty_lists_are_refused(flag, what):
  # Before, each timed nothing, wrote [] and exited 0.
  assert f'{flag}[]: {what}' in _refused(*_with(flag))


def test_an_empty_paper_model_list_is_refused(tmp_path):
  # Before, it timed nothing and then failed drawing the plot (IndexError).
  plot = tmp_path / 'plot.png'
  line = _refused('--table=paper', '--paper_models=', f'--plot_out={plot}')
  assert '--paper_models=[]: name at least one paper model' in line
  assert not plot.exists()


def test_flags_the_paper_table_does_not_use_are_refused():
  # Before, --table=paper ignored them and timed its own settings.
  ignored = [
    '--compile_only', '--warmup=3', '--forward_steps=2', '--remat',
    '--grouped_conv=split', f'--model_kwargs={TINY}',
    '--compiler_options={}', '--trace_compile=5', '--model=ResNet',
    '--variant=F1', '--image_size=64', '--augment=device', '--sam=sync',
  ]  # fmt: skip
  line = _refused('--table=paper', '--paper_models=ResNet-50', *ignored)
  head = "Error: --table=paper times the paper's models its own way and does "
  tail = '; drop them, or time a model without --table=paper.'
  assert line.startswith(f'{head}not use --') and line.endswith(tail)
  named = line[len(head) + len('not use ') : -len(tail)].split(', ')
  assert sorted(named) == sorted(flag.split('=')[0] for flag in ignored)
  one = _refused('--table=paper', '--paper_models=ResNet-50', '--warmup=0')
  assert 'does not use --warmup; drop it,' in one


def test_a_png_this_command_did_not_write_is_not_replaced(tmp_path):
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots()
  other = tmp_path / 'figure.png'
  fig.savefig(other)  # A PNG, but not the benchmark's.
  stamped = tmp_path / 'earlier_plot.png'
  fig.savefig(stamped, metadata=plot_stamp.savefig_metadata())
  plt.close(fig)
  assert plot_stamp.is_stamped_png(str(stamped))
  assert not plot_stamp.is_stamped_png(str(other))
  before = other.read_bytes()
  line = _refused(
    '--table=paper', '--paper_models=EffNet-B0', '--batch_size=1',
    '--steps=1', f'--plot_out={other}',
  )  # fmt: skip
  assert (
    'the file exists and is not a plot experiments.benchmark stamped' in line
  )
  assert other.read_bytes() == before


def test_the_paper_tables_plot_carries_the_stamp(tmp_path):
  from nfnets.perf import paper_table, report  # noqa: PLC0415

  model = paper_table.PAPER_MODELS[0]
  result = report.BenchmarkResult(
    **{f: 1 for f in ('num_devices', 'batch_size', 'image_size', 'params')},
    model=model.label, device='cpu', dtype='float32', macs_per_image=4e9,
    **dict.fromkeys(
      ('compile_s', 'compile_cpu_s', 'init_s', 'step_ms', 'step_cpu_ms',
       'step_ms_min', 'step_ms_iqr', 'images_per_s', 'tflops', 'forward_ms',
       'peak_memory_gb', 'xla_memory_gb', 'peak_rss_gb'), 1.0),
    steps=1, memory_source='', fusions=1, distinct_kernels=1,
    kernels_by_source={}, remat=False,
  )  # fmt: skip
  path = tmp_path / 'plot.png'
  paper_table.plot_flops_vs_time(
    [paper_table.PaperRow(model, result, [])], str(path)
  )
  assert plot_stamp.png_text(str(path))[plot_stamp.KEY] == plot_stamp.STAMP
  with pytest.raises(ValueError, match='at least one paper model'):
    paper_table.plot_flops_vs_time([], str(path))
