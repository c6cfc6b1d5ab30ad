"""A quiet start for the commands: TensorFlow only where used, silently.

TensorFlow 2.21 prints "All log messages before absl::InitializeLog()" and
the oneDNN notice whatever TF_CPP_MIN_LOG_LEVEL says (where oneDNN is on,
as on AVX-512 CPUs), and `import tensorflow` preloads Keras, scikit-learn
and matplotlib, about half of its 4-6 s on 2 cores. `quiet_tensorflow_import`
makes the process's first import of TensorFlow, wherever it happens (the
tf.data loader, a TensorFlow export format, a folder check), drop those
notices and skip the preload, and imports nothing itself: a command that
refuses its arguments, or reads data with the python loader, never pays
for TensorFlow.
"""

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile

# Start-up lines of TensorFlow's C++ runtime that say nothing a user can act
# on. oneDNN stays on (TF_ENABLE_ONEDNN_OPTS=0 would change TF's numerics);
# only its notice is dropped.
STARTUP_NOISE = (
  'All log messages before absl::InitializeLog() is called',
  'oneDNN custom operations are on',
)


def quiet_environment(environ=None) -> None:
  """Sets the log levels of TensorFlow's and gRPC's C++ code, if unset.

  Must run before TensorFlow is imported; explicit settings are kept.

  Args:
    environ: the environment to update (default `os.environ`).
  """
  environ = os.environ if environ is None else environ
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  environ.setdefault('GRPC_VERBOSITY', 'ERROR')
  environ.setdefault('GLOG_minloglevel', '2')


@contextlib.contextmanager
def stderr_filtered(noise):
  """Captures file descriptor 2 (C++ writes too); replays all but `noise`."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode('utf-8', 'replace')
      kept = [
        line
        for line in text.splitlines(keepends=True)
        if not any(n in line for n in noise)
      ]
      sys.stderr.write(''.join(kept))
      sys.stderr.flush()


def import_tensorflow_quietly() -> bool:
  """Imports TensorFlow, quietly (`quiet_tensorflow_import`), if installed.

  Returns:
    Whether TensorFlow is imported.
  """
  quiet_tensorflow_import()
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    return False
  return True


def quiet_tensorflow_import() -> None:
  """Makes this process's first `import tensorflow` quiet, wherever it is.

  That import then drops TensorFlow's `STARTUP_NOISE` lines from stderr
  (anything else it prints still reaches stderr) and skips its eager
  import of Keras (`_keras_preload_skipped`). Nothing is imported now.
  """
  if 'tensorflow' in sys.modules:
    return
  if not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlow())


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` as the finders after it do; its loader runs quietly.

  Libraries look for TensorFlow without importing it (etils asks whether
  it is installed), so the finder stays until the import itself is done.
  """

  def find_spec(self, name, path=None, target=None):
    if name != 'tensorflow' or 'tensorflow' in sys.modules:
      return None
    spec = self._later_finders_spec(name, path, target)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader, finder=self)
    return spec

  def _later_finders_spec(self, name, path, target):
    """The spec the import system would get without this finder."""
    finders = sys.meta_path
    later = finders[finders.index(self) + 1 :] if self in finders else finders
    for finder in later:
      find_spec = getattr(finder, 'find_spec', None)
      spec = find_spec(name, path, target) if find_spec else None
      if spec is not None:
        return spec
    return None


class _QuietLoader(importlib.abc.Loader):
  """Runs TensorFlow's loader with its start-up noise filtered, once."""

  def __init__(self, loader, finder):
    self._loader = loader
    self._finder = finder

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    # The module sees its own loader, as it would without this wrapper.
    module.__loader__ = module.__spec__.loader = self._loader
    try:
      with stderr_filtered(STARTUP_NOISE), _keras_preload_skipped():
        self._loader.exec_module(module)
    finally:
      if self._finder in sys.meta_path:
        sys.meta_path.remove(self._finder)


class _DeferKeras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds `keras` where it is installed, but refuses to run it.

  TensorFlow's `__init__` preloads Keras inside `try: ... except
  ImportError: pass`, so a refused import skips the preload; `find_spec`
  still answers, because TensorFlow also asks where Keras lies.
  """

  def find_spec(self, name, path=None, target=None):
    if name != 'keras':
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is not None:
      spec.loader = self
    return spec

  def create_module(self, spec):
    return None

  def exec_module(self, module):
    raise ImportError('Keras is loaded on first use of tf.keras.')


@contextlib.contextmanager
def _keras_preload_skipped():
  """Skips TensorFlow's eager import of Keras; `tf.keras` stays lazy.

  The commands use tf.data, never Keras, and the preload (Keras, and
  through it scikit-learn and matplotlib) is about half of
  `import tensorflow`: 2.2-2.8 s of 4.4-5.7 s on 2 cores.
  """
  finder = _DeferKeras()
  sys.meta_path.insert(0, finder)
  try:
    yield
  finally:
    sys.meta_path.remove(finder)
