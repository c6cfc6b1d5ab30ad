"""Evaluation over a dataset split: the eval loop, weights files and runs.

The one eval loop: `evaluate_sets(config, mesh, eval_step, param_sets)` runs
the jitted eval step (`jit_eval_step`: data-parallel over the mesh, padded
last batch masked out) over the whole eval split of `config.data` for each
set of params and returns top-1, top-5 and the cross-entropy, means over the
real examples; it can report its progress (`writers.EvalProgress`) and be
stopped by a signal. The trainer's periodic and final evaluations
(`evaluate_and_log`, from `nfnets.train.loop`) and `evaluate_from` both use
it; `check_eval_size` lets the trainer reject an unusable eval image size
at start.

`evaluate_from(config, weights=... | workdir=...)` evaluates outside a
training run (`experiments/evaluate.py`). A weights file (any format
`nfnets.pretrained` reads) is checked against `config.model` first; a
training workdir's newest readable checkpoint is restored with the
trainer's own `Checkpointer` (into the structure of
`nfnets.train.init_state.abstract_train_state`, on any device count,
damaged checkpoints passed over with a warning), and both its raw and EMA
params are evaluated, each with its Haiku state (BatchNorm moving averages;
empty for the normalizer-free models).
"""

from __future__ import annotations

import operator
import os
import sys
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

from nfnets import data, models, pretrained
from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import init_state, writers
from nfnets.train import mesh as mesh_lib
from nfnets.train import step as step_lib

METRICS = ('top1', 'top5', 'loss')


def warn(line: str) -> None:
  """Prints to stderr, where stdout's results stay clean for pipes."""
  print(line, file=sys.stderr, flush=True)


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


class EvalInterrupted(Exception):
  """An evaluation stopped by its `stop` callable (SIGTERM, Ctrl-C)."""


def evaluate_sets(
  config,
  mesh,
  eval_step,
  param_sets: Mapping,
  *,
  progress: writers.EvalProgress | None = None,
  stop: Callable[[], bool] | None = None,
) -> dict:
  """Top-1/top-5/loss of each params set over `config.data`'s eval split.

  Args:
    config: experiment config (`data`, `eval.batch_size`).
    mesh: the data mesh.
    eval_step: the jitted eval step (`jit_eval_step`).
    param_sets: prefix (e.g. 'eval', 'eval_ema') -> (params, Haiku state),
      both replicated over `mesh`; the state is `{}` for models without
      BatchNorm.
    progress: reports examples done and the ETA of long evaluations.
    stop: polled after each batch; True ends the evaluation.

  Returns:
    `{f'{prefix}/{metric}': value}` for metrics top1, top5, loss (means over
    the real examples) and num_examples.

  Raises:
    EvalInterrupted: when `stop()` returned True.
  """
  results = {}
  for prefix, (params, model_state) in param_sets.items():
    totals, done = None, 0
    if progress is not None:
      progress.restart()
    for batch in data.make_eval_iterator(
      config.data,
      global_batch_size=config.eval.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ):
      sums = eval_step(params, model_state, mesh_lib.shard_batch(batch, mesh))
      if stop is not None and stop():
        raise EvalInterrupted(prefix)
      if progress is not None:
        # This process's real rows, times the processes: the global count.
        done += int(np.sum(batch['mask'])) * jax.process_count()
        progress.update(prefix, done)
      if totals is not None:
        sums = jax.tree.map(operator.add, totals, sums)
      totals = sums
    totals = jax.device_get(totals)
    count = max(float(totals['count']), 1.0)
    for key in METRICS:
      results[f'{prefix}/{key}'] = float(totals[key]) / count
    results[f'{prefix}/num_examples'] = float(totals['count'])
  return results


def evaluate_and_log(
  config,
  mesh,
  eval_step,
  state,
  *,
  writer,
  print_fn: Callable[[str], None],
  num_examples: int,
  stop: Callable[[], bool] | None = None,
  label: str = 'Eval',
  progress_every_s: float = 30.0,
) -> dict | None:
  """Evaluates a train state's raw (and EMA) params; logs the metrics.

  Args:
    config: the run's config (`eval.ema` selects the EMA params too).
    mesh: the data mesh.
    eval_step: the jitted eval step (`jit_eval_step`).
    state: the `TrainState`.
    writer: a `writers.MetricWriter`; gets the metrics at the state's step.
    print_fn: prints the result line and the progress of long evaluations.
    num_examples: examples in the eval split (for the progress lines).
    stop: see `evaluate_sets`.
    label: the result line's first words.
    progress_every_s: seconds between progress lines.

  Returns:
    The metrics of `evaluate_sets`, or None (nothing logged) when `stop`
    ended the evaluation.
  """
  step = int(state.step)
  t0 = time.perf_counter()
  sets = {'eval': (state.params, state.model_state)}
  if config.eval.ema and state.ema_params is not None:
    sets['eval_ema'] = (state.ema_params, state.ema_model_state)
  progress = writers.EvalProgress(
    num_examples, print_fn, every_s=progress_every_s
  )
  try:
    results = evaluate_sets(
      config, mesh, eval_step, sets, progress=progress, stop=stop
    )
  except EvalInterrupted:
    print_fn(f'{label} at step {step} interrupted.')
    return None
  writer.write(step, results)
  line = ' | '.join(
    f'{p} top1 {results[f"{p}/top1"]:.4f} top5 {results[f"{p}/top5"]:.4f}'
    for p in sets
  )
  print_fn(
    f'{label} at step {step} ({int(results["eval/num_examples"])} '
    f'examples, {time.perf_counter() - t0:.1f}s): {line}'
  )
  return results


