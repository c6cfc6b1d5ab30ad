"""Pretrained NFNet weights: safe loading, conversion and checking.

DeepMind released NFNet-F0 ... F6 ImageNet weights as `F{n}_haiku.npz`. Despite
the extension these files are not numpy archives: they are dill pickles of a
Haiku params dict `{module_name: {param_name: float32 array}}` with HWIO conv
kernels. Unpickling an untrusted file can run arbitrary code, so this module
never calls `pickle.load`/`dill.load` on it directly. `read_dm_pickle` uses a
restricted unpickler that resolves only the handful of globals needed to
rebuild numpy arrays (and replaces each with a checked stand-in); any other
global (e.g. `os.system`) is refused before it can be called.

After reading, weights can be saved once in a safe format (safetensors or a
pickle-free `.npz`) with `save_params` or `experiments/convert_weights.py`.
`load(path, variant=...)` reads any of these formats (plus timm-layout
safetensors, see `nfnets.pretrained.timm_interop`) and checks every parameter
name and shape against the chosen variant, reporting all mismatches at once.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from nfnets.models import nfnet
from nfnets.pretrained import timm_interop

Params = dict[str, dict[str, np.ndarray]]

# Public URLs of DeepMind's released weights (F6 was trained with SAM) and the
# top-1 / top-5 ImageNet accuracy their README reports at test resolution.
PRETRAINED = {
  f'F{n}': dict(
    url=f'https://storage.googleapis.com/dm-nfnets/F{n}_haiku.npz',
    top1=top1,
    top5=top5,
  )
  for n, (top1, top5) in enumerate(
    [
      (83.6, 96.8),
      (84.7, 97.1),
      (85.1, 97.3),
      (85.7, 97.5),
      (85.9, 97.6),
      (86.0, 97.6),
      (86.5, 97.9),
    ]
  )
}

# Module that holds the classifier in DeepMind's naming.
CLASSIFIER_MODULE = 'NFNet/~/linear'
FORMAT_NAME = 'nfnets-haiku-params'
_METADATA_KEY = '__metadata__'
_PICKLE_MAGIC = b'\x80'
_ZIP_MAGIC = b'PK'
_SAFETENSORS_SUFFIX = '.safetensors'
# Only plain numeric arrays may come out of a weights file.
_NUMERIC_KINDS = frozenset('biufc')


class WeightsError(ValueError):
  """A weights file is unreadable, unsafe or does not fit the model."""


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
  """A pickle referenced a global outside the numpy-array allow-list."""


class PretrainedMismatchError(WeightsError):
  """Parameter names or shapes do not match the requested model."""


# ----------------------------------------------------------------------------
# The restricted unpickler.
# ----------------------------------------------------------------------------


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
  except UnsafePickleError:
    raise
  except Exception as e:  # Truncated or corrupt stream.
    raise WeightsError(
      f'Could not unpickle weights ({type(e).__name__}: {e}); the file is '
      'truncated or not a DeepMind NFNet checkpoint. Download it again.'
    ) from e
  return _validate_tree(tree)


def _validate_tree(tree: Any) -> Params:
  """Checks a loaded object is `{str: {str: numeric ndarray}}`."""
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


# ----------------------------------------------------------------------------
# Safe on-disk formats: safetensors and pickle-free npz.
# ----------------------------------------------------------------------------


def flatten_params(params: Mapping[str, Mapping[str, Any]]) -> dict:
  """`{module: {name: x}}` -> `{'module/name': x}` (names hold no '/')."""
  return {
    f'{module}/{name}': np.asarray(value)
    for module, leaves in params.items()
    for name, value in leaves.items()
  }


def unflatten_params(flat: Mapping[str, np.ndarray]) -> Params:
  """Inverse of `flatten_params`: splits each key at its last '/'."""
  params = {}
  for key, value in flat.items():
    module, sep, name = key.rpartition('/')
    if not sep:
      raise ValueError(
        f'Key {key!r} is not "module/param"; is this a timm state dict? '
        'Load it with nfnets.pretrained.timm_interop.load_timm.'
      )
    params.setdefault(module, {})[name] = np.asarray(value)
  return params


def save_params(
  params: Mapping[str, Mapping[str, Any]],
  path: str | os.PathLike,
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes params to `.safetensors` or `.npz` (no pickle), atomically.

  Args:
    params: Haiku params `{module: {name: array}}` (numpy or jax arrays).
    path: destination; the suffix picks the format.
    metadata: optional string metadata (e.g. variant) stored in the file.
  """
  path = os.fspath(path)
  meta = {'format': FORMAT_NAME, 'layout': 'HWIO', **(metadata or {})}
  flat = {
    k: np.require(v, requirements='C')
    for k, v in flatten_params(params).items()
  }
  # Write next to the destination and rename, so an interrupted save never
  # leaves a truncated file under the final name.
  tmp = f'{path}.tmp-{os.getpid()}'
  if path.endswith(_SAFETENSORS_SUFFIX):
    save_file(flat, tmp, metadata={k: str(v) for k, v in meta.items()})
  elif path.endswith('.npz'):
    with open(tmp, 'wb') as f:
      np.savez(f, **flat, **{_METADATA_KEY: np.array(json.dumps(meta))})
  else:
    raise ValueError(
      f'Unknown weights format for {path!r}: use a .safetensors or .npz name.'
    )
  os.replace(tmp, path)


