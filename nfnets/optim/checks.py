"""The optimizer's value checks, on concrete Python numbers.

Every number is checked once, where it enters the package: by
`config.validate` (called by `hyperparams`, i.e. at config time) for the
config path, and by the user-facing constructors `sgd_agc`, `adam_agc`,
`adaptive_grad_clip`, `make_lr_schedule`, `scaled_lr` and
`with_frozen_stages` for direct use. What they build
from (`chains.sgd_chain`, `chains.adam_chain`, `agc.agc_transform`,
`schedules.warmup_cosine`) and the train step take their numbers unchecked,
as Python floats or as traced scalars. Each message says what to change.

Every number must be a real number (a string such as '0.01' would fail
with a TypeError deep in a comparison) and finite: NaN fails every range
test below, and infinity is excluded by the upper bound `< inf`.
"""

import math

import jax

from nfnets.optim import groups


def check_number(name: str, value) -> float:
  """`value` as a float, if it is a real number (NaN and inf included).

  Args:
    name: the argument's name, for the message.
    value: a Python, NumPy or concrete JAX scalar.

  Returns:
    `float(value)`, for the range checks.

  Raises:
    ValueError: `value` is a string, a bool, None or not a scalar.
  """
  if value is None or isinstance(value, str | bytes | bool):
    number = None
  else:
    try:
      number = float(value)
    except (TypeError, ValueError):
      number = None
  if number is None:
    raise ValueError(
      f'{name} must be a number, got {value!r} ({type(value).__name__}).'
    )
  return number


def check_learning_rate(learning_rate) -> None:
  """A constant LR: finite and >= 0; schedules are not checked.

  A traced LR (an input of a jitted function) has no value to check.
  """
  if callable(learning_rate) or isinstance(learning_rate, jax.core.Tracer):
    return
  if not 0 <= check_number('learning_rate', learning_rate) < math.inf:
    raise ValueError(
      f'learning_rate must be >= 0 and finite, got {learning_rate} (the '
      'reference: 0.1 per 256 images), or an optax schedule.'
    )


def check_clipping(clipping: float, eps: float) -> None:
  """AGC's lambda and eps: both finite and > 0.

  None or 0 turn AGC off where a caller allows it, before this check.
  """
  if not 0 < check_number('AGC clipping', clipping) < math.inf:
    raise ValueError(
      f'AGC clipping must be > 0 and finite, got {clipping}. The paper uses '
      '0.01 at batch 1024-4096 (0.001-0.005 for Adam); to turn AGC off, '
      'leave it out (clipping=None, or 0 in config.optimizer).'
    )
  if not 0 < check_number('AGC eps', eps) < math.inf:
    raise ValueError(
      f'AGC eps must be > 0 and finite (the paper uses 1e-3), got {eps}.'
    )


def check_momentum(momentum: float) -> None:
  """SGD's momentum, Adam's b1: in [0, 1)."""
  if not 0.0 <= check_number('momentum', momentum) < 1.0:
    raise ValueError(
      f'momentum must be in [0, 1), got {momentum}. The reference uses 0.9.'
    )


def check_beta2(b2: float) -> None:
  """Adam's second-moment decay: in [0, 1)."""
  if not 0.0 <= check_number('Adam beta2 (b2)', b2) < 1.0:
    raise ValueError(f'Adam beta2 (b2) must be in [0, 1), got {b2}.')


def check_adam_eps(eps: float) -> None:
  """Adam's denominator epsilon: finite and >= 0."""
  if not 0 <= check_number('Adam eps', eps) < math.inf:
    raise ValueError(
      f'Adam eps must be >= 0 and finite (optax uses 1e-8), got {eps}.'
    )


def check_weight_decay(weight_decay: float) -> None:
  """The decay coefficient: finite and >= 0 (0 turns weight decay off)."""
  if not 0 <= check_number('weight_decay', weight_decay) < math.inf:
    raise ValueError(
      f'weight_decay must be >= 0 and finite, got {weight_decay} (the '
      'reference: 2e-5).'
    )


def check_groups(agc_exclude, wd_exclude) -> None:
  """The parameter-group regexes compile."""
  groups.compile_patterns(agc_exclude)
  groups.compile_patterns(wd_exclude)


def check_schedule(
  base_lr: float,
  total_steps: int,
  warmup_steps: float,
  min_lr: float,
  global_batch_size: int | None,
  scale_by_batch: bool,
) -> None:
  """The arguments of `schedules.make_lr_schedule` (which see), in order."""
  if scale_by_batch and global_batch_size is None:
    raise ValueError('scale_by_batch=True needs global_batch_size.')
  if global_batch_size is not None:  # Not `or 1`: 0 would pass as 1.
    check_batch_size(global_batch_size)
  check_number('warmup_steps', warmup_steps)
  if not check_number('total_steps', total_steps) < math.inf:  # Also NaN.
    raise ValueError(f'total_steps must be finite, got {total_steps}.')
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(
      f'Need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps:g}'
      f', total_steps={total_steps}. Shorten the warmup '
      '(config.optimizer.warmup_epochs, or warmup_steps, which overrides '
      'it) or train longer (config.train.num_steps or num_epochs).'
    )
  lrs = (check_number('lr', base_lr), check_number('min_lr', min_lr))
  if not all(0 <= x < math.inf for x in lrs):
    raise ValueError(
      f'LRs must be >= 0 and finite, got lr={base_lr}, min_lr={min_lr}.'
    )


def check_batch_size(global_batch_size: int) -> None:
  """The batch size of the LR scaling rule: finite and > 0."""
  if not 0 < check_number('global_batch_size', global_batch_size) < math.inf:
    raise ValueError(
      f'global_batch_size must be > 0 and finite, got {global_batch_size}.'
    )


def check_sam_rho(rho: float) -> None:
  """SAM's radius: finite and >= 0 (0 turns SAM off)."""
  if not 0 <= check_number('optimizer.sam_rho', rho) < math.inf:
    raise ValueError(f'optimizer.sam_rho must be >= 0 and finite, got {rho}.')


def check_sam_ascent(fraction: float, sync: bool) -> None:
  """SAM's ascent rows: a fraction in (0, 1]; `sync` a bool."""
  if not 0 < check_number('optimizer.sam_ascent_fraction', fraction) <= 1:
    raise ValueError(
      f'optimizer.sam_ascent_fraction must be in (0, 1], got {fraction}: the '
      "share of each replica's rows that takes SAM's ascent step (the paper "
      'uses 0.2).'
    )
  if not isinstance(sync, bool):
    raise ValueError(
      f'optimizer.sam_ascent_sync must be True or False, got {sync!r}.'
    )


def check_ema_decay(decay: float) -> None:
  """The EMA's target decay: in [0, 1) (0 turns the EMA off)."""
  if not 0.0 <= check_number('optimizer.ema_decay', decay) < 1.0:
    raise ValueError(
      f'optimizer.ema_decay must be in [0, 1) (0 = off), got {decay}.'
    )


def check_freeze_stages(
  num_stages: int, name: str = 'optimizer.freeze_stages'
) -> None:
  """Stages frozen for fine-tuning: an int in 0..4 (0 = none).

  Shared by the config and `chains.with_frozen_stages`, where -1 would
  silently act as 0 and 1.5 as 1.

  Args:
    num_stages: the number of stages to freeze.
    name: how the message names it.
  """
  if isinstance(num_stages, bool) or num_stages not in range(5):
    raise ValueError(
      f'{name} must be an integer in 0..4, got '
      f'{num_stages!r}: N > 0 freezes the stem and the first N stages.'
    )
