"""Tests for the compute-precision policies (nfnets.models.precision)."""

import haiku as hk
import jax
import jax.extend.core
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nfnets import models
from nfnets.models import layers, precision
from tests.models.test_layers import np_conv, np_same_pads, np_standardize


def _bf16(a):
  """Rounds to bfloat16 (round to nearest even) and back, in float64."""
  return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize('kernel,groups', [(3, 1), (1, 1), (3, 2)])
def test_bfloat16_convs_conv_matches_numpy_on_rounded_operands(kernel, groups):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 9, 8)).astype(np.float32)

  def fwd(x):
    with precision.policy_scope('bfloat16_convs'):
      return layers.WSConv2D(6, kernel, feature_group_count=groups)(x)

  f = hk.transform(fwd)
  params = f.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(
    lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32),
    params,
  )
  got = jax.jit(f.apply)(params, None, x)
  assert got.dtype == jnp.float32

  p = params['ws_conv2_d']
  w_hat = np_standardize(p['w'], p['gain'])
  pads = [np_same_pads(9, kernel, 1)] * 2
  # The policy's product: bfloat16 operands, float32 accumulation, one
  # bfloat16 rounding of the result, float32 bias.
  exact = np_conv(_bf16(x), _bf16(w_hat), (1, 1), pads, groups)
  want = _bf16(exact) + p['bias']
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
  # ...and it is not the float32 conv: the bfloat16 rounding is visible.
  full = np_conv(x, w_hat, (1, 1), pads, groups) + p['bias']
  assert np.max(np.abs(np.asarray(got) - full)) > 1e-4


def _tiny_nfnet():
  config = models.default_config()
  config.kwargs.width = 0.0625
  config.kwargs.group_size = 64
  config.kwargs.use_two_convs = False
  return models.make_model(config, num_classes=10)


def _primitive_dtypes(policy):
  """{primitive name: set of operand dtypes} of a tiny NFNet's forward."""
  model = _tiny_nfnet()
  x = jnp.zeros((2, 32, 32, 3))
  params, state = model.init(jax.random.PRNGKey(0), x, True)

  def forward(params, x):
    with precision.policy_scope(policy):
      return model.apply(params, state, None, x, False)[0]['logits']

  jaxpr = jax.make_jaxpr(forward)(params, x)
  seen = {}

  def visit(jpr):
    for eqn in jpr.eqns:
      dtypes = {str(v.aval.dtype) for v in eqn.invars if hasattr(v, 'aval')}
      seen.setdefault(eqn.primitive.name, set()).update(dtypes)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return seen


def test_bfloat16_convs_casts_only_conv_operands():
  seen = _primitive_dtypes('bfloat16_convs')
  assert 'bfloat16' in seen['conv_general_dilated']
  # Element-wise work (the activations, skip connections, WS statistics)
  # stays float32.
  for name in ('tanh', 'erf', 'logistic', 'rsqrt', 'mul', 'add'):
    if name in seen:
      assert seen[name] <= {'float32', 'int32'}, (name, seen[name])
  assert 'bfloat16' not in str(_primitive_dtypes('float32'))


def test_unknown_policy_is_refused_with_the_valid_names():
  with pytest.raises(ValueError, match='bfloat16_convs'):
    precision.variables_dtype('float16')
  assert precision.variables_dtype('bfloat16') == jnp.bfloat16
  assert precision.variables_dtype('bfloat16_convs') == jnp.float32
