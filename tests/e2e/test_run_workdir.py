"""A training run used from its workdir alone: evaluate, predict, errors.

`experiments.evaluate --workdir=W` and `experiments.predict --workdir=W` read
the run's saved config (`W/config.json`), apply `--config.*` overrides on
top and print their differences. Two kinds of run are used:

* a tiny NFNet trained for 4 steps by `experiments.train` on a two-class
  folder dataset (the end-to-end path a user takes); its own final eval in
  metrics.jsonl is the reference that evaluate and predict must reproduce;
* a hand-written checkpoint whose classifier weight is zero, so its
  probabilities are softmax(bias) whatever the image (raw and EMA biases
  differ, so each set is identifiable).

Every command runs in a subprocess with neither JAX_PLATFORMS nor
TF_CPP_MIN_LOG_LEVEL set, and its stderr must hold none of TensorFlow's,
oneDNN's or JAX's start-up notices. The flag and saved-config checks the
commands share (experiments/common.py) are also tested in-process.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
from absl import flags

from configs import quickstart
from experiments import common, output_files
from nfnets import pretrained, train
from nfnets.data import numpy_preprocess as npp
from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import evaluation, provenance, resume_rules

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
CLASSES = ('daisy', 'rose')  # Folder names; labels in sorted order.
START_UP_NOISE = (
  'absl::InitializeLog',
  'oneDNN',
  "Unable to initialize backend 'tpu'",
)


def _run(module, *args, **env):
  environ = {
    k: v
    for k, v in os.environ.items()
    if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL')
  }
  environ.update(env)
  proc = subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=ROOT,
    env=environ,
    capture_output=True,
    text=True,
    timeout=300,
  )
  for line in START_UP_NOISE:
    assert line not in proc.stderr, proc.stderr
  return proc


def _make_folder_dataset(root):
  """Two colour classes of 40x48 JPEGs: 8 train and 4 validation each."""
  rng = np.random.default_rng(0)
  colours = {'daisy': (250, 250, 240), 'rose': (200, 20, 40)}
  for split, count in (('train', 8), ('validation', 4)):
    for name, colour in colours.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        noise = rng.normal(0.0, 20.0, (40, 48, 3))
        pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f'{i}.jpg')
  return root


@pytest.fixture(scope='module')
def folder_dataset(tmp_path_factory):
  return _make_folder_dataset(tmp_path_factory.mktemp('data') / 'flowers')


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, folder_dataset, compilation_cache_dir):
  workdir = tmp_path_factory.mktemp('run')
  proc = _run(
    'experiments.train', '--config=configs/quickstart.py',
    f'--workdir={workdir}', '--config.data.name=folder',
    f'--config.data.folder_root={folder_dataset}',
    '--config.data.eval_image_size=40', '--config.train.num_epochs=0',
    '--config.train.num_steps=4', '--config.train.batch_size=8',
    '--config.eval.batch_size=8', '--config.optimizer.warmup_epochs=0',
    f'--config.train.compilation_cache_dir={compilation_cache_dir}',
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  return workdir


def _final_eval(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if 'eval/top1' in r][-1]


def _validation_files(folder_dataset):
  files = []
  for label, name in enumerate(CLASSES):
    folder = folder_dataset / 'validation' / name
    files += [(str(folder / f), label) for f in sorted(os.listdir(folder))]
  return files


def test_evaluate_with_workdir_alone_reproduces_the_final_eval(trained_run):
  out = trained_run / 'eval.json'
  proc = _run(
    'experiments.evaluate', f'--workdir={trained_run}', f'--output={out}'
  )
  assert proc.returncode == 0, proc.stderr
  results = json.loads(out.read_text())
  reference = _final_eval(trained_run)
  assert results['step'] == reference['step'] == 4
  for key in ('eval/top1', 'eval/loss', 'eval_ema/top1', 'eval_ema/loss'):
    np.testing.assert_allclose(results[key], reference[key], rtol=1e-4)
  # The run's own eval size (40, not the quickstart's 32) was used: no
  # differences from its saved config to report.
  assert 'Differences' not in proc.stderr


@pytest.mark.parametrize('which', ['ema', 'raw'])
def test_predict_with_workdir_alone_matches_the_run(
  trained_run, folder_dataset, which
):
  files = _validation_files(folder_dataset)
  proc = _run(
    'experiments.predict', f'--workdir={trained_run}', f'--params={which}',
    '--json', *[path for path, _ in files],
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [r['image'] for r in rows] == [path for path, _ in files]
  true_probs, correct = [], []
  for row, (_, label) in zip(rows, files, strict=True):
    probs = dict(row['top_k'])
    assert set(probs) == set(CLASSES)  # The folder's class names.
    np.testing.assert_allclose(sum(probs.values()), 1.0, rtol=1e-5)
    true_probs.append(probs[CLASSES[label]])
    correct.append(row['top_k'][0][0] == CLASSES[label])
  # The trainer's final eval of the same params on the same files: the same
  # preprocessing and labels give the same top-1 and cross-entropy.
  prefix = 'eval_ema' if which == 'ema' else 'eval'
  reference = _final_eval(trained_run)
  np.testing.assert_allclose(np.mean(correct), reference[f'{prefix}/top1'])
  np.testing.assert_allclose(
    -np.mean(np.log(true_probs)), reference[f'{prefix}/loss'], rtol=2e-3
  )


def _hide_tensorflow(root):
  """A PYTHONPATH under which `import tensorflow` fails, as on a GPU image
  without it (the packages in `root` shadow the installed ones)."""
  for name in ('tensorflow', 'tensorflow_datasets'):
    (root / name).mkdir(parents=True)
    (root / name / '__init__.py').write_text(
      f'raise ModuleNotFoundError("No module named {name!r}")\n'
    )
  return str(root)


def test_a_run_serves_without_tensorflow_and_without_its_dataset(
  trained_run, folder_dataset, tmp_path
):
  """A run trained with tf.data, used on a host with neither TensorFlow nor
  the dataset (a serving host).

  predict falls back to the python loader's decode and resize and names the
  folder's classes from the run's dataset.json; export and convert_weights
  need only the classifier's width from it. The exported program applied
  to the same NumPy-preprocessed files gives predict's probabilities, and
  predict agrees with the run's own eval. The converted file records the
  run's class names, eval size and eval transform, so `predict --weights`
  gives the same probabilities.
  """
  record = json.loads((trained_run / 'dataset.json').read_text())
  assert record == {
    'name': 'folder', 'num_classes': 2, 'class_names': list(CLASSES),
    'num_train_examples': 16, 'num_eval_examples': 8, 'natural_images': True,
  }  # fmt: skip
  hidden = _hide_tensorflow(tmp_path / 'no_tf')
  files = _validation_files(folder_dataset)
  photos = [str(tmp_path / f'photo{i}.jpg') for i in range(len(files))]
  for (path, _), photo in zip(files, photos, strict=True):
    shutil.copy(path, photo)
  hlo, weights = tmp_path / 'run.stablehlo', tmp_path / 'run.safetensors'
  elsewhere = folder_dataset.with_name('moved')
  folder_dataset.rename(elsewhere)
  try:
    by_workdir, exported, tflite, converted, by_weights = [
      _run(*args, PYTHONPATH=hidden)
      for args in [
        ('experiments.predict', f'--workdir={trained_run}', '--json',
         *photos),
        ('experiments.export', f'--workdir={trained_run}',
         '--format=stablehlo', f'--out={hlo}'),
        ('experiments.export', f'--workdir={trained_run}', '--format=tflite',
         f'--out={tmp_path / "run.tflite"}'),
        ('experiments.convert_weights', f'--workdir={trained_run}',
         f'--output={weights}'),
        ('experiments.predict', f'--weights={weights}', '--json', *photos),
      ]
    ]  # fmt: skip
  finally:
    elsewhere.rename(folder_dataset)
  for proc in (by_workdir, exported, converted, by_weights):
    assert proc.returncode == 0, proc.stderr
  assert tflite.returncode == 2
  assert tflite.stderr == (
    'Error: --format=tflite needs TensorFlow, which is not installed here: '
    'install it (requirements.txt), or pass --format=stablehlo.\n'
  )
  assert '(the EMA params of step 4): images float32 [b, 40, 40, 3]' in (
    exported.stdout
  )
  assert 'NFNet-F0, the EMA params of step 4' in converted.stdout

  # A folder of photos is evaluated at 40 px with 'resize_crop_32'.
  images = np.stack([npp.normalize(npp.eval_image(p, 40)) for p in photos])
  program = jax.export.deserialize(hlo.read_bytes())
  probs = [_softmax(x) for x in np.asarray(program.call(images)['logits'])]
  for proc in (by_workdir, by_weights):
    lines = proc.stdout.splitlines()
    for line, p in zip(lines, probs, strict=True):
      top_k = json.loads(line)['top_k']
      assert {name for name, _ in top_k} == set(CLASSES)
      for name, prob in top_k:
        np.testing.assert_allclose(prob, p[CLASSES.index(name)], rtol=1e-4)
  # The file converts again with its own metadata for the model (width
  # 1/8, one block per stage: not F0's defaults).
  again = tmp_path / 'again.npz'
  proc = _run(
    'experiments.convert_weights', f'--input={weights}', f'--output={again}'
  )
  assert proc.returncode == 0, proc.stderr
  jax.tree.map(np.testing.assert_array_equal, pretrained.read_params(again)[0],
               pretrained.read_params(weights)[0])  # fmt: skip

  # The run's eval of the EMA params decoded with TensorFlow, whose JPEG
  # decoder rounds otherwise than PIL's: the same top-1 (the loss differs
  # by ~1.5% here; with TensorFlow predict matches it, test above).
  reference = _final_eval(trained_run)
  correct = np.argmax(probs, axis=1) == [label for _, label in files]
  np.testing.assert_allclose(np.mean(correct), reference['eval_ema/top1'])


# ----------------------------------------------------------------------------
# A hand-written run with known outputs.
# ----------------------------------------------------------------------------


def _known_params(abstract_params, bias, seed):
  """Random params of the run's model whose classifier outputs `bias`."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
    lambda s: 0.3 * rng.standard_normal(s.shape).astype(s.dtype),
    abstract_params,
  )
  params['NFNet/~/linear']['w'][:] = 0.0
  params['NFNet/~/linear']['b'][:] = bias
  return params


