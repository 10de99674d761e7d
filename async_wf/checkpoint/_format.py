"""The checkpoint log's file format: records, their encoding and decoding.

File layout (little-endian throughout)::

    file header  magic b"\\x89AWFCKP\\n" | format version u32 | reserved u32    16 bytes
    records      one after the other, nothing between them

    record       magic b"\\xa7CK\\x01" | crc32 u32 | type u8 | flags u8 |
                 key_len u16 | body_len u64                                  20 bytes
                 key      key_len bytes
                 body     body_len bytes

The CRC-32 covers every byte of the record after itself: the rest of the
header (type, flags, lengths), the key and the body. A record is therefore
either exactly what was written or detectably not; the magic is what a
scan looks for to find the next record after damage.

Record types and bodies
    RESULT  key = task key. ``time f64 | value_at u32 | name_len u16 |
            n_parents u16 | name | n_parents x (len u16 | key) | zero padding |
            value``; ``value_at`` is where the value starts in the record, so
            that ``get`` need not parse the metadata.
    STATE   key = task key. ``rank u32 | step u64 | zero padding | value``
    COMMIT  key = task key. ``step u64 | n_ranks u32``
    FORGET  key = the key to forget; empty body.
    BLOCK   no key. ``count u32 | run_crc u32 | run_len u64 | count x size u32``:
            an index of the ``count`` records that follow it (``run_len``
            bytes, whose CRC-32 is ``run_crc``), written with them in one
            flush. It exists only to make opening fast, see below.

    value   ``n_bufs u32 | payload codec u8 | 3 zero bytes | payload_len u64 |
            n_bufs x (stored_len u64 | codec u8 | 7 zero bytes) | payload |
            buffers``: a pickle (protocol 5) and its out-of-band buffers,
            each buffer starting 16-byte aligned from the record's start.
            Codec 0 is raw, 1 an lz4 block with its size (used for parts of
            at least 64 KiB whose first 64 KiB compress below 90 %).

The padding after the metadata makes the value start 16-byte aligned from
the record's start. A record is read into one buffer of its own whose memory
is aligned, so NumPy arrays unpickled from it are aligned views into that
buffer, not copies.

Values are pickled and compressed by ``async_wf._codec`` (the policy the
wire shares); this module lays them out in records. The scan of a whole
file is in ``_scan.py``, the log class in ``_log.py``.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from collections.abc import Callable
from typing import Any

from async_wf._codec import CODEC_LZ4, CODEC_RAW, CodecError, compress, decompress
from async_wf._extension import compiled
from async_wf.checkpoint._keys import CheckpointError

FILE_MAGIC = b"\x89AWFCKP\n"
FORMAT_VERSION = 1
_FILE_HEADER = struct.Struct("<8sII")
FILE_HEADER_BYTES = _FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0)

RECORD_MAGIC = b"\xa7CK\x01"
_HDR = struct.Struct("<4sIBBHQ")
HEADER_SIZE = _HDR.size  # 20
_TAIL = struct.Struct("<BBHQ")  # the header after the CRC: what the CRC starts with
_CRC_FROM = 8

RESULT = 1
STATE = 2
COMMIT = 3
FORGET = 4
BLOCK = 5
TYPE_NAMES = {RESULT: "RESULT", STATE: "STATE", COMMIT: "COMMIT", FORGET: "FORGET", BLOCK: "BLOCK"}

_RESULT_META = struct.Struct("<dIHH")  # time, value offset in the record, name len, n parents
_STATE_META = struct.Struct("<IQ")
_COMMIT = struct.Struct("<QI")
_BLOCK = struct.Struct("<IIQ")
_U16 = struct.Struct("<H")
_VALUE_HEAD = struct.Struct("<IB3xQ")
_BUF_ENTRY = struct.Struct("<QB7x")
_ALIGN = 16
_ZEROS = bytes(_ALIGN)

MAX_KEY = 0xFFFF
#: parts (payload, buffers) at least this large are lz4-compressed when a trial pays
COMPRESS_MIN = 1 << 16
#: records at least this large bypass the write buffer (written at once, from
#: the values' own memory)
DIRECT_MIN = 1 << 16
#: a flush of at least this many buffered records writes a BLOCK index first
MIN_BLOCK = 8


class CheckpointFormatError(CheckpointError):
    """The file is not a checkpoint log, or one of a newer format."""


class CheckpointCorruptError(CheckpointError):
    """A record failed its checks when read: it must not be used.

    Attributes:
        path: the log.
        offset: where the record starts.
        reason: what failed.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"checkpoint log {path!r}: record at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason

    def __reduce__(self) -> tuple[type[CheckpointCorruptError], tuple[str, int, str]]:
        return (type(self), (self.path, self.offset, self.reason))


