"""Exchange NFNet-F weights with timm's `dm_nfnet_f*` models (no torch needed).

timm's `dm_nfnet_f0` ... `dm_nfnet_f6` reproduce DeepMind's NFNet exactly
(gamma inside the activation, skipinit gain, 'SAME' padding), so their
weights map one-to-one onto our Haiku params. This module converts between
the two layouts with numpy only and reads/writes timm-style safetensors
files (which `timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`
or `safetensors.torch.load_file` + `load_state_dict` accept).

Name mapping (global block g sits at stage s, index b of that stage):

  NFNet/~/stem_conv{k}                       stem.conv{k+1}
  NFNet/~/nf_block_{g}/~/conv0               stages.{s}.{b}.conv1
  .../conv1, .../conv1b, .../conv2           .conv2, .conv2b, .conv3
  .../conv_shortcut                          .downsample.conv
  .../squeeze_excite/~/linear{,_1}           .attn_last.fc1, .attn_last.fc2
  NFNet/~/nf_block_{g} skip_gain             stages.{s}.{b}.skipinit_gain
  NFNet/~/final_conv                         final_conv
  NFNet/~/linear                             head.fc

Tensor layouts: conv kernels HWIO <-> OIHW; WS gains (O,) <-> (O, 1, 1, 1);
squeeze-excite linears (I, O) <-> (O, I, 1, 1) (timm uses 1x1 convs); the
classifier (I, O) <-> (O, I); biases and the scalar skip gain are unchanged.

Padding: DeepMind's convs use XLA 'SAME' padding, which for stride 2 on even
inputs pads 0 before and 1 after. timm's `dm_` models use
`ScaledStdConv2dSame`, whose dynamic padding puts the extra pixel at the
bottom/right in the same way, and their shortcut `AvgPool2d(2, 2,
ceil_mode=True, count_include_pad=False)` equals a 'SAME' 2x2 average pool.
The same weights therefore give the same function in both frameworks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from nfnets.atomic_files import atomic_output
from nfnets.pretrained.errors import (
  check_not_directory,
  unreadable_as_weights_error,
)

ROOT = 'NFNet'

# Our module suffix inside a block -> timm's submodule name.
_BLOCK_CONVS = {
  'conv0': 'conv1',
  'conv1': 'conv2',
  'conv1b': 'conv2b',
  'conv2': 'conv3',
  'conv_shortcut': 'downsample.conv',
}
_SE_LINEARS = {
  'squeeze_excite/~/linear': 'attn_last.fc1',
  'squeeze_excite/~/linear_1': 'attn_last.fc2',
}
_CONV_PARAMS = {'w': 'weight', 'gain': 'gain', 'bias': 'bias'}
_LINEAR_PARAMS = {'w': 'weight', 'b': 'bias'}

_BLOCK_RE = re.compile(r'nf_block(?:_(\d+))?$')
_TIMM_BLOCK_RE = re.compile(r'stages\.(\d+)\.(\d+)\.(.+)$')


# ----------------------------------------------------------------------------
# Tensor layouts.
# ----------------------------------------------------------------------------


def _conv_to_timm(name: str, x: np.ndarray) -> np.ndarray:
  if name == 'w':
    return np.transpose(x, (3, 2, 0, 1))  # HWIO -> OIHW
  if name == 'gain':
    return np.reshape(x, (-1, 1, 1, 1))
  return x


def _conv_from_timm(name: str, x: np.ndarray) -> np.ndarray:
  if name == 'weight':
    return np.transpose(x, (2, 3, 1, 0))  # OIHW -> HWIO
  if name == 'gain':
    return np.reshape(x, (-1,))
  return x


def _linear_to_timm(name: str, x: np.ndarray, as_conv: bool) -> np.ndarray:
  if name != 'w':
    return x
  x = np.transpose(x)
  return x[:, :, None, None] if as_conv else x


def _linear_from_timm(name: str, x: np.ndarray) -> np.ndarray:
  if name != 'weight':
    return x
  return np.transpose(np.reshape(x, x.shape[:2]))


# ----------------------------------------------------------------------------
# Block indexing.
# ----------------------------------------------------------------------------


def _split_block(module: str) -> tuple[int, str] | None:
  """`NFNet/~/nf_block_g[/~/inner]` -> (g, inner); None for other modules."""
  sub = module.removeprefix(f'{ROOT}/~/')
  if sub == module:
    return None
  block, _, inner = sub.partition('/~/')
  match = _BLOCK_RE.match(block)
  return None if match is None else (int(match.group(1) or 0), inner)


def _stage_positions(params: Mapping[str, Mapping]) -> dict[int, tuple]:
  """Maps global block index -> (stage, index in stage).

  A stage starts at block 0 and at every block with a projection shortcut:
  in NFNet-F, stages 1-3 open with a stride-2 transition block, and no other
  block changes shape.
  """
  blocks = sorted({s[0] for m in params if (s := _split_block(m))})
  if blocks != list(range(len(blocks))):
    raise ValueError(f'Non-contiguous NFNet block indices: {blocks}.')
  positions, stage, start = {}, -1, 0
  for g in blocks:
    if g == 0 or f'{_block_name(g)}/~/conv_shortcut' in params:
      stage, start = stage + 1, g
    positions[g] = (stage, g - start)
  return positions


def _block_name(g: int) -> str:
  return f'{ROOT}/~/nf_block' + (f'_{g}' if g else '')


# ----------------------------------------------------------------------------
# Haiku -> timm.
# ----------------------------------------------------------------------------


def _timm_entries(module, leaves, positions):
  """Yields (timm_key, tensor) for one Haiku module."""
  sub = module.removeprefix(f'{ROOT}/~/')
  if (match := re.fullmatch(r'stem_conv(\d)', sub)) is not None:
    prefix = f'stem.conv{int(match.group(1)) + 1}'
    for n, x in leaves.items():
      yield f'{prefix}.{_CONV_PARAMS[n]}', _conv_to_timm(n, x)
    return
  if sub in ('final_conv', 'linear'):
    for n, x in leaves.items():
      if sub == 'final_conv':
        yield f'final_conv.{_CONV_PARAMS[n]}', _conv_to_timm(n, x)
      else:
        yield f'head.fc.{_LINEAR_PARAMS[n]}', _linear_to_timm(n, x, False)
    return
  split = _split_block(module)
  if split is None or (split[1] and split[1] not in _BLOCK_CONVS | _SE_LINEARS):
    raise ValueError(f'No timm equivalent for Haiku module {module!r}.')
  g, inner = split
  s, b = positions[g]
  prefix = f'stages.{s}.{b}'
  for n, x in leaves.items():
    if not inner:
      if n != 'skip_gain':
        raise ValueError(f'Unknown block parameter {module}/{n}.')
      yield f'{prefix}.skipinit_gain', np.reshape(x, ())
    elif inner in _BLOCK_CONVS:
      yield (
        f'{prefix}.{_BLOCK_CONVS[inner]}.{_CONV_PARAMS[n]}',
        (_conv_to_timm(n, x)),
      )
    else:
      yield (
        f'{prefix}.{_SE_LINEARS[inner]}.{_LINEAR_PARAMS[n]}',
        (_linear_to_timm(n, x, True)),
      )


def to_timm_state_dict(
  params: Mapping[str, Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
  """Converts NFNet-F Haiku params to a timm `dm_nfnet_f*` state dict.

  Args:
    params: Haiku params `{module: {name: array}}` of an `NFNet` named
      'NFNet' (as in DeepMind's checkpoints).

  Returns:
    `{timm_key: np.ndarray}` in PyTorch layouts (contiguous float arrays).
  """
  params = {m: {n: np.asarray(x) for n, x in v.items()} for m, v in
            params.items()}  # fmt: skip
  positions = _stage_positions(params)
  out = {}
  for module, leaves in params.items():
    for key, x in _timm_entries(module, leaves, positions):
      out[key] = np.require(x, requirements='C')
  return out


# ----------------------------------------------------------------------------
# timm -> Haiku.
# ----------------------------------------------------------------------------


def is_timm_state_dict(flat: Mapping[str, object]) -> bool:
  """Whether flat keys look like a timm NFNet state dict."""
  return any(k.startswith(('stem.conv1.', 'head.fc.')) for k in flat)


def _stage_offsets(keys) -> dict[int, int]:
  """Global index of each stage's first block, from the timm keys."""
  depth = {}
  for key in keys:
    if (match := _TIMM_BLOCK_RE.match(key)) is not None:
      s, b = int(match.group(1)), int(match.group(2))
      depth[s] = max(depth.get(s, 0), b + 1)
  offsets, total = {}, 0
  for s in sorted(depth):
    offsets[s], total = total, total + depth[s]
  return offsets


def _haiku_entry(key, x, offsets):
  """(module, name, array) for one timm key, or None if it has no match."""
  inv_conv = {v: k for k, v in _CONV_PARAMS.items()}
  inv_lin = {v: k for k, v in _LINEAR_PARAMS.items()}
  if (m := re.fullmatch(r'stem\.conv(\d)\.(\w+)', key)) and m[2] in inv_conv:
    module = f'{ROOT}/~/stem_conv{int(m[1]) - 1}'
    return module, inv_conv[m[2]], _conv_from_timm(m[2], x)
  if (m := re.fullmatch(r'final_conv\.(\w+)', key)) and m[1] in inv_conv:
    return f'{ROOT}/~/final_conv', inv_conv[m[1]], _conv_from_timm(m[1], x)
  if (m := re.fullmatch(r'head\.fc\.(\w+)', key)) and m[1] in inv_lin:
    return f'{ROOT}/~/linear', inv_lin[m[1]], _linear_from_timm(m[1], x)
  if (m := _TIMM_BLOCK_RE.match(key)) is None:
    return None
  block = _block_name(offsets[int(m[1])] + int(m[2]))
  if m[3] == 'skipinit_gain':
    return block, 'skip_gain', np.reshape(x, ())
  sub, _, param = m[3].rpartition('.')
  for ours, theirs in _BLOCK_CONVS.items():
    if sub == theirs and param in inv_conv:
      return f'{block}/~/{ours}', inv_conv[param], _conv_from_timm(param, x)
  for ours, theirs in _SE_LINEARS.items():
    if sub == theirs and param in inv_lin:
      return f'{block}/~/{ours}', inv_lin[param], _linear_from_timm(param, x)
  return None


def from_timm_state_dict(
  state_dict: Mapping[str, np.ndarray],
) -> dict[str, dict[str, np.ndarray]]:
  """Converts a timm `dm_nfnet_f*` state dict to NFNet Haiku params.

  Args:
    state_dict: `{timm_key: array}` (numpy arrays, e.g. from safetensors).

  Returns:
    Haiku params `{module: {name: np.ndarray}}` in HWIO layout.

  Raises:
    ValueError: listing every key with no NFNet-F equivalent (e.g. a timm
      model other than `dm_nfnet_*`).
  """
  offsets = _stage_offsets(state_dict)
  params, unknown = {}, []
  for key, x in state_dict.items():
    entry = _haiku_entry(key, np.asarray(x), offsets)
    if entry is None:
      unknown.append(key)
      continue
    module, name, value = entry
    params.setdefault(module, {})[name] = np.require(value, requirements='C')
  if unknown:
    raise ValueError(
      'These timm keys have no NFNet-F equivalent (only timm dm_nfnet_* '
      f'models are supported): {sorted(unknown)}'
    )
  return params


def save_timm(
  params: Mapping[str, Mapping[str, np.ndarray]],
  path: str | os.PathLike,
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes Haiku params as a timm `dm_nfnet_*` safetensors state dict.

  Args:
    params: NFNet Haiku params.
    path: destination `.safetensors` file.
    metadata: optional string metadata (variant, model kwargs, class
      names, ...) for `predict --weights`; timm and PyTorch loaders ignore
      it. Its 'format' is always 'pt'.

  Raises:
    IsADirectoryError: `path` is a directory.
  """
  # 'format': 'pt' marks the file as a PyTorch state dict for HF loaders.
  # Written with `open`, so the mode follows umask (`save_file` gives 0600).
  meta = {**(metadata or {}), 'format': 'pt'}
  with atomic_output(path) as tmp, open(tmp, 'wb') as f:
    f.write(safetensors_bytes(to_timm_state_dict(params), metadata=meta))


def load_timm(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """Reads a timm `dm_nfnet_*` safetensors file into NFNet Haiku params.

  Args:
    path: a `.safetensors` file with a timm state dict.

  Returns:
    Haiku params `{module: {name: np.ndarray}}`.

  Raises:
    WeightsError: `path` is a directory, or the file is truncated or
      damaged.
  """
  check_not_directory(path)
  with (
    unreadable_as_weights_error(path, '.safetensors'),
    safe_open(os.fspath(path), framework='numpy') as f,
  ):
    state_dict = {key: f.get_tensor(key) for key in f.keys()}
  return from_timm_state_dict(state_dict)
