"""The learning rate: the batch scaling rule and the warmup-cosine schedule.

`make_lr_schedule` is the reference's `WarmupCosineDecay`: a linear warmup
from 0, then cosine decay to `min_lr`, optionally with the paper's linear
scaling rule `lr = base_lr * global_batch_size / 256`. Its numbers are
derived once, in float64 (`schedule_values`), and the compiled formula
(`warmup_cosine`) takes them as Python floats or as traced float32 inputs
of a train step, with the same bits either way.
"""

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from nfnets.optim import checks

Schedule = Callable[[jax.Array], jax.Array]

# LR scaling rule of the paper: `lr = base_lr * global_batch_size / 256`.
LR_REFERENCE_BATCH_SIZE = 256

# `warmup_cosine`'s arguments, as keys of `schedule_values`' result.
SCHEDULE_KEYS = (
  'lr_min', 'lr_half_range', 'lr_warmup_slope', 'warmup_steps',
  'inv_decay_steps',
)  # fmt: skip


def _peak(base_lr: float, global_batch_size: int, scale_by_batch: bool):
  if not scale_by_batch:
    return float(base_lr)
  return float(base_lr) * global_batch_size / LR_REFERENCE_BATCH_SIZE


def scaled_lr(
  base_lr: float, global_batch_size: int, scale_by_batch: bool = True
) -> float:
  """The peak LR: `base_lr * global_batch_size / 256` when scaling.

  Args:
    base_lr: LR per 256 images (0.1 in the paper).
    global_batch_size: images per optimizer step, over all devices.
    scale_by_batch: whether to apply the linear scaling rule.

  Returns:
    The peak learning rate (1.6 for the paper's batch of 4096).
  """
  checks.check_learning_rate(base_lr)
  checks.check_batch_size(global_batch_size)
  return _peak(base_lr, global_batch_size, scale_by_batch)


def make_lr_schedule(
  base_lr: float,
  *,
  total_steps: int,
  warmup_steps: float = 0.0,
  min_lr: float = 0.0,
  global_batch_size: int | None = None,
  scale_by_batch: bool = False,
) -> Schedule:
  """Linear warmup from 0, then cosine decay to `min_lr` (the reference's).

  `lr(t) = peak * t / warmup_steps` for `t <= warmup_steps`, then
  `min_lr + (peak - min_lr) * (1 + cos(pi * (t - w) / (total - w))) / 2`,
  reaching `min_lr` at `t = total_steps`. `warmup_steps` may be fractional
  (the reference uses 5 epochs = 1563.92 steps at batch 4096).

  Args:
    base_lr: the peak LR, or the LR per 256 images when `scale_by_batch`.
    total_steps: training steps; the cosine ends here.
    warmup_steps: length of the linear warmup, in (fractional) steps.
    min_lr: final LR, not scaled by batch size.
    global_batch_size: images per step; needed when `scale_by_batch`.
    scale_by_batch: multiply `base_lr` by `global_batch_size / 256`.

  Returns:
    A function of the step count (int or array) returning the LR (float32).
  """
  values = schedule_values(
    base_lr,
    total_steps=total_steps,
    warmup_steps=warmup_steps,
    min_lr=min_lr,
    global_batch_size=global_batch_size,
    scale_by_batch=scale_by_batch,
  )
  return schedule_of(values)


def schedule_values(
  base_lr, *, total_steps, warmup_steps, min_lr, global_batch_size,
  scale_by_batch,
) -> dict[str, float]:  # fmt: skip
  """Checks `make_lr_schedule`'s arguments; returns the derived numbers.

  Args:
    base_lr: as for `make_lr_schedule`.
    total_steps: likewise.
    warmup_steps: likewise.
    min_lr: likewise.
    global_batch_size: likewise.
    scale_by_batch: likewise.

  Returns:
    `lr_peak` (for reference) and `warmup_cosine`'s arguments
    (`SCHEDULE_KEYS`), as Python floats: derived in float64 and rounded to
    float32 only where they are used.
  """
  checks.check_schedule(
    base_lr, total_steps, warmup_steps, min_lr, global_batch_size,
    scale_by_batch,
  )  # fmt: skip
  peak = _peak(base_lr, global_batch_size or 1, scale_by_batch)
  return {
    'lr_peak': peak,
    'lr_min': float(min_lr),
    'lr_half_range': 0.5 * (peak - min_lr),
    'lr_warmup_slope': peak / warmup_steps if warmup_steps > 0 else 0.0,
    'warmup_steps': float(warmup_steps),
    'inv_decay_steps': 1.0 / (total_steps - warmup_steps),
  }


def schedule_of(values: Mapping) -> Schedule:
  """`warmup_cosine` of the `SCHEDULE_KEYS` entries of `values`.

  Args:
    values: `schedule_values(...)` or any mapping holding its keys (such as
      `config.hyperparams(...)`), as floats or traced scalars.

  Returns:
    The schedule.
  """
  return warmup_cosine(**{k: values[k] for k in SCHEDULE_KEYS})


def warmup_cosine(
  lr_min, lr_half_range, lr_warmup_slope, warmup_steps, inv_decay_steps
) -> Schedule:
  """The formula of `make_lr_schedule`, from its derived numbers; unchecked.

  The numbers may be Python floats or float32 scalars traced as inputs of a
  train step (`build_optimizer`). Both give the same bits because the
  formula has no division: XLA rewrites `x / constant` as a multiplication
  by the constant's reciprocal but keeps `x / input`, which differ in the
  last bit. Nothing branches on the numbers in Python either: no warmup is
  `warmup_steps == 0`.

  Args:
    lr_min: the final LR.
    lr_half_range: `(lr_peak - lr_min) / 2`.
    lr_warmup_slope: `lr_peak / warmup_steps` (0 without a warmup).
    warmup_steps: length of the linear warmup (0 for none).
    inv_decay_steps: `1 / (total_steps - warmup_steps)`.

  Returns:
    A function of the step count returning the LR (float32).
  """

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((t - warmup_steps) * inv_decay_steps, 0, 1)
    cos = lr_min + lr_half_range * (1 + jnp.cos(math.pi * frac))
    in_warmup = (t <= warmup_steps) & (jnp.asarray(warmup_steps) > 0)
    return jnp.where(in_warmup, lr_warmup_slope * t, cos).astype(jnp.float32)

  return schedule
