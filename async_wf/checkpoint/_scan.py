"""Scanning a checkpoint log: checks, recovery past damage, the torn tail, the index.

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

``_Scan`` finds the records and the damage; the log (``_log.py``) builds
its index from what it reports and cuts off the torn tail when it writes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from async_wf.checkpoint._format import (
    _BLOCK,
    _CRC_FROM,
    _HDR,
    BLOCK,
    HEADER_SIZE,
    RECORD_MAGIC,
    RESULT,
    TYPE_NAMES,
)

# the record header as NumPy reads it in bulk (see block_indexer)
_HDR_FIELDS = [
    ("magic", "<u4"), ("crc", "<u4"), ("type", "u1"), ("flags", "u1"), ("klen", "<u2"),
    ("blen", "<u8"),
]
_MAGIC_U32 = int.from_bytes(RECORD_MAGIC, "little")
#: RESULT bodies larger than this, outside blocks, are checksummed by get(), not at open
DEFER_VERIFY = 1 << 20


class Problem(NamedTuple):
    """Something a scan found wrong: where (byte offset) and what."""

    offset: int
    reason: str


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


def block_indexer(
    mm: Any, results: dict[bytes, int], counts: list[int]
) -> Callable[[int, int, int], bool]:
    """A ``_Scan`` ``on_block`` that indexes blocks of RESULT records in bulk.

    ``results`` (key -> offset) and ``counts`` (records per type) are the
    log's index, filled in place.
    """
    # NumPy is imported when a log is opened, not with the package: the
    # async-wf command imports the package, worker processes included
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

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
