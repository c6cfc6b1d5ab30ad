"""How fast XLA:CPU's GEMM and 3x3 convolution run here, float32 and bfloat16.

The CPU classes these numbers separate (AVX2, AVX-512, AVX-512 with
bfloat16 dot products, AMX) set how fast a train step can be and whether
`bfloat16_convs` pays; docs/performance.md quotes them beside each CPU's
step times. Run it before comparing machines:

    python scripts/bench_cpu_units.py

Prints one JSON line with the CPU model, its flags and GFLOP/s of a jitted
4096x4096 matmul and of an F0-like 3x3 convolution forward (batch 8,
48x48, 128 -> 128 channels, one group of F0's grouped convs), each in
float32 and with bfloat16 operands and float32 accumulation; median of 10
calls after one warm-up.
"""

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nfnets.ops import cpu_features  # noqa: E402

MATMUL_N = 4096
CONV_INPUT = (8, 48, 48, 128)
CONV_KERNEL = (3, 3, 128, 128)
CALLS = 10


def _median_seconds(fn, *args) -> float:
  fn(*args).block_until_ready()
  times = []
  for _ in range(CALLS):
    start = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _matmul(x, y):
  return jnp.dot(x, y, preferred_element_type=jnp.float32)


def _conv(x, w):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    preferred_element_type=jnp.float32,
  )  # fmt: skip


def main():
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (MATMUL_N, MATMUL_N))
  x = jax.random.normal(key, CONV_INPUT)
  w = jax.random.normal(key, CONV_KERNEL)
  batch, height, width, _ = CONV_INPUT
  conv_flops = 2 * batch * height * width * CONV_KERNEL[2]
  conv_flops *= CONV_KERNEL[0] * CONV_KERNEL[1] * CONV_KERNEL[3]
  result = dict(cpu_features.cpu_summary(), jax=jax.__version__)
  for dtype in (jnp.float32, jnp.bfloat16):
    name = jnp.dtype(dtype).name
    operand = a.astype(dtype)
    seconds = _median_seconds(jax.jit(_matmul), operand, operand)
    result[f'matmul_{name}_gflops'] = round(2 * MATMUL_N**3 / seconds / 1e9)
    seconds = _median_seconds(jax.jit(_conv), x.astype(dtype), w.astype(dtype))
    result[f'conv3x3_{name}_gflops'] = round(conv_flops / seconds / 1e9)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
