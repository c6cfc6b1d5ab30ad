r"""Input-pipeline throughput: images/s of the NFNet training pipeline.

Builds a small ImageNet in the real manual-download layout from the photos
that ship with scikit-image (random crops resized to ImageNet's typical
~500x375, with mild sensor-like noise so that JPEG quality 95 gives
ImageNet's ~110 KB per file), prepares it with tfds, then times our
pipelines on it:

  - 'plain': Inception crop fused with JPEG decode, flip, bicubic resize,
    normalisation (192 px);
  - 'f0_host': the F0 recipe on the host (MixUp + CutMix on 2b images -> b,
    RandAugment 405 after mixing, normalisation);
  - 'f0_device': the F0 recipe with augment_on='device', reference pairing:
    the host decodes 2b images per b outputs and ships uint8;
  - 'f0_device_inbatch': the same with in-batch pairing (b images);
  - 'python_device': 'f0_device_inbatch' from the TensorFlow-free loader
    (`config.data.loader='python'`: PIL decoding, NumPy crop and resize on
    `num_threads` threads), reading the same JPEGs prepared a second time
    as array_record;
  - 'eval': the F0 evaluation pipeline at 256 px (resize_crop_32);
  - 'digits': the quickstart's in-memory digits at 32 px.

Optionally (--model_steps > 0) it also times NFNet-F0 training steps at
batch 8 (forward, backward, SGD update) on the same machine, to compare the
pipeline's supply with the model's demand. Usage:

  python -m experiments.benchmark_input --batch_size=64 --num_batches=20 \
    --json_out=input.json

--json_out writes {pipeline: {"cpu_ms_per_image": ..., "images_per_s": ...}}
(per output image; device pipelines exclude the step's augmentation, which
`python -m experiments.benchmark --augment=device` times).

`--workdir` keeps the dataset for the next run, with the settings it was
built with (`--num_images`, `--quality`, `--noise`) in
`bench_input_build.json`; a run with other settings is refused (pass
another --workdir) rather than timing the old data. Without `--workdir` the
dataset goes to a temporary folder that is removed on exit.
"""

import contextlib
import json
import os
import shutil
import tempfile
import time

from absl import app, flags, logging

from experiments import common, output_files, quiet_start

# The pipelines `time_pipeline` knows (see the module docstring).
PIPELINES = (
  'plain', 'f0_host', 'f0_device', 'f0_device_inbatch', 'python_device',
  'eval', 'digits',
)  # fmt: skip

_BATCH = flags.DEFINE_integer(
  'batch_size', 64, 'Global batch size.', lower_bound=1
)
_BATCHES = flags.DEFINE_integer(
  'num_batches', 20, 'Timed batches.', lower_bound=1
)
_IMAGES = flags.DEFINE_integer(
  'num_images', 96, 'JPEGs in the train split.', lower_bound=1
)
_SIZE = flags.DEFINE_integer(
  'image_size', 192, 'Training image size.', lower_bound=1
)
_EVAL_SIZE = flags.DEFINE_integer(
  'eval_image_size', 256, 'Eval size.', lower_bound=1
)
_PIPELINES = flags.DEFINE_list(
  'pipelines',
  ['plain', 'f0_host', 'f0_device', 'f0_device_inbatch'],
  f'Which pipelines to time: {", ".join(PIPELINES)}.',
)


def check_pipelines(names) -> bool:
  """--pipelines' validator: an unknown name would time the plain one."""
  unknown = [name for name in names if name not in PIPELINES]
  if unknown:
    raise flags.ValidationError(
      f'unknown pipeline(s) {", ".join(unknown)}; valid: '
      f'{", ".join(PIPELINES)}.'
    )
  if not names:
    raise flags.ValidationError(f'name at least one of {", ".join(PIPELINES)}.')
  return True


flags.register_validator('pipelines', check_pipelines)
_JSON = flags.DEFINE_string('json_out', '', 'Write the results as JSON here.')
output_files.validate_output_file(
  _JSON,
  replaceable=lambda path: output_files.is_json_result(path, is_pipeline_times),
  kind='an earlier result of experiments.benchmark_input',
)


def is_pipeline_times(value) -> bool:
  """`{pipeline: {"cpu_ms_per_image": ..., ...}}`, as `main` writes."""
  return isinstance(value, dict) and all(
    isinstance(times, dict) and 'cpu_ms_per_image' in times
    for times in value.values()
  )


