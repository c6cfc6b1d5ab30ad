"""What the benchmark runs: a registry model, the recipe's optimizer, data.

`make_workload` builds the train step users train with, for every model
family: `nfnets.train.step.make_train_step` (forward, backward,
the optimizer of `nfnets.optim.build_optimizer`, i.e. AGC + weight decay +
Nesterov SGD for the recipe, with its numbers as inputs, and the train
metrics), its initial state and a synthetic batch, all on one device. For
BN-/SE-ResNets the state carries the BatchNorm statistics, updated by every
step as in training. The helpers here also name the models for tables and
pick the default dtype and resolution.
"""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets import data, models, optim
from nfnets.models import nfnet, precision
from nfnets.train import mesh as mesh_lib
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib

# Table labels of the registry models (variant 'ResNet50' -> '-50').
_FAMILY_LABELS = {'NF_ResNet': 'NF-ResNet', 'NF_RegNet': 'NF-RegNet'}
# The recipe's label smoothing, an input of the train step.
_LABEL_SMOOTHING = 0.1
# A run length for the LR schedule; the timed steps sit in its warmup.
_STEPS_PER_EPOCH, _TOTAL_STEPS = 1000, 100000
# `make_workload`'s augment values.
AUGMENTS = ('none', 'device', 'device_reference')
# `make_workload`'s SAM forms (`nfnets.train.sam`), as
# `(sam_ascent_fraction, sam_ascent_sync)`; each perturbs with `SAM_RHO`.
SAMS = {'off': None, 'sync': (1.0, True), 'paper': (0.2, False)}
SAM_RHO = 0.05


def default_dtype() -> str:
  """'float32' on CPU (bf16 is slower there), 'bfloat16' on accelerators."""
  return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'


def make_model_config(
  name: str = 'NFNet', **kwargs: Any
) -> ml_collections.ConfigDict:
  """Returns a `config.model` for a registry model.

  Args:
    name: a key of `nfnets.models.MODELS`.
    **kwargs: constructor arguments; for NFNet they override the recipe's
      (`nfnets.models.nfnet_kwargs`: stochastic depth 0.25, the variant's
      dropout).

  Returns:
    A ConfigDict with `name` and `kwargs`, as `models.make_model` reads it.

  Raises:
    ValueError: for an unknown name, variant or constructor argument (each
      listing the valid ones), so that a benchmark of several models fails
      before it times the first.
  """
  check_model(name, kwargs)
  # JSON and flags give lists; the configs type sequences as tuples.
  kwargs = {
    k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()
  }
  if name == 'NFNet':
    recipe = models.nfnet_kwargs()
    model_kwargs = models.nfnet_kwargs(
      **{k: v for k, v in kwargs.items() if k in recipe}
    )
    with model_kwargs.unlocked():  # Arguments the recipe leaves at default.
      model_kwargs.update({k: v for k, v in kwargs.items() if k not in recipe})
  else:
    model_kwargs = ml_collections.ConfigDict(kwargs)
  return ml_collections.ConfigDict(dict(name=name, kwargs=model_kwargs))


def check_model(name: str, kwargs: dict) -> None:
  """Raises a ValueError for a name, kwarg or variant the registry lacks.

  Args:
    name: a key of `nfnets.models.MODELS`.
    kwargs: constructor arguments (without num_classes).
  """
  constructor = models.get_constructor(name)  # Lists the valid names.
  valid = models.constructor_kwargs(name)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(
      f'{name} takes no argument {", ".join(map(repr, unknown))}; its '
      f'arguments are {valid}.'
    )
  variants = getattr(inspect.getmodule(constructor), 'VARIANTS', None)
  if kwargs.get('variant') is not None and variants is not None:
    if kwargs['variant'] not in variants:
      raise ValueError(
        f'Unknown {name} variant {kwargs["variant"]!r}; valid: '
        f'{list(variants)}.'
      )


def check_sam(sam: str) -> None:
  """Raises a ValueError unless `sam` is one of `SAMS`."""
  if sam not in SAMS:
    raise ValueError(f'Unknown sam {sam!r}; valid: {", ".join(SAMS)}.')


