"""Where metrics go: console progress, JSON lines and TensorBoard.

Only process 0 writes (the other processes get a disabled writer), so a
multi-host run produces one log. Files in the workdir:
  metrics.jsonl            one JSON object per logged step: {"step": N,
                           "train/loss": ..., ...}; eval records use the same
                           file. After any resume it holds one value per
                           step and key: a run resumed from step S first
                           moves the records of steps after S (logged by the
                           segment whose later checkpoints were lost or
                           damaged) to
  metrics.abandoned.jsonl  the same records, each with "resumed_from_step":
                           S added (lines that are not JSON, e.g. one cut by
                           a kill, are moved as they are).
  tensorboard/             TensorBoard event files (`tensorboard --logdir
                           <workdir>`), written without TensorFlow
                           (`event_file`); they keep the abandoned values.
"""

import json
import math
import os
import sys
import time
from typing import NamedTuple

import jax

from nfnets.train import event_file

METRICS_FILE = 'metrics.jsonl'
ABANDONED_METRICS_FILE = 'metrics.abandoned.jsonl'


class MetricWriter:
  """Appends scalar metrics to `metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    """Creates the writer.

    Args:
      workdir: run directory (created if missing).
      enabled: when False (processes other than 0), writes nothing.
    """
    self._enabled = enabled
    self._jsonl = None
    self._tb = None
    self._path = os.path.join(workdir, METRICS_FILE)
    self._tb_dir = os.path.join(workdir, 'tensorboard')
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def write(self, step: int, metrics: dict) -> None:
    """Writes one record of scalar metrics for `step`.

    Args:
      step: the train step the metrics belong to.
      metrics: name -> Python/numpy scalar.
    """
    if not self._enabled:
      return
    record = {'step': int(step)}
    record.update({k: float(v) for k, v in metrics.items()})
    if self._jsonl is None:
      # Opened on first use: `set_aside_records_after` may replace the file
      # before (an earlier handle would write to the replaced one).
      self._jsonl = open(self._path, 'a')
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    self._write_tensorboard(step, record)

  def _write_tensorboard(self, step, record):
    if self._tb is None:
      self._tb = event_file.EventFileWriter(self._tb_dir)
    scalars = {k: v for k, v in record.items() if k != 'step'}
    self._tb.write_scalars(step, scalars)

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _read_lines(path: str) -> list[str]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return f.read().splitlines()


def _record_step(line: str) -> int | None:
  """The step of a metrics.jsonl line, or None for a line that is not one."""
  try:
    record = json.loads(line)
    return int(record['step'])
  except (ValueError, TypeError, KeyError):
    return None


def set_aside_records_after(workdir: str, step: int) -> int:
  """Moves metrics.jsonl records of steps after `step` to the abandoned file.

  Called when a run resumes from `step`: the records after it belong to
  steps that will be trained again. Nothing is lost: they are appended to
  `metrics.abandoned.jsonl` with `"resumed_from_step": step` added.

  Args:
    workdir: the run's workdir.
    step: the step the run resumes from.

  Returns:
    The number of lines moved.
  """
  path = os.path.join(workdir, METRICS_FILE)
  kept, moved = [], []
  for line in _read_lines(path):
    if not line.strip():
      continue
    record_step = _record_step(line)
    if record_step is not None and record_step <= step:
      kept.append(line)
    elif record_step is None:
      moved.append(line)  # Cut by a kill: kept verbatim.
    else:
      record = json.loads(line)
      record['resumed_from_step'] = int(step)
      moved.append(json.dumps(record))
  if not moved:
    return 0
  with open(os.path.join(workdir, ABANDONED_METRICS_FILE), 'a') as f:
    f.write(''.join(line + '\n' for line in moved))
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(''.join(line + '\n' for line in kept))
  os.replace(tmp, path)
  return len(moved)


def logged_eval(workdir: str, step: int, key: str = 'eval/top1') -> dict:
  """The metrics.jsonl record of `step` that holds `key`, or {}.

  Args:
    workdir: the run's workdir.
    step: the step.
    key: a metric the record must hold (default: an evaluation's).
  """
  for line in reversed(_read_lines(os.path.join(workdir, METRICS_FILE))):
    if _record_step(line) == step:
      record = json.loads(line)
      if key in record:
        return record
  return {}


def format_duration(seconds: float) -> str:
  """Formats seconds as H:MM:SS (or '?' when unknown)."""
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Rate(NamedTuple):
  """Throughput over a window of steps (NaN where unknown).

  Attributes:
    images_per_sec: global images per second.
    eta_s: seconds to the end of the run at this rate.
    input_wait: fraction of the window's wall time the loop spent waiting
      for the next batch from the input pipeline.
  """

  images_per_sec: float
  eta_s: float
  input_wait: float


_UNKNOWN = Rate(float('nan'), float('nan'), float('nan'))


class ProgressReporter:
  """Prints step, images/s, ETA and metrics to the console (process 0)."""

  def __init__(
    self, *, total_steps: int, batch_size: int, enabled: bool = True, out=None
  ):
    """Creates the reporter.

    Args:
      total_steps: the step the run ends at.
      batch_size: global batch size, for images/s.
      enabled: when False, prints nothing.
      out: stream to print to (default sys.stdout).
    """
    self._total = total_steps
    self._batch = batch_size
    self._enabled = enabled
    self._out = out
    self._last_time = None
    self._last_step = None
    self._waited = 0.0

  def start(self, step: int) -> None:
    """Starts the images/s clock at `step` (after compilation)."""
    self._last_time, self._last_step = time.perf_counter(), step
    self._waited = 0.0

  def waited(self, seconds: float) -> None:
    """Adds time the loop spent waiting for a batch (for `input_wait`)."""
    self._waited += seconds

  def rate(self, step: int) -> Rate:
    """Returns the `Rate` since the last call (or `start`), and resets.

    All fields are NaN before `start` or when no step was taken since.
    """
    now = time.perf_counter()
    if self._last_time is None or step <= self._last_step:
      return _UNKNOWN
    elapsed = now - self._last_time
    dt = elapsed / (step - self._last_step)
    wait = min(self._waited / elapsed, 1.0) if elapsed > 0 else float('nan')
    self._last_time, self._last_step, self._waited = now, step, 0.0
    return Rate(self._batch / dt, dt * (self._total - step), wait)

  def print(self, message: str) -> None:
    """Prints one line (flushed, so it shows under pipes and make)."""
    if self._enabled:
      print(message, file=self._out or sys.stdout, flush=True)

  def train_line(self, step: int, metrics: dict, rate: Rate) -> str:
    """Formats the console line for a train log step.

    Throughput, input wait and ETA are left out while unknown (a log right
    after the first step, which compiles).
    """
    pct = 100.0 * step / max(self._total, 1)
    line = (
      f'step {step}/{self._total} ({pct:.1f}%) | '
      f'loss {metrics["train/loss"]:.4f} '
      f'top1 {metrics["train/top1"]:.3f} | '
      f'lr {metrics["train/lr"]:.4g}'
    )
    if math.isfinite(rate.images_per_sec):
      line += (
        f' | {rate.images_per_sec:.1f} img/s | input_wait '
        f'{rate.input_wait:.0%} | ETA {format_duration(rate.eta_s)}'
      )
    return line


class EvalProgress:
  """Prints how far a long evaluation is: examples done and ETA.

  The first line comes after `every_s` seconds, then one every `every_s`
  seconds, so short evaluations print nothing.
  """

  def __init__(self, total_examples: int, print_fn, *, every_s: float = 10.0):
    """Creates the reporter.

    Args:
      total_examples: examples in one pass over the eval split.
      print_fn: prints a line.
      every_s: seconds between lines.
    """
    self._total = max(int(total_examples), 1)
    self._print = print_fn
    self._every = every_s
    self._t0 = self._last = time.perf_counter()

  def restart(self) -> None:
    """Restarts the clock (a new pass over the split)."""
    self._t0 = self._last = time.perf_counter()

  def update(self, name: str, done: int) -> None:
    """Reports `done` examples of the pass `name` if a line is due."""
    now = time.perf_counter()
    if now - self._last < self._every:
      return
    self._last = now
    done = min(done, self._total)
    eta = (now - self._t0) * (self._total - done) / max(done, 1)
    self._print(
      f'  {name}: {done}/{self._total} examples '
      f'({100.0 * done / self._total:.0f}%), ETA {format_duration(eta)}'
    )


class CacheHitCounter:
  """Counts persistent compilation cache hits until closed.

  A trainer counts during its first step, when only the train step
  compiles, so a hit then means the step was loaded from the cache, e.g.
  for a later point of a sweep over the step's inputs
  (`step.step_hyperparams`).
  """

  _EVENT = '/jax/compilation_cache/cache_hits'

  def __init__(self):
    self.hits = 0
    self._listener = self._on_event  # The same object to unregister.
    jax.monitoring.register_event_listener(self._listener)

  def _on_event(self, event: str, **_) -> None:
    if event == self._EVENT:
      self.hits += 1

  def close(self) -> None:
    if self._listener is not None:
      jax.monitoring.unregister_event_listener(self._listener)
      self._listener = None
