"""A restricted unpickler for DeepMind's NFNet weights pickles.

DeepMind released NFNet-F0 ... F6 ImageNet weights as `F{n}_haiku.npz`.
Despite the extension these files are not numpy archives: they are dill
pickles of a Haiku params dict `{module_name: {param_name: float32 array}}`
with HWIO conv kernels. Unpickling an untrusted file can run arbitrary code,
so nothing here calls `pickle.load` or `dill.load` on it. `read_dm_pickle`
resolves only the handful of globals needed to rebuild numpy arrays, each
replaced by a checked stand-in; any other global (e.g. `os.system`) is
refused before it can be called. Neither dill nor Haiku is imported.
"""

from __future__ import annotations

import collections
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from nfnets.pretrained.errors import UnsafePickleError, WeightsError

# The layout every reader returns: `{module_name: {param_name: array}}`.
Params = dict[str, dict[str, np.ndarray]]

# Only plain numeric arrays may come out of a weights file.
_NUMERIC_KINDS = frozenset('biufc')


def _checked_dtype(dtype: Any) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None:
    raise UnsafePickleError(
      f'Refusing array dtype {dtype!r}: weights files may only hold plain '
      'numeric arrays.'
    )
  return dtype


def _safe_dtype(obj, align=False, copy=False):
  """Stand-in for `numpy.dtype`: numeric dtypes only (no object arrays)."""
  del copy
  # Always a fresh copy: the BUILD opcode that follows calls __setstate__ on
  # the result, which must never touch numpy's shared dtype singletons.
  return _checked_dtype(np.dtype(obj, align=bool(align), copy=True))


def _safe_reconstruct(subtype, shape, typecode):
  """Stand-in for numpy's `_reconstruct`: plain ndarrays only."""
  if subtype is not np.ndarray:
    raise UnsafePickleError(
      f'Refusing to rebuild array subclass {subtype!r}; only numpy.ndarray '
      'is allowed.'
    )
  if not isinstance(typecode, bytes):
    raise UnsafePickleError('Malformed numpy array record in pickle.')
  # Shape is a placeholder, the real one arrives with __setstate__.
  del shape
  return np.ndarray.__new__(np.ndarray, (0,), np.dtype('b'))


def _safe_create_array(f, args, state, npdict=None):
  """Stand-in for `dill._dill._create_array` (dill's ndarray reduction)."""
  if f is not _safe_reconstruct:
    raise UnsafePickleError(
      'dill array record uses a constructor other than numpy _reconstruct.'
    )
  if npdict:
    raise UnsafePickleError('Refusing ndarray with extra instance attributes.')
  array = f(*args)
  array.__setstate__(state)
  _checked_dtype(array.dtype)
  return array


def _safe_scalar(dtype, data):
  """Stand-in for numpy's `scalar` (numpy scalar pickles) as a 0-d array."""
  dtype = _checked_dtype(dtype)
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise UnsafePickleError('Malformed numpy scalar record in pickle.')
  return np.frombuffer(data, dtype=dtype).reshape(()).copy()


def _safe_frombuffer(buffer, dtype, shape, order):
  """Stand-in for numpy's `_frombuffer` (pickle protocol 5 arrays)."""
  dtype = _checked_dtype(dtype)
  if order not in ('C', 'F'):
    raise UnsafePickleError(f'Malformed array order {order!r} in pickle.')
  array = np.frombuffer(bytes(buffer), dtype=dtype)
  return array.reshape(shape, order=order).copy()


def _safe_codecs_encode(text, encoding='utf-8'):
  """Stand-in for `_codecs.encode`, used for bytes by pickle protocol <= 2."""
  if not isinstance(text, str) or encoding != 'latin1':
    raise UnsafePickleError('Refusing _codecs.encode outside bytes records.')
  return text.encode('latin1')


class _SafeHaikuMapping:
  """Stand-in for Haiku's old immutable params mappings (`FlatMapping`...).

  Haiku versions of 2020-21 returned params as `FlatMapping`, which pickled
  as `FlatMapping(dict)`; here that call (or `cls.__new__(cls, dict)`) just
  returns a plain dict of the (already safely unpickled) contents.
  """

  def __new__(cls, data=None, *args, **kwargs):
    del cls, args, kwargs
    if not isinstance(data, Mapping):
      raise UnsafePickleError(
        'Unsupported Haiku mapping record in pickle (expected a dict).'
      )
    return dict(data)


