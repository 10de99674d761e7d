"""The checkpoint log: an append-only file of task results, MPI states and commits.

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

Opening
    The whole file is scanned (memory-mapped) into an index: key -> offset of
    the last RESULT for that key, per task the states and the last commit.
    A run of records behind a BLOCK is checked with one CRC over the run
    and indexed with a few NumPy operations, which is what makes opening
    reach millions of records per second in pure Python; records outside
    blocks (written one at a time, or damaged blocks) are checked one by
    one. Either way every record's checksum is verified at open, except the
    body of a RESULT of more than ``DEFER_VERIFY`` bytes outside a block
    (reading gigabytes of arrays to open a log would be slow): its header is
    checked, and ``get`` verifies the checksum before using it. Nothing is
    ever unpickled before its checksum has been verified.

    Damage in the middle of the file (a record whose checksum fails, a
    header that makes no sense) is reported in ``problems`` and skipped: the
    scan continues at the first later position where a complete record
    with a correct checksum starts (found by its magic). The damaged
    record's own length is not trusted, since it may be what was damaged.
    Damage that reaches the end of the file (a record cut short by a crash,
    or garbage after the last record) is the *torn tail*: a writer cuts it
    off (``ftruncate``) before appending, a reader leaves it in place; both
    report it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import math
import mmap
import os
import pickle
import stat
import struct
import sys
import tempfile
import time
import weakref
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from async_wf._codec import CODEC_LZ4, CODEC_RAW, CodecError, compress, decompress, pack
from async_wf.checkpoint._keys import CheckpointError, _load_ckfast

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

# the record header as NumPy reads it in bulk (see CheckpointLog._block_loader)
_HDR_FIELDS = [
    ("magic", "<u4"), ("crc", "<u4"), ("type", "u1"), ("flags", "u1"), ("klen", "<u2"),
    ("blen", "<u8"),
]
_MAGIC_U32 = int.from_bytes(RECORD_MAGIC, "little")

MAX_KEY = 0xFFFF
#: parts (payload, buffers) at least this large are lz4-compressed when a trial pays
COMPRESS_MIN = 1 << 16
#: records at least this large bypass the write buffer (written at once, from
#: the values' own memory)
DIRECT_MIN = 1 << 16
#: buffered bytes that force a flush whatever the policy
PENDING_MAX = 1 << 20
#: a flush of at least this many buffered records writes a BLOCK index first
MIN_BLOCK = 8
#: RESULT bodies larger than this, outside blocks, are checksummed by get(), not at open
DEFER_VERIFY = 1 << 20
#: first read of a record: most records fit, and then one pread is enough
_READ_GUESS = 4096


FLUSH_POLICIES = ("record", "every", "interval")
DEFAULT_FLUSH = "record"
DEFAULT_FLUSH_EVERY = 1000
DEFAULT_FLUSH_INTERVAL = 1.0


# ----------------------------------------------------------------------- errors
class CheckpointFormatError(CheckpointError):
    """The file is not a checkpoint log, or one of a newer format."""


class CheckpointLockedError(CheckpointError):
    """Another writer holds the log's lock.

    Attributes:
        path: the log.
        pid: the process holding the lock, when the system says (Linux), else None.
    """

    def __init__(self, path: str, pid: int | None) -> None:
        if pid is None:
            who = "another writer"
        elif pid == os.getpid():
            who = f"another CheckpointLog in this process (pid {pid})"
        else:
            who = f"process {pid}"
        super().__init__(f"checkpoint log {path!r} is locked by {who}; one writer at a time")
        self.path = path
        self.pid = pid

    def __reduce__(self) -> tuple[type[CheckpointLockedError], tuple[str, int | None]]:
        return (type(self), (self.path, self.pid))


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


# ---------------------------------------------------------------------- reports
class Problem(NamedTuple):
    """Something a scan found wrong: where (byte offset) and what."""

    offset: int
    reason: str


class ResultInfo(NamedTuple):
    """The metadata of a RESULT record."""

    function: str
    parents: tuple[bytes, ...]
    time: float
    size: int


@dataclass
class FunctionStats:
    """Live results of one function: how many, their bytes, their time span."""

    results: int = 0
    bytes: int = 0
    first: float = math.inf
    last: float = -math.inf


@dataclass
class LogStatistics:
    """What a log holds; ``CheckpointLog.statistics`` and ``inspect`` return it.

    Attributes:
        path: the log.
        bytes: size of the file, plus what is buffered and not yet written.
        records: intact records found (every type, superseded ones included,
            BLOCK indexes excluded) plus the ones appended since.
        by_type: ``records`` per record type name.
        results: live results: the keys a lookup finds.
        live_bytes: bytes of the live results' records.
        states: live STATE records (those of each task's last commit and
            after it).
        corrupt: damaged regions skipped in the middle of the file.
        truncated_tail_bytes: bytes of the torn tail (cut off by a writer).
        functions: per function name (``module:qualname``), its live results.
        problems: what the scan found, as in ``CheckpointLog.problems``.
    """

    path: str
    bytes: int
    records: int
    by_type: dict[str, int]
    results: int
    live_bytes: int
    states: int
    corrupt: int
    truncated_tail_bytes: int
    functions: dict[str, FunctionStats] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Verification:
    """What ``verify`` checked and found; ``ok`` when it found nothing wrong."""

    path: str
    records: int
    bytes: int
    unpickled: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


@dataclass
class Compaction:
    """What ``compact`` did: records and bytes before and after."""

    path: str
    records_before: int
    records_after: int
    bytes_before: int
    bytes_after: int


# ------------------------------------------------------------------- encoding
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
    """A whole small RESULT record (``async_wf._ckfast.result_record`` is its compiled twin)."""
    if len(name) > 0xFFFF:
        raise ValueError(f"function name must be < 64 KiB in UTF-8, got {len(name)} bytes")
    return _small_record(RESULT, key, _result_meta(key, when, name, parents), payload)


def _py_mapped_payload(mm: Any, off: int, key: bytes) -> bytes | None:
    """The pickle of a small plain RESULT record of ``key`` at ``off`` in ``mm``, or None.

    ``async_wf._ckfast.mapped_payload`` is the compiled twin; see it for when
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


