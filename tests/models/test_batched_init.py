"""Batched initialisation draws Haiku's distributions with fewer samplers."""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nfnets import models
from nfnets.models import batched_init

INITS = [
  hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal'),
  hk.initializers.VarianceScaling(2.0, 'fan_in', 'truncated_normal'),
  hk.initializers.VarianceScaling(1.0, 'fan_out', 'uniform'),
  hk.initializers.VarianceScaling(0.5, 'fan_avg', 'truncated_normal'),
  hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal', fan_in_axes=(0,)),
  hk.initializers.RandomNormal(0.01, 0.5),
  hk.initializers.TruncatedNormal(0.2, -1.0, lower=-1.5, upper=3.0),
  hk.initializers.RandomUniform(-0.3, 0.7),
]
SHAPES = [(7,), (5, 9), (3, 3, 4, 6), (1, 1, 16, 8)]


@pytest.mark.parametrize('init', INITS, ids=lambda i: type(i).__name__)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_sampler_reproduces_haiku_with_the_same_key(init, shape):
  """loc + scale * standard draw == Haiku's initialiser, key for key."""
  rng = jax.random.PRNGKey(3)
  expected = hk.transform(lambda: init(shape, jnp.float32)).apply({}, rng)
  sampler = batched_init.sampler_of(init, shape)

  def ours():
    flat = batched_init.draw(sampler.stream, hk.next_rng_key(), np.prod(shape))
    return (sampler.loc + sampler.scale * flat).reshape(shape)

  got = hk.transform(ours).apply({}, rng)
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)


def test_fans_follow_haiku_convention_by_hand():
  assert batched_init.compute_fans(()) == (1, 1)
  assert batched_init.compute_fans((7,)) == (7, 7)
  assert batched_init.compute_fans((5, 9)) == (5, 9)
  assert batched_init.compute_fans((3, 3, 4, 6)) == (36, 54)
  assert batched_init.compute_fans((2, 3, 4), fan_in_axes=(0, 2)) == (8, 3)


def test_unknown_or_traced_initialisers_are_left_to_haiku():
  assert batched_init.sampler_of(jnp.zeros, (3,)) is None
  assert batched_init.sampler_of(hk.initializers.Constant(2.0), (3,)) is None
  assert batched_init.sampler_of(hk.initializers.Orthogonal(), (4, 4)) is None
  traced = hk.initializers.RandomNormal(jnp.ones(()))
  assert batched_init.sampler_of(traced, (3,)) is None


# A tiny NFNet-F0 without dropout or stochastic depth.
TINY = dict(width=0.0625, group_size=8, stochdepth_rate=0.0, drop_rate=0.0)


def _forward(depth=(1, 1, 1, 1)):
  """The tiny NFNet's forward pass, for either transform."""
  kwargs = models.nfnet_kwargs(depth=depth, **TINY)

  def forward(images, is_training):
    net = models.get_constructor('NFNet')(num_classes=10, **kwargs)
    return net(images, is_training)

  return forward


def _init(transformed, *seeds):
  """`transformed.init` jitted once, at each seed (default 0)."""
  images = jnp.zeros((1, 32, 32, 3))
  init = jax.jit(lambda r: transformed.init(r, images, True))
  results = [init(jax.random.PRNGKey(seed)) for seed in seeds or (0,)]
  return results if len(seeds) > 1 else results[0]


def _leaves(params):
  return {
    jax.tree_util.keystr(path): np.asarray(value)
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]
  }


@pytest.fixture(scope='module')
def haiku_init():
  """The tiny NFNet's (params, state) from Haiku's own init, seed 0."""
  return _init(hk.transform_with_state(_forward()))


def test_nfnet_params_match_haiku_in_structure_constants_and_scale(
  haiku_init,
):
  params, state = _init(batched_init.transform_with_state(_forward()))
  ref_params, ref_state = haiku_init
  assert state == ref_state == {}
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  ref = _leaves(ref_params)
  random_kernels = 0
  for name, value in _leaves(params).items():
    expected = ref[name]
    assert value.shape == expected.shape and value.dtype == expected.dtype
    if np.all(expected == expected.flat[0]):  # Gains, biases, skip gains.
      np.testing.assert_array_equal(value, expected)
      continue
    assert not np.array_equal(value, expected)  # Another random stream...
    if value.ndim == 4:  # ...with the WSConv2D kernels' N(0, 1 / fan_in).
      random_kernels += 1
      z = value * np.sqrt(np.prod(value.shape[:-1]))
      assert abs(np.mean(z)) < 5 / np.sqrt(z.size), name
      assert abs(np.std(z) - 1) < 5 / np.sqrt(z.size), name
  assert random_kernels >= 10
  # Every parameter gets its own slice of the stream.
  heads = [tuple(v.ravel()[:4]) for v in _leaves(params).values() if v.size > 4]
  heads = [h for h in heads if len(set(h)) > 1]
  assert len(set(heads)) == len(heads) >= random_kernels


