"""The steady training rate of a run, against the benchmark's step rate.

  python scripts/train_rate.py --workdir=W [--benchmark_json=B.json]
    [--skip=50] [--augment=auto]

Reads `W/metrics.jsonl` (the trainer's record) and prints the median
`train/images_per_sec` and mean `train/input_wait` over the logged steps
after the first `--skip` (compilation and warm-up). With a JSON written by
`experiments.benchmark --json_out` (its per-model results, or the rows of
`--table=paper`) it also prints the run's rate as a fraction of the
benchmark's images/s for the result that times the run's own step, read
from the run's `W/config.json`: the same model (family and variant, e.g.
'NFNet-F0', never an NF-ResNet-50 result for an F0 run; width, depth,
remat and scan_blocks, a setting missing on either side taken as the
constructor's default), batch, image size, compute dtype
(`config.train.compute_dtype` against the result's dtype), augmentation
and SAM form.

`--augment=auto` takes the benchmark's `--augment` from where the run
augmented: with MixUp, CutMix or RandAugment on the device
(`data.augment_on`, as the run's segment records in `W/configs/` say
'auto' resolved, else as its config says) 'device' ('device_reference'
for reference pairing), and 'none' for a run that augments on the host
(a CPU run by default) or not at all. A run with SAM needs a result of its
`--sam` form. No such result is an error listing what the JSON holds.

The benchmark's step runs with EMA off; a run with `optimizer.ema_decay` >
0 does one more pass over the parameters per step, so its fraction reads a
little low (the output says so under `note`). The input pipeline keeps
the accelerator busy when the fraction is near 1 and `input_wait` near 0.
"""

import argparse
import inspect
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The model settings a matching result must share with the run.
MODEL_KEYS = ('variant', 'width', 'depth', 'remat', 'scan_blocks')
_NO_VALUE = '<none>'  # A setting neither given nor a constructor default.


def _steady(records, skip):
  rates = [
    (r['train/images_per_sec'], r.get('train/input_wait', 0.0))
    for r in records
    if r.get('step', 0) > skip and 'train/images_per_sec' in r
  ]
  if not rates:
    raise SystemExit(f'No logged train steps after step {skip}.')
  return (
    statistics.median(r for r, _ in rates),
    statistics.fmean(w for _, w in rates),
    len(rates),
  )


def _recorded_choices(workdir):
  """What the run's latest segment made of its settings at 'auto'."""
  from nfnets.train import provenance  # noqa: PLC0415

  records = provenance.segment_records(workdir)
  return records[-1][1].get(provenance.AUTO_CHOICES, {}) if records else {}


def _run_augment(data, choices):
  """The benchmark's --augment that times what the run's step does."""
  mixing = data.get('mixup_alpha', 0) > 0 or bool(data.get('cutmix'))
  if not (mixing or data.get('randaugment')):
    return 'none'
  placement = choices.get('data.augment_on', data.get('augment_on', 'auto'))
  if placement == 'auto':
    raise SystemExit(
      "The run's config leaves data.augment_on at 'auto' and its workdir "
      'records no choice: pass --augment=device (it augmented on an '
      'accelerator) or --augment=none (on the host).'
    )
  if placement == 'host':
    return 'none'  # The step gets augmented float images.
  pairing = choices.get('data.mix_pairing', data.get('mix_pairing', 'auto'))
  return 'device_reference' if mixing and pairing == 'reference' else 'device'


def _run_sam(optimizer):
  """The benchmark's --sam that times the run's SAM ('other': none does)."""
  if not optimizer.get('sam_rho'):
    return 'off'
  form = (
    optimizer.get('sam_ascent_fraction', 1.0),
    optimizer.get('sam_ascent_sync', True),
  )
  return {(1.0, True): 'sync', (0.2, False): 'paper'}.get(form, 'other')


def _model_settings(name, kwargs):
  """`MODEL_KEYS` of a model as built: the constructor's default if unset."""
  from nfnets import models  # noqa: PLC0415

  params = inspect.signature(models.get_constructor(name)).parameters
  settings = {}
  for key in MODEL_KEYS:
    default = getattr(params.get(key), 'default', inspect.Parameter.empty)
    if key in kwargs:
      value = kwargs[key]
    else:
      value = _NO_VALUE if default is inspect.Parameter.empty else default
    settings[key] = list(value) if isinstance(value, list | tuple) else value
  return settings


