"""Tests for nfnets.models.nfnet: fidelity to the reference and to the paper.

Full-size models are only traced (jax.eval_shape) except one real F0 forward
pass at 192 px; behavioural tests use shrunken models at 64 px.
"""

import functools
import math
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets
from nfnets.models import nfnet

# Published parameter counts (DeepMind README / paper Table 3 / timm).
PARAM_COUNTS = {
  'F0': 71_489_284,
  'F1': 132_634_256,
  'F2': 193_779_228,
  'F3': 254_924_200,
  'F4': 316_069_172,
  'F5': 377_214_144,
  'F6': 438_359_116,
  'F7': 499_504_088,
  'F0+': 118_824_516,
  'F1+': 220_357_008,
  'F7+': 829_551_960,
}

# Widths 32/64/192/192, bottlenecks 16/32/96/96 in 1/2/6/6 groups of 16.
TINY = dict(width=0.125, depth=(1, 1, 1, 1), group_size=16)


def _make(num_classes=10, variant='F0', **kw):
  def fn(x, is_training, return_metrics=False):
    return nfnet.NFNet(num_classes, variant, **kw)(
      x, is_training, return_metrics
    )

  return hk.transform(fn)


@functools.cache
def _param_shapes(variant):
  net = _make(1000, variant)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(
    functools.partial(net.init, is_training=False), jax.random.PRNGKey(0), x
  )
  return jax.tree.map(lambda s: s.shape, shapes)


def _count(shapes):
  return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape))


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


@pytest.mark.parametrize('variant', list(PARAM_COUNTS))
def test_parameter_counts_match_published(variant):
  assert _count(_param_shapes(variant)) == PARAM_COUNTS[variant]


def test_f0_parameter_names_and_shapes_match_checkpoints():
  shapes = _param_shapes('F0')
  expected = {'NFNet/~/final_conv', 'NFNet/~/linear'}
  expected |= {f'NFNet/~/stem_conv{i}' for i in range(4)}
  for b in range(12):
    block = 'NFNet/~/nf_block' + ('' if b == 0 else f'_{b}')
    expected.add(block)
    expected |= {
      f'{block}/~/{c}' for c in ('conv0', 'conv1', 'conv1b', 'conv2')
    }
    se = f'{block}/~/squeeze_excite/~/'
    expected |= {se + 'linear', se + 'linear_1'}
    if b in (0, 1, 3, 9):  # The projection (transition) blocks.
      expected.add(f'{block}/~/conv_shortcut')
  assert set(shapes) == expected
  # Shapes listed in the reference notes (verified there by init).
  want = {
    ('NFNet/~/stem_conv0', 'w'): (3, 3, 3, 16),
    ('NFNet/~/stem_conv3', 'w'): (3, 3, 64, 128),
    ('NFNet/~/stem_conv3', 'gain'): (128,),
    ('NFNet/~/nf_block', 'skip_gain'): (),
    ('NFNet/~/nf_block/~/conv1', 'w'): (3, 3, 128, 128),
    ('NFNet/~/nf_block/~/conv_shortcut', 'w'): (1, 1, 128, 256),
    ('NFNet/~/nf_block/~/squeeze_excite/~/linear', 'w'): (256, 128),
    ('NFNet/~/nf_block/~/squeeze_excite/~/linear_1', 'b'): (256,),
    ('NFNet/~/nf_block_1/~/conv1', 'w'): (3, 3, 128, 256),
    ('NFNet/~/nf_block_1/~/conv_shortcut', 'w'): (1, 1, 256, 512),
    ('NFNet/~/nf_block_3/~/conv0', 'w'): (1, 1, 512, 768),
    ('NFNet/~/nf_block_3/~/conv1', 'w'): (3, 3, 128, 768),
    ('NFNet/~/nf_block_3/~/conv2', 'w'): (1, 1, 768, 1536),
    ('NFNet/~/nf_block_9/~/conv_shortcut', 'w'): (1, 1, 1536, 1536),
    ('NFNet/~/final_conv', 'w'): (1, 1, 1536, 3072),
    ('NFNet/~/final_conv', 'bias'): (3072,),
    ('NFNet/~/linear', 'w'): (3072, 1000),
    ('NFNet/~/linear', 'b'): (1000,),
  }
  for (module, name), shape in want.items():
    assert shapes[module][name] == shape, (module, name)
  for module, leaves in shapes.items():
    if 'conv' in module:
      assert set(leaves) == {'w', 'gain', 'bias'}


