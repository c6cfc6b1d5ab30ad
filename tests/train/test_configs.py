"""Tests for configs/*.py: every file loads and locks, the paper's recipe,
command-line overrides and their errors.

Expected values are the published ones (Brock et al. 2021, Table 1 and
Appendix A.1/A.5), written out here rather than read from nfnets.models.nfnet.
"""

import glob
import importlib
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from nfnets import optim

REPO = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
CONFIG_FILES = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
  if not os.path.basename(p).startswith(('_', 'common'))
)
SECTIONS = {'model', 'data', 'optimizer', 'train', 'eval', 'checkpoint'}

# Paper Table 1: (train size, test size, dropout); App. A.3: RA magnitude.
PAPER = {
  'F0': (192, 256, 0.2, '405'),
  'F1': (224, 320, 0.3, '410'),
  'F2': (256, 352, 0.4, '410'),
  'F3': (320, 416, 0.4, '415'),
  'F4': (384, 512, 0.5, '415'),
  'F5': (416, 544, 0.5, '415'),
  'F6': (448, 576, 0.5, '415'),
  'F7': (480, 608, 0.5, '415'),
}


def _load(name, arg=None):
  module = importlib.import_module(f'configs.{name}')
  return module.get_config(arg) if arg is not None else module.get_config()


def test_all_expected_config_files_exist():
  want = {f'f{i}' for i in range(8)} | {'quickstart', 'finetune'}
  assert want <= set(CONFIG_FILES)


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_config_loads_locks_and_has_all_sections(name):
  config = _load(name)
  assert isinstance(config, ml_collections.ConfigDict)
  assert SECTIONS <= set(config.keys())
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.train.not_a_key = 1
  with pytest.raises(AttributeError):
    config.optimizer.lrr = 1


@pytest.mark.parametrize('variant', sorted(PAPER))
def test_variant_configs_hold_the_paper_recipe(variant):
  train_size, test_size, _, ra = PAPER[variant]
  config = _load(variant.lower())
  assert config.model.name == 'NFNet'
  assert config.model.kwargs.variant == variant
  assert config.model.kwargs.stochdepth_rate == 0.25
  assert config.model.kwargs.drop_rate is None  # The variant's own dropout.
  assert config.data.name == 'imagenet2012'
  assert (config.data.train_image_size, config.data.eval_image_size) == (
    train_size,
    test_size,
  )
  assert config.data.randaugment == ra
  assert config.data.mixup_alpha == 0.2 and config.data.cutmix
  assert not config.data.augment_before_mix
  opt = config.optimizer
  assert (opt.name, opt.lr, opt.scale_lr_by_batch) == ('sgd_agc', 0.1, True)
  assert (opt.warmup_epochs, opt.momentum, opt.nesterov) == (5, 0.9, True)
  assert (opt.weight_decay, opt.clipping, opt.ema_decay) == (
    2e-5,
    0.01,
    0.99999,
  )
  assert opt.min_lr == 0 and opt.sam_rho == 0
  assert config.train.batch_size == 4096 and config.train.num_epochs == 360
  assert config.train.compute_dtype == 'bfloat16'
  assert config.train.label_smoothing == 0.1


def test_plus_argument_selects_the_wider_variant():
  assert _load('f4', 'plus').model.kwargs.variant == 'F4+'
  assert _load('f0', '+').model.kwargs.variant == 'F0+'
  with pytest.raises(ValueError, match='plus'):
    _load('f0', 'wide')


def test_finetune_config_holds_the_transfer_recipe():
  config = _load('finetune')
  kw, opt = config.model.kwargs, config.optimizer
  assert (kw.variant, kw.drop_rate, kw.stochdepth_rate) == ('F0', 0.25, 0.1)
  assert config.model.init_from.endswith('F0_haiku.npz')
  assert config.model.reinit_modules == ('NFNet/~/linear',)
  assert (opt.lr, opt.scale_lr_by_batch, opt.warmup_steps) == (0.1, False, 5000)
  assert (opt.sam_rho, opt.weight_decay) == (0.05, 1e-5)
  assert (opt.sam_ascent_fraction, opt.sam_ascent_sync) == (0.2, False)
  assert config.train.batch_size == 2048 and config.train.num_steps == 15000
  assert _load('finetune', 'F3').data.train_image_size == 320


def test_quickstart_runs_in_float32_on_digits():
  config = _load('quickstart')
  assert config.data.name == 'digits'
  assert config.train.compute_dtype == 'float32'
  assert config.data.train_image_size == 32


def test_run_length_counts_whole_batches_as_the_reference():
  from nfnets.train import config as config_lib  # noqa: PLC0415

  # The reference: training_steps = 1281167 * 360 // 4096 (112,602.57).
  f0 = _load('f0').train
  assert config_lib.run_length(f0, 1_281_167) == (112_602, 1_281_167 / 4096)
  # The quickstart: 8 epochs of 1,437 digits at 64 = 179.625 batches.
  assert config_lib.run_length(_load('quickstart').train, 1437)[0] == 179
  # Epochs as written: 2.3 epochs of 100 examples are 230 batches of 1,
  # where the binary product 2.3 * 100 is 229.99999999999997.
  train = ml_collections.ConfigDict(
    {'num_steps': 0, 'num_epochs': 2.3, 'batch_size': 1}
  )
  assert 2.3 * 100 < 230 and config_lib.run_length(train, 100)[0] == 230
  train.num_epochs, train.batch_size = 0.05, 10  # 5 examples: no batch.
  with pytest.raises(ValueError) as error:
    config_lib.run_length(train, 100)
  assert str(error.value) == (
    'config.train.num_epochs=0.05 of 100 examples is less than one batch of '
    '10: train more epochs, or set config.train.num_steps.'
  )
  train.num_steps = 5  # num_steps > 0 decides.
  assert config_lib.run_length(train, 10)[0] == 5


