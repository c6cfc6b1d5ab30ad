"""Targets, the loss and top-k accuracy of the train and eval steps.

Label smoothing has one path: `label_smoothing_inputs` turns the smoothing
weight into two numbers, and `make_targets` applies them. The train step
takes those two numbers as inputs (beside the optimizer's), so a sweep over
label smoothing compiles one program.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def label_smoothing_inputs(
  label_smoothing: float, num_classes: int
) -> dict[str, float]:
  """Label smoothing's two numbers, `1 - s` and `s / num_classes`.

  Computed in float64 and rounded once, where they are used, so the train
  step gives the same bits whether it takes them as constants or as
  float32 inputs.

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


def make_targets(batch, num_classes: int, smoothing: Mapping):
  """Returns the soft targets for a (possibly mixed) batch.

  With MixUp/CutMix the batch carries `mix_labels` and `ratio` (the weight of
  `labels`): the target is `ratio * onehot(labels) + (1 - ratio) *
  onehot(mix_labels)`. Label smoothing is applied afterwards, as in the
  reference: `(1 - s) * y + s / num_classes`.

  Args:
    batch: dict with int `labels` [B] and optionally `mix_labels`, `ratio`.
    num_classes: number of classes.
    smoothing: a mapping holding `label_smoothing_inputs(s, num_classes)`'
      keys (the train step's hyperparameters do), as floats or traced.

  Returns:
    float32 [B, num_classes] targets summing to 1.
  """
  y = jax.nn.one_hot(batch['labels'], num_classes, dtype=jnp.float32)
  if 'mix_labels' in batch:
    ratio = batch['ratio'].astype(jnp.float32)[:, None]
    y_mix = jax.nn.one_hot(batch['mix_labels'], num_classes, dtype=jnp.float32)
    y = ratio * y + (1.0 - ratio) * y_mix
  return smoothing['label_keep'] * y + smoothing['label_floor']


def softmax_cross_entropy(logits, targets):
  """Per-example cross-entropy of float32 `logits` against soft targets.

  Args:
    logits: float32 [B, num_classes].
    targets: [B, num_classes], each row summing to 1.

  Returns:
    float32 [B].
  """
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def topk_correct(logits, labels, k: int):
  """Whether each label is among its example's top-k logits.

  Args:
    logits: [B, num_classes].
    labels: int [B].
    k: how many of the largest logits count.

  Returns:
    float32 [B]: 1 where `labels` is among the top-k logits, else 0.
  """
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)
