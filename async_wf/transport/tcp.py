"""Worker processes over raw TCP sockets (see ``async_wf.protocol`` for the wire format).

Placement, batching and results are shared with the MPI transport
(see ``transport._remote``).

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
import base64
import collections
import contextlib
import ipaddress
import itertools
import logging
import math
import multiprocessing
import os
import resource
import socket
import ssl as _ssl
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import cloudpickle

from async_wf import protocol as P
from async_wf._allocator import AllocationError, Allocator
from async_wf._errors import (
    NoWorkerError,
    WorkerLostError,
)
from async_wf._resources import MEMORY, Declared, parse_memory
from async_wf.transport._remote import RemoteTransport, _Worker

if TYPE_CHECKING:
    from async_wf._futures import TaskFuture
    from async_wf._scheduler import Scheduler

__all__ = ["NoWorkerError", "TcpTransport", "WorkerLostError"]

log = logging.getLogger("async_wf")

_WORKER_RESOURCES = ("cores", "memory", "gpus", "resources")


def _hello_json(obj: Any) -> tuple[Declared | None, str, float]:
    """The resources, the data port's address and the end time a worker sent in AUTH.

    Raises:
        ValueError: not ``{"resources": {...}, "data": "tcp://host:port", "ends": t}``.
    """
    if obj is None:
        return None, "", 0.0
    if not isinstance(obj, dict) or not set(obj) <= {"resources", "data", "ends"}:
        raise ValueError(f"AUTH JSON must be an object with resources and data, got {obj!r:.80}")
    res = obj.get("resources")
    declared = None if res is None else Declared.from_wire(res)
    data = obj.get("data", "")
    if not isinstance(data, str) or len(data) > 300:
        raise ValueError(f"the data address must be a string, got {data!r:.80}")
    if data:
        P.parse_url(data)
    ends = obj.get("ends", 0.0)
    if isinstance(ends, bool) or not isinstance(ends, int | float) or not math.isfinite(ends):
        raise ValueError(f"the end time must be seconds since the epoch, got {ends!r:.80}")
    return declared, data, float(ends)


def _check_worker_resources(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``worker_resources`` now, as ``Declared.build`` will on each worker.

    Raises:
        ValueError, TypeError: an unknown key, or a value that breaks its rule.
    """
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise TypeError(f"worker_resources must be a dict, got {spec!r}")
    for k in spec:
        if k not in _WORKER_RESOURCES:
            raise ValueError(f"worker_resources takes {', '.join(_WORKER_RESOURCES)}; "
                             f"got {k!r}")
    Declared.build(**spec)  # raises with the rule and the value
    return dict(spec)
#: seconds a connecting worker has to authenticate (a worker answers at
#: once; only a stranger or a dead peer takes longer)
HANDSHAKE_TIMEOUT = 3.0
#: seconds between two warnings about refused connections
_REFUSAL_LOG_EVERY = 10.0
#: replacements of dead worker processes allowed per window of seconds
_RESPAWN_BURST = 8
_RESPAWN_WINDOW = 60.0