def _model_config(**extra):
  kwargs = models.nfnet_kwargs(depth=(1, 1, 1, 1), **TINY)
  return ml_collections.ConfigDict(dict(name='NFNet', kwargs=kwargs, **extra))


def test_make_model_init_is_batched_and_deterministic_per_seed():
  model = models.make_model(_model_config(), num_classes=10)
  batched = batched_init.transform_with_state(_forward())
  a, b, c = (_leaves(p) for p, _ in _init(model, 0, 0, 1))
  want = _leaves(_init(batched)[0])
  for name, value in a.items():
    np.testing.assert_array_equal(value, b[name])
    np.testing.assert_array_equal(value, want[name])
  kernel = next(k for k in a if a[k].ndim == 4)
  assert not np.array_equal(a[kernel], c[kernel])


def test_batched_init_false_gives_haikus_values(haiku_init):
  model = models.make_model(_model_config(batched_init=False), num_classes=10)
  got = _leaves(_init(model)[0])
  want = _leaves(haiku_init[0])
  assert got.keys() == want.keys()
  for name, value in got.items():
    np.testing.assert_array_equal(value, want[name])


def _eqns(jaxpr, name):
  """The equations of primitive `name` in a jaxpr, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(eqn)
    for param in eqn.params.values():
      inner = getattr(param, 'jaxpr', param)
      if hasattr(inner, 'eqns'):
        found += _eqns(inner, name)
  return found


def _samplers(transformed):
  """Number of `random_bits` calls (one per sampler) in the init, nested."""
  images = jnp.zeros((1, 32, 32, 3))
  closed = jax.make_jaxpr(lambda r: transformed.init(r, images, True))(
    jax.random.PRNGKey(0)
  )
  return len(_eqns(closed.jaxpr, 'random_bits'))


def test_number_of_samplers_does_not_grow_with_depth():
  """The reason for batching: per-parameter samplers cost compile time."""
  shallow, deep = _forward((1, 1, 1, 1)), _forward((2, 2, 2, 2))
  batched = [
    _samplers(batched_init.transform_with_state(f)) for f in (shallow, deep)
  ]
  haiku = [_samplers(hk.transform_with_state(f)) for f in (shallow, deep)]
  assert batched[0] == batched[1]
  assert haiku[1] > haiku[0] > 4 * batched[0]


def test_every_draw_is_materialised_behind_one_barrier():
  """Keeps XLA:GPU from fusing the sampler into each parameter's slice.

  Without the barrier, ptxas spent minutes on NFNet-F1's fused init
  kernels on an H100 (docs/performance.md); the barrier must hold every
  random number drawn, so that no sampler reaches a slice directly.
  """
  transformed = batched_init.transform_with_state(_forward((1, 2, 1, 1)))
  images = jnp.zeros((1, 32, 32, 3))
  jaxpr = jax.make_jaxpr(lambda r: transformed.init(r, images, True))(
    jax.random.PRNGKey(0)
  ).jaxpr
  (barrier,) = _eqns(jaxpr, 'optimization_barrier')
  drawn = sum(
    np.prod(e.outvars[0].aval.shape) for e in _eqns(jaxpr, 'random_bits')
  )
  behind = sum(np.prod(v.aval.shape) for v in barrier.invars)
  # Normal and uniform draw one 32-bit word per sample; the truncated
  # normal draws uniforms too. Every word drawn goes through the barrier.
  assert [v.aval.ndim for v in barrier.invars] == [1] * len(barrier.invars)
  assert behind == drawn > 0


def test_unknown_initialisers_still_run_and_rng_none_is_haiku():
  def fn():
    q = hk.get_parameter('q', (6, 6), init=hk.initializers.Orthogonal())
    w = hk.get_parameter('w', (6, 3), init=hk.initializers.RandomNormal())
    return q, w

  transformed = batched_init.transform_with_state(fn)
  params, _ = transformed.init(jax.random.PRNGKey(0))
  q = params['~']['q']
  np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-5)
  assert np.std(params['~']['w']) > 0.3
  constant = batched_init.transform_with_state(
    lambda: hk.get_parameter('b', (2,), init=jnp.ones)
  )
  params, _ = constant.init(None)
  np.testing.assert_array_equal(params['~']['b'], np.ones(2))
