"""Inference weights with Scaled Weight Standardisation folded in.

A `WSConv2D` standardises its kernel on every call:
`w_hat = (w - mean) * gain / sqrt(max(fan_in * var, eps))` per output
channel. The result depends on the parameters only, so for inference it can
be computed once: `fold_weight_standardization` replaces each conv's
`{w, gain, bias}` with `{w: w_hat, bias}`, and the model run inside
`folded_convs()` (or built by `make_folded_model`) convolves with `w` as it
is (`WSConv2D.apply_folded`). The logits agree with the unfolded model's to
float32 rounding, and the exported program holds plain convolutions, with
no mean, variance or rsqrt for exporters and runtimes to handle.

The mode is a Haiku method interceptor rather than a constructor argument:
every model family that builds its convs from `layers.WSConv2D` (NFNet,
NF-ResNet, NF-RegNet) gets it without a change to its code, and parameter
names stay those of the checkpoints.
"""

import contextlib
from collections.abc import Iterator, Mapping

import haiku as hk
import jax
import ml_collections
import numpy as np

from nfnets.models import layers, registry

WS_PARAM_NAMES = frozenset({'w', 'gain', 'bias'})


def is_ws_conv(leaves: Mapping[str, object]) -> bool:
  """Whether a module's parameters are those of a `WSConv2D`."""
  return set(leaves) == WS_PARAM_NAMES and np.ndim(leaves['w']) == 4


def fold_weight_standardization(
  params: Mapping[str, Mapping[str, object]], eps: float = 1e-4
) -> dict[str, dict[str, np.ndarray]]:
  """Folds weight standardisation and the gain into every conv kernel.

  Args:
    params: Haiku params of an NF model (`{module: {name: array}}`), e.g.
      from `nfnets.pretrained.load` or a training checkpoint.
    eps: the convs' clamp on `fan_in * var` (`WSConv2D`'s default 1e-4,
      which every model uses).

  Returns:
    The same params as float32 NumPy arrays, where each `WSConv2D`'s
    `{w, gain, bias}` becomes `{w: standardize_weight(w, gain, eps),
    bias}`; every other module is unchanged. Apply them inside
    `folded_convs()` (or with `make_folded_model`).

  Raises:
    ValueError: the params hold no `WSConv2D` (e.g. already folded).
  """
  standardize = jax.jit(layers.standardize_weight, static_argnums=2)
  folded, count = {}, 0
  for module, leaves in params.items():
    if is_ws_conv(leaves):
      w = np.asarray(leaves['w'], np.float32)
      gain = np.asarray(leaves['gain'], np.float32)
      w_hat = standardize(w, gain, eps)
      folded[module] = {
        'w': np.asarray(w_hat, np.float32),
        'bias': np.asarray(leaves['bias'], np.float32),
      }
      count += 1
    else:
      folded[module] = {
        name: np.asarray(value, np.float32) for name, value in leaves.items()
      }
  if not count:
    raise ValueError(
      'The params hold no weight-standardised conv ({w, gain, bias}) to '
      'fold: export takes the normalizer-free models (NFNet, NF_ResNet, '
      'NF_RegNet) with their trained, unfolded params.'
    )
  return folded


def _fold_interceptor(next_fun, args, kwargs, context):
  """Sends `WSConv2D.__call__` to `apply_folded`; anything else through."""
  module = context.module
  if isinstance(module, layers.WSConv2D) and context.method_name == '__call__':
    return module.apply_folded(*args, **kwargs)
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def folded_convs() -> Iterator[None]:
  """Within the context, every `WSConv2D` runs `apply_folded`.

  Use it inside a Haiku-transformed function, around the model call, and
  apply params from `fold_weight_standardization`:

      def forward(images):
        with folded_convs():
          return nfnets.NFNet(1000, 'F0')(images, is_training=False)

  Yields:
    Nothing; the interception ends with the context.
  """
  with hk.intercept_methods(_fold_interceptor):
    yield


def make_folded_model(
  model_config: ml_collections.ConfigDict, num_classes: int
) -> hk.TransformedWithState:
  """`nfnets.models.make_model`'s network, with folded convs.

  Args:
    model_config: `config.model` (name and kwargs).
    num_classes: classifier width.

  Returns:
    `hk.transform_with_state` of `forward(images, is_training) -> outputs`,
    to apply with params from `fold_weight_standardization` (its `init`
    creates the folded parameter layout: no `gain`).

  Raises:
    ValueError: for an unknown model name or kwargs it does not take.
  """
  constructor = registry.get_constructor(model_config.name)
  kwargs = dict(model_config.kwargs)
  registry.check_kwargs(model_config.name, kwargs)

  def forward(images, is_training):
    with folded_convs():
      net = constructor(num_classes=num_classes, **kwargs)
      return net(images, is_training)

  return hk.transform_with_state(forward)
