"""The train state: what a run keeps from step to step, and its helpers.

`TrainState` is checkpointed whole; `make_train_state` builds the state of
step 0. Every model is an `hk.transform_with_state`: the Haiku state (the
BatchNorm moving averages of BN ResNets, `{}` for the normalizer-free
models) rides in the train state beside the weights, and when the run
keeps an EMA of the weights it keeps one of that state too
(`ema_update_model_state`).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nfnets import optim


class TrainState(NamedTuple):
  """Everything a run needs to continue; checkpointed whole.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: float32 master weights (Haiku params dict).
    model_state: the Haiku state: BatchNorm moving averages (float32, with
      int32 update counters), `{}` for stateless models such as NFNets.
    opt_state: optimizer state.
    ema_params: EMA of the weights, or None when EMA is off.
    ema_model_state: EMA of `model_state` (every floating-point leaf
      averaged like the weights, as timm's ModelEmaV2 and big_vision do for
      BatchNorm statistics; integer counters copied), or None when EMA is
      off. Evaluation of `ema_params` uses it.
    rng: base PRNG key; step t uses `fold_in(rng, t)`, so a resumed run draws
      the same randomness as an uninterrupted one.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  ema_params: Any
  ema_model_state: Any
  rng: jax.Array


def _copy(tree):
  """A real copy: the state is donated, so no two leaves share a buffer."""
  return jax.tree.map(lambda x: x + 0, tree)


def make_train_state(
  params, model_state, optimizer: optax.GradientTransformation, rng, *, ema
) -> TrainState:
  """The state of step 0: optimizer initialised, EMAs copied from the start.

  Pure and traceable: jit it (with output shardings) to build the state on
  the devices, or `jax.eval_shape` it for the abstract state of a restore.

  Args:
    params: the initial weights.
    model_state: the initial Haiku state (`{}` for stateless models).
    optimizer: the optax transformation.
    rng: the run's base PRNG key (`TrainState.rng`).
    ema: whether the run keeps an EMA of the weights (and the state).

  Returns:
    A `TrainState` at step 0.
  """
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=optimizer.init(params),
    ema_params=_copy(params) if ema else None,
    ema_model_state=_copy(model_state) if ema else None,
    rng=rng,
  )


def ema_update_model_state(ema_state, new_state, step, decay: float):
  """One EMA step of the Haiku state (see `optim.ema_update`).

  Floating-point leaves (BatchNorm's averaged mean/variance and their
  debiasing `hidden` values) follow `ema * d + new * (1 - d)` with the same
  warmed-up decay as the weights; integer leaves (the moving averages' step
  counters) cannot be averaged and are copied from `new_state`.

  Args:
    ema_state: the running average of the state.
    new_state: the state after this step.
    step: index of the optimizer step just taken.
    decay: the target decay.

  Returns:
    The new running average, with the dtypes of `ema_state`.
  """

  def _leaf(ema, new):
    if jnp.issubdtype(ema.dtype, jnp.floating):
      return optim.ema_update(ema, new, step, decay)
    return new

  return jax.tree.map(_leaf, ema_state, new_state)


def cast_floats(tree, dtype):
  """Casts the floating-point leaves of `tree` to `dtype`.

  Args:
    tree: a pytree of arrays (weights, Haiku state).
    dtype: the dtype for its floating-point leaves.

  Returns:
    The tree with floating-point leaves cast, other leaves unchanged.
  """

  def _cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(_cast, tree)
