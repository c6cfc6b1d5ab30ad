"""Tests for nfnets.train.provenance: a run's configs and the resume rules."""

import json
import os

import ml_collections
import pytest
from ml_collections import config_dict

from configs import f0, finetune, quickstart
from nfnets.train import config_json, provenance, resume_rules

CONFIGS = {
  'quickstart': quickstart.get_config,
  'f0': f0.get_config,
  'f0_plus': lambda: f0.get_config('plus'),
  'finetune': lambda: finetune.get_config('F0'),
}


def _leaves(config, prefix=''):
  """`{key: (value, declared type)}`, read through ConfigDict's own API."""
  out = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_leaves(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = (value, config.get_type(key))
  return out


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_saved_config_reads_back_with_its_types(tmp_path, name):
  config = CONFIGS[name]()
  provenance.write_segment(
    str(tmp_path), config, start_step=0, changes=[], num_devices=1
  )
  loaded = provenance.load_run_config(str(tmp_path))
  want, got = _leaves(config), _leaves(loaded)
  assert sorted(got) == sorted(want)
  for key, (value, kind) in want.items():
    # Same value, same Python type (tuples stay tuples), same declared
    # type (a None placeholder keeps its int/float/tuple type).
    assert got[key][0] == value and type(got[key][0]) is type(value), key
    assert got[key][1] is kind, key
  assert loaded.is_locked
  # Overrides type-check as on the config file: a placeholder takes its
  # type only.
  loaded.optimizer.warmup_steps = 7
  with pytest.raises(TypeError):
    loaded.optimizer.warmup_steps = 'seven'


def test_config_json_is_the_plain_latest_config(tmp_path):
  config = quickstart.get_config()
  provenance.write_segment(
    str(tmp_path), config, start_step=0, changes=[], num_devices=1
  )
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  assert saved == json.loads(config.to_json_best_effort())
  assert saved['model']['kwargs']['depth'] == [1, 1, 1, 1]


def test_workdir_without_records_reads_lists_as_tuples(tmp_path):
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'model': {'kwargs': {'depth': [1, 2]}, 'name': 'NFNet'}}, f)
  loaded = provenance.load_run_config(str(tmp_path))
  assert loaded.model.kwargs.depth == (1, 2)
  with pytest.raises(FileNotFoundError, match='training run'):
    provenance.load_run_config(str(tmp_path / 'nowhere'))


def test_differences_name_each_key_and_both_values():
  old = ml_collections.ConfigDict(
    {'optimizer': {'lr': 0.1, 'name': 'sgd_agc'}, 'train': {'seed': 0}}
  )
  new = ml_collections.ConfigDict(
    {'optimizer': {'lr': 0.3, 'name': 'sgd_agc'}, 'train': {'seed': 0}}
  )
  new.model = ml_collections.ConfigDict({'depth': (1, 2)})
  assert resume_rules.config_differences(old, new) == [
    'model.depth: (absent) -> (1, 2)',
    'optimizer.lr: 0.1 -> 0.3',
  ]
  # A config read back from JSON (lists) equals the one it came from.
  as_json = json.loads(new.to_json())
  assert resume_rules.config_differences(new, as_json) == []


def test_resume_refuses_training_changes_and_allows_cadence():
  old = quickstart.get_config()
  new = quickstart.get_config()
  new.optimizer.lr = 0.3
  new.train.num_epochs = 20.0
  new.train.log_every_steps = 5
  new.checkpoint.every_steps = 50
  with pytest.raises(resume_rules.ConfigChangeError) as e:
    resume_rules.check_resume(old, new, step=100, allow_change=False)
  message = str(e.value)
  assert '  optimizer.lr: 0.1 -> 0.3' in message
  assert '--allow_config_change' in message
  # Only the training change is listed as a reason to refuse.
  assert 'num_epochs' not in message and 'log_every_steps' not in message
  lines = resume_rules.check_resume(old, new, step=100, allow_change=True)
  assert lines == [
    'checkpoint.every_steps: 100 -> 50',
    'optimizer.lr: 0.1 -> 0.3',
    'train.log_every_steps: 20 -> 5',
    'train.num_epochs: 8.0 -> 20.0',
  ]
  new.optimizer.lr = 0.1
  assert (
    len(resume_rules.check_resume(old, new, step=1, allow_change=False)) == 3
  )


def test_a_damaged_config_json_is_replaced_by_the_latest_record(tmp_path):
  # It used to let any change through: the run looked like a new one.
  workdir = str(tmp_path)
  old = quickstart.get_config()
  provenance.write_segment(
    workdir, old, start_step=0, changes=[], num_devices=1
  )
  saved = tmp_path / 'config.json'
  saved.write_text(saved.read_text()[:200])  # Cut by a full disk, say.
  new = quickstart.get_config()
  new.optimizer.lr = 0.3
  warnings = []
  previous = provenance.previous_config(workdir, log=warnings.append)
  assert resume_rules.config_differences(old, previous) == []
  record = tmp_path / 'configs' / 'segment_000_step_0.json'
  (warning,) = warnings
  assert warning.startswith(f"Warning: '{saved}' is not valid JSON: ")
  assert warning.endswith(f'. Comparing with the segment record {record}.')
  with pytest.raises(resume_rules.ConfigChangeError, match='optimizer.lr'):
    provenance.resume_changes(
      new, workdir, latest_step=10, allow_change=False, auto_choices={}
    )
  # A deleted one too.
  saved.unlink()
  warnings.clear()
  previous = provenance.previous_config(workdir, log=warnings.append)
  assert resume_rules.config_differences(old, previous) == []
  assert warnings == [
    f'Warning: {saved} is missing. Comparing with the segment record {record}.'
  ]


