"""The analytics' side of in-situ analytics: ``Hub`` and ``Subscription``.

The hub listens for the simulation's ranks (the runtime's framing and HMAC
handshake), tells them what to send from which step, assembles the pieces
of each step into NumPy arrays and hands them to subscriptions in step
order. It lives on the analytics' event loop, beside a ``Runtime`` whose
tasks do the actual analysis.

Each subscription keeps how far its consumer has got; the hub's
``consumed`` is the newest step every subscription is done with, and it
is what holds the simulation back (``backpressure``). See ``_bridge`` for
why a change may only name a step beyond ``consumed + backpressure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import protocol as P
from ._bridge import ADDRESS_ENV, TOKEN_ENV
from ._layout import Block, Box, StepMap, box_shape, intersect, local_slices, normalize_region

log = logging.getLogger("async_wf.insitu")
_INF = 1 << 62
#: steps of per-step statistics kept (bytes, senders, latency) per subscription
HISTORY = 4096
#: seconds a connection may take to authenticate
HANDSHAKE_TIMEOUT = 5.0


@dataclass
class StepRecord:
    """What one step of a subscription cost: who sent, how much, how late."""

    step: int
    senders: tuple[int, ...]
    nbytes: int
    #: seconds from the last piece's publish (on its rank) to its assembly here
    latency: float
    #: when the last piece was published (``time.time()`` on its rank)
    published: float
    #: seconds the hub spent on this step's pieces: bookkeeping and copies into the array
    assembly: float


class _Plan:
    """One selection (name, box from a step on) prepared against the ranks' layouts."""

    __slots__ = ("box", "name", "parts", "region")

    def __init__(self, name: str | None, region: Any) -> None:
        self.name = name
        self.region = region
        #: the region as a box of global indices, once the layouts are known
        self.box: Box | None = None
        #: rank -> slices of the assembled array its piece fills; None until known
        self.parts: dict[int, tuple[slice, ...]] | None = None

    def prepare(self, layouts: dict[int, dict[str, Block]]) -> dict[int, tuple[slice, ...]]:
        if self.parts is None:
            parts: dict[int, tuple[slice, ...]] = {}
            if self.name is not None and self.box is not None:
                origin = tuple(lo for lo, _ in self.box)
                for rank, arrays in layouts.items():
                    blk = arrays.get(self.name)
                    if blk is None:
                        continue
                    part = intersect(self.box, blk.box)
                    if part is not None:
                        parts[rank] = local_slices(part, origin)
            self.parts = parts
        return self.parts


@dataclass
class _Pending:
    """A step being assembled for one subscription."""

    data: np.ndarray[Any, Any] | None = None
    got: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)
    nbytes: int = 0
    t_pub: float = 0.0
    assembly: float = 0.0


class Window(np.ndarray):
    """The last steps of a windowed subscription, stacked on a new first axis.

    A NumPy array in every respect, plus ``steps``: the step number of each
    entry along the first axis, oldest first.
    """

    steps: tuple[int, ...] = ()


