"""`train_and_evaluate(config, workdir)`: the whole training run.

Order of events:
  1. runtime setup (`runtime.setup_runtime`): host malloc settings on CPU,
     `jax.distributed.initialize` (when configured) and the persistent
     compilation cache;
  2. the `('data',)` mesh over every device, data/model/optimizer and the
     jitted steps from the config, the resolved config written to
     `<workdir>/config.json` (`_build_run`);
  3. a fresh state (or `config.model.init_from` weights), replaced by the
     newest checkpoint in `<workdir>/checkpoints` when there is one
     (`init_state.initial_train_state`);
  4. the train loop (`_train`, `_train_steps`): log every
     `log_every_steps`, evaluate every `eval.every_steps`, checkpoint every
     `checkpoint.every_steps` and on SIGTERM; a non-finite loss stops the
     run (no checkpoint is written from then on, so the last good one stays
     the newest);
  5. a final checkpoint and a final evaluation of the raw and EMA
     parameters (`_evaluate_and_log`, through `evaluation.evaluate_sets`).

Contents, in order: the result types; `train_and_evaluate`; building the
run (`_run_length`, `_build_run`, `_jit_steps`); the input
(`_train_iterator`); the steps (`_train`, `_train_steps`, the first-step
compile report); checks and logs (`_check_finite`, `_log_train`,
`_stop_non_finite`, `_evaluate_and_log`).

Every model is transformed with state (`models.make_model`): BatchNorm
ResNets keep their moving averages in `TrainState.model_state` (replicated
like the params; `{}` for the normalizer-free models). The train step is
jitted over the mesh with the batch sharded, so BatchNorm's batch statistics
are computed over the global batch, across devices and hosts.

Resuming: the state (step, params, model state, optimizer state, EMAs, RNG
key) is restored exactly and step t always uses `fold_in(rng, t)`. tf.data
gives no way to checkpoint the input pipeline's position, so the data order
on resume depends on `config.train.data_resume`: 'skip' rebuilds the
pipeline with the same seed and skips the batches already consumed (an exact
replay when the data pipeline is deterministic); 'reseed' starts a new
shuffle seeded by the resume step (cheap; examples are still drawn
uniformly, but the run does not see exactly the order an uninterrupted run
would).
"""

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np

