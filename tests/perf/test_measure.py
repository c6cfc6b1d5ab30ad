"""Tests for nfnets.perf.measure: timing statistics and memory sources."""

import jax
import jax.numpy as jnp
import pytest

from nfnets.perf import measure


def test_summarize_times_by_hand():
  stats = measure.summarize_times([1.0, 2.0, 3.0, 4.0])
  # Median 2.5 s; numpy's linear percentiles: q1 = 1.75 s, q3 = 3.25 s.
  assert stats == pytest.approx({'median': 2500, 'min': 1000, 'iqr': 1500})


def test_time_calls_counts_warmup_and_steps():
  calls = []

  def fn():
    calls.append(1)
    return jnp.ones(3) * len(calls)

  times = measure.time_calls(fn, steps=4, warmup=2)
  assert len(times) == 4 and len(calls) == 6
  assert all(t >= 0 for t in times)


def test_xla_memory_of_a_simple_function():
  x = jnp.zeros((1000,), jnp.float32)
  compiled = jax.jit(lambda a: a + 1).lower(x).compile()
  nbytes = measure.xla_memory_bytes(compiled)
  # One 4000-byte argument and one 4000-byte output, no donation.
  assert 8000 <= nbytes < 8000 + 4096


class _DeviceWithAllocatorStats:
  """Stands in for a GPU device: CPU devices report no allocator stats."""

  def memory_stats(self):
    return {'peak_bytes_in_use': 3 * 2**30}


def test_peak_memory_ignores_the_allocator_before_the_step_ran():
  # After a compile-only run the allocator's peak only holds the initial
  # state, so the step's own memory must come from XLA's analysis.
  compiled = jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(1024)).compile()
  device = _DeviceWithAllocatorStats()
  ran_gb, ran_source = measure.peak_memory(compiled, device, step_ran=True)
  assert (ran_gb, ran_source) == (3.0, 'device peak_bytes_in_use')
  gb, source = measure.peak_memory(compiled, device, step_ran=False)
  assert source.startswith('XLA memory_analysis')
  assert gb * 2**30 == measure.xla_memory_bytes(compiled)


def test_peak_memory_ignores_a_peak_set_before_this_run():
  # JAX cannot reset the allocator's process-wide peak: where earlier work
  # (an earlier model of the same run) had set one, the peak after the step
  # may be that work's, so XLA's analysis of this step is reported.
  compiled = jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(1024)).compile()
  device = _DeviceWithAllocatorStats()
  gb, source = measure.peak_memory(
    compiled, device, step_ran=True, earlier_peak=2**30
  )
  assert gb * 2**30 == measure.xla_memory_bytes(compiled)
  assert source == (
    "XLA memory_analysis (args+outputs+temps), not the allocator's peak, "
    "which may be earlier work's"
  )
  # The first work on the device: its allocator peak is this run's.
  first = measure.peak_memory(compiled, device, step_ran=True, earlier_peak=0)
  assert first == (3.0, 'device peak_bytes_in_use')
