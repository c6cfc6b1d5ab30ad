"""Evaluation over a dataset split: the eval loop, weights files and runs.

The one eval loop: `evaluate_sets(config, mesh, eval_step, param_sets)` runs
the jitted eval step (`jit_eval_step`: data-parallel over the mesh, padded
last batch masked out) over the whole eval split of `config.data` for each
set of params and returns top-1, top-5 and the cross-entropy, means over the
real examples. The trainer's periodic and final evaluations
(`nfnets.train.loop`) and `evaluate_from` both use it.

`evaluate_from(config, weights=... | workdir=...)` evaluates outside a
training run (`experiments/evaluate.py`). A weights file (any format
`nfnets.pretrained` reads) is checked against `config.model` first; a
training workdir's newest checkpoint is restored with the trainer's own
`Checkpointer` (into the structure of
`nfnets.train.init_state.abstract_train_state`), and both its raw and EMA
params are evaluated, each with its Haiku state (BatchNorm moving averages;
empty for the normalizer-free models).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np

from nfnets import data, models, pretrained
from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import init_state
from nfnets.train import mesh as mesh_lib
from nfnets.train import step as step_lib

METRICS = ('top1', 'top5', 'loss')


def jit_eval_step(model, num_classes: int, mesh) -> Callable:
  """The eval step jitted over `mesh`: params replicated, batch sharded.

  Args:
    model: an `hk.TransformedWithState`.
    num_classes: the dataset's number of classes.
    mesh: the data mesh.

  Returns:
    `(params, model_state, batch) -> sums`, the per-batch sums of
    `step.make_eval_step` (replicated).
  """
  repl = mesh_lib.replicated_sharding(mesh)
  return jax.jit(
    step_lib.make_eval_step(model, num_classes),
    in_shardings=(repl, repl, mesh_lib.batch_sharding(mesh)),
    out_shardings=repl,
  )


def evaluate_sets(config, mesh, eval_step, param_sets: Mapping) -> dict:
  """Top-1/top-5/loss of each params set over `config.data`'s eval split.

  Args:
    config: experiment config (`data`, `eval.batch_size`).
    mesh: the data mesh.
    eval_step: the jitted eval step (`jit_eval_step`).
    param_sets: prefix (e.g. 'eval', 'eval_ema') -> (params, Haiku state),
      both replicated over `mesh`; the state is `{}` for models without
      BatchNorm.

  Returns:
    `{f'{prefix}/{metric}': value}` for metrics top1, top5, loss (means over
    the real examples) and num_examples.
  """
  results = {}
  for prefix, (params, model_state) in param_sets.items():
    totals = None
    for batch in data.make_eval_iterator(
      config.data,
      global_batch_size=config.eval.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ):
      sums = eval_step(params, model_state, mesh_lib.shard_batch(batch, mesh))
      if totals is not None:
        sums = jax.tree.map(operator.add, totals, sums)
      totals = sums
    totals = jax.device_get(totals)
    count = max(float(totals['count']), 1.0)
    for key in METRICS:
      results[f'{prefix}/{key}'] = float(totals[key]) / count
    results[f'{prefix}/num_examples'] = float(totals['count'])
  return results


def _checkpoint_dir(workdir: str) -> str:
  directory = os.path.join(os.path.expanduser(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f'No checkpoints in {directory!r}: pass the --workdir of a training '
      'run, or use --weights for a weights file.'
    )
  return directory


def restore_workdir(config, workdir: str, num_classes: int):
  """Restores the newest checkpoint of a training run in `workdir`.

  Args:
    config: the run's config (as used for training).
    workdir: the training workdir (checkpoints in `<workdir>/checkpoints`).
    num_classes: the dataset's number of classes.

  Returns:
    `(step, {'eval': (params, model_state), 'eval_ema': (ema_params,
    ema_model_state)})`; 'eval_ema' only when the run keeps an EMA.
  """
  directory = _checkpoint_dir(workdir)
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=1_000_000)
  try:
    state = checkpointer.restore(
      init_state.abstract_train_state(config, num_classes)
    )
  finally:
    checkpointer.close()
  if state is None:
    raise FileNotFoundError(f'{directory!r} holds no complete checkpoint.')
  sets = {'eval': (state.params, state.model_state)}
  if state.ema_params is not None:
    sets['eval_ema'] = (state.ema_params, state.ema_model_state)
  return int(state.step), sets


def load_weights_for_config(config, path: str, num_classes: int):
  """Reads a weights file and checks it against `config.model`.

  Returns:
    The params; raises `PretrainedMismatchError` listing every mismatch.

  Raises:
    ValueError: for a model with Haiku state (a BatchNorm ResNet): weights
      files hold no moving statistics, so evaluate its training workdir.
  """
  params, metadata = pretrained.read_params(path)
  model = models.make_model(config.model, num_classes)
  size = config.data.eval_image_size
  # Training mode: it creates the BatchNorm state, if any.
  shapes, state_shapes = jax.eval_shape(
    lambda rng, x: model.init(rng, x, True),
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
  )
  if jax.tree.leaves(state_shapes):
    raise ValueError(
      f'{config.model.name} {dict(config.model.kwargs)} keeps BatchNorm '
      'moving statistics, which a weights file does not hold; evaluate its '
      'training run with --workdir instead of --weights.'
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
  """`evaluate_sets` for params on the host, over all devices.

  Args:
    config: experiment config (`data`, `model`, `eval.batch_size`).
    param_sets: prefix (e.g. 'eval', 'eval_ema') -> (Haiku params, Haiku
      state), as NumPy or host arrays; the state is `{}` for models without
      BatchNorm.
    num_classes: the dataset's number of classes.

  Returns:
    The metrics of `evaluate_sets`.
  """
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(
    config.eval.batch_size, mesh, 'config.eval.batch_size'
  )
  model = models.make_model(config.model, num_classes)
  eval_step = jit_eval_step(model, num_classes, mesh)
  placed = {k: mesh_lib.replicate(v, mesh) for k, v in param_sets.items()}
  return evaluate_sets(config, mesh, eval_step, placed)


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
  if workdir:
    _checkpoint_dir(workdir)  # Fail before the (slow) dataset setup.
  else:
    pretrained.sniff_format(weights)
  info = data.dataset_info(config.data)
  results = {}
  if weights:
    params = load_weights_for_config(config, weights, info.num_classes)
    sets = {'eval': (params, {})}
  else:
    step, sets = restore_workdir(config, workdir, info.num_classes)
    results['step'] = step
  results.update(evaluate(config, sets, info.num_classes))
  return results
