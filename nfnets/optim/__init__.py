"""The NFNet training optimizer as composable optax pieces.

Reproduces the optimizer of DeepMind's reference code (`SGD_AGC` in
`deepmind-research/nfnets`), in the same order of operations:

  1. adaptive gradient clipping (AGC), unit-wise, on every parameter except
     the classifier weight;
  2. coupled weight decay, `g + wd * p`, on every parameter except gains,
     biases and skip gains;
  3. (Nesterov) momentum, `buf = m * buf + g`, direction `g + m * buf`;
  4. the learning rate: linear warmup from 0, then cosine decay, optionally
     scaled by `batch / 256`.

Around it: parameter groups as regexes over Haiku paths (`module/param`), an
Adam/AdamW variant with AGC, the reference's EMA of weights with its
`(1 + t) / (10 + t)` warmup, the SAM ascent step, an AGC clip-rate metric and
`make_optimizer`, which builds everything from `config.optimizer`.

AGC computes the same clipping as `optax.adaptive_grad_clip` (and the
paper's formula; checked against a NumPy re-derivation in
tests/optim/test_optim.py)
but takes every unit norm on a 2-D `(fan_in, units)` view of the tensor, one
fused square-and-sum per leaf, which XLA:CPU runs several times faster than
optax's reduction over the kept axes of an HWIO kernel; the norms are shared
(XLA eliminates the duplicates) with the `global_norm` and clip-fraction
metrics of the train step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]
LearningRate = float | Schedule

# The classifier weight: a `linear*` module outside any squeeze-excite block.
# DeepMind's reference leaves only this tensor unclipped ('linear' in the
# module name and 'squeeze_excite' not in it; biases were put in the
# gains/biases group first, so the classifier bias is still clipped).
AGC_EXCLUDE = (r'^(?!.*squeeze_excite)(.*/)?linear(_\d+)?/w$',)

# The reference's no-weight-decay group: parameters named `b`, `scale` or
# `offset`, or whose name contains `gain` or `bias` (WS gains and biases,
# every `skip_gain`, Linear biases including the classifier's). Patterns are
# anchored on the parameter name, the part after the last '/'.
WD_EXCLUDE = (r'/(b|scale|offset)$', r'/[^/]*gain[^/]*$', r'/[^/]*bias[^/]*$')

# LR scaling rule of the paper: `lr = base_lr * global_batch_size / 256`.
LR_REFERENCE_BATCH_SIZE = 256


def _traced(*values) -> bool:
  """Whether any value is a tracer: a train step's input, checked earlier."""
  return any(isinstance(v, jax.core.Tracer) for v in values)


# ---------------------------------------------------------------------------
# Parameter groups.
# ---------------------------------------------------------------------------


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_name(path: Sequence[Any]) -> str:
  """Joins a pytree key path into a Haiku-style name `module/param`.

  Args:
    path: a key path from `jax.tree_util.tree_flatten_with_path`.

  Returns:
    The keys joined with '/', e.g. `'NFNet/~/linear/w'`.
  """
  return '/'.join(_key_name(k) for k in path)


def _compile(patterns: str | Iterable[str] | None) -> list[re.Pattern]:
  if patterns is None:
    return []
  if isinstance(patterns, str):
    patterns = (patterns,)
  compiled = []
  for p in patterns:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(
        f'Invalid parameter-group regex {p!r}: {e}. Patterns are Python '
        "regexes searched in 'module/param' names, e.g. r'/b$'."
      ) from e
  return compiled


def _matches(name: str, compiled: list[re.Pattern]) -> bool:
  return any(c.search(name) for c in compiled)


def select_leaves(
  params: PyTree, patterns: str | Iterable[str] | None
) -> list[str]:
  """Lists the leaves whose `module/param` name matches any of `patterns`.

  Args:
    params: a parameter tree, e.g. Haiku's `{module: {param: array}}`. Leaves
      may be arrays or `jax.ShapeDtypeStruct`s.
    patterns: regexes (or one regex), searched with `re.search`.

  Returns:
    The matching names, in tree order.
  """
  compiled = _compile(patterns)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [
    leaf_name(path) for path, _ in leaves if _matches(leaf_name(path), compiled)
  ]


