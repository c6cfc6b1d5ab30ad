"""Writes a synthetic ImageNet-like folder dataset (data.name='folder').

  python scripts/write_synthetic_folder.py --out=/tmp/synth --classes=100 \
    --train_per_class=30 --val_per_class=2

JPEGs of ImageNet's size and file size cut from scikit-image's photos
(`nfnets.data.synthetic`), for timing the input pipeline and the trainer
end to end where no dataset can be downloaded. Accuracy on it means
nothing.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import arg_types  # noqa: E402

from nfnets.data import synthetic  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='Folder to write.')
  parser.add_argument('--classes', type=arg_types.int_at_least(1), default=100)
  parser.add_argument(
    '--train_per_class', type=arg_types.int_at_least(1), default=30
  )
  parser.add_argument(
    '--val_per_class', type=arg_types.int_at_least(0), default=2
  )
  parser.add_argument('--quality', type=arg_types.int_at_least(1), default=95)
  args = parser.parse_args()
  if args.quality > 100:
    parser.error(f'argument --quality: pass 1 to 100, got {args.quality}')
  start = time.perf_counter()
  total = synthetic.write_image_folder(
    args.out,
    args.classes,
    {'train': args.train_per_class, 'validation': args.val_per_class},
    quality=args.quality,
  )
  count = args.classes * (args.train_per_class + args.val_per_class)
  print(
    f'Wrote {count} JPEGs ({total / 2**20:.0f} MiB, '
    f'{total / count / 1e3:.0f} KB each) to {args.out} in '
    f'{time.perf_counter() - start:.0f} s.'
  )


if __name__ == '__main__':
  main()
