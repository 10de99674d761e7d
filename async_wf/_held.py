"""Results that stay on the worker that computed them, and how others get them.

A worker keeps a result of at least ``keep_min`` bytes (WELCOME says how
many; 0 for none) in its store, keyed by the request id of the attempt
that made it, and reports only its size and type (R_HELD). The scheduler
resolves the task's future with a ``HeldRef`` (where the value is), and
dependents receive that reference as their argument: the worker that runs
one fetches the value from the holder's data port, or takes it from its
own store when it holds it itself (no copy, no network). The application
fetches when it awaits the future (``HeldFuture`` in ``_futures``).

A reference is mutable on purpose: when its holder is lost and the value is
recomputed elsewhere (lineage), the scheduler points the same object to its
new place, and every task still waiting on it follows.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

from async_wf import protocol as P

__all__ = ["AHEAD_INPUT", "AheadInput", "HeldRef", "data_items", "fetch_sync", "read_data",
           "transfer_counters"]

_NO_VALUE: Any = object()
# bytes this process served from its data port and fetched from others' (a
# worker's own counters; ``transfer_counters`` reads them, e.g. from a task)
_counts = {"bytes_served": 0, "bytes_fetched": 0, "fetches": 0}


class AheadInput:
    """Stands, in the arguments of a task sent ahead, for the value its input will make.

    A task whose only unfinished input runs on the same worker may be sent
    there before that input finishes (``RemoteTransport.send_ahead``); the
    worker puts the value in place of this marker when the input is done.
    It pickles by name, so it is the same object on both ends.
    """

    __slots__ = ()

    def __reduce__(self) -> str:
        return "AHEAD_INPUT"

    def __repr__(self) -> str:
        return "AHEAD_INPUT"


AHEAD_INPUT = AheadInput()


def transfer_counters() -> dict[str, int]:
    """Bytes of held results this process served to others and fetched from them.

    Called in a task, it tells what its worker moved: a worker-to-worker
    transfer counts on both ends.
    """
    return dict(_counts)


def count_fetched(n: int) -> None:
    """Add ``n`` bytes fetched from another worker's data port."""
    _counts["bytes_fetched"] += n
    _counts["fetches"] += 1


class HeldRef:
    """Where a result that stayed on a worker is: worker id, key there, data address.

    ``value`` is set instead when the result is small enough to travel (a
    recomputed one may be): then it is the value itself.
    """

    __slots__ = ("addr", "cached", "key", "size", "typename", "value", "wid")

    def __init__(self, wid: int, key: int, addr: str, size: int, typename: str,
                 value: Any = _NO_VALUE) -> None:
        self.wid = wid
        self.key = key
        self.addr = addr
        self.size = size
        self.typename = typename
        self.value = value
        #: the value once fetched to the application (never pickled)
        self.cached: Any = _NO_VALUE

    @property
    def fetched(self) -> bool:
        """Whether the application has the value already (``cached``)."""
        return self.cached is not _NO_VALUE

    @property
    def inline(self) -> bool:
        """Whether the value travels with the reference."""
        return self.value is not _NO_VALUE

    def __reduce__(self) -> tuple[Any, ...]:
        where = (self.wid, self.key, self.addr, self.size, self.typename)
        return (HeldRef, (*where, self.value) if self.inline else where)

    def __repr__(self) -> str:
        return (f"<HeldRef {self.typename} of {self.size} bytes on worker #{self.wid} "
                f"(key {self.key})>")


def data_items(store: dict[int, Any], keys: Any, bufs: list[Any]) -> list[tuple[Any, ...]]:
    """The DATA items answering FETCH ``keys`` from ``store``: (key, status, nbufs, blob).

    Status 0: the value follows; 1: this worker does not hold it (freed, or
    never here).

    Raises:
        ProtocolError: ``keys`` is not a list of ints.
    """
    if type(keys) is not list or not all(type(k) is int for k in keys):
        raise P.ProtocolError(f"FETCH wants a list of keys, got {keys!r:.80}")
    items = []
    for key in keys:
        value = store.get(key, _NO_VALUE)
        if value is _NO_VALUE:
            items.append((key, 1, 0, b""))
            continue
        n0 = len(bufs)
        blob = P.pack(value, bufs)
        items.append((key, 0, len(bufs) - n0, blob))
        _counts["bytes_served"] += P.packed_size(blob, bufs, n0)
    return items


def read_data(payload: Any, buffers: list[Any]) -> dict[int, Any]:
    """The values of a DATA frame, by key; a key the holder lacks maps to ``KeyError``.

    Raises:
        ProtocolError: the frame is not a list of (key, status, nbufs, blob).
    """
    try:
        items = P.loads(payload, buffers)
        out: dict[int, Any] = {}
        pos = 0
        for key, status, nbufs, blob in items:
            start = pos
            pos += nbufs
            if status == 0:
                out[key] = P.unpack(blob, buffers, start, nbufs)
            else:
                out[key] = KeyError(key)
        return out
    except (TypeError, ValueError) as exc:
        raise P.ProtocolError(f"malformed DATA frame: {exc}") from exc


def fetch_sync(addr: str, secret: bytes, keys: list[int], timeout: float = 60.0) -> dict[int, Any]:
    """Fetch ``keys`` from the data port at ``addr`` (``tcp://host:port``), blocking.

    For ``HeldFuture.result()``, which cannot wait on the event loop it
    runs on: a connection of its own, the same handshake as a worker's.

    Raises:
        OSError: the holder cannot be reached (it is gone).
        ProtocolError: it broke the protocol or failed the handshake.
    """
    host, port = P.parse_url(addr)
    decoder = P.FrameDecoder()
    frames: deque[tuple[int, memoryview, list[Any]]] = deque()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def frame() -> tuple[int, memoryview, list[Any]]:
            while not frames:
                frames.extend(decoder.received(0))
                if frames:
                    break
                n = sock.recv_into(decoder.get_buffer())
                if n == 0:
                    raise ConnectionError(f"the holder at {addr} closed the connection")
                frames.extend(decoder.received(n))
            return frames.popleft()

        joining = P.Joining(secret, 1, "fetch")
        kind, payload, _ = frame()
        sock.sendall(b"".join(joining.hello(kind, payload)))
        kind, payload, _ = frame()
        joining.welcome(kind, payload)
        decoder.max_frame = P.DEFAULT_MAX_FRAME
        for part in P.encode(P.FETCH, keys):
            sock.sendall(part)
        kind, payload, buffers = frame()
        if kind != P.DATA:
            raise P.ProtocolError(f"expected DATA, got {P.KIND_NAMES.get(kind, kind)}")
        return read_data(payload, buffers)
