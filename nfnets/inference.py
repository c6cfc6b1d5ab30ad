"""Using trained NFNets: classify image files, evaluate on a dataset split.

`predict_files` classifies images with the reference's evaluation
preprocessing (resize to (S+32)^2 ignoring the aspect ratio, centre crop S,
normalise). `evaluate` computes top-1/top-5 over a whole eval split with the
training library's eval step (data-parallel over all devices), for weights
files (`nfnets.pretrained`) or the raw and EMA params of a training workdir
(restored with the trainer's own checkpointer).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import data, models, nfnet, optim, pretrained
from nfnets.data import preprocess
from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import mesh as mesh_lib
from nfnets.train import step as step_lib

CLASS_NAMES_FILE = os.path.join(
  os.path.dirname(__file__), 'assets', 'imagenet_classes.txt'
)


def imagenet_class_names() -> list[str]:
  """The 1000 ImageNet class names, in the synset order of tfds's labels."""
  with open(CLASS_NAMES_FILE) as f:
    return [line.rstrip('\n') for line in f]


# ----------------------------------------------------------------------------
# Prediction on image files.
# ----------------------------------------------------------------------------


def model_spec(path: str, variant: str | None, model_kwargs: Mapping | None):
  """Variant and NFNet kwargs: explicit values, else the file's metadata.

  Files written by `pretrained.save_params` may record `variant` and a JSON
  `model_kwargs`; DeepMind's pickles record nothing (variant F0 assumed).

  Returns:
    (variant, model_kwargs dict).
  """
  metadata = pretrained.read_metadata(path)
  if variant is None:
    variant = metadata.get('variant', 'F0')
  if model_kwargs is None:
    model_kwargs = json.loads(metadata.get('model_kwargs', '{}'))
  return variant, dict(model_kwargs)


def make_classifier(variant: str, num_classes: int, **model_kwargs):
  """Returns a jitted `(params, images) -> logits` for an inference NFNet."""

  def forward(images):
    net = nfnet.NFNet(num_classes=num_classes, variant=variant, **model_kwargs)
    return net(images, is_training=False)['logits']

  return jax.jit(hk.without_apply_rng(hk.transform(forward)).apply)


def load_image(path: str, image_size: int, mode: str = 'resize_crop_32'):
  """Reads one image file into a normalised float32 [S, S, 3] array.

  Args:
    path: a JPEG, PNG, GIF or BMP file (greyscale is converted to RGB).
    image_size: output size S (the variant's test_imsize by default).
    mode: eval preprocessing, see `nfnets.data.preprocess.eval_preprocess`.

  Returns:
    The preprocessed image, as the evaluation pipeline makes it.
  """
  import tensorflow as tf  # Deferred: only image decoding needs TF.

  if not os.path.exists(path):
    raise FileNotFoundError(f'No image file at {path!r}.')
  image = preprocess.eval_preprocess(tf.io.read_file(path), image_size, mode)
  return np.asarray(preprocess.normalize(image), np.float32)


def top_k(logits: np.ndarray, class_names: Sequence[str], k: int = 5):
  """Top-k (class name, probability) per row of `logits`."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return [[(class_names[i], float(p[i])) for i in row]
          for row, p in zip(order, probs, strict=True)]  # fmt: skip


def predict_files(
  paths: Sequence[str],
  weights: str,
  *,
  variant: str | None = None,
  model_kwargs: Mapping | None = None,
  image_size: int | None = None,
  k: int = 5,
  mode: str = 'resize_crop_32',
) -> list[list[tuple[str, float]]]:
  """Classifies image files with pretrained weights.

  Args:
    paths: image files.
    weights: any weights file `nfnets.pretrained.load` reads.
    variant: NFNet variant; None = the file's metadata, else 'F0'.
    model_kwargs: extra NFNet kwargs; None = the file's metadata.
    image_size: input size; None = the variant's test_imsize.
    k: how many classes to return per image.
    mode: eval preprocessing mode.

  Returns:
    Per image, the top-k (class name, probability), best first. Names are the
    ImageNet classes for 1000-class weights, else 'class_<i>'.
  """
  variant, model_kwargs = model_spec(weights, variant, model_kwargs)
  params = pretrained.load(weights, variant, **model_kwargs)
  num_classes = params[pretrained.CLASSIFIER_MODULE]['b'].shape[0]
  names = (
    imagenet_class_names()
    if num_classes == 1000
    else [f'class_{i}' for i in range(num_classes)]
  )
  size = image_size or nfnet.get_variant(variant)['test_imsize']
  images = np.stack([load_image(p, size, mode) for p in paths])
  logits = make_classifier(variant, num_classes, **model_kwargs)(params, images)
  return top_k(np.asarray(logits), names, min(k, num_classes))


# ----------------------------------------------------------------------------
# Evaluation on a dataset split.
# ----------------------------------------------------------------------------


def _abstract_train_state(config, model) -> step_lib.TrainState:
  """Shapes of the trainer's `TrainState` for `config` (nothing computed)."""
  optimizer, _ = optim.make_optimizer(
    config.optimizer,
    steps_per_epoch=1.0,
    total_steps=1,
    global_batch_size=config.train.batch_size,
  )
  size = config.data.train_image_size

  def init(rng):
    params = model.init(rng, jnp.zeros((1, size, size, 3)), True)
    ema = params if config.optimizer.ema_decay > 0 else None
    return step_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema_params=ema,
      rng=rng,
    )

  return jax.eval_shape(init, jax.random.PRNGKey(0))


