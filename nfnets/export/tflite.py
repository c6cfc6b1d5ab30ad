"""TFLite flatbuffers, converted from an exported SavedModel.

TensorFlow's converter lowers the SavedModel's embedded StableHLO to TFLite
builtin ops (float32; no quantisation). The batch size, and with eval
preprocessing the image size, stay dynamic: the interpreter's signature
runner resizes the input to each batch.

    runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    logits = runner(images=batch)['logits']
"""


def convert_savedmodel(saved_model_dir: str, out: str) -> str:
  """Converts a SavedModel (`write_savedmodel`'s) to a float32 .tflite file.

  Args:
    saved_model_dir: the SavedModel.
    out: the .tflite file to write.

  Returns:
    `out`.
  """
  import tensorflow as tf

  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
  flatbuffer = converter.convert()
  with open(out, 'wb') as f:
    f.write(flatbuffer)
  return out
