"""The `config.data` section: which dataset, its preprocessing and recipe.

Free of TensorFlow, so that code which only needs the config or the
device-side augmentation (the benchmark, the train step on an accelerator
host without TensorFlow) imports no input pipeline.
"""

import math
import numbers

import ml_collections

LOADERS = ('auto', 'tf', 'python')
_TFDS_PREFIX = 'tfds/'


def default_config():
  """Returns the `config.data` section (the quickstart's digits defaults).

  Variant configs switch on the reference recipe, e.g. for F0:
  name='imagenet2012', train_image_size=192, eval_image_size=256,
  mixup_alpha=0.2, cutmix=True, randaugment='405'.
  """
  return ml_collections.ConfigDict(
    dict(
      # 'digits' | 'imagenet2012' | 'folder' | 'tfds/<name>'.
      name='digits',
      data_dir='',  # tfds data dir; '' = tfds's default directory.
      folder_root='',  # For name='folder': ROOT/<split>/<class>/<image>.
      image_key='image',  # Feature names for 'tfds/<name>' datasets.
      label_key='label',
      train_split='train',  # tfds slicing allowed, e.g. 'train[10000:]'.
      eval_split='',  # '' = 'validation' if the dataset has one, else 'test'.
      train_image_size=32,
      eval_image_size=32,
      # 'auto' = 'inception_crop_flip' for photos, 'resize' for digits.
      train_preproc='auto',
      # 'auto' = 'resize_crop_32' for photos, 'resize' for digits;
      # or 'crop_resize'.
      eval_preproc='auto',
      mixup_alpha=0.0,  # Beta(alpha, alpha); 0 = off. The reference: 0.2.
      cutmix=False,  # With MixUp on too: half the batch each.
      randaugment='',  # '' = off, or a level like '405' (4 layers, M=5).
      randaugment_quirks=True,  # Reproduce the reference's quirks.
      augment_before_mix=False,  # The reference: RandAugment after mixing.
      # Where MixUp/CutMix/RandAugment/normalisation run: 'host' (tf.data),
      # 'device' (in the train step) or 'auto' (device on GPU/TPU, host on
      # CPU; docs/data.md has the measurements).
      augment_on='auto',
      # MixUp/CutMix partners: 'reference' (2b images mixed into b),
      # 'in_batch' (b images, image i paired with i - 1: half the decoding)
      # or 'auto' (in_batch on the device, reference on the host).
      mix_pairing='auto',
      shuffle_buffer=10_000,  # Examples; in-memory sets shuffle fully.
      seed=0,
      deterministic=True,  # Fixed element order (False: a little faster).
      cache=False,  # Cache the encoded examples in memory after reading.
      # Threads: tf.data's private threadpool (0 = tf.data's default) or
      # the python loader's decoding pool (0 = os.cpu_count()).
      num_threads=0,
      # Which input loader reads the data: 'tf' (tf.data + tfds), 'python'
      # (PIL and NumPy, no TensorFlow; see docs/data.md) or 'auto' ('tf'
      # when TensorFlow imports, else 'python').
      loader='auto',
    )
  )


def resolve_loader(data_config):
  """Returns 'tf' or 'python' for `config.data.loader`.

  Args:
    data_config: the `config.data` ConfigDict.

  Returns:
    The loader: 'auto' is 'tf' when TensorFlow imports (importing it), else
    'python'.

  Raises:
    ValueError: for an unknown loader.
  """
  loader = data_config.get('loader', 'auto')
  if loader not in LOADERS:
    raise ValueError(f'config.data.loader={loader!r}; valid: {list(LOADERS)}.')
  if loader != 'auto':
    return loader
  try:
    import tensorflow  # noqa: F401, PLC0415  (the tf loader needs it anyway)
  except ImportError:
    return 'python'
  return 'tf'


def validate_data_config(data_config) -> None:
  """Checks the settings of `config.data` that need no dataset, cheaply.

  The iterators and `dataset_info` call it first. Without it a
  `train_image_size` of 0 yields empty (b, 0, 0, 3) images silently, a
  negative one fails deep in TensorFlow, 'tfds/' fails in tfds's name
  parser, and a negative `mixup_alpha` is accepted.

  Args:
    data_config: the `config.data` ConfigDict.

  Raises:
    ValueError: a setting is invalid; the message says which and what is
      valid.
  """
  # Imported here: sources imports this module.
  from nfnets.data import sources  # noqa: PLC0415

  name = data_config.name
  if not isinstance(name, str):
    raise ValueError(f'config.data.name must be a string, got {name!r}.')
  sources.check_dataset_name(data_config)
  if name.startswith(_TFDS_PREFIX) and not name[len(_TFDS_PREFIX) :].strip():
    raise ValueError(
      f'config.data.name={name!r} names no tfds dataset: use '
      "'tfds/<name>', e.g. 'tfds/cifar10'."
    )
  for key in ('train_image_size', 'eval_image_size'):
    size = data_config[key]
    if (
      isinstance(size, bool)
      or not isinstance(size, numbers.Integral)
      or size < 1
    ):
      raise ValueError(
        f'config.data.{key} must be a positive integer (pixels per side, '
        f'e.g. 192), got {size!r}.'
      )
  alpha = data_config.get('mixup_alpha', 0.0)
  if (
    isinstance(alpha, bool)
    or not isinstance(alpha, numbers.Real)
    or not (math.isfinite(alpha) and alpha >= 0)
  ):
    raise ValueError(
      f'config.data.mixup_alpha must be a finite number >= 0 (0 = no '
      f'MixUp; the reference: 0.2), got {alpha!r}.'
    )