def _mask_excluding(params: PyTree, patterns) -> PyTree:
  compiled = _compile(patterns)
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not _matches(leaf_name(path), compiled), params
  )


def agc_mask(params: PyTree, exclude=AGC_EXCLUDE) -> PyTree:
  """Boolean tree: True where AGC applies (leaves not matching `exclude`).

  Args:
    params: a parameter (or gradient) tree.
    exclude: regexes over `module/param` names; by default the classifier
      weight only, as in the reference.

  Returns:
    A tree of Python bools with the structure of `params`.
  """
  return _mask_excluding(params, exclude)


def weight_decay_mask(params: PyTree, exclude=WD_EXCLUDE) -> PyTree:
  """Boolean tree: True where weight decay applies.

  Args:
    params: a parameter (or gradient) tree.
    exclude: regexes over `module/param` names; by default gains, biases and
      skip gains, as in the reference.

  Returns:
    A tree of Python bools with the structure of `params`.
  """
  return _mask_excluding(params, exclude)


def describe_param_groups(
  params: PyTree, agc_exclude=AGC_EXCLUDE, wd_exclude=WD_EXCLUDE
) -> dict[str, list[str]]:
  """Names the leaves left out of AGC and of weight decay, for logging.

  Args:
    params: a parameter tree.
    agc_exclude: regexes of leaves that AGC skips.
    wd_exclude: regexes of leaves that weight decay skips.

  Returns:
    `{'no_agc': [...], 'no_weight_decay': [...], 'all': [...]}`.
  """
  return {
    'no_agc': select_leaves(params, agc_exclude),
    'no_weight_decay': select_leaves(params, wd_exclude),
    'all': select_leaves(params, ('',)),
  }


# ---------------------------------------------------------------------------
# Adaptive gradient clipping.
# ---------------------------------------------------------------------------


def _check_clipping(clipping: float, eps: float) -> None:
  if not clipping > 0:  # Also catches NaN.
    raise ValueError(
      f'AGC clipping must be > 0, got {clipping}. The paper uses 0.01 at '
      'batch 1024-4096 (0.001-0.005 for Adam); to turn AGC off, leave it out '
      '(clipping=None, or 0 in config.optimizer).'
    )
  if not eps > 0:
    raise ValueError(f'AGC eps must be > 0 (the paper uses 1e-3), got {eps}.')


def adaptive_grad_clip(
  clipping: float, eps: float = 1e-3, exclude=()
) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping (Brock et al. 2021, section 4.1).

  For each unit i (one output channel of an HWIO conv kernel, one output
  column of an `(in, out)` Linear weight, the whole tensor for scalars and
  vectors): `G_i <- G_i * lam * max(|W_i|, eps) / |G_i|` when
  `|G_i| > lam * max(|W_i|, eps)`. This is `optax.adaptive_grad_clip`, whose
  norms and condition match the reference exactly; we add validation, a
  regex exclusion list and tolerance of NumPy leaves. The update needs
  `params`.

  Args:
    clipping: lambda, the largest allowed ratio |G_i| / max(|W_i|, eps).
    eps: lower bound on the parameter norm, so zero-initialised parameters
      (biases, skip gains) can still move.
    exclude: regexes over `module/param` names of leaves left unclipped.

  Returns:
    A stateless `optax.GradientTransformation`.
  """
  _check_clipping(clipping, eps)
  _compile(exclude)  # Fails early on a bad regex.
  return _agc(clipping, eps, exclude)


def _agc(clipping, eps, exclude) -> optax.GradientTransformation:
  """`adaptive_grad_clip` without the checks: the numbers may be traced."""

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
    tx = optax.masked(tx, lambda p: agc_mask(p, exclude))
  return tx


def _agc_leaf(g, p, clipping: float, eps: float) -> jax.Array:
  """AGC of one leaf: optax's and the reference's formula and condition."""
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
    clipping: AGC lambda.
    eps: AGC eps.
    mask: optional boolean tree (e.g. `agc_mask(params)`); False leaves are
      neither counted nor clipped.

  Returns:
    A float32 scalar in [0, 1]; 0 when nothing is clipped or masked in.
  """
  if not _traced(clipping, eps):
    _check_clipping(clipping, eps)
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


