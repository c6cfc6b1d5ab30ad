"""`train_and_evaluate(config, workdir)`: one segment of a training run.

Order of events:
  1. runtime setup; the workdir locked (`workdir_lock`); SIGTERM and
     Ctrl-C handled from here on (`preemption.PreemptionGuard`);
  2. the config checked against the run's when resuming (a change to how
     the run trains is refused unless allowed: `provenance.resume_changes`);
  3. the mesh, data, model, optimizer and jitted steps (`_build_run`);
  4. a fresh state (or `config.model.init_from` weights), replaced by the
     newest readable checkpoint (`init_state.initial_train_state`), then
     the segment recorded (`provenance.start_segment`: config.json, the
     segment's record, metrics after the resume step set aside) and the
     classes (`run_weights.write_dataset_record`: dataset.json);
  5. the train loop (`_train`, `_train_steps`): log, evaluate and
     checkpoint at their cadences and on a signal; a non-finite loss stops
     the run (the last good checkpoint stays the newest);
  6. a final checkpoint and a final evaluation of the raw and EMA params
     (`_final_eval`; not repeated for a finished run).

Every model is transformed with state (`models.make_model`): BatchNorm
ResNets keep their moving averages in `TrainState.model_state`. The train
step is jitted over the mesh with the batch sharded, so BatchNorm's batch
statistics are computed over the global batch, across devices and hosts.

Resuming: the state is restored exactly and step t uses `fold_in(rng, t)`.
The data order follows `config.train.data_resume`: 'skip' rebuilds the
pipeline with the same seed and skips the batches consumed (an exact replay
when deterministic); 'reseed' starts a shuffle seeded by the resume step.
"""

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from nfnets import data, models, optim
from nfnets.train import checkpoint as ckpt_lib
from nfnets.train import config as config_lib
from nfnets.train import (
  evaluation,
  init_state,
  preemption,
  provenance,
  run_weights,
  runtime,
  workdir_lock,
  writers,
)
from nfnets.train import gradients as gradients_lib
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
    preempted: True when the run stopped on SIGTERM or SIGINT (Ctrl-C)
      before the end.
    stop_signal: the signal that stopped it (`signal.SIGTERM` or
      `signal.SIGINT`), or None.
  """

  state: state_lib.TrainState
  metrics: dict
  preempted: bool
  stop_signal: int | None = None


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
  dataset: data.DatasetInfo
  writer: writers.MetricWriter
  progress: writers.ProgressReporter


def train_and_evaluate(
  config, workdir: str, *, allow_config_change: bool = False
) -> TrainResult:
  """Trains and evaluates the model described by `config` in `workdir`.

  Rerunning with the same `workdir` resumes from its newest readable
  checkpoint, if `config` trains the same way as the run's saved config
  (`resume_rules.check_resume`); every segment's config is recorded.

  Args:
    config: a full experiment config (sections model, data, optimizer,
      train, eval, checkpoint), e.g. `configs/f0.py`'s `get_config()`.
    workdir: directory for checkpoints, metrics and the configs.
    allow_config_change: resume even when `config` changes how the run
      trains (the change is recorded).

  Returns:
    A `TrainResult`.

  Raises:
    NonFiniteLossError: when the loss or gradient becomes NaN/Inf.
    resume_rules.ConfigChangeError: resuming with a changed config, unless
      allowed.
    checkpoint.CheckpointError: no checkpoint of the run can be restored.
    ValueError: config values that cannot work, or a workdir that is a file.
    workdir_lock.WorkdirInUseError: another trainer runs in `workdir`.
  """
  config_lib.validate_config(config)
  runtime.setup_runtime(config.train)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config_lib.check_workdir(config, workdir)
  with workdir_lock.exclusive(workdir, enabled=jax.process_index() == 0):
    return _train_locked(config, workdir, allow_config_change)


def _train_locked(config, workdir: str, allow_config_change) -> TrainResult:
  """`train_and_evaluate` once the workdir is this process's alone."""
  checkpointer = None
  if config.checkpoint.enabled:
    checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      max_to_keep=config.checkpoint.max_to_keep,
    )
  # SIGTERM and Ctrl-C from here on stop the run at the next step boundary.
  guard = preemption.PreemptionGuard(
    config.checkpoint.save_on_sigterm, saves=checkpointer is not None
  )
  try:
    with guard:
      latest = checkpointer.latest_step() if checkpointer else None
      changes = provenance.resume_changes(
        config, workdir, latest_step=latest, allow_change=allow_config_change
      )
      run = _build_run(config, workdir)
      if latest is not None:  # Checkpoints made for these classes only.
        run_weights.check_same_classes(workdir, run.dataset)
      try:
        return _run_segment(run, checkpointer, guard, changes)
      finally:
        run.writer.close()
  finally:
    if checkpointer is not None:
      checkpointer.close()


