"""`config.optimizer`: its defaults, its checks and the optimizer it builds.

One path leads from a config to an optax transformation:

  1. `hyperparams(opt_config, ...)` validates the config (`validate`, on
     its concrete values: the one place the config's numbers are checked)
     and returns every number of the optimizer as a flat dict of floats;
  2. `build_optimizer(opt_config, hp)` builds the chain of the config's
     structure (`chains.sgd_chain` or `chains.adam_chain`, the functions
     `sgd_agc` and `adam_agc` build from) with the numbers of `hp`, which
     may be traced inputs of a train step.

`make_optimizer` is the two in a row, with the numbers as constants.
"""

import ml_collections
import optax
from ml_collections import config_dict

from nfnets.optim import chains, checks, groups, schedules

# The values of `optimizer.name`: the SGD chain ('sgd_agc' insists on
# AGC), or the Adam chain with weight decay coupled ('adam') or decoupled
# ('adamw').
OPTIMIZERS = ('sgd_agc', 'sgd', 'adam', 'adamw')


def default_config() -> ml_collections.ConfigDict:
  """`config.optimizer` for the NFNet-F0 recipe of the paper.

  Returns:
    A ConfigDict. `lr` is per 256 images when `scale_lr_by_batch`;
    `warmup_steps`, when set, overrides `warmup_epochs`; `clipping=0` turns
    AGC off; `sam_rho=0` and `ema_decay=0` turn SAM and EMA off (the train
    step reads those two); `freeze_stages=N > 0` freezes the stem and the
    first N of the four stages for fine-tuning (`chains.with_frozen_stages`:
    no updates, no weight decay, no optimizer state).
  """
  c = ml_collections.ConfigDict()
  c.name = 'sgd_agc'  # One of OPTIMIZERS.
  c.lr = 0.1
  c.scale_lr_by_batch = True
  c.warmup_epochs = 5.0
  c.warmup_steps = config_dict.placeholder(int)
  c.min_lr = 0.0
  c.momentum = 0.9  # Adam's b1 for 'adam'/'adamw'.
  c.nesterov = True  # SGD only.
  c.beta2 = 0.999  # Adam only.
  c.adam_eps = 1e-8  # Adam only.
  c.weight_decay = 2e-5
  c.clipping = 0.01
  c.eps = 1e-3
  c.agc_exclude = groups.AGC_EXCLUDE
  c.wd_exclude = groups.WD_EXCLUDE
  c.sam_rho = 0.0
  # Which rows and devices take SAM's ascent step (`nfnets.train.sam`); the
  # paper's form is 0.2 and False.
  c.sam_ascent_fraction = 1.0
  c.sam_ascent_sync = True
  c.ema_decay = 0.99999
  c.freeze_stages = 0
  return c


def validate(opt_config: ml_collections.ConfigDict) -> None:
  """Checks every setting of `opt_config` but the schedule's.

  The schedule's settings need the run's length and batch size; they are
  checked by `hyperparams`, which calls this.

  Args:
    opt_config: a ConfigDict shaped like `default_config()`.

  Raises:
    ValueError: a setting is invalid; the message says which and why.
  """
  c = opt_config
  if c.name not in OPTIMIZERS:
    raise ValueError(
      f'Unknown optimizer.name {c.name!r}; valid names: {sorted(OPTIMIZERS)}.'
    )
  # 0 and None both mean no AGC; anything else must be a valid lambda.
  if c.name == 'sgd_agc' and not c.clipping:
    raise ValueError(
      "optimizer.name='sgd_agc' needs optimizer.clipping > 0, got "
      f"{c.clipping}. For SGD without AGC use name='sgd' with clipping=0."
    )
  if c.clipping:
    checks.check_clipping(c.clipping, c.eps)
  checks.check_momentum(c.momentum)
  checks.check_weight_decay(c.weight_decay)
  if c.name.startswith('adam'):
    checks.check_beta2(c.beta2)
    checks.check_adam_eps(c.adam_eps)
  checks.check_groups(tuple(c.agc_exclude), tuple(c.wd_exclude))
  checks.check_sam_rho(c.sam_rho)
  checks.check_sam_ascent(
    c.get('sam_ascent_fraction', 1.0), c.get('sam_ascent_sync', True)
  )
  checks.check_ema_decay(c.ema_decay)
  checks.check_freeze_stages(c.get('freeze_stages', 0))


