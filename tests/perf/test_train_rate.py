"""scripts/train_rate.py: a run's steady rate against the right benchmark.

The benchmark JSON holds several results (models, batches, dtypes,
augmentation placements); the run must be compared with the one that times
its own step, read from its config.json and segment records, never with
the first in the file.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(
  os.path.dirname(__file__), '..', '..', 'scripts', 'train_rate.py'
)


def _script():
  spec = importlib.util.spec_from_file_location('train_rate', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _result(
  images_per_s, batch=32, size=192, augment='none', dtype='bfloat16',
  model='NFNet-F0', **options,
):  # fmt: skip
  if model.startswith('NFNet'):
    options = {'variant': 'F0', 'width': 1.0, 'depth': None, **options}
  return dict(
    model=model, batch_size=batch, image_size=size, dtype=dtype,
    images_per_s=images_per_s, options={**options, 'augment': augment},
  )  # fmt: skip


def _workdir(path, optimizer=None, auto_choices=None, **data):
  """A run's workdir with the config.json (and segment record) it reads."""
  os.makedirs(path)
  config = {
    'model': {'name': 'NFNet', 'kwargs': {'variant': 'F0', 'width': 1.0}},
    'train': {'batch_size': 32, 'compute_dtype': 'bfloat16'},
    'data': {'train_image_size': 192, 'mixup_alpha': 0.0, **data},
    'optimizer': {'sam_rho': 0.0, **(optimizer or {})},
  }
  (path / 'config.json').write_text(json.dumps(config))
  if auto_choices is not None:  # As nfnets.train.provenance records them.
    (path / 'configs').mkdir()
    record = {'segment': 0, 'auto_choices': auto_choices, 'config': config}
    (path / 'configs' / 'segment_000_step_0.json').write_text(
      json.dumps(record)
    )
  return str(path)


RECIPE = dict(mixup_alpha=0.2, cutmix=True, randaugment='405')


def test_the_result_of_the_runs_model_batch_size_and_augment(tmp_path):
  rate = _script()._benchmark_rate
  bench = tmp_path / 'bench.json'
  bench.write_text(json.dumps([
    _result(900.0, batch=8),  # First in the file: another batch.
    _result(800.0, width=0.5),
    _result(700.0, size=224),
    _result(600.0),
    _result(500.0, augment='device'),
  ]))  # fmt: skip
  plain = _workdir(tmp_path / 'plain')
  assert rate(str(bench), plain, 'auto') == 600.0
  recipe = _workdir(tmp_path / 'recipe', augment_on='device', **RECIPE)
  assert rate(str(bench), recipe, 'auto') == 500.0  # Augments on device.
  assert rate(str(bench), recipe, 'none') == 600.0
  bench.write_text(json.dumps([_result(900.0, batch=8)]))
  with pytest.raises(
    SystemExit, match='batch 8 at 192 px, bfloat16, augment=none'
  ):
    rate(str(bench), plain, 'auto')


def test_another_model_family_never_matches(tmp_path):
  # An NF-ResNet-50 result records no variant, width or depth: before, the
  # missing keys counted as matching, so it stood for an F0 run.
  rate = _script()._benchmark_rate
  bench = tmp_path / 'bench.json'
  bench.write_text(json.dumps([
    _result(900.0, model='NF-ResNet-50'),
    _result(800.0, model='NFNet-F1', variant='F1'),
    _result(700.0, remat=True),  # The F0 step, rematerialised.
    _result(600.0),
  ]))  # fmt: skip
  assert rate(str(bench), _workdir(tmp_path / 'f0'), 'auto') == 600.0
  bench.write_text(json.dumps([_result(900.0, model='NF-ResNet-50')]))
  with pytest.raises(SystemExit, match='holds: NF-ResNet-50 batch 32'):
    rate(str(bench), _workdir(tmp_path / 'f0_again'), 'auto')


def test_the_runs_compute_dtype_picks_the_result(tmp_path):
  rate = _script()._benchmark_rate
  bench = tmp_path / 'bench.json'
  # A CPU benchmark defaults to float32; the run trained in bfloat16.
  bench.write_text(json.dumps([_result(900.0, dtype='float32')]))
  with pytest.raises(SystemExit, match='float32'):
    rate(str(bench), _workdir(tmp_path / 'run'), 'auto')
  bench.write_text(json.dumps([
    _result(900.0, dtype='float32'), _result(300.0),
  ]))  # fmt: skip
  assert rate(str(bench), _workdir(tmp_path / 'again'), 'auto') == 300.0