# ---------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------


def _check_momentum(momentum: float) -> None:
  if not 0.0 <= momentum < 1.0:
    raise ValueError(
      f'momentum must be in [0, 1), got {momentum}. The reference uses 0.9.'
    )


def _check_weight_decay(weight_decay: float) -> None:
  if not weight_decay >= 0:
    raise ValueError(
      f'weight_decay must be >= 0, got {weight_decay} (the reference: 2e-5).'
    )


# The chains below take their numbers unchecked, as Python floats or as
# traced scalars (`build_optimizer`); None turns a part off.


def _maybe_agc(clipping, eps, agc_exclude) -> optax.GradientTransformation:
  if clipping is None:
    return optax.identity()
  return _agc(clipping, eps, agc_exclude)


def _decay(weight_decay, wd_exclude) -> optax.GradientTransformation:
  if weight_decay is None:
    return optax.identity()
  return optax.add_decayed_weights(
    weight_decay, mask=lambda p: weight_decay_mask(p, wd_exclude)
  )


def _sgd_chain(
  lr, *, momentum, nesterov, weight_decay, clipping, eps, agc_exclude,
  wd_exclude,
) -> optax.GradientTransformation:  # fmt: skip
  return optax.chain(
    _maybe_agc(clipping, eps, agc_exclude),
    _decay(weight_decay, wd_exclude),
    optax.trace(decay=momentum, nesterov=nesterov),
    optax.scale_by_learning_rate(lr),
  )


def _adam_chain(
  lr, *, b1, b2, eps, weight_decay, decoupled, clipping, agc_eps,
  agc_exclude, wd_exclude,
) -> optax.GradientTransformation:  # fmt: skip
  decay = _decay(weight_decay, wd_exclude)
  return optax.chain(
    _maybe_agc(clipping, agc_eps, agc_exclude),
    optax.identity() if decoupled else decay,
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    decay if decoupled else optax.identity(),
    optax.scale_by_learning_rate(lr),
  )


def _check_groups(agc_exclude, wd_exclude) -> None:
  _compile(agc_exclude)  # Fail early on a bad regex.
  _compile(wd_exclude)


def _check_shared(weight_decay, clipping, eps, agc_exclude, wd_exclude):
  """The checks `sgd_agc` and `adam_agc` share."""
  _check_weight_decay(weight_decay)
  if clipping is not None:
    _check_clipping(clipping, eps)
  _check_groups(agc_exclude, wd_exclude)


def sgd_agc(
  learning_rate: LearningRate,
  momentum: float = 0.9,
  nesterov: bool = True,
  weight_decay: float = 2e-5,
  clipping: float | None = 0.01,
  eps: float = 1e-3,
  agc_exclude=AGC_EXCLUDE,
  wd_exclude=WD_EXCLUDE,
) -> optax.GradientTransformation:
  """SGD with AGC, coupled weight decay and Nesterov momentum (the reference).

  Order, as in DeepMind's `SGD_AGC`: AGC on the raw gradient, then
  `g + weight_decay * p`, then `buf = momentum * buf + g` with direction
  `g + momentum * buf` (Nesterov) or `buf`, then `-learning_rate * direction`.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    momentum: in [0, 1); 0 gives plain SGD.
    nesterov: Nesterov momentum (the reference always uses it).
    weight_decay: coupled L2 coefficient; 0 turns it off.
    clipping: AGC lambda (> 0), or None for no AGC.
    eps: AGC eps.
    agc_exclude: regexes of `module/param` names that AGC skips.
    wd_exclude: regexes of `module/param` names that weight decay skips.

  Returns:
    An `optax.GradientTransformation`; its `update` needs `params`.
  """
  _check_momentum(momentum)
  _check_shared(weight_decay, clipping, eps, agc_exclude, wd_exclude)
  return _sgd_chain(
    learning_rate, momentum=momentum, nesterov=nesterov,
    weight_decay=weight_decay or None, clipping=clipping, eps=eps,
    agc_exclude=agc_exclude, wd_exclude=wd_exclude,
  )  # fmt: skip


