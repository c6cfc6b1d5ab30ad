"""A peer baseline: times timm's PyTorch `dm_nfnet_f*` training step.

Same protocol as `experiments.benchmark`: median over full training steps
(forward, backward, AGC, SGD-Nesterov update with weight decay) on synthetic
data already on the device, plus the median eval-mode forward pass. AGC
(`timm.utils.adaptive_clip_grad`, clipping 0.01) skips the classifier, as in
the paper. bfloat16 runs under `torch.autocast` with float32 master
weights. One run times every dtype in `--dtype`, so float32 and bfloat16
come from the same process; each result is one JSON line with the device,
the CPU model and its AVX-512/AMX flags, the median and fastest step and
the process CPU time per step (`cpu_ms`, all threads; on a busy machine
it changes less than the wall time).

A standalone script, independent of this package: it needs torch and timm,
which are NOT project requirements; run it with an interpreter that has
them (docs/performance.md), e.g. for the CPU comparison:

  /path/to/torch-venv/bin/python scripts/bench_timm.py --batch_size=8 \
    --image_size=192 --threads=2 --steps=10 --forward_steps=5 \
    --dtype=float32,bfloat16

and on a GPU:

  python scripts/bench_timm.py --model=dm_nfnet_f0 --batch_size=32 \
    --image_size=192 --steps=50 --dtype=bfloat16 --compile
"""

import argparse
import json
import statistics
import time

import arg_types

# Flags the CPU comparison depends on (AVX-512 width, bfloat16 units).
_CPU_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')


def _parse():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  p.add_argument('--model', default='dm_nfnet_f0')
  p.add_argument('--batch_size', type=arg_types.int_at_least(1), default=32)
  p.add_argument('--image_size', type=arg_types.int_at_least(1), default=192)
  p.add_argument('--steps', type=arg_types.int_at_least(1), default=30)
  p.add_argument('--warmup', type=arg_types.int_at_least(0), default=5)
  p.add_argument(
    '--forward_steps',
    type=arg_types.int_at_least(0),
    default=0,
    help='eval forwards timed; 0 = skip',
  )
  p.add_argument(
    '--dtype',
    default='float32,bfloat16',
    help='comma-separated: float32 and/or bfloat16 (autocast)',
  )
  p.add_argument(
    '--threads',
    type=arg_types.int_at_least(0),
    default=0,
    help='0 = torch default',
  )
  p.add_argument('--clipping', type=float, default=0.01, help='AGC; 0 = off')
  p.add_argument('--channels_last', action='store_true')
  p.add_argument('--compile', action='store_true', help='torch.compile')
  args = p.parse_args()
  args.dtype = args.dtype.split(',')
  if set(args.dtype) - {'float32', 'bfloat16'}:
    p.error(f'--dtype takes float32 and/or bfloat16, got {args.dtype}')
  return args


def _cpu_info():
  """CPU model name and the relevant flags from /proc/cpuinfo."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, sep, value = line.partition(':')
        if sep and key.strip() not in fields:
          fields[key.strip()] = value.strip()
  except OSError:
    pass
  flags = set(fields.get('flags', '').split())
  return {
    'cpu_model': fields.get('model name', ''),
    'cpu_flags': {flag: flag in flags for flag in _CPU_FLAGS},
  }


def _median_s(fn, steps, warmup):
  """(median, min) wall seconds per call, and mean process CPU seconds."""
  for _ in range(warmup):
    fn()
  times = []
  c0 = time.process_time()
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  cpu = (time.process_time() - c0) / steps
  return statistics.median(times), min(times), cpu


def _bench(args, dtype, torch, timm):
  """Times one dtype; returns the result dict."""
  from timm.utils import adaptive_clip_grad  # noqa: PLC0415

  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  model = timm.create_model(args.model, pretrained=False).to(dev)
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  step_model = torch.compile(model) if args.compile else model
  opt = torch.optim.SGD(
    model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5
  )
  head = {id(p) for p in model.get_classifier().parameters()}
  clipped = [p for p in model.parameters() if id(p) not in head]
  x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
  x = x.to(dev).to(memory_format=fmt)
  y = torch.randint(0, 1000, (args.batch_size,), device=dev)
  amp = dtype == 'bfloat16'

  def sync():
    if dev == 'cuda':
      torch.cuda.synchronize()

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
      loss = torch.nn.functional.cross_entropy(step_model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.clipping:
      adaptive_clip_grad(clipped, clip_factor=args.clipping, eps=1e-3)
    opt.step()
    sync()

  def forward():
    with torch.no_grad(), torch.autocast(dev, torch.bfloat16, enabled=amp):
      step_model(x)
    sync()

  model.train()
  med, fastest, cpu = _median_s(step, args.steps, args.warmup)
  fwd_ms = None
  if args.forward_steps:
    model.eval()
    fwd_ms = _median_s(forward, args.forward_steps, 1)[0] * 1e3
  return dict(
    model=args.model,
    device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
    **_cpu_info(),
    torch=torch.__version__,
    timm=timm.__version__,
    threads=torch.get_num_threads(),
    batch_size=args.batch_size,
    image_size=args.image_size,
    dtype=dtype,
    autocast=amp,
    agc=args.clipping,
    channels_last=args.channels_last,
    compiled=args.compile,
    median_ms=round(med * 1e3, 2),
    min_ms=round(fastest * 1e3, 2),
    cpu_ms=round(cpu * 1e3, 2),
    forward_ms=fwd_ms and round(fwd_ms, 2),
    images_per_s=round(args.batch_size / med, 1),
  )


def main():
  """Builds the timm model and prints one JSON line per dtype."""
  args = _parse()  # First: --help works without torch.
  import timm  # noqa: PLC0415
  import torch  # noqa: PLC0415

  if args.threads:
    torch.set_num_threads(args.threads)
  for dtype in args.dtype:
    print(json.dumps(_bench(args, dtype, torch, timm)), flush=True)


if __name__ == '__main__':
  main()
