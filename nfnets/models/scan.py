"""Runs of identical residual blocks as one `hk.scan` over their weights.

XLA compiles a scanned run's block body once instead of once per block,
which halves a deep NFNet's train-step compile on CPU (for more memory and
a slower step). The weights keep their per-block Haiku names, so the
parameters and checkpoints are those of the unrolled network: they are
stacked at apply time, and a custom getter hands the run's first block
(the template) the slice of the current iteration. What differs between
the blocks of a run, `beta` and the stochastic-depth rate, is scanned too
and passed to the template's call, together with `in_loop=True` so that
its convs take gradients that stay fast inside a loop body.

Blocks are expected to have a `spec` (`common.BlockSpec`), a `stoch_depth`
(a `layers.StochDepth` or None) and a Haiku `module_name`.
"""

from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import common


def scan_signature(block) -> tuple | None:
  """What must agree for blocks to share one scanned body (None: never)."""
  spec = block.spec
  if spec.use_projection:  # Transition blocks: each one is different.
    return None
  return (spec.in_ch, spec.out_ch, spec.width, spec.groups,
          block.stoch_depth is None)  # fmt: skip


def identical_runs(blocks: Sequence) -> list[list]:
  """Splits `blocks` into maximal runs of consecutive scannable blocks."""
  runs = []
  for block in blocks:
    sig = scan_signature(block)
    if runs and sig is not None and sig == scan_signature(runs[-1][-1]):
      runs[-1].append(block)
    else:
      runs.append([block])
  return runs


def stack_block_params(params, prefixes: Sequence[str]) -> dict:
  """`{relative/param name: stacked array}` of the blocks named `prefixes`."""
  per_block = []
  for prefix in prefixes:
    leaves = {}
    for module, values in params.items():
      if module == prefix or module.startswith(prefix + '/'):
        for name, value in values.items():
          leaves[f'{module[len(prefix) :]}/{name}'] = value
    per_block.append(leaves)
  return {k: jnp.stack([b[k] for b in per_block]) for k in per_block[0]}


def _drop_rate(block) -> float:
  return 0.0 if block.stoch_depth is None else block.stoch_depth.drop_rate


def scan_run(
  run: Sequence, params, x: jax.Array, apply_block: Callable
) -> jax.Array:
  """Applies `run[0]` once per block of `run`, with each block's weights.

  Stochastic depth draws from the scan's split RNG keys, so its masks
  differ from the unrolled network's.

  Args:
    run: consecutive blocks with equal `scan_signature`s.
    params: the network's parameters (`hk.get_params()`).
    x: the run's input.
    apply_block: `(block, x, *, beta, drop_rate, in_loop) -> (output,
      res_avg_var)`.

  Returns:
    The last block's output.
  """
  template = run[0]
  stacked = stack_block_params(params, [b.module_name for b in run])
  betas = jnp.asarray([b.spec.beta for b in run], x.dtype)
  rates = jnp.asarray([_drop_rate(b) for b in run], jnp.float32)
  prefix_len = len(template.module_name)

  def body(carry, xs):
    weights, beta, rate = xs

    def getter(next_getter, value, context):
      del next_getter, value
      return weights[context.full_name[prefix_len:]]

    with hk.custom_getter(getter):
      out, _ = apply_block(
        template, carry, beta=beta, drop_rate=rate, in_loop=True
      )
    return out, None

  out, _ = hk.scan(body, x, (stacked, betas, rates))
  return out


def apply_scanned(
  blocks: Sequence,
  x: jax.Array,
  apply_block: Callable,
  *,
  outputs: dict | None = None,
  ends: Sequence[int] = (),
) -> jax.Array:
  """All blocks, each run of identical blocks under one scan.

  A run's intermediate outputs stay inside its scan, so a stage output
  (`ends`) can only be recorded where a run ends. Runs never cross a stage
  boundary in this package's families (every later stage starts with a
  strided, hence projection, block, which no run joins), so the check
  below only guards other block layouts.

  Args:
    blocks: the network's blocks, in order.
    x: the first block's input.
    apply_block: as in `scan_run`; single blocks are called with
      `(block, x)` alone.
    outputs: the network's outputs dict, for the stage outputs.
    ends: `common.stage_ends(...)` to record each stage's output in
      `outputs['features']` (`common.record_feature`), () for none.

  Returns:
    The last block's output.

  Raises:
    ValueError: a stage ends inside a run of scanned blocks.
  """
  params = hk.get_params()
  last = -1
  for run in identical_runs(blocks):
    first, last = last + 1, last + len(run)
    if any(first <= end < last for end in ends):
      raise ValueError(
        'A stage ends inside a run of scanned blocks, so its feature map '
        'is not available: call with return_features=False or build the '
        'model with scan_blocks=False.'
      )
    if len(run) == 1:
      x, _ = apply_block(run[0], x)
    else:
      x = scan_run(run, params, x, apply_block)
    if ends:
      common.record_feature(outputs, ends, last, x)
  return x