def _align(n: int) -> int:
    return -n % _ALIGN


def _nbytes(part: Any) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def _value_parts(
    payload: bytes, bufs: list[pickle.PickleBuffer], start: int
) -> tuple[list[Any], int]:
    """The value section of a record, as parts; ``start``: its offset in the record.

    ``payload`` and ``bufs``: the value as ``_codec.pack`` pickled it.
    """
    pcodec, data = compress(payload, COMPRESS_MIN)
    table = bytearray()
    datas: list[Any] = []
    for pb in bufs:
        codec, buf = compress(pb.raw(), COMPRESS_MIN)
        table += _BUF_ENTRY.pack(_nbytes(buf), codec)
        datas.append(buf)
    parts: list[Any] = [_VALUE_HEAD.pack(len(bufs), pcodec, _nbytes(data)), table, data]
    pos = start + _VALUE_HEAD.size + len(table) + _nbytes(data)
    for buf in datas:
        pad = _align(pos)
        if pad:
            parts.append(_ZEROS[:pad])
            pos += pad
        parts.append(buf)
        pos += _nbytes(buf)
    return parts, pos - start


def _lz4(chunk: memoryview, where: Callable[[str], Exception]) -> bytearray:
    try:
        return decompress(chunk)
    except CodecError as exc:
        raise where(str(exc)) from exc


def _value_layout(
    mv: memoryview, base: int, pos: int, end: int, where: Callable[[str], Exception]
) -> tuple[memoryview, int, list[tuple[memoryview, int]]]:
    """Check and split a value section: (payload, its codec, [(buffer, codec)]).

    ``base``: where the record starts in ``mv`` (buffers are aligned from
    there); ``pos``: where the value section starts; ``end``: where the record ends.
    """
    if end - pos < _VALUE_HEAD.size:
        raise where("value section too short")
    nbufs, pcodec, plen = _VALUE_HEAD.unpack_from(mv, pos)
    pos += _VALUE_HEAD.size
    if nbufs * _BUF_ENTRY.size > end - pos:
        raise where(f"value declares {nbufs} buffers that do not fit")
    entries = [_BUF_ENTRY.unpack_from(mv, pos + i * _BUF_ENTRY.size) for i in range(nbufs)]
    pos += nbufs * _BUF_ENTRY.size
    if plen > end - pos:
        raise where(f"payload of {plen} bytes does not fit")
    payload = mv[pos : pos + plen]
    pos += plen
    buffers = []
    for stored, codec in entries:
        pos += _align(pos - base)
        if stored > end - pos:
            raise where(f"buffer of {stored} bytes does not fit")
        buffers.append((mv[pos : pos + stored], codec))
        pos += stored
    if pos != end:
        raise where(f"value section ends at {pos}, record at {end}")
    for codec in (pcodec, *(c for _, c in buffers)):
        if codec not in (CODEC_RAW, CODEC_LZ4):
            raise where(f"unknown codec {codec}")
    return payload, pcodec, buffers


