"""Where metrics go: console progress, JSON lines and TensorBoard.

Only process 0 writes (the other processes get a disabled writer), so a
multi-host run produces one log. Files in the workdir:
  metrics.jsonl   one JSON object per logged step: {"step": N, "train/loss":
                  ..., ...}; eval records use the same file.
  tensorboard/    TensorBoard event files (`tensorboard --logdir <workdir>`).
"""

import json
import math
import os
import sys
import time


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
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tb_dir = os.path.join(workdir, 'tensorboard')

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
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    self._write_tensorboard(step, record)

  def _write_tensorboard(self, step, record):
    if self._tb is None:
      # Imported here: TensorFlow costs seconds to import and only this
      # writer needs it.
      import tensorflow as tf  # noqa: PLC0415

      self._tb = tf.summary.create_file_writer(self._tb_dir)
      self._tf = tf
    with self._tb.as_default():
      for name, value in record.items():
        if name != 'step':
          # `tf.summary.write` with the scalars plugin's metadata is what
          # `tf.summary.scalar` does, minus its need for the tensorboard
          # package (tensorflow-cpu does not pull it in).
          self._tf.summary.write(
            name,
            self._tf.constant(value, self._tf.float32),
            step=int(step),
            metadata=_scalar_metadata(),
          )
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _scalar_metadata() -> bytes:
  """Serialized SummaryMetadata marking a value as a TensorBoard scalar."""
  from tensorflow.core.framework import summary_pb2  # noqa: PLC0415

  plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars')
  return summary_pb2.SummaryMetadata(plugin_data=plugin).SerializeToString()


def format_duration(seconds: float) -> str:
  """Formats seconds as H:MM:SS (or '?' when unknown)."""
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


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

  def start(self, step: int) -> None:
    """Starts the images/s clock at `step` (after compilation)."""
    self._last_time, self._last_step = time.perf_counter(), step

  def rate(self, step: int) -> tuple[float, float]:
    """Returns (images/s, ETA seconds) since the last call, and resets."""
    now = time.perf_counter()
    if self._last_time is None or step <= self._last_step:
      return float('nan'), float('nan')
    dt = (now - self._last_time) / (step - self._last_step)
    self._last_time, self._last_step = now, step
    return self._batch / dt, dt * (self._total - step)

  def print(self, message: str) -> None:
    """Prints one line (flushed, so it shows under pipes and make)."""
    if self._enabled:
      print(message, file=self._out or sys.stdout, flush=True)

  def train_line(self, step, metrics, images_per_sec, eta_s) -> str:
    """Formats the console line for a train log step."""
    pct = 100.0 * step / max(self._total, 1)
    return (
      f'step {step}/{self._total} ({pct:.1f}%) | '
      f'loss {metrics["train/loss"]:.4f} '
      f'top1 {metrics["train/top1"]:.3f} | '
      f'lr {metrics["train/lr"]:.4g} | '
      f'{images_per_sec:.1f} img/s | ETA {format_duration(eta_s)}'
    )
