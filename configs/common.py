"""The paper's NFNet recipe as a config, shared by `configs/f0.py` ... f7.py.

`nfnet_config(variant)` returns the full locked config for ImageNet training
of NFNet-`variant` (Brock et al. 2021, Appendix A.1): batch 4096, 360
epochs, SGD with Nesterov momentum 0.9, LR 0.1 per 256 images (1.6 at 4096)
with 5 warmup epochs and cosine decay to 0, coupled weight decay 2e-5, AGC
0.01, label smoothing 0.1, EMA 0.99999, stochastic depth 0.25, the variant's
dropout, train/test image size and RandAugment level, MixUp (alpha 0.2) on
half and CutMix on the other half of every batch, bf16 compute with float32
master weights.

Each section starts from its owner's `default_config()` and is overridden
with `override`, which refuses keys the owner does not define, so a typo
here fails at load time instead of being silently ignored.
"""

import ml_collections

from nfnets import data, models, optim
from nfnets.models import nfnet
from nfnets.train import config as train_config

# ImageNet eval batch: divides 8, 16, ..., 512 devices; padding handles the
# 50,000-image split.
IMAGENET_EVAL_BATCH = 1024


def override(section: ml_collections.ConfigDict, **values) -> None:
  """Sets existing keys of `section`; an unknown key raises KeyError.

  Args:
    section: a config section.
    **values: key -> new value.

  Raises:
    KeyError: naming the unknown key and the valid ones.
  """
  for key, value in values.items():
    if key not in section:
      raise KeyError(
        f'Config key {key!r} does not exist; valid keys: {sorted(section)}.'
      )
    section[key] = value


def parse_variant(base: str, arg: str | None) -> str:
  """Turns a config argument into a variant name: '' -> F0, 'plus' -> F0+.

  `--config=configs/f0.py:plus` (or `:+`) selects the wider F0+.

  Args:
    base: the file's variant, e.g. 'F0'.
    arg: the text after ':' in --config, or None.

  Returns:
    A key of `nfnets.models.nfnet.VARIANTS`.

  Raises:
    ValueError: for any other argument.
  """
  arg = (arg or '').strip().lower()
  if arg in ('', 'base'):
    return base
  if arg in ('plus', '+'):
    return base + '+'
  raise ValueError(
    f"Unknown config argument {arg!r} for {base}; use '' for {base} or "
    f"'plus' for {base}+ (e.g. --config=configs/{base.lower()}.py:plus)."
  )


def base_config() -> ml_collections.ConfigDict:
  """Returns an unlocked config with every section at its owner's default.

  Returns:
    ConfigDict with sections model, data, optimizer, train, eval, checkpoint.
  """
  config = ml_collections.ConfigDict()
  config.model = models.default_config()
  config.data = data.default_config()
  config.optimizer = optim.default_config()
  config.train = train_config.default_train_config()
  config.eval = train_config.default_eval_config()
  config.checkpoint = train_config.default_checkpoint_config()
  return config


def nfnet_config(variant: str) -> ml_collections.ConfigDict:
  """Returns the locked ImageNet training config for NFNet-`variant`.

  Args:
    variant: a key of `nfnets.models.nfnet.VARIANTS` ('F0'..'F7', 'F0+'..'F7+').

  Returns:
    The locked config.
  """
  spec = nfnet.get_variant(variant)
  config = base_config()
  config.model.kwargs = models.nfnet_kwargs(
    variant=variant, stochdepth_rate=0.25
  )
  override(
    config.data,
    name='imagenet2012',
    train_image_size=spec['train_imsize'],
    eval_image_size=spec['test_imsize'],
    eval_preproc='resize_crop_32',
    randaugment=spec['RA_level'],
    mixup_alpha=0.2,
    cutmix=True,
    augment_before_mix=False,
  )
  override(
    config.optimizer,
    name='sgd_agc',
    lr=0.1,
    scale_lr_by_batch=True,
    warmup_epochs=5.0,
    min_lr=0.0,
    momentum=0.9,
    nesterov=True,
    weight_decay=2e-5,
    clipping=0.01,
    ema_decay=0.99999,
    sam_rho=0.0,
  )
  override(
    config.train,
    batch_size=4096,
    num_epochs=360.0,
    compute_dtype='bfloat16',
    label_smoothing=0.1,
    log_every_steps=100,
  )
  override(config.eval, batch_size=IMAGENET_EVAL_BATCH, every_steps=5000)
  override(config.checkpoint, every_steps=1000, max_to_keep=3)
  config.lock()
  return config
