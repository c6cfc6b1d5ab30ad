"""The train state, the pure train step and the eval step.

`make_train_step` returns a pure `(state, batch) -> (state, metrics)`
function; the loop jits it once with the state donated. Mixed precision
follows the paper: float32 master weights are cast to the compute dtype (and
the images with them) for the forward and backward pass, logits are cast
back to float32 before the loss, and the gradients arrive in float32
because they are taken with respect to the float32 weights.
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
    opt_state: optimizer state.
    ema_params: EMA of the weights, or None when EMA is off.
    rng: base PRNG key; step t uses `fold_in(rng, t)`, so a resumed run draws
      the same randomness as an uninterrupted one.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


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
  y = jax.nn.one_hot(batch['labels'], num_classes, dtype=jnp.float32)
  if 'mix_labels' in batch:
    ratio = batch['ratio'].astype(jnp.float32)[:, None]
    y_mix = jax.nn.one_hot(batch['mix_labels'], num_classes, dtype=jnp.float32)
    y = ratio * y + (1.0 - ratio) * y_mix
  return (1.0 - label_smoothing) * y + label_smoothing / num_classes


def softmax_cross_entropy(logits, targets):
  """Per-example cross-entropy of float32 `logits` against soft targets."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def topk_correct(logits, labels, k: int):
  """Returns float32 [B]: 1 where `labels` is among the top-k logits."""
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)


def make_train_step(
  model: hk.Transformed,
  optimizer: optax.GradientTransformation,
  schedule_fn: Callable[[jax.Array], jax.Array],
  *,
  num_classes: int,
  opt_config,
  compute_dtype: str,
  label_smoothing: float,
):
  """Builds the pure train step `(state, batch) -> (state, metrics)`.

  Args:
    model: the transformed network; `apply(params, rng, images, is_training)`
      returns a dict with 'logits'.
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
  dtype = jnp.dtype(compute_dtype)
  k5 = min(5, num_classes)

  def loss_fn(params, batch, rng):
    out = model.apply(
      cast_floats(params, dtype), rng, batch['images'].astype(dtype), True
    )
    logits = out['logits'].astype(jnp.float32)
    targets = make_targets(batch, num_classes, label_smoothing)
    return jnp.mean(softmax_cross_entropy(logits, targets)), logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, logits), grads = grad_fn(state.params, batch, rng)
    if opt_config.sam_rho:
      # SAM: the update uses the gradient at the ascent point.
      perturbed = optim.sam_perturb(state.params, grads, opt_config.sam_rho)
      (_, _), grads = grad_fn(perturbed, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = optim.ema_update(
        ema_params, params, state.step, opt_config.ema_decay
      )
    metrics = {
      'loss': loss,
      'top1': jnp.mean(topk_correct(logits, batch['labels'], 1)),
      'top5': jnp.mean(topk_correct(logits, batch['labels'], k5)),
      'grad_norm': optim.global_norm(grads),
      # Also guards checkpoints: a finite loss can still yield bad weights.
      'param_norm': optim.global_norm(params),
      'agc_clip_fraction': _clip_fraction(grads, state.params, opt_config),
      'lr': jnp.asarray(schedule_fn(state.step), jnp.float32),
    }
    new_state = TrainState(
      state.step + 1, params, opt_state, ema_params, state.rng
    )
    return new_state, metrics

  return step


def _clip_fraction(grads, params, opt_config):
  """Fraction of units AGC clips this step (0 when AGC is off)."""
  if not opt_config.clipping:
    return jnp.zeros((), jnp.float32)
  mask = optim.agc_mask(params, exclude=opt_config.agc_exclude)
  frac = optim.agc_clip_fraction(
    grads, params, opt_config.clipping, opt_config.eps, mask
  )
  return jnp.asarray(frac, jnp.float32)


def make_eval_step(model: hk.Transformed, num_classes: int):
  """Builds `(params, batch) -> sums` for one eval batch, in float32.

  Args:
    model: the transformed network.
    num_classes: number of classes.

  Returns:
    A function returning float32 scalars `top1`, `top5`, `loss` (plain
    cross-entropy) summed over the unmasked examples, and `count`.
  """
  k5 = min(5, num_classes)

  def eval_step(params, batch):
    out = model.apply(params, None, batch['images'], False)
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
