"""The checkpoint log: an append-only file of task results, MPI states and commits.

``CheckpointLog`` opens and locks a log, keeps its index, appends records
under a flush policy and reads them back. The file format is in
``_format.py``, the scan at open (damage, torn tail, bulk indexing of
blocks) in ``_scan.py``, the offline tools (inspect, verify, compact,
forget) in ``_tools.py``.
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
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from async_wf._codec import CODEC_RAW, pack
from async_wf.checkpoint._format import (
    _COMMIT,
    _CRC_FROM,
    _FILE_HEADER,
    _HDR,
    _RESULT_META,
    _STATE_META,
    _VALUE_HEAD,
    _ZEROS,
    BLOCK,
    COMMIT,
    COMPRESS_MIN,
    DIRECT_MIN,
    FILE_HEADER_BYTES,
    FILE_MAGIC,
    FORGET,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAX_KEY,
    RECORD_MAGIC,
    RESULT,
    STATE,
    TYPE_NAMES,
    CheckpointCorruptError,
    CheckpointFormatError,
    _align,
    _append_done,
    _append_small,
    _block_size,
    _check_count,
    _check_key,
    _decode_value,
    _fix_results,
    _flush_parts,
    _frame,
    _frame_parts,
    _mapped_payload,
    _nbytes,
    _parse_result_meta,
    _result_meta,
    _result_record,
    _small_record,
    _value_parts,
)
from async_wf.checkpoint._keys import CheckpointError
from async_wf.checkpoint._scan import (
    Problem,
    _Scan,
    block_indexer,
)

#: buffered bytes that force a flush whatever the policy
PENDING_MAX = 1 << 20
_U32 = struct.Struct("<I").pack
# why append_small_results returned (src_cython/ckfast.pxi)
_STOP_FULL = 1
_STOP_ITEM = 2
#: the time put in records (a module attribute, so that the tests can fix it)
_clock = time.time
#: first read of a record: most records fit, and then one pread is enough
_READ_GUESS = 4096

FLUSH_POLICIES = ("record", "every", "interval")
DEFAULT_FLUSH = "record"
DEFAULT_FLUSH_EVERY = 1000
DEFAULT_FLUSH_INTERVAL = 1.0


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
        self._end = 0  # bytes in the file plus buffered (plus _pshift)
        #: the BLOCK index size that the offsets of the buffered records
        #: already count (put_done's guess of its flush); the flush moves
        #: them only if it wrote another size
        self._pshift = 0
        self._pending = bytearray()
        # the size of each buffered record, a u32 little-endian each: the
        # table of the BLOCK that a flush writes before them
        self._psizes = bytearray()
        # buffered records whose index entries move if a BLOCK is written
        # before them: the keys of the RESULT records, in order (their
        # offsets follow from _psizes), and the STATE records
        self._pkeys: list[bytes] = []
        self._pstates: list[tuple[bytes, int, tuple[int, int]]] = []
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
                on_block = block_indexer(mm, self._results, self._counts)
                scan.run(self._record_loader(mm), on_block)
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
        if typ == RESULT:
            self._pkeys.append(key)
        elif typ == STATE:
            assert rank_step is not None
            self._pstates.append((key, off, rank_step))
        self._pending += rec
        self._psizes += _U32(len(rec))
        self._end = off + len(rec)
        if len(self._pending) >= PENDING_MAX or (by_policy and (
            len(self._psizes) >= 4 * self._every
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
            self._unguess()
            return
        parts = _flush_parts(data, self._psizes)
        shift = len(parts[0]) if len(parts) > 1 else 0
        try:
            _write_all(self._fd, parts)
            if self._fsync:
                _datasync(self._fd)
        except OSError as exc:
            self._fail(exc)
        moved = shift - self._pshift
        if moved:
            if self._pkeys:
                _fix_results(self._results, self._pkeys, data, self._psizes,
                             self._written + self._pshift, moved)
            states = self._states
            for key, off, rank_step in self._pstates:
                per_task = states.get(key)
                if per_task is not None and per_task.get(rank_step) == off:
                    per_task[rank_step] = off + moved
        self._pshift = 0
        self._written += shift + len(data)
        self._end = self._written
        self._pending = bytearray()
        self._psizes = bytearray()
        self._pkeys = []
        self._pstates = []
        self._last_flush = time.monotonic()

    def _guess(self, count: int) -> None:
        """Count the BLOCK index of ``count`` records in the offsets of the records buffered next.

        Only with nothing buffered. Under the ``"record"`` policy ``put_done``
        flushes its batch at its end, so the index it writes is known when
        the batch starts, and the flush need not move the index entries of
        its records (``_fix_results``, about 0.06 µs a record) unless the
        guess was wrong: a pair skipped or with records of its own.
        """
        assert not self._pending
        self._pshift = _block_size(count)
        self._end = self._written + self._pshift

    def _unguess(self) -> None:
        """Drop a guess that nothing was buffered under (see ``_guess``)."""
        if not self._pending:
            self._pshift = 0
            self._end = self._written

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
        now = _clock()
        fast = _append_small
        if fast is None:
            for key, value, function, parents in items:
                self._put_result_item(key, value, function, parents, now, failed, None)
        else:
            # the common small records in bulk, in the compiled code; each
            # item it leaves (see append_small_results) goes the general way
            i, n = 0, len(items)
            while i < n:
                i, self._end, appended, why, packed = fast(
                    items, i, now, self._names, pack, self._pending, self._psizes,
                    self._pkeys, self._results, self._end, PENDING_MAX,
                )
                self._counts[RESULT] += appended
                if why == _STOP_FULL:
                    self._flush_pending()
                elif why == _STOP_ITEM:
                    key, value, function, parents = items[i]
                    self._put_result_item(key, value, function, parents, now, failed, packed)
                    i += 1
        self._flush_by_policy()
        return failed

    def put_done(
        self,
        done: list[tuple[Any, Any]],
        general: Callable[[Any, Any, list[tuple[bytes, Any, str, tuple[bytes, ...]]]], None],
        fn_names: dict[Any, str] | None = None,
        big: int = COMPRESS_MIN,
    ) -> tuple[int, list[tuple[bytes, Exception]]]:
        """Append the results of a batch of finished tasks, as the runtime hands them over.

        ``done``: ``(task, value)`` pairs. ``general(task, value, items)``
        appends to ``items`` the ``(key, value, function, parents)`` records
        of one pair (none if it is not to be recorded); they are appended as
        ``put_results`` appends them, pair after pair, and the flush policy
        is checked once at the end. With the compiled extension and
        ``fn_names`` (function -> record name), the common pairs skip
        ``general``: ``async_wf._core.append_done`` writes their records
        from the task's ``_ckey``, ``_fn``, ``_opts.name`` and ``_cparents``
        (the runtime's futures) and leaves every other pair, and any value
        whose size counts toward ``big``, to ``general``. Either way the file
        gets the same bytes, provided ``general`` makes the same records.

        Returns the number of records tried and those whose value could not
        be pickled (skipped, with the exception).

        Raises:
            CheckpointError: the log is closed, read-only, or broken by a failed write.
        """
        if self._closed or self.readonly or self._broken is not None:
            self._writable()
        failed: list[tuple[bytes, Exception]] = []
        now = _clock()
        count = 0
        fast = _append_done if fn_names is not None else None
        if fast is None:
            for task, value in done:
                count += self._put_general(task, value, general, now, failed, None)
        else:
            i, n = 0, len(done)
            guess = self._every == 1  # "record": this call flushes what it buffers
            while i < n:
                if guess and not self._pending:
                    self._guess(n - i)
                i, self._end, appended, why, packed = fast(
                    done, i, fn_names, big, now, self._names, pack, self._pending,
                    self._psizes, self._pkeys, self._results, self._end, PENDING_MAX,
                )
                self._counts[RESULT] += appended
                count += appended
                if why == _STOP_FULL:
                    self._flush_pending()
                elif why == _STOP_ITEM:
                    task, value = done[i]
                    count += self._put_general(task, value, general, now, failed, packed)
                    i += 1
            self._unguess()
        self._flush_by_policy()
        return count, failed

    def _put_general(
        self, task: Any, value: Any,
        general: Callable[[Any, Any, list[tuple[bytes, Any, str, tuple[bytes, ...]]]], None],
        now: float, failed: list[tuple[bytes, Exception]],
        packed: tuple[bytes, list[pickle.PickleBuffer]] | None,
    ) -> int:
        """One pair of ``put_done`` the general way; ``packed``: its value, already pickled."""
        items: list[tuple[bytes, Any, str, tuple[bytes, ...]]] = []
        general(task, value, items)
        for j, (key, v, function, parents) in enumerate(items):
            self._put_result_item(key, v, function, parents, now, failed,
                                  packed if j == 0 and v is value else None)
        return len(items)

    def _flush_by_policy(self) -> None:
        """Flush what is buffered if the policy says so (once per batch of records)."""
        if self._psizes and (
            len(self._psizes) >= 4 * self._every
            or time.monotonic() - self._last_flush >= self._interval
        ):
            self._flush_pending()

    def _put_result_item(
        self, key: bytes, value: Any, function: str, parents: tuple[bytes, ...], now: float,
        failed: list[tuple[bytes, Exception]],
        packed: tuple[bytes, list[pickle.PickleBuffer]] | None,
    ) -> None:
        """One item of ``put_results``; ``packed``: its value, already pickled."""
        if type(key) is not bytes or not 0 < len(key) <= MAX_KEY:
            _check_key(key)
            key = bytes(key)  # a subclass of bytes: the compiled builder takes bytes
        name = self._names.get(function)
        if name is None:
            name = self._name(function)
        if type(parents) is not tuple:
            parents = tuple(parents)
        if packed is None:
            bufs: list[pickle.PickleBuffer] = []
            try:
                payload = pack(value, bufs)
            except Exception as exc:  # pickling: only this result is lost
                failed.append((key, exc))
                return
        else:
            payload, bufs = packed
        if not bufs and len(payload) < COMPRESS_MIN:
            # the common small record, built in one go
            rec = _result_record(key, now, name, parents, payload)
            if len(rec) < DIRECT_MIN:
                self._buffer(rec, RESULT, key, None, False)
                return
        meta = _result_meta(key, now, name, parents)
        self._put_packed(RESULT, key, meta, payload, bufs, None, False)

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
