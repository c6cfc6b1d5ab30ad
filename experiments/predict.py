r"""Classifies image files with a training run or a weights file; prints top-5.

    # A training run: its dataset's class names, its eval image size and
    # preprocessing, the EMA params of its newest checkpoint (--params=raw
    # for the raw ones):
    python -m experiments.predict --workdir=runs/flowers photo1.jpg

    # A weights file (DeepMind's F*_haiku.npz, .safetensors, .npz):
    python -m experiments.predict --weights=pretrained/F0_haiku.npz \
      photo1.jpg photo2.png photos/   # a directory: its image files

With --weights each image gets the reference's evaluation preprocessing
(resize to (S+32)^2 ignoring the aspect ratio, centre crop S = the variant's
test size, normalise); 1000-class weights are labelled with the bundled
ImageNet class names. The variant (and any other model kwargs) come from the
flags, else from the weights file's metadata, else F0. Images are read and
classified a batch at a time, each batch printed before the next is read. A
file that cannot be read is reported and the others are still classified
(exit status 1 at the end). See docs/pretrained.md.
"""

import functools
import json
import sys

from absl import app, flags

from experiments import common, quiet_start, weights_flags

_SOURCE = weights_flags.define_weights_flags(
  'predicts with its newest checkpoint.'
)
# NFNets test at 256-608 px (F0-F7); far larger inputs only exhaust memory
# (TensorFlow's resize of a 100000 px image asks for 120 GB), so a larger
# size is taken for a typo and refused before any work. The models
# downsample by 32, so a smaller input has no pixel left to classify.
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096
_IMAGE_SIZE = flags.DEFINE_integer(
  'image_size',
  None,
  f'Input size in pixels ({MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}); default: '
  "the run's eval_image_size or the variant's test_imsize.",
)
common.validate_int_range(
  _IMAGE_SIZE,
  MIN_IMAGE_SIZE,
  MAX_IMAGE_SIZE,
  meaning="the input size in pixels; leave the flag out for the run's "
  "eval_image_size, or the variant's test_imsize with --weights",
)
_TOP_K = flags.DEFINE_integer(
  'top_k', 5, 'Classes to print per image (at least 1).'
)
common.validate_int_range(
  _TOP_K, 1, meaning='how many of the most likely classes to print'
)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per image.')


def _predict_weights(paths):
  from nfnets.pretrained import inference

  kwargs = _SOURCE.parsed_model_kwargs()
  return inference.iter_predictions(
    paths,
    _SOURCE.weights.value,
    variant=_SOURCE.variant.value,
    model_kwargs=kwargs,
    image_size=_IMAGE_SIZE.value,
    k=_TOP_K.value,
  )


def _predict_workdir(paths, config, workdir):
  import jax

  from nfnets import models
  from nfnets.pretrained import inference
  from nfnets.train import run_weights

  common.print_config_differences(workdir, config)
  run = run_weights.run_params(
    workdir, _SOURCE.params.value, config=config, step=_SOURCE.step.value
  )
  names = inference.readable_class_names(run.info.class_names)
  model = models.make_model(config.model, run.info.num_classes)
  apply = jax.jit(lambda p, s, x: model.apply(p, s, None, x, False)[0])
  logits = lambda x: apply(run.params, run.model_state, x)['logits']
  load = _eval_loader(config.data, run.info, _IMAGE_SIZE.value)
  return inference.iter_classified(paths, load, logits, names, _TOP_K.value)


def _eval_loader(data_config, info, image_size=None):
  """`path -> normalised float32 image`, as the run's eval pipeline makes it.

  The run's loader decides which code decodes and resizes: TensorFlow's
  for tf.data (its JPEG decoder rounds differently from PIL's), PIL and
  NumPy for the python loader. Where TensorFlow is not installed, a tf.data
  run's files go through the python loader's code, whose resize agrees
  with TensorFlow's to 1e-3 (docs/data.md).

  Args:
    data_config: the run's `config.data`.
    info: the run's `DatasetInfo` (`natural_images` resolves 'auto').
    image_size: the input size; default the run's `eval_image_size`.
  """
  from nfnets import data
  from nfnets.data import plan

  size = image_size or data_config.eval_image_size
  mode = plan.eval_preproc_mode(data_config, info.natural_images)
  tf_data = data.resolve_loader(data_config) == 'tf'
  if tf_data and quiet_start.import_tensorflow_quietly():
    return functools.partial(_load_with_tensorflow, size=size, mode=mode)
  return functools.partial(_load_with_numpy, size=size, mode=mode)


def _load_with_tensorflow(path, size, mode):
  import numpy as np
  import tensorflow as tf

  from nfnets.data import preprocess
  from nfnets.pretrained import inference

  pixels = inference.read_rgb(path)  # Reports a bad file clearly.
  with open(path, 'rb') as f:
    encoded = tf.constant(f.read())
  try:
    image = preprocess.eval_preprocess(encoded, size, mode)
  except tf.errors.InvalidArgumentError:
    image = preprocess.eval_preprocess(pixels, size, mode)  # e.g. TIFF.
  return np.asarray(preprocess.normalize(image), np.float32)


def _load_with_numpy(path, size, mode):
  from nfnets.data import numpy_preprocess
  from nfnets.pretrained import inference

  pixels = inference.read_rgb(path)  # Reports a bad file clearly.
  image = numpy_preprocess.eval_image(pixels, size, mode)
  return numpy_preprocess.normalize(image)


def _print(path, result):
  if _JSON.value:
    print(json.dumps({'image': path, 'top_k': result}), flush=True)
    return
  lines = [path] + [
    f'  {rank}. {name:<40s} {100 * prob:6.2f}%'
    for rank, (name, prob) in enumerate(result, 1)
  ]
  print('\n'.join(lines), flush=True)


def main(argv):
  if not argv[1:]:
    raise app.UsageError(
      'Pass one or more image files (or directories of them) after the flags.'
    )
  _SOURCE.check(images=True)
  from nfnets.pretrained import inference

  paths = inference.image_paths(argv[1:])
  if _SOURCE.weights.value:
    results = _predict_weights(paths)
  else:
    results = _predict_workdir(
      paths, _SOURCE.config.value, _SOURCE.workdir.value
    )
  failed = 0
  for path, result in results:  # Printed batch by batch, as classified.
    if isinstance(result, Exception):
      failed += 1
      sys.stderr.write(f'Error: {common.error_message(result)}\n')
    else:
      _print(path, result)
  if failed:
    sys.stderr.write(f'{failed} of {len(paths)} images could not be read.\n')
    sys.exit(common.FAILURE_EXIT)


if __name__ == '__main__':
  common.run(main, prepare=common.use_run_config)