def test_plus_variant_quirks():
  shapes = _param_shapes('F0+')
  assert shapes['NFNet/~/stem_conv3']['w'] == (3, 3, 64, 192)
  # int(384 * 0.5) = 192 rounds down to one group of 128.
  assert shapes['NFNet/~/nf_block/~/conv1']['w'] == (3, 3, 128, 128)
  assert shapes['NFNet/~/final_conv']['w'] == (1, 1, 2048, 4096)


def test_variants_table():
  assert list(nfnets.VARIANTS) == [f'F{i}' for i in range(8)] + [
    f'F{i}+' for i in range(8)
  ]
  # Paper Table 1 (F0-F6) and the reference's base.py (F7, RA codes).
  want = {
    'F0': ((1, 2, 6, 3), 192, 256, '405', 0.2),
    'F1': ((2, 4, 12, 6), 224, 320, '410', 0.3),
    'F2': ((3, 6, 18, 9), 256, 352, '410', 0.4),
    'F3': ((4, 8, 24, 12), 320, 416, '415', 0.4),
    'F4': ((5, 10, 30, 15), 384, 512, '415', 0.5),
    'F5': ((6, 12, 36, 18), 416, 544, '415', 0.5),
    'F6': ((7, 14, 42, 21), 448, 576, '415', 0.5),
    'F7': ((8, 16, 48, 24), 480, 608, '415', 0.5),
  }
  for name, (depth, train, test, ra, drop) in want.items():
    for suffix, width in (
      ('', (256, 512, 1536, 1536)),
      ('+', (384, 768, 2048, 2048)),
    ):
      v = nfnets.VARIANTS[name + suffix]
      assert tuple(v['depth']) == depth and tuple(v['width']) == width
      assert (v['train_imsize'], v['test_imsize']) == (train, test)
      assert (v['RA_level'], v['drop_rate']) == (ra, drop)


def test_f0_beta_and_stochdepth_schedule():
  specs = nfnet.block_specs('F0', alpha=0.2, stochdepth_rate=0.25)
  # Values from the reference notes (alpha = 0.2).
  want_beta = [1.0, 0.9806, 0.9806, 0.9623, 0.9806, 0.9623, 0.9449, 0.9285,
               0.9129, 0.8980, 0.9806, 0.9623]  # fmt: skip
  np.testing.assert_allclose([s.beta for s in specs], want_beta, atol=1e-4)
  np.testing.assert_allclose(
    [s.stochdepth_rate for s in specs], [0.25 * i / 12 for i in range(12)]
  )
  assert [s.stride for s in specs] == [1, 2, 1, 2] + [1] * 5 + [2, 1, 1]
  assert [s.groups for s in specs] == [1, 2, 2] + [6] * 9


# --- One real F0 forward at 192 px -----------------------------------------


@pytest.fixture(scope='module')
def f0_at_192():
  net = _make(1000, 'F0')
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 192, 192, 3))
  init = jax.jit(functools.partial(net.init, is_training=False))
  params = init(jax.random.PRNGKey(0), x)
  apply = jax.jit(
    functools.partial(net.apply, is_training=False, return_metrics=True)
  )
  return params, apply, x


def test_f0_forward_finite_and_eval_deterministic(f0_at_192):
  params, apply, x = f0_at_192
  out1 = apply(params, jax.random.PRNGKey(1), x)
  out2 = apply(params, jax.random.PRNGKey(2), x)
  assert out1['logits'].shape == (2, 1000)
  assert out1['pool'].shape == (2, 3072)
  assert np.all(np.isfinite(out1['logits']))
  np.testing.assert_array_equal(out1['logits'], out2['logits'])
  # skip_gain starts at 0, so only the transition shortcuts carry signal;
  # the N(0, 0.01) classifier gives small but non-zero logits.
  assert 0 < float(jnp.std(out1['logits'])) < 1


def test_f0_signal_propagation_at_init(f0_at_192):
  """Normalizer-free property on N(0, 1) inputs, with skip_gain = 1.

  Within a stage each block adds alpha^2 * Var(branch) to the residual
  stream's variance (identity shortcut, uncorrelated branch); transitions
  reset it (their shortcut sees act(x) * beta, of unit scale, and the 2x2
  average pool of i.i.d. noise lowers it further). No block blows it up.
  """
  params, apply, x = f0_at_192
  params = {
    k: {n: jnp.ones_like(v) if n == 'skip_gain' else v for n, v in p.items()}
    for k, p in params.items()
  }
  out = apply(params, None, x)
  var = [float(out[f'avg_var_{i}']) for i in range(13)]
  res = [float(out[f'res_avg_var_{i}']) for i in range(12)]
  specs = nfnet.block_specs('F0')
  assert max(var) < 1.5
  for k, spec in enumerate(specs):
    if spec.is_transition and spec.stride > 1:
      assert var[k + 1] < var[k], k  # Reset at the transition.
    elif not spec.is_transition:
      np.testing.assert_allclose(
        var[k + 1], var[k] + 0.2**2 * res[k], rtol=0.02, err_msg=str(k)
      )
  assert all(np.isfinite(float(v)) for v in out.values() if v.ndim == 0)