# (module, name) -> safe stand-in. numpy 1.x pickles name `numpy.core.*`,
# numpy 2.x `numpy._core.*`; dill wraps every ndarray in `_create_array`.
_ALLOWED_GLOBALS = {
  ('numpy', 'ndarray'): np.ndarray,
  ('numpy', 'dtype'): _safe_dtype,
  ('numpy.core.multiarray', '_reconstruct'): _safe_reconstruct,
  ('numpy._core.multiarray', '_reconstruct'): _safe_reconstruct,
  ('numpy.core.multiarray', 'scalar'): _safe_scalar,
  ('numpy._core.multiarray', 'scalar'): _safe_scalar,
  ('numpy.core.numeric', '_frombuffer'): _safe_frombuffer,
  ('numpy._core.numeric', '_frombuffer'): _safe_frombuffer,
  ('dill._dill', '_create_array'): _safe_create_array,
  ('_codecs', 'encode'): _safe_codecs_encode,
  ('collections', 'OrderedDict'): collections.OrderedDict,
  **{
    ('haiku._src.data_structures', name): _SafeHaikuMapping
    for name in ('FlatMapping', 'FlatMap', 'frozendict')
  },
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only `_ALLOWED_GLOBALS`."""

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafePickleError(
        f'Refusing to load global {module}.{name} from a weights pickle: '
        'only numpy array reconstruction is allowed, so nothing in the file '
        'was executed. If this file is not a DeepMind NFNet checkpoint, '
        'convert it to safetensors with code you trust.'
      ) from None

  def persistent_load(self, pid):
    raise UnsafePickleError(f'Refusing persistent id {pid!r} in weights file.')


def read_dm_pickle(file) -> Params:
  """Safely reads a DeepMind `F*_haiku.npz` (dill pickle) params file.

  Args:
    file: a path or a binary file object.

  Returns:
    The Haiku params dict `{module_name: {param_name: np.ndarray}}`.

  Raises:
    UnsafePickleError: the pickle references anything but numpy arrays.
    ValueError: the pickle does not hold a two-level params mapping.
  """
  if isinstance(file, str | os.PathLike):
    with open(file, 'rb') as f:
      return read_dm_pickle(f)
  try:
    tree = _RestrictedUnpickler(file).load()
  except (UnsafePickleError, MemoryError, OSError):
    # Not the file's fault (an unsafe file is refused with its own message;
    # memory and reading are the host's): the file is not called damaged.
    raise
  except Exception as e:  # Truncated or corrupt stream.
    raise WeightsError(_damaged_pickle(file, e)) from e
  return validate_tree(tree)


def _damaged_pickle(file, error: Exception) -> str:
  """The message for a pickle that stops or breaks part way: a damaged file.

  The download script skips a file that exists, so the damaged one has to
  be removed before it can be downloaded again.
  """
  problem = (
    f'is damaged (truncated or corrupt: {type(error).__name__}: {error})'
  )
  name = getattr(file, 'name', None)
  if not isinstance(name, str | os.PathLike):  # A stream of bytes.
    return f'The weights pickle {problem}.'
  return (
    f'{os.fspath(name)!r} {problem}. Remove that file and download it again '
    '(scripts/download_pretrained.sh skips files that exist).'
  )


def validate_tree(tree: Any) -> Params:
  """Checks a loaded object is `{str: {str: numeric ndarray}}`.

  Args:
    tree: what a reader produced (an unpickled object, unflattened arrays).

  Returns:
    The same params as plain dicts of numpy arrays.

  Raises:
    ValueError: the object is not a two-level mapping of numeric arrays.
  """
  if not isinstance(tree, Mapping):
    raise ValueError(f'Expected a params mapping, got {type(tree).__name__}.')
  params = {}
  for module, leaves in tree.items():
    if not isinstance(module, str) or not isinstance(leaves, Mapping):
      raise ValueError(f'Malformed params entry for module {module!r}.')
    params[module] = {}
    for name, value in leaves.items():
      if not isinstance(name, str) or not isinstance(value, np.ndarray):
        raise ValueError(f'Malformed parameter {module!r}/{name!r}.')
      _checked_dtype(value.dtype)
      params[module][name] = np.asarray(value)
  return params
