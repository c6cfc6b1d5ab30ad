"""Signal Propagation Plots (Brock, De & Smith, ICLR 2021, section 4).

An SPP follows three statistics of a network at initialisation, fed a batch
of N(0, 1) inputs or real images, through the residual stream:

* `avg_sq_mean`: the average over channels of the squared channel mean (over
  N, H, W), after the stem (index 0) and after each block (index k + 1);
* `avg_var`: the average channel variance at the same points;
* `res_avg_var`: the average channel variance at the end of each residual
  branch, before the skip-add (and before any skip gain or alpha).

Every model of the registry reports them with `return_metrics=True`; this
module runs a model, collects them into an `SPP`, and writes CSV and PNG
files. NF models start with skip gains of 0 (every block is the identity at
init), which would hide the branches; like the paper's plots, `compute_spp`
sets them to 1 by default (`skip_gain`). `run_spp` records its settings
beside the files (`spp_settings.json`) and refuses an output directory that
holds another run's.
"""

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import atomic_files, models
from nfnets.models import nf_regnet, nf_resnet, nfnet

# Ready-made SPP models: name -> (config.model.name, constructor kwargs).
# Stochastic depth and dropout are off: an SPP is about the initialisation.
SPP_MODELS = {
  'nf_resnet50': (
    'NF_ResNet',
    dict(variant='ResNet50', stochdepth_rate=0.0, drop_rate=0.0),
  ),
  'bn_resnet50_v2': ('ResNet', dict(variant='ResNet50', preactivation=True)),
  'bn_resnet50_v1': ('ResNet', dict(variant='ResNet50', preactivation=False)),
  'unnormalized_resnet50': (
    'ResNet',
    dict(variant='ResNet50', preactivation=True, norm='none', conv_init='he'),
  ),
  'nf_regnet_b0': (
    'NF_RegNet',
    dict(variant='B0', stochdepth_rate=0.0, drop_rate=0.0),
  ),
  'nfnet_f0': ('NFNet', dict(variant='F0', stochdepth_rate=0.0, drop_rate=0.0)),
}

# The models of the NF-ResNet paper's comparison figure.
COMPARISON = ('nf_resnet50', 'bn_resnet50_v2', 'unnormalized_resnet50')
STATS = ('avg_sq_mean', 'avg_var', 'res_avg_var')


@dataclasses.dataclass
class SPP:
  """Signal-propagation statistics of one network.

  Attributes:
    avg_sq_mean: [num_blocks + 1]; index 0 is the stem output, k + 1 the
      output of block k.
    avg_var: [num_blocks + 1], same indexing.
    res_avg_var: [num_blocks], the residual branch of each block.
    transitions: indices k of the blocks that start a stage.
  """

  avg_sq_mean: np.ndarray
  avg_var: np.ndarray
  res_avg_var: np.ndarray
  transitions: tuple[int, ...]

  @property
  def num_blocks(self) -> int:
    return len(self.res_avg_var)


def get_spp_model(name: str) -> tuple[str, dict]:
  """Returns `(model name, kwargs)` of `SPP_MODELS[name]`; lists names."""
  if name not in SPP_MODELS:
    raise ValueError(
      f'Unknown SPP model {name!r}; choose one of {list(SPP_MODELS)}.'
    )
  model_name, kwargs = SPP_MODELS[name]
  return model_name, dict(kwargs)


def stage_transitions(model_name: str, kwargs: Mapping) -> tuple[int, ...]:
  """Indices of the first block of each stage of a registry model.

  Args:
    model_name: key of `nfnets.models.MODELS`.
    kwargs: its constructor kwargs (variant, depth).

  Returns:
    Block indices, starting with 0.
  """
  variant, depth = kwargs.get('variant'), kwargs.get('depth')
  if model_name in ('NF_ResNet', 'ResNet'):
    depth = nf_resnet.resolve_depth(variant or 'ResNet50', depth)
  elif model_name == 'NF_RegNet':
    depth = depth or nf_regnet.get_variant(variant or 'B0')['depth']
  elif model_name == 'NFNet':
    depth = depth or nfnet.get_variant(variant or 'F0')['depth']
  else:
    models.get_constructor(model_name)  # Unknown names raise here.
    raise ValueError(f'No stage layout known for {model_name!r}.')
  return tuple(int(i) for i in np.cumsum((0, *depth[:-1])))


