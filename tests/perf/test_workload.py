"""Tests for nfnets.perf.workload: model configs, names and defaults."""

import pytest

from nfnets.perf import workload


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match='NFNet'):
    workload.make_model_config('NoSuchNet')


def test_model_mistakes_are_value_errors_naming_the_valid_choices():
  """Checked when the configs are made, i.e. before anything is timed."""
  with pytest.raises(ValueError, match=r"no argument 'widht'.*'width'"):
    workload.make_model_config('NFNet', widht=0.1)
  with pytest.raises(ValueError, match=r"variant 'F9'.*'F7\+'"):
    workload.make_model_config('NFNet', variant='F9')
  with pytest.raises(ValueError, match=r"variant 'R50'.*'ResNet50'"):
    workload.make_model_config('NF_ResNet', variant='R50')
  with pytest.raises(ValueError, match='devcie.*device_reference'):
    workload.check_augment('devcie')
  # Constructor arguments outside the NFNet recipe's kwargs are kept.
  config = workload.make_model_config('NFNet', in_channels=1, width=0.5)
  assert config.kwargs.in_channels == 1 and config.kwargs.width == 0.5


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


@pytest.mark.parametrize(
  'augment,rows', [('device', 4), ('device_reference', 8)]
)
def test_device_augment_workload_ships_uint8_and_steps(augment, rows):
  # The step takes the shipped uint8 batch (2b rows with the reference's
  # pairing) and augments it on the device: one step runs, loss finite.
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  config = workload.make_model_config('ResNet', width=0.25, depth=[1, 1, 1, 1])
  work = workload.make_workload(
    config, 4, 32, 'float32', 10, jax.devices()[0], augment=augment
  )
  assert work.batch['images'].dtype == np.uint8
  assert work.batch['images'].shape == (rows, 32, 32, 3)
  _, metrics = jax.jit(work.step)(work.state, work.batch, work.hyperparams)
  assert np.isfinite(float(metrics['loss']))


def test_unknown_augment_is_refused():
  import jax  # noqa: PLC0415

  config = workload.make_model_config('ResNet', width=0.25, depth=[1, 1, 1, 1])
  with pytest.raises(ValueError, match='augment'):
    workload.make_workload(
      config, 4, 16, 'float32', 10, jax.devices()[0], augment='host'
    )


def test_sam_forms_change_the_update():
  """The three SAM forms give three different first gradients.

  The LR is 0 at step 0 (warmup), so the momentum shows the gradient.
  """
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  config = workload.make_model_config('ResNet', width=0.25, depth=[1, 1, 1, 1])
  momentum = {}
  for sam in workload.SAMS:
    work = workload.make_workload(
      config, 4, 32, 'float32', 10, jax.devices()[0], sam=sam
    )
    state, metrics = jax.jit(work.step)(
      work.state, work.batch, work.hyperparams
    )
    assert np.isfinite(float(metrics['loss']))
    momentum[sam] = np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(state.opt_state)]
    )
  for a, b in (('off', 'sync'), ('sync', 'paper'), ('off', 'paper')):
    assert np.max(np.abs(momentum[a] - momentum[b])) > 1e-4, (a, b)
  with pytest.raises(ValueError, match='sync, paper'):
    workload.make_optimizer_config(sam='full')
