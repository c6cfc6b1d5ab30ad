"""Tests for nfnets.pretrained.inference: decoding, batching and class names.

References are independent of the code under test: TensorFlow's own
`decode_image` and a hand computation (`v >> 8`) for 16-bit images, a
NumPy softmax for the probabilities, and ImageNet synsets named by hand
(n01440764 is the tench, n07873807 pizza, n02119789 the kit fox).
"""

import json
import os

import numpy as np
import PIL.Image
import pytest

from nfnets import pretrained
from nfnets.pretrained import inference

TINY = dict(width=0.125, depth=(1, 1, 1, 1))


def test_sixteen_bit_grey_reads_as_tensorflow_decodes_it(tmp_path):
  # PIL's convert('RGB') clipped every value to 255: a white image.
  import tensorflow as tf  # noqa: PLC0415

  pixels = np.linspace(53, 65498, 48 * 40).reshape(48, 40).astype(np.uint16)
  path = tmp_path / 'grey16.png'
  PIL.Image.fromarray(pixels).save(path)
  assert PIL.Image.open(path).mode == 'I;16'
  ours = inference.read_rgb(str(path))
  want = tf.io.decode_image(
    path.read_bytes(), channels=3, expand_animations=False
  ).numpy()
  np.testing.assert_array_equal(ours, want)
  for channel in range(3):  # By hand: the high byte, in every channel.
    np.testing.assert_array_equal(ours[..., channel], pixels >> 8)
  assert 120 < ours.mean() < 130  # Not the clipped 255.


def test_pixels_without_a_0_255_scale_are_refused_naming_the_file(tmp_path):
  # A float TIFF in 0..1 read as all zeros and was classified silently.
  floats = tmp_path / 'float.tiff'
  PIL.Image.fromarray(np.full((8, 8), 0.5, np.float32), mode='F').save(floats)
  wide = tmp_path / 'wide.tiff'  # 32-bit integers beyond 16 bits.
  PIL.Image.fromarray(np.full((8, 8), 1 << 20, np.int32), mode='I').save(wide)
  for path, what in ((floats, 'floating-point'), (wide, 'beyond 16 bits')):
    with pytest.raises(inference.UnreadableImageError) as error:
      inference.read_rgb(str(path))
    message = str(error.value)
    assert message.startswith(f"'{path}' cannot be classified: it holds ")
    assert what in message
    assert message.endswith('save it as an 8- or 16-bit PNG or as a JPEG.')
    assert '\n' not in message


def test_images_are_classified_a_batch_at_a_time_in_order():
  # Decoding every file before the first forward pass made memory grow
  # with the folder and printed nothing until all were read.
  paths = [f'img{i}' for i in range(7)] + ['bad'] + ['img7', 'img8']
  events = []

  def load(path):
    events.append(('load', path))
    if path == 'bad':
      raise inference.UnreadableImageError(f'{path} is damaged')
    return np.full((2, 2, 3), float(path[3:]), np.float32)

  def logits_fn(images):
    events.append(('forward', len(images)))
    values = images[:, 0, 0, 0]  # Each image's own number.
    return np.stack([values, -values, np.zeros_like(values)], axis=1)

  names = ['up', 'down', 'zero']
  results = inference.classify_files(paths, load, logits_fn, names, 2, 4)
  loads = [i for i, (kind, _) in enumerate(events) if kind == 'load']
  forwards = [i for i, (kind, _) in enumerate(events) if kind == 'forward']
  assert [events[i][1] for i in forwards] == [4, 4, 1]
  assert forwards[0] < loads[-1]  # The first batch ran before the last load.
  assert forwards[0] == loads[3] + 1  # ... right after its 4th image.
  # The order of the paths, the bad file's error in its place.
  assert isinstance(results[7], inference.UnreadableImageError)
  for i, result in enumerate(results[:7] + results[8:]):
    logits = np.array([i, -i, 0.0])
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs, kind='stable')[:2]
    assert [name for name, _ in result] == [names[j] for j in order]
    np.testing.assert_allclose([p for _, p in result], probs[order])


def test_iter_classified_yields_each_batch_before_reading_the_next():
  loaded = []

  def load(path):
    loaded.append(path)
    return np.zeros((2, 2, 3), np.float32)

  stream = inference.iter_classified(
    [str(i) for i in range(5)], load, lambda x: np.zeros((len(x), 3)),
    ['a', 'b', 'c'], 1, 2,
  )  # fmt: skip
  assert next(stream)[0] == '0'
  assert loaded == ['0', '1']  # One batch read, not five files.
  assert [path for path, _ in stream] == ['1', '2', '3', '4']


def _tfds_imagenet2012_labels():
  """tfds's imagenet2012 class names (synsets), from its own label file."""
  tfds = pytest.importorskip('tensorflow_datasets')
  path = os.path.join(
    os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', 'labels.txt'
  )
  if not os.path.isfile(path):
    pytest.skip(f'this tensorflow_datasets has no {path}')
  with open(path) as f:
    return f.read().split()


def test_imagenet_synsets_get_readable_names_in_any_order():
  # tfds names ImageNet classes by synset; imagenet_resized lists them in
  # another order than imagenet2012.
  synsets = ['n02119789', 'n07873807', 'n01440764']
  assert inference.readable_class_names(synsets) == [
    'kit fox', 'pizza', 'tench'
  ]  # fmt: skip
  full = inference.imagenet_synsets()
  assert len(set(full)) == 1000 and full == sorted(full)
  assert full[:2] == ['n01440764', 'n01443537']  # Tench, goldfish.
  # The labels of tfds's imagenet2012 (class names are its synsets).
  assert _tfds_imagenet2012_labels() == full
  assert inference.readable_class_names(full) == (
    inference.imagenet_class_names()
  )
  for other in (['daisy', 'rose'], ['n07873807', 'rose'], ['n99999999']):
    assert inference.readable_class_names(other) == other


def test_a_run_file_of_imagenet_predicts_readable_names(tmp_path):
  # `convert_weights --workdir` of an imagenet2012 run records tfds's class
  # names, the synsets: predict --weights printed 'n07873807'.
  shapes = pretrained.expected_shapes('F0', 1000, **TINY)
  rng = np.random.default_rng(0)
  params = {
    m: {n: 0.3 * rng.standard_normal(s, np.float32) for n, s in v.items()}
    for m, v in shapes.items()
  }
  params['NFNet/~/linear']['w'][:] = 0.0
  bias = np.zeros(1000, np.float32)
  names = _tfds_imagenet2012_labels()
  pizza, tench = names.index('n07873807'), names.index('n01440764')
  bias[[pizza, tench]] = [5.0, 4.0]
  params['NFNet/~/linear']['b'] = bias
  weights = tmp_path / 'run.safetensors'
  pretrained.save_params(
    params,
    weights,
    {
      'model': 'NFNet',
      'variant': 'F0',
      'model_kwargs': json.dumps(TINY),
      'class_names': json.dumps(names),
    },
  )
  image = tmp_path / 'x.png'
  PIL.Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
  (top,) = inference.predict_files(
    [str(image)], str(weights), image_size=32, k=2
  )
  assert [name for name, _ in top] == ['pizza', 'tench']
