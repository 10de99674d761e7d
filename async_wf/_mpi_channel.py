"""Frames between MPI ranks, bridged to an asyncio loop.

The frames are those of ``async_wf.protocol``, cut in two kinds of MPI
message: the *head* (header, buffer table and pickle payload, joined) and
then each out-of-band buffer as a message of its own, sent from the
array's own memory and received into a fresh, aligned NumPy allocation on
the other side. NumPy data is thus never pickled into bytes, nor copied
into a frame: MPI moves it.

Bridging MPI and asyncio
    MPI has no file descriptor an event loop could wait on, and a blocking
    receive in MPICH spins on its core. So one *poller thread* per process
    asks MPI (``Improbe``, ``Testsome``) whether anything arrived, hands
    complete frames to the loop in batches (one ``call_soon_threadsafe``
    per batch), and sleeps between polls on an ``Event`` with a timeout
    that grows with the time nothing has happened: 20 µs for the first
    millisecond, then 100 µs, 1 ms after 20 ms and 10 ms after a second of
    silence. A reply to a frame just sent is thus seen within tens of
    microseconds, while a rank whose tasks run for seconds polls a hundred
    times a second. Sends are posted by the loop's thread itself (MPI is
    initialised with ``MPI_THREAD_MULTIPLE``), which also wakes the poller,
    since a reply is now likely. Sleeping rather than spinning matters
    twice: the poller would steal the CPU of the ranks it shares cores with,
    and hold the GIL that the loop's thread needs.

Ordering
    MPI keeps the order of messages between two ranks on one tag, so the
    buffers of a frame are matched by the receives posted when its head
    arrived, and frames from one rank are delivered in the order sent, even
    when a large frame's buffers complete after a small frame behind it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from async_wf import protocol as P

log = logging.getLogger("async_wf")

TAG_HEAD = 0x6177  # "aw"
TAG_BUF = 0x6178
# the answer to a blocking fetch (``HeldFuture.result()`` on the root): on
# tags of its own, which the poller never matches, so that the asker can
# receive it itself while its loop is held up in that call
TAG_SYNC_HEAD = 0x6179
TAG_SYNC_BUF = 0x617A

# (idle seconds below which, poll interval in seconds): see the module docstring
_BACKOFF = ((1e-3, 20e-6), (20e-3, 100e-6), (1.0, 1e-3))
_BACKOFF_MAX = 10e-3


def poll_interval(idle: float) -> float:
    """Seconds to wait before the next poll, after ``idle`` seconds without traffic."""
    for below, interval in _BACKOFF:
        if idle < below:
            return interval
    return _BACKOFF_MAX

Frame = tuple[int, int, memoryview, list[Any]]  # source rank, kind, payload, buffers


def require_thread_multiple() -> Any:
    """Import and initialise mpi4py; return ``MPI``, checking the thread level we need.

    Raises:
        ImportError: mpi4py is not installed.
        RuntimeError: MPI was initialised with less than ``MPI_THREAD_MULTIPLE``.
    """
    from mpi4py import MPI

    level = MPI.Query_thread()
    if level != MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                 MPI.THREAD_SERIALIZED: "serialized"}
        raise RuntimeError(
            "async_wf needs MPI initialised with MPI_THREAD_MULTIPLE (mpi4py's default), "
            f"got MPI_THREAD_{names.get(level, str(level)).upper()}; "
            "do not lower mpi4py.rc.thread_level"
        )
    return MPI


def _tight_timer_slack() -> None:
    """Make this thread's short sleeps last what they ask for.

    Linux lets a sleep overrun by the thread's timer slack, 50 µs by
    default, to batch wake-ups: a 20 µs poll interval would become 70 µs.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in ns
    except (OSError, AttributeError):
        pass


class _Incoming:
    __slots__ = ("bufs", "kind", "payload", "reqs", "table")

    def __init__(self, kind: int, payload: memoryview, table: list[tuple[int, int]],
                 bufs: list[Any], reqs: list[Any]) -> None:
        self.kind = kind
        self.payload = payload
        self.table = table
        self.bufs = bufs
        self.reqs = reqs