_ckfast = _load_ckfast()
_result_record: Callable[[bytes, float, bytes, tuple[bytes, ...], bytes], bytes] = (
    _py_result_record if _ckfast is None else _ckfast.result_record
)
_mapped_payload: Callable[[Any, int, bytes], bytes | None] = (
    _py_mapped_payload if _ckfast is None else _ckfast.mapped_payload
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


# --------------------------------------------------------------------- scanning
class _Scan:
    """One pass over a log's records, in file order.

    Calls ``on_record(type, offset, key_len, size)`` for every intact record
    (BLOCKs excluded) and ``on_block(run_start, count, sizes_offset)`` for
    every intact block, which returns False to have the block's records
    walked one by one instead. Collects ``problems`` (damage in the middle)
    and ``tail`` (offset of the torn tail, or None).

    With ``deep``, every record's body is checksummed (no deferral) and
    blocks are always walked record by record.
    """

    def __init__(self, mm: Any, start: int, end: int, deep: bool = False) -> None:
        self.mm = mm
        self.start = start
        self.end = end
        self.deep = deep
        self.problems: list[Problem] = []
        self.tail: int | None = None
        self.corrupt = 0

    def _sane(self, pos: int) -> tuple[int, int, int, int] | None:
        """(crc, type, key_len, size) of a plausible record header at ``pos``, else None."""
        if self.end - pos < HEADER_SIZE:
            return None
        magic, crc, typ, _flags, klen, blen = _HDR.unpack_from(self.mm, pos)
        if magic != RECORD_MAGIC or typ not in TYPE_NAMES:
            return None
        size = HEADER_SIZE + klen + blen
        if size > self.end - pos or (typ == BLOCK) != (klen == 0):
            return None
        return crc, typ, klen, size

    def _valid(self, pos: int) -> bool:
        """A complete record with a correct checksum starts at ``pos``."""
        h = self._sane(pos)
        if h is None:
            return False
        crc, _typ, _klen, size = h
        with memoryview(self.mm) as mv:
            return zlib.crc32(mv[pos + _CRC_FROM : pos + size]) == crc

    def _why(self, pos: int) -> str:
        if self.end - pos < HEADER_SIZE:
            return f"{self.end - pos} bytes, too short for a record header"
        magic, _crc, typ, _flags, klen, blen = _HDR.unpack_from(self.mm, pos)
        if magic != RECORD_MAGIC:
            return "bad record magic"
        if typ not in TYPE_NAMES:
            return f"unknown record type {typ}"
        if HEADER_SIZE + klen + blen > self.end - pos:
            return f"record of {HEADER_SIZE + klen + blen} bytes runs past the end of the file"
        if (typ == BLOCK) != (klen == 0):
            return f"{TYPE_NAMES[typ]} record with a key of {klen} bytes"
        return f"{TYPE_NAMES[typ]} record fails its checksum"

    def run(
        self,
        on_record: Callable[[int, int, int, int], None],
        on_block: Callable[[int, int, int], bool] | None = None,
    ) -> None:
        """Walk every record from ``start`` to ``end``."""
        mm, end, deep = self.mm, self.end, self.deep
        mv = memoryview(mm)
        unpack = _HDR.unpack_from
        crc32 = zlib.crc32
        pos = self.start
        trusted_end = pos  # records before this lie in a block whose run CRC matched
        try:
            while pos < end:
                if end - pos >= HEADER_SIZE:
                    magic, crc, typ, _flags, klen, blen = unpack(mm, pos)
                    size = HEADER_SIZE + klen + blen
                    if magic == RECORD_MAGIC and typ in TYPE_NAMES and size <= end - pos:
                        nxt = pos + size
                        if typ != BLOCK:
                            if not klen:
                                ok = False
                            elif nxt <= trusted_end:
                                ok = True
                            elif deep or typ != RESULT or blen <= DEFER_VERIFY or nxt >= end:
                                ok = crc32(mv[pos + _CRC_FROM : nxt]) == crc
                            else:
                                # a large result: get() verifies it, provided a
                                # sane header follows (so the last record of
                                # the file, which may be torn, is always checked)
                                ok = (
                                    self._sane(nxt) is not None
                                    or crc32(mv[pos + _CRC_FROM : nxt]) == crc
                                )
                            if ok:
                                on_record(typ, pos, klen, size)
                                pos = nxt
                                continue
                        elif klen == 0 and crc32(mv[pos + _CRC_FROM : nxt]) == crc:
                            count, run_crc, run_len = _BLOCK.unpack_from(mm, pos + HEADER_SIZE)
                            run_end = nxt + run_len
                            if (
                                blen == _BLOCK.size + 4 * count
                                and run_end <= end
                                and crc32(mv[nxt:run_end]) == run_crc
                            ):
                                sizes_at = pos + HEADER_SIZE + _BLOCK.size
                                if not deep and on_block is not None and on_block(
                                    nxt, count, sizes_at
                                ):
                                    pos = run_end
                                else:
                                    # walk its records without a checksum each:
                                    # the run's covers them
                                    trusted_end = run_end
                                    pos = nxt
                                continue
                            # a damaged or cut short run: its records check themselves
                            pos = nxt
                            continue
                pos = self._resync(pos)
        finally:
            mv.release()

    def _resync(self, pos: int) -> int:
        """Skip damage at ``pos``; return where the next valid record starts (or the end).

        The next valid record is the first position after ``pos`` where a
        complete record with a correct checksum starts. The damaged
        header's own length is not trusted: a damaged length that happens
        to land on a later record would silently skip the records between.
        """
        reason = self._why(pos)
        cand = self.mm.find(RECORD_MAGIC, pos + 1)
        while cand >= 0 and not self._valid(cand):
            cand = self.mm.find(RECORD_MAGIC, cand + 1)
        if cand < 0:
            # nothing intact after it: the torn tail
            self.tail = pos
            return self.end
        self.corrupt += 1
        self.problems.append(Problem(pos, f"{reason}; {cand - pos} bytes skipped"))
        return int(cand)


# ------------------------------------------------------------------------ locks
def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, from /proc/locks (Linux), else None."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters have "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def _sizes_bytes(sizes: array[int]) -> bytes:
    if sizes.itemsize != 4:  # pragma: no cover - 'I' is 4 bytes on every platform we run on
        return struct.pack(f"<{len(sizes)}I", *sizes)
    if sys.byteorder == "big":  # pragma: no cover
        swapped = array("I", sizes)
        swapped.byteswap()
        return swapped.tobytes()
    return sizes.tobytes()


def _flush_parts(data: bytearray, sizes: array[int]) -> list[Any]:
    """What a flush of the buffered records ``data`` writes: a BLOCK index first if it pays."""
    if len(sizes) < MIN_BLOCK:
        return [data]
    index = _BLOCK.pack(len(sizes), zlib.crc32(data), len(data)) + _sizes_bytes(sizes)
    return [_frame(BLOCK, b"", index), data]


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)

#: at most this many parts per writev call (Linux IOV_MAX is 1024)
_IOV_MAX = 1024


def _write_all(fd: int, parts: list[Any]) -> int:
    """Write every part, in order, with as few ``writev`` calls as the kernel allows."""
    views = [memoryview(p).cast("B") if isinstance(p, memoryview) else p for p in parts]
    total = 0
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        total += n
        # drop what was written; a part written in part is sliced
        i = 0
        while i < len(views) and n >= _nbytes(views[i]):
            n -= _nbytes(views[i])
            i += 1
        del views[:i]
        if n:
            views[0] = memoryview(views[0])[n:]
    return total


