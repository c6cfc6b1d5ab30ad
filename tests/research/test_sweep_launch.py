"""Tests for research.sweep_launch: printed commands give the points' configs.

Each printed line is split as a POSIX shell splits it and its flags parsed
by ml_collections' config_flags, as `experiments.train` parses them; the
config that comes out must be the point's.
"""

import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from nfnets.research import sweep as sweep_lib
from nfnets.train import resume_rules


def _parse(line: str):
  """(config, workdir) as `python -m experiments.train` would get them."""
  words = shlex.split(line)
  assert words[:3] == ['python', '-m', 'experiments.train']
  argv = ['train', *words[3:]]
  flag_values = flags.FlagValues()
  # config_flags reads the overrides' names from the command line.
  config = config_flags.DEFINE_config_file(
    'config', None, '', flag_values, lock_config=True, sys_argv=argv
  )
  workdir = flags.DEFINE_string('workdir', None, '', flag_values=flag_values)
  flag_values(argv)
  return config.value, workdir.value


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_printed_flags_parse_back_to_the_point_configs(tmp_path):
  # A tuple was printed as '(linear,bias,)' (one string, 'linear,bias,'),
  # a path with a space split in two words, a dict broke the shell.
  outdir = str(tmp_path / 'my sweeps')
  sweep = sweep_lib.Sweep(
    name='s',
    base_config='configs/quickstart.py',
    axes=(
      ('optimizer.agc_exclude', (('linear',), ('linear', 'bias'), ())),
      ('optimizer.lr', (0.1, 0.3000001)),
    ),
    overrides={
      'model.name': 'ResNet',
      'model.kwargs': {'width': 0.25, 'depth': (1, 1, 1, 1)},
      'data.folder_root': "/tmp/my data/it's",
      'data.cutmix': True,
      'optimizer.weight_decay': 1e-5,
      'train.num_steps': 2,
    },
  )
  lines = sweep_lib.launch_lines(sweep, outdir)
  configured = sweep_lib.point_configs(sweep)
  assert len(lines) == len(configured) == 6
  for line, (point, expected) in zip(lines, configured, strict=True):
    config, workdir = _parse(line)
    assert workdir == f'{outdir}/{point.name}'
    assert resume_rules.config_differences(expected, config) == []
  config, _ = _parse(lines[2])
  assert config.optimizer.agc_exclude == ('linear', 'bias')
  assert config.data.folder_root == "/tmp/my data/it's"
  assert config.model.kwargs.to_dict() == {'width': 0.25, 'depth': (1, 1, 1, 1)}


def test_a_value_the_trainer_refuses_prints_nothing(tmp_path):
  sweep = sweep_lib.Sweep(
    name='s',
    base_config='configs/quickstart.py',
    axes=(('optimizer.lr', (0.1,)),),
    overrides={'optimizer.name': 'adamw_typo'},
  )
  with pytest.raises(ValueError, match="Unknown optimizer.name 'adamw_typo'"):
    sweep_lib.launch_lines(sweep, str(tmp_path))