def test_negative_num_steps_and_unknown_dataset_are_refused():
  from nfnets.train import config as config_lib  # noqa: PLC0415

  config = _load('quickstart')
  config.train.num_steps = -5  # Was silently the num_epochs schedule.
  with pytest.raises(ValueError, match=r'num_steps=-5: use a number'):
    config_lib.validate_config(config)
  config.train.num_steps = 0  # 0 is documented: num_epochs decides.
  config_lib.validate_config(config)
  config.data.name = 'digitz'  # Checked with the config, before a resume.
  with pytest.raises(ValueError, match="Unknown dataset 'digitz'"):
    config_lib.validate_config(config)
  # Hosts slicing one global batch each must build the same one: tf.data's
  # order varies with thread timing when not deterministic.
  config = _load('quickstart')
  config.train.host_input, config.data.deterministic = 'slice', False
  with pytest.raises(ValueError, match="'slice' needs config.data.determ"):
    config_lib.validate_config(config)
  config.data.loader = 'python'  # Its order never varies.
  config_lib.validate_config(config)
  config.data.loader, config.data.deterministic = 'auto', True
  config_lib.validate_config(config)


def test_checkpoint_and_eval_cadences_are_checked(tmp_path):
  from nfnets.train import config as config_lib  # noqa: PLC0415

  for key, value, message in (
    ('checkpoint.max_to_keep', 0, 'max_to_keep must be >= 1'),  # Kept none.
    ('checkpoint.every_steps', -5, 'checkpoint.every_steps must be >= 0'),
    ('eval.every_steps', -1, 'eval.every_steps must be >= 0'),
  ):
    config = _load('quickstart')
    section, name = key.split('.')
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
      config_lib.validate_config(config)
  # Checkpoints off over a run that has some: refused, not a silent restart.
  config = _load('quickstart')
  config.checkpoint.enabled = False
  config_lib.check_workdir(config, str(tmp_path))  # A new run: fine.
  os.makedirs(tmp_path / 'checkpoints' / '40')
  with pytest.raises(ValueError, match='checkpoints .newest: step 40.'):
    config_lib.check_workdir(config, str(tmp_path))
  config.checkpoint.enabled = True
  config_lib.check_workdir(config, str(tmp_path))
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match='is a file; pass a directory'):
    config_lib.check_workdir(config, str(tmp_path / 'file'))
  # A folder whose config.json no run wrote (a model's, say): training
  # would replace it. A run's config.json, or one with records, is a run.
  foreign = tmp_path / 'model'
  foreign.mkdir()
  (foreign / 'config.json').write_text('{"architectures": ["NFNet"]}')
  with pytest.raises(ValueError) as error:
    config_lib.check_workdir(config, str(foreign))
  assert str(error.value) == (
    f"{foreign / 'config.json'} is not a training run's config (no model, "
    'data and train sections), and training would replace it: pass a new '
    "--workdir, or a run's."
  )
  (foreign / 'config.json').write_text(config.to_json_best_effort())
  config_lib.check_workdir(config, str(foreign))
  (foreign / 'config.json').write_text('{"train": ')  # Damaged...
  (foreign / 'configs').mkdir()  # ...but restored from the records.
  config_lib.check_workdir(config, str(foreign))


def test_a_config_missing_a_section_or_key_names_it():
  from nfnets.train import config as config_lib  # noqa: PLC0415

  # Each was an AttributeError naming only the key ("'eval'").
  with pytest.raises(ValueError, match='is a dict, not an ml_collections'):
    config_lib.validate_config(_load('quickstart').to_dict())
  config = ml_collections.ConfigDict(_load('quickstart').to_dict())
  del config['eval']
  with pytest.raises(ValueError, match='lacks the section.s. eval: start'):
    config_lib.validate_config(config)
  config = ml_collections.ConfigDict(_load('quickstart').to_dict())
  del config.train['batch_size']
  with pytest.raises(ValueError, match='config.train lacks batch_size'):
    config_lib.validate_config(config)


def _parse(argv):
  """Parses --config flags like experiments/train.py, in a private registry."""
  values = flags.FlagValues()
  argv = ['prog', *argv]
  # The override flags are declared from `sys_argv` when --config is defined.
  config_flags.DEFINE_config_file(
    'config', flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def test_command_line_overrides_change_the_run():
  path = os.path.join(REPO, 'configs', 'f0.py')
  config = _parse(
    [
      f'--config={path}',
      '--config.optimizer.clipping=0.02',
      '--config.train.batch_size=1024',
      '--config.model.kwargs.depth=(1,1,1,1)',
    ]
  )
  assert config.optimizer.clipping == 0.02
  assert config.model.kwargs.depth == (1, 1, 1, 1)
  # The batch size flows into the derived LR: 0.1 * 1024 / 256 at the peak.
  _, schedule = optim.make_optimizer(
    config.optimizer,
    steps_per_epoch=10,
    total_steps=1000,
    global_batch_size=config.train.batch_size,
  )
  assert float(schedule(50)) == pytest.approx(0.4)
  plus = _parse([f'--config={path}:plus'])
  assert plus.model.kwargs.variant == 'F0+'


def test_unknown_override_key_fails_with_a_clear_error(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.train',
      '--config=configs/quickstart.py',
      f'--workdir={tmp_path}',
      '--config.optimzer.lr=0.2',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2
  assert 'Did you mean "optimizer"' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.listdir(tmp_path)  # Nothing ran.