def _wanted(config, augment, choices):
  """What a matching benchmark result has, from the run's config.json."""
  import ml_collections  # noqa: PLC0415

  from nfnets.perf import workload  # noqa: PLC0415

  name, kwargs = config['model']['name'], config['model'].get('kwargs', {})
  model = ml_collections.ConfigDict({'name': name, 'kwargs': kwargs})
  return {
    'model': workload.display_name(model),
    'name': name,
    'settings': _model_settings(name, kwargs),
    'batch_size': config['train']['batch_size'],
    'image_size': config['data']['train_image_size'],
    # config.train's default, for a config.json written before the key.
    'dtype': config['train'].get('compute_dtype', 'bfloat16'),
    'augment': (
      _run_augment(config['data'], choices) if augment == 'auto' else augment
    ),
    'sam': _run_sam(config.get('optimizer', {})),
  }


def _matches(result, wanted):
  """Whether `result` timed the step the run trains with."""
  options = result.get('options') or {}
  if result.get('model') != wanted['model']:
    return False  # Another family or variant: its settings are not ours.
  return (
    _model_settings(wanted['name'], options) == wanted['settings']
    and result.get('batch_size') == wanted['batch_size']
    and result.get('image_size') == wanted['image_size']
    and result.get('dtype') == wanted['dtype']
    and options.get('augment', 'none') == wanted['augment']
    and options.get('sam', 'off') == wanted['sam']
  )


def _load_results(path):
  """The results of a benchmark JSON: per-model, or --table=paper rows."""
  with open(path) as f:
    rows = json.load(f)
  if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
    raise SystemExit(
      f'{path} is not a JSON list of results: pass a file written by '
      'experiments.benchmark --json_out.'
    )
  # --table=paper rows hold the result under 'result', beside the paper's.
  return [r['result'] if 'result' in r else r for r in rows]


def _describe(result):
  options = result.get('options') or {}
  return (
    f'{result.get("model")} batch {result.get("batch_size")} at '
    f'{result.get("image_size")} px, {result.get("dtype")}, '
    f'augment={options.get("augment", "none")}, '
    f'sam={options.get("sam", "off")}'
  )


def _benchmark_result(path, workdir, augment):
  """The benchmark result that matches the run."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  wanted = _wanted(config, augment, _recorded_choices(workdir))
  results = _load_results(path)
  matching = [r for r in results if _matches(r, wanted)]
  if not matching:
    held = '; '.join(_describe(r) for r in results) or 'nothing'
    raise SystemExit(
      f'No result in {path} for the run ({wanted}); it holds: {held}. '
      "Benchmark the run's model, batch, size and --dtype (and "
      '--augment=device for a run that augments on the device, --sam for '
      'a run with SAM).'
    )
  return matching[0], config


def _benchmark_rate(path, workdir, augment):
  """The images/s of the benchmark result that matches the run."""
  return _benchmark_result(path, workdir, augment)[0]['images_per_s']


def _ema_note(config):
  """Says why a run with an EMA reads a little below the benchmark."""
  decay = config.get('optimizer', {}).get('ema_decay', 0.0) or 0.0
  if decay <= 0:
    return None
  return (
    f'the benchmark step runs with EMA off; this run keeps an EMA (decay '
    f'{decay}), one more pass over the parameters per step'
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--benchmark_json', default='')
  parser.add_argument('--skip', type=int, default=50)
  parser.add_argument(
    '--augment',
    default='auto',
    choices=('auto', 'none', 'device', 'device_reference'),
    help='The benchmark result to compare with (its --augment); auto: '
    "from where the run augmented ('device' or 'device_reference' on the "
    "device, else 'none').",
  )
  args = parser.parse_args()
  with open(os.path.join(args.workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if line.strip()]
  rate, wait, n = _steady(records, args.skip)
  out = {'train_images_per_s': rate, 'input_wait': wait, 'records': n}
  if args.benchmark_json:
    result, config = _benchmark_result(
      args.benchmark_json, args.workdir, args.augment
    )
    bench = result['images_per_s']
    out.update(
      benchmark_images_per_s=bench,
      fraction=rate / bench,
      benchmark_result=_describe(result),
    )
    note = _ema_note(config)
    if note:
      out['note'] = note
  print(json.dumps(out))


if __name__ == '__main__':
  main()
