"""The models: NFNets, NF-ResNets, NF-RegNets and their baselines.

The baselines are BN/SE-ResNets, EfficientNets and SkipInit and Fixup
ResNets. `make_model(config.model, num_classes)` builds any of them by name
from the registry (`MODELS`, `default_config`); the families live in their
own modules (`nfnet`, `nf_resnet`, `nf_regnet`, `resnet`, `efficientnet`,
`skipinit_fixup`), built from what they share (`common`: variants, block
specs, the normalizer-free block base, input checks, the head) and the
layers in `layers`, whose convolutions are the backend-specific ops of
`nfnets.ops`. `scan` runs identical blocks as
one `hk.scan`, `batched_init` draws the initial parameters, and `flops`
counts multiply-adds.
"""

from nfnets.models.registry import (
  MODELS,
  check_kwargs,
  constructor_kwargs,
  default_config,
  get_constructor,
  keeps_batch_statistics,
  make_model,
  nfnet_kwargs,
)

__all__ = [
  'MODELS',
  'check_kwargs',
  'constructor_kwargs',
  'default_config',
  'get_constructor',
  'keeps_batch_statistics',
  'make_model',
  'nfnet_kwargs',
]
