"""Tests for nfnets.train.writers: metrics.jsonl on resume, progress lines."""

import io
import json
import math
import time

import pytest

from nfnets.train import writers


def _write(path, records, tail=''):
  with open(path, 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in records) + tail)


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_resume_moves_later_records_aside_and_keeps_them(tmp_path):
  logged = [{'step': s, 'train/loss': 1.0 / s} for s in range(20, 200, 20)]
  logged.append({'step': 180, 'eval/top1': 0.5})
  _write(tmp_path / 'metrics.jsonl', logged, tail='{"step": 19')  # Cut.
  moved = writers.set_aside_records_after(str(tmp_path), 100)
  assert moved == 6  # 120, 140, 160, 180, the eval at 180, the cut line.
  kept = _read(tmp_path / 'metrics.jsonl')
  assert kept == [r for r in logged if r['step'] <= 100]
  with open(tmp_path / 'metrics.abandoned.jsonl') as f:
    lines = f.read().splitlines()
  assert lines[-1] == '{"step": 19'
  aside = [json.loads(line) for line in lines[:-1]]
  assert aside == [
    dict(r, resumed_from_step=100) for r in logged if r['step'] > 100
  ]
  # A writer opened afterwards appends after the kept records.
  writer = writers.MetricWriter(str(tmp_path))
  writer.write(120, {'train/loss': 0.25})
  writer.close()
  steps = [r['step'] for r in _read(tmp_path / 'metrics.jsonl')]
  assert steps == [20, 40, 60, 80, 100, 120]
  assert writers.set_aside_records_after(str(tmp_path), 120) == 0


def test_logged_eval_finds_the_eval_record_of_a_step(tmp_path):
  _write(
    tmp_path / 'metrics.jsonl',
    [
      {'step': 6, 'train/loss': 1.0},
      {'step': 6, 'eval/top1': 0.75, 'eval_ema/top1': 0.5},
    ],
  )
  assert writers.logged_eval(str(tmp_path), 6)['eval/top1'] == 0.75
  assert writers.logged_eval(str(tmp_path), 4) == {}
  assert writers.logged_eval(str(tmp_path / 'none'), 6) == {}


def test_first_line_has_no_nan_and_later_lines_show_input_wait():
  out = io.StringIO()
  progress = writers.ProgressReporter(total_steps=10, batch_size=8, out=out)
  metrics = {'train/loss': 1.0, 'train/top1': 0.5, 'train/lr': 0.1}
  # Logged right after the first step: no window to measure yet.
  first = progress.train_line(1, metrics, progress.rate(1))
  assert 'nan' not in first and 'img/s' not in first
  progress.start(1)
  progress.waited(0.03)
  time.sleep(0.1)
  rate = progress.rate(3)
  # 2 steps of 8 images in >= 0.1 s, 0.03 s of which waiting for input.
  assert 0 < rate.images_per_sec <= 16 / 0.1
  assert 0 < rate.input_wait <= 0.03 / 0.1
  assert rate.eta_s == pytest.approx(7 * 16 / rate.images_per_sec / 2)
  line = progress.train_line(3, metrics, rate)
  assert 'img/s' in line and 'input_wait' in line and 'nan' not in line
  assert math.isnan(progress.rate(3).images_per_sec)  # No step since.


def test_eval_progress_reports_examples_and_eta():
  lines = []
  progress = writers.EvalProgress(1000, lines.append, every_s=0.0)
  time.sleep(0.05)
  progress.update('eval', 250)
  assert len(lines) == 1
  assert lines[0].startswith('  eval: 250/1000 examples (25%), ETA 0:00:0')
  quiet = writers.EvalProgress(1000, lines.append, every_s=3600.0)
  quiet.update('eval', 500)
  assert len(lines) == 1  # Short evaluations print nothing.
