"""End-to-end tests of experiments/{predict,evaluate,convert_weights}.py.

Each CLI runs once as a subprocess (error paths are checked in-process, on
the library functions they call) on small generated checkpoints: a tiny NFNet
(1/8 width, one block per stage) whose classifier weight is zero and whose
bias is chosen here, so its output is known in closed form whatever the
image: the probabilities are softmax(bias), and on a dataset every image is
predicted as the same classes, so top-1/top-5 are the label frequencies of
the eval split (read independently from the data pipeline).
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
import skimage.data

from configs import f0, quickstart
from nfnets import data, pretrained, train
from nfnets.data import image_files
from nfnets.pretrained import inference
from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import evaluation

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
TINY = dict(width=0.125, depth=(1, 1, 1, 1))
DIGITS = [
  '--config.data.name=digits',
  '--config.data.train_image_size=32',
  '--config.data.eval_image_size=32',
  '--config.data.eval_preproc=auto',
  '--config.model.kwargs.width=0.125',
  '--config.model.kwargs.depth=(1,1,1,1)',
  '--config.eval.batch_size=128',
]


def _run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  return proc


def _tiny_weights(num_classes, bias, seed=0):
  shapes = pretrained.expected_shapes('F0', num_classes, **TINY)
  rng = np.random.default_rng(seed)
  params = {
    m: {n: 0.3 * rng.standard_normal(s, np.float32) for n, s in v.items()}
    for m, v in shapes.items()
  }
  params['NFNet/~/linear']['w'][:] = 0.0
  params['NFNet/~/linear']['b'] = np.asarray(bias, np.float32)
  return params


def _save(params, path):
  meta = {'variant': 'F0', 'model_kwargs': json.dumps(TINY)}
  pretrained.save_params(params, path, meta)
  return str(path)


def _softmax(x):
  e = np.exp(np.asarray(x, np.float64) - np.max(x))
  return e / e.sum()


def test_predict_prints_top5_imagenet_names(tmp_path):
  bias = np.zeros(1000)
  bias[[945, 950, 954, 0, 999, 7]] = [6.0, 5.0, 4.0, 3.0, 2.5, 2.0]
  weights = _save(_tiny_weights(1000, bias), tmp_path / 'tiny.safetensors')
  # A file and a directory, which stands for its image files only.
  photos = tmp_path / 'photos'
  photos.mkdir()
  cat, camera = tmp_path / 'cat.jpg', photos / 'camera.png'
  PIL.Image.fromarray(skimage.data.chelsea()).save(cat)
  PIL.Image.fromarray(skimage.data.camera()).save(camera)  # Greyscale.
  (photos / 'notes.txt').write_text('not an image')
  PIL.Image.fromarray(skimage.data.chelsea()).save(photos / '.hidden.png')
  proc = _run(
    'experiments.predict', f'--weights={weights}', '--image_size=64',
    '--json', str(cat), str(photos),
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  probs = _softmax(bias)
  want_names = ['bell pepper', 'orange', 'banana', 'tench', 'toilet tissue']
  assert [r['image'] for r in rows] == [str(cat), str(camera)]
  for row in rows:
    names = [name for name, _ in row['top_k']]
    assert names == want_names
    np.testing.assert_allclose(
      [p for _, p in row['top_k']], probs[[945, 950, 954, 0, 999]], rtol=1e-5
    )


def test_predict_errors_are_clear(tmp_path):
  weights = _save(_tiny_weights(10, np.zeros(10)), tmp_path / 't.safetensors')
  image = tmp_path / 'cat.png'
  PIL.Image.fromarray(skimage.data.chelsea()).save(image)
  # F0+ is wider than the F0 the file holds.
  with pytest.raises(pretrained.PretrainedMismatchError, match="'F0\\+'"):
    inference.predict_files([str(image)], weights, variant='F0+')
  with pytest.raises(FileNotFoundError, match='No image file'):
    inference.load_image(str(tmp_path / 'missing.jpg'), 64)
  with pytest.raises(FileNotFoundError, match='not an image'):
    inference.load_image(weights, 64)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match="empty' is a directory without image"):
    inference.image_paths([str(image), str(tmp_path / 'empty')])


def test_an_image_too_large_to_decode_is_one_unreadable_file(
  tmp_path, monkeypatch
):
  # PIL refuses over 2x MAX_IMAGE_PIXELS (179 Mpx by default) with an error
  # that is not an OSError: it was a traceback that stopped the batch.
  image = tmp_path / 'cat.png'
  PIL.Image.fromarray(skimage.data.chelsea()).save(image)  # 451x300 px.
  monkeypatch.setattr(PIL.Image, 'MAX_IMAGE_PIXELS', 451 * 300 // 2 - 1)
  with pytest.raises(inference.UnreadableImageError) as error:
    inference.read_rgb(str(image))
  assert str(error.value).startswith(
    f"'{image}' is too large to decode safely (Image size (135300 pixels) "
    'exceeds limit of'
  )
  assert str(error.value).endswith('; shrink it first.')
  reason = image_files.pil_decode_error(str(image))
  assert reason.startswith('Image size (135300 pixels) exceeds limit of')


def test_load_image_matches_the_reference_demo_preprocessing(tmp_path):
  # DeepMind's Colab: resize to (S+32)^2 ignoring aspect, crop 16..16+S,
  # (x - mean) / std with the ImageNet statistics in 0..255.
  rgb = skimage.data.chelsea()
  path = tmp_path / 'cat.png'
  PIL.Image.fromarray(rgb).save(path)
  big = PIL.Image.fromarray(rgb).resize((96, 96), PIL.Image.BICUBIC)
  crop = np.asarray(big, np.float32)[16:80, 16:80]
  mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
  std = np.array([0.229, 0.224, 0.225], np.float32) * 255
  np.testing.assert_allclose(
    inference.load_image(str(path), 64), (crop - mean) / std, atol=1e-5
  )


@pytest.fixture(scope='module')
def digits_eval_labels():
  config = _digits_config()
  labels = []
  for batch in data.make_eval_iterator(config.data, global_batch_size=128):
    labels.append(batch['labels'][batch['mask'] > 0])
  return np.concatenate(labels)


def _expected_metrics(bias, labels):
  order = np.argsort(-np.asarray(bias), kind='stable')
  log_probs = np.log(_softmax(bias))
  return {
    'top1': np.mean(labels == order[0]),
    'top5': np.mean(np.isin(labels, order[:5])),
    'loss': -np.mean(log_probs[labels]),
  }


def _check(results, prefix, bias, labels):
  want = _expected_metrics(bias, labels)
  assert results[f'{prefix}/num_examples'] == len(labels)
  for key, value in want.items():
    np.testing.assert_allclose(results[f'{prefix}/{key}'], value, rtol=1e-5)


def _digits_config():
  config = f0.get_config()
  config.data.name = 'digits'
  config.data.train_image_size = 32
  config.data.eval_image_size = 32
  config.data.eval_preproc = 'auto'
  config.model.kwargs.width = TINY['width']
  config.model.kwargs.depth = TINY['depth']
  config.eval.batch_size = 128
  return config


def test_evaluate_checks_weights_against_the_config(tmp_path):
  # The CLI evaluation itself runs in test_evaluate_workdir_raw_and_ema.
  params = _tiny_weights(10, np.arange(10))
  weights = _save(params, tmp_path / 'tiny10.npz')
  loaded = evaluation.load_weights_for_config(_digits_config(), weights, 10)
  np.testing.assert_array_equal(
    loaded['NFNet/~/stem_conv2']['w'], params['NFNet/~/stem_conv2']['w']
  )
  wrong = _save(_tiny_weights(1000, np.zeros(1000)), tmp_path / 'w.npz')
  with pytest.raises(pretrained.PretrainedMismatchError, match='10 classes'):
    evaluation.evaluate_from(_digits_config(), weights=wrong)


def test_evaluate_refuses_weights_file_for_batchnorm_model(tmp_path):
  weights = _save(_tiny_weights(10, np.arange(10)), tmp_path / 'w.npz')
  config = _digits_config()
  config.model.name = 'ResNet'
  config.model.kwargs = ml_collections.ConfigDict(
    dict(width=0.25, depth=(1, 1, 1, 1))
  )
  # Its moving statistics cannot come from a weights file.
  with pytest.raises(ValueError, match='BatchNorm.*--workdir'):
    evaluation.load_weights_for_config(config, weights, 10)


def _write_checkpoint(workdir, raw, ema, step):
  """Saves a train state with the given params via the trainer's code."""
  abstract = train.abstract_train_state(_digits_config(), 10)
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  state = state._replace(step=np.int32(step), params=raw, ema_params=ema)
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, 'checkpoints'), max_to_keep=2
  )
  checkpointer.save(step, state)
  checkpointer.close()


