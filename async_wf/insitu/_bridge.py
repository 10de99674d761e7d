"""The simulation's side of in-situ analytics: ``Bridge``, one per MPI rank.

A simulation is ordinary synchronous code (an mpi4py time loop), so the
bridge uses a blocking socket and two threads of its own: one sends the
pieces that ``publish`` queues, so that publishing never waits for the
network; one receives what the hub decides (what to send, from which step;
steering values; how far the analytics has got), so that these are known
without the simulation ever polling.

Determinism across ranks rests on one rule, enforced by the hub: a change
(of selection or of a steering value) named for step ``f`` is accepted only
if ``f`` lies beyond every step any rank may already have reached, i.e.
``f > consumed + backpressure``. The hub sends a change before any later
advance of ``consumed`` on the same connection, so a rank that may go on
to step ``t`` (``t <= consumed + backpressure``) already holds every change
named for a step up to ``t``. Every rank therefore sends, and reads, the
same thing for the same step, whatever the timing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import protocol as P
from ._layout import Block, Box, StepMap, intersect, local_slices

ADDRESS_ENV = "ASYNC_WF_INSITU"
TOKEN_ENV = "ASYNC_WF_INSITU_TOKEN"
_MISSING: Any = object()


class AnalyticsTimeoutError(TimeoutError):
    """The analytics did not answer in time, or its connection is gone.

    Raised by ``Bridge`` instead of waiting for ever: a simulation whose
    analytics has died fails with this error rather than hanging.
    """


class _Entry:
    """One subscription's selection from a step on: an array name and a box, or nothing."""

    __slots__ = ("box", "name", "slices")

    def __init__(self, name: str | None, box: Box | None, block: Block | None) -> None:
        self.name = name
        self.box = box
        # prepared once per change, used at every step: the part of this
        # rank's block that the selection wants, as local slices
        self.slices: tuple[slice, ...] | None = None
        if name is not None and box is not None and block is not None:
            part = intersect(box, block.box)
            if part is not None:
                self.slices = local_slices(part, block.start)


