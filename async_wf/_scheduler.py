"""The scheduler: the asyncio side of the runtime, owner of the task graph.

It turns ``submit`` calls into core tasks, hands ready tasks to a transport,
and turns what the transport reports back into resolved futures, retries
and failure policies.

The pump
    Everything that changes the graph in bulk happens in one callback, the
    pump, scheduled with ``call_soon`` at most once at a time. Successful
    results reported by the transport are only buffered; the pump then
    finishes them in the core with one ``finish_many`` call and pops what
    became ready with one ``pop``. When thousands of tasks complete in the
    same loop iteration this turns thousands of core calls into two, and it
    keeps the order of events deterministic: a loop iteration of results,
    then one dispatch. A pump dispatches at most ``batch`` tasks and
    reschedules itself if more are ready, so that a flood of ready tasks
    cannot starve I/O and other callbacks of the loop.

Failures are rare and are handled at once, outside the pump, because they
may have to resolve many futures (a whole cascade of dependents).

Invariants
    ``_tasks`` maps the core handle of every task that is not yet terminal
    to its future; a future leaves ``_tasks`` in the same step in which it
    is resolved and its handle is forgotten in the core, so a done future is
    never a live core task and never named as an input.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from inspect import CO_COROUTINE as _CO_COROUTINE
from types import FunctionType
from typing import TYPE_CHECKING, Any

from async_wf import core as _corepick
from async_wf._context import TaskContext, call_on_loop
from async_wf._errors import DependencyError, RuntimeClosedError, WorkflowAborted
from async_wf._files import FileOrder
from async_wf._futures import (
    _LEAVES,
    RecordedFuture,
    TaskFuture,
    _fn_name,
    collect,
    flat_values,
    input_value,
    link_echo,
    replace_in,
)
from async_wf._held import HeldRef
from async_wf._options import ASYNC, DEFAULT_OPTIONS, THREAD, TaskOptions, kind_of
from async_wf._task import TaskFunction
from async_wf.checkpoint._keys import FileArg, files_in_use

if TYPE_CHECKING:
    from async_wf._recorder import Recorder
    from async_wf.observe._events import Observer
    from async_wf.transport import Transport

log = logging.getLogger("async_wf")

_OPEN, _CLOSING, _CLOSED, _ABORTED = range(4)
# the keywords of every finished task: one shared empty dict, never changed
_DONE_KWARGS: dict[str, Any] = {}
_NO_INPUTS: tuple[int, ...] = ()
_get_ident = threading.get_ident
_CANCEL_GRACE = 2.0  # seconds a cancelling close waits for cancelled work to report


class Scheduler:
    """Owns the task graph of one runtime and drives one transport.

    Lives on one event loop; every method must be called from that loop's
    thread (``submit`` checks it).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: Transport,
        *,
        batch: int = 4096,
        checkpoint: Recorder | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._loop = loop
        # made in Runtime.start, on the loop's thread: submit compares thread
        # ids (a few ns) where asyncio._get_running_loop() costs a getpid()
        # system call per call on 3.11 (0.2 us here, ~10 % of a no-op task)
        self._loop_thread = threading.get_ident()
        self._transport = transport
        #: its capacity never runs out: the pump does not ask
        self._unbounded = bool(getattr(transport, "unbounded", False))
        self._ckpt = checkpoint
        # None unless an observability option is on: every hook is behind one test
        self._obs = observer
        self._ctx = contextvars.copy_context()
        self._batch = batch
        self._core = _corepick.Core()
        self._tasks: dict[int, TaskFuture[Any]] = {}
        self._done_buf: list[tuple[TaskFuture[Any], Any]] = []
        self._pump_pending = False
        self._pump_handle: asyncio.Handle | None = None  # the pump scheduled, if any
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._state = _OPEN
        self._abort_exc: BaseException | None = None
        self._next_id = 0
        self._t0 = time.perf_counter()
        # cumulative counters; the core only knows the tasks it still holds
        self.n_submitted = 0
        self._files = FileOrder()
        # recorded tasks that wait for files, in case their record cannot be read
        self._file_deps: dict[TaskFuture[Any], list[TaskFuture[Any]]] = {}
        #: set by the runtime when Ctrl-C (or a cancel) ends its ``async with``
        self.interrupted = False
        self.n_finished = 0
        self.n_failed = 0
        self.n_cancelled = 0
        self.n_retried = 0
        self.n_reused = 0
        #: results held on workers (HeldFuture) so far: while 0, dependents are not
        #: searched for references (the fast path costs one test per task)
        self.n_held = 0

    def set_context(self, ctx: contextvars.Context) -> None:
        """Run the scheduler's callbacks (and so the tasks they start) in ``ctx``."""
        self._ctx = ctx

    # ------------------------------------------------------------------ submit
    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskFuture[Any]:
        """Create a task for ``fn(*args, **kwargs)``; return its future at once."""
        # The common case (a plain function, flat arguments, no checkpoint
        # log, no observer) is written out here rather than split into
        # helpers: at a few microseconds per task, each call counts.
        if self._state != _OPEN:
            self._raise_not_open()
        if _get_ident() != self._loop_thread:
            raise RuntimeError(
                "submit must be called from the runtime's event loop thread; "
                "from other threads use async_wf.Executor"
            )
        tfn = type(fn)
        if tfn is FunctionType:
            # what kind_of says for a plain function with the default options
            opts = DEFAULT_OPTIONS
            kind = ASYNC if fn.__code__.co_flags & _CO_COROUTINE else THREAD
        elif tfn is TaskFunction:
            opts = fn._opts  # type: ignore[attr-defined]
            kind = fn._kind  # type: ignore[attr-defined]
            fn = fn._fn  # type: ignore[attr-defined]
            if opts.mpi is not None and opts.binary is None:
                self._transport.check_options(fn, opts.mpi)
        else:
            if not callable(fn):
                raise TypeError(f"submit needs a callable, got {type(fn).__name__}: {fn!r}")
            opts = DEFAULT_OPTIONS
            kind = kind_of(fn, opts)
        found: list[TaskFuture[Any]] = []
        subst = False
        if args:
            # flat arguments without a call per item (collect's depth 1)
            for x in args:
                tx = type(x)
                if tx is TaskFuture:
                    found.append(x)
                    subst = True
                elif tx not in _LEAVES and collect(x, TaskFuture, found, 1):
                    subst = True
        if kwargs and collect(kwargs, TaskFuture, found):
            subst = True
        for dep in found:
            if dep._sched is not self:
                raise ValueError(
                    f"argument {dep!r} is a future of another runtime; "
                    "futures can only be passed within the runtime that made them"
                )
        if files_in_use[0] or self._ckpt is not None or self._obs is not None:
            return self._submit_slow(fn, args, kwargs, opts, kind, subst, found)
        fut: TaskFuture[Any] = self._new_future(TaskFuture, fn, args, kwargs, opts, kind, subst)
        if found:
            dep = found[0]
            if len(found) > 1 or type(dep) is not TaskFuture or dep.done():
                self._enqueue(fut, found)
                return fut
            # one unfinished input: _enqueue written out, send-ahead rule included
            h = self._core.add((dep._handle,), opts.priority)
            fut._handle = h
            if (dep._next is None and self._transport.send_ahead
                    and (opts is DEFAULT_OPTIONS
                         or (opts.request is None and opts.time is None
                             and opts.timeout is None and opts.mpi is None))):
                dep._next = fut
            self._tasks[h] = fut
            if not self._pump_pending:
                self._pump_pending = True
                self._pump_handle = self._loop.call_soon(self._pump, context=self._ctx)
            return fut
        h = self._core.add(_NO_INPUTS, opts.priority)
        fut._handle = h
        self._tasks[h] = fut
        if not self._pump_pending:
            self._pump_pending = True
            self._pump_handle = self._loop.call_soon(self._pump, context=self._ctx)
        return fut

    def _submit_slow(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        opts: TaskOptions,
        kind: int,
        subst: bool,
        found: list[TaskFuture[Any]],
    ) -> TaskFuture[Any]:
        """``submit`` with file arguments, a checkpoint log or an observer."""
        plan = None
        if files_in_use[0]:
            fargs: list[FileArg] = []
            if args:
                collect(args, FileArg, fargs)
            if kwargs:
                collect(kwargs, FileArg, fargs)
            if fargs:
                plan = self._files.plan(fargs)
                for dep in plan.deps:
                    if dep not in found:
                        found.append(dep)
        ck = self._ckpt
        fut: TaskFuture[Any]
        if ck is None:
            fut = self._new_future(TaskFuture, fn, args, kwargs, opts, kind, subst)
        else:
            key = ck.key(fn, opts, args, kwargs, found, plan)
            parents: tuple[bytes, ...] | None = None
            if key is not None and opts.checkpoint:
                parents = tuple([d._ckey for d in found]) if found else ()  # type: ignore[misc]
                if key in ck and (plan is None or not plan.outputs
                                  or ck.outputs_match(key, opts.name or _fn_name(fn))):
                    rec: RecordedFuture[Any] = self._new_future(
                        RecordedFuture, fn, args, kwargs, opts, kind, subst)
                    rec._ckey = key
                    rec._cparents = parents
                    rec._handle = -1
                    rec._unread = True
                    self.n_reused += 1
                    if self._obs is not None and self._obs.keep_graph:
                        self._obs.submitted(rec, found, reused=True)
                    if plan is not None:
                        self._files.register(rec, plan)
                        if plan.deps:
                            self._file_deps[rec] = plan.deps  # if its record fails to read
                    return rec
            fut = self._new_future(TaskFuture, fn, args, kwargs, opts, kind, subst)
            fut._ckey = key
            fut._cparents = parents
            if plan is None and not found and self._obs is None:
                # the common recorded task, no inputs: _enqueue written out
                h = fut._handle = self._core.add(_NO_INPUTS, opts.priority)
                self._tasks[h] = fut
                if not self._pump_pending:
                    self._kick()
                return fut
            if plan is not None and plan.outputs and parents is not None:
                ck.expect_outputs(fut, plan.outputs)
        if plan is not None:
            self._files.register(fut, plan)
        if self._obs is not None and self._obs.keep_graph:
            self._obs.submitted(fut, found)
        self._enqueue(fut, found)
        return fut

    def _new_future(
        self,
        cls: type[TaskFuture[Any]],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        opts: TaskOptions,
        kind: int,
        subst: bool,
    ) -> Any:
        # one place for every field: a task recorded in the checkpoint log
        # sets its key and its inputs' keys after
        self._next_id += 1
        self.n_submitted += 1
        fut = cls(loop=self._loop)
        fut._sched = self
        fut._fn = fn
        fut._args = args
        fut._kwargs = kwargs
        fut._opts = opts
        fut._kind = kind
        fut._subst = subst
        fut._id = self._next_id
        fut._attempt = 1
        fut._att = None
        fut._ignored = False
        fut._unrun = False
        fut._lost = 0
        fut._cancelling = False
        fut._refs = None
        fut._held = None
        fut._next = None
        fut._ckey = None
        fut._cparents = None
        return fut

    def _enqueue(self, fut: TaskFuture[Any], found: list[TaskFuture[Any]]) -> None:
        """Add ``fut`` to the graph, waiting for the unfinished ones of its inputs ``found``."""
        inputs: list[int] = []
        failed_dep: TaskFuture[Any] | None = None
        cancelled_dep: TaskFuture[Any] | None = None
        last: Any = None
        for dep in found:
            if type(dep) is RecordedFuture:
                dep._read()  # this task runs, so it needs the value
            if not dep.done():
                inputs.append(dep._handle)
                last = dep
            elif dep.cancelled():
                cancelled_dep = dep
            elif not dep._ignored and dep._exception is not None:
                failed_dep = dep
        if failed_dep is not None or cancelled_dep is not None:
            fut._handle = -1
            self._resolve_unrun(fut, failed_dep, cancelled_dep)
            return
        opts = fut._opts
        h = self._core.add(inputs, opts.priority)
        fut._handle = h
        # send-ahead: a plain task whose one unfinished input is ``last`` may
        # follow it to where it runs. One whose placement or timing the
        # scheduler must decide when it is ready (resources, a deadline, a
        # timeout, MPI ranks) waits for it, as does one taking a held value
        # from another worker (it would have to fetch it first).
        if (len(inputs) == 1 and last._next is None and self._transport.send_ahead
                and type(fut) is TaskFuture and type(last) is TaskFuture
                and (opts is DEFAULT_OPTIONS
                     or (opts.request is None and opts.time is None
                         and opts.timeout is None and opts.mpi is None))
                and (len(found) == 1
                     or all(d is last or d._held is None for d in found))):
            last._next = fut
        self._tasks[h] = fut
        if not self._pump_pending:
            self._pump_pending = True
            self._pump_handle = self._loop.call_soon(self._pump, context=self._ctx)

    def _read_recorded(self, fut: RecordedFuture[Any]) -> None:
        """Resolve a recorded task from the log; run it if its record is unusable."""
        ck = self._ckpt
        assert ck is not None and fut._ckey is not None
        try:
            value = ck.read(fut._ckey)
        except Exception as exc:
            ck.unusable(fut.name, fut._ckey, exc)
            if self._state != _OPEN:
                fut.set_exception(exc)
                fut._log_traceback = False
                return
            found: list[TaskFuture[Any]] = []
            collect(fut._args, TaskFuture, found)
            collect(fut._kwargs, TaskFuture, found)
            found += [d for d in self._file_deps.pop(fut, ()) if d not in found]
            self.n_reused -= 1
            self._enqueue(fut, found)
            return
        self._file_deps.pop(fut, None)
        fut.set_result(value)
        fut._args = ()
        fut._kwargs = {}

    def _raise_not_open(self) -> None:
        if self._state == _ABORTED:
            raise WorkflowAborted(
                "cannot submit: the runtime was aborted by a failed task"
            ) from self._abort_exc
        raise RuntimeClosedError("cannot submit: the runtime is shut down")

    def _resolve_unrun(
        self, fut: TaskFuture[Any], failed: TaskFuture[Any] | None,
        cancelled: TaskFuture[Any] | None,
    ) -> None:
        """Resolve a task whose input had already failed or been cancelled."""
        fut._args = ()
        fut._kwargs = {}
        if failed is not None:
            cause = failed._exception  # not exception(): the user has not seen it
            upstream = failed.name
            if failed._unrun:
                # the input did not run either: name the task that failed and
                # chain its exception, as the cascade in task_error does (a
                # DependencyError the input raised itself is its own error)
                assert isinstance(cause, DependencyError)
                upstream = cause.upstream
                cause = cause.__cause__
            elif failed._opts.on_failure == "cancel_successors":
                # as if submitted before the failure, when the cascade cancels
                fut._cancel_now(f"upstream task {upstream!r} failed")
                self.n_cancelled += 1
                return
            err = DependencyError(fut.name, upstream)
            err.__cause__ = cause
            fut.set_exception(err)
            link_echo(failed, fut)
            fut._unrun = True
            self.n_failed += 1
        else:
            assert cancelled is not None
            fut._cancel_now(f"input task {cancelled.name!r} was cancelled")
            self.n_cancelled += 1

    # -------------------------------------------------------------------- pump
    def _kick(self) -> None:
        if not self._pump_pending and self._state <= _CLOSING:
            self._pump_pending = True
            self._pump_handle = self._loop.call_soon(self._pump, context=self._ctx)

    def defer_pump(self) -> None:
        """Outcomes reported from now on schedule no pump: the caller runs it.

        For a transport that runs tasks in a loop of its own on the
        scheduler's loop (the local runner): it calls ``pump_now`` when it
        has nothing else to do, and ``pump_soon`` before it lets the loop
        have a turn, so that a pump scheduled for each outcome and then
        cancelled is not paid for.
        """
        if not self._pump_pending:
            self._pump_pending = True
            self._pump_handle = None

    def pump_soon(self) -> None:
        """Schedule the pump that ``defer_pump`` left to its caller, if it is still due."""
        if self._pump_pending and self._pump_handle is None:
            self._pump_handle = self._loop.call_soon(self._pump, context=self._ctx)

    def pump_now(self) -> bool:
        """Run the pump now if one is pending (a transport with nothing else to do); whether it ran.

        The call that was scheduled is cancelled: it would find nothing left to do.
        """
        if not self._pump_pending:
            return False
        handle = self._pump_handle
        if handle is not None:
            handle.cancel()  # it would find nothing left to do
        self._ctx.run(self._pump)
        return True

    def _pump(self) -> None:
        self._pump_pending = False
        if self._state > _CLOSING:
            return
        transport = self._transport
        batch = self._batch
        # a dispatch may report outcomes at once (a task sent ahead that has
        # ended already): those go on in this same pump, a chain at a time
        for _ in range(64):
            if self._done_buf:
                self._flush_done()
            if self._unbounded:
                n = batch
            else:
                cap = transport.capacity()
                if cap <= 0:
                    break
                n = batch if cap > batch else cap
            handles = self._core.pop(n)
            if not handles:
                break
            futs = list(map(self._tasks.__getitem__, handles))
            for f in futs:
                # (one sent ahead has its arguments there already: they are
                # put in place only if it is sent again, see substitute)
                if f._subst and f._att is None:
                    self.substitute(f)
            if self._obs is not None:
                self._obs.dispatched(futs)
            transport.dispatch(futs)
            if len(handles) == n:
                self._kick()
                break
            if not self._done_buf:
                break
        if self._idle_waiters and not self._tasks:
            self._wake_idle()

    def take_next(self, fut: TaskFuture[Any], value: Any, nxt: TaskFuture[Any]) -> bool:
        """``fut`` returned ``value``: finish it now; whether its successor ``nxt`` is the caller's.

        For a transport that can start ``nxt`` (``fut._next``) itself, at
        once, when nothing else is waiting: if finishing ``fut`` left ``nxt``
        the only ready task, ``nxt`` is marked running with its arguments in
        place and True is returned, without a dispatch. Otherwise what is
        ready is dispatched as the pump would (False). Either way ``fut`` is
        resolved.
        """
        if (self._done_buf or self._state > _CLOSING or self._obs is not None
                or self._ckpt is not None):
            self._done_buf.append((fut, value))
            if self._state > _CLOSING or self._obs is not None:
                self._kick()
                return False
            self._flush_done()
        elif not fut.done():
            # _flush_done of this one outcome, written out
            fut.set_result(value)
            fut._args = ()
            fut._kwargs = _DONE_KWARGS
            fut._att = None
            fut._next = None
            h = fut._handle
            one = (h,)
            core = self._core
            core.finish_many(one)
            core.forget(one)
            del self._tasks[h]
            self.n_finished += 1
        handles = self._core.pop(self._batch)
        if len(handles) == 1 and handles[0] == nxt._handle:
            if nxt._subst and nxt._att is None:  # (one that ran ahead has its values)
                args = nxt._args
                if len(args) == 1 and args[0] is fut and not nxt._kwargs and not self.n_held:
                    new: tuple[Any, ...] | None = (value,)  # a link of a chain
                else:
                    new = (flat_values(args) if type(args) is tuple and not nxt._kwargs
                           and not self.n_held else None)
                if new is None:
                    self.substitute(nxt)
                else:
                    nxt._args = new
                    nxt._subst = False
            return True
        if handles:
            futs = list(map(self._tasks.__getitem__, handles))
            for f in futs:
                if f._subst and f._att is None:
                    self.substitute(f)
            self._transport.dispatch(futs)
            if len(handles) == self._batch:
                self._kick()
        return False

    def substitute(self, fut: TaskFuture[Any]) -> None:
        """Put the values of ``fut``'s finished inputs in its arguments (before it is sent)."""
        args = fut._args
        new = flat_values(args) if type(args) is tuple else None
        fut._args = replace_in(args, TaskFuture, input_value) if new is None else new
        if fut._kwargs:
            fut._kwargs = replace_in(fut._kwargs, TaskFuture, input_value)
        fut._subst = False
        if self.n_held:
            self._find_refs(fut)

    def _find_refs(self, fut: TaskFuture[Any]) -> None:
        """Note the held results among ``fut``'s inputs; they stay held until it is over."""
        refs: list[HeldRef] = []
        collect(fut._args, HeldRef, refs)
        if fut._kwargs:
            collect(fut._kwargs, HeldRef, refs)
        if refs:
            fut._refs = refs
            self._transport.hold_inputs(fut, refs)

    def fetch_held(self, fut: TaskFuture[Any], ref: HeldRef) -> Any:
        """The value of a held result, fetched now (blocking): ``HeldFuture.result()``."""
        return self._transport.fetch_held(ref)

    async def fetch_held_async(self, fut: TaskFuture[Any], ref: HeldRef) -> Any:
        """The value of a held result, fetched without blocking: ``await`` of a HeldFuture."""
        return await self._transport.fetch_held_async(ref)

    def _flush_done(self) -> None:
        buf = self._done_buf
        self._done_buf = []
        if self._ckpt is not None or self._obs is not None:
            self._flush_done_recorded(buf)
            return
        tasks = self._tasks
        core = self._core
        if len(buf) == 1:
            # one at a time: a chain of tasks
            fut, value = buf[0]
            if fut.done():
                return  # resolved meanwhile (failed by a transport giving up)
            fut.set_result(value)
            fut._args = ()
            fut._kwargs = _DONE_KWARGS
            fut._att = None
            fut._next = None
            h = fut._handle
            one = (h,)
            core.finish_many(one)
            core.forget(one)
            del tasks[h]
            self.n_finished += 1
            return
        handles: list[int] = []
        append = handles.append
        for fut, value in buf:
            if fut.done():
                continue  # resolved meanwhile (failed by a transport giving up)
            fut.set_result(value)
            # let go of the arguments (the inputs' values) and the attempt
            fut._args = ()
            fut._kwargs = _DONE_KWARGS
            fut._att = None
            fut._next = None
            append(fut._handle)
        core.finish_many(handles)
        core.forget(handles)
        for h in handles:
            del tasks[h]
        self.n_finished += len(handles)

    def _flush_done_recorded(self, buf: list[tuple[TaskFuture[Any], Any]]) -> None:
        """``_flush_done`` with a checkpoint log or an observer."""
        handles: list[int] = []
        ck = self._ckpt
        rec: list[tuple[TaskFuture[Any], Any]] | None = [] if ck is not None else None
        append = handles.append
        for pair in buf:
            fut, value = pair
            if fut.done():
                continue  # resolved meanwhile (failed by a transport giving up)
            fut.set_result(value)
            if rec is not None and fut._cparents is not None:
                rec.append(pair)  # the pair itself: no tuple per task
            # let go of the arguments (the inputs' values) and the attempt
            fut._args = ()
            fut._kwargs = _DONE_KWARGS
            fut._att = None
            fut._next = None
            append(fut._handle)
        if rec:
            assert ck is not None
            ck.record(rec)
        core = self._core
        core.finish_many(handles)
        core.forget(handles)
        tasks = self._tasks
        if self._obs is not None:
            self._obs.finished([tasks[h] for h in handles])
        for h in handles:
            del tasks[h]
        self.n_finished += len(handles)

    def _wake_idle(self) -> None:
        waiters = self._idle_waiters
        self._idle_waiters = []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # ------------------------------------------------ reports from transports
    def task_ok(self, fut: TaskFuture[Any], value: Any) -> None:
        """A transport reports that the current attempt of ``fut`` returned ``value``."""
        self._done_buf.append((fut, value))
        if not self._pump_pending:
            self._pump_pending = True
            self._pump_handle = self._loop.call_soon(self._pump, context=self._ctx)

    def task_ok_many(self, outcomes: list[tuple[TaskFuture[Any], Any]]) -> None:
        """``task_ok`` for each (future, value) of ``outcomes``, in order."""
        self._done_buf.extend(outcomes)
        if not self._pump_pending:
            self._pump_pending = True
            self._pump_handle = self._loop.call_soon(self._pump, context=self._ctx)

    def task_error(self, fut: TaskFuture[Any], exc: BaseException) -> None:
        """A transport reports that the current attempt of ``fut`` raised ``exc``."""
        if fut.done() or self._state > _CLOSING:
            return
        if fut._cancelling:
            self.task_cancelled(fut, "cancelled")
            return
        opts = fut._opts
        name = fut.name
        exc.add_note(
            f"async_wf: raised by task {name!r} (#{fut._id}, attempt {fut._attempt}"
            f" of {opts.retries + 1})"
        )
        if self._obs is not None:
            self._obs.failed(fut, exc, fut._attempt <= opts.retries)
        if fut._attempt <= opts.retries:
            fut._attempt += 1
            fut._att = None  # a late outcome of the attempt given up on is dropped
            self.n_retried += 1
            log.info("task %r (#%d) failed, retrying (%s)", name, fut._id, exc)
            self._core.requeue(fut._handle)
            self._kick()
            return
        policy = opts.on_failure
        h = fut._handle
        core = self._core
        tasks = self._tasks
        if policy == "ignore":
            # the user chose to ignore it: statistics()["failed"] counts it
            log.info("task %r (#%d) failed, ignored: %r", name, fut._id, exc)
            fut._ignored = True
            fut.set_exception(exc)
            fut._log_traceback = False
            self.n_failed += 1
            del tasks[h]
            core.finish_many((h,))
            core.forget((h,))
            self._kick()
            return
        if policy == "abort":
            self._abort(fut, exc)
            return
        self._fail_and_cascade(fut, exc, cancel=policy == "cancel_successors")

    def task_requeue(self, fut: TaskFuture[Any]) -> None:
        """A transport lost the worker running ``fut``: run it again elsewhere.

        Unlike a failure, this does not count against the task's retries.
        """
        if fut.done() or self._state > _CLOSING:
            return
        if fut._cancelling:
            self.task_cancelled(fut, "cancelled")
            return
        fut._att = None
        self._core.requeue(fut._handle)
        self._kick()

    def task_save(self, fut: TaskFuture[Any], rank: int, nranks: int, step: int,
                  blob: bytes) -> None:
        """Rank ``rank`` of ``nranks`` of the running task ``fut`` saved a step's state.

        Kept only with a checkpoint log and for a recorded task; a state the
        log cannot take is reported, not raised (the task goes on).
        """
        ck = self._ckpt
        if ck is None or fut._cparents is None or fut.done():
            return
        try:
            assert fut._ckey is not None
            ck.save(fut._ckey, rank, nranks, step, blob)
        except Exception as exc:
            log.warning("task %r: state of step %d not saved: %s", fut.name, step, exc)

    def restore_blobs(self, fut: TaskFuture[Any], nranks: int) -> tuple[int, list[bytes]] | None:
        """The last complete step of ``fut`` and each rank's pickled state, or None."""
        ck = self._ckpt
        if ck is None or fut._cparents is None:
            return None
        assert fut._ckey is not None
        return ck.restore(fut._ckey, nranks)

    def task_context(self, fut: TaskFuture[Any]) -> TaskContext:
        """The context of ``fut`` running in this process (any thread)."""
        loop = self._loop

        def fetch() -> tuple[int, bytes] | None:
            got = call_on_loop(loop, self.restore_blobs, fut, 1)
            return None if got is None else (got[0], got[1][0])

        def saver(step: int, blob: bytes) -> None:
            call_on_loop(loop, self.task_save, fut, 0, 1, step, blob)

        return TaskContext(0, 1, fetch, saver)

    def wake(self) -> None:
        """A transport has more capacity now: dispatch what is ready."""
        self._kick()

    def pending(self) -> int:
        """Number of tasks submitted and not yet done."""
        return len(self._tasks)

    def fail_pending(self, make_error: Callable[[TaskFuture[Any]], BaseException]) -> None:
        """Fail every pending task with ``make_error(fut)`` (a transport gave up on them).

        Tasks go in submission order, so a task whose input fails here gets a
        ``DependencyError`` rather than its own error.
        """
        for f in list(self._tasks.values()):
            if not f.done() and self._tasks.get(f._handle) is f:
                self._fail_and_cascade(f, make_error(f), cancel=False)

    def task_cancelled(self, fut: TaskFuture[Any], msg: Any = None) -> None:
        """A transport reports that the running task of ``fut`` was cancelled."""
        if fut.done() or self._state > _CLOSING:
            return
        h = fut._handle
        core = self._core
        # the core cancels only tasks that have not started: step back first
        core.requeue(h)
        self._cancel_in_core(fut, msg)

    def _cancel_in_core(self, fut: TaskFuture[Any], msg: Any) -> None:
        h = fut._handle
        core = self._core
        tasks = self._tasks
        succ = core.cancel(h)
        del tasks[h]
        fut._args = ()
        fut._kwargs = {}
        fut._cancel_now(msg)
        for s in succ:
            sf = tasks.pop(s)
            sf._args = ()
            sf._kwargs = {}
            sf._cancel_now(f"input task {fut.name!r} was cancelled")
        self.n_cancelled += 1 + len(succ)
        core.forget((h,))
        core.forget(succ)
        self._kick()

    def _fail_and_cascade(self, fut: TaskFuture[Any], exc: BaseException, *, cancel: bool) -> None:
        """Fail ``fut`` with ``exc``; its transitive dependents are cancelled or fail.

        Dependents that fail get ``DependencyError`` naming ``fut`` with
        ``exc`` as cause.
        """
        h = fut._handle
        core = self._core
        tasks = self._tasks
        name = fut.name
        succ = core.fail(h, cancel)
        del tasks[h]
        fut._args = ()
        fut._kwargs = {}
        fut.set_exception(exc)
        self.n_failed += 1
        for s in succ:
            sf = tasks.pop(s)
            sf._args = ()
            sf._kwargs = {}
            if cancel:
                sf._cancel_now(f"upstream task {name!r} failed")
            else:
                err = DependencyError(sf.name, name)
                err.__cause__ = exc
                sf.set_exception(err)
                link_echo(fut, sf)
                sf._unrun = True
        if cancel:
            self.n_cancelled += len(succ)
        else:
            self.n_failed += len(succ)
        core.forget((h,))
        core.forget(succ)
        self._kick()

    # ------------------------------------------------------------ cancelling
    def _cancel(self, fut: TaskFuture[Any], msg: Any) -> bool:
        if self._state > _CLOSING or fut._handle < 0:
            return False
        st = self._core.state(fut._handle)
        if st == _corepick.WAITING or st == _corepick.READY:
            if fut._att is not None:
                self._transport.cancel_ahead(fut)  # sent ahead to a worker
            self._cancel_in_core(fut, msg)
            return True
        if st == _corepick.RUNNING:
            if self._transport.cancel_running(fut, msg):
                # the work stops and reports its cancellation itself; until
                # then no timeout, error or lost worker may turn it into a retry
                # (the transport has disarmed the attempt's timeout)
                fut._cancelling = True
                return True
            # Work that cannot be stopped (a blocking call already running):
            # like a run_in_executor future, the future is cancelled now so
            # that whoever awaits it, Ctrl-C included, is not held up until the
            # call ends. Its eventual result is dropped.
            if not fut.done():
                self.task_cancelled(fut, msg)
            return True
        return False

    # ----------------------------------------------------------------- abort
    def _abort(self, culprit: TaskFuture[Any], exc: BaseException) -> None:
        log.error("task %r (#%d) failed with on_failure='abort': aborting", culprit.name,
                  culprit._id)
        self._state = _ABORTED
        self._abort_exc = exc
        tasks = self._tasks
        self._tasks = {}
        self._done_buf = []
        culprit.set_exception(exc)
        self.n_failed += 1
        for f in tasks.values():
            if f is culprit or f.done():
                continue
            self._transport.cancel_running(f, "runtime aborted")
            err = WorkflowAborted(
                f"task {f.name!r} did not complete: the runtime was aborted "
                f"because task {culprit.name!r} failed"
            )
            err.__cause__ = exc
            f.set_exception(err)
            link_echo(culprit, f)
            f._args = ()
            f._kwargs = {}
            self.n_failed += 1
        self._core = _corepick.Core()
        self._wake_idle()

    # ------------------------------------------------------------- lifecycle
    async def wait_idle(self) -> None:
        """Wait until every task submitted so far is done (or the runtime stops)."""
        while self._tasks and self._state <= _CLOSING:
            w: asyncio.Future[None] = self._loop.create_future()
            self._idle_waiters.append(w)
            self._kick()
            await w

    def cancel_all(self, *, running: bool = True) -> None:
        """Cancel every pending task; with ``running=False`` only those not started yet."""
        core = self._core
        for f in list(self._tasks.values()):
            if f.done():
                continue
            if running or core.state(f._handle) in (_corepick.WAITING, _corepick.READY):
                f.cancel("runtime shutting down")

    async def close(self, *, cancel: bool) -> None:
        """Wait for (or cancel) the pending tasks, stop accepting tasks, stop the transport.

        While it waits, tasks are still accepted: a running task may submit
        subtasks (a dynamic graph), and they are waited for too.
        """
        if self._state >= _CLOSED:
            if self._state == _ABORTED:
                try:
                    await self._transport.close()
                finally:
                    if self._ckpt is not None:
                        self._close_log()
            return
        try:
            if cancel:
                self._state = _CLOSING
                self.cancel_all()
                # let cancelled work report back (coroutines clean up, remote
                # ones answer), so that their futures end cancelled, not closed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wait_idle(), _CANCEL_GRACE)
            else:
                await self.wait_idle()
        finally:
            self._state = _CLOSED
            self._fail_leftovers()
            try:
                await self._transport.close()
            finally:
                if self._ckpt is not None:
                    self._close_log()

    def _close_log(self) -> None:
        assert self._ckpt is not None
        self._ckpt.close(self.n_reused, self.n_submitted, self.n_finished + self.n_failed,
                         self.interrupted)

    def _fail_leftovers(self) -> None:
        tasks = self._tasks
        self._tasks = {}
        for f in tasks.values():
            if not f.done():
                self._transport.cancel_running(f, "runtime closed")
                err = RuntimeClosedError(
                    f"task {f.name!r} did not complete: the runtime was shut down"
                )
                f.set_exception(err)
                f._log_traceback = False
                self.n_failed += 1
        self._wake_idle()

    @property
    def accepting(self) -> bool:
        """True while ``submit`` is allowed."""
        return self._state == _OPEN

    def statistics(self) -> dict[str, Any]:
        """Counts by state and the rate of finished tasks; see ``Runtime.statistics``."""
        waiting, ready, running, _, _, _ = self._core.counts()
        elapsed = time.perf_counter() - self._t0
        return {
            "submitted": self.n_submitted,
            "waiting": waiting,
            "ready": ready,
            "running": running,
            "finished": self.n_finished,
            "failed": self.n_failed,
            "cancelled": self.n_cancelled,
            "retried": self.n_retried,
            "reused": self.n_reused,
            "ready_queue": ready,
            "elapsed_s": elapsed,
            "tasks_per_s": self.n_finished / elapsed if elapsed > 0 else 0.0,
            "core": _corepick.CORE_IMPL,
        }
