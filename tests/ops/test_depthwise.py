"""Tests for nfnets.ops.depthwise: both forms against a NumPy depthwise conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import ops
from nfnets.models import flops


def np_same_pads(size, k, s):
  """TF/XLA 'SAME' padding: output ceil(size / s), extra pad after."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def np_depthwise(x, w, stride):
  """Depthwise 'SAME' conv by explicit loops over taps, in float64."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  k = w.shape[0]
  _, h, wd, c = x.shape
  ph, pw = np_same_pads(h, k, stride), np_same_pads(wd, k, stride)
  xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
  oh, ow = -(-h // stride), -(-wd // stride)
  out = np.zeros((x.shape[0], oh, ow, c))
  for r in range(oh):
    for q in range(ow):
      window = xp[:, r * stride : r * stride + k, q * stride : q * stride + k]
      out[:, r, q] = np.einsum('nijc,ijc->nc', window, w[:, :, 0, :])
  return out


@pytest.mark.parametrize('kernel,stride', [(3, 1), (5, 2), (3, 2)])
def test_shifted_and_native_match_numpy_with_gradients(kernel, stride):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 6))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 1, 6))
  want = np_depthwise(x, w, stride)

  def loss(x, w, mode):
    y = ops.depthwise_conv2d(x, w, stride=(stride, stride), mode=mode)
    return jnp.sum(jnp.sin(y)), y

  grads = {}
  for mode in ('shifted', 'native'):
    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y), grads[mode] = jax.jit(fn, static_argnums=2)(x, w, mode)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  for g_s, g_n in zip(grads['shifted'], grads['native'], strict=True):
    np.testing.assert_allclose(g_s, g_n, rtol=1e-4, atol=1e-5)


def test_modes_checks_and_multiply_adds():
  assert jax.default_backend() == 'cpu'  # conftest pins the CPU.
  assert ops.resolve_depthwise_conv('auto') == 'shifted'
  assert ops.resolve_depthwise_conv('native') == 'native'
  with pytest.raises(ValueError, match='shifted'):
    ops.resolve_depthwise_conv('grouped')
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ValueError, match=r'\(kh, kw, 1, 4\)'):
    ops.depthwise_conv2d(x, jnp.zeros((3, 3, 4, 4)))
  # Both forms count k * k multiply-adds per output: 3 * 4 * 4 * 4 * 25.
  w = jnp.zeros((5, 5, 1, 4))
  for mode in ('shifted', 'native'):
    fn = lambda x, w, m=mode: ops.depthwise_conv2d(x, w, stride=(2, 2), mode=m)
    assert flops.count_model_flops(fn, jnp.zeros((3, 8, 8, 4)), w) == (
      3 * 4 * 4 * 4 * 25
    )
