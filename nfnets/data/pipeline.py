"""Training and evaluation input pipelines (tf.data in, NumPy batches out).

`make_train_iterator` yields this process's share of each global batch,
forever: `images` float32 [b, S, S, 3] (normalised), `labels` int32 [b], and
with MixUp/CutMix on also `mix_labels` int32 [b] and `ratio` float32 [b]
(the weight of `labels`). `make_eval_iterator` makes one pass over the
evaluation split with full-size batches; the last one is padded and `mask`
(float32 [b]) is 0 on padding, so any split size works with any batch size
and device count, and every process yields the same number of batches.

The order of training work per example follows DeepMind's reference:
read -> repeat -> shuffle -> crop/flip/resize -> batch 2b -> mix -> (unbatch
-> RandAugment -> rebatch b) -> normalise. All randomness is stateless and
derived from (config.data.seed, the `seed` argument, process_index).

With `config.data.augment_on` resolving to 'device' (`device_augment`) the
pipeline stops after crop/flip/resize: it yields `images` uint8 [n, S, S, 3]
(rounded and clipped) and `labels` [n], n = 2b with MixUp/CutMix and
'reference' pairing, else b, and the train step mixes, augments and
normalises them (`device_augment.make_batch_fn`).
"""

import numpy as np
import tensorflow as tf

from nfnets.data import (
  augment,
  device_augment,
  mixing,
  plan,
  preprocess,
  recipe,
  sources,
)


def _seeds(data_config, seed, process_index):
  """(file-shuffle seed, buffer-shuffle seed, augmentation seed [2])."""
  state = np.random.SeedSequence(
    [int(data_config.seed), int(seed), int(process_index)]
  ).generate_state(4, np.uint32)
  aug = tf.constant(state[2:].astype(np.int64))
  return int(state[0] >> 1), int(state[1] >> 1), aug


def _options(data_config, deterministic):
  opts = tf.data.Options()
  opts.deterministic = deterministic
  opts.experimental_optimization.map_parallelization = True
  if data_config.num_threads > 0:
    opts.threading.private_threadpool_size = data_config.num_threads
  return opts


def _map(ds, fn, parallel=True):
  """ds.map without autograph: our functions use explicit TF control flow,
  and skipping the conversion makes tracing several times faster."""
  fn = tf.autograph.experimental.do_not_convert(fn)
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE if parallel else None)


def _loaded(ds, shard):
  """`ds` (the shard's dataset, maybe shuffled) as examples (`Shard.load`)."""
  return ds if shard.load is None else _map(ds, shard.load)


def _fold(seed, index):
  return tf.random.experimental.stateless_fold_in(seed, index)


def _randaugment_float(image, seed, level, quirks):
  """RandAugment on a float 0..255 image: clip, uint8, augment, float."""
  num_layers, magnitude = recipe.parse_level(level)
  image = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
  image = augment.randaugment(image, seed, num_layers, magnitude, quirks)
  return tf.cast(image, tf.float32)


def _per_example_fn(data_config, mode, aug_seed, ra_before_mix):
  size = data_config.train_image_size

  def fn(index, ex):
    seed = _fold(aug_seed, index)
    image = preprocess.train_preprocess(ex['image'], seed, size, mode)
    if ra_before_mix:
      ra_seed = _fold(seed, 1)
      image = _randaugment_float(
        image, ra_seed, data_config.randaugment, data_config.randaugment_quirks
      )
    return {'images': image, 'labels': ex['label']}

  return fn


def _is_ready_array(ds, mode, size):
  """True when examples are already uint8 [S, S, 3] and need no crop."""
  spec = ds.element_spec['image']
  return (
    mode == 'resize'
    and spec.dtype == tf.uint8
    and tuple(spec.shape) == (size, size, 3)
  )


