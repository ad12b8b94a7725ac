"""MXNet / dmlc RecordIO (``train.rec`` + ``train.idx``) in pure Python.

Format (dmlc-core ``src/recordio.cc``): every record part is ``uint32 magic
0xced7230a``, ``uint32 lrec`` (upper 3 bits: cflag, lower 29 bits: length),
the payload, then zero padding to a multiple of 4 bytes. When a record's data
holds the magic number at a 4-byte aligned offset, the writer splits the record
there and drops those 4 bytes: the parts have cflag 1 (start), 2 (middle) and
3 (end), cflag 0 is a whole record. The reader joins the parts and re-inserts
the magic number between them.

An image record's payload (``mx.recordio.pack``) starts with the header
``struct 'IfQQ'`` (flag, label, id, id2; 24 bytes); when ``flag > 0`` the label
is an array of ``flag`` float32 values that follow the header, then come the
encoded image bytes. ``train.idx`` holds lines ``key<TAB>offset``.

insightface MS1M files: key 0 is a header record whose labels ``(a, b)`` say
that image keys are ``[1, a)`` and identity records ``[a, b)``; identity record
``a + j`` has labels ``(start, end)``, the image keys of identity ``j``.
"""

from __future__ import annotations

import array
import dataclasses
import io
import os
import struct
from typing import BinaryIO, Iterator, Sequence

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack('<I', MAGIC)
_HEADER = struct.Struct('<IfQQ')
_LEN_MASK = (1 << 29) - 1


@dataclasses.dataclass(frozen=True)
class Record:
  """One unpacked image record (``mx.recordio.unpack``)."""

  flag: int
  label: tuple[float, ...]  # one value when flag == 0, else ``flag`` values
  id: int
  id2: int
  data: bytes  # what follows the header and the label array (JPEG bytes)


def pack(label: float | Sequence[float], data: bytes, *, id_: int = 0, id2: int = 0) -> bytes:
  """Packs a payload like ``mx.recordio.pack(IRHeader(0, label, id_, id2), data)``."""
  if isinstance(label, (int, float)):
    return _HEADER.pack(0, float(label), id_, id2) + data
  arr = np.asarray(label, dtype='<f4')
  return _HEADER.pack(arr.size, 0.0, id_, id2) + arr.tobytes() + data


def unpack(payload: bytes, where: str = 'record') -> Record:
  """Unpacks a record payload; ``where`` names it in errors."""
  if len(payload) < _HEADER.size:
    raise ValueError(f'{where}: payload of {len(payload)} bytes is shorter than the '
                     f'{_HEADER.size}-byte IfQQ header')
  flag, label, id_, id2 = _HEADER.unpack_from(payload)
  pos = _HEADER.size
  if flag > 0:
    end = pos + 4 * flag
    if end > len(payload):
      raise ValueError(f'{where}: header says {flag} float labels but the payload is too short')
    labels = tuple(float(x) for x in np.frombuffer(payload[pos:end], dtype='<f4'))
    pos = end
  else:
    labels = (float(label),)
  return Record(flag=flag, label=labels, id=id_, id2=id2, data=payload[pos:])


def _write_part(f: BinaryIO, cflag: int, data: bytes) -> None:
  f.write(_MAGIC_BYTES)
  f.write(struct.pack('<I', (cflag << 29) | len(data)))
  f.write(data)
  pad = (-len(data)) % 4
  if pad:
    f.write(b'\0' * pad)


def write_record(f: BinaryIO, payload: bytes) -> int:
  """Writes one record like dmlc ``RecordIOWriter::WriteRecord``; returns its offset.

  Occurrences of the magic number at 4-byte aligned offsets split the record.
  """
  if len(payload) >= 1 << 29:
    raise ValueError('RecordIO records must be shorter than 2^29 bytes')
  offset = f.tell()
  dptr = 0
  for i in range(0, len(payload) - len(payload) % 4, 4):
    if payload[i:i + 4] == _MAGIC_BYTES:
      _write_part(f, 1 if dptr == 0 else 2, payload[dptr:i])
      dptr = i + 4
  _write_part(f, 3 if dptr else 0, payload[dptr:])
  return offset


