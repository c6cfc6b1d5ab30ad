"""Exported programs against our model: SavedModel, TFLite, StableHLO.

The weights are a DeepMind-format pickle of a small F0 (random, moved off
their init values), written the way the released files are. Our reference
is the unfolded model applied by `nfnets.pretrained`'s inference path to
real photos preprocessed by the host eval pipeline. The SavedModel and the
TFLite file run in a subprocess that cannot import JAX. Errors are
relative to the largest reference logit.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import skimage.data

from configs import f0
from nfnets import export, models, pretrained, train
from nfnets.data import preprocess as host
from nfnets.export import stablehlo
from nfnets.pretrained import inference
from nfnets.train import checkpoint as ckpt_lib
from tests.export import helpers
from tests.pretrained.test_pretrained import write_dm_pickle

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
SMALL = dict(width=0.25, depth=(1, 1, 1, 1), group_size=16)
NUM_CLASSES = 10
SIZE = 256  # F0's test_imsize.

# Runs in a fresh interpreter: TensorFlow alone, JAX made unimportable (TF's
# tf.lite module imports jax when it can, and would otherwise load it).
TF_ONLY_SCRIPT = r"""
import importlib.abc, json, sys

class NoJax(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib'):
      raise ImportError(f'{name} is blocked in this process')
    return None

sys.meta_path.insert(0, NoJax())
import numpy as np
import tensorflow as tf

args = json.loads(sys.argv[1])
inputs = np.load(args['inputs'])
out = {}
model = tf.saved_model.load(args['savedmodel'])
serve = model.signatures['serving_default']
out['sm'] = serve(images=tf.constant(inputs['normalised']))['logits'].numpy()
out['sm_one'] = serve(images=tf.constant(inputs['normalised'][:1]))[
  'logits'
].numpy()
if 'savedmodel_eval' in args:
  serve_eval = tf.saved_model.load(args['savedmodel_eval']).signatures[
    'serving_default'
  ]
  for i in range(int(inputs['num_photos'])):
    photo = tf.constant(inputs[f'photo{i}'][None])
    out[f'sm_eval{i}'] = serve_eval(images=photo)['logits'].numpy()
if 'tflite' in args:
  interpreter = tf.lite.Interpreter(model_path=args['tflite'])
  runner = interpreter.get_signature_runner()
  out['tflite'] = runner(images=inputs['normalised'])['logits']
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib'))
assert not loaded, loaded
np.savez(args['outputs'], **out)
"""


def _photos():
  return [skimage.data.chelsea(), skimage.data.coffee()]


def _relative_error(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(
    [sys.executable, '-m', 'experiments.export', *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """A DeepMind-format pickle of the small F0 and our logits on photos."""
  root = tmp_path_factory.mktemp('export')
  config = helpers.model_config('NFNet', variant='F0', **SMALL)
  params, _ = helpers.init_params(config, NUM_CLASSES, 64)
  path = str(root / 'F0_haiku.npz')
  write_dm_pickle(params, path)
  forward = inference.make_forward(
    'F0', NUM_CLASSES, return_metrics=False, **SMALL
  )
  photos = _photos()
  normalised = np.stack(
    [host.normalize(host.eval_preprocess(p, SIZE)).numpy() for p in photos]
  )
  logits = np.asarray(
    forward(pretrained.load(path, 'F0', **SMALL), normalised)['logits']
  )
  assert np.abs(logits).max() > 0.1
  return dict(root=root, path=path, normalised=normalised, logits=logits)


def _spec(weights):
  return export.spec_from_weights(weights['path'], 'F0', SMALL)


def test_savedmodel_and_tflite_run_without_jax(weights):
  root = weights['root']
  sm = str(root / 'sm')
  proc = _run_cli(
    f'--weights={weights["path"]}', '--variant=F0',
    f'--model_kwargs={json.dumps(SMALL)}', '--format=savedmodel',
    f'--out={sm}',
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert 'float32 [b, 256, 256, 3]' in proc.stdout
  spec, params, state = _spec(weights)
  sm_eval = str(root / 'sm_eval')
  export.export_model(
    spec, params, state, fmt='savedmodel', out=sm_eval, preprocess='eval'
  )
  lite = str(root / 'model.tflite')
  export.export_model(spec, params, state, fmt='tflite', out=lite)
  photos = _photos()
  inputs = {f'photo{i}': p for i, p in enumerate(photos)}
  np.savez(
    root / 'inputs.npz', normalised=weights['normalised'],
    num_photos=len(photos), **inputs,
  )  # fmt: skip
  args = dict(
    inputs=str(root / 'inputs.npz'), outputs=str(root / 'outputs.npz'),
    savedmodel=sm, savedmodel_eval=sm_eval, tflite=lite,
  )  # fmt: skip
  out = _run_without_jax(args)
  want = weights['logits']
  assert _relative_error(out['sm'], want) <= 1e-4
  assert _relative_error(out['sm_one'], want[:1]) <= 1e-4
  assert _relative_error(out['tflite'], want) <= 1e-3
  for i in range(len(photos)):  # uint8 photos of two sizes, one program.
    assert _relative_error(out[f'sm_eval{i}'], want[i : i + 1]) <= 1e-4


def _run_without_jax(args):
  """Runs TF_ONLY_SCRIPT on `args`; returns its outputs."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run(
    [sys.executable, '-c', TF_ONLY_SCRIPT, json.dumps(args)],
    env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  return np.load(args['outputs'])


@pytest.mark.slow
def test_full_size_f0_from_deepmind_pickle(tmp_path):
  """F0 itself: folded == unfolded in JAX, and its SavedModel without JAX."""
  config = helpers.model_config('NFNet', variant='F0')
  initial, _ = helpers.init_params(config, 1000, 64)
  path = str(tmp_path / 'F0_haiku.npz')
  write_dm_pickle(initial, path)
  params = pretrained.load(path, 'F0')
  normalised = np.stack(
    [host.normalize(host.eval_preprocess(p, SIZE)).numpy() for p in _photos()]
  )
  forward = inference.make_forward('F0', 1000, return_metrics=False)
  want = np.asarray(forward(params, normalised)['logits'])
  folded = export.fold_weight_standardization(params)
  folded_apply = jax.jit(
    export.make_folded_model(config, 1000).apply, static_argnums=4
  )
  got = folded_apply(folded, {}, None, normalised, False)[0]['logits']
  assert _relative_error(got, want) <= 1e-5
  spec, params, state = export.spec_from_weights(path, 'F0')
  sm = str(tmp_path / 'sm')
  export.export_model(spec, params, state, fmt='savedmodel', out=sm)
  np.savez(tmp_path / 'inputs.npz', normalised=normalised)
  out = _run_without_jax(
    dict(
      inputs=str(tmp_path / 'inputs.npz'),
      outputs=str(tmp_path / 'outputs.npz'),
      savedmodel=sm,
    )
  )
  assert _relative_error(out['sm'], want) <= 1e-4
  assert _relative_error(out['sm_one'], want[:1]) <= 1e-4


@pytest.mark.parametrize('preprocess', ['none', 'eval'])
def test_stablehlo_round_trip(weights, preprocess, tmp_path):
  spec, params, state = _spec(weights)
  path = str(tmp_path / 'exported' / 'f0.stablehlo')  # A folder to make.
  export.export_model(
    spec, params, state, fmt='stablehlo', out=path, preprocess=preprocess
  )
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(f.read())
  want = weights['logits']
  if preprocess == 'none':
    got = exported.call(weights['normalised'])['logits']
    assert _relative_error(got, want) <= 1e-5
    return
  for i, photo in enumerate(_photos()):
    got = exported.call(photo[None])['logits']
    assert _relative_error(got, want[i : i + 1]) <= 1e-5


def _write_checkpoint(workdir, config, raw, ema):
  """Saves a train state with the given params via the trainer's code."""
  abstract = train.abstract_train_state(config, NUM_CLASSES)
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  state = state._replace(step=np.int32(3), params=raw, ema_params=ema)
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, 'checkpoints'), max_to_keep=2
  )
  checkpointer.save(3, state)
  checkpointer.close()


