"""Quickstart: a small NFNet on the digits set bundled with scikit-learn.

Trains in a few minutes on 2 CPU cores, needs no download, and reaches at
least 95% top-1 on the held-out digits (this is what `make demo` runs):

    python -m experiments.train --config=configs/quickstart.py \
      --workdir=runs/quickstart

The network is a real NFNet (scaled weight standardisation, SE, skip gains,
AGC, NFNet-F0's stage pattern) shrunk to 1/8 width and one block per stage,
at 32 px. Training runs in float32 because bfloat16 is slower on CPUs.
"""

from configs import common
from nfnets import models


def get_config(arg=None):
  """Returns the locked quickstart config (`arg` is unused)."""
  del arg
  config = common.base_config()
  config.model.kwargs = models.nfnet_kwargs(
    variant='F0',
    width=0.125,
    depth=(1, 1, 1, 1),
    group_size=16,
    stochdepth_rate=0.0,
    drop_rate=0.0,
  )
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
    name='sgd_agc',
    lr=0.1,
    scale_lr_by_batch=False,
    warmup_epochs=1.0,
    weight_decay=2e-5,
    clipping=0.04,
    ema_decay=0.99,
  )
  common.override(
    config.train,
    batch_size=64,
    num_epochs=8.0,
    compute_dtype='float32',
    label_smoothing=0.1,
    log_every_steps=20,
    data_resume='skip',
  )
  common.override(config.eval, batch_size=120, every_steps=0)
  common.override(config.checkpoint, every_steps=100, max_to_keep=2)
  config.lock()
  return config
