"""Tests for nfnets.models.conv.Conv2D against Haiku's own hk.Conv2D."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.models import conv

CASES = [
  dict(output_channels=6, kernel_shape=3),
  dict(output_channels=6, kernel_shape=3, stride=2),
  dict(output_channels=6, kernel_shape=1, stride=2),
  dict(output_channels=6, kernel_shape=1, with_bias=False),
  dict(output_channels=6, kernel_shape=7, stride=2, with_bias=False),
  dict(output_channels=6, kernel_shape=3, feature_group_count=2),
  dict(output_channels=6, kernel_shape=3, rate=2),
  dict(output_channels=6, kernel_shape=3, padding=((1, 2), (0, 1))),
]


def _loss_and_grads(module_cls, kwargs, x):
  def loss(x):
    y = module_cls(**kwargs)(x)
    return jnp.sum(jnp.sin(y)), y

  f = hk.transform(loss)
  params = f.init(jax.random.PRNGKey(3), x)
  (value, y), grads = jax.jit(
    jax.value_and_grad(
      lambda p, x: f.apply(p, None, x), argnums=(0, 1), has_aux=True
    )
  )(params, x)
  return params, y, grads


@pytest.mark.parametrize('mode', ['split', 'native'])
@pytest.mark.parametrize('kwargs', CASES)
def test_conv2d_matches_haiku_conv2d(kwargs, mode):
  x = np.random.default_rng(0).standard_normal((2, 11, 10, 4), np.float32)
  ours_p, ours_y, ours_g = _loss_and_grads(
    lambda **kw: conv.Conv2D(**kw, grouped_conv=mode), kwargs, x
  )
  ref_p, ref_y, ref_g = _loss_and_grads(hk.Conv2D, kwargs, x)
  # Same parameter names, shapes and initial values for the same key.
  assert jax.tree.structure(ours_p) == jax.tree.structure(ref_p)
  for a, b in zip(jax.tree.leaves(ours_p), jax.tree.leaves(ref_p), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ours_y, ref_y, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(ours_g), jax.tree.leaves(ref_g), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_uncovered_forms_fall_back_to_haiku():
  x = np.random.default_rng(1).standard_normal((7, 7, 4), np.float32)
  f = hk.transform(lambda x: conv.Conv2D(5, 3)(x))
  g = hk.transform(lambda x: hk.Conv2D(5, 3)(x))
  params = f.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(
    f.apply(params, None, x), g.apply(params, None, x), rtol=1e-6
  )
