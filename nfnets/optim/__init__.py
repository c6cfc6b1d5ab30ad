"""The NFNet training optimizer as composable optax pieces.

Reproduces the optimizer of DeepMind's reference code (`SGD_AGC` in
`deepmind-research/nfnets`), in the same order of operations:

  1. adaptive gradient clipping (AGC), unit-wise, on every parameter except
     the classifier weight;
  2. coupled weight decay, `g + wd * p`, on every parameter except gains,
     biases and skip gains;
  3. (Nesterov) momentum, `buf = m * buf + g`, direction `g + m * buf`;
  4. the learning rate: linear warmup from 0, then cosine decay, optionally
     scaled by `batch / 256`.

One module per concern; this package re-exports their public names:

* `groups`: leaf names and the parameter groups (`AGC_EXCLUDE`,
  `WD_EXCLUDE`, `agc_mask`, `weight_decay_mask`, `describe_param_groups`,
  and the stem and stages frozen for fine-tuning, `frozen_mask`);
* `agc`: AGC (`adaptive_grad_clip`, this package's own implementation of
  the paper's formula), unit-wise norms, `global_norm` and the
  `agc_clip_fraction` metric;
* `chains`: the SGD and Adam chains (`sgd_agc`, `adam_agc`) and the
  freeze of the stem and first stages (`with_frozen_stages`);
* `schedules`: the scaled LR and the warmup-cosine schedule;
* `averaging`: the reference's EMA of weights and the SAM ascent step;
* `config`: `config.optimizer` (`default_config`), its validation,
  `hyperparams` and the one path from a config to an optax transformation
  (`build_optimizer`, `make_optimizer`);
* `checks`: the value checks, run once on concrete values.
"""

from nfnets.optim.agc import (
  adaptive_grad_clip,
  agc_clip_fraction,
  global_norm,
  unit_sq_norms,
  unitwise_norm,
)
from nfnets.optim.averaging import ema_decay, ema_update, sam_perturb
from nfnets.optim.chains import (
  adam_agc,
  sgd_agc,
  stop_frozen_gradients,
  with_frozen_stages,
)
from nfnets.optim.config import (
  OPTIMIZERS,
  build_optimizer,
  default_config,
  hyperparams,
  make_optimizer,
  validate,
)
from nfnets.optim.groups import (
  AGC_EXCLUDE,
  BLOCK_MODULES,
  STEM_MODULES,
  WD_EXCLUDE,
  agc_mask,
  describe_param_groups,
  frozen_mask,
  leaf_name,
  select_leaves,
  weight_decay_mask,
)
from nfnets.optim.schedules import (
  LR_REFERENCE_BATCH_SIZE,
  make_lr_schedule,
  scaled_lr,
  warmup_cosine,
)

__all__ = [
  'AGC_EXCLUDE',
  'BLOCK_MODULES',
  'LR_REFERENCE_BATCH_SIZE',
  'OPTIMIZERS',
  'STEM_MODULES',
  'WD_EXCLUDE',
  'adam_agc',
  'adaptive_grad_clip',
  'agc_clip_fraction',
  'agc_mask',
  'build_optimizer',
  'default_config',
  'describe_param_groups',
  'ema_decay',
  'ema_update',
  'frozen_mask',
  'global_norm',
  'hyperparams',
  'leaf_name',
  'make_lr_schedule',
  'make_optimizer',
  'sam_perturb',
  'scaled_lr',
  'select_leaves',
  'sgd_agc',
  'stop_frozen_gradients',
  'unit_sq_norms',
  'unitwise_norm',
  'validate',
  'warmup_cosine',
  'weight_decay_mask',
  'with_frozen_stages',
]
