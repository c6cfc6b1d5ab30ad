"""Tests for nfnets.perf.op_profile: kernel kinds, their work and time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nfnets.perf import op_profile

N, H, W, CIN, COUT = 2, 8, 8, 8, 12


def _conv(x, w, groups=1):
  return lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )  # fmt: skip


def _table(fn, *args):
  return op_profile.classify(jax.jit(fn).lower(*args).compile().as_text())


def _macs_by_kind(table):
  """Multiply-adds summed by kind, for the kinds that do any."""
  totals = {}
  for info in table.values():
    if info.macs:
      totals[info.kind] = totals.get(info.kind, 0) + info.macs
  return totals


def _inputs(k, cin_per_group, cout):
  x = jnp.ones((N, H, W, CIN), jnp.float32)
  w = jnp.full((k, k, cin_per_group, cout), 0.01, jnp.float32)
  return x, w


@pytest.mark.parametrize('k, kind', [(3, 'conv 3x3'), (5, 'conv kxk')])
def test_forward_conv_kind_and_macs_by_hand(k, kind):
  x, w = _inputs(k, CIN, COUT)
  macs = _macs_by_kind(_table(_conv, x, w))
  assert macs == {kind: N * H * W * COUT * k * k * CIN}


def test_backward_convs_each_do_the_forward_work():
  """dx and dw of a dense conv are convolutions with the forward's MACs."""
  x, w = _inputs(3, CIN, COUT)
  loss = lambda x, w: jnp.sum(_conv(x, w) ** 2)  # noqa: E731
  macs = _macs_by_kind(_table(jax.grad(loss, argnums=(0, 1)), x, w))
  assert macs['conv 3x3'] == 3 * N * H * W * COUT * 9 * CIN


def test_grouped_and_depthwise_are_told_apart():
  x, w = _inputs(3, CIN // 4, COUT)
  grouped = _macs_by_kind(_table(lambda x, w: _conv(x, w, 4), x, w))
  assert grouped == {'conv grouped': N * H * W * COUT * 9 * CIN // 4}
  x, w = _inputs(3, 1, CIN)
  depthwise = _macs_by_kind(_table(lambda x, w: _conv(x, w, CIN), x, w))
  assert depthwise == {'conv depthwise': N * H * W * CIN * 9}


def test_matmul_is_a_gemm_with_its_macs():
  a, b = jnp.ones((16, 32)), jnp.ones((32, 24))
  macs = _macs_by_kind(_table(jnp.matmul, a, b))
  assert macs == {'GEMM': 16 * 32 * 24}


def test_elementwise_and_reductions_have_no_macs():
  x = jnp.ones((64, 64))
  table = _table(lambda x: jnp.sum(jnp.tanh(x) * 3.0, axis=0), x)
  kinds = {info.kind for info in table.values()}
  assert kinds <= {'reduction', 'element-wise', 'data movement'}
  assert 'reduction' in kinds
  assert all(info.macs == 0 for info in table.values())


def test_summarize_by_hand():
  table = {
    'a': op_profile.OpInfo('conv 3x3', 1e9),
    'b': op_profile.OpInfo('element-wise', 0.0),
  }
  events = [
    {'ph': 'X', 'name': 'a', 'dur': 4000.0},  # 4 ms, 2 GFLOP: 500 GFLOP/s.
    {'ph': 'X', 'name': 'b', 'dur': 1000.0},
    {'ph': 'X', 'name': 'a', 'dur': 4000.0},
    {'ph': 'X', 'name': 'b', 'dur': 1000.0},
    {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 9e9},  # Not a kernel.
    {'ph': 'X', 'name': 'fusion_x', 'dur': 50.0, 'args': {'hlo_op': 'b'}},
  ]
  rows = {r.kind: r for r in op_profile.summarize(events, table, steps=2)}
  assert rows['conv 3x3'].ms == pytest.approx(4.0)
  assert rows['conv 3x3'].gflop_per_s == pytest.approx(500.0)
  assert rows['conv 3x3'].count == 1
  assert rows['element-wise'].ms == pytest.approx(1.025)
  assert rows['conv 3x3'].share == pytest.approx(8000 / 10050)


def test_profile_times_the_kernels_that_ran():
  x, w = _inputs(3, CIN, COUT)
  loss = jax.grad(lambda x, w: jnp.sum(jax.nn.gelu(_conv(x, w)) ** 2), 1)
  compiled = jax.jit(loss).lower(x, w).compile()
  rows = op_profile.profile(lambda: compiled(x, w), compiled.as_text(), steps=2)
  by_kind = {r.kind: r for r in rows}
  convs = [
    i for i in op_profile.classify(compiled.as_text()).values()
    if i.kind == 'conv 3x3'
  ]  # fmt: skip
  assert by_kind['conv 3x3'].count == len(convs) == 2  # Forward and dw.
  assert by_kind['conv 3x3'].ms > 0
  assert sum(r.share for r in rows) == pytest.approx(1.0)
  assert np.isfinite(by_kind['conv 3x3'].gflop_per_s)
  text = op_profile.format_breakdown(rows)
  assert text.splitlines()[0].startswith('| kind | ms/step')


def test_shifted_depthwise_is_told_from_element_wise_work():
  from nfnets.ops import depthwise  # noqa: PLC0415

  x = jnp.ones((N, H, W, CIN))
  w = jnp.full((3, 3, 1, CIN), 0.1)
  conv = lambda x, w: depthwise.depthwise_conv2d(x, w, mode='shifted')  # noqa: E731
  table = _table(lambda x, w: jax.nn.relu(conv(x, w)) * 2.0 + 1.0, x, w)
  kinds = {info.kind for info in table.values()}
  assert 'conv depthwise' in kinds
  assert not any(k.startswith('conv') and k != 'conv depthwise' for k in kinds)