def test_workdir_exports_the_ema_params(tmp_path):
  config = f0.get_config()
  config.data.name = 'digits'
  config.data.eval_image_size = 32
  config.data.eval_preproc = 'auto'
  config.model.kwargs.width = 0.125
  config.model.kwargs.depth = (1, 1, 1, 1)
  initial, _ = helpers.init_params(config.model, NUM_CLASSES, 32)
  raw = helpers.trained_like(initial, seed=1)
  ema = helpers.trained_like(initial, seed=2)
  _write_checkpoint(str(tmp_path), config, raw, ema)
  spec, params, state = export.spec_from_workdir(config, str(tmp_path))
  assert (spec.image_size, spec.eval_mode) == (32, 'resize')
  exported = stablehlo.export_stablehlo(
    spec, export.fold_weight_standardization(params), state
  )
  x = np.random.default_rng(0).standard_normal((3, 32, 32, 3))
  x = x.astype(np.float32)
  model = models.make_model(config.model, NUM_CLASSES)
  apply = jax.jit(lambda p: model.apply(p, {}, None, x, False)[0]['logits'])
  want = np.asarray(apply(ema))
  assert _relative_error(exported.call(x)['logits'], want) <= 1e-5
  other = np.asarray(apply(raw))
  assert _relative_error(other, want) > 1e-2


