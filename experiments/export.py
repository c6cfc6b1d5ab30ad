r"""Exports an NFNet for serving: SavedModel, TFLite or StableHLO.

    # A weights file (DeepMind's F*_haiku.npz, .safetensors, .npz):
    python -m experiments.export --weights=pretrained/F0_haiku.npz \
      --variant=F0 --format=savedmodel --out=exported/f0

    # A training run (the EMA params of its newest checkpoint; --params=raw
    # for the raw ones), taking uint8 images of any size:
    python -m experiments.export --workdir=runs/flowers --format=tflite \
      --preprocess=eval --out=exported/flowers.tflite

Weight standardisation and the gains are folded into the conv kernels
first, so the program holds plain convolutions. --preprocess=none exports
`images` = normalised float32 [N, S, S, 3] (S: the variant's test size or
the run's eval size) -> `logits` [N, C]; --preprocess=eval exports uint8
[N, H, W, 3] of any size, resized and cropped inside as in evaluation. N is
free in every format. --platforms lowers SavedModel and StableHLO programs
for other backends (cpu, cuda, rocm, tpu; e.g. cpu,cuda); TFLite runs on its
own kernels and refuses it. User errors exit with status 2 (usage)
or 1 (missing files); NFNETS_TRACEBACK=1 shows their tracebacks. See
docs/export.md.
"""

from absl import app, flags

from experiments import common, quiet_start, weights_flags

FORMATS = ('savedmodel', 'tflite', 'stablehlo')

_SOURCE = weights_flags.define_weights_flags('exports its newest checkpoint.')
_FORMAT = flags.DEFINE_enum('format', 'savedmodel', FORMATS, 'What to write.')
_OUT = flags.DEFINE_string(
  'out', None, 'Output: a directory (savedmodel) or a file.'
)
_PREPROCESS = flags.DEFINE_enum(
  'preprocess',
  'none',
  ['none', 'eval'],
  'none: normalised float32 [N, S, S, 3] in; eval: uint8 [N, H, W, 3] in, '
  'eval resize and crop inside.',
)
_PLATFORMS = flags.DEFINE_list(
  'platforms',
  ['cpu'],
  'Backends of the program (cpu, cuda, rocm, tpu; savedmodel and '
  'stablehlo only).',
)


@flags.multi_flags_validator(['format', 'platforms'])
def _check_platforms(values):
  """`export.check_platforms` at flag parsing, before any weights are read.

  An unknown name would be written into the program unchecked, and a
  TFLite file has no XLA platform: both are refused, not ignored.
  """
  from nfnets import export  # noqa: PLC0415  (JAX; the command needs it)

  try:
    export.check_platforms(values['format'], values['platforms'])
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


def _check_flags():
  _SOURCE.check()
  if not _OUT.value:
    raise app.UsageError('Pass --out=PATH, where the export is written.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _check_flags()
  if (
    _FORMAT.value != 'stablehlo' and not quiet_start.import_tensorflow_quietly()
  ):
    raise app.UsageError(
      f'--format={_FORMAT.value} needs TensorFlow, which is not installed '
      'here: install it (requirements.txt), or pass --format=stablehlo.'
    )
  # Deferred so --help and flag errors stay fast.
  from nfnets import export

  # Before any weights are read: a slip of --out must fail at once.
  export.check_destination(_FORMAT.value, _OUT.value)
  if _SOURCE.weights.value:
    spec, params, state = export.spec_from_weights(
      _SOURCE.weights.value,
      _SOURCE.variant.value,
      _SOURCE.parsed_model_kwargs(),
    )
  else:
    common.print_config_differences(_SOURCE.workdir.value, _SOURCE.config.value)
    spec, params, state = export.spec_from_workdir(
      _SOURCE.config.value,
      _SOURCE.workdir.value,
      _SOURCE.params.value,
      step=_SOURCE.step.value,
    )
  out = export.export_model(
    spec,
    params,
    state,
    fmt=_FORMAT.value,
    out=_OUT.value,
    preprocess=_PREPROCESS.value,
    platforms=tuple(_PLATFORMS.value),
  )
  shape, dtype, _ = export.serving.input_spec(spec, _PREPROCESS.value)
  source = f' ({spec.source})' if spec.source else ''
  print(
    f'Wrote {_FORMAT.value} {out}{source}: images {dtype.name} [{shape}] -> '
    f'logits float32 [b, {spec.num_classes}]'
  )


if __name__ == '__main__':
  common.run(main, prepare=common.use_run_config)
