"""Tests for nfnets.perf.benchmark, .report and experiments/benchmark.py.

They run a tiny NFNet and check the output format, hand-computable
statistics and that every number is finite and consistent, never timings.
The FLOP count is checked against the paper's formula
(`nfnets.models.flops.count_flops`, read off the architecture description),
which is independent of the traced count the benchmark uses.
"""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys

import jax
import pytest

from experiments import output_files
from nfnets.models import flops
from nfnets.perf import benchmark, op_profile, report, workload
from nfnets.train import runtime
from tests.models.test_flops import resnet_macs
from tests.models.test_resnet import expected_resnet_params

TINY = dict(width=0.125, depth=[1, 1, 1, 1], group_size=128)
BATCH, SIZE, STEPS = 2, 32, 2


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
  """One CLI run on a tiny NFNet (one compile for the whole file)."""
  # In a folder that does not exist yet: the benchmark makes it.
  out = tmp_path_factory.mktemp('bench') / 'results' / 'bench.json'
  proc = subprocess.run(
    [sys.executable, '-m', 'experiments.benchmark', '--model=NFNet:F0',
     f'--batch_size={BATCH}', f'--image_size={SIZE}', f'--steps={STEPS}',
     '--warmup=1', '--forward_steps=1', f'--model_kwargs={json.dumps(TINY)}',
     '--trace_compile=5', '--breakdown', f'--json_out={out}'],
    capture_output=True, text=True, check=False, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  # A rerun may replace this file (and only such a file).
  assert output_files.is_json_result(str(out), report.is_benchmark_results)
  (row,) = json.loads(out.read_text())
  return proc.stdout, row


@pytest.fixture(scope='module')
def tiny_result(cli_run):
  return report.BenchmarkResult(**cli_run[1])


def test_result_numbers_are_finite_and_consistent(tiny_result):
  r = tiny_result
  assert r.model == 'NFNet-F0'
  assert (r.batch_size, r.image_size, r.dtype) == (BATCH, SIZE, 'float32')
  assert r.steps == STEPS and r.num_devices == 1
  names = ('compile_s', 'compile_cpu_s', 'init_s', 'step_ms', 'step_cpu_ms')
  for name in names + ('step_ms_min', 'forward_ms', 'tflops'):
    value = getattr(r, name)
    assert math.isfinite(value) and value > 0, name
  assert r.step_ms_min <= r.step_ms
  assert r.step_ms_iqr >= 0
  # images/s and TFLOP/s follow from the median step time by definition.
  assert r.images_per_s == pytest.approx(BATCH / (r.step_ms / 1e3))
  assert r.tflops == pytest.approx(
    2 * 3 * r.macs_per_image * BATCH / (r.step_ms / 1e3) / 1e12
  )
  assert r.peak_memory_gb > 0 and r.xla_memory_gb > 0 and r.peak_rss_gb > 0
  assert r.memory_source
  assert r.remat is False


def test_result_counts_the_compiled_kernels(tiny_result):
  r = tiny_result
  assert 0 < r.distinct_kernels < r.fusions
  counts = r.kernels_by_source
  # A train step has all three parts: forward, backward and the update.
  assert {'forward', 'backward', 'other'} <= set(counts)
  assert sum(n for n, _ in counts.values()) == r.fusions
  assert all(0 < d <= n for n, d in counts.values())


def test_macs_match_the_paper_formula(tiny_result):
  expected = flops.count_flops(
    'F0', SIZE, width=0.125, depth=(1, 1, 1, 1), group_size=128
  )
  assert tiny_result.macs_per_image == pytest.approx(expected)


def test_params_match_hand_count_of_final_layer(tiny_result):
  # The classifier alone has final_ch * 1000 + 1000 parameters; final_ch
  # is 2 * int(1536 * 0.125) = 384.
  assert tiny_result.params > 384 * 1000 + 1000


def test_table_and_json(tiny_result):
  table = report.format_table([tiny_result, tiny_result])
  lines = table.split('\n')
  headers = [c.strip() for c in lines[0].strip('|').split('|')]
  assert headers[:3] == ['Model', 'Res', 'Params']
  assert 'Train ms/step' in headers and 'Peak GB' in headers
  rows = [line for line in lines[2:] if line.startswith('| NFNet-F0')]
  assert len(rows) == 2
  cells = [c.strip() for c in rows[0].strip('|').split('|')]
  assert len(cells) == len(headers)
  assert float(cells[headers.index('Train ms/step')]) == pytest.approx(
    tiny_result.step_ms, abs=0.06
  )
  assert 'Device: cpu x1' in table
  assert json.loads(json.dumps(tiny_result.to_dict()))['model'] == 'NFNet-F0'
  # A quantity not measured (no forward pass timed) shows '-', not 'nan'.
  skipped = dataclasses.replace(tiny_result, forward_ms=float('nan'))
  row = report.format_table([skipped]).split('\n')[2]
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[headers.index('Fwd ms')] == '-'
  assert 'nan' not in row


def test_table_names_the_augmentation_when_rows_differ_in_it(tiny_result):
  # Two timings of one model, without and with the recipe's augmentation
  # in the step, must not read as one measurement repeated.
  augmented = dataclasses.replace(
    tiny_result, options={**tiny_result.options, 'augment': 'device'}
  )
  lines = report.format_table([tiny_result, augmented]).split('\n')
  headers = [c.strip() for c in lines[0].strip('|').split('|')]
  assert headers[headers.index('Remat') + 1] == 'Augment'
  column = headers.index('Augment')
  cells = [[c.strip() for c in row.strip('|').split('|')] for row in lines[2:4]]
  assert [row[column] for row in cells] == ['none', 'device']
  plain = report.format_table([tiny_result]).split('\n')[0]
  assert 'Augment' not in plain


def test_table_names_the_sam_form_when_rows_differ_in_it(tiny_result):
  sam = dataclasses.replace(
    tiny_result, options={**tiny_result.options, 'sam': 'paper'}
  )
  lines = report.format_table([tiny_result, sam]).split('\n')
  headers = [c.strip() for c in lines[0].strip('|').split('|')]
  assert 'Augment' not in headers
  column = headers.index('SAM')
  cells = [[c.strip() for c in row.strip('|').split('|')] for row in lines[2:4]]
  assert [row[column] for row in cells] == ['off', 'paper']
  assert tiny_result.options['sam'] == 'off'  # Recorded by the benchmark.


def test_cli_prints_the_table(cli_run):
  stdout, row = cli_run
  assert f'| NFNet-F0 | {SIZE} |' in stdout
  assert f'{row["distinct_kernels"]} distinct kernels' in stdout
  assert '| Model | Res | Params |' in stdout
  assert row['options']['depth'] == [1, 1, 1, 1]


def test_cli_records_what_else_changes_the_numbers(cli_run):
  row = cli_run[1]
  env = row['environment']
  assert env['jax'] == jax.__version__
  assert env['xla_flags'] == os.environ.get('XLA_FLAGS', '')
  assert env['compilation_cache_dir'] == ''  # Cold compiles by default.
  # The settings the fixture's command gave (--warmup=1 --forward_steps=1).
  want = {'warmup': 1, 'forward_steps': 1, 'compiler_options': {}}
  assert {k: row['options'][k] for k in want} == want
  # The CLI keeps freed memory exactly when JAX runs on the CPU here.
  assert env['malloc_kept'] == (not runtime.accelerator_expected())


def test_cli_records_the_cpu_model_and_flags(cli_run):
  """Every result names the CPU and its AVX-512/AMX flags (/proc/cpuinfo)."""
  env = cli_run[1]['environment']
  with open('/proc/cpuinfo') as f:
    info = f.read()
  model = re.search(r'^model name\s*:\s*(.*)$', info, re.M).group(1).strip()
  flags = set(re.search(r'^flags\s*:\s*(.*)$', info, re.M).group(1).split())
  assert env['cpu_model'] == model
  want = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')
  assert {f: env['cpu_flags'][f] for f in want} == {f: f in flags for f in want}


def test_cli_traces_the_compile(cli_run):
  stdout, row = cli_run
  lines = stdout.split('XLA compile events')[1].split('\n')[1:6]
  events = {
    name: (seconds, count) for name, seconds, count in row['compile_events']
  }
  seconds, count = events['backend_compile_and_load']
  assert count == 1 and 0 < seconds <= row['compile_s']
  assert len(lines) == 5 and all(line.split()[1] == 's' for line in lines)
  assert lines[0].split()[3] == row['compile_events'][0][0].split()[0]


def test_cli_breaks_the_step_time_down_by_kernel_kind(cli_run):
  stdout, row = cli_run
  kinds = {k['kind']: k for k in row['kernel_time']}
  assert set(kinds) <= set(op_profile.KINDS)
  assert 'conv 3x3' in kinds and 'element-wise' in kinds
  assert sum(k['share'] for k in kinds.values()) == pytest.approx(1.0)
  assert all(k['ms'] > 0 for k in kinds.values())
  assert 'Train step time by kind of kernel:' in stdout


def test_bn_resnet_runs_the_trainer_step_with_its_statistics():
  """A BN-ResNet is timed with the trainer's step, its state carried."""
  config = workload.make_model_config('ResNet', width=0.25, depth=[1, 1, 1, 1])
  r = benchmark.run_benchmark(
    config, batch_size=BATCH, image_size=SIZE, steps=1, warmup=1,
    forward_steps=1, num_classes=10,
  )  # fmt: skip
  assert r.model == 'BN-ResNet-50' and r.steps == 1
  assert math.isfinite(r.step_ms) and math.isfinite(r.forward_ms)
  # Multiply-adds by hand (tests/models/test_flops.py): convs and classifier.
  assert r.macs_per_image == resnet_macs((1, 1, 1, 1), 0.25, SIZE, classes=10)
  assert r.params == expected_resnet_params((1, 1, 1, 1), True, width=0.25,
                                            classes=10)  # fmt: skip


def test_cpu_time_per_step_counts_the_timed_steps_alone(monkeypatch):
  """step_cpu_ms over a process clock that each train step moves 100 ms.

  Before, the CPU clock started before all but one warm-up step, so with 9
  warm-up steps and 3 timed ones it read (8 + 3) x 100 / 3 = 367 ms.
  """
  clock = [0.0]
  monkeypatch.setattr(benchmark.time, 'process_time', lambda: clock[0])
  runner = benchmark._step_runner

  def counted_runner(compiled, work):
    run = runner(compiled, work)

    def call():
      clock[0] += 0.1
      return run()

    return call

  monkeypatch.setattr(benchmark, '_step_runner', counted_runner)
  # A GPU-like allocator whose peak an earlier model had set (1 GiB): after
  # this run's step it reads 3 GiB, which need not be this step's.
  peaks = iter([2**30, 3 * 2**30])
  monkeypatch.setattr(
    benchmark.measure, 'device_peak_bytes', lambda device: next(peaks)
  )
  config = workload.make_model_config('NFNet', **TINY, variant='F0')
  r = benchmark.run_benchmark(
    config, batch_size=1, image_size=SIZE, steps=3, warmup=9,
    forward_steps=0, num_classes=10,
  )  # fmt: skip
  assert r.step_cpu_ms == pytest.approx(100.0)
  assert r.steps == 3
  # The process-wide allocator peak is not reported as this step's.
  assert r.memory_source.startswith('XLA memory_analysis')
  assert "not the allocator's peak" in r.memory_source
  assert r.peak_memory_gb == r.xla_memory_gb
  assert r.options['warmup'] == 9 and r.options['forward_steps'] == 0


@pytest.mark.parametrize(
  'counts, bad',
  [
    (dict(image_size=0), 'image_size must be at least 1, got 0'),
    (dict(batch_size=0), 'batch_size must be at least 1, got 0'),
    (dict(steps=0), 'steps must be at least 1, got 0'),
    (dict(warmup=-1), 'warmup must be at least 0, got -1'),
    (dict(forward_steps=-1), 'forward_steps must be at least 0, got -1'),
  ],
)
def test_run_benchmark_refuses_counts_out_of_range(counts, bad):
  # Before, image_size=0 timed the default 192 px and warmup/forward_steps
  # below 0 ran none; each is a mistake, not a default.
  config = workload.make_model_config('NFNet', **TINY, variant='F0')
  with pytest.raises(ValueError, match=bad):
    benchmark.run_benchmark(
      config, **{'batch_size': 1, 'image_size': SIZE, **counts}
    )


def test_table_footer_names_the_rows_of_each_memory_source(tiny_result):
  first = dataclasses.replace(
    tiny_result, memory_source='device peak_bytes_in_use'
  )
  later = dataclasses.replace(
    tiny_result,
    memory_source='XLA memory_analysis (args+outputs+temps), not the '
    "allocator's peak, which may be earlier work's",
  )
  footer = report.format_table([first, later, later]).split('\n')[-1]
  assert 'device peak_bytes_in_use (row 1)' in footer
  assert "may be earlier work's (rows 2, 3)" in footer
  alone = report.format_table([later]).split('\n')[-1]
  assert alone.endswith("which may be earlier work's.")


def test_cli_saves_each_model_before_timing_the_next(tmp_path):
  """--json_out holds the first model's result when the run stops in the
  second (Ctrl-C here); before, it was written after the last model."""
  out = tmp_path / 'bench.json'
  cache = tmp_path / 'cache'
  options = '{"xla_backend_optimization_level": 0}'
  proc = subprocess.Popen(
    [sys.executable, '-m', 'experiments.benchmark',
     '--model=NFNet:F0,NFNet:F1', '--batch_size=1', f'--image_size={SIZE}',
     '--steps=1', '--warmup=0', '--forward_steps=0',
     f'--model_kwargs={json.dumps(TINY)}', f'--compiler_options={options}',
     f'--compilation_cache_dir={cache}', f'--json_out={out}'],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    for line in proc.stdout:
      if line.startswith('  compiled step:'):  # F0's row is printed.
        proc.send_signal(signal.SIGINT)
        break
    _, stderr = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 130, stderr[-3000:]
  (row,) = json.loads(out.read_text())
  assert row['model'] == 'NFNet-F0'
  assert row['options']['compiler_options'] == json.loads(options)
  assert row['options']['warmup'] == 0
  assert row['environment']['compilation_cache_dir'] == str(cache)
  assert not [n for n in os.listdir(tmp_path) if '.tmp' in n]  # Whole.


def _short_cli_error(module, *args):
  proc = subprocess.run(
    [sys.executable, '-m', module, *args],
    capture_output=True, text=True, check=False, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  return proc


def test_cli_checks_every_model_before_timing_the_first():
  proc = _short_cli_error(
    'experiments.benchmark', '--model=NFNet:F0,NFNet:F9', '--steps=1'
  )
  assert "Unknown NFNet variant 'F9'" in proc.stderr
  assert 'Benchmarking' not in proc.stdout  # F0 was not timed first.


def test_input_cli_refuses_unknown_pipelines():
  # Before, 'plian' timed the plain pipeline under that name.
  proc = _short_cli_error('experiments.benchmark_input', '--pipelines=plian')
  assert 'unknown pipeline(s) plian; valid: plain, f0_host' in proc.stderr