def make_forward(
  model_name: str, kwargs: Mapping, num_classes: int = 10
) -> hk.TransformedWithState:
  """Transforms a registry model to return its SPP metrics.

  Runs with `is_training=True` so BatchNorm uses batch statistics, as the
  paper's SPPs do; keep stochastic depth and dropout off in `kwargs`.

  Args:
    model_name: key of `nfnets.models.MODELS`.
    kwargs: constructor kwargs.
    num_classes: classifier width (irrelevant to the statistics).

  Returns:
    `hk.transform_with_state` of `images -> outputs dict`.
  """
  constructor = models.get_constructor(model_name)
  kwargs = dict(kwargs)

  def forward(images):
    model = constructor(num_classes=num_classes, **kwargs)
    return model(images, is_training=True, return_metrics=True)

  return hk.transform_with_state(forward)


def set_skip_gains(params, value: float):
  """Returns `params` with every scalar `skip_gain` set to `value`."""
  return {
    module: {
      k: jnp.full_like(v, value) if k == 'skip_gain' else v
      for k, v in leaves.items()
    }
    for module, leaves in params.items()
  }


def compute_spp(
  model_name: str,
  kwargs: Mapping,
  images: np.ndarray,
  *,
  seed: int = 0,
  skip_gain: float | None = 1.0,
) -> SPP:
  """Initialises a model and measures its signal propagation on `images`.

  Args:
    model_name: key of `nfnets.models.MODELS`.
    kwargs: constructor kwargs.
    images: NHWC float batch (N(0, 1) noise or normalised real images).
    seed: seed of the parameter initialisation.
    skip_gain: value for every `skip_gain` parameter (None keeps the init).

  Returns:
    The `SPP`.
  """
  net = make_forward(model_name, kwargs)
  # The RngBitGenerator key compiles Haiku's init 2-3x faster on CPU than
  # threefry; the initial weights have the same distribution.
  rng = jax.random.key(seed, impl='unsafe_rbg')
  params, state = jax.jit(net.init)(rng, images)
  if skip_gain is not None:
    params = set_skip_gains(params, skip_gain)
  out, _ = jax.jit(net.apply)(params, state, rng, images)
  return spp_from_metrics(
    jax.device_get(out), stage_transitions(model_name, kwargs)
  )


def spp_from_metrics(
  outputs: Mapping, transitions: Sequence[int] = (0,)
) -> SPP:
  """Collects `avg_sq_mean_i`, `avg_var_i`, `res_avg_var_k` into an `SPP`.

  Args:
    outputs: a model's outputs with `return_metrics=True`.
    transitions: first block of each stage.

  Returns:
    The `SPP`.
  """
  num_blocks = sum(1 for k in outputs if k.startswith('res_avg_var_'))
  if not num_blocks:
    raise ValueError('No SPP metrics found; call the model with '
                     'return_metrics=True.')  # fmt: skip

  def series(prefix, n):
    return np.array([float(outputs[f'{prefix}_{i}']) for i in range(n)])

  return SPP(
    avg_sq_mean=series('avg_sq_mean', num_blocks + 1),
    avg_var=series('avg_var', num_blocks + 1),
    res_avg_var=series('res_avg_var', num_blocks),
    transitions=tuple(transitions),
  )


def gaussian_images(batch_size: int, image_size: int, seed: int = 0):
  """A float32 NHWC batch of N(0, 1) noise, the SPPs' default input."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, image_size, image_size, 3)
  return rng.standard_normal(shape, dtype=np.float32)


def write_csv(results: Mapping[str, SPP], path: str) -> None:
  """Writes one row per (model, depth index) with the three statistics.

  `index` 0 is the stem output (no residual branch: `res_avg_var` empty);
  index k + 1 is the output of block k; `transition` marks stage starts.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['model', 'index', 'transition', *STATS])
    for name, spp in results.items():
      for i in range(spp.num_blocks + 1):
        res = '' if i == 0 else f'{spp.res_avg_var[i - 1]:.6g}'
        writer.writerow([
          name,
          i,
          int(i > 0 and (i - 1) in spp.transitions),
          f'{spp.avg_sq_mean[i]:.6g}',
          f'{spp.avg_var[i]:.6g}',
          res,
        ])  # fmt: skip


