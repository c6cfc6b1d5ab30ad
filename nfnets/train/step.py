"""The train state, the pure train step and the eval step.

`make_train_step` returns a pure `(state, batch) -> (state, metrics)`
function; `make_hyperparam_train_step` the same with the optimizer's
numbers as a third input, which the loop jits once with the state donated
(so a sweep over LR, clipping or weight decay compiles one program).

Mixed precision follows the paper: float32 master weights are cast to the
compute dtype (and the images with them) for the forward and backward pass,
logits are cast back to float32 before the loss, and the gradients arrive in
float32 because they are taken with respect to the float32 weights.

Every model is an `hk.transform_with_state`: the Haiku state (the BatchNorm
moving averages of BN ResNets, `{}` for the normalizer-free models) rides in
the train state, is updated by each training forward pass and is read, not
changed, by the eval step.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from nfnets import optim


class TrainState(NamedTuple):
  """Everything a run needs to continue; checkpointed whole.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: float32 master weights (Haiku params dict).
    model_state: the Haiku state: BatchNorm moving averages (float32, with
      int32 update counters), `{}` for stateless models such as NFNets.
    opt_state: optimizer state.
    ema_params: EMA of the weights, or None when EMA is off.
    ema_model_state: EMA of `model_state` (every floating-point leaf
      averaged like the weights, as timm's ModelEmaV2 and big_vision do for
      BatchNorm statistics; integer counters copied), or None when EMA is
      off. Evaluation of `ema_params` uses it.
    rng: base PRNG key; step t uses `fold_in(rng, t)`, so a resumed run draws
      the same randomness as an uninterrupted one.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  ema_params: Any
  ema_model_state: Any
  rng: jax.Array


def _copy(tree):
  """A real copy: the state is donated, so no two leaves share a buffer."""
  return jax.tree.map(lambda x: x + 0, tree)


def make_train_state(
  params, model_state, optimizer: optax.GradientTransformation, rng, *, ema
) -> TrainState:
  """The state of step 0: optimizer initialised, EMAs copied from the start.

  Pure and traceable: jit it (with output shardings) to build the state on
  the devices, or `jax.eval_shape` it for the abstract state of a restore.

  Args:
    params: the initial weights.
    model_state: the initial Haiku state (`{}` for stateless models).
    optimizer: the optax transformation.
    rng: the run's base PRNG key (`TrainState.rng`).
    ema: whether the run keeps an EMA of the weights (and the state).

  Returns:
    A `TrainState` at step 0.
  """
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=optimizer.init(params),
    ema_params=_copy(params) if ema else None,
    ema_model_state=_copy(model_state) if ema else None,
    rng=rng,
  )


def ema_update_model_state(ema_state, new_state, step, decay: float):
  """One EMA step of the Haiku state (see `optim.ema_update`).

  Floating-point leaves (BatchNorm's averaged mean/variance and their
  debiasing `hidden` values) follow `ema * d + new * (1 - d)` with the same
  warmed-up decay as the weights; integer leaves (the moving averages' step
  counters) cannot be averaged and are copied from `new_state`.

  Args:
    ema_state: the running average of the state.
    new_state: the state after this step.
    step: index of the optimizer step just taken.
    decay: the target decay.

  Returns:
    The new running average, with the dtypes of `ema_state`.
  """

  def _leaf(ema, new):
    if jnp.issubdtype(ema.dtype, jnp.floating):
      return optim.ema_update(ema, new, step, decay)
    return new

  return jax.tree.map(_leaf, ema_state, new_state)


def cast_floats(tree, dtype):
  """Casts the floating-point leaves of `tree` to `dtype`."""

  def _cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(_cast, tree)


def make_targets(batch, num_classes: int, label_smoothing: float):
  """Returns the soft targets for a (possibly mixed) batch.

  With MixUp/CutMix the batch carries `mix_labels` and `ratio` (the weight of
  `labels`): the target is `ratio * onehot(labels) + (1 - ratio) *
  onehot(mix_labels)`. Label smoothing is applied afterwards, as in the
  reference: `(1 - s) * y + s / num_classes`.

  Args:
    batch: dict with int `labels` [B] and optionally `mix_labels`, `ratio`.
    num_classes: number of classes.
    label_smoothing: smoothing weight s.

  Returns:
    float32 [B, num_classes] targets summing to 1.
  """
  smoothing = label_smoothing_inputs(label_smoothing, num_classes)
  return _targets(batch, num_classes, smoothing)


