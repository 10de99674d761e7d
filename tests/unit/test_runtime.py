"""The runtime itself: submit, futures, dependencies, where tasks run, priorities,
cancellation, the lifecycle of ``async with Runtime()`` and memory use."""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import threading
import weakref
from typing import Any, NamedTuple

import pytest

import async_wf
from async_wf import RuntimeClosedError, TaskFuture, task

# ----------------------------------------------------------------- helpers


def add(a: int, b: int) -> int:
    return a + b


def ident(x: Any) -> Any:
    return x


async def aident(x: Any) -> Any:
    await asyncio.sleep(0)
    return x


class EventLog:
    """A thread-safe record of ("start" | "end", name) events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add(self, kind: str, name: str) -> None:
        with self._lock:
            self.events.append((kind, name))

    def index(self, kind: str, name: str) -> int:
        return self.events.index((kind, name))

    def logged(self, name: str, value: Any, *deps: Any) -> Any:
        """A blocking step: logs its start and end, returns ``value``."""
        self.add("start", name)
        self.add("end", name)
        return value

    async def alogged(self, name: str, value: Any, *deps: Any) -> Any:
        """An async step that yields to the loop between start and end."""
        self.add("start", name)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        self.add("end", name)
        return value


class Pair(NamedTuple):
    left: Any
    right: Any


# ----------------------------------------------------------------- submit


async def test_submit_returns_future_at_once_and_await_gives_result() -> None:
    async with async_wf.Runtime() as rt:
        fut = rt.submit(add, 1, b=2)
        assert isinstance(fut, TaskFuture)
        assert isinstance(fut, asyncio.Future)
        assert not fut.done()
        assert await fut == 3
        assert fut.done()
        assert fut.result() == 3
        assert fut.exception() is None
        assert fut.name == "add"
        assert fut.id == 1
        assert "finished" in repr(fut)


async def test_module_level_submit_uses_the_current_runtime() -> None:
    async with async_wf.Runtime() as rt:
        assert async_wf.current_runtime() is rt
        fut = async_wf.submit(add, 2, 3)
        assert isinstance(fut, TaskFuture)
        assert await fut == 5
    with pytest.raises(RuntimeError, match="no async_wf runtime is running here"):
        async_wf.submit(add, 2, 3)
    with pytest.raises(RuntimeError, match="no async_wf runtime is running here"):
        async_wf.current_runtime()


async def test_future_works_with_asyncio_wait_gather_and_wait_for() -> None:
    async with async_wf.Runtime() as rt:
        futs = [rt.submit(add, i, i) for i in range(5)]
        done, pending = await asyncio.wait(futs)
        assert done == set(futs)
        assert not pending
        assert await asyncio.gather(*futs) == [0, 2, 4, 6, 8]
        assert await asyncio.wait_for(rt.submit(aident, "x"), 10) == "x"


async def test_asyncio_wait_for_timeout_cancels_the_task() -> None:
    entered = asyncio.Event()
    log: list[str] = []

    async def forever() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    async with async_wf.Runtime() as rt:
        fut = rt.submit(forever)
        await entered.wait()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fut, 0.01)
        assert fut.cancelled()
        assert log == ["cancelled"]


async def test_add_done_callback_is_called_with_the_future() -> None:
    seen: list[Any] = []
    async with async_wf.Runtime() as rt:
        fut = rt.submit(add, 1, 1)
        fut.add_done_callback(seen.append)
        await fut
        await asyncio.sleep(0)  # done callbacks run soon after
        assert seen == [fut]
        late: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(late.set_result)
        assert await late is fut


async def test_result_before_done_raises_invalid_state() -> None:
    async with async_wf.Runtime() as rt:
        fut = rt.submit(aident, 1)
        with pytest.raises(asyncio.InvalidStateError):
            fut.result()
        await fut


# ----------------------------------------------------------- dependencies


async def test_futures_in_arguments_become_values() -> None:
    async with async_wf.Runtime() as rt:
        a = rt.submit(ident, 1)
        b = rt.submit(aident, 2)
        c = rt.submit(add, a, b=b)
        assert await c == 3


async def test_nested_futures_at_any_depth_become_values() -> None:
    received: list[Any] = []

    def take(*args: Any, **kwargs: Any) -> str:
        received.append((args, kwargs))
        return "ok"

    async with async_wf.Runtime() as rt:
        a, b, c, d, e = (rt.submit(ident, v) for v in ("a", "b", "c", "d", "e"))
        f = rt.submit(ident, 6)
        arg = [a, (b, {"k": [c, {d}]}), frozenset({e}), Pair(a, [Pair(b, f)])]
        kw = {"m": {a: [b], "n": (c,)}, "plain": [1, (2,), {3: 4}]}
        assert await rt.submit(take, arg, 7, opts=kw) == "ok"

    ((args, kwargs),) = received
    assert args == (
        ["a", ("b", {"k": ["c", {"d"}]}), frozenset({"e"}), Pair("a", [Pair("b", 6)])],
        7,
    )
    assert type(args[0][3]) is Pair
    assert type(args[0][3].right[0]) is Pair
    assert type(args[0][2]) is frozenset
    assert kwargs == {"opts": {"m": {"a": ["b"], "n": ("c",)}, "plain": [1, (2,), {3: 4}]}}


async def test_same_future_twice_and_done_future_as_argument() -> None:
    async with async_wf.Runtime() as rt:
        a = rt.submit(ident, 5)
        assert await rt.submit(add, a, a) == 10
        assert a.done()
        # a future that is already done is passed by value at once
        assert await rt.submit(add, a, [a][0]) == 10


async def test_dependent_never_starts_before_its_inputs_finished() -> None:
    log = EventLog()
    async with async_wf.Runtime() as rt:
        # a diamond, then a chain, mixing blocking and async steps
        a = rt.submit(log.logged, "a", 1)
        b = rt.submit(log.alogged, "b", 2, a)
        c = rt.submit(log.logged, "c", 3, [a])
        d = rt.submit(log.alogged, "d", 4, {"x": (b, c)})
        e = rt.submit(log.logged, "e", 5, d)
        assert await e == 5
    edges = {"b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"]}
    for node, inputs in edges.items():
        for inp in inputs:
            assert log.index("end", inp) < log.index("start", node), log.events


async def test_wide_fan_in_and_deep_chain() -> None:
    async with async_wf.Runtime() as rt:
        leaves = [rt.submit(ident, i) for i in range(200)]
        total = rt.submit(sum, leaves)
        x: Any = rt.submit(ident, 0)
        for _ in range(300):
            x = rt.submit(aident, rt.submit(add, x, 1))
        assert await total == sum(range(200))
        assert await x == 300


# ------------------------------------------------------ where tasks run


async def test_plain_functions_run_in_threads_async_on_the_loop() -> None:
    loop_thread = threading.get_ident()

    def where() -> int:
        return threading.get_ident()

    async def awhere() -> int:
        assert asyncio.get_running_loop() is loop
        return threading.get_ident()

    loop = asyncio.get_running_loop()
    async with async_wf.Runtime() as rt:
        assert await rt.submit(where) != loop_thread
        assert await rt.submit(awhere) == loop_thread
        assert await rt.submit(task(where, inline=True)) == loop_thread


async def test_partials_and_async_callables_run_by_their_kind() -> None:
    loop_thread = threading.get_ident()

    class AsyncCallable:
        async def __call__(self, x: int) -> tuple[int, int]:
            return x, threading.get_ident()

    async def awhere(x: int) -> tuple[int, int]:
        return x, threading.get_ident()

    def where(x: int) -> tuple[int, int]:
        return x, threading.get_ident()

    async with async_wf.Runtime() as rt:
        assert await rt.submit(functools.partial(awhere, 1)) == (1, loop_thread)
        assert await rt.submit(AsyncCallable(), 2) == (2, loop_thread)
        value, ident_ = await rt.submit(functools.partial(where, 3))
        assert value == 3 and ident_ != loop_thread
        assert (await rt.submit(lambda: 4)) == 4


async def test_loop_stays_responsive_while_a_blocking_task_blocks(
    gate: Any, new_signal: Any
) -> None:
    # the blocking task can only finish if the loop runs another task meanwhile
    started = new_signal()

    def blocking() -> str:
        started.set()
        return "released" if gate.wait() else "timed out"

    async def opener() -> None:
        gate.open()

    async with async_wf.Runtime(threads=1) as rt:
        blocked = rt.submit(blocking)
        await started.wait()
        await rt.submit(opener)
        assert await blocked == "released"


# ---------------------------------------------------------- task decorator


@task
def double(x: int) -> int:
    return 2 * x


@task(name="triple-it", retries=1, priority=3)
async def triple(x: int) -> int:
    return 3 * x


async def test_decorated_function_submits_inside_runtime_and_runs_outside() -> None:
    assert double(4) == 8  # outside any runtime: a plain call
    assert await triple(2) == 6
    async with async_wf.Runtime():
        fut = double(4)
        assert isinstance(fut, TaskFuture)
        assert await fut == 8
        fut3 = triple(fut)
        assert isinstance(fut3, TaskFuture)
        assert fut3.name == "triple-it"
        assert await fut3 == 24
        assert await double.submit(1) == 2
    assert double(5) == 10
    with pytest.raises(RuntimeError, match="cannot submit 'double'"):
        double.submit(1)
    assert double.__name__ == "double"
    assert triple.task_options.retries == 1
    assert triple.task_options.priority == 3
    assert triple.options(retries=0).task_options.retries == 0


async def test_blocking_task_calling_a_task_function_runs_it_directly() -> None:
    def outer(x: int) -> Any:
        return double(x)  # in a worker thread: no runtime here, so a plain call

    async with async_wf.Runtime() as rt:
        assert await rt.submit(outer, 3) == 6


async def fib(n: int) -> int:
    if n < 2:
        return n
    a = async_wf.submit(fib, n - 1)
    b = async_wf.submit(fib, n - 2)
    return await a + await b


@task
async def tree_sum(depth: int) -> int:
    if depth == 0:
        return 1
    parts = [tree_sum(depth - 1) for _ in range(3)]
    return sum(await async_wf.gather(*parts))


async def test_nested_submission_builds_a_dynamic_graph() -> None:
    async with async_wf.Runtime() as rt:
        assert await rt.submit(fib, 12) == 144
        assert await tree_sum(4) == 3**4
        assert rt.statistics()["submitted"] == 465 + (3**5 - 1) // 2  # fib(12) calls + tree nodes


async def test_nested_submission_keeps_working_while_the_runtime_closes() -> None:
    # leaving the block waits for running tasks, and they may still submit
    go = asyncio.Event()

    async def parent() -> int:
        await go.wait()
        rt = async_wf.current_runtime()
        return await async_wf.submit(fib, 8) + await double(1) + await rt.submit(add, 1, 2)

    async with async_wf.Runtime():
        fut = async_wf.submit(parent)
        asyncio.get_running_loop().call_soon(go.set)
    assert await fut == 21 + 2 + 3


# --------------------------------------------------------------- priority


async def test_priority_highest_first_fifo_among_equals(gate: Any, new_signal: Any) -> None:
    order: list[str] = []
    started = new_signal()

    def blocker() -> None:
        started.set()
        gate.wait()

    def record(label: str) -> None:
        order.append(label)

    labels = [("a", 0), ("b", 5), ("c", -2), ("d", 5), ("e", 9), ("f", 0), ("g", -2), ("h", 5)]
    async with async_wf.Runtime(threads=1) as rt:
        hold = rt.submit(blocker)
        await started.wait()
        futs = [rt.submit(task(record, priority=p), label) for label, p in labels]
        await asyncio.sleep(0)
        gate.open()
        await asyncio.gather(hold, *futs)
    assert order == ["e", "b", "d", "h", "a", "f", "c", "g"]


async def test_priority_applies_to_tasks_that_become_ready_late(gate: Any, new_signal: Any) -> None:
    order: list[str] = []
    started = new_signal()

    def blocker() -> int:
        started.set()
        gate.wait()
        return 0

    def record(label: str, *deps: Any) -> None:
        order.append(label)

    async with async_wf.Runtime(threads=1) as rt:
        hold = rt.submit(blocker)
        await started.wait()
        # all become ready only when the blocker finishes
        futs = [
            rt.submit(task(record, priority=p), label, hold)
            for label, p in [("low", -1), ("mid", 0), ("high", 1)]
        ]
        gate.open()
        await asyncio.gather(*futs)
    assert order == ["high", "mid", "low"]


async def test_priority_holds_for_tasks_submitted_one_loop_iteration_apart(
    gate: Any, new_signal: Any
) -> None:
    order: list[str] = []
    started = new_signal()

    def blocker() -> None:
        started.set()
        gate.wait()

    def record(label: str) -> None:
        order.append(label)

    async with async_wf.Runtime(threads=1) as rt:
        hold = rt.submit(blocker)
        await started.wait()
        futs = []
        for label, p in [("low", -5), ("mid", 0), ("high", 5)]:
            futs.append(rt.submit(task(record, priority=p), label))
            await asyncio.sleep(0)  # each one is dispatched on its own
        gate.open()
        await asyncio.gather(hold, *futs)
    assert order == ["high", "mid", "low"]


# -------------------------------------------------------------- cancelling


async def test_cancel_waiting_task_cancels_successors_transitively(
    gate: Any, new_signal: Any
) -> None:
    ran: list[str] = []
    started = new_signal()

    def blocker() -> int:
        started.set()
        gate.wait()
        return 1

    def step(label: str, *deps: Any) -> str:
        ran.append(label)
        return label

    async with async_wf.Runtime() as rt:
        hold = rt.submit(blocker)
        await started.wait()
        a = rt.submit(step, "a", hold)
        b = rt.submit(step, "b", a)
        c = rt.submit(step, "c", [b])
        other = rt.submit(step, "other", hold)
        assert a.cancel() is True
        assert a.cancelled()
        assert b.cancelled()
        assert c.cancelled()
        assert not hold.done()
        with pytest.raises(asyncio.CancelledError):
            await c
        # submitting on a cancelled input is cancelled at once
        late = rt.submit(step, "late", b)
        assert late.cancelled()
        gate.open()
        assert await other == "other"
        assert await hold == 1
        assert a.cancel() is False  # already done
    assert ran == ["other"]
    stats = rt.statistics()
    assert stats["cancelled"] == 4


async def test_cancel_running_async_task_delivers_cancelled_error() -> None:
    entered = asyncio.Event()
    log: list[str] = []

    async def worker() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("got CancelledError")
            raise

    async with async_wf.Runtime() as rt:
        fut = rt.submit(worker)
        succ = rt.submit(ident, fut)
        await entered.wait()
        assert fut.cancel() is True
        with pytest.raises(asyncio.CancelledError):
            await fut
        assert fut.cancelled()
        assert succ.cancelled()
    assert log == ["got CancelledError"]


async def test_cancel_async_task_before_its_first_step() -> None:
    ran: list[str] = []

    async def never() -> None:
        ran.append("started")

    async with async_wf.Runtime() as rt:
        fut = rt.submit(never)
        succ = rt.submit(ident, fut)
        await asyncio.sleep(0)  # dispatched: its asyncio task exists but has not run
        assert fut.cancel() is True
        # the runtime learns of it at once, not from the task (which never runs)
        assert fut.cancelled()
        assert succ.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(fut, 10)
    assert ran == []


async def test_cancel_running_thread_task_cancels_the_future_and_drops_the_result(
    gate: Any, new_signal: Any
) -> None:
    started = new_signal()
    ended = new_signal()
    finished: list[str] = []

    def blocking() -> str:
        started.set()
        gate.wait()
        finished.append("ran to the end")
        ended.set()
        return "done"

    async with async_wf.Runtime() as rt:
        fut = rt.submit(blocking)
        succ = rt.submit(add, fut, "!")
        await started.wait()
        # like a run_in_executor future: the future is cancelled at once (so an
        # awaiting task, or Ctrl-C, is not held up), the thread cannot be stopped
        assert fut.cancel() is True
        assert fut.cancelled()
        assert succ.cancelled()
        gate.open()
        await ended.wait()
        await rt.barrier()
        assert rt.statistics()["finished"] == 0
    assert finished == ["ran to the end"]


async def test_wait_for_on_a_running_thread_task_times_out_promptly(
    gate: Any, new_signal: Any
) -> None:
    started = new_signal()

    def blocking() -> str:
        started.set()
        gate.wait()
        return "done"

    async with async_wf.Runtime() as rt:
        fut = rt.submit(blocking)
        await started.wait()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fut, 0.2)
        assert loop.time() - t0 < 5.0  # not held until the thread finishes
        assert fut.cancelled()
        gate.open()


async def test_cancel_queued_thread_task_before_it_starts(gate: Any, new_signal: Any) -> None:
    started = new_signal()
    ran: list[int] = []

    def blocker() -> None:
        started.set()
        gate.wait()

    def step(i: int) -> int:
        ran.append(i)
        return i

    async with async_wf.Runtime(threads=1) as rt:
        hold = rt.submit(blocker)
        await started.wait()
        futs = [rt.submit(step, i) for i in range(4)]
        await asyncio.sleep(0)  # dispatched to the transport, waiting for the thread
        assert futs[0].cancel() is True
        assert futs[3].cancel() is True
        gate.open()
        await hold
        assert await asyncio.gather(futs[1], futs[2]) == [1, 2]
        assert futs[0].cancelled() and futs[3].cancelled()
    assert ran == [1, 2]


# --------------------------------------------------------------- lifecycle


async def test_leaving_normally_waits_for_outstanding_tasks() -> None:
    go = asyncio.Event()

    async def slow() -> str:
        await go.wait()
        return "finished"

    async with async_wf.Runtime() as rt:
        futs = [rt.submit(slow) for _ in range(3)]
        dep = rt.submit(ident, futs)
        asyncio.get_running_loop().call_soon(go.set)
    assert all(f.result() == "finished" for f in futs)
    assert dep.result() == ["finished"] * 3


async def test_leaving_with_exception_cancels_pending_and_running_tasks(
    gate: Any, new_signal: Any
) -> None:
    started = new_signal()
    entered = asyncio.Event()

    def blocking() -> int:
        started.set()
        gate.wait()
        return 1

    async def forever() -> None:
        entered.set()
        await asyncio.Event().wait()

    with pytest.raises(KeyError, match="boom"):
        async with async_wf.Runtime() as rt:
            running_thread = rt.submit(blocking)
            running_async = rt.submit(forever)
            waiting = rt.submit(ident, running_thread)
            await started.wait()
            await entered.wait()
            raise KeyError("boom")
    assert waiting.cancelled()
    assert running_async.cancelled()
    assert running_thread.cancelled()  # its thread cannot stop; its result is dropped
    gate.open()


async def test_wait_on_exit_false_cancels_instead_of_waiting() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    async with async_wf.Runtime(wait_on_exit=False) as rt:
        fut = rt.submit(forever)
        await asyncio.sleep(0)
    assert fut.cancelled()


async def test_submit_after_shutdown_raises() -> None:
    rt = async_wf.Runtime()
    with pytest.raises(RuntimeClosedError, match="not started"):
        rt.submit(add, 1, 2)
    async with rt:
        pass
    with pytest.raises(RuntimeClosedError, match="cannot submit: the runtime is shut down"):
        rt.submit(add, 1, 2)
    with pytest.raises(RuntimeError, match="can be started only once"):
        await rt.start()
    await rt.close()  # idempotent


async def test_calling_a_task_after_the_runtime_closed_runs_it_directly() -> None:
    async with async_wf.Runtime():
        pass
    assert double(3) == 6


async def test_runtimes_can_nest_and_restore_the_outer_one() -> None:
    async with async_wf.Runtime() as outer:
        async with async_wf.Runtime() as inner:
            assert async_wf.current_runtime() is inner
            assert await async_wf.submit(add, 1, 1) == 2
        assert async_wf.current_runtime() is outer
        assert await async_wf.submit(add, 2, 2) == 4


# ------------------------------------------------------------------- memory


async def test_core_forgets_tasks_and_memory_stays_bounded() -> None:
    noop = task(ident, inline=True)
    # 4 waves of 21 000 tasks, 84 000 in all: the capacity reaches the bound
    # in the first wave (21 000), so a slot kept by a finished task breaks
    # it in the second; more waves would only repeat the check
    wave, waves = 14_000, 4
    async with async_wf.Runtime() as rt:
        sched = rt._sched
        assert sched is not None
        for w in range(waves):
            futs = [noop(i) for i in range(wave)]
            # half of them with a dependency, to exercise successor lists too
            futs += [noop(futs[i]) for i in range(0, wave, 2)]
            await rt.barrier()
            assert futs[-1].result() == wave - 2
            assert len(sched._core) == 0
            assert not sched._tasks
            assert sched._core.capacity <= wave + wave // 2, w
        stats = rt.statistics()
    assert stats["submitted"] == stats["finished"] == waves * (wave + wave // 2)
    assert stats["running"] == stats["ready_queue"] == 0


class Payload:
    pass


@pytest.mark.parametrize("kind", ["thread", "async", "inline"])
async def test_done_futures_do_not_keep_their_arguments_alive(kind: str) -> None:
    def use(p: Any, key: Any = None) -> str:
        return type(p).__name__

    async def ause(p: Any, key: Any = None) -> str:
        await asyncio.sleep(0)
        return type(p).__name__

    fn: Any = {"thread": use, "async": ause, "inline": task(use, inline=True)}[kind]
    async with async_wf.Runtime() as rt:
        p = Payload()
        ref = weakref.ref(p)
        fut = rt.submit(fn, [p], key={"p": p})
        dep = rt.submit(fn, rt.submit(ident, p))
        del p
        assert await fut == "list"
        assert await dep == "Payload"
        await rt.barrier()
        gc.collect()
        assert ref() is None
        assert fut.result() == "list"  # the future itself is still alive


async def test_statistics_counts() -> None:
    def boom() -> None:
        raise ValueError("boom")

    async with async_wf.Runtime() as rt:
        stats = rt.statistics()
        assert stats["submitted"] == 0
        assert stats["tasks_per_s"] == 0.0
        oks = [rt.submit(add, i, 1) for i in range(5)]
        bad = rt.submit(boom)
        dep = rt.submit(ident, bad)
        await rt.barrier()
        await asyncio.gather(*oks)
        gone = rt.submit(ident, dep)  # cancelled? no: fails at once with DependencyError
        stats = rt.statistics()
    assert gone.done()
    assert isinstance(bad.exception(), ValueError)
    expected = {
        "submitted": 8,
        "running": 0,
        "finished": 5,
        "failed": 3,
        "cancelled": 0,
        "ready_queue": 0,
    }
    assert {k: stats[k] for k in expected} == expected
    assert stats["tasks_per_s"] > 0
    assert stats["core"] == async_wf.CORE_IMPL


async def test_statistics_while_tasks_run(gate: Any, new_signal: Any) -> None:
    started = new_signal()

    def blocker() -> None:
        started.set()
        gate.wait()

    async with async_wf.Runtime(threads=1) as rt:
        hold = rt.submit(blocker)
        waiting = [rt.submit(ident, hold) for _ in range(3)]
        await started.wait()
        stats = rt.statistics()
        assert stats["running"] == 1
        assert stats["waiting"] == 3
        assert stats["submitted"] == 4
        assert stats["finished"] == 0
        gate.open()
        await asyncio.gather(*waiting)
        assert rt.statistics()["finished"] == 4


async def test_counter_is_shared_safely_between_thread_tasks() -> None:
    counts: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def bump(i: int) -> None:
        with lock:
            counts[i % 7] += 1

    async with async_wf.Runtime(threads=4) as rt:
        await async_wf.gather(*(rt.submit(bump, i) for i in range(2000)))
    assert sum(counts.values()) == 2000


async def test_a_burst_of_blocking_tasks_gets_all_its_threads_after_warm_up() -> None:
    # each task waits until all 6 are running at once: with fewer threads the
    # barrier breaks (a regression test: once a thread had gone idle, a burst
    # woke only that thread and ran everything on it)
    import threading

    barrier = threading.Barrier(6, timeout=10)

    def meet() -> int:
        return barrier.wait()

    async with async_wf.Runtime(threads=6) as rt:
        assert await rt.submit(lambda: 1) == 1  # warm-up: one thread, then idle
        arrived = await asyncio.gather(*[rt.submit(meet) for _ in range(6)])
    assert sorted(arrived) == list(range(6))
