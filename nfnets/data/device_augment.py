"""MixUp, CutMix, RandAugment and normalisation inside the jitted train step.

With `config.data.augment_on` resolving to 'device', the host pipeline only
decodes, crops, flips and resizes, and ships uint8 images; the train step
calls the `batch_fn` built here (`make_batch_fn`) on the global batch before
the forward pass. It returns what the host path returns: float32 `images`
(normalised with `recipe.MEAN_RGB` / `STDDEV_RGB`), `labels`, and with
mixing on `mix_labels` and `ratio` (the weight of `labels`).

Pairing (`config.data.mix_pairing`):
  'reference': the host ships 2b images and example i of each block of b
    outputs mixes images i and i + b of its block of 2b, as DeepMind's
    reference does (every output blends two distinct images, each decoded
    image is used once).
  'in_batch': the host ships b images and example i mixes image i with
    image i - 1 of its block (a roll, as timm's mixing does), so each decoded
    image is the first image of one pair and the second of another: half
    the decoding per output.
A block is one device's rows (`num_shards` blocks), so the pairs never
cross devices. Within a block of b outputs the first b // 2 are MixUp and
the rest CutMix when both are on, as on the host.

The randomness is per example from the step's key: the MixUp ratio, the
CutMix box and each example's RandAugment ops, so a resumed run draws the
same augmentation for the same step.
"""

import jax
import jax.numpy as jnp

from nfnets.data import config as config_lib
from nfnets.data import device_randaugment, recipe

PLACEMENTS = ('auto', 'host', 'device')
PAIRINGS = ('auto', 'reference', 'in_batch')
# 'auto' on a CPU backend: the host (docs/data.md). On a CPU the "device" is
# the same cores and both placements cost little next to the model step
# (measured: 0.3% of an F0 step on the device), so the reference's recipe
# is kept exactly, with tf.data's threads overlapping it with the step.
CPU_PLACEMENT = 'host'


def resolve_placement(data_config, backend=None):
  """Returns 'host' or 'device' for `config.data.augment_on`.

  Args:
    data_config: the `config.data` ConfigDict.
    backend: the JAX backend name; None = `jax.default_backend()`.

  Returns:
    'host' or 'device' ('auto' is 'device' on GPU/TPU, `CPU_PLACEMENT` on
    a CPU, and 'device' there too when the python loader, which has no
    host-side MixUp, CutMix or RandAugment, meets a recipe with them).
  """
  where = data_config.get('augment_on', 'auto')
  if where not in PLACEMENTS:
    raise ValueError(
      f'config.data.augment_on={where!r}; valid: {list(PLACEMENTS)}.'
    )
  if where != 'auto':
    return where
  backend = backend or jax.default_backend()
  if backend != 'cpu' or _python_loader_augments(data_config):
    return 'device'
  return CPU_PLACEMENT


def _python_loader_augments(data_config):
  """Whether the python loader, which cannot augment on the host, must."""
  augments = mixing_on(data_config) or bool(data_config.randaugment)
  return augments and config_lib.resolve_loader(data_config) == 'python'


def resolve_pairing(data_config, placement):
  """Returns 'reference' or 'in_batch' for `config.data.mix_pairing`.

  'auto' is 'in_batch' when augmenting on the device (the reason to move
  augmentation there is a host that cannot decode fast enough, and in-batch
  pairing halves the decoding) and 'reference' on the host (the reference
  recipe exactly).
  """
  pairing = data_config.get('mix_pairing', 'auto')
  if pairing not in PAIRINGS:
    raise ValueError(
      f'config.data.mix_pairing={pairing!r}; valid: {list(PAIRINGS)}.'
    )
  if pairing != 'auto':
    return pairing
  return 'in_batch' if placement == 'device' else 'reference'