def _crop_and_batch(ds, data_config, mode, aug_seed, batch, ra_before):
  """Per-example preprocessing then batching (skipped for ready arrays)."""
  auto = tf.data.AUTOTUNE
  size = data_config.train_image_size
  if _is_ready_array(ds, mode, size) and not ra_before:
    # The in-memory digits: batch the uint8 arrays, cast once per batch.
    ds = ds.batch(batch, drop_remainder=True)
    return _map(
      ds,
      lambda ex: {
        'images': tf.cast(ex['image'], tf.float32),
        'labels': ex['label'],
      },
      parallel=False,
    )
  fn = _per_example_fn(data_config, mode, aug_seed, ra_before)
  ds = _map(ds.enumerate(), fn)
  return ds.batch(batch, drop_remainder=True, num_parallel_calls=auto)


def _mix_and_augment(ds, data_config, aug_seed, local_batch, ra_after, pairing):
  """Mixes batches into b examples; RandAugment per mixed image if asked."""
  auto = tf.data.AUTOTUNE
  mix_seed = _fold(aug_seed, -1)

  def mix(index, b):
    return mixing.mix_batch(
      b,
      _fold(mix_seed, index),
      mixup_alpha=float(data_config.mixup_alpha),
      use_cutmix=bool(data_config.cutmix),
      pairing=pairing,
    )

  ds = _map(ds.enumerate(), mix)
  if not ra_after:
    return ds
  ra_seed = _fold(aug_seed, -2)

  def ra(index, ex):
    image = _randaugment_float(
      ex['images'],
      _fold(ra_seed, index),
      data_config.randaugment,
      data_config.randaugment_quirks,
    )
    return {**ex, 'images': image}

  ds = _map(ds.unbatch().enumerate(), ra)
  return ds.batch(local_batch, drop_remainder=True, num_parallel_calls=auto)


def _finalize(ex):
  out = dict(ex)
  out['images'] = preprocess.normalize(ex['images'])
  return out


def _to_uint8(ex):
  """Device placement: round and clip the 0..255 floats to uint8."""
  images = tf.clip_by_value(tf.round(ex['images']), 0.0, 255.0)
  return {**ex, 'images': tf.cast(images, tf.uint8)}


def make_train_dataset(
  data_config, *, global_batch_size, process_index=0, process_count=1, seed=0
):
  """Returns the infinite training tf.data.Dataset of this process's batches.

  Args:
    data_config: the `config.data` ConfigDict.
    global_batch_size: examples per step over all processes.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    seed: extra seed, e.g. the run's seed.

  Returns:
    A dataset of dicts of batched tensors (see the module docstring).
  """
  return _train_dataset(
    data_config, global_batch_size, process_index, process_count, seed
  )[0]


def _train_dataset(
  data_config, global_batch_size, process_index, process_count, seed
):
  """Builds the training dataset; returns (dataset, source, split)."""
  local_batch = plan.local_batch(
    global_batch_size, process_index, process_count
  )
  source = sources.make_source(data_config)
  train_split, _ = sources.resolve_splits(data_config, source)
  mode, _ = plan.resolve_modes(data_config, source.natural_images)
  file_seed, shuffle_seed, aug_seed = _seeds(data_config, seed, process_index)
  shard = source.read(
    train_split,
    image_size=data_config.train_image_size,
    process_index=process_index,
    process_count=process_count,
    shuffle=True,
    seed=file_seed,
  )
  if shard.num_examples == 0:
    raise ValueError(f'Process {process_index} got no training examples.')
  ds = shard.dataset
  if data_config.cache:  # The encoded examples in memory, as asked.
    ds = _loaded(ds, shard).cache()
  if shard.in_memory:
    ds = ds.shuffle(shard.num_examples, seed=shuffle_seed).repeat()
  else:
    # A buffer larger than the shard would only mix epochs and delay start.
    buffer = max(1, min(data_config.shuffle_buffer, shard.num_examples))
    ds = ds.repeat().shuffle(buffer, seed=shuffle_seed)
  if not data_config.cache:
    ds = _loaded(ds, shard)
  placement = device_augment.resolve_placement(data_config)
  pairing = device_augment.resolve_pairing(data_config, placement)
  on_host = placement == 'host'
  ra = bool(data_config.randaugment) and on_host
  mix = device_augment.mixing_on(data_config)
  ra_before = ra and (data_config.augment_before_mix or not mix)
  paired = mix and pairing == 'reference'
  batch = 2 * local_batch if paired else local_batch
  ds = _crop_and_batch(ds, data_config, mode, aug_seed, batch, ra_before)
  if mix and on_host:
    ds = _mix_and_augment(
      ds, data_config, aug_seed, local_batch, ra and not ra_before, pairing
    )
  ds = _map(ds, _finalize if on_host else _to_uint8)
  ds = ds.with_options(_options(data_config, data_config.deterministic))
  return ds.prefetch(tf.data.AUTOTUNE), source, train_split