_NOISE = flags.DEFINE_float(
  'noise', 10.0, 'Gaussian noise sd added to the photos (JPEG size).'
)
_QUALITY = flags.DEFINE_integer(
  'quality', 95, 'JPEG quality.', lower_bound=1, upper_bound=100
)
_MODEL_STEPS = flags.DEFINE_integer(
  'model_steps', 0, 'Also time this many F0 train steps at batch 8.',
  lower_bound=0,
)  # fmt: skip
_WORKDIR = flags.DEFINE_string(
  'workdir', '', "Data folder, kept for reuse ('' = a temporary one)."
)
# In --workdir: the settings its dataset was built with.
BUILD_RECORD = 'bench_input_build.json'


def _imagenet_like_photos(n, seed=0):
  """n uint8 photos: random crops of skimage's colour images, ~500x375."""
  from nfnets.data import synthetic

  return synthetic.imagenet_like_photos(n, seed, _NOISE.value)


def _build_settings():
  return {
    'num_images': _IMAGES.value,
    'quality': _QUALITY.value,
    'noise': _NOISE.value,
  }


def check_build_record(workdir, settings) -> None:
  """Refuses a --workdir whose dataset was built with other settings.

  Records `settings` in a workdir that holds no dataset yet, so a later run
  knows what it would reuse.

  Raises:
    app.UsageError: when the recorded settings differ, or the workdir holds
      a dataset without a record (it cannot be told apart).
  """
  path = os.path.join(workdir, BUILD_RECORD)
  built = [
    d for d in ('manual', 'data') if os.path.exists(os.path.join(workdir, d))
  ]
  if os.path.isfile(path):
    try:
      with open(path) as f:
        recorded = json.load(f)
    except ValueError:
      recorded = None
    if not isinstance(recorded, dict):
      raise app.UsageError(
        f'{path} is not a build record; pass another --workdir.'
      )
    if recorded != settings:
      given = ' '.join(f'--{k}={v}' for k, v in recorded.items())
      raise app.UsageError(
        f'--workdir={workdir} holds a dataset built with {given}; pass '
        'those, or another --workdir for these settings.'
      )
  elif built:
    folders = ', '.join(f'{d}/' for d in built)
    raise app.UsageError(
      f'--workdir={workdir} holds a dataset ({folders}) without a record of '
      'the settings it was built with; pass another --workdir.'
    )
  else:
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(settings, f)


def build_tiny_imagenet(workdir, num_images, file_format='tfrecord'):
  """Writes and prepares the benchmark ImageNet; returns its data_dir.

  The tars are written once; each file format is prepared from them into
  its own data_dir, so every pipeline reads the same JPEGs.
  """
  from nfnets.data import prepare

  data_dir = os.path.join(workdir, 'data')
  if file_format != 'tfrecord':
    data_dir = f'{data_dir}_{file_format}'
  if os.path.isdir(os.path.join(data_dir, 'imagenet2012')):
    return data_dir
  manual = os.path.join(workdir, 'manual')
  if not os.path.isfile(os.path.join(manual, prepare.TRAIN_TAR)):
    photos = _imagenet_like_photos(num_images + 16)
    synsets = prepare.imagenet_synsets()
    train = {synsets[i]: photos[i:num_images:8] for i in range(8)}
    train_tar, _ = prepare.write_imagenet_tars(
      manual, train, photos[-16:], quality=_QUALITY.value
    )
    mb = os.path.getsize(train_tar) / 2**20
    print(f'Wrote {num_images} JPEGs ({mb / num_images * 1024:.0f} KB each).')
  prepare.prepare_imagenet(manual, data_dir, file_format=file_format)
  return data_dir


def _config(name, data_dir):
  from nfnets import data

  config = data.default_config()
  if name == 'digits':
    return config
  config.update(
    name='imagenet2012',
    data_dir=data_dir,
    train_image_size=_SIZE.value,
    eval_image_size=_EVAL_SIZE.value,
    deterministic=False,  # Throughput setting, as the reference.
  )
  if name == 'python_device':
    config.update(mixup_alpha=0.2, cutmix=True, randaugment='405')
    config.update(augment_on='device', mix_pairing='in_batch', loader='python')
  elif name.startswith('f0'):
    config.update(mixup_alpha=0.2, cutmix=True, randaugment='405')
    config.augment_on = 'host' if name == 'f0_host' else 'device'
    config.mix_pairing = 'in_batch' if name.endswith('inbatch') else 'reference'
  else:
    config.augment_on = 'host'
  return config