# ------------------------------------------------------------------------ log
class CheckpointLog:
    """An append-only log of task results, MPI task states and commits.

    Opening a log for writing takes an exclusive, non-blocking ``flock`` on
    the file, held until ``close``: a second writer, in another process or in
    this one, gets ``CheckpointLockedError`` instead of interleaving records.
    A read-only log takes no lock: ``inspect`` and ``verify`` work while a
    run appends. It may then see the writer's last record half-written, and
    reports that tail without touching it.

    The whole file is scanned at open (see the module's docstring); what
    the scan found wrong is in ``problems``. A torn tail is cut off when
    the log is opened for writing.

    Flush policies
        Records are appended to a buffer in memory and written to the file
        (the operating system's page cache) by a *flush*; ``flush_policy``
        says when:

        - ``"record"`` (default): at every append call. A killed process
          loses nothing that an append call returned from. ``put_results``
          is one call for many records, written with one ``writev``: the
          scheduler appends all the tasks that finished in one loop
          iteration with it, before their dependents are dispatched, so a
          SIGKILL costs only the tasks that were running (and those whose
          results the loop had not yet taken in), for one write per loop
          iteration.
        - ``"every"``: when ``flush_every`` records are buffered. A killed
          process loses at most the last ``flush_every - 1`` records.
        - ``"interval"``: at the first append at least ``flush_interval``
          seconds (default 1) after the previous flush. A killed process
          loses at most the records appended since the last flush: those
          of the last ``flush_interval`` seconds while records keep coming.
          The log starts no thread, so when appends stop, what is buffered
          waits for the next append, ``flush_if_due``, ``flush`` or
          ``close``: an owner whose appends may pause calls
          ``flush_if_due`` from a timer.

        Every policy also flushes when 1 MiB is buffered, and records of
        64 KiB or more (large arrays) are written at once, straight from the
        value's memory, after what is buffered.

        Whatever the policy, a crash never damages what an earlier flush
        wrote: the file is only appended to, a record is written by one
        write call, and a record cut short by a kill is cut off at the next
        open for writing. After a SIGKILL the log therefore holds a prefix
        of what was appended, every record of it intact.

        Power loss is another matter: without ``fsync`` the kernel writes
        the page cache out when it sees fit (typically within 30 s on
        Linux), and what it had not written is lost, possibly leaving a
        damaged tail (cut off at open) or, on some file systems, zeroed
        blocks (skipped and reported at open; never used). With
        ``fsync=True`` each flush ends with ``fdatasync``, and once a flush
        has returned its records survive a power loss; each flush then
        costs a disk round trip (milliseconds): with ``"record"`` that is one
        per scheduler loop iteration, which caps a run at a few hundred
        batches a second; ``"interval"`` with fsync bounds a power loss to
        ``flush_interval`` seconds at one round trip per interval.

    Not thread-safe: one thread (the scheduler's event loop) uses a log.

    Args:
        path: the log file; created (with its directory entry) if missing.
        flush: ``"record"``, ``"every"`` or ``"interval"``.
        flush_every: records per flush for ``"every"``.
        flush_interval: seconds between flushes for ``"interval"``.
        fsync: ``fdatasync`` the file at each flush.
        readonly: open for reading only (no lock, no writes, the tail left as it is).

    Raises:
        CheckpointLockedError: another writer holds the lock.
        CheckpointFormatError: the file is not a checkpoint log, or a newer one.
        ValueError: a flush option breaks its rule.
        OSError: the file cannot be opened (read-only: it does not exist).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush: str = DEFAULT_FLUSH,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        fsync: bool = False,
        readonly: bool = False,
    ) -> None:
        if flush not in FLUSH_POLICIES:
            raise ValueError(f"flush must be 'record', 'every' or 'interval', got {flush!r}")
        if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if (
            isinstance(flush_interval, bool)
            or not isinstance(flush_interval, int | float)
            or not (flush_interval > 0 and math.isfinite(flush_interval))
        ):
            raise ValueError(
                f"flush_interval must be > 0 seconds and finite, got {flush_interval!r}"
            )
        self.path: str = os.fspath(path)
        self.readonly = readonly
        self.flush_policy = flush
        self._every = flush_every if flush == "every" else (1 if flush == "record" else 1 << 62)
        self._interval = float(flush_interval) if flush == "interval" else math.inf
        self._fsync = fsync
        #: what the scan at open found wrong (offset, reason), in file order
        self.problems: list[Problem] = []
        self._results: dict[bytes, int] = {}
        self._states: dict[bytes, dict[tuple[int, int], int]] = {}
        self._commits: dict[bytes, tuple[int, int]] = {}
        self._counts = [0] * (max(TYPE_NAMES) + 1)
        self._corrupt = 0
        self._tail_bytes = 0
        self._written = 0  # bytes in the file
        self._end = 0  # bytes in the file plus buffered
        self._pending = bytearray()
        self._psizes: array[int] = array("I")
        # buffered records whose index entries move if a BLOCK is written before them
        self._pfix: list[tuple[int, bytes, int, tuple[int, int] | None]] = []
        self._names: dict[str, bytes] = {}
        self._last_flush = time.monotonic()
        self._broken: BaseException | None = None
        self._closed = False
        self._mm: mmap.mmap | None = None
        self._fd = self._open()
        # a log dropped without close() still releases its descriptor and lock
        # (its buffered records are lost, as in a crash)
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        try:
            self._load()
        except BaseException:
            self._closed = True
            self._finalizer()
            raise

    # ------------------------------------------------------------ open / scan
    def _open(self) -> int:
        path = self.path
        if self.readonly:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise CheckpointFormatError(f"checkpoint log {path!r} is not a regular file")
            return fd
        for _ in range(100):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise CheckpointFormatError(f"checkpoint log {path!r} is not a regular file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise CheckpointLockedError(path, _lock_holder(fd)) from None
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            # compact() replaced the file between our open and our lock:
            # the lock is on the old one; open the new one
            os.close(fd)
        raise CheckpointError(f"checkpoint log {path!r} keeps being replaced while opening")

    def _load(self) -> None:
        fd, path = self._fd, self.path
        size = os.fstat(fd).st_size
        if size < _FILE_HEADER.size:
            head = os.pread(fd, size, 0)
            if head != FILE_HEADER_BYTES[:size]:
                raise CheckpointFormatError(
                    f"{path!r} is not an async_wf checkpoint log (it starts with {head!r})"
                )
            if self.readonly:
                if size:
                    self.problems.append(Problem(0, f"file header cut short at {size} bytes"))
                self._written = self._end = size
                return
            # new, or created by a process killed before its header was written
            os.ftruncate(fd, 0)
            os.write(fd, FILE_HEADER_BYTES)
            if self._fsync:
                _datasync(fd)
                _fsync_dir(path)
            self._written = self._end = _FILE_HEADER.size
            return
        magic, version, reserved = _FILE_HEADER.unpack(os.pread(fd, _FILE_HEADER.size, 0))
        if magic != FILE_MAGIC:
            raise CheckpointFormatError(
                f"{path!r} is not an async_wf checkpoint log (it starts with {magic!r})"
            )
        if version != FORMAT_VERSION or reserved != 0:
            raise CheckpointFormatError(
                f"checkpoint log {path!r} has format version {version} (flags {reserved:#x}); "
                f"this async_wf reads version {FORMAT_VERSION} (flags 0)"
            )
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        try:
            scan = _Scan(mm, _FILE_HEADER.size, size)
            gc_on = gc.isenabled()
            # a million index entries make a million allocations: without this
            # the cyclic GC would run hundreds of times over a growing heap
            gc.disable()
            try:
                scan.run(self._record_loader(mm), self._block_loader(mm))
            finally:
                if gc_on:
                    gc.enable()
        finally:
            with contextlib.suppress(BufferError):  # a view left by an exception
                mm.close()
        self.problems.extend(scan.problems)
        self._corrupt = scan.corrupt
        end = size
        if scan.tail is not None:
            end = scan.tail
            self._tail_bytes = size - end
            if self.readonly:
                what = "left in place: read-only"
            else:
                os.ftruncate(fd, end)
                if self._fsync:
                    _datasync(fd)
                what = "cut off"
            self.problems.append(
                Problem(end, f"torn tail: {size - end} bytes after the last intact record, {what}")
            )
        self.problems.sort()
        self._written = self._end = end
        if end > _FILE_HEADER.size:
            # small records found at open are read from this map (no syscall,
            # no buffer per read); mapped after the tail is cut, so that it
            # never covers bytes the file no longer has
            self._mm = mmap.mmap(fd, end, access=mmap.ACCESS_READ)

    def _record_loader(self, mm: Any) -> Callable[[int, int, int, int], None]:
        results, counts = self._results, self._counts

        def on_record(typ: int, off: int, klen: int, size: int) -> None:
            key = mm[off + HEADER_SIZE : off + HEADER_SIZE + klen]
            counts[typ] += 1
            if typ == RESULT:
                results[key] = off
            else:
                self._apply(typ, key, off, size, mm)

        return on_record

    def _block_loader(self, mm: Any) -> Callable[[int, int, int], bool]:
        # NumPy is imported when a log is opened, not with the package: the
        # async-wf command imports the package, worker processes included
        import numpy as np
        from numpy.lib.stride_tricks import as_strided

        results, counts = self._results, self._counts
        hdr_dtype = np.dtype(_HDR_FIELDS)

        def on_block(run_start: int, count: int, sizes_at: int) -> bool:
            # Index a block of RESULT records with a few NumPy operations
            # instead of a Python iteration per record; the run's CRC has
            # been checked. Anything unusual: False, and the records are
            # walked one by one.
            if count == 0:
                return True
            sizes = np.frombuffer(mm, "<u4", count, sizes_at).astype(np.int64)
            if sizes.min() <= HEADER_SIZE:
                return False
            rel = np.zeros(count, np.int64)
            np.cumsum(sizes[:-1], out=rel[1:])
            run_len = int(rel[-1] + sizes[-1])
            run = np.frombuffer(mm, np.uint8, run_len, run_start)
            # row i of this view is run[i : i + HEADER_SIZE]: gathering the rows
            # at the records' offsets copies just their headers
            shape = (run_len - HEADER_SIZE + 1, HEADER_SIZE)
            rows = as_strided(run, shape, (1, 1), writeable=False)
            heads = rows[rel].view(hdr_dtype).ravel()
            klens = heads["klen"]
            if not (
                (heads["magic"] == _MAGIC_U32).all()
                and (heads["type"] == RESULT).all()
                and (klens.astype(np.int64) + heads["blen"].astype(np.int64) + HEADER_SIZE
                     == sizes).all()
            ):
                return False
            offs = (rel + run_start).tolist()
            k0 = int(klens[0])
            if (klens == k0).all():
                keyrows = as_strided(
                    run[HEADER_SIZE:], (run_len - HEADER_SIZE - k0 + 1, k0), (1, 1),
                    writeable=False,
                )
                # a void dtype's tolist() makes bytes objects in C, zeros kept
                keys = keyrows[rel].view(f"V{k0}").ravel().tolist()
            else:
                keys = [
                    mm[o + HEADER_SIZE : o + HEADER_SIZE + k]
                    for o, k in zip(offs, klens.tolist(), strict=True)
                ]
            results.update(zip(keys, offs, strict=True))
            counts[RESULT] += count
            return True

        return on_block

    def _apply(self, typ: int, key: bytes, off: int, size: int, buf: Any) -> None:
        """Apply a STATE, COMMIT or FORGET record (``buf[off:off + size]``) to the index."""
        at = off + HEADER_SIZE + len(key)
        if typ in (STATE, COMMIT) and off + size - at < _STATE_META.size:
            # intact but malformed: only a writer with a bug makes these
            self.problems.append(Problem(off, f"{TYPE_NAMES[typ]} record too short; ignored"))
            return
        if typ == STATE:
            rank, step = _STATE_META.unpack_from(buf, at)
            self._states.setdefault(key, {})[(rank, step)] = off
        elif typ == COMMIT:
            step, nranks = _COMMIT.unpack_from(buf, at)
            missing = self._missing_ranks(key, step, nranks)
            if missing:
                reason = f"COMMIT of step {step} lacks the state of ranks {missing}; ignored"
                self.problems.append(Problem(off, reason))
                return
            self._commit_index(key, step, nranks)
        elif typ == FORGET:
            self._results.pop(key, None)
            self._states.pop(key, None)
            self._commits.pop(key, None)

    def _missing_ranks(self, key: bytes, step: int, nranks: int) -> list[int]:
        have = self._states.get(key, {})
        missing = [r for r in range(nranks) if (r, step) not in have]
        return missing if len(missing) <= 10 else [*missing[:10], -1]

    def _commit_index(self, key: bytes, step: int, nranks: int) -> None:
        self._commits[key] = (step, nranks)
        states = self._states.get(key)
        if states:
            # earlier steps can never be restored again
            for rs in [rs for rs in states if rs[1] < step]:
                del states[rs]

    # ------------------------------------------------------------------ writes
    def _writable(self) -> None:
        if self._closed:
            raise CheckpointError(f"checkpoint log {self.path!r} is closed")
        if self.readonly:
            raise CheckpointError(f"checkpoint log {self.path!r} is open read-only")
        if self._broken is not None:
            raise CheckpointError(
                f"checkpoint log {self.path!r} takes no more records after a failed write "
                f"({self._broken})"
            )

    def _index(self, typ: int, key: bytes, rank_step: tuple[int, int] | None, off: int) -> None:
        if typ == RESULT:
            self._results[key] = off
        elif typ == STATE:
            assert rank_step is not None
            self._states.setdefault(key, {})[rank_step] = off
        self._counts[typ] += 1

    def _buffer(
        self, rec: bytes, typ: int, key: bytes, rank_step: tuple[int, int] | None = None,
        by_policy: bool = True,
    ) -> None:
        """Append a small record to the write buffer, index it, flush if the policy says so.

        ``by_policy=False``: only a full buffer flushes (the caller checks the
        policy once for a batch).
        """
        off = self._end
        self._index(typ, key, rank_step, off)
        if typ in (RESULT, STATE):
            self._pfix.append((typ, key, off, rank_step))
        self._pending += rec
        self._psizes.append(len(rec))
        self._end = off + len(rec)
        if len(self._pending) >= PENDING_MAX or (by_policy and (
            len(self._psizes) >= self._every
            or time.monotonic() - self._last_flush >= self._interval
        )):
            self._flush_pending()

    def _put(
        self, typ: int, key: bytes, meta: bytes, value: Any, rank_step: tuple[int, int] | None,
        by_policy: bool = True,
    ) -> None:
        """Append a RESULT or STATE record: ``meta`` (padded) then ``value``'s section."""
        bufs: list[pickle.PickleBuffer] = []
        payload = pack(value, bufs)
        self._put_packed(typ, key, meta, payload, bufs, rank_step, by_policy)

    def _put_packed(
        self, typ: int, key: bytes, meta: bytes, payload: bytes, bufs: list[pickle.PickleBuffer],
        rank_step: tuple[int, int] | None, by_policy: bool,
    ) -> None:
        """``_put`` of a value already pickled into ``payload`` and ``bufs``."""
        if not bufs and len(payload) < COMPRESS_MIN:
            rec = _small_record(typ, key, meta, payload)
            if len(rec) < DIRECT_MIN:
                self._buffer(rec, typ, key, rank_step, by_policy)
            else:
                self._index(typ, key, rank_step, self._direct([rec]))
            return
        parts, vlen = _value_parts(payload, bufs, HEADER_SIZE + len(key) + len(meta))
        body_len = len(meta) + vlen
        if HEADER_SIZE + len(key) + body_len < DIRECT_MIN:
            self._buffer(_frame(typ, key, meta + b"".join(parts)), typ, key, rank_step,
                         by_policy)
        else:
            off = self._direct(_frame_parts(typ, key, [meta, *parts], body_len))
            self._index(typ, key, rank_step, off)

    def _flush_pending(self) -> None:
        data = self._pending
        if not data:
            return
        parts = _flush_parts(data, self._psizes)
        shift = len(parts[0]) if len(parts) > 1 else 0
        try:
            _write_all(self._fd, parts)
            if self._fsync:
                _datasync(self._fd)
        except OSError as exc:
            self._fail(exc)
        if shift:
            results, states = self._results, self._states
            for typ, key, off, rank_step in self._pfix:
                if typ == RESULT:
                    if results.get(key) == off:
                        results[key] = off + shift
                else:
                    per_task = states.get(key)
                    assert rank_step is not None
                    if per_task is not None and per_task.get(rank_step) == off:
                        per_task[rank_step] = off + shift
        self._written += shift + len(data)
        self._end = self._written
        self._pending = bytearray()
        self._psizes = array("I")
        self._pfix = []
        self._last_flush = time.monotonic()

    def _direct(self, parts: list[Any]) -> int:
        """Write a large record (as parts) at once, after what is buffered; return its offset."""
        self._flush_pending()
        off = self._written
        try:
            n = _write_all(self._fd, parts)
            if self._fsync:
                _datasync(self._fd)
        except OSError as exc:
            self._fail(exc)
        self._written += n
        self._end = self._written
        self._last_flush = time.monotonic()
        return off

    def _fail(self, exc: OSError) -> None:
        # a record may be half-written: cut it, and take no more records
        # (what was buffered is lost, as in a crash)
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._written)
        self._broken = exc
        raise CheckpointError(f"checkpoint log {self.path!r}: write failed: {exc}") from exc

    def put_result(
        self, key: bytes, value: Any, *, function: str, parents: tuple[bytes, ...] = ()
    ) -> None:
        """Append the result of a task that finished successfully.

        A later record for the same key supersedes this one.

        Args:
            key: the task's key (``task_key``).
            value: the result; pickled (protocol 5, cloudpickle as a fallback),
                NumPy buffers written from their own memory.
            function: the function's name, ``module:qualname``.
            parents: keys of the tasks whose results this task received;
                ``forget_function`` follows them to dependents.

        Raises:
            pickle.PicklingError (or what cloudpickle raises): the value cannot
                be pickled; nothing is written.
            CheckpointError: the log is closed, read-only, or broken by a failed write.
            TypeError, ValueError: a key or the name breaks its rule.
        """
        failed = self.put_results([(key, value, function, parents)])
        if failed:
            raise failed[0][1]

    def put_results(
        self, items: list[tuple[bytes, Any, str, tuple[bytes, ...]]]
    ) -> list[tuple[bytes, Exception]]:
        """Append many results at once: ``(key, value, function, parents)`` each.

        The same records as ``put_result`` one by one, checked against the
        flush policy once at the end (the scheduler records all tasks that
        finished in one loop iteration this way). Results that cannot be
        pickled are skipped and returned with the exception, the others are
        appended.

        Raises:
            CheckpointError: the log is closed, read-only, or broken by a failed write.
            TypeError, ValueError: a key or a name breaks its rule.
        """
        if self._closed or self.readonly or self._broken is not None:
            self._writable()
        failed: list[tuple[bytes, Exception]] = []
        now = time.time()
        names = self._names
        record = _result_record
        for key, value, function, parents in items:
            if type(key) is not bytes or not 0 < len(key) <= MAX_KEY:
                _check_key(key)
                key = bytes(key)  # a subclass of bytes: the compiled builder takes bytes
            name = names.get(function)
            if name is None:
                name = self._name(function)
            if type(parents) is not tuple:
                parents = tuple(parents)
            bufs: list[pickle.PickleBuffer] = []
            try:
                payload = pack(value, bufs)
            except Exception as exc:  # pickling: only this result is lost
                failed.append((key, exc))
                continue
            if not bufs and len(payload) < COMPRESS_MIN:
                # the common small record, built in one go
                rec = record(key, now, name, parents, payload)
                if len(rec) < DIRECT_MIN:
                    self._buffer(rec, RESULT, key, None, False)
                    continue
            meta = _result_meta(key, now, name, parents)
            self._put_packed(RESULT, key, meta, payload, bufs, None, False)
        if self._psizes and (
            len(self._psizes) >= self._every
            or time.monotonic() - self._last_flush >= self._interval
        ):
            self._flush_pending()
        return failed

    def _name(self, function: str) -> bytes:
        if not isinstance(function, str):
            raise TypeError(f"function must be a str, got {type(function).__name__}")
        name = function.encode("utf-8")
        if len(name) > 0xFFFF:
            raise ValueError(f"function name must be < 64 KiB in UTF-8, got {len(name)} bytes")
        if len(self._names) < 10_000:  # a bounded cache of the encoded names
            self._names[function] = name
        return name

    def put_state(self, task_key: bytes, rank: int, step: int, state: Any) -> None:
        """Append the state of one rank of a task at one step.

        The step becomes restorable once ``commit`` has recorded that every
        rank saved it.

        Args:
            task_key: the task's key.
            rank: the rank, ``0 <= rank < 2**32``.
            step: the step, ``0 <= step < 2**64``.
            state: anything picklable.

        Raises:
            pickle.PicklingError (or what cloudpickle raises): the state cannot
                be pickled; nothing is written.
            CheckpointError: the log is closed, read-only, or broken by a failed write.
            TypeError, ValueError: an argument breaks its rule.
        """
        self._writable()
        _check_key(task_key, "task_key")
        _check_count("rank", rank, 0, 1 << 32)
        _check_count("step", step, 0, 1 << 64)
        meta = _STATE_META.pack(rank, step)
        meta += _ZEROS[: _align(HEADER_SIZE + len(task_key) + len(meta))]
        self._put(STATE, task_key, meta, state, (rank, step))

    def commit(self, task_key: bytes, step: int, nranks: int) -> None:
        """Record that all ``nranks`` ranks of a task have saved ``step``.

        From then on ``restore`` gives that step's states; the states of
        earlier steps are no longer reachable (``compact`` drops them).

        Args:
            task_key: the task's key.
            step: the step every rank saved.
            nranks: the number of ranks of the task.

        Raises:
            ValueError: a rank has not saved ``step`` (with ``put_state``), or
                an argument breaks its rule.
            CheckpointError: the log is closed, read-only, or broken by a failed write.
        """
        self._writable()
        _check_key(task_key, "task_key")
        _check_count("step", step, 0, 1 << 64)
        _check_count("nranks", nranks, 1, 1 << 32)
        missing = self._missing_ranks(task_key, step, nranks)
        if missing:
            raise ValueError(
                f"commit of step {step} needs the state of every rank; missing ranks {missing}"
            )
        rec = _frame(COMMIT, task_key, _COMMIT.pack(step, nranks))
        self._commit_index(task_key, step, nranks)
        self._buffer(rec, COMMIT, task_key)

    def forget(self, key: bytes) -> None:
        """Append a tombstone: the key's result, states and commit are gone.

        A later ``put_result`` for the key makes it live again.

        Raises:
            CheckpointError: the log is closed, read-only, or broken by a failed write.
            TypeError, ValueError: the key breaks its rule.
        """
        self._writable()
        _check_key(key)
        rec = _frame(FORGET, key, b"")
        self._results.pop(key, None)
        self._states.pop(key, None)
        self._commits.pop(key, None)
        self._buffer(rec, FORGET, key)

    def flush(self) -> None:
        """Write what is buffered (and ``fdatasync`` it with ``fsync=True``).

        Raises:
            CheckpointError: the write failed (the log then takes no more records).
        """
        if self._closed or self.readonly:
            return
        if self._broken is not None:
            self._writable()
        self._flush_pending()

    def flush_if_due(self) -> bool:
        """Flush if the ``"interval"`` policy's time has come; return whether it flushed.

        For owners whose appends may pause: call it from a timer, so that
        buffered records do not wait for the next append.

        Raises:
            CheckpointError: the write failed.
        """
        if (
            self._pending
            and not self._closed
            and time.monotonic() - self._last_flush >= self._interval
        ):
            self._flush_pending()
            return True
        return False

    def close(self) -> None:
        """Flush, release the lock and close the file. Idempotent.

        Raises:
            CheckpointError: the last flush failed (the file is closed all the same).
        """
        if self._closed:
            return
        try:
            if not self.readonly and self._broken is None:
                self._flush_pending()
        finally:
            self._closed = True
            if self._mm is not None:
                self._mm.close()
                self._mm = None
            self._finalizer()

    def __enter__(self) -> CheckpointLog:
        """The log itself; leaving the block closes it."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the log (flushing it), whether the block raised or not."""
        self.close()

    # ------------------------------------------------------------------- reads
    def __contains__(self, key: object) -> bool:
        """Whether the key has a live result."""
        return key in self._results

    def __len__(self) -> int:
        """The number of live results."""
        return len(self._results)

    def __iter__(self) -> Iterator[bytes]:
        """The keys of the live results (a snapshot: appending while iterating is safe)."""
        return iter(list(self._results))

    def _corrupt_at(self, off: int) -> Callable[[str], CheckpointCorruptError]:
        return lambda reason: CheckpointCorruptError(self.path, off, reason)

    def _read(self, off: int, typ: int, key: bytes) -> tuple[Any, int]:
        """Read the record at ``off`` into one buffer and check it; return (buffer, size).

        Raises:
            _Moved: the record was buffered; it is written now, at another offset.
            CheckpointCorruptError: the record is cut short, fails its
                checksum, or is not the ``typ`` record of ``key``.
        """
        if self._closed:
            raise CheckpointError(f"checkpoint log {self.path!r} is closed")
        if off >= self._written:
            self._flush_pending()
            raise _Moved
        buf: Any = bytearray(_READ_GUESS)
        n = os.preadv(self._fd, [buf], off)
        if n >= HEADER_SIZE:
            magic, crc, rtyp, _flags, klen, blen = _HDR.unpack_from(buf)
            size = HEADER_SIZE + klen + blen
            if magic == RECORD_MAGIC:
                if size > n:
                    buf = self._read_big(off, size)
                mv = memoryview(buf)
                if (
                    zlib.crc32(mv[_CRC_FROM:size]) == crc
                    and rtyp == typ
                    and bytes(mv[HEADER_SIZE : HEADER_SIZE + klen]) == key
                ):
                    return buf, size
                if zlib.crc32(mv[_CRC_FROM:size]) != crc:
                    raise CheckpointCorruptError(self.path, off, "checksum mismatch")
                raise CheckpointCorruptError(
                    self.path, off,
                    f"the index points at a {TYPE_NAMES.get(rtyp, rtyp)} record of another key",
                )
            raise CheckpointCorruptError(self.path, off, "bad record magic")
        raise CheckpointCorruptError(self.path, off, f"cut short: {n} bytes")

    def _read_big(self, off: int, size: int) -> Any:
        import numpy as np

        # one buffer for the whole record, uninitialised (no pass to zero
        # it) and aligned: the arrays unpickled from it are views into it
        buf = np.empty(size, np.uint8)
        view = buf.data
        got = 0
        while got < size:
            k = os.preadv(self._fd, [view[got:]], off + got)
            if k == 0:
                raise CheckpointCorruptError(self.path, off, f"cut short: {got} of {size} bytes")
            got += k
        return buf

    def _read_result(self, key: bytes) -> tuple[Any, int, int]:
        """(buffer, size, offset) of ``key``'s live RESULT record, checked."""
        while True:
            off = self._results[key]
            try:
                buf, size = self._read(off, RESULT, key)
                return buf, size, off
            except _Moved:
                continue  # it was buffered; the flush has moved it

    def get(self, key: bytes) -> Any:
        """The result recorded for ``key``, read from the file now.

        The record's checksum is verified again before it is unpickled.
        NumPy arrays in the result are views into one buffer holding the
        record, not copies.

        Raises:
            KeyError: no live result for ``key``.
            CheckpointCorruptError: the record is damaged: do not use it, rerun the task.
            Exception: what unpickling raises (a class that no longer exists).
        """
        mm = self._mm
        if mm is not None and not self._closed:
            # a small plain record inside the map made at open: checked and
            # copied out in one step; anything else takes the path below
            payload = _mapped_payload(mm, self._results[key], key)
            if payload is not None:
                return pickle.loads(payload)
        buf, size, off = self._read_result(key)
        mv = memoryview(buf)[:size]
        meta_at = HEADER_SIZE + len(key)
        if size - meta_at >= _RESULT_META.size:
            _when, value_at, _nlen, _npar = _RESULT_META.unpack_from(mv, meta_at)
            if meta_at < value_at <= size - _VALUE_HEAD.size:
                nbufs, pcodec, plen = _VALUE_HEAD.unpack_from(mv, value_at)
                start = value_at + _VALUE_HEAD.size
                if nbufs == 0 and pcodec == CODEC_RAW and start + plen == size:
                    # the common case: a plain pickle and nothing else
                    return pickle.loads(mv[start:])
        where = self._corrupt_at(off)
        _name, _parents, _when, vpos = _parse_result_meta(mv, 0, meta_at, size, where)
        return _decode_value(mv, vpos, size, where)

    def info(self, key: bytes) -> ResultInfo:
        """The metadata of ``key``'s live result: function, parents, time, size.

        Raises:
            KeyError: no live result for ``key``.
            CheckpointCorruptError: the record is damaged.
        """
        buf, size, off = self._read_result(key)
        name, parents, when, _vpos = _parse_result_meta(
            memoryview(buf)[:size], 0, HEADER_SIZE + len(key), size, self._corrupt_at(off)
        )
        return ResultInfo(name, parents, when, size)

    def restore(self, task_key: bytes, rank: int) -> tuple[int, Any] | None:
        """The last committed step of a task and ``rank``'s state at it, or None.

        None when the task has no commit, or ``rank`` is not below the
        committed step's number of ranks. States saved after the last
        commit are never returned: the step they belong to is incomplete.

        Raises:
            CheckpointCorruptError: the state's record is damaged.
            Exception: what unpickling raises.
        """
        commit = self._commits.get(task_key)
        if commit is None:
            return None
        step, nranks = commit
        if not 0 <= rank < nranks:
            return None
        while True:
            off = self._states.get(task_key, {}).get((rank, step))
            if off is None:
                return None
            try:
                buf, size = self._read(off, STATE, task_key)
                break
            except _Moved:
                continue
        mv = memoryview(buf)[:size]
        where = self._corrupt_at(off)
        at = HEADER_SIZE + len(task_key)
        if size - at < _STATE_META.size or _STATE_META.unpack_from(mv, at) != (rank, step):
            raise where(f"not the state of rank {rank} at step {step}")
        at += _STATE_META.size
        at += _align(at)
        return step, _decode_value(mv, at, size, where)

    def committed(self, task_key: bytes) -> tuple[int, int] | None:
        """(step, number of ranks) of the task's last commit, or None."""
        return self._commits.get(task_key)

    # -------------------------------------------------------------- statistics
    def _live_metas(self) -> dict[bytes, tuple[str, tuple[bytes, ...], float, int]]:
        """key -> (function, parents, time, record size) of every live result.

        Damaged metadata (possible only in a large record whose checksum is
        left to ``get``) shows as the function ``"?"``.
        """
        self.flush()
        out: dict[bytes, tuple[str, tuple[bytes, ...], float, int]] = {}
        if not self._results or self._written <= _FILE_HEADER.size:
            return out
        mm = mmap.mmap(self._fd, self._written, access=mmap.ACCESS_READ)
        try:
            for key, off in self._results.items():
                where = self._corrupt_at(off)
                try:
                    _m, _c, _t, _f, klen, blen = _HDR.unpack_from(mm, off)
                    size = HEADER_SIZE + klen + blen
                    name, parents, when, _v = _parse_result_meta(
                        mm, off, off + HEADER_SIZE + klen, off + size, where
                    )
                except (CheckpointCorruptError, struct.error):
                    name, parents, when, size = "?", (), math.nan, 0
                out[key] = (name, parents, when, size)
        finally:
            mm.close()
        return out

    def statistics(self) -> LogStatistics:
        """Counts and sizes: records, live results per function, damage found.

        Flushes first, then reads the metadata of every live result from
        the file (not the values): about a second per million results.
        """
        functions: dict[str, FunctionStats] = {}
        live = 0
        for name, _parents, when, size in self._live_metas().values():
            fs = functions.get(name)
            if fs is None:
                fs = functions[name] = FunctionStats()
            fs.results += 1
            fs.bytes += size
            live += size
            if when == when:  # not NaN
                fs.first = min(fs.first, when)
                fs.last = max(fs.last, when)
        by_type = {TYPE_NAMES[t]: self._counts[t] for t in TYPE_NAMES if t != BLOCK}
        return LogStatistics(
            path=self.path,
            bytes=self._end,
            records=sum(by_type.values()),
            by_type=by_type,
            results=len(self._results),
            live_bytes=live,
            states=sum(len(s) for s in self._states.values()),
            corrupt=self._corrupt,
            truncated_tail_bytes=self._tail_bytes,
            functions=dict(sorted(functions.items())),
            problems=list(self.problems),
        )


