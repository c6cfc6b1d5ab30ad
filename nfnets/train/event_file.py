"""TensorBoard event files of scalars, written without TensorFlow.

TensorBoard reads a run's `events.out.tfevents.*` files: TFRecord files
(each record framed by its length and masked CRC32C checksums) of `Event`
protocol buffers. A scalar log needs three message types and six fields,
so this module writes them in protobuf's wire format itself:

  Event          wall_time = 1 (double), step = 2 (int64),
                 file_version = 3 (string), summary = 5 (Summary)
  Summary        value = 1 (repeated Value)
  Summary.Value  tag = 1 (string), simple_value = 2 (float)

TensorBoard shows `simple_value` as scalars. Why not `tf.summary`: the
trainer then logs to TensorBoard on accelerator hosts without TensorFlow,
and never pays TensorFlow's multi-second import for it.
"""

import math
import os
import socket
import struct
import time

FILE_VERSION = 'brain.Event:2'  # What TensorBoard expects first.
_FLOAT32_MAX = 3.4028234663852886e38

# CRC32C (Castagnoli), reflected polynomial, one table entry per byte.
_CRC32C_POLY = 0x82F63B78


def _crc_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
    table.append(crc)
  return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  """The CRC32C checksum of `data` (TFRecord's checksum)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked checksum: rotated right by 15, plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  length = struct.pack('<Q', len(data))
  return (
    length
    + struct.pack('<I', masked_crc32c(length))
    + data
    + struct.pack('<I', masked_crc32c(data))
  )


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits, value = value & 0x7F, value >> 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> float:
  """`value` as a float32 rounds it: beyond float32's range, +-inf (a
  diverging loss or norm must not stop the run's logging)."""
  value = float(value)
  if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
    return math.copysign(math.inf, value)
  return value


def _scalar_value(tag: str, value: float) -> bytes:
  """A Summary.Value: tag, simple_value (float32, wire type 5)."""
  return (
    _length_delimited(1, tag.encode())
    + bytes([2 << 3 | 5])
    + struct.pack('<f', _float32(value))
  )


def encode_event(
  wall_time: float, step: int = 0, *, file_version='', scalars=None
):
  """An Event message: `file_version` or a Summary of `scalars` (tag -> value).

  Args:
    wall_time: seconds since the epoch.
    step: the global step (>= 0).
    file_version: for the file's first event.
    scalars: tag -> float, for a summary event.

  Returns:
    The serialized message.
  """
  out = bytes([1 << 3 | 1]) + struct.pack('<d', wall_time)
  if step:
    out += _varint(2 << 3) + _varint(int(step))
  if file_version:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    summary = b''.join(
      _length_delimited(1, _scalar_value(tag, value))
      for tag, value in scalars.items()
    )
    out += _length_delimited(5, summary)
  return out


class EventFileWriter:
  """Appends scalar summaries to a new event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = (
      f'events.out.tfevents.{int(now):010d}.{socket.gethostname()}.'
      f'{os.getpid()}.nfnets'
    )
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, 'ab')
    self._file.write(tfrecord(encode_event(now, file_version=FILE_VERSION)))
    self._file.flush()

  def write_scalars(self, step: int, scalars: dict) -> None:
    """One event holding every scalar of `scalars` at `step`, flushed."""
    event = encode_event(time.time(), step, scalars=scalars)
    self._file.write(tfrecord(event))
    self._file.flush()

  def close(self) -> None:
    self._file.close()