def time_pipeline(name, data_dir):
  """Returns (images/s, CPU-ms per image) of one pipeline."""
  from nfnets import data

  config = _config(name, data_dir)
  batch = _BATCH.value
  start = time.time()
  if name == 'eval':
    # The train split's JPEGs, repeated; padding is not counted.
    config.eval_split = 'train'
    ds = data.make_eval_dataset(config, global_batch_size=batch).repeat()
    it = ds.as_numpy_iterator()
  else:
    it = data.make_train_iterator(config, global_batch_size=batch)
  for _ in range(3):  # Warm-up: graph build, autotuning, buffers.
    next(it)
  warm = time.time() - start
  start, cpu, count = time.time(), time.process_time(), 0
  for _ in range(_BATCHES.value):
    b = next(it)
    # Output images: the device pipelines' 2b reference rows make b.
    rows = int(b['mask'].sum()) if 'mask' in b else len(b['labels'])
    count += min(rows, batch) if name != 'eval' else rows
  rate = count / (time.time() - start)
  # CPU time (all threads) per image is robust to other load on the machine;
  # cores / (CPU s per image) estimates the rate on an idle machine.
  cpu_per_image = (time.process_time() - cpu) / count
  print(
    f'{name:17s} pipeline: {rate:7.1f} images/s wall, '
    f'{1000 * cpu_per_image:6.2f} CPU-ms/image '
    f'(idle {os.cpu_count()}-core estimate {os.cpu_count() / cpu_per_image:.0f}'
    f' images/s; start-up {warm:.1f}s)'
  )
  return rate, 1000 * cpu_per_image


def time_model_steps(num_steps, batch=8):
  """Returns seconds per NFNet-F0 train step (fwd+bwd+SGD) at batch 8."""
  import haiku as hk
  import jax
  import jax.numpy as jnp
  import optax

  import nfnets

  def forward(x, is_training):
    return nfnets.NFNet(num_classes=1000, variant='F0')(x, is_training)

  net = hk.transform(forward)
  x = jnp.zeros((batch, _SIZE.value, _SIZE.value, 3))
  y = jnp.zeros((batch,), jnp.int32)
  params = net.init(jax.random.key(0), x, True)
  opt = optax.sgd(0.1, momentum=0.9, nesterov=True)
  state = opt.init(params)

  @jax.jit
  def step(params, state, rng):
    def loss_fn(p):
      logits = net.apply(p, rng, x, True)['logits']
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = step(params, state, jax.random.key(1))  # Compile.
  jax.block_until_ready(params)
  start, cpu = time.time(), time.process_time()
  for i in range(num_steps):
    params, state = step(params, state, jax.random.key(i))
  jax.block_until_ready(params)
  sec = (time.time() - start) / num_steps
  cpu_sec = (time.process_time() - cpu) / num_steps
  print(
    f'F0 train step, batch {batch}: {sec:.2f} s wall = {batch / sec:.1f} '
    f'images/s; {cpu_sec:.2f} CPU-s/step (idle estimate '
    f'{batch * os.cpu_count() / cpu_sec:.1f} images/s)'
  )
  return sec


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # tfds logs every dataset read.
  # Its start-up is no pipeline's cost (a prepared --workdir imports none).
  quiet_start.import_tensorflow_quietly()
  if _WORKDIR.value:
    workdir = os.path.expanduser(_WORKDIR.value)
    check_build_record(workdir, _build_settings())
    with _temporary_files_in(workdir):
      return _time_all(workdir)
  workdir = tempfile.mkdtemp(prefix='bench_input_')
  try:
    with _temporary_files_in(workdir):
      return _time_all(workdir)
  finally:  # Only what this run made: the folder is its own.
    shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _temporary_files_in(workdir):
  """Points `tempfile` (tfds' scratch folders) into a folder of `workdir`
  for the run and removes it after, so the run leaves nothing in /tmp."""
  scratch = tempfile.mkdtemp(prefix='tmp_', dir=workdir)
  before, tempfile.tempdir = tempfile.tempdir, scratch
  try:
    yield
  finally:
    tempfile.tempdir = before
    shutil.rmtree(scratch, ignore_errors=True)


def _time_all(workdir):
  """Builds (or reuses) the dataset in `workdir` and times --pipelines."""
  data_dir = build_tiny_imagenet(workdir, _IMAGES.value)
  print(f'os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()}')
  results = {}
  for name in _PIPELINES.value:
    source = data_dir
    if name.startswith('python'):
      # The python loader reads tfds datasets stored as array_record.
      source = build_tiny_imagenet(workdir, _IMAGES.value, 'array_record')
    rate, cpu_ms = time_pipeline(name, source)
    results[name] = {'cpu_ms_per_image': cpu_ms, 'images_per_s': rate}
  if 'plain' in results:
    for name, r in results.items():
      ratio = r['cpu_ms_per_image'] / results['plain']['cpu_ms_per_image']
      print(f'{name:17s} host cost {ratio:.2f}x plain')
  if _JSON.value:
    with open(output_files.make_parent(_JSON.value), 'w') as f:
      json.dump(results, f, indent=2)
  if _MODEL_STEPS.value:
    time_model_steps(_MODEL_STEPS.value)


if __name__ == '__main__':
  common.run(main)