def _decode_value(mv: memoryview, pos: int, end: int, where: Callable[[str], Exception]) -> Any:
    """Unpickle the value section at ``pos`` of a record that starts at 0 in ``mv``."""
    payload, pcodec, buffers = _value_layout(mv, 0, pos, end, where)
    data: Any = _lz4(payload, where) if pcodec == CODEC_LZ4 else payload
    bufs = [_lz4(b, where) if codec == CODEC_LZ4 else b for b, codec in buffers]
    # errors of the unpickling itself (a missing module) are the caller's:
    # the record is intact, the program cannot read it
    return pickle.loads(data, buffers=bufs)


def _frame(typ: int, key: bytes, body: bytes) -> bytes:
    """A complete small record."""
    tail = _TAIL.pack(typ, 0, len(key), len(body))
    crc = zlib.crc32(body, zlib.crc32(key, zlib.crc32(tail)))
    return RECORD_MAGIC + crc.to_bytes(4, "little") + tail + key + body


def _frame_parts(typ: int, key: bytes, parts: list[Any], body_len: int) -> list[Any]:
    """A record as parts for ``writev``: its header, key and the body's parts."""
    tail = _TAIL.pack(typ, 0, len(key), body_len)
    crc = zlib.crc32(key, zlib.crc32(tail))
    for p in parts:
        crc = zlib.crc32(p, crc)
    return [RECORD_MAGIC + crc.to_bytes(4, "little") + tail, key, *parts]


def _parents_blob(parents: tuple[bytes, ...]) -> bytes:
    if len(parents) > 0xFFFF:
        raise ValueError(f"parents must be fewer than 65536 keys, got {len(parents)}")
    out = bytearray()
    for p in parents:
        _check_key(p, "parent key")
        out += _U16.pack(len(p))
        out += p
    return bytes(out)


def _result_meta(key: bytes, when: float, name: bytes, parents: tuple[bytes, ...]) -> bytes:
    """The metadata section of a RESULT record, padded so that the value is aligned."""
    pblob = _parents_blob(parents) if parents else b""
    used = HEADER_SIZE + len(key) + _RESULT_META.size + len(name) + len(pblob)
    pad = _align(used)
    return b"".join((
        _RESULT_META.pack(when, used + pad, len(name), len(parents)), name, pblob, _ZEROS[:pad],
    ))


def _small_record(typ: int, key: bytes, meta: bytes, payload: bytes) -> bytes:
    """A whole record whose value is one plain pickle (no buffers, not compressed)."""
    body_len = len(meta) + _VALUE_HEAD.size + len(payload)
    rest = b"".join((
        _TAIL.pack(typ, 0, len(key), body_len), key, meta,
        _VALUE_HEAD.pack(0, CODEC_RAW, len(payload)), payload,
    ))
    return RECORD_MAGIC + zlib.crc32(rest).to_bytes(4, "little") + rest


def _py_result_record(
    key: bytes, when: float, name: bytes, parents: tuple[bytes, ...], payload: bytes
) -> bytes:
    """A whole small RESULT record (``async_wf._core.result_record`` is its compiled twin)."""
    if len(name) > 0xFFFF:
        raise ValueError(f"function name must be < 64 KiB in UTF-8, got {len(name)} bytes")
    return _small_record(RESULT, key, _result_meta(key, when, name, parents), payload)