def read_csv(path: str) -> dict[str, SPP]:
  """Reads `write_csv`'s file back (e.g. to replot without recomputing).

  Args:
    path: a CSV written by `write_csv`.

  Returns:
    model name -> SPP, in file order.
  """
  rows_by_model = {}
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      rows_by_model.setdefault(row['model'], []).append(row)
  results = {}
  for name, rows in rows_by_model.items():
    rows.sort(key=lambda r: int(r['index']))
    results[name] = SPP(
      avg_sq_mean=np.array([float(r['avg_sq_mean']) for r in rows]),
      avg_var=np.array([float(r['avg_var']) for r in rows]),
      res_avg_var=np.array([float(r['res_avg_var']) for r in rows[1:]]),
      transitions=tuple(
        int(r['index']) - 1 for r in rows if r['transition'] == '1'
      ),
    )
  return results


def plot_spp(
  results: Mapping[str, SPP], path: str, title: str = '', log_scale=True
) -> None:
  """Plots the three SPP statistics of one or more models side by side.

  Args:
    results: label -> SPP; each becomes one line per panel.
    path: output PNG path.
    title: figure title.
    log_scale: log y axes (the statistics of unnormalised networks span
      decades).
  """
  import matplotlib  # noqa: PLC0415  (plotting is optional at import time)

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  panels = (
    ('avg_sq_mean', 'Average squared channel mean'),
    ('avg_var', 'Average channel variance'),
    ('res_avg_var', 'Residual branch: avg channel variance'),
  )
  for ax, (stat, label) in zip(axes, panels, strict=True):
    for name, spp in results.items():
      values = getattr(spp, stat)
      x = np.arange(len(values)) + (1 if stat == 'res_avg_var' else 0)
      ax.plot(x, values, marker='.', markersize=3, linewidth=1, label=name)
    first = next(iter(results.values()))
    for t in first.transitions[1:]:
      ax.axvline(t + 1, color='0.85', linewidth=0.8, zorder=0)
    if log_scale:
      ax.set_yscale('log')
    ax.set_title(label, fontsize=9)
    ax.set_xlabel('depth (residual blocks)', fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_files.atomic_output(path) as tmp:  # Whole or not at all.
    fig.savefig(tmp, dpi=90)
  plt.close(fig)


INPUTS = ('gaussian', 'digits', 'folder')


def load_images(
  source: str,
  batch_size: int,
  image_size: int,
  folder_root: str = '',
  seed: int = 0,
) -> np.ndarray:
  """One NHWC float32 batch: N(0, 1) noise or normalised real images.

  Args:
    source: 'gaussian', 'digits' (bundled with scikit-learn) or 'folder'
      (ROOT/<split>/<class>/<image>, see `nfnets.data`).
    batch_size: number of images; a dataset split with fewer images gives
      all of them (a smaller batch), never padding.
    image_size: height and width.
    folder_root: the folder dataset's root, for source='folder'.
    seed: seed of the noise.

  Returns:
    The batch, [min(batch_size, split size), S, S, 3].
  """
  if source not in INPUTS:
    raise ValueError(f'Unknown SPP input {source!r}; choose one of {INPUTS}.')
  if source == 'gaussian':
    return gaussian_images(batch_size, image_size, seed)
  if source == 'folder' and not folder_root:
    raise ValueError("Set folder_root for source='folder'.")
  from nfnets import data  # noqa: PLC0415  (pulls in TensorFlow)

  config = data.default_config()
  config.name = source
  config.folder_root = folder_root
  config.eval_image_size = image_size
  batch = next(data.make_eval_iterator(config, global_batch_size=batch_size))
  # The eval pipeline pads a short split with blank images (mask 0); their
  # statistics are not the data's, so only the real images are kept.
  real = np.asarray(batch['mask']) > 0
  return np.asarray(batch['images'][real], np.float32)


def _make_outdir(outdir: str) -> None:
  """Makes `outdir`, failing clearly (and early) where a file is in the way."""
  path = os.path.abspath(outdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise NotADirectoryError(
      f'Output directory {outdir!r}: {path!r} is a file; pass a directory.'
    )
  os.makedirs(outdir, exist_ok=True)


SETTINGS_FILE = 'spp_settings.json'


def settings_record(
  names: Sequence[str], *, seed: int, skip_gain, inputs: Mapping
) -> dict:
  """What `run_spp` records in `<outdir>/spp_settings.json` (JSON types)."""
  record = dict(models=list(names), seed=seed, skip_gain=skip_gain, **inputs)
  return json.loads(json.dumps(record))


def check_outdir(outdir: str, settings: Mapping) -> None:
  """Refuses an outdir that holds the SPPs of a run with other settings.

  Its plots of models this run leaves out would stay beside the new
  spp.csv, as if they were this run's. A run with the same settings
  writes the same files again.

  Args:
    outdir: the output directory.
    settings: `settings_record`'s dict of this run.

  Raises:
    ValueError: naming the settings that differ, or saying the outdir's
      spp.csv has no record of its settings.
  """
  path = os.path.join(outdir, SETTINGS_FILE)
  try:
    with open(path) as f:
      saved = json.load(f)
  except (FileNotFoundError, ValueError):
    if not os.path.exists(os.path.join(outdir, 'spp.csv')):
      return
    saved = None
  if saved == dict(settings):
    return
  if isinstance(saved, dict):
    keys = sorted(set(saved) | set(settings))
    what = 'other settings: ' + ', '.join(
      f'{k} {saved.get(k)!r} -> {settings.get(k)!r}'
      for k in keys
      if saved.get(k) != settings.get(k)
    )
  else:
    what = f'no readable {SETTINGS_FILE} says how its spp.csv was made'
  raise ValueError(
    f'{outdir} holds the SPPs of another run ({what}); write this one to '
    'another --outdir.'
  )


def run_spp(
  names: Sequence[str],
  images: np.ndarray,
  outdir: str,
  *,
  seed: int = 0,
  skip_gain: float | None = 1.0,
  inputs: Mapping | None = None,
  log=print,
) -> dict[str, SPP]:
  """Computes the SPPs of `SPP_MODELS` entries and writes CSV and PNGs.

  Writes `outdir/spp_settings.json` (the settings, `settings_record`),
  `outdir/spp.csv`, one `outdir/spp_<name>.png` per model and, when more
  than one model is given, `outdir/spp_comparison.png` with all of them
  overlaid (the NF-ResNet paper's figure for `COMPARISON`). An outdir
  that holds the SPPs of a run with other settings is refused
  (`check_outdir`).

  Args:
    names: keys of `SPP_MODELS`.
    images: the input batch.
    outdir: output directory.
    seed: parameter initialisation seed.
    skip_gain: value of NF blocks' skip gains (None keeps the init of 0).
    inputs: how `images` were made, recorded with the settings (the
      command's input flags); default: their shape.
    log: progress printer.

  Returns:
    name -> SPP.

  Raises:
    ValueError: for no names or an unknown one, or an outdir of another
      run, before computing anything.
    NotADirectoryError: when `outdir` is a file, also before computing.
  """
  if not names:
    raise ValueError(f'No SPP models given; choose from {list(SPP_MODELS)}.')
  specs = {name: get_spp_model(name) for name in names}  # Validate first.
  if inputs is None:
    inputs = {'images': list(images.shape)}
  settings = settings_record(
    names, seed=seed, skip_gain=skip_gain, inputs=inputs
  )
  _make_outdir(outdir)
  check_outdir(outdir, settings)
  with open(os.path.join(outdir, SETTINGS_FILE), 'w') as f:
    json.dump(settings, f, indent=1)  # First: it covers every plot below.
  results = {}
  for name, (model_name, kwargs) in specs.items():
    log(f'SPP of {name} on {images.shape[0]} images of {images.shape[1]} px')
    results[name] = compute_spp(
      model_name, kwargs, images, seed=seed, skip_gain=skip_gain
    )
    plot_spp({name: results[name]}, os.path.join(outdir, f'spp_{name}.png'))
  write_csv(results, os.path.join(outdir, 'spp.csv'))
  if len(results) > 1:
    plot_spp(
      results,
      os.path.join(outdir, 'spp_comparison.png'),
      title='Signal propagation at initialisation',
    )
  log(f'Wrote spp.csv and plots to {outdir}')
  return results
