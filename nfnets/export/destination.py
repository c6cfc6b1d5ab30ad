"""Where an export may be written: nothing but an earlier export is replaced.

An export writes over its `--out` path. Rerunning an export to the same
path should replace the earlier program, but a slip of the flags
(`--out=runs/f0`, the run's workdir; `--out=pretrained/F0_haiku.npz`,
the weights file) must not overwrite data that is fine. So `--out` may be
a path that does not exist yet, an empty directory (SavedModel), or an
earlier export of the same format, recognised by its content:

* SavedModel: a directory holding `saved_model.pb`;
* TFLite: a file with the flatbuffer identifier `TFL3` at bytes 4-8;
* StableHLO: a file that `jax.export.deserialize` reads.
"""

import os

SAVED_MODEL_PB = 'saved_model.pb'
TFLITE_IDENTIFIER = b'TFL3'


def _is_savedmodel_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, SAVED_MODEL_PB))


def _is_tflite_file(path: str) -> bool:
  with open(path, 'rb') as f:
    return f.read(8)[4:8] == TFLITE_IDENTIFIER


def _is_stablehlo_file(path: str) -> bool:
  from jax import export as jax_export

  with open(path, 'rb') as f:
    data = f.read()
  try:
    jax_export.deserialize(bytearray(data))
  except Exception:  # noqa: BLE001 - any parse failure: not an export.
    return False
  return True


def _holds_earlier_export(fmt: str, out: str) -> bool:
  """Whether the existing `out` may be replaced by a `fmt` export."""
  if fmt == 'savedmodel':
    return os.path.isdir(out) and (
      not os.listdir(out) or _is_savedmodel_dir(out)
    )
  if os.path.isdir(out):
    return False
  return _is_tflite_file(out) if fmt == 'tflite' else _is_stablehlo_file(out)


def check_destination(fmt: str, out: str) -> None:
  """Refuses an `out` whose existing content an export would overwrite.

  Args:
    fmt: 'savedmodel' (a directory), 'tflite' or 'stablehlo' (a file).
    out: the path the export is to be written to.

  Raises:
    FileExistsError: `out` exists and is not an earlier `fmt` export (or,
      for a SavedModel, an empty directory); the message says what to
      pass instead.
  """
  if not os.path.lexists(out) or _holds_earlier_export(fmt, out):
    return
  kind = 'a directory' if os.path.isdir(out) else 'a file'
  raise FileExistsError(
    f'--out={out} is {kind} that holds no {fmt} export; writing there could '
    f'overwrite what it holds. Pass a path that does not exist yet (an '
    f'earlier {fmt} export at --out is replaced).'
  )
