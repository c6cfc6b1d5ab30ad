"""Device-side MixUp/CutMix, the batch function and the device placement.

Mixing is checked against NumPy re-derivations: the pixel share of each
image recovered from constant images, the Beta and box-area distributions
against NumPy samples of the same definitions, and the label weights of the
trainer's targets against the recovered pixel shares. The placement test
checks that the host then ships uint8 crops and nothing else.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from PIL import Image
from scipy import stats

from nfnets import data
from nfnets.data import device_augment
from nfnets.train import losses

MEAN = np.array(data.MEAN_RGB, np.float32)
STD = np.array(data.STDDEV_RGB, np.float32)


def _config(**overrides):
  config = data.default_config()
  config.update(overrides)
  return config


def _two_tone(n, h=16, w=16):
  """Reference pairing input: first halves all 255, partners all 0."""
  images = np.zeros((2 * n, h, w, 3), np.uint8)
  images[:n] = 255
  return {'images': jnp.asarray(images), 'labels': jnp.arange(2 * n)}


def _mix(batch, key=0, **kw):
  out = device_augment.mix_batch(batch, jax.random.key(key), **kw)
  return jax.tree.map(np.asarray, out)


def test_mixup_ratio_is_the_pixel_share_and_beta_distributed():
  n, alpha = 4096, 0.2
  out = _mix(
    _two_tone(n, 2, 2),
    mixup_alpha=alpha,
    use_cutmix=False,
    pairing='reference',
  )
  share = out['images'] / 255.0  # x1 = 255, x2 = 0: the weight of x1.
  np.testing.assert_allclose(
    share,
    np.broadcast_to(out['ratio'][:, None, None, None], share.shape),
    atol=1e-5,
  )
  # Beta(0.2, 0.2): Kolmogorov-Smirnov against the exact distribution.
  assert stats.kstest(out['ratio'], stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def _numpy_box_ratios(rng, n, h, w):
  """NumPy samples of the CutMix definition: box share of the image."""
  side = np.sqrt(1.0 - rng.uniform(size=n))
  cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
  hh, hw = (side * h).astype(int) // 2, (side * w).astype(int) // 2
  y0, y1 = np.clip(cy - hh, 0, h), np.clip(cy + hh, 0, h)
  x0, x1 = np.clip(cx - hw, 0, w), np.clip(cx + hw, 0, w)
  return (y1 - y0) * (x1 - x0) / (h * w)


def test_cutmix_boxes_are_rectangles_with_the_defined_sizes():
  n, h, w = 2048, 12, 20
  out = _mix(
    _two_tone(n, h, w), mixup_alpha=0.0, use_cutmix=True, pairing='reference'
  )
  masks = out['images'][..., 0] / 255.0
  assert set(np.unique(masks)) <= {0.0, 1.0}  # CutMix: no blending.
  heights, widths = [], []
  for mask, ratio in zip(masks, out['ratio'], strict=True):
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows):  # The box's bounding box is all ones: a rectangle.
      assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
      heights.append(len(rows))
      widths.append(len(cols))
    assert ratio == pytest.approx(mask.mean())
  # Unclipped sides are even and at most sqrt(1 - lam) * side <= side.
  assert max(heights) <= h and max(widths) <= w
  want = _numpy_box_ratios(np.random.default_rng(0), 20_000, h, w)
  # Shares are fractions k / (h w): round off float32's last bits so equal
  # fractions tie in the two samples.
  got = np.round(out['ratio'].astype(np.float64), 6)
  assert stats.ks_2samp(got, np.round(want, 6)).pvalue > 1e-3


def test_reference_pairing_per_device_block_and_mixup_cutmix_split():
  # 2 blocks of 2m = 8 rows: output i of block j mixes rows i and i + m.
  images = np.zeros((16, 4, 4, 3), np.uint8)
  images[[0, 1, 2, 3, 8, 9, 10, 11]] = 255
  batch = {'images': jnp.asarray(images), 'labels': jnp.arange(16)}
  out = _mix(
    batch, mixup_alpha=0.2, use_cutmix=True, pairing='reference', num_shards=2
  )
  np.testing.assert_array_equal(out['labels'], [0, 1, 2, 3, 8, 9, 10, 11])
  np.testing.assert_array_equal(out['mix_labels'], [4, 5, 6, 7, 12, 13, 14, 15])
  share = out['images'][..., 0] / 255.0
  flat = np.ptp(share, axis=(1, 2)) < 1e-6  # MixUp: one weight everywhere.
  binary = np.all((share == 0) | (share == 1), axis=(1, 2))
  # The first half of each block is MixUp, the rest CutMix.
  assert flat[[0, 1, 4, 5]].all() and binary[[2, 3, 6, 7]].all()
  np.testing.assert_allclose(out['ratio'], share.mean(axis=(1, 2)), atol=1e-5)


def test_in_batch_pairing_uses_each_image_once_per_side():
  labels = jnp.arange(8)
  batch = {'images': jnp.zeros((8, 4, 4, 3), jnp.uint8), 'labels': labels}
  out = _mix(
    batch, mixup_alpha=0.2, use_cutmix=True, pairing='in_batch', num_shards=2
  )
  np.testing.assert_array_equal(out['labels'], np.arange(8))
  # Partner = the previous row of the same device block, cyclically.
  np.testing.assert_array_equal(out['mix_labels'], [3, 0, 1, 2, 7, 4, 5, 6])
  assert sorted(out['mix_labels']) == list(range(8))


def test_label_weights_are_the_pixel_shares():
  # The trainer's targets give class(x1) the share of x1's pixels.
  config = _config(
    mixup_alpha=0.2, cutmix=True, augment_on='device', mix_pairing='reference'
  )
  fn = device_augment.make_batch_fn(config)
  batch = _two_tone(64, 8, 8)
  out = jax.tree.map(np.asarray, jax.jit(fn)(batch, jax.random.key(1)))
  pixels = out['images'] * STD + MEAN
  share = pixels[..., 0].mean(axis=(1, 2)) / 255.0
  smoothing = {'label_keep': 1.0, 'label_floor': 0.0}
  targets = np.asarray(losses.make_targets(out, 128, smoothing))
  rows = np.arange(64)
  np.testing.assert_allclose(targets[rows, rows], share, atol=1e-4)
  np.testing.assert_allclose(targets[rows, rows + 64], 1 - share, atol=1e-4)


def test_batch_fn_without_mixing_normalises_like_the_host():
  config = _config(augment_on='device')
  fn = device_augment.make_batch_fn(config)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
  out = fn({'images': images, 'labels': np.arange(4)}, jax.random.key(0))
  assert set(out) == {'images', 'labels'}
  np.testing.assert_allclose(out['images'], (images - MEAN) / STD, rtol=1e-6)


def test_batch_fn_output_has_the_host_keys_and_shapes():
  config = _config(
    mixup_alpha=0.2,
    cutmix=True,
    randaugment='405',
    augment_on='device',
    mix_pairing='reference',
  )
  out = jax.jit(device_augment.make_batch_fn(config))(
    _two_tone(4, 8, 8), jax.random.key(0)
  )
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
    'images': ((4, 8, 8, 3), jnp.float32),
    'labels': ((4,), jnp.int32),
    'mix_labels': ((4,), jnp.int32),
    'ratio': ((4,), jnp.float32),
  }


def test_placement_and_pairing_resolution():
  resolve = device_augment.resolve_placement
  assert resolve(_config(), 'gpu') == 'device'
  assert resolve(_config(), 'tpu') == 'device'
  assert resolve(_config(), 'cpu') == device_augment.CPU_PLACEMENT
  assert resolve(_config(augment_on='host'), 'gpu') == 'host'
  # The python loader has no host-side augmentation: 'auto' picks the step
  # for a recipe with any, and keeps plain batches on the host.
  recipe = dict(mixup_alpha=0.2, randaugment='205')
  assert resolve(_config(loader='tf', **recipe), 'cpu') == 'host'
  assert resolve(_config(loader='python', **recipe), 'cpu') == 'device'
  assert resolve(_config(loader='python', randaugment='205'), 'cpu') == 'device'
  assert resolve(_config(loader='python'), 'cpu') == 'host'
  explicit = _config(loader='python', augment_on='host', **recipe)
  assert resolve(explicit, 'cpu') == 'host'
  assert device_augment.make_batch_fn(_config(), backend='cpu') is None
  pairing = device_augment.resolve_pairing
  assert pairing(_config(), 'device') == 'in_batch'
  assert pairing(_config(), 'host') == 'reference'
  with pytest.raises(ValueError, match='augment_on'):
    resolve(_config(augment_on='gpu'))
  with pytest.raises(ValueError, match='mix_pairing'):
    pairing(_config(mix_pairing='timm'), 'host')


def test_auto_choices_name_what_each_auto_setting_chose():
  choices = device_augment.auto_choices
  mixing = dict(loader='python', mixup_alpha=0.2)
  assert choices(_config(**mixing), 'gpu') == {
    'data.augment_on': 'device',
    'data.mix_pairing': 'in_batch',
  }  # The loader was named: no choice.
  assert choices(_config(loader='tf', mixup_alpha=0.2), 'cpu') == {
    'data.augment_on': 'host',
    'data.mix_pairing': 'reference',
  }
  # Without mixing the pairing is no part of the recipe; a setting given
  # is no choice.
  assert choices(_config(loader='tf'), 'gpu') == {'data.augment_on': 'device'}
  assert choices(_config(loader='tf', augment_on='host'), 'gpu') == {}
  # 'auto' loader: tf.data where TensorFlow imports (it does here).
  assert choices(_config(augment_on='host'), 'cpu') == {'data.loader': 'tf'}


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
  """ROOT/train/{cat,coffee}/ with JPEG photos, for the Inception crop."""
  root = tmp_path_factory.mktemp('jpegs')
  for name in ('chelsea', 'coffee'):
    os.makedirs(root / 'train' / name)
    photo = getattr(skimage.data, name)()
    for i in range(4):
      img = Image.fromarray(photo).resize((80 + 10 * i, 60))
      img.save(root / 'train' / name / f'{i}.jpg')
  return str(root)


@pytest.mark.parametrize('pairing,rows', [('reference', 8), ('in_batch', 4)])
def test_device_placement_ships_uint8_crops_only(jpegs, pairing, rows):
  # The host does no mixing, RandAugment or normalisation: its batch is the
  # plain pipeline's crops (same seeds), rounded to uint8; 'reference'
  # pairing ships 2b images, 'in_batch' b.
  recipe = dict(
    name='folder',
    folder_root=jpegs,
    eval_split='train',
    mixup_alpha=0.2,
    cutmix=True,
    randaugment='405',
  )
  shipped = next(
    data.make_train_iterator(
      _config(**recipe, augment_on='device', mix_pairing=pairing),
      global_batch_size=4,
    )
  )
  assert set(shipped) == {'images', 'labels'}
  assert shipped['images'].dtype == np.uint8
  assert shipped['images'].shape == (rows, 32, 32, 3)
  plain = next(
    data.make_train_iterator(
      _config(
        name='folder', folder_root=jpegs, eval_split='train', augment_on='host'
      ),
      global_batch_size=rows,
    )
  )
  want = np.clip(np.round(plain['images'] * STD + MEAN), 0, 255)
  np.testing.assert_allclose(shipped['images'], want, atol=1.0)
  np.testing.assert_array_equal(shipped['labels'], plain['labels'])