from nfnets import data, models, optim
from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import config as config_lib
from nfnets.train import evaluation, init_state, runtime, writers
from nfnets.train import mesh as mesh_lib
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """Raised when a step's loss, gradient or updated weights are NaN/Inf."""


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns.

  Attributes:
    state: the final `TrainState` (global, replicated arrays).
    metrics: the last train metrics and the final eval metrics, by name.
    preempted: True when the run stopped on SIGTERM before the end.
  """

  state: state_lib.TrainState
  metrics: dict
  preempted: bool


@dataclasses.dataclass
class _Run:
  """Everything built from the config that the loop needs."""

  config: Any
  workdir: str
  mesh: Any
  total_steps: int
  steps_per_epoch: float
  model: Any
  optimizer: Any
  train_step: Any
  eval_step: Any
  writer: writers.MetricWriter
  progress: writers.ProgressReporter


def train_and_evaluate(config, workdir: str) -> TrainResult:
  """Trains and evaluates the model described by `config` in `workdir`.

  Rerunning with the same `workdir` resumes from its newest checkpoint.

  Args:
    config: a full experiment config (sections model, data, optimizer,
      train, eval, checkpoint), e.g. `configs/f0.py`'s `get_config()`.
    workdir: directory for checkpoints, metrics and the resolved config.

  Returns:
    A `TrainResult`.

  Raises:
    NonFiniteLossError: when the loss or gradient becomes NaN/Inf.
    ValueError: for config values that cannot work (with what to change).
  """
  config_lib.validate_config(config)
  runtime.setup_runtime(config.train)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  run = _build_run(config, workdir)
  checkpointer = None
  if config.checkpoint.enabled:
    checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      max_to_keep=config.checkpoint.max_to_keep,
    )
  try:
    state = init_state.initial_train_state(
      config,
      mesh=run.mesh,
      model=run.model,
      optimizer=run.optimizer,
      checkpointer=checkpointer,
      log=run.progress.print,
    )
    guard = ckpt_lib.PreemptionGuard(config.checkpoint.save_on_sigterm)
    with guard:
      state, train_metrics, preempted = _train(run, state, checkpointer, guard)
    if checkpointer is not None:
      checkpointer.save(int(state.step), state)
    metrics = dict(train_metrics)
    if not preempted:
      metrics.update(_evaluate_and_log(run, state, final=True))
    else:
      run.progress.print(
        f'Stopped by SIGTERM at step {int(state.step)}; checkpoint saved. '
        'Rerun the same command to resume.'
      )
    return TrainResult(state=state, metrics=metrics, preempted=preempted)
  finally:
    if checkpointer is not None:
      checkpointer.close()
    run.writer.close()


# Building the run.


def _run_length(config, num_train_examples: int) -> tuple[int, float]:
  """Returns (total_steps, steps_per_epoch) from the train config."""
  steps_per_epoch = num_train_examples / config.train.batch_size
  if config.train.num_steps > 0:
    return int(config.train.num_steps), steps_per_epoch
  return int(math.ceil(config.train.num_epochs * steps_per_epoch)), (
    steps_per_epoch
  )


def _build_run(config, workdir: str) -> _Run:
  """Builds mesh, model, optimizer, jitted steps and writers."""
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(
    config.train.batch_size, mesh, 'config.train.batch_size'
  )
  mesh_lib.check_batch_size(
    config.eval.batch_size, mesh, 'config.eval.batch_size'
  )
  info = data.dataset_info(config.data)
  total_steps, steps_per_epoch = _run_length(config, info.num_train_examples)
  model = models.make_model(config.model, info.num_classes)
  hyperparams = step_lib.step_hyperparams(
    config,
    num_classes=info.num_classes,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
  )
  optimizer, _ = optim.build_optimizer(config.optimizer, hyperparams)
  train_step, eval_step = _jit_steps(
    config, mesh, model, hyperparams, info.num_classes
  )
  is_chief = jax.process_index() == 0
  if is_chief:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return _Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    model=model,
    optimizer=optimizer,
    train_step=train_step,
    eval_step=eval_step,
    writer=writers.MetricWriter(workdir, enabled=is_chief),
    progress=writers.ProgressReporter(
      total_steps=total_steps,
      batch_size=config.train.batch_size,
      enabled=is_chief,
    ),
  )


def _jit_steps(config, mesh, model, hyperparams, num_classes):
  """Returns the jitted train step (state donated) and eval step.

  The train step takes the optimizer's numbers as replicated inputs
  (`make_train_step`), bound here, so the loop calls
  `train_step(state, batch)` and runs that differ only in those numbers
  compile the same program.
  """
  step_fn = step_lib.make_train_step(
    model,
    num_classes=num_classes,
    opt_config=config.optimizer,
    compute_dtype=config.train.compute_dtype,
  )
  repl = mesh_lib.replicated_sharding(mesh)
  batch = mesh_lib.batch_sharding(mesh)
  jitted = jax.jit(
    step_fn,
    in_shardings=(repl, batch, repl),
    out_shardings=(repl, repl),
    donate_argnums=0,
  )
  inputs = mesh_lib.replicate(
    {k: np.float32(v) for k, v in hyperparams.items()}, mesh
  )

  def train_step(state, batch):
    return jitted(state, batch, inputs)

  eval_step = evaluation.jit_eval_step(model, num_classes, mesh)
  return train_step, eval_step


# The input.


def _train_iterator(config, start_step: int):
  """This process's train batches from `start_step` on."""
  seed = config.train.seed
  if config.train.data_resume == 'reseed' and start_step:
    seed = seed + 1_000_003 * start_step  # A fresh, step-determined shuffle.
  index, count = jax.process_index(), jax.process_count()
  sliced = config.train.host_input == 'slice' and count > 1
  it = data.make_train_iterator(
    config.data,
    global_batch_size=config.train.batch_size,
    process_index=0 if sliced else index,
    process_count=1 if sliced else count,
    seed=seed,
  )
  if config.train.data_resume == 'skip':
    for _ in range(start_step):
      next(it)
  if sliced:
    it = _rows_of_process(it, index, count)
  return it


def _rows_of_process(batches, index: int, count: int):
  """Yields this process's contiguous rows of each global batch."""
  for batch in batches:
    n = len(batch['labels']) // count
    yield {k: v[index * n : (index + 1) * n] for k, v in batch.items()}


# The steps.


def _train(run: _Run, state, checkpointer, guard):
  """Runs train steps until the end or SIGTERM; returns (state, m, stop)."""
  config = run.config
  start = int(state.step)
  if start >= run.total_steps:
    return state, {}, False
  run.progress.print(
    f'Training {run.total_steps} steps ({run.steps_per_epoch:.1f} per epoch) '
    f'of {config.train.batch_size} images on {run.mesh.devices.size} '
    f'device(s) in {jax.process_count()} process(es); workdir {run.workdir}'
  )
  batches = _train_iterator(config, start)
  run.progress.print('Compiling the train step (the first step waits for it)')
  cache_hits = _CacheHitCounter()
  try:
    return _train_steps(run, state, checkpointer, guard, batches, cache_hits)
  finally:
    cache_hits.close()