# --- Behaviour on a tiny model ---------------------------------------------


@pytest.fixture(scope='module')
def tiny():
  net = _make(10, 'F0', stochdepth_rate=0.5, drop_rate=0.3, **TINY)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 64, 3))
  params = jax.jit(functools.partial(net.init, is_training=True))(
    jax.random.PRNGKey(0), x
  )
  # Non-zero skip gains so that the residual branches matter.
  params = {
    k: {
      n: jnp.full_like(v, 0.7) if n == 'skip_gain' else v for n, v in p.items()
    }
    for k, p in params.items()
  }
  return net, params, x


def test_training_mode_is_stochastic(tiny):
  net, params, x = tiny
  apply = jax.jit(functools.partial(net.apply, is_training=True))
  a = apply(params, jax.random.PRNGKey(1), x)['logits']
  b = apply(params, jax.random.PRNGKey(2), x)['logits']
  assert not np.allclose(a, b)
  with pytest.raises(ValueError, match='PRNGKey'):
    net.apply(params, None, x, is_training=True)


def test_without_dropout_and_stochdepth_training_equals_eval(tiny):
  _, params, x = tiny
  net = _make(10, 'F0', stochdepth_rate=0.0, drop_rate=0.0, **TINY)
  train = jax.jit(functools.partial(net.apply, is_training=True))
  evalf = jax.jit(functools.partial(net.apply, is_training=False))
  np.testing.assert_allclose(
    train(params, jax.random.PRNGKey(3), x)['logits'],
    evalf(params, None, x)['logits'],
    rtol=1e-6,
  )