def auto_choices(data_config, backend=None) -> dict:
  """What this host makes of the data settings left at 'auto'.

  One config trains another recipe elsewhere: 'auto' places augmentation
  by backend (and pairs MixUp/CutMix by placement) and picks the loader by
  whether TensorFlow imports. A run records these, so that a resume on
  another host is told (`nfnets.train.provenance.resume_changes`).

  Returns:
    `{dotted key: chosen value}` for each of `data.loader`,
    `data.augment_on` and (with mixing) `data.mix_pairing` at 'auto'.
  """
  choices = {}
  if data_config.get('loader', 'auto') == 'auto':
    choices['data.loader'] = config_lib.resolve_loader(data_config)
  placement = resolve_placement(data_config, backend)
  if data_config.get('augment_on', 'auto') == 'auto':
    choices['data.augment_on'] = placement
  if (
    mixing_on(data_config) and data_config.get('mix_pairing', 'auto') == 'auto'
  ):
    choices['data.mix_pairing'] = resolve_pairing(data_config, placement)
  return choices


def mixing_on(data_config):
  """Whether MixUp or CutMix is on."""
  return data_config.mixup_alpha > 0 or bool(data_config.cutmix)


def normalize(images):
  """Maps 0..255 images to float32 with the host's per-channel mean/std."""
  mean = jnp.asarray(recipe.MEAN_RGB, jnp.float32)
  std = jnp.asarray(recipe.STDDEV_RGB, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def cutmix_boxes(key, n, height, width):
  """n CutMix boxes (y0, x0, y1, x1), half-open, as `mixing.cutmix_boxes`.

  Sides sqrt(1 - lam) * (H, W) for lam ~ U(0, 1), truncated and halved,
  centred at a uniformly drawn pixel, clipped to the image.
  """
  k_lam, k_y, k_x = jax.random.split(key, 3)
  lam = jax.random.uniform(k_lam, (n,))
  cy = jax.random.randint(k_y, (n,), 0, height)
  cx = jax.random.randint(k_x, (n,), 0, width)
  side = jnp.sqrt(1.0 - lam)
  half_h = (side * height).astype(jnp.int32) // 2
  half_w = (side * width).astype(jnp.int32) // 2
  y0 = jnp.clip(cy - half_h, 0, height)
  y1 = jnp.clip(cy + half_h, 0, height)
  x0 = jnp.clip(cx - half_w, 0, width)
  x1 = jnp.clip(cx + half_w, 0, width)
  return jnp.stack([y0, x0, y1, x1], axis=1)


def box_masks(boxes, height, width):
  """float32 [n, H, W, 1]: 1 inside each half-open box, else 0."""
  ys = jnp.arange(height)[None, :, None]
  xs = jnp.arange(width)[None, None, :]
  y0, x0, y1, x1 = (boxes[:, None, None, i] for i in range(4))
  inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return inside.astype(jnp.float32)[..., None]


def mix_pairs(x1, x2, key, *, mixup_alpha, num_mixup):
  """Mixes image pairs: MixUp for the first `num_mixup`, CutMix after.

  Args:
    x1: float32 [n, H, W, 3], the first images (weight `ratio`).
    x2: float32 [n, H, W, 3], their partners.
    key: PRNG key.
    mixup_alpha: Beta(alpha, alpha) for MixUp (> 0 when num_mixup > 0).
    num_mixup: rows 0..num_mixup-1 are MixUp-ed, the others CutMix-ed.

  Returns:
    (float32 [n, H, W, 3] mixed images, float32 [n] ratio).
  """
  n, h, w = x1.shape[:3]
  k_beta, k_box = jax.random.split(key)
  if mixup_alpha > 0:
    beta = jax.random.beta(k_beta, mixup_alpha, mixup_alpha, (n,))
  else:
    beta = jnp.ones((n,), jnp.float32)
  masks = box_masks(cutmix_boxes(k_box, n, h, w), h, w)
  is_mixup = jnp.arange(n) < num_mixup
  ratio = jnp.where(is_mixup, beta, masks.mean(axis=(1, 2, 3)))
  weight = jnp.where(
    is_mixup[:, None, None, None], beta[:, None, None, None], masks
  )
  return weight * x1 + (1.0 - weight) * x2, ratio.astype(jnp.float32)


def _pairs(images, labels, pairing, num_shards):
  """Splits the shipped batch into (x1, x2, y1, y2), per device block."""
  n = images.shape[0]
  if n % num_shards:
    raise ValueError(f'{n} rows do not split into {num_shards} shards.')
  blocks = lambda a: a.reshape(num_shards, n // num_shards, *a.shape[1:])
  x, y = blocks(images), blocks(labels)
  if pairing == 'reference':
    m = x.shape[1] // 2
    parts = (x[:, :m], x[:, m : 2 * m], y[:, :m], y[:, m : 2 * m])
  else:
    parts = (x, jnp.roll(x, 1, axis=1), y, jnp.roll(y, 1, axis=1))
  return [p.reshape(-1, *p.shape[2:]) for p in parts]


def mix_batch(batch, key, *, mixup_alpha, use_cutmix, pairing, num_shards=1):
  """Mixes a shipped uint8 batch into float images and mixed targets.

  Args:
    batch: `images` uint8 [N, H, W, 3] and `labels` int32 [N]; N = 2b for
      'reference' pairing, b for 'in_batch'.
    key: PRNG key for this batch.
    mixup_alpha: Beta(alpha, alpha) for MixUp; 0 = off.
    use_cutmix: whether CutMix is on (with MixUp: half of each block).
    pairing: 'reference' or 'in_batch' (see the module docstring).
    num_shards: device blocks the rows come in; pairs stay in a block.

  Returns:
    dict: float32 `images` [b, H, W, 3] (0..255, unclamped), `labels`,
    `mix_labels` (int32 [b]) and `ratio` (float32 [b]).
  """
  if mixup_alpha <= 0 and not use_cutmix:
    raise ValueError('mix_batch needs mixup_alpha > 0 or use_cutmix=True.')
  x1, x2, y1, y2 = _pairs(batch['images'], batch['labels'], pairing, num_shards)
  b = x1.shape[0] // num_shards
  num_mixup = (b // 2 if use_cutmix else b) if mixup_alpha > 0 else 0
  keys = jax.random.split(key, num_shards)
  mix = jax.vmap(
    lambda a, c, k: mix_pairs(
      a, c, k, mixup_alpha=mixup_alpha, num_mixup=num_mixup
    )
  )
  split = lambda a: a.reshape(num_shards, b, *a.shape[1:]).astype(jnp.float32)
  images, ratio = mix(split(x1), split(x2), keys)
  return {
    'images': images.reshape(-1, *images.shape[2:]),
    'labels': y1,
    'mix_labels': y2,
    'ratio': ratio.reshape(-1),
  }


def _randaugment(images, key, data_config):
  """RandAugment of float or uint8 images (floats clipped and truncated)."""
  num_layers, magnitude = recipe.parse_level(data_config.randaugment)
  if images.dtype != jnp.uint8:
    images = jnp.clip(images, 0.0, 255.0).astype(jnp.uint8)
  return device_randaugment.randaugment_batch(
    images, key, num_layers, magnitude, bool(data_config.randaugment_quirks)
  )


def make_batch_fn(data_config, num_shards=1, backend=None):
  """Returns the step's `batch_fn(batch, key) -> batch`, or None on host.

  Args:
    data_config: the `config.data` ConfigDict.
    num_shards: devices the global batch is split over (pairs stay on one).
    backend: JAX backend for `augment_on='auto'`; None = the default one.

  Returns:
    None when augmentation runs on the host; otherwise a jit-friendly
    function of the shipped uint8 batch and a key that applies (RandAugment
    before mixing if `augment_before_mix`), MixUp/CutMix, RandAugment after
    mixing (the reference's order) and normalisation.
  """
  placement = resolve_placement(data_config, backend)
  if placement == 'host':
    return None
  pairing = resolve_pairing(data_config, placement)
  mix = mixing_on(data_config)
  ra = bool(data_config.randaugment)
  ra_before = ra and (data_config.augment_before_mix or not mix)

  def batch_fn(batch, key):
    k_ra, k_mix = jax.random.split(key)
    images = batch['images']
    if ra_before:
      images = _randaugment(images, k_ra, data_config)
    out = {k: v for k, v in batch.items() if k != 'images'}
    if mix:
      out = mix_batch(
        {'images': images, 'labels': batch['labels']},
        k_mix,
        mixup_alpha=float(data_config.mixup_alpha),
        use_cutmix=bool(data_config.cutmix),
        pairing=pairing,
        num_shards=num_shards,
      )
      images = out['images']
      if ra and not ra_before:
        images = _randaugment(images, k_ra, data_config)
    return {**out, 'images': normalize(images)}

  return batch_fn