def check_augment(augment: str) -> None:
  """Raises a ValueError unless `augment` is one of `AUGMENTS`."""
  if augment not in AUGMENTS:
    raise ValueError(
      f'Unknown augment {augment!r}; valid: {", ".join(AUGMENTS)}.'
    )


def default_image_size(model_config: ml_collections.ConfigDict) -> int:
  """The resolution a model is timed at by default.

  Args:
    model_config: `config.model`.

  Returns:
    The variant's train resolution for NFNets (the paper times at it), else
    224, the ResNet-50 training resolution.
  """
  variant = model_config.kwargs.get('variant', None)
  if model_config.name == 'NFNet' and variant:
    return nfnet.get_variant(variant)['train_imsize']
  return 224


def display_name(model_config: ml_collections.ConfigDict) -> str:
  """A table label: 'NFNet-F0', 'NF-ResNet-50', 'BN-ResNet-50', ...

  Args:
    model_config: `config.model`.

  Returns:
    The label.
  """
  name, kwargs = model_config.name, model_config.kwargs
  variant = kwargs.get('variant', None)
  if variant is None:  # The constructor's default, e.g. 'ResNet50'.
    param = inspect.signature(models.get_constructor(name)).parameters
    variant = getattr(param.get('variant'), 'default', None)
  variant = '' if variant in (None, inspect.Parameter.empty) else str(variant)
  if name == 'NFNet':
    return f'NFNet-{variant}'
  if name == 'ResNet':
    prefix = 'SE-' if kwargs.get('use_se', False) else ''
    norm = 'BN-' if kwargs.get('norm', 'batch_norm') != 'none' else 'NoNorm-'
    label = f'{prefix or norm}ResNet'
  else:
    label = _FAMILY_LABELS.get(name, name)
  number = variant.removeprefix('ResNet')
  return f'{label}-{number}' if number else label


def make_optimizer_config(
  ema_decay: float = 0.0, sam: str = 'off'
) -> ml_collections.ConfigDict:
  """The recipe's optimizer (AGC 0.01 + wd 2e-5 + Nesterov SGD).

  Args:
    ema_decay: EMA of the weights in the step (0 = off; the recipe's 0.99999
      adds one more pass over the parameters).
    sam: a key of `SAMS`: SAM off, on every row synced ('sync'), or in the
      paper's form ('paper': 20% of the rows, per device).

  Returns:
    A `config.optimizer` ConfigDict.
  """
  check_sam(sam)
  config = optim.default_config()
  config.ema_decay = ema_decay
  if SAMS[sam]:
    config.sam_rho = SAM_RHO
    config.sam_ascent_fraction, config.sam_ascent_sync = SAMS[sam]
  return config