RAW_BIAS = (2.0, -1.0)
EMA_BIAS = (-0.5, 1.5)


@pytest.fixture(scope='module')
def known_run(tmp_path_factory, folder_dataset):
  """A workdir with config.json and one checkpoint of known biases."""
  workdir = tmp_path_factory.mktemp('known')
  config = quickstart.get_config()
  config.data.name = 'folder'
  config.data.folder_root = str(folder_dataset)
  config.data.eval_image_size = 40
  config.eval.batch_size = 8
  (workdir / 'config.json').write_text(
    config.to_json_best_effort(indent=2, sort_keys=True)
  )
  abstract = train.abstract_train_state(config, len(CLASSES))
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  state = state._replace(
    step=np.int32(3),
    params=_known_params(abstract.params, RAW_BIAS, 0),
    ema_params=_known_params(abstract.params, EMA_BIAS, 1),
  )
  checkpointer = ckpt_lib.Checkpointer(
    str(workdir / 'checkpoints'), max_to_keep=2
  )
  checkpointer.save(3, state)
  checkpointer.close()
  return workdir


def test_evaluate_passes_over_a_damaged_checkpoint_in_a_few_lines(
  known_run, tmp_path
):
  run = tmp_path / 'run'
  shutil.copytree(known_run, run)
  newer = run / 'checkpoints' / '5'  # A newer copy of step 3, then damaged.
  shutil.copytree(run / 'checkpoints' / '3', newer)
  files = glob.glob(str(newer / 'default' / '**' / 'd' / '*'), recursive=True)
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  proc = _run('experiments.evaluate', f'--workdir={run}')
  assert proc.returncode == 0, proc.stderr
  # Two lines: the warning and the step used; no traceback.
  assert len(proc.stderr.splitlines()) == 2, proc.stderr
  warning, used = proc.stderr.splitlines()
  assert warning.startswith(f'Warning: Checkpoint {newer} is damaged: its ')
  assert used == 'Using the checkpoint of step 3, the newest readable.'
  assert f'{run}: the checkpoint of step 3' in proc.stdout
  assert 'eval: top-1 50.00%' in proc.stdout
  assert os.path.isdir(newer)  # Left in place.
  # A step asked for is the one used: no other checkpoint is read.
  out = tmp_path / 'step3.stablehlo'
  proc = _run(
    'experiments.export', f'--workdir={run}', '--step=3',
    '--format=stablehlo', f'--out={out}',
  )  # fmt: skip
  assert proc.returncode == 0 and not proc.stderr, proc.stderr
  assert f'Wrote stablehlo {out} (the EMA params of step 3)' in proc.stdout