class Bridge:
    """Connects one simulation rank to the analytics' hub.

    Args:
        comm: the simulation's MPI communicator (mpi4py), or None for a
            single-process simulation. Only its rank and size are used.
        arrays: for each array name this rank publishes, its ``Block``.
        address: the hub's ``tcp://host:port`` (default: ``$ASYNC_WF_INSITU``,
            which ``Hub.environ()`` sets).
        token: the hub's secret (default: hex in ``$ASYNC_WF_INSITU_TOKEN``).
        timeout: seconds to wait for the analytics (at start, at
            backpressure, in ``get``) before raising ``AnalyticsTimeoutError``.

    The constructor returns once every rank of ``comm`` has joined the hub.

    Raises:
        AnalyticsTimeoutError: the hub cannot be reached, or not all ranks
            joined within ``timeout``.
        ValueError: no address or token is known.
    """

    def __init__(
        self,
        comm: Any,
        arrays: Mapping[str, Block],
        *,
        address: str | None = None,
        token: bytes | str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.rank = 0 if comm is None else int(comm.Get_rank())
        self.size = 1 if comm is None else int(comm.Get_size())
        self.arrays = {str(k): v for k, v in arrays.items()}
        for name, blk in self.arrays.items():
            if not isinstance(blk, Block):
                raise TypeError(f"arrays[{name!r}] must be a Block, got {type(blk).__name__}")
        address = address or os.environ.get(ADDRESS_ENV)
        if not address:
            raise ValueError(f"no hub address: pass address= or set ${ADDRESS_ENV} "
                             "(Hub.environ() gives it)")
        if token is None:
            token = os.environ.get(TOKEN_ENV)
        if not token:
            raise ValueError(f"no hub token: pass token= or set ${TOKEN_ENV}")
        self.secret = bytes.fromhex(token) if isinstance(token, str) else bytes(token)
        self.address = address
        self.timeout = float(timeout)
        #: bytes and pieces this rank has sent, for the hub's report and for tests
        self.bytes_sent = 0
        self.pieces_sent = 0
        #: seconds ``publish`` spent waiting for the analytics (backpressure)
        self.waited = 0.0

        self._cond = threading.Condition()
        self._lost: str | None = None
        self._bye = False
        self._ready = False
        self._consumed = 0
        self._backpressure = 0
        self._first_step = 0
        self._idle_lease = 0
        # subscription id -> sorted from-steps and their entries
        self._subs: dict[int, StepMap] = {}  # subscription id -> its _Entry from each step
        self._steer: dict[str, StepMap] = {}
        self._step: int | None = None
        self._published: set[str] = set()
        self._waiting_sent = -1
        self._closed = False

        host, port = P.parse_url(address)
        deadline = time.monotonic() + self.timeout
        pause = 0.05
        while True:
            # the analytics may be started after the simulation: retry until timeout
            try:
                self._sock = socket.create_connection(
                    (host, port), timeout=max(0.1, deadline - time.monotonic()))
                break
            except OSError as exc:
                if time.monotonic() + pause > deadline:
                    raise AnalyticsTimeoutError(
                        f"rank {self.rank}: cannot reach the analytics hub at {address} "
                        f"within {self.timeout:g} s: {exc}"
                    ) from exc
                time.sleep(pause)
                pause = min(1.0, pause * 2)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._decoder = P.FrameDecoder()
        self._frames: deque[tuple[int, memoryview, list[Any]]] = deque()
        self._handshake()
        self._sock.settimeout(None)
        self._out: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"insitu-send-{self.rank}")
        self._receiver = threading.Thread(target=self._recv_loop, daemon=True,
                                          name=f"insitu-recv-{self.rank}")
        self._sender.start()
        self._receiver.start()
        layout = {n: (b.global_shape, b.start, b.shape) for n, b in self.arrays.items()}
        self._send(("layout", self.rank, self.size, layout))
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self._lost is not None,
                                       self.timeout):
                self._abandon()
                raise AnalyticsTimeoutError(
                    f"rank {self.rank}: the hub at {address} did not start the simulation "
                    f"within {self.timeout:g} s (have all {self.size} ranks created a Bridge?)"
                )
        self._check()

    # ------------------------------------------------------------ connection
    def _read_frame(self) -> tuple[int, memoryview, list[Any]]:
        frames = self._frames
        while not frames:
            # a handshake frame stops the decoder after it; received(0)
            # decodes what followed it in the same read
            frames.extend(self._decoder.received(0))
            if frames:
                break
            n = self._sock.recv_into(self._decoder.get_buffer())
            if n == 0:
                raise ConnectionError("the hub closed the connection")
            frames.extend(self._decoder.received(n))
        return frames.popleft()

    def _handshake(self) -> None:
        try:
            joining = P.Joining(self.secret, 1, f"insitu-rank-{self.rank}")
            kind, payload, _ = self._read_frame()
            self._sock.sendall(b"".join(joining.hello(kind, payload)))
            kind, payload, _ = self._read_frame()
            joining.welcome(kind, payload)
        except (OSError, P.ProtocolError) as exc:
            self._sock.close()
            raise AnalyticsTimeoutError(
                f"rank {self.rank}: handshake with the hub at {self.address} failed: {exc}"
            ) from exc
        self._decoder.max_frame = P.DEFAULT_MAX_FRAME

    def _send(self, msg: Any) -> None:
        self._out.put(P.encode(P.INSITU, msg, compress_min=0))

    def _send_loop(self) -> None:
        sock = self._sock
        while True:
            parts = self._out.get()
            if parts is None:
                return
            try:
                if sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts) < 65536:
                    sock.sendall(b"".join(parts))
                else:
                    for p in parts:
                        sock.sendall(p)
            except OSError as exc:
                self._set_lost(f"sending to the hub failed: {exc}")
                return

    def _recv_loop(self) -> None:
        try:
            while True:
                kind, payload, buffers = self._read_frame()
                if kind != P.INSITU:
                    raise P.ProtocolError(f"unexpected {P.KIND_NAMES[kind]} frame from the hub")
                self._on_message(P.loads(payload, buffers))
        except (OSError, ConnectionError, P.ProtocolError) as exc:
            if not self._closed:
                self._set_lost(f"connection to the analytics hub at {self.address} lost: {exc}")

    def _set_lost(self, why: str) -> None:
        with self._cond:
            if self._lost is None and not self._bye:
                self._lost = why
            self._cond.notify_all()

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        op = msg[0]
        with self._cond:
            if op == "consumed":
                self._consumed = max(self._consumed, int(msg[1]))
            elif op == "select":
                _, sid, step, name, box = msg
                self._add_entry(sid, step, name, box)
            elif op == "steer":
                _, key, step, value = msg
                self._steer.setdefault(key, StepMap()).add(step, value)
            elif op == "start":
                _, consumed, backpressure, first_step, lease, selects, steers = msg
                self._consumed, self._backpressure = int(consumed), int(backpressure)
                self._idle_lease = int(lease)
                self._first_step = int(first_step)
                for sid, step, name, box in selects:
                    self._add_entry(sid, step, name, box)
                for key, step, value in steers:
                    self._steer.setdefault(key, StepMap()).add(step, value)
                self._ready = True
            elif op == "bye":
                # the analytics finished: nothing is wanted any more, and no
                # steering value will change
                self._bye = True
                self._subs.clear()
                self._consumed = 1 << 62
            else:
                raise P.ProtocolError(f"unknown in-situ message {op!r} from the hub")
            self._cond.notify_all()

    def _add_entry(self, sid: int, step: int, name: str | None, box: Box | None) -> None:
        entry = _Entry(name, box, self.arrays.get(name) if name else None)
        self._subs.setdefault(sid, StepMap()).add(step, entry)

    def _check(self) -> None:
        if self._lost is not None:
            raise AnalyticsTimeoutError(f"rank {self.rank}: {self._lost}")

    # ----------------------------------------------------------------- steps
    def _advance(self, step: int) -> None:
        """Move to ``step`` (the same or the next one); report pieces not published."""
        if self._step is None:
            if step != self._first_step:
                raise ValueError(f"the first published step must be {self._first_step} "
                                 f"(Hub(first_step=...)), got {step}")
        elif step == self._step:
            return
        elif step != self._step + 1:
            raise ValueError(f"publish steps must be consecutive: got {step} after "
                             f"{self._step}; publish every step (or number published "
                             "steps consecutively)")
        else:
            self._report_skipped(self._step)
        self._step = step
        self._published = set()
        if (self._idle_lease and step > self._consumed + self._backpressure - self._idle_lease // 2
                and self._waiting_sent < step and not self._wanted(step)):
            # idle: say where we are half a lease before the end of it, so
            # the hub's extension arrives before this rank would have to wait
            self._waiting_sent = step
            self._send(("waiting", self.rank, step))

    def _entries_at(self, step: int) -> list[tuple[int, _Entry]]:
        """Each subscription's selection in effect at ``step``: (id, entry)."""
        with self._cond:
            return [(sid, e) for sid, m in self._subs.items()
                    if (e := m.at(step)) is not None]

    def _wanted(self, step: int) -> bool:
        """True when some subscription wants some array at ``step`` (from any rank)."""
        return any(e.name is not None for _, e in self._entries_at(step))

    def _report_skipped(self, step: int) -> None:
        """Tell the hub which wanted pieces of ``step`` this rank did not publish."""
        for sid, e in self._entries_at(step):
            if e.slices is not None and e.name not in self._published:
                self._send(("skip", sid, step, self.rank))

    def _wait_horizon(self, step: int) -> None:
        """Block until the analytics lets this rank reach ``step`` (backpressure)."""
        cond = self._cond
        if step <= self._consumed + self._backpressure and self._lost is None:
            return
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        with cond:
            while step > self._consumed + self._backpressure:
                if self._lost is not None:
                    break
                if self._waiting_sent < step:
                    # the hub cannot see steps that nobody wants: say where we are
                    self._waiting_sent = step
                    self._send(("waiting", self.rank, step))
                left = deadline - time.monotonic()
                if left <= 0:
                    self.waited += time.monotonic() - t0
                    raise AnalyticsTimeoutError(
                        f"rank {self.rank}: the analytics has not consumed step "
                        f"{step - self._backpressure} within {self.timeout:g} s "
                        f"(backpressure {self._backpressure}); is it still running?"
                    )
                cond.wait(left)
        self.waited += time.monotonic() - t0
        self._check()

    def publish(self, name: str, block: Any, step: int) -> int:
        """Offer this rank's block of array ``name`` at ``step``; return the bytes sent.

        Sends only the part of the block that some subscription wants at
        this step (nothing, at the cost of a few dictionary lookups, when
        nobody does), as a copy, so the simulation may overwrite ``block``
        as soon as this returns. Blocks only when the simulation is
        ``backpressure`` steps ahead of the analytics.

        Raises:
            AnalyticsTimeoutError: the analytics is gone, or did not catch
                up within ``timeout``.
            ValueError: a step out of sequence, an unknown name, a block of
                the wrong shape, or the same name twice in one step.
        """
        if self._closed:
            raise RuntimeError("publish() after Bridge.close()")
        self._check()
        step = int(step)
        block = np.asarray(block)
        blk = self.arrays.get(name)
        if blk is None:
            raise ValueError(f"unknown array {name!r}; this bridge publishes {sorted(self.arrays)}")
        if block.shape != blk.shape:
            raise ValueError(f"array {name!r}: block of shape {block.shape} does not "
                             f"match its layout {blk.shape}")
        self._advance(step)
        if name in self._published:
            raise ValueError(f"array {name!r} was already published at step {step}")
        self._published.add(name)
        self._wait_horizon(step)
        sent = 0
        now = time.time()
        for sid, e in self._entries_at(step):
            if e.name != name or e.slices is None:
                continue
            piece = np.array(block[e.slices], copy=True, order="C")
            self._send(("piece", sid, step, self.rank, now, piece))
            sent += piece.nbytes
            self.pieces_sent += 1
        self.bytes_sent += sent
        return sent

    def get(self, key: str, step: int, default: Any = _MISSING) -> Any:
        """The steering value ``key`` in effect at ``step``: the same on every rank.

        Waits (like ``publish``) until the analytics can no longer change
        the value for ``step``, then returns the value of the latest
        ``Hub.steer(key, value, step=f)`` with ``f <= step``.

        Raises:
            KeyError: no value for ``key`` at ``step`` and no ``default``.
            AnalyticsTimeoutError: as for ``publish``.
        """
        step = int(step)
        self._check()
        self._wait_horizon(step)
        with self._cond:
            m = self._steer.get(key)
            value = _MISSING if m is None else m.at(step, _MISSING)
        if value is not _MISSING:
            return value
        if default is _MISSING:
            raise KeyError(f"no steering value {key!r} at step {step}")
        return default

    @property
    def state(self) -> str:
        """``"active"``, ``"finished"`` (the hub closed: run on freely) or ``"lost"`` (it broke).

        After ``"lost"``, ``publish`` and ``get`` raise ``AnalyticsTimeoutError``;
        ``reason`` says what happened.
        """
        if self._bye:
            return "finished"
        return "active" if self._lost is None else "lost"

    @property
    def reason(self) -> str | None:
        """Why the analytics released this rank (None while it is active)."""
        if self._bye:
            return "the analytics closed the hub"
        return self._lost

    @property
    def consumed(self) -> int:
        """The newest step the analytics has finished with, as last heard."""
        return self._consumed

    def close(self) -> None:
        """Tell the hub this rank is done, flush what is queued and disconnect."""
        if self._closed:
            return
        if self._step is not None and self._lost is None:
            self._report_skipped(self._step)
        if self._lost is None:
            self._send(("close", self.rank, {"bytes_sent": self.bytes_sent,
                                             "pieces_sent": self.pieces_sent,
                                             "waited": self.waited}))
        self._closed = True
        self._out.put(None)
        self._sender.join(self.timeout)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        self._receiver.join(self.timeout)
        self._sock.close()

    def _abandon(self) -> None:
        self._closed = True
        self._out.put(None)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._abandon()