class Subscription:
    """A stream of one array (or a region of it), step by step, from a running simulation.

    Iterate with ``async for step, data in sub`` or register a per-step
    callback with ``on_step``. ``data`` is a NumPy array of the region, or,
    with ``window=W``, a ``Window``: the last ``min(W, k)`` steps stacked on
    a new first axis, their step numbers in ``data.steps``. A window starts
    afresh when the selection (array or region) changes. A step counts as
    consumed when the loop asks for the next one (or the callback has
    finished); that is what lets the simulation go on.
    """

    def __init__(self, hub: Hub, sid: int, window: int) -> None:
        self.hub = hub
        self.id = sid
        self.window = window
        self._plans = StepMap()  # the _Plan in effect from each step
        self._ready: dict[int, np.ndarray[Any, Any] | None] = {}
        self._held: int | None = None  # handed out, not yet consumed
        self._consumed = -_INF
        self._event = asyncio.Event()
        self._win: deque[tuple[int, np.ndarray[Any, Any]]] = deque(maxlen=window)
        self._win_sel: tuple[str | None, Box | None] | None = None
        self._closed = False
        self._abandoned = False  # closed at once: nothing more is delivered or awaited
        self._error: BaseException | None = None
        #: per-step statistics of the latest steps (``HISTORY`` at most)
        self.history: deque[StepRecord] = deque(maxlen=HISTORY)

    def __repr__(self) -> str:
        return f"<Subscription {self.id} steps from {self._plans.steps}>"

    @property
    def first_step(self) -> int:
        """The first step this subscription covers (its start may be later than asked)."""
        return int(self._plans.steps[0])

    # --------------------------------------------------------------- selection
    def plan_at(self, step: int) -> _Plan | None:
        """The selection in effect at ``step`` (None before the first)."""
        plan: _Plan | None = self._plans.at(step)
        return plan

    def _next_needed(self, after: int) -> int:
        """The first step > ``after`` this subscription wants, or ``_INF``."""
        steps, plans = self._plans.steps, self._plans.values
        s = max(after + 1, steps[0]) if steps else _INF
        if s >= _INF:
            return _INF
        i = self._plans.index(s)
        if plans[i].name is not None:
            return s
        for st, p in zip(steps[i + 1 :], plans[i + 1 :], strict=True):
            if p.name is not None:
                return st
        return _INF

    def change(self, name: str | None = None, region: Any = None, *,
               step: int | None = None) -> int:
        """Request another array (``name``) or ``region`` from ``step`` on; return that step.

        ``step=None`` takes the earliest step the simulation cannot have
        reached yet. Ranks whose blocks no longer overlap the selection stop
        sending from that step.

        Raises:
            ValueError: ``step`` may already have been published (see
                ``Hub.earliest_step``), or the region is invalid.
        """
        if self._closed:
            raise RuntimeError(f"subscription {self.id} is closed")
        if name is None:
            cur = self.plan_at(_INF)
            name = cur.name if cur is not None else None
        if name is None:
            raise ValueError("change() needs an array name")
        return self.hub._select(self, name, region, step)

    def close(self, step: int | None = None) -> int:
        """Stop this subscription; return the first step it no longer covers.

        ``step=None`` stops it at once: nothing more is delivered, and the
        simulation no longer waits for it. With a ``step``, the steps before
        it are still delivered.
        """
        if self._closed:
            return int(self._plans.steps[-1])
        if step is None:
            self._abandoned = True
            self._ready.clear()
            self._event.set()
        eff = self.hub._select(self, None, None, step)
        self.hub._update_consumed()
        return eff

    def record(self, step: int) -> StepRecord | None:
        """The statistics of ``step`` (None when unknown or too old to be kept)."""
        for rec in reversed(self.history):
            if rec.step == step:
                return rec
            if rec.step < step:
                break
        return None

    # ---------------------------------------------------------------- delivery
    def _deliver_ready(self) -> None:
        self._event.set()

    def _consumed_through(self) -> int:
        """Every step up to this one is done with, as far as this subscription goes."""
        if self._abandoned:
            return _INF
        nxt = self._next_needed(self._consumed)
        return _INF if nxt >= _INF else nxt - 1

    def _consume(self, step: int) -> None:
        self._held = None
        self._consumed = max(self._consumed, step)
        self.hub._update_consumed()

    def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, Any]]:
        try:
            while True:
                item = await self._get()
                if item is None:
                    return
                yield item
                self._consume(item[0])
        finally:
            if self._held is not None:
                self._consume(self._held)

    async def _get(self) -> tuple[int, Any] | None:
        """The next step (in order) and its data, or None when the simulation has ended."""
        while True:
            if self._error is not None:
                raise self._error
            if self._abandoned:
                return None
            s = self._next_needed(self._consumed)
            if s >= _INF:
                return None
            if s in self._ready:
                data = self._ready.pop(s)
                if data is None:  # every rank skipped this step: nothing to hand out
                    self._consumed = max(self._consumed, s)
                    self.hub._update_consumed()
                    continue
                self._held = s
                return s, self._windowed(s, data)
            if self.hub._finished():
                return None
            self._event.clear()
            await self._event.wait()

    def _windowed(self, step: int, data: np.ndarray[Any, Any]) -> Any:
        if self.window == 1:
            return data
        plan = self.plan_at(step)
        sel = (plan.name, plan.box) if plan is not None else None
        if sel != self._win_sel:
            # another array or region starts a new window: stacking two
            # fields of the same shape would mix quantities unnoticed
            self._win.clear()
            self._win_sel = sel
        self._win.append((step, data))
        win = np.stack([d for _, d in self._win]).view(Window)
        win.steps = tuple(s for s, _ in self._win)
        return win

    def on_step(self, fn: Callable[[int, Any], Any]) -> asyncio.Task[None]:
        """Call ``fn(step, data)`` for every step, awaiting it when it returns an awaitable.

        Returns the task driving the callbacks; it ends when the simulation
        does, and raises what ``fn`` raised.
        """
        async def drive() -> None:
            try:
                async for step, data in self:
                    r = fn(step, data)
                    if inspect.isawaitable(r):
                        await r
            except BaseException:
                # nobody will consume the later steps: do not hold the simulation
                self.close()
                raise

        return asyncio.get_running_loop().create_task(drive())


