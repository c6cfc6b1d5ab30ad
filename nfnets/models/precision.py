"""Compute-precision policies for the forward and backward pass.

`config.train.compute_dtype` names one of `POLICIES`:

- 'float32': parameters, activations and gradients in float32.
- 'bfloat16': parameters (a bfloat16 copy of the float32 master weights)
  and activations in bfloat16: the fast form on GPUs and TPUs, where
  element-wise work is bound by memory traffic.
- 'bfloat16_convs': everything in float32 except the operands of the
  convolutions (`WSConv2D` in the normalizer-free families,
  `nfnets.models.conv.Conv2D` in the baselines), which are cast to
  bfloat16, with the product returned in float32 (what `torch.autocast`
  does for convolutions). On CPUs with AMX tiles or `avx512_bf16` the
  convolutions' GEMMs reach the bfloat16 units, while XLA:CPU's
  element-wise loops and reductions, 2-4x slower in
  bfloat16 than in float32 there, stay in float32 (docs/performance.md).
"""

import contextlib
from collections.abc import Iterator

import haiku as hk
import jax.numpy as jnp

from nfnets.models import conv, layers

# The modules whose `_conv(x, kernel, ...)` the 'bfloat16_convs' policy
# recasts.
_CONV_MODULES = (layers.WSConv2D, conv.Conv2D)

POLICIES = ('float32', 'bfloat16', 'bfloat16_convs')


def check_policy(policy: str) -> None:
  """Raises a ValueError naming the valid policies for an unknown one."""
  if policy not in POLICIES:
    raise ValueError(
      f'Unknown compute dtype {policy!r}; choose one of {list(POLICIES)}.'
    )


def variables_dtype(policy: str) -> jnp.dtype:
  """The dtype the parameters and input images are cast to under `policy`."""
  check_policy(policy)
  return jnp.dtype(jnp.bfloat16 if policy == 'bfloat16' else jnp.float32)


def _bfloat16_conv_operands(next_fun, args, kwargs, context):
  """Runs a conv module's `_conv` on bfloat16 operands, in the input dtype."""
  if isinstance(context.module, _CONV_MODULES) and (
    context.method_name == '_conv'
  ):
    x, kernel, *rest = args
    y = next_fun(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), *rest)
    return y.astype(x.dtype)
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def policy_scope(policy: str) -> Iterator[None]:
  """Within the context, model calls follow `policy`'s convolution casts.

  Wrap the model's apply (inside the traced function, so that every trace
  sees it) with it; the parameters and images are cast separately, to
  `variables_dtype(policy)`. Only 'bfloat16_convs' changes anything here.

  Args:
    policy: one of `POLICIES`.

  Yields:
    Nothing; the interception ends with the context.
  """
  check_policy(policy)
  if policy != 'bfloat16_convs':
    yield
    return
  with hk.intercept_methods(_bfloat16_conv_operands):
    yield
