"""Parameter initialisation with one random draw per distribution.

Haiku initialises every parameter with its own key and its own sampler: a
threefry split, a threefry hash of the parameter's shape and an inverse-erf
transform. Jitted, each parameter shape becomes its own large kernel, and
XLA:CPU spends most of an init's compile time generating code for them
(NFNet-F0: 12.6 s, 2.0 s batched; F7: 3-4 min, 18.5 s batched; see
docs/performance.md).

`transform_with_state(fn)` is `hk.transform_with_state(fn)` whose `init`
first collects each parameter's sampler (distribution, location, scale)
in an abstract pass, then draws all parameters of one distribution as one
flat array and hands each parameter its slice, shifted and scaled. The
distributions are exactly those of Haiku's initialisers (checked against
Haiku with the same key in `tests/models/test_batched_init.py`); only the random
stream differs: which numbers a given seed produces. `apply` is
unchanged, and initialisers it does not know (constants, orthogonal,
custom callables) run as usual.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# Standard deviation of N(0, 1) truncated to [-2, 2] (Haiku's constant).
_TRUNCATED_STDDEV = 0.87962566103423978


@dataclasses.dataclass(frozen=True)
class Sampler:
  """`loc + scale * x` with x drawn from a standard distribution.

  Attributes:
    kind: 'normal', 'truncated_normal' (x in `bounds`) or 'uniform' (x in
      [0, 1)).
    loc: location added to every sample.
    scale: factor applied to every sample.
    bounds: truncation interval of 'truncated_normal', in standard units.
  """

  kind: str
  loc: float
  scale: float
  bounds: tuple[float, float] = (0.0, 0.0)

  @property
  def stream(self) -> tuple:
    """Samplers with the same stream share one flat draw."""
    return (self.kind, self.bounds)


def _static(*values) -> bool:
  """True when every value is a Python or NumPy scalar (not traced)."""
  return all(np.ndim(v) == 0 and not isinstance(v, jax.Array) for v in values)


def compute_fans(shape: Sequence[int], fan_in_axes=None) -> tuple[int, int]:
  """Fan-in and fan-out of a weight shape, by Haiku's convention.

  Vectors count their length both ways, matrices are (in, out) and
  higher ranks are convolution kernels `(..., in, out)` whose receptive
  field multiplies both (unless `fan_in_axes` names the input axes).
  """
  if len(shape) < 1:
    return 1, 1
  if len(shape) == 1:
    return shape[0], shape[0]
  if len(shape) == 2:
    return shape[0], shape[1]
  if fan_in_axes is not None:
    fan_in = math.prod(shape[i] for i in fan_in_axes)
    fan_out = math.prod(s for i, s in enumerate(shape) if i not in fan_in_axes)
    return fan_in, fan_out
  receptive = math.prod(shape[:-2])
  return shape[-2] * receptive, shape[-1] * receptive


def _variance_scaling(init, shape) -> Sampler:
  fan_in, fan_out = compute_fans(shape, init.fan_in_axes)
  fan = {'fan_in': fan_in, 'fan_out': fan_out}.get(
    init.mode, (fan_in + fan_out) / 2.0
  )
  scale = init.scale / max(1.0, fan)
  if init.distribution == 'truncated_normal':
    return Sampler(
      'truncated_normal', 0.0, np.sqrt(scale) / _TRUNCATED_STDDEV, (-2.0, 2.0)
    )
  if init.distribution == 'normal':
    return Sampler('normal', 0.0, np.sqrt(scale))
  limit = np.sqrt(3.0 * scale)
  return Sampler('uniform', -limit, 2 * limit)


def sampler_of(init, shape: Sequence[int]) -> Sampler | None:
  """The `Sampler` equivalent to a Haiku initialiser, None if unknown.

  Only Haiku's random initialisers with static (untraced, real) arguments
  are recognised; anything else keeps its own sampling.
  """
  inits = hk.initializers
  if isinstance(init, inits.VarianceScaling):
    return _variance_scaling(init, shape)
  if isinstance(init, inits.RandomNormal) and _static(init.mean, init.stddev):
    return Sampler('normal', float(init.mean), float(init.stddev))
  if isinstance(init, inits.TruncatedNormal) and _static(
    init.mean, init.stddev, init.lower, init.upper
  ):
    bounds = (float(init.lower), float(init.upper))
    return Sampler(
      'truncated_normal', float(init.mean), float(init.stddev), bounds
    )
  if isinstance(init, inits.RandomUniform) and _static(
    init.minval, init.maxval
  ):
    low = float(init.minval)
    return Sampler('uniform', low, float(init.maxval) - low)
  return None


def draw(stream: tuple, key: jax.Array, size: int) -> jax.Array:
  """`size` float32 samples of a standard distribution (`Sampler.stream`)."""
  kind, (lower, upper) = stream
  shape = (size,)
  if kind == 'normal':
    return jax.random.normal(key, shape, jnp.float32)
  if kind == 'truncated_normal':
    return jax.random.truncated_normal(key, lower, upper, shape, jnp.float32)
  if kind == 'uniform':
    return jax.random.uniform(key, shape, jnp.float32)
  raise ValueError(f'Unknown sampler kind {kind!r}.')


@dataclasses.dataclass(frozen=True)
class _Slot:
  sampler: Sampler
  offset: int
  size: int


Creator = Callable[..., jax.Array]


def _with_creator(fn, creator: Creator, *args, **kwargs):
  with hk.custom_creator(creator):
    return fn(*args, **kwargs)


def _plan(fn, rng, args, kwargs) -> tuple[dict[str, _Slot], dict[tuple, int]]:
  """Each recognised parameter's slot in its stream, and each stream's size.

  Found by an abstract `init` (`jax.eval_shape`) that records what every
  parameter's initialiser would sample, in creation order.
  """
  samplers = {}

  def record(next_creator, shape, dtype, init, context):
    sampler = sampler_of(init, shape)
    if sampler is not None and jnp.issubdtype(dtype, jnp.floating):
      samplers[context.full_name] = (sampler, math.prod(shape))
    return next_creator(shape, dtype, init)

  recording = hk.transform_with_state(
    functools.partial(_with_creator, fn, record)
  )
  jax.eval_shape(lambda r: recording.init(r, *args, **kwargs), rng)
  slots, used = {}, {}
  for name, (sampler, size) in samplers.items():
    offset = used.get(sampler.stream, 0)
    slots[name] = _Slot(sampler, offset, size)
    used[sampler.stream] = offset + size
  return slots, used


def _draw_streams(sizes: dict[tuple, int], key) -> dict[tuple, jax.Array]:
  """One flat draw per stream, each from its own key (in a fixed order).

  Each draw is materialised behind an optimisation barrier. Without it,
  XLA:GPU fuses the sampler (threefry, inverse erf) into every parameter's
  slice and then fuses those kernels horizontally into a few huge ones,
  which `ptxas` takes minutes to assemble (NFNet-F1's init: over 3 min,
  see docs/performance.md). Behind the barrier the sampler is one kernel
  and each slice is a small scale-and-shift. The values are unchanged.
  """
  streams = sorted(sizes)
  keys = jax.random.split(key, max(len(streams), 1))
  draws = {
    stream: draw(stream, k, sizes[stream])
    for stream, k in zip(streams, keys, strict=False)
  }
  return jax.lax.optimization_barrier(draws)


def transform_with_state(fn) -> hk.TransformedWithState:
  """`hk.transform_with_state(fn)` with batched random initialisation.

  Args:
    fn: the function to transform (as for Haiku).

  Returns:
    A `TransformedWithState` whose `init(rng, *args, **kwargs)` gives
    parameters of the same names, shapes, dtypes and distributions as
    Haiku's, drawn with one sampler per distribution, and whose `apply` is
    Haiku's (with `rng=None`, Haiku's own `init`).
  """
  base = hk.transform_with_state(fn)

  def init(rng, *args, **kwargs):
    if rng is None:  # Nothing random can be drawn; Haiku says why.
      return base.init(rng, *args, **kwargs)
    slots, sizes = _plan(fn, rng, args, kwargs)
    draw_key, model_key = jax.random.split(rng)
    streams = _draw_streams(sizes, draw_key)

    def creator(next_creator, shape, dtype, init, context):
      slot = slots.get(context.full_name)
      if slot is None:
        return next_creator(shape, dtype, init)
      flat = streams[slot.sampler.stream]
      x = jax.lax.slice_in_dim(flat, slot.offset, slot.offset + slot.size)
      value = slot.sampler.loc + slot.sampler.scale * x
      return next_creator(shape, dtype, lambda s, d: value.reshape(s).astype(d))

    sampling = hk.transform_with_state(
      functools.partial(_with_creator, fn, creator)
    )
    return sampling.init(model_key, *args, **kwargs)

  return hk.TransformedWithState(init=init, apply=base.apply)
