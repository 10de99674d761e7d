"""Failure semantics: exceptions and tracebacks, dependency errors, retries,
timeouts, the on_failure policies, and what bad input is refused with."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
import traceback
from dataclasses import dataclass
from types import CodeType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import async_wf
from async_wf import (
    DependencyError,
    RuntimeClosedError,
    TaskTimeoutError,
    WorkflowAborted,
    task,
)
from async_wf._options import TaskOptionArgs, TaskOptions
from async_wf.transport.local import LocalTransport

# ----------------------------------------------------------------- helpers


class Boom(Exception):
    pass


def boom(msg: str = "boom") -> None:
    raise Boom(msg)


async def aboom(msg: str = "boom") -> None:
    await asyncio.sleep(0)
    raise Boom(msg)


def ident(x: Any) -> Any:
    return x


def codes_in(tb: Any) -> list[CodeType]:
    return [frame.f_code for frame, _ in traceback.walk_tb(tb)]


class Attempts:
    """Counts calls from any thread; ``fail_until`` makes the first calls raise."""

    def __init__(self, fail_until: int = 0) -> None:
        self.n = 0
        self.fail_until = fail_until
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self.n += 1
            return self.n

    def call(self) -> int:
        n = self.next()
        if n <= self.fail_until:
            raise Boom(f"attempt {n}")
        return n

    async def acall(self) -> int:
        await asyncio.sleep(0)
        return self.call()


# ------------------------------------------------- exceptions and tracebacks


@pytest.mark.parametrize("kind", ["thread", "async", "inline"])
async def test_exception_keeps_type_traceback_and_gets_a_note(kind: str) -> None:
    fn: Any = {"thread": boom, "async": aboom, "inline": task(boom, inline=True)}[kind]
    raiser = aboom if kind == "async" else boom
    async with async_wf.Runtime() as rt:
        fut = rt.submit(fn, "bad value")
        with pytest.raises(Boom, match="bad value") as info:
            await fut
    assert info.value is fut.exception()
    assert raiser.__code__ in codes_in(info.value.__traceback__)
    (note,) = info.value.__notes__
    assert note == f"async_wf: raised by task '{raiser.__name__}' (#1, attempt 1 of 1)"
    assert "failed" in repr(fut)


async def test_failed_task_does_not_stop_the_others() -> None:
    async with async_wf.Runtime() as rt:
        bad = rt.submit(boom)
        good = [rt.submit(ident, i) for i in range(10)]
        results = await async_wf.gather(bad, *good, return_exceptions=True)
    assert isinstance(results[0], Boom)
    assert results[1:] == list(range(10))


# -------------------------------------------------------------- dependencies


async def test_dependents_of_a_failed_task_raise_dependency_error_transitively() -> None:
    ran: list[str] = []

    def step(label: str, *deps: Any) -> str:
        ran.append(label)
        return label

    async with async_wf.Runtime() as rt:
        root = rt.submit(boom, "root cause")
        a = rt.submit(step, "a", root)
        b = rt.submit(step, "b", {"k": [a]})
        c = rt.submit(step, "c", b, rt.submit(ident, 1))
        side = rt.submit(step, "side")
        await rt.barrier()
        late = rt.submit(step, "late", c)  # submitted after everything failed
        with pytest.raises(Boom, match="root cause"):
            await root
        for fut in (a, b, c, late):
            with pytest.raises(DependencyError, match="upstream task 'boom' failed") as info:
                await fut
            assert info.value.__cause__ is root.exception()
            assert info.value.upstream == "boom"
            assert info.value.task == fut.name
        assert await side == "side"
    assert ran == ["side"]


async def test_dependency_error_message_names_both_tasks() -> None:
    async with async_wf.Runtime() as rt:
        root = rt.submit(task(boom, name="loader"))
        child = rt.submit(task(ident, name="cleaner"), root)
        with pytest.raises(
            DependencyError, match="task 'cleaner' did not run: upstream task 'loader' failed"
        ):
            await child
        with pytest.raises(Boom):
            await root


def raises_own_dependency_error(name: str) -> None:
    # a task may raise DependencyError itself, even naming itself as the task
    # that did not run and with a cause, as the runtime's errors have
    try:
        raise KeyError("inner")
    except KeyError as e:
        raise DependencyError(name, "elsewhere") from e


async def test_a_dependency_error_a_task_raises_is_its_own_error() -> None:
    attempts: list[str] = []

    def flaky(name: str) -> None:
        attempts.append(name)
        raises_own_dependency_error(name)

    async with async_wf.Runtime() as rt:
        # retried as any exception of the task; its dependents, even those
        # submitted after it failed, name it as the failed task
        a = rt.submit(task(flaky, name="a", retries=1), "a")
        with pytest.raises(DependencyError, match="upstream task 'elsewhere'"):
            await a
        assert attempts == ["a", "a"]
        for dep in (rt.submit(ident, a), rt.submit(ident, rt.submit(ident, a))):
            with pytest.raises(DependencyError, match="upstream task 'a' failed") as info:
                await dep
            assert info.value.__cause__ is a.exception()
        # its on_failure policy holds for dependents submitted after it failed
        b = rt.submit(task(raises_own_dependency_error, name="b",
                           on_failure="cancel_successors"), "b")
        with pytest.raises(DependencyError):
            await b
        late = rt.submit(ident, b)
        with pytest.raises(asyncio.CancelledError, match="upstream task 'b' failed"):
            await late
        # a task that re-raises the runtime's DependencyError of another task
        # (awaited inside it, not an input) fails with it as its own error
        unrun = rt.submit(task(ident, name="relay"), a)

        async def relay() -> None:
            await unrun

        r = rt.submit(task(relay, name="relay"))
        with pytest.raises(DependencyError) as info:
            await r
        assert info.value is unrun.exception()
        with pytest.raises(DependencyError, match="upstream task 'relay' failed") as info:
            await rt.submit(ident, r)
        assert info.value.__cause__ is unrun.exception()


# ------------------------------------------------------------------- retries


@pytest.mark.parametrize("is_async", [False, True])
async def test_retries_rerun_until_success(is_async: bool) -> None:
    counter = Attempts(fail_until=2)
    fn = counter.acall if is_async else counter.call
    async with async_wf.Runtime() as rt:
        fut = rt.submit(task(fn, retries=3))
        assert await fut == 3
        assert rt.statistics()["retried"] == 2
    assert counter.n == 3


@pytest.mark.parametrize("is_async", [False, True])
async def test_retries_exhausted_raise_the_last_exception(is_async: bool) -> None:
    counter = Attempts(fail_until=100)
    fn = counter.acall if is_async else counter.call
    async with async_wf.Runtime() as rt:
        fut = rt.submit(task(fn, retries=2, name="flaky"))
        dep = rt.submit(ident, fut)
        with pytest.raises(Boom, match="attempt 3") as info:
            await fut
        with pytest.raises(DependencyError, match="upstream task 'flaky' failed"):
            await dep
    assert counter.n == 3
    assert info.value.__notes__ == ["async_wf: raised by task 'flaky' (#1, attempt 3 of 3)"]


async def test_retries_zero_runs_once() -> None:
    counter = Attempts(fail_until=1)
    async with async_wf.Runtime() as rt:
        with pytest.raises(Boom, match="attempt 1"):
            await rt.submit(counter.call)
    assert counter.n == 1


# ------------------------------------------------------------------ timeouts


async def test_async_timeout_cancels_the_coroutine_and_fails() -> None:
    log: list[str] = []

    async def hang() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    async with async_wf.Runtime() as rt:
        fut = rt.submit(task(hang, timeout=0.02, name="hang"))
        dep = rt.submit(ident, fut)
        with pytest.raises(TaskTimeoutError, match=r"task 'hang' exceeded its timeout of 0\.02 s"):
            await asyncio.wait_for(fut, 10)
        with pytest.raises(DependencyError):
            await dep
    assert log == ["cancelled"]
    err = fut.exception()
    assert isinstance(err, TimeoutError)
    assert isinstance(err, TaskTimeoutError)
    assert err.timeout == 0.02


async def test_async_timeout_is_retried() -> None:
    attempts = Attempts()

    async def slow_then_fast() -> int:
        n = attempts.next()
        if n < 3:
            await asyncio.Event().wait()
        return n

    async with async_wf.Runtime() as rt:
        fut = rt.submit(task(slow_then_fast, timeout=0.1, retries=2))
        assert await asyncio.wait_for(fut, 10) == 3
    assert attempts.n == 3


async def test_async_timeout_swallowed_by_the_coroutine_still_fails() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "swallowed"
        return "unreachable"

    async with async_wf.Runtime() as rt:
        with pytest.raises(TaskTimeoutError, match="exceeded its timeout"):
            await asyncio.wait_for(rt.submit(task(stubborn, timeout=0.02)), 10)


async def test_async_timeout_that_expires_before_the_first_step() -> None:
    # an inline task blocks the loop past the timeout of an async task
    # dispatched with it; on uvloop the timer then fires before that task
    # ever runs, and the runtime must still report the timeout
    async def hang() -> None:
        await asyncio.Event().wait()

    async with async_wf.Runtime() as rt:
        fut = rt.submit(task(hang, timeout=0.01, retries=1))
        rt.submit(task(time.sleep, inline=True), 0.05)
        with pytest.raises(TaskTimeoutError):
            await asyncio.wait_for(fut, 10)


async def test_thread_timeout_fails_and_the_late_result_is_dropped(
    gate: Any, new_signal: Any
) -> None:
    returned = new_signal()

    def slow() -> str:
        gate.wait()  # outlives its timeout: a thread cannot be interrupted
        returned.set()
        return "too late"

    async with async_wf.Runtime(threads=2) as rt:
        fut = rt.submit(task(slow, timeout=0.02, name="slow"))
        dep = rt.submit(ident, fut)
        with pytest.raises(TaskTimeoutError, match="task 'slow' exceeded its timeout"):
            await asyncio.wait_for(fut, 10)
        with pytest.raises(DependencyError, match="upstream task 'slow' failed"):
            await dep
        # the other thread still works meanwhile
        assert await rt.submit(ident, "free") == "free"
        gate.open()
        await returned.wait()
        await rt.barrier()
        assert isinstance(fut.exception(), TaskTimeoutError)
        stats = rt.statistics()
    assert (stats["finished"], stats["failed"]) == (1, 2)


async def test_thread_timeout_retry_gets_a_fresh_attempt(gate: Any) -> None:
    attempts = Attempts()

    def first_hangs() -> int:
        n = attempts.next()
        if n == 1:
            gate.wait()
            return -1
        return n

    async with async_wf.Runtime(threads=2) as rt:
        fut = rt.submit(task(first_hangs, timeout=0.3, retries=1))
        assert await asyncio.wait_for(fut, 10) == 2
        gate.open()
        assert rt.statistics()["retried"] == 1


# ----------------------------------------------------------------- policies


async def test_on_failure_fail_lets_independent_tasks_continue() -> None:
    async with async_wf.Runtime() as rt:
        bad = rt.submit(task(boom, on_failure="fail"))
        dep = rt.submit(ident, bad)
        free = [rt.submit(ident, i) for i in range(3)]
        assert await async_wf.gather(*free) == [0, 1, 2]
        with pytest.raises(DependencyError):
            await dep
        with pytest.raises(Boom):
            await bad


async def test_on_failure_cancel_successors() -> None:
    ran: list[str] = []

    def step(label: str, *deps: Any) -> str:
        ran.append(label)
        return label

    async with async_wf.Runtime() as rt:
        bad = rt.submit(task(boom, on_failure="cancel_successors"))
        a = rt.submit(step, "a", bad)
        b = rt.submit(step, "b", [a])
        free = rt.submit(step, "free")
        await rt.barrier()
        late = rt.submit(step, "late", b)
        for fut in (a, b, late):
            assert fut.cancelled()
            with pytest.raises(asyncio.CancelledError):
                await fut
        with pytest.raises(Boom):
            await bad
        assert await free == "free"
        assert rt.statistics()["cancelled"] == 3
    assert ran == ["free"]


async def test_on_failure_ignore_passes_default_to_dependents() -> None:
    async with async_wf.Runtime() as rt:
        bad = rt.submit(task(boom, on_failure="ignore", default=[]))
        nodefault = rt.submit(task(aboom, on_failure="ignore"))
        got = rt.submit(ident, (bad, nodefault))
        chained = rt.submit(len, rt.submit(ident, bad))
        assert await got == ([], None)
        assert await chained == 0
        with pytest.raises(Boom):
            await bad  # the task's own future still tells that it failed
        await rt.barrier()
        late = rt.submit(ident, bad)
        assert await late == []
        assert rt.statistics()["failed"] == 2


async def test_on_failure_ignore_after_retries() -> None:
    counter = Attempts(fail_until=100)
    async with async_wf.Runtime() as rt:
        fut = rt.submit(task(counter.call, retries=2, on_failure="ignore", default="d"))
        assert await rt.submit(ident, fut) == "d"
    assert counter.n == 3


async def test_on_failure_abort_fails_every_pending_future(gate: Any, new_signal: Any) -> None:
    started = new_signal()
    entered = asyncio.Event()
    go = asyncio.Event()

    def blocking() -> str:
        started.set()
        gate.wait()
        return "late"

    async def waiting() -> None:
        entered.set()
        await asyncio.Event().wait()

    async def trigger() -> None:
        await go.wait()
        raise Boom("fatal")

    async with async_wf.Runtime() as rt:
        done_before = rt.submit(ident, "kept")
        assert await done_before == "kept"
        running_thread = rt.submit(blocking)
        running_async = rt.submit(waiting)
        culprit = rt.submit(task(trigger, on_failure="abort", name="trigger"))
        dependent = rt.submit(ident, running_thread)
        await started.wait()
        await entered.wait()
        go.set()
        with pytest.raises(Boom, match="fatal"):
            await culprit
        for fut in (running_thread, running_async, dependent):
            with pytest.raises(WorkflowAborted, match="because task 'trigger' failed") as info:
                await fut
            assert info.value.__cause__ is culprit.exception()
        with pytest.raises(WorkflowAborted, match="aborted by a failed task") as sub:
            rt.submit(ident, 1)
        assert sub.value.__cause__ is culprit.exception()
        assert done_before.result() == "kept"
        gate.open()
    with pytest.raises(WorkflowAborted, match="aborted by a failed task"):
        rt.submit(ident, 1)


# ------------------------------------------------------------------ bad input


async def test_submit_refuses_a_non_callable() -> None:
    async with async_wf.Runtime() as rt:
        with pytest.raises(TypeError, match="submit needs a callable, got int: 42"):
            rt.submit(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="got str: 'f'"):
            async_wf.submit("f")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="task needs a callable, got int: 3"):
        task(3)  # type: ignore[call-overload]


async def test_future_of_another_runtime_is_refused() -> None:
    async with async_wf.Runtime() as rt1:
        f1 = rt1.submit(ident, 1)
        async with async_wf.Runtime() as rt2:
            with pytest.raises(ValueError, match="is a future of another runtime"):
                rt2.submit(ident, [f1])
            assert await rt2.submit(ident, 2) == 2
        assert await f1 == 1


async def test_submit_from_a_foreign_thread_is_refused() -> None:
    async with async_wf.Runtime() as rt:
        with pytest.raises(RuntimeError, match="must be called from the runtime's event loop"):
            await asyncio.to_thread(rt.submit, ident, 1)


async def test_submit_outside_or_after_the_runtime() -> None:
    rt = async_wf.Runtime()
    with pytest.raises(RuntimeClosedError, match="not started"):
        rt.submit(ident, 1)
    async with rt:
        pass
    with pytest.raises(RuntimeClosedError, match="shut down"):
        rt.submit(ident, 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries must be an int >= 0, got -1"),
        ({"retries": 1.5}, "retries must be an int >= 0, got 1.5"),
        ({"timeout": 0}, "timeout must be > 0 seconds and finite, got 0"),
        ({"timeout": -2.5}, "timeout must be > 0 seconds and finite, got -2.5"),
        ({"timeout": float("inf")}, "timeout must be > 0 seconds and finite, got inf"),
        ({"on_failure": "explode"}, "on_failure must be one of .*, got 'explode'"),
        ({"priority": 2**31}, "priority must be a signed 32-bit int, got 2147483648"),
        ({"priority": -(2**31) - 1}, "priority must be a signed 32-bit int, got -2147483649"),
        ({"default": 0}, "default= only applies with on_failure='ignore', got on_failure='fail'"),
        ({"inline": True, "timeout": 1}, "timeout=1 needs a task that can be interrupted"),
    ],
)
def test_bad_task_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        task(ident, **options)
    with pytest.raises(ValueError, match=message):
        task(**options)(ident)
    with pytest.raises(ValueError, match=message):
        task(ident).options(**options)


def test_bad_runtime_options_are_refused() -> None:
    with pytest.raises(ValueError, match="threads must be an int >= 1, got 0"):
        async_wf.Runtime(threads=0)
    with pytest.raises(ValueError, match="give transport= alone"):
        async_wf.Runtime(threads=2, transport=LocalTransport())
    with pytest.raises(TypeError, match="timeout must be a number of seconds, got '1'"):
        task(ident, timeout="1")  # type: ignore[call-overload]


def test_the_declared_options_are_the_stored_ones() -> None:
    declared = set(TaskOptionArgs.__annotations__)
    # not the private fields, nor the ones derived from others (request)
    stored = {f.name for f in dataclasses.fields(TaskOptions)
              if not f.name.startswith("_") and f.init}
    assert declared == stored
    # every option reaches TaskOptions under its own name, through task() and options()
    opts: dict[str, Any] = {
        "name": "n", "retries": 1, "timeout": 2.0, "on_failure": "ignore", "default": 5,
        "priority": 3, "mpi": None, "mpi_gather": False, "version": "v",
        "checkpoint": False, "key": ident, "inline": False, "binary": "prog",
        "args": ["a", "{x}"], "output": False, "cores": 2, "memory": "1GiB", "gpus": 1,
        "resources": {"licence": 1}, "pin": True, "time": 5.0}
    assert set(opts) == declared
    for t in (task(ident, **opts), task(**opts)(ident), task(ident).options(**opts)):
        got = t.task_options
        assert {k: getattr(got, k) for k in opts} == {**opts, "args": ("a", "{x}")}
        assert got._has_default


def test_an_unknown_option_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"^task\(\) got an unexpected keyword argument 'retires'$"):
        task(ident, retires=2)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="unexpected keyword argument 'retires'"):
        task(retires=2)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="unexpected keyword argument 'retires'"):
        task(ident).options(retires=2)  # type: ignore[call-arg]


def test_limits_of_options_are_accepted() -> None:
    assert task(ident, priority=2**31 - 1).task_options.priority == 2**31 - 1
    assert task(ident, priority=-(2**31)).task_options.priority == -(2**31)
    assert task(ident, on_failure="ignore", default=None).task_options._has_default


# -------------------------------------------------------- random DAGs (hypothesis)

POLICIES = ("fail", "cancel_successors", "ignore")
KINDS = ("thread", "async", "inline")


@dataclass(frozen=True)
class Node:
    inputs: tuple[int, ...]
    fails: bool
    policy: str
    kind: str
    barrier_before: bool  # submit it only after everything before it has settled


class NodeError(Exception):
    pass


@st.composite
def dags(draw: st.DrawFn) -> list[Node]:
    n = draw(st.integers(1, 60))
    nodes = []
    for i in range(n):
        inputs = draw(st.lists(st.integers(0, i - 1), max_size=3)) if i else []
        nodes.append(
            Node(
                inputs=tuple(inputs),
                fails=draw(st.integers(0, 4)) == 0,
                policy=draw(st.sampled_from(POLICIES)),
                kind=draw(st.sampled_from(KINDS)),
                barrier_before=draw(st.integers(0, 9)) == 0,
            )
        )
    return nodes


def node_value(i: int, values: list[int]) -> int:
    return (i * 31 + sum(values)) % 1_000_003


def default_of(i: int) -> int:
    return -(i + 1)


def reference(nodes: list[Node]) -> list[set[Any]]:
    """Serial interpreter: for each node, the set of outcomes the runtime may give.

    Outcomes: ("value", v), ("error", i) for the node's own failure,
    ("dep", root) for a DependencyError caused by node ``root``, and
    ("cancelled",). A node with several poisoned inputs may get either
    poison, depending on which input fails first, hence sets.
    """
    outcomes: list[set[Any]] = []
    passed: list[int | None] = []  # what dependents receive, None if poisoned
    for i, node in enumerate(nodes):
        poisons: set[Any] = set()
        values: list[int] = []
        for j in node.inputs:
            if passed[j] is None:
                for o in outcomes[j]:
                    if o[0] == "error":
                        if nodes[j].policy == "fail":
                            poisons.add(("dep", j))
                        else:
                            poisons.add(("cancelled",))
                    else:
                        poisons.add(o)
            else:
                values.append(passed[j])  # type: ignore[arg-type]
        if poisons:
            outcomes.append(poisons)
            passed.append(None)
        elif node.fails:
            outcomes.append({("error", i)})
            passed.append(default_of(i) if node.policy == "ignore" else None)
        else:
            v = node_value(i, values)
            outcomes.append({("value", v)})
            passed.append(v)
    return outcomes


def outcome_of(fut: asyncio.Future[Any]) -> Any:
    if fut.cancelled():
        return ("cancelled",)
    exc = fut.exception()
    if exc is None:
        return ("value", fut.result())
    if isinstance(exc, DependencyError):
        cause = exc.__cause__
        assert isinstance(cause, NodeError), repr(cause)
        assert exc.upstream == f"node-{cause.args[0]}"
        return ("dep", cause.args[0])
    assert isinstance(exc, NodeError), repr(exc)
    return ("error", exc.args[0])


def make_fn(i: int, node: Node) -> Any:
    def plain(*values: int) -> int:
        if node.fails:
            raise NodeError(i)
        return node_value(i, list(values))

    async def coro(*values: int) -> int:
        await asyncio.sleep(0)
        return plain(*values)

    opts: dict[str, Any] = {"name": f"node-{i}", "on_failure": node.policy}
    if node.policy == "ignore":
        opts["default"] = default_of(i)
    if node.kind == "async":
        return task(coro, **opts)
    return task(plain, inline=node.kind == "inline", **opts)


@settings(max_examples=40, deadline=None)
@given(nodes=dags())
async def test_random_dags_match_a_serial_reference(nodes: list[Node]) -> None:
    expected = reference(nodes)
    futs: list[asyncio.Future[Any]] = []
    async with async_wf.Runtime(threads=3) as rt:
        for i, node in enumerate(nodes):
            if node.barrier_before:
                await rt.barrier()
            futs.append(rt.submit(make_fn(i, node), *(futs[j] for j in node.inputs)))
        await rt.barrier()
        stats = rt.statistics()
    got = [outcome_of(f) for f in futs]
    for i, (g, allowed) in enumerate(zip(got, expected, strict=True)):
        assert g in allowed, f"node {i} {nodes[i]}: got {g}, expected one of {allowed}"
    counts = {
        "finished": sum(1 for g in got if g[0] == "value"),
        "cancelled": sum(1 for g in got if g[0] == "cancelled"),
        "failed": sum(1 for g in got if g[0] in ("error", "dep")),
    }
    assert {k: stats[k] for k in counts} == counts
    assert stats["submitted"] == len(nodes)


def test_reference_interpreter_itself() -> None:
    # 0 fails (fail) -> 1 dep; 2 fails (cancel) -> 3 cancelled; 4 fails (ignore) -> 5 gets default
    # 6 depends on 1 and 3: either poison
    n = Node
    nodes = [
        n((), True, "fail", "thread", False),
        n((0,), False, "fail", "thread", False),
        n((), True, "cancel_successors", "thread", False),
        n((2,), False, "fail", "thread", False),
        n((), True, "ignore", "thread", False),
        n((4, 4), False, "fail", "thread", False),
        n((1, 3), False, "fail", "thread", False),
    ]
    ref = reference(nodes)
    assert ref[:6] == [
        {("error", 0)},
        {("dep", 0)},
        {("error", 2)},
        {("cancelled",)},
        {("error", 4)},
        {("value", node_value(5, [-5, -5]))},
    ]
    assert ref[6] == {("dep", 0), ("cancelled",)}
    assert list(itertools.chain(*ref))  # every node has at least one outcome


async def test_cancelling_a_task_with_a_timeout_does_not_turn_into_a_retry() -> None:
    # the task takes longer than its timeout to clean up after the cancel; the
    # timeout must not fire into that cleanup and make the task run again
    runs: list[int] = []
    entered = asyncio.Event()

    async def slow_cleanup() -> None:
        runs.append(1)
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.6)
            raise

    job = async_wf.task(slow_cleanup, timeout=0.3, retries=1)
    async with async_wf.Runtime() as rt:
        fut = job.submit()
        await entered.wait()
        assert fut.cancel() is True
        with pytest.raises(asyncio.CancelledError):
            await fut
        await rt.barrier()
        stats = rt.statistics()
    assert runs == [1]
    assert stats["retried"] == 0
    assert stats["cancelled"] == 1
