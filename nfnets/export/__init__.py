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
      stablehlo; TFLite runs on its own CPU kernels).

  Returns:
    `out`.

  Raises:
    ValueError: an unknown format or preprocess mode, or params without
      weight-standardised convs.
    FileExistsError: `out` holds something other than an earlier export
      of this format (`check_destination`).
  """
  from nfnets.export import savedmodel, stablehlo, tflite

  check_format(fmt)
  serving.check_preprocess(preprocess)
  check_destination(fmt, out)
  # `--out=exported/f0.tflite` on a fresh checkout: the folder is made.
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  folded = fold_weight_standardization(params)
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


__all__ = [
  'FORMATS',
  'PREPROCESS_MODES',
  'ExportSpec',
  'check_destination',
  'check_format',
  'export_model',
  'fold_weight_standardization',
  'folded_convs',
  'make_folded_model',
  'make_serving_fn',
  'spec_from_weights',
  'spec_from_workdir',
]