def make_eval_dataset(
  data_config, *, global_batch_size, process_index=0, process_count=1
):
  """Returns one padded pass over the eval split for this process.

  Args:
    data_config: the `config.data` ConfigDict.
    global_batch_size: examples per step over all processes.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    A finite dataset of dicts `images`, `labels`, `mask`; every process
    gets ceil(split size / global_batch_size) full-size batches.
  """
  return _eval_dataset(
    data_config, global_batch_size, process_index, process_count
  )[0]


def _eval_dataset(data_config, global_batch_size, process_index, process_count):
  """Builds the eval dataset; returns (dataset, source, split)."""
  local_batch = plan.local_batch(
    global_batch_size, process_index, process_count
  )
  source = sources.make_source(data_config)
  _, eval_split = sources.resolve_splits(data_config, source)
  _, mode = plan.resolve_modes(data_config, source.natural_images)
  size = data_config.eval_image_size
  shard = source.read(
    eval_split,
    image_size=size,
    process_index=process_index,
    process_count=process_count,
    shuffle=False,
    seed=0,
  )
  total = source.num_examples(eval_split)
  num_padding = (
    plan.eval_num_batches(total, global_batch_size) * local_batch
    - shard.num_examples
  )
  ds = _map(
    _loaded(shard.dataset, shard),
    lambda ex: {
      'images': preprocess.eval_preprocess(ex['image'], size, mode),
      'labels': ex['label'],
      'mask': tf.constant(1.0),
    },
  )
  padding = tf.data.Dataset.from_tensors(
    {
      'images': tf.zeros([size, size, 3]),
      'labels': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0),
    }
  ).repeat(num_padding)
  ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
  ds = _map(ds, _finalize)
  ds = ds.with_options(_options(data_config, deterministic=True))
  return ds.prefetch(tf.data.AUTOTUNE), source, eval_split


def _numpy_batches(ds, source, split):
  """Yields NumPy batches; names corrupt files if decoding fails."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      find = getattr(source, 'find_corrupt_files', None)
      bad = find(split) if find else []
      if not bad:
        raise
      raise ValueError(
        f'Cannot decode {len(bad)} image(s) in split {split!r}: {bad[:10]}. '
        'Re-encode or replace them (e.g. with PIL), or move them out of the '
        'dataset folder, and rerun the same command: the run resumes from '
        'its last checkpoint.'
      ) from e
    yield batch


def make_train_iterator(
  data_config, *, global_batch_size, process_index=0, process_count=1, seed=0
):
  """Returns an infinite iterator of this process's NumPy training batches.

  Args:
    data_config: the `config.data` ConfigDict.
    global_batch_size: examples per step over all processes; each process
      gets global_batch_size // process_count of them.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    seed: extra seed, e.g. the run's seed.

  Returns:
    Iterator of dicts: `images` float32 [b, S, S, 3], `labels` int32 [b],
    plus `mix_labels` int32 [b] and `ratio` float32 [b] when mixing is on.
  """
  ds, source, split = _train_dataset(
    data_config, global_batch_size, process_index, process_count, seed
  )
  return _numpy_batches(ds, source, split)


def make_eval_iterator(
  data_config, *, global_batch_size, process_index=0, process_count=1
):
  """Returns an iterator over one padded pass of the eval split.

  Args:
    data_config: the `config.data` ConfigDict.
    global_batch_size: examples per step over all processes.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    Iterator of dicts: `images` float32 [b, S, S, 3], `labels` int32 [b],
    `mask` float32 [b] (1 for real examples, 0 for padding).
  """
  ds, source, split = _eval_dataset(
    data_config, global_batch_size, process_index, process_count
  )
  return _numpy_batches(ds, source, split)
