"""Tests for models.layers against NumPy re-derivations and closed forms."""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.models import layers

# --- NumPy references ------------------------------------------------------


def np_standardize(w, gain, eps=1e-4):
  """Scaled WS in float64: (w - mean) * gain / sqrt(max(fan_in * var, eps))."""
  w = np.asarray(w, np.float64)
  fan_in = w.shape[0] * w.shape[1] * w.shape[2]
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
  return (w - mean) / np.sqrt(np.maximum(fan_in * var, eps)) * gain


def np_same_pads(size, k, s):
  """TF/XLA 'SAME' padding: output ceil(size / s), extra pad after."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def np_conv(x, w, stride, pads, groups):
  """Direct NHWC/HWIO grouped convolution with explicit pads, float64."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  kh, kw, cin_g, cout = w.shape
  n, hp, wp, _ = x.shape
  oh, ow = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
  cout_g = cout // groups
  y = np.zeros((n, oh, ow, cout))
  for g in range(groups):
    xg = x[..., g * cin_g : (g + 1) * cin_g]
    wg = w[..., g * cout_g : (g + 1) * cout_g]
    for i in range(kh):
      for j in range(kw):
        patch = xg[
          :,
          i : i + oh * stride[0] : stride[0],
          j : j + ow * stride[1] : stride[1],
        ]
        y[..., g * cout_g : (g + 1) * cout_g] += patch @ wg[i, j]
  return y


def _conv_module(x, **kwargs):
  return layers.WSConv2D(**kwargs)(x)


def _random_params(params, seed):
  """Replaces gain/bias (init 1/0) by random values so they are exercised."""
  rng = np.random.default_rng(seed)
  out = {}
  for mod, leaves in params.items():
    out[mod] = {
      k: jnp.asarray(rng.normal(size=v.shape), v.dtype) if k != 'w' else v
      for k, v in leaves.items()
    }
  return out


# --- WSConv2D --------------------------------------------------------------

CONV_CASES = [
  # (H, W, cin, cout, kernel, stride, groups, padding)
  (7, 7, 4, 6, 3, 1, 1, 'SAME'),
  (8, 8, 4, 6, 3, 2, 2, 'SAME'),  # Even input, stride 2: asymmetric pad.
  (9, 9, 8, 8, 3, 2, 4, 'SAME'),  # Odd input, stride 2.
  (6, 5, 4, 6, (1, 3), (2, 1), 2, 'SAME'),
  (7, 6, 4, 6, 1, 1, 1, 'SAME'),  # 1x1 (matmul path).
  (7, 6, 4, 6, 1, 2, 1, 'SAME'),  # Strided 1x1 on odd/even sizes.
  (8, 8, 4, 6, 3, 2, 2, 'VALID'),
  (6, 6, 4, 6, 3, 1, 2, ((2, 0), (1, 1))),  # Explicit padding.
]


@pytest.mark.parametrize('mode', ['split', 'native'])
@pytest.mark.parametrize('case', CONV_CASES)
def test_wsconv_matches_numpy(case, mode):
  h, w, cin, cout, k, s, groups, padding = case
  x = np.random.default_rng(0).normal(size=(2, h, w, cin)).astype(np.float32)
  kwargs = dict(
    output_channels=cout,
    kernel_shape=k,
    stride=s,
    feature_group_count=groups,
    padding=padding,
    grouped_conv=mode,
  )
  net = hk.without_apply_rng(hk.transform(lambda x: _conv_module(x, **kwargs)))
  params = _random_params(net.init(jax.random.PRNGKey(1), x), seed=2)
  got = np.asarray(jax.jit(net.apply)(params, x))

  p = params['ws_conv2_d']
  w_hat = np_standardize(p['w'], np.asarray(p['gain'], np.float64))
  kh, kw = layers._pair(k, 'k')
  sh, sw = layers._pair(s, 's')
  if padding == 'SAME':
    pads = (np_same_pads(h, kh, sh), np_same_pads(w, kw, sw))
  elif padding == 'VALID':
    pads = ((0, 0), (0, 0))
  else:
    pads = padding
  want = np_conv(x, w_hat, (sh, sw), pads, groups) + np.asarray(p['bias'])
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_wsconv_params_and_init():
  x = jnp.zeros((1, 5, 5, 12))
  net = hk.transform(
    lambda x: layers.WSConv2D(255, 3, feature_group_count=3, name='c')(x)
  )
  params = jax.jit(net.init)(jax.random.PRNGKey(0), x)['c']
  assert params['w'].shape == (3, 3, 4, 255)  # HWIO, I = in / groups.
  np.testing.assert_array_equal(params['gain'], np.ones(255))
  np.testing.assert_array_equal(params['bias'], np.zeros(255))
  w = np.asarray(params['w'])
  fan_in = 3 * 3 * 4
  assert abs(w.std() - math.sqrt(1 / fan_in)) < 0.03 * math.sqrt(1 / fan_in)
  # Untruncated normal: P(|z| > 2) = 4.6%, a truncated one would have none.
  assert np.mean(np.abs(w) > 2 * math.sqrt(1 / fan_in)) > 0.03


