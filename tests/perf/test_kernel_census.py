"""Tests for nfnets.perf.kernel_census on programs whose kernels are known.

The probe chains N elementwise fusions of one shape, separated by matmuls
(each its own fusion on XLA:CPU): with one constant everywhere the N
elementwise kernels are identical, with N different constants they are
not, and names (`jax.named_scope`) must not make them differ.
"""

import jax
import jax.numpy as jnp

from nfnets.perf import kernel_census


def _probe(constants, scoped=False):
  def f(x, w):
    for i, c in enumerate(constants):
      with jax.named_scope(f'block{i}' if scoped else 'block'):
        x = jnp.tanh(x * c + jnp.sin(x)) @ w
    return x

  x, w = jnp.ones((16, 16)), jnp.ones((16, 16))
  return kernel_census.census(jax.jit(f).lower(x, w).compile().as_text())


def test_identical_fusions_are_one_kernel():
  same = _probe([1.5] * 4)
  different = _probe([1.5, 1.6, 1.7, 1.8])
  named = _probe([1.5] * 4, scoped=True)
  # 4 elementwise fusions and 4 matmul fusions each time.
  assert same.fusions == different.fusions == named.fusions == 8
  # One elementwise kernel and one matmul kernel, or 4 + 1.
  assert same.distinct_kernels == named.distinct_kernels == 2
  assert different.distinct_kernels == 5


def test_sources_of_a_train_step():
  def loss(params, x):
    return jnp.sum(jnp.tanh(x @ params['w']) ** 2)

  def step(params, x):
    grads = jax.grad(loss)(params, x)
    update = lambda p, g: p - 0.1 * jnp.sqrt(jnp.abs(g)) * g
    return jax.tree.map(update, params, grads)

  args = {'w': jnp.ones((16, 16))}, jnp.ones((8, 16))
  result = kernel_census.census(jax.jit(step).lower(*args).compile().as_text())
  assert set(result.by_source) == {'forward', 'backward', 'other'}
  assert sum(n for n, _ in result.by_source.values()) == result.fusions
  assert 'distinct kernels' in str(result)


def test_canonical_ignores_names_and_metadata_not_constants():
  a = ['%p.1 = f32[4]{0} parameter(0), metadata={op_name="a"}',
       '%c.2 = f32[] constant(2)']  # fmt: skip
  b = ['%x.7 = f32[4]{0} parameter(0), metadata={op_name="b"}',
       '%y.9 = f32[] constant(2)']  # fmt: skip
  c = ['%x.7 = f32[4]{0} parameter(0)', '%y.9 = f32[] constant(3)']
  assert kernel_census.canonical(a) == kernel_census.canonical(b)
  assert kernel_census.canonical(a) != kernel_census.canonical(c)
