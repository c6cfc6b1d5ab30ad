"""What a command's start costs: TensorFlow only where it is used, quietly,
and without its Keras preload."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def _python(code):
  return subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_tensorflow_imported_after_a_probe_leaves_keras_yet_tf_keras_works():
  # A plain `import tensorflow` (2.21) imports Keras, scikit-learn and
  # matplotlib too; after `quiet_tensorflow_import` TensorFlow's first
  # import, here after a probe for it (etils makes one), leaves them out
  # until tf.keras is first used, and it is then the same Keras.
  proc = _python("""
    import importlib.util, sys
    from experiments import quiet_start
    quiet_start.quiet_tensorflow_import()
    assert importlib.util.find_spec('tensorflow') is not None
    import tensorflow as tf
    print(sorted({'keras', 'sklearn', 'matplotlib'} & set(sys.modules)))
    print(tf.keras.layers.Dense.__module__)
  """)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ['[]', 'keras.src.layers.core.dense']


# What TensorFlow 2.21 writes to file descriptor 2 as it starts where oneDNN
# is on (AVX-512 CPUs), whatever TF_CPP_MIN_LOG_LEVEL says; on AVX2-only
# CPUs it writes nothing, so a stand-in that writes those lines shows the
# filter on every machine.
_NOISY_TENSORFLOW = """
import os
os.write(2, b'WARNING: All log messages before absl::InitializeLog() is '
            b'called are written to STDERR\\n')
os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on. You may '
            b'see slightly different numerical results.\\n')
os.write(2, b'a warning a user must see\\n')
"""


def _with_stand_in_tensorflow(tmp_path, source, code):
  """Runs `code` after the quiet start, `source` found as TensorFlow."""
  (tmp_path / 'tensorflow').mkdir()
  (tmp_path / 'tensorflow' / '__init__.py').write_text(source)
  start = f"""
    import importlib, importlib.util, sys
    sys.path.insert(0, {str(tmp_path)!r})
    from experiments import quiet_start
    quiet_start.quiet_tensorflow_import()
  """
  return _python(textwrap.dedent(start) + textwrap.dedent(code))


def test_tensorflows_start_up_notices_are_dropped_and_nothing_else(tmp_path):
  proc = _with_stand_in_tensorflow(tmp_path, _NOISY_TENSORFLOW, """
    assert importlib.util.find_spec('tensorflow') is not None
    importlib.import_module('tensorflow')
    print('imported', 'tensorflow' in sys.modules)
  """)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ['imported True']
  assert proc.stderr == 'a warning a user must see\n'


def test_a_command_refusing_its_arguments_never_imports_tensorflow(tmp_path):
  not_a_directory = tmp_path / 'config.json'
  not_a_directory.write_text('{}')
  proc = _python(f"""
    import atexit, sys
    atexit.register(lambda: print('tensorflow' in sys.modules))
    sys.argv = ['train', '--config=configs/quickstart.py',
                '--workdir={not_a_directory}']
    from experiments import common, train
    common.run(train.main)
  """)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'is a file; pass a directory' in proc.stderr
  assert proc.stdout.splitlines() == ['False']


def _train_refusal(config, workdir):
  """`train`'s two lines of stderr for a refused `--config`."""
  proc = subprocess.run(
    [sys.executable, '-m', 'experiments.train', f'--config={config}',
     f'--workdir={workdir}'],
    cwd=ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 2, proc.stderr[-3000:]
  first, hint = proc.stderr.splitlines()
  assert hint == 'Pass --helpshort for the flags.'
  return first


def test_train_refuses_a_bad_config_in_one_line(tmp_path):
  # A run's saved config: ml_collections would run the JSON as Python (a
  # NameError traceback).
  saved = tmp_path / 'config.json'
  saved.write_text('{"train": {"num_steps": 10, "ema": true}}')
  assert _train_refusal(saved, tmp_path) == (
    f'Error: --config={saved} is JSON; this command '
    'takes a Python config file (configs/*.py). To resume a run, rerun the '
    'command that started it: the same --config and --workdir (the '
    "run's config.json is compared with it)."
  )
  # A config argument its get_config refuses: the error's text, without
  # the traceback ml_collections puts into its message.
  assert _train_refusal('configs/f0.py:plsu', tmp_path) == (
    'Error: flag --config=configs/f0.py:plsu: ValueError: Unknown config '
    "argument 'plsu' for F0; use '' for F0 or 'plus' for F0+ (e.g. "
    '--config=configs/f0.py:plus).'
  )


_INTERRUPTED_TENSORFLOW = """
import os, signal, time
os.write(2, b'oneDNN custom operations are on.\\n')
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
"""


def test_ctrl_c_notices_show_while_tensorflow_starts(tmp_path):
  # TensorFlow starts inside the trainer's guard; its start-up output is
  # held back to be filtered, and a second Ctrl-C exits before it is
  # written, so the guard's notices must not go that way.
  proc = _with_stand_in_tensorflow(tmp_path, _INTERRUPTED_TENSORFLOW, """
    from nfnets.train import preemption
    with preemption.PreemptionGuard():
      import tensorflow
    print('not reached')
  """)  # fmt: skip
  assert proc.returncode == 130
  assert proc.stdout == ''
  assert 'Ctrl-C: saving a checkpoint after the current step' in proc.stderr
  assert 'Second Ctrl-C: exiting now' in proc.stderr