def test_wsconv_standardized_weight_has_unit_fan_in_variance():
  """Sum over the fan-in of w_hat^2 is gain^2 (unit-variance outputs)."""
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 8)) * 5 + 3
  gain = jnp.arange(1.0, 9.0)
  w_hat = np.asarray(layers.standardize_weight(w, gain))
  np.testing.assert_allclose(w_hat.mean(axis=(0, 1, 2)), 0, atol=1e-6)
  np.testing.assert_allclose(
    (w_hat**2).sum(axis=(0, 1, 2)), np.asarray(gain) ** 2, rtol=1e-5
  )


def test_wsconv_eps_clamp():
  """A near-constant kernel has fan_in * var < 1e-4, so the clamp applies."""
  w = np.full((1, 1, 4, 2), 0.5, np.float32)
  w[0, 0, 0, :] += 1e-3
  got = np.asarray(layers.standardize_weight(jnp.asarray(w), jnp.ones(2)))
  np.testing.assert_allclose(got, np_standardize(w, 1.0), rtol=1e-4)
  centred = w - w.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(got, centred / math.sqrt(1e-4), rtol=1e-4)


def test_wsconv_bad_input_errors():
  def apply(x, **kwargs):
    net = hk.transform(lambda x: layers.WSConv2D(**kwargs)(x))
    return net.init(jax.random.PRNGKey(0), x)

  with pytest.raises(ValueError, match='rank 4'):
    apply(jnp.zeros((5, 5, 4)), output_channels=4)
  with pytest.raises(ValueError, match='not divisible'):
    apply(jnp.zeros((1, 5, 5, 5)), output_channels=4, feature_group_count=2)
  with pytest.raises(ValueError, match='not divisible'):
    apply(jnp.zeros((1, 5, 5, 4)), output_channels=5, feature_group_count=2)
  with pytest.raises(ValueError, match="'split'"):
    apply(jnp.zeros((1, 5, 5, 4)), output_channels=4, grouped_conv='fast')


# --- Activations -----------------------------------------------------------


@pytest.mark.parametrize('name', sorted(layers.GAMMAS))
def test_scaled_activation_has_unit_variance(name):
  """gamma = 1/std(f(z)) for z ~ N(0,1): the scaled output has variance 1.

  The gammas normalise the variance, not the raw second moment (for relu the
  scaled second moment is 0.5 * 1.714^2 = 1.47).
  """
  z = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))
  y = np.asarray(layers.get_activation(name)(z), np.float64)
  assert abs(y.var() - 1.0) < 0.01, (name, y.var())


def test_gamma_closed_forms():
  # The reference's gammas are Monte-Carlo estimates: within 0.1% of the
  # exact values. std(relu(z)) = sqrt(1/2 - 1/(2 pi)) for z ~ N(0, 1).
  relu_std = math.sqrt(0.5 - 1 / (2 * math.pi))
  assert layers.GAMMAS['relu'] == pytest.approx(1 / relu_std, rel=1e-3)
  # Others by quadrature against the N(0, 1) density.
  z = np.linspace(-12, 12, 200001)
  pdf = np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
  dz = z[1] - z[0]
  for name, f in [
    ('sigmoid', lambda t: 1 / (1 + np.exp(-t))),
    ('tanh', np.tanh),
  ]:
    mean = np.sum(f(z) * pdf) * dz
    var = np.sum((f(z) - mean) ** 2 * pdf) * dz
    assert layers.GAMMAS[name] == pytest.approx(1 / math.sqrt(var), rel=1e-3)


