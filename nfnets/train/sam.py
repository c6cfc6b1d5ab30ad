"""SAM in the train step: which rows and which devices take the ascent step.

Sharpness-aware minimisation (Foret et al. 2021) takes the gradient at
`params + rho * g / |g|`, `g` being the gradient at `params` (the ascent
step, `optim.sam_perturb`), and updates `params` with it. Two settings of
`config.optimizer` say how `g` is computed:

* `sam_ascent_fraction` (in (0, 1], default 1): `g` is taken on the first
  `fraction * m` rows (to the nearest, halves up; at least one) of each
  replica's m rows, a
  replica being one device's rows of one micro-batch (m = B / (devices x
  grad_accum_steps)). The paper uses 20% of the batch (appendix A.4), which
  costs 20-40% more than a plain step instead of 100%.
* `sam_ascent_sync` (default True): True averages `g` over every replica,
  so the whole step perturbs all replicas to one point; False gives each
  replica its own `g` and its own ascent point (the paper's unsynced ascent
  gradients, "m-sharpness" with m the replica's ascent rows), and the
  descent gradients of the replicas are averaged for the update.

Metrics and the Haiku state come from the pass that sees every row at the
unperturbed weights where there is one (fraction 1, synced); otherwise from
the descent pass, which sees every row at the ascent point. With
`sam_ascent_sync=False` each replica's pass normalises BatchNorm with its
own rows and the moving averages are averaged across devices; its dropout
and stochastic-depth masks come from the step's key folded with the device
index.

With gradient accumulation, a replica is a device's share of one
micro-batch, so training at batch B on D devices with k micro-batches
perturbs with the same m-sharpness as D x k devices without accumulation.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nfnets import optim
from nfnets.train import gradients as gradients_lib
from nfnets.train import mesh as mesh_lib


def make_sam_gradients(
  pass_fn: gradients_lib.PassFn,
  *,
  opt_config,
  grad_accum_steps: int,
  mesh=None,
):
  """`(params, model_state, batch, hyperparams, rng) -> Gradients` with SAM.

  `grads` is the gradient that updates the weights (taken at the ascent
  point); the other fields follow the module's rule.

  Args:
    pass_fn: the pass over some rows (`gradients.make_pass`).
    opt_config: `config.optimizer` with `sam_rho > 0`; reads
      `sam_ascent_fraction` and `sam_ascent_sync` (defaults 1 and True).
    grad_accum_steps: micro-batches per step.
    mesh: the `('data',)` mesh the step runs on: its devices hold the
      replicas (default: `mesh.make_mesh()`, every device).
  """
  fraction = opt_config.get('sam_ascent_fraction', 1.0)
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  if not opt_config.get('sam_ascent_sync', True):
    return _per_replica(pass_fn, fraction, grad_accum_steps, mesh)
  num_devices = mesh.devices.size
  whole = gradients_lib.make_gradients(
    pass_fn, grad_accum_steps=grad_accum_steps, num_devices=num_devices
  )
  if fraction == 1:
    return _whole_batch_ascent(whole)
  return _subset_ascent(whole, fraction, grad_accum_steps, num_devices)


def ascent_rows(rows: int, fraction: float) -> int:
  """How many of a replica's `rows` take the ascent step (nearest, >= 1)."""
  return max(1, min(rows, int(fraction * rows + 0.5)))


def _whole_batch_ascent(whole):
  """Ascent on every row, averaged over the devices (SAM's plain form)."""

  def sam_gradients(params, model_state, batch, hyperparams, rng):
    out = whole(params, model_state, batch, hyperparams, rng)
    perturbed = optim.sam_perturb(params, out.grads, hyperparams['sam_rho'])
    descent = whole(perturbed, model_state, batch, hyperparams, rng)
    return out._replace(grads=descent.grads)

  return sam_gradients


def _subset_ascent(whole, fraction, grad_accum_steps, num_devices):
  """Ascent on the first rows of every replica, averaged over them all."""

  def sam_gradients(params, model_state, batch, hyperparams, rng):
    subset = _first_rows_of_replicas(
      batch, fraction, grad_accum_steps, num_devices
    )
    ascent = whole(params, model_state, subset, hyperparams, rng)
    perturbed = optim.sam_perturb(params, ascent.grads, hyperparams['sam_rho'])
    return whole(perturbed, model_state, batch, hyperparams, rng)

  return sam_gradients


def _first_rows_of_replicas(batch, fraction, grad_accum_steps, num_devices):
  """The ascent rows of every replica, laid out as a batch of their own.

  The B rows are viewed as `[devices, k, m]` as `split_micro_batches` does;
  each replica keeps its first r rows, so the result's `[devices, k, r]`
  rows split into the same replicas again, and no row changes device.
  """
  k = grad_accum_steps
  size = gradients_lib.batch_size(batch)
  gradients_lib.check_grad_accum(size, k, num_devices)
  m = size // (num_devices * k)
  r = ascent_rows(m, fraction)

  def take(x):
    x = x.reshape((num_devices, k, m) + x.shape[1:])[:, :, :r]
    return x.reshape((num_devices * k * r,) + x.shape[3:])

  return jax.tree.map(take, batch)


def _per_replica(pass_fn, fraction, grad_accum_steps, mesh):
  """Each replica perturbs with its own ascent gradient (`shard_map`)."""

  def replica_pass(params, model_state, rows, hyperparams, rng):
    r = ascent_rows(gradients_lib.batch_size(rows), fraction)
    first = jax.tree.map(lambda x: x[:r], rows)
    grads = pass_fn(params, model_state, first, hyperparams, rng)[3]
    perturbed = optim.sam_perturb(params, grads, hyperparams['sam_rho'])
    return pass_fn(perturbed, model_state, rows, hyperparams, rng)

  def local(params, model_state, batch, hyperparams, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(mesh_lib.DATA_AXIS))
    out = gradients_lib.accumulate(
      replica_pass, params, model_state, batch, hyperparams, rng,
      grad_accum_steps=grad_accum_steps, num_groups=1,
    )  # fmt: skip
    mean = _device_mean
    return gradients_lib.Gradients(
      loss=mean(out.loss),
      top1=mean(out.top1),
      top5=mean(out.top5),
      grads=jax.tree.map(mean, out.grads),
      model_state=jax.tree.map(_float_mean, out.model_state),
    )

  replicated, rows = P(), P(mesh_lib.DATA_AXIS)
  # Not checked for replication: the perturbed weights differ by device by
  # design, and every output is a mean over the devices.
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(replicated, replicated, rows, replicated, replicated),
    out_specs=replicated,
    check_vma=False,
  )


def _device_mean(x):
  """The mean over the devices (equal row counts: the global batch's)."""
  return jax.lax.pmean(x, mesh_lib.DATA_AXIS)


def _float_mean(x):
  """Float state leaves averaged over the devices; counters are equal."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    return _device_mean(x)
  return x