def test_a_resume_where_auto_chooses_another_recipe_is_refused(tmp_path):
  # The run started on a CPU host (augmentation there); its resume on a GPU
  # host would switch to on-device augmentation, silently.
  workdir, config = str(tmp_path), quickstart.get_config()
  on_cpu = {'data.loader': 'tf', 'data.augment_on': 'host'}
  on_gpu = {'data.loader': 'tf', 'data.augment_on': 'device'}
  provenance.write_segment(
    workdir, config, start_step=0, changes=[], num_devices=1,
    auto_choices=on_cpu,
  )  # fmt: skip

  def resume(config, choices, allow_change=False):
    return provenance.resume_changes(
      config, workdir, latest_step=5, allow_change=allow_change,
      auto_choices=choices,
    )  # fmt: skip

  assert resume(config, on_cpu) == []
  with pytest.raises(resume_rules.ConfigChangeError) as error:
    resume(config, on_gpu)
  assert "\n  data.augment_on: 'host' -> 'device'\n" in str(error.value)
  assert str(error.value).endswith(
    "\nSettings at 'auto' chose otherwise on this host than when the run "
    "trained; to keep the run's recipe, pin them: "
    '--config.data.augment_on=host.'
  )
  # Pinned to the run's choice it is no change, on any host.
  pinned = ml_collections.ConfigDict(config.to_dict())
  pinned.data.augment_on = 'host'
  assert resume(pinned, {'data.loader': 'tf'}) == []
  assert resume(config, on_gpu, allow_change=True) == [
    "data.augment_on: 'host' -> 'device'"
  ]
  # A value given against the run's choice is a change, not a choice.
  device = ml_collections.ConfigDict(config.to_dict())
  device.data.augment_on = 'device'
  with pytest.raises(resume_rules.ConfigChangeError) as error:
    resume(device, {'data.loader': 'tf'})
  assert 'pin them' not in str(error.value)
  # Pinned by the run, 'auto' now compares as its choice here.
  provenance.write_segment(
    workdir, pinned, start_step=3, changes=[], num_devices=1,
    auto_choices={'data.loader': 'tf'},
  )  # fmt: skip
  assert resume(config, on_cpu) == []
  with pytest.raises(resume_rules.ConfigChangeError, match='pin them'):
    resume(config, on_gpu)
  # Each segment records its choices; records without them change nothing.
  records = [r for _, r in provenance.segment_records(workdir)]
  assert [r['auto_choices'] for r in records] == [on_cpu, {'data.loader': 'tf'}]
  provenance.write_segment(
    workdir, config, start_step=5, changes=[], num_devices=1, auto_choices={}
  )
  assert resume(config, on_gpu) == []


def test_a_key_newer_than_the_run_is_no_change_at_its_default():
  """A run saved before `optimizer.freeze_stages` existed resumes with it
  at 0 (the code's behaviour before the key), but not at 2."""
  new = quickstart.get_config()
  old = config_json.config_record(new)['config']
  del old['optimizer']['freeze_stages']
  assert resume_rules.check_resume(old, new, step=5, allow_change=False) == [
    'optimizer.freeze_stages: (absent) -> 0'
  ]
  new.optimizer.freeze_stages = 2
  with pytest.raises(resume_rules.ConfigChangeError, match=r'\(absent\) -> 2'):
    resume_rules.check_resume(old, new, step=5, allow_change=False)
  # The defaults come from the library's own config groups.
  assert resume_rules.library_defaults()['optimizer.freeze_stages'] == 0


@pytest.mark.parametrize(
  'key,safe',
  [
    ('train.num_steps', True),
    ('train.distributed.num_processes', True),
    ('eval.every_steps', True),
    ('data.eval_image_size', True),
    ('data.train_image_size', False),
    ('train.batch_size', False),
    ('train.seed', False),
    ('model.kwargs.width', False),
    ('optimizer.warmup_epochs', False),
  ],
)
def test_resume_safe_keys(key, safe):
  assert resume_rules.is_resume_safe(key) is safe


