"""Offline tools over a checkpoint log file: what ``async-wf checkpoint`` runs.

``inspect`` (counts and sizes), ``verify`` (every checksum and body, with or
without unpickling), ``compact`` (rewrite with only what a run can use) and
``forget_function`` (tombstones for a function and its dependents). Each
opens the file through ``CheckpointLog``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import Any

from async_wf.checkpoint._format import (
    _COMMIT,
    _FILE_HEADER,
    BLOCK,
    COMMIT,
    DIRECT_MIN,
    FILE_HEADER_BYTES,
    RESULT,
    STATE,
    TYPE_NAMES,
    CheckpointCorruptError,
    _check_body,
    _flush_parts,
    _frame,
    _nbytes,
)
from async_wf.checkpoint._log import (
    PENDING_MAX,
    CheckpointLog,
    LogStatistics,
    _fsync_dir,
    _write_all,
)
from async_wf.checkpoint._scan import (
    Problem,
    _Scan,
)


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
        self.sizes = bytearray()  # a u32 little-endian per record, as the BLOCK holds them

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
        self.sizes += n.to_bytes(4, "little")
        if len(self.data) >= PENDING_MAX:
            self.flush()

    def flush(self) -> None:
        """Write what was added."""
        if self.data:
            _write_all(self.fd, _flush_parts(self.data, self.sizes))
            self.data = bytearray()
            self.sizes = bytearray()


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
