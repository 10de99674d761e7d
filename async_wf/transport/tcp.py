"""Worker processes over raw TCP sockets (see ``async_wf.protocol`` for the wire format).

Flow control
    Each worker has two credits: blocking tasks may be outstanding up to
    ``slots * prefetch`` (enough to keep its threads busy across a round
    trip, small enough that one worker does not hoard work that another,
    idle, worker could run), and ``async def`` tasks up to ``async_limit``
    (coroutines do not occupy a slot, so a one-slot worker still keeps a
    thousand I/O-bound coroutines in flight). ``capacity`` is the sum of free
    credits; tasks beyond it stay in the core's ready queue, in priority
    order. Since the core's queue does not know kinds, ``capacity`` counts
    the large async credit only once async tasks have been seen (one slot
    before that, to find out), and is zero while anything waits in the
    backlog: the tasks popped but not placeable because their kind's credit
    is used up everywhere. The backlog, one priority heap per kind, thus
    holds at most one pop's overflow, and nothing overtakes it.

Batching
    All tasks dispatched to one worker in one pump go in one TASKS frame;
    each worker sends all results of one loop iteration in one RESULTS
    frame. A function travels once per worker connection (cloudpickled, so
    lambdas, closures and ``__main__`` functions work) and is then named by
    a small integer.

Faults
    A worker that closes its connection, breaks the protocol or misses
    heartbeats is dropped; its tasks are put back in the ready queue without
    counting against ``retries`` (they did not fail by themselves). A task
    whose worker is lost ``max_lost`` times fails, since it is likely the
    cause. With no worker connected, pending tasks wait ``no_worker_timeout``
    seconds for one, then fail with ``NoWorkerError``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import heapq
import itertools
import logging
import os
import ssl as _ssl
import subprocess
import sys
import time
import types
import weakref
from typing import TYPE_CHECKING, Any

import cloudpickle

from async_wf import protocol as P
from async_wf._errors import (
    NoWorkerError,
    RemoteError,
    RemoteTraceback,
    TaskTimeoutError,
    WorkerLostError,
)
from async_wf._scheduler import ASYNC
from async_wf.transport import Transport
from async_wf.worker import SYS_PATH_ENV, TOKEN_ENV, parse_url

if TYPE_CHECKING:
    from async_wf._futures import TaskFuture
    from async_wf._scheduler import Scheduler

__all__ = ["NoWorkerError", "TcpTransport", "WorkerLostError"]

log = logging.getLogger("async_wf")

_R_OK, _R_ERROR, _R_CANCELLED = 0, 1, 2
_FN_CACHE_MAX = 10_000
_FN_CACHE_BYTES = 64 << 20


def _fn_key(fn: Any) -> Any:
    """Cache key of a task function: its identity, or (self, function) for a bound method.

    ``obj.method`` is a new object at every attribute access; keyed by its
    own id, the whole ``obj`` would be pickled and sent again for every task.
    """
    if type(fn) is types.MethodType:
        return (id(fn.__self__), id(fn.__func__))
    return id(fn)


def _same_fn(cached: Any, fn: Any) -> bool:
    if cached is fn:
        return True
    return (
        type(fn) is types.MethodType
        and type(cached) is types.MethodType
        and cached.__self__ is fn.__self__
        and cached.__func__ is fn.__func__
    )


class _Worker:
    __slots__ = (
        "async_limit",
        "cancelling",
        "fids",
        "id",
        "inflight",
        "last_heard",
        "n_async",
        "n_thread",
        "name",
        "pid",
        "slots",
        "stream",
        "thread_limit",
        "zombies",
    )

    def __init__(self, stream: P.FrameStream, wid: int, slots: int, pid: int, name: str,
                 prefetch: int, async_limit: int) -> None:
        self.stream = stream
        self.id = wid
        self.slots = slots
        self.pid = pid
        self.name = name
        self.inflight: dict[int, TaskFuture] = {}
        self.zombies: dict[int, int] = {}  # rid -> kind, given up on but still running there
        self.cancelling: set[int] = set()  # rids sent a CANCEL, outcome not reported yet
        self.fids: set[int] = set()
        self.n_thread = 0
        self.n_async = 0
        self.thread_limit = slots * prefetch
        self.async_limit = async_limit
        self.last_heard = time.monotonic()

    def free(self, kind: int) -> int:
        if kind == ASYNC:
            return self.async_limit - self.n_async
        return self.thread_limit - self.n_thread

    def count(self, kind: int, delta: int) -> None:
        if kind == ASYNC:
            self.n_async += delta
        else:
            self.n_thread += delta


class TcpTransport(Transport):
    """Runs tasks on worker processes connected over TCP.

    Args:
        workers: worker processes to start on this machine (and stop at close).
        listen: ``tcp://host:port`` to accept workers on (default
            ``tcp://127.0.0.1:0``, a free port on loopback only).
        token: the shared secret (bytes); default: a fresh random one.
        token_file: read the secret from this file, or create the file with
            a fresh secret (mode 0600) if it does not exist, for external
            workers started with ``--token-file``.
        ssl: a server-side ``ssl.SSLContext`` to require TLS.
        tls_ca: CA file the workers started here use to verify the scheduler
            (needed with ``ssl`` and ``workers``).
        slots: threads per started worker for blocking tasks.
        prefetch: blocking tasks outstanding per worker slot.
        async_limit: ``async def`` tasks outstanding per worker.
        heartbeat: seconds between heartbeats.
        heartbeat_timeout: a worker silent this long is dropped (default 10 beats).
        no_worker_timeout: seconds pending tasks wait when no worker is connected.
        start_timeout: seconds to wait for the started workers to connect.
        compress_min: buffers of at least this many bytes are lz4-compressed
            when it pays; 0 turns compression off.
        max_frame: the largest frame accepted from an authenticated worker.
        max_lost: a task whose worker is lost this many times fails.

    Raises:
        ValueError: an argument breaks its rule.
    """

    def __init__(
        self,
        *,
        workers: int = 0,
        listen: str | None = None,
        token: bytes | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        tls_ca: str | None = None,
        slots: int = 1,
        prefetch: int = 64,
        async_limit: int = 4096,
        heartbeat: float = 1.0,
        heartbeat_timeout: float | None = None,
        no_worker_timeout: float = 60.0,
        start_timeout: float = 60.0,
        compress_min: int = P.DEFAULT_COMPRESS_MIN,
        max_frame: int = P.DEFAULT_MAX_FRAME,
        max_lost: int = 3,
    ) -> None:
        for name, value, low in (("workers", workers, 0), ("slots", slots, 1),
                                 ("prefetch", prefetch, 1), ("async_limit", async_limit, 1),
                                 ("max_lost", max_lost, 1), ("compress_min", compress_min, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name, fvalue in (("heartbeat", heartbeat), ("no_worker_timeout", no_worker_timeout),
                             ("start_timeout", start_timeout)):
            if not (isinstance(fvalue, int | float) and fvalue > 0):
                raise ValueError(f"{name} must be a number of seconds > 0, got {fvalue!r}")
        self._host, self._port = parse_url(listen or "tcp://127.0.0.1:0")
        if token is not None and token_file is not None:
            raise ValueError("give token= or token_file=, not both")
        if token_file is not None:
            if os.path.exists(token_file):
                token = P.read_token_file(token_file)
            else:
                token = P.new_secret()
                P.write_token_file(token_file, token)
        if token is not None and len(token) < 16:
            raise ValueError(f"token must be at least 16 bytes, got {len(token)}")
        if ssl is not None and workers and tls_ca is None:
            raise ValueError("workers started with ssl= need tls_ca= to verify the scheduler")
        self.secret = token if token is not None else P.new_secret()
        self._n_spawn = workers
        self._ssl = ssl
        self._tls_ca = tls_ca
        self._slots = slots
        self._prefetch = prefetch
        self._async_limit = async_limit
        self._heartbeat = float(heartbeat)
        self._hb_timeout = heartbeat_timeout or 10 * self._heartbeat
        self._no_worker_timeout = no_worker_timeout
        self._start_timeout = start_timeout
        self._compress_min = compress_min
        self._max_frame = max_frame
        self._max_lost = max_lost
        self._sched: Scheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._workers: dict[int, _Worker] = {}
        self._order: list[_Worker] = []
        self._rr = 0
        self._wids = itertools.count(1)
        self._rids = itertools.count(1)
        self._fn_blobs: dict[Any, tuple[Any, int, bytes]] = {}  # _fn_key -> (fn, fid, blob)
        self._next_fid = 0
        self._fn_bytes = 0
        self._fid_floor = 0  # workers may drop the functions with smaller ids
        # popped tasks waiting for a credit of their kind: [async heap, blocking heap]
        self._backlog: tuple[list[tuple[int, int, TaskFuture]], ...] = ([], [])
        self._async_seen = False
        self._seq = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._joined: asyncio.Event | None = None
        self._no_worker_since: float | None = None
        self._closing = False
        self.n_workers_lost = 0
        self.n_rejected = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def address(self) -> str:
        """The ``tcp://host:port`` workers connect to (the real port once started)."""
        return f"tcp://{self._host}:{self._port}"

    # ----------------------------------------------------------------- start
    async def start(self, sched: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
        """Listen, start the local workers and wait until they have joined.

        Raises:
            RuntimeError: a started worker exited or did not join in time.
        """
        self._sched = sched
        self._loop = loop
        self._joined = asyncio.Event()
        self._server = await loop.create_server(
            self._new_stream, self._host, self._port, ssl=self._ssl
        )
        sock = self._server.sockets[0]
        self._port = sock.getsockname()[1]
        _live_transports.add(self)
        self._watchdog = loop.create_task(self._watch())
        if self._n_spawn:
            self._spawn(self._n_spawn)
            deadline = loop.time() + self._start_timeout
            while len(self._workers) < self._n_spawn:
                dead = [p for p in self._procs if p.poll() is not None]
                if dead:
                    await self.close()
                    codes = ", ".join(str(p.returncode) for p in dead)
                    raise RuntimeError(f"{len(dead)} worker process(es) exited during start-up "
                                       f"(exit codes {codes}); see their output above")
                if loop.time() > deadline:
                    await self.close()
                    raise RuntimeError(
                        f"only {len(self._workers)} of {self._n_spawn} workers joined within "
                        f"{self._start_timeout:g} s"
                    )
                self._joined.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._joined.wait(), 0.1)

    def _spawn(self, n: int) -> None:
        host = "127.0.0.1" if self._host in ("0.0.0.0", "::", "") else self._host
        env = dict(os.environ)
        env[TOKEN_ENV] = self.secret.hex()
        env[SYS_PATH_ENV] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        cmd = [sys.executable, "-m", "async_wf.worker", "--connect", f"tcp://{host}:{self._port}",
               "--slots", str(self._slots), "--parent-pid", str(os.getpid())]
        if self._tls_ca:
            cmd += ["--tls-ca", self._tls_ca]
        for _ in range(n):
            self._procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))

    # ------------------------------------------------------------- handshake
    def _new_stream(self) -> P.FrameStream:
        state: dict[str, Any] = {}

        def on_open(stream: P.FrameStream) -> None:
            payload, nonce = P.hello_payload()
            state["nonce"] = nonce
            stream.send(P.raw_frame(P.HELLO, payload))
            loop = self._loop
            assert loop is not None
            state["timer"] = loop.call_later(
                5.0, lambda: "worker" in state or self._reject(stream, "no handshake in 5 s")
            )

        def on_frame(kind: int, payload: memoryview, buffers: list[Any]) -> None:
            w = state.get("worker")
            if w is not None:
                self._on_worker_frame(w, kind, payload, buffers)
                return
            if kind != P.AUTH:
                raise P.ProtocolError(f"expected AUTH, got {P.KIND_NAMES[kind]}")
            slots, pid, name, nonce_w = P.check_auth(bytes(payload), self.secret,
                                                     state["nonce"])
            if self._closing:
                stream.close()
                return
            wid = next(self._wids)
            w = _Worker(stream, wid, slots, pid, name, self._prefetch, self._async_limit)
            state["worker"] = w
            state["timer"].cancel()
            stream.send(P.raw_frame(
                P.WELCOME,
                P.welcome_payload(self.secret, state["nonce"], nonce_w, wid, self._heartbeat),
            ))
            stream.decoder.max_frame = self._max_frame
            self._workers[wid] = w
            self._order.append(w)
            self._no_worker_since = None
            log.info("worker #%d %s (pid %d, %d slots) joined from %s", wid, name, pid, slots,
                     stream.peer)
            if self._joined is not None:
                self._joined.set()
            self._place_backlog()
            self._wake()

        def on_lost(stream: P.FrameStream, exc: BaseException | None) -> None:
            if "timer" in state:
                state["timer"].cancel()
            w = state.get("worker")
            if w is not None:
                self._lost(w, exc)
            elif isinstance(exc, P.ProtocolError):
                # dropped before it joined: wrong token, garbage, oversized
                # frame, no handshake in time (a peer that just hangs up is not
                # counted)
                self.n_rejected += 1

        stream = P.FrameStream(on_frame, on_lost)
        stream.on_open = on_open
        return stream

    def _reject(self, stream: P.FrameStream, why: str) -> bool:
        stream.abort(P.ProtocolError(why))  # counted as rejected when the loss is seen
        return False

    # --------------------------------------------------------------- dispatch
    def capacity(self) -> int:
        """How many tasks the scheduler may pop now (see the module docstring).

        Nothing while tasks wait in the backlog, so that nothing overtakes
        them. Otherwise the free blocking credit, plus the free async credit
        once async tasks have been seen (before that, one slot to find out):
        a worker's large async credit must not make the scheduler pop
        thousands of blocking tasks that no slot can take.
        """
        if self._backlog[0] or self._backlog[1]:
            return 0
        t = a = 0
        for w in self._order:
            t += w.thread_limit - w.n_thread
            a += w.async_limit - w.n_async
        if a <= 0:
            return t
        return t + (a if self._async_seen else 1)

    def _pick(self, kind: int) -> _Worker | None:
        order = self._order
        n = len(order)
        for _ in range(n):
            self._rr = (self._rr + 1) % n
            w = order[self._rr]
            if w.free(kind) > 0:
                return w
        return None

    def dispatch(self, futs: list[TaskFuture]) -> None:
        """Place each task on a worker with free credit; send one frame per worker."""
        batches: dict[_Worker, list[Any]] = {}
        n_async = 0
        for fut in futs:
            fut._timed_out = False
            kind = fut._kind
            if kind == ASYNC:
                n_async += 1
            w = self._pick(kind)
            if w is None:
                self._seq += 1
                heapq.heappush(self._backlog[kind != ASYNC],
                               (-fut._opts.priority, self._seq, fut))
                fut._run = None
                continue
            # take the credit now, so that the next pick in this batch sees it
            # used: else one batch could go all to one worker, past its limits
            w.count(fut._kind, 1)
            batches.setdefault(w, []).append(fut)
        if n_async:
            self._async_seen = True
        elif len(futs) >= 64:
            self._async_seen = False  # a large all-blocking batch: stop counting async credit
        for w, fs in batches.items():
            self._send_tasks(w, fs)

    def _send_tasks(self, w: _Worker, futs: list[TaskFuture]) -> None:
        """Send ``futs`` to ``w`` in one frame; their credits on ``w`` are already taken."""
        loop = self._loop
        sched = self._sched
        assert loop is not None and sched is not None
        new_fns: list[tuple[int, bytes]] = []
        batch: list[tuple[Any, ...]] = []
        bufs: list[Any] = []
        for fut in futs:
            fn = fut._fn
            key = _fn_key(fn)
            entry = self._fn_blobs.get(key)
            if entry is None or not _same_fn(entry[0], fn):
                try:
                    blob = cloudpickle.dumps(fn, protocol=5)
                except Exception as exc:
                    self._unsendable(w, fut, "function", exc)
                    continue
                if (len(self._fn_blobs) >= _FN_CACHE_MAX
                        or self._fn_bytes + len(blob) > _FN_CACHE_BYTES):
                    self._forget_functions()
                self._next_fid += 1
                entry = (fn, self._next_fid, blob)
                self._fn_blobs[key] = entry
                self._fn_bytes += len(blob)
            n0 = len(bufs)
            try:
                # each task's arguments in a blob of their own: one that the
                # worker cannot unpickle fails that task, not the frame
                args_blob = P.pack((fut._args, fut._kwargs or None), bufs)
            except Exception as exc:
                del bufs[n0:]
                self._unsendable(w, fut, "arguments", exc)
                continue
            fid = entry[1]
            if fid not in w.fids:
                w.fids.add(fid)
                new_fns.append((fid, entry[2]))
            rid = next(self._rids)
            w.inflight[rid] = fut
            fut._run = (w, rid)
            batch.append((rid, fid, fut._kind, len(bufs) - n0, args_blob))
            timeout = fut._opts.timeout
            if timeout is not None:
                fut._timer = loop.call_later(timeout, self._on_timeout, fut, w, rid)
        if not batch:
            return
        w.stream.send(
            P.encode(P.TASKS, (new_fns, batch, self._fid_floor), self._compress_min, bufs)
        )

    def _unsendable(self, w: _Worker, fut: TaskFuture, what: str, exc: Exception) -> None:
        """Fail one task of a batch whose ``what`` cannot be pickled, and only it.

        Raising instead would leave the whole batch half-dispatched, its
        futures pending for ever. The credit taken for it on ``w`` is given back.
        """
        sched = self._sched
        assert sched is not None
        w.count(fut._kind, -1)
        fut._run = None
        sched.task_error(fut, TypeError(
            f"the {what} of task {fut.name!r} could not be pickled: {type(exc).__name__}: {exc}"
        ))

    def _forget_functions(self) -> None:
        """Drop the function cache, here and (with the next frame) on every worker.

        Without it a program that submits ever new lambdas would grow the
        cache here and the function table of every worker without bound.
        A function still in use is simply sent again, with a new id.
        """
        self._fn_blobs.clear()
        self._fn_bytes = 0
        self._fid_floor = self._next_fid + 1
        for w in self._order:
            w.fids.clear()

    def _place_backlog(self) -> None:
        """Send waiting tasks to workers with free credit, best priority first.

        Stops at the first task of a kind that no worker can take, so a call
        costs what it places, not the size of the backlog.
        """
        batches: dict[_Worker, list[TaskFuture]] = {}
        for heap in self._backlog:
            while heap:
                fut = heap[0][2]
                if fut.done():
                    heapq.heappop(heap)
                    continue
                w = self._pick(fut._kind)
                if w is None:
                    break
                heapq.heappop(heap)
                w.count(fut._kind, 1)  # as in dispatch
                batches.setdefault(w, []).append(fut)
        for w, fs in batches.items():
            self._send_tasks(w, fs)

    def _wake(self) -> None:
        sched = self._sched
        if sched is not None:
            sched.wake()

    # ----------------------------------------------------------------- results
    def _on_worker_frame(self, w: _Worker, kind: int, payload: memoryview,
                         buffers: list[Any]) -> None:
        w.last_heard = time.monotonic()
        if kind == P.RESULTS:
            results = P.loads(payload, buffers)
            try:
                self._on_results(w, results, buffers)
            except (TypeError, ValueError) as exc:
                # not a list of (rid, status, value, traceback)
                raise P.ProtocolError(f"malformed RESULTS frame: {exc}") from exc
        elif kind == P.HEARTBEAT:
            pass
        else:
            raise P.ProtocolError(f"unexpected {P.KIND_NAMES[kind]} frame from a worker")

    def _on_results(self, w: _Worker, results: list[tuple[int, int, int, bytes, Any]],
                    buffers: list[Any]) -> None:
        sched = self._sched
        assert sched is not None
        pos = 0
        for rid, status, nbufs, blob, tb in results:
            start = pos
            pos += nbufs
            fut = w.inflight.pop(rid, None)
            w.cancelling.discard(rid)
            if fut is None:
                zkind = w.zombies.pop(rid, None)
                if zkind is not None:
                    w.count(zkind, -1)
                continue
            w.count(fut._kind, -1)
            fut._stop_timer()
            fut._run = None
            if status != _R_CANCELLED:
                try:
                    value = P.unpack(blob, buffers, start, nbufs)
                except Exception as exc:
                    # this result alone is lost, not the connection and the others
                    what = "result" if status == _R_OK else "exception"
                    status = _R_ERROR
                    value = RemoteError(
                        f"the {what} of task {fut.name!r} could not be unpickled here: "
                        f"{type(exc).__name__}: {exc}"
                    )
            if status == _R_OK:
                sched.task_ok(fut, value)
            elif status == _R_ERROR:
                if tb and isinstance(value, BaseException) and value.__cause__ is None:
                    value.__cause__ = RemoteTraceback(tb)
                sched.task_error(fut, value)
            else:
                sched.task_cancelled(fut, "cancelled on the worker")
        self._place_backlog()
        self._wake()

    def _on_timeout(self, fut: TaskFuture, w: _Worker, rid: int) -> None:
        fut._timer = None
        if w.inflight.get(rid) is not fut or fut._cancelling:
            return
        del w.inflight[rid]
        w.zombies[rid] = fut._kind  # its slot stays busy until the worker answers
        w.stream.send(P.encode(P.CANCEL, [rid]))
        sched = self._sched
        assert sched is not None
        sched.task_error(fut, TaskTimeoutError(fut.name, fut._opts.timeout or 0.0))

    def cancel_running(self, fut: TaskFuture, msg: Any) -> bool:
        """Cancel a task still in the backlog, or an ``async def`` task on its worker.

        A blocking task on a worker is skipped there if no slot has taken it
        yet; either way this returns False for it, since its outcome cannot
        be known now, and the scheduler cancels the future itself.
        """
        sched = self._sched
        assert sched is not None
        run = fut._run
        if run is None:
            heap = self._backlog[fut._kind != ASYNC]
            for i, item in enumerate(heap):
                if item[2] is fut:
                    heap.pop(i)
                    heapq.heapify(heap)
                    sched.task_cancelled(fut, msg)
                    return True
            return False
        w, rid = run
        if w.inflight.get(rid) is not fut:
            return False
        w.stream.send(P.encode(P.CANCEL, [rid]))
        if fut._kind != ASYNC:
            # the worker skips it if no slot has taken it yet; if one has, it
            # runs to the end: the scheduler cancels the future now either way
            return False
        w.cancelling.add(rid)
        return True

    # ----------------------------------------------------------------- faults
    def _lost(self, w: _Worker, exc: BaseException | None) -> None:
        if self._workers.pop(w.id, None) is None:
            return
        self._order.remove(w)
        # statistics() sums the live connections: keep what this one moved
        self.bytes_sent += w.stream.bytes_out
        self.bytes_received += w.stream.bytes_in
        if not self._workers:
            self._no_worker_since = time.monotonic()
        if self._closing:
            return
        self.n_workers_lost += 1
        futs = [f for f in w.inflight.values() if not f.done()]
        cancelled = {id(f) for rid, f in w.inflight.items() if rid in w.cancelling}
        w.inflight.clear()
        log.warning("worker #%d %s lost (%s); %d task(s) go back to the ready queue",
                    w.id, w.name, exc or "connection closed", len(futs))
        sched = self._sched
        assert sched is not None
        for fut in futs:
            fut._stop_timer()
            fut._run = None
            if id(fut) in cancelled:
                # its cancellation was accepted: running it again would make the
                # canceller (Ctrl-C, wait_for) wait for a worker for ever
                sched.task_cancelled(fut, "cancelled (its worker was lost meanwhile)")
                continue
            fut._lost += 1
            if fut._lost >= self._max_lost:
                sched.task_error(fut, WorkerLostError(
                    f"task {fut.name!r} was running on {fut._lost} workers that were lost; "
                    "it is probably what kills them"
                ))
            else:
                sched.task_requeue(fut)
        self._wake()

    async def _watch(self) -> None:
        sched = self._sched
        assert sched is not None
        beat = P.raw_frame(P.HEARTBEAT)
        while True:
            await asyncio.sleep(self._heartbeat)
            now = time.monotonic()
            for w in list(self._order):
                silent = now - max(w.last_heard, w.stream.last_activity)
                if silent > self._hb_timeout:
                    w.stream.abort(P.ProtocolError(
                        f"worker #{w.id} missed heartbeats for {silent:.1f} s"
                    ))
                else:
                    w.stream.send(beat)
            if self._workers or not sched.pending():
                self._no_worker_since = None if self._workers else now
                continue
            if self._no_worker_since is None:
                self._no_worker_since = now
            elif now - self._no_worker_since > self._no_worker_timeout:
                waited = now - self._no_worker_since
                self._no_worker_since = now
                def no_worker(
                    f: TaskFuture, waited: float = waited, limit: float = self._no_worker_timeout
                ) -> BaseException:
                    return NoWorkerError(
                        f"task {f.name!r} could not run: no worker connected for "
                        f"{waited:.0f} s (no_worker_timeout={limit:g})"
                    )

                sched.fail_pending(no_worker)

    # ------------------------------------------------------------------ close
    def statistics(self) -> dict[str, Any]:
        """Workers connected and lost, connections rejected, bytes moved."""
        sent = self.bytes_sent + sum(w.stream.bytes_out for w in self._order)
        received = self.bytes_received + sum(w.stream.bytes_in for w in self._order)
        return {
            "workers": len(self._workers),
            "workers_lost": self.n_workers_lost,
            "connections_rejected": self.n_rejected,
            "bytes_sent": sent,
            "bytes_received": received,
        }

    async def close(self) -> None:
        """Tell workers to stop, close the server, reap the started processes."""
        if self._closing:
            return
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        shutdown = P.raw_frame(P.SHUTDOWN)
        for w in list(self._order):
            w.stream.send(shutdown)
            w.stream.close()
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        while any(p.poll() is None for p in self._procs) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        _reap(self._procs)
        self._procs = []
        _live_transports.discard(self)


def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


_live_transports: weakref.WeakSet[TcpTransport] = weakref.WeakSet()


@atexit.register
def _kill_orphans() -> None:
    # a runtime that was never closed (interpreter exiting after an error)
    for t in list(_live_transports):
        _reap(t._procs)
