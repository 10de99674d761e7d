"""The module-level API: gather, wait, as_completed, barrier, run, statistics."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest
import uvloop

import async_wf
import async_wf._api
import async_wf._loop
from async_wf import DependencyError, TaskFuture
from async_wf._api import RuntimeStatistics


def ident(x: Any) -> Any:
    return x


def boom() -> None:
    raise KeyError("boom")


async def gated(ev: asyncio.Event, value: Any) -> Any:
    await ev.wait()
    return value


# -------------------------------------------------------------------- gather


async def test_gather_returns_results_in_order() -> None:
    async with async_wf.Runtime() as rt:
        evs = [asyncio.Event() for _ in range(3)]
        futs = [rt.submit(gated, ev, i) for i, ev in enumerate(evs)]
        for ev in reversed(evs):  # finish in reverse order
            ev.set()
        result = await async_wf.gather(*futs)
        assert result == [0, 1, 2]
        assert isinstance(result, list)
        assert await async_wf.gather() == []


async def test_gather_raises_or_returns_exceptions() -> None:
    async with async_wf.Runtime() as rt:
        bad = rt.submit(boom)
        dep = rt.submit(ident, bad)
        ok = rt.submit(ident, 1)
        with pytest.raises(KeyError, match="boom"):
            await async_wf.gather(ok, bad)
        results = await async_wf.gather(ok, bad, dep, return_exceptions=True)
        assert results[0] == 1
        assert isinstance(results[1], KeyError)
        assert isinstance(results[2], DependencyError)
        # plain awaitables mix with task futures
        assert await async_wf.gather(ok, asyncio.sleep(0, "x")) == [1, "x"]


# ---------------------------------------------------------------------- wait


async def test_wait_first_completed_first_exception_all_completed() -> None:
    async with async_wf.Runtime() as rt:
        go = asyncio.Event()
        slow = rt.submit(gated, go, "slow")
        fast = rt.submit(ident, "fast")
        done, pending = await async_wf.wait([slow, fast], return_when="FIRST_COMPLETED")
        assert done == {fast}
        assert pending == {slow}

        bad = rt.submit(boom)
        done, pending = await async_wf.wait([slow, bad], return_when=asyncio.FIRST_EXCEPTION)
        assert done == {bad}
        assert pending == {slow}

        done, pending = await async_wf.wait([slow], timeout=0.01)
        assert (done, pending) == (set(), {slow})

        go.set()
        done, pending = await async_wf.wait([slow, fast, bad])
        assert done == {slow, fast, bad}
        assert not pending


async def test_wait_refuses_bad_arguments() -> None:
    async with async_wf.Runtime() as rt:
        with pytest.raises(ValueError, match="wait needs at least one future, got none"):
            await async_wf.wait([])
        fut = rt.submit(ident, 1)
        with pytest.raises(ValueError, match=r"return_when must be .*, got 'SOMETIMES'"):
            await async_wf.wait([fut], return_when="SOMETIMES")  # type: ignore[arg-type]
        await fut


# -------------------------------------------------------------- as_completed


async def test_as_completed_yields_the_futures_in_completion_order() -> None:
    async with async_wf.Runtime() as rt:
        evs = [asyncio.Event() for _ in range(4)]
        futs = [rt.submit(gated, ev, i) for i, ev in enumerate(evs)]
        order = [2, 0, 3, 1]
        seen = []
        evs[order[0]].set()
        async for f in async_wf.as_completed([*futs, futs[0]]):  # duplicates count once
            assert f in futs
            seen.append(f.result())
            if len(seen) < len(order):
                evs[order[len(seen)]].set()
        assert seen == order


async def test_as_completed_with_done_failed_and_empty() -> None:
    async with async_wf.Runtime() as rt:
        bad = rt.submit(boom)
        ok = rt.submit(ident, 1)
        await rt.barrier()
        got = {f async for f in async_wf.as_completed([bad, ok])}
        assert got == {bad, ok}
        assert isinstance(bad.exception(), KeyError)
        assert [f async for f in async_wf.as_completed([])] == []


async def test_as_completed_timeout() -> None:
    async with async_wf.Runtime() as rt:
        go = asyncio.Event()
        fast = rt.submit(ident, 1)
        slow = rt.submit(gated, go, 2)
        await fast
        seen = []
        with pytest.raises(TimeoutError, match=r"2 futures not all done after 0\.05 s"):
            async for f in async_wf.as_completed([fast, slow], timeout=0.05):
                seen.append(f)
        assert seen == [fast]
        go.set()
        await slow


# ------------------------------------------------------------------- barrier


async def test_barrier_waits_for_everything_submitted_and_does_not_raise() -> None:
    async with async_wf.Runtime() as rt:
        await rt.barrier()  # nothing to wait for
        go = asyncio.Event()
        futs = [rt.submit(gated, go, i) for i in range(3)]
        bad = rt.submit(boom)
        dep = rt.submit(ident, bad)
        chained = rt.submit(ident, futs)
        asyncio.get_running_loop().call_soon(go.set)
        await rt.barrier()
        assert all(f.done() for f in [*futs, bad, dep, chained])
        assert chained.result() == [0, 1, 2]
        assert isinstance(bad.exception(), KeyError)


async def test_barrier_from_several_waiters() -> None:
    async with async_wf.Runtime() as rt:
        go = asyncio.Event()
        fut = rt.submit(gated, go, 1)
        waiters = [asyncio.ensure_future(rt.barrier()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        go.set()
        await asyncio.wait_for(asyncio.gather(*waiters), 10)
        assert fut.result() == 1


# ----------------------------------------------------------------------- run


def test_run_uses_uvloop_and_returns_the_result() -> None:
    async def main() -> tuple[type, int]:
        async with async_wf.Runtime() as rt:
            return type(asyncio.get_running_loop()), await rt.submit(ident, 42)

    loop_type, value = async_wf.run(main())
    assert loop_type is uvloop.Loop
    assert value == 42


def test_the_loop_module_stands_below_the_api() -> None:
    # a worker gets its loop from _loop.py: that module must not pull in the
    # runtime (its async_wf imports: only the MPI loop, lazily)
    tree = ast.parse(Path(async_wf._loop.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("async_wf")} == {"async_wf._mpi_channel"}
    assert async_wf.run is async_wf._loop.run is async_wf._api.run

    async def main() -> type:
        return type(asyncio.get_running_loop())

    assert async_wf._loop.run(main()) is uvloop.Loop


def test_run_propagates_exceptions() -> None:
    async def main() -> None:
        async with async_wf.Runtime() as rt:
            await rt.submit(boom)

    with pytest.raises(KeyError, match="boom"):
        async_wf.run(main())


def test_run_inside_a_running_loop_is_refused() -> None:
    async def outer() -> None:
        coro = asyncio.sleep(0)
        try:
            with pytest.raises(RuntimeError, match=r"run\(\) cannot be called from a running"):
                async_wf.run(coro)
        finally:
            coro.close()

    async_wf.run(outer())


# ---------------------------------------------------------------- statistics


async def test_statistics_keys_and_types() -> None:
    async with async_wf.Runtime() as rt:
        await async_wf.gather(*(rt.submit(ident, i) for i in range(10)))
        stats = rt.statistics()
    for key in ("submitted", "running", "finished", "failed", "cancelled", "ready_queue"):
        assert isinstance(stats[key], int), key
    assert stats["submitted"] == stats["finished"] == 10
    assert isinstance(stats["tasks_per_s"], float)
    assert stats["tasks_per_s"] > 0
    assert stats["elapsed_s"] > 0


@pytest.mark.parametrize("kind", ["local", "tcp"])
async def test_statistics_has_the_declared_keys(kind: str, tmp_path: Path) -> None:
    # RuntimeStatistics is what mypy sees: it must say what the runtime returns
    opts: dict[str, Any] = {"workers": 1} if kind == "tcp" else {}
    async with async_wf.Runtime(checkpoint=tmp_path / "ck", **opts) as rt:
        await rt.submit(ident, 1)
        stats = rt.statistics()
    required = RuntimeStatistics.__required_keys__
    assert required <= set(stats) <= required | RuntimeStatistics.__optional_keys__
    assert "checkpoint_recorded" in stats
    assert ("workers_lost" in stats) == (kind == "tcp")
    assert stats["ready"] == stats["ready_queue"]


async def test_statistics_after_close_still_answers() -> None:
    async with async_wf.Runtime() as rt:
        await rt.submit(ident, 1)
    assert rt.statistics()["finished"] == 1


# --------------------------------------------------------- TaskFuture basics


async def test_task_future_repr_name_and_id() -> None:
    async with async_wf.Runtime() as rt:
        go = asyncio.Event()
        a = rt.submit(gated, go, 1)
        b = rt.submit(async_wf.task(ident, name="named"), 2)
        assert repr(a) == "<TaskFuture #1 'gated' pending>"
        assert (a.id, b.id) == (1, 2)
        assert b.name == "named"
        go.set()
        await async_wf.gather(a, b)
        assert repr(b) == "<TaskFuture #2 'named' finished>"
        c = rt.submit(boom)
        with pytest.raises(KeyError):
            await c
        assert repr(c) == "<TaskFuture #3 'boom' failed>"
        d = rt.submit(gated, asyncio.Event(), 0)
        d.cancel()
        assert repr(d) == "<TaskFuture #4 'gated' cancelled>"
        assert isinstance(d, TaskFuture)
