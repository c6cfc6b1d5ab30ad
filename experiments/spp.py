r"""Signal Propagation Plots of NF and BN ResNets at initialisation.

    # The NF-ResNet paper's comparison: NF-ResNet-50, BN-ResNet-50 (v2) and
    # an unnormalised ResNet-50, on N(0, 1) inputs:
    python -m experiments.spp --outdir=runs/spp

    # Any models of nfnets.research.spp.SPP_MODELS, on real (digits) images:
    python -m experiments.spp --models=nf_resnet50,bn_resnet50_v1 \
      --inputs=digits --outdir=runs/spp_digits

Writes spp.csv (model, index, transition, avg_sq_mean, avg_var,
res_avg_var), one spp_<model>.png per model, spp_comparison.png and
spp_settings.json (the flags that made them; an --outdir holding another
run's SPPs is refused). See docs/research.md.
"""

import os

from absl import app, flags

from experiments import common

_MODELS = flags.DEFINE_list(
  'models',
  'nf_resnet50,bn_resnet50_v2,unnormalized_resnet50',
  'Keys of nfnets.research.spp.SPP_MODELS.',
)
_INPUTS = flags.DEFINE_enum(
  'inputs', 'gaussian', ['gaussian', 'digits', 'folder'], 'Input batch.'
)
_FOLDER_ROOT = flags.DEFINE_string(
  'folder_root', '', 'Root of a folder dataset (for --inputs=folder).'
)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Images in the batch.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Image height/width.')
_SKIP_GAIN = flags.DEFINE_float(
  'skip_gain', 1.0, 'Skip gain of NF blocks (their init, 0, hides branches).'
)
_SEED = flags.DEFINE_integer('seed', 0, 'Initialisation and noise seed.')
_OUTDIR = flags.DEFINE_string('outdir', 'runs/spp', 'Output directory.')


def _is_directory_path(path: str) -> bool:
  """--outdir's validator: no file in the way (found before the work)."""
  path = os.path.abspath(os.path.expanduser(path))
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise flags.ValidationError(f'{path} is a file; pass a directory.')
  return True


flags.register_validator('outdir', _is_directory_path)
flags.register_validator(
  'models',
  bool,
  'name at least one model, e.g. nf_resnet50 (the keys of '
  'nfnets.research.spp.SPP_MODELS).',
)
common.validate_int_range(_BATCH_SIZE, 1, meaning='images in the batch')
common.validate_int_range(_IMAGE_SIZE, 1, meaning='pixels per side')
flags.register_multi_flags_validator(
  ['inputs', 'folder_root'],
  lambda v: v['inputs'] != 'folder' or bool(v['folder_root']),
  '--inputs=folder reads the folder dataset at --folder_root: pass '
  '--folder_root=ROOT (ROOT/<split>/<class>/<image>).',
)


def _inputs() -> dict:
  """The input flags, as `spp.run_spp` records them."""
  inputs = dict(
    inputs=_INPUTS.value,
    batch_size=_BATCH_SIZE.value,
    image_size=_IMAGE_SIZE.value,
  )
  if _INPUTS.value == 'folder':
    inputs['folder_root'] = _FOLDER_ROOT.value
  return inputs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from nfnets.research import spp  # noqa: PLC0415  (keeps --help fast)

  # Before the images are read: an --outdir of another run is refused.
  spp.check_outdir(
    _OUTDIR.value,
    spp.settings_record(
      _MODELS.value, seed=_SEED.value, skip_gain=_SKIP_GAIN.value,
      inputs=_inputs(),
    ),
  )  # fmt: skip
  images = spp.load_images(
    _INPUTS.value,
    _BATCH_SIZE.value,
    _IMAGE_SIZE.value,
    folder_root=_FOLDER_ROOT.value,
    seed=_SEED.value,
  )
  if images.shape[0] < _BATCH_SIZE.value:
    # Padding with blank images would put their statistics in the plots.
    print(
      f'--inputs={_INPUTS.value} has {images.shape[0]} images, fewer than '
      f'--batch_size={_BATCH_SIZE.value}: using those {images.shape[0]}.'
    )
  spp.run_spp(
    _MODELS.value,
    images,
    _OUTDIR.value,
    seed=_SEED.value,
    skip_gain=_SKIP_GAIN.value,
    inputs=_inputs(),
  )


if __name__ == '__main__':
  common.run(main)
