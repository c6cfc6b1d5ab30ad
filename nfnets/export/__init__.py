"""Trained NFNets for serving: folded weights and exported programs.

* `fold`: `fold_weight_standardization` (each conv's `{w, gain, bias}` ->
  `{w, bias}` with Scaled Weight Standardisation and the gain folded into
  `w`), the folded model mode (`folded_convs`, `make_folded_model`);
* `preprocess`: the eval transform (bicubic resize, centre crop,
  normalisation) in JAX, for programs that take uint8 images;
* `serving`: `ExportSpec` and the exported function, from a weights file
  or a training run;
* `savedmodel`, `tflite`, `stablehlo`: the writers (jax2tf SavedModel,
  TFLite converted from it, `jax.export` serialization);
* `destination`: `check_destination`, which lets an export replace an
  earlier export and nothing else.

`export_model` folds and writes one format; `python -m experiments.export`
is its command line. See docs/export.md.
"""

import os
import tempfile

import jax
import numpy as np

from nfnets.export import serving
from nfnets.export.destination import check_destination
from nfnets.export.fold import (
  fold_weight_standardization,
  folded_convs,
  make_folded_model,
)
from nfnets.export.serving import (
  PREPROCESS_MODES,
  ExportSpec,
  make_serving_fn,
  spec_from_weights,
  spec_from_workdir,
)

FORMATS = ('savedmodel', 'tflite', 'stablehlo')


def check_format(fmt: str) -> None:
  """Raises a ValueError for a format not in `FORMATS`."""
  if fmt not in FORMATS:
    raise ValueError(f'Unknown format {fmt!r}; choose one of {list(FORMATS)}.')


# The platforms `jax.export` has built in ('gpu' is none: it stands for cuda
# or rocm by the backend at hand). Another name would be written into the
# program unchecked, and the program would then run nowhere.
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def check_platforms(fmt: str, platforms) -> None:
  """Raises a ValueError for platforms `fmt`'s program cannot be made for.

  SavedModel and StableHLO programs are lowered for any of `PLATFORMS`,
  each named once. A TFLite file runs on TFLite's own kernels, not on
  an XLA backend: it takes the default ('cpu',) only, so that a request
  for others is not silently dropped.
  """
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise ValueError(
      f'Platforms {", ".join(unknown) or "(none)"}: name one or more of '
      f"{', '.join(PLATFORMS)} (jax.export's; for GPUs cuda or rocm)."
    )
  if len(set(platforms)) < len(platforms):
    raise ValueError(f'Platforms {",".join(platforms)}: name each once.')
  if fmt == 'tflite' and platforms != ('cpu',):
    raise ValueError(
      "A TFLite file runs on TFLite's own kernels, for no XLA platform: "
      'drop --platforms, or export savedmodel or stablehlo for them.'
    )


def export_model(
  spec: ExportSpec,
  params,
  state,
  *,
  fmt: str,
  out: str,
  preprocess: str = 'none',
  platforms: tuple[str, ...] = ('cpu',),
) -> str:
  """Folds the params and writes the serving program in one format.

  Args:
    spec: the network and input (`spec_from_weights`, `spec_from_workdir`).
    params: the trained (unfolded) params.
    state: the model state (`{}` for the NF models).
    fmt: 'savedmodel' (a directory), 'tflite' or 'stablehlo' (a file).
    out: where to write.
    preprocess: 'none' (normalised float32 [N, S, S, 3] in) or 'eval'
      (uint8 [N, H, W, 3] in, eval transform inside).
    platforms: the platforms the program is lowered for (savedmodel and
      stablehlo; TFLite runs on its own CPU kernels and takes ('cpu',)).

  Returns:
    `out`.

  Raises:
    ValueError: an unknown format, platform or preprocess mode, params
      without weight-standardised convs, or a model too large for the
      format (`check_flatbuffer_size`).
    FileExistsError: `out` holds something other than an earlier export
      of this format (`check_destination`).
  """
  from nfnets.export import savedmodel, stablehlo, tflite

  check_format(fmt)
  check_platforms(fmt, platforms)
  serving.check_inputs(spec, preprocess)
  check_destination(fmt, out)
  folded = fold_weight_standardization(params)
  check_flatbuffer_size(fmt, folded, state)
  # `--out=exported/f0.tflite` on a fresh checkout: the folder is made,
  # once nothing can refuse the export any more.
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if fmt == 'stablehlo':
    return stablehlo.write_stablehlo(
      spec, folded, state, out, preprocess=preprocess, platforms=platforms
    )
  if fmt == 'savedmodel':
    return savedmodel.write_savedmodel(
      spec, folded, state, out, preprocess=preprocess, platforms=platforms
    )
  with tempfile.TemporaryDirectory() as tmp:
    saved = os.path.join(tmp, 'savedmodel')
    savedmodel.write_savedmodel(
      spec, folded, state, saved, preprocess=preprocess, platforms=('cpu',)
    )
    return tflite.convert_savedmodel(saved, out)


# StableHLO and TFLite serialise into one FlatBuffer, whose offsets are 32-bit
# signed: 2 GiB in all, less a margin for the program itself.
FLATBUFFER_LIMIT_BYTES = 2**31 - 2**24
_FLATBUFFER_FORMATS = ('stablehlo', 'tflite')


def check_flatbuffer_size(fmt: str, folded, state) -> None:
  """Refuses a model whose weights cannot fit the format's one FlatBuffer.

  The writers would fail only after lowering the whole model, with
  FlatBuffers' own error: F5+ and larger (2.3 GiB and up in float32) do not
  fit, F7 (1.86 GiB) and F4+ (1.95 GiB) do.

  Raises:
    ValueError: naming the size and the format that holds it.
  """
  if fmt not in _FLATBUFFER_FORMATS:
    return
  size = sum(
    int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves((folded, state))
  )
  if size > FLATBUFFER_LIMIT_BYTES:
    raise ValueError(
      f'--format={fmt} holds the weights in one FlatBuffer, which fits '
      f"{FLATBUFFER_LIMIT_BYTES / 2**30:.2f} GiB of them; this model's take "
      f'{size / 2**30:.2f} GiB. Use --format=savedmodel, which stores them '
      'in separate files.'
    )


__all__ = [
  'FLATBUFFER_LIMIT_BYTES',
  'FORMATS',
  'PLATFORMS',
  'PREPROCESS_MODES',
  'ExportSpec',
  'check_destination',
  'check_flatbuffer_size',
  'check_format',
  'check_platforms',
  'export_model',
  'fold_weight_standardization',
  'folded_convs',
  'make_folded_model',
  'make_serving_fn',
  'spec_from_weights',
  'spec_from_workdir',
]
