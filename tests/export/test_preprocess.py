"""The JAX eval transform against the host (TensorFlow) eval pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from jax import export as jax_export

from nfnets.data import preprocess as host
from nfnets.export import preprocess

PHOTOS = ('chelsea', 'coffee', 'astronaut')


def _host(image, size, mode):
  out = host.eval_preprocess(tf.constant(image), size, mode)
  return host.normalize(out).numpy()


@pytest.mark.parametrize('mode', preprocess.EVAL_MODES)
@pytest.mark.parametrize('size', [64, 96, 224])
def test_matches_host_eval_preprocessing_on_photos(mode, size):
  # 96 + 32 and 64 + 32 scale by factors whose sampling positions are not
  # multiples of 1/1024: TensorFlow's table rounding matters there.
  fn = jax.jit(preprocess.eval_preprocess, static_argnums=(1, 2))
  for name in PHOTOS:
    image = getattr(skimage.data, name)()
    got = np.asarray(fn(image[None], size, mode))[0]
    want = _host(image, size, mode)
    assert got.shape == want.shape == (size, size, 3)
    # 1e-4 of the normalised range is 0.006 grey levels.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_upscales_small_images_like_the_host():
  image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), np.uint8)
  got = preprocess.eval_preprocess(jnp.asarray(image[None]), 64)
  np.testing.assert_allclose(
    np.asarray(got)[0], _host(image, 64, 'resize_crop_32'), atol=1e-4
  )


def test_one_exported_program_serves_every_image_size():
  exported = jax_export.export(
    jax.jit(lambda x: preprocess.eval_preprocess(x, 32))
  )(
    jax.ShapeDtypeStruct(
      jax_export.symbolic_shape('b, h, w, 3'), jnp.uint8
    )
  )  # fmt: skip
  rng = np.random.default_rng(1)
  for shape in [(2, 40, 70, 3), (1, 100, 33, 3)]:
    images = rng.integers(0, 256, shape, np.uint8)
    got = np.asarray(exported.call(images))
    assert got.shape == (shape[0], 32, 32, 3)
    for i in range(shape[0]):
      want = _host(images[i], 32, 'resize_crop_32')
      np.testing.assert_allclose(got[i], want, atol=1e-4)


def test_unsupported_mode_is_refused():
  with pytest.raises(ValueError, match='crop_resize'):
    preprocess.eval_preprocess(
      jnp.zeros((1, 8, 8, 3), jnp.uint8), 4, 'crop_resize'
    )
