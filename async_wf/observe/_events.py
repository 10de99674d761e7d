"""The observer: what the scheduler and transports tell the observability features.

One ``Observer`` per runtime, and only when an observability option is on
(``progress``, ``metrics``, ``trace``, ``report``, ``dag``); otherwise the
scheduler's ``_obs`` is ``None`` and each hook below costs its caller one
``is not None`` test, taken once per batch where the caller works in
batches (dispatch, the pump's finish step, a RESULTS frame, a thread pool
wake-up) and once per call on the rare paths (a failure, a retry).

What is recorded
    Counters by function (attempts done, failed, retried) and a duration
    histogram per function, always while the observer exists, updated when
    attempts end (nothing per function at submit). Spans (one per
    attempt: worker lane, start, end, status) only when a trace or a report
    is asked for, up to ``max_spans``; the task graph (nodes and edges) only
    with ``dag=True`` or a report, up to ``max_nodes`` nodes. Beyond a cap,
    counts go on and records stop; the trace and the report say how many
    were dropped.

Times
    Wall-clock seconds (``time.time()`` scale). A remote worker measures its
    own start and end with ``perf_counter`` offset to its wall clock, so
    spans of different hosts are only as aligned as their clocks. Blocking
    tasks run in this process come with their thread's start time and
    duration; ``async def`` and inline tasks run here span from their
    dispatch to the pump that finishes them.

Threads
    Every hook runs on the runtime's loop. The metrics server reads from its
    own thread, only ``snapshot`` and the per-function tables, which it
    copies (a ``dict`` copy is atomic under the GIL).
"""

from __future__ import annotations

import asyncio
import bisect
import importlib
import logging
import time
import traceback
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

from async_wf.observe._model import (
    BUCKETS,
    CANCELLED,
    DONE,
    ERROR,
    FAILED,
    LOCAL_LANE,
    OK,
    PENDING,
    RETRY,
    REUSED,
    Span,
    span_key,
)

if TYPE_CHECKING:
    from async_wf._futures import TaskFuture
    from async_wf._scheduler import Scheduler

__all__ = ["BUCKETS", "OBSERVE_EXTRA", "FailureGroup", "ObserveOptions", "Observer", "Span",
           "missing_library", "span_key"]

log = logging.getLogger("async_wf.observe")

#: how to install the libraries of progress and metrics (package extras)
OBSERVE_EXTRA = "pip install 'async-wf[observe]'"


def missing_library(progress: bool, metrics: bool) -> str | None:
    """The library that the features asked for need and that cannot be imported, or None.

    ``rich`` for the progress line, ``prometheus_client`` for metrics: they
    are the ``[observe]`` extra, not dependencies, so a runtime that watches
    nothing does not need them installed.
    """
    for on, mod in ((progress, "rich"), (metrics, "prometheus_client")):
        if on:
            try:
                importlib.import_module(mod)
            except ImportError:
                return mod
    return None


def library_message(mod: str, option: str) -> str:
    """One line: ``option`` needs ``mod``, and how to install it."""
    return f"{option} needs {mod!r}, which is not installed: {OBSERVE_EXTRA}"


@dataclass
class ObserveOptions:
    """Which observability features a runtime has on (all off by default).

    Raises:
        ModuleNotFoundError: ``progress`` or ``metrics`` is on and its library
            (the ``[observe]`` extra) is not installed; one line that says
            which and how to install it.
    """

    progress: bool = False
    metrics: str | None = None
    trace: str | None = None
    report: str | None = None
    dag: bool = False
    max_spans: int = 2_000_000
    max_nodes: int = 1_000_000

    def __post_init__(self) -> None:
        mod = missing_library(bool(self.progress), bool(self.metrics))
        if mod is not None:
            option = "Runtime(progress=True)" if mod == "rich" else "Runtime(metrics=...)"
            raise ModuleNotFoundError(library_message(mod, option), name=mod)

    @property
    def any(self) -> bool:
        """Whether anything is on (else the runtime has no observer at all)."""
        return bool(self.progress or self.metrics or self.trace or self.report or self.dag)


