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
float32 because they are taken with respect to the float32 weights.

The Haiku state (`state.TrainState.model_state`: BatchNorm moving averages,
`{}` for the normalizer-free models) is updated by each training forward
pass and is read, not changed, by the eval step.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from nfnets import optim
from nfnets.train import losses
from nfnets.train import state as state_lib


def make_train_step(
  model: hk.TransformedWithState,
  *,
  num_classes: int,
  opt_config,
  compute_dtype: str,
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
  batch (synchronised BatchNorm) whatever the number of devices. With SAM,
  the second forward pass (at the ascent point) only provides the gradient;
  its state is discarded.

  Args:
    model: the transformed network (`models.make_model`);
      `apply(params, state, rng, images, is_training)` returns `(outputs,
      new_state)` with 'logits' in the outputs.
    num_classes: number of classes of the labels.
    opt_config: `config.optimizer`, already checked by `optim.hyperparams`;
      it fixes the structure (name, Nesterov, groups, which of AGC, SAM and
      weight decay are on).
    compute_dtype: 'float32' or 'bfloat16' for the forward/backward pass.

  Returns:
    The step function. Metrics (float32 scalars): loss, top1, top5 (against
    the unmixed labels), grad_norm (before clipping), param_norm (after the
    update), agc_clip_fraction and lr.
  """
  grad_fn = _make_grad_fn(model, compute_dtype)
  k5 = min(5, num_classes)

  def step(state: state_lib.TrainState, batch, hyperparams):
    optimizer, schedule_fn = optim.build_optimizer(opt_config, hyperparams)
    rng = jax.random.fold_in(state.rng, state.step)
    targets = losses.make_targets(batch, num_classes, hyperparams)
    (loss, (logits, model_state)), grads = grad_fn(
      state.params, state.model_state, batch, targets, rng
    )
    # The state keeps its dtypes whatever the compute dtype.
    model_state = jax.tree.map(
      lambda new, old: new.astype(old.dtype), model_state, state.model_state
    )
    if opt_config.sam_rho:
      # SAM: the update uses the gradient at the ascent point.
      perturbed = optim.sam_perturb(state.params, grads, hyperparams['sam_rho'])
      (_, _), grads = grad_fn(perturbed, state.model_state, batch, targets, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params, ema_model_state = _ema_updates(
      state, params, model_state, hyperparams['ema_decay']
    )
    metrics = {
      'loss': loss,
      'top1': jnp.mean(losses.topk_correct(logits, batch['labels'], 1)),
      'top5': jnp.mean(losses.topk_correct(logits, batch['labels'], k5)),
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
      model_state=model_state,
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


def _make_grad_fn(model: hk.TransformedWithState, compute_dtype: str):
  """`(params, model_state, batch, targets, rng) -> ((loss, aux), grads)`.

  `aux` is `(float32 logits, new model state)`; the forward pass runs in
  `compute_dtype`, the loss in float32.
  """
  dtype = jnp.dtype(compute_dtype)

  def loss_fn(params, model_state, batch, targets, rng):
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