def adam_agc(
  learning_rate: LearningRate,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  decoupled: bool = True,
  clipping: float | None = 0.001,
  agc_eps: float = 1e-3,
  agc_exclude=AGC_EXCLUDE,
  wd_exclude=WD_EXCLUDE,
) -> optax.GradientTransformation:
  """Adam (or AdamW) after AGC, for users who want an adaptive optimizer.

  AGC clips the raw gradient first, as in `sgd_agc`. Adaptive optimizers need
  a smaller lambda than SGD (timm's advice: 0.001-0.005).

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: Adam's denominator epsilon.
    weight_decay: decay coefficient; 0 turns it off.
    decoupled: True for AdamW (`p -= lr * wd * p`, after the Adam scaling);
      False for L2 added to the gradient before Adam (the reference's Adam).
    clipping: AGC lambda (> 0), or None for no AGC.
    agc_eps: AGC eps.
    agc_exclude: regexes of `module/param` names that AGC skips.
    wd_exclude: regexes of `module/param` names that weight decay skips.

  Returns:
    An `optax.GradientTransformation`; its `update` needs `params`.
  """
  _check_momentum(b1)
  if not 0.0 <= b2 < 1.0:
    raise ValueError(f'Adam b2 must be in [0, 1), got {b2}.')
  _check_shared(weight_decay, clipping, agc_eps, agc_exclude, wd_exclude)
  return _adam_chain(
    learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay or None,
    decoupled=decoupled, clipping=clipping, agc_eps=agc_eps,
    agc_exclude=agc_exclude, wd_exclude=wd_exclude,
  )  # fmt: skip


# ---------------------------------------------------------------------------
# Learning-rate schedule.
# ---------------------------------------------------------------------------


def scaled_lr(
  base_lr: float, global_batch_size: int, scale_by_batch: bool = True
) -> float:
  """The peak LR: `base_lr * global_batch_size / 256` when scaling.

  Args:
    base_lr: LR per 256 images (0.1 in the paper).
    global_batch_size: images per optimizer step, over all devices.
    scale_by_batch: whether to apply the linear scaling rule.

  Returns:
    The peak learning rate (1.6 for the paper's batch of 4096).
  """
  if global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be > 0, got {global_batch_size}')
  if not scale_by_batch:
    return float(base_lr)
  return float(base_lr) * global_batch_size / LR_REFERENCE_BATCH_SIZE


def make_lr_schedule(
  base_lr: float,
  *,
  total_steps: int,
  warmup_steps: float = 0.0,
  min_lr: float = 0.0,
  global_batch_size: int | None = None,
  scale_by_batch: bool = False,
) -> Schedule:
  """Linear warmup from 0, then cosine decay to `min_lr` (the reference's).

  `lr(t) = peak * t / warmup_steps` for `t <= warmup_steps`, then
  `min_lr + (peak - min_lr) * (1 + cos(pi * (t - w) / (total - w))) / 2`,
  reaching `min_lr` at `t = total_steps`. `warmup_steps` may be fractional
  (the reference uses 5 epochs = 1563.92 steps at batch 4096).

  Args:
    base_lr: the peak LR, or the LR per 256 images when `scale_by_batch`.
    total_steps: training steps; the cosine ends here.
    warmup_steps: length of the linear warmup, in (fractional) steps.
    min_lr: final LR, not scaled by batch size.
    global_batch_size: images per step; needed when `scale_by_batch`.
    scale_by_batch: multiply `base_lr` by `global_batch_size / 256`.

  Returns:
    A function of the step count (int or array) returning the LR (float32).
  """
  values = _schedule_values(
    base_lr,
    total_steps=total_steps,
    warmup_steps=warmup_steps,
    min_lr=min_lr,
    global_batch_size=global_batch_size,
    scale_by_batch=scale_by_batch,
  )
  return _schedule_of(values)