class FailureGroup:
    """The failed attempts of one function with one exception type (for the report).

    Every attempt is counted; the traceback is that of the first one only
    (formatting each would cost more than the rest of the failure path),
    and the first ``MAX_IDS`` task numbers are kept.
    """

    MAX_IDS = 20
    __slots__ = ("attempt", "count", "final", "function", "task_ids", "traceback", "type")

    def __init__(self, type_name: str, function: str, traceback_text: str,
                 attempt: int) -> None:
        self.type = type_name
        self.function = function
        self.count = 0  # attempts that raised
        self.final = 0  # of which not retried: the task failed
        self.task_ids: list[int] = []
        self.traceback = traceback_text
        self.attempt = attempt  # of the first failure, whose traceback is kept


def _type_name(exc: BaseException) -> str:
    t = type(exc)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class _FnStats:
    __slots__ = ("buckets", "done", "failed", "name", "retried", "total")

    def __init__(self, name: str) -> None:
        self.name = name
        self.done = 0
        self.failed = 0
        self.retried = 0
        self.total = 0.0  # seconds, over every attempt
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one: +Inf

    def add(self, dur: float) -> None:
        self.total += dur
        self.buckets[bisect.bisect_left(BUCKETS, dur)] += 1


class Observer:
    """Collects what happens in one runtime for progress, metrics, trace, report and DAG.

    Args:
        opts: the features that are on.
    """

    def __init__(self, opts: ObserveOptions) -> None:
        self.opts = opts
        self.t0_wall = time.time()
        self._off = self.t0_wall - perf_counter()  # perf_counter() + _off: wall clock
        self.fns: dict[str, _FnStats] = {}
        self._by_key: dict[Any, _FnStats] = {}  # function object or name= -> its stats
        self.keep_spans = bool(opts.trace or opts.report)
        self.keep_graph = bool(opts.dag or opts.report)
        self.spans: list[Span] = []
        self.spans_dropped = 0
        self.nodes: dict[int, str] = {}  # task id -> name
        # task id -> DONE, FAILED or REUSED, as the hooks hear of it (see node_states)
        self.node_state: dict[int, str] = {}
        self.edges: list[tuple[int, int]] = []  # (input task id, task id)
        self.nodes_dropped = 0
        # (exception type, function) -> its FailureGroup, in the order first seen
        self.failure_groups: dict[tuple[str, str], FailureGroup] = {}
        self.lanes: dict[int, str] = {LOCAL_LANE: "scheduler process"}
        # (t s since start, submitted, finished, failed, running, ready, {lane: (out, in)})
        self.samples: list[tuple[float, int, int, int, int, int, dict[int, tuple[int, int]]]] = []
        self.snapshot: dict[str, Any] = {}
        self._sched: Scheduler | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sinks: list[Any] = []  # progress display, metrics server: tick() and close()
        self._last_rate = (0.0, 0)
        self.rate = 0.0
        self.most_workers = 0  # connected at once, over the samples

    # ------------------------------------------------------------ lifecycle
    def start(self, sched: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
        """Begin sampling ``sched``; start the progress display and metrics server if on.

        Raises:
            OSError: the metrics address cannot be bound.
            ValueError: the metrics address is malformed.
        """
        self._sched = sched
        self._loop = loop
        self._sample()
        if self.opts.metrics:
            from async_wf.observe.metrics import MetricsServer

            self._sinks.append(MetricsServer(self, self.opts.metrics))
        if self.opts.progress:
            from async_wf.observe.progress import ProgressDisplay

            display = ProgressDisplay(self)
            if display.active:
                self._sinks.append(display)
        self._timer = loop.call_later(self._interval(), self._tick)

    def _interval(self) -> float:
        return 0.2 if self.opts.progress else 0.5

    def _tick(self) -> None:
        self._sample()
        for s in self._sinks:
            s.tick()
        loop = self._loop
        if loop is not None:
            self._timer = loop.call_later(self._interval(), self._tick)

    def _sample(self) -> None:
        sched = self._sched
        if sched is None:
            return
        st = sched.statistics()
        tr = sched._transport
        st.update(tr.statistics())
        # the core's "running" is dispatched and not ended: split off what waits
        queued = min(tr.queued(), st["running"])
        st["running"] -= queued
        st["queued"] = queued
        ck = sched._ckpt
        if ck is not None:
            st.update(ck.statistics())
            st["checkpoint_bytes"] = int(getattr(ck.log, "_end", 0))
            st["checkpoint_path"] = ck.log.path
        links = tr.link_bytes()
        for lane, name, _out, _in in links:
            self.lanes.setdefault(lane, name)
        now = time.time() - self.t0_wall
        last_t, last_n = self._last_rate
        done = st["finished"] + st["failed"]
        if now > last_t:
            # tasks ended per second since the previous sample (none before the first)
            self.rate = (done - last_n) / (now - last_t) if self.snapshot else 0.0
        self._last_rate = (now, done)
        st["rate"] = self.rate
        self.most_workers = max(self.most_workers, int(st.get("workers", 0)))
        self.snapshot = st
        if self.keep_spans:
            self.samples.append((now, st["submitted"], st["finished"], st["failed"],
                                 st["running"], st["ready"],
                                 {lane: (o, i) for lane, _n, o, i in links}))

    def close(self) -> None:
        """Take a last sample and stop the display and the metrics server.

        The trace, report and DAG files are written by ``write_outputs``.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sample()
        for s in self._sinks:
            s.tick()
        for s in self._sinks:
            s.close()
        self._sinks = []

    def write_outputs(self) -> list[str]:
        """Write the trace and the report, if asked for; return the paths written."""
        done = []
        if self.opts.trace:
            from async_wf.observe.trace import write_trace

            write_trace(self, self.opts.trace)
            done.append(self.opts.trace)
        if self.opts.report:
            from async_wf.observe.report import write_report

            write_report(self, self.opts.report)
            done.append(self.opts.report)
        for path in done:
            log.info("wrote %s (%d task attempts)", path, len(self.spans))
        return done

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the metrics server listens on, or None."""
        for s in self._sinks:
            addr = getattr(s, "address", None)
            if addr is not None:
                return addr  # type: ignore[no-any-return]
        return None

    # ---------------------------------------------------------------- hooks
    def _stats(self, f: TaskFuture[Any]) -> _FnStats:
        """The statistics of ``f``'s function, found by the function object first.

        ``TaskFuture.name`` computes the name at each call; the cache keyed
        by the function object (or the task's ``name=``) saves that on the
        per-task path. It is cleared when large, so that ever new lambdas
        do not grow it without bound.
        """
        name = f._opts.name
        key = f._fn if name is None else name
        cache = self._by_key
        try:
            st = cache.get(key)
        except TypeError:  # an unhashable callable
            st = None
            key = None
        if st is None:
            name = f.name
            st = self.fns.get(name)
            if st is None:
                st = self.fns[name] = _FnStats(name)
            if key is not None:
                if len(cache) >= 10_000:
                    cache.clear()
                cache[key] = st
        return st

    def submitted(self, fut: TaskFuture[Any], found: list[TaskFuture[Any]],
                  reused: bool = False) -> None:
        """A task was submitted with the futures ``found`` among its arguments.

        Called only when the graph is recorded (``keep_graph``): counting per
        function happens when attempts end, off the submit path. ``reused``:
        resolved from the checkpoint log, not run.
        """
        nodes = self.nodes
        if len(nodes) >= self.opts.max_nodes:
            self.nodes_dropped += 1
            return
        tid = fut._id
        nodes[tid] = self._stats(fut).name
        for d in found:
            self.edges.append((d._id, tid))
        if reused:
            self.node_state[tid] = REUSED

    def node_states(self) -> dict[int, str]:
        """The state of every recorded task now: done, reused, failed, cancelled or pending.

        Done and failed are what the hooks heard of (``finished``, a final
        ``failed``); a task the scheduler still holds is pending. A task
        that ended otherwise never ran to an outcome: it failed when one of
        its inputs failed (``DependencyError``), else it was cancelled (by
        the user, a cancelled input, an abort or the runtime's close). So
        no hook is needed on those rare paths, and nothing is paid per task
        for them (a done-callback on every future cost about 3 us a task).
        """
        known = self.node_state
        sched = self._sched
        live = {f._id for f in sched._tasks.values()} if sched is not None else set()
        inputs: dict[int, list[int]] = {}
        for a, b in self.edges:
            inputs.setdefault(b, []).append(a)
        out: dict[int, str] = {}
        for tid in sorted(self.nodes):  # an input is always submitted before its users
            st = known.get(tid)
            if st is None:
                if tid in live:
                    st = PENDING
                elif any(out.get(a) == FAILED for a in inputs.get(tid, ())):
                    st = FAILED
                else:
                    st = CANCELLED
            out[tid] = st
        return out

    def dispatched(self, futs: list[TaskFuture[Any]]) -> None:
        """These tasks were handed to the transport (one batch of the pump).

        The time goes in a slot of each future (``_obs_t``), not in a table
        here: a store into an object the pump touches anyway costs less
        than a dict entry to add and remove per task. A transport that
        knows when the attempt really ran replaces it with a tuple
        ``(start, end, lane)`` (see ``thread_ran``, ``RemoteTransport``).
        """
        now = perf_counter() + self._off
        for f in futs:
            f._obs_t = now

    def thread_ran(self, fut: TaskFuture[Any], t0_perf: float, took: float) -> None:
        """A blocking task ran in this process: ``perf_counter`` start and duration."""
        t0 = t0_perf + self._off
        fut._obs_t = (t0, t0 + took, LOCAL_LANE)

    def finished(self, futs: list[TaskFuture[Any]]) -> None:
        """These tasks succeeded (one flush of the pump)."""
        now = perf_counter() + self._off
        spans = self.spans if self.keep_spans else None
        if spans is not None and len(spans) + len(futs) > self.opts.max_spans:
            self.spans_dropped += len(futs)
            spans = None
        bisect_left = bisect.bisect_left
        cache_get = self._by_key.get
        if self.keep_graph:
            nodes, states = self.nodes, self.node_state
            for f in futs:
                if f._id in nodes:
                    states[f._id] = DONE
        # the per-task path of a busy runtime: kept to plain local operations
        for f in futs:
            t = f._obs_t
            if isinstance(t, tuple):
                t0, t1, lane = t
            else:
                t0, t1, lane = t, now, LOCAL_LANE
            name = f._opts.name
            try:
                st = cache_get(f._fn if name is None else name)
            except TypeError:
                st = None
            if st is None:
                st = self._stats(f)
            dur = t1 - t0 if t1 > t0 else 0.0
            st.done += 1
            st.total += dur
            st.buckets[bisect_left(BUCKETS, dur)] += 1
            if spans is not None:
                spans.append((t0, t1, lane, st.name, f._id, f._attempt, OK, f._ckey))

    def _attempt_over(self, f: TaskFuture[Any], status: str) -> None:
        now = perf_counter() + self._off
        tid = f._id
        t = getattr(f, "_obs_t", now)
        if isinstance(t, tuple):
            t0, t1, lane = t
        else:
            t0, t1, lane = t, now, LOCAL_LANE
        st = self._stats(f)
        st.add(t1 - t0 if t1 > t0 else 0.0)
        if status == RETRY:
            st.retried += 1
        else:
            st.failed += 1
        if self.keep_spans:
            if len(self.spans) < self.opts.max_spans:
                self.spans.append((t0, t1, lane, st.name, tid, f._attempt, status, f._ckey))
            else:
                self.spans_dropped += 1

    def failed(self, fut: TaskFuture[Any], exc: BaseException, retrying: bool) -> None:
        """The current attempt of ``fut`` raised ``exc``; it is retried or fails."""
        self._attempt_over(fut, RETRY if retrying else ERROR)
        if not retrying and self.keep_graph and fut._id in self.nodes:
            self.node_state[fut._id] = FAILED
        if not self.opts.report:
            return
        key = (_type_name(exc), fut.name)
        group = self.failure_groups.get(key)
        if group is None:
            if len(self.failure_groups) >= 1000:  # distinct kinds: bounded, like the spans
                return
            group = self.failure_groups[key] = FailureGroup(
                key[0], key[1], "".join(traceback.format_exception(exc)), fut._attempt)
        group.count += 1
        if not retrying:
            group.final += 1
        if len(group.task_ids) < FailureGroup.MAX_IDS and fut._id not in group.task_ids:
            group.task_ids.append(fut._id)