def test_remat_gives_same_loss_and_gradients(tiny):
  _, params, x = tiny
  y = jnp.arange(4) % 10

  def loss_fn(net):
    def loss(p):
      logits = net.apply(p, None, x, is_training=False)['logits']
      return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

    return jax.jit(jax.value_and_grad(loss))

  # Split vs native grouped convs are compared with gradients in
  # test_layers (and both run the same params); here remat vs plain.
  v0, g0 = loss_fn(_make(10, 'F0', **TINY))(params)
  v, g = loss_fn(_make(10, 'F0', remat=True, **TINY))(params)
  np.testing.assert_allclose(v, v0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_scan_blocks_same_params_outputs_and_gradients():
  # Stage 2 has a transition block and 2 identical blocks (one scan, its
  # 3x3 convs split into 2 groups, 8x8 maps); stage 4's single
  # non-transition block stays unrolled. The split grouped convs (the CPU
  # default) are the ones that need care inside a loop; the scan itself is
  # the same for native ones (2x slower to compile on CPU). (With 2x2 maps
  # XLA rewrites even the plain conv into another form: keep maps larger.)
  kw = dict(width=0.125, depth=(1, 3, 1, 2), group_size=32, drop_rate=0.0,
            grouped_conv='split')  # fmt: skip
  plain = _make(10, 'F0', stochdepth_rate=0.0, **kw)
  scanned = _make(10, 'F0', stochdepth_rate=0.0, scan_blocks=True, **kw)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  # Jitted: Haiku's eager init of this net dispatches op by op (~40 s).
  params = jax.jit(plain.init, static_argnums=2)(jax.random.PRNGKey(0), x, True)
  shapes = lambda t: jax.tree.map(jnp.shape, t)
  scanned_params = jax.eval_shape(
    lambda r: scanned.init(r, x, True), jax.random.PRNGKey(0)
  )
  assert shapes(scanned_params) == shapes(params)
  # Skip gains init at 0 would make every block an identity: perturb them.
  params = {
    m: {k: v + 0.5 if k == 'skip_gain' else v for k, v in leaves.items()}
    for m, leaves in params.items()
  }

  def loss(net, is_training):
    return lambda p: jnp.sum(
      net.apply(p, jax.random.PRNGKey(2), x, is_training)['logits'] ** 2
    )

  # Training mode without stochastic depth or dropout computes what eval does.
  v0, g0 = jax.jit(jax.value_and_grad(loss(plain, True)))(params)
  step = jax.jit(jax.value_and_grad(loss(scanned, True)))
  compiled = step.lower(params).compile()
  v, g = compiled(params)
  np.testing.assert_allclose(v, v0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(loss(scanned, True))(params))
  assert jaxpr.count('scan[') == 1
  # XLA:CPU runs convolutions with other dimension labels as naive loop
  # nests inside the scan's loop (25x slower): every conv, gradients
  # included, must reach it in the plain NHWC/HWIO form.
  in_loop = [
    line for line in compiled.as_text().splitlines()
    if ' convolution(' in line and '/while/body/' in line
  ]  # fmt: skip
  labels = {re.search(r'dim_labels=([^,\s]+)', s)[1] for s in in_loop}
  assert labels == {'b01f_01io->b01f'}


def test_width_depth_and_final_conv_options():
  net = _make(7, 'F0', width=0.5, depth=(1, 2, 1, 1), final_conv_ch=100)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(
    functools.partial(net.init, is_training=False), jax.random.PRNGKey(0), x
  )
  assert 'NFNet/~/nf_block_4' in shapes and 'NFNet/~/nf_block_5' not in shapes
  # Stage widths 128/256/768/768, bottleneck int(128 * 0.5) = 64.
  assert shapes['NFNet/~/nf_block/~/conv2']['w'].shape == (1, 1, 64, 128)
  assert shapes['NFNet/~/stem_conv3']['w'].shape[-1] == 128  # Not scaled.
  assert shapes['NFNet/~/final_conv']['w'].shape == (1, 1, 768, 100)
  assert shapes['NFNet/~/linear']['w'].shape == (100, 7)


def test_bad_inputs_give_clear_errors():
  with pytest.raises(ValueError, match=r"Unknown NFNet variant 'F9'.*'F0'"):
    nfnet.block_specs('F9')
  net = _make(10, 'F0', **TINY)

  def init(shape, dtype=jnp.float32):
    x = jax.ShapeDtypeStruct(shape, dtype)
    fn = functools.partial(net.init, is_training=False)
    return jax.eval_shape(fn, jax.random.PRNGKey(0), x)

  with pytest.raises(ValueError, match='rank 4'):
    init((64, 64, 3))
  with pytest.raises(ValueError, match='3 channels'):
    init((1, 64, 64, 1))
  with pytest.raises(ValueError, match='too small.*32'):
    init((1, 16, 64, 3))
  with pytest.raises(ValueError, match='float'):
    init((1, 64, 64, 3), jnp.uint8)
  init((1, 33, 47, 3))  # Sizes need not be multiples of 32.


def _construct(**kwargs):
  """Builds a tiny NFNet inside a transform: no parameters, nothing runs."""
  args = dict(num_classes=10, **TINY) | kwargs
  hk.transform(lambda: nfnet.NFNet(**args)).init(None)


def test_bad_constructor_arguments_give_clear_errors():
  """They used to fail deep inside JAX, or to be silently accepted."""
  bad = [
    (dict(width=0), 'width must be a number > 0, got 0'),
    (dict(width=-1), 'width must be a number > 0'),
    (dict(group_size=0), 'group_size must be a positive int, got 0'),
    (dict(depth=1), 'depth must be 4 positive ints, got 1'),
    (dict(depth=(1, 1, 1, 1.5)), 'depth must be 4 positive ints'),
    (
      dict(num_classes='1000'),
      "num_classes must be a positive int, got '1000'",
    ),
    (dict(num_classes=10.0), 'num_classes must be a positive int'),
    (dict(num_classes=0), 'num_classes must be a positive int'),
    (dict(num_classes=True), 'num_classes must be a positive int'),
    (dict(stochdepth_rate=1.5), r'stochdepth_rate must be in \[0, 1\]'),
    (dict(drop_rate=-0.1), r'drop_rate must be in \[0, 1\)'),
    (dict(drop_rate=1.0), r'drop_rate must be in \[0, 1\)'),
  ]
  for kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      _construct(**kwargs)
  # The edges stay valid: rate 1 gives block i of N the rate i / N < 1.
  _construct(stochdepth_rate=1.0, drop_rate=0.0, depth=[1, 1, 1, 1])
  _construct(num_classes=np.int64(3), width=0.125)
  for name, variant in nfnet.VARIANTS.items():  # Every variant's dropout.
    _construct(variant=name, drop_rate=variant['drop_rate'])


def test_bfloat16_params_and_images_keep_bfloat16():
  """The reference trains with params and images cast to bf16."""
  net = _make(10, 'F0', **TINY)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.bfloat16)
  params = jax.eval_shape(
    functools.partial(net.init, is_training=True), jax.random.PRNGKey(0), x
  )
  params = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), params
  )
  apply = functools.partial(net.apply, is_training=True, return_metrics=True)
  out = jax.eval_shape(apply, params, jax.random.PRNGKey(1), x)
  assert {v.dtype for v in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}
