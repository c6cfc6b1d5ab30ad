"""Where XLA's compile time goes, from the compiler's own trace events.

Compile time is spread over XLA's passes (HLO fusion, the fusion emitters,
LLVM code generation, the thunk emitter, ...), and wall-clock totals do not
say which one grows with the model. The host tracer at level 3 records
each of them as an event; `compile_with_events` compiles under it and sums
the events by name. This is how docs/performance.md found that the
per-leaf `agc_clip_fraction` counts made the fusion pass superlinear, and
that per-parameter samplers dominated the init's code generation.

    lowered = jax.jit(step).lower(state, batch)
    compiled, events = compile_with_events(lowered)
    print(format_events(events[:15]))

Events nest and compile threads overlap, so the seconds of different names
do not add up to the wall time; compare one name across programs.
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import tempfile

import jax


@dataclasses.dataclass(frozen=True)
class CompileEvent:
  """All trace events of one name: total seconds and how many there were."""

  name: str
  seconds: float
  count: int


def _profile_options():
  options = jax.profiler.ProfileOptions()
  options.host_tracer_level = 3  # XLA's pass-level events.
  options.python_tracer_level = 0  # Python frames would swamp them.
  return options


def read_trace(directory: str) -> list[dict]:
  """The events of the one Perfetto trace `jax.profiler.trace` wrote."""
  (path,) = glob.glob(
    os.path.join(directory, '**', 'perfetto_trace.json.gz'), recursive=True
  )
  with gzip.open(path) as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def summarize(trace_events: list[dict]) -> list[CompileEvent]:
  """Sums complete ('X') events by name, longest total first."""
  seconds, counts = collections.Counter(), collections.Counter()
  for event in trace_events:
    if event.get('ph') == 'X':
      seconds[event['name']] += event.get('dur', 0) / 1e6
      counts[event['name']] += 1
  return [
    CompileEvent(name, total, counts[name])
    for name, total in seconds.most_common()
  ]


def compile_with_events(lowered, compiler_options: dict | None = None):
  """Compiles a `jax.stages.Lowered` under the profiler.

  Args:
    lowered: e.g. `jax.jit(f).lower(*args)`.
    compiler_options: XLA options, as for `Lowered.compile`.

  Returns:
    `(compiled, events)`: the `jax.stages.Compiled` and the trace's events
    summed by name (`summarize`). Tracing slows the compile a little.
  """
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(
      directory, create_perfetto_trace=True, profiler_options=_profile_options()
    ):
      compiled = lowered.compile(compiler_options)
    events = summarize(read_trace(directory))
  return compiled, events


def format_events(events: list[CompileEvent]) -> str:
  """One line per event: seconds, count and name."""
  return '\n'.join(f'{e.seconds:9.2f} s {e.count:7d}  {e.name}' for e in events)
