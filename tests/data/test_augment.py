"""RandAugment ops checked for their defining property on a real photo.

References are PIL's ImageOps/ImageEnhance (which the TPU RandAugment ops
mirror) or NumPy re-derivations; magnitudes against the reference's table.
"""

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from nfnets.data import augment, recipe

SEED = tf.constant([3, 7], tf.int64)


@pytest.fixture(scope='module')
def photo():
  """Chelsea the cat, 48 x 64, uint8 RGB."""
  img = Image.fromarray(skimage.data.chelsea()).resize((64, 48))
  return np.asarray(img)


def _run(fn, *args):
  return np.asarray(fn(tf.constant(args[0]), *args[1:]))


def _pil(arr):
  return Image.fromarray(arr)


def test_autocontrast_matches_pil(photo):
  low = (photo // 2 + 40).astype(np.uint8)  # Squeezed range to stretch.
  got = _run(augment.autocontrast, low)
  want = np.asarray(ImageOps.autocontrast(_pil(low)))
  assert np.abs(got.astype(int) - want).max() <= 1
  assert got.min() == 0 and got.max() == 255


def test_equalize_matches_pil(photo):
  got = _run(augment.equalize, photo)
  np.testing.assert_array_equal(got, np.asarray(ImageOps.equalize(_pil(photo))))


def test_invert_posterize_solarize_match_pil(photo):
  np.testing.assert_array_equal(_run(augment.invert, photo), 255 - photo)
  for bits in (1, 2, 4, 6):
    np.testing.assert_array_equal(
      _run(augment.posterize, photo, bits),
      np.asarray(ImageOps.posterize(_pil(photo), bits)),
    )
  for t in (0, 64, 128, 200):
    np.testing.assert_array_equal(
      _run(augment.solarize, photo, t),
      np.asarray(ImageOps.solarize(_pil(photo), t)),
    )


def test_solarize_add_adds_below_threshold(photo):
  got = _run(augment.solarize_add, photo, 55).astype(int)
  x = photo.astype(int)
  want = np.where(x < 128, np.minimum(x + 55, 255), x)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  'name,pil_cls',
  [
    ('color', ImageEnhance.Color),
    ('brightness', ImageEnhance.Brightness),
    ('sharpness', ImageEnhance.Sharpness),
  ],
)
@pytest.mark.parametrize('factor', [0.1, 0.55, 1.9])
def test_enhance_ops_match_pil(photo, name, pil_cls, factor):
  got = _run(getattr(augment, name), photo, factor).astype(int)
  want = np.asarray(pil_cls(_pil(photo)).enhance(factor)).astype(int)
  # Rounding differs (TF truncates, PIL rounds; greyscale weights differ in
  # the 4th digit), so allow a few levels.
  assert np.abs(got - want).max() <= 3
  assert np.abs(got - want).mean() < 1.0


@pytest.mark.parametrize('factor', [0.1, 0.55, 1.9])
def test_contrast_without_quirks_matches_pil(photo, factor):
  got = _run(augment.contrast, photo, factor, False).astype(int)
  want = np.asarray(ImageEnhance.Contrast(_pil(photo)).enhance(factor))
  assert np.abs(got - want.astype(int)).max() <= 3


def test_contrast_quirk_uses_pixel_count_over_256(photo):
  # The reference's grey level is sum(histogram) / 256 = H * W / 256.
  grey = 48 * 64 / 256.0
  got = _run(augment.contrast, photo, 0.0, True)
  np.testing.assert_array_equal(got, np.full_like(photo, int(grey)))


def test_enhance_factor_is_identity_at_magnitude_5_with_quirks(photo):
  assert augment.enhance_factor(5, SEED, quirks=True) == pytest.approx(1.0)
  for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    got = augment.apply_op(name, tf.constant(photo), 5, SEED, quirks=True)
    np.testing.assert_array_equal(np.asarray(got), photo)
  factors = {
    round(
      float(augment.enhance_factor(5, tf.constant([0, s], tf.int64), False)), 4
    )
    for s in range(20)
  }
  assert factors == {0.55, 1.45}


def test_solarize_threshold_quirk_and_fix():
  # Reference (TF's wrap of an out-of-range uint8 constant): 256 -> 0,
  # 384 -> 128. Without quirks: 256 - 256 M / 10, clamped.
  assert [recipe.solarize_threshold(m, True) for m in (5, 10, 15)] == [
    128,
    0,
    128,
  ]
  assert [recipe.solarize_threshold(m, False) for m in (0, 5, 10, 15)] == [
    256,
    128,
    0,
    0,
  ]


def test_solarize_quirk_matches_tf_on_the_reference_expression(photo):
  # What the reference computes: tf.where(image < 256, image, 255 - image).
  image = tf.constant(photo)
  ref = np.asarray(tf.where(image < 256, image, 255 - image))
  got = augment.apply_op('Solarize', image, 10, SEED, quirks=True)
  np.testing.assert_array_equal(np.asarray(got), ref)


