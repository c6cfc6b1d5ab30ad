"""The pure train step and the eval step.

`make_train_step` returns the train step, a pure
`(state, batch, hyperparams) -> (state, metrics)` function whose third
input holds every number of the optimizer and of label smoothing
(`step_hyperparams`). The loop jits it once with the state donated and the
numbers as float32 inputs, so a sweep over LR, clipping or weight decay
compiles one program; binding the numbers as Python floats instead (e.g.
`functools.partial(step, hyperparams=values)`) gives the step with them as
constants, with the same bits.

Mixed precision follows the paper: float32 master weights are cast to the
compute dtype (and the images with them) for the forward and backward pass,
logits are cast back to float32 before the loss, and the gradients arrive in
float32 because they are taken with respect to the float32 weights. The
'bfloat16_convs' policy keeps the weights and activations in float32 and
casts only the convolutions' operands (`nfnets.models.precision`).

With `grad_accum_steps > 1` the step processes its batch as micro-batches
one after another and applies one update from their averaged gradient
(`make_train_step` says how the rows are split and what that means for
BatchNorm, SAM and the per-step randomness).

The Haiku state (`state.TrainState.model_state`: BatchNorm moving averages,
`{}` for the normalizer-free models) is updated by each training forward
pass and is read, not changed, by the eval step.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from nfnets import optim
from nfnets.models import precision
from nfnets.train import gradients as gradients_lib
from nfnets.train import losses, sam
from nfnets.train import state as state_lib

# `fold_in` data of `batch_fn`'s key, from the step's key. The model's keys
# are the step's key (one pass) or its `fold_in` with 0..k-1 (micro-batches),
# with unsynced SAM first folded with the device index; k and the device
# count stay far below this.
BATCH_FN_KEY_TAG = 0x62617463


def make_train_step(
  model: hk.TransformedWithState,
  *,
  num_classes: int,
  opt_config,
  compute_dtype: str,
  grad_accum_steps: int = 1,
  batch_fn=None,
  mesh=None,
):
  """Builds the train step `(state, batch, hyperparams) -> (state, metrics)`.

  `hyperparams` is `step_hyperparams(...)`: the optimizer's numbers
  (`optim.hyperparams`: the LR schedule, momentum, weight decay, AGC's
  lambda and eps, EMA decay, SAM's rho) and label smoothing's, as float32
  scalars or Python floats. The step builds the optimizer from them
  (`optim.build_optimizer`); as inputs, the compiled program is the same for
  any of their values, so runs of a sweep share one entry of the persistent
  compilation cache (see `optim.hyperparams` for what still changes it).

  The forward pass runs in training mode, so BatchNorm normalises with the
  statistics of the batch and the step keeps the moving averages it returns
  (cast back to the state's float32). Jitted over the `('data',)` mesh with
  the batch sharded (as the loop does), `jnp.mean` over the batch axis is a
  mean over the *global* batch: the compiler inserts the cross-device
  reduction, so BatchNorm's batch statistics are those of the whole global
  batch (synchronised BatchNorm) whatever the number of devices. SAM
  (`optimizer.sam_rho > 0`) takes the update's gradient at the ascent point;
  `nfnets.train.sam` says which rows and devices take the ascent step and
  which pass gives the metrics and the state.

  Gradient accumulation (`grad_accum_steps=k > 1`): the global batch of B
  rows is processed as k micro-batches of B / k rows, one after another
  (`lax.scan`), so peak activation memory is that of one micro-batch. Each
  micro-batch's gradient (of its mean loss) is summed in float32 and the sum
  divided by k before AGC, weight decay and momentum: the update is that of
  the full batch up to float rounding, and the metrics cover the full batch.
  The split keeps every row on its device
  (`gradients.split_micro_batches`): with D
  devices, micro-batch j holds rows j*m..(j+1)*m-1 of every device's B / D
  rows (m = B / (D k)), so no row crosses devices. Consequences:
    * BatchNorm normalises each micro-batch with its own statistics (over
      its B / k rows on all devices), and the Haiku state is carried through
      the micro-batches: the moving averages take k updates per optimizer
      step (an effective per-step decay of decay**k).
    * Dropout and stochastic depth draw micro-batch j's masks from
      `fold_in(key, j)`, `key` being the step's key, so they differ from
      those of the same rows at k = 1.
    * SAM works: with synced ascent steps the ascent point comes from the
      gradient accumulated over the micro-batches (SAM's full-batch update
      up to rounding); unsynced, each device's share of each micro-batch
      takes its own (`nfnets.train.sam`).
  On CPU the micro-batches are unrolled instead of looped (XLA:CPU runs
  convolution gradients in a loop body many times slower), so there the
  memory saving is not guaranteed.
  B must be a multiple of k times `jax.device_count()` (the loop checks
  that at start-up, `gradients.check_grad_accum`; tracing checks it
  again).

  `batch_fn`, an optional `(batch, key) -> batch`, is applied inside the
  step to the global batch before it is split into micro-batches, e.g.
  augmentation on the accelerator: it may change the leading size and the
  dtypes (uint8 images in, float images with `labels`, `mix_labels` and
  `ratio` out). Its key is `fold_in(fold_in(state.rng, state.step),
  BATCH_FN_KEY_TAG)`: a function of the run's key and the step alone, so a
  resumed run draws the same augmentation, and distinct from the model's
  keys (the step key itself at k = 1, `fold_in(step key, j)` for j < k
  otherwise; with unsynced SAM, those of `fold_in(step key, device)`).

  Args:
    model: the transformed network (`models.make_model`);
      `apply(params, state, rng, images, is_training)` returns `(outputs,
      new_state)` with 'logits' in the outputs.
    num_classes: number of classes of the labels.
    opt_config: `config.optimizer`, already checked by `optim.hyperparams`;
      it fixes the structure (name, Nesterov, groups, which of AGC, SAM and
      weight decay are on).
    compute_dtype: a `nfnets.models.precision.POLICIES` name for the
      forward/backward pass: 'float32', 'bfloat16' or 'bfloat16_convs'.
    grad_accum_steps: number of micro-batches per optimizer step (>= 1).
    batch_fn: optional `(batch, key) -> batch` applied to the global batch
      inside the step; None leaves the batch as given.
    mesh: the `('data',)` mesh the step will run on: its device count
      lays out the micro-batches and SAM's replicas (`nfnets.train.sam`;
      default: every device).

  Returns:
    The step function. Metrics (float32 scalars): loss, top1, top5 (against
    the unmixed labels), grad_norm (before clipping), param_norm (after the
    update), agc_clip_fraction and lr; with `freeze_stages`, grad_norm and
    agc_clip_fraction cover the trainable parameters alone.

  Raises:
    ValueError: if `grad_accum_steps` is not an integer >= 1.
  """
  gradients_lib.check_accum_steps(grad_accum_steps)
  pass_fn = gradients_lib.make_pass(
    _make_grad_fn(model, compute_dtype, opt_config.get('freeze_stages', 0)),
    num_classes,
  )
  gradients = _batch_gradients(pass_fn, opt_config, grad_accum_steps, mesh)

  def step(state: state_lib.TrainState, batch, hyperparams):
    optimizer, schedule_fn = optim.build_optimizer(opt_config, hyperparams)
    rng = jax.random.fold_in(state.rng, state.step)
    if batch_fn is not None:
      batch = batch_fn(batch, jax.random.fold_in(rng, BATCH_FN_KEY_TAG))
    out = gradients(state.params, state.model_state, batch, hyperparams, rng)
    grads = out.grads  # With SAM, the gradient at the ascent point.
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params, ema_model_state = _ema_updates(
      state, params, out.model_state, hyperparams['ema_decay']
    )
    metrics = {
      'loss': out.loss,
      'top1': out.top1,
      'top5': out.top5,
      'grad_norm': optim.global_norm(grads),
      # Also guards checkpoints: a finite loss can still yield bad weights.
      'param_norm': optim.global_norm(params),
      'agc_clip_fraction': _clip_fraction(
        grads, state.params, opt_config, hyperparams
      ),
      'lr': jnp.asarray(schedule_fn(state.step), jnp.float32),
    }
    new_state = state_lib.TrainState(
      step=state.step + 1,
      params=params,
      model_state=out.model_state,
      opt_state=opt_state,
      ema_params=ema_params,
      ema_model_state=ema_model_state,
      rng=state.rng,
    )
    return new_state, metrics

  return step


def step_hyperparams(
  config, *, num_classes: int, steps_per_epoch: float, total_steps: int
) -> dict[str, float]:
  """The numbers `make_train_step`'s step takes, from a config.

  Args:
    config: an experiment config (reads `optimizer`, `train.batch_size`
      and `train.label_smoothing`).
    num_classes: number of classes of the labels.
    steps_per_epoch: optimizer steps per epoch (for `warmup_epochs`).
    total_steps: the run length.

  Returns:
    `optim.hyperparams(...)` and `losses.label_smoothing_inputs(...)` in
    one dict, as Python floats.
  """
  values = optim.hyperparams(
    config.optimizer,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    global_batch_size=config.train.batch_size,
  )
  smoothing = config.train.label_smoothing
  return {**values, **losses.label_smoothing_inputs(smoothing, num_classes)}


def _batch_gradients(pass_fn, opt_config, grad_accum_steps, mesh):
  """The step's gradient function: plain (micro-batched) or with SAM."""
  if opt_config.sam_rho:
    return sam.make_sam_gradients(
      pass_fn,
      opt_config=opt_config,
      grad_accum_steps=grad_accum_steps,
      mesh=mesh,
    )
  return gradients_lib.make_gradients(
    pass_fn,
    grad_accum_steps=grad_accum_steps,
    num_devices=None if mesh is None else mesh.devices.size,
  )


def _make_grad_fn(
  model: hk.TransformedWithState, compute_dtype: str, freeze_stages: int
):
  """`(params, model_state, batch, targets, rng) -> ((loss, aux), grads)`.

  `aux` is `(float32 logits, new model state)`; the forward pass follows
  the `compute_dtype` policy (`nfnets.models.precision`), the loss is
  float32. The gradients of parameters frozen by `freeze_stages` are zeros
  that are never computed (`optim.stop_frozen_gradients`).
  """
  dtype = precision.variables_dtype(compute_dtype)

  def loss_fn(params, model_state, batch, targets, rng):
    params = optim.stop_frozen_gradients(params, freeze_stages)
    with precision.policy_scope(compute_dtype):
      out, new_model_state = model.apply(
        state_lib.cast_floats(params, dtype),
        model_state,
        rng,
        batch['images'].astype(dtype),
        True,
      )
    logits = out['logits'].astype(jnp.float32)
    loss = jnp.mean(losses.softmax_cross_entropy(logits, targets))
    return loss, (logits, new_model_state)

  return jax.value_and_grad(loss_fn, has_aux=True)


def _ema_updates(state: state_lib.TrainState, params, model_state, decay):
  """The EMAs of the weights and of the Haiku state after this step.

  Each is None (and stays None) when the run keeps no EMA.
  """
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = optim.ema_update(ema_params, params, state.step, decay)
  ema_model_state = state.ema_model_state
  if ema_model_state is not None:
    ema_model_state = state_lib.ema_update_model_state(
      ema_model_state, model_state, state.step, decay
    )
  return ema_params, ema_model_state


def _clip_fraction(grads, params, opt_config, hyperparams):
  """Fraction of units AGC clips this step (0 when AGC is off)."""
  if not opt_config.clipping:
    return jnp.zeros((), jnp.float32)
  mask = optim.agc_mask(params, exclude=opt_config.agc_exclude)
  frozen = optim.frozen_mask(params, opt_config.get('freeze_stages', 0))
  mask = jax.tree.map(lambda m, f: m and not f, mask, frozen)
  frac = optim.agc_clip_fraction(
    grads, params, hyperparams['clipping'], hyperparams['eps'], mask
  )
  return jnp.asarray(frac, jnp.float32)


def make_eval_step(model: hk.TransformedWithState, num_classes: int):
  """Builds `(params, model_state, batch) -> sums` for one eval batch.

  The forward pass runs in eval mode in float32: BatchNorm normalises with
  the moving averages in `model_state` (so each example's logits do not
  depend on the rest of the batch) and the state is not changed.

  Args:
    model: the transformed network (`models.make_model`).
    num_classes: number of classes.

  Returns:
    A function returning float32 scalars `top1`, `top5`, `loss` (plain
    cross-entropy) summed over the unmasked examples, and `count`.
  """
  k5 = min(5, num_classes)

  def eval_step(params, model_state, batch):
    out, _ = model.apply(params, model_state, None, batch['images'], False)
    logits = out['logits'].astype(jnp.float32)
    labels = batch['labels']
    mask = batch['mask'].astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return {
      'top1': jnp.sum(mask * losses.topk_correct(logits, labels, 1)),
      'top5': jnp.sum(mask * losses.topk_correct(logits, labels, k5)),
      'loss': jnp.sum(mask * losses.softmax_cross_entropy(logits, onehot)),
      'count': jnp.sum(mask),
    }

  return eval_step