def test_paper_table_rows_are_read_through_their_result(tmp_path):
  # --table=paper rows are {'paper', 'result', 'breakdown'}: before, a
  # KeyError 'options' instead of a match or the list of what it holds.
  rate = _script()._benchmark_rate
  bench = tmp_path / 'paper.json'
  row = {'paper': {'label': 'NFNet-F0'}, 'breakdown': []}
  bench.write_text(json.dumps([{**row, 'result': _result(400.0)}]))
  assert rate(str(bench), _workdir(tmp_path / 'f0'), 'auto') == 400.0
  other = {**row, 'result': _result(400.0, model='BN-ResNet-50')}
  bench.write_text(json.dumps([other]))
  with pytest.raises(SystemExit, match='it holds: BN-ResNet-50 batch 32'):
    rate(str(bench), _workdir(tmp_path / 'f0_again'), 'auto')


def test_augment_auto_follows_where_the_run_augmented(tmp_path):
  rate = _script()._benchmark_rate
  bench = tmp_path / 'bench.json'
  bench.write_text(json.dumps([
    _result(600.0),
    _result(500.0, augment='device'),
    _result(400.0, augment='device_reference'),
  ]))  # fmt: skip
  # 'auto' resolved to the host on a CPU: the step gets augmented floats.
  # Before, any recipe meant 'device'.
  cpu = _workdir(
    tmp_path / 'cpu', augment_on='auto', **RECIPE,
    auto_choices={'data.augment_on': 'host', 'data.mix_pairing': 'reference'},
  )  # fmt: skip
  assert rate(str(bench), cpu, 'auto') == 600.0
  gpu = _workdir(
    tmp_path / 'gpu', augment_on='auto', **RECIPE,
    auto_choices={'data.augment_on': 'device', 'data.mix_pairing': 'in_batch'},
  )  # fmt: skip
  assert rate(str(bench), gpu, 'auto') == 500.0
  reference = _workdir(
    tmp_path / 'ref', augment_on='device', mix_pairing='reference', **RECIPE
  )
  assert rate(str(bench), reference, 'auto') == 400.0
  host = _workdir(tmp_path / 'host', augment_on='host', **RECIPE)
  assert rate(str(bench), host, 'auto') == 600.0
  unknown = _workdir(tmp_path / 'unknown', augment_on='auto', **RECIPE)
  with pytest.raises(SystemExit, match='pass --augment=device'):
    rate(str(bench), unknown, 'auto')


def test_a_run_with_sam_takes_the_result_of_its_sam_form(tmp_path):
  rate = _script()._benchmark_rate
  bench = tmp_path / 'bench.json'
  bench.write_text(json.dumps([
    _result(600.0),  # Written before --sam existed: SAM off.
    _result(400.0, sam='sync'),
    _result(500.0, sam='paper'),
  ]))  # fmt: skip
  assert rate(str(bench), _workdir(tmp_path / 'off'), 'auto') == 600.0
  paper = {'sam_rho': 0.05, 'sam_ascent_fraction': 0.2}
  paper['sam_ascent_sync'] = False
  assert rate(str(bench), _workdir(tmp_path / 'p', paper), 'auto') == 500.0
  synced = _workdir(tmp_path / 's', {'sam_rho': 0.05})  # Older config.json.
  assert rate(str(bench), synced, 'auto') == 400.0
  other = _workdir(tmp_path / 'o', {**paper, 'sam_ascent_fraction': 0.5})
  with pytest.raises(SystemExit, match='sam=paper'):
    rate(str(bench), other, 'auto')


def test_the_output_says_the_benchmark_runs_without_ema(tmp_path):
  bench = tmp_path / 'bench.json'
  bench.write_text(json.dumps([_result(400.0)]))
  workdir = _workdir(tmp_path / 'run', {'ema_decay': 0.99999})
  records = [{'step': s, 'train/images_per_sec': 300.0} for s in (60, 70)]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in records))
  proc = subprocess.run(
    [sys.executable, SCRIPT, f'--workdir={workdir}',
     f'--benchmark_json={bench}'],
    capture_output=True, text=True, check=True, timeout=120,
  )  # fmt: skip
  out = json.loads(proc.stdout)
  assert out['fraction'] == 0.75
  assert out['benchmark_result'] == (
    'NFNet-F0 batch 32 at 192 px, bfloat16, augment=none, sam=off'
  )
  assert 'the benchmark step runs with EMA off' in out['note']
  assert 'decay 0.99999' in out['note']
