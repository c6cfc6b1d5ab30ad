"""Device-side (JAX) RandAugment ops against the host (TF) ops on photos.

The host ops are themselves checked against PIL in test_augment.py; here
each JAX op must give the host op's output on real photos: within 1 uint8
level for the colour ops, and for the geometric ops (nearest-neighbour
reads of a float-computed source coordinate) on every pixel whose source
coordinate is not within float rounding of a half-pixel: there the two
float32 computations (and the machine code XLA emits for ours, with or
without fused multiply-adds) may round to either neighbour.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image

from nfnets.data import augment, recipe
from nfnets.data import device_randaugment as dra


@pytest.fixture(scope='module')
def photos():
  """Three photos, 40 x 56 (not square, so rows and columns can't swap)."""
  names = ('astronaut', 'chelsea', 'coffee')
  return [
    np.asarray(Image.fromarray(getattr(skimage.data, n)()).resize((56, 40)))
    for n in names
  ]


def _host(fn, image, *args):
  return np.asarray(fn(tf.constant(image), *args)).astype(int)


def _device(fn, image, *args):
  return np.asarray(jax.jit(fn, static_argnums=())(image, *args)).astype(int)


COLOUR_CASES = [
  ('autocontrast', ()),
  ('equalize', ()),
  ('invert', ()),
  ('posterize', (2,)),
  ('posterize', (0,)),
  ('solarize', (128,)),
  ('solarize', (0,)),
  ('solarize_add', (55,)),
  ('color', (0.3,)),
  ('color', (1.45,)),
  ('brightness', (0.55,)),
  ('brightness', (1.45,)),
  ('sharpness', (0.2,)),
  ('sharpness', (1.9,)),
]


@pytest.mark.parametrize('name,args', COLOUR_CASES)
def test_colour_ops_match_host_within_one_level(photos, name, args):
  host_fn, dev_fn = getattr(augment, name), getattr(dra, name)
  for photo in photos:
    if name == 'posterize':  # Bits are static on both sides.
      got = np.asarray(dev_fn(jnp.asarray(photo), *args)).astype(int)
    else:
      got = _device(dev_fn, photo, *args)
    want = _host(host_fn, photo, *args)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1, name


@pytest.mark.parametrize('quirks', [True, False])
@pytest.mark.parametrize('factor', [0.1, 0.55, 1.45])
def test_contrast_matches_host_within_one_level(photos, quirks, factor):
  for photo in photos:
    got = np.asarray(dra.contrast(jnp.asarray(photo), factor, quirks))
    want = _host(augment.contrast, photo, factor, quirks)
    assert np.abs(got.astype(int) - want).max() <= 1


GEOMETRIC_CASES = [
  ('rotate', 30.0),
  ('rotate', -17.0),
  ('shear_x', 0.15),
  ('shear_x', -0.3),
  ('shear_y', 0.3),
  ('translate_x', 50.0),
  ('translate_x', -12.0),
  ('translate_y', 20.0),
]


def _source_coordinates(name, arg, h, w):
  """Where each output pixel reads the input, in float64 (x, y): the
  reference's transforms (tf-addons' `transform` conventions), derived
  here independently of either implementation."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  level = float(np.float32(arg))  # Both sides compute from a float32.
  if name == 'rotate':
    theta = np.deg2rad(level)
    cos, sin = np.cos(theta), np.sin(theta)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
    return cos * x - sin * y + x_off, sin * x + cos * y + y_off
  return {
    'shear_x': (x + level * y, y),
    'shear_y': (x, y + level * x),
    'translate_x': (x - level, y),
    'translate_y': (x, y - level),
  }[name]


def _near_half_pixel(coordinate, tolerance=1e-3):
  """Where rounding to the nearest pixel is decided by float rounding
  (1e-3 px is ~40x float32's resolution at these coordinates)."""
  return np.abs(np.abs(coordinate - np.floor(coordinate)) - 0.5) < tolerance


@pytest.mark.parametrize('name,arg', GEOMETRIC_CASES)
def test_geometric_ops_match_host_off_half_pixel_ties(photos, name, arg):
  for photo in photos:
    got = _device(getattr(dra, name), photo, jnp.float32(arg))
    want = _host(getattr(augment, name), photo, arg)
    in_x, in_y = _source_coordinates(name, arg, *photo.shape[:2])
    tie = _near_half_pixel(in_x) | _near_half_pixel(in_y)
    assert tie.mean() < 0.15  # Most pixels are compared exactly.
    differ = np.any(got != want, axis=-1)
    assert not np.any(differ & ~tie), (name, np.argwhere(differ & ~tie)[:5])
    assert differ.mean() <= 0.05, (name, differ.mean())  # Ties rarely flip.
    # The grey fill is where the host's is (a wrong sign or axis would
    # differ off the ties).
    assert np.any(got == recipe.REPLACE)


def test_cutout_at_greys_the_clipped_square(photos):
  photo = photos[0]
  got = np.asarray(dra.cutout_at(jnp.asarray(photo), 3, 50, 8))
  want = photo.copy()
  want[0:11, 42:56] = recipe.REPLACE  # Rows 3-8..3+8, cols 50-8..50+8.
  np.testing.assert_array_equal(got, want)


def _host_candidates(photo, magnitude, quirks):
  """(name, host output) of every op at `magnitude`, both signs."""
  m = magnitude / recipe.MAX_LEVEL
  x = tf.constant(photo)
  enhance = [m * 1.8 + 0.1] if quirks else [1 - m * 0.9, 1 + m * 0.9]
  out = [
    ('AutoContrast', augment.autocontrast(x)),
    ('Equalize', augment.equalize(x)),
    ('Invert', augment.invert(x)),
    ('Posterize', augment.posterize(x, int(m * 4))),
    (
      'Solarize',
      augment.solarize(x, recipe.solarize_threshold(magnitude, quirks)),
    ),
    ('SolarizeAdd', augment.solarize_add(x, int(m * 110))),
  ]
  for f in enhance:
    out += [
      ('Color', augment.color(x, f)),
      ('Contrast', augment.contrast(x, f, quirks)),
      ('Brightness', augment.brightness(x, f)),
      ('Sharpness', augment.sharpness(x, f)),
    ]
  for sign in (1.0, -1.0):
    out += [
      ('Rotate', augment.rotate(x, sign * m * 30.0)),
      ('ShearX', augment.shear_x(x, sign * m * 0.3)),
      ('ShearY', augment.shear_y(x, sign * m * 0.3)),
      ('TranslateX', augment.translate_x(x, sign * m * 100.0)),
      ('TranslateY', augment.translate_y(x, sign * m * 100.0)),
    ]
  return [(name, np.asarray(y).astype(int)) for name, y in out]


_GEOMETRIC = {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'}


def _is_host_op_output(out, photo, magnitude, quirks):
  """Whether `out` is one of the host's 16 ops at `magnitude` on `photo`."""
  grey = np.all(out == recipe.REPLACE, axis=-1)
  if grey.any() and (grey | np.all(out == photo, axis=-1)).all():
    return True  # Cutout: a grey square, the rest untouched.
  for name, want in _host_candidates(photo, magnitude, quirks):
    if name in _GEOMETRIC:
      if np.any(out != want, axis=-1).mean() <= 0.005:
        return True
    elif np.abs(out - want).max() <= 1:
      return True
  return False


@pytest.mark.parametrize('quirks', [True, False])
def test_each_layer_applies_one_of_the_host_ops(photos, quirks):
  # One layer at M=7: every output must be one of the host's ops applied
  # to its input (the op index and sign come from the key).
  images = jnp.asarray(np.stack(photos))
  got = np.asarray(
    dra.randaugment_batch(images, jax.random.key(3), 1, 7, quirks)
  ).astype(int)
  for photo, out in zip(photos, got, strict=True):
    assert _is_host_op_output(out, photo, 7, quirks)


def test_op_choice_is_uniform_and_per_example():
  # Per-example keys: the same image in a batch of 512 gets different ops;
  # Invert is one of 16 ops, so 1 - (15/16)^L of the outputs (L = 1 here)
  # are the inverted image: 1/16 of 512 = 32, binomial sd ~ 5.5.
  image = jnp.full((512, 8, 8, 3), 10, jnp.uint8)
  image = image.at[:, :4].set(200)
  out = np.asarray(dra.randaugment_batch(image, jax.random.key(0), 1, 5))
  inverted = np.all(out == 255 - np.asarray(image[0]), axis=(1, 2, 3))
  assert 32 - 4 * 5.5 <= inverted.sum() <= 32 + 4 * 5.5


def test_needs_uint8():
  with pytest.raises(ValueError, match='uint8'):
    dra.randaugment_batch(jnp.zeros((1, 4, 4, 3)), jax.random.key(0), 1, 5)


def test_map_and_vmap_strategies_give_the_same_images(photos):
  # The loop runs only each example's chosen ops, vmap computes all 16 and
  # selects: the same keys must give bit-identical outputs (two layers, so
  # an op sees another op's output).
  images = jnp.asarray(np.stack(photos))
  key = jax.random.key(11)
  by_loop = dra.randaugment_batch(images, key, 2, 9, strategy='map')
  by_vmap = dra.randaugment_batch(images, key, 2, 9, strategy='vmap')
  np.testing.assert_array_equal(np.asarray(by_loop), np.asarray(by_vmap))
  assert not np.array_equal(np.asarray(by_loop), np.asarray(images))


def test_unknown_strategy_lists_the_valid_ones():
  with pytest.raises(ValueError, match="'auto', 'vmap', 'map'"):
    dra.randaugment_batch(
      jnp.zeros((1, 4, 4, 3), jnp.uint8), jax.random.key(0), 1, 5,
      strategy='scan',
    )  # fmt: skip
