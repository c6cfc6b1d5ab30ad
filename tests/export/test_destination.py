"""`check_destination`: an export replaces an earlier export, nothing else.

The earlier exports are real ones, written by TensorFlow and `jax.export`
for tiny programs; the things to protect are what a run and a weights
download leave on disk (a workdir with checkpoints, an .npz file).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from nfnets.export import destination


def _tiny_tf_function():
  return tf.function(
    lambda x: {'logits': x * 2.0},
    input_signature=[tf.TensorSpec([None, 2], tf.float32)],
  )


@pytest.fixture
def earlier_exports(tmp_path):
  """Real SavedModel, TFLite and StableHLO programs, one of each."""
  module = tf.Module()
  module.serve = _tiny_tf_function()
  savedmodel = str(tmp_path / 'sm')
  tf.saved_model.save(module, savedmodel)
  converter = tf.lite.TFLiteConverter.from_saved_model(savedmodel)
  tflite = tmp_path / 'model.tflite'
  tflite.write_bytes(converter.convert())
  stablehlo = tmp_path / 'model.stablehlo'
  exported = jax.export.export(jax.jit(lambda x: x + 1.0))(
    jax.ShapeDtypeStruct((2,), jnp.float32)
  )
  stablehlo.write_bytes(exported.serialize())
  return {
    'savedmodel': savedmodel, 'tflite': str(tflite),
    'stablehlo': str(stablehlo),
  }  # fmt: skip


def _workdir_and_weights(tmp_path):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'metrics.jsonl').write_text('{"step": 1}\n')
  weights = tmp_path / 'F0_haiku.npz'
  np.savez(weights, w=np.ones(3))
  return str(workdir), str(weights)


@pytest.mark.parametrize('fmt', ['savedmodel', 'tflite', 'stablehlo'])
def test_an_earlier_export_or_a_new_path_may_be_written(
  earlier_exports, tmp_path, fmt
):
  destination.check_destination(fmt, earlier_exports[fmt])
  destination.check_destination(fmt, str(tmp_path / 'new' / 'x'))


def test_an_empty_directory_takes_a_savedmodel(tmp_path):
  (tmp_path / 'empty').mkdir()
  destination.check_destination('savedmodel', str(tmp_path / 'empty'))
  with pytest.raises(FileExistsError, match='is a directory'):
    destination.check_destination('tflite', str(tmp_path / 'empty'))


@pytest.mark.parametrize('fmt', ['savedmodel', 'tflite', 'stablehlo'])
def test_a_workdir_or_a_weights_file_is_refused(tmp_path, fmt):
  workdir, weights = _workdir_and_weights(tmp_path)
  for path in (workdir, weights):
    with pytest.raises(FileExistsError, match='does not exist yet') as e:
      destination.check_destination(fmt, path)
    assert f'--out={path} is a ' in str(e.value)
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'metrics.jsonl']


def test_one_format_is_not_taken_for_another(earlier_exports):
  with pytest.raises(FileExistsError, match='no tflite export'):
    destination.check_destination('tflite', earlier_exports['stablehlo'])
  with pytest.raises(FileExistsError, match='no stablehlo export'):
    destination.check_destination('stablehlo', earlier_exports['tflite'])
  sm_pb = os.path.join(earlier_exports['savedmodel'], 'saved_model.pb')
  with pytest.raises(FileExistsError, match='no stablehlo export'):
    destination.check_destination('stablehlo', sm_pb)