# `warmup_cosine`'s arguments, as keys of `hyperparams`.
_SCHEDULE_KEYS = (
  'lr_min', 'lr_half_range', 'lr_warmup_slope', 'warmup_steps',
  'inv_decay_steps',
)  # fmt: skip


def _schedule_of(values) -> Schedule:
  return warmup_cosine(**{k: values[k] for k in _SCHEDULE_KEYS})


def _schedule_values(
  base_lr, *, total_steps, warmup_steps, min_lr, global_batch_size,
  scale_by_batch,
) -> dict[str, float]:  # fmt: skip
  """Checks `make_lr_schedule`'s arguments; returns `warmup_cosine`'s."""
  if scale_by_batch and global_batch_size is None:
    raise ValueError('scale_by_batch=True needs global_batch_size.')
  peak = scaled_lr(base_lr, global_batch_size or 1, scale_by_batch)
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(
      f'Need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}'
      f', total_steps={total_steps}. Shorten the warmup or train longer.'
    )
  if min_lr < 0 or base_lr < 0:
    raise ValueError(f'LRs must be >= 0, got lr={base_lr}, min_lr={min_lr}.')
  # Derived in float64, then rounded once to float32 where they are used.
  return {
    'lr_peak': peak,
    'lr_min': float(min_lr),
    'lr_half_range': 0.5 * (peak - min_lr),
    'lr_warmup_slope': peak / warmup_steps if warmup_steps > 0 else 0.0,
    'warmup_steps': float(warmup_steps),
    'inv_decay_steps': 1.0 / (total_steps - warmup_steps),
  }


def warmup_cosine(
  lr_min, lr_half_range, lr_warmup_slope, warmup_steps, inv_decay_steps
) -> Schedule:
  """The formula of `make_lr_schedule`, from its derived numbers.

  The numbers may be Python floats or float32 scalars traced as inputs of a
  train step (`build_optimizer`). Both give the same bits because the
  formula has no division: XLA rewrites `x / constant` as a multiplication
  by the constant's reciprocal but keeps `x / input`, which differ in the
  last bit. Nothing branches on the numbers in Python either: no warmup is
  `warmup_steps == 0`.

  Args:
    lr_min: the final LR.
    lr_half_range: `(lr_peak - lr_min) / 2`.
    lr_warmup_slope: `lr_peak / warmup_steps` (0 without a warmup).
    warmup_steps: length of the linear warmup (0 for none).
    inv_decay_steps: `1 / (total_steps - warmup_steps)`.

  Returns:
    A function of the step count returning the LR (float32).
  """

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((t - warmup_steps) * inv_decay_steps, 0, 1)
    cos = lr_min + lr_half_range * (1 + jnp.cos(math.pi * frac))
    in_warmup = (t <= warmup_steps) & (jnp.asarray(warmup_steps) > 0)
    return jnp.where(in_warmup, lr_warmup_slope * t, cos).astype(jnp.float32)

  return schedule


# ---------------------------------------------------------------------------
# EMA of weights and SAM.
# ---------------------------------------------------------------------------


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
  return jax.tree.map(
    lambda e, p: (e * d + p * (1.0 - d)).astype(e.dtype), ema_params, new_params
  )


def sam_perturb(
  params: PyTree, grads: PyTree, rho: float, eps: float = 1e-12
) -> PyTree:
  """SAM's ascent point `params + rho * g / |g|` (global L2 norm).

  Sharpness-aware minimisation (Foret et al. 2021), as used for F5+SAM,
  F6+SAM and fine-tuning (rho = 0.05): compute the gradient at the returned
  point and give that gradient, with the original params, to the optimizer.

  Args:
    params: the current parameters.
    grads: the gradient at `params` (the paper uses 20% of the batch).
    rho: neighbourhood radius, >= 0.
    eps: guards the division when the gradient is zero.

  Returns:
    The perturbed parameters.
  """
  if not _traced(rho) and not rho >= 0:
    raise ValueError(f'SAM rho must be >= 0, got {rho} (the paper: 0.05).')
  scale = rho / jnp.maximum(optax.tree.norm(grads), eps)
  return jax.tree.map(
    lambda p, g: (p + scale * g).astype(p.dtype), params, grads
  )


