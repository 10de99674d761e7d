"""The worker's execution of tasks, shared by worker processes (TCP) and MPI worker ranks.

``async def`` tasks run concurrently on the worker's own event loop, with no
limit from ``--slots``; blocking functions run in ``--slots`` threads;
``inline`` functions, and blocking functions that have proved short (see
INLINE_BELOW), run on the loop, watched by a guard thread.
Outcomes are sent back in batches: all that finished in one loop iteration
go in one RESULTS frame. When the scheduler asks for timings (bit 0 of a
TASKS frame's flags), a RESULTS frame also carries the start and end of
each task that ran.

Log records of the worker's process at or above its level (WARNING, INFO
with ``-v``, or ``ASYNC_WF_LOG_LEVEL``) are forwarded to the scheduler in
LOG frames, where they are logged again under ``async_wf.worker``.

The worker exits when the scheduler says SHUTDOWN, closes the connection, or
falls silent for longer than the heartbeat timeout; a worker started by a
runtime (``--parent-pid``) also exits when that process is gone, so no
worker outlives its runtime. The command line is in ``async_wf.worker``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import math
import os
import pickle
import select
import socket
import ssl
import threading
import time
import traceback
from array import array
from time import perf_counter
from typing import Any

from async_wf import protocol as P
from async_wf._context import TaskContext, call_on_loop, mark_coroutine, mark_thread
from async_wf._errors import RemoteError, retyped
from async_wf._futures import replace_in
from async_wf._held import AheadInput, HeldRef, count_fetched, data_items, read_data
from async_wf._resources import RESOURCE_THREADS, Allocator, Declared, Grant, Request, pinned
from async_wf._threads import ERROR, OK, SKIPPED, Outcome, ThreadPool

log = logging.getLogger("async_wf.worker")

# A blocking function whose calls average less than INLINE_BELOW seconds may
# run on the worker's loop instead of a slot thread: for such a function the
# two thread hand-offs cost more than the call. At most INLINE_BUDGET seconds
# of such calls run per batch, and none while a coroutine runs here. A call
# that runs GUARD_TICK seconds is rescued by the guard thread (Worker._rescue):
# it sends the results that wait, hands the rest of the batch to the threads,
# and sends the heartbeats. A call on the loop that takes more than
# INLINE_NEVER seconds is a strike; a second strike within the function's next
# INLINE_STRIKE_WINDOW calls on the loop sends it to the threads for good
# (frames that arrive meanwhile still wait for such a call). One long call
# alone may be the machine's doing: the worker preempted on a loaded host,
# stopped, or waiting for the GIL. Its CPU time would not tell that from a
# function that sleeps (both are long on the clock and short on the CPU,
# and reading a thread's CPU clock costs a system call, ~1 us, per call);
# that it does not happen again soon does. So one strike is left out of the
# average too, and a function that is slow itself (every call, or often)
# leaves the loop at its second long call.
INLINE_BELOW = 200e-6
INLINE_BUDGET = 5e-3
INLINE_NEVER = 5e-3
INLINE_STRIKE_WINDOW = 8
GUARD_TICK = 20e-3
# values left for a follower sent ahead that the scheduler never sent (a
# task cancelled meanwhile): a bound, in case its FREE never comes either
KEPT_MAX = 1024
#: log records kept while the connection is not ready yet
_LOG_KEEP = 1000
#: seconds a connection attempt may take (TimeoutError, an OSError, after it)
CONNECT_TIMEOUT = 10.0

_NO_KWARGS: dict[str, Any] = {}  # never mutated: ** unpacking copies it
_MISSING: Any = object()


def portable_exception(exc: BaseException) -> BaseException:
    """Return ``exc`` if it survives a pickle round trip, else a ``RemoteError`` for it."""
    try:
        # the same pickling as the RESULTS frame (cloudpickle for classes of
        # __main__), and a load too: an exception whose __init__ wants other
        # arguments than its args pickles fine but cannot be unpickled, which
        # would break the whole frame on the scheduler's side
        parts = P.dumps(exc, 0)
        back = pickle.loads(parts[1], buffers=parts[2:])
        if isinstance(back, BaseException):
            return exc
    except KeyboardInterrupt:
        raise
    except BaseException:
        # SystemExit from an unpickling __reduce__ included: it would end the loop
        pass
    return RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")


class Worker:
    """One worker connection: handshake, task execution, batched results."""

    def __init__(
        self,
        secret: bytes,
        slots: int = 1,
        name: str | None = None,
        parent_pid: int | None = None,
        max_frame: int = P.DEFAULT_MAX_FRAME,
        declared: Declared | None = None,
        idle_timeout: float | None = None,
        end_time: float | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.secret = secret
        #: the connection was lost after the handshake (reset, or the
        #: scheduler went silent), not ended by SHUTDOWN: worth reconnecting
        self.lost = False
        self.joined = False
        self.slots = slots
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.parent_pid = parent_pid
        self.max_frame = max_frame
        self.worker_id = -1
        self._state = "hello"
        #: the resources this worker offers (``--cores``, ``--gpus``, ...)
        self.declared = declared if declared is not None else Declared.build()
        wire = self.declared.to_wire()
        wire["cpu_ids"] = []  # the scheduler does not pin: keep the handshake small
        # AUTH's JSON: the resources, and (once connected) the data port's address
        self._hello: dict[str, Any] = {"resources": wire}
        if end_time is not None:
            self._hello["ends"] = float(end_time)  # the scheduler drains us before then
        self._joining = P.Joining(secret, slots, self.name, self._hello)
        # results that stay here (R_HELD), by request id, and the connections
        # to other workers' data ports, by address
        self._store: dict[int, Any] = {}
        self._peers: dict[str, _PeerLink] = {}
        # send-ahead (RemoteTransport.send_ahead): the tasks whose value a
        # follower will want, not yet ended; the values they left for a
        # follower still to come; the followers that came before their input ended
        self._keep: set[int] = set()
        self._kept: dict[int, Any] = {}
        self._after: dict[int, tuple[Any, ...]] = {}
        self._followers: collections.deque[tuple[tuple[Any, ...], Any]] = collections.deque()
        self._data_sock: socket.socket | None = None
        self._data_server: asyncio.AbstractServer | None = None
        # tasks that asked for resources: the free ones, the waiting tasks
        # (a heap by priority), the grants of the running ones, and the cores
        # they hold (under the pool's lock, which the slot limit shares)
        self._alloc = Allocator(self.declared)
        self._waiting: list[tuple[Any, ...]] = []
        self._wseq = 0
        self._grants: dict[int, Grant] = {}
        self._req_cores = 0
        self._rpool: ThreadPool | None = None  # the resource tasks' threads, made on demand
        self._fns: dict[int, Any] = {}
        self._fn_errors: dict[int, BaseException] = {}
        self._dur: dict[int, float] = {}  # function id -> moving average of one call, s
        self._strikes: dict[int, int] = {}  # function id -> its calls on the loop since a long one
        self._fid_floor = 0
        self._async: dict[int, asyncio.Task[Any]] = {}
        self._cancelled: set[int] = set()  # cancelled while in the pool (under its lock)
        self._in_pool: set[int] = set()  # blocking tasks put in the pool, not yet reported
        self._quick = False  # what the scheduler was last told (P.QUICK)
        self._quick_n = 0  # how many functions it had learnt then
        self._out: list[tuple[int, int, Any, str | None]] = []
        # rid -> (rank, ranks, (step, state) to restore or None), for the tasks
        # that are an MPI task's part or have a saved step to resume from
        self._ctx_info: dict[int, tuple[int, int, Any]] = {}
        self._flush_pending = False
        self._last_heard = time.monotonic()
        #: exit after this many seconds without a task in hand (None: never)
        self.idle_timeout = idle_timeout
        self._busy_at = time.monotonic()
        self._heartbeat = 1.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: P.FrameStream | None = None
        self._pool: ThreadPool | None = None
        self._done: asyncio.Future[int] | None = None
        self._timing = False
        # rid, perf_counter start, end, rid, ...: floats, so that the frame
        # carries 24 bytes per task and the scheduler unpickles no tuples
        self._times = array("d")
        self._wall_off = time.time() - perf_counter()
        self._logs: list[tuple[str, int, str, float]] = []
        self._log_lock = threading.Lock()
        self._log_handler: _Forward | None = None
        # the batch being started, for the guard to take the rest of
        self._batch: list[Any] | None = None
        self._batch_bufs: list[Any] | None = None
        self._batch_i = 0
        self._batch_pos = 0
        # the column of the batch being started (see _run_column), and the
        # place in it of the next task not started
        self._col: tuple[Any, ...] | None = None
        self._col_j = 0
        # a call on the loop (inline) that runs long: the guard thread does
        # the loop's work meanwhile, under the gate (see _rescue)
        self._gate = threading.Lock()
        self._inline_t0 = 0.0  # perf_counter() when the running inline call began, or 0
        self._raw_fd: int | None = None  # the socket the guard may write to
        self._raw_broken = False  # the guard left half a frame on the socket
        self._guard_busy = False  # the guard holds the gate and may act
        self._guard: threading.Thread | None = None
        # a guard can stand in for the loop: set once connected over plain
        # TCP (the guard cannot write into a TLS stream); MpiWorker sends
        # through its channel
        self._guard_can = False
        self._guard_stop = threading.Event()
        self._guard_wake = threading.Event()
        self._guard_idle = False
        self._sending_now = False  # _flush writes through _send_now (the guard)
        self._beats = True  # send heartbeats (MPI ranks have none)
        self._beat_at = 0.0

    async def run(
        self, host: str, port: int, ssl_ctx: ssl.SSLContext | None = None,
        tls_auto: bool = False,
    ) -> int:
        """Connect, serve until told to stop; return the process exit code.

        With ``tls_auto`` the connection is TLS and the scheduler's
        certificate must carry the key derived from the token
        (``async_wf._tls``), checked before any frame is read.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        self._pool = ThreadPool(self.slots, loop, self._on_thread_results,
                                claim=self._claim, name="async_wf-worker", owner=self)
        stream = P.FrameStream(self._on_frame, self._on_lost)
        self._stream = stream
        if tls_auto:
            from async_wf import _tls

            ssl_ctx = _tls.client_context()

        def opened(s: P.FrameStream) -> None:
            # in connection_made, before any frame: the first TASKS frame may
            # be handled before the coroutine below resumes from connecting
            assert s.transport is not None
            if tls_auto:
                try:
                    _tls.check_server(s.transport.get_extra_info("ssl_object"), self.secret)
                except _tls.TlsPinError as exc:
                    log.error("worker %s: %s", self.name, exc)
                    self._finish(1)
                    s.abort(exc)
                    return
            sock = s.transport.get_extra_info("socket")
            if ssl_ctx is None and sock is not None:
                self._raw_fd = sock.fileno()
                self._guard_can = True
            if sock is not None:
                self._open_data_port(sock.getsockname()[0])

        stream.on_open = opened
        # before connecting: the first tasks may run before the coroutine
        # resumes from connecting, and their records must be forwarded too
        self.forward_logs()
        try:
            # bounded: a SYN into a cut link is retried by the kernel for minutes
            await asyncio.wait_for(loop.create_connection(
                lambda: stream, host, port, ssl=ssl_ctx, server_hostname=host if ssl_ctx else None
            ), CONNECT_TIMEOUT)
        except BaseException:
            self.stop_forwarding()
            raise
        if self._data_sock is not None:
            self._data_server = await loop.create_server(self._data_stream, sock=self._data_sock)
        watchdog = loop.create_task(self._watch())
        try:
            return await self._done
        finally:
            self._guard_stop.set()
            self._guard_wake.set()
            self.stop_forwarding()
            watchdog.cancel()
            for t in self._async.values():
                t.cancel()
            if self._data_server is not None:
                self._data_server.close()
            for peer in self._peers.values():
                peer.close()
            # after a lost connection the queued calls belong to the
            # scheduler's past: it has queued them again elsewhere
            self._pool.close(drop_queued=self.lost)
            if self._rpool is not None:
                self._rpool.close(drop_queued=True)
            stream.close()

    def forward_logs(self, level: int | None = None) -> None:
        """Send this process's log records at ``level`` or above to the scheduler.

        The default level is ``ASYNC_WF_LOG_LEVEL`` if set, else the root
        logger's. Records of ``async_wf.worker`` itself (the connection's
        own troubles) stay local: they matter most when there is no
        connection to send them on.
        """
        if self._log_handler is not None:
            return
        if level is None:
            env = os.environ.get(P.LOG_LEVEL_ENV)
            level = logging.getLevelName(env.upper()) if env else None
            if not isinstance(level, int):
                level = logging.getLogger().getEffectiveLevel()
        h = self._log_handler = _Forward(self, level)
        # first, so that it marks the records it takes before the local
        # handlers see them (see run_from_args)
        logging.getLogger().handlers.insert(0, h)

    def stop_forwarding(self) -> None:
        """Stop forwarding log records (the connection is over)."""
        h = self._log_handler
        if h is not None:
            self._log_handler = None
            logging.getLogger().removeHandler(h)

    def _queue_log(self, item: tuple[str, int, str, float]) -> None:
        # any thread (a task in a slot): the loop sends the batch
        with self._log_lock:
            self._logs.append(item)
            first = len(self._logs) == 1
        loop = self._loop
        if first and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._send_logs)

    def _send_logs(self) -> None:
        with self._log_lock:
            items = self._logs
            self._logs = []
        if not items:
            return
        stream = self._stream
        if stream is not None and self._state == "ready":
            stream.send(P.encode(P.LOG, items))
            return
        # not joined yet: kept (the most recent 1000) until the handshake ends
        with self._log_lock:
            self._logs[:0] = items
            del self._logs[:-_LOG_KEEP]

    def _finish(self, code: int) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(code)

    # ------------------------------------------------------------ connection
    def _on_lost(self, stream: P.FrameStream, exc: BaseException | None) -> None:
        if isinstance(exc, P.ProtocolError):
            log.error("worker %s: %s", self.name, exc)
            self._finish(1)
        elif self._state != "ready":
            # a scheduler closes the connection of a worker that fails its
            # challenge: that is a failure to start, not a clean end
            log.error("worker %s: the scheduler closed the connection during the handshake "
                      "(wrong token?)", self.name)
            self._finish(1)
        else:
            if self._done is not None and not self._done.done():
                self.lost = True  # not told SHUTDOWN first
            self._finish(0)

    def _on_frame(self, kind: int, payload: memoryview, buffers: list[Any]) -> None:
        self._last_heard = time.monotonic()
        stream = self._stream
        assert stream is not None
        if self._state == "ready":
            if kind == P.TASKS:
                self._run_batch(P.loads(payload, buffers), buffers)
            elif kind == P.HEARTBEAT:
                pass
            elif kind == P.CANCEL:
                self._cancel(P.loads(payload, buffers))
            elif kind == P.STEAL:
                self._give_back(P.loads(payload, buffers))
            elif kind == P.FETCH:
                self._serve(stream, P.loads(payload, buffers))
            elif kind == P.FREE:
                self._free(P.loads(payload, buffers))
            elif kind == P.SHUTDOWN:
                self._finish(0)
            else:
                raise P.ProtocolError(f"unexpected {P.KIND_NAMES[kind]} frame from scheduler")
        elif self._state == "hello":
            stream.send(self._joining.hello(kind, payload))
            self._state = "welcome"
        elif self._state == "welcome":
            self.worker_id, self._heartbeat = self._joining.welcome(kind, payload)
            self._state = "ready"
            self.joined = True
            self._send_logs()  # records made before the handshake ended
            stream.decoder.max_frame = self.max_frame
            log.info("worker %s joined as #%d", self.name, self.worker_id)

    async def _watch(self) -> None:
        stream = self._stream
        assert stream is not None
        while True:
            await asyncio.sleep(self._heartbeat)
            if self._state == "ready":
                stream.send(P.raw_frame(P.HEARTBEAT))
            silent = time.monotonic() - max(self._last_heard, stream.last_activity)
            if silent > max(10 * self._heartbeat, 10.0):
                log.error("worker %s: scheduler silent for %.0f s, dropping the connection",
                          self.name, silent)
                self.lost = self._state == "ready"
                self._finish(1)
                return
            if self.idle_timeout is not None and self._state == "ready":
                now = time.monotonic()
                if self._in_pool or self._async or self._grants or self._waiting:
                    self._busy_at = now
                elif now - self._busy_at > self.idle_timeout:
                    log.info("worker %s: no task for %g s (--idle-timeout), exiting",
                             self.name, self.idle_timeout)
                    self._finish(0)
                    return
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.error("worker %s: parent process %d is gone, exiting", self.name,
                          self.parent_pid)
                self._finish(1)
                return

    # ----------------------------------------------------------------- tasks
    def _run_batch(self, msg: Any, buffers: list[Any]) -> None:
        new_fns, batch, floor, flags = msg
        self._busy_at = time.monotonic()
        self._timing = bool(flags & P.WANT_TIMES)
        for fid, blob in new_fns:
            try:
                self._fns[fid] = pickle.loads(blob)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                # SystemExit included: raised out of the frame handler it
                # would end the worker, and the scheduler would resend the
                # task to the next worker
                self._fn_errors[fid] = RemoteError(
                    f"the task function could not be loaded on worker {self.name}: "
                    f"{type(exc).__name__}: {exc}"
                )
        # the items left are the guard's to take (see _rescue) while a call
        # of this batch runs long on the loop: it reads where to go on in
        # _batch_i and _batch_pos, set before each such call
        self._batch = batch
        self._batch_bufs = buffers
        loop = self._loop
        pool = self._pool
        assert loop is not None and pool is not None
        spent = 0.0
        pos = 0
        i = 0
        n = len(batch)
        while i < n:
            item = batch[i]
            i += 1
            if len(item) == 4:
                spent = self._run_column(item, i, pos, spent)
                i = self._batch_i  # the guard may have taken some
                pos = self._batch_pos
                continue
            start = pos
            pos += item[3]
            loaded = self._load(item, buffers, start)
            if loaded is None:
                continue
            rid, fid, kind, fn, args, kwargs, extra = loaded
            if kind == P.K_ASYNC:
                self._async[rid] = loop.create_task(self._run_async(rid, fn, args, kwargs))
            elif kind == P.K_THREAD:
                if spent < INLINE_BUDGET and self._learnt_quick(fid):
                    self._batch_i = i
                    self._batch_pos = pos
                    spent += self._run_inline(rid, fid, fn, args, kwargs)
                    i = self._batch_i  # the guard may have taken some
                    pos = self._batch_pos
                    continue
                self._in_pool.add(rid)
                pool.put((rid, fid), fn, args, kwargs, 0 if extra is None else extra[1])
            elif kind == P.K_INLINE:
                self._batch_i = i
                self._batch_pos = pos
                spent += self._run_inline(rid, -1, fn, args, kwargs)
                i = self._batch_i
                pos = self._batch_pos
            elif kind == P.K_RTHREAD or kind == P.K_RASYNC:
                self._queue_resource(rid, kind, fn, args, kwargs, extra)
            else:
                self._start_part(kind, rid, fid, fn, args, kwargs, extra)
        self._batch = None
        self._batch_bufs = None
        # ran some on the loop and none waits in a thread: quick (see P.QUICK);
        # told again when it has learnt another function since
        quick = not self._in_pool if spent > 0 else (False if self._in_pool else self._quick)
        if quick != self._quick or (quick and len(self._dur) != self._quick_n):
            self._quick = quick
            self._quick_n = len(self._dur)
            fids = [f for f, d in self._dur.items() if d < INLINE_BELOW] if quick else []
            stream = self._stream
            if stream is not None:
                stream.send(P.encode(P.QUICK, fids))
        if floor > self._fid_floor:
            # the scheduler dropped its cache: ids below floor are never sent again
            self._fid_floor = floor
            for table in (self._fns, self._fn_errors, self._dur):
                for fid in [f for f in table if f < floor]:
                    del table[fid]

    def _run_column(self, item: tuple[Any, ...], i: int, pos: int, spent: float) -> float:
        """Start the tasks of one column (see ``protocol.TASKS``); return ``spent`` plus
        the seconds its calls took on the loop.

        ``i`` and ``pos`` are where the batch goes on after it: the guard
        reads them (and the column's own place, ``_col_j``) if a call here
        runs long, and moves them past what it takes.

        Raises:
            ProtocolError: the item is not (rid, function id, kind, [args, ...]).
        """
        rid0, fid, kind, col = item
        if type(rid0) is not int or type(fid) is not int or type(col) is not list:
            raise P.ProtocolError(f"malformed column of tasks: {item!r:.200}")
        if kind != P.K_THREAD and kind != P.K_ASYNC:
            raise P.ProtocolError(f"a column of tasks of wire kind {kind!r}")
        self._batch_i = i
        self._batch_pos = pos
        n = len(col)
        fn = self._fns.get(fid)
        if fn is None:
            err = self._fn_errors.get(fid) or RemoteError(f"unknown function id {fid}")
            for j in range(n):
                self._report(rid0 + j, P.R_ERROR, err, None)
            return spent
        if kind == P.K_ASYNC:
            loop = self._loop
            assert loop is not None
            tasks = self._async
            for j in range(n):
                rid = rid0 + j
                tasks[rid] = loop.create_task(self._run_async(rid, fn, col[j], _NO_KWARGS))
            return spent
        pool = self._pool
        assert pool is not None
        self._col = item
        j = 0
        while j < n:
            rid = rid0 + j
            j += 1
            if spent < INLINE_BUDGET and self._learnt_quick(fid):
                self._col_j = j
                spent += self._run_inline(rid, fid, fn, col[j - 1], _NO_KWARGS)
                j = self._col_j  # the guard may have taken the rest
                continue
            self._in_pool.add(rid)
            pool.put((rid, fid), fn, col[j - 1], _NO_KWARGS, 0)
        self._col = None
        return spent

    def _load(self, item: tuple[Any, ...], buffers: list[Any],
              start: int) -> tuple[int, int, int, Any, Any, Any, Any] | None:
        """One TASKS item made ready to run: (rid, fid, kind, fn, args, kwargs, extra).

        None when it cannot run here (its arguments or its function failed
        to load): its error is reported already, and only it fails.
        """
        rid, fid, kind, nbufs, blob, extra = item
        try:
            args, kw = P.unpack(blob, buffers, start, nbufs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self._unloadable(rid, exc)
            return None
        if extra is not None and kind != P.K_MPI:
            restore = extra[0]
            if restore is not None:
                self._ctx_info[rid] = (0, 1, restore)  # a saved step to restore
        fn = self._fns.get(fid)
        if fn is None:
            err = self._fn_errors.get(fid) or RemoteError(f"unknown function id {fid}")
            self._report(rid, P.R_ERROR, err, None)
            return None
        loaded = rid, fid, kind, fn, args, kw if kw is not None else _NO_KWARGS, extra
        if extra is not None and kind < P.K_MPI and len(extra) == 5:
            # (restore, priority, refs, keep, after): send-ahead
            if extra[3]:
                self._keep.add(rid)  # a follower will want its value
            after = extra[4]
            if after:
                value = self._kept.pop(after, _MISSING)
                if value is _MISSING:
                    if after in self._keep:
                        self._after[after] = loaded  # started when its input ends
                    else:
                        # its input failed here, or was not sent here after all
                        self._report(rid, P.R_NOINPUT, [after], None)
                    return None
                loaded = self._with_ahead(loaded, value)
            if extra[2] is None:
                return loaded
        if extra is not None and kind != P.K_MPI and len(extra) in (3, 5):
            # inputs that stayed on workers: this one's own are at hand, the
            # others are fetched first (and the task starts when they are here)
            refs: list[HeldRef] = extra[2] if kind < P.K_MPI else extra[-1]
            missing = [r for r in refs
                       if not r.inline and not (r.wid == self.worker_id and r.key in self._store)]
            if missing:
                loop = self._loop
                assert loop is not None
                # through the loop: the guard thread loads tasks too (_hand_over_rest)
                loop.call_soon_threadsafe(self._spawn_fetch, loaded, missing)
                return None
            return self._with_inputs(loaded, {})
        return loaded

    def _with_inputs(self, loaded: tuple[Any, ...], fetched: dict[int, Any]) -> tuple[Any, ...]:
        """``loaded`` with each ``HeldRef`` in its arguments replaced by the value."""
        store = self._store

        def value(r: HeldRef) -> Any:
            if r.inline:
                return r.value
            got = fetched.get(r.key, _MISSING)
            return store[r.key] if got is _MISSING else got

        rid, fid, kind, fn, args, kw, extra = loaded
        args = replace_in(args, HeldRef, value)
        if kw:
            kw = replace_in(kw, HeldRef, value)
        return rid, fid, kind, fn, args, kw, extra

    @staticmethod
    def _with_ahead(loaded: tuple[Any, ...], value: Any) -> tuple[Any, ...]:
        """``loaded`` (a task sent ahead) with its input's value in place of the marker."""
        rid, fid, kind, fn, args, kw, extra = loaded

        def put(_: AheadInput) -> Any:
            return value

        args = replace_in(args, AheadInput, put)
        if kw:
            kw = replace_in(kw, AheadInput, put)
        return rid, fid, kind, fn, args, kw, extra

    def _start_followers(self) -> None:
        """Start the tasks sent ahead whose input ended here, and those that follow them.

        A quick one runs here on the loop; its own follower, if it came,
        is appended as it ends, and runs in this same call.
        """
        todo = self._followers
        spent = 0.0
        while todo:
            if self._stream is None:
                todo.clear()
                return
            if spent >= INLINE_BUDGET:
                # let frames in (a CANCEL, a SHUTDOWN) before going on
                loop = self._loop
                assert loop is not None
                loop.call_soon(self._start_followers)
                return
            loaded, value = todo[0]
            rid, fid, kind, fn, args, kw, extra = self._with_ahead(loaded, value)
            if kind == P.K_THREAD and self._learnt_quick(fid):
                # popped after: the follower this one's end appends must not
                # schedule a second call of this method
                spent += self._run_inline(rid, fid, fn, args, kw)
                todo.popleft()
                continue
            todo.popleft()
            self._start_loaded((rid, fid, kind, fn, args, kw, extra))

    def _spawn_fetch(self, loaded: tuple[Any, ...], refs: list[HeldRef]) -> None:
        loop = self._loop
        assert loop is not None
        loop.create_task(self._fetch_then_start(loaded, refs))

    async def _fetch_then_start(self, loaded: tuple[Any, ...], refs: list[HeldRef]) -> None:
        """Fetch the inputs of a task from the workers that hold them, then start it."""
        rid = loaded[0]
        # one request per holder, split so that no answer exceeds a frame
        budget = self.max_frame - P.FRAME_MARGIN
        asks: list[tuple[str, list[int]]] = []
        last: dict[str, int] = {}  # addr -> index in asks of its open request
        sizes: list[int] = []
        for r in refs:
            i = last.get(r.addr, -1)
            if i < 0 or sizes[i] + r.size > budget:
                i = last[r.addr] = len(asks)
                asks.append((r.addr, []))
                sizes.append(0)
            asks[i][1].append(r.key)
            sizes[i] += r.size
        fetched: dict[int, Any] = {}
        lost: list[int] = []
        for addr, keys in asks:
            try:
                got = await self._peer(addr).fetch(keys)
            except (OSError, P.ProtocolError, EOFError) as exc:
                log.info("worker %s: inputs %s at %s unreachable: %s", self.name, keys, addr, exc)
                self._peers.pop(addr, None)
                lost += keys
                continue
            for k, v in got.items():
                if isinstance(v, KeyError):
                    lost.append(k)
                else:
                    fetched[k] = v
        count_fetched(sum(r.size for r in refs if r.key in fetched))
        if lost:
            self._report(rid, P.R_NOINPUT, lost, None)
            return
        self._start_loaded(self._with_inputs(loaded, fetched))

    def _start_loaded(self, loaded: tuple[Any, ...]) -> None:
        """Start a task outside its batch (its inputs were fetched meanwhile)."""
        rid, fid, kind, fn, args, kwargs, extra = loaded
        loop = self._loop
        pool = self._pool
        assert loop is not None and pool is not None
        if kind == P.K_ASYNC:
            self._async[rid] = loop.create_task(self._run_async(rid, fn, args, kwargs))
        elif kind == P.K_RTHREAD or kind == P.K_RASYNC:
            self._queue_resource(rid, kind, fn, args, kwargs, extra)
        elif kind == P.K_INLINE:
            self._run_inline(rid, -1, fn, args, kwargs)
        else:
            self._in_pool.add(rid)
            pool.put((rid, fid), fn, args, kwargs, 0 if extra is None else extra[1])

    def _peer(self, addr: str) -> _PeerLink:
        link = self._peers.get(addr)
        if link is None or link.lost:
            link = self._peers[addr] = _PeerLink(self, addr)
        return link

    # ------------------------------------------------------- the data port
    def _open_data_port(self, host: str) -> None:
        """Listen for other workers' FETCH on the address the scheduler reached us from.

        That address is on a network the scheduler shares with us, which is
        where the other workers are too; its port is free (0). Said in AUTH.
        """
        with contextlib.suppress(OSError):
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen(64)
            sock.setblocking(False)
            self._data_sock = sock
            port = sock.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            self._hello["data"] = f"tcp://{shown}:{port}"

    def _data_stream(self) -> P.FrameStream:
        def on_join(stream: P.FrameStream, challenge: P.Challenge, _slots: int, _pid: int,
                    _name: str) -> tuple[Any, Any]:
            challenge.welcome(0, 0.0, self.max_frame)

            def on_frame(kind: int, payload: memoryview, buffers: list[Any]) -> None:
                if kind != P.FETCH:
                    raise P.ProtocolError(f"a data port takes FETCH, got {P.KIND_NAMES[kind]}")
                self._serve(stream, P.loads(payload, buffers))

            return on_frame, lambda exc: None

        return P.accepting_stream(self.secret, lambda: 10.0, on_join, lambda s, e: None)

    def _serve(self, stream: P.FrameStream, keys: Any) -> None:
        """Answer FETCH ``keys`` with the values held here (DATA)."""
        bufs: list[Any] = []
        items = data_items(self._store, keys, bufs)
        stream.send(P.encode(P.DATA, items, P.DEFAULT_COMPRESS_MIN, bufs))

    def _free(self, keys: Any) -> None:
        if type(keys) is not list:
            raise P.ProtocolError(f"FREE wants a list of keys, got {keys!r:.80}")
        for k in keys:
            self._store.pop(k, None)
            self._kept.pop(k, None)
            self._keep.discard(k)

    def _unloadable(self, rid: int, exc: BaseException) -> None:
        # this task alone: e.g. an argument's module is missing here
        self._report(rid, P.R_ERROR, RemoteError(
            f"the arguments of the task could not be loaded on worker {self.name}: "
            f"{type(exc).__name__}: {exc}"
        ), traceback.format_exc())

    def _hand_over_rest(self) -> None:
        """Put the batch's blocking tasks not yet started in the pool (the guard).

        Up to the first task of another kind: those need the loop, which
        goes on with them after the long call.
        """
        batch = self._batch
        buffers = self._batch_bufs
        pool = self._pool
        if batch is None or buffers is None or pool is None:
            return
        col = self._col
        if col is not None:
            # the rest of the column whose call runs long
            self._pool_column(col, self._col_j)
            self._col_j = len(col[3])
        while self._batch_i < len(batch) and batch[self._batch_i][2] == P.K_THREAD:
            item = batch[self._batch_i]
            self._batch_i += 1
            if len(item) == 4:
                rid0, fid, _kind, args = item
                if type(rid0) is not int or type(args) is not list or fid not in self._fns:
                    # malformed, or its function failed to load: the loop
                    # reports it (or drops the connection) after the long call
                    self._batch_i -= 1
                    return
                self._pool_column(item, 0)
                continue
            start = self._batch_pos
            self._batch_pos = start + item[3]
            loaded = self._load(item, buffers, start)
            if loaded is None:
                continue
            rid, fid, _kind, fn, args, kwargs, extra = loaded
            self._in_pool.add(rid)
            pool.put((rid, fid), fn, args, kwargs, 0 if extra is None else extra[1])

    def _pool_column(self, col: tuple[Any, ...], j: int) -> None:
        """Put the tasks of column ``col`` from its ``j``-th on in the pool (the guard)."""
        pool = self._pool
        assert pool is not None
        rid0, fid, _kind, args = col
        fn = self._fns[fid]
        for k in range(j, len(args)):
            self._in_pool.add(rid0 + k)
            pool.put((rid0 + k, fid), fn, args[k], _NO_KWARGS, 0)

    # ------------------------------------------------------ resource tasks
    def _queue_resource(self, rid: int, kind: int, fn: Any, args: Any, kwargs: Any,
                        extra: Any) -> None:
        """Queue a task that asked for resources; it starts once they are free here.

        The scheduler sends such a task only where its accounting says it
        fits, so it normally starts at once; the queue covers what that
        accounting cannot see (slot tasks still finishing, results on the
        wire), and nothing here ever runs beyond what this worker declared.
        """
        try:
            _restore, wire, pin, priority = extra[:4]
            req = Request.from_wire(wire)
            if type(pin) is not bool or type(priority) is not int:
                raise TypeError(f"pin {pin!r} and priority {priority!r}")
        except (TypeError, ValueError) as exc:
            self._report(rid, P.R_ERROR, RemoteError(
                f"a malformed resource request reached worker {self.name}: {exc}"), None)
            return
        if not self.declared.fits(req):
            self._report(rid, P.R_ERROR, RemoteError(
                f"worker {self.name} has {self.declared.describe()}; it can never run a "
                f"task asking for {req.describe()} ({self.declared.shortfall(req)})"), None)
            return
        self._wseq += 1
        heapq.heappush(self._waiting, (-priority, self._wseq, rid, kind, fn, args, kwargs,
                                       req, pin))
        self._start_waiting()

    def _slot_limit(self, head_cores: int) -> int:
        """How many slot tasks may run beside the resource tasks (pool lock held).

        Slot tasks count as one core each once a resource task holds cores
        here or waits for them; otherwise the slots are as many as asked.
        """
        taken = self._req_cores + head_cores
        if not taken:
            return self.slots
        return max(0, min(self.slots, int(self.declared.amounts["cores"]) - taken))

    def _start_waiting(self) -> None:
        """Start the waiting resource tasks that fit now, best priority first."""
        pool = self._pool
        loop = self._loop
        assert pool is not None and loop is not None
        waiting = self._waiting
        cores = int(self.declared.amounts["cores"])
        while waiting:
            _p, _s, rid, kind, fn, args, kwargs, req, pin = waiting[0]
            k = req.cores
            with pool.lock:
                grant = None
                if cores - self._req_cores - pool.running >= k:
                    grant = self._alloc.try_take(req)
                if grant is None:
                    # hold new slot tasks back until the head fits
                    pool.set_limit(self._slot_limit(k))
                    return
                self._req_cores += k
                pool.set_limit(self._slot_limit(0))
            heapq.heappop(waiting)
            self._grants[rid] = grant
            if kind == P.K_RASYNC:
                self._async[rid] = loop.create_task(self._run_async(rid, fn, args, kwargs))
                continue
            rpool = self._rpool
            if rpool is None:
                # threads of their own, kept for the next ones: starting a thread
                # per task blocked the loop until the kernel ran it (ms under load)
                rpool = self._rpool = ThreadPool(RESOURCE_THREADS, loop, self._on_granted_results,
                                                 name="async_wf-res", owner=self)
            if pin:
                fn = pinned(fn, grant.cpu_ids)
            rpool.put(rid, fn, args, kwargs)

    def _on_granted_results(self, items: list[Outcome]) -> None:
        """Outcomes of resource tasks from their threads: release, then report each."""
        times = self._times if self._timing else None
        for rid, status, value, took, t0 in items:
            if times is not None:
                times.extend((rid, t0, t0 + took))
            self._release_grant(rid)
            if status == OK:
                self._report(rid, P.R_OK, value, None)
            else:
                exc, tb = value
                self._report(rid, P.R_ERROR, exc, tb)

    def _release_grant(self, rid: int) -> None:
        """The attempt ``rid`` is over: its resources are free; start who waits."""
        grant = self._grants.pop(rid, None)
        if grant is None:
            return
        pool = self._pool
        assert pool is not None
        with pool.lock:
            self._alloc.give(grant)
            self._req_cores -= grant.request.cores
            pool.set_limit(self._slot_limit(0))
        self._start_waiting()

    def _give_back(self, n: Any) -> None:
        """STEAL: return up to ``n`` queued slot tasks that no thread has started."""
        if type(n) is not int or n < 0:
            raise P.ProtocolError(f"STEAL wants a count of tasks, got {n!r}")
        pool = self._pool
        assert pool is not None
        for rid, _fid in pool.take_back(n, lambda token: token[0] in self._cancelled):
            self._in_pool.discard(rid)
            self._report(rid, P.R_RETURNED, None, None)

    def _start_part(self, kind: int, rid: int, fid: int, fn: Any, args: Any, kwargs: Any,
                    extra: Any) -> None:
        """Start this worker's part of a task run by several workers at once.

        A process worker runs no such task; MPI worker ranks run K_MPI ones
        (``async_wf.mpi.MpiWorker``).
        """
        what = "an mpi=k task" if kind == P.K_MPI else f"a task of wire kind {kind}"
        self._report(rid, P.R_ERROR, RemoteError(
            f"worker {self.name} is not an MPI rank and cannot run {what}"
        ), None)

    def _run_inline(self, rid: int, fid: int, fn: Any, args: Any, kwargs: Any) -> float:
        """Run ``fn`` on the loop thread, the guard watching; return the seconds it took."""
        if self._guard is None and self._guard_can:
            self._start_guard()
        t0 = perf_counter()
        self._inline_t0 = t0
        if self._guard_idle:
            self._guard_wake.set()
        mark_thread(self, rid)
        error: BaseException | None = None
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            error = exc
            tb = traceback.format_exc()
        mark_thread(None, None)
        self._inline_t0 = 0.0
        if self._guard_busy:
            # wait for the guard to finish its rescue before this thread
            # touches the worker's state or the socket again
            with self._gate:
                pass
        if error is None:
            self._report(rid, P.R_OK, value, None)
        elif isinstance(error, KeyboardInterrupt):
            raise error
        else:
            self._report(rid, P.R_ERROR, error, tb)
        took = perf_counter() - t0
        if self._timing:
            self._times.extend((rid, t0, t0 + took))
        if fid >= 0:
            strikes = self._strikes
            if took > INLINE_NEVER:
                if fid in strikes:
                    # twice within a few calls: the function, not the machine.
                    # Never on the loop again (inf stays inf in the average);
                    # calls in a thread only feed the average: theirs include
                    # GIL waits.
                    del strikes[fid]
                    self._dur[fid] = math.inf
                else:
                    strikes[fid] = 0  # once: maybe a preemption (see INLINE_STRIKE_WINDOW)
            else:
                if strikes:
                    n = strikes.get(fid)
                    if n is not None:
                        if n + 1 >= INLINE_STRIKE_WINDOW:
                            del strikes[fid]  # forgotten
                        else:
                            strikes[fid] = n + 1
                self._learn(fid, took)
        if took > self._heartbeat:
            # frames from the scheduler wait unread behind the call: that
            # silence is this worker's, not the scheduler's (see _watch)
            self._last_heard = time.monotonic()
        if self._raw_broken:
            stream = self._stream
            if stream is not None:
                stream.abort(P.ProtocolError(
                    "a frame could not be written whole during a long call on the loop"))
        return took

    def _start_guard(self) -> None:
        self._guard = threading.Thread(target=self._watch_inline, name="async_wf-guard",
                                       daemon=True)
        self._guard.start()

    def _watch_inline(self) -> None:
        """The guard's thread: rescue what a long call on the loop would hold up.

        Every GUARD_TICK while calls run on the loop (asleep after a second
        without one), it looks at the call running there; once that call has
        run GUARD_TICK, it takes over under the gate (see _rescue).
        """
        stop = self._guard_stop
        last_seen = perf_counter()
        failed = 0.0
        while not stop.is_set():
            t0 = self._inline_t0
            now = perf_counter()
            if t0:
                last_seen = now
                if now - t0 >= GUARD_TICK and t0 != failed:
                    try:
                        self._rescue(t0)
                    except Exception:
                        # a bug here must not end the guard for the worker's
                        # life, nor log 50 times a second: that call is left be
                        failed = t0
                        log.exception("worker %s: the guard failed", self.name)
            elif now - last_seen > 1.0:
                self._guard_idle = True
                if not self._inline_t0:  # see _run_inline: it wakes us if it saw idle
                    self._guard_wake.wait()
                self._guard_wake.clear()
                self._guard_idle = False
                last_seen = perf_counter()
                continue
            stop.wait(GUARD_TICK)

    def _rescue(self, t0: float) -> None:
        """Under the gate, while the call begun at ``t0`` still runs on the loop.

        The loop's thread is inside that call: it touches none of the
        worker's state until it has passed the gate (``_run_inline``). So
        this thread may do the loop's work meanwhile: hand the rest of the
        batch to the slot threads, take their outcomes, send the results
        that wait, and the heartbeat.
        """
        with self._gate:
            # busy before the check: the loop's thread clears _inline_t0
            # and then reads _guard_busy, so either it waits at the gate, or
            # the check below sees the call ended and does nothing
            self._guard_busy = True
            try:
                if self._inline_t0 != t0 or self._raw_broken:
                    return
                pending = self._flush_pending
                # _report must not schedule a flush from this thread
                self._flush_pending = True
                try:
                    self._hand_over_rest()
                    pool = self._pool
                    if pool is not None:
                        items = pool.take_now()
                        if items:
                            self._on_thread_results(items)
                    if self._out and self._can_send_now():
                        self._sending_now = True
                        try:
                            self._flush()
                        finally:
                            self._sending_now = False
                finally:
                    self._flush_pending = pending
                    if self._out and not pending:
                        # not sent (the socket was not free): the loop sends
                        # them once the call is over
                        self._flush_pending = True
                        loop = self._loop
                        assert loop is not None
                        loop.call_soon_threadsafe(self._flush)
                now = perf_counter()
                if self._beats and now - t0 >= self._heartbeat / 2 \
                        and now - self._beat_at >= self._heartbeat / 2 \
                        and self._can_send_now():
                    self._beat_at = now
                    self._send_now(P.raw_frame(P.HEARTBEAT))
            finally:
                self._guard_busy = False

    def _can_send_now(self) -> bool:
        """True if the guard may write a frame now: no bytes of the transport's wait."""
        stream = self._stream
        tr = stream.transport if stream is not None else None
        return not (self._raw_fd is None or tr is None or stream is None or stream.closed
                    or tr.is_closing() or tr.get_write_buffer_size())

    def _send_now(self, parts: list[Any]) -> None:
        """Write one frame straight to the socket (the guard, under the gate).

        Only after ``_can_send_now``: nothing of the transport's is queued,
        so the frame goes whole after what it wrote. Half a frame left when
        the socket stays full for 5 heartbeats sets ``_raw_broken``: the
        connection is then dropped.
        """
        fd = self._raw_fd
        stream = self._stream
        assert fd is not None and stream is not None
        data = memoryview(b"".join(parts))
        stream.bytes_out += len(data)
        deadline = time.monotonic() + 5 * self._heartbeat
        while data:
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                return  # the connection is gone: the loop sees it after the call
            data = data[n:]
            if data:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._raw_broken = True
                    return
                select.select([], [fd], [], left)

    def _learnt_quick(self, fid: int) -> bool:
        """Whether function ``fid`` may run on the loop now: learnt quick, a guard can
        stand in for the loop (not over TLS), and no coroutine runs here."""
        d = self._dur.get(fid)
        return d is not None and d < INLINE_BELOW and self._guard_can and not self._async

    def _learn(self, fid: int, took: float) -> None:
        d = self._dur.get(fid)
        self._dur[fid] = took if d is None else 0.8 * d + 0.2 * took

    async def _run_async(self, rid: int, fn: Any, args: Any, kwargs: Any) -> None:
        mark_coroutine(self, rid)
        t0 = perf_counter() if self._timing else 0.0
        try:
            value = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            self._report(rid, P.R_CANCELLED, None, None)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            # SystemExit included: a task calling sys.exit() fails, the worker goes on
            self._report(rid, P.R_ERROR, exc, traceback.format_exc())
        else:
            self._report(rid, P.R_OK, value, None)
        finally:
            self._async.pop(rid, None)
            if self._timing:
                self._times.extend((rid, t0, perf_counter()))
            if self._grants:
                self._release_grant(rid)

    def task_context(self, token: Any) -> TaskContext:
        """The context of the task ``token`` (its rid, or (rid, function id)) running here.

        Its saves go to the scheduler in SAVE frames; what it restores came
        with the task.
        """
        rid = token[0] if type(token) is tuple else token
        rank, nranks, restore = self._ctx_info.get(rid, (0, 1, None))
        loop = self._loop
        assert loop is not None

        def send(step: int, blob: bytes) -> None:
            stream = self._stream
            if stream is not None:
                stream.send(P.encode(P.SAVE, (rid, step, blob)))

        def saver(step: int, blob: bytes) -> None:
            # waits until the frame is handed to the socket, so that a task
            # that dies right after a save has still sent it
            call_on_loop(loop, send, step, blob)

        return TaskContext(rank, nranks, lambda: restore, saver, self._grants.get(rid))

    def _claim(self, token: tuple[int, int]) -> bool:
        return token[0] not in self._cancelled

    def _cancel(self, rids: list[int]) -> None:
        pool = self._pool
        assert pool is not None
        for rid in rids:
            t = self._async.get(rid)
            if self._after and t is None:
                after = next((k for k, v in self._after.items() if v[0] == rid), None)
                if after is not None:
                    del self._after[after]  # sent ahead, its input not ended yet
                    self._report(rid, P.R_CANCELLED, None, None)
                    continue
            if t is not None:
                t.cancel()
            elif self._waiting and any(item[2] == rid for item in self._waiting):
                self._waiting = [item for item in self._waiting if item[2] != rid]
                heapq.heapify(self._waiting)
                self._report(rid, P.R_CANCELLED, None, None)
                self._start_waiting()  # the slot limit may have held back for it
            elif rid in self._in_pool:  # not yet reported: skip it if not started
                with pool.lock:
                    self._cancelled.add(rid)

    def _on_thread_results(self, items: list[Outcome]) -> None:
        pool = self._pool
        assert pool is not None
        times = self._times if self._timing else None
        for (rid, fid), status, value, took, t0 in items:
            self._in_pool.discard(rid)
            if times is not None and status != SKIPPED:
                times.extend((rid, t0, t0 + took))
            if rid in self._cancelled:
                with pool.lock:
                    self._cancelled.discard(rid)
            if status == OK:
                self._learn(fid, took)
                self._report(rid, P.R_OK, value, None)
            elif status == ERROR:
                self._learn(fid, took)
                exc, tb = value
                self._report(rid, P.R_ERROR, exc, tb)
            else:  # SKIPPED: cancelled before a slot took it
                self._report(rid, P.R_CANCELLED, None, None)

    def _report(self, rid: int, status: int, value: Any, tb: str | None) -> None:
        if self._ctx_info:
            self._ctx_info.pop(rid, None)
        if self._keep and rid in self._keep:
            self._keep.discard(rid)
            follower = self._after.pop(rid, None)
            if status == P.R_OK:
                if follower is not None:
                    # started before this result is flushed: a chain's quick
                    # links run back to back and their results share a frame
                    self._followers.append((follower, value))
                    if len(self._followers) == 1:
                        loop = self._loop
                        assert loop is not None
                        loop.call_soon(self._start_followers)
                else:
                    kept = self._kept
                    if len(kept) >= KEPT_MAX:
                        # a follower that was never sent: the oldest goes
                        del kept[next(iter(kept))]
                    kept[rid] = value
            elif follower is not None:
                # it ended without a value: its follower cannot run (nor its own)
                self._report(follower[0], P.R_NOINPUT, [rid], None)
        if status == P.R_ERROR:
            # checked one by one (errors are rare): one exception that cannot
            # make the round trip must not break the frame of all the others
            value = portable_exception(value)
        self._out.append((rid, status, value, tb))
        if not self._flush_pending:
            self._flush_pending = True
            loop = self._loop
            assert loop is not None
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        out = self._out
        self._out = []
        stream = self._stream
        if not out or stream is None:
            return
        budget = self.max_frame - P.FRAME_MARGIN
        bufs: list[Any] = []
        items: list[tuple[Any, ...]] = []
        size = 0
        # small scalar values go in columns, in the frame's own pickle (see
        # protocol.TASKS); not where keep_min is so small that they would stay here
        keep = self._joining.keep_min
        columns = not keep or keep > 1024
        crids: list[int] | None = None
        cvals: list[Any] = []
        scalar_cost = P.scalar_cost
        for rid, status, value, tb in out:
            if status == P.R_OK and columns:
                n = scalar_cost(value)
                if n:
                    if items and size + n > budget:
                        self._send_results(stream, items, bufs, last=False)
                        bufs, items, size, crids = [], [], 0, None
                    if crids is None:
                        crids, cvals = [], []
                        items.append((crids, cvals))
                    crids.append(rid)
                    cvals.append(value)
                    size += n + 10
                    continue
            crids = None
            n0 = len(bufs)
            try:
                # each result in a blob of its own, so that one the scheduler
                # cannot unpickle costs that task, not the connection
                blob = P.pack(value, bufs) if status != P.R_CANCELLED else b""
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                # SystemExit from a __reduce__ too: that task fails, the worker stays
                del bufs[n0:]
                status = P.R_ERROR
                tb = traceback.format_exc()
                msg = f"the task's result could not be pickled: {type(exc).__name__}: {exc}"
                try:
                    # of the original type where that type travels (TypeError,
                    # PicklingError), as concurrent.futures reports it
                    blob = P.pack(retyped(exc, msg, RemoteError), bufs)
                except Exception:
                    del bufs[n0:]
                    blob = P.pack(RemoteError(msg), bufs)
            n = P.packed_size(blob, bufs, n0)
            if keep and status == P.R_OK and keep <= n <= budget:
                # large: it stays here, the scheduler learns its size and type
                del bufs[n0:]
                self._store[rid] = value
                status = P.R_HELD
                blob = P.pack((n, type(value).__qualname__), bufs)
                n = P.packed_size(blob, bufs, n0)
            if n > budget:
                # the scheduler would take the frame for an attack and drop
                # this worker: fail the one task instead
                del bufs[n0:]
                status, tb = P.R_ERROR, None
                blob = P.pack(RemoteError(P.too_large("result", None, n, self.max_frame)), bufs)
                n = P.packed_size(blob, bufs, n0)
            if items and size + n > budget:
                # results that fit one by one but not together: one frame each batch
                self._send_results(stream, items, bufs[:n0], last=False)
                del bufs[:n0]
                items, size = [], 0
                n0 = 0
            items.append((rid, status, len(bufs) - n0, blob, tb))
            size += n
        self._send_results(stream, items, bufs, last=True)

    def _send_results(self, stream: P.FrameStream, items: list[tuple[Any, ...]],
                      bufs: list[Any], last: bool) -> None:
        msg: Any = items
        if self._timing:
            # (items, offset from perf_counter to the wall clock, array of
            # rid, start, end) for the tasks that ran (not those that failed
            # to start); the timings go with the last frame of a flush
            msg = (items, self._wall_off, self._times if last else array("d"))
            if last:
                self._times = array("d")
        parts = P.encode(P.RESULTS, msg, P.DEFAULT_COMPRESS_MIN, bufs)
        if self._sending_now:
            self._send_now(parts)
        else:
            stream.send(parts)


class _PeerLink:
    """This worker's connection to another worker's data port: FETCH out, DATA back.

    Opened on first use with the same handshake as a worker's (the secret
    proves both sides); answers come in the order of the requests.
    """

    def __init__(self, worker: Worker, addr: str) -> None:
        self.addr = addr
        self.lost = False
        self._worker = worker
        self._joining = P.Joining(worker.secret, 1, f"{worker.name} fetching")
        self._state = "hello"
        self._pending: collections.deque[asyncio.Future[dict[int, Any]]] = collections.deque()
        self._stream = P.FrameStream(self._on_frame, self._on_lost)
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = loop.create_future()
        self._opening = loop.create_task(self._open())

    async def _open(self) -> None:
        host, port = P.parse_url(self.addr)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self._stream, host, port),
                                   CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            self._on_lost(self._stream, exc)

    async def fetch(self, keys: list[int]) -> dict[int, Any]:
        """The values of ``keys`` held at this address (a ``KeyError`` for each one it lacks).

        Raises:
            OSError: the connection failed or was lost before the answer.
        """
        await asyncio.shield(self._ready)
        fut: asyncio.Future[dict[int, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        self._stream.send(P.encode(P.FETCH, keys))
        return await fut

    def _on_frame(self, kind: int, payload: memoryview, buffers: list[Any]) -> None:
        if self._state == "ready":
            if kind != P.DATA or not self._pending:
                raise P.ProtocolError(f"unexpected {P.KIND_NAMES[kind]} frame from a data port")
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_result(read_data(payload, buffers))
        elif self._state == "hello":
            self._stream.send(self._joining.hello(kind, payload))
            self._state = "welcome"
        else:
            self._joining.welcome(kind, payload)
            self._stream.decoder.max_frame = self._worker.max_frame
            self._state = "ready"
            if not self._ready.done():
                self._ready.set_result(None)

    def _on_lost(self, _stream: P.FrameStream, exc: BaseException | None) -> None:
        self.lost = True
        err = ConnectionError(f"data port {self.addr} lost: {exc or 'closed'}")
        if not self._ready.done():
            self._ready.set_exception(err)
            self._ready.exception()  # retrieved: nobody may be waiting yet
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(err)

    def close(self) -> None:
        """Close the connection (the worker is stopping)."""
        self._opening.cancel()
        self._stream.close()


class _Forward(logging.Handler):
    """Hands the process's log records to the worker, which sends them in LOG frames."""

    def __init__(self, worker: Worker, level: int) -> None:
        super().__init__(level)
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == log.name:
            return
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + "".join(traceback.format_exception(*record.exc_info))
        except Exception:
            self.handleError(record)
            return
        record.async_wf_forwarded = True
        self.worker._queue_log((record.name, record.levelno, msg, record.created))