def label_smoothing_inputs(
  label_smoothing: float, num_classes: int
) -> dict[str, float]:
  """`make_targets`' two numbers, `1 - s` and `s / num_classes`.

  Computed in float64 and rounded once, as Python did when they were
  constants, so the train step can take them as float32 inputs
  (`make_hyperparam_train_step`) and still give the same bits.

  Args:
    label_smoothing: smoothing weight s, in [0, 1).
    num_classes: number of classes.

  Returns:
    {'label_keep': 1 - s, 'label_floor': s / num_classes}.
  """
  return {
    'label_keep': 1.0 - label_smoothing,
    'label_floor': label_smoothing / num_classes,
  }


def _targets(batch, num_classes: int, smoothing):
  """`make_targets` from `label_smoothing_inputs` (floats or traced)."""
  y = jax.nn.one_hot(batch['labels'], num_classes, dtype=jnp.float32)
  if 'mix_labels' in batch:
    ratio = batch['ratio'].astype(jnp.float32)[:, None]
    y_mix = jax.nn.one_hot(batch['mix_labels'], num_classes, dtype=jnp.float32)
    y = ratio * y + (1.0 - ratio) * y_mix
  return smoothing['label_keep'] * y + smoothing['label_floor']


def softmax_cross_entropy(logits, targets):
  """Per-example cross-entropy of float32 `logits` against soft targets."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def topk_correct(logits, labels, k: int):
  """Returns float32 [B]: 1 where `labels` is among the top-k logits."""
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)


def make_train_step(
  model: hk.TransformedWithState,
  optimizer: optax.GradientTransformation,
  schedule_fn: Callable[[jax.Array], jax.Array],
  *,
  num_classes: int,
  opt_config,
  compute_dtype: str,
  label_smoothing: float,
):
  """Builds the pure train step `(state, batch) -> (state, metrics)`.

  The forward pass runs in training mode, so BatchNorm normalises with the
  statistics of the batch and the step keeps the moving averages it returns
  (cast back to the state's float32). Jitted over the `('data',)` mesh with
  the batch sharded (as the loop does), `jnp.mean` over the batch axis is a
  mean over the *global* batch: the compiler inserts the cross-device
  reduction, so BatchNorm's batch statistics are those of the whole global
  batch (synchronised BatchNorm) whatever the number of devices. With SAM,
  the second forward pass (at the ascent point) only provides the gradient;
  its state is discarded.

  The optimizer's numbers are constants of the compiled step here; the
  trainer uses `make_hyperparam_train_step`, which takes them as inputs.

  Args:
    model: the transformed network (`models.make_model`);
      `apply(params, state, rng, images, is_training)` returns `(outputs,
      new_state)` with 'logits' in the outputs.
    optimizer: the optax transformation (its update needs params).
    schedule_fn: step -> learning rate, reported as a metric.
    num_classes: number of classes of the labels.
    opt_config: `config.optimizer`; reads sam_rho, ema_decay, clipping, eps
      and agc_exclude.
    compute_dtype: 'float32' or 'bfloat16' for the forward/backward pass.
    label_smoothing: label smoothing weight.

  Returns:
    The step function. Metrics (float32 scalars): loss, top1, top5 (against
    the unmixed labels), grad_norm (before clipping), param_norm (after the
    update), agc_clip_fraction and lr.
  """
  body = _step_body(model, num_classes, opt_config, compute_dtype)
  values = {k: opt_config[k] for k in ('sam_rho', 'ema_decay', 'eps')}
  values['clipping'] = opt_config.clipping
  values.update(label_smoothing_inputs(label_smoothing, num_classes))

  def step(state: TrainState, batch):
    return body(state, batch, optimizer, schedule_fn, values)

  return step


def make_hyperparam_train_step(
  model: hk.TransformedWithState,
  *,
  num_classes: int,
  opt_config,
  compute_dtype: str,
):
  """The train step with the optimizer's numbers as an input.

  `(state, batch, hyperparams) -> (state, metrics)`, where `hyperparams`
  is `step_hyperparams(...)` as float32 scalars: the optimizer's numbers
  (`optim.hyperparams`: the LR schedule, momentum, weight decay, AGC's
  lambda and eps, EMA decay, SAM's rho) and label smoothing's. It computes
  what `make_train_step` does with the optimizer of `optim.make_optimizer`,
  bit for bit, but the compiled program is the same for any values of those
  numbers, so runs of a sweep over them share one entry of the persistent
  compilation cache (see `optim.hyperparams` for what still changes the
  program).

  Args:
    model: as for `make_train_step`.
    num_classes: number of classes of the labels.
    opt_config: `config.optimizer`, already checked by `optim.hyperparams`;
      its structure (name, Nesterov, groups, which parts are on) is fixed.
    compute_dtype: 'float32' or 'bfloat16' for the forward/backward pass.

  Returns:
    The step function; metrics as `make_train_step`'s.
  """
  body = _step_body(model, num_classes, opt_config, compute_dtype)

  def step(state: TrainState, batch, hyperparams):
    optimizer, schedule_fn = optim.build_optimizer(opt_config, hyperparams)
    return body(state, batch, optimizer, schedule_fn, hyperparams)

  return step


def step_hyperparams(
  config, *, num_classes: int, steps_per_epoch: float, total_steps: int
) -> dict[str, float]:
  """The numbers `make_hyperparam_train_step` takes, from a full config.

  Args:
    config: an experiment config (reads `optimizer`, `train.batch_size`
      and `train.label_smoothing`).
    num_classes: number of classes of the labels.
    steps_per_epoch: optimizer steps per epoch (for `warmup_epochs`).
    total_steps: the run length.

  Returns:
    `optim.hyperparams(...)` and `label_smoothing_inputs(...)` in one dict.
  """
  values = optim.hyperparams(
    config.optimizer,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    global_batch_size=config.train.batch_size,
  )
  smoothing = config.train.label_smoothing
  return {**values, **label_smoothing_inputs(smoothing, num_classes)}


def _step_body(model, num_classes, opt_config, compute_dtype):
  """`(state, batch, optimizer, schedule_fn, values) -> (state, metrics)`.

  `values` holds sam_rho, ema_decay, clipping, eps, label_keep and
  label_floor (floats or traced); `opt_config` decides whether SAM and the
  clip fraction are on.
  """
  dtype = jnp.dtype(compute_dtype)
  k5 = min(5, num_classes)

  def loss_fn(params, model_state, batch, targets, rng):
    out, new_model_state = model.apply(
      cast_floats(params, dtype),
      model_state,
      rng,
      batch['images'].astype(dtype),
      True,
    )
    logits = out['logits'].astype(jnp.float32)
    loss = jnp.mean(softmax_cross_entropy(logits, targets))
    return loss, (logits, new_model_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def body(state: TrainState, batch, optimizer, schedule_fn, values):
    rng = jax.random.fold_in(state.rng, state.step)
    targets = _targets(batch, num_classes, values)
    (loss, (logits, model_state)), grads = grad_fn(
      state.params, state.model_state, batch, targets, rng
    )
    # The state keeps its dtypes whatever the compute dtype.
    model_state = jax.tree.map(
      lambda new, old: new.astype(old.dtype), model_state, state.model_state
    )
    if opt_config.sam_rho:
      # SAM: the update uses the gradient at the ascent point.
      perturbed = optim.sam_perturb(state.params, grads, values['sam_rho'])
      (_, _), grads = grad_fn(perturbed, state.model_state, batch, targets, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = optim.ema_update(
        ema_params, params, state.step, values['ema_decay']
      )
    ema_model_state = state.ema_model_state
    if ema_model_state is not None:
      ema_model_state = ema_update_model_state(
        ema_model_state, model_state, state.step, values['ema_decay']
      )
    metrics = {
      'loss': loss,
      'top1': jnp.mean(topk_correct(logits, batch['labels'], 1)),
      'top5': jnp.mean(topk_correct(logits, batch['labels'], k5)),
      'grad_norm': optim.global_norm(grads),
      # Also guards checkpoints: a finite loss can still yield bad weights.
      'param_norm': optim.global_norm(params),
      'agc_clip_fraction': _clip_fraction(
        grads, state.params, opt_config, values
      ),
      'lr': jnp.asarray(schedule_fn(state.step), jnp.float32),
    }
    new_state = TrainState(
      step=state.step + 1,
      params=params,
      model_state=model_state,
      opt_state=opt_state,
      ema_params=ema_params,
      ema_model_state=ema_model_state,
      rng=state.rng,
    )
    return new_state, metrics

  return body


def _clip_fraction(grads, params, opt_config, values):
  """Fraction of units AGC clips this step (0 when AGC is off)."""
  if not opt_config.clipping:
    return jnp.zeros((), jnp.float32)
  mask = optim.agc_mask(params, exclude=opt_config.agc_exclude)
  frac = optim.agc_clip_fraction(
    grads, params, values['clipping'], values['eps'], mask
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
      'top1': jnp.sum(mask * topk_correct(logits, labels, 1)),
      'top5': jnp.sum(mask * topk_correct(logits, labels, k5)),
      'loss': jnp.sum(mask * softmax_cross_entropy(logits, onehot)),
      'count': jnp.sum(mask),
    }

  return eval_step
