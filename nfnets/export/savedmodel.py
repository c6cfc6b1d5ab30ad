"""TensorFlow SavedModels of a serving function, through jax2tf.

`write_savedmodel` converts the serving function with
`jax.experimental.jax2tf` (native serialization: the program is embedded as
StableHLO in an `XlaCallModule` op, which TensorFlow compiles with its own
XLA; the batch size, and with eval preprocessing the image size, stay
symbolic). The folded params are `tf.Variable`s, so they are stored in the
SavedModel's variables files rather than inlined in the graph. Loading and
running it needs TensorFlow only:

    model = tf.saved_model.load(path)
    logits = model.signatures['serving_default'](images=batch)['logits']
"""

import jax

from nfnets.export import serving

SIGNATURE = 'serving_default'
INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'


def write_savedmodel(
  spec: serving.ExportSpec,
  params,
  state,
  out: str,
  *,
  preprocess: str = 'none',
  platforms: tuple[str, ...] = ('cpu',),
) -> str:
  """Writes a SavedModel with one signature, `images -> {'logits'}`.

  Args:
    spec: the export spec.
    params: folded params (`nfnets.export.fold_weight_standardization`).
    state: the model state (`{}` for the NF models).
    out: the SavedModel directory to write.
    preprocess: the input signature, 'none' or 'eval' (see
      `nfnets.export.serving`).
    platforms: the platforms the embedded program is lowered for ('cpu',
      'cuda', 'rocm', 'tpu'); it runs only on those.

  Returns:
    `out`.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf

  serve = serving.make_serving_fn(spec, preprocess)
  shape, dtype, static = serving.input_spec(spec, preprocess)
  converted = jax2tf.convert(
    serve,
    polymorphic_shapes=[None, None, f'({shape})'],
    with_gradient=False,
    native_serialization_platforms=tuple(platforms),
  )
  leaves, treedef = jax.tree.flatten((params, state))
  module = tf.Module()
  module.weights = [tf.Variable(x, trainable=False) for x in leaves]

  @tf.function(
    autograph=False,
    input_signature=[tf.TensorSpec(static, tf.as_dtype(dtype), INPUT_NAME)],
  )
  def serve_tf(images):
    tf_params, tf_state = jax.tree.unflatten(treedef, module.weights)
    return converted(tf_params, tf_state, images)

  module.serve = serve_tf
  tf.saved_model.save(module, out, signatures={SIGNATURE: serve_tf})
  return out
