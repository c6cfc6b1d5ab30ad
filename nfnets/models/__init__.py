"""The models: NFNets, NF-ResNets, NF-RegNets and BN/SE-ResNet baselines.

`make_model(config.model, num_classes)` builds any of them by name from the
registry (`MODELS`, `default_config`); the families live in their own
modules (`nfnet`, `nf_resnet`, `nf_regnet`, `resnet`), built from the layers
in `layers`. `batched_init` draws their initial parameters, and `flops`
counts their multiply-adds.
"""

from nfnets.models.registry import (
  MODELS,
  check_kwargs,
  default_config,
  get_constructor,
  make_model,
  nfnet_kwargs,
)

__all__ = [
  'MODELS',
  'check_kwargs',
  'default_config',
  'get_constructor',
  'make_model',
  'nfnet_kwargs',
]
