"""Fine-tuning a pretrained NFNet on a new dataset (the transfer recipe).

Brock et al. 2021, Appendix A.5: 15,000 steps at batch 2048, LR 0.1 without
batch-size scaling, 5,000 warmup steps then cosine decay, SAM with
rho = 0.05 (computed as the paper's SAM runs compute it, A.4: the ascent
step on 20% of each device's rows, not synced across devices), weight
decay 1e-5, dropout 0.25, stochastic depth 0.1 and an EMA of the weights
(decay 0.9999 with the reference's warmup). Every parameter starts from
`config.model.init_from` except the classifier, which is freshly
initialised when the new dataset has another number of classes. No MixUp,
CutMix or RandAugment (the paper's fine-tuning uses only crop and flip).

    python -m experiments.train --config=configs/finetune.py:F0 \
      --config.model.init_from=pretrained/F0_haiku.npz \
      --config.data.name=tfds/cifar10 --workdir=runs/finetune_f0

`arg` (after ':') is the pretrained variant (default F0); the image sizes
follow it. Point `config.data` at your own data with
`--config.data.name=folder --config.data.folder_root=/path/to/images`.
"""

from configs import common
from nfnets import models
from nfnets.models import nfnet


def get_config(arg=None):
  """Returns the locked fine-tuning config for the variant named by `arg`."""
  variant = (arg or 'F0').strip().upper()
  spec = nfnet.get_variant(variant)
  config = common.base_config()
  config.model.kwargs = models.nfnet_kwargs(
    variant=variant, stochdepth_rate=0.1, drop_rate=0.25
  )
  common.override(
    config.model,
    init_from=f'pretrained/{variant}_haiku.npz',
    reinit_modules=('NFNet/~/linear',),
  )
  common.override(
    config.data,
    name='tfds/cifar10',
    train_image_size=spec['train_imsize'],
    eval_image_size=spec['test_imsize'],
    randaugment='',
    mixup_alpha=0.0,
    cutmix=False,
  )
  common.override(
    config.optimizer,
    name='sgd_agc',
    lr=0.1,
    scale_lr_by_batch=False,
    warmup_steps=5000,
    min_lr=0.0,
    weight_decay=1e-5,
    clipping=0.01,
    sam_rho=0.05,
    sam_ascent_fraction=0.2,
    sam_ascent_sync=False,
    ema_decay=0.9999,
  )
  common.override(
    config.train,
    batch_size=2048,
    num_steps=15_000,
    compute_dtype='bfloat16',
    label_smoothing=0.1,
    log_every_steps=100,
  )
  common.override(config.eval, batch_size=1024, every_steps=2500)
  common.override(config.checkpoint, every_steps=1000, max_to_keep=3)
  config.lock()
  return config
