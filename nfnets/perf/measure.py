"""Timing and memory measurements of compiled JAX functions.

Times are wall-clock per call, each call waited for, so asynchronous
dispatch cannot hide device time. Peak memory has three sources, best
first: the device allocator's `peak_bytes_in_use` (GPU/TPU, once the
function ran, and only where nothing earlier in the process had used the
device: JAX cannot reset that peak), XLA's accounting of the compiled
function's buffers (`memory_analysis()`, on every backend, without running
it), and the process's peak RSS (everything the process ever held).
"""

import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def time_calls(
  fn: Callable[[], Any], steps: int, warmup: int = 1
) -> list[float]:
  """Times `steps` calls of `fn` after `warmup` untimed ones.

  Each call's result is waited for (`jax.block_until_ready`) before the
  clock stops, so asynchronous dispatch cannot hide device time.

  Args:
    fn: a no-argument function returning JAX arrays (or pytrees of them).
    steps: number of timed calls.
    warmup: untimed calls first (compilation, allocator warm-up).

  Returns:
    The per-call wall times in seconds.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def summarize_times(times: Sequence[float]) -> dict[str, float]:
  """Median, min and interquartile range of `times`, in milliseconds.

  Args:
    times: durations in seconds.

  Returns:
    `{'median': ..., 'min': ..., 'iqr': ...}` in milliseconds.
  """
  ms = np.asarray(times, np.float64) * 1e3
  q1, q3 = np.percentile(ms, [25, 75])
  return {
    'median': float(statistics.median(ms)),
    'min': float(ms.min()),
    'iqr': float(q3 - q1),
  }


def peak_rss_gb() -> float:
  """Peak resident set size of this process so far, in GiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # ru_maxrss is KiB on Linux, bytes on macOS.
  scale = 1 if sys.platform == 'darwin' else 1024
  return peak * scale / 2**30


def xla_memory_bytes(compiled) -> int | None:
  """Live bytes of one call of a compiled function, by XLA's accounting.

  Arguments + outputs + temporaries, minus the outputs that alias donated
  arguments (they share buffers). None when the backend gives no analysis.

  Args:
    compiled: a `jax.stages.Compiled`.

  Returns:
    Bytes, or None.
  """
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if stats is None:
    return None
  return int(
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )


def device_peak_bytes(device) -> int | None:
  """The allocator's peak bytes in use on `device`; None on CPU.

  Args:
    device: a `jax.Device`.

  Returns:
    Bytes, or None when the device keeps no allocator statistics.
  """
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return int(stats['peak_bytes_in_use'])


XLA_SOURCE = 'XLA memory_analysis (args+outputs+temps)'
# Why a run whose step ran on a device with allocator statistics reports
# XLA's analysis: the allocator's peak may be an earlier run's.
PROCESS_WIDE_NOTE = "not the allocator's peak, which may be earlier work's"


def peak_memory(
  compiled, device, step_ran: bool, earlier_peak: int | None = None
) -> tuple[float, str]:
  """The peak memory of a compiled step, from the best source available.

  The allocator's peak only covers the step once it has run: after a
  compile-only run it holds just the initial state, so XLA's analysis of
  the compiled step is reported instead. The allocator's peak is also
  process-wide and JAX cannot reset it: where earlier work in the process
  had already set one (`earlier_peak` > 0, e.g. an earlier model of a
  multi-model benchmark), the peak after the step may be that work's, so
  XLA's analysis is reported then too, and the source says why.

  Args:
    compiled: the step, a `jax.stages.Compiled`.
    device: the `jax.Device` it runs on.
    step_ran: whether the step has run on `device`.
    earlier_peak: `device_peak_bytes(device)` before this run's work began
      (None or 0: the device was unused).

  Returns:
    `(GiB, source)`, the source naming how it was measured; NaN and
    'unavailable' when no source has a number.
  """
  peak = device_peak_bytes(device) if step_ran else None
  if peak is not None and not earlier_peak:
    return peak / 2**30, 'device peak_bytes_in_use'
  estimate = xla_memory_bytes(compiled)
  if estimate is not None:
    source = XLA_SOURCE
    if peak is not None:
      source += f', {PROCESS_WIDE_NOTE}'
    return estimate / 2**30, source
  if peak is not None:  # No analysis: the process's peak, said to be so.
    return peak / 2**30, 'device peak_bytes_in_use (process-wide)'
  return float('nan'), 'unavailable'