def test_rotate_90_is_rot90():
  square = np.asarray(
    Image.fromarray(skimage.data.astronaut()).resize((40, 40))
  )
  got = _run(augment.rotate, square, 90.0)
  np.testing.assert_array_equal(got, np.rot90(square, k=1))


def test_rotate_keeps_centre_and_fills_corners_grey(photo):
  got = _run(augment.rotate, photo, 30.0)
  np.testing.assert_array_equal(got[0, 0], [128, 128, 128])
  np.testing.assert_array_equal(got[-1, -1], [128, 128, 128])
  # A pixel at the exact centre of rotation maps to itself (odd size).
  odd = photo[:47, :63]
  np.testing.assert_array_equal(
    _run(augment.rotate, odd, 30.0)[23, 31], odd[23, 31]
  )


def test_translate_shifts_and_fills(photo):
  got = _run(augment.translate_x, photo, 10.0)
  np.testing.assert_array_equal(got[:, 10:], photo[:, :-10])
  assert (got[:, :10] == 128).all()
  got = _run(augment.translate_y, photo, -7.0)
  np.testing.assert_array_equal(got[:-7], photo[7:])
  assert (got[-7:] == 128).all()


def test_shear_x_reads_shifted_rows(photo):
  level = 0.3
  got = _run(augment.shear_x, photo, level)
  h, w = photo.shape[:2]
  ys, xs = np.mgrid[:h, :w]
  src = np.floor(xs + level * ys + 0.5).astype(int)  # Round half up.
  inside = src < w
  want = np.where(inside[..., None], photo[ys, np.minimum(src, w - 1)], 128)
  # Nearest rounding at exact .5 may differ; all but a few pixels agree.
  assert (got == want).all(-1).mean() > 0.98
  got_y = _run(augment.shear_y, photo.transpose(1, 0, 2), level)
  np.testing.assert_array_equal(got_y, got.transpose(1, 0, 2))


def test_cutout_greys_one_square(photo):
  got = _run(augment.cutout, photo, 8, SEED)
  changed = (got != photo).any(-1)
  ys, xs = np.nonzero(changed)
  assert (got[changed] == 128).all()
  # A 16 x 16 square (possibly clipped at the border).
  assert ys.max() - ys.min() + 1 <= 16 and xs.max() - xs.min() + 1 <= 16
  box = got[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
  assert (box == 128).all()


def test_magnitude_table_matches_reference():
  # dm-reference.md section 5.6, columns M = 5, 10, 15.
  def arg(m, frac):
    return m / recipe.MAX_LEVEL * frac

  assert [arg(m, 30) for m in (5, 10, 15)] == [15, 30, 45]
  assert [int(arg(m, 4)) for m in (5, 10, 15)] == [2, 4, 6]
  assert [int(arg(m, 110)) for m in (5, 10, 15)] == [55, 110, 165]
  assert [int(arg(m, recipe.CUTOUT_CONST)) for m in (5, 10, 15)] == [
    20,
    40,
    60,
  ]
  assert [augment.enhance_factor(m, SEED) for m in (5, 10, 15)] == (
    pytest.approx([1.0, 1.9, 2.8])
  )
  assert recipe.parse_level('405') == (4, 5)
  assert recipe.parse_level('415') == (4, 15)
  with pytest.raises(ValueError, match='405'):
    recipe.parse_level('ra4')
  with pytest.raises(ValueError, match='0 layers'):
    recipe.parse_level('45')  # Magnitude 45 and no layer: a typo for '405'.


def test_posterize_op_at_magnitude_5_keeps_two_bits(photo):
  got = np.asarray(augment.apply_op('Posterize', tf.constant(photo), 5, SEED))
  assert set(np.unique(got)) <= {0, 64, 128, 192}


def test_randaugment_is_seeded_and_uses_all_ops(photo):
  image = tf.constant(photo)
  a = augment.randaugment(image, SEED, 4, 9, quirks=False)
  b = augment.randaugment(image, SEED, 4, 9, quirks=False)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == tf.uint8 and a.shape == photo.shape
  outs = {
    augment.randaugment(image, tf.constant([s, 1], tf.int64), 1, 9)
    .numpy()
    .tobytes()
    for s in range(40)
  }
  # One layer, 16 ops (some with random signs): many distinct results.
  assert len(outs) >= 10
  assert len(augment.RANDAUGMENT_OPS) == 16
  with pytest.raises(ValueError, match='AutoContrast'):
    augment.apply_op('Blur', image, 5, SEED)


def test_host_ops_are_in_the_shared_order():
  # The device side indexes ops by `recipe.RANDAUGMENT_OP_NAMES`.
  assert tuple(augment.RANDAUGMENT_OPS) == recipe.RANDAUGMENT_OP_NAMES
