"""Model registry: `config.model` -> a Haiku-transformed network.

`MODELS` maps `config.model.name` to a Haiku module constructor that takes
`num_classes` plus `config.model.kwargs`; `make_model` wraps it with
`hk.transform_with_state` into a forward function `(images, is_training) ->
outputs` whose outputs dict has at least 'logits'. Every model goes through
the same path: BatchNorm ResNets and EfficientNets keep their moving
statistics in the Haiku state, the normalizer-free models (NFNets,
NF-ResNets, NF-RegNets, SkipInit and Fixup ResNets) simply have an empty
state (`{}`).
"""

import inspect

import haiku as hk
import ml_collections
from ml_collections import config_dict

from nfnets.models import (
  batched_init,
  checks,
  efficientnet,
  nf_regnet,
  nf_resnet,
  nfnet,
  resnet,
  skipinit_fixup,
)

MODELS = {
  'NFNet': nfnet.NFNet,
  'NF_ResNet': nf_resnet.NFResNet,
  'NF_RegNet': nf_regnet.NFRegNet,
  'ResNet': resnet.ResNet,
  'EfficientNet': efficientnet.EfficientNet,
  'SkipInit_ResNet': skipinit_fixup.SkipInitResNet,
  'Fixup_ResNet': skipinit_fixup.FixupResNet,
}


def keeps_batch_statistics(name: str, kwargs) -> bool:
  """Whether model `name` with `kwargs` normalises with batch statistics.

  Such a model computes another function of a batch split into
  micro-batches (each is normalised alone), so what leaves every other
  model's update alone (`train.grad_accum_steps`) changes its training.
  """
  return name == 'EfficientNet' or (
    name == 'ResNet' and kwargs.get('norm', 'batch_norm') == 'batch_norm'
  )


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
      batched_init: draw the random initial weights with one sampler per
        distribution (`nfnets.models.batched_init`; same distributions, 4-6x
        faster to compile) rather than Haiku's one per parameter. False
        gives exactly `hk.transform_with_state`'s values for a given key.
  """
  return ml_collections.ConfigDict(
    dict(
      name='NFNet',
      kwargs=nfnet_kwargs(),
      init_from='',
      reinit_modules=('NFNet/~/linear',),
      batched_init=True,
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
      scan_blocks=False,
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
    # Listed in registration order: the NF families first, then baselines.
    raise ValueError(
      f'Unknown config.model.name {name!r}; valid names: {list(MODELS)}.'
    )
  return MODELS[name]


def constructor_kwargs(name: str) -> list[str]:
  """The keyword arguments model `name` takes besides num_classes and name.

  The one source for every unknown-kwarg check (config, benchmark, weights
  files): the constructor's signature.
  """
  params = inspect.signature(get_constructor(name)).parameters
  return sorted(set(params) - {'self', 'num_classes', 'name'})


def check_kwargs(name: str, kwargs) -> None:
  """Raises a ValueError naming the kwargs the constructor does not take.

  Switching `config.model.name` from the command line keeps the NFNet
  kwargs of the config file; this says how to replace them.

  Args:
    name: a key of `MODELS`.
    kwargs: the constructor keyword arguments (without num_classes).

  Raises:
    ValueError: for an unknown name or unexpected keyword arguments.
  """
  valid = constructor_kwargs(name)
  unexpected = sorted(set(kwargs) - set(valid) - {'num_classes', 'name'})
  if unexpected:
    raise ValueError(
      f'config.model.kwargs has {unexpected}, which {name} does not take '
      f'(its arguments: {valid}). When changing config.model.name, replace '
      'the whole kwargs dict, e.g. --config.model.name=ResNet '
      "\"--config.model.kwargs={'width': 0.25, 'depth': (1, 1, 1, 1)}\"."
    )


def name_and_kwargs(model_config) -> tuple[str, dict]:
  """`config.model`'s name and kwargs, from a ConfigDict or a plain dict.

  Passing the whole experiment config is an easy slip (it has a `model`
  field but no `name`); the error says so rather than "'name'".
  """
  if 'name' not in model_config:
    hint = (
      'pass config.model, not the whole config'
      if 'model' in model_config
      else f'its name is one of {list(MODELS)}'
    )
    raise ValueError(
      f'make_model needs a model config with a name and kwargs; {hint}.'
    )
  return model_config['name'], dict(model_config.get('kwargs', {}))


def make_model(
  model_config: ml_collections.ConfigDict, num_classes: int
) -> hk.TransformedWithState:
  """Builds the transformed network from `config.model`.

  Args:
    model_config: `config.model`: a ConfigDict (or dict) with `name` and
      `kwargs`, and optionally `batched_init` (default True; see
      `default_config`).
    num_classes: classifier width.

  Returns:
    `hk.transform_with_state` (with batched random initialisation unless
    `model_config.batched_init` is False) of
    `forward(images, is_training) -> outputs dict`: `init(rng, images,
    is_training)` gives `(params, state)` and `apply(params, state, rng,
    images, is_training)` gives `(outputs, new_state)` (rng may be None
    when not training). The state holds the BatchNorm moving averages of
    BN ResNets and EfficientNets and is `{}` for every other model; in
    training mode `new_state` has the updated averages, in eval mode
    (`is_training=False`) the averages are used and returned unchanged.

  BatchNorm models (`ResNet` with its default norm, `EfficientNet`) must be
  initialised with `is_training=True`: only a training-mode call creates
  the moving averages that eval mode reads.

  Raises:
    ValueError: for an unknown name, kwargs the constructor does not take,
      a num_classes that is not a positive int, or a config without a
      name (e.g. the whole experiment config instead of `config.model`).
  """
  checks.check_positive_int('make_model', 'num_classes', num_classes)
  name, kwargs = name_and_kwargs(model_config)
  constructor = get_constructor(name)
  check_kwargs(name, kwargs)

  def forward(images, is_training):
    return constructor(num_classes=num_classes, **kwargs)(images, is_training)

  if not model_config.get('batched_init', True):
    return hk.transform_with_state(forward)
  # Haiku's transform, but `init` draws all parameters of one distribution
  # at once: jitted, it compiles 4-6x faster (see models/batched_init.py).
  return batched_init.transform_with_state(forward)
