"""Adaptive gradient clipping (AGC), unit-wise norms and the norm metrics.

AGC (Brock et al. 2021, section 4.1) clips each unit's gradient to a
fraction of that unit's weight norm. This module's implementation computes
the paper's formula with the reference's norms and condition (checked
against a NumPy re-derivation in tests/optim/test_optim.py), and takes every
unit norm on a 2-D `(fan_in, units)` view of the tensor: one fused
square-and-sum per leaf, which XLA:CPU runs several times faster than a
reduction over the kept axes of an HWIO kernel. The train step's
`global_norm` and `agc_clip_fraction` metrics use the same per-unit norms,
so inside one jitted step XLA computes them once.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nfnets.optim import checks, groups

PyTree = Any


def adaptive_grad_clip(
  clipping: float, eps: float = 1e-3, exclude=()
) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping, checked.

  For each unit i (one output channel of an HWIO conv kernel, one output
  column of an `(in, out)` Linear weight, the whole tensor for scalars and
  vectors): `G_i <- G_i * lam * max(|W_i|, eps) / |G_i|` when
  `|G_i| > lam * max(|W_i|, eps)`. NumPy leaves are accepted. The update
  needs `params`.

  Args:
    clipping: lambda, the largest allowed ratio |G_i| / max(|W_i|, eps).
    eps: lower bound on the parameter norm, so zero-initialised parameters
      (biases, skip gains) can still move.
    exclude: regexes over `module/param` names of leaves left unclipped.

  Returns:
    A stateless `optax.GradientTransformation`.
  """
  checks.check_clipping(clipping, eps)
  groups.compile_patterns(exclude)  # Fails early on a bad regex.
  return agc_transform(clipping, eps, exclude)


def agc_transform(clipping, eps, exclude=()) -> optax.GradientTransformation:
  """`adaptive_grad_clip` unchecked: `clipping` and `eps` may be traced.

  Args:
    clipping: AGC lambda, a Python float or a (traced) scalar.
    eps: AGC eps, likewise.
    exclude: regexes over `module/param` names of leaves left unclipped.

  Returns:
    A stateless `optax.GradientTransformation`.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        'adaptive_grad_clip needs the parameters: call '
        'tx.update(grads, opt_state, params).'
      )
    clip = lambda g, p: _agc_leaf(g, p, clipping, eps)
    return jax.tree.map(clip, updates, params), state

  tx = optax.GradientTransformation(optax.init_empty_state, update_fn)
  if exclude:
    tx = optax.masked(tx, lambda p: groups.agc_mask(p, exclude))
  return tx


def _agc_leaf(g, p, clipping: float, eps: float) -> jax.Array:
  """AGC of one leaf: the paper's and the reference's formula and condition."""
  g = jnp.asarray(g)
  g_norm = unitwise_norm(g)
  max_norm = clipping * jnp.maximum(unitwise_norm(p), eps)
  # The 1e-6 only guards the division; where it matters nothing is clipped.
  clipped = g * (max_norm / jnp.maximum(g_norm, 1e-6))
  return jnp.where(g_norm < max_norm, g, clipped)


def _unit_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Axes summed over for one unit norm; the same rule as the reference."""
  if len([d for d in shape if d != 1]) <= 1:
    return tuple(range(len(shape)))
  if len(shape) in (2, 3):
    return (0,)
  if len(shape) == 4:
    return (0, 1, 2)
  if len(shape) == 5:
    return (0, 1, 2, 3)
  raise ValueError(f'AGC has no unit-wise norm for shape {shape}.')


def unit_sq_norms(x: jax.Array) -> jax.Array:
  """Squared L2 norm of each unit of `x`, as a vector (one entry per unit).

  Computed on the 2-D view `(elements per unit, units)`: the unit axes are
  always the leading ones, so this is a reshape, and XLA:CPU runs the
  column sum of that view several times faster than a reduction over
  (0, 1, 2) of an HWIO kernel. AGC, `global_norm` and `agc_clip_fraction`
  all call this one function, so that inside one jitted step XLA computes
  each leaf's norms once.

  Args:
    x: a parameter or gradient (see `unitwise_norm`).

  Returns:
    float vector of length `units` (1 for scalars and vectors).
  """
  x = jnp.asarray(x)
  per_unit = math.prod(x.shape[: len(_unit_axes(x.shape))])
  return jnp.sum(jnp.square(x.reshape(per_unit, -1)), axis=0)


def unitwise_norm(x: jax.Array) -> jax.Array:
  """L2 norm of each unit, with the reduced axes kept (size 1).

  Args:
    x: a parameter or gradient: scalar/vector (one unit), `(in, out)` Linear
      (one unit per column) or HWIO conv kernel (one unit per output channel).

  Returns:
    The norms, broadcastable against `x`.
  """
  x = jnp.asarray(x)
  kept = len(_unit_axes(x.shape))
  norms = jnp.sqrt(unit_sq_norms(x))
  return norms.reshape((1,) * kept + x.shape[kept:])


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm of a whole tree (as `optax.tree.norm`), from `unit_sq_norms`.

  Summing the per-unit squares that AGC computes anyway lets XLA share
  them, instead of another full pass over every parameter. The barrier is
  what makes the sharing happen: without it XLA's simplifier folds
  `sum(unit_sq_norms(x))` into one full reduction of `x**2`, a second
  reduction beside AGC's, and then materialises `x**2` for the two (three
  extra passes over each gradient; docs/performance.md).

  Args:
    tree: gradients or parameters.

  Returns:
    A scalar.
  """
  leaves = jax.tree.leaves(tree)
  per_unit = jax.lax.optimization_barrier([unit_sq_norms(x) for x in leaves])
  return jnp.sqrt(jnp.sum(jnp.concatenate(per_unit)))


def agc_clip_fraction(
  grads: PyTree,
  params: PyTree,
  clipping: float,
  eps: float = 1e-3,
  mask: PyTree | None = None,
) -> jax.Array:
  """Fraction of units whose gradient AGC clips, a training metric.

  Args:
    grads: raw gradients (before clipping).
    params: the parameters they belong to.
    clipping: AGC lambda, as given to the optimizer (a Python float or a
      traced scalar; not checked here).
    eps: AGC eps, likewise.
    mask: optional boolean tree (e.g. `agc_mask(params)`); False leaves are
      neither counted nor clipped.

  Returns:
    A float32 scalar in [0, 1]; 0 when nothing is clipped or masked in.
  """
  if mask is None:
    mask = jax.tree.map(lambda _: True, params)
  grad_norms, param_norms = [], []
  for g, p, m in zip(
    jax.tree.leaves(grads),
    jax.tree.leaves(params),
    jax.tree.leaves(mask),
    strict=True,
  ):
    if m:
      grad_norms.append(jnp.sqrt(unit_sq_norms(g)).ravel())
      param_norms.append(jnp.sqrt(unit_sq_norms(p)).ravel())
  if not grad_norms:
    return jnp.zeros((), jnp.float32)
  # One compare and one count over all units at once. Counting per leaf
  # and adding the counts up made XLA:CPU's fusion pass superlinear in the
  # number of leaves: 13 of F1's 118 s of compile, 215 s of F3's.
  max_norm = clipping * jnp.maximum(jnp.concatenate(param_norms), eps)
  over = jnp.concatenate(grad_norms) > max_norm
  return jnp.mean(over, dtype=jnp.float32)