@pytest.mark.parametrize(
  'args, code, message',
  [
    (['--format=onnx'], 2, 'onnx'),
    (['--weights=/no/such/file.npz'], 1, 'No weights file'),
    (['--variant=F0+'], 2, 'F0+'),
    # Checked at flag parsing: jax.export would write the name unchecked.
    (['--platforms=cpu,cdua'], 2, 'cdua'),
  ],
)
def test_cli_errors_are_one_line(weights, tmp_path, args, code, message):
  base = [
    f'--weights={weights["path"]}', f'--model_kwargs={json.dumps(SMALL)}',
    f'--out={tmp_path / "out"}', '--format=stablehlo',
  ]  # fmt: skip
  proc = _run_cli(*base, *args)
  assert proc.returncode == code, proc.stderr
  first = proc.stderr.strip().splitlines()[0]
  assert first.startswith('Error') and message in first, proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'out')


def test_cli_refuses_to_write_over_the_weights_file(weights, tmp_path):
  # --weights and --out swapped by a slip: the weights must survive.
  target = tmp_path / 'F0_copy.npz'
  with open(weights['path'], 'rb') as f:
    original = f.read()
  target.write_bytes(original)
  proc = _run_cli(
    f'--weights={weights["path"]}', f'--model_kwargs={json.dumps(SMALL)}',
    f'--out={target}', '--format=tflite',
  )  # fmt: skip
  assert proc.returncode == 1, proc.stderr
  assert f'--out={target} is a file that holds no tflite export' in (
    proc.stderr
  )
  assert 'Traceback' not in proc.stderr
  assert target.read_bytes() == original


@pytest.mark.parametrize(
  'fmt, platforms, message',
  [
    ('stablehlo', ('cpu', 'cdua'), 'cdua'),
    ('savedmodel', ('gpu',), 'cuda or rocm'),
    ('stablehlo', (), 'none'),
    ('stablehlo', ('cpu', 'cpu'), 'once'),
    ('tflite', ('cuda',), 'TFLite'),
  ],
)
def test_export_refuses_platforms_before_any_work(fmt, platforms, message):
  # None as params: the check must come before they are used.
  with pytest.raises(ValueError, match=message):
    export.export_model(
      None, None, {}, fmt=fmt, out='/no/such/dir/x', platforms=platforms
    )
  export.check_platforms('savedmodel', ('cpu', 'cuda', 'rocm', 'tpu'))
  export.check_platforms('tflite', ('cpu',))


def test_a_run_file_exports_at_its_eval_size(weights, tmp_path):
  # convert_weights --workdir records the run's eval size and transform.
  path = str(tmp_path / 'run.safetensors')
  params = pretrained.load(weights['path'], 'F0', **SMALL)
  pretrained.save_params(params, path, {
    'variant': 'F0', 'model_kwargs': json.dumps(SMALL), 'image_size': '48',
    'eval_preproc': 'resize',
  })  # fmt: skip
  spec, _, _ = export.spec_from_weights(path)
  assert (spec.image_size, spec.eval_mode) == (48, 'resize')
  # No record (DeepMind's pickle): the variant's test size.
  assert _spec(weights)[0].image_size == SIZE