def _read_safetensors(path: str) -> tuple[dict, dict]:
  with safe_open(path, framework='numpy') as f:
    flat = {key: f.get_tensor(key) for key in f.keys()}
    metadata = dict(f.metadata() or {})
  return flat, metadata


def _read_npz(path: str) -> tuple[dict, dict]:
  # allow_pickle=False: an npz member holding objects raises instead of
  # unpickling them.
  with np.load(path, allow_pickle=False) as data:
    flat = {key: data[key] for key in data.files}
  metadata = {}
  if _METADATA_KEY in flat:
    metadata = json.loads(str(flat.pop(_METADATA_KEY)))
  return flat, metadata


def sniff_format(path: str | os.PathLike) -> str:
  """Returns 'pickle', 'npz' or 'safetensors' from the file's first bytes."""
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'No weights file at {os.fspath(path)!r}. Download the official ones '
      'with scripts/download_pretrained.sh or pass the right path.'
    )
  with open(path, 'rb') as f:
    head = f.read(9)
  if head[:1] == _PICKLE_MAGIC:
    return 'pickle'
  if head[:2] == _ZIP_MAGIC:
    return 'npz'
  # safetensors: 8-byte little-endian header size, then a JSON header.
  if len(head) == 9 and head[8:9] == b'{':
    return 'safetensors'
  raise WeightsError(
    f'{os.fspath(path)!r} is not a DeepMind pickle, an .npz or a '
    '.safetensors weights file (truncated or wrong file?).'
  )


def read_metadata(path: str | os.PathLike) -> dict:
  """The string metadata of a weights file, without reading the weights.

  Returns:
    e.g. `{'format': ..., 'variant': 'F0', 'model_kwargs': '{...}'}`; empty
    for DeepMind pickles and timm files, which record none.
  """
  fmt = sniff_format(path)
  if fmt == 'safetensors':
    with safe_open(os.fspath(path), framework='numpy') as f:
      return dict(f.metadata() or {})
  if fmt == 'npz':
    with np.load(path, allow_pickle=False) as data:
      if _METADATA_KEY in data.files:
        return json.loads(str(data[_METADATA_KEY]))
  return {}


def read_params(path: str | os.PathLike) -> tuple[Params, dict]:
  """Reads weights from any supported file, without checking them.

  Supported: DeepMind's dill-pickled `F*_haiku.npz` (read safely), our
  `.safetensors`/`.npz` files and timm `dm_nfnet_*` safetensors state dicts.

  Args:
    path: the weights file.

  Returns:
    `(params, metadata)`: Haiku params of numpy arrays and the file's string
    metadata (empty for DeepMind pickles).
  """
  path = os.fspath(path)
  fmt = sniff_format(path)
  if fmt == 'pickle':
    return read_dm_pickle(path), {}
  flat, metadata = (_read_safetensors if fmt == 'safetensors' else _read_npz)(
    path
  )
  if timm_interop.is_timm_state_dict(flat):
    return timm_interop.from_timm_state_dict(flat), metadata
  return _validate_tree(unflatten_params(flat)), metadata


# ----------------------------------------------------------------------------
# Checking against a model, loading, and fine-tuning initialisation.
# ----------------------------------------------------------------------------


def expected_shapes(
  variant: str = 'F0', num_classes: int = 1000, **model_kwargs
) -> dict[str, dict[str, tuple[int, ...]]]:
  """Parameter shapes of `nfnet.NFNet(num_classes, variant, **model_kwargs)`.

  Args:
    variant: a key of `nfnets.VARIANTS` (e.g. 'F0').
    num_classes: classifier width.
    **model_kwargs: further `NFNet` constructor arguments (e.g. `width`).

  Returns:
    `{module: {name: shape}}`, computed abstractly (no weights allocated).
  """
  if variant not in nfnet.VARIANTS:
    raise ValueError(
      f'Unknown variant {variant!r}; valid: {sorted(nfnet.VARIANTS)}.'
    )

  def forward(x):
    net = nfnet.NFNet(num_classes=num_classes, variant=variant, **model_kwargs)
    return net(x, is_training=False)

  model = hk.transform(forward)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
  # A concrete key: its shape depends on the configured PRNG implementation.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return {
    m: {n: tuple(v.shape) for n, v in leaves.items()}
    for m, leaves in shapes.items()
  }