def _checkpoint_dir(workdir: str) -> str:
  directory = os.path.join(os.path.expanduser(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f'No checkpoints in {directory!r}: name the workdir of a training '
      'run that saved checkpoints, or a weights file instead (--weights on '
      'the command line; its path as config.model.init_from).'
    )
  return directory


def restore_workdir(
  config,
  workdir: str,
  num_classes: int,
  *,
  step: int | None = None,
  log: Callable[[str], None] = warn,
):
  """Restores the newest readable checkpoint of a run in `workdir`, or `step`'s.

  The checkpoint may have been written on any device count; it is restored
  replicated over this process's devices. Damaged checkpoints are passed
  over with a warning (`log`) and left where they are.

  Args:
    config: the run's config (as used for training).
    workdir: the training workdir (checkpoints in `<workdir>/checkpoints`).
    num_classes: the dataset's number of classes.
    step: the checkpoint to restore (default: the newest readable one).
    log: prints a warning line.

  Returns:
    `(step, {'eval': (params, model_state), 'eval_ema': (ema_params,
    ema_model_state)})`; 'eval_ema' only when the run keeps an EMA.

  Raises:
    checkpoint.CheckpointError: the checkpoints do not fit `config`, or
      none is readable (a ValueError, with what to do).
  """
  directory = _checkpoint_dir(workdir)
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=1_000_000)
  try:
    newest = checkpointer.latest_step()
    state = checkpointer.restore(
      init_state.abstract_train_state(config, num_classes), log=log, step=step
    )
  finally:
    checkpointer.close()
  if state is None:
    raise FileNotFoundError(f'{directory!r} holds no complete checkpoint.')
  if step is None and int(state.step) != newest:
    log(f'Using the checkpoint of step {int(state.step)}, the newest readable.')
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


def evaluate(
  config,
  param_sets: Mapping,
  num_classes: int,
  *,
  progress: writers.EvalProgress | None = None,
) -> dict:
  """`evaluate_sets` for params on the host, over all devices.

  Args:
    config: experiment config (`data`, `model`, `eval.batch_size`).
    param_sets: prefix (e.g. 'eval', 'eval_ema') -> (Haiku params, Haiku
      state), as NumPy or host arrays; the state is `{}` for models without
      BatchNorm.
    num_classes: the dataset's number of classes.
    progress: reports examples done and the ETA of long evaluations.

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
  return evaluate_sets(config, mesh, eval_step, placed, progress=progress)


_EVAL_CLASSES_ADVICE = (
  'evaluate it on the dataset it was trained on (restore that dataset, or '
  'point --config.data.folder_root or data_dir at it).'
)


def evaluate_from(
  config, *, weights: str = '', workdir: str = '', step: int | None = None
) -> dict:
  """Evaluates a weights file or a training workdir (raw and EMA params).

  Args:
    config: experiment config; the model, dataset, eval split, image size
      (`config.data.eval_image_size`, the variant's test size in the variant
      configs) and eval batch size come from it.
    weights: a weights file (any format `nfnets.pretrained` reads).
    workdir: a training workdir; exactly one of weights/workdir is given.
    step: the workdir's checkpoint to evaluate (default: the newest).

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
    # Imported here: run_weights builds on this module.
    from nfnets.train import run_weights  # noqa: PLC0415

    run_weights.check_same_classes(workdir, info, advice=_EVAL_CLASSES_ADVICE)
    step, sets = restore_workdir(
      config, workdir, info.num_classes, step=step, log=warn
    )
    results['step'] = step
  progress = writers.EvalProgress(info.num_eval_examples, warn)
  results.update(evaluate(config, sets, info.num_classes, progress=progress))
  return results


def check_eval_size(config, model) -> None:
  """Raises ValueError, before any work, if the model cannot eval this size.

  The trainer checks at start what would otherwise fail at its first
  evaluation, possibly hours later. When the model fails at the train size
  too, the model config itself is at fault (e.g. a bad depth), and the
  error says so rather than blaming the eval size.

  Args:
    config: the run's config (`data.eval_image_size`, `train_image_size`).
    model: the run's `hk.TransformedWithState`.
  """
  size = config.data.eval_image_size
  try:
    _init_shapes(model, size)
    return
  except ValueError as e:
    error = f'config.data.eval_image_size={size} cannot be evaluated: {e}'
  train_size = config.data.train_image_size
  try:
    _init_shapes(model, train_size)
  except ValueError as e:
    error = (
      f'config.model cannot be built for {train_size}-px images '
      f'(config.data.train_image_size): {e}'
    )
  raise ValueError(error)


def _init_shapes(model, size):
  # Training mode: eval mode would need the BatchNorm averages to exist.
  # Both modes check the input size alike.
  return jax.eval_shape(
    lambda rng, x: model.init(rng, x, True),
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
  )