def _train_steps(run: _Run, state, checkpointer, guard, batches, cache_hits):
  """The loop of `_train`, from the state's step to the end or SIGTERM."""
  config = run.config
  start = int(state.step)
  window, last = [], {}
  for step in range(start, run.total_steps):
    t0 = time.perf_counter()
    batch = mesh_lib.shard_batch(next(batches), run.mesh)
    state, metrics = run.train_step(state, batch)
    window.append(metrics)
    done = step + 1
    if step == start:
      _report_compile(run, state, done, t0, cache_hits)
    # Across hosts the check is a collective, so only do it when logging.
    stop = (
      jax.process_count() == 1
      or _is_due(done, config.train.log_every_steps, run.total_steps)
    ) and guard.requested()
    if _is_due(done, config.train.log_every_steps, run.total_steps) or stop:
      last = _log_train(run, window, done, checkpointer)
      window = []
    if _is_due(done, config.eval.every_steps) and done < run.total_steps:
      _check_finite(window, done, checkpointer)
      _evaluate_and_log(run, state, final=False)
    if checkpointer and _is_due(done, config.checkpoint.every_steps):
      # Never checkpoint a state that a non-finite step produced.
      _check_finite(window, done, checkpointer)
      checkpointer.save(done, state)
    if stop:
      return state, last, True
  return state, last, False


def _is_due(done: int, every: int, end: int | None = None) -> bool:
  return (every > 0 and done % every == 0) or done == end


class _CacheHitCounter:
  """Counts persistent compilation cache hits until closed.

  Only the train step compiles during the first step, so a hit then means
  the step was loaded from the cache, e.g. for a later point of a sweep
  over the step's inputs (`step.step_hyperparams`).
  """

  _EVENT = '/jax/compilation_cache/cache_hits'

  def __init__(self):
    self.hits = 0
    self._listener = self._on_event  # The same object to unregister.
    jax.monitoring.register_event_listener(self._listener)

  def _on_event(self, event: str, **_) -> None:
    if event == self._EVENT:
      self.hits += 1

  def close(self) -> None:
    if self._listener is not None:
      jax.monitoring.unregister_event_listener(self._listener)
      self._listener = None


def _report_compile(run: _Run, state, done, t0, cache_hits) -> None:
  """Waits for the first step (incl. compilation) and starts the clock."""
  jax.block_until_ready(state.step)
  took = _since(t0)
  if cache_hits.hits:
    message = f'First step took {took} (the train step came from the '
    message += 'persistent compilation cache).'
  else:
    message = f'First step (compilation included) took {took}.'
  cache_hits.close()
  run.progress.print(message)
  run.progress.start(done)


def _since(t0: float) -> str:
  return f'{time.perf_counter() - t0:.1f}s'


# Checks and logs.


def _check_finite(window, done: int, checkpointer) -> list:
  """Fetches the metrics of the steps up to `done`; stops if any is bad."""
  values = jax.device_get(window)
  first = done - len(values) + 1
  for i, m in enumerate(values):
    if not all(np.isfinite(m[k]) for k in ('loss', 'grad_norm', 'param_norm')):
      _stop_non_finite(first + i, m, checkpointer)
  return values


def _log_train(run: _Run, window, done: int, checkpointer) -> dict:
  """Checks a window of step metrics and logs their mean."""
  values = _check_finite(window, done, checkpointer)
  mean = {
    f'train/{k}': float(np.mean([m[k] for m in values])) for k in values[0]
  }
  mean['train/lr'] = float(values[-1]['lr'])
  images_per_sec, eta = run.progress.rate(done)
  if math.isfinite(images_per_sec):
    mean['train/images_per_sec'] = images_per_sec
  mean['train/epoch'] = done / run.steps_per_epoch
  run.writer.write(done, mean)
  run.progress.print(run.progress.train_line(done, mean, images_per_sec, eta))
  return mean


def _stop_non_finite(step: int, metrics, checkpointer) -> None:
  """Raises `NonFiniteLossError` naming the step and the kept checkpoint."""
  kept = 'no checkpoint was written yet'
  if checkpointer is not None:
    checkpointer.wait()
    latest = checkpointer.latest_step()
    if latest is not None:
      kept = f'the last good checkpoint (step {latest}) is kept in ' + (
        checkpointer.directory
      )
  values = ', '.join(
    f'{k}={float(metrics[k])}' for k in ('loss', 'grad_norm', 'param_norm')
  )
  raise NonFiniteLossError(
    f'Non-finite loss at step {step} ({values}); stopping, {kept}. Try a '
    'lower config.optimizer.lr, AGC (config.optimizer.clipping) or '
    "config.train.compute_dtype='float32'."
  )


def _evaluate_and_log(run: _Run, state, *, final: bool) -> dict:
  """Evaluates the raw (and EMA) params, logs and returns the metrics."""
  step = int(state.step)
  t0 = time.perf_counter()
  sets = {'eval': (state.params, state.model_state)}
  if run.config.eval.ema and state.ema_params is not None:
    sets['eval_ema'] = (state.ema_params, state.ema_model_state)
  results = evaluation.evaluate_sets(run.config, run.mesh, run.eval_step, sets)
  run.writer.write(step, results)
  line = ' | '.join(
    f'{p} top1 {results[f"{p}/top1"]:.4f} top5 {results[f"{p}/top5"]:.4f}'
    for p in sets
  )
  label = 'Final eval' if final else 'Eval'
  run.progress.print(
    f'{label} at step {step} ({int(results["eval/num_examples"])} '
    f'examples, {_since(t0)}): {line}'
  )
  return results