# ---------------------------------------------------------------------------
# Config and factory.
# ---------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
  """`config.optimizer` for the NFNet-F0 recipe of the paper.

  Returns:
    A ConfigDict. `lr` is per 256 images when `scale_lr_by_batch`;
    `warmup_steps`, when set, overrides `warmup_epochs`; `clipping=0` turns
    AGC off; `sam_rho=0` and `ema_decay=0` turn SAM and EMA off (the train
    step reads those two).
  """
  c = ml_collections.ConfigDict()
  c.name = 'sgd_agc'  # One of OPTIMIZERS.
  c.lr = 0.1
  c.scale_lr_by_batch = True
  c.warmup_epochs = 5.0
  c.warmup_steps = config_dict.placeholder(int)
  c.min_lr = 0.0
  c.momentum = 0.9  # Adam's b1 for 'adam'/'adamw'.
  c.nesterov = True  # SGD only.
  c.beta2 = 0.999  # Adam only.
  c.adam_eps = 1e-8  # Adam only.
  c.weight_decay = 2e-5
  c.clipping = 0.01
  c.eps = 1e-3
  c.agc_exclude = AGC_EXCLUDE
  c.wd_exclude = WD_EXCLUDE
  c.sam_rho = 0.0
  c.ema_decay = 0.99999
  return c


def _build_sgd(c, hp, lr: Schedule) -> optax.GradientTransformation:
  return _sgd_chain(
    lr,
    momentum=hp['momentum'],
    nesterov=c.nesterov,
    weight_decay=hp['weight_decay'] if c.weight_decay else None,
    clipping=hp['clipping'] if c.clipping else None,
    eps=hp['eps'],
    agc_exclude=tuple(c.agc_exclude),
    wd_exclude=tuple(c.wd_exclude),
  )


def _adam_builder(decoupled: bool):
  def build(c, hp, lr: Schedule) -> optax.GradientTransformation:
    # b1, b2 and eps stay constants: optax computes `1 - b` inside, and
    # `1 - b` of a float32 input is not the float32 of the exact `1 - b`
    # (0.100000024 for b = 0.9), so inputs would change Adam's bits.
    return _adam_chain(
      lr,
      b1=c.momentum,
      b2=c.beta2,
      eps=c.adam_eps,
      weight_decay=hp['weight_decay'] if c.weight_decay else None,
      decoupled=decoupled,
      clipping=hp['clipping'] if c.clipping else None,
      agc_eps=hp['eps'],
      agc_exclude=tuple(c.agc_exclude),
      wd_exclude=tuple(c.wd_exclude),
    )

  return build


# name -> builder(opt_config, hyperparams, lr schedule). The config decides
# the structure (which parts are on, Nesterov, the parameter groups), the
# hyperparameters every number.
OPTIMIZERS = {
  'sgd_agc': _build_sgd,
  'sgd': _build_sgd,
  'adam': _adam_builder(decoupled=False),
  'adamw': _adam_builder(decoupled=True),
}


def _check_config_clipping(c) -> None:
  """0 and None both mean no AGC; anything else must be a valid lambda."""
  if c.name == 'sgd_agc' and not c.clipping:
    raise ValueError(
      "optimizer.name='sgd_agc' needs optimizer.clipping > 0, got "
      f"{c.clipping}. For SGD without AGC use name='sgd' with clipping=0."
    )
  if c.clipping:
    _check_clipping(c.clipping, c.eps)


def _validate(c) -> None:
  if c.name not in OPTIMIZERS:
    raise ValueError(
      f'Unknown optimizer.name {c.name!r}; valid names: {sorted(OPTIMIZERS)}.'
    )
  _check_config_clipping(c)
  _check_momentum(c.momentum)
  _check_weight_decay(c.weight_decay)
  if c.name.startswith('adam') and not 0.0 <= c.beta2 < 1.0:
    raise ValueError(f'Adam beta2 must be in [0, 1), got {c.beta2}.')
  _check_groups(tuple(c.agc_exclude), tuple(c.wd_exclude))
  if not c.sam_rho >= 0:
    raise ValueError(f'optimizer.sam_rho must be >= 0, got {c.sam_rho}.')
  if not 0.0 <= c.ema_decay < 1.0:
    raise ValueError(
      f'optimizer.ema_decay must be in [0, 1) (0 = off), got {c.ema_decay}.'
    )


