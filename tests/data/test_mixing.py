"""MixUp/CutMix checked against NumPy re-derivations of the mixed images."""

import numpy as np
import pytest
import tensorflow as tf

from nfnets.data import mixing

B, H, W = 16, 12, 20  # 2B = 32 input images.


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, size=(2 * B, H, W, 3)).astype(np.float32)
  labels = rng.permutation(100)[: 2 * B].astype(np.int32)  # All distinct.
  return {'images': images, 'labels': labels}


def _mix(batch, seed, **kw):
  out = mixing.mix_batch(
    {k: tf.constant(v) for k, v in batch.items()},
    tf.constant([seed, 1], tf.int64),
    **kw,
  )
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_mixup_half_is_a_convex_blend(batch, seed):
  out = _mix(batch, seed)
  x, q = batch['images'], B // 2
  r = out['ratio'][:q]
  assert ((r >= 0) & (r <= 1)).all()
  want = (
    r[:, None, None, None] * x[:q] + (1 - r[:, None, None, None]) * x[B : B + q]
  )
  np.testing.assert_allclose(out['images'][:q], want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_cutmix_ratio_is_the_pasted_box_area_share(batch, seed):
  out = _mix(batch, seed)
  x, q = batch['images'], B // 2
  for i in range(q, B):
    mixed, first, second = out['images'][i], x[i], x[B + i]
    from_first = np.isclose(mixed, first).all(-1)
    from_second = np.isclose(mixed, second).all(-1)
    assert (from_first | from_second).all()
    # The first image fills one axis-aligned box; its share is the ratio.
    ys, xs = np.nonzero(from_first & ~from_second)
    if len(ys):
      box = np.zeros((H, W), bool)
      box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
      assert (from_first[box]).all()
      assert out['ratio'][i] == pytest.approx(box.sum() / (H * W))
    else:
      assert out['ratio'][i] == pytest.approx(0.0)


def test_labels_and_partners_are_consistent(batch):
  out = _mix(batch, 5)
  np.testing.assert_array_equal(out['labels'], batch['labels'][:B])
  np.testing.assert_array_equal(out['mix_labels'], batch['labels'][B:])
  assert out['images'].shape == (B, H, W, 3)
  assert out['ratio'].dtype == np.float32
  assert ((out['ratio'] >= 0) & (out['ratio'] <= 1)).all()


def test_mixup_only_and_cutmix_only(batch):
  only_mixup = _mix(batch, 3, mixup_alpha=0.2, use_cutmix=False)
  r = only_mixup['ratio'][:, None, None, None]
  x = batch['images']
  np.testing.assert_allclose(
    only_mixup['images'], r * x[:B] + (1 - r) * x[B:], rtol=1e-5, atol=1e-3
  )
  only_cutmix = _mix(batch, 3, mixup_alpha=0.0, use_cutmix=True)
  same = np.isclose(only_cutmix['images'], x[:B]) | np.isclose(
    only_cutmix['images'], x[B:]
  )
  assert same.all()
  with pytest.raises(ValueError, match='mixup_alpha'):
    _mix(batch, 3, mixup_alpha=0.0, use_cutmix=False)


def test_beta_moments():
  # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.1786.
  r = np.asarray(mixing.sample_beta(tf.constant([0, 9]), 0.2, [20000]))
  assert r.mean() == pytest.approx(0.5, abs=0.01)
  assert r.var() == pytest.approx(1 / (4 * 1.4), abs=0.01)


def test_cutmix_box_share_is_uniform_before_clipping():
  # Sides sqrt(1 - lam) (H, W) give an unclipped area share 1 - lam ~ U(0,1);
  # clipping at the border only shrinks it, so the mean is below 1/2.
  boxes = np.asarray(mixing.cutmix_boxes(tf.constant([1, 2]), 5000, 64, 64))
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 64**2
  assert ((area >= 0) & (area <= 1)).all()
  assert 0.2 < area.mean() < 0.5
  assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()


def test_in_batch_pairing_blends_each_image_with_the_previous(batch):
  # B images in, B out: output i mixes image i (weight `ratio`) with image
  # i - 1 (cyclically), so each image is a first and a second image once.
  half = {k: v[:B] for k, v in batch.items()}
  out = _mix(half, 3, mixup_alpha=0.2, use_cutmix=False, pairing='in_batch')
  x1, x2 = half['images'], np.roll(half['images'], 1, axis=0)
  np.testing.assert_array_equal(out['labels'], half['labels'])
  np.testing.assert_array_equal(out['mix_labels'], np.roll(half['labels'], 1))
  r = out['ratio'][:, None, None, None]
  np.testing.assert_allclose(
    out['images'], r * x1 + (1 - r) * x2, rtol=1e-5, atol=1e-3
  )
