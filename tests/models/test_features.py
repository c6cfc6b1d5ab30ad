"""Multi-scale feature maps (`return_features=True`) of every family.

Expected shapes are hand-computed: with SAME padding a stride-s layer maps
n pixels to ceil(n / s), so stage k's map has ceil(H / 2 ** (k + 1)) rows;
the channels are each family's published stage widths times the width
multiplier. The stages' last blocks are counted by hand from `depth`, and
the docs' segmentation head (docs/models.md) is run as written.
"""

import functools
import math
import pathlib
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import optim, pretrained
from nfnets.models import common, layers, nf_regnet, nf_resnet, nfnet, resnet

DEPTH = (1, 2, 1, 2)
STAGE_LAST_BLOCK = (0, 2, 3, 5)  # Cumulative DEPTH minus one.
SIZES = [(64, 64), (96, 70)]  # The second is not a multiple of 32.
DOCS = pathlib.Path(__file__).parents[2] / 'docs' / 'models.md'

# family -> (constructor, kwargs, stage widths at that width multiplier).
FAMILIES = {
  'NFNet': (
    nfnet.NFNet,
    dict(width=0.125, group_size=16, drop_rate=0.0, stochdepth_rate=0.0),
    [int(w * 0.125) for w in (256, 512, 1536, 1536)],
  ),
  'NF_ResNet': (
    nf_resnet.NFResNet,
    dict(width=0.25, stochdepth_rate=0.0),
    [int(w * 0.25) for w in (64, 128, 256, 512)],
  ),
  'NF_RegNet': (
    nf_regnet.NFRegNet,
    dict(width=0.25, drop_rate=0.0, stochdepth_rate=0.0),
    [int(w * 0.25) for w in (48, 104, 208, 440)],
  ),
  'ResNet': (
    resnet.ResNet,
    dict(width=0.25),
    [int(w * 0.25) for w in (64, 128, 256, 512)],
  ),
}


def _transform(family, **call_kwargs):
  constructor, kwargs, _ = FAMILIES[family]

  def forward(x, is_training):
    net = constructor(num_classes=3, depth=DEPTH, **kwargs)
    return net(x, is_training, **call_kwargs)

  return hk.transform_with_state(forward)


def _images(size):
  return jax.random.normal(jax.random.PRNGKey(1), (2, *size, 3))


@functools.cache
def _init(family, size):
  """(params, state) of the plain network (BatchNorm needs training mode)."""
  init = jax.jit(_transform(family).init, static_argnums=2)
  return init(jax.random.key(0, impl='unsafe_rbg'), _images(size), True)


@functools.cache
def _outputs(family, size, **call_kwargs):
  """Eval-mode outputs with the plain network's parameters."""
  model = _transform(family, **call_kwargs)
  params, state = _init(family, size)
  apply = jax.jit(model.apply, static_argnums=4)
  return apply(params, state, None, _images(size), False)[0]


def _features(family, size):
  return _outputs(family, size, return_features=True, return_metrics=True)


def _shapes(family, size, **call_kwargs):
  """(param shapes, eval-mode output shapes), traced without computing."""
  model = _transform(family, **call_kwargs)
  init = functools.partial(model.init, is_training=True)
  params, state = jax.eval_shape(init, jax.random.PRNGKey(0), _images(size))
  apply = functools.partial(model.apply, rng=None, is_training=False)
  return params, jax.eval_shape(apply, params, state, x=_images(size))[0]


@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
@pytest.mark.parametrize('family', list(FAMILIES))
def test_feature_shapes_and_strides(family, size):
  params, out = _shapes(family, size, return_features=True)
  # The same parameter names and shapes as without the features.
  assert params == _shapes(family, size)[0]
  widths = FAMILIES[family][2]
  features = out['features']
  assert list(features) == ['stage1', 'stage2', 'stage3', 'stage4']
  h, w = size
  for k, (name, feature) in enumerate(features.items()):
    stride = 4 * 2**k
    assert common.FEATURE_STRIDES[name] == stride
    want = (2, math.ceil(h / stride), math.ceil(w / stride), widths[k])
    assert feature.shape == want, (name, feature.shape, want)


def test_features_leave_the_logits_unchanged():
  out, plain = _features('NFNet', SIZES[1]), _outputs('NFNet', SIZES[1])
  np.testing.assert_array_equal(out['logits'], plain['logits'])
  assert 'features' not in plain


@pytest.mark.parametrize('family', list(FAMILIES))
def test_features_are_the_stage_ends(family):
  out = _features(family, SIZES[1])
  assert all(np.all(np.isfinite(f)) for f in out['features'].values())
  # Each map is the output of its stage's last block: the metrics record
  # every block's output (block i as avg_var_{i + 1}).
  for name, last in zip(out['features'], STAGE_LAST_BLOCK, strict=True):
    got = layers.signal_metrics(out['features'][name], last + 1)
    key = f'avg_var_{last + 1}'
    np.testing.assert_allclose(got[key], out[key], rtol=1e-5)


def test_nf_resnet_features_are_before_the_final_activation():
  out = _features('NF_ResNet', SIZES[1])
  stage4 = out['features']['stage4']
  # NF-ResNets pool act(stage 4 output); the map itself is not activated.
  act = layers.get_activation('relu')
  np.testing.assert_allclose(
    out['pool'], jnp.mean(act(stage4), axis=(1, 2)), rtol=1e-5, atol=1e-6
  )
  assert np.min(stage4) < 0