def synthetic_batch(
  batch_size: int, image_size: int, num_classes: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """Random normalised images and labels, as numpy arrays.

  Args:
    batch_size: images in the batch.
    image_size: square resolution.
    num_classes: labels are drawn from `range(num_classes)`.
    seed: numpy seed.

  Returns:
    `{'images': float32 [B, S, S, 3], 'labels': int32 [B]}`.
  """
  rng = np.random.default_rng(seed)
  shape = (batch_size, image_size, image_size, 3)
  return {
    'images': rng.standard_normal(shape, dtype=np.float32),
    'labels': rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
  }


@dataclasses.dataclass
class Workload:
  """The pieces of one benchmark: the step, its state and inputs, a forward.

  Attributes:
    step: `(state, batch, hyperparams) -> (state, metrics)`, not jitted.
    state: the newest train state (the older ones are donated).
    batch: the synthetic batch, on the device.
    hyperparams: the optimizer's numbers, float32 inputs of the step.
    logits_fn: `((params, model_state), images) -> logits`, eval mode.
  """

  step: Callable
  state: Any
  batch: dict
  hyperparams: dict
  logits_fn: Callable


def _recipe_optimizer(batch_size, num_classes, sam):
  """The recipe's optimizer and the step's inputs, as the trainer makes them."""
  config = ml_collections.ConfigDict(
    dict(
      optimizer=make_optimizer_config(sam=sam),
      train=dict(batch_size=batch_size, label_smoothing=_LABEL_SMOOTHING),
    )
  )
  hyperparams = step_lib.step_hyperparams(
    config, num_classes=num_classes, steps_per_epoch=_STEPS_PER_EPOCH,
    total_steps=_TOTAL_STEPS,
  )  # fmt: skip
  optimizer, _ = optim.build_optimizer(config.optimizer, hyperparams)
  return config.optimizer, optimizer, hyperparams


def _augment_inputs(batch, augment):
  """(uint8 batch to ship, batch_fn) for the F0 recipe on the device."""
  check_augment(augment)
  config = data.default_config()
  config.update(
    mixup_alpha=0.2, cutmix=True, randaugment='405', augment_on='device',
    mix_pairing='reference' if augment == 'device_reference' else 'in_batch',
  )  # fmt: skip
  copies = 2 if augment == 'device_reference' else 1
  rng = np.random.default_rng(1)
  shape = (copies * len(batch['labels']), *batch['images'].shape[1:])
  shipped = {
    'images': rng.integers(0, 256, shape, dtype=np.uint8),
    'labels': np.tile(batch['labels'], copies),
  }
  return shipped, data.make_batch_fn(config)


def make_workload(
  model_config: ml_collections.ConfigDict,
  batch_size: int,
  image_size: int,
  dtype: str,
  num_classes: int,
  device: jax.Device,
  augment: str = 'none',
  sam: str = 'off',
) -> Workload:
  """Initialises the model and the recipe's train step on `device`.

  Args:
    model_config: `config.model` (see `make_model_config`).
    batch_size: images per step.
    image_size: square input resolution.
    dtype: compute dtype of the step.
    num_classes: classifier width.
    device: where the state and the batch live (the default device).
    augment: 'none' (a normalised float batch) or, for the F0 recipe's
      augmentation inside the step (`data.make_batch_fn`: MixUp + CutMix,
      RandAugment 405, normalisation) on a uint8 batch, 'device' (in-batch
      pairing, B images) or 'device_reference' (2B images mixed into B).
    sam: SAM in the step, a key of `SAMS` (`make_optimizer_config`).

  Returns:
    A `Workload` whose state and batch are on `device`.
  """
  opt_config, optimizer, hyperparams = _recipe_optimizer(
    batch_size, num_classes, sam
  )
  batch = synthetic_batch(batch_size, image_size, num_classes)
  batch_fn = None
  if augment != 'none':
    batch, batch_fn = _augment_inputs(batch, augment)
  batch = jax.device_put(batch, device)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))
  model = models.make_model(model_config, num_classes)
  # The trainer's step: the optimizer's numbers are inputs, not constants.
  step = step_lib.make_train_step(
    model, num_classes=num_classes, opt_config=opt_config,
    compute_dtype=dtype, batch_fn=batch_fn,
    mesh=mesh_lib.make_mesh([device]),
  )  # fmt: skip
  params, model_state = jax.jit(model.init, static_argnums=2)(
    init_rng, jnp.zeros((1, image_size, image_size, 3)), True
  )
  # On `device` (the default device), like the batch and the init above.
  state = jax.jit(
    lambda p, s, r: state_lib.make_train_state(p, s, optimizer, r, ema=False)
  )(params, model_state, jax.device_put(train_rng, device))

  def logits_fn(variables, x):  # Eval mode: BatchNorm's moving averages.
    return model.apply(*variables, None, x, False)[0]['logits']

  inputs = jax.device_put(
    {k: np.float32(v) for k, v in hyperparams.items()}, device
  )
  return Workload(step, state, batch, inputs, logits_fn)


def forward_fn(logits_fn: Callable, dtype: str) -> Callable:
  """The eval-mode forward pass in the compute dtype.

  Args:
    logits_fn: `Workload.logits_fn`.
    dtype: a `nfnets.models.precision.POLICIES` name.

  Returns:
    `(variables, images) -> logits`, not jitted.
  """

  cast_to = precision.variables_dtype(dtype)

  def forward(variables, images):
    variables = state_lib.cast_floats(variables, cast_to)
    with precision.policy_scope(dtype):
      return logits_fn(variables, images.astype(cast_to))

  return forward