def test_evaluate_refuses_a_dataset_whose_classes_changed(known_run, tmp_path):
  # Renamed classes of the same count restored fine and gave wrong metrics.
  run = tmp_path / 'run'
  shutil.copytree(known_run, run)
  record = {
    'name': 'folder', 'num_classes': 2, 'class_names': ['rose', 'daisy'],
    'num_train_examples': 4, 'num_eval_examples': 2, 'natural_images': True,
  }  # fmt: skip
  (run / 'dataset.json').write_text(json.dumps(record))
  config = common.saved_run_config(str(run))
  with pytest.raises(ValueError) as error:
    evaluation.evaluate_from(config, workdir=str(run))
  assert str(error.value) == (
    f'The dataset now has 2 classes, the run in {run} was trained on 2 '
    '(dataset.json): the same classes in another order. Its checkpoints fit '
    'those classes only: evaluate it on the dataset it was trained on '
    '(restore that dataset, or point --config.data.folder_root or data_dir '
    'at it).'
  )


def _softmax(x):
  e = np.exp(np.asarray(x, np.float64) - np.max(x))
  return e / e.sum()


def test_predict_reports_bad_files_and_classifies_the_rest(
  known_run, folder_dataset, tmp_path
):
  good = str(folder_dataset / 'validation' / 'rose' / '0.jpg')
  not_image = tmp_path / 'notes.jpg'
  not_image.write_text('not an image')
  truncated = tmp_path / 'truncated.jpg'
  truncated.write_bytes(open(good, 'rb').read()[:600])
  missing = tmp_path / 'missing.jpg'
  proc = _run(
    'experiments.predict', f'--workdir={known_run}', '--params=raw',
    str(missing), str(not_image), str(truncated), good,
  )  # fmt: skip
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  assert f"No image file at '{missing}'" in proc.stderr
  assert f"'{not_image}' is not an image" in proc.stderr
  assert f"'{truncated}' cannot be decoded" in proc.stderr
  assert '3 of 4 images could not be read' in proc.stderr
  # The good file is still classified, with the raw params' known output.
  lines = proc.stdout.splitlines()
  assert lines[0] == good
  probs = _softmax(RAW_BIAS)
  assert lines[1].split()[:2] == ['1.', 'daisy']
  assert lines[1].split()[2] == f'{100 * probs[0]:.2f}%'
  assert lines[2].split()[:3] == ['2.', 'rose', f'{100 * probs[1]:.2f}%']


