"""A peer baseline: times timm's PyTorch `dm_nfnet_f*` training step.

Same protocol as `experiments.benchmark`: median over full training steps
(forward, backward, SGD-Nesterov update) on synthetic data already on the
device. A standalone script, independent of this package: it needs torch and
timm, which are NOT project requirements; run it where they are installed
(e.g. a GPU image), for docs/performance.md:

  python scripts/bench_timm.py --model=dm_nfnet_f0 --batch_size=32 \
    --image_size=192 --steps=50 --dtype=bfloat16
"""

import argparse
import json
import statistics
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--model', default='dm_nfnet_f0')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--image_size', type=int, default=192)
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
  p.add_argument('--channels_last', action='store_true')
  p.add_argument('--compile', action='store_true', help='torch.compile')
  return p.parse_args()


def main():
  """Builds the timm model and prints the median step time as JSON."""
  args = _parse()  # First: --help works without torch.
  import timm
  import torch

  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = timm.create_model(args.model, pretrained=False).to(dev)
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  step_model = torch.compile(model) if args.compile else model
  opt = torch.optim.SGD(
    model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5
  )
  x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
  x = x.to(dev).to(memory_format=fmt)
  y = torch.randint(0, 1000, (args.batch_size,), device=dev)
  amp = args.dtype == 'bfloat16'

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
      loss = torch.nn.functional.cross_entropy(step_model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if dev == 'cuda':
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  print(
    json.dumps(
      dict(
        model=args.model,
        device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
        batch_size=args.batch_size,
        image_size=args.image_size,
        dtype=args.dtype,
        channels_last=args.channels_last,
        compiled=args.compile,
        median_ms=round(med * 1e3, 2),
        images_per_s=round(args.batch_size / med, 1),
      )
    )
  )


if __name__ == '__main__':
  main()