def hyperparams(
  opt_config: ml_collections.ConfigDict,
  *,
  steps_per_epoch: float,
  total_steps: int,
  global_batch_size: int,
) -> dict[str, float]:
  """Every number of the optimizer, checked, as a flat dict of floats.

  These are what a sweep varies (LR, warmup, run length, momentum, weight
  decay, AGC's lambda and eps, EMA decay, SAM's rho). The trainer hands
  them to the jitted train step as float32 inputs rather than baking them
  into the program as constants, so runs that differ only in these numbers
  compile the same program: the second point of an LR or clipping sweep
  loads the first one's executable from the persistent compilation cache.
  What stays in the program is the structure: `optimizer.name`,
  `nesterov`, the parameter groups, and whether AGC (`clipping` > 0),
  weight decay, SAM and the EMA are on at all; and Adam's `momentum` (b1),
  `beta2` and `adam_eps` (see `_adam_builder`). With these inputs the step
  computes the bits it computes with the numbers as constants
  (tests/train/test_hyperparam_step.py).

  Args:
    opt_config: a ConfigDict shaped like `default_config()`.
    steps_per_epoch: optimizer steps per epoch, may be fractional
      (train examples / global batch size); converts `warmup_epochs`.
    total_steps: the training length; the cosine reaches `min_lr` here.
    global_batch_size: images per step over all devices (LR scaling).

  Returns:
    name -> float: `lr_peak` (for reference), the LR schedule's
    `warmup_cosine` arguments and `momentum`, `weight_decay`, `clipping`
    (0 when off), `eps`, `ema_decay`, `sam_rho` from the config.
  """
  c = opt_config
  _validate(c)
  warmup = c.warmup_steps
  if warmup is None:
    warmup = c.warmup_epochs * steps_per_epoch
  values = _schedule_values(
    c.lr,
    total_steps=total_steps,
    warmup_steps=warmup,
    min_lr=c.min_lr,
    global_batch_size=global_batch_size,
    scale_by_batch=c.scale_lr_by_batch,
  )
  for name in ('momentum', 'weight_decay', 'eps', 'ema_decay', 'sam_rho'):
    values[name] = float(c[name])
  values['clipping'] = float(c.clipping or 0.0)
  return values


def build_optimizer(
  opt_config: ml_collections.ConfigDict, hp: dict
) -> tuple[optax.GradientTransformation, Schedule]:
  """The optimizer of `opt_config`'s structure with the numbers of `hp`.

  Args:
    opt_config: decides the structure (see `hyperparams`); checked by
      `hyperparams`, not here.
    hp: `hyperparams(opt_config, ...)`, as Python floats or as (traced)
      float32 scalars. Every choice of values gives an optimizer state of the
      same structure, so a state initialised with one serves all.

  Returns:
    `(tx, schedule)`, as `make_optimizer`.
  """
  schedule = _schedule_of(hp)
  return OPTIMIZERS[opt_config.name](opt_config, hp, schedule), schedule


def make_optimizer(
  opt_config: ml_collections.ConfigDict,
  *,
  steps_per_epoch: float,
  total_steps: int,
  global_batch_size: int,
) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimizer and its LR schedule from `config.optimizer`.

  Its numbers are constants of whatever program uses it; the trainer uses
  `hyperparams` and `build_optimizer` inside the step instead.

  Args:
    opt_config: a ConfigDict shaped like `default_config()`.
    steps_per_epoch: as for `hyperparams`.
    total_steps: as for `hyperparams`.
    global_batch_size: as for `hyperparams`.

  Returns:
    `(tx, schedule)`: the transformation (its `update` needs `params`) and
    the step -> LR function it uses, for logging.
  """
  hp = hyperparams(
    opt_config,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    global_batch_size=global_batch_size,
  )
  return build_optimizer(opt_config, hp)