def test_predict_uses_ema_params_by_default_and_applies_overrides(
  known_run, folder_dataset
):
  good = str(folder_dataset / 'validation' / 'daisy' / '1.jpg')
  proc = _run(
    'experiments.predict', f'--workdir={known_run}', '--json',
    '--config.data.eval_image_size=48', good,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
  probs = _softmax(EMA_BIAS)
  assert [name for name, _ in row['top_k']] == ['rose', 'daisy']
  np.testing.assert_allclose(
    [p for _, p in row['top_k']], [probs[1], probs[0]], rtol=1e-5
  )
  assert 'data.eval_image_size: 40 -> 48' in proc.stderr


def test_evaluate_accepts_the_saved_config_json(known_run):
  proc = _run(
    'experiments.evaluate', f'--config={known_run}/config.json',
    f'--workdir={known_run}', '--config.eval.batch_size=4',
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert 'NameError' not in proc.stderr
  assert 'eval.batch_size: 8 -> 4' in proc.stderr
  assert f'{known_run}: the checkpoint of step 3' in proc.stdout
  # Every image is predicted as class 0 (raw) or 1 (EMA): half are right.
  assert 'eval: top-1 50.00%' in proc.stdout
  assert 'eval_ema: top-1 50.00%' in proc.stdout
  assert '(8 images)' in proc.stdout


# ----------------------------------------------------------------------------
# User errors: short messages, exit 2 (usage, config) or 1 (runtime).
# ----------------------------------------------------------------------------


def _assert_short(proc, code, *phrases):
  assert proc.returncode == code, (proc.returncode, proc.stderr)
  assert 'Traceback' not in proc.stderr
  assert 'JAX has removed' not in proc.stderr  # Its traceback footer.
  assert len(proc.stderr.strip().splitlines()) <= 4, proc.stderr
  for phrase in phrases:
    assert phrase in proc.stderr, proc.stderr


def test_config_errors_are_short(known_run, tmp_path):
  workdir = f'--workdir={known_run}'
  proc = _run('experiments.evaluate', workdir, '--config.optimzer.lr=1')
  _assert_short(proc, 2, "unknown key 'optimzer'", '"optimizer"')
  assert '\\' not in proc.stderr
  proc = _run('experiments.evaluate', workdir, '--config.train.batch_size=a')
  _assert_short(proc, 2, 'config.train.batch_size')
  other = tmp_path / 'settings.json'
  other.write_text('{"model": {}}')
  proc = _run('experiments.evaluate', f'--config={other}')
  _assert_short(proc, 2, '--workdir')
  # A directory that is no training run, and no --config.
  proc = _run('experiments.evaluate', f'--workdir={tmp_path}')
  _assert_short(proc, 2, 'config.json does not exist', '--config=')
  # A mistyped workdir: the path named as no directory at all.
  proc = _run('experiments.predict', f'--workdir={tmp_path}/typo', 'x.jpg')
  _assert_short(proc, 2, f'--workdir={tmp_path}/typo is not a directory')


def test_usage_errors_are_short(known_run, tmp_path):
  proc = _run('experiments.predict', f'--weights={known_run}', 'x.jpg')
  _assert_short(proc, 2, f'--workdir={known_run}')
  assert 'IsADirectoryError' not in proc.stderr
  proc = _run('experiments.predict', f'--workdir={known_run}')
  _assert_short(proc, 2, 'image files')
  proc = _run('experiments.convert_weights', f'--output={tmp_path}/w.npz')
  _assert_short(proc, 2, '--input')
  proc = _run(
    'experiments.convert_weights', f'--workdir={known_run}', '--variant=F1',
    f'--output={tmp_path}/w.npz',
  )  # fmt: skip
  _assert_short(proc, 2, '--variant and --model_kwargs are for --input')
  # A Python dict where JSON is wanted: the flag named, with valid quoting.
  proc = _run(
    'experiments.benchmark', "--model_kwargs={'width': 0.25}", '--steps=1'
  )
  _assert_short(proc, 2, "--model_kwargs={'width': 0.25} is not a JSON")
  assert """--model_kwargs='{"width": 0.5}'""" in proc.stderr
  assert 'Benchmarking' not in proc.stdout  # Refused before any work.
  proc = _run(
    'experiments.train', '--config=configs/quickstart.py',
    f'--workdir={known_run}/config.json',
  )  # fmt: skip
  _assert_short(proc, 2, 'config.json is a file; pass a directory')
  # A result file that could not be written is refused before the work too.
  proc = _run('experiments.benchmark', f'--json_out={tmp_path}', '--steps=1')
  _assert_short(proc, 2, f'--json_out={tmp_path}: is a directory')
  assert 'Benchmarking' not in proc.stdout
  proc = _run('experiments.benchmark_input', f'--json_out={tmp_path}')
  _assert_short(proc, 2, f'--json_out={tmp_path}: is a directory')
  # Nor is a file replaced that is not an earlier result (a run's config).
  saved = known_run / 'config.json'
  for command in ('experiments.benchmark', 'experiments.benchmark_input'):
    proc = _run(command, f'--json_out={saved}')
    _assert_short(
      proc, 2, f'--json_out={saved}: the file exists and is not an earlier '
      f'result of {command}, so it is not replaced: pick another path.'
    )  # fmt: skip
  # evaluate --output naming a file that holds no metrics (here the run's
  # own config) is refused before the evaluation, and the file is kept.
  saved = known_run / 'config.json'
  before = saved.read_text()
  proc = _run(
    'experiments.evaluate', f'--workdir={known_run}', f'--output={saved}'
  )
  _assert_short(proc, 2, f'--output={saved}: ', 'pick another path')
  assert 'eval:' not in proc.stdout
  assert saved.read_text() == before


def test_runtime_errors_are_short_unless_a_traceback_is_asked_for(
  known_run, tmp_path
):
  # An unknown variant is a config error, raised inside the model code.
  args = (f'--workdir={known_run}', '--config.model.kwargs.variant=F9')
  proc = _run('experiments.evaluate', *args)
  _assert_short(proc, 2, "'F9'", 'NFNETS_TRACEBACK=1')
  missing = (
    '--config=configs/quickstart.py', f'--workdir={tmp_path}/nothing',
  )  # fmt: skip
  proc = _run('experiments.evaluate', *missing, NFNETS_TRACEBACK='1')
  assert proc.returncode == 1
  assert 'Traceback' in proc.stderr
  assert 'FileNotFoundError' in proc.stderr


# ----------------------------------------------------------------------------
# Bad input caught when flags are parsed (in-process: no command is run).
# ----------------------------------------------------------------------------


def _parse(define, validate, *args):
  """Defines a flag on fresh FlagValues, validates it, parses `args`."""
  flag_values = flags.FlagValues()
  validate(define(flag_values))
  flag_values(['command', *args])


def test_evaluate_output_replaces_only_an_earlier_metrics_file(tmp_path):
  def define(flag_values):
    return flags.DEFINE_string('output', '', '', flag_values=flag_values)

  def validate(holder):
    output_files.validate_output_file(
      holder, replaceable=output_files.is_metrics_file, kind='a metrics file'
    )

  metrics = tmp_path / 'eval.json'
  metrics.write_text(
    json.dumps({'eval/top1': 0.5, 'eval/loss': 1.0, 'step': 3})
  )
  run_config = tmp_path / 'config.json'
  run_config.write_text(quickstart.get_config().to_json_best_effort())
  weights = tmp_path / 'w.npz'
  np.savez(weights, w=np.zeros(3))
  train_log = tmp_path / 'metrics.jsonl'  # A run's log after one record.
  train_log.write_text(
    json.dumps({'step': 2, 'train/top1': 0.25, 'train/loss': 2.1, 'lr': 0.1})
  )
  (tmp_path / 'empty.json').write_text('')
  for path in (
    metrics,
    tmp_path / 'new/folder/m.json',
    tmp_path / 'empty.json',
  ):
    _parse(define, validate, f'--output={path}')
  for path, phrase in (
    (run_config, 'is not a metrics file, so it is not replaced'),
    (weights, 'is not a metrics file, so it is not replaced'),
    (train_log, 'is not a metrics file, so it is not replaced'),
    (tmp_path, 'is a directory'),
    (run_config / 'm.json', f'{run_config} is a file, not a folder'),
  ):
    with pytest.raises(flags.IllegalFlagValueError) as error:
      _parse(define, validate, f'--output={path}')
    assert f'--output={path}: ' in str(error.value)
    assert phrase in str(error.value)


def test_predict_sizes_and_counts_are_checked_when_parsed():
  def validate(lower, upper=None):
    return lambda holder: common.validate_int_range(
      holder, lower, upper, meaning='the input size in pixels'
    )

  def define(flag_values):
    return flags.DEFINE_integer('image_size', None, '', flag_values=flag_values)

  for ok in ((), ('--image_size=1',), ('--image_size=4096',)):
    _parse(define, validate(1, 4096), *ok)
  for bad in ('-4', '0', '100000'):
    with pytest.raises(flags.IllegalFlagValueError) as error:
      _parse(define, validate(1, 4096), f'--image_size={bad}')
    assert str(error.value) == (
      f'flag --image_size={bad}: pass 1 to 4096 (the input size in pixels).'
    )
  with pytest.raises(flags.IllegalFlagValueError, match='pass at least 1'):
    _parse(define, validate(1), '--image_size=0')


def test_a_missing_config_file_is_named_before_parsing(tmp_path):
  # ml_collections would fail only at the config's first use, with "an
  # earlier failure to load"; a config:arg suffix names the same file.
  def check(value, reads_run_config=True):
    argv = ['prog'] + ([f'--config={value}'] if value else [])
    common._check_config_file(argv, reads_run_config=reads_run_config)

  for value in ('configs/nothere.py', 'configs/nothere.py:plus'):
    with pytest.raises(flags.ValidationError, match="no config file 'configs"):
      check(value)
  for ok in ('configs/f0.py:plus', f'{tmp_path}/config.json', None):
    check(ok)
  # A command without a run's config (train) would run the JSON as Python.
  saved = f'{tmp_path}/config.json'
  with pytest.raises(flags.ValidationError) as error:
    check(saved, reads_run_config=False)
  assert str(error.value).startswith(
    f'--config={saved} is JSON; this command takes a Python config file'
  )
  # A mistyped run folder, where a run's config is read: no --config.* key
  # is at fault.
  typo = f'{tmp_path}/typo/config.json'
  with pytest.raises(flags.ValidationError) as error:
    common.use_run_config(['evaluate', f'--config={typo}'])
  assert str(error.value) == (
    f'--config={typo}: no such file. Pass the --workdir of a training run '
    '(its config.json is read), or a config file (configs/*.py).'
  )


def test_a_config_files_error_keeps_its_text_and_drops_the_traceback():
  message = (
    'flag --config=c.py:x: Error whilst parsing config file:\n\n'
    'Traceback (most recent call last):\n'
    '  File "c.py", line 3, in get_config\n'
    "    raise ValueError('...')\n"
    '    ^^^^^^^^^^^^^^^^^^^^^^^\n'
    'ValueError: Unknown argument:\n  use one of a, b'
  )
  assert common._without_config_traceback(message) == (
    'flag --config=c.py:x: ValueError: Unknown argument:\n  use one of a, b'
  )
  assert common._without_config_traceback('flag --x: bad') == 'flag --x: bad'


def test_exit_statuses_and_messages_of_stops_and_failures():
  assert common.error_message(KeyboardInterrupt()) == 'Interrupted.'  # Ctrl-C
  sweep_stop = KeyboardInterrupt('Run preempted; rerun the sweep to continue.')
  assert common.error_message(sweep_stop) == str(sweep_stop.args[0])
  assert common.exit_code(sweep_stop) == common.INTERRUPT_EXIT
  # Checkpoint errors are ValueErrors, but runtime failures in every
  # command (train alone said so before), not usage errors.
  for error in (
    ckpt_lib.DamagedCheckpointError('damaged'),
    ckpt_lib.CheckpointMismatchError('another config'),
    ckpt_lib.CheckpointReadError('out of memory'),
    FileNotFoundError('missing'),
  ):
    assert common.exit_code(error) == common.FAILURE_EXIT, error
  assert common.exit_code(ValueError('bad value')) == common.USAGE_EXIT


def test_a_damaged_run_config_says_how_to_restore_it(tmp_path, capsys):
  config = quickstart.get_config()
  provenance.write_segment(
    str(tmp_path), config, start_step=0, changes=[], num_devices=1
  )
  saved = tmp_path / 'config.json'
  record = tmp_path / 'configs' / 'segment_000_step_0.json'
  metrics = json.dumps({'eval/top1': 0.5, 'step': 30})
  for damaged in (metrics, saved.read_text()[:300], '[1, 2]', ''):
    saved.write_text(damaged)
    with pytest.raises(ValueError) as error:
      common.saved_run_config(str(tmp_path))
    message = str(error.value)
    assert 'damaged or replaced' in message, message
    assert f'cp {record} {saved}' in message  # Nothing to delete.
  # As the commands show it: one line, no hint at --config.* keys.
  with pytest.raises(SystemExit) as exit_info:
    common.parse_flags(
      ['evaluate', f'--workdir={tmp_path}'], prepare=common.use_run_config
    )
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f"Error: '{saved}' is not valid JSON"), err
  assert len(err.strip().splitlines()) == 1, err
  # Following the advice restores the run's config.
  shutil.copy(record, saved)
  restored = common.saved_run_config(str(tmp_path))
  assert resume_rules.config_differences(config, restored) == []