def hyperparams(
  opt_config: ml_collections.ConfigDict,
  *,
  steps_per_epoch: float,
  total_steps: int,
  global_batch_size: int,
) -> dict[str, float]:
  """Every number of the optimizer, checked, as a flat dict of floats.

  These are what a sweep varies (LR, warmup, run length, momentum, weight
  decay, AGC's lambda and eps, EMA decay, SAM's rho). The trainer hands
  them to the jitted train step as float32 inputs rather than baking them
  into the program as constants, so runs that differ only in these numbers
  compile the same program: the second point of an LR or clipping sweep
  loads the first one's executable from the persistent compilation cache.
  What stays in the program is the structure: `optimizer.name`,
  `nesterov`, the parameter groups (`freeze_stages` among them), and
  whether AGC (`clipping` > 0),
  weight decay, SAM and the EMA are on at all; and Adam's `momentum` (b1),
  `beta2` and `adam_eps` (see `build_optimizer`). With these inputs the
  step computes the bits it computes with the numbers as constants
  (tests/train/test_hyperparam_step.py).

  Args:
    opt_config: a ConfigDict shaped like `default_config()`.
    steps_per_epoch: optimizer steps per epoch, may be fractional
      (train examples / global batch size); converts `warmup_epochs`.
    total_steps: the training length; the cosine reaches `min_lr` here.
    global_batch_size: images per step over all devices (LR scaling).

  Returns:
    name -> float: `lr_peak` (for reference), the LR schedule's
    `warmup_cosine` arguments and `momentum`, `weight_decay`, `clipping`
    (0 when off), `eps`, `ema_decay`, `sam_rho` from the config.
  """
  c = opt_config
  validate(c)
  warmup = c.warmup_steps
  if warmup is None:
    warmup = c.warmup_epochs * steps_per_epoch
  values = schedules.schedule_values(
    c.lr,
    total_steps=total_steps,
    warmup_steps=warmup,
    min_lr=c.min_lr,
    global_batch_size=global_batch_size,
    scale_by_batch=c.scale_lr_by_batch,
  )
  for name in ('momentum', 'weight_decay', 'eps', 'ema_decay', 'sam_rho'):
    values[name] = float(c[name])
  values['clipping'] = float(c.clipping or 0.0)
  return values


def build_optimizer(
  opt_config: ml_collections.ConfigDict, hp: dict
) -> tuple[optax.GradientTransformation, schedules.Schedule]:
  """The optimizer of `opt_config`'s structure with the numbers of `hp`.

  The config decides the structure (the chain, Nesterov, the parameter
  groups, which parts are on), `hp` every number but Adam's b1, b2 and
  eps: those stay constants because optax computes `1 - b` inside, and
  `1 - b` of a float32 input is not the float32 of the exact `1 - b`
  (0.100000024 for b = 0.9), so inputs would change Adam's bits.

  Args:
    opt_config: decides the structure; checked by `hyperparams`, not here.
    hp: `hyperparams(opt_config, ...)`, as Python floats or as (traced)
      float32 scalars. Every choice of values gives an optimizer state of the
      same structure, so a state initialised with one serves all.

  Returns:
    `(tx, schedule)`, as `make_optimizer`.
  """
  c = opt_config
  schedule = schedules.schedule_of(hp)
  shared = dict(
    weight_decay=hp['weight_decay'] if c.weight_decay else None,
    clipping=hp['clipping'] if c.clipping else None,
    agc_exclude=tuple(c.agc_exclude),
    wd_exclude=tuple(c.wd_exclude),
  )
  if c.name.startswith('sgd'):
    tx = chains.sgd_chain(
      schedule,
      momentum=hp['momentum'],
      nesterov=c.nesterov,
      eps=hp['eps'],
      **shared,
    )
  else:
    tx = chains.adam_chain(
      schedule,
      b1=c.momentum,
      b2=c.beta2,
      eps=c.adam_eps,
      decoupled=c.name == 'adamw',
      agc_eps=hp['eps'],
      **shared,
    )
  # Configs written before the key existed have no `freeze_stages`.
  return chains.with_frozen_stages(tx, c.get('freeze_stages', 0)), schedule


def make_optimizer(
  opt_config: ml_collections.ConfigDict,
  *,
  steps_per_epoch: float,
  total_steps: int,
  global_batch_size: int,
) -> tuple[optax.GradientTransformation, schedules.Schedule]:
  """Builds the optimizer and its LR schedule from `config.optimizer`.

  `build_optimizer(opt_config, hyperparams(opt_config, ...))`: the numbers
  are constants of whatever program uses the result. The train step takes
  them as inputs instead (`nfnets.train.step`).

  Args:
    opt_config: a ConfigDict shaped like `default_config()`.
    steps_per_epoch: as for `hyperparams`.
    total_steps: as for `hyperparams`.
    global_batch_size: as for `hyperparams`.

  Returns:
    `(tx, schedule)`: the transformation (its `update` needs `params`) and
    the step -> LR function it uses, for logging.
  """
  hp = hyperparams(
    opt_config,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    global_batch_size=global_batch_size,
  )
  return build_optimizer(opt_config, hp)