class MpiChannel:
    """Send frames to ranks of ``comm``; deliver the frames that arrive to ``on_frames``.

    ``on_frames(frames)`` runs on ``loop`` with a list of
    ``(source, kind, payload, buffers)``; ``on_error(source, exc)`` runs
    there when a rank sent something that is not a valid frame (that
    message is dropped; what to do with the rank is the caller's call).

    Args:
        comm: a communicator used by this channel only (a ``Dup``).
        loop: the event loop of the process.
        max_frame: the largest frame accepted.
    """

    def __init__(
        self,
        comm: Any,
        loop: asyncio.AbstractEventLoop,
        on_frames: Callable[[list[Frame]], None],
        on_error: Callable[[int, BaseException], None],
        max_frame: int = P.DEFAULT_MAX_FRAME,
    ) -> None:
        self.MPI = require_thread_multiple()
        self.comm = comm
        self.loop = loop
        self.on_frames = on_frames
        self.on_error = on_error
        self.max_frame = max_frame
        self.bytes_out = 0
        self.bytes_in = 0
        self.polls = 0
        self._new_sends: collections.deque[tuple[list[Any], list[Any]]] = collections.deque()
        self._pending: list[tuple[list[Any], list[Any]]] = []  # the poller's own
        self._inbox: collections.deque[Frame] = collections.deque()
        self._errors: collections.deque[tuple[int, BaseException]] = collections.deque()
        self._kick = threading.Event()
        self._stop = False
        self._delivering = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._in_loop = False
        self._status = self.MPI.Status()
        self._incoming: dict[int, collections.deque[_Incoming]] = {}
        self._n_incoming = 0
        self.last_activity = time.monotonic()

    def start(self) -> None:
        """Start polling: inside the loop if it runs on an ``MpiSelector``, else in a thread."""
        sel = getattr(self.loop, "_selector", None)
        if isinstance(sel, MpiSelector):
            self._in_loop = True
            sel.channels.append(self)
            return
        self._thread = threading.Thread(target=self._poll_thread, name="async_wf-mpi",
                                        daemon=True)
        self._thread.start()

    def send(self, dest: int, parts: list[Any], sync: bool = False) -> None:
        """Post one frame (``protocol.encode``'s parts) to rank ``dest``; returns at once.

        The parts are kept alive until MPI is done with them. ``sync``: on
        the tags of a blocking fetch's answer (``recv_frame``), not the
        channel's own.
        """
        comm = self.comm
        tag_head, tag_buf = (TAG_SYNC_HEAD, TAG_SYNC_BUF) if sync else (TAG_HEAD, TAG_BUF)
        head = b"".join(parts[:3])
        reqs = [comm.Isend(head, dest, tag_head)]
        n = len(head)
        for buf in parts[3:]:
            reqs.append(comm.Isend(buf, dest, tag_buf))
            n += buf.nbytes if isinstance(buf, memoryview) else len(buf)
        self.bytes_out += n
        self.last_activity = time.monotonic()
        self._new_sends.append((reqs, parts))
        if not self._in_loop:
            self._kick.set()

    def recv_frame(self, src: int) -> tuple[int, memoryview, list[Any]]:
        """Receive the answer of rank ``src`` to a blocking fetch: (kind, payload, buffers).

        Blocks, polling with the backoff of an idle channel (a blocking MPI
        receive would spin on its core). Any thread may call it, one at a
        time per source (the caller's lock): the poller never matches these
        tags, so the channel goes on meanwhile if it has a thread of its own.

        Raises:
            ProtocolError: what arrived is not a valid frame.
        """
        MPI = self.MPI
        comm = self.comm
        status = MPI.Status()
        t0 = time.monotonic()
        while True:
            msg = comm.Improbe(src, TAG_SYNC_HEAD, status)
            if msg is not None:
                break
            idle = time.monotonic() - t0
            if idle < 200e-6:
                os.sched_yield()
            else:
                time.sleep(poll_interval(idle))
        head = bytearray(status.Get_count(MPI.BYTE))
        msg.Recv(head)
        kind, payload, table = P.parse_head(memoryview(head), self.max_frame)
        bufs: list[Any] = []
        for stored, codec in table:
            b: Any = np.empty(stored, np.uint8)
            comm.Recv(b, src, TAG_SYNC_BUF)
            bufs.append(P.decode_buffer(memoryview(b), codec))
        self.bytes_in += len(head) + sum(stored for stored, _ in table)
        return kind, payload, bufs

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop polling once the sends posted so far have left, from the loop's thread."""
        deadline = time.monotonic() + timeout
        while self.transferring() and time.monotonic() < deadline:
            if self._in_loop:
                await asyncio.sleep(0)  # the selector moves them
            else:
                self._kick.set()
                await asyncio.sleep(1e-3)
        self._stop_polling()

    def _stop_polling(self) -> None:
        self._stop = True
        self._kick.set()
        if self._thread is not None:
            self._thread.join()
        sel = getattr(self.loop, "_selector", None)
        if isinstance(sel, MpiSelector) and self in sel.channels:
            sel.channels.remove(self)

    # ----------------------------------------------------------------- polling
    def progress(self) -> bool:
        """One round of non-blocking MPI work; True if anything moved.

        Completes sends, receives the heads that arrived and posts the
        receives of their buffers, and queues the frames now complete for
        delivery on the loop. Called by one thread only (the poller, or the
        loop's selector).
        """
        MPI = self.MPI
        busy = False
        pending = self._pending
        while self._new_sends:
            pending.append(self._new_sends.popleft())
        if pending:
            keep = [item for item in pending if not MPI.Request.Testall(item[0])]
            if len(keep) != len(pending):
                busy = True
                pending[:] = keep
        comm = self.comm
        status = self._status
        while True:
            msg = comm.Improbe(MPI.ANY_SOURCE, TAG_HEAD, status)
            if msg is None:
                break
            busy = True
            src = status.Get_source()
            head = bytearray(status.Get_count(MPI.BYTE))
            msg.Recv(head)
            self.bytes_in += len(head)
            try:
                kind, payload, table = P.parse_head(memoryview(head), self.max_frame)
            except P.ProtocolError as exc:
                self._error(src, exc)
                continue
            bufs: list[Any] = []
            reqs: list[Any] = []
            for stored, _codec in table:
                b = np.empty(stored, np.uint8)
                reqs.append(comm.Irecv(b, src, TAG_BUF))
                bufs.append(b)
                self.bytes_in += stored
            self._incoming.setdefault(src, collections.deque()).append(
                _Incoming(kind, payload, table, bufs, reqs))
            self._n_incoming += 1
        if self._n_incoming:
            for src, q in self._incoming.items():
                while q and (not q[0].reqs or MPI.Request.Testall(q[0].reqs)):
                    self._n_incoming -= 1
                    busy = True
                    self._complete(src, q.popleft())
        if busy:
            self.last_activity = time.monotonic()
        return busy

    def transferring(self) -> bool:
        """Whether frames are half sent or half received (they need MPI calls to move)."""
        return bool(self._pending or self._n_incoming or self._new_sends)

    def _poll_thread(self) -> None:
        _tight_timer_slack()
        kick = self._kick
        while not self._stop:
            self.polls += 1
            if self.progress():
                continue
            wait = poll_interval(time.monotonic() - self.last_activity)
            if self.transferring():
                wait = min(wait, 100e-6)
            if kick.wait(wait):
                kick.clear()
                self.last_activity = time.monotonic()

    def _complete(self, src: int, item: _Incoming) -> None:
        try:
            buffers = [P.decode_buffer(memoryview(b), codec)
                       for b, (_stored, codec) in zip(item.bufs, item.table, strict=True)]
        except P.ProtocolError as exc:
            self._error(src, exc)
            return
        self._inbox.append((src, item.kind, item.payload, buffers))
        self._schedule()

    def _error(self, src: int, exc: BaseException) -> None:
        self._errors.append((src, exc))
        self._schedule()

    def _schedule(self) -> None:
        with self._lock:
            if self._delivering:
                return
            self._delivering = True
        try:
            if self._in_loop:
                self.loop.call_soon(self._deliver)
            else:
                self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody to deliver to
            pass

    # ---------------------------------------------------------------- the loop
    def _deliver(self) -> None:
        with self._lock:
            self._delivering = False
        while self._errors:
            src, exc = self._errors.popleft()
            self.on_error(src, exc)
        inbox = self._inbox
        if inbox:
            frames = [inbox.popleft() for _ in range(len(inbox))]
            self.on_frames(frames)


