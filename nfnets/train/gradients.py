"""The forward/backward pass of a train step's batch: whole or in micro-batches.

`make_gradients` returns the function the train step calls for the gradient
of its batch's mean loss, with the loss, top-1, top-5 and the Haiku state
after the batch. With `grad_accum_steps = k > 1` the batch is processed as
k micro-batches one after another (`accumulate`), each taking an equal
share of every device's rows (`split_micro_batches`), and their gradients
are averaged: the update is that of the whole batch up to float rounding,
and peak activation memory is that of one micro-batch.

A pass over some rows (`PassFn`) is the unit both use; SAM
(`nfnets.train.sam`) builds its own passes from the same one.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nfnets.train import losses

# `(params, model_state, rows, hyperparams, rng) -> (loss, top1, top5,
# grads, new_model_state)`: the mean loss of the rows, their per-row top-1
# and top-5 hits, the gradient of the mean loss and the state after them.
PassFn = Callable[..., tuple]


class Gradients(NamedTuple):
  """The forward/backward pass of a whole batch."""

  loss: jax.Array
  top1: jax.Array
  top5: jax.Array
  grads: Any
  model_state: Any


def make_pass(grad_fn, num_classes: int) -> PassFn:
  """The `PassFn` of `grad_fn` (`step._make_grad_fn`'s value and grad)."""
  k5 = min(5, num_classes)

  def one_pass(params, model_state, batch, hyperparams, rng):
    targets = losses.make_targets(batch, num_classes, hyperparams)
    (loss, (logits, new_state)), grads = grad_fn(
      params, model_state, batch, targets, rng
    )
    # The state keeps its dtypes whatever the compute dtype.
    new_state = jax.tree.map(
      lambda new, old: new.astype(old.dtype), new_state, model_state
    )
    top1 = losses.topk_correct(logits, batch['labels'], 1)
    top5 = losses.topk_correct(logits, batch['labels'], k5)
    return loss, top1, top5, grads, new_state

  return one_pass


def make_gradients(
  pass_fn: PassFn, *, grad_accum_steps: int, num_devices: int | None = None
):
  """`(params, model_state, batch, hyperparams, rng) -> Gradients`.

  The loss, top-1 and top-5 are means over the whole batch, `grads` the
  gradient of the mean loss (float32), `model_state` the Haiku state after
  the batch in the dtypes of the state given. With `grad_accum_steps > 1`
  the batch is processed as micro-batches (`accumulate`), each taking an
  equal share of the rows of each of `num_devices` devices (default
  `jax.device_count()`).
  """
  check_accum_steps(grad_accum_steps)

  def gradients(params, model_state, batch, hyperparams, rng):
    return accumulate(
      pass_fn, params, model_state, batch, hyperparams, rng,
      grad_accum_steps=grad_accum_steps,
      num_groups=num_devices or jax.device_count(),
    )  # fmt: skip

  return gradients


def accumulate(
  pass_fn: PassFn,
  params,
  model_state,
  batch,
  hyperparams,
  rng,
  *,
  grad_accum_steps: int,
  num_groups: int,
) -> Gradients:
  """`Gradients` of `batch` from `grad_accum_steps` micro-batches in turn.

  Gradients and losses are summed in float32 over the micro-batches (equal
  sizes, so the mean of their mean losses is the batch's mean loss) and
  divided by their number; the Haiku state is carried from one micro-batch
  to the next; micro-batch j's pass uses `fold_in(rng, j)`. One
  micro-batch is the batch itself, with `rng` unchanged. `num_groups`
  is `split_micro_batches`'.
  """
  k = grad_accum_steps
  size = batch_size(batch)
  if k == 1:
    loss, top1, top5, grads, state = pass_fn(
      params, model_state, batch, hyperparams, rng
    )
    return Gradients(loss, jnp.mean(top1), jnp.mean(top5), grads, state)
  micro = split_micro_batches(batch, k, num_groups)

  def body(carry, xs):
    grads_sum, state, loss_sum, top1_sum, top5_sum = carry
    j, rows = xs
    loss, top1, top5, grads, state = pass_fn(
      params, state, rows, hyperparams, jax.random.fold_in(rng, j)
    )
    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
    carry = (
      grads_sum,
      state,
      loss_sum + loss,
      top1_sum + jnp.sum(top1),
      top5_sum + jnp.sum(top5),
    )
    return carry, None

  zero = jnp.zeros((), jnp.float32)
  init = (
    jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
    model_state,
    zero,
    zero,
    zero,
  )
  # XLA:CPU runs convolution gradients inside a loop body as naive loop
  # nests, 25-60x slower (jax-ml/jax#12868; `nfnets.ops.grouped_conv2d`),
  # so on CPU the micro-batches are unrolled: the same arithmetic in a k
  # times larger program, with no bound on the activation memory. On GPU
  # and TPU the loop holds one micro-batch's activations at a time.
  (grads_sum, state, loss_sum, top1_sum, top5_sum), _ = jax.lax.scan(
    body, init, (jnp.arange(k), micro), unroll=unroll_micro_batches()
  )
  return Gradients(
    loss=loss_sum / k,
    top1=top1_sum / size,
    top5=top5_sum / size,
    grads=jax.tree.map(lambda g: g / k, grads_sum),
    model_state=state,
  )


def unroll_micro_batches() -> bool:
  """Whether the micro-batch loop is unrolled: on CPU (see `accumulate`)."""
  return jax.default_backend() == 'cpu'


def batch_size(batch) -> int:
  """The leading size shared by every leaf of `batch`."""
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(
      f'Every leaf of the batch needs the same leading size, got {sizes}.'
    )
  return sizes.pop()


def split_micro_batches(batch, grad_accum_steps: int, num_groups: int):
  """Stacks `batch`'s micro-batches on a new leading axis, rows in place.

  The B rows are viewed as `[num_groups, grad_accum_steps, m]` (m = B /
  (num_groups * grad_accum_steps)): micro-batch j takes rows j*m..(j+1)*m-1
  of each of the `num_groups` consecutive blocks of B / num_groups rows.
  With `num_groups` the device count and the batch sharded on its leading
  axis, each block is one device's rows, so every micro-batch takes an equal
  share of every device's rows and none moves across devices (the reshape
  and transpose only relabel local data).

  Args:
    batch: a pytree of arrays with leading size B.
    grad_accum_steps: number of micro-batches k.
    num_groups: number of blocks of rows (the device count).

  Returns:
    The pytree with leaves of shape `[k, B / k, ...]`.

  Raises:
    ValueError: if B is not a multiple of k * num_groups.
  """
  k, size = grad_accum_steps, batch_size(batch)
  if size % (k * num_groups):
    raise ValueError(_indivisible_message(size, k, num_groups))
  m = size // (k * num_groups)

  def split(x):
    x = x.reshape((num_groups, k, m) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((k, num_groups * m) + x.shape[3:])

  return jax.tree.map(split, batch)


def check_grad_accum(
  batch_size: int, grad_accum_steps: int, num_devices: int
) -> None:
  """Raises a clear error if the batch does not split into micro-batches.

  Args:
    batch_size: the global batch size (`config.train.batch_size`).
    grad_accum_steps: `config.train.grad_accum_steps`.
    num_devices: the number of devices the batch is sharded over.

  Raises:
    ValueError: naming both numbers and the nearest valid batch sizes, if
      `batch_size` is not a multiple of `grad_accum_steps * num_devices`.
  """
  check_accum_steps(grad_accum_steps)
  if batch_size % (grad_accum_steps * num_devices):
    raise ValueError(
      _indivisible_message(batch_size, grad_accum_steps, num_devices)
    )


def _indivisible_message(batch_size: int, k: int, num_devices: int) -> str:
  n = k * num_devices
  lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
  valid = ' or '.join(str(b) for b in (lower, upper) if b > 0)
  return (
    f'config.train.batch_size={batch_size} is not divisible by '
    f'config.train.grad_accum_steps={k} x {num_devices} devices = {n}: '
    f"every micro-batch takes an equal share of every device's rows. Use a "
    f'batch size that is a multiple of {n}, e.g. {valid}, or change '
    'config.train.grad_accum_steps.'
  )


def check_accum_steps(grad_accum_steps) -> None:
  """`grad_accum_steps` is an integer >= 1 (not a bool)."""
  if (
    isinstance(grad_accum_steps, bool)
    or not isinstance(grad_accum_steps, int)
    or grad_accum_steps < 1
  ):
    raise ValueError(
      'config.train.grad_accum_steps must be an integer >= 1, got '
      f'{grad_accum_steps!r}.'
    )
