"""The safe on-disk formats of NFNet weights, and telling formats apart.

`save_params` writes Haiku params once in a format that needs no pickle:
safetensors, or an `.npz` whose members are plain arrays, with string
metadata (format, layout, variant, model kwargs). `read_params` reads those,
DeepMind's dill pickles (through `nfnets.pretrained.safe_pickle`) and timm
`dm_nfnet_*` safetensors state dicts (through
`nfnets.pretrained.timm_interop`), choosing by the file's first bytes, not
its name (`sniff_format`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from nfnets.atomic_files import atomic_output
from nfnets.pretrained import safe_pickle, timm_interop
from nfnets.pretrained.errors import (
  WeightsError,
  check_not_directory,
  unreadable_as_weights_error,
)
from nfnets.pretrained.safe_pickle import Params

FORMAT_NAME = 'nfnets-haiku-params'
_METADATA_KEY = '__metadata__'
_PICKLE_MAGIC = b'\x80'
_ZIP_MAGIC = b'PK'
_MAX_SAFETENSORS_HEADER = 100_000_000  # As the safetensors library's.
_SAFETENSORS_SUFFIX = '.safetensors'


def flatten_params(params: Mapping[str, Mapping[str, Any]]) -> dict:
  """`{module: {name: x}}` -> `{'module/name': x}` (names hold no '/')."""
  return {
    f'{module}/{name}': np.asarray(value)
    for module, leaves in params.items()
    for name, value in leaves.items()
  }


def unflatten_params(
  flat: Mapping[str, np.ndarray], source: str | os.PathLike | None = None
) -> Params:
  """Inverse of `flatten_params`: splits each key at its last '/'.

  Args:
    flat: `{'module/param': array}`.
    source: the file the arrays came from, for the error message.

  Returns:
    Haiku params `{module: {param: array}}`.

  Raises:
    WeightsError: a key is not 'module/param'.
  """
  params = {}
  for key, value in flat.items():
    module, sep, name = key.rpartition('/')
    if not sep:
      raise WeightsError(_not_module_param(key, source))
    params.setdefault(module, {})[name] = np.asarray(value)
  return params


def _not_module_param(key: str, source) -> str:
  """Why a key without '/' cannot be read, and what to write instead."""
  where = f'{os.fspath(source)!r}: key' if source is not None else 'Key'
  head = f"{where} {key!r} is not 'module/param' (e.g. 'NFNet/~/linear/w')"
  if '.' in key:
    # e.g. 'NFNet.nf_block_1.conv0.w' for 'NFNet/~/nf_block_1/~/conv0/w':
    # a '.' may stand for '/~/' or '/', so the names cannot be restored.
    return (
      f"{head}: it joins Haiku's names with '.', which do not split back "
      'into module and parameter names. Save the nested {module: {param: '
      'array}} params with nfnets.pretrained.save_params, or read the '
      "original file (DeepMind's F*_haiku.npz loads as it is)."
    )
  return (
    f'{head}. Save the nested {{module: {{param: array}}}} params with '
    'nfnets.pretrained.save_params.'
  )


def write_safetensors(
  flat: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str]
) -> None:
  """Writes `{name: array}` as a safetensors file whose mode follows umask.

  `safetensors.numpy.save_file` creates its files 0600; serialising to bytes
  and writing them with `open` gives the permissions every other file gets.

  Args:
    flat: `{name: C-contiguous array}`.
    path: destination file.
    metadata: string metadata stored in the header.
  """
  with open(path, 'wb') as f:
    f.write(safetensors_bytes(dict(flat), metadata=dict(metadata)))


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

  Raises:
    ValueError: the name is neither .safetensors nor .npz.
    IsADirectoryError: `path` is a directory.
  """
  path = os.fspath(path)
  meta = {'format': FORMAT_NAME, 'layout': 'HWIO', **(metadata or {})}
  flat = {
    k: np.require(v, requirements='C')
    for k, v in flatten_params(params).items()
  }
  if not path.endswith((_SAFETENSORS_SUFFIX, '.npz')):
    raise ValueError(
      f'Unknown weights format for {path!r}: use a .safetensors or .npz name.'
    )
  with atomic_output(path) as tmp:
    if path.endswith(_SAFETENSORS_SUFFIX):
      write_safetensors(flat, tmp, {k: str(v) for k, v in meta.items()})
    else:
      with open(tmp, 'wb') as f:
        np.savez(f, **flat, **{_METADATA_KEY: np.array(json.dumps(meta))})


def _read_safetensors(path: str) -> tuple[dict, dict]:
  with (
    unreadable_as_weights_error(path, '.safetensors'),
    safe_open(path, framework='numpy') as f,
  ):
    flat = {key: f.get_tensor(key) for key in f.keys()}
    metadata = dict(f.metadata() or {})
  return flat, metadata


