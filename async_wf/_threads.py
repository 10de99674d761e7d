"""A pool of threads for blocking task functions, reporting to an event loop in batches.

Threads pull work: items wait in one heap ordered by (priority, arrival),
and a thread that becomes free takes the best item there is at that moment.
So priorities are exact for blocking tasks too, without handing work to
threads in advance. The heap, the results list and the claim check share one
lock, which keeps every hand-over simple to reason about.

Each outcome is appended to a shared list; the thread that makes the list
non-empty wakes the loop (one ``call_soon_threadsafe``, one self-pipe write)
and the loop then takes the whole list. A burst of short tasks therefore
costs a few wake-ups, not one per task.

An optional ``claim(token)`` callback runs under the lock just as a thread
takes an item; returning False skips the item (it was cancelled, or timed
out, while queued) and reports ``(token, SKIPPED, None, 0.0, 0.0)``. Each
outcome carries the seconds the call took, so that callers can learn which
functions are short, and when it began (``perf_counter``), for traces.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import traceback
from collections.abc import Callable
from concurrent.futures.thread import BrokenThreadPool
from time import perf_counter
from typing import Any

from async_wf import _context

log = logging.getLogger("async_wf")

OK = 0
ERROR = 1
SKIPPED = 2

# token, status, value, seconds the call took, perf_counter() when it began
Outcome = tuple[Any, int, Any, float, float]


class ThreadPool:
    """Threads that run blocking calls and hand outcomes back to ``loop`` in batches.

    Args:
        nthreads: the most threads ever started (they start on demand).
        loop: the loop that ``deliver`` runs on.
        deliver: called on the loop with a list of ``(token, status, value,
            seconds, start)``; for ERROR the value is ``(exception, formatted traceback)``.
        claim: called under the lock as a thread takes an item; False skips it.
        name: prefix of the threads' names.
        owner: marks each call as its token's task of ``owner``, for
            ``async_wf.task_context()``.
        initializer: called once by each thread before its first call. If
            it raises, the pool is broken, as ``ThreadPoolExecutor``'s is:
            every call from then on fails with ``BrokenThreadPool``.
    """

    def __init__(
        self,
        nthreads: int,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[Outcome]], None],
        claim: Callable[[Any], bool] | None = None,
        name: str = "async_wf",
        owner: Any = None,
        initializer: Callable[[], Any] | None = None,
    ) -> None:
        self.nthreads = nthreads
        self._initializer = initializer
        self.broken: BaseException | None = None
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self._loop = loop
        self._deliver = deliver
        self._claim = claim
        self._name = name
        self._owner = owner
        self._heap: list[tuple[int, int, Any, Callable[..., Any], Any, Any]] = []
        self._seq = 0
        self._idle = 0
        #: calls running now, and the most that may run at once (under the lock):
        #: lowered while tasks holding cores of their own run beside the pool
        #: (see set_limit)
        self.running = 0
        self._limit = nthreads
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._results: list[Outcome] = []
        self._wake_pending = False

    def put(
        self, token: Any, fn: Callable[..., Any], args: Any, kwargs: Any, priority: int = 0
    ) -> None:
        """Queue ``fn(*args, **kwargs)``; its outcome comes back tagged with ``token``.

        Higher ``priority`` is taken first; FIFO among equal priorities.
        """
        with self.lock:
            self._seq += 1
            heapq.heappush(self._heap, (-priority, self._seq, token, fn, args, kwargs))
            if self._idle:
                # the woken thread is spoken for from now on: were it counted
                # idle until it runs, every put of a burst would wake that
                # same thread and no other would start (one thread for all)
                self._idle -= 1
                self._cond.notify()
                return
            if len(self._threads) < self.nthreads:
                t = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()

    def _work(self) -> None:
        heap = self._heap
        claim = self._claim
        owner = self._owner
        tls = _context._tls
        if self._initializer is not None:
            try:
                self._initializer()
            except BaseException as exc:
                log.error("a thread initializer failed: %s: %s", type(exc).__name__, exc)
                self.broken = exc
        while True:
            with self.lock:
                while not heap or self.running >= self._limit:
                    if self._stopping and not heap:
                        return
                    self._idle += 1
                    self._cond.wait()  # put() takes it off the idle count
                _, _, token, fn, args, kwargs = heapq.heappop(heap)
                run = claim is None or claim(token)
                self.running += 1
            outcome: Outcome
            if not run:
                outcome = (token, SKIPPED, None, 0.0, 0.0)
            elif self.broken is not None:
                err = BrokenThreadPool("a thread initializer failed, the pool is not usable "
                                       "any more")
                err.__cause__ = self.broken
                outcome = (token, ERROR, (err, ""), 0.0, perf_counter())
            else:
                if owner is not None:
                    tls.cur = [owner, token, None]
                t0 = perf_counter()
                try:
                    outcome = (token, OK, fn(*args, **kwargs), perf_counter() - t0, t0)
                except BaseException as exc:  # a thread has nowhere to propagate to
                    outcome = (token, ERROR, (exc, traceback.format_exc()),
                               perf_counter() - t0, t0)
            # an idle thread must not keep its last task (and so its result) alive
            del fn, args, kwargs, token
            if owner is not None:
                tls.cur = None
            if not self._report(outcome):
                return
            del outcome

    def _report(self, outcome: Outcome) -> bool:
        with self.lock:
            self.running -= 1
            if self._limit < self.nthreads and self._heap and self._idle:
                # a thread held back by the limit may start the next call now
                self._idle -= 1
                self._cond.notify()
            self._results.append(outcome)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._take)
            except RuntimeError:
                return False  # the loop is closed: nobody is waiting any more
        return True

    def set_limit(self, limit: int) -> None:
        """Let at most ``limit`` calls run at once (call with ``lock`` held).

        Threads over the limit finish their call and then wait; raising it
        wakes them. The pool never starts more than ``nthreads`` threads.
        """
        raised = limit > self._limit
        self._limit = limit
        if raised and self._idle:
            self._idle = 0
            self._cond.notify_all()

    def take_back(self, n: int, keep: Callable[[Any], bool]) -> list[Any]:
        """Remove up to ``n`` queued calls (the last to be taken) for which ``keep`` is False.

        Returns their tokens. For work stealing: a call no thread has
        started goes back to the scheduler, to run elsewhere.
        """
        with self.lock:
            heap = self._heap
            if not heap:
                return []
            order = sorted(heap)
            out: list[Any] = []
            kept = []
            for item in reversed(order):
                if len(out) < n and not keep(item[2]):
                    out.append(item[2])
                else:
                    kept.append(item)
            if out:
                kept.reverse()
                heap[:] = kept  # sorted, so a valid heap
        return out

    def queued(self) -> int:
        """Calls waiting for a thread (read without the lock: a len() is atomic)."""
        return len(self._heap)

    def take_now(self) -> list[Outcome]:
        """Take the outcomes reported so far, from any thread.

        For a caller that stands in for the loop while the loop's thread is
        held up; the wake-up already scheduled on the loop then delivers
        what came after, or nothing.
        """
        with self.lock:
            items = self._results
            self._results = []
        return items

    def _take(self) -> None:
        with self.lock:
            items = self._results
            self._results = []
            self._wake_pending = False
        self._deliver(items)

    def close(self, drop_queued: bool = False) -> None:
        """Let every thread exit once the queue is empty (now, with ``drop_queued``).

        A call already running is never interrupted.
        """
        with self.lock:
            self._stopping = True
            if drop_queued:
                self._heap.clear()
            self._cond.notify_all()
        self._threads = []