def test_micro_batches_may_change_only_without_batch_statistics():
  # Each micro-batch is normalised alone: for a BatchNorm model another
  # grad_accum_steps is another function, for the others the same update.
  def configs(name, kwargs):
    old = quickstart.get_config()
    old.model.name, old.model.kwargs = name, kwargs
    new = ml_collections.ConfigDict(old.to_dict())
    new.train.grad_accum_steps = 4
    return old, new

  change = ['train.grad_accum_steps: 1 -> 4']
  for name, kwargs, refused in (
    ('NFNet', {'variant': 'F0'}, False),
    ('ResNet', {'depth': 50, 'norm': 'none'}, False),
    ('ResNet', {'depth': 50}, True),  # BatchNorm by default.
    ('EfficientNet', {'variant': 'B0'}, True),
  ):
    old, new = configs(name, kwargs)
    assert resume_rules.unsafe_changes(old, new) == (change if refused else [])
    if refused:
      with pytest.raises(resume_rules.ConfigChangeError, match='grad_accum'):
        resume_rules.check_resume(old, new, step=3, allow_change=False)


def test_micro_batches_may_not_change_under_sam_by_replica():
  # A SAM replica is one device's share of one micro-batch: another
  # grad_accum_steps is another perturbation, unless every row ascends
  # together (synced, fraction 1).
  change = ['train.grad_accum_steps: 1 -> 4']
  for fraction, sync, refused in (
    (1.0, True, False),
    (0.2, True, True),
    (1.0, False, True),
  ):
    old = quickstart.get_config()
    old.optimizer.update(
      sam_rho=0.05, sam_ascent_fraction=fraction, sam_ascent_sync=sync
    )
    new = ml_collections.ConfigDict(old.to_dict())
    new.train.grad_accum_steps = 4
    assert resume_rules.unsafe_changes(old, new) == (change if refused else [])


def test_refusal_gives_the_flags_that_resume_as_the_run_trained():
  # A run saved before the SAM keys existed trained at their defaults; a
  # config that sets them (configs/finetune.py) is refused, and the
  # message gives the flags that restore the run's values.
  old = quickstart.get_config().to_dict()
  del old['optimizer']['sam_ascent_fraction']
  del old['optimizer']['sam_ascent_sync']
  old['optimizer']['sam_rho'] = 0.05
  new = quickstart.get_config()
  new.optimizer.update(
    sam_rho=0.05, sam_ascent_fraction=0.2, sam_ascent_sync=False, lr=0.3
  )
  with pytest.raises(resume_rules.ConfigChangeError) as error:
    resume_rules.check_resume(old, new, step=7, allow_change=False)
  assert (
    "give those keys the run's values (--config.optimizer.lr=0.1 "
    '--config.optimizer.sam_ascent_fraction=1.0 '
    '--config.optimizer.sam_ascent_sync=True)'
  ) in str(error.value)
  new.optimizer.update(lr=0.1, sam_ascent_fraction=1.0, sam_ascent_sync=True)
  assert resume_rules.unsafe_changes(old, new) == []
  # Text the shell would expand is quoted; what config_flags parses back
  # to the run's value is printed.
  old['data']['train_split'] = 'train[10000:]'
  with pytest.raises(resume_rules.ConfigChangeError) as error:
    resume_rules.check_resume(old, new, step=7, allow_change=False)
  assert "('--config.data.train_split=train[10000:]')" in str(error.value)


def test_segments_are_numbered_and_record_changes(tmp_path):
  workdir = str(tmp_path)
  config = quickstart.get_config()
  provenance.start_segment(
    workdir, config, start_step=0, total_steps=10, changes=[],
    num_devices=8, log=lambda line: None,
  )  # fmt: skip
  changed = quickstart.get_config()
  changed.optimizer.lr = 0.3
  changes = provenance.resume_changes(
    changed, workdir, latest_step=4, allow_change=True
  )
  provenance.start_segment(
    workdir, changed, start_step=4, total_steps=10, changes=changes,
    num_devices=1, log=lambda line: None,
  )  # fmt: skip
  # A finished run rerun with the same config records nothing.
  provenance.start_segment(
    workdir, changed, start_step=10, total_steps=10, changes=[],
    num_devices=1, log=lambda line: None,
  )  # fmt: skip
  names = sorted(os.listdir(tmp_path / 'configs'))
  assert names == ['segment_000_step_0.json', 'segment_001_step_4.json']
  with open(tmp_path / 'configs' / names[1]) as f:
    record = json.load(f)
  assert record['changes'] == ['optimizer.lr: 0.1 -> 0.3']
  assert record['start_step'] == 4 and record['num_devices'] == 1
  first = config_json.config_from_record(
    provenance.segment_records(workdir)[0][1]
  )
  assert first.optimizer.lr == 0.1
  assert provenance.load_run_config(workdir).optimizer.lr == 0.3
  # Without a checkpoint there is nothing to resume: any change is allowed.
  assert provenance.resume_changes(
    config, workdir, latest_step=None, allow_change=False
  ) == ['optimizer.lr: 0.3 -> 0.1']


def test_placeholder_type_survives_a_record():
  config = ml_collections.ConfigDict({'a': config_dict.placeholder(float)})
  again = config_json.config_from_record(config_json.config_record(config))
  assert again.a is None and again.get_type('a') is float
  again.a = 2  # An int becomes the declared float.
  assert isinstance(again.a, float)
