"""Tests for nfnets.ops.gemm_conv: GEMM gradients against independent ones.

The references are `lax.conv_general_dilated` with `jax.vjp` (XLA's own
convolution and its transposes) and float64 NumPy loops; the GEMM forms
must agree to float32 rounding, and with bfloat16 operands to bfloat16
input rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import ops
from nfnets.ops import gemm_conv
from nfnets.ops.im2col import im2col

_DN = ('NHWC', 'HWIO', 'NHWC')

# (H, W, cin, cout, kernel, stride, pads)
CASES = [
  (8, 8, 4, 6, 3, 1, ((1, 1), (1, 1))),  # 'SAME', stride 1.
  (9, 8, 5, 4, 3, 2, ((1, 1), (0, 1))),  # Odd/even input, stride 2.
  (11, 10, 3, 4, 3, 2, ((2, 0), (1, 1))),  # Asymmetric explicit pads.
  (7, 9, 2, 3, 5, 2, ((0, 0), (0, 0))),  # 'VALID', rows left unread.
  (6, 6, 4, 4, 1, 1, ((0, 0), (0, 0))),  # 1x1.
]


def _inputs(case, dtype=np.float32, seed=0):
  h, w, cin, cout, k, _, _ = case
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, h, w, cin)).astype(dtype)
  wt = rng.normal(size=(k, k, cin, cout)).astype(dtype)
  return x, wt


def _lax_conv(x, w, stride, pads):
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), pads, dimension_numbers=_DN
  )


@pytest.mark.parametrize('case', CASES)
def test_conv2d_gemm_and_gradients_match_lax_conv_float32(case):
  *_, s, pads = case
  x, wt = _inputs(case)
  y, vjp = jax.vjp(
    lambda x, w: gemm_conv.conv2d_gemm(x, w, (s, s), pads), x, wt
  )
  y_ref, vjp_ref = jax.vjp(lambda x, w: _lax_conv(x, w, s, pads), x, wt)
  dy = np.random.default_rng(1).normal(size=y.shape).astype(np.float32)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _np_conv_f64(x, w, stride, pads):
  """Forward conv in float64 loops, the independent reference."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  w = np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      tap = x[:, i : i + ho * stride : stride, j : j + wo * stride : stride]
      y += np.einsum('nhwc,co->nhwo', tap[:, :ho, :wo], w[i, j])
  return y


@pytest.mark.parametrize('case', CASES[:3])
def test_conv2d_gemm_bfloat16_within_input_rounding(case):
  """bf16 operands, float32 accumulation: one rounding, of the result.

  The references take the same bfloat16-rounded inputs in float64/float32,
  so the only error left is the final rounding to bfloat16 (at most 2^-9
  relative); the tolerance is rtol 2^-8 plus 0.1% of the output's scale
  for the float32 sums' own rounding near zero.
  """
  *_, s, pads = case
  x, wt = _inputs(case)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(wt, jnp.bfloat16)
  y, vjp = jax.vjp(
    lambda x, w: gemm_conv.conv2d_gemm(x, w, (s, s), pads), xb, wb
  )
  assert y.dtype == jnp.bfloat16
  want = _np_conv_f64(xb.astype(np.float32), wb.astype(np.float32), s, pads)
  scale = np.abs(want).max()
  np.testing.assert_allclose(np.float32(y), want, rtol=2**-8, atol=1e-3 * scale)
  # Gradients: against float32 XLA gradients of the same rounded inputs.
  dy = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.bfloat16)
  _, vjp_ref = jax.vjp(
    lambda x, w: _lax_conv(x, w, s, pads),
    xb.astype(jnp.float32), wb.astype(jnp.float32),
  )  # fmt: skip
  for got, ref in zip(vjp(dy), vjp_ref(dy.astype(jnp.float32)), strict=True):
    assert got.dtype == jnp.bfloat16
    ref = np.asarray(ref)
    np.testing.assert_allclose(
      np.float32(got), ref, rtol=2**-8, atol=1e-3 * np.abs(ref).max()
    )