class _Moved(Exception):
    """Internal: the record was buffered; the flush just done moved it."""


# ------------------------------------------------------------ file operations
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


def inspect(path: str | os.PathLike[str]) -> LogStatistics:
    """Counts per function, sizes, first and last times, and the damage found.

    Opens the log read-only (no lock: a running writer is not disturbed)
    and reads every live result's metadata, not the values.

    Raises:
        CheckpointFormatError: not a checkpoint log.
        OSError: the file cannot be read.
    """
    with CheckpointLog(path, readonly=True) as log:
        return log.statistics()


def verify(path: str | os.PathLike[str], *, unpickle: bool = False) -> Verification:
    """Check every record of a log: checksums, and the structure of every body.

    By default nothing is unpickled, so no module of the program is imported
    and a log from elsewhere can be checked safely (unpickling runs code).
    With ``unpickle=True`` every live result and every committed state is
    also unpickled, which finds results that the current code can no longer
    load (a renamed class); this needs the program's modules importable.

    Opens the log read-only, without a lock. A log being written may show
    the writer's half-written last record as a torn tail.

    Raises:
        CheckpointFormatError: not a checkpoint log.
        OSError: the file cannot be read.
    """
    problems: dict[int, str] = {}
    records = 0
    unpickled = 0
    with CheckpointLog(path, readonly=True) as log:
        size = os.fstat(log._fd).st_size
        if size > _FILE_HEADER.size:
            mm = mmap.mmap(log._fd, size, access=mmap.ACCESS_READ)
            mv = memoryview(mm)
            try:
                scan = _Scan(mm, _FILE_HEADER.size, size, deep=True)

                def on_record(typ: int, off: int, klen: int, rsize: int) -> None:
                    nonlocal records
                    records += 1
                    reason = _check_body(mv, typ, off, klen, rsize)
                    if reason is not None:
                        problems.setdefault(off, f"{TYPE_NAMES[typ]} record: {reason}")

                scan.run(on_record)
            finally:
                mv.release()
                with contextlib.suppress(BufferError):
                    mm.close()
            for p in scan.problems:
                problems.setdefault(p.offset, p.reason)
            if scan.tail is not None:
                problems.setdefault(
                    scan.tail,
                    f"torn tail: {size - scan.tail} bytes after the last intact record",
                )
        for p in log.problems:  # commits without their states, a cut header
            problems.setdefault(p.offset, p.reason)
        if unpickle:
            for key in log:
                try:
                    log.get(key)
                    unpickled += 1
                except CheckpointCorruptError as exc:
                    problems.setdefault(exc.offset, f"RESULT record: {exc.reason}")
                except Exception as exc:
                    problems.setdefault(
                        log._results[key],
                        f"RESULT record does not unpickle: {type(exc).__name__}: {exc}",
                    )
            for key, (step, nranks) in log._commits.items():
                for rank in range(nranks):
                    try:
                        log.restore(key, rank)
                        unpickled += 1
                    except CheckpointCorruptError as exc:
                        problems.setdefault(exc.offset, f"STATE record: {exc.reason}")
                    except Exception as exc:
                        off = log._states[key][(rank, step)]
                        problems.setdefault(
                            off, f"STATE record does not unpickle: {type(exc).__name__}: {exc}"
                        )
    return Verification(
        path=os.fspath(path),
        records=records,
        bytes=size,
        unpickled=unpickled,
        problems=[Problem(off, why) for off, why in sorted(problems.items())],
    )