def restore_workdir(config, workdir: str, num_classes: int):
  """Restores the newest checkpoint of a training run in `workdir`.

  Args:
    config: the run's config (as used for training).
    workdir: the training workdir (checkpoints in `<workdir>/checkpoints`).
    num_classes: the dataset's number of classes.

  Returns:
    `(step, {'eval': params, 'eval_ema': ema_params})`; 'eval_ema' only
    when the run keeps an EMA.
  """
  directory = os.path.join(os.path.expanduser(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f'No checkpoints in {directory!r}: pass the --workdir of a training '
      'run, or use --weights for a weights file.'
    )
  model = models.make_model(config.model, num_classes)
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=1_000_000)
  try:
    state = checkpointer.restore(_abstract_train_state(config, model))
  finally:
    checkpointer.close()
  if state is None:
    raise FileNotFoundError(f'{directory!r} holds no complete checkpoint.')
  sets = {'eval': state.params}
  if state.ema_params is not None:
    sets['eval_ema'] = state.ema_params
  return int(state.step), sets


def load_weights_for_config(config, path: str, num_classes: int):
  """Reads a weights file and checks it against `config.model`.

  Returns:
    The params; raises `PretrainedMismatchError` listing every mismatch.
  """
  params, metadata = pretrained.read_params(path)
  model = models.make_model(config.model, num_classes)
  size = config.data.eval_image_size
  shapes = jax.eval_shape(
    lambda rng, x: model.init(rng, x, False),
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
  )
  expected = jax.tree.map(lambda s: tuple(s.shape), shapes)
  hint = ''
  file_variant = metadata.get('variant')
  if file_variant and file_variant != config.model.kwargs.get('variant'):
    hint = f' The file says it holds variant {file_variant!r}.'
  pretrained.check_params(
    params,
    expected,
    what=f'{path!r} for config.model {dict(config.model.kwargs)} with '
    f'{num_classes} classes',
    hint=hint + ' Set --config.model.kwargs.* to match the weights.',
  )
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def evaluate(config, param_sets: Mapping, num_classes: int) -> dict:
  """Top-1/top-5/loss of each params set over `config.data`'s eval split.

  Args:
    config: experiment config (`data`, `model`, `eval.batch_size`).
    param_sets: prefix (e.g. 'eval', 'eval_ema') -> Haiku params.
    num_classes: the dataset's number of classes.

  Returns:
    `{f'{prefix}/{metric}': value}` for metrics top1, top5, loss (means over
    the real examples) and num_examples.
  """
  mesh = mesh_lib.make_mesh()
  batch_size = config.eval.batch_size
  mesh_lib.check_batch_size(batch_size, mesh, 'config.eval.batch_size')
  model = models.make_model(config.model, num_classes)
  eval_step = jax.jit(
    step_lib.make_eval_step(model, num_classes),
    in_shardings=(
      mesh_lib.replicated_sharding(mesh),
      mesh_lib.batch_sharding(mesh),
    ),
    out_shardings=mesh_lib.replicated_sharding(mesh),
  )
  results = {}
  for prefix, params in param_sets.items():
    params = mesh_lib.replicate(params, mesh)
    totals = None
    for batch in data.make_eval_iterator(
      config.data,
      global_batch_size=batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ):
      sums = eval_step(params, mesh_lib.shard_batch(batch, mesh))
      totals = sums if totals is None else jax.tree.map(operator.add, totals,
                                                        sums)  # fmt: skip
    totals = jax.device_get(totals)
    count = max(float(totals['count']), 1.0)
    for key in ('top1', 'top5', 'loss'):
      results[f'{prefix}/{key}'] = float(totals[key]) / count
    results[f'{prefix}/num_examples'] = float(totals['count'])
  return results


def evaluate_from(config, *, weights: str = '', workdir: str = '') -> dict:
  """Evaluates a weights file or a training workdir (raw and EMA params).

  Args:
    config: experiment config; the model, dataset, eval split, image size
      (`config.data.eval_image_size`, the variant's test size in the variant
      configs) and eval batch size come from it.
    weights: a weights file (any format `nfnets.pretrained` reads).
    workdir: a training workdir; exactly one of weights/workdir is given.

  Returns:
    The metrics of `evaluate`, plus 'step' for a workdir.
  """
  if bool(weights) == bool(workdir):
    raise ValueError('Pass exactly one of --weights and --workdir.')
  info = data.dataset_info(config.data)
  results = {}
  if weights:
    sets = {'eval': load_weights_for_config(config, weights, info.num_classes)}
  else:
    step, sets = restore_workdir(config, workdir, info.num_classes)
    results['step'] = step
  results.update(evaluate(config, sets, info.num_classes))
  return results
