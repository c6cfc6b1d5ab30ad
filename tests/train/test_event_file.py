"""TensorBoard event files written without TensorFlow, read back by it.

TensorFlow's own reader (`summary_iterator`, which checks every record's
CRC32C) is the independent reference for the framing and the messages.
"""

import numpy as np
import pytest
import tensorflow as tf

from nfnets.train import event_file, writers


def _read_events(path):
  return list(tf.compat.v1.train.summary_iterator(str(path)))


def test_crc32c_matches_the_published_check_values():
  # CRC-32C check value (RFC 3720, iSCSI; the "123456789" catalogue entry).
  assert event_file.crc32c(b'123456789') == 0xE3069283
  assert event_file.crc32c(b'') == 0
  # RFC 3720 B.4: 32 bytes of zeros, and of 0xFF.
  assert event_file.crc32c(bytes(32)) == 0x8A9136AA
  assert event_file.crc32c(b'\xff' * 32) == 0x62A8AB43


def test_tensorflow_reads_the_scalars_back(tmp_path):
  writer = event_file.EventFileWriter(str(tmp_path))
  logged = {
    0: {'train/loss': 2.5},
    7: {'train/loss': 1.25, 'train/lr': 0.1, 'eval/top1': 1 / 3},
    2**40 + 3: {'train/loss': -0.0},  # A step past int32: multi-byte varint.
    9: {'train/grad_norm': 1e39, 'train/loss': float('nan')},  # Diverged.
  }
  for step, scalars in logged.items():
    writer.write_scalars(step, scalars)
  writer.close()

  first, *events = _read_events(writer.path)
  assert first.file_version == 'brain.Event:2'
  assert [e.step for e in events] == list(logged)
  for event, scalars in zip(events, logged.values(), strict=True):
    values = {v.tag: v.simple_value for v in event.summary.value}
    with np.errstate(over='ignore'):  # 1e39 rounds to float32 inf.
      want = {k: float(np.float32(v)) for k, v in scalars.items()}
    np.testing.assert_array_equal(
      [values[k] for k in sorted(want)], [want[k] for k in sorted(want)]
    )
    assert sorted(values) == sorted(want)
    assert abs(event.wall_time - first.wall_time) < 60


def test_a_damaged_record_fails_tensorflows_checksum(tmp_path):
  """The reference really checks the CRCs our records pass."""
  writer = event_file.EventFileWriter(str(tmp_path))
  writer.write_scalars(3, {'train/loss': 0.5})
  writer.close()
  data = bytearray(open(writer.path, 'rb').read())
  data[-6] ^= 0x01  # Inside the last record's float.
  open(writer.path, 'wb').write(bytes(data))
  with pytest.raises(tf.errors.DataLossError):
    _read_events(writer.path)


def test_metric_writer_logs_each_record_as_one_event(tmp_path):
  writer = writers.MetricWriter(str(tmp_path))
  writer.write(10, {'train/loss': 0.75, 'train/top1': 0.5})
  writer.write(20, {'eval/top1': 0.875})
  writer.close()
  (path,) = (tmp_path / 'tensorboard').glob('events.out.tfevents.*')
  _, *events = _read_events(path)
  got = [
    (e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events
  ]
  assert got == [
    (10, {'train/loss': 0.75, 'train/top1': 0.5}),
    (20, {'eval/top1': 0.875}),
  ]
