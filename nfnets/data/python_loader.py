"""The TensorFlow-free input loader (`config.data.loader='python'`).

The same iterators as `pipeline.py`, with the same batch contract, built
from PIL decoding and NumPy transforms (`numpy_preprocess`) on a thread
pool: `make_train_iterator` yields this process's share of each global
batch forever, `make_eval_iterator` one padded pass over the eval split.

Training batches are what tf.data yields with `augment_on='device'`:
`images` uint8 [n, S, S, 3] (rounded and clipped) and `labels` int32 [n],
n = 2b with MixUp/CutMix and 'reference' pairing, else b; the train step
mixes, augments and normalises them (`device_augment.make_batch_fn`).
With the augmentation placed on the host and no MixUp, CutMix or
RandAugment configured (e.g. the quickstart on a CPU), `images` are
float32 and normalised, as tf.data's. Host-side MixUp, CutMix and
RandAugment are tf.data's alone: asking for them here is an error.

Order and randomness: each epoch is a full permutation of this process's
examples, drawn from (config.data.seed, `seed`, process_index, epoch); the
k-th example of the stream is cropped and flipped with a NumPy generator
seeded by (the augmentation seed, k). Everything is a function of the
example's position, so batches are deterministic whatever the thread
timing, and `start_batch=k` starts where k batches of skipping would,
without decoding them.
"""

import collections
import concurrent.futures
import itertools
import os

import numpy as np

from nfnets.data import device_augment, plan, sources
from nfnets.data import numpy_preprocess as npp

# Batches decoded ahead of the one being consumed.
PREFETCH_BATCHES = 3


def _seeds(data_config, seed, process_index):
  """(shuffle seed, augmentation seed) of this process, both ints."""
  state = np.random.SeedSequence(
    [int(data_config.seed), int(seed), int(process_index)]
  ).generate_state(2, np.uint32)
  return int(state[0]), int(state[1])


def _num_threads(data_config):
  return int(data_config.num_threads) or os.cpu_count() or 1


def _decode_failure(image, error):
  """A ValueError naming the file (or record) that cannot be decoded."""
  what = repr(image) if isinstance(image, str) else 'a record'
  return ValueError(
    f'Cannot decode {what} ({error}). Re-encode or replace it (e.g. with '
    'PIL), or move it out of the dataset folder, and rerun the same '
    'command: the run resumes from its last checkpoint.'
  )


def _prefetched(make_batch_jobs, assemble, num_threads):
  """Runs each batch's jobs on a thread pool; yields the batches in order.

  Args:
    make_batch_jobs: () -> the next batch's [(fn, *args)], or None at the
      end.
    assemble: list of the jobs' results -> the batch.
    num_threads: pool size.

  Yields:
    `assemble(results)` per batch; `PREFETCH_BATCHES` batches run ahead.
  """
  pool = concurrent.futures.ThreadPoolExecutor(num_threads)
  pending = collections.deque()
  try:
    while True:
      while len(pending) < PREFETCH_BATCHES:
        jobs = make_batch_jobs()
        if jobs is None:
          break
        pending.append([pool.submit(*job) for job in jobs])
      if not pending:
        return
      yield assemble([f.result() for f in pending.popleft()])
  finally:
    for futures in pending:
      for f in futures:
        f.cancel()
    pool.shutdown(wait=False, cancel_futures=True)


def _check_placement(data_config):
  """Returns (on_host, rows per output example); refuses host augmentation."""
  placement = device_augment.resolve_placement(data_config)
  mix = device_augment.mixing_on(data_config)
  if placement == 'host' and (mix or data_config.randaugment):
    raise ValueError(
      "config.data.loader='python' runs MixUp, CutMix and RandAugment only "
      "in the train step: set config.data.augment_on='device' (or use "
      "loader='tf', which needs TensorFlow)."
    )
  pairing = device_augment.resolve_pairing(data_config, placement)
  paired = mix and pairing == 'reference'
  return placement == 'host', 2 if paired else 1


class _Order:
  """Maps stream position k to a record index: epoch permutations."""

  def __init__(self, num_examples, seed):
    self._n, self._seed = num_examples, seed
    self._epoch, self._perm = None, None

  def __call__(self, k):
    epoch, pos = divmod(k, self._n)
    if epoch != self._epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._epoch, self._perm = epoch, rng.permutation(self._n)
    return int(self._perm[pos])


def _ready_arrays(records, mode, size):
  """The uint8 [n, S, S, 3] images when examples need no decode or crop."""
  images = getattr(records, 'images', None)  # Only `records.Records`.
  if (
    mode == 'resize'
    and isinstance(images, np.ndarray)
    and images.dtype == np.uint8
    and images.shape[1:] == (size, size, 3)
  ):
    return images
  return None


def _train_example(records, index, aug_seed, k, size, mode):
  """(float32 image, label) of stream position k (record `index`)."""
  image, label = records[index]
  rng = np.random.default_rng([aug_seed, k])
  try:
    out = npp.train_image(image, rng, size, mode)
  except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors.
    raise _decode_failure(image, e) from e
  return out, label


