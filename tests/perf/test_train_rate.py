"""scripts/train_rate.py: a run's steady rate against the right benchmark.

The benchmark JSON holds several results (models, batches, augmentation
placements); the run must be compared with the one that times its own
step, read from its config.json, never with the first in the file.
"""

import importlib.util
import json
import os

import pytest

SCRIPT = os.path.join(
  os.path.dirname(__file__), '..', '..', 'scripts', 'train_rate.py'
)


def _script():
  spec = importlib.util.spec_from_file_location('train_rate', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _result(images_per_s, batch=32, size=192, augment='none', **options):
  options = {'variant': 'F0', 'width': 1.0, 'depth': None, **options}
  return dict(
    model='NFNet-F0', batch_size=batch, image_size=size,
    images_per_s=images_per_s, options={**options, 'augment': augment},
  )  # fmt: skip


def _workdir(path, optimizer=None, **data):
  """A run's workdir with only the config.json the script reads."""
  os.makedirs(path)
  config = {
    'model': {'name': 'NFNet', 'kwargs': {'variant': 'F0', 'width': 1.0}},
    'train': {'batch_size': 32},
    'data': {'train_image_size': 192, 'mixup_alpha': 0.0, **data},
    'optimizer': {'sam_rho': 0.0, **(optimizer or {})},
  }
  (path / 'config.json').write_text(json.dumps(config))
  return str(path)


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
  recipe = _workdir(tmp_path / 'recipe', mixup_alpha=0.2, randaugment='405')
  assert rate(str(bench), recipe, 'auto') == 500.0  # Augments on device.
  assert rate(str(bench), recipe, 'none') == 600.0
  bench.write_text(json.dumps([_result(900.0, batch=8)]))
  with pytest.raises(SystemExit, match='batch 8 at 192 px, augment=none'):
    rate(str(bench), plain, 'auto')


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
