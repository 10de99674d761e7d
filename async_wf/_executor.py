"""A ``concurrent.futures.Executor`` face for code that is not async.

The executor runs a ``Runtime`` on an event loop in a background thread.
``submit`` hands the call over to that loop and returns a
``concurrent.futures.Future`` at once; such futures, passed as arguments to
later ``submit`` calls, become dependencies exactly like ``TaskFuture``s do.

Hand-over is batched: calls queue in a deque, and the loop is woken (one
self-pipe write) only when the deque goes from empty to non-empty, so a
burst of ``submit`` calls costs one wake-up. Calls are taken in order, so a
future passed as an argument always belongs to a call that was handed over
before the one using it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures.thread import BrokenThreadPool
from typing import Any

from async_wf._api import Runtime, RuntimeStatistics
from async_wf._errors import RuntimeClosedError
from async_wf._futures import TaskFuture, collect, replace_in
from async_wf._loop import mpi_launched, run

__all__ = ["Executor", "ExecutorFuture"]


class ExecutorFuture(cf.Future[Any]):
    """The ``concurrent.futures.Future`` of a task submitted through ``Executor``.

    ``running()`` is True once the task has started (taken by a thread, or
    sent to a worker process or rank, where it may wait behind others in
    the worker's own queue). ``cancel()`` succeeds until then: a task still
    waiting for its inputs or queued behind others is cancelled, with its
    dependents, and ends ``cancelled()``.
    """

    _task: TaskFuture[Any] | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def running(self) -> bool:
        """True if the task has started and not finished."""
        t = self._task
        return not self.done() and t is not None and _started(t)

    def cancel(self) -> bool:
        """Cancel the task unless it has started; return whether it is cancelled."""
        t = self._task
        if t is not None and not self.done() and _started(t):
            return False
        if not super().cancel():
            return False
        # CANCELLED_AND_NOTIFIED: concurrent.futures.wait and as_completed
        # count a future as done only then (a pool does it as it skips the call)
        self.set_running_or_notify_cancel()
        loop = self._loop
        if t is not None and loop is not None:
            # the runtime cancels the task (and its dependents) on its loop;
            # if it started meanwhile, its result is dropped there
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(t.cancel)
        return True


def _as_they_finish(futs: list[ExecutorFuture], timeout: float | None) -> Iterator[Any]:
    """The results of ``futs`` in the order they finish; cancel the rest on an exit early."""
    try:
        for f in cf.as_completed(futs, timeout=timeout):
            yield f.result()
    finally:
        for f in futs:
            f.cancel()


def _cancel_unstarted(sched: Any) -> None:
    """Cancel every task of ``sched`` not yet taken by a thread or sent to a worker."""
    for t in list(sched._tasks.values()):
        if not t.done() and not _started(t):
            t.cancel()


def _started(t: TaskFuture[Any]) -> bool:
    # read from the caller's thread: a stale answer only moves the moment
    # from which cancel() refuses by one hand-over
    return t._sched._transport.started(t)


def _on_mpi_ranks(options: dict[str, Any]) -> bool:
    """Whether an executor with these options runs on the worker ranks of an MPI launch."""
    if any(k in options for k in ("transport", "workers", "listen")) or not mpi_launched():
        return False
    if "initializer" in options:
        raise NotImplementedError(
            "initializer= is not supported on MPI worker ranks yet: call it at the start of "
            "the task function, or pass workers=N for worker processes")
    return True


def _as_task(f: ExecutorFuture) -> TaskFuture[Any]:
    t = f._task
    if t is None:
        raise ValueError(
            f"argument {f!r} is a future that was not accepted by this executor's runtime "
            "(another executor's, or cancelled before it started)"
        )
    return t


class _Service:
    """An executor's runtime on its loop thread: the inbox of calls, start and stop.

    Apart from the ``Executor`` so that the thread refers only to this, and
    an executor the program drops is collected (and shuts its service down).
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self.lock = threading.Lock()
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = threading.Event()
        self.stop: asyncio.Event | None = None
        self.start_error: BaseException | None = None
        self.cancel_on_close = False
        # set on the loop once shutdown(cancel_futures=True) has cancelled
        # what had not started: the caller waits for it (see shutdown)
        self.cancel_done = threading.Event()
        self.thread = threading.Thread(target=self.main, name="async_wf-executor", daemon=True)

    def start(self) -> None:
        """Start the loop thread and the runtime on it; wait until it runs.

        Raises:
            RuntimeError: the runtime failed to start (its error as the cause).
        """
        self.thread.start()
        _live.add(self)
        self.started.wait()
        if self.start_error is not None:
            _live.discard(self)
            raise RuntimeError("the executor's runtime failed to start") from self.start_error

    def main(self) -> None:
        """The loop thread: run the runtime until shutdown."""
        async def body() -> None:
            try:
                self.loop = asyncio.get_running_loop()
                self.stop = asyncio.Event()
                await self.rt.start()
            except BaseException as exc:
                self.start_error = exc
                self.started.set()
                return
            self.started.set()
            try:
                await self.stop.wait()
            finally:
                sched = self.rt._sched
                if self.cancel_on_close and sched is not None:
                    # as concurrent.futures does: cancel what has not started
                    # and let the running tasks finish. What the runtime held
                    # at the call goes at once; the calls still in the inbox
                    # are handed over first and the free threads get a moment
                    # to take theirs, as a pool's threads take work at submit
                    _cancel_unstarted(sched)
                    self.drain()
                    await asyncio.sleep(_TAKE_MOMENT)
                    _cancel_unstarted(sched)
                    self.cancel_done.set()
                else:
                    self.drain()
                await self.rt.close()

        try:
            run(body())
        finally:
            _live.discard(self)

    def drain(self) -> None:
        """Submit the calls of the inbox to the runtime (on the loop)."""
        with self.lock:
            items = list(self.inbox)
            self.inbox.clear()
        rt = self.rt
        for cfut, fn, args, kwargs in items:
            # left PENDING (see ExecutorFuture): cancel() works until the task starts
            if cfut.cancelled():
                continue
            try:
                found: list[ExecutorFuture] = []
                if collect(args, ExecutorFuture, found):
                    args = replace_in(args, ExecutorFuture, _as_task)
                if collect(kwargs, ExecutorFuture, found):
                    kwargs = replace_in(kwargs, ExecutorFuture, _as_task)
                tf = rt.submit(fn, *args, **kwargs)
            except BaseException as exc:
                cfut.set_exception(exc)
                continue
            cfut._loop = self.loop
            cfut._task = tf
            tf.add_done_callback(_Relay(cfut))

    def cancel_late(self, sched: Any) -> None:
        """On the loop: a second shutdown asked to cancel what has not started."""
        _cancel_unstarted(sched)
        self.cancel_done.set()

    def wait_cancelled(self) -> None:
        """Return once the loop has cancelled the calls not started.

        As ``concurrent.futures`` does, ``shutdown(cancel_futures=True)``
        returns with them cancelled: a caller that then lets a running call
        end must not see the freed thread start queued ones because the
        loop thread was slow to take the request (a loaded machine). Not
        from the loop's own thread (a call run inline there), which would
        wait for itself, nor once that thread has ended.
        """
        if self.thread is threading.current_thread():
            return
        while not self.cancel_done.wait(0.05):
            if not self.thread.is_alive():
                return

    def submit(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> ExecutorFuture:
        """Queue one call for the loop; its future at once."""
        fut = ExecutorFuture()
        with self.lock:
            if _interpreter_exiting:
                # the standard library's words
                raise RuntimeClosedError("cannot schedule new futures after interpreter shutdown")
            if self.closed:
                raise RuntimeClosedError("cannot submit after shutdown")
            wake = not self.inbox
            self.inbox.append((fut, fn, args, kwargs))
        if wake:
            loop = self.loop
            assert loop is not None
            loop.call_soon_threadsafe(self.drain)
        return fut

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """Stop taking calls, stop the runtime once its tasks are over; join if ``wait``."""
        with self.lock:
            again = self.closed
            self.closed = True
        if again:
            if cancel_futures and not self.cancel_on_close:
                # a later shutdown(cancel_futures=True) still cancels what has
                # not started, as concurrent.futures does
                self.cancel_on_close = True
                loop, sched = self.loop, self.rt._sched
                if loop is not None and sched is not None and not loop.is_closed():
                    with contextlib.suppress(RuntimeError):  # the loop has stopped
                        loop.call_soon_threadsafe(self.cancel_late, sched)
                        self.wait_cancelled()
            # joined outside the lock: the loop thread takes it to drain the inbox
            if wait and self.thread.ident is not None \
                    and self.thread is not threading.current_thread():
                self.thread.join()
            return
        self.cancel_on_close = cancel_futures
        loop = self.loop
        stop = self.stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has already stopped
                loop.call_soon_threadsafe(stop.set)
                if cancel_futures:
                    self.wait_cancelled()
        if wait and self.thread.ident is not None \
                and self.thread is not threading.current_thread():
            self.thread.join()


class Executor(cf.Executor):
    """Run tasks on an async_wf runtime from synchronous code.

    A drop-in for ``ProcessPoolExecutor`` or ``mpi4py.futures.MPIPoolExecutor``::

        with async_wf.Executor(max_workers=4) as ex:
            a = ex.submit(load, path)
            b = ex.submit(process, a)      # waits for a, receives its value
            print(b.result())

    As with ``concurrent.futures``, ``cancel()`` works until a task starts,
    ``shutdown(cancel_futures=True)`` cancels what has not started, and an
    executor still open when the interpreter exits waits for its tasks. The
    differences (a lost worker's tasks run again elsewhere instead of
    ``BrokenProcessPool``; futures as arguments are dependencies;
    ``chunksize`` does not group calls) are
    listed in the README.

    Args:
        max_workers: threads for blocking functions (``Runtime(threads=...)``);
            under ``python -m async_wf.mpi``, how many worker ranks to use
            (default: all), as ``MPIPoolExecutor(max_workers=...)``.
        initializer: called with ``initargs`` once in each thread, or in each
            worker process with ``workers=N``; if it raises, the tasks fail
            with ``BrokenThreadPool`` (threads) or the executor does not
            start (processes). Not on MPI worker ranks yet
            (``NotImplementedError``).
        initargs: the arguments of ``initializer``.
        max_tasks_per_child: with ``workers=N``, each worker process runs at
            most this many tasks, then a fresh one takes its place.
        **runtime_options: passed on to ``Runtime``.

    Raises:
        ValueError: ``max_workers`` < 1 ("must be greater than 0").
        TypeError: ``max_workers`` is not an int, or an unknown option.
    """

    def __init__(self, max_workers: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 max_tasks_per_child: int | None = None, **runtime_options: Any) -> None:
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got "
                            f"{type(initializer).__name__}: {initializer!r}")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int) \
                    or max_tasks_per_child < 1:
                # the standard library's words, and the value
                raise ValueError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child!r}")
            if not runtime_options.get("workers"):
                raise ValueError(
                    "max_tasks_per_child applies to worker processes: pass workers=N (as "
                    "ProcessPoolExecutor; threads and MPI ranks are not replaced)")
            runtime_options["max_tasks_per_child"] = max_tasks_per_child
        if initializer is not None:
            runtime_options["initializer"] = functools.partial(initializer, *initargs)
        workers = runtime_options.get("workers")
        if isinstance(workers, int) and not isinstance(workers, bool) and workers < 1:
            # workers=0 means "no local worker processes" to a Runtime; an
            # executor without workers would never run anything
            raise ValueError(f"max_workers must be greater than 0, got {workers}")
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an int, got "
                                f"{type(max_workers).__name__}: {max_workers!r}")
            if max_workers < 1:
                # the standard library's words, and the value
                raise ValueError(f"max_workers must be greater than 0, got {max_workers}")
        if _on_mpi_ranks(runtime_options):
            from async_wf.transport.mpi import MpiTransport

            # as MPIPoolExecutor(max_workers=N): N of the job's worker ranks
            runtime_options["transport"] = MpiTransport(ranks=max_workers)
            max_workers = None
        svc = self._svc = _Service(Runtime(threads=max_workers, **runtime_options))
        self._rt = svc.rt
        # an executor dropped without shutdown() lets its runtime go (its
        # tasks still finish): the service's thread holds no reference to it
        weakref.finalize(self, svc.shutdown, False, False)
        svc.start()

    # ---------------------------------------------------------------- caller
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> ExecutorFuture:
        """Submit ``fn(*args, **kwargs)``; return a ``concurrent.futures.Future`` at once.

        Raises:
            RuntimeError: after ``shutdown`` ("cannot submit after shutdown").
            TypeError: ``fn`` is not callable.
            BrokenThreadPool: a thread initializer has failed.
        """
        if not callable(fn):
            raise TypeError(f"submit needs a callable, got {type(fn).__name__}: {fn!r}")
        why = self._rt.transport.broken()
        if why is not None:
            # the standard library's type and words
            raise BrokenThreadPool("a thread initializer failed, the pool is not usable "
                                   "any more") from why
        return self._svc.submit(fn, args, kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``wait``, return when all have finished.

        Args:
            wait: block until the runtime has stopped.
            cancel_futures: cancel every task that has not started.
        """
        self._svc.shutdown(wait, cancel_futures)

    def map(self, fn: Callable[..., Any], *iterables: Any, timeout: float | None = None,
            chunksize: int = 1, unordered: bool = False) -> Iterator[Any]:
        """``fn`` over the items of ``iterables``, as ``Executor.map``.

        When ``timeout`` expires the calls not yet started are cancelled.
        ``chunksize`` is accepted for compatibility and checked; calls are
        not grouped (each is a task already as cheap as a chunk elsewhere).
        ``unordered=True`` (as in mpi4py.futures) yields the results as the
        calls finish.

        Raises:
            ValueError: ``chunksize`` < 1.
            TimeoutError: from the iterator, when ``timeout`` expires.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
        if not unordered:
            return super().map(fn, *iterables, timeout=timeout)
        futs = [self.submit(fn, *args) for args in zip(*iterables, strict=False)]
        return _as_they_finish(futs, timeout)

    def starmap(self, fn: Callable[..., Any], iterable: Any, timeout: float | None = None,
                chunksize: int = 1, unordered: bool = False) -> Iterator[Any]:
        """``fn(*args)`` for each ``args`` of ``iterable`` (mpi4py.futures' ``starmap``)."""
        return self.map(fn, *zip(*iterable, strict=False), timeout=timeout,
                        chunksize=chunksize, unordered=unordered)

    def bootup(self, wait: bool = True) -> Executor:
        """Return the executor, started (it starts in its constructor; mpi4py's API).

        Raises:
            RuntimeError: after ``shutdown`` ("cannot bootup after shutdown").
        """
        if self._svc.closed:
            raise RuntimeError("cannot bootup after shutdown")
        return self

    @property
    def num_workers(self) -> int:
        """How many tasks run at once: threads, worker processes or ranks (as in mpi4py).

        0 once the executor is shut down.
        """
        if self._svc.closed:
            return 0
        tr = self._rt.transport
        n = tr.statistics().get("workers")
        if isinstance(n, int):
            return n
        return int(getattr(tr, "_max_threads", 1))

    def statistics(self) -> RuntimeStatistics:
        """The runtime's statistics (see ``Runtime.statistics``)."""
        return self._rt.statistics()


#: seconds the threads get to take the calls just handed over before
#: shutdown(cancel_futures=True) cancels what they have not taken
_TAKE_MOMENT = 0.005

# Executors still open when the interpreter exits: their tasks are waited for,
# as ThreadPoolExecutor and ProcessPoolExecutor do. The loop thread is a
# daemon (an executor dropped without shutdown must not keep a program
# alive after its main thread ends with an error), so the wait is explicit.
_live: set[_Service] = set()
_interpreter_exiting = False


def _at_exit() -> None:
    global _interpreter_exiting
    _interpreter_exiting = True
    for svc in list(_live):
        svc.shutdown(True, False)


# run before the interpreter stops daemon threads (concurrent.futures does the same)
threading._register_atexit(_at_exit)  # type: ignore[attr-defined]


class _Relay:
    """Copies a TaskFuture's outcome into its ExecutorFuture (on the loop thread)."""

    __slots__ = ("cfut",)

    def __init__(self, cfut: ExecutorFuture) -> None:
        self.cfut = cfut

    def __call__(self, tf: asyncio.Future[Any]) -> None:
        cfut = self.cfut
        if cfut.done():
            return  # cancelled by the caller meanwhile
        if tf.cancelled():
            # the base method: ExecutorFuture.cancel would ask the runtime
            # again, and refuse for a task that had started
            if cf.Future.cancel(cfut):
                cfut.set_running_or_notify_cancel()
            else:
                cfut.set_exception(cf.CancelledError("the task was cancelled"))
            return
        exc = tf.exception()
        if exc is not None:
            cfut.set_exception(exc)
        else:
            cfut.set_result(tf.result())