# ------------------------------------------------------ polling inside the loop
#: seconds after the last traffic during which the loop polls MPI without
#: sleeping (ASYNC_WF_MPI_SPIN_US overrides, in microseconds)
SPIN = float(os.environ.get("ASYNC_WF_MPI_SPIN_US", "300")) * 1e-6
# after the spin: (idle seconds below which, sleep between polls); the first
# sleeps are short sleeps of the loop's thread, the later ones epoll timeouts
_LOOP_BACKOFF = ((20e-3, 50e-6), (1.0, 1e-3))


class MpiSelector(selectors.DefaultSelector):
    """A selector that also drives the MPI channels of its loop.

    An asyncio loop built on it (``new_event_loop``) polls MPI in its own
    thread, at the top of every iteration, so a frame that arrives becomes
    a callback in that iteration: no thread hand-off on the way in or out.
    A thread hand-off costs tens of microseconds each way on a loaded
    machine; a round trip between two ranks took 320 µs through a poller
    thread and 38 µs this way. The price is CPU: for ``SPIN`` seconds
    after the last traffic the loop polls without sleeping (yielding the
    core between polls), then it sleeps between polls, longer and longer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[MpiChannel] = []

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Poll the MPI channels, then the file descriptors, within the backoff's limit."""
        channels = self.channels
        if not channels or timeout == 0:
            for ch in channels:
                ch.progress()
            return super().select(timeout)
        busy = False
        for ch in channels:
            if ch.progress():
                busy = True
        if busy:
            return super().select(0)
        idle = time.monotonic() - max(ch.last_activity for ch in channels)
        if idle < SPIN or any(ch.transferring() for ch in channels):
            os.sched_yield()
            return super().select(0)
        pause = _BACKOFF_MAX
        for below, interval in _LOOP_BACKOFF:
            if idle < below:
                pause = interval
                break
        if pause < 1e-3:
            time.sleep(pause)
            return super().select(0)
        return super().select(pause if timeout is None else min(timeout, pause))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop that polls MPI in its own thread (see ``MpiSelector``)."""
    _tight_timer_slack()
    return asyncio.SelectorEventLoop(MpiSelector())
