r"""Converts NFNet weights between formats, once, into a safe file.

    # DeepMind's dill pickle -> safetensors (read with a restricted
    # unpickler; nothing in the file is executed):
    python -m experiments.convert_weights --input=pretrained/F0_haiku.npz \
      --output=pretrained/F0.safetensors --variant=F0

    # -> a timm `dm_nfnet_f0` state dict (PyTorch layouts):
    python -m experiments.convert_weights --input=pretrained/F0_haiku.npz \
      --output=dm_nfnet_f0.safetensors --variant=F0 --to=timm

The input may be any format `nfnets.pretrained.read_params` reads (DeepMind
pickle, our .safetensors/.npz, timm safetensors). Names and shapes are
checked against --variant before anything is written. See docs/pretrained.md.
"""

import json
import os

from absl import app, flags

from experiments import common

_HAIKU_SUFFIXES = ('.safetensors', '.npz')  # The timm layout: safetensors.

_INPUT = flags.DEFINE_string('input', None, 'Source weights file.')
_OUTPUT = flags.DEFINE_string(
  'output', None, 'Destination: .safetensors, or .npz (haiku layout only).'
)
_VARIANT = flags.DEFINE_string('variant', 'F0', 'NFNet variant of the weights.')
_MODEL_KWARGS = flags.DEFINE_string(
  'model_kwargs', '{}', 'JSON of extra NFNet kwargs, e.g. {"width": 0.5}.'
)
_TO = flags.DEFINE_enum(
  'to', 'haiku', ['haiku', 'timm'], 'Layout of the output file.'
)
flags.mark_flags_as_required(['input', 'output'])


def _check_output():
  """Refuses an --output that cannot take the result, before any work.

  A conversion never replaces its source file (say, DeepMind's pickle),
  and its name must say a format the chosen layout is written in.
  """
  output = _OUTPUT.value
  if os.path.exists(output) and os.path.exists(_INPUT.value):
    if os.path.samefile(_INPUT.value, output):
      raise app.UsageError(
        f'--output={output} is the --input file; the conversion would '
        'replace it. Pass a new --output path.'
      )
  suffixes = ('.safetensors',) if _TO.value == 'timm' else _HAIKU_SUFFIXES
  if not output.endswith(suffixes):
    raise app.UsageError(
      f'--output={output}: name it {" or ".join(suffixes)} (--to={_TO.value}).'
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _check_output()
  from nfnets import pretrained  # Deferred: fast --help.
  from nfnets.pretrained import timm_interop

  kwargs = common.json_object_flag(_MODEL_KWARGS)
  params = pretrained.load(_INPUT.value, _VARIANT.value, **kwargs)
  common.make_parent(_OUTPUT.value)
  if _TO.value == 'timm':
    timm_interop.save_timm(params, _OUTPUT.value)
  else:
    metadata = {'variant': _VARIANT.value, 'model_kwargs': json.dumps(kwargs)}
    pretrained.save_params(params, _OUTPUT.value, metadata)
  count = sum(x.size for leaves in params.values() for x in leaves.values())
  print(
    f'Wrote {_OUTPUT.value} ({_TO.value} layout, NFNet-{_VARIANT.value}, '
    f'{count / 1e6:.2f}M parameters).'
  )


if __name__ == '__main__':
  common.run(main)
