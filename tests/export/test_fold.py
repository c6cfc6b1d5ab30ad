"""Folded weight standardisation: the kernels and the logits it gives."""

import haiku as hk
import jax
import numpy as np
import pytest

from nfnets import export, models
from nfnets.export import speed
from nfnets.models import layers
from tests.export import helpers

# (name, kwargs, image size): an NFNet with grouped convs, one whose second
# stage runs two blocks as one hk.scan, an NF-ResNet and an NF-RegNet, all
# small.
MODELS = [
  (
    'NFNet',
    dict(variant='F0', width=0.25, depth=(1, 2, 1, 1), group_size=16),
    64,
  ),
  (
    'NFNet',
    dict(
      variant='F0',
      width=0.25,
      depth=(1, 3, 1, 1),
      group_size=16,
      scan_blocks=True,
    ),
    64,
  ),
  ('NF_ResNet', dict(width=0.25, depth=(1, 1, 1, 1)), 64),
  ('NF_RegNet', dict(width=0.25, depth=(1, 1, 1, 1)), 64),
]


def _numpy_fold(w, gain, eps=1e-4):
  """Scaled WS in float64 NumPy: (w - mean) * gain / sqrt(max(n var, eps))."""
  w = np.asarray(w, np.float64)
  fan_in = np.prod(w.shape[:-1])
  mean = w.mean(axis=(0, 1, 2))
  var = w.var(axis=(0, 1, 2))
  return (w - mean) * gain / np.sqrt(np.maximum(fan_in * var, eps))


def test_fold_matches_numpy_and_keeps_other_modules():
  rng = np.random.default_rng(0)
  params = {
    'net/~/conv': {
      'w': rng.standard_normal((3, 3, 4, 8)).astype(np.float32),
      'gain': rng.uniform(0.5, 2, 8).astype(np.float32),
      'bias': rng.standard_normal(8).astype(np.float32),
    },
    'net/~/linear': {'w': np.ones((8, 2), np.float32), 'b': np.zeros(2)},
    'net/~/block': {'skip_gain': np.float32(0.3)},
  }
  # A constant output channel: its variance is clamped by eps.
  params['net/~/conv']['w'][..., 0] = 1.0
  folded = export.fold_weight_standardization(params)
  assert sorted(folded['net/~/conv']) == ['bias', 'w']
  want = _numpy_fold(params['net/~/conv']['w'], params['net/~/conv']['gain'])
  np.testing.assert_allclose(folded['net/~/conv']['w'], want, atol=1e-6)
  np.testing.assert_array_equal(folded['net/~/conv']['w'][..., 0], 0.0)
  np.testing.assert_array_equal(
    folded['net/~/conv']['bias'], params['net/~/conv']['bias']
  )
  np.testing.assert_array_equal(folded['net/~/linear']['w'], 1.0)
  assert folded['net/~/block']['skip_gain'] == np.float32(0.3)


def test_fold_refuses_params_without_ws_convs():
  with pytest.raises(ValueError, match='normalizer-free'):
    export.fold_weight_standardization({'m': {'w': np.ones((1, 1, 2, 2))}})


@pytest.mark.parametrize('name, kwargs, size', MODELS)
def test_folded_logits_match_unfolded(name, kwargs, size):
  config = helpers.model_config(name, **kwargs)
  params, state = helpers.init_params(config, 10, size)
  folded = export.fold_weight_standardization(params)
  # The folded model's own layout: the same names, no gain anywhere.
  folded_model = export.make_folded_model(config, 10)
  x = np.random.default_rng(1).standard_normal((2, size, size, 3))
  x = x.astype(np.float32)
  layout, _ = jax.eval_shape(
    lambda key, x: folded_model.init(key, x, False), jax.random.PRNGKey(0), x
  )
  assert jax.tree.map(np.shape, layout) == jax.tree.map(np.shape, folded)
  model = models.make_model(config, 10)
  want = jax.jit(model.apply, static_argnums=4)(params, state, None, x, False)
  got = jax.jit(folded_model.apply, static_argnums=4)(
    folded, state, None, x, False
  )
  want, got = np.asarray(want[0]['logits']), np.asarray(got[0]['logits'])
  assert np.abs(want).max() > 0.1  # The branches and classifier matter.
  # The logits depend on the input (a zero classifier gave its bias alone).
  assert np.abs(want[0] - want[1]).max() > 0.01 * np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_folded_convs_reads_no_gain_and_skips_standardisation():
  """One folded conv is exactly conv(x, w) + bias with the given w."""

  def forward(x):
    with export.folded_convs():
      return layers.WSConv2D(3, 3, name='conv')(x)

  f = hk.without_apply_rng(hk.transform(forward))
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 5, 5, 2)).astype(np.float32)
  w = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
  b = rng.standard_normal(3).astype(np.float32)
  out = np.asarray(f.apply({'conv': {'w': w, 'bias': b}}, x))
  padded = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  want = np.zeros((5, 5, 3))
  for i in range(5):
    for j in range(5):
      want[i, j] = np.einsum('hwc,hwco->o', padded[i : i + 3, j : j + 3], w)
  np.testing.assert_allclose(out[0], want + b, rtol=1e-5, atol=1e-5)


def test_compare_forward_speed_times_both_forms():
  config = helpers.model_config('NF_ResNet', width=0.25, depth=(1, 1, 1, 1))
  result = speed.compare_forward_speed(
    config, num_classes=10, batch_size=1, image_size=32, steps=2, warmup=1
  )
  assert sorted(result) == ['folded', 'unfolded']
  for stats in result.values():
    assert 0 < stats['min'] <= stats['median']