class Hub:
    """Receives a simulation's published arrays and sends back selections and steering.

    Create it with ``await Hub.start(...)`` on the analytics' loop, give
    ``hub.environ()`` to the simulation's environment (or its address and
    secret to each ``Bridge``), subscribe, and consume.

    Args:
        backpressure: the simulation may publish at most this many steps
            that the analytics has not consumed yet (B >= 1).
        first_step: the step the simulation publishes first.
        idle_lease: while no subscription wants anything, the simulation
            may run this many steps past the last step it reported without
            asking again. The price: a subscription or steering value made
            then takes effect that many steps later at the earliest.
        secret: the secret bridges must prove they hold (default: a new one).
    """

    def __init__(self, *, backpressure: int = 2, first_step: int = 0, idle_lease: int = 32,
                 secret: bytes | None = None) -> None:
        if int(backpressure) < 1:
            raise ValueError(f"backpressure must be >= 1 step, got {backpressure}")
        if int(idle_lease) < 0:
            raise ValueError(f"idle_lease must be >= 0 steps, got {idle_lease}")
        self.backpressure = int(backpressure)
        self.idle_lease = int(idle_lease)
        self.first_step = int(first_step)
        self.secret = secret or P.new_secret()
        self.consumed = self.first_step - 1
        self._known = self.first_step - 1
        self._subs: dict[int, Subscription] = {}
        self._next_sid = 1
        self._steers: list[tuple[str, int, Any]] = []
        self._streams: dict[int, P.FrameStream] = {}
        self._layouts: dict[int, dict[str, Block]] = {}
        self._size: int | None = None
        self._started = False
        self._closed_ranks: set[int] = set()
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._server: asyncio.Server | None = None
        self._done = asyncio.Event()
        self._host = "127.0.0.1"
        self._port = 0
        #: per rank: bytes and pieces received, seconds its publish waited (at close)
        self.rank_stats: dict[int, dict[str, Any]] = {}
        self.bytes_received = 0
        self.pieces_received = 0
        self.dropped = 0
        self.rejected = 0
        #: the time each step became consumed (``HISTORY`` latest), for backpressure checks
        self.consumed_at: deque[tuple[int, float]] = deque(maxlen=HISTORY)

    @classmethod
    async def start(cls, listen: str = "127.0.0.1:0", *, backpressure: int = 2,
                    first_step: int = 0, idle_lease: int = 32,
                    secret: bytes | None = None) -> Hub:
        """Start listening on ``listen`` (``host:port``, port 0 for any) and return the hub.

        The other arguments are those of ``Hub``.
        """
        hub = cls(backpressure=backpressure, first_step=first_step, idle_lease=idle_lease,
                  secret=secret)
        host, port = P.parse_url(listen if "://" in listen else f"tcp://{listen}")
        loop = asyncio.get_running_loop()
        hub._server = await loop.create_server(hub._new_stream, host, port)
        hub._host = host
        hub._port = hub._server.sockets[0].getsockname()[1]
        return hub

    @property
    def address(self) -> str:
        """The ``tcp://host:port`` that bridges connect to."""
        return f"tcp://{self._host}:{self._port}"

    def environ(self) -> dict[str, str]:
        """Environment variables from which a ``Bridge`` finds this hub (address, secret)."""
        return {ADDRESS_ENV: self.address, TOKEN_ENV: self.secret.hex()}

    @property
    def horizon(self) -> int:
        """The newest step the simulation may be at now."""
        return self.consumed + self.backpressure

    def earliest_step(self) -> int:
        """The first step a change (selection, steering) may still name."""
        # before every rank has joined, no rank has published anything
        return self.horizon + 1 if self._started else self.first_step

    # ----------------------------------------------------------------- control
    def subscribe(self, name: str, region: Any = None, *, window: int = 1,
                  step: int | None = None) -> Subscription:
        """Receive array ``name`` (or ``region`` of it) from ``step`` on, every step.

        ``region``: None for the whole array, a tuple of slices, or (start,
        stop) pairs per dimension. ``window``: deliver the last W steps
        stacked. ``step=None``: the earliest step allowed (the first step,
        when the simulation has not started).

        Raises:
            ValueError: an invalid window, region or step.
        """
        if int(window) < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        sub = Subscription(self, self._next_sid, int(window))
        self._next_sid += 1
        eff = self._select(sub, name, region, step, new=True)
        self._subs[sub.id] = sub
        if self._started and step is None and eff > self._known + self.backpressure + 1:
            # the ranks may be anywhere up to the horizon, which a lease taken
            # while nobody subscribed pushed far ahead: say so rather than
            # start silently many steps after the last step seen
            log.warning(
                "subscription %d starts at step %d: the ranks last reported step %d and may "
                "run up to step %d without asking (idle_lease %d + backpressure %d); "
                "subscribe before the simulation starts, or lower idle_lease, to start sooner",
                sub.id, eff, self._known, self.horizon, self.idle_lease, self.backpressure)
        return sub

    def steer(self, key: str, value: Any, step: int | None = None) -> int:
        """Set steering value ``key`` to ``value`` from ``step`` on; return that step.

        Every rank's ``Bridge.get(key, s)`` returns ``value`` for ``s >=
        step`` (until a later change).

        Raises:
            ValueError: ``step`` may already have been reached by the
                simulation (``step < earliest_step()``).
        """
        eff = self._check_step(step, f"steer({key!r})")
        self._steers.append((key, eff, value))
        for stream in self._streams.values():
            stream.send(P.encode(P.INSITU, ("steer", key, eff, value), compress_min=0))
        return eff

    def _check_step(self, step: int | None, what: str) -> int:
        earliest = self.earliest_step()
        if step is None:
            return earliest
        step = int(step)
        if step < earliest:
            raise ValueError(
                f"{what} at step {step}: the simulation may already be at step "
                f"{self.horizon} (consumed {self.consumed} + backpressure "
                f"{self.backpressure}); name a step >= {earliest}, or step=None"
            )
        return step

    def _select(self, sub: Subscription, name: str | None, region: Any,
                step: int | None, new: bool = False) -> int:
        eff = self._check_step(step, f"subscription {sub.id}")
        plan = _Plan(name, region)
        if self._started:
            self._resolve(plan)  # a bad name or region fails here, in the caller
        if name is None:
            sub._closed = True
        sub._plans.add(eff, plan)
        if new:
            sub._consumed = eff - 1
        if self._started:
            for stream in self._streams.values():
                stream.send(P.encode(P.INSITU, ("select", sub.id, eff, plan.name, plan.box),
                                     compress_min=0))
            self._update_consumed()
        return eff

    def _global_shape(self, name: str) -> tuple[int, ...] | None:
        for arrays in self._layouts.values():
            if name in arrays:
                return arrays[name].global_shape
        return None

    def _resolve(self, plan: _Plan) -> None:
        """Check a plan against the layouts and prepare its parts.

        Raises:
            ValueError: no rank publishes the array, or the region lies outside it.
        """
        if plan.name is None:
            return
        shape = self._global_shape(plan.name)
        if shape is None:
            names = sorted({n for a in self._layouts.values() for n in a})
            raise ValueError(f"no rank publishes an array named {plan.name!r}; the "
                             f"simulation publishes {names}")
        plan.box = normalize_region(plan.region, shape)
        plan.prepare(self._layouts)

    # ---------------------------------------------------------------- progress
    def _update_consumed(self) -> None:
        c = _INF
        for sub in self._subs.values():
            c = min(c, sub._consumed_through())
        if c >= _INF:
            # nobody wants anything: let the ranks run idle_lease steps past
            # the last step they reported, rather than make them ask every
            # backpressure steps (a round trip each time)
            c = self._known + self.idle_lease
        if c > self.consumed:
            self.consumed = c
            self.consumed_at.append((c, time.time()))
            msg = P.encode(P.INSITU, ("consumed", c), compress_min=0)
            for stream in self._streams.values():
                stream.send(msg)

    def _finished(self) -> bool:
        """True when every rank has closed or gone: nothing more will arrive."""
        return self._started and len(self._closed_ranks) == self._size

    # ------------------------------------------------------------- connections
    def _new_stream(self) -> P.FrameStream:
        # HANDSHAKE_TIMEOUT is read per connection, not bound at import: tests shorten it
        return P.accepting_stream(self.secret, lambda: HANDSHAKE_TIMEOUT, self._on_join,
                                  self._on_rejected)

    def _on_rejected(self, stream: P.FrameStream, exc: BaseException | None) -> None:
        if isinstance(exc, P.ProtocolError):
            self.rejected += 1

    def _on_join(self, stream: P.FrameStream, challenge: P.Challenge, slots: int, pid: int,
                 name: str) -> tuple[P.FrameHandler, Callable[[BaseException | None], None]]:
        challenge.welcome(0, 0.0, P.DEFAULT_MAX_FRAME)
        state: dict[str, Any] = {}

        def on_frame(kind: int, payload: memoryview, buffers: list[Any]) -> None:
            if kind != P.INSITU:
                raise P.ProtocolError(f"unexpected {P.KIND_NAMES[kind]} frame from a rank")
            msg = P.loads(payload, buffers)
            try:
                self._on_message(stream, state, msg)
            except (TypeError, ValueError, KeyError, IndexError) as exc:
                # a well-framed message of the wrong shape: that rank's
                # connection goes, the hub and the other ranks stay
                raise P.ProtocolError(
                    f"malformed in-situ message {str(msg)[:80]}: {exc!r}") from exc

        def on_lost(exc: BaseException | None) -> None:
            rank = state.get("rank")
            if rank is None:
                if isinstance(exc, P.ProtocolError):
                    self.rejected += 1
                return
            if self._streams.get(rank) is stream:
                del self._streams[rank]
            if rank not in self._closed_ranks:
                log.error("simulation rank %d disconnected without closing its bridge (%s)",
                          rank, exc or "EOF")
                self._closed_ranks.add(rank)
                self._wake_all()

        return on_frame, on_lost

    def _on_message(self, stream: P.FrameStream, state: dict[str, Any],
                    msg: tuple[Any, ...]) -> None:
        op = msg[0]
        if op != "layout" and msg[3 if op in ("piece", "skip") else 1] != state.get("rank"):
            raise ValueError(f"{op!r} for rank {msg[3 if op in ('piece', 'skip') else 1]!r} "
                             f"from the connection of rank {state.get('rank')}")
        if op == "piece":
            _, sid, step, rank, t_pub, arr = msg
            self._on_piece(sid, int(step), int(rank), float(t_pub), arr)
        elif op == "skip":
            _, sid, step, rank = msg
            self._on_piece(sid, int(step), int(rank), 0.0, None)
        elif op == "waiting":
            _, rank, step = msg
            self._known = max(self._known, int(step))
            self._update_consumed()
        elif op == "layout":
            _, rank, size, layout = msg
            self._on_layout(stream, state, int(rank), int(size), layout)
        elif op == "close":
            _, rank, stats = msg
            self.rank_stats.setdefault(int(rank), {}).update(stats)
            self._closed_ranks.add(int(rank))
            stream.close()
            self._wake_all()
        else:
            raise P.ProtocolError(f"unknown in-situ message {op!r}")

    def _on_layout(self, stream: P.FrameStream, state: dict[str, Any], rank: int, size: int,
                   layout: dict[str, Any]) -> None:
        if self._started or (self._size is not None and size != self._size):
            raise P.ProtocolError(f"rank {rank} of {size} joined a simulation of "
                                  f"{self._size} ranks already started")
        if not 0 <= rank < size or rank in self._layouts:
            raise P.ProtocolError(f"rank {rank} of {size} is out of range or joined twice")
        try:
            blocks = {str(n): Block(*v) for n, v in layout.items()}
        except (TypeError, ValueError) as exc:
            raise P.ProtocolError(f"rank {rank}: invalid layout: {exc}") from exc
        self._size = size
        self._layouts[rank] = blocks
        self._streams[rank] = stream
        state["rank"] = rank
        self.rank_stats[rank] = {"bytes": 0, "pieces": 0}
        if len(self._layouts) == size:
            self._begin()

    def _begin(self) -> None:
        """Every rank has joined: prepare the plans, tell the ranks, let them go."""
        selects = []
        for sub in self._subs.values():
            try:
                for plan in sub._plans.values:
                    self._resolve(plan)
            except ValueError as exc:
                # subscribed before the layouts were known: the error
                # surfaces where the subscription is consumed
                sub._error = exc
                sub._abandoned = True
                continue
            selects += [(sub.id, step, plan.name, plan.box)
                        for step, plan in zip(sub._plans.steps, sub._plans.values,
                                              strict=True)]
        self._started = True
        self._update_consumed()
        msg = P.encode(P.INSITU, ("start", self.consumed, self.backpressure, self.first_step,
                                  self.idle_lease, selects, self._steers), compress_min=0)
        for stream in self._streams.values():
            stream.send(msg)
        log.info("in-situ simulation of %d ranks started", self._size)

    def _on_piece(self, sid: int, step: int, rank: int, t_pub: float,
                  arr: np.ndarray[Any, Any] | None) -> None:
        t0 = time.perf_counter()
        if step > self._known:
            self._known = step
        sub = self._subs.get(sid)
        plan = sub.plan_at(step) if sub is not None else None
        if (sub is None or sub._abandoned or plan is None or plan.parts is None
                or rank not in plan.parts):
            self.dropped += 1  # a closed subscription's piece still on its way
            return
        if step <= sub._consumed:
            self.dropped += 1
            return
        key = (sid, step)
        pend = self._pending.get(key)
        if pend is None:
            pend = self._pending[key] = _Pending()
        if arr is None:
            pend.skipped.add(rank)
        else:
            part = plan.parts[rank]
            want = tuple(sl.stop - sl.start for sl in part)
            if arr.shape != want or (pend.data is not None and arr.dtype != pend.data.dtype):
                raise P.ProtocolError(
                    f"rank {rank} sent a piece of {arr.shape} {arr.dtype} for step {step}; "
                    f"expected {want}"
                    + ("" if pend.data is None else f" {pend.data.dtype}"))
            if len(plan.parts) == 1:
                pend.data = arr  # one rank holds the whole region: its piece is the array
            else:
                if pend.data is None:
                    pend.data = np.empty(box_shape(plan.box or ()), dtype=arr.dtype)
                pend.data[part] = arr
            pend.got.add(rank)
            pend.nbytes += arr.nbytes
            pend.t_pub = max(pend.t_pub, t_pub)
            self.bytes_received += arr.nbytes
            self.pieces_received += 1
            rs = self.rank_stats[rank]
            rs["bytes"] += arr.nbytes
            rs["pieces"] += 1
        pend.assembly += time.perf_counter() - t0
        if len(pend.got) + len(pend.skipped) < len(plan.parts):
            return
        del self._pending[key]
        if pend.got and pend.skipped:
            log.error("step %d of array %r: ranks %s published it but ranks %s did not; "
                      "the step is dropped", step, plan.name, sorted(pend.got),
                      sorted(pend.skipped))
            pend.data = None
        if pend.data is not None:
            sub.history.append(StepRecord(step, tuple(sorted(pend.got)), pend.nbytes,
                                          time.time() - pend.t_pub, pend.t_pub,
                                          pend.assembly))
        sub._ready[step] = pend.data
        sub._deliver_ready()

    def _wake_all(self) -> None:
        for sub in self._subs.values():
            sub._deliver_ready()
        if self._finished():
            self._done.set()

    # ------------------------------------------------------------------ ending
    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait until every rank has closed its bridge (or disconnected).

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        await asyncio.wait_for(self._done.wait(), timeout)

    def stats(self) -> dict[str, Any]:
        """Bytes and pieces received (in all, and per rank), drops, the consumed step."""
        return {"bytes_received": self.bytes_received, "pieces_received": self.pieces_received,
                "dropped": self.dropped, "rejected": self.rejected, "consumed": self.consumed,
                "ranks": {r: dict(s) for r, s in sorted(self.rank_stats.items())}}

    async def close(self) -> None:
        """Tell the ranks the analytics is over (they run on freely), stop listening."""
        bye = P.encode(P.INSITU, ("bye",), compress_min=0)
        for stream in list(self._streams.values()):
            stream.send(bye)
            stream.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self._done.set()
        for sub in self._subs.values():
            # a loop still iterating ends: nothing more will arrive
            sub._closed = sub._abandoned = True
            sub._deliver_ready()

    async def __aenter__(self) -> Hub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AnalyticsThread:
    """Analytics running in a thread of a simulation process (say, rank 0), with its own loop.

    ``AnalyticsThread(analytics, backpressure=2)`` starts a thread with a
    fresh event loop, starts a ``Hub`` there and runs ``await
    analytics(hub)``. ``address`` and ``secret`` are for the bridges (share
    them with the other ranks, e.g. with ``comm.bcast``); ``join()`` waits
    for the analytics to end and returns its result, or raises its error.
    The analytics shares the process, and the GIL, with the simulation:
    NumPy work releases it, pure-Python work slows the simulation down.
    """

    def __init__(self, analytics: Callable[[Hub], Awaitable[Any]], **hub_args: Any) -> None:
        self._analytics = analytics
        self._hub_args = hub_args
        self._ready = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self.address = ""
        self.secret = b""
        self._thread = threading.Thread(target=self._main, name="insitu-analytics", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def body() -> Any:
            hub = await Hub.start(**self._hub_args)
            self.address, self.secret = hub.address, hub.secret
            self._ready.set()
            try:
                return await self._analytics(hub)
            finally:
                await hub.close()

        try:
            self._result = asyncio.run(body())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def join(self, timeout: float | None = None) -> Any:
        """Wait for the analytics to finish; return its result.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
            BaseException: what the analytics raised.
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the analytics thread is still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result
