"""Tests for nfnets.models.skipinit_fixup: SkipInit and Fixup ResNets.

The parameter names, shapes and counts are those of DeepMind's
deepmind-research `nfnets/skipinit_resnet.py` (`SkipInit_ResNet`,
blocks `NFResBlock`) and `nfnets/fixup_resnet.py` (`FixUp_ResNet`, blocks
`ResBlock`), written down here from reading that code: the totals and
array counts for ResNet50 (width 4, 1000 classes) are what Haiku gives for
those modules. The forward passes are checked against a hand-written
version of the reference computations with `jax.lax`, on perturbed
parameters (so no zero-initialised gain or bias hides a term).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nfnets import models
from nfnets.models import flops
from nfnets.train import train_and_evaluate
from tests.support.train_harness import tiny_config

# ResNet50 stages at width 4: (output channels, bottleneck width, blocks).
RESNET50_STAGES = ((256, 64, 3), (512, 128, 4), (1024, 256, 6), (2048, 512, 3))
# Totals of the reference modules (ResNet50, 1000 classes).
REFERENCE_TOTALS = {
  'SkipInit_ResNet': (25_530_424, 123),
  'Fixup_ResNet': (25_504_026, 169),
}
FIXUP_SCALARS = ('bias1a', 'bias1b', 'bias2a', 'bias2b', 'bias3a', 'bias3b')


def expected_shapes(family):
  """{module/param: shape} of the reference ResNet50 of `family`."""
  skipinit = family == 'SkipInit_ResNet'
  top = 'SkipInit_ResNet' if skipinit else 'FixUp_ResNet'
  block_name = 'nf_res_block' if skipinit else 'res_block'
  want = {f'{top}/~/initial_conv/w': (7, 7, 3, 64)}
  if not skipinit:
    want[f'{top}/bias1'] = want[f'{top}/bias2'] = ()
  in_ch, index = 64, 0
  for out_ch, width, blocks in RESNET50_STAGES:
    for i in range(blocks):
      block = f'{top}/~/{block_name}' + (f'_{index}' if index else '')
      convs = {
        'conv0': (1, 1, in_ch, width),
        'conv1': (3, 3, width, width),
        'conv2': (1, 1, width, out_ch),
      }
      if i == 0:  # Every stage's first block changes width or stride.
        convs['conv_shortcut'] = (1, 1, in_ch, out_ch)
      for conv, shape in convs.items():
        want[f'{block}/~/{conv}/w'] = shape
        if skipinit:  # SkipInit's block convs keep hk.Conv2D's bias.
          want[f'{block}/~/{conv}/b'] = (shape[-1],)
      scalars = ('skip_gain',) if skipinit else (*FIXUP_SCALARS, 'scale')
      want.update({f'{block}/{name}': () for name in scalars})
      in_ch, index = out_ch, index + 1
  want[f'{top}/~/linear/w'] = (2048, 1000)
  want[f'{top}/~/linear/b'] = (1000,)
  return want


def _config(name, **kwargs):
  return ml_collections.ConfigDict(dict(name=name, kwargs=kwargs))


def _shapes(model_config, num_classes=1000, size=224):
  model = models.make_model(model_config, num_classes)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  params, state = jax.eval_shape(
    lambda r, x: model.init(r, x, True), jax.random.PRNGKey(0), x
  )
  flat = {f'{m}/{n}': v.shape for m, d in params.items() for n, v in d.items()}
  return flat, state, params


@pytest.mark.parametrize('family', list(REFERENCE_TOTALS))
def test_resnet50_names_shapes_and_counts_are_the_references(family):
  got, state, params = _shapes(_config(family, variant='ResNet50'))
  want = expected_shapes(family)
  assert got == want
  total, arrays = REFERENCE_TOTALS[family]
  assert sum(math.prod(s) for s in want.values()) == total
  assert len(want) == arrays
  assert flops.count_params(params) == total
  assert state == {}  # No normalisation, no state.
  # The same convolutions as the BN ResNet-50: 4.09B multiply-adds.
  macs = flops.count_model_macs(_config(family, variant='ResNet50'))
  assert macs / 1e9 == pytest.approx(4.089, abs=1e-3)


def test_registry_names_and_unknown_variants():
  assert {'SkipInit_ResNet', 'Fixup_ResNet'} <= set(models.MODELS)
  for family in REFERENCE_TOTALS:
    with pytest.raises(ValueError, match=f"Unknown {family} variant 'R50'"):
      _shapes(_config(family, variant='R50'))
  with pytest.raises(ValueError, match='does not take'):
    models.make_model(_config('Fixup_ResNet', alpha=0.2), 10)


@pytest.mark.parametrize('family', list(REFERENCE_TOTALS))
def test_bad_constructor_arguments_give_clear_errors(family):
  tiny = dict(width=0.25, depth=(1, 1, 1, 1))
  for kwargs, num_classes, match in [
    (dict(tiny, width=0), 10, 'width must be a number > 0'),
    (tiny, 0, 'num_classes must be a positive int'),
    (dict(tiny, drop_rate=1.0), 10, r'drop_rate must be in \[0, 1\)'),
    (dict(tiny, stochdepth_rate=2.0), 10, r'stochdepth_rate .*\[0, 1\]'),
    (dict(width=0.25, depth=(1, 1, 1)), 10, 'depth must be 4 positive ints'),
  ]:
    with pytest.raises(ValueError, match=match):
      _shapes(_config(family, **kwargs), num_classes, size=32)


def _conv(x, p, stride=1, bias=True):
  y = jax.lax.conv_general_dilated(
    x, p['w'], (stride, stride), 'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )  # fmt: skip
  return y + p['b'] if bias else y


def _max_pool(x):
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME'
  )


# The blocks of depth (2, 1, 1, 1): (stride, projection shortcut). The
# second block keeps its width and stride, so its shortcut is the identity.
TINY_DEPTH = (2, 1, 1, 1)
TINY_BLOCKS = ((1, True), (1, False), (2, True), (2, True), (2, True))


def hand_skipinit(p, x, relu=jax.nn.relu):
  """The reference SkipInit forward (eval mode), depth `TINY_DEPTH`."""
  top = 'SkipInit_ResNet/~/'
  out = _max_pool(_conv(x, p[top + 'initial_conv'], 2, bias=False))
  for i, (stride, projection) in enumerate(TINY_BLOCKS):
    b = top + 'nf_res_block' + (f'_{i}' if i else '')
    pre = relu(out)
    shortcut = out
    if projection:
      shortcut = _conv(pre, p[b + '/~/conv_shortcut'], stride)
    h = _conv(pre, p[b + '/~/conv0'])
    h = _conv(relu(h), p[b + '/~/conv1'], stride)
    h = _conv(relu(h), p[b + '/~/conv2'])
    out = h * p[b]['skip_gain'] + shortcut
  pool = jnp.mean(relu(out), axis=(1, 2))
  return pool @ p[top + 'linear']['w'] + p[top + 'linear']['b']


def hand_fixup(p, x, relu=jax.nn.relu):
  """The reference Fixup forward (eval mode), depth `TINY_DEPTH`."""
  top = 'FixUp_ResNet'
  out = _conv(x, p[top + '/~/initial_conv'], 2, bias=False)
  out = _max_pool(relu(out + p[top]['bias1']))
  for i, (stride, projection) in enumerate(TINY_BLOCKS):
    b = top + '/~/res_block' + (f'_{i}' if i else '')
    s = p[b]
    h = out + s['bias1a']
    shortcut = h  # Fixup's identity shortcut carries bias1a too.
    if projection:
      shortcut = _conv(h, p[b + '/~/conv_shortcut'], stride, bias=False)
    h = relu(_conv(h, p[b + '/~/conv0'], bias=False) + s['bias1b'])
    h = _conv(h + s['bias2a'], p[b + '/~/conv1'], stride, bias=False)
    h = relu(h + s['bias2b'])
    h = _conv(h + s['bias3a'], p[b + '/~/conv2'], bias=False)
    out = relu(h * s['scale'] + s['bias3b'] + shortcut)
  pool = jnp.mean(out, axis=(1, 2)) + p[top]['bias2']
  return pool @ p[top + '/~/linear']['w'] + p[top + '/~/linear']['b']


@pytest.mark.parametrize(
  'family,hand',
  [('SkipInit_ResNet', hand_skipinit), ('Fixup_ResNet', hand_fixup)],
)
def test_forward_pass_is_the_references(family, hand):
  config = _config(family, width=0.25, depth=TINY_DEPTH)
  model = models.make_model(config, 5)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params, _ = jax.jit(model.init, static_argnums=2)(
    jax.random.PRNGKey(1), x, True
  )
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(
    tree,
    [
      v + 0.3 * jax.random.normal(k, v.shape)
      for v, k in zip(leaves, keys, strict=True)
    ],
  )
  # The second block has no shortcut conv: its identity path runs.
  assert not [k for k in params if k.endswith('block_1/~/conv_shortcut')]
  out, _ = jax.jit(model.apply, static_argnums=4)(params, {}, None, x, False)
  want = hand(params, x)
  np.testing.assert_allclose(out['logits'], want, rtol=2e-4, atol=2e-4)
  assert float(jnp.abs(want).max()) > 1e-2  # Not trivially zero.


def test_fixup_initialisation_follows_the_reference():
  model = models.make_model(_config('Fixup_ResNet', variant='ResNet50'), 10)
  params, _ = jax.jit(model.init, static_argnums=2)(
    jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), True
  )
  block = params['FixUp_ResNet/~/res_block_7/~/conv1']['w']  # Stage 3.
  # N(0, sqrt(2 / (width * 9)) * L^-1/4) with width 256 and L = 16 blocks.
  want = math.sqrt(2 / (256 * 9)) * 16**-0.25
  assert float(jnp.std(block)) == pytest.approx(want, rel=0.02)
  assert not np.any(params['FixUp_ResNet/~/res_block_7/~/conv2']['w'])
  assert float(params['FixUp_ResNet/~/res_block_7']['scale']) == 1.0


@pytest.mark.parametrize('family', list(REFERENCE_TOTALS))
def test_tiny_model_trains_through_the_trainer(
  family, tmp_path, compilation_cache_dir
):
  config = tiny_config(compilation_cache_dir)
  config.model.name = family
  config.model.kwargs = ml_collections.ConfigDict(
    dict(width=0.25, depth=(1, 1, 1, 1))
  )
  config.train.num_steps = 4
  config.train.log_every_steps = 2
  result = train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(result.state.step) == 4
  assert result.state.model_state == {}
  assert np.isfinite(result.metrics['train/loss'])
  assert 0.0 <= result.metrics['eval/top1'] <= 1.0
  params = jax.device_get(result.state.params)
  # Training moved the zero-initialised classifier away from zero.
  top = 'SkipInit_ResNet' if family == 'SkipInit_ResNet' else 'FixUp_ResNet'
  assert np.any(params[f'{top}/~/linear']['w'])
