"""Weight averaging and sharpness: the reference's EMA and the SAM ascent.

Both are used by the train step rather than chained into the optimizer:
the EMA follows the weights after each update, and SAM moves the point at
which the gradient is taken. Their numbers (`ema_decay`, `sam_rho`) are
checked at config time (`config.validate`) and may be traced here.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """The reference's EMA decay with warmup, `min(decay, (1+t)/(10+t))`.

  Note: with decay 0.99999 the warmup term stays below `decay` until step
  ~900k, i.e. for the whole of a 112k-step F0 run.

  Args:
    step: index of the optimizer step just taken (0 for the first).
    decay: the target decay (0.99999 in the reference).

  Returns:
    The decay to use at this step (float32).
  """
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.asarray(decay, jnp.float32), (1.0 + t) / (10.0 + t))


def ema_update(
  ema_params: PyTree, new_params: PyTree, step: jax.Array, decay: float
) -> PyTree:
  """One EMA step, `ema * d + new * (1 - d)` with `d = ema_decay(step)`.

  Leaves equal to their average keep it exactly, so the EMA of a parameter
  that does not change (frozen for fine-tuning) stays equal to it.

  Called after every optimizer step with the updated parameters; the EMA
  starts as a copy of the initial parameters.

  Args:
    ema_params: the running average.
    new_params: the parameters after this step's update.
    step: index of the optimizer step just taken (0 for the first).
    decay: the target decay.

  Returns:
    The new running average, with the dtypes of `ema_params`.
  """
  d = ema_decay(step, decay)

  def update(e, p):
    # Where the two are equal the exact average is that value, but the
    # rounded `e * d + p * (1 - d)` can be an ulp off it: the EMA of a
    # frozen (never updated) parameter would drift from it.
    return jnp.where(e == p, e, e * d + p * (1.0 - d)).astype(e.dtype)

  return jax.tree.map(update, ema_params, new_params)


def sam_perturb(
  params: PyTree, grads: PyTree, rho: float, eps: float = 1e-12
) -> PyTree:
  """SAM's ascent point `params + rho * g / |g|` (global L2 norm).

  Sharpness-aware minimisation (Foret et al. 2021), as used for F5+SAM,
  F6+SAM and fine-tuning (rho = 0.05): compute the gradient at the returned
  point and give that gradient, with the original params, to the optimizer.

  Args:
    params: the current parameters.
    grads: the gradient at `params` (which rows give it:
      `nfnets.train.sam`).
    rho: neighbourhood radius, >= 0 (a Python float or a traced scalar;
      `optimizer.sam_rho` is checked by `config.validate`).
    eps: guards the division when the gradient is zero.

  Returns:
    The perturbed parameters.
  """
  scale = rho / jnp.maximum(optax.tree.norm(grads), eps)
  return jax.tree.map(
    lambda p, g: (p + scale * g).astype(p.dtype), params, grads
  )
