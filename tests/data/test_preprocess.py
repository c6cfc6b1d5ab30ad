"""Crops and resizes checked against PIL and hand computations."""

import io

import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image

from nfnets.data import preprocess

S = 48  # Output size; eval resizes to S + 32 = 80.


@pytest.fixture(scope='module')
def photo():
  """The coffee cup photo, 42 x 56 (h x w): eval upsamples it."""
  return np.asarray(Image.fromarray(skimage.data.coffee()).resize((56, 42)))


def _encode(arr, fmt):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt, quality=95)
  return tf.constant(buf.getvalue())


def _as_uint8(x):
  return np.clip(np.round(np.asarray(x)), 0, 255).astype(np.int32)


def _keys(t, a=-0.5):
  t = np.abs(t)
  near = (a + 2) * t**3 - (a + 3) * t**2 + 1
  far = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _bicubic_matrix(n_in, n_out):
  """Keys (a = -0.5) bicubic, half-pixel centres, taps past the edge
  dropped and the rest renormalised: [n_out, n_in]."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    c = (i + 0.5) * n_in / n_out - 0.5
    for k in range(int(np.floor(c)) - 1, int(np.floor(c)) + 3):
      if 0 <= k < n_in:
        m[i, k] = _keys(c - k)
    m[i] /= m[i].sum()
  return m


def _np_resize(x, h, w):
  return np.einsum(
    'ih,hwc,jw->ijc',
    _bicubic_matrix(x.shape[0], h),
    x.astype(np.float64),
    _bicubic_matrix(x.shape[1], w),
  )


def test_resize_crop_32_matches_numpy_bicubic(photo):
  got = preprocess.eval_preprocess(_encode(photo, 'PNG'), S, 'resize_crop_32')
  assert got.shape == (S, S, 3) and got.dtype == tf.float32
  want = _np_resize(photo, S + 32, S + 32)[16 : 16 + S, 16 : 16 + S]
  # TF tabulates the cubic kernel (1024 entries): agreement to ~0.1 level.
  np.testing.assert_allclose(np.asarray(got), want, atol=0.3)


def test_crop_resize_matches_numpy_bicubic(photo):
  got = preprocess.eval_preprocess(_encode(photo, 'PNG'), S, 'crop_resize')
  # side = int(48 / 80 * min(42, 56)) = 25, offsets (9, 16) by hand.
  want = _np_resize(photo[9 : 9 + 25, 16 : 16 + 25], S, S)
  np.testing.assert_allclose(np.asarray(got), want, atol=0.3)


def test_resize_crop_32_matches_pil(photo):
  got = preprocess.eval_preprocess(_encode(photo, 'PNG'), S, 'resize_crop_32')
  assert got.shape == (S, S, 3) and got.dtype == tf.float32
  # The reference: resize to (S+32)^2 ignoring aspect, crop 16 px each side.
  big = Image.fromarray(photo).resize((S + 32, S + 32), Image.BICUBIC)
  want = np.asarray(big.crop((16, 16, 16 + S, 16 + S))).astype(np.int32)
  # PIL rounds to uint8 between its two 1-D passes: a few levels apart.
  diff = np.abs(_as_uint8(got) - want)
  assert diff.max() <= 4 and diff.mean() < 0.5


def test_crop_resize_matches_pil(photo):
  got = preprocess.eval_preprocess(_encode(photo, 'PNG'), S, 'crop_resize')
  # Hand computation: side = int(48 / 80 * min(42, 56)) = int(25.2) = 25,
  # offsets ((42 - 25 + 1) // 2, (56 - 25 + 1) // 2) = (9, 16).
  crop = Image.fromarray(photo[9 : 9 + 25, 16 : 16 + 25])
  want = np.asarray(crop.resize((S, S), Image.BICUBIC)).astype(np.int32)
  # PIL rounds to uint8 between its two 1-D passes: a few levels apart.
  diff = np.abs(_as_uint8(got) - want)
  assert diff.max() <= 4 and diff.mean() < 0.5


def test_jpeg_fused_crop_matches_pil_decode(photo):
  jpeg = _encode(photo, 'JPEG')
  got = preprocess.eval_preprocess(jpeg, S, 'crop_resize')
  decoded = Image.open(io.BytesIO(jpeg.numpy())).convert('RGB')
  crop = decoded.crop((16, 9, 16 + 25, 9 + 25))
  want = np.asarray(crop.resize((S, S), Image.BICUBIC)).astype(np.int32)
  # Decoders differ slightly (IDCT, chroma upsampling): compare loosely.
  assert np.abs(_as_uint8(got) - want).mean() < 3.0


def test_values_are_not_clamped():
  # A sharp edge overshoots under bicubic upsampling, as in the reference.
  edge = np.zeros((8, 8, 3), np.uint8)
  edge[:, 4:] = 255
  out = np.asarray(preprocess.eval_preprocess(tf.constant(edge), 40, 'resize'))
  assert out.max() > 255.0 and out.min() < 0.0


def test_distorted_box_respects_area_and_aspect():
  shape = tf.constant([300, 400])
  for s in range(100):
    y, x, h, w = [
      int(v) for v in preprocess.distorted_box(shape, tf.constant([s, 0]), S)
    ]
    assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 400
    area = h * w / (300 * 400)
    assert 0.08 - 0.01 <= area <= 1.0
    assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_distorted_box_falls_back_to_centre_crop():
  # A 10 x 1000 strip admits no box with area >= 8% and aspect in [3/4, 4/3]
  # (at most 10 x 13 pixels), so the centre box of 48/80 of 10 is used.
  box = preprocess.distorted_box(
    tf.constant([10, 1000]), tf.constant([1, 2]), S
  )
  assert [int(v) for v in box] == [2, 497, 6, 6]


def test_train_preprocess_flip_mirrors_the_same_crop(photo):
  jpeg = _encode(photo, 'JPEG')
  flips = []
  for s in range(8):
    seed = tf.constant([s, 5])
    flip = preprocess.train_preprocess(jpeg, seed, S, 'inception_crop_flip')
    crop = preprocess.train_preprocess(jpeg, seed, S, 'inception_crop')
    assert flip.shape == (S, S, 3) and flip.dtype == tf.float32
    flip, crop = np.asarray(flip), np.asarray(crop)
    same = np.allclose(flip, crop, atol=1e-3)
    assert same or np.allclose(flip, crop[:, ::-1], atol=1e-3)
    flips.append(not same)
  assert 0 < sum(flips) < len(flips)  # Both outcomes occur.
  with pytest.raises(ValueError, match='inception_crop_flip'):
    preprocess.train_preprocess(jpeg, seed, S, 'random_crop')


def test_png_and_array_inputs_take_the_same_crop(photo):
  seed = tf.constant([4, 4])
  from_png = preprocess.train_preprocess(_encode(photo, 'PNG'), seed, S)
  from_array = preprocess.train_preprocess(tf.constant(photo), seed, S)
  np.testing.assert_allclose(from_png, from_array, atol=1e-3)


def test_normalize_uses_imagenet_statistics():
  x = np.full((1, 2, 2, 3), 255.0, np.float32)
  got = np.asarray(preprocess.normalize(tf.constant(x)))[0, 0, 0]
  want = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array(
    [0.229, 0.224, 0.225]
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)
