"""The steady training rate of a run, against the benchmark's step rate.

  python scripts/train_rate.py --workdir=W [--benchmark_json=B.json]
    [--skip=50] [--augment=auto]

Reads `W/metrics.jsonl` (the trainer's record) and prints the median
`train/images_per_sec` and mean `train/input_wait` over the logged steps
after the first `--skip` (compilation and warm-up). With a JSON written by
`experiments.benchmark --json_out` it also prints the run's rate as a
fraction of the benchmark's images/s for the same model (variant, width,
depth), batch, image size, augmentation placement and SAM form, read from
the run's `W/config.json`; `--augment=auto` is 'device' when the run's
recipe has MixUp, CutMix or RandAugment (run the benchmark with
`--augment=device`) and 'none' otherwise; a run with SAM needs a result of
its `--sam` form. No such result is an error listing what the JSON
holds. The input pipeline keeps the accelerator busy when that fraction is
near 1 and `input_wait` near 0.
"""

import argparse
import json
import os
import statistics


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


def _run_augment(data):
  """The benchmark's --augment that times what the run's step does."""
  recipe = data.get('mixup_alpha', 0) > 0 or data.get('cutmix')
  recipe = recipe or data.get('randaugment')
  return 'device' if recipe else 'none'


def _run_sam(optimizer):
  """The benchmark's --sam that times the run's SAM ('other': none does)."""
  if not optimizer.get('sam_rho'):
    return 'off'
  form = (
    optimizer.get('sam_ascent_fraction', 1.0),
    optimizer.get('sam_ascent_sync', True),
  )
  return {(1.0, True): 'sync', (0.2, False): 'paper'}.get(form, 'other')


def _wanted(config, augment):
  """What a matching benchmark result has, from the run's config.json."""
  kwargs = config['model'].get('kwargs', {})
  model = {k: kwargs[k] for k in ('variant', 'width', 'depth') if k in kwargs}
  if 'depth' in model and model['depth'] is not None:
    model['depth'] = list(model['depth'])
  return {
    'batch_size': config['train']['batch_size'],
    'image_size': config['data']['train_image_size'],
    'augment': _run_augment(config['data']) if augment == 'auto' else augment,
    'sam': _run_sam(config.get('optimizer', {})),
    'model': model,
  }


def _matches(result, wanted):
  options = result.get('options', {})
  same_model = all(
    k not in options or options[k] == v for k, v in wanted['model'].items()
  )
  return (
    same_model
    and result.get('batch_size') == wanted['batch_size']
    and result.get('image_size') == wanted['image_size']
    and options.get('augment', 'none') == wanted['augment']
    and options.get('sam', 'off') == wanted['sam']
  )


def _benchmark_rate(path, workdir, augment):
  """The images/s of the benchmark result that matches the run."""
  with open(os.path.join(workdir, 'config.json')) as f:
    wanted = _wanted(json.load(f), augment)
  with open(path) as f:
    results = json.load(f)
  matching = [r for r in results if _matches(r, wanted)]
  if not matching:
    held = '; '.join(
      f'{r.get("model")} batch {r.get("batch_size")} at '
      f'{r.get("image_size")} px, augment={r["options"].get("augment")}, '
      f'sam={r["options"].get("sam", "off")}'
      for r in results
    )
    raise SystemExit(
      f'No result in {path} for the run ({wanted}); it holds: {held}. '
      "Benchmark the run's model, batch and size (and --augment=device "
      'for a run with MixUp, CutMix or RandAugment, --sam for a run with '
      'SAM).'
    )
  return matching[0]['images_per_s']


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
    "'device' when the run's recipe augments, else 'none'.",
  )
  args = parser.parse_args()
  with open(os.path.join(args.workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if line.strip()]
  rate, wait, n = _steady(records, args.skip)
  out = {'train_images_per_s': rate, 'input_wait': wait, 'records': n}
  if args.benchmark_json:
    bench = _benchmark_rate(args.benchmark_json, args.workdir, args.augment)
    out.update(benchmark_images_per_s=bench, fraction=rate / bench)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
