"""What every transport to worker processes shares: credits, batching, results.

``TcpTransport`` and ``MpiTransport`` differ in how workers join and how
frames travel; the placement of tasks on workers, the function cache, the
per-task argument blobs, timeouts, cancellation and the handling of results
are the same and live here. A worker's link is anything with
``send(parts)`` (a frame as ``protocol.encode`` makes it) and byte counters
``bytes_out`` / ``bytes_in``.

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

"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import heapq
import itertools
import logging
import time
import types
import weakref
from array import array
from typing import TYPE_CHECKING, Any, Protocol

import cloudpickle

from async_wf import protocol as P
from async_wf._errors import (
    RemoteError,
    RemoteTraceback,
    ResourceError,
    TaskTimeoutError,
    WorkerLostError,
    retyped,
)
from async_wf._futures import HeldFuture, TaskFuture, with_input
from async_wf._held import AHEAD_INPUT, HeldRef, fetch_sync, read_data
from async_wf._options import ASYNC
from async_wf._resources import CORES, GPUS, MEMORY, Declared, Ledger, Request
from async_wf._task import TaskFunction
from async_wf.transport import Attempt, Transport

if TYPE_CHECKING:
    from async_wf._scheduler import Scheduler
    from async_wf.observe._events import Observer

__all__ = ["RemoteTransport"]

log = logging.getLogger("async_wf")
wlog = logging.getLogger("async_wf.worker")
_FN_CACHE_MAX = 10_000
_FN_CACHE_BYTES = 64 << 20
# tasks in one column of a TASKS frame at most (see protocol.TASKS)
_COLUMN_MAX = 4096


class Link(Protocol):
    """How frames reach one worker."""

    bytes_out: int
    bytes_in: int

    def send(self, parts: list[Any]) -> None:
        """Send one frame, as ``protocol.encode`` returns it."""

    def close(self) -> None:
        """Close after pending sends."""


def _fn_key(fn: Any) -> Any:
    """Cache key of a task function: its identity.

    A bound method never gets here: ``_send_tasks`` sends its function,
    and its object as the first argument.
    """
    return id(fn)


#: no task's function: where _place_plain has not looked one up yet
_NO_FN = object()


def _same_fn(cached: Any, fn: Any) -> bool:
    if cached is fn:
        return True
    return (
        type(fn) is types.MethodType
        and type(cached) is types.MethodType
        and cached.__self__ is fn.__self__
        and cached.__func__ is fn.__func__
    )


class _Held:
    """What the scheduler keeps of a result held on a worker (see ``_held``)."""

    __slots__ = ("again", "app_gone", "lineage", "uses")

    def __init__(self, lineage: tuple[Any, ...]) -> None:
        self.lineage = lineage  # (function, arguments, keywords, options) that made it
        self.uses = 0  # tasks not over that take it as an input
        self.app_gone = False  # the application dropped its future
        self.again: TaskFuture[Any] | None = None  # its recomputation, while it runs


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    # a finalizer may run in any thread, or after the loop closed
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class _Sent(Attempt):
    """Where the current attempt of a task went (``TaskFuture._att``).

    A task sent ahead (see ``RemoteTransport.send_ahead``) has one while it
    still waits, in the core, for its input: ``ahead`` until the core
    releases it, and its outcome, if it comes before that, waits in ``early``.
    """

    __slots__ = ("ahead", "chain", "depth", "early", "keep", "prev", "rid", "w")

    def __init__(self, w: _Worker, rid: int) -> None:
        self.w = w
        self.rid = rid
        self.timer = None
        self.ahead = False
        self.depth = 0  # tasks sent ahead before it in its chain (0: sent when ready)
        self.keep = False  # its worker keeps its value for the task that follows it
        self.prev: TaskFuture[Any] | None = None  # ahead: the input it waits for there
        self.early: tuple[Any, ...] | None = None  # ahead: its outcome, come too soon
        #: shared by a chain sent ahead on one worker: [its last task, how
        #: many of its tasks are still ahead]
        self.chain: list[Any] | None = None


class _Worker:
    __slots__ = (
        "async_limit",
        "budget",
        "cancelling",
        "data_addr",
        "declared",
        "ends",
        "fetches",
        "fids",
        "held",
        "held_refs",
        "id",
        "inflight",
        "last_heard",
        "ledger",
        "n_async",
        "n_req",
        "n_thread",
        "name",
        "pid",
        "quarantine",
        "quick_fids",
        "req_zombies",
        "reserved",
        "slots",
        "stream",
        "thread_limit",
        "thread_open",
        "thread_refill",
        "zombies",
    )

    def __init__(self, stream: Link, wid: int, slots: int, pid: int, name: str,
                 prefetch: int, async_limit: int, declared: Declared | None = None) -> None:
        self.stream = stream
        #: what it declared (cores, memory, gpus, named resources), and what
        #: of that the resource tasks sent to it leave free (see _place_req)
        self.declared = declared if declared is not None else Declared.build(
            cores=slots, memory=0, gpus=0)
        self.ledger = Ledger(self.declared)
        self.n_req = 0  # resource tasks sent, outcome not reported
        self.req_zombies: dict[int, Request] = {}  # timed out, still holding their resources
        #: the resource task waiting for this worker's cores: no new slot task
        #: goes here meanwhile, so that the slots drain and it fits
        self.reserved = False
        #: where other workers fetch the results it holds ("" if it keeps none)
        self.data_addr = ""
        #: when it will be stopped (its batch job ends), time.time(); 0: never known
        self.ends = 0.0
        self.held_refs: set[HeldRef] = set()  # the results it holds
        #: the application's FETCHes on this connection, answered in order
        self.fetches: collections.deque[asyncio.Future[dict[int, Any]]] = collections.deque()
        self.id = wid
        self.slots = slots
        self.pid = pid
        self.name = name
        self.inflight: dict[int, TaskFuture[Any]] = {}
        self.zombies: dict[int, int] = {}  # rid -> kind, given up on but still running there
        self.cancelling: set[int] = set()  # rids sent a CANCEL, outcome not reported yet
        self.fids: set[int] = set()
        self.n_thread = 0
        self.n_async = 0
        self.thread_limit = slots * prefetch
        # new blocking tasks only once no more than this many are outstanding
        # (see RemoteTransport.refill)
        self.thread_refill = self.thread_limit
        self.thread_open = True
        #: functions learnt quick there while it runs every blocking task on
        #: its loop (P.QUICK); not empty: it has the quick credit
        self.quick_fids: set[int] = set()
        self.async_limit = async_limit
        self.last_heard = time.monotonic()
        #: a task that holds this worker whole (an MPI task: transport.mpi);
        #: meanwhile it gets no new blocking task
        self.held: Any = None
        # the rid of a task that was running when a worker was lost, sent here
        # alone: nothing else is sent until it ends (see _pick_alone)
        self.quarantine = 0
        #: tasks it may still be given before it retires (max_tasks_per_child); -1: no limit
        self.budget = -1

    def free(self, kind: int) -> int:
        if self.quarantine or self.budget == 0:
            return 0
        if kind == ASYNC:
            return self.async_limit - self.n_async
        if self.held is not None or self.reserved:
            return 0  # blocking tasks would wait behind the holder: others can run them
        if not self.thread_open:
            return 0
        return self.thread_limit - self.n_thread

    def count(self, kind: int, delta: int) -> None:
        if delta > 0 and self.budget > 0:
            self.budget -= 1
        if kind == ASYNC:
            self.n_async += delta
            return
        n = self.n_thread = self.n_thread + delta
        # hysteresis: closed when full, open again only at the refill mark
        if n >= self.thread_limit:
            self.thread_open = False
        elif n <= self.thread_refill:
            self.thread_open = True


class RemoteTransport(Transport):
    """Base of the transports whose workers are other processes (see the module docstring)."""

    def __init__(self, *, prefetch: int, async_limit: int, compress_min: int,
                 max_lost: int, send_ahead: int = 0) -> None:
        if isinstance(send_ahead, bool) or not isinstance(send_ahead, int) or send_ahead < 0:
            raise ValueError(f"send_ahead must be an int >= 0, got {send_ahead!r}")
        self.send_ahead = send_ahead
        self.n_ahead = 0  # tasks sent ahead of their input's end
        self.n_col_tasks = 0  # tasks sent in columns (protocol.TASKS)
        self.n_col_results = 0  # results received in columns
        self._prefetch = prefetch
        self._async_limit = async_limit
        self._compress_min = compress_min
        self._max_lost = max_lost
        self._sched: Scheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: dict[int, _Worker] = {}
        self._order: list[_Worker] = []
        self._rr = 0
        self._rids = itertools.count(1)
        self._fn_blobs: dict[Any, tuple[Any, int, bytes]] = {}  # _fn_key -> (fn, fid, blob)
        self._next_fid = 0
        self._fn_bytes = 0
        self._fid_floor = 0  # workers may drop the functions with smaller ids
        # popped tasks waiting for a credit of their kind: [async heap, blocking heap]
        self._backlog: tuple[list[tuple[int, int, TaskFuture[Any]]], ...] = ([], [])
        self._async_seen = False
        self._seq = 0
        self._closing = False
        #: rids whose outcome goes to ``_part_outcome``, with what they are part
        #: of (an MPI task's ranks: transport.mpi), not straight to their future
        self._parts: dict[int, Any] = {}
        self.n_workers_lost = 0
        self.n_stolen = 0  # tasks given back unstarted by a busy worker, to run elsewhere
        #: victim's id -> (the worker that asked it for tasks, when)
        self._thieves: dict[int, tuple[_Worker, float]] = {}
        #: results held on workers, with what is needed to make them again
        self._held: dict[HeldRef, _Held] = {}
        self._parked: dict[HeldRef, list[TaskFuture[Any]]] = {}  # waiting for a recompute
        self._again: set[TaskFuture[Any]] = set()  # the recomputations running
        self.n_recomputed = 0
        self.bytes_held = 0  # sizes of the results that stayed on workers
        self.bytes_fetched = 0  # of those, what the application fetched
        #: resource tasks waiting for room: (-priority, seq, future, since), sorted
        self._rq: list[tuple[int, int, TaskFuture[Any], float]] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self._flags = 0  # of every TASKS frame: P.WANT_TIMES with an observer

    def set_observer(self, obs: Observer) -> None:
        """Report task timings to ``obs``: workers then time each task (see worker.py)."""
        super().set_observer(obs)
        self._flags |= P.WANT_TIMES

    def link_bytes(self) -> list[tuple[int, str, int, int]]:
        """Per connected worker: (worker id, name, bytes sent to it, bytes received)."""
        return [(w.id, f"worker #{w.id} {w.name}", w.stream.bytes_out, w.stream.bytes_in)
                for w in self._order]

    # --------------------------------------------------------------- dispatch
    def _pick_alone(self) -> _Worker | None:
        """A worker with nothing outstanding, for a task suspected of killing workers.

        Sent alone, such a task is the only one that can be blamed if the
        worker dies again: a quick task that finished just before it, its
        result not sent yet, is not (without this, one innocent task next
        to the killer in the queue took the blame each time and the killer
        never reached ``max_lost``).
        """
        for w in self._order:
            if (w.n_thread == 0 and w.n_async == 0 and not w.quarantine
                    and w.held is None):
                return w
        return None

    def _send_alone(self, w: _Worker, fut: TaskFuture[Any]) -> None:
        w.count(fut._kind, 1)
        w.quarantine = self._send_tasks(w, [fut]) or 0

    def queued(self) -> int:
        """Tasks not started: in the backlog, or sent ahead to a worker beyond its slots.

        A worker runs at most ``slots`` blocking tasks at once and every
        ``async def`` task it has; the rest of its blocking credit
        (``prefetch``) waits in its queue. An estimate from what was sent:
        a slot between two tasks, or a result on its way back, is counted
        as running.
        """
        n = len(self._backlog[0]) + len(self._backlog[1])
        for w in self._order:
            if w.n_thread > w.slots:
                n += w.n_thread - w.slots
        return n

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
            if w.held is None and w.thread_open and not w.reserved:
                t += w.thread_limit - w.n_thread
            a += w.async_limit - w.n_async
        if a <= 0:
            return t
        return t + (a if self._async_seen else 1)

    def _pick(self, kind: int) -> _Worker | None:
        """A worker with free credit, round robin; but the last one picked if it is idle.

        Going back to an idle worker keeps a dependent chain of blocking
        tasks on one worker, whose loop is awake, instead of alternating
        between workers that each have to wake up; a worker that is busy
        is passed over, so long tasks still spread over the workers.
        """
        order = self._order
        n = len(order)
        if not n:
            return None
        if self._rr >= n:
            self._rr = 0
        w = order[self._rr]
        if kind != ASYNC and w.n_thread < w.slots and w.free(kind) > 0:
            return w
        for _ in range(n):
            self._rr = (self._rr + 1) % n
            w = order[self._rr]
            if w.free(kind) > 0:
                return w
        return None

    def _pick_in_time(self, fut: TaskFuture[Any]) -> _Worker | None:
        """A worker with credit that will still be there when ``fut`` is done (``time=``).

        A worker whose batch job ends sooner is drained of such tasks: it
        gets only what it can finish. None: every worker ends too soon for
        now; the task waits for one that does not (an allocator's next job).
        """
        t = fut._opts.time
        assert t is not None
        done_by = time.time() + t
        kind = fut._kind
        for w in self._order:
            if (not w.ends or w.ends >= done_by) and w.free(kind) > 0:
                return w
        return None

    def dispatch(self, futs: list[TaskFuture[Any]]) -> None:
        """Place each task on a worker with free credit; send one frame per worker."""
        batches: dict[_Worker, list[Any]] = {}
        n_async = 0
        n_req = 0
        i = 0
        n_futs = len(futs)
        while i < n_futs:
            fut = futs[i]
            sent = fut._att
            if type(sent) is _Sent and sent.ahead:
                # sent ahead, and now released by the core: it is there already
                self._released(fut, sent)
                i += 1
                continue
            if i + 1 < n_futs and fut._kind != ASYNC:
                # two tasks or more: the plain ones a run at a time (for one
                # task, reading every worker's credit costs more than it saves)
                j = self._place_plain(futs, i, batches)
                if j > i:
                    i = j
                    continue
            i += 1
            kind = fut._kind
            if fut._opts.request is not None:
                self._seq += 1
                bisect.insort(self._rq, (-fut._opts.priority, self._seq, fut, time.monotonic()))
                fut._att = None
                n_req += 1
                continue
            refs = fut._refs
            if refs is not None:
                dead = [r for r in refs if not r.inline and r.wid not in self._workers]
                if dead:
                    self._park(fut, dead)
                    continue
            if fut._opts.time is not None:
                if kind == ASYNC:
                    n_async += 1
                w = self._pick_in_time(fut)
            elif refs is not None and not fut._lost:
                if kind == ASYNC:
                    n_async += 1
                w = self._near(refs, kind) or self._pick(kind)
            elif kind == ASYNC:
                n_async += 1
                w = self._pick(kind)
            elif fut._lost:
                # blamed once: alone on an idle worker, or to the backlog until one is
                w = self._pick_alone()
                if w is not None:
                    self._send_alone(w, fut)
                    continue
            else:
                # a plain task alone (_place_plain makes the same decision for a run)
                w = self._pick(kind)
                if w is not None and w.quick_fids:
                    w = self._pick_quick(fut, w)
            if w is None:
                self._seq += 1
                heapq.heappush(self._backlog[kind != ASYNC],
                               (-fut._opts.priority, self._seq, fut))
                fut._att = None
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
        if n_req:
            self._place_req()

    def _place_plain(self, futs: list[TaskFuture[Any]], i: int,
                     batches: dict[_Worker, list[Any]]) -> int:
        """Place the run of plain blocking tasks that starts at ``futs[i]``; return where it ends.

        Plain: not ``async def``, not sent ahead, with no resource request,
        no ``time=``, no held inputs and not blamed for a lost worker. Each
        goes where ``_pick`` and then ``_pick_quick`` would put it, and is
        counted as ``_Worker.count`` would count it, decision for decision;
        but the workers' credit is read once per run into lists and written
        back at its end, which saves the three method calls and a dozen
        attribute reads per task that made placement about a third of the
        scheduler's time on a no-op workload. A task no worker can take goes
        to the backlog, as in ``dispatch``.
        """
        n_futs = len(futs)
        order = self._order
        n = len(order)
        cap: list[int] | None = None  # read at the first task of the run
        nth: list[int] = []
        bud: list[int] = []
        slots: list[int] = []
        normal: list[int] = []
        quick: list[set[int]] = []
        out: list[list[Any] | None] = []
        rr = self._rr
        fn_blobs = self._fn_blobs
        last_fn: Any = _NO_FN
        fid: int | None = None
        start = i
        while i < n_futs:
            fut = futs[i]
            kind = fut._kind
            if kind == ASYNC or fut._refs is not None or fut._lost:
                break
            opts = fut._opts
            if opts.request is not None or opts.time is not None:
                break
            sent = fut._att
            if type(sent) is _Sent and sent.ahead:
                break
            if cap is None:
                per_slot = self._prefetch
                cap = [w.free(kind) for w in order]
                nth = [w.n_thread for w in order]
                bud = [w.budget for w in order]
                slots = [w.slots for w in order]
                normal = [w.slots * per_slot for w in order]
                quick = [w.quick_fids for w in order]
                out = [None] * n
            # _pick
            k = -1
            if n:
                if rr >= n:
                    rr = 0
                if nth[rr] < slots[rr] and cap[rr] > 0:
                    k = rr
                else:
                    # round robin: the next worker with credit (most often the next one)
                    for _ in range(n):
                        rr += 1
                        if rr == n:
                            rr = 0
                        if cap[rr] > 0:
                            k = rr
                            break
            # _pick_quick
            if k >= 0 and quick[k]:
                fn = fut._fn
                if fn is not last_fn:
                    last_fn = fn
                    entry = fn_blobs.get(_fn_key(fn))
                    fid = entry[1] if entry is not None and entry[0] is fn else None
                if (fid is None or fid not in quick[k]) and nth[k] >= normal[k]:
                    k = -1
                    for o in range(n):
                        if nth[o] < normal[o] and cap[o] > 0:
                            k = o
                            break
            i += 1
            if k < 0:
                self._seq += 1
                heapq.heappush(self._backlog[1], (-opts.priority, self._seq, fut))
                fut._att = None
                continue
            # _Worker.count
            nth[k] += 1
            cap[k] -= 1
            if bud[k] > 0:
                bud[k] -= 1
                if not bud[k]:
                    cap[k] = 0
            fs = out[k]
            if fs is None:
                fs = out[k] = batches.setdefault(order[k], [])
            fs.append(fut)
        if i > start:
            self._rr = rr
            for k, fs in enumerate(out):
                if fs is not None:
                    w = order[k]
                    w.n_thread = nth[k]
                    w.budget = bud[k]
                    # the hysteresis of count: open (it had credit) unless now full
                    w.thread_open = nth[k] < w.thread_limit
        return i

    # ------------------------------------------------------- held results
    def _on_held(self, w: _Worker, rid: int, fut: TaskFuture[Any], info: Any) -> None:
        """``fut``'s value stayed on ``w`` (R_HELD, ``info`` = (size, type name))."""
        size, typename = info
        if type(size) is not int or type(typename) is not str:
            raise TypeError(f"(size, type name) expected, got {info!r:.80}")
        sched = self._sched
        assert sched is not None
        ref = HeldRef(w.id, rid, w.data_addr, size, typename)
        w.held_refs.add(ref)
        self._held[ref] = _Held((fut._fn, fut._args, fut._kwargs, fut._opts))
        self.bytes_held += size
        if fut.done():
            return
        fut._held = ref
        sched.n_held += 1
        loop = self._loop
        assert loop is not None
        weakref.finalize(fut, _call_soon, loop, self._app_released, ref)
        if (fut._callbacks and fut not in self._again
                and any(cb[0] != self._inputs_done for cb in fut._callbacks)):
            # someone waits for it (await, gather): it needs the value, so fetch
            # it first; an await that began now could not see a swapped class
            loop.create_task(self._fetch_for(fut, ref))
            return
        if type(fut) is TaskFuture:
            fut.__class__ = HeldFuture  # fetches when awaited later
        self._outcome(fut, P.R_OK, ref)

    async def _fetch_for(self, fut: TaskFuture[Any], ref: HeldRef) -> None:
        """Resolve ``fut`` with its held value, fetched for whoever waits for it."""
        sched = self._sched
        assert sched is not None
        try:
            value = await self.fetch_held_async(ref)
        except Exception as exc:
            sched.task_error(fut, exc)
            return
        sched.task_ok(fut, value)

    def _inputs_lost(self, fut: TaskFuture[Any], keys: Any) -> None:
        """A worker could not fetch ``fut``'s inputs ``keys``: make them again, then run it."""
        if type(keys) is not list:
            raise TypeError(f"a list of keys expected, got {keys!r:.80}")
        sched = self._sched
        assert sched is not None
        for r in fut._refs or ():
            if r.key in keys and not r.inline:
                w = self._workers.get(r.wid)
                if w is not None:
                    w.held_refs.discard(r)
                r.wid = -1
        sched.task_requeue(fut)  # not a failure of the task: no retry is spent

    def _near(self, refs: list[HeldRef], kind: int) -> _Worker | None:
        """The worker holding most bytes of these inputs, if it can take a task now."""
        by: dict[int, int] = {}
        for r in refs:
            if not r.inline:
                by[r.wid] = by.get(r.wid, 0) + r.size
        w = self._workers.get(max(by, key=by.__getitem__, default=-1))
        if w is not None and not w.quarantine and w.free(kind) > 0:
            return w
        return None

    def hold_inputs(self, fut: TaskFuture[Any], refs: list[HeldRef]) -> None:
        """``fut`` needs these held results until it is over: they are not freed before."""
        for r in refs:
            rec = self._held.get(r)
            if rec is not None:
                rec.uses += 1
        fut.add_done_callback(self._inputs_done)

    def _inputs_done(self, fut: TaskFuture[Any]) -> None:
        for r in fut._refs or ():
            rec = self._held.get(r)
            if rec is not None:
                rec.uses -= 1
                if rec.uses <= 0 and rec.app_gone:
                    self._free(r)

    def _app_released(self, ref: HeldRef) -> None:
        """The application dropped the future of a held result (its finalizer)."""
        rec = self._held.get(ref)
        if rec is not None:
            rec.app_gone = True
            if rec.uses <= 0:
                self._free(ref)

    def _free(self, ref: HeldRef) -> None:
        """Nobody needs this held result any more: its worker drops it."""
        self._held.pop(ref, None)
        w = self._workers.get(ref.wid)
        if w is not None and not ref.inline:
            w.held_refs.discard(ref)
            if not self._closing:
                w.stream.send(P.encode(P.FREE, [ref.key]))

    def _park(self, fut: TaskFuture[Any], dead: list[HeldRef]) -> None:
        """Hold ``fut`` back until its lost inputs are made again (lineage)."""
        fut._att = None
        for r in dead:
            self._parked.setdefault(r, []).append(fut)
            self._recompute(r)

    def _recompute(self, ref: HeldRef) -> TaskFuture[Any] | None:
        """Run again the task that made ``ref``, whose worker was lost; its future."""
        rec = self._held.get(ref)
        sched = self._sched
        assert sched is not None
        if rec is not None and rec.again is not None:
            return rec.again
        err: BaseException
        if rec is None:
            err = WorkerLostError(f"a held result ({ref!r}) was lost with its worker, and "
                                  "nothing is left to make it again")
        else:
            fn, args, kwargs, opts = rec.lineage
            try:
                again = sched.submit(TaskFunction(fn, opts), args, kwargs)
            except Exception as exc:
                err = exc
            else:
                rec.again = again
                self._again.add(again)
                self.n_recomputed += 1
                log.info("recomputing %r: its worker was lost", ref)
                sched._find_refs(again)  # its own inputs may be lost too: parked then
                again.add_done_callback(lambda f: self._recomputed(ref, f))
                return again
        for f in self._parked.pop(ref, []):
            if not f.done():
                sched.task_error(f, err)
        return None

    def _recomputed(self, ref: HeldRef, again: TaskFuture[Any]) -> None:
        """The task that made ``ref`` ran again: point ``ref`` there, start who waited."""
        rec = self._held.get(ref)
        if rec is not None:
            rec.again = None
        self._again.discard(again)
        parked = [f for f in self._parked.pop(ref, []) if not f.done()]
        sched = self._sched
        if sched is None:
            return
        if again.cancelled() or again.exception() is not None:
            exc = again.exception() if not again.cancelled() else WorkerLostError(
                f"the recomputation of {ref!r} was cancelled")
            assert exc is not None
            for f in parked:
                sched.task_error(f, exc)
            return
        new = asyncio.Future.result(again)
        if type(new) is HeldRef:
            # the value is held again, elsewhere: the old reference takes its place
            ref.wid, ref.key, ref.addr, ref.size = new.wid, new.key, new.addr, new.size
            self._held.pop(new, None)
            w = self._workers.get(new.wid)
            if w is not None:
                w.held_refs.discard(new)
                w.held_refs.add(ref)
        else:
            ref.value = new
        if parked:
            self.dispatch(parked)

    def fetch_held(self, ref: HeldRef) -> Any:
        """The value of a held result, fetched now from its worker's data port (blocking).

        Raises:
            WorkerLostError: its worker is gone (``await`` the future instead:
                that makes the value again).
        """
        if ref.inline:
            return ref.value
        if ref.fetched:
            return ref.cached
        secret = getattr(self, "secret", None)
        w = self._workers.get(ref.wid)
        if w is None or secret is None or not w.data_addr:
            raise WorkerLostError(
                f"{ref!r}: its worker is gone; await the future to have it made again")
        got = fetch_sync(w.data_addr, secret, [ref.key]).get(ref.key)
        if got is None or isinstance(got, KeyError):
            raise WorkerLostError(f"{ref!r}: its worker no longer holds it")
        self.bytes_fetched += ref.size
        ref.cached = got
        return got

    async def fetch_held_async(self, ref: HeldRef) -> Any:
        """The value of a held result, fetched over its worker's connection.

        If that worker is lost, the value is made again (lineage) first.
        """
        loop = self._loop
        assert loop is not None
        for _ in range(self._max_lost + 1):
            if ref.inline:
                return ref.value
            if ref.fetched:
                return ref.cached
            w = self._workers.get(ref.wid)
            if w is None:
                again = self._recompute(ref)
                if again is not None:
                    await asyncio.wait([again])
                    again.result()  # its failure is this value's
                continue
            fut: asyncio.Future[dict[int, Any]] = loop.create_future()
            w.fetches.append(fut)
            w.stream.send(P.encode(P.FETCH, [ref.key]))
            try:
                got = (await fut).get(ref.key)
            except ConnectionError:
                continue  # lost meanwhile: made again in the next round
            if got is None or isinstance(got, KeyError):
                w.held_refs.discard(ref)
                ref.wid = -1
                continue
            self.bytes_fetched += ref.size
            ref.cached = got
            return got
        raise WorkerLostError(f"{ref!r}: lost with {self._max_lost} workers in a row")

    # ------------------------------------------------------- resource tasks
    #: how many waiting resource tasks one placement looks at: past the first
    #: that does not fit, later ones may still fit (backfill), but a call must
    #: cost what it places, not the length of the queue
    REQ_SCAN = 64
    #: seconds after which a STEAL with no answer no longer blocks another
    STEAL_LAPSE = 0.05
    #: seconds a resource task that needs cores waits, passed over by smaller
    #: ones (backfill), before a worker is kept for it: sooner, packing suffers
    #: (workers drain for it while small tasks could run); never, it may starve
    RESERVE_AFTER = 0.5

    def _place_req(self) -> None:
        """Send the waiting resource tasks that fit a worker now, best priority first.

        A task fits a worker when what the resource tasks sent there leave
        free covers it, counting each slot that may be busy with a task that
        asked for nothing as one core. Tasks after one that does not fit may
        go ahead of it (backfill), but not on the worker it is waiting for
        (``reserved``: no new task goes there until its cores are free, once
        it has waited ``RESERVE_AFTER`` seconds). A
        task that no worker could ever run fails at once, unless more
        workers may still join (``_more_workers_coming``).
        """
        rq = self._rq
        order = self._order
        if not order:
            return
        batches: dict[_Worker, list[TaskFuture[Any]]] = {}
        reserve: _Worker | None = None
        now = time.monotonic()
        i = scanned = 0
        while i < len(rq) and scanned < self.REQ_SCAN:
            fut = rq[i][2]
            if fut.done():
                del rq[i]
                continue
            scanned += 1
            req = fut._opts.request
            assert req is not None
            t = fut._opts.time
            w = self._fit_now(req, reserve, time.time() + t if t is not None else 0.0)
            if w is not None:
                del rq[i]
                w.ledger.take(req)
                w.n_req += 1
                if w.budget > 0:
                    w.budget -= 1
                batches.setdefault(w, []).append(fut)
                continue
            if not any(x.declared.fits(req) for x in order):
                if not self._more_workers_coming(rq[i][3]):
                    del rq[i]
                    self._unfit(fut, req)
                    continue
            elif reserve is None and req.cores and now - rq[i][3] >= self.RESERVE_AFTER:
                reserve = self._reserve_for(req)
            i += 1
        freed = False
        for w in order:
            if w.reserved and w is not reserve:
                freed = True
            w.reserved = w is reserve
        for w, fs in batches.items():
            self._send_tasks(w, fs)
        if freed:
            self._wake()  # a worker that was kept for a big task takes plain ones again

    @staticmethod
    def _busy_slots(w: _Worker) -> int:
        return w.n_thread if w.n_thread < w.slots else w.slots

    def _fit_now(self, req: Request, skip: _Worker | None,
                 done_by: float = 0.0) -> _Worker | None:
        """The first worker where ``req`` fits now (not ``skip``, the reserved one).

        With ``done_by``: only a worker that will still be there then.
        """
        for w in self._order:
            if (w is skip or w.quarantine or w.budget == 0 or w.held is not None
                    or (done_by and w.ends and w.ends < done_by)):
                continue
            if w.ledger.fits_now(req, self._busy_slots(w)):
                return w
        return None

    def _reserve_for(self, req: Request) -> _Worker | None:
        """The worker to drain for ``req``: it fits there in total, with the fewest cores busy."""
        best = None
        best_busy = 0.0
        for w in self._order:
            if not w.declared.fits(req) or w.held is not None or w.quarantine:
                continue
            busy = (w.declared.amounts[CORES] - w.ledger.free[CORES]) + self._busy_slots(w)
            if best is None or busy < best_busy:
                best, best_busy = w, busy
        return best

    def _more_workers_coming(self, since: float) -> bool:
        """Whether a worker able to run a task waiting since ``since`` may still join.

        None here: the workers of an MPI job are all there from the start.
        """
        return False

    def _unfit(self, fut: TaskFuture[Any], req: Request) -> None:
        """Fail a task that asks for more than any worker has."""
        sched = self._sched
        assert sched is not None
        big = max(self._order, key=lambda w: (w.declared.amounts.get(GPUS, 0),
                                              w.declared.amounts[CORES],
                                              w.declared.amounts.get(MEMORY, 0)))
        sched.task_error(fut, ResourceError(
            f"task {fut.name!r} asks for {req.describe()}, which no worker has: the largest, "
            f"worker #{big.id} {big.name}, has {big.declared.describe()} "
            f"({big.declared.shortfall(req)}); {len(self._order)} worker(s) connected"))

    def _maybe_steal(self, w: _Worker) -> None:
        """``w`` is idle with nothing to run: take unstarted tasks from the busiest worker.

        Tasks sent ahead to a worker (``prefetch``) wait there behind its
        running ones; when another worker runs dry, half of the busiest
        one's waiting tasks go back to the ready queue (STEAL, answered
        with R_RETURNED for each task not started yet) and from there to
        whoever has room.
        """
        if (w.n_thread or w.stream is None or w.id not in self._workers
                or self._backlog[1] or self._closing):
            return
        victim = None
        most = 0
        for v in self._order:
            queued = v.n_thread - v.slots
            if v is not w and queued > most:
                victim, most = v, queued
        now = time.monotonic()
        if victim is not None:
            asked = self._thieves.get(victim.id)
            # one request at a time per victim; one it never answered (it had
            # nothing left unstarted: no R_RETURNED comes) lapses after a while
            if asked is not None and now - asked[1] < self.STEAL_LAPSE:
                return
            self._thieves[victim.id] = (w, now)
            victim.stream.send(P.encode(P.STEAL, min(most // 2 + 1, w.thread_limit)))

    def _hand_to_thief(self, victim: _Worker, futs: list[TaskFuture[Any]]) -> None:
        """Send the tasks ``victim`` gave back to the worker that asked, as far as it has room.

        Not through the ready queue: round robin there could send them back
        to where they came from. What the thief cannot take (it left, or got
        work meanwhile) goes back to the ready queue.
        """
        sched = self._sched
        assert sched is not None
        asked = self._thieves.pop(victim.id, None)
        thief = None if asked is None else asked[0]
        batch: list[TaskFuture[Any]] = []
        for fut in futs:
            if (thief is not None and thief.id in self._workers and not fut.done()
                    and thief.free(fut._kind) > 0):
                thief.count(fut._kind, 1)
                batch.append(fut)
            else:
                sched.task_requeue(fut)
        if batch and thief is not None:
            self._send_tasks(thief, batch)

    def _fn_entry(self, w: _Worker, fut: TaskFuture[Any], fn: Any) -> Any:
        """``fn``'s cache entry (function, id, cloudpickled blob); None if it cannot be pickled.

        A function that cannot be pickled fails ``fut`` (its credit on ``w``
        given back), and only it.
        """
        key = _fn_key(fn)
        entry = self._fn_blobs.get(key)
        if entry is None or not _same_fn(entry[0], fn):
            try:
                blob = cloudpickle.dumps(fn, protocol=5)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit from a __reduce__: this task
                self._unsendable(w, fut, "function", exc)
                return None
            if (len(self._fn_blobs) >= _FN_CACHE_MAX
                    or self._fn_bytes + len(blob) > _FN_CACHE_BYTES):
                self._forget_functions()
            self._next_fid += 1
            entry = (fn, self._next_fid, blob)
            self._fn_blobs[key] = entry
            self._fn_bytes += len(blob)
        return entry

    def _send_tasks(self, w: _Worker, futs: list[TaskFuture[Any]],
                    part: tuple[int, Any] | None = None) -> int:
        """Send ``futs`` to ``w`` in one frame; their credits on ``w`` are already taken.

        With ``part`` = (wire kind, extra), ``futs`` is one future and the
        item is ``w``'s part of it: sent as that kind with that extra, its
        timer and outcome left to the caller (see ``_parts``).
        Returns the last task's rid (0 if nothing was sent).
        """
        loop = self._loop
        sched = self._sched
        assert loop is not None and sched is not None
        # the checkpoint log's committed steps: none, no task has one to restore
        commits = sched._ckpt.commits if sched._ckpt is not None else None
        new_fns: list[tuple[int, bytes]] = []
        batch: list[tuple[Any, ...]] = []
        bufs: list[Any] = []
        budget = P.DEFAULT_MAX_FRAME - P.FRAME_MARGIN
        size = 0
        ahead_on = self.send_ahead > 0 and part is None
        if ahead_on:
            futs = list(futs)  # the tasks sent ahead are appended
        inflight = w.inflight
        rids = self._rids
        # the column being built (see protocol.TASKS): plain tasks of one
        # function and kind with scalar arguments, sent as one item
        col: list[Any] | None = None
        col_fid = col_kind = col_rid = 0
        last_fn: Any = None
        last_entry: Any = None
        for fut in futs:
            fn = fut._fn
            args = fut._args
            pre = fut._att
            # a checkpointed task goes in a column too unless the log holds
            # committed steps, one of which might be its to restore
            if (pre is None and part is None and fut._opts.plain and fut._refs is None
                    and (fut._cparents is None or not commits)
                    and not fut._kwargs and not fut._subst
                    and (fut._next is None or not ahead_on)
                    and type(fn) is not types.MethodType):
                cost = P.column_cost(args) if args else 8
                if cost > 0:
                    if fn is last_fn:
                        entry = last_entry
                    else:
                        entry = self._fn_entry(w, fut, fn)
                        if entry is None:
                            continue
                        last_fn, last_entry = fn, entry
                    fid = entry[1]
                    kind = fut._kind
                    if fid not in w.fids:
                        w.fids.add(fid)
                        new_fns.append((fid, entry[2]))
                        cost += len(entry[2])
                    if (batch or col is not None) and size + cost > budget:
                        if col is not None:
                            self.n_col_tasks += len(col)
                            batch.append((col_rid, col_fid, col_kind, col))
                            col = None
                        self._send_frame(w, new_fns, batch, bufs)
                        new_fns, batch, bufs, size = [], [], [], 0
                    size += cost
                    rid = next(rids)
                    if col is None or fid != col_fid or kind != col_kind \
                            or len(col) >= _COLUMN_MAX:
                        if col is not None:
                            self.n_col_tasks += len(col)
                            batch.append((col_rid, col_fid, col_kind, col))
                        col = []
                        col_fid, col_kind, col_rid = fid, kind, rid
                    col.append(args)
                    inflight[rid] = fut
                    fut._att = _Sent(w, rid)
                    continue
            if col is not None:
                self.n_col_tasks += len(col)
                batch.append((col_rid, col_fid, col_kind, col))
                col = None
            ahead = ahead_on and type(pre) is _Sent and pre.ahead
            if ahead:
                args, kwargs = self._ahead_args(fut, pre)
            else:
                if fut._subst:
                    # released after it was sent ahead, and now sent again
                    # (stolen, given back): its inputs' values go with it
                    sched.substitute(fut)
                    args = fut._args
                kwargs = fut._kwargs
            if type(fn) is types.MethodType:
                # the function goes in the cache, the object with the
                # arguments: cached, obj.method would keep obj alive on the
                # worker (and here) for as long as the runtime runs
                args = (fn.__self__, *args)
                fn = fn.__func__
            entry = self._fn_entry(w, fut, fn)
            if entry is None:
                continue
            n0 = len(bufs)
            try:
                # each task's arguments in a blob of their own: one that the
                # worker cannot unpickle fails that task, not the frame
                args_blob = P.pack((args, kwargs or None), bufs, main_by_value=True)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                del bufs[n0:]
                if ahead:
                    self._not_ahead(w, fut)  # sent when ready, and fails then
                    continue
                self._unsendable(w, fut, "arguments", exc)
                continue
            fid = entry[1]
            n = P.packed_size(args_blob, bufs, n0) + (0 if fid in w.fids else len(entry[2]))
            if n > budget:
                # the worker would take the frame for an attack and hang up:
                # fail this task, before anything of it is sent
                del bufs[n0:]
                if ahead:
                    self._not_ahead(w, fut)
                    continue
                self._refuse_task(w, fut, ValueError(P.too_large(
                    "arguments", fut.name, n, P.DEFAULT_MAX_FRAME)))
                continue
            if batch and size + n > budget:
                # tasks that fit one by one but not together: split the frame
                self._send_frame(w, new_fns, batch, bufs[:n0])
                del bufs[:n0]
                new_fns, batch, size, n0 = [], [], 0, 0
            size += n
            if fid not in w.fids:
                w.fids.add(fid)
                new_fns.append((fid, entry[2]))
            rid = next(self._rids)
            w.inflight[rid] = fut
            if part is not None:
                batch.append((rid, fid, part[0], len(bufs) - n0, args_blob, part[1]))
                continue
            if ahead:
                sent = pre
                sent.rid = rid
                self.n_ahead += 1
            else:
                sent = fut._att = _Sent(w, rid)
            # a checkpointed task with a saved step gets it back from the
            # worker; one with a priority takes its place in the worker's queue
            restore = None
            extra: tuple[Any, ...] | None = None
            if commits and fut._cparents is not None:
                got = sched.restore_blobs(fut, 1)
                if got is not None:
                    restore = (got[0], got[1][0])
            prio = fut._opts.priority
            refs = None if ahead else fut._refs
            req = fut._opts.request
            keep = False
            if ahead_on and req is None:
                nxt = fut._next
                if nxt is not None and self._can_follow(nxt):
                    # its value stays there for nxt; nxt goes with it now,
                    # or later when a task before it in the chain is released
                    keep = sent.keep = True
                    if sent.depth < self.send_ahead:
                        self._mark_ahead(w, fut, nxt)
                        futs.append(nxt)
            if keep or ahead:
                after = sent.prev._att.rid if ahead and sent.prev is not None else 0
                extra = (restore, prio, refs, keep, after)
            elif refs is not None:
                extra = (restore, prio, refs)
            elif restore is not None or prio:
                extra = (restore, prio)
            if req is None:
                batch.append((rid, fid, fut._kind, len(bufs) - n0, args_blob, extra))
            else:
                rx: tuple[Any, ...] = (restore, req.to_wire(), fut._opts.pin, prio)
                batch.append((rid, fid, P.K_RASYNC if fut._kind == ASYNC else P.K_RTHREAD,
                              len(bufs) - n0, args_blob, rx if refs is None else (*rx, refs)))
            timeout = fut._opts.timeout
            if timeout is not None:
                sent.timer = loop.call_later(timeout, self._on_timeout, fut, sent)
        if col is not None:
            self.n_col_tasks += len(col)
            batch.append((col_rid, col_fid, col_kind, col))
            self._send_frame(w, new_fns, batch, bufs)
            return col_rid + len(col) - 1
        if not batch:
            return 0
        self._send_frame(w, new_fns, batch, bufs)
        return int(batch[-1][0])

    # -------------------------------------------------------- send-ahead
    # A chain of dependent tasks on one worker need not wait for the
    # scheduler per link: a task whose only unfinished input is sent to a
    # worker may follow it there at once (up to send_ahead links deep), and
    # the worker starts it when the input ends, with the value it has at
    # hand. The core still releases it only when the input's outcome is in
    # (so the log, failure policies and observers see every link in order);
    # an outcome that comes back before that waits in its _Sent.early.

    @staticmethod
    def _can_follow(nxt: TaskFuture[Any]) -> bool:
        """Whether ``nxt`` (a chained task, see ``Scheduler.submit``) may be sent ahead now."""
        return nxt._att is None and not nxt._lost and not nxt.done()

    def _mark_ahead(self, w: _Worker, prev: TaskFuture[Any], nxt: TaskFuture[Any]) -> None:
        """``nxt`` goes to ``w`` after ``prev``, before ``prev`` has finished."""
        s = nxt._att = _Sent(w, 0)
        s.ahead = True
        s.prev = prev
        ps = prev._att
        s.depth = ps.depth + 1
        chain = ps.chain
        if chain is None:
            chain = ps.chain = [prev, 0]
        chain[0] = nxt
        chain[1] += 1
        s.chain = chain
        w.count(nxt._kind, 1)

    @staticmethod
    def _ahead_args(fut: TaskFuture[Any], sent: _Sent) -> tuple[Any, Any]:
        """``fut``'s arguments with its input's value still to come: the marker in its place."""
        return with_input(fut, sent.prev, AHEAD_INPUT)

    def _not_ahead(self, w: _Worker, fut: TaskFuture[Any]) -> None:
        """``fut`` is no longer (or was not after all) sent ahead to ``w``."""
        sent = fut._att
        if w.inflight.pop(sent.rid, None) is not None or sent.rid == 0:
            self._uncount(w, fut)
        chain = sent.chain
        if chain is not None:
            chain[1] -= 1
            if chain[0] is fut:
                chain[0] = sent.prev
        fut._att = None

    def _unahead(self, w: _Worker, fut: TaskFuture[Any]) -> None:
        """``fut``'s attempt on ``w`` ended without a value: the tasks sent after it are void.

        The worker drops them itself (each is answered R_NOINPUT, then
        ignored); they wait in the core, and go out again when ready.
        """
        cur = fut
        while True:
            nxt = cur._next
            if nxt is None:
                return
            s = nxt._att
            if type(s) is not _Sent or not s.ahead or s.w is not w:
                return
            self._not_ahead(w, nxt)
            cur = nxt

    def cancel_ahead(self, fut: TaskFuture[Any]) -> None:
        """``fut``, sent ahead, is cancelled before it was ready: its worker drops it."""
        sent = fut._att
        if type(sent) is not _Sent or not sent.ahead:
            return
        w = sent.w
        if w.inflight.get(sent.rid) is fut and not self._closing:
            w.stream.send(P.encode(P.CANCEL, [sent.rid]))
        self._not_ahead(w, fut)

    def _released(self, fut: TaskFuture[Any], sent: _Sent) -> None:
        """The core released ``fut``, which was sent ahead: it is now an ordinary attempt."""
        sent.ahead = False
        w = sent.w
        self._advance(w, fut)
        early = sent.early
        if early is not None:
            sent.early = None
            status, nbufs, blob, tb, bufs = early
            self._result(w, sent.rid, fut, status, nbufs, blob, tb, bufs, 0, [])

    def _advance(self, w: _Worker, fut: TaskFuture[Any]) -> None:
        """One task of a chain on ``w`` is released: more may go ahead at the chain's end."""
        chain = fut._att.chain
        if chain is None:
            return
        chain[1] -= 1
        k = chain[1]
        if k > self.send_ahead // 2:
            # far enough ahead: refilled by half at a time, so that one
            # frame carries several links and one outcome does not buy one
            return
        tail = chain[0]
        ts = tail._att
        if type(ts) is not _Sent or not ts.keep or ts.w is not w or w.id not in self._workers:
            return
        nxt = tail._next
        if nxt is not None and self._can_follow(nxt):
            self._mark_ahead(w, tail, nxt)
            nxt._att.depth = k + 1
            self._send_tasks(w, [nxt])
        else:
            # nothing will come for the value it keeps there
            ts.keep = False
            w.stream.send(P.encode(P.FREE, [ts.rid]))

    def _send_frame(self, w: _Worker, new_fns: list[tuple[int, bytes]],
                    batch: list[tuple[Any, ...]], bufs: list[Any]) -> None:
        w.stream.send(
            P.encode(P.TASKS, (new_fns, batch, self._fid_floor, self._flags),
                     self._compress_min, bufs)
        )

    def _unsendable(self, w: _Worker, fut: TaskFuture[Any], what: str,
                    exc: BaseException) -> None:
        """Fail one task of a batch whose ``what`` cannot be pickled, and only it.

        Raising instead would leave the whole batch half-dispatched, its
        futures pending for ever. The credit taken for it on ``w`` is given back.
        """
        err = retyped(exc, f"the {what} of task {fut.name!r} could not be pickled: "
                           f"{type(exc).__name__}: {exc}", TypeError)
        err.__cause__ = exc
        self._refuse_task(w, fut, err)

    def _refuse_task(self, w: _Worker, fut: TaskFuture[Any], exc: BaseException) -> None:
        """Fail one task of a batch before it is sent; its credit on ``w`` is given back."""
        sched = self._sched
        assert sched is not None
        self._uncount(w, fut)
        fut._att = None
        sched.task_error(fut, exc)

    @staticmethod
    def _uncount(w: _Worker, fut: TaskFuture[Any]) -> None:
        """Give back what sending ``fut`` to ``w`` took: a credit, or its resources."""
        req = fut._opts.request
        if req is None:
            w.count(fut._kind, -1)
        else:
            w.ledger.give(req)
            w.n_req -= 1

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
        batches: dict[_Worker, list[TaskFuture[Any]]] = {}
        for heap in self._backlog:
            while heap:
                fut = heap[0][2]
                if fut.done():
                    heapq.heappop(heap)
                    continue
                if fut._lost and fut._kind != ASYNC:
                    w = self._pick_alone()
                    if w is None:
                        break
                    heapq.heappop(heap)
                    self._send_alone(w, fut)
                    continue
                w = self._pick(fut._kind) if fut._opts.time is None else \
                    self._pick_in_time(fut)
                if w is not None and w.quick_fids and fut._kind != ASYNC:
                    w = self._pick_quick(fut, w)
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
                if type(results) is tuple:
                    results = self._timed_results(w, results)
                self._on_results(w, results, buffers)
            except (TypeError, ValueError) as exc:
                # not a list of (rid, status, value, traceback)
                raise P.ProtocolError(f"malformed RESULTS frame: {exc}") from exc
        elif kind == P.HEARTBEAT:
            pass
        elif kind == P.DATA:
            if not w.fetches:
                raise P.ProtocolError("a DATA frame nobody asked for")
            got = read_data(payload, buffers)
            fut = w.fetches.popleft()
            if not fut.done():
                fut.set_result(got)
        elif kind == P.LOG:
            records = P.loads(payload, buffers)
            try:
                for name, level, msg, created in records:
                    if not (type(name) is str and type(level) is int and type(msg) is str
                            and type(created) is float):
                        raise TypeError(f"bad log record {(name, level, msg, created)!r}")
            except (TypeError, ValueError) as exc:
                raise P.ProtocolError(f"malformed LOG frame: {exc}") from exc
            self._on_log(w, records)
        elif kind == P.QUICK:
            fids = P.loads(payload, buffers)
            if type(fids) is not list or not all(type(f) is int for f in fids):
                raise P.ProtocolError(f"malformed QUICK frame: a list of function ids "
                                      f"expected, got {fids!r:.100}")
            self._set_quick(w, set(fids))
        elif kind == P.SAVE:
            try:
                rid, step, blob = P.loads(payload, buffers)
                if type(step) is not int or type(blob) is not bytes:
                    raise TypeError(f"step {step!r} and a bytes state expected")
            except (TypeError, ValueError) as exc:
                raise P.ProtocolError(f"malformed SAVE frame: {exc}") from exc
            self._on_save(w, rid, step, blob)
        else:
            raise P.ProtocolError(f"unexpected {P.KIND_NAMES[kind]} frame from a worker")

    def _set_quick(self, w: _Worker, fids: set[int]) -> None:
        """``w`` runs every blocking task on its loop now, functions ``fids`` learnt
        quick there (or, empty, no longer): its credit.

        Such tasks take no thread there, and each frame has a fixed cost on
        both ends, so a quick worker gets ``QUICK_CREDIT`` times the credit:
        frames of hundreds of tasks instead of dozens. It goes back to the
        normal credit as soon as one of its tasks needs a thread; what was
        sent meanwhile drains first (the hysteresis of ``count``). Functions
        not in ``fids`` get only the normal credit (``_pick_quick``).
        """
        w.quick_fids = fids
        limit = w.slots * self._prefetch * (P.QUICK_CREDIT if fids else 1)
        w.thread_limit = limit
        w.thread_refill = int(limit * self.refill)
        if w.n_thread >= limit:
            w.thread_open = False
        elif w.n_thread <= w.thread_refill:
            w.thread_open = True
        if fids:
            self._wake()

    def _pick_quick(self, fut: TaskFuture[Any], w: _Worker) -> _Worker | None:
        """``w``, picked for blocking ``fut`` while it has the quick credit, if
        ``fut``'s function is one it learnt quick or ``w`` is within its normal
        credit; else a worker within its normal credit, or None.

        A new or slow function must not fill the deep queue that quick calls
        earn: it waits (the backlog) rather than queue behind them.
        """
        entry = self._fn_blobs.get(_fn_key(fut._fn))
        if entry is not None and entry[0] is fut._fn and entry[1] in w.quick_fids:
            return w
        per_slot = self._prefetch
        if w.n_thread < w.slots * per_slot:
            return w
        for o in self._order:
            if o.n_thread < o.slots * per_slot and o.free(fut._kind) > 0:
                return o
        return None

    def _on_log(self, w: _Worker, records: list[tuple[str, int, str, float]]) -> None:
        """Log the records a worker forwarded, under ``async_wf.worker``, naming it."""
        for name, level, msg, created in records:
            if not wlog.isEnabledFor(level):
                continue
            rec = wlog.makeRecord(wlog.name, level, "(worker)", 0,
                                  "worker #%d %s: %s: %s", (w.id, w.name, name, msg), None)
            rec.created = created
            rec.worker_id = w.id
            rec.worker_logger = name
            wlog.handle(rec)

    def _timed_results(self, w: _Worker, msg: tuple[Any, ...]) -> list[Any]:
        """Give the observer each task's start and end; return the result items.

        ``msg`` is ``(items, offset, times)``: ``times`` an ``array("d")`` of
        rid, start, end for each task that ran, in the worker's
        ``perf_counter`` time, and ``offset`` what to add for its wall clock.

        Raises:
            TypeError, ValueError: ``msg`` does not have that shape.
        """
        items, off, times = msg
        if type(off) is not float or type(times) is not array or times.typecode != "d":
            raise TypeError(f"timings must be (items, float, array('d')), got {off!r}, "
                            f"{times!r}")
        obs = self._obs
        if obs is not None:
            get = w.inflight.get
            lane = w.id
            vals = iter(times.tolist())
            # a float rid finds its int key: equal numbers hash alike
            for rid, t0, t1 in zip(vals, vals, vals, strict=True):
                fut = get(rid)
                if fut is not None:
                    fut._obs_t = (t0 + off, t1 + off, lane)  # see Observer.dispatched
        return items  # type: ignore[no-any-return]

    def _on_save(self, w: _Worker, rid: int, step: int, blob: bytes) -> None:
        """A task running on ``w`` saved a step's state (see ``async_wf.task_context``)."""
        fut = w.inflight.get(rid)
        sched = self._sched
        if fut is None or sched is None:
            return  # the task ended (timed out, cancelled) meanwhile
        owner = self._parts.get(rid)
        index, n = (0, 1) if owner is None else self._part_index(w, owner)
        sched.task_save(fut, index, n, step, blob)

    def _on_results(self, w: _Worker, results: list[Any], buffers: list[Any]) -> None:
        pos = 0
        returned: list[TaskFuture[Any]] = []
        for item in results:
            if len(item) == 2:
                self._ok_column(w, item[0], item[1], returned)
                continue
            rid, status, nbufs, blob, tb = item
            start = pos
            pos += nbufs
            self._one_result(w, rid, status, nbufs, blob, tb, buffers, start, returned)
        if returned:
            self._hand_to_thief(w, returned)
        if w.budget == 0 and not w.inflight and not w.zombies:
            self._retire(w)
        self._place_backlog()
        if self._rq:
            self._place_req()
        self._wake()
        if not w.n_thread and self._loop is not None and len(self._order) > 1:
            # after the pump that _wake asks for: if it had nothing for w either
            self._loop.call_soon(self._maybe_steal, w)

    def _ok_column(self, w: _Worker, rids: list[int], values: list[Any],
                   returned: list[TaskFuture[Any]]) -> None:
        """A column of results (see ``protocol.TASKS``): R_OK, each with its value.

        The common case (a plain task sent when ready: no timer, no
        resources, not sent ahead, not a part, not being cancelled) is
        reported in bulk; any other goes through ``_one_result``.

        Raises:
            TypeError: not two lists of the same length.
        """
        if type(rids) is not list or type(values) is not list or len(rids) != len(values):
            raise TypeError(f"a column of results must be two lists of one length, got "
                            f"{type(rids).__name__} and {type(values).__name__}")
        sched = self._sched
        assert sched is not None
        inflight = w.inflight
        pop = inflight.pop
        special = w.quarantine or w.cancelling or self._parts
        self.n_col_results += len(rids)
        ok: list[tuple[TaskFuture[Any], Any]] = []
        n_thread = n_async = 0
        for rid, value in zip(rids, values, strict=True):
            fut = pop(rid, None)
            if fut is not None and not special:
                sent = fut._att
                if type(sent) is _Sent and not sent.ahead and sent.timer is None \
                        and fut._opts.request is None:
                    fut._att = None
                    if fut._kind == ASYNC:
                        n_async += 1
                    else:
                        n_thread += 1
                    ok.append((fut, value))
                    continue
            if ok:
                sched.task_ok_many(ok)
                ok = []
            if fut is not None:
                inflight[rid] = fut
            self._one_result(w, rid, P.R_OK, -1, value, None, [], 0, returned)
        if n_thread:
            w.count(P.K_THREAD, -n_thread)
        if n_async:
            w.count(ASYNC, -n_async)
        if ok:
            sched.task_ok_many(ok)

    def _one_result(self, w: _Worker, rid: int, status: int, nbufs: int, blob: Any, tb: Any,
                    buffers: list[Any], start: int, returned: list[TaskFuture[Any]]) -> None:
        """One outcome from ``w``, as a RESULTS item carries it (``nbufs`` -1: ``blob``
        is the value itself, from a column)."""
        if rid == w.quarantine:
            w.quarantine = 0
        fut = w.inflight.pop(rid, None)
        w.cancelling.discard(rid)
        if fut is None:
            zkind = w.zombies.pop(rid, None)
            if zkind is not None:
                w.count(zkind, -1)
            elif w.req_zombies:
                zreq = w.req_zombies.pop(rid, None)
                if zreq is not None:
                    w.ledger.give(zreq)
                    w.n_req -= 1
            return
        self._uncount(w, fut)
        sent = fut._att
        if type(sent) is _Sent and sent.ahead:
            # its input's outcome is not in yet: keep this one until it is
            if status == P.R_NOINPUT or status == P.R_RETURNED or fut.done():
                self._not_ahead(w, fut)  # not run there: it goes out again when ready
            else:
                sent.early = (status, nbufs, blob, tb,
                              buffers[start:start + nbufs] if nbufs > 0 else [])
            return
        self._result(w, rid, fut, status, nbufs, blob, tb, buffers, start, returned)

    def _result(self, w: _Worker, rid: int, fut: TaskFuture[Any], status: int, nbufs: int,
                blob: bytes, tb: Any, buffers: list[Any], start: int,
                returned: list[TaskFuture[Any]]) -> None:
        """Report one outcome from ``w`` for ``fut`` (its credit already given back)."""
        sched = self._sched
        assert sched is not None
        if status == P.R_HELD or status == P.R_NOINPUT:
            sent = fut._att
            if sent is not None:
                sent.stop_timer()
                fut._att = None
            try:
                info = P.unpack(blob, buffers, start, nbufs)
                if status == P.R_HELD:
                    self._on_held(w, rid, fut, info)
                else:
                    if fut._next is not None:
                        self._unahead(w, fut)
                    self._inputs_lost(fut, info)
            except (TypeError, ValueError) as exc:
                sched.task_error(fut, RemoteError(f"malformed report of a held result: {exc}"))
            return
        if status == P.R_RETURNED:
            # given back unstarted (STEAL): to the worker that ran dry
            sent = fut._att
            if sent is not None:
                sent.stop_timer()
                fut._att = None
            if fut._next is not None:
                self._unahead(w, fut)
            self.n_stolen += 1
            returned.append(fut)
            return
        value: Any = None
        if nbufs < 0:
            value = blob  # from a column: unpickled with the frame
        elif status != P.R_CANCELLED:
            try:
                value = P.unpack(blob, buffers, start, nbufs)
            except KeyboardInterrupt:
                raise  # the user's Ctrl-C, not the value's fault
            except BaseException as exc:
                # this result alone is lost, not the connection and the
                # others: SystemExit too (a __reduce__ may raise anything),
                # which would otherwise end the connection's handler
                what = "result" if status == P.R_OK else "exception"
                status = P.R_ERROR
                value = RemoteError(
                    f"the {what} of task {fut.name!r} could not be unpickled here: "
                    f"{type(exc).__name__}: {exc}"
                )
        if status == P.R_ERROR and tb and isinstance(value, BaseException) \
                and value.__cause__ is None:
            value.__cause__ = RemoteTraceback(tb)
        if self._parts:
            owner = self._parts.pop(rid, None)
            if owner is not None:
                self._part_outcome(w, owner, status, value)
                return
        sent = fut._att
        if sent is not None:
            sent.stop_timer()
            fut._att = None
        if status != P.R_OK and fut._next is not None:
            self._unahead(w, fut)
        self._outcome(fut, status, value)

    def _retire(self, w: _Worker) -> None:
        """``w`` ran its ``budget`` of tasks, all over: replace it (subclasses that set one)."""
        raise TypeError(f"{type(self).__name__} gives workers no budget")

    def _part_outcome(self, w: _Worker, owner: Any, status: int, value: Any) -> None:
        """The outcome of ``w``'s part of ``owner`` (a subclass that sends parts has it)."""
        raise TypeError(f"{type(self).__name__} sends no parts of tasks, got {owner!r}")

    def _part_index(self, w: _Worker, owner: Any) -> tuple[int, int]:
        """(``w``'s index among the parts of ``owner``, how many parts) for a saved step."""
        raise TypeError(f"{type(self).__name__} sends no parts of tasks, got {owner!r}")

    def _outcome(self, fut: TaskFuture[Any], status: int, value: Any) -> None:
        """Report one attempt's outcome to the scheduler (subclasses intercept some)."""
        sched = self._sched
        assert sched is not None
        if status == P.R_OK:
            sched.task_ok(fut, value)
        elif status == P.R_ERROR:
            sched.task_error(fut, value)
        else:
            sched.task_cancelled(fut, "cancelled on the worker")

    def _on_timeout(self, fut: TaskFuture[Any], sent: _Sent) -> None:
        sent.timer = None
        w, rid = sent.w, sent.rid
        if w.inflight.get(rid) is not fut or fut._cancelling:
            return
        del w.inflight[rid]
        if fut._next is not None:
            self._unahead(w, fut)
        # its slot (or its resources) stay busy until the worker answers
        if fut._opts.request is None:
            w.zombies[rid] = fut._kind
        else:
            w.req_zombies[rid] = fut._opts.request
        w.stream.send(P.encode(P.CANCEL, [rid]))
        sched = self._sched
        assert sched is not None
        sched.task_error(fut, TaskTimeoutError(fut.name, fut._opts.timeout or 0.0))

    def cancel_running(self, fut: TaskFuture[Any], msg: Any) -> bool:
        """Cancel a task still in the backlog, or an ``async def`` task on its worker.

        A blocking task on a worker is skipped there if no slot has taken it
        yet; either way this returns False for it, since its outcome cannot
        be known now, and the scheduler cancels the future itself.
        """
        sched = self._sched
        assert sched is not None
        sent = fut._att
        if sent is None:
            for i, waiting in enumerate(self._rq):
                if waiting[2] is fut:
                    del self._rq[i]
                    sched.task_cancelled(fut, msg)
                    self._place_req()  # it may have held a worker reserved
                    return True
            heap = self._backlog[fut._kind != ASYNC]
            for i, item in enumerate(heap):
                if item[2] is fut:
                    heap.pop(i)
                    heapq.heapify(heap)
                    sched.task_cancelled(fut, msg)
                    return True
            return False
        w, rid = sent.w, sent.rid
        if w.inflight.get(rid) is not fut:
            return False
        w.stream.send(P.encode(P.CANCEL, [rid]))
        if fut._kind != ASYNC:
            # the worker skips it if no slot has taken it yet; if one has, it
            # runs to the end: the scheduler cancels the future now either way
            return False
        w.cancelling.add(rid)
        sent.stop_timer()
        return True


    # ----------------------------------------------------------------- faults
    #: a worker gets new blocking tasks once at most this share of its credit
    #: is outstanding. 1.0 refills a credit as soon as it frees; a lower
    #: value waits and then sends a batch, for links where frames do not
    #: coalesce on their way (MPI messages, unlike a TCP byte stream), or
    #: one result would buy one task, frame after frame, for ever.
    refill = 1.0

    def _join(self, w: _Worker) -> None:
        """Make ``w`` eligible for tasks."""
        w.thread_refill = int(w.thread_limit * self.refill)
        self._workers[w.id] = w
        self._order.append(w)
        self._place_backlog()
        if self._rq:
            self._place_req()
        self._wake()

    @staticmethod
    def _suspects(w: _Worker) -> set[int]:
        """ids of ``w``'s unfinished tasks that may have been running when it was lost.

        A worker starts coroutines at once and blocking tasks in the order
        they were sent, ``slots`` at a time, so among the unfinished ones
        only the first ``slots`` blocking tasks (and every coroutine) can
        have been running; the rest waited in its queue. If a result was
        still on the wire, this blames a task that had finished instead of
        the next one: the culprit is then caught at its next kill.
        """
        out: set[int] = set()
        blocking = 0
        for f in w.inflight.values():
            if f.done():
                continue
            s = f._att
            if type(s) is _Sent and s.ahead:
                continue  # waiting for its input there: not started
            if f._kind != ASYNC and f._opts.request is None:
                if blocking >= w.slots:
                    continue
                blocking += 1
            out.add(id(f))
        return out

    def _release(self, w: _Worker, exc: BaseException | None, retired: bool = False) -> bool:
        """Forget a lost worker; its unfinished tasks go back to the ready queue.

        A task whose cancellation the worker had accepted is cancelled
        instead (running it again would make the canceller wait for ever);
        a task lost with ``max_lost`` workers fails with ``WorkerLostError``.
        Only tasks that may have been running count as lost with it
        (``_suspects``). Returns False if ``w`` was already released.
        """
        if self._workers.pop(w.id, None) is None:
            return False
        self._order.remove(w)
        self._thieves.pop(w.id, None)
        lost = ConnectionError(f"worker #{w.id} {w.name} was lost")
        while w.fetches:
            f = w.fetches.popleft()
            if not f.done():
                f.set_exception(lost)
        for r in w.held_refs:
            if r.wid == w.id:
                r.wid = -1  # gone with it: made again when needed (lineage)
        w.held_refs.clear()
        # statistics() sums the live links: keep what this one moved
        self.bytes_sent += w.stream.bytes_out
        self.bytes_received += w.stream.bytes_in
        if self._closing or retired:
            return True
        self.n_workers_lost += 1
        futs = [f for f in w.inflight.values() if not f.done()]
        cancelled = {id(f) for rid, f in w.inflight.items() if rid in w.cancelling}
        suspects = self._suspects(w)
        w.inflight.clear()
        log.warning("worker #%d %s lost (%s); %d task(s) go back to the ready queue",
                    w.id, w.name, exc or "connection closed", len(futs))
        sched = self._sched
        assert sched is not None
        for fut in futs:
            sent = fut._att
            if type(sent) is _Sent and sent.ahead:
                fut._att = None  # still waiting for its input: sent again when ready
                continue
            if sent is not None:
                sent.stop_timer()
                fut._att = None
            if id(fut) in cancelled:
                sched.task_cancelled(fut, "cancelled (its worker was lost meanwhile)")
                continue
            if id(fut) not in suspects:
                # prefetched behind a running task: it cannot have killed the
                # worker, and must not fail for it
                sched.task_requeue(fut)
                continue
            fut._lost += 1
            if fut._lost >= self._max_lost:
                sched.task_error(fut, WorkerLostError(
                    f"task {fut.name!r} killed {fut._lost} workers (max_lost={self._max_lost}): "
                    f"it was running on each when it was lost, so it is probably what kills them"
                ))
            else:
                sched.task_requeue(fut)
        if self._rq:
            self._place_req()  # it may have been the worker kept for a waiting task
        self._wake()
        return True
