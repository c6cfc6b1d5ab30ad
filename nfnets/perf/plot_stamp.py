"""The mark on the plots the benchmark writes, so that it replaces only them.

`experiments.benchmark --table=paper --plot_out=P` writes a PNG with a tEXt
chunk `nfnets: experiments.benchmark --table=paper` (`savefig_metadata`,
through matplotlib's `metadata=`). An existing `P` is replaced only when it
carries that chunk (`is_stamped_png`), so a mistyped path cannot replace a
figure of the docs or any other image. Reading it needs no JAX and no
matplotlib: flags are checked before either is imported.
"""

import struct
import zlib

KEY = 'nfnets'
STAMP = 'experiments.benchmark --table=paper'
_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_TEXT_CHUNKS = (b'tEXt', b'zTXt', b'iTXt')


def savefig_metadata() -> dict[str, str]:
  """`metadata=` for matplotlib's `savefig`: the stamp as a PNG tEXt chunk."""
  return {KEY: STAMP}


def png_text(path: str) -> dict[str, str] | None:
  """The text chunks of a PNG file as {keyword: text}; None if not a PNG.

  Args:
    path: a file.

  Returns:
    The tEXt, zTXt and iTXt entries, or None when `path` cannot be read
    or is not a PNG.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError:
    return None
  if not data.startswith(_SIGNATURE):
    return None
  texts, at = {}, len(_SIGNATURE)
  while at + 8 <= len(data):
    length, kind = struct.unpack('>I4s', data[at : at + 8])
    body = data[at + 8 : at + 8 + length]
    at += 12 + length  # Length, type, data, CRC.
    if kind in _TEXT_CHUNKS:
      entry = _text_entry(kind, body)
      if entry:
        texts[entry[0]] = entry[1]
    if kind == b'IEND':
      break
  return texts


def _text_entry(kind: bytes, body: bytes) -> tuple[str, str] | None:
  """(keyword, text) of one text chunk; None for one that is malformed."""
  keyword, _, rest = body.partition(b'\x00')
  try:
    if kind == b'tEXt':
      return keyword.decode('latin-1'), rest.decode('latin-1')
    if kind == b'zTXt':  # A compression method byte, then zlib data.
      return keyword.decode('latin-1'), zlib.decompress(rest[1:]).decode(
        'latin-1'
      )
    # iTXt: compression flag and method, language and translated keyword.
    compressed, text = rest[0], rest[2:].split(b'\x00', 2)[2]
    if compressed:
      text = zlib.decompress(text)
    return keyword.decode('latin-1'), text.decode('utf-8')
  except (IndexError, ValueError, zlib.error):
    return None


def is_stamped_png(path: str) -> bool:
  """Whether `path` is a PNG this benchmark wrote (it carries the stamp)."""
  return (png_text(path) or {}).get(KEY) == STAMP
