"""The recipe's numbers that the host (TF) and device (JAX) sides share.

The crop constants, normalisation statistics, RandAugment's constants, op
order and level parsing, in one TensorFlow-free module: `augment.py` and
`preprocess.py` (tf.data), `numpy_preprocess.py` (the TensorFlow-free
loader) and `device_augment.py` / `device_randaugment.py` (JAX) read them
from here, so every side applies the same recipe and only tf.data imports
TensorFlow.
"""

# The per-image crops (`preprocess.py` in tf.data, `numpy_preprocess.py` in
# the TensorFlow-free loader). Pixels added around the eval crop, as in the
# reference (F0: 288 -> 256); the Inception crop's area and aspect ranges,
# minimum coverage and attempts before the centre-crop fallback.
CROP_PADDING = 32
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MIN_OBJECT_COVERED = 0.1
MAX_ATTEMPTS = 10
TRAIN_PREPROCS = ('inception_crop_flip', 'inception_crop', 'resize')
EVAL_PREPROCS = ('resize_crop_32', 'crop_resize', 'resize')

# ImageNet channel statistics in 0..255 (the reference's).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# RandAugment, as the reference's TPU-EfficientNet port.
MAX_LEVEL = 10.0
REPLACE = 128
CUTOUT_CONST = 40
TRANSLATE_CONST = 100
SOLARIZE_ADD_THRESHOLD = 128
# The 16 ops in the reference's order: an op index means the same op on
# both sides.
RANDAUGMENT_OP_NAMES = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'Posterize',
  'Solarize',
  'Color',
  'Contrast',
  'Brightness',
  'Sharpness',
  'ShearX',
  'ShearY',
  'TranslateX',
  'TranslateY',
  'Cutout',
  'SolarizeAdd',
)


def parse_level(level):
  """Parses a RandAugment level like '405' into (num_layers, magnitude)."""
  if isinstance(level, str) and not level.isdigit():
    raise ValueError(
      f'RandAugment level {level!r} must be digits like "405" (4 layers, '
      'magnitude 5), or "" to turn RandAugment off.'
    )
  num_layers, magnitude = divmod(int(level), 100)
  if num_layers == 0:
    # '5' or '45' would apply no op at all, silently.
    raise ValueError(
      f'RandAugment level {level!r} has 0 layers: the digits before the '
      'last two are the number of layers, e.g. "205" (2 layers, magnitude '
      '5); "" turns RandAugment off.'
    )
  return num_layers, magnitude


def solarize_threshold(magnitude, quirks=True):
  """Solarize threshold for a magnitude (see the module docstring)."""
  t = int(magnitude / MAX_LEVEL * 256)
  if quirks:
    return t % 256
  return min(max(256 - t, 0), 256)