class TcpTransport(RemoteTransport):
    """Runs tasks on worker processes connected over TCP.

    Args:
        workers: worker processes to start on this machine (and stop at close).
        listen: ``tcp://host:port`` to accept workers on (default
            ``tcp://127.0.0.1:0``, a free port on loopback only).
        token: the shared secret (bytes); default: a fresh random one.
        token_file: read the secret from this file, or create the file with
            a fresh secret (mode 0600) if it does not exist, for external
            workers started with ``--token-file``.
        ssl: ``"auto"``: TLS with a certificate whose key is derived from
            the token, which the workers (started here, or with
            ``--tls-auto`` and the token file) check, so a relay cannot sit
            in the middle (needs ``cryptography``); or a server-side
            ``ssl.SSLContext`` of your own PKI.
        tls_ca: CA file the workers started here use to verify the scheduler
            (needed with an ``ssl.SSLContext`` and ``workers``).
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
        initializer: called once in each worker process this transport
            starts, before it connects (pickled by value); a worker whose
            initializer raises exits, and the start fails.
        max_tasks_per_child: a worker process this transport starts runs at
            most this many tasks, then stops and a fresh one takes its place
            (as ``ProcessPoolExecutor(max_tasks_per_child=)``); None: no limit.
        max_handshakes: connections allowed to be authenticating at once;
            more are closed on arrival (as are connections that would take
            the last descriptors below the process's RLIMIT_NOFILE), so
            strangers cannot exhaust memory or file descriptors.
        keep_min: a result of at least this many bytes stays on the worker
            that computed it: its dependents fetch it from there (or use it
            in place), and the application when it awaits it; 0: every
            result comes to this process. Not with a checkpoint log, which
            records every result, nor over TLS (the workers' data ports
            are authenticated, not encrypted).
        worker_resources: what each started worker declares: ``cores`` (an
            int; default ``slots``), ``memory`` (bytes or "16GiB"; default an
            equal share of this machine's), ``gpus`` (a count or a list of
            ids; default an equal share of the GPUs detected here) and
            ``resources`` (named amounts, e.g. ``{"licence": 2}``).
        allocator: an ``Allocator`` (Slurm) that starts workers elsewhere;
            the default ``listen`` is then its ``listen_host()``.
        send_ahead: a chain of dependent tasks may run this many links ahead
            of the scheduler on one worker: a task whose only unfinished
            input goes to a worker follows it there at once, and starts when
            that input ends, without waiting for the scheduler. The
            scheduler still learns every outcome, in order. 0: every task
            waits until its inputs are done here.

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
        ssl: _ssl.SSLContext | Literal["auto"] | None = None,
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
        max_handshakes: int = 64,
        initializer: Callable[[], Any] | None = None,
        max_tasks_per_child: int | None = None,
        worker_resources: Mapping[str, Any] | None = None,
        keep_min: int = 64 << 10,
        allocator: Allocator | None = None,
        send_ahead: int = 32,
    ) -> None:
        for name, value, low in (("workers", workers, 0), ("slots", slots, 1),
                                 ("max_handshakes", max_handshakes, 1),
                                 ("prefetch", prefetch, 1), ("async_limit", async_limit, 1),
                                 ("max_lost", max_lost, 1), ("compress_min", compress_min, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if max_tasks_per_child is not None and (
                isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int)
                or max_tasks_per_child < 1):
            raise ValueError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child!r}")
        self._max_tasks = max_tasks_per_child
        if isinstance(keep_min, bool) or not isinstance(keep_min, int) or keep_min < 0:
            raise ValueError(f"keep_min must be a number of bytes >= 0, got {keep_min!r}")
        self._keep_min = keep_min
        self._worker_resources = _check_worker_resources(worker_resources)
        self._allocator = allocator
        self._alloc_task: asyncio.Task[None] | None = None
        if allocator is not None and listen is None:
            listen = f"tcp://{allocator.listen_host()}:0"
        self._external = listen is not None
        self._spawned = 0
        for name, fvalue in (("heartbeat", heartbeat), ("no_worker_timeout", no_worker_timeout),
                             ("start_timeout", start_timeout)):
            if not (isinstance(fvalue, int | float) and fvalue > 0):
                raise ValueError(f"{name} must be a number of seconds > 0, got {fvalue!r}")
        self._host, self._port = P.parse_url(listen or "tcp://127.0.0.1:0")
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
        if isinstance(ssl, str) and ssl != "auto":
            raise ValueError(f"ssl must be 'auto', an ssl.SSLContext or None, got {ssl!r}")
        if isinstance(ssl, _ssl.SSLContext) and workers and tls_ca is None:
            raise ValueError("workers started with an ssl.SSLContext need tls_ca= to verify "
                             "the scheduler (or use ssl='auto')")
        super().__init__(prefetch=prefetch, async_limit=async_limit,
                         compress_min=compress_min, max_lost=max_lost, send_ahead=send_ahead)
        self.secret = token if token is not None else P.new_secret()
        self._n_spawn = workers
        self._tls_auto = ssl == "auto"
        self._init_blob = None if initializer is None else \
            base64.b64encode(cloudpickle.dumps(initializer)).decode()
        if ssl == "auto":
            from async_wf._tls import server_context

            ssl = server_context(self.secret)
        self._ssl = ssl
        self._tls_ca = tls_ca
        self._slots = slots
        self._heartbeat = float(heartbeat)
        self._hb_timeout = heartbeat_timeout or 10 * self._heartbeat
        self._no_worker_timeout = no_worker_timeout
        self._start_timeout = start_timeout
        self._max_frame = max_frame
        self._server: asyncio.AbstractServer | None = None
        self._wids = itertools.count(1)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._joined: asyncio.Event | None = None
        self._no_worker_since: float | None = None
        self.n_rejected = 0
        self.n_retired = 0  # processes replaced after max_tasks_per_child tasks
        self._max_handshakes = max_handshakes
        self._handshaking: set[P.FrameStream] = set()
        self._fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._refused_since_log = 0
        self._refusal_logged = 0.0
        self._respawns: collections.deque[float] = collections.deque()
        self._dying: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        """The ``tcp://host:port`` workers connect to (the real port once started)."""
        host = f"[{self._host}]" if ":" in self._host else self._host  # IPv6
        return f"tcp://{host}:{self._port}"

    # ----------------------------------------------------------------- start
    async def start(self, sched: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
        """Listen, start the local workers (or the allocator's) and wait until they have joined.

        Raises:
            RuntimeError: a started worker exited or did not join in time.
            AllocationError: the allocator could not start its first workers.
        """
        self._sched = sched
        self._loop = loop
        self._joined = asyncio.Event()
        self._server = await loop.create_server(
            self._new_stream, self._host, self._port, ssl=self._ssl
        )
        sock = self._server.sockets[0]
        self._port = sock.getsockname()[1]
        if self._ssl is None and exposed(self._host):
            log.warning(
                "async_wf is listening on %s:%d without TLS: the token handshake proves "
                "who connects, but anyone on the network path can relay the connection "
                "and then read or inject tasks; give Runtime(ssl='auto') (TLS bound to "
                "the token; workers add --tls-auto) or an ssl.SSLContext",
                self._host or "*", self._port)
        _live_transports.add(self)
        self._watchdog = loop.create_task(self._watch())
        if self._allocator is not None:
            await self._start_allocator(self._allocator)
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

    async def _start_allocator(self, alloc: Allocator) -> None:
        """Hand the allocator the address and the token (in the environment), then drive it."""
        host = self._host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()  # a wildcard is no address to connect to
        host = f"[{host}]" if ":" in host else host
        env = {P.TOKEN_ENV: self.secret.hex(),
               P.SYS_PATH_ENV: os.pathsep.join(p or os.getcwd() for p in sys.path)}
        args = ["--tls-auto"] if self._tls_auto else []
        try:
            await alloc.start(f"tcp://{host}:{self._port}", env, args)
        except BaseException:
            await self.close()
            raise
        # as with workers=N: the first task waits for the allocation's workers
        loop = self._loop
        assert loop is not None and self._joined is not None
        deadline = loop.time() + self._start_timeout
        while len(self._workers) < alloc.initial_workers():
            try:
                await alloc.tick(0, [w.name for w in self._order])
            except BaseException:
                await self.close()
                raise
            if loop.time() > deadline:
                await self.close()
                raise RuntimeError(f"only {len(self._workers)} of {alloc.initial_workers()} "
                                   f"workers joined within {self._start_timeout:g} s")
            self._joined.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined.wait(), 0.1)
        self._alloc_task = loop.create_task(self._drive(alloc))

    async def _drive(self, alloc: Allocator) -> None:
        """Tick the allocator every heartbeat; once it refuses, fail tasks no worker will take."""
        sched = self._sched
        assert sched is not None
        while not self._closing:
            if alloc.error is None:
                try:
                    await alloc.tick(sched.pending(), [w.name for w in self._order])
                except AllocationError as exc:
                    alloc.error = exc
                    log.error("%s", exc)  # once: no more ticks
                except Exception as exc:  # a bug or a vanished command: stop, and say so
                    log.exception("the allocator failed; it starts no more workers")
                    alloc.error = AllocationError(f"the allocator failed: {exc!r}")
                else:
                    st = alloc.status()
                    if st.get("pending") or st.get("running"):
                        self._no_worker_since = None  # workers are coming: no NoWorkerError
            if alloc.error is not None and not self._workers and sched.pending():
                def refused(f: TaskFuture[Any],
                            exc: AllocationError = alloc.error) -> BaseException:
                    return AllocationError(f"task {f.name!r} could not run: {exc}")

                sched.fail_pending(refused)
            await asyncio.sleep(self._heartbeat)

    def _more_workers_coming(self, since: float) -> bool:
        """Whether a bigger worker may still join for a task waiting since ``since``.

        The workers this transport starts have all joined before the first
        task runs (and a replacement is no bigger), so with those alone a
        task no worker fits fails at once; when others may connect (an
        explicit ``listen=``), it waits ``no_worker_timeout`` for one.
        """
        return self._external and time.monotonic() - since < self._no_worker_timeout

    def _spawn(self, n: int) -> None:
        host = "127.0.0.1" if self._host in ("0.0.0.0", "::", "") else self._host
        if ":" in host:
            host = f"[{host}]"  # IPv6
        env = dict(os.environ)
        env[P.TOKEN_ENV] = self.secret.hex()
        env[P.SYS_PATH_ENV] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        # as multiprocessing's own children: a Manager's proxies authenticate
        env[P.MP_AUTHKEY_ENV] = multiprocessing.current_process().authkey.hex()
        if self._init_blob is not None:
            env[P.INIT_ENV] = self._init_blob
        cmd = [sys.executable, "-m", "async_wf.worker", "--connect", f"tcp://{host}:{self._port}",
               "--slots", str(self._slots), "--parent-pid", str(os.getpid())]
        if self._tls_auto:
            cmd += ["--tls-auto"]
        elif self._tls_ca:
            cmd += ["--tls-ca", self._tls_ca]
        spec = self._worker_resources
        # detected once per start (it may run nvidia-smi), and only if a share is due
        machine = Declared.detect() if spec.get("memory") is None or spec.get("gpus") is None \
            else None
        for _ in range(n):
            # each started worker its share of the machine, unless told
            i = self._spawned
            self._spawned += 1
            args = cmd + self._resource_args(i, machine)
            self._procs.append(subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL))

    def _resource_args(self, i: int, machine: Declared | None) -> list[str]:
        """The resource flags of the ``i``-th started worker (``worker_resources``).

        Unless given: as many cores as slots, an equal share of the
        ``machine``'s memory and of its GPUs (worker ``i`` gets GPUs i,
        i+n, ...), and no named resources.
        """
        spec = self._worker_resources
        n = max(self._n_spawn, 1)
        out = ["--cores", str(spec.get("cores") or self._slots)]
        if spec.get("memory") is not None:
            out += ["--memory", str(parse_memory(spec["memory"]))]
        else:
            assert machine is not None
            out += ["--memory", str(machine.amounts[MEMORY] // n)]
        gpus = spec.get("gpus")
        if gpus is None:
            assert machine is not None
            ids = machine.gpu_ids[i % n::n]
            out += ["--gpus", ",".join(ids) if ids else "0"]
        elif isinstance(gpus, int):
            out += ["--gpus", str(gpus)]
        else:
            out += ["--gpus", ",".join(gpus) if gpus else "0"]
        res = spec.get("resources")
        if res:
            out += ["--resources", ",".join(f"{k}={v:g}" for k, v in res.items())]
        return out

    # ------------------------------------------------------------- handshake
    def _new_stream(self) -> P.FrameStream:
        return P.accepting_stream(self.secret, lambda: HANDSHAKE_TIMEOUT, self._on_join,
                                  self._on_rejected, self._admit)

    def _admit(self, stream: P.FrameStream) -> bool:
        why = self._refusal(stream)
        if why is not None:
            self._refuse(stream, why)
            return False
        self._handshaking.add(stream)
        return True

    def _on_join(self, stream: P.FrameStream, challenge: P.Challenge, slots: int, pid: int,
                 name: str) -> tuple[P.FrameHandler, Callable[[BaseException | None], None]] | None:
        self._handshaking.discard(stream)
        if self._closing:
            return None
        try:
            declared, data_addr, ends = _hello_json(challenge.declared)
        except ValueError as exc:
            log.warning("worker %s (pid %d) from %s declared malformed resources, refused: %s",
                        name, pid, stream.peer, exc)
            return None
        wid = next(self._wids)
        w = _Worker(stream, wid, slots, pid, name, self._prefetch, self._async_limit, declared)
        w.data_addr = data_addr
        w.ends = ends
        if self._max_tasks is not None and any(p.pid == pid for p in self._procs):
            w.budget = self._max_tasks  # only the processes this transport replaces
        sched = self._sched
        # with a checkpoint log every result is recorded, so it must come here
        # and over TLS: the data ports between workers are not encrypted
        keep = self._keep_min if (sched is not None and sched._ckpt is None
                                  and self._ssl is None) else 0
        challenge.welcome(wid, self._heartbeat, self._max_frame, keep if data_addr else 0)
        self._no_worker_since = None
        log.info("worker #%d %s (pid %d, %d slots; %s) joined from %s", wid, name, pid, slots,
                 w.declared.describe(), stream.peer)
        if self._joined is not None:
            self._joined.set()
        self._join(w)

        def on_frame(kind: int, payload: memoryview, buffers: list[Any]) -> None:
            self._on_worker_frame(w, kind, payload, buffers)

        def on_lost(exc: BaseException | None) -> None:
            self._lost(w, exc)

        return on_frame, on_lost

    def _on_rejected(self, stream: P.FrameStream, exc: BaseException | None) -> None:
        self._handshaking.discard(stream)
        if isinstance(exc, P.ProtocolError):
            # dropped before it joined: wrong token, garbage, oversized
            # frame, no handshake in time (a peer that just hangs up is not
            # counted)
            self.n_rejected += 1

    def _refusal(self, stream: P.FrameStream) -> str | None:
        """Why a new connection must be closed before its handshake, or None."""
        if len(self._handshaking) >= self._max_handshakes:
            return f"{self._max_handshakes} connections are in the handshake (max_handshakes)"
        sock = stream.transport.get_extra_info("socket") if stream.transport else None
        # descriptors are allocated lowest first, so a new socket's number
        # is about how many are open: keep the last ones for the application
        reserve = max(32, self._fd_limit // 16)
        if sock is not None and sock.fileno() >= self._fd_limit - reserve:
            return (f"file descriptor {sock.fileno()} is within {reserve} of the limit "
                    f"{self._fd_limit} (RLIMIT_NOFILE)")
        return None

    def _refuse(self, stream: P.FrameStream, why: str) -> None:
        """Close a connection at once, counting it; warn at most every few seconds."""
        self.n_rejected += 1
        self._refused_since_log += 1
        stream.closed = True
        if stream.transport is not None:
            stream.transport.abort()
        now = time.monotonic()
        if now - self._refusal_logged >= _REFUSAL_LOG_EVERY:
            log.warning("refused %d connection(s) before authentication: %s",
                        self._refused_since_log, why)
            self._refusal_logged = now
            self._refused_since_log = 0

    # ----------------------------------------------------------------- faults
    def _lost(self, w: _Worker, exc: BaseException | None) -> None:
        if not self._release(w, exc):
            return
        if not self._workers:
            self._no_worker_since = time.monotonic()
        if not self._closing:
            self._replace(w)

    def _retire(self, w: _Worker) -> None:
        """``w`` ran its max_tasks_per_child: stop it and start a fresh process now.

        Not a loss: not counted, not logged as one, and not held to the
        respawn rate (a planned replacement is not a crash loop).
        """
        self._release(w, None, retired=True)
        w.stream.send(P.raw_frame(P.SHUTDOWN))
        proc = next((p for p in self._procs if p.pid == w.pid), None)
        if proc is not None:
            self._procs.remove(proc)
            self._dying = [p for p in self._dying if p.poll() is None]
            self._dying.append(proc)  # it exits on SHUTDOWN; reaped later
        self.n_retired += 1
        if not self._closing:
            self._spawn(1)

    def _replace(self, w: _Worker) -> None:
        """Start a new worker process in place of ``w`` if ``w`` was one of ours.

        At most ``_RESPAWN_BURST`` replacements per ``_RESPAWN_WINDOW``
        seconds: a machine that kills every worker at start must not make
        this loop spawn processes as fast as it can.
        """
        proc = next((p for p in self._procs if p.pid == w.pid), None)
        if proc is None:
            return  # started by hand: it may come back by itself
        self._procs.remove(proc)
        if proc.poll() is None:
            proc.kill()  # dropped but alive (stopped, or deaf): it must not come back
            self._dying.append(proc)  # reaped later: waiting here would block the loop
            how = "was dropped while its process ran; killed it"
        else:
            how = f"exited with code {proc.returncode}"
        now = time.monotonic()
        while self._respawns and now - self._respawns[0] > _RESPAWN_WINDOW:
            self._respawns.popleft()
        delay = 0.0
        if len(self._respawns) >= _RESPAWN_BURST:
            delay = _RESPAWN_WINDOW - (now - self._respawns[0])
            log.warning("worker processes are dying fast (%d replaced in %g s): the next "
                        "replacement starts in %.0f s", len(self._respawns), _RESPAWN_WINDOW,
                        delay)
        self._respawns.append(now + delay)
        log.info("worker #%d (pid %d) %s; starting a replacement", w.id, w.pid, how)
        assert self._loop is not None
        self._loop.call_later(delay, self._respawn_one)

    def _respawn_one(self) -> None:
        self._dying = [p for p in self._dying if p.poll() is None]
        if not self._closing:
            self._spawn(1)

    async def _watch(self) -> None:
        sched = self._sched
        assert sched is not None
        beat = P.raw_frame(P.HEARTBEAT)
        while True:
            await asyncio.sleep(self._heartbeat)
            now = time.monotonic()
            for w in list(self._order):
                stream = cast(P.FrameStream, w.stream)
                silent = now - max(w.last_heard, stream.last_activity)
                if silent > self._hb_timeout:
                    stream.abort(P.ProtocolError(
                        f"worker #{w.id} missed heartbeats for {silent:.1f} s"
                    ))
                else:
                    stream.send(beat)
            if self._rq:
                self._place_req()  # fails those no worker fits once none may still join
            if self._workers or not sched.pending():
                self._no_worker_since = None if self._workers else now
                continue
            if self._no_worker_since is None:
                self._no_worker_since = now
            elif now - self._no_worker_since > self._no_worker_timeout:
                waited = now - self._no_worker_since
                self._no_worker_since = now
                def no_worker(
                    f: TaskFuture[Any], waited: float = waited,
                    limit: float = self._no_worker_timeout,
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
            "workers_retired": self.n_retired,
            "connections_rejected": self.n_rejected,
            "connections_in_handshake": len(self._handshaking),
            "bytes_sent": sent,
            "bytes_received": received,
            "tasks_stolen": self.n_stolen,
            "tasks_sent_ahead": self.n_ahead,
            "tasks_in_columns": self.n_col_tasks,
            "results_in_columns": self.n_col_results,
            "results_held": len(self._held),
            "bytes_held": self.bytes_held,
            "bytes_fetched": self.bytes_fetched,
            "results_recomputed": self.n_recomputed,
            "resource_tasks_waiting": len(self._rq),
            "worker_resources": {f"#{w.id} {w.name}": w.declared.describe() + (
                f"; ends in {w.ends - time.time():.0f} s" if w.ends else "")
                for w in self._order},
            **({} if self._allocator is None else {"allocations": self._allocator.status()}),
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
        if self._alloc_task is not None:
            self._alloc_task.cancel()
        if self._allocator is not None:
            await self._allocator.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        while any(p.poll() is None for p in self._procs) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        _reap(self._procs + self._dying)
        self._procs, self._dying = [], []
        _live_transports.discard(self)


def exposed(host: str) -> bool:
    """Whether a listener on ``host`` may be reached from other machines (not loopback)."""
    if host in ("localhost", "localhost.localdomain"):
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True  # a wildcard (""), or a name that resolves elsewhere


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
        _reap(t._procs + t._dying)