def _py_mapped_payload(mm: Any, off: int, key: bytes) -> bytes | None:
    """The pickle of a small plain RESULT record of ``key`` at ``off`` in ``mm``, or None.

    ``async_wf._core.mapped_payload`` is the compiled twin; see it for when
    this is None (the caller then takes the checked general path).
    """
    end = len(mm)
    if off < 0 or off + HEADER_SIZE > end:
        return None
    magic, crc, typ, _flags, klen, blen = _HDR.unpack_from(mm, off)
    size = HEADER_SIZE + klen + blen
    if magic != RECORD_MAGIC or typ != RESULT or off + size > end or size > DIRECT_MIN:
        return None
    with memoryview(mm) as whole:
        mv = whole[off : off + size]
        try:
            if mv[HEADER_SIZE : HEADER_SIZE + klen] != key or zlib.crc32(mv[_CRC_FROM:]) != crc:
                return None
            meta_at = HEADER_SIZE + klen
            if size - meta_at < _RESULT_META.size:
                return None
            _when, value_at, _nlen, _npar = _RESULT_META.unpack_from(mv, meta_at)
            if not meta_at < value_at <= size - _VALUE_HEAD.size:
                return None
            nbufs, pcodec, plen = _VALUE_HEAD.unpack_from(mv, value_at)
            start = value_at + _VALUE_HEAD.size
            if nbufs or pcodec != CODEC_RAW or start + plen != size:
                return None
            return bytes(mv[start:])
        finally:
            mv.release()


def _check_compiled_layout(layout: dict[str, Any]) -> None:
    """Refuse a compiled extension built for another record layout than this module's.

    The compiled twins (src_cython/ckfast.pxi) index records with C
    constants; this module is the specification. An extension built before
    a change here would write records that this code reads as damaged.

    Raises:
        ImportError: a constant differs or is missing; the message names each one.
    """
    ours = {
        "HEADER_SIZE": HEADER_SIZE, "CRC_FROM": _CRC_FROM,
        "RESULT_META_SIZE": _RESULT_META.size, "VALUE_HEAD_SIZE": _VALUE_HEAD.size,
        "ALIGN": _ALIGN, "RESULT": RESULT, "CODEC_RAW": CODEC_RAW, "MAX_KEY": MAX_KEY,
        "DIRECT_MIN": DIRECT_MIN, "RECORD_MAGIC": RECORD_MAGIC, "COMPRESS_MIN": COMPRESS_MIN,
    }
    wrong = [f"{name}: compiled {layout.get(name)!r}, _format.py {value!r}"
             for name, value in ours.items() if layout.get(name) != value]
    if wrong:
        raise ImportError(
            "async_wf._core was built for another checkpoint record layout ("
            + "; ".join(wrong) + "); rebuild it (python setup.py build_ext --inplace, "
            "or reinstall async_wf)"
        )


_ext = compiled()
if _ext is not None:
    # an extension built before the layout was exported has none: it is refused too
    _check_compiled_layout(getattr(_ext, "RECORD_LAYOUT", {}))
_result_record: Callable[[bytes, float, bytes, tuple[bytes, ...], bytes], bytes] = (
    _py_result_record if _ext is None else _ext.result_record
)
_mapped_payload: Callable[[Any, int, bytes], bytes | None] = (
    _py_mapped_payload if _ext is None else _ext.mapped_payload
)
#: the compiled bulk append of small RESULT records (``CheckpointLog.put_results``);
#: None without the extension, where the log's own loop appends each record
_append_small: Callable[..., tuple[int, int, int, int, Any]] | None = (
    None if _ext is None else _ext.append_small_results
)
#: the compiled loop of ``CheckpointLog.put_done`` (finished tasks straight to
#: records); None without the extension, where each pair goes the general way
_append_done: Callable[..., tuple[int, int, int, int, Any]] | None = (
    None if _ext is None else _ext.append_done
)


def _parse_result_meta(
    mv: Any, base: int, pos: int, end: int, where: Callable[[str], Exception]
) -> tuple[str, tuple[bytes, ...], float, int]:
    """(function, parents, time, offset of the value) of a RESULT record.

    ``base``: where the record starts in ``mv``; ``pos``: where its body
    starts; ``end``: where it ends.
    """
    if end - pos < _RESULT_META.size:
        raise where("result metadata too short")
    when, value_at, nlen, npar = _RESULT_META.unpack_from(mv, pos)
    pos += _RESULT_META.size
    if nlen > end - pos:
        raise where("function name does not fit")
    try:
        name = bytes(mv[pos : pos + nlen]).decode("utf-8")
    except UnicodeDecodeError:
        raise where("function name is not UTF-8") from None
    pos += nlen
    parents = []
    for _ in range(npar):
        if end - pos < 2:
            raise where("parent keys do not fit")
        (plen,) = _U16.unpack_from(mv, pos)
        pos += 2
        if plen > end - pos:
            raise where("parent keys do not fit")
        parents.append(bytes(mv[pos : pos + plen]))
        pos += plen
    pos += _align(pos - base)
    if pos > end or pos - base != value_at:
        raise where(f"result metadata ends at {pos - base}, the value is said at {value_at}")
    return name, tuple(parents), when, pos