@pytest.mark.parametrize('name', ['NF_ResNet', 'NF_RegNet'])
@pytest.mark.filterwarnings('ignore:.*tf.lite.Interpreter is deprecated')
def test_other_normalizer_free_families_export_to_tflite(name, tmp_path):
  # NF-ResNet's strided 1x1 shortcut subsampled with `::2`, which lowers to
  # a gather with a symbolic batch, and TFLite's converter refused it.
  import tensorflow as tf  # noqa: PLC0415

  kwargs = dict(width=0.25, depth=(1, 1, 1, 1))
  if name == 'NF_ResNet':
    kwargs['variant'] = 'ResNet50'
  config = helpers.model_config(name, **kwargs)
  params, state = helpers.init_params(config, NUM_CLASSES, 64)
  spec = export.ExportSpec(config, NUM_CLASSES, 64, 'resize_crop_32')
  out = str(tmp_path / 'model.tflite')
  export.export_model(spec, params, state, fmt='tflite', out=out)
  x = np.random.default_rng(0).standard_normal((2, 64, 64, 3))
  x = x.astype(np.float32)
  model = models.make_model(config, NUM_CLASSES)
  want = np.asarray(model.apply(params, state, None, x, False)[0]['logits'])
  runner = tf.lite.Interpreter(model_path=out).get_signature_runner()
  for n in (2, 1):  # The batch is free.
    got = runner(images=x[:n])['logits']
    assert _relative_error(got, want[:n]) <= 1e-5


def test_too_large_for_a_flatbuffer_is_refused_before_any_folder(tmp_path):
  # F5+ and larger (2.3 GiB and up) failed after lowering the whole model,
  # with FlatBuffers' own traceback. Checked on shapes: no weights needed.
  def leaves(floats):
    return {'m': {'w': jax.ShapeDtypeStruct((floats,), np.float32)}}

  f5_plus = 626_486_976  # Folded float32 weights (no gains).
  for fmt in ('stablehlo', 'tflite'):
    with pytest.raises(ValueError) as error:
      export.check_flatbuffer_size(fmt, leaves(f5_plus), {})
    assert str(error.value) == (
      f'--format={fmt} holds the weights in one FlatBuffer, which fits 1.98 '
      "GiB of them; this model's take 2.33 GiB. Use --format=savedmodel, "
      'which stores them in separate files.'
    )
  f7 = 499_504_088  # F7's parameters, gains included: 1.86 GiB fit.
  export.check_flatbuffer_size('stablehlo', leaves(f7), {})
  export.check_flatbuffer_size('savedmodel', leaves(f5_plus), {})
  # A refused export leaves no folder behind (it was made before the checks).
  config = helpers.model_config('NFNet', variant='F0', **SMALL)
  spec = export.ExportSpec(config, NUM_CLASSES, 64, 'crop_resize')
  out = tmp_path / 'new' / 'model.stablehlo'
  with pytest.raises(ValueError, match='crop_resize'):
    export.export_model(
      spec, {}, {}, fmt='stablehlo', out=str(out), preprocess='eval'
    )
  assert not (tmp_path / 'new').exists()
  # Nor does a model of another channel count, whose images the RGB eval
  # transform cannot normalise (it blamed the images while tracing).
  grey = helpers.model_config('NFNet', variant='F0', in_channels=1, **SMALL)
  spec = export.ExportSpec(grey, NUM_CLASSES, 64, 'resize_crop_32')
  with pytest.raises(ValueError) as error:
    export.export_model(
      spec, {}, {}, fmt='stablehlo', out=str(out), preprocess='eval'
    )
  assert str(error.value) == (
    '--preprocess=eval normalises RGB images; this model takes 1 channels: '
    'export it with --preprocess=none.'
  )
  assert not (tmp_path / 'new').exists()
  shape, _, _ = export.serving.input_spec(spec, 'none')
  assert shape == 'b, 64, 64, 1'
