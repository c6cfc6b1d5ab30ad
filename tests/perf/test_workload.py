"""Tests for nfnets.perf.workload: model configs, names and defaults."""

import pytest

from nfnets.perf import workload


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match='NFNet'):
    workload.make_model_config('NoSuchNet')


def test_default_image_size_and_dtype():
  config = workload.make_model_config('NFNet', variant='F1')
  assert workload.default_image_size(config) == 224  # F1's train size.
  assert workload.default_dtype() == 'float32'  # Tests run on CPU.


def test_display_names_of_the_paper_baselines():
  names = [
    workload.display_name(workload.make_model_config(name, **kwargs))
    for name, kwargs in [
      ('NFNet', dict(variant='F1')),
      ('NF_ResNet', {}),
      ('ResNet', {}),
      ('ResNet', dict(use_se=True)),
    ]
  ]
  assert names == ['NFNet-F1', 'NF-ResNet-50', 'BN-ResNet-50', 'SE-ResNet-50']