def test_evaluate_workdir_raw_and_ema(tmp_path, digits_eval_labels):
  raw_bias = np.array([9, 0, 1, 2, 3, 4, 5, 6, 7, 8], np.float32)
  ema_bias = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 9], np.float32)
  _write_checkpoint(
    str(tmp_path), _tiny_weights(10, raw_bias), _tiny_weights(10, ema_bias), 7
  )
  out = tmp_path / 'metrics.json'
  proc = _run(
    'experiments.evaluate', '--config=configs/f0.py',
    f'--workdir={tmp_path}', f'--output={out}', *DIGITS,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  results = json.loads(out.read_text())
  assert results['step'] == 7
  _check(results, 'eval', raw_bias, digits_eval_labels)
  _check(results, 'eval_ema', ema_bias, digits_eval_labels)


def test_evaluate_needs_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoints'):
    evaluation.evaluate_from(_digits_config(), workdir=str(tmp_path))
  with pytest.raises(ValueError, match='exactly one'):
    evaluation.evaluate_from(_digits_config())


def test_convert_weights_dm_pickle_to_safetensors(tmp_path):
  from tests.pretrained.test_pretrained import write_dm_pickle

  params = _tiny_weights(10, np.arange(10))
  src = tmp_path / 'F0_haiku.npz'
  dst = tmp_path / 'converted' / 'F0.safetensors'  # A folder to make.
  write_dm_pickle(params, src)

  def convert(output):
    return _run(
      'experiments.convert_weights', f'--input={src}', f'--output={output}',
      f'--model_kwargs={json.dumps(TINY)}',
    )  # fmt: skip

  proc = convert(dst)
  assert proc.returncode == 0, proc.stderr
  assert '0.74M parameters' in proc.stdout
  loaded = pretrained.load(dst, 'F0', **TINY)
  for module, leaves in params.items():
    for key, value in leaves.items():
      np.testing.assert_array_equal(loaded[module][key], value)
  metadata = pretrained.read_metadata(dst)
  assert metadata['variant'] == 'F0'
  # The source is never replaced: --output naming --input is refused.
  original = src.read_bytes()
  proc = convert(src)
  assert proc.returncode == 2, proc.stderr
  assert 'is the --input file' in proc.stderr
  assert src.read_bytes() == original
  proc = convert(tmp_path / 'F0.pt')  # Refused before the input is read.
  assert proc.returncode == 2, proc.stderr
  assert 'name it .safetensors or .npz' in proc.stderr
  # Nor another file it did not write (DeepMind's, say); an earlier
  # conversion is replaced.
  other = tmp_path / 'F1_haiku.npz'
  other.write_bytes(original)
  proc = convert(other)
  assert proc.returncode == 2, proc.stderr
  assert 'exists and is not a file this command wrote' in proc.stderr
  assert other.read_bytes() == original
  proc = convert(dst)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(metadata['model_kwargs']) == {
    'width': 0.125, 'depth': [1, 1, 1, 1]
  }  # fmt: skip


# ----------------------------------------------------------------------------
# Paths refused before any work, and what the commands say instead.
# ----------------------------------------------------------------------------


def _synset_run(root):
  """A run on a folder dataset whose classes are ImageNet synsets.

  tfds's ImageNet datasets name their classes this way; n01440764 is the
  tench, n07873807 pizza (labels in sorted order: tench 0, pizza 1).
  """
  for split in ('train', 'validation'):
    for name in ('n07873807', 'n01440764'):
      folder = root / 'data' / split / name
      folder.mkdir(parents=True)
      PIL.Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(
        folder / '0.png'
      )
  config = quickstart.get_config()
  config.data.name = 'folder'
  config.data.folder_root = str(root / 'data')
  config.data.eval_image_size = 32
  workdir = root / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(
    config.to_json_best_effort(indent=2, sort_keys=True)
  )
  abstract = train.abstract_train_state(config, 2)
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  params = jax.tree.map(
    lambda s: 0.3 * np.ones(s.shape, s.dtype), abstract.params
  )
  params['NFNet/~/linear']['w'][:] = 0.0
  params['NFNet/~/linear']['b'][:] = (1.0, 3.0)  # Pizza first.
  state = state._replace(step=np.int32(4), params=params, ema_params=params)
  checkpointer = ckpt_lib.Checkpointer(
    str(workdir / 'checkpoints'), max_to_keep=2
  )
  checkpointer.save(4, state)
  checkpointer.close()
  return workdir


def test_predict_workdir_names_imagenet_synsets_readably(tmp_path):
  # Only a dataset named 'imagenet*' was renamed (not 'tfds/imagenet2012',
  # nor any other list of synsets), and then by position, not by synset.
  workdir = _synset_run(tmp_path)
  image = tmp_path / 'data' / 'validation' / 'n07873807' / '0.png'
  proc = _run(
    'experiments.predict', f'--workdir={workdir}', '--json', str(image)
  )
  assert proc.returncode == 0, proc.stderr
  (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
  probs = _softmax([1.0, 3.0])
  assert [name for name, _ in row['top_k']] == ['pizza', 'tench']
  np.testing.assert_allclose([p for _, p in row['top_k']], probs[::-1])


def test_a_directory_as_weights_says_what_to_pass(tmp_path, monkeypatch):
  # Every directory was told to pass --workdir=<it>: wrong for a
  # checkpoint folder and for a folder of images; evaluate said
  # nothing of --workdir at all.
  from experiments import weights_flags  # noqa: PLC0415

  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '200').mkdir(parents=True)
  (workdir / 'configs').mkdir()
  (workdir / 'config.json').write_text('{}')
  photos = tmp_path / 'photos'
  photos.mkdir()
  PIL.Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(photos / 'a.png')
  (tmp_path / 'empty').mkdir()
  proc = _run(
    'experiments.evaluate', '--config=configs/quickstart.py',
    f'--weights={workdir / "checkpoints" / "200"}',
  )  # fmt: skip
  assert proc.returncode == 2, proc.stderr
  assert f'--workdir={workdir} --step=200 instead.' in proc.stderr
  proc = _run('experiments.predict', f'--weights={photos}', str(photos))
  assert proc.returncode == 2, proc.stderr
  assert 'and the image folder after the flags' in proc.stderr
  file_hint = (
    "pass a weights file (.safetensors, .npz or DeepMind's F*_haiku.npz)"
  )
  cases = {
    workdir: f"is a directory, a training run's; pass --workdir={workdir} "
    'instead.',
    workdir / 'checkpoints' / '200': ', a checkpoint of the training run '
    f'{workdir}; pass --workdir={workdir} --step=200 instead.',
    workdir / 'configs': f' inside the training run {workdir}; pass '
    f'--workdir={workdir} for its newest checkpoint instead.',
    photos: f'is a directory; {file_hint}, and the image folder after the '
    'flags.',
    tmp_path / 'empty': f'is a directory; {file_hint}.',
  }
  for path, says in cases.items():
    message = weights_flags.weights_directory_error(str(path), images=True)
    assert message.startswith(f'--weights={path} is a directory')
    assert message.endswith(says), message
  # Relative to the working directory where the path is relative.
  with monkeypatch.context() as patch:
    patch.chdir(workdir / 'checkpoints')
    assert weights_flags.weights_directory_error('200').endswith(
      '--workdir=.. --step=200 instead.'
    )


def test_evaluate_output_naming_a_folder_is_refused_when_parsed(tmp_path):
  # 'newdir/' passed the check, then failed to open after the evaluation,
  # losing the metrics.
  from absl import flags  # noqa: PLC0415

  from experiments import output_files  # noqa: PLC0415

  def parse(value):
    flag_values = flags.FlagValues()
    holder = flags.DEFINE_string('output', '', '', flag_values=flag_values)
    output_files.validate_output_file(
      holder, replaceable=output_files.is_metrics_file, kind='a metrics file'
    )
    flag_values(['evaluate', f'--output={value}'])

  for value in (f'{tmp_path}/newdir/', f'{tmp_path}/', 'newdir/'):
    with pytest.raises(flags.IllegalFlagValueError) as error:
      parse(value)
    assert str(error.value).startswith(f'flag --output={value}: ')
    folder = 'is a directory' if os.path.isdir(value) else 'names a folder'
    assert f'{folder}; pass a file path in it (e.g. ' in str(error.value)
  assert os.listdir(tmp_path) == []
  parse(f'{tmp_path}/newdir/eval.json')


def test_convert_to_a_directory_is_refused_before_reading(tmp_path):
  # The weights were read, written whole as '<dir>.tmp-PID', and left
  # there when the rename failed.
  src = _save(_tiny_weights(10, np.zeros(10)), tmp_path / 'w.safetensors')
  out = tmp_path / 'out.safetensors'
  out.mkdir()
  proc = _run(
    'experiments.convert_weights', f'--input={src}', f'--output={out}'
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(
    f'Error: --output={out} is a directory; pass a file path in it (e.g. '
    f'{out}/weights.safetensors).'
  )
  assert sorted(os.listdir(tmp_path)) == ['out.safetensors', 'w.safetensors']


def test_predict_image_size_below_the_models_stride_is_refused(tmp_path):
  # 1..31 passed the flag check and failed after the weights were read.
  weights = _save(_tiny_weights(10, np.zeros(10)), tmp_path / 'w.npz')
  image = tmp_path / 'cat.png'
  PIL.Image.fromarray(skimage.data.chelsea()).save(image)
  proc = _run(
    'experiments.predict', f'--weights={weights}', '--image_size=31',
    str(image),
  )  # fmt: skip
  assert proc.returncode == 2
  assert proc.stderr.startswith(
    'Error: flag --image_size=31: pass 32 to 4096 (the input size in pixels'
  )
