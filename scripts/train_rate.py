"""The steady training rate of a run, against the benchmark's step rate.

  python scripts/train_rate.py --workdir=W [--benchmark_json=B.json]
    [--skip=50] [--augment=device]

Reads `W/metrics.jsonl` (the trainer's record) and prints the median
`train/images_per_sec` and mean `train/input_wait` over the logged steps
after the first `--skip` (compilation and warm-up). With a JSON written by
`experiments.benchmark --json_out` it also prints the run's rate as a
fraction of the benchmark's images/s for the same model, batch and
augmentation placement (the result with `options.augment == --augment`): the
input pipeline keeps the accelerator busy when that fraction is near 1
and `input_wait` near 0.
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--benchmark_json', default='')
  parser.add_argument('--skip', type=int, default=50)
  parser.add_argument(
    '--augment',
    default='device',
    help="The benchmark result to compare with (its --augment): 'device' "
    'for a run with the augmentation on the accelerator.',
  )
  args = parser.parse_args()
  with open(os.path.join(args.workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if line.strip()]
  rate, wait, n = _steady(records, args.skip)
  out = {'train_images_per_s': rate, 'input_wait': wait, 'records': n}
  if args.benchmark_json:
    with open(args.benchmark_json) as f:
      results = json.load(f)
    matching = [
      r for r in results if r['options'].get('augment') == args.augment
    ]
    if not matching:
      raise SystemExit(f'No result with augment={args.augment!r} in JSON.')
    bench = matching[0]['images_per_s']
    out.update(benchmark_images_per_s=bench, fraction=rate / bench)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