def test_col2im_is_the_adjoint_of_im2col():
  """<im2col(x), p> == <x, col2im(p)> for any x and p (stride 2, pads)."""
  rng = np.random.default_rng(2)
  shape, kernel, stride, pads = (2, 9, 8, 3), (3, 3), (2, 2), ((1, 1), (0, 1))
  out_hw = (5, 4)
  x = rng.normal(size=shape).astype(np.float32)
  p = rng.normal(size=(2 * 5 * 4, 9 * 3)).astype(np.float32)
  patches = np.asarray(im2col(jnp.asarray(x), kernel, stride, pads, out_hw))
  dx = np.asarray(gemm_conv.col2im(p, shape, kernel, stride, pads, out_hw))
  lhs = np.vdot(patches.astype(np.float64), p)
  rhs = np.vdot(x.astype(np.float64), dx)
  np.testing.assert_allclose(lhs, rhs, rtol=1e-6)


def test_matmul_f32acc_gradients_match_numpy():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
  b = rng.normal(size=(7, 4)).astype(np.float32)
  g = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  y, vjp = jax.vjp(ops.matmul_f32acc, a, b)
  da, db = vjp(g)
  np.testing.assert_allclose(y, a @ b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(da, g @ b.T, rtol=1e-5, atol=1e-5)
  want_db = np.einsum('abck,abcn->kn', a.astype(np.float64), g)
  np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-4)


def test_bfloat16_gradients_run_as_float32_accumulated_dots(monkeypatch):
  """With the GEMM plan a bf16 conv's backward pass has no convolution.

  Every product of the backward pass is a `dot_general` of bfloat16
  operands with a float32 result: the form XLA:CPU sends to the AMX units.
  """
  monkeypatch.setenv(ops.CPU_CONV_ENV, 'gemm')
  x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
  w = jnp.ones((3, 3, 2, 4), jnp.bfloat16)

  def loss(x, w):
    y = ops.grouped_conv2d(
      x, w, stride=(1, 1), padding='SAME', groups=2, mode='split'
    )
    return jnp.sum(y.astype(jnp.float32))

  _, vjp = jax.vjp(loss, x, w)
  jaxpr = jax.make_jaxpr(vjp)(jnp.float32(1.0))
  eqns = [e for e in jaxpr.eqns]
  names = str(jaxpr)
  assert 'conv_general_dilated' not in names
  dots = [e for e in _all_eqns(eqns) if e.primitive.name == 'dot_general']
  assert len(dots) == 4  # dx and dw of each of the two groups.
  for dot in dots:
    assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16] * 2
    assert dot.outvars[0].aval.dtype == jnp.float32


def _all_eqns(eqns):
  """Equations of a jaxpr, those of nested jaxprs (pjit, custom_vjp) too."""
  for eqn in eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, 'jaxpr', None)
      inner = getattr(inner, 'jaxpr', inner)
      if inner is not None and hasattr(inner, 'eqns'):
        yield from _all_eqns(inner.eqns)


@pytest.mark.parametrize('stride,groups', [(1, 2), (2, 3), (2, 1)])
def test_gemm_plan_grouped_conv_matches_native(stride, groups, monkeypatch):
  """'split' with every conv a GEMM (the AMX bf16 plan) equals 'native'."""
  monkeypatch.setenv(ops.CPU_CONV_ENV, 'gemm')
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 6))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 6 // groups, 6))

  def loss(x, w, mode):
    y = ops.grouped_conv2d(
      x, w, stride=(stride, stride), padding='SAME', groups=groups, mode=mode
    )
    return jnp.sum(jnp.sin(y))

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  (v_g, (gx_g, gw_g)), (v_n, (gx_n, gw_n)) = [
    grad_fn(x, w, mode) for mode in ('split', 'native')
  ]
  np.testing.assert_allclose(v_g, v_n, rtol=1e-5)
  np.testing.assert_allclose(gx_g, gx_n, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw_g, gw_n, rtol=1e-4, atol=1e-5)
