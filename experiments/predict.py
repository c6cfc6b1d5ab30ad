r"""Classifies image files with pretrained NFNet weights; prints the top-5.

    python -m experiments.predict --weights=pretrained/F0_haiku.npz \
      photo1.jpg photo2.png

Each image gets the reference's evaluation preprocessing (resize to
(S+32)^2 ignoring the aspect ratio, centre crop S = the variant's test size,
normalise); 1000-class weights are labelled with the bundled ImageNet class
names. The variant (and any other model kwargs) come from the flags, else
from the weights file's metadata, else F0. See docs/pretrained.md.
"""

import json
import sys

from absl import app, flags

_WEIGHTS = flags.DEFINE_string(
  'weights', None, 'Weights file: DeepMind F*_haiku.npz, .safetensors, .npz.'
)
_VARIANT = flags.DEFINE_string(
  'variant', None, 'NFNet variant (F0..F7, F0+..); default: from the file.'
)
_MODEL_KWARGS = flags.DEFINE_string(
  'model_kwargs', None, 'JSON of extra NFNet kwargs, e.g. {"width": 0.5}.'
)
_IMAGE_SIZE = flags.DEFINE_integer(
  'image_size', None, "Input size; default: the variant's test_imsize."
)
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes to print per image.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per image.')
flags.mark_flags_as_required(['weights'])


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Pass one or more image files after the flags.')
  # Deferred so --help and flag errors stay fast.
  from nfnets import pretrained
  from nfnets.pretrained import inference

  kwargs = json.loads(_MODEL_KWARGS.value) if _MODEL_KWARGS.value else None
  try:
    results = inference.predict_files(
      paths,
      _WEIGHTS.value,
      variant=_VARIANT.value,
      model_kwargs=kwargs,
      image_size=_IMAGE_SIZE.value,
      k=_TOP_K.value,
    )
  except (FileNotFoundError, pretrained.WeightsError) as e:
    sys.stderr.write(f'{e}\n')
    sys.exit(1)
  for path, top in zip(paths, results, strict=True):
    if _JSON.value:
      print(json.dumps({'image': path, 'top_k': top}))
      continue
    print(path)
    for rank, (name, prob) in enumerate(top, 1):
      print(f'  {rank}. {name:<40s} {100 * prob:6.2f}%')


if __name__ == '__main__':
  app.run(main)