def find_mismatches(
  params: Mapping[str, Mapping[str, Any]],
  expected: Mapping[str, Mapping[str, tuple[int, ...]]],
) -> list[str]:
  """Lists every missing, unexpected or wrongly shaped parameter.

  Args:
    params: the params to check.
    expected: `{module: {name: shape}}`, e.g. from `expected_shapes`.

  Returns:
    One human-readable line per problem; empty when everything matches.
  """
  got = {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}
  want = {
    f'{m}/{n}': tuple(s)
    for m, leaves in expected.items()
    for n, s in leaves.items()
  }
  problems = [f'missing: {k} {want[k]}' for k in sorted(want.keys() - got)]
  problems += [f'unexpected: {k} {got[k]}' for k in sorted(got.keys() - want)]
  problems += [
    f'shape: {k} is {got[k]}, model expects {want[k]}'
    for k in sorted(want.keys() & got.keys())
    if got[k] != want[k]
  ]
  return problems


def check_params(
  params: Mapping[str, Mapping[str, Any]],
  expected: Mapping[str, Mapping[str, tuple[int, ...]]],
  *,
  what: str = 'weights',
  hint: str = '',
) -> None:
  """Raises if any name or shape differs, listing every problem.

  Args:
    params: the params to check.
    expected: `{module: {name: shape}}` of the model.
    what: description of the weights for the error message.
    hint: extra advice appended to the message.

  Raises:
    PretrainedMismatchError: when `find_mismatches` reports anything.
  """
  problems = find_mismatches(params, expected)
  if problems:
    raise PretrainedMismatchError(
      f'{what}: {len(problems)} problems.{hint}\n  ' + '\n  '.join(problems)
    )


def _infer_num_classes(params: Params) -> int:
  bias = params.get(CLASSIFIER_MODULE, {}).get('b')
  return 1000 if bias is None else int(np.shape(bias)[0])


def load(
  path: str | os.PathLike,
  variant: str = 'F0',
  *,
  num_classes: int | None = None,
  check: bool = True,
  **model_kwargs,
) -> Params:
  """Loads NFNet weights from any supported file and checks them.

  Args:
    path: DeepMind `F*_haiku.npz` pickle, our `.safetensors`/`.npz`, or a
      timm `dm_nfnet_*` safetensors file.
    variant: the NFNet variant the weights are for (e.g. 'F0').
    num_classes: classifier width; inferred from the file when None.
    check: compare every name and shape with the model (recommended).
    **model_kwargs: further `NFNet` constructor arguments (e.g. `width`).

  Returns:
    Haiku params `{module: {name: float32 np.ndarray}}`.

  Raises:
    PretrainedMismatchError: listing every mismatch, when `check` finds any.
  """
  params, metadata = read_params(path)
  if num_classes is None:
    num_classes = _infer_num_classes(params)
  if check:
    hint = ''
    file_variant = metadata.get('variant')
    if file_variant and file_variant != variant:
      hint = f' The file says it holds variant {file_variant!r}.'
    check_params(
      params,
      expected_shapes(variant, num_classes, **model_kwargs),
      what=f'{os.fspath(path)!r} for NFNet variant {variant!r} with '
      f'{num_classes} classes',
      hint=hint + ' Pass the variant the weights were trained as.',
    )
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def merge_pretrained(
  init_params: Mapping[str, Mapping[str, Any]],
  pretrained: Mapping[str, Mapping[str, Any]],
  *,
  reinit_modules: tuple[str, ...] = (CLASSIFIER_MODULE,),
) -> Params:
  """Initialises a model for fine-tuning from pretrained params.

  Every parameter is taken from `pretrained`, except those of
  `reinit_modules` whose shapes differ (a classifier for a different number
  of classes), which keep their fresh initialisation.

  Args:
    init_params: freshly initialised params of the model to fine-tune.
    pretrained: pretrained params (e.g. from `load(..., check=False)`).
    reinit_modules: modules that may be replaced when their shapes differ.

  Returns:
    Params with the structure and dtypes of `init_params`.

  Raises:
    PretrainedMismatchError: any other name or shape mismatch, all listed.
  """
  expected = {
    m: {n: np.shape(v) for n, v in leaves.items()}
    for m, leaves in init_params.items()
  }
  replaced = [
    m
    for m in reinit_modules
    if m in expected
    and find_mismatches({m: pretrained.get(m, {})}, {m: expected[m]})
  ]
  problems = find_mismatches(
    {m: v for m, v in pretrained.items() if m not in replaced},
    {m: v for m, v in expected.items() if m not in replaced},
  )
  if problems:
    raise PretrainedMismatchError(
      'Pretrained weights do not fit the model being fine-tuned (use the '
      'same variant and width):\n  ' + '\n  '.join(problems)
    )
  return {
    m: {
      n: v if m in replaced else np.asarray(pretrained[m][n], v.dtype)
      for n, v in leaves.items()
    }
    for m, leaves in init_params.items()
  }
