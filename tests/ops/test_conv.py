"""Tests for nfnets.ops: the grouped-conv forms agree, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import ops


def np_same_pads(size, k, s):
  """TF/XLA 'SAME' padding: output ceil(size / s), extra pad after."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


@pytest.mark.parametrize('stride', [1, 2])
def test_split_and_native_grouped_conv_agree_with_gradients(stride):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 12))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 6))

  def loss(x, w, mode):
    y = ops.grouped_conv2d(
      x, w, stride=(stride, stride), padding='SAME', groups=3, mode=mode
    )
    return jnp.sum(jnp.sin(y))

  outs = {}
  for mode in ('split', 'native'):
    grad_fn = jax.value_and_grad(loss, argnums=(0, 1))
    outs[mode] = jax.jit(grad_fn, static_argnums=2)(x, w, mode)
  (v_s, (gx_s, gw_s)), (v_n, (gx_n, gw_n)) = outs['split'], outs['native']
  np.testing.assert_allclose(v_s, v_n, rtol=1e-5)
  np.testing.assert_allclose(gx_s, gx_n, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw_s, gw_n, rtol=1e-4, atol=1e-5)


def test_grouped_conv_auto_uses_split_on_cpu():
  assert jax.default_backend() == 'cpu'  # conftest pins the CPU.
  assert ops.resolve_grouped_conv('auto') == 'split'
  assert ops.resolve_grouped_conv('native') == 'native'


# --- im2col kernel gradient of the split (XLA:CPU) implementation ----------


def np_conv_kernel_grad(x, dy, kernel, stride, pads, groups):
  """dL/dw of a grouped conv for output cotangent dy, float64 loops."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  dy = np.asarray(dy, np.float64)
  (kh, kw), (sh, sw) = kernel, stride
  _, oh, ow, cout = dy.shape
  cin_g, cout_g = x.shape[-1] // groups, cout // groups
  dw = np.zeros((kh, kw, cin_g, cout))
  for g in range(groups):
    xg = x[..., g * cin_g : (g + 1) * cin_g]
    dyg = dy[..., g * cout_g : (g + 1) * cout_g]
    for i in range(kh):
      for j in range(kw):
        patch = xg[:, i : i + oh * sh : sh, j : j + ow * sw : sw]
        dw[i, j, :, g * cout_g : (g + 1) * cout_g] = np.einsum(
          'nhwc,nhwd->cd', patch, dyg
        )
  return dw


# Output maps of >= 16x16 positions take the im2col kernel gradient.
IM2COL_CASES = [
  # (H, W, cin, cout, kernel, stride, groups, padding)
  (16, 16, 3, 8, 3, 1, 1, 'SAME'),  # Exactly the threshold; stem-like cin.
  (34, 32, 4, 6, 3, 2, 2, 'SAME'),  # Even input, stride 2, 2 groups.
  (18, 17, 4, 4, 3, 1, 1, ((2, 0), (1, 1))),  # Explicit, asymmetric.
]


@pytest.mark.parametrize('case', IM2COL_CASES)
def test_split_conv_kernel_grad_matches_numpy(case):
  h, w, cin, cout, k, s, groups, padding = case
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, h, w, cin)).astype(np.float32)
  wt = rng.normal(size=(k, k, cin // groups, cout)).astype(np.float32)
  conv = lambda x, wt, mode: ops.grouped_conv2d(
    x, wt, stride=(s, s), padding=padding, groups=groups, mode=mode
  )
  y, vjp = jax.vjp(lambda x, wt: conv(x, wt, 'split'), x, wt)
  assert y.shape[1] * y.shape[2] >= ops.IM2COL_GRAD_MIN_POSITIONS
  dy = rng.normal(size=y.shape).astype(np.float32)
  dx, dw = vjp(jnp.asarray(dy))
  if padding == 'SAME':
    pads = (np_same_pads(h, k, s), np_same_pads(w, k, s))
  else:
    pads = padding
  want = np_conv_kernel_grad(x, dy, (k, k), (s, s), pads, groups)
  np.testing.assert_allclose(dw, want, rtol=1e-4, atol=1e-3)
  # The explicit input gradient must match XLA's own (the native conv's).
  _, vjp_native = jax.vjp(lambda x: conv(x, wt, 'native'), x)
  np.testing.assert_allclose(dx, vjp_native(dy)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('in_loop', [False, True])
def test_in_loop_takes_im2col_grad_below_threshold(in_loop):
  """Inside loop bodies every split conv takes the im2col kernel gradient.

  Its kernel gradient is a matmul (`dot_general`) where `jax.vjp`'s is a
  convolution; an 8x8 map is below the threshold outside loops.
  """
  x = jnp.ones((1, 8, 8, 4))
  w = jnp.ones((3, 3, 2, 4))

  def loss(x, w):
    y = ops.grouped_conv2d(
      x, w, stride=(1, 1), padding='SAME', groups=2, mode='split',
      in_loop=in_loop,
    )  # fmt: skip
    return jnp.sum(y)

  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w))
  assert ('dot_general' in jaxpr) == in_loop