def test_gelu_is_tanh_approximation_times_gamma():
  x = np.linspace(-4, 4, 101).astype(np.float32)
  tanh_gelu = (
    0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
  )
  got = np.asarray(layers.get_activation('gelu')(jnp.asarray(x)))
  np.testing.assert_allclose(
    got, tanh_gelu * 1.7015043497085571, rtol=1e-5, atol=1e-6
  )


def test_activation_registry():
  x = jnp.linspace(-2, 2, 5)
  np.testing.assert_array_equal(layers.ACTIVATIONS['identity'](x), x)
  np.testing.assert_array_equal(
    layers.ACTIVATIONS['swish'](x), layers.ACTIVATIONS['silu'](x)
  )
  with pytest.raises(ValueError, match="'gelu'"):
    layers.get_activation('gelux')


# --- SqueezeExcite, StochDepth, metrics ------------------------------------


def test_squeeze_excite_matches_numpy():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5, 8))
  net = hk.without_apply_rng(
    hk.transform(lambda x: layers.SqueezeExcite(8, 8, 0.5)(x))
  )
  params = _random_params(net.init(jax.random.PRNGKey(1), x), seed=3)
  assert set(params) == {'squeeze_excite/~/linear', 'squeeze_excite/~/linear_1'}
  fc0, fc1 = (
    params['squeeze_excite/~/linear'],
    params['squeeze_excite/~/linear_1'],
  )
  assert fc0['w'].shape == (8, 4) and fc1['w'].shape == (4, 8)
  xn = np.asarray(x, np.float64)
  h = xn.mean(axis=(1, 2)) @ np.asarray(fc0['w']) + np.asarray(fc0['b'])
  h = np.maximum(h, 0) @ np.asarray(fc1['w']) + np.asarray(fc1['b'])
  gate = 2 / (1 + np.exp(-h))
  want = xn * gate[:, None, None, :]
  np.testing.assert_allclose(net.apply(params, x), want, rtol=1e-5, atol=1e-6)


def _stoch_depth(x, rate, is_training, scale_by_keep=False, seed=0):
  net = hk.transform(
    lambda x: layers.StochDepth(rate, scale_by_keep)(x, is_training)
  )
  return np.asarray(net.apply({}, jax.random.PRNGKey(seed), x))


def test_stoch_depth_drops_whole_examples_without_rescale():
  x = jnp.ones((4000, 2, 2, 3))
  y = _stoch_depth(x, 0.3, True)
  per_example = y.reshape(4000, -1)
  # Each example is either kept unchanged (no 1/keep rescale) or zeroed.
  assert set(np.unique(per_example)) <= {0.0, 1.0}
  assert np.all(per_example.min(axis=1) == per_example.max(axis=1))
  dropped = np.mean(per_example[:, 0] == 0)
  assert abs(dropped - 0.3) < 0.03  # 4 sigma of a Binomial(4000, 0.3).
  scaled = _stoch_depth(x, 0.3, True, scale_by_keep=True)
  assert set(np.unique(scaled)) <= {0.0, np.float32(1 / 0.7)}


def test_stoch_depth_eval_is_identity_and_keys_differ():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 2, 2, 3))
  np.testing.assert_array_equal(_stoch_depth(x, 0.5, False), x)
  a = _stoch_depth(x, 0.5, True, seed=1)
  b = _stoch_depth(x, 0.5, True, seed=2)
  assert not np.array_equal(a, b)
  with pytest.raises(ValueError, match='drop_rate'):
    _stoch_depth(x, 1.0, True)


def test_signal_metrics_match_numpy():
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 6, 7))
  m = layers.signal_metrics(jnp.asarray(x, jnp.float32), 3)
  ch_mean = x.reshape(-1, 7).mean(axis=0)
  ch_var = x.reshape(-1, 7).var(axis=0)
  assert float(m['avg_sq_mean_3']) == pytest.approx(np.mean(ch_mean**2), 1e-5)
  assert float(m['avg_var_3']) == pytest.approx(np.mean(ch_var), 1e-5)
