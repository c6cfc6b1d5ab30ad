"""What a command's start costs: TensorFlow without its Keras preload."""

import os
import subprocess
import sys

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def test_commands_import_tensorflow_without_keras_yet_tf_keras_works():
  # A plain `import tensorflow` (2.21) imports Keras, scikit-learn and
  # matplotlib too; the commands' import leaves them out until tf.keras
  # is first used, and it is then the same Keras.
  code = '; '.join(
    [
      'import sys',
      'from experiments import common',
      'assert common.import_tensorflow_quietly()',
      "print(sorted({'keras', 'sklearn', 'matplotlib'} & set(sys.modules)))",
      'import tensorflow as tf',
      'print(tf.keras.layers.Dense.__module__)',
    ]
  )
  proc = subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ['[]', 'keras.src.layers.core.dense']
