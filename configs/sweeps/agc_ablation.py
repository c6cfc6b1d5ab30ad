r"""The AGC ablation of the NFNets paper (Fig. 2), at a scale 2 CPUs can run.

The paper trains NF-ResNet-50/200 on ImageNet at batch sizes 256-4096 with
LR 0.1 x B/256, with and without AGC at clipping thresholds 0.01-0.16, and
finds that AGC is what keeps large-batch NF-ResNets stable, with smaller
thresholds needed at larger batches. Here: a tiny NF-ResNet (one block per
stage, 1/8 of ResNet-50's width) on the 8x8 digits bundled with
scikit-learn (upscaled to 32 px), at a deliberately high learning rate,
clipping {none, 0.01, 0.04, 0.16} x batch {64, 256}, for the same number
of epochs at every batch size:

    python -m experiments.sweep --sweep=configs/sweeps/agc_ablation.py \
      --outdir=runs/agc_ablation

The file is also a plain training config (one point, clipping 0.04 and
batch 256):

    python -m experiments.train --config=configs/sweeps/agc_ablation.py \
      --workdir=runs/agc_one
"""

import ml_collections

from configs import common
from nfnets.research import sweep as sweep_lib


def nf_resnet_kwargs(**overrides) -> ml_collections.ConfigDict:
  """Every command-line-settable `NFResNet` kwarg (a tiny model by default).

  Args:
    **overrides: values replacing the defaults (keys must exist).

  Returns:
    A locked ConfigDict for `config.model.kwargs`.
  """
  kwargs = ml_collections.ConfigDict(
    dict(
      variant='ResNet50',
      width=0.5,  # Stage widths 32-256 instead of 256-2048.
      depth=(1, 1, 1, 1),
      alpha=0.2,
      stochdepth_rate=0.0,
      drop_rate=0.0,
      activation='relu',
      skipinit_gain=0.0,
      use_se=False,
      se_ratio=0.25,
    )
  )
  kwargs.lock()
  kwargs.update(overrides)
  return kwargs


def get_config(arg=None):
  """Returns the locked base config of the ablation (`arg` is unused)."""
  del arg
  config = common.base_config()
  config.model.name = 'NF_ResNet'
  config.model.kwargs = nf_resnet_kwargs()
  config.model.reinit_modules = ('NF_ResNet/~/linear',)
  common.override(
    config.data,
    name='digits',
    train_image_size=32,
    eval_image_size=32,
    mixup_alpha=0.0,
    cutmix=False,
    randaugment='',
  )
  common.override(
    config.optimizer,
    name='sgd',  # AGC is on when clipping > 0 ('sgd_agc' requires it).
    lr=1.6,  # Per 256 images: 16x the paper's 0.1, to stress stability.
    scale_lr_by_batch=True,
    warmup_epochs=1.0,
    weight_decay=2e-5,
    clipping=0.04,
    ema_decay=0.0,
  )
  common.override(
    config.train,
    batch_size=256,
    num_epochs=12.0,
    compute_dtype='float32',
    label_smoothing=0.1,
    log_every_steps=25,
    data_resume='skip',
  )
  common.override(config.eval, batch_size=120, every_steps=0, ema=False)
  common.override(config.checkpoint, enabled=False)
  config.lock()
  return config


def get_sweep() -> sweep_lib.Sweep:
  """Clipping {none, 0.01, 0.04, 0.16} x batch size {64, 256}."""
  return sweep_lib.Sweep(
    name='AGC ablation (tiny NF-ResNet, digits, LR 1.6 x B/256)',
    base_config='configs/sweeps/agc_ablation.py',
    axes=(
      ('optimizer.clipping', (0.0, 0.01, 0.04, 0.16)),
      ('train.batch_size', (64, 256)),
    ),
    metrics=('eval/top1', 'eval/loss', 'train/loss', 'train/top1'),
    plot_metric='eval/top1',
    labels={'optimizer.clipping': {0.0: 'none'}},
  )
