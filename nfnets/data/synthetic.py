"""ImageNet-like photos and image folders written from scikit-image's photos.

For measuring input pipelines and smoke-testing a training setup where no
dataset can be downloaded: JPEGs of ImageNet's typical size (about 500x375
pixels, about 110 KB at quality 95 with the default noise) cut from
scikit-image's bundled colour photos, so decoding costs what real photos
cost. Labels carry no signal beyond which source photo a crop came from.
"""

import concurrent.futures
import multiprocessing
import os

import numpy as np

# scikit-image's bundled colour photos (no download needed).
_PHOTO_NAMES = (
  'astronaut',
  'chelsea',
  'coffee',
  'rocket',
  'immunohistochemistry',
)


def _source_photos() -> list[np.ndarray]:
  import skimage.data  # noqa: PLC0415  (only for synthetic data)

  photos = [getattr(skimage.data, name)()[..., :3] for name in _PHOTO_NAMES]
  photos.append(skimage.data.stereo_motorcycle()[0])
  return photos


def imagenet_like_photos(
  n: int, seed: int = 0, noise: float = 10.0
) -> list[np.ndarray]:
  """Returns n uint8 RGB photos of about 500x375 (random crops, resized).

  Args:
    n: number of photos.
    seed: seed of the crops, sizes and noise.
    noise: standard deviation of the Gaussian noise added (it sets the JPEG
      size: 10 gives about 110 KB at quality 95, ImageNet's average).

  Returns:
    A list of [H, W, 3] uint8 arrays, H in 340..410 and W in 450..550.
  """
  from PIL import Image  # noqa: PLC0415

  sources = _source_photos()
  rng = np.random.default_rng(seed)
  photos = []
  for i in range(n):
    src = sources[i % len(sources)]
    h, w = src.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    size = (int(rng.uniform(450, 550)), int(rng.uniform(340, 410)))
    crop = Image.fromarray(src[y : y + ch, x : x + cw]).resize(size)
    noisy = np.asarray(crop) + rng.normal(0, noise, (*size[::-1], 3))
    photos.append(np.clip(noisy, 0, 255).astype(np.uint8))
  return photos


def _write_class(args) -> int:
  """Writes one class folder of one split; returns its byte count."""
  folder, count, seed, quality, noise = args
  from PIL import Image  # noqa: PLC0415

  os.makedirs(folder, exist_ok=True)
  total = 0
  for i, photo in enumerate(imagenet_like_photos(count, seed, noise)):
    path = os.path.join(folder, f'{i:05d}.jpg')
    Image.fromarray(photo).save(path, quality=quality)
    total += os.path.getsize(path)
  return total


def write_image_folder(
  root: str,
  num_classes: int,
  images_per_class: dict[str, int],
  *,
  quality: int = 95,
  noise: float = 10.0,
  workers: int = 0,
) -> int:
  """Writes `root/<split>/<class>/<i>.jpg`, the layout of `name='folder'`.

  Args:
    root: output folder (created).
    num_classes: number of class folders per split, named c0000, c0001...
    images_per_class: {split: images in each class folder}, e.g.
      {'train': 30, 'validation': 2}.
    quality: JPEG quality.
    noise: see `imagenet_like_photos`.
    workers: processes writing in parallel; 0 = os.cpu_count().

  Returns:
    The total size of the JPEGs written, in bytes.
  """
  jobs = [
    (os.path.join(root, split, f'c{c:04d}'), count, seed, quality, noise)
    for s, (split, count) in enumerate(sorted(images_per_class.items()))
    for c in range(num_classes)
    for seed in [s * num_classes + c]
  ]
  workers = workers or os.cpu_count() or 1
  # Spawned, not forked: the caller may hold JAX's threads (a test, a
  # notebook), and a forked child of a threaded process can deadlock.
  spawn = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(workers, spawn) as pool:
    return sum(pool.map(_write_class, jobs))
