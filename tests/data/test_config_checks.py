"""`validate_data_config`: the cheap checks of `config.data`.

Each bad value here used to pass silently or fail deep in TensorFlow or
tfds; the iterators and `dataset_info` now refuse it first.
"""

import pytest

from nfnets import data


def _config(**overrides):
  config = data.default_config()
  config.update(overrides)
  return config


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(train_image_size=0), 'train_image_size must be a positive integer'),
    (dict(eval_image_size=-32), 'eval_image_size must be a positive integer'),
    (dict(name='tfds/'), "names no tfds dataset: use 'tfds/<name>'"),
    (dict(name='tfds/  '), 'names no tfds dataset'),
    (dict(name='bogus'), 'Unknown dataset'),
    (dict(mixup_alpha=-1.0), 'mixup_alpha must be a finite number >= 0'),
    (dict(mixup_alpha=float('nan')), 'mixup_alpha must be a finite number'),
  ],
)
def test_bad_settings_raise_before_any_data_is_read(overrides, message):
  config = _config(**overrides)
  with pytest.raises(ValueError, match=message):
    data.validate_data_config(config)
  # No dataset is opened: digits would load, tfds would fail on the name.
  with pytest.raises(ValueError, match=message):
    data.make_train_iterator(config, global_batch_size=4)
  with pytest.raises(ValueError, match=message):
    data.make_eval_iterator(config, global_batch_size=4)
  with pytest.raises(ValueError, match=message):
    data.dataset_info(config)


def test_good_settings_pass():
  data.validate_data_config(_config())
  data.validate_data_config(
    _config(
      name='tfds/cifar10',
      train_image_size=192,
      eval_image_size=256,
      mixup_alpha=0.2,
    )
  )