def read_record(f: BinaryIO, where: str = 'train.rec') -> bytes | None:
  """Reads the record at the file position (joining split parts); None at EOF."""
  out = []
  first = True
  while True:
    head = f.read(8)
    if not head and first:
      return None
    if len(head) != 8:
      raise ValueError(f'{where}: truncated record header at offset {f.tell() - len(head)}')
    magic, lrec = struct.unpack('<II', head)
    if magic != MAGIC:
      raise ValueError(f'{where}: bad magic 0x{magic:08x} at offset {f.tell() - 8} '
                       f'(expected 0x{MAGIC:08x}; wrong offset in the .idx or not RecordIO)')
    cflag, length = lrec >> 29, lrec & _LEN_MASK
    if first != (cflag in (0, 1)):
      raise ValueError(f'{where}: unexpected record part cflag={cflag} at offset {f.tell() - 8}')
    data = f.read(length + (-length) % 4)
    if len(data) < length:
      raise ValueError(f'{where}: truncated record at offset {f.tell() - len(data) - 8}')
    out.append(data[:length])
    if cflag in (0, 3):
      return _MAGIC_BYTES.join(out)
    first = False


def iter_records(path: str | os.PathLike) -> Iterator[bytes]:
  """Yields every record of a ``.rec`` file in file order (no index needed)."""
  with open(path, 'rb') as f:
    while (rec := read_record(f, str(path))) is not None:
      yield rec


def read_index(path: str | os.PathLike) -> dict[int, int]:
  """Reads a ``.idx`` file (``key<TAB>offset`` lines) into {key: offset}."""
  index = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f'{path}:{n}: expected "key<TAB>offset", got {line!r}')
      index[int(parts[0])] = int(parts[1])
  return index


def read_index_arrays(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads a ``.idx`` file into sorted int64 arrays (keys, offsets): compact for 5M keys."""
  keys, offsets = array.array('q'), array.array('q')
  with open(path) as f:
    for n, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2:
        raise ValueError(f'{path}:{n}: expected "key<TAB>offset", got {line!r}')
      keys.append(int(parts[0]))
      offsets.append(int(parts[1]))
  k, o = np.frombuffer(keys, np.int64), np.frombuffer(offsets, np.int64)
  order = np.argsort(k, kind='stable')
  return k[order], o[order]


def read_at(f: BinaryIO, offset: int, where: str) -> Record:
  """Reads and unpacks the record at byte ``offset`` of an open ``.rec`` file."""
  f.seek(offset)
  payload = read_record(f, where)
  if payload is None:
    raise ValueError(f'{where}: offset {offset} is past the end of the file')
  return unpack(payload, f'{where} at offset {offset}')


class IndexedReader:
  """Random access to the records of ``train.rec`` through ``train.idx``."""

  def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
    self.rec_path = str(rec_path)
    self.index = read_index(idx_path)
    self._f: BinaryIO = open(rec_path, 'rb', buffering=1 << 20)  # noqa: SIM115

  def close(self) -> None:
    self._f.close()

  def __enter__(self) -> IndexedReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def read(self, key: int) -> Record:
    """Reads and unpacks the record ``key``."""
    if key not in self.index:
      raise ValueError(f'{self.rec_path}: key {key} is not in the index')
    return read_at(self._f, self.index[key], f'{self.rec_path} key {key}')


class IndexedWriter:
  """Writes ``.rec`` + ``.idx`` like ``mx.recordio.MXIndexedRecordIO(..., 'w')``."""

  def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
    self._rec = open(rec_path, 'wb')  # noqa: SIM115
    self._idx = open(idx_path, 'w')  # noqa: SIM115

  def write_idx(self, key: int, payload: bytes) -> None:
    offset = write_record(self._rec, payload)
    self._idx.write(f'{key}\t{offset}\n')

  def close(self) -> None:
    self._rec.close()
    self._idx.close()

  def __enter__(self) -> IndexedWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def split_payload_example(data: bytes) -> bytes:
  """Returns ``data`` with the magic number appended at 4-byte aligned offsets.

  Used to build records that the writer must split (cflag 1/2/3): bytes after a
  JPEG's end-of-image marker are ignored by decoders. The payload header is 24
  bytes, so offsets aligned in ``data`` stay aligned in the payload.
  """
  buf = io.BytesIO()
  buf.write(data)
  buf.write(b'\0' * ((-len(data)) % 4))
  buf.write(_MAGIC_BYTES + b'tail' + _MAGIC_BYTES + b'end!')
  return buf.getvalue()
