"""The optimizer's value checks, on concrete Python numbers.

Every number is checked once, where it enters the package: by
`config.validate` (called by `hyperparams`, i.e. at config time) for the
config path, and by the user-facing constructors `sgd_agc`, `adam_agc`,
`adaptive_grad_clip` and `make_lr_schedule` for direct use. What they build
from (`chains.sgd_chain`, `chains.adam_chain`, `agc.agc_transform`,
`schedules.warmup_cosine`) and the train step take their numbers unchecked,
as Python floats or as traced scalars. Each message says what to change.
"""

from nfnets.optim import groups


def check_clipping(clipping: float, eps: float) -> None:
  """AGC's lambda and eps: both > 0 (None or 0 turn AGC off elsewhere)."""
  if not clipping > 0:  # Also catches NaN.
    raise ValueError(
      f'AGC clipping must be > 0, got {clipping}. The paper uses 0.01 at '
      'batch 1024-4096 (0.001-0.005 for Adam); to turn AGC off, leave it out '
      '(clipping=None, or 0 in config.optimizer).'
    )
  if not eps > 0:
    raise ValueError(f'AGC eps must be > 0 (the paper uses 1e-3), got {eps}.')


def check_momentum(momentum: float) -> None:
  """SGD's momentum, Adam's b1: in [0, 1)."""
  if not 0.0 <= momentum < 1.0:
    raise ValueError(
      f'momentum must be in [0, 1), got {momentum}. The reference uses 0.9.'
    )


def check_beta2(b2: float) -> None:
  """Adam's second-moment decay: in [0, 1)."""
  if not 0.0 <= b2 < 1.0:
    raise ValueError(f'Adam beta2 (b2) must be in [0, 1), got {b2}.')


def check_weight_decay(weight_decay: float) -> None:
  """The decay coefficient: >= 0 (0 turns weight decay off)."""
  if not weight_decay >= 0:
    raise ValueError(
      f'weight_decay must be >= 0, got {weight_decay} (the reference: 2e-5).'
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
  check_batch_size(global_batch_size or 1)
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(
      f'Need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps:g}'
      f', total_steps={total_steps}. Shorten the warmup '
      '(config.optimizer.warmup_epochs, or warmup_steps, which overrides '
      'it) or train longer (config.train.num_steps or num_epochs).'
    )
  if min_lr < 0 or base_lr < 0:
    raise ValueError(f'LRs must be >= 0, got lr={base_lr}, min_lr={min_lr}.')


def check_batch_size(global_batch_size: int) -> None:
  """The batch size of the LR scaling rule: > 0."""
  if global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be > 0, got {global_batch_size}')


def check_sam_rho(rho: float) -> None:
  """SAM's radius: >= 0 (0 turns SAM off)."""
  if not rho >= 0:
    raise ValueError(f'optimizer.sam_rho must be >= 0, got {rho}.')


def check_ema_decay(decay: float) -> None:
  """The EMA's target decay: in [0, 1) (0 turns the EMA off)."""
  if not 0.0 <= decay < 1.0:
    raise ValueError(
      f'optimizer.ema_decay must be in [0, 1) (0 = off), got {decay}.'
    )


def check_freeze_stages(num_stages: int) -> None:
  """Stages frozen for fine-tuning: an int in 0..4 (0 = none)."""
  if isinstance(num_stages, bool) or num_stages not in range(5):
    raise ValueError(
      f'optimizer.freeze_stages must be an integer in 0..4, got '
      f'{num_stages!r}: N > 0 freezes the stem and the first N stages.'
    )