def _check_key(key: Any, what: str = "key") -> None:
    if not isinstance(key, bytes):
        raise TypeError(f"{what} must be bytes, got {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY:
        raise ValueError(f"{what} must be 1 to {MAX_KEY} bytes long, got {len(key)}")


def _check_count(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}), got {value!r}")


_U32 = struct.Struct("<I")


#: the CRC of a BLOCK's run: zlib's, or the compiled one (the same value,
#: folded with carry-less multiplication where the CPU can: about three
#: times faster on a buffer of a few hundred KiB)
_run_crc: Callable[[bytearray], int] = zlib.crc32 if _ext is None else _ext.crc32


def _block_size(count: int) -> int:
    """The bytes of the BLOCK index that a flush of ``count`` records writes first (0: none)."""
    return HEADER_SIZE + _BLOCK.size + 4 * count if count >= MIN_BLOCK else 0


def _flush_parts(data: bytearray, sizes: bytearray) -> list[Any]:
    """What a flush of the buffered records ``data`` writes: a BLOCK index first if it pays.

    ``sizes``: the size of each buffered record, a u32 little-endian each
    (the BLOCK's own table, as it is written).
    """
    count = len(sizes) // 4
    if count < MIN_BLOCK:
        return [data]
    index = _BLOCK.pack(count, _run_crc(data), len(data)) + sizes
    return [_frame(BLOCK, b"", index), data]


def _py_fix_results(results: dict[bytes, int], pkeys: list[bytes], data: bytearray,
                    sizes: bytearray, base: int, shift: int) -> None:
    """Move the index entries of buffered RESULT records by ``shift`` bytes.

    ``async_wf._core.fix_results`` is the compiled twin; see it for the arguments.
    """
    keys = iter(pkeys)
    pos = 0
    for (size,) in _U32.iter_unpack(sizes):
        if data[pos + 8] == RESULT:
            key = next(keys, None)
            if key is not None and results.get(key) == base + pos:
                results[key] = base + pos + shift
        pos += size


_fix_results: Callable[[dict[bytes, int], list[bytes], bytearray, bytearray, int, int], None] = (
    _py_fix_results if _ext is None else _ext.fix_results
)


class _Invalid(Exception):
    """Internal: a record's body does not have the structure of its type."""


def _check_body(mv: memoryview, typ: int, off: int, klen: int, size: int) -> str | None:
    """What is wrong with the structure of an intact record's body, or None."""
    body = off + HEADER_SIZE + klen
    end = off + size
    try:
        if typ == RESULT:
            _n, _p, _t, vpos = _parse_result_meta(mv, off, body, end, _Invalid)
            _value_layout(mv, off, vpos, end, _Invalid)
        elif typ == STATE:
            if end - body < _STATE_META.size:
                raise _Invalid("state metadata too short")
            vpos = body + _STATE_META.size
            vpos += _align(vpos - off)
            _value_layout(mv, off, vpos, end, _Invalid)
        elif typ == COMMIT:
            if end - body != _COMMIT.size:
                raise _Invalid(f"body of {end - body} bytes; a commit has {_COMMIT.size}")
        elif typ == FORGET and end != body:
            raise _Invalid(f"body of {end - body} bytes; a tombstone has none")
    except _Invalid as exc:
        return str(exc)
    return None