def _read_npz(path: str) -> tuple[dict, dict]:
  # allow_pickle=False: an npz member holding objects raises instead of
  # unpickling them.
  with unreadable_as_weights_error(path, '.npz'):
    with np.load(path, allow_pickle=False) as data:
      flat = {key: data[key] for key in data.files}
    metadata = {}
    if _METADATA_KEY in flat:
      metadata = json.loads(str(flat.pop(_METADATA_KEY)))
  return flat, metadata


def _is_safetensors(f, head: bytes, size: int) -> bool:
  """An 8-byte little-endian size N, then N bytes of a JSON object.

  The size is any number (its low byte is 0x80, the pickle opcode, in one
  file of 256), so the header itself is checked.
  """
  if len(head) < 9 or head[8:9] != b'{':
    return False
  (length,) = struct.unpack('<Q', head[:8])
  if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
    return False
  try:
    header = json.loads(head[8:] + f.read(length - 1))
  except ValueError:  # Also UnicodeDecodeError.
    return False
  return isinstance(header, dict)


def sniff_format(path: str | os.PathLike) -> str:
  """Tells the weights formats apart by content, not by file name.

  Args:
    path: the weights file.

  Returns:
    'pickle', 'npz' or 'safetensors', from the file's first bytes.

  Raises:
    FileNotFoundError: there is no file at `path`.
    WeightsError: `path` is a directory, or the file starts like none of
      the formats.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'No weights file at {os.fspath(path)!r}. Download the official ones '
      'with scripts/download_pretrained.sh or pass the right path.'
    )
  check_not_directory(path)
  with open(path, 'rb') as f:
    head = f.read(9)
    # First: a safetensors header's size may start with the pickle byte.
    if _is_safetensors(f, head, os.path.getsize(path)):
      return 'safetensors'
  if head[:1] == _PICKLE_MAGIC:
    return 'pickle'
  if head[:2] == _ZIP_MAGIC:
    return 'npz'
  raise WeightsError(
    f'{os.fspath(path)!r} is not a DeepMind pickle, an .npz or a '
    '.safetensors weights file (truncated or wrong file?).'
  )


def read_metadata(path: str | os.PathLike) -> dict:
  """The string metadata of a weights file, without reading the weights.

  Args:
    path: the weights file.

  Returns:
    e.g. `{'format': ..., 'variant': 'F0', 'model_kwargs': '{...}'}`; empty
    for DeepMind pickles and timm files, which record none.
  """
  fmt = sniff_format(path)
  if fmt == 'safetensors':
    with (
      unreadable_as_weights_error(path, '.safetensors'),
      safe_open(os.fspath(path), framework='numpy') as f,
    ):
      return dict(f.metadata() or {})
  if fmt == 'npz':
    with (
      unreadable_as_weights_error(path, '.npz'),
      np.load(path, allow_pickle=False) as data,
    ):
      if _METADATA_KEY in data.files:
        return json.loads(str(data[_METADATA_KEY]))
  return {}


# Metadata that says how a file stores its arrays, so each writer sets its
# own rather than copying the source file's.
_STORAGE_KEYS = ('format', 'layout')


def carried_metadata(source: Mapping[str, str], **updates: str) -> dict:
  """The metadata a converted copy of a weights file keeps.

  Everything the source records about its weights (model, variant, kwargs,
  class names, eval image size and preprocessing, source) goes along, so
  the copy predicts as the original does; how the source stores its arrays
  does not.

  Args:
    source: the source file's metadata (`read_metadata`).
    **updates: values set over it (e.g. the variant the weights were
      checked as).

  Returns:
    String metadata for `save_params` or `timm_interop.save_timm`.
  """
  kept = {k: v for k, v in source.items() if k not in _STORAGE_KEYS}
  return {**kept, **updates}


def read_params(path: str | os.PathLike) -> tuple[Params, dict]:
  """Reads weights from any supported file, without checking them.

  Supported: DeepMind's dill-pickled `F*_haiku.npz` (read safely), our
  `.safetensors`/`.npz` files and timm `dm_nfnet_*` safetensors state dicts.

  Args:
    path: the weights file.

  Returns:
    `(params, metadata)`: Haiku params of numpy arrays and the file's string
    metadata (empty for DeepMind pickles).

  Raises:
    FileNotFoundError: there is no file at `path`.
    WeightsError: `path` is a directory, or the file is truncated, damaged
      or holds no params.
  """
  path = os.fspath(path)
  fmt = sniff_format(path)
  if fmt == 'pickle':
    return safe_pickle.read_dm_pickle(path), {}
  flat, metadata = (_read_safetensors if fmt == 'safetensors' else _read_npz)(
    path
  )
  if timm_interop.is_timm_state_dict(flat):
    return timm_interop.from_timm_state_dict(flat), metadata
  return safe_pickle.validate_tree(unflatten_params(flat, path)), metadata
