"""Tests for nfnets.ops.cpu_features: the dispatch from CPU flags."""

import jax
import jax.numpy as jnp
import pytest

from nfnets import ops
from nfnets.ops import cpu_features

# Flag sets of the CPU classes seen (trimmed to what matters).
ZEN3 = {'sse4_2', 'avx', 'avx2', 'fma'}
ZEN4 = ZEN3 | {'avx512f', 'avx512bw', 'avx512_bf16'}
SAPPHIRE_RAPIDS = ZEN4 | {'amx_bf16', 'amx_tile', 'amx_int8'}


NONE = ops.ConvPlan(matmul_1x1=False, gemm_grads=False)
ALL = ops.ConvPlan(matmul_1x1=True, gemm_grads=True)


MATMUL_1X1 = ops.ConvPlan(matmul_1x1=True, gemm_grads=False)


@pytest.mark.parametrize(
  'flags,cls,plan',
  [
    (SAPPHIRE_RAPIDS, 'amx', MATMUL_1X1),
    (ZEN4, 'avx512', MATMUL_1X1),
    (ZEN3, 'avx2', MATMUL_1X1),
    (set(), 'other', NONE),
    ({'amx_bf16'}, 'other', NONE),  # AMX without AVX-512: portable.
  ],
)
def test_cpu_class_and_conv_plan_from_flags(flags, cls, plan, monkeypatch):
  monkeypatch.delenv(ops.CPU_CONV_ENV, raising=False)
  assert cpu_features.cpu_class(flags) == cls
  assert ops.cpu_conv_plan(flags) == plan


@pytest.mark.parametrize(
  'override,plan', [('gemm', ALL), ('gemm_1x1', MATMUL_1X1), ('xla', NONE)]
)
def test_environment_override_beats_flags(override, plan, monkeypatch):
  monkeypatch.setenv(ops.CPU_CONV_ENV, override)
  for flags in (set(), ZEN3, SAPPHIRE_RAPIDS):
    assert ops.cpu_conv_plan(flags) == plan
  monkeypatch.setenv(ops.CPU_CONV_ENV, 'auto')
  assert ops.cpu_conv_plan(set()) == NONE
  assert ops.cpu_conv_plan(ZEN3) == MATMUL_1X1


def test_unknown_override_is_an_error_listing_choices(monkeypatch):
  monkeypatch.setenv(ops.CPU_CONV_ENV, 'onednn')
  with pytest.raises(ValueError, match="'auto', 'gemm', 'gemm_1x1', 'xla'"):
    ops.cpu_conv_plan(ZEN3)


@pytest.mark.parametrize('override', ['gemm', 'xla'])
def test_plan_decides_the_1x1_gradient_form(override, monkeypatch):
  """A 1x1 'split' conv: XLA's dot transposes, or the custom GEMM VJP."""
  monkeypatch.setenv(ops.CPU_CONV_ENV, override)
  x, w = jnp.ones((2, 4, 4, 3)), jnp.ones((1, 1, 3, 5))

  def loss(x, w):
    y = ops.grouped_conv2d(x, w, stride=(1, 1), padding='SAME', mode='split')
    return jnp.sum(y)

  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w))
  assert ('custom_vjp_call' in jaxpr) == (override == 'gemm')


def test_flags_and_model_parsed_from_cpuinfo(tmp_path, monkeypatch):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text(
    'processor\t: 0\nmodel name\t: Test CPU @ 2.0GHz\n'
    'flags\t\t: fpu avx2 avx512f amx_bf16\n\nprocessor\t: 1\n'
    'model name\t: Other\n'
  )
  monkeypatch.setattr(cpu_features, '_CPUINFO', str(cpuinfo))
  monkeypatch.delenv(ops.CPU_CONV_ENV, raising=False)
  cpu_features.cpu_flags.cache_clear()
  cpu_features.cpu_model.cache_clear()
  try:
    assert cpu_features.cpu_flags() == {'fpu', 'avx2', 'avx512f', 'amx_bf16'}
    assert cpu_features.cpu_model() == 'Test CPU @ 2.0GHz'
    summary = ops.cpu_summary()
    assert summary['cpu_flags'] == {
      'avx2': True, 'avx512f': True, 'avx512_bf16': False,
      'amx_bf16': True, 'amx_tile': False,
    }  # fmt: skip
    assert summary['cpu_class'] == 'amx'
    assert summary['cpu_conv'] == {'matmul_1x1': True, 'gemm_grads': False}
  finally:
    cpu_features.cpu_flags.cache_clear()
    cpu_features.cpu_model.cache_clear()


def test_missing_cpuinfo_gives_the_portable_path(tmp_path, monkeypatch):
  monkeypatch.setattr(cpu_features, '_CPUINFO', str(tmp_path / 'absent'))
  monkeypatch.delenv(ops.CPU_CONV_ENV, raising=False)
  cpu_features.cpu_flags.cache_clear()
  try:
    assert cpu_features.cpu_flags() == frozenset()
    assert ops.cpu_conv_plan() == NONE
  finally:
    cpu_features.cpu_flags.cache_clear()


def _dots(jaxpr):
  """The dot_general equations of a jaxpr, nested jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      yield eqn
    for param in eqn.params.values():
      inner = getattr(param, 'jaxpr', param)
      if hasattr(inner, 'eqns'):
        yield from _dots(inner)


@pytest.mark.parametrize(
  'flags,f32_acc', [(SAPPHIRE_RAPIDS, True), (ZEN3, True), (set(), False)]
)
def test_bfloat16_1x1_conv_accumulates_in_float32_on_the_plan(
  flags, f32_acc, monkeypatch
):
  """bf16 1x1 convs take float32-accumulated dots where the plan says so.

  AVX2 and up: every product, forward and backward, is a bf16 x bf16 ->
  float32 dot (the form XLA:CPU sends to the AMX units where there are
  some); the portable path: plain bf16 dots.
  """
  monkeypatch.delenv(ops.CPU_CONV_ENV, raising=False)
  monkeypatch.setattr(cpu_features, 'cpu_flags', lambda: frozenset(flags))
  x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
  w = jnp.ones((1, 1, 8, 16), jnp.bfloat16)

  def loss(x, w):
    y = ops.grouped_conv2d(x, w, stride=(1, 1), padding='SAME', mode='split')
    assert y.dtype == jnp.bfloat16
    return jnp.sum(y.astype(jnp.float32))

  _, vjp = jax.vjp(loss, x, w)
  fwd = list(_dots(jax.make_jaxpr(loss)(x, w).jaxpr))
  bwd = list(_dots(jax.make_jaxpr(vjp)(jnp.float32(1.0)).jaxpr))
  assert len(fwd) == 1 and len(bwd) == 2
  for dot in fwd + bwd:
    assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16] * 2
    out = jnp.float32 if f32_acc else jnp.bfloat16
    assert dot.outvars[0].aval.dtype == out
