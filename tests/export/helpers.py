"""Shared by the export tests: small NF models with trained-looking params."""

import jax
import ml_collections
import numpy as np

from nfnets import models


def model_config(name, **kwargs):
  """A `config.model` for `models.make_model`."""
  return ml_collections.ConfigDict(dict(name=name, kwargs=kwargs))


def trained_like(params, seed=0):
  """Initial params moved off their init values, as training would.

  Gains around 1, small biases and skip gains around 0.5 (zero at init,
  which would make every residual branch vanish), and weights that start
  at zero (NF-RegNet's classifier, whose logits would then be its bias for
  every input) drawn small.

  Args:
    params: freshly initialised Haiku params.
    seed: NumPy seed.

  Returns:
    float32 NumPy params of the same structure.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for module, leaves in params.items():
    out[module] = {}
    for name, value in leaves.items():
      value = np.asarray(value, np.float32)
      noise = rng.standard_normal(value.shape).astype(np.float32)
      if name == 'gain':
        value = 1.0 + 0.2 * noise
      elif name in ('bias', 'b'):
        value = 0.05 * noise
      elif name == 'skip_gain':
        value = 0.5 + 0.1 * noise
      elif not value.any():
        value = 0.05 * noise
      out[module][name] = value
  return out


def init_params(config, num_classes, image_size, seed=0):
  """Trained-looking params of `config`'s model, and its state."""
  model = models.make_model(config, num_classes)
  x = np.zeros((1, image_size, image_size, 3), np.float32)
  params, state = jax.jit(model.init, static_argnums=2)(
    jax.random.PRNGKey(seed), x, True
  )
  return trained_like(jax.device_get(params), seed), state