def _train_setup(data_config, global_batch_size, process_index, process_count):
  """Returns (records, train mode, rows per batch, on_host)."""
  local = plan.local_batch(global_batch_size, process_index, process_count)
  on_host, rows = _check_placement(data_config)
  source = sources.make_source(data_config)
  train_split, _ = sources.resolve_splits(data_config, source)
  mode, _ = plan.resolve_modes(data_config, source.natural_images)
  records = source.records(
    train_split,
    image_size=data_config.train_image_size,
    process_index=process_index,
    process_count=process_count,
  )
  if len(records) == 0:
    raise ValueError(f'Process {process_index} got no training examples.')
  return records, mode, rows * local, on_host


def make_train_iterator(
  data_config,
  *,
  global_batch_size,
  process_index=0,
  process_count=1,
  seed=0,
  start_batch=0,
):
  """Returns an infinite iterator of this process's NumPy training batches.

  Args:
    data_config, global_batch_size, process_index, process_count, seed: as
      `nfnets.data.make_train_iterator`.
    start_batch: the first batch to yield: the iterator equals one from 0
      with `start_batch` batches skipped, and decodes none of them.

  Returns:
    Iterator of dicts `images` and int32 `labels` (see the module
    docstring).

  Raises:
    ValueError: for host-side MixUp, CutMix or RandAugment.
  """
  records, mode, batch, on_host = _train_setup(
    data_config, global_batch_size, process_index, process_count
  )
  shuffle_seed, aug_seed = _seeds(data_config, seed, process_index)
  order = _Order(len(records), shuffle_seed)
  size = data_config.train_image_size
  finish = npp.normalize if on_host else npp.to_uint8
  ready = _ready_arrays(records, mode, size)
  if ready is not None:
    return _ready_batches(records, ready, order, batch, start_batch, on_host)
  next_batch = [start_batch]

  def batch_jobs():
    first = next_batch[0] * batch
    next_batch[0] += 1
    return [
      (_train_example, records, order(k), aug_seed, k, size, mode)
      for k in range(first, first + batch)
    ]

  def assemble(results):
    images = np.stack([image for image, _ in results])
    labels = np.asarray([label for _, label in results], np.int32)
    return {'images': finish(images), 'labels': labels}

  return _prefetched(batch_jobs, assemble, _num_threads(data_config))


def _ready_batches(records, images, order, batch, start_batch, on_host):
  """Batches gathered from in-memory arrays (the digits): no threads."""
  for j in itertools.count(start_batch):
    idx = [order(k) for k in range(j * batch, (j + 1) * batch)]
    out = images[idx]
    yield {
      'images': npp.normalize(out) if on_host else out,
      'labels': np.asarray(records.labels[idx], np.int32),
    }


def _eval_example(records, index, size, mode):
  """(image, label, mask 1) of one real eval example."""
  image, label = records[index]
  try:
    return npp.eval_image(image, size, mode), label, 1.0
  except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors.
    raise _decode_failure(image, e) from e


def _padding_example(size):
  """(zero image, label 0, mask 0), as tf.data's padding."""
  return np.zeros([size, size, 3], np.float32), 0, 0.0


def make_eval_iterator(
  data_config, *, global_batch_size, process_index=0, process_count=1
):
  """Returns an iterator over one padded pass of the eval split.

  Args:
    data_config, global_batch_size, process_index, process_count: as
      `nfnets.data.make_eval_iterator`.

  Returns:
    Iterator of dicts: `images` float32 [b, S, S, 3] (normalised), `labels`
    int32 [b], `mask` float32 [b] (1 for real examples, 0 for padding);
    every process yields ceil(split size / global_batch_size) batches.
  """
  local = plan.local_batch(global_batch_size, process_index, process_count)
  source = sources.make_source(data_config)
  _, eval_split = sources.resolve_splits(data_config, source)
  _, mode = plan.resolve_modes(data_config, source.natural_images)
  size = data_config.eval_image_size
  records = source.records(
    eval_split,
    image_size=size,
    process_index=process_index,
    process_count=process_count,
  )
  num_batches = plan.eval_num_batches(
    source.num_examples(eval_split), global_batch_size
  )
  n = len(records)
  next_batch = [0]

  def batch_jobs():
    j = next_batch[0]
    if j == num_batches:
      return None
    next_batch[0] += 1
    return [
      (_eval_example, records, k, size, mode)
      if k < n
      else (_padding_example, size)
      for k in range(j * local, (j + 1) * local)
    ]

  def assemble(results):
    images, labels, mask = zip(*results, strict=True)
    return {
      'images': npp.normalize(np.stack(images)),
      'labels': np.asarray(labels, np.int32),
      'mask': np.asarray(mask, np.float32),
    }

  return _prefetched(batch_jobs, assemble, _num_threads(data_config))
