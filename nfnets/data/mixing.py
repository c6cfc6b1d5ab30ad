"""MixUp and CutMix on a batch, as in DeepMind's NFNet pipeline.

The reference draws a batch of 2B images and returns B mixed examples, so
every output is a blend of two distinct images and no image is used twice:
with both MixUp and CutMix on, pairs (i, i + B) for the first half of the
outputs are MixUp-ed and the rest CutMix-ed. `ratio` is the weight of
`labels` (the first image's) and `mix_labels` holds the partner's label, so
the target is `ratio * onehot(labels) + (1 - ratio) * onehot(mix_labels)`.
"""

import tensorflow as tf


def sample_beta(seed, alpha, shape):
  """Beta(alpha, alpha) samples from two stateless Gamma draws."""
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  g1 = tf.random.stateless_gamma(shape, s1, alpha=alpha)
  g2 = tf.random.stateless_gamma(shape, s2, alpha=alpha)
  return g1 / (g1 + g2)


def cutmix_boxes(seed, n, height, width):
  """Samples n CutMix boxes: area share ~ sqrt(1 - U) sides, random centre.

  The box sides are sqrt(1 - lam) * (H, W) for lam ~ U(0, 1), centred at a
  uniformly drawn pixel and clipped to the image.

  Args:
    seed: stateless seed [2].
    n: number of boxes.
    height: image height H.
    width: image width W.

  Returns:
    int32 [n, 4] boxes (y0, x0, y1, x1), half-open.
  """
  s1, s2, s3 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  lam = tf.random.stateless_uniform([n], s1)
  cy = tf.random.stateless_uniform([n], s2, 0, height, dtype=tf.int32)
  cx = tf.random.stateless_uniform([n], s3, 0, width, dtype=tf.int32)
  side = tf.sqrt(1.0 - lam)
  half_h = tf.cast(side * height, tf.int32) // 2
  half_w = tf.cast(side * width, tf.int32) // 2
  y0 = tf.clip_by_value(cy - half_h, 0, height)
  y1 = tf.clip_by_value(cy + half_h, 0, height)
  x0 = tf.clip_by_value(cx - half_w, 0, width)
  x1 = tf.clip_by_value(cx + half_w, 0, width)
  return tf.stack([y0, x0, y1, x1], axis=1)


def box_masks(boxes, height, width):
  """float32 [n, H, W, 1] masks: 1 inside each half-open box, else 0."""
  ys = tf.range(height)[None, :, None]
  xs = tf.range(width)[None, None, :]
  # [n, 1, 1] each; tf.unstack avoids autograph rewriting a comprehension.
  y0, x0, y1, x1 = tf.unstack(boxes[:, None, None, :], axis=-1)
  inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return tf.cast(inside, tf.float32)[..., None]


def mixup(images1, images2, ratio):
  """MixUp: ratio * images1 + (1 - ratio) * images2, ratio per example."""
  r = ratio[:, None, None, None]
  return r * images1 + (1.0 - r) * images2


def cutmix(images1, images2, boxes):
  """CutMix: images1 inside each box, images2 outside.

  Returns:
    (mixed images, ratio) where ratio = the box's share of the image area,
    i.e. the weight of images1's label.
  """
  height, width = images1.shape[1], images1.shape[2]
  mask = box_masks(boxes, height, width)
  ratio = tf.reduce_mean(mask, axis=[1, 2, 3])
  return mask * images1 + (1.0 - mask) * images2, ratio


def mix_batch(
  batch, seed, *, mixup_alpha=0.2, use_cutmix=True, pairing='reference'
):
  """Mixes a batch of 2B images (or B, in-batch pairing) into B examples.

  Args:
    batch: dict with float `images` [2B, H, W, 3] and int32 `labels` [2B]
      ([B] each with 'in_batch' pairing).
    seed: stateless seed [2] for this batch.
    mixup_alpha: Beta(alpha, alpha) for MixUp; 0 turns MixUp off.
    use_cutmix: whether CutMix is on. With both on, the first B // 2 outputs
      are MixUp and the rest CutMix (the reference's half/half split).
    pairing: 'reference' (output i mixes images i and i + B) or 'in_batch'
      (output i mixes image i with image i - 1, cyclically: each image is
      used once as a first and once as a second image).

  Returns:
    dict with `images` [B, H, W, 3], `labels`, `mix_labels` (int32 [B]) and
    `ratio` (float32 [B], the weight of `labels`).
  """
  if mixup_alpha <= 0 and not use_cutmix:
    raise ValueError('mix_batch needs mixup_alpha > 0 or use_cutmix=True.')
  images, labels = batch['images'], batch['labels']
  if pairing == 'in_batch':
    x1, x2 = images, tf.roll(images, 1, axis=0)
    y1, y2 = labels, tf.roll(labels, 1, axis=0)
  else:
    b = images.shape[0] // 2
    x1, x2 = images[:b], images[b : 2 * b]
    y1, y2 = labels[:b], labels[b : 2 * b]
  b = x1.shape[0]
  n_mixup = (b // 2 if use_cutmix else b) if mixup_alpha > 0 else 0
  seed_mixup, seed_cutmix = tf.unstack(
    tf.random.experimental.stateless_split(seed, 2)
  )
  parts_x, parts_r = [], []
  if n_mixup:
    r = sample_beta(seed_mixup, mixup_alpha, [n_mixup])
    parts_x.append(mixup(x1[:n_mixup], x2[:n_mixup], r))
    parts_r.append(r)
  if n_mixup < b:
    boxes = cutmix_boxes(seed_cutmix, b - n_mixup, *images.shape[1:3])
    mixed, r = cutmix(x1[n_mixup:], x2[n_mixup:], boxes)
    parts_x.append(mixed)
    parts_r.append(r)
  return {
    'images': tf.concat(parts_x, 0),
    'labels': y1,
    'mix_labels': y2,
    'ratio': tf.concat(parts_r, 0),
  }