def compact(path: str | os.PathLike[str]) -> Compaction:
    """Rewrite a log with only what a run can still use, then swap it in atomically.

    Kept: the live result of every key, and for tasks without a live
    result the states of their last committed step and that commit. Dropped:
    superseded and forgotten records, tombstones, damaged records (and the
    torn tail), states of other steps, and states of tasks that have a
    result. The new file is written next to the old one, synced, and
    renamed over it (``os.replace``), so a crash at any moment leaves
    either the old log or the new one, never a mix.

    Takes the writer's lock for the duration: refused while a run writes
    the log. A writer that opens the log during the compaction waits for
    nothing: it fails with ``CheckpointLockedError``; one that opened the old
    file just before the swap notices the swap and opens the new one.

    Raises:
        CheckpointLockedError: a writer holds the log.
        CheckpointFormatError: not a checkpoint log.
        OSError: a read or write failed (the old log is then left as it was).
    """
    path = os.fspath(path)
    with CheckpointLog(path, fsync=True) as log:
        log.flush()
        before = log._written
        records_before = sum(log._counts[t] for t in TYPE_NAMES if t != BLOCK)
        keep: list[tuple[int, int, bytes]] = [(off, RESULT, k) for k, off in log._results.items()]
        commits: list[bytes] = []
        for key, (step, nranks) in log._commits.items():
            if key in log._results:
                continue  # finished: nothing will resume it
            states = log._states.get(key, {})
            keep.extend((states[(r, step)], STATE, key) for r in range(nranks))
            commits.append(_frame(COMMIT, key, _COMMIT.pack(step, nranks)))
        keep.sort()
        directory, base = os.path.split(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".compacting", dir=directory)
        kept = 0
        try:
            os.fchmod(fd, stat.S_IMODE(os.fstat(log._fd).st_mode))
            out = _Appender(fd)
            out.raw(FILE_HEADER_BYTES)
            for off, typ, key in keep:
                try:
                    buf, size = log._read(off, typ, key)
                except CheckpointCorruptError:
                    continue  # a damaged large record, left to get() until now
                out.record(memoryview(buf)[:size])
                kept += 1
            for rec in commits:
                out.record(rec)
                kept += 1
            out.flush()
            os.fsync(fd)
            after = os.fstat(fd).st_size
            os.close(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.replace(tmp, path)
        _fsync_dir(path)
    return Compaction(path, records_before, kept, before, after)


class _Appender:
    """Writes records to a new file in blocks, as a log's flushes do."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self.sizes: array[int] = array("I")

    def raw(self, data: bytes) -> None:
        """Write ``data`` as it is (the file header)."""
        _write_all(self.fd, [data])

    def record(self, rec: Any) -> None:
        """Add one complete record."""
        n = _nbytes(rec)
        if n >= DIRECT_MIN:
            self.flush()
            _write_all(self.fd, [rec])
            return
        self.data += rec
        self.sizes.append(n)
        if len(self.data) >= PENDING_MAX:
            self.flush()

    def flush(self) -> None:
        """Write what was added."""
        if self.data:
            _write_all(self.fd, _flush_parts(self.data, self.sizes))
            self.data = bytearray()
            self.sizes = array("I")


def forget_function(path: str | os.PathLike[str], name: str) -> int:
    """Forget every live result of a function and, transitively, of its dependents.

    A result depends on another when the other's key is among its
    ``parents``. Tombstones (FORGET records) are appended and synced; the
    records themselves stay until ``compact``. Use it when a function's
    results are wrong for a reason its key cannot see (an external service
    changed): its tasks and everything computed from them rerun.

    Args:
        path: the log.
        name: ``module:qualname``, or a bare qualified name that only one
            module in the log has.

    Returns:
        How many results were forgotten (0 when the log has none of ``name``).

    Raises:
        ValueError: a bare name matches functions of several modules.
        CheckpointLockedError: a writer holds the log.
        CheckpointFormatError: not a checkpoint log.
    """
    with CheckpointLog(path, fsync=True) as log:
        metas = log._live_metas()
        target = name
        if ":" not in name:
            matches = sorted({m[0] for m in metas.values() if m[0].split(":", 1)[-1] == name})
            if len(matches) > 1:
                raise ValueError(
                    f"function name {name!r} is ambiguous: {', '.join(matches)}; "
                    "give it as module:qualname"
                )
            if matches:
                target = matches[0]
        children: dict[bytes, list[bytes]] = {}
        for key, (_fn, parents, _t, _s) in metas.items():
            for parent in parents:
                children.setdefault(parent, []).append(key)
        todo = [key for key, m in metas.items() if m[0] == target]
        gone = set(todo)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in gone:
                    gone.add(child)
                    todo.append(child)
        for key in sorted(gone, key=log._results.__getitem__):
            log.forget(key)
    return len(gone)
