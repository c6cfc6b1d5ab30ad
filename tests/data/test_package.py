"""Tests for the nfnets.data package: what imports without TensorFlow."""

import subprocess
import sys

import pytest

# Blocks TensorFlow and tfds (an import of either raises ImportError), then
# uses what an accelerator host without TensorFlow needs: the config, the
# device-side augmentation, the benchmark's workload, the python loader.
_WITHOUT_TF = """
import sys
sys.modules['tensorflow'] = None
sys.modules['tensorflow_datasets'] = None
import jax, jax.numpy as jnp
from nfnets import data
from nfnets.perf import workload
config = data.default_config()
config.augment_on, config.randaugment, config.mixup_alpha = 'device', '205', 0.2
config.cutmix = True
fn = data.make_batch_fn(config)
batch = {'images': jnp.zeros((4, 16, 16, 3), jnp.uint8),
         'labels': jnp.arange(4)}
out = jax.jit(fn)(batch, jax.random.key(0))
print(out['images'].shape, out['images'].dtype, data.MEAN_RGB[0])
print(data.resolve_loader(config), data.dataset_info(config).num_classes)
config.loader = 'tf'
try:
  data.make_train_iterator(config, global_batch_size=8)
except ValueError as e:
  print('tf loader:', str(e).split(',')[0])
"""


def test_config_and_device_augmentation_need_no_tensorflow():
  proc = subprocess.run(
    [sys.executable, '-c', _WITHOUT_TF],
    capture_output=True, text=True, check=False, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == f'(4, 16, 16, 3) float32 {0.485 * 255}'
  assert lines[1] == 'python 10'
  assert lines[2] == "tf loader: config.data.loader='tf' needs TensorFlow"


def test_lazy_names_are_the_pipeline_ones():
  from nfnets import data  # noqa: PLC0415
  from nfnets.data import pipeline, sources  # noqa: PLC0415

  assert data.make_train_dataset is pipeline.make_train_dataset
  assert data.DatasetInfo is sources.DatasetInfo
  assert set(data.__all__) >= {'make_eval_iterator', 'SOURCES'}
  with pytest.raises(AttributeError, match='no_such_name'):
    data.no_such_name  # noqa: B018
