"""Times the two forms of `nfnets.ops.depthwise_conv2d` on this backend.

    python scripts/bench_depthwise.py [--batch=8] [--repeats=5]

For typical EfficientNet depthwise layers it prints the forward and the
forward + backward (gradients of input and kernel) time of the native
(`feature_group_count`) and the shifted (kh * kw multiply-adds) form,
jitted, after one warm-up call; the numbers in docs/models.md come from it.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import arg_types  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nfnets import ops  # noqa: E402

# (size, channels, kernel, stride) of EfficientNet-B0 depthwise layers.
LAYERS = ((112, 96, 3, 1), (112, 96, 3, 2), (28, 240, 5, 1), (14, 672, 5, 1))


def _seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def time_layer(batch, size, channels, kernel, stride, mode, repeats):
  """(forward, forward + backward) seconds of one depthwise layer."""
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, channels))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 1, channels))

  def conv(x, w):
    return ops.depthwise_conv2d(x, w, stride=(stride, stride), mode=mode)

  grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
  return (
    _seconds(jax.jit(conv), (x, w), repeats),
    _seconds(jax.jit(grad), (x, w), repeats),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=arg_types.int_at_least(1), default=8)
  parser.add_argument('--repeats', type=arg_types.int_at_least(1), default=5)
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0]}, batch {args.batch}')
  for size, channels, kernel, stride in LAYERS:
    for mode in ('native', 'shifted'):
      fwd, both = time_layer(
        args.batch, size, channels, kernel, stride, mode, args.repeats
      )
      print(
        f'{size}x{size}x{channels} {kernel}x{kernel} stride {stride} '
        f'{mode:8s} fwd {fwd * 1e3:8.1f} ms  fwd+bwd {both * 1e3:8.1f} ms',
        flush=True,
      )


if __name__ == '__main__':
  main()