def test_scanned_nfnet_gives_the_unrolled_features():
  kw = dict(width=0.125, group_size=16, drop_rate=0.0, stochdepth_rate=0.0)

  def make(scan_blocks):
    def forward(x):
      net = nfnet.NFNet(3, depth=(1, 3, 1, 2), scan_blocks=scan_blocks, **kw)
      return net(x, is_training=False, return_features=True)

    return hk.transform(forward)

  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  params = jax.jit(make(False).init)(jax.random.PRNGKey(0), x)
  unrolled = jax.jit(make(False).apply)(params, None, x)['features']
  scanned = jax.jit(make(True).apply)(params, None, x)['features']
  assert list(scanned) == list(unrolled)
  for name in unrolled:
    np.testing.assert_allclose(
      scanned[name], unrolled[name], rtol=1e-5, atol=1e-5
    )


def test_scanned_stage_end_inside_a_run_is_refused(monkeypatch):
  # Blocks 2 and 3 are one scanned run; pretend a stage ends at 2.
  monkeypatch.setattr(nfnet.NFNet, 'stage_ends', (0, 2, 3, 4))

  def forward(x):
    net = nfnet.NFNet(3, width=0.125, group_size=16, depth=(1, 3, 1, 1),
                      scan_blocks=True)  # fmt: skip
    return net(x, is_training=False, return_features=True)

  model = hk.transform(forward)
  x = jnp.zeros((1, 32, 32, 3))
  # Init runs unrolled; the scanned apply refuses while tracing.
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='inside a run of scanned blocks'):
    jax.eval_shape(functools.partial(model.apply, rng=None), params, x=x)


def test_stage_ends():
  assert common.stage_ends([True, False, True, True, False]) == (1, 2, 4)
  assert common.stage_ends([True]) == (0,)


def _docs_example(index: int = 0) -> str:
  """A Python block of the docs' multi-scale features section."""
  text = DOCS.read_text()
  section = text.split('## Multi-scale features for detection and segmentation')
  assert len(section) == 2, 'section missing from docs/models.md'
  section = section[1].split('\n## ')[0]
  blocks = re.findall(r'```python\n(.*?)```', section, re.S)
  assert len(blocks) > index, f'no python block {index} in the section'
  return blocks[index]


def test_docs_segmentation_head_runs_and_gives_per_pixel_logits():
  namespace = {}
  exec(compile(_docs_example(), str(DOCS), 'exec'), namespace)  # noqa: S102
  tiny = dict(width=0.125, depth=(1, 1, 1, 1), group_size=16)
  model = namespace['make_segmenter'](num_classes=5, backbone_kwargs=tiny)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 96, 70, 3))
  params = jax.jit(model.init, static_argnums=2)(
    jax.random.PRNGKey(0), images, False
  )
  logits = jax.jit(model.apply, static_argnums=3)(params, None, images, False)
  assert logits.shape == (2, 96, 70, 5)
  assert np.all(np.isfinite(logits))
  # The backbone keeps the checkpoint names, so released weights load.
  assert 'NFNet/~/stem_conv0' in params
  assert any(name.startswith('NFNet/~/nf_block') for name in params)
  # Freezing the backbone's first stages never freezes the head.
  frozen = optim.frozen_mask(params, 2)
  assert frozen['NFNet/~/stem_conv0']['w']
  assert not frozen['NFNet/~/final_conv']['w']
  for name in ('lateral_stage1', 'lateral_stage4', 'classifier'):
    assert not any(jax.tree.leaves(frozen[name])), name


def test_docs_fine_tuning_example_runs(tmp_path, monkeypatch):
  """The docs' fine-tuning block, on a tiny backbone and weights file."""
  namespace = {}
  exec(compile(_docs_example(0), str(DOCS), 'exec'), namespace)  # noqa: S102
  tiny = dict(width=0.125, depth=(1, 1, 1, 1), group_size=16)
  make_segmenter = namespace['make_segmenter']

  def tiny_segmenter(**kwargs):  # Jitted: eager init takes 20 s on CPU.
    model = make_segmenter(backbone_kwargs=tiny, **kwargs)
    return model._replace(init=jax.jit(model.init, static_argnums=2))

  namespace['make_segmenter'] = tiny_segmenter
  # A released-format file of the tiny backbone stands in for F0_haiku.npz.
  backbone = hk.transform(lambda x: nfnet.NFNet(1000, **tiny)(x, False))
  weights = jax.jit(backbone.init)(
    jax.random.PRNGKey(2), jnp.zeros((1, 32, 32, 3))
  )
  path = tmp_path / 'tiny.npz'
  pretrained.save_params(weights, path)
  load = pretrained.load
  monkeypatch.setattr(
    pretrained, 'load', lambda _, variant: load(path, variant, **tiny)
  )
  exec(compile(_docs_example(1), str(DOCS), 'exec'), namespace)  # noqa: S102
  params = namespace['params']
  np.testing.assert_array_equal(
    params['NFNet/~/stem_conv0']['w'], weights['NFNet/~/stem_conv0']['w']
  )
  assert 'classifier' in params  # The head keeps its fresh weights.
  assert namespace['opt_state'] is not None
