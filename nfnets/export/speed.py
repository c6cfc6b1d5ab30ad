"""Forward speed of the folded model against the unfolded one.

`compare_forward_speed` times one jitted inference forward pass of a model
with its trained (unfolded) params and with the folded ones
(`fold_weight_standardization`), same batch, same machine, with the timing
protocol of `nfnets.perf.measure`:

    from nfnets.export import speed
    print(speed.compare_forward_speed(batch_size=8, image_size=256))
"""

import functools

import jax
import ml_collections
import numpy as np

from nfnets import models
from nfnets.export import fold
from nfnets.perf import measure


def _logits(net, params, state, images):
  return net.apply(params, state, None, images, False)[0]['logits']


def compare_forward_speed(
  model_config: ml_collections.ConfigDict | None = None,
  *,
  num_classes: int = 1000,
  batch_size: int = 8,
  image_size: int = 256,
  steps: int = 10,
  warmup: int = 2,
) -> dict[str, dict[str, float]]:
  """Times the unfolded and the folded inference forward pass.

  Args:
    model_config: `config.model`; default NFNet-F0.
    num_classes: classifier width.
    batch_size: images per call.
    image_size: input height and width.
    steps: timed calls of each.
    warmup: untimed calls after compiling.

  Returns:
    `{'unfolded': stats, 'folded': stats}`, each
    `nfnets.perf.measure.summarize_times`'s seconds per call.
  """
  if model_config is None:
    model_config = ml_collections.ConfigDict(
      dict(name='NFNet', kwargs=dict(variant='F0'))
    )
  x = np.zeros((batch_size, image_size, image_size, 3), np.float32)
  model = models.make_model(model_config, num_classes)
  params, state = jax.jit(model.init, static_argnums=2)(
    jax.random.PRNGKey(0), x[:1], True
  )
  folded = fold.fold_weight_standardization(jax.device_get(params))
  folded_model = fold.make_folded_model(model_config, num_classes)
  results = {}
  for name, net, weights in (
    ('unfolded', model, params),
    ('folded', folded_model, folded),
  ):
    forward = jax.jit(functools.partial(_logits, net))
    times = measure.time_calls(
      functools.partial(forward, weights, state, x), steps, warmup
    )
    results[name] = measure.summarize_times(times)
  return results