def _run_segment(run: _Run, checkpointer, guard, changes) -> TrainResult:
  """Restores or initialises the state, trains, saves and evaluates."""
  state = init_state.initial_train_state(
    run.config,
    mesh=run.mesh,
    model=run.model,
    optimizer=run.optimizer,
    checkpointer=checkpointer,
    log=run.progress.print,
  )
  if jax.process_index() == 0:
    provenance.start_segment(
      run.workdir,
      run.config,
      start_step=int(state.step),
      total_steps=run.total_steps,
      changes=changes,
      num_devices=run.mesh.devices.size,
      log=run.progress.print,
    )
    run_weights.write_dataset_record(run.workdir, run.config.data, run.dataset)
  state, train_metrics, stopped = _train(run, state, checkpointer, guard)
  if checkpointer is not None:
    checkpointer.save(int(state.step), state)
  metrics = dict(train_metrics)
  if not stopped:
    final = _final_eval(run, state, guard)
    stopped = final is None
    metrics.update(final or {})
  if stopped:
    if checkpointer is not None:
      checkpointer.wait()  # "Saved" only once it is on disk.
    run.progress.print(guard.stop_message(int(state.step)))
  return TrainResult(
    state=state,
    metrics=metrics,
    preempted=stopped,
    stop_signal=guard.signal_number if stopped else None,
  )


# Building the run.


def _build_run(config, workdir: str) -> _Run:
  """Builds mesh, model, optimizer, jitted steps and writers."""
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(
    config.train.batch_size, mesh, 'config.train.batch_size'
  )
  mesh_lib.check_batch_size(
    config.eval.batch_size, mesh, 'config.eval.batch_size'
  )
  gradients_lib.check_grad_accum(
    config.train.batch_size, config.train.grad_accum_steps, mesh.devices.size
  )
  info = data.dataset_info(config.data)
  total_steps, steps_per_epoch = config_lib.run_length(
    config.train, info.num_train_examples
  )
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
  evaluation.check_eval_size(config, model)
  is_chief = jax.process_index() == 0
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
    dataset=info,
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
    grad_accum_steps=config.train.grad_accum_steps,
    # Augmentation on the accelerator, or None when the host does it.
    batch_fn=data.make_batch_fn(config.data, num_shards=mesh.devices.size),
    mesh=mesh,
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
    # 'skip' resumes where the batches left off (tf.data skips them one by
    # one; the python loader starts there without decoding them).
    start_batch=start_step if config.train.data_resume == 'skip' else 0,
  )
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
    run.progress.print(
      f'Nothing to train: the run is at step {start}, this config ends at '
      f'step {run.total_steps}.'
    )
    return state, {}, False
  run.progress.print(
    f'Training {run.total_steps} steps ({run.steps_per_epoch:.1f} per epoch) '
    f'of {config.train.batch_size} images on {run.mesh.devices.size} '
    f'device(s) in {jax.process_count()} process(es); workdir {run.workdir}'
  )
  batches = _train_iterator(config, start)
  run.progress.print('Compiling the train step (the first step waits for it)')
  cache_hits = writers.CacheHitCounter()
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
    host_batch = next(batches)
    run.progress.waited(time.perf_counter() - t0)  # For input_wait.
    batch = mesh_lib.shard_batch(host_batch, run.mesh)
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
      stop = stop or _evaluate_and_log(run, state, guard, final=False) is None
    if checkpointer and _is_due(done, config.checkpoint.every_steps):
      # Never checkpoint a state that a non-finite step produced.
      _check_finite(window, done, checkpointer)
      checkpointer.save(done, state)
    if stop:
      return state, last, True
  return state, last, False


def _is_due(done: int, every: int, end: int | None = None) -> bool:
  return (every > 0 and done % every == 0) or done == end


def _report_compile(run: _Run, state, done, t0, cache_hits) -> None:
  """Waits for the first step (incl. compilation) and starts the clock."""
  jax.block_until_ready(state.step)
  took = f'{time.perf_counter() - t0:.1f}s'
  if cache_hits.hits:
    message = f'First step took {took} (the train step came from the '
    message += 'persistent compilation cache).'
  else:
    message = f'First step (compilation included) took {took}.'
  cache_hits.close()
  run.progress.print(message)
  run.progress.start(done)


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
  rate = run.progress.rate(done)
  if math.isfinite(rate.images_per_sec):
    mean['train/images_per_sec'] = rate.images_per_sec
    mean['train/input_wait'] = rate.input_wait
  mean['train/epoch'] = done / run.steps_per_epoch
  run.writer.write(done, mean)
  run.progress.print(run.progress.train_line(done, mean, rate))
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


def _evaluate_and_log(run: _Run, state, guard, *, final: bool) -> dict | None:
  """`evaluation.evaluate_and_log` of the run; None when a signal stops it."""
  return evaluation.evaluate_and_log(
    run.config,
    run.mesh,
    run.eval_step,
    state,
    writer=run.writer,
    print_fn=run.progress.print,
    num_examples=run.dataset.num_eval_examples,
    # Polling across hosts would be a collective per batch.
    stop=guard.requested if jax.process_count() == 1 else None,
    label='Final eval' if final else 'Eval',
  )


def _final_eval(run: _Run, state, guard) -> dict | None:
  """The final evaluation, unless metrics.jsonl already holds it.

  A finished run that is rerun prints its logged result instead of
  evaluating (and logging) again. Returns None when a signal stops it.
  """
  step = int(state.step)
  logged = writers.logged_eval(run.workdir, step)
  done = bool(logged)
  if jax.process_count() > 1:  # Process 0's files decide for every process.
    done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
  if not done:
    return _evaluate_and_log(run, state, guard, final=True)
  logged.pop('step', None)
  line = ', '.join(f'{k} {v:.4f}' for k, v in logged.items() if 'top1' in k)
  run.progress.print(
    f'The run is finished at step {step}; its final eval is in '
    f'metrics.jsonl ({line}), so it is not repeated.'
  )
  return logged
