"""nfnets.perf.compile_trace: XLA's compile events, summed by name."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.perf import compile_trace


def test_summarize_sums_complete_events_by_name_by_hand():
  events = [
    {'ph': 'X', 'name': 'fusion', 'dur': 1_500_000},
    {'ph': 'X', 'name': 'Codegen', 'dur': 2_000_000},
    {'ph': 'X', 'name': 'fusion', 'dur': 1_000_000},
    {'ph': 'M', 'name': 'thread_name'},  # Metadata, not a duration.
    {'ph': 'X', 'name': 'copy-insertion'},  # No duration: 0 s.
  ]
  got = compile_trace.summarize(events)
  assert got == [
    compile_trace.CompileEvent('fusion', 2.5, 2),
    compile_trace.CompileEvent('Codegen', 2.0, 1),
    compile_trace.CompileEvent('copy-insertion', 0.0, 1),
  ]
  lines = compile_trace.format_events(got).split('\n')
  assert lines[0].split() == ['2.50', 's', '2', 'fusion']


def test_compile_with_events_returns_a_working_executable_and_xla_passes():
  def f(x):
    return jnp.tanh(x @ x.T).sum(axis=0)

  x = np.arange(48, dtype=np.float32).reshape(6, 8) / 48
  lowered = jax.jit(f).lower(x)
  start = time.perf_counter()
  compiled, events = compile_trace.compile_with_events(lowered)
  wall = time.perf_counter() - start
  np.testing.assert_allclose(
    compiled(x), np.tanh(x @ x.T).sum(axis=0), rtol=1e-5
  )
  by_name = {e.name: e for e in events}
  # The whole backend compile is one event, inside the measured wall time.
  whole = by_name['backend_compile_and_load']
  assert whole.count == 1 and 0 < whole.seconds <= wall
  assert any('fusion' in name.lower() for name in by_name)
  seconds = [e.seconds for e in events]
  assert seconds == sorted(seconds, reverse=True)
  assert all(e.count >= 1 for e in events)
