"""In-process transport: coroutines on the caller's loop, blocking functions in threads.

``async def`` tasks become ``asyncio`` tasks on the runtime's own loop: the
fastest path for fine-grained async work, with no limit on how many run at
once. Blocking functions run in ``_threads.ThreadPool`` rather than
``loop.run_in_executor``, for two reasons:

* results come back in batches: a thread that finishes a task appends the
  outcome to a list and wakes the loop only if no wake-up is pending, so a
  thousand short tasks cost a handful of self-pipe writes, not a thousand;
* priorities hold exactly: threads pull the best waiting task from a heap
  ordered like the core's ready queue at the moment they become free, so a
  high-priority task that becomes ready late overtakes the queued ones.

The timeout of a blocking task counts from the moment a thread starts it:
its timer is armed at dispatch and, when it fires early (the task was still
queued, or started later), re-armed for the time that is left.
``inline`` tasks run right in the dispatching callback.

``async def`` tasks without resources do not get an ``asyncio.Task`` each:
a *runner* task takes their first steps one after the other, each in a
context of its own. Most fine-grained coroutines end in that first step,
and then cost no task, no scheduling and no registration. One that
suspends keeps the runner it started in as its own task (so
``current_task()``, ``asyncio.timeout`` and ``TaskGroup`` see the same
task in every step, and a cancel reaches it), and a new runner takes the
rest. When its queue is empty the runner runs the scheduler's pending
pump at once, so a dependent that became ready starts in the same loop
iteration as its input ended.

A blocking function learnt to be quick (its calls in threads averaged less
than ``QUICK_BELOW``) is not handed to a thread call by call: the calls of
one dispatch go to a thread in batches (about a millisecond of work each),
so that a burst of tiny calls costs one hand-off per batch. They still run
in threads, never on the loop: a call that turns out slow, or one that
waits for the loop (an ``Executor`` call back into the runtime), holds a
thread, not the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
import inspect
import os
import time
import traceback
import types
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from async_wf._context import TaskContext, mark_coroutine, mark_thread, run_firsts, start_coroutine
from async_wf._context import _tls as _thread_mark
from async_wf._context import _var as _task_var
from async_wf._errors import ResourceError, TaskTimeoutError
from async_wf._extension import compiled
from async_wf._futures import with_input
from async_wf._options import ASYNC, THREAD
from async_wf._resources import RESOURCE_THREADS, Allocator, Declared, Grant, pinned
from async_wf._threads import ERROR, OK, SKIPPED, Outcome, ThreadPool
from async_wf.transport import Attempt, Transport

if TYPE_CHECKING:
    from async_wf._futures import TaskFuture
    from async_wf._scheduler import Scheduler

__all__ = ["LocalTransport"]

# states of a blocking task's current attempt
_QUEUED = 0  # in the pool's queue, not yet taken by a thread
_STARTED = 1
_DROPPED = 2  # cancelled before a thread picked it up


class _Run(Attempt):
    """The current attempt of a task run in this process (``TaskFuture._att``).

    For a blocking task it is also the thread pool's token, so a late
    outcome of an earlier attempt is told apart by ``fut._att is not run``.
    """

    __slots__ = ("attempt", "early", "fut", "prev", "state", "t0", "task", "timed_out")

    def __init__(self, fut: TaskFuture[Any], state: int) -> None:
        self.fut = fut
        self.attempt = fut._attempt
        self.state = state
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.t0 = 0.0
        #: a quick call queued after its input in the same batch, before the
        #: core released it: that input's attempt (None once released)
        self.prev: _Run | None = None
        #: its outcome, if it came before the core released it
        self.early: tuple[int, Any, float, float] | None = None


_ext = compiled()
# the runner's loop over coroutines that end in their first step
_run_firsts = _ext.run_firsts if _ext is not None else run_firsts
del _ext

_INLINE = object()  # the attempt of an inline task: run and over within dispatch
# the attempt of an async def task with no timeout waiting in the runner's
# queue (it gets a _Run only if it suspends: most never do)
_AQUEUED = object()
# a runner gives the loop a turn after this long (I/O and timers wait meanwhile)
_RUNNER_SLICE = 2e-3
#: coroutine tasks the runner starts between two looks at the clock
_RUNNER_BURST = 64
# a blocking function whose calls average less than this many seconds is
# quick: its calls go to the threads in batches of about _QUICK_BATCH_S
QUICK_BELOW = 200e-6
_QUICK_BATCH_S = 1e-3
_QUICK_BATCH_MAX = 256


class _Batch:
    """A pool item: quick calls run one after the other by one thread."""

    __slots__ = ("runs",)

    def __init__(self, runs: list[_Run]) -> None:
        self.runs = runs


class _Resume:
    """Awaiting it goes on with a coroutine whose first step yielded ``first``.

    What ``yield from`` does, with each step run in the task's own context:
    the task that awaits this becomes the coroutine's task.
    """

    __slots__ = ("coro", "ctx", "first")

    def __init__(self, ctx: contextvars.Context, coro: Any, first: Any) -> None:
        self.ctx = ctx
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        ctx, coro, y = self.ctx, self.coro, self.first
        self.first = None
        while True:
            try:
                x = yield y
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    y = ctx.run(coro.throw, exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    y = ctx.run(coro.send, x)
                except StopIteration as stop:
                    return stop.value


def default_threads() -> int:
    """The default size of the thread pool (as concurrent.futures chooses it)."""
    return min(32, (os.cpu_count() or 1) + 4)


class LocalTransport(Transport):
    """Runs tasks in this process: see the module docstring."""

    #: a chain of quick blocking calls goes to a thread in one batch, up to
    #: this many links (and about a millisecond of work)
    send_ahead = _QUICK_BATCH_MAX
    #: capacity() never runs out: the scheduler's pump need not ask
    unbounded = True

    def __init__(self, threads: int | None = None,
                 initializer: Callable[[], Any] | None = None,
                 declared: Declared | None = None) -> None:
        self._initializer = initializer
        if threads is None:
            threads = default_threads()
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        self._max_threads = threads
        #: this machine, for the tasks that ask for resources: they wait in
        #: ``_rwait`` (by priority) until ``_alloc`` grants what they asked for
        self.declared = Declared.detect() if declared is None else declared
        self._alloc = Allocator(self.declared)
        self._rwait: list[tuple[int, int, _Run]] = []
        self._rseq = 0
        self._grants: dict[_Run, Grant] = {}
        self._rpool: ThreadPool | None = None
        self._pool: ThreadPool | None = None
        self._sched: Scheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # async def tasks waiting for their first step, and the runner task
        # taking them (None: none is running)
        self._runq: collections.deque[TaskFuture[Any]] = collections.deque()
        self._runner: asyncio.Task[None] | None = None
        #: blocking functions -> their calls' average seconds in a thread
        self._dur: dict[Any, float] = {}

    async def start(self, sched: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the scheduler and loop; threads start lazily when first needed."""
        self._sched = sched
        self._loop = loop
        self._pool = ThreadPool(self._max_threads, loop, self._deliver, claim=self._claim,
                                owner=self, initializer=self._initializer)

    def capacity(self) -> int:
        """Unbounded: coroutines are cheap and thread tasks queue here by priority."""
        return 1 << 30

    def queued(self) -> int:
        """Blocking tasks waiting for a thread (coroutines start at once)."""
        return 0 if self._pool is None else self._pool.queued()

    def task_context(self, token: Any) -> TaskContext:
        """The context of a task running here (token: its future, or its ``_Run``)."""
        sched = self._sched
        assert sched is not None
        fut = token.fut if type(token) is _Run else token
        ctx = sched.task_context(fut)
        grant = self._grants.get(fut._att) if self._grants else None
        if grant is not None:
            ctx.assign(grant)
        return ctx

    def broken(self) -> BaseException | None:
        """The exception of a thread initializer that failed: every call fails from then on."""
        pool = self._pool
        return None if pool is None else pool.broken

    def started(self, fut: TaskFuture[Any]) -> bool:
        """Whether the current attempt of ``fut`` has begun (a coroutine always has)."""
        run = fut._att
        return run is not None and run is not _AQUEUED and (
            type(run) is not _Run or run.state != _QUEUED)

    # --------------------------------------------------------------- dispatch
    def dispatch(self, futs: list[TaskFuture[Any]]) -> None:
        """Start these tasks: coroutines now, blocking ones as threads free up."""
        sched = self._sched
        loop = self._loop
        pool = self._pool
        assert sched is not None and loop is not None and pool is not None
        dur = self._dur
        quick: list[list[_Run]] | None = None
        runq_append = self._runq.append
        for fut in futs:
            kind = fut._kind
            att = fut._att
            opts = fut._opts
            if kind == ASYNC and att is None and opts.timeout is None and opts.request is None:
                # the common case first: it waits for the runner
                fut._att = _AQUEUED
                runq_append(fut)
                continue
            if type(att) is _Run and att.prev is not None:
                self._released(fut, att)  # queued already, after its input
                continue
            if opts.request is not None:
                self._queue_resource(fut)
            elif kind == ASYNC:
                # the function is called in the runner, so that a task
                # cancelled before its first step leaves no coroutine unawaited
                timeout = fut._opts.timeout
                if timeout is None:
                    fut._att = _AQUEUED
                else:
                    run = _Run(fut, _QUEUED)
                    fut._att = run
                    run.timer = loop.call_later(timeout, self._on_timeout, run)
                runq_append(fut)
            elif kind == THREAD:
                run = _Run(fut, _QUEUED)
                fut._att = run
                fn = fut._fn
                assert fn is not None
                timeout = fut._opts.timeout
                if timeout is None and dur and dur.get(fn, 1.0) < QUICK_BELOW:
                    if quick is None:
                        quick = []
                    quick.append([run] if fut._next is None else self._with_followers(run))
                    continue
                pool.put(run, fn, fut._args, fut._kwargs, fut._opts.priority)
                if timeout is not None:
                    run.timer = loop.call_later(timeout, self._on_timeout, run)
            else:
                fut._att = _INLINE
                mark_thread(self, fut)
                try:
                    value = fut._fn(*fut._args, **fut._kwargs)  # type: ignore[misc]
                except Exception as exc:
                    sched.task_error(fut, exc)
                else:
                    sched.task_ok(fut, value)
                finally:
                    mark_thread(None, None)
        if quick is not None:
            self._put_quick(quick)
        if self._runq and self._runner is None:
            self._runner = loop.create_task(self._drive())

    def _with_followers(self, run: _Run) -> list[_Run]:
        """``run`` and the chain of quick calls that wait only for it (see ``send_ahead``).

        They go to the same thread in the same batch, each after its input:
        a chain of quick calls costs one hand-off, not one per link. The
        core still releases each only when its input's outcome is in.
        """
        unit = [run]
        dur = self._dur
        spent = dur.get(run.fut._fn, QUICK_BELOW)
        cur = run.fut
        while len(unit) < _QUICK_BATCH_MAX and spent < _QUICK_BATCH_S:
            nxt = cur._next
            if (nxt is None or nxt._att is not None or nxt._kind != THREAD or nxt._lost
                    or nxt.done()):
                break
            d = dur.get(nxt._fn, 1.0)
            if d >= QUICK_BELOW:
                break
            follower = _Run(nxt, _QUEUED)
            follower.prev = unit[-1]
            nxt._att = follower
            unit.append(follower)
            spent += d
            cur = nxt
        return unit

    def _released(self, fut: TaskFuture[Any], run: _Run) -> None:
        """The core released ``fut``, queued after its input: report its outcome if it came."""
        run.prev = None
        early = run.early
        if early is None:
            return  # it comes through _deliver as any other
        run.early = None
        status, value, took, t0 = early
        if self._obs is not None:
            self._obs.thread_ran(fut, t0, took)
        sched = self._sched
        assert sched is not None
        if status == OK:
            sched.task_ok(fut, value)
        else:
            sched.task_error(fut, value[0])

    def cancel_ahead(self, fut: TaskFuture[Any]) -> None:
        """``fut``, queued after its input, is cancelled before it was released: skip it."""
        run = fut._att
        if type(run) is not _Run or run.prev is None:
            return
        pool = self._pool
        assert pool is not None
        with pool.lock:
            if run.state == _QUEUED:
                run.state = _DROPPED
        fut._att = None

    def _put_quick(self, units: list[list[_Run]]) -> None:
        """Hand quick calls to the threads in batches of about a millisecond of work.

        A chain (a unit) is never split: each link runs after its input.
        """
        pool = self._pool
        assert pool is not None
        dur = self._dur
        n = sum(len(u) for u in units)
        share = max(1, -(-n // pool.nthreads))  # spread over the threads too
        batch: list[_Run] = []
        spent = 0.0
        for unit in units:
            per = max(dur.get(unit[0].fut._fn, QUICK_BELOW), 1e-6)
            if batch and (spent + per * len(unit) > _QUICK_BATCH_S
                          or len(batch) + len(unit) > min(_QUICK_BATCH_MAX, share)):
                pool.put(_Batch(batch), self._run_batch, (batch,), {},
                         batch[0].fut._opts.priority)
                batch, spent = [], 0.0
            batch += unit
            spent += per * len(unit)
        if batch:
            pool.put(_Batch(batch), self._run_batch, (batch,), {}, batch[0].fut._opts.priority)

    def _run_batch(self, runs: list[_Run]) -> list[Outcome]:
        """In a thread: the calls of a batch, one after the other; their outcomes."""
        pool = self._pool
        assert pool is not None
        out: list[Outcome] = []
        lock = pool.lock
        tls = _thread_mark
        perf_counter = time.perf_counter
        monotonic = time.monotonic
        last: Outcome | None = None
        for run in runs:
            prev = run.prev
            if prev is not None and (last is None or last[0] is not prev or last[1] != OK):
                # its input did not end well here: it waits in the core instead
                last = (run, SKIPPED, None, 0.0, 0.0)
                out.append(last)
                continue
            fut = run.fut
            with lock:  # _claim, written out
                go = run.state == _QUEUED and fut._att is run and not fut.done()
                if go:
                    run.state = _STARTED
                    run.t0 = monotonic()
            if not go:
                last = (run, SKIPPED, None, 0.0, 0.0)
                out.append(last)
                continue
            if prev is not None and last is not None:
                args, kwargs = with_input(fut, prev.fut, last[2])
            else:
                args, kwargs = fut._args, fut._kwargs
            tls.cur = [self, run, None]  # mark_thread, written out
            t0 = perf_counter()
            try:
                last = (run, OK, fut._fn(*args, **kwargs),  # type: ignore[misc]
                        perf_counter() - t0, t0)
            except BaseException as exc:  # a thread has nowhere to propagate to
                last = (run, ERROR, (exc, traceback.format_exc()), perf_counter() - t0, t0)
            out.append(last)
        mark_thread(None, None)
        return out

    # ---------------------------------------------------------- resource tasks
    def _queue_resource(self, fut: TaskFuture[Any]) -> None:
        """Start a task that asked for resources once this machine has them free."""
        req = fut._opts.request
        assert req is not None and self._sched is not None
        if not self.declared.fits(req):
            self._sched.task_error(fut, ResourceError(
                f"task {fut.name!r} asks for {req.describe()}, more than this process's "
                f"machine has: {self.declared.describe()} ({self.declared.shortfall(req)})"))
            return
        run = _Run(fut, _QUEUED)
        fut._att = run
        self._rseq += 1
        heapq.heappush(self._rwait, (-fut._opts.priority, self._rseq, run))
        self._start_resources()

    def _start_resources(self) -> None:
        """Start the waiting resource tasks that fit now, best priority first."""
        loop = self._loop
        pool = self._pool
        assert loop is not None and pool is not None
        wait = self._rwait
        while wait:
            run = wait[0][2]
            fut = run.fut
            if fut.done() or fut._att is not run or run.state != _QUEUED:
                heapq.heappop(wait)
                continue
            req = fut._opts.request
            assert req is not None
            grant = self._alloc.try_take(req)
            if grant is None:
                return  # the best one waits: nothing overtakes it
            heapq.heappop(wait)
            self._grants[run] = grant
            with pool.lock:
                run.state = _STARTED
                run.t0 = time.monotonic()
            timeout = fut._opts.timeout
            if timeout is not None:
                run.timer = loop.call_later(timeout, self._on_timeout, run)
            if fut._kind == ASYNC:
                run.task = loop.create_task(self._run_granted_async(run))
                continue
            rpool = self._rpool
            if rpool is None:
                # threads of their own (not the pool's: a task holding 8 cores must
                # not wait for a thread behind plain tasks), kept for the next ones
                rpool = self._rpool = ThreadPool(RESOURCE_THREADS, loop, self._granted_done,
                                                 name="async_wf-res", owner=self)
            fn = fut._fn
            assert fn is not None
            if fut._opts.pin:
                fn = pinned(fn, grant.cpu_ids)
            rpool.put(run, fn, fut._args, fut._kwargs)

    def _granted_done(self, items: list[Outcome]) -> None:
        for item in items:
            self._release(item[0])
        self._deliver(items)

    async def _run_granted_async(self, run: _Run) -> None:
        try:
            await self._run_async(run)
        finally:
            self._release(run)

    def _release(self, run: _Run) -> None:
        """The attempt ``run`` is over: what it held is free; start who waits."""
        grant = self._grants.pop(run, None)
        if grant is not None:
            self._alloc.give(grant)
            self._start_resources()

    async def _drive(self) -> None:
        """The runner: first steps of queued coroutines (see the module docstring)."""
        sched = self._sched
        loop = self._loop
        assert sched is not None and loop is not None
        q = self._runq
        copy_context = contextvars.copy_context
        run_firsts = _run_firsts
        end = time.perf_counter() + _RUNNER_SLICE
        fut: Any = None  # the task to start next, when it did not come from the queue
        run: Any
        # outcomes go to the scheduler without a pump scheduled for each: this
        # runner pumps when its queue runs dry, and schedules the pump before
        # the loop gets a turn (in the finally clause at the latest)
        sched.defer_pump()
        n = 0
        try:
            while True:
                n += 1
                if not n & 63 and time.perf_counter() > end:
                    # tasks the burst below leaves to this loop (a chain, keyword
                    # arguments, timers, failures) get the loop a turn too
                    if fut is not None:
                        # started (running in the core) but not begun: it
                        # goes first when the runner goes on
                        fut._att = _AQUEUED
                        q.appendleft(fut)
                        fut = None
                    end = await self._turn(sched)
                if fut is None:
                    if not q:
                        # run dry: the pump may release dependents of what just ended
                        sched.pump_now()
                        if not q:
                            return
                        sched.defer_pump()
                    # the common case, a coroutine ending in its first step,
                    # a whole run of them at a time (compiled: _core.run_firsts)
                    got = run_firsts(q, self, _task_var, sched._done_buf, _AQUEUED, _INLINE,
                                     _RUNNER_BURST)
                    if got is None:
                        if time.perf_counter() > end:
                            end = await self._turn(sched)
                        continue
                    why, fut, value, rest = got
                    if why == 0:
                        # it returned and has a successor: one waiting for it
                        # alone starts next, in this same loop iteration,
                        # without a dispatch
                        nxt = fut._next
                        if (not q and nxt._kind == ASYNC and nxt._att is None
                                and sched.take_next(fut, value, nxt)):
                            nxt._att = _AQUEUED
                            q.appendleft(nxt)
                        else:
                            sched._done_buf.append((fut, value))
                        fut = None
                        continue
                    if why == 1:
                        # it waits for something: this runner is its task
                        # from now on; another one takes the rest
                        self._runner = None
                        if q:
                            self._runner = loop.create_task(self._drive())
                        sched.pump_soon()
                        run = fut._att = _Run(fut, _STARTED)
                        run.task = asyncio.current_task()
                        await self._finish_async(run, _Resume(value, rest[0], rest[1]))
                        return
                    if why == 2:
                        failed, fut, exc = fut, None, value
                        if isinstance(exc, asyncio.CancelledError):
                            sched.task_cancelled(failed, exc.args[0] if exc.args else None)
                        else:
                            sched.task_error(failed, exc)
                            if not isinstance(exc, Exception):
                                raise exc  # KeyboardInterrupt, SystemExit: let the loop see them
                        continue
                    # why == 3: taken from the queue, not started; the general case
                    run = fut._att
                    if run is _AQUEUED:
                        fut._att = _INLINE  # started; from now on it cannot be stopped
                    elif type(run) is _Run and run.state == _QUEUED:
                        run.state = _STARTED
                    else:
                        fut = None
                        continue  # cancelled or timed out before it started
                else:
                    run = _AQUEUED
                    fut._att = _INLINE
                ctx = copy_context()
                try:
                    kw = fut._kwargs
                    coro = fut._fn(*fut._args, **kw) if kw else fut._fn(*fut._args)
                    first = ctx.run(start_coroutine, self, fut, coro)
                except StopIteration as stop:
                    if run is not _AQUEUED:
                        run.stop_timer()
                    nxt = fut._next
                    if (nxt is not None and not q and nxt._kind == ASYNC and nxt._att is None
                            and sched.take_next(fut, stop.value, nxt)):
                        fut = nxt
                    else:
                        # task_ok without its test: this runner defers the pump
                        sched._done_buf.append((fut, stop.value))
                        fut = None
                except asyncio.CancelledError as exc:
                    if run is not _AQUEUED:
                        run.stop_timer()
                    sched.task_cancelled(fut, exc.args[0] if exc.args else None)
                    fut = None
                except BaseException as exc:
                    if run is not _AQUEUED:
                        run.stop_timer()
                    sched.task_error(fut, exc)
                    fut = None
                    if not isinstance(exc, Exception):
                        raise  # KeyboardInterrupt, SystemExit: let the loop see them
                else:
                    # it waits for something: this runner is its task from now
                    # on; another one takes the rest
                    self._runner = None
                    if q:
                        self._runner = loop.create_task(self._drive())
                    sched.pump_soon()
                    if run is _AQUEUED:
                        run = fut._att = _Run(fut, _STARTED)
                    run.task = asyncio.current_task()
                    await self._finish_async(run, _Resume(ctx, coro, first))
                    return
        finally:
            if fut is not None and fut._att is None and not fut.done():
                # handed over by take_next (running in the core) but never
                # begun: it goes back to the queue
                fut._att = _AQUEUED
                q.appendleft(fut)
            sched.pump_soon()
            if self._runner is asyncio.current_task():
                self._runner = None
                if q:
                    self._runner = loop.create_task(self._drive())

    @staticmethod
    async def _turn(sched: Scheduler) -> float:
        """The runner gives the loop a turn (I/O, timers); when its next slice ends."""
        sched.pump_soon()
        await asyncio.sleep(0)
        sched.defer_pump()
        return time.perf_counter() + _RUNNER_SLICE

    async def _finish_async(self, run: _Run, rest: _Resume | None) -> None:
        """Await ``rest`` (the rest of a coroutine that suspended in its first step, or
        with None the whole call) and report its end."""
        sched = self._sched
        assert sched is not None
        fut = run.fut
        try:
            if rest is None:
                value = await fut._fn(*fut._args, **fut._kwargs)  # type: ignore[misc]
            else:
                value = await rest
        except asyncio.CancelledError as exc:
            if fut._att is not run:
                return  # an earlier attempt, already given up on
            run.stop_timer()
            if run.timed_out:
                sched.task_error(fut, TaskTimeoutError(fut.name, fut._opts.timeout or 0.0))
            else:
                sched.task_cancelled(fut, exc.args[0] if exc.args else None)
        except BaseException as exc:
            if fut._att is not run:
                return
            run.stop_timer()
            sched.task_error(fut, exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: let the loop see them
        else:
            if run.timer is not None or run.timed_out:
                if fut._att is not run:
                    return
                run.stop_timer()
                if run.timed_out:  # the coroutine swallowed its timeout cancellation
                    sched.task_error(fut, TaskTimeoutError(fut.name, fut._opts.timeout or 0.0))
                    return
            sched.task_ok(fut, value)

    async def _run_async(self, run: _Run) -> None:
        # Reporting from inside the task, rather than from a done callback,
        # saves a loop callback, a partial and a result lookup per task; a
        # task cancelled before it ever ran is reported by _cancel_async.
        mark_coroutine(self, run.fut)
        await self._finish_async(run, None)

    def _on_timeout(self, run: _Run) -> None:
        run.timer = None
        fut = run.fut
        if fut.done() or fut._att is not run:
            return
        if fut._kind == ASYNC:
            run.timed_out = True
            if run.state == _QUEUED:
                run.state = _DROPPED  # still in the runner's queue: it never starts
                sched = self._sched
                assert sched is not None
                sched.task_error(fut, TaskTimeoutError(fut.name, fut._opts.timeout or 0.0))
                return
            self._cancel_async(run, None)
            return
        pool = self._pool
        assert pool is not None
        with pool.lock:
            if run.state == _QUEUED:
                left = fut._opts.timeout or 0.0  # not started: the clock has not begun
            else:
                left = (fut._opts.timeout or 0.0) - (time.monotonic() - run.t0)
            if left > 0:
                loop = self._loop
                assert loop is not None
                run.timer = loop.call_later(left, self._on_timeout, run)
                return
        # a thread cannot be stopped: fail this attempt now, drop its result later
        sched = self._sched
        assert sched is not None
        sched.task_error(fut, TaskTimeoutError(fut.name, fut._opts.timeout or 0.0))

    # ----------------------------------------------------------------- threads
    @staticmethod
    def _claim(run: Any) -> bool:
        # runs under the pool's lock, as a thread takes the task
        if type(run) is _Batch:
            return True  # each of its calls is claimed as the thread comes to it
        fut = run.fut
        if run.state != _QUEUED or fut._att is not run or fut.done():
            return False
        run.state = _STARTED
        run.t0 = time.monotonic()
        return True

    def _deliver(self, items: list[Outcome]) -> None:
        sched = self._sched
        assert sched is not None
        if any(type(item[0]) is _Batch for item in items):
            flat: list[Outcome] = []
            for item in items:
                if type(item[0]) is _Batch:
                    if item[1] == OK:
                        flat += item[2]
                    else:  # the batch itself failed (a broken pool): each of its calls
                        flat += [(r, item[1], item[2], 0.0, item[4]) for r in item[0].runs]
                else:
                    flat.append(item)
            items = flat
        dur = self._dur
        for run, status, _value, took, _t0 in items:
            if status != SKIPPED:
                fn = run.fut._fn
                if type(fn) is types.FunctionType:
                    d = dur.get(fn)
                    dur[fn] = took if d is None else 0.8 * d + 0.2 * took
        obs = self._obs
        if obs is not None:
            for run, status, _value, took, t0 in items:
                fut = run.fut
                if (status != SKIPPED and fut._att is run and not fut.done()
                        and run.prev is None):
                    obs.thread_ran(fut, t0, took)
        released: list[Outcome] = []
        for item in items:
            run = item[0]
            fut = run.fut
            if fut.done() or fut._att is not run:
                continue  # skipped, or an attempt already given up on
            if run.prev is not None:
                # queued after its input, not released by the core yet
                if item[1] == SKIPPED:
                    fut._att = None  # it goes out again when ready
                else:
                    run.early = (item[1], item[2], item[3], item[4])
                continue
            released.append(item)
        # (the outcomes of links queued after their inputs are in place first,
        # so that a chain is reported at once: _report_ok)
        for run, status, value, _took, _t0 in released:
            if run.timer is not None:
                run.stop_timer()
            if status == OK:
                if run.fut._next is None or obs is not None:
                    sched.task_ok(run.fut, value)
                else:
                    self._report_ok(run, value)
            elif status == ERROR:
                sched.task_error(run.fut, value[0])

    def _report_ok(self, run: _Run, value: Any) -> None:
        """``run`` (released) returned ``value``: report it, and the links queued after it.

        When the next link of its chain has its outcome already (it ran in
        the same batch), the core releases that link now and its outcome
        follows at once (``Scheduler.take_next``), link after link, rather
        than a pump and a dispatch each.
        """
        sched = self._sched
        assert sched is not None
        fut = run.fut
        while True:
            nxt = fut._next
            nrun = nxt._att if nxt is not None else None
            if type(nrun) is not _Run or nrun.prev is not run or nrun.early is None:
                sched.task_ok(fut, value)
                return
            assert nxt is not None
            if not sched.take_next(fut, value, nxt):
                return  # dispatched as usual: _released reports it
            nrun.prev = None
            status, nvalue, _took, _t0 = nrun.early
            nrun.early = None
            if status != OK:
                sched.task_error(nxt, nvalue[0])
                return
            run, fut, value = nrun, nxt, nvalue

    # -------------------------------------------------------------- cancelling
    def cancel_running(self, fut: TaskFuture[Any], msg: Any) -> bool:
        """Cancel a dispatched task: coroutines always, thread tasks until one starts."""
        sched = self._sched
        assert sched is not None
        run = fut._att
        if run is _AQUEUED:
            fut._att = None  # the runner skips it
            sched.task_cancelled(fut, msg)
            return True
        if type(run) is not _Run:
            return False  # inline: over already
        if fut._kind == ASYNC and run.state != _QUEUED:
            if not self._cancel_async(run, msg):
                return False
            # no timeout may turn the cancellation into an error meanwhile
            run.stop_timer()
            return True
        pool = self._pool
        assert pool is not None
        with pool.lock:
            if run.state != _QUEUED:
                return False
            run.state = _DROPPED
        run.stop_timer()
        sched.task_cancelled(fut, msg)
        return True

    def statistics(self) -> dict[str, Any]:
        """Resource tasks waiting for this machine's resources."""
        return {"resource_tasks_waiting": len(self._rwait)} if self._rwait else {}

    def _cancel_async(self, run: _Run, msg: Any) -> bool:
        task = run.task
        if task is None or task.done() or not task.cancel(msg):
            return False
        coro: Any = task.get_coro()  # _run_async's coroutine
        if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
            # cancelled before its first step: _run_async will never run, and
            # it is what reports outcomes, so report here
            fut = run.fut
            fut._att = None
            run.stop_timer()
            sched = self._sched
            assert sched is not None
            if run.timed_out:
                sched.task_error(fut, TaskTimeoutError(fut.name, fut._opts.timeout or 0.0))
            else:
                sched.task_cancelled(fut, msg)
        return True

    async def close(self) -> None:
        """Stop the threads; queued tasks are dropped, running ones are not waited for."""
        if self._pool is not None:
            self._pool.close(drop_queued=True)
        if self._rpool is not None:
            self._rpool.close(drop_queued=True)
