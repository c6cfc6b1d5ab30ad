r"""Converts NFNet weights between formats, or a training run's into a file.

    # DeepMind's dill pickle -> safetensors (read with a restricted
    # unpickler; nothing in the file is executed):
    python -m experiments.convert_weights --input=pretrained/F0_haiku.npz \
      --output=pretrained/F0.safetensors --variant=F0

    # -> a timm `dm_nfnet_f0` state dict (PyTorch layouts):
    python -m experiments.convert_weights --input=pretrained/F0_haiku.npz \
      --output=dm_nfnet_f0.safetensors --variant=F0 --to=timm

    # A training run's params (EMA by default; --params=raw), e.g. to share
    # them or to use them with --weights; --to=timm for PyTorch:
    python -m experiments.convert_weights --workdir=runs/flowers \
      --output=flowers.safetensors

The input may be any format `nfnets.pretrained.read_params` reads (DeepMind
pickle, our .safetensors/.npz, timm safetensors). Names and shapes are
checked against the model (the file's metadata, else F0, with
--variant/--model_kwargs set over it) before anything is written. A run's
file records its model, class names, eval image size and preprocessing,
which `predict --weights` uses; every output (.npz, --to=timm too) keeps
what its input records.
See docs/pretrained.md.
"""

import json
import os

from absl import app, flags

from experiments import common, output_files

_HAIKU_SUFFIXES = ('.safetensors', '.npz')  # The timm layout: safetensors.

_INPUT = flags.DEFINE_string('input', None, 'Source weights file.')
_WORKDIR = flags.DEFINE_string(
  'workdir', None, "Or a training run: its newest checkpoint's params."
)
_PARAMS = flags.DEFINE_enum(
  'params', 'ema', ['ema', 'raw'], 'With --workdir: the EMA or raw params.'
)
_STEP = common.define_step_flag()
_OUTPUT = flags.DEFINE_string(
  'output', None, 'Destination: .safetensors, or .npz (haiku layout only).'
)
_VARIANT = flags.DEFINE_string(
  'variant', None, "--input's NFNet variant (default: the file's, else F0)."
)
_MODEL_KWARGS = flags.DEFINE_string(
  'model_kwargs', None, 'JSON of extra NFNet kwargs, e.g. {"width": 0.5}.'
)
_TO = flags.DEFINE_enum(
  'to', 'haiku', ['haiku', 'timm'], 'Layout of the output file.'
)
flags.mark_flags_as_required(['output'])


def _check_flags():
  """Refuses flags that cannot work, before any work.

  A conversion never replaces its source file (say, DeepMind's pickle),
  and the --output name must say a format the chosen layout is written in.
  """
  if bool(_INPUT.value) == bool(_WORKDIR.value):
    raise app.UsageError('Pass exactly one of --input and --workdir.')
  if _INPUT.value and _STEP.value is not None:
    raise app.UsageError('--step picks a checkpoint of a --workdir run.')
  if _WORKDIR.value and (_VARIANT.value or _MODEL_KWARGS.value):
    raise app.UsageError(
      '--variant and --model_kwargs are for --input; with --workdir the '
      "model is the run's."
    )
  output = _OUTPUT.value
  if os.path.isdir(output):
    raise app.UsageError(
      f'--output={output} is a directory; pass a file path in it (e.g. '
      f'{os.path.join(output, "weights.safetensors")}).'
    )
  if _INPUT.value and os.path.exists(output) and os.path.exists(_INPUT.value):
    if os.path.samefile(_INPUT.value, output):
      raise app.UsageError(
        f'--output={output} is the --input file; the conversion would '
        'replace it. Pass a new --output path.'
      )
  if os.path.isfile(output) and os.path.getsize(output) > 0:
    if not _is_earlier_conversion(output):
      raise app.UsageError(
        f'--output={output} exists and is not a file this command wrote '
        '(its metadata says so), so it is not replaced: pick another path.'
      )
  suffixes = ('.safetensors',) if _TO.value == 'timm' else _HAIKU_SUFFIXES
  if not output.endswith(suffixes):
    raise app.UsageError(
      f'--output={output}: name it {" or ".join(suffixes)} (--to={_TO.value}).'
    )


def _is_earlier_conversion(path: str) -> bool:
  """Whether `path` holds weights a conversion wrote, which a rerun replaces.

  Both layouts record the variant (the timm one beside its 'format': 'pt'),
  and the Haiku layout its own format name; DeepMind's files, timm's own
  downloads and anything else record neither, and are never replaced.
  """
  from nfnets import pretrained  # Deferred: fast --help.

  try:
    metadata = pretrained.read_metadata(path)
  except (OSError, ValueError):
    return False
  written = metadata.get('format')
  return written == pretrained.FORMAT_NAME or (
    written == 'pt' and 'variant' in metadata
  )


def _from_file():
  """`(params, metadata, what)` of the --input file, checked."""
  from nfnets import pretrained  # Deferred: fast --help.
  from nfnets.pretrained import inference

  given = (
    common.json_object_flag(_MODEL_KWARGS) if _MODEL_KWARGS.value else None
  )
  # The file's metadata with the flags on top, else F0 (as predict does).
  variant, kwargs = inference.model_spec(_INPUT.value, _VARIANT.value, given)
  params = pretrained.load(_INPUT.value, variant, **kwargs)
  # A run's file also records its class names, eval size and preprocessing:
  # the copy keeps them, so it predicts as the original does.
  metadata = pretrained.carried_metadata(
    pretrained.read_metadata(_INPUT.value),
    variant=variant,
    model_kwargs=json.dumps(kwargs),
  )
  return params, metadata, f'NFNet-{variant}'


def _from_workdir():
  """`(params, metadata, what)` of the --workdir run's newest checkpoint."""
  from nfnets.train import run_weights  # Deferred: fast --help.

  workdir = _WORKDIR.value
  if common.saved_run_config(workdir) is None:
    raise app.UsageError(
      f'--workdir={workdir} is not a training run (it has no '
      f'{common.RUN_CONFIG_FILE}).'
    )
  run = run_weights.run_params(workdir, _PARAMS.value, step=_STEP.value)
  metadata = run_weights.weights_metadata(run)
  if _TO.value == 'timm' and 'variant' not in metadata:
    raise app.UsageError(
      f'--to=timm writes NFNets only; {workdir} trains a '
      f'{run.config.model.name}. Write the Haiku layout (--to=haiku).'
    )
  name = '-'.join(filter(None, [metadata['model'], metadata.get('variant')]))
  return run.params, metadata, f'{name}, {run.description} of {workdir}'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _check_flags()
  from nfnets import pretrained
  from nfnets.pretrained import timm_interop

  params, metadata, what = _from_file() if _INPUT.value else _from_workdir()
  output_files.make_parent(_OUTPUT.value)
  if _TO.value == 'timm':
    timm_interop.save_timm(params, _OUTPUT.value, metadata)
  else:
    pretrained.save_params(params, _OUTPUT.value, metadata)
  count = sum(x.size for leaves in params.values() for x in leaves.values())
  print(
    f'Wrote {_OUTPUT.value} ({_TO.value} layout, {what}, '
    f'{count / 1e6:.2f}M parameters).'
  )


if __name__ == '__main__':
  common.run(main)
