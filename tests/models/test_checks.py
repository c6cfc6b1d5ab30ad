"""Tests for nfnets.models.checks shared by every family: a width multiplier
too small for the narrowest layer is refused with the smallest valid one;
squeeze-excite ratios outside (0, 1] and activations outside a family's
registry are refused, the latter with the valid names."""

import jax
import ml_collections
import numpy as np
import pytest

from nfnets import models

# The narrowest channel count each family multiplies by `width`, read off
# the architectures: the first stage of an NFNet (256; the stem is not
# scaled), the 16-channel stem of the ResNets, the stem of NF-RegNet-B0
# (its first width, 48). The smallest valid width is 1 / narrowest,
# rounded up at the 4th decimal so that int(narrowest * width) is 1.
CASES = [
  ('NFNet', dict(variant='F0'), 256, 0.004),
  ('NF_ResNet', {}, 16, 0.0625),
  ('NF_RegNet', dict(variant='B0'), 48, 0.0209),
  ('ResNet', {}, 16, 0.0625),
  ('SkipInit_ResNet', {}, 16, 0.0625),
  ('Fixup_ResNet', {}, 16, 0.0625),
]


def _init_shapes(name, kwargs):
  config = ml_collections.ConfigDict(dict(name=name, kwargs=kwargs))
  model = models.make_model(config, 10)
  images = np.zeros((1, 32, 32, 3), np.float32)
  init = lambda key, x: model.init(key, x, True)
  return jax.eval_shape(init, jax.random.PRNGKey(0), images)


@pytest.mark.parametrize('name,kwargs,narrowest,smallest', CASES)
def test_a_width_leaving_a_layer_without_channels_is_refused(
  name, kwargs, narrowest, smallest
):
  too_small = dict(kwargs, width=0.99 / narrowest, depth=[1, 1, 1, 1])
  message = (
    f'{name}: width={too_small["width"]!r} leaves its narrowest layer '
    f'(int({narrowest} * width) channels) with none; use width >= '
    f'{smallest:g}.'
  )
  with pytest.raises(ValueError) as e:
    _init_shapes(name, too_small)
  assert str(e.value) == message
  # The width it names builds, with a layer of one channel.
  params, _ = _init_shapes(name, dict(too_small, width=smallest))
  widths = [leaf.shape[-1] for leaf in jax.tree.leaves(params) if leaf.ndim]
  assert min(widths) == 1


# The families with a squeeze-excite ratio, tiny, SE on.
SE_FAMILIES = [
  ('NFNet', dict(variant='F0')),
  ('NF_ResNet', dict(use_se=True)),
  ('NF_RegNet', dict(variant='B0')),
  ('ResNet', dict(use_se=True)),
]


@pytest.mark.parametrize('name,kwargs', SE_FAMILIES)
def test_a_squeeze_excite_ratio_outside_0_1_is_refused(name, kwargs):
  tiny = dict(kwargs, width=0.25, depth=[1, 1, 1, 1])
  # A ratio <= 0 would otherwise give one hidden unit (max(1, int(c * r))).
  for ratio in (-1.0, 0.0, 1.5, '0.25'):
    with pytest.raises(ValueError) as e:
      _init_shapes(name, dict(tiny, se_ratio=ratio))
    assert str(e.value) == (
      f'{name}: se_ratio must be in (0, 1], got {ratio!r}.'
    )
  _init_shapes(name, dict(tiny, se_ratio=1.0))  # The closed end builds.


@pytest.mark.parametrize(
  'name',
  ['NFNet', 'NF_ResNet', 'NF_RegNet', 'ResNet', 'SkipInit_ResNet',
   'Fixup_ResNet'],
)  # fmt: skip
def test_an_unknown_activation_is_refused_with_the_valid_names(name):
  tiny = dict(width=0.25, depth=[1, 1, 1, 1])
  # 'one_hot' and 'initializers' are names in jax.nn but not activations.
  for bad in ('one_hot', 'initializers', 'rleu'):
    with pytest.raises(ValueError) as e:
      _init_shapes(name, dict(tiny, activation=bad))
    given, valid = str(e.value).split('; choose one of ')
    assert given.endswith(f"activation '{bad}'")
    assert "'relu'" in valid and "'one_hot'" not in valid
  _init_shapes(name, dict(tiny, activation='relu'))  # In every registry.
