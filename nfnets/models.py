"""Model registry: `config.model` -> a Haiku-transformed network.

`MODELS` maps `config.model.name` to a Haiku module constructor that takes
`num_classes` plus `config.model.kwargs`; `make_model` wraps it with
`hk.transform` into a forward function `(images, is_training) -> outputs`
whose outputs dict has at least 'logits'. Other model families register here
(see issue 7).
"""

import haiku as hk
import ml_collections
from ml_collections import config_dict

from nfnets import nf_regnet, nf_resnet, nfnet, resnet

MODELS = {
  'NFNet': nfnet.NFNet,
  'NF_ResNet': nf_resnet.NFResNet,
  'NF_RegNet': nf_regnet.NFRegNet,
  'ResNet': resnet.ResNet,
}

# Models that keep Haiku state (BatchNorm statistics) unless built with
# kwargs.norm='none'; `make_model` (hk.transform) cannot build them. Use
# `nfnets.resnet.make_transformed` (hk.transform_with_state) instead.
STATEFUL_MODELS = ('ResNet',)


def default_config() -> ml_collections.ConfigDict:
  """Returns `config.model` for NFNet-F0 with the paper's training kwargs.

  Returns:
    A ConfigDict with keys:
      name: key of `MODELS`.
      kwargs: constructor keyword arguments (without num_classes). Every
        NFNet argument settable from the command line is listed, so
        `--config.model.kwargs.width=0.5` style overrides work; None-valued
        ones are typed placeholders (None = the variant's value).
      init_from: path of weights to start from ('' = random init); any format
        `nfnets.pretrained.read_params` reads.
      reinit_modules: modules of `init_from` that are re-initialised when
        their shapes differ (the classifier, for a new number of classes).
  """
  return ml_collections.ConfigDict(
    dict(
      name='NFNet',
      kwargs=nfnet_kwargs(),
      init_from='',
      reinit_modules=('NFNet/~/linear',),
    )
  )


def nfnet_kwargs(**overrides) -> ml_collections.ConfigDict:
  """Returns every command-line-settable `NFNet` kwarg, with the recipe's.

  Args:
    **overrides: values replacing the defaults (keys must exist).

  Returns:
    A locked ConfigDict: the paper's training kwargs for F0 (stochastic depth
    0.25, the variant's dropout), grouped convs chosen by backend.
  """
  kwargs = ml_collections.ConfigDict(
    dict(
      variant='F0',
      width=1.0,
      se_ratio=0.5,
      alpha=0.2,
      stochdepth_rate=0.25,
      drop_rate=config_dict.placeholder(float),
      activation='gelu',
      final_conv_mult=2.0,
      final_conv_ch=config_dict.placeholder(int),
      use_two_convs=True,
      grouped_conv='auto',
      remat=False,
      depth=config_dict.placeholder(tuple),
      group_size=128,
    )
  )
  kwargs.lock()
  kwargs.update(overrides)
  return kwargs


def get_constructor(name: str):
  """Returns the registered constructor `name`; lists valid names if absent.

  Args:
    name: a key of `MODELS`.

  Returns:
    The Haiku module class.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in MODELS:
    raise ValueError(
      f'Unknown config.model.name {name!r}; valid names: {sorted(MODELS)}.'
    )
  return MODELS[name]


def make_model(
  model_config: ml_collections.ConfigDict, num_classes: int
) -> hk.Transformed:
  """Builds the transformed network from `config.model`.

  Args:
    model_config: ConfigDict with `name` and `kwargs`.
    num_classes: classifier width.

  Returns:
    `hk.transform` of `forward(images, is_training) -> outputs dict`; `apply`
    takes `(params, rng, images, is_training)` (rng may be None when not
    training).
  """
  constructor = get_constructor(model_config.name)
  kwargs = dict(model_config.kwargs)
  if model_config.name in STATEFUL_MODELS and kwargs.get('norm') != 'none':
    raise ValueError(
      f'{model_config.name} with BatchNorm keeps state, which this trainer '
      "does not support yet; set config.model.kwargs.norm='none' or use "
      'nfnets.resnet.make_transformed (hk.transform_with_state).'
    )

  def forward(images, is_training):
    return constructor(num_classes=num_classes, **kwargs)(images, is_training)

  return hk.transform(forward)
