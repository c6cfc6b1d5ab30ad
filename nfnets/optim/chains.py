"""The optimizer chains: SGD and Adam, each after AGC, with weight decay.

`sgd_chain` and `adam_chain` build the optax chains; they are the only
place where the parts are put in order, and every optimizer of the package
comes from one of them: the user-facing `sgd_agc` and `adam_agc` (which
check their arguments first) and `config.build_optimizer` (whose numbers
were checked at config time and may be traced inputs of a train step).
In both chains `None` turns a part off. `with_frozen_stages` wraps any of
them for fine-tuning with the stem and the first stages frozen, and
`stop_frozen_gradients` spares the train step their gradients.
"""

from collections.abc import Callable

import jax
import optax

from nfnets.optim import agc, checks, groups

LearningRate = float | Callable[[jax.Array], jax.Array]


def _maybe_agc(clipping, eps, agc_exclude) -> optax.GradientTransformation:
  if clipping is None:
    return optax.identity()
  return agc.agc_transform(clipping, eps, agc_exclude)


def _decay(weight_decay, wd_exclude) -> optax.GradientTransformation:
  if weight_decay is None:
    return optax.identity()
  return optax.add_decayed_weights(
    weight_decay, mask=lambda p: groups.weight_decay_mask(p, wd_exclude)
  )


def sgd_chain(
  learning_rate: LearningRate, *, momentum, nesterov: bool, weight_decay,
  clipping, eps, agc_exclude, wd_exclude,
) -> optax.GradientTransformation:  # fmt: skip
  """AGC, coupled weight decay, (Nesterov) momentum, LR; unchecked.

  Args:
    learning_rate: a float or a schedule of the step count.
    momentum: momentum coefficient (float or traced scalar).
    nesterov: Nesterov momentum or plain.
    weight_decay: coupled L2 coefficient, or None for none.
    clipping: AGC lambda, or None for no AGC.
    eps: AGC eps.
    agc_exclude: regexes of `module/param` names that AGC skips.
    wd_exclude: regexes of `module/param` names that weight decay skips.

  Returns:
    An `optax.GradientTransformation` of four parts; its `update` needs
    `params`.
  """
  return optax.chain(
    _maybe_agc(clipping, eps, agc_exclude),
    _decay(weight_decay, wd_exclude),
    optax.trace(decay=momentum, nesterov=nesterov),
    optax.scale_by_learning_rate(learning_rate),
  )


def adam_chain(
  learning_rate: LearningRate, *, b1: float, b2: float, eps: float,
  weight_decay, decoupled: bool, clipping, agc_eps, agc_exclude, wd_exclude,
) -> optax.GradientTransformation:  # fmt: skip
  """AGC, then Adam with coupled or decoupled weight decay, LR; unchecked.

  Args:
    learning_rate: a float or a schedule of the step count.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam's denominator epsilon.
    weight_decay: decay coefficient, or None for none.
    decoupled: decay after the Adam scaling (AdamW) rather than before.
    clipping: AGC lambda, or None for no AGC.
    agc_eps: AGC eps.
    agc_exclude: regexes of `module/param` names that AGC skips.
    wd_exclude: regexes of `module/param` names that weight decay skips.

  Returns:
    An `optax.GradientTransformation` of five parts (the decay holds one of
    the two decay places, an identity the other); its `update` needs
    `params`.
  """
  decay = _decay(weight_decay, wd_exclude)
  return optax.chain(
    _maybe_agc(clipping, agc_eps, agc_exclude),
    optax.identity() if decoupled else decay,
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    decay if decoupled else optax.identity(),
    optax.scale_by_learning_rate(learning_rate),
  )


def _check_shared(
  learning_rate, weight_decay, clipping, eps, agc_exclude, wd_exclude
):
  """The checks `sgd_agc` and `adam_agc` share."""
  checks.check_learning_rate(learning_rate)
  checks.check_weight_decay(weight_decay)
  if clipping is not None:
    checks.check_clipping(clipping, eps)
  checks.check_groups(agc_exclude, wd_exclude)


