"""What is exported: a model, its folded weights and its serving function.

An `ExportSpec` says which network and input the exported program has; it
comes from a weights file (`spec_from_weights`, any format
`nfnets.pretrained.load` reads) or a training run's workdir
(`spec_from_workdir`). `make_serving_fn` turns a spec and its folded params
into the function every format exports, `images -> {'logits': [N, C]}`,
with one of two input signatures (`input_spec`):

* `preprocess='none'`: normalised float32 images [N, S, S, 3], S the eval
  image size;
* `preprocess='eval'`: uint8 RGB images [N, H, W, 3] of any size, run
  through the eval transform (`nfnets.export.preprocess`) inside.

N (and, with 'eval', H and W) are symbolic in the exported program.
"""

import dataclasses
import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets.export import fold, preprocess
from nfnets.models import nfnet

PREPROCESS_MODES = ('none', 'eval')


@dataclasses.dataclass(frozen=True)
class ExportSpec:
  """The network and input of an exported program.

  Attributes:
    model_config: `config.model` (name, kwargs) of the network.
    num_classes: classifier width.
    image_size: the model's input size S (the eval image size).
    eval_mode: the eval transform of `preprocess='eval'` (a key of
      `nfnets.export.preprocess.EVAL_MODES`).
    source: which params these are, for messages (e.g. 'the EMA params of
      step 300'); empty for a weights file.
  """

  model_config: ml_collections.ConfigDict
  num_classes: int
  image_size: int
  eval_mode: str = 'resize_crop_32'
  source: str = ''


def check_preprocess(mode: str) -> None:
  """Raises a ValueError for a preprocess mode not in `PREPROCESS_MODES`."""
  if mode not in PREPROCESS_MODES:
    raise ValueError(
      f'Unknown preprocess {mode!r}; choose one of {list(PREPROCESS_MODES)}.'
    )


def check_inputs(spec: ExportSpec, preprocess_mode: str) -> None:
  """Refuses, before any work, an input the exported program cannot take.

  The eval transform needs an eval mode it can run, and normalises RGB:
  a model of another channel count takes its images as they are.
  """
  check_preprocess(preprocess_mode)
  if preprocess_mode != 'eval':
    return
  preprocess.check_eval_mode(spec.eval_mode)
  if _channels(spec) != 3:
    raise ValueError(
      f'--preprocess=eval normalises RGB images; this model takes '
      f'{_channels(spec)} channels: export it with --preprocess=none.'
    )


def _channels(spec: ExportSpec) -> int:
  return int(spec.model_config.kwargs.get('in_channels', 3) or 3)


def input_spec(spec: ExportSpec, preprocess_mode: str):
  """The exported input: (symbolic shape string, dtype, static shape).

  Args:
    spec: the export spec.
    preprocess_mode: 'none' or 'eval'.

  Returns:
    `(shape, dtype, static)`: a `jax.export.symbolic_shape` string such as
    'b, 256, 256, 3', the NumPy dtype, and the shape with None for the
    symbolic sizes (for TensorFlow's `TensorSpec`).
  """
  check_inputs(spec, preprocess_mode)
  if preprocess_mode == 'eval':
    return 'b, h, w, 3', np.dtype(np.uint8), (None, None, None, 3)
  s, c = spec.image_size, _channels(spec)
  return f'b, {s}, {s}, {c}', np.dtype(np.float32), (None, s, s, c)


def make_serving_fn(spec: ExportSpec, preprocess_mode: str):
  """`(folded params, model state, images) -> {'logits': float32 [N, C]}`.

  Args:
    spec: the export spec.
    preprocess_mode: 'none' (images are the model input) or 'eval' (uint8
      images, preprocessed inside).

  Returns:
    The pure function; apply it with `fold.fold_weight_standardization`'s
    params.
  """
  check_inputs(spec, preprocess_mode)
  model = fold.make_folded_model(spec.model_config, spec.num_classes)

  def serve(params, state, images):
    if preprocess_mode == 'eval':
      images = preprocess.eval_preprocess(
        images, spec.image_size, spec.eval_mode
      )
    outputs, _ = model.apply(params, state, None, images, False)
    return {'logits': outputs['logits'].astype(jnp.float32)}

  return serve


def spec_from_weights(
  path: str, variant: str | None = None, model_kwargs: dict | None = None
):
  """The spec and params of an NFNet weights file.

  Args:
    path: any file `nfnets.pretrained.load` reads.
    variant: the NFNet variant; None: the file's metadata, else 'F0'.
    model_kwargs: NFNet kwargs set over the file's metadata
      (`nfnets.pretrained.inference.model_spec`).

  Returns:
    `(spec, params, state)`, the state empty (NFNets keep none); the image
    size and eval transform are the file's `image_size` and `eval_preproc`
    (a training run's file records them, as `predict --weights` uses
    them), else the variant's test_imsize and 'resize_crop_32'.

  Raises:
    FileNotFoundError: no file at `path`.
    PretrainedMismatchError: the weights do not fit the variant.
  """
  from nfnets.pretrained import formats, inference, loading

  if not os.path.isfile(path):
    raise FileNotFoundError(f'No weights file {path!r}.')
  variant, model_kwargs = inference.model_spec(path, variant, model_kwargs)
  params = loading.load(path, variant, **model_kwargs)
  num_classes = params[loading.CLASSIFIER_MODULE]['b'].shape[0]
  kwargs = dict(model_kwargs, variant=variant)
  model_config = ml_collections.ConfigDict(dict(name='NFNet', kwargs=kwargs))
  metadata = formats.read_metadata(path)
  size = int(metadata.get('image_size', 0)) or int(
    nfnet.get_variant(variant)['test_imsize']
  )
  spec = ExportSpec(
    model_config,
    int(num_classes),
    size,
    metadata.get('eval_preproc', 'resize_crop_32'),
  )
  return spec, params, {}


def spec_from_workdir(
  config, workdir: str, params_set: str = 'ema', step: int | None = None
):
  """The spec and params of a training run's newest checkpoint, or `step`'s.

  Args:
    config: the run's config (`nfnets.train.provenance.load_run_config`).
    workdir: the training workdir.
    params_set: 'ema' (the EMA params, as evaluation reports them) or
      'raw'.
    step: the checkpoint to export (default: the newest readable one).

  Returns:
    `(spec, params, state)`; the image size and eval transform are the
    run's `config.data.eval_image_size` and `eval_preproc`; the number of
    classes is the run's record (`nfnets.train.run_weights`), so the
    dataset need not be here.

  Raises:
    ValueError: 'ema' for a run that keeps no EMA.
    FileNotFoundError: the workdir holds no complete checkpoint.
  """
  from nfnets.data import plan
  from nfnets.train import run_weights

  run = run_weights.run_params(workdir, params_set, config=config, step=step)
  model_config = ml_collections.ConfigDict(
    dict(name=config.model.name, kwargs=dict(config.model.kwargs))
  )
  spec = ExportSpec(
    model_config,
    run.info.num_classes,
    int(config.data.eval_image_size),
    plan.eval_preproc_mode(config.data, run.info.natural_images),
    source=run.description,
  )
  return spec, run.params, run.model_state