def sgd_agc(
  learning_rate: LearningRate,
  momentum: float = 0.9,
  nesterov: bool = True,
  weight_decay: float = 2e-5,
  clipping: float | None = 0.01,
  eps: float = 1e-3,
  agc_exclude=groups.AGC_EXCLUDE,
  wd_exclude=groups.WD_EXCLUDE,
) -> optax.GradientTransformation:
  """SGD with AGC, coupled weight decay and Nesterov momentum (the reference).

  Order, as in DeepMind's `SGD_AGC`: AGC on the raw gradient, then
  `g + weight_decay * p`, then `buf = momentum * buf + g` with direction
  `g + momentum * buf` (Nesterov) or `buf`, then `-learning_rate * direction`.

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    momentum: in [0, 1); 0 gives plain SGD.
    nesterov: Nesterov momentum (the reference always uses it).
    weight_decay: coupled L2 coefficient; 0 turns it off.
    clipping: AGC lambda (> 0), or None for no AGC.
    eps: AGC eps.
    agc_exclude: regexes of `module/param` names that AGC skips.
    wd_exclude: regexes of `module/param` names that weight decay skips.

  Returns:
    An `optax.GradientTransformation`; its `update` needs `params`.

  Raises:
    ValueError: a number is not finite or out of range, or a regex is
      invalid.
  """
  checks.check_momentum(momentum)
  _check_shared(
    learning_rate, weight_decay, clipping, eps, agc_exclude, wd_exclude
  )
  return sgd_chain(
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
  agc_exclude=groups.AGC_EXCLUDE,
  wd_exclude=groups.WD_EXCLUDE,
) -> optax.GradientTransformation:
  """Adam (or AdamW) after AGC, for users who want an adaptive optimizer.

  AGC clips the raw gradient first, as in `sgd_agc`. Adaptive optimizers need
  a smaller lambda than SGD (timm's advice: 0.001-0.005).

  Args:
    learning_rate: a float >= 0 or an optax schedule of the step count.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: Adam's denominator epsilon, >= 0.
    weight_decay: decay coefficient; 0 turns it off.
    decoupled: True for AdamW (`p -= lr * wd * p`, after the Adam scaling);
      False for L2 added to the gradient before Adam (the reference's Adam).
    clipping: AGC lambda (> 0), or None for no AGC.
    agc_eps: AGC eps.
    agc_exclude: regexes of `module/param` names that AGC skips.
    wd_exclude: regexes of `module/param` names that weight decay skips.

  Returns:
    An `optax.GradientTransformation`; its `update` needs `params`.

  Raises:
    ValueError: a number is not finite or out of range, or a regex is
      invalid.
  """
  checks.check_momentum(b1)
  checks.check_beta2(b2)
  checks.check_adam_eps(eps)
  _check_shared(
    learning_rate, weight_decay, clipping, agc_eps, agc_exclude, wd_exclude
  )
  return adam_chain(
    learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay or None,
    decoupled=decoupled, clipping=clipping, agc_eps=agc_eps,
    agc_exclude=agc_exclude, wd_exclude=wd_exclude,
  )  # fmt: skip


def with_frozen_stages(
  tx: optax.GradientTransformation, num_stages: int
) -> optax.GradientTransformation:
  """`tx` on all but the stem and the first `num_stages` stages.

  The frozen parameters (`groups.frozen_mask`) get zero updates, so no
  weight decay either, and `tx` never sees them: its state holds no entry
  for them (optax's `MaskedNode` stands in their place), and AGC, weight
  decay and momentum act on the others exactly as without the freeze.
  The train step does not compute their gradients at all
  (`stop_frozen_gradients`).

  Args:
    tx: the optimizer of the trainable parameters.
    num_stages: stages frozen with the stem, an int in 0..4 (0 returns `tx`
      itself).

  Returns:
    An `optax.GradientTransformation` whose `init` and `update` take the
    whole parameter tree.

  Raises:
    ValueError: `num_stages` is not an int in 0..4.
  """
  checks.check_freeze_stages(num_stages, 'num_stages')
  if num_stages == 0:
    return tx
  labels = lambda params: jax.tree.map(
    lambda frozen: 'frozen' if frozen else 'trainable',
    groups.frozen_mask(params, num_stages),
  )
  return optax.multi_transform(
    {'trainable': tx, 'frozen': optax.set_to_zero()}, labels
  )


def stop_frozen_gradients(params, num_stages: int):
  """`params` with `lax.stop_gradient` on the frozen ones (`frozen_mask`).

  Applied to the parameters inside the differentiated loss, it makes the
  frozen parameters' gradients zeros that autodiff never computes: no
  weight gradients for the stem and the frozen stages, and no backward
  pass below the first trainable layer (the activations there carry no
  tangent). The trainable parameters' gradients are unchanged.

  Args:
    params: the parameter tree.
    num_stages: stages frozen with the stem, an int in 0..4 (0 returns
      `params` itself).

  Returns:
    A tree like `params`.

  Raises:
    ValueError: `num_stages` is not an int in 0..4.
  """
  checks.check_freeze_stages(num_stages, 'num_stages')
  if num_stages == 0:
    return params
  return jax.tree.map(
    lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p,
    params,
    groups.frozen_mask(params, num_stages),
  )
