"""Per-call options: ``rt.options(...).submit(fn, ...)``, the function unwrapped (issue 18)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

import async_wf


def nap(t: float) -> float:
    time.sleep(t)
    return t


def quick() -> float:
    return time.monotonic()


def flaky_once(path: str) -> str:
    # fails the first time it runs, succeeds the second (a file remembers)
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first attempt fails")
    return "ok"


@pytest.mark.parametrize("workers", [0, 1])
async def test_an_urgent_call_jumps_a_long_queue(workers: int) -> None:
    # 300 queued calls of 10 ms on one thread (or one worker process): about
    # 3 s of work; a call submitted after them with a higher priority starts
    # as soon as the thread frees up, not after the queue
    opts = {"workers": workers, "slots": 1, "prefetch": 1} if workers else {"threads": 1}
    async with async_wf.Runtime(**opts) as rt:  # type: ignore[arg-type]
        queued = [rt.submit(nap, 0.01) for _ in range(300)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        urgent = rt.options(priority=10, name="urgent").submit(quick)
        started = await urgent
        # the property: most of the queue was still waiting when it ran
        assert sum(not f.done() for f in queued) > 150
        assert started - t0 < 2.0, started - t0
        assert urgent.name == "urgent"
        for f in queued:
            f.cancel()  # what has not started never runs: the test ends now


async def test_per_call_options_apply_to_that_call_only(tmp_path: os.PathLike[str]) -> None:
    async with async_wf.Runtime(threads=2) as rt:
        marker = os.path.join(tmp_path, "m")
        # retries for this call: it succeeds on its second attempt
        assert await rt.options(retries=1).submit(flaky_once, marker) == "ok"
        # the plain submit of the same function keeps the defaults
        os.remove(marker)
        with pytest.raises(RuntimeError, match="first attempt fails"):
            await rt.submit(flaky_once, marker)
        # a timeout for one call
        with pytest.raises(async_wf.TaskTimeoutError):
            await rt.options(timeout=0.05).submit(nap, 1.0)


async def test_per_call_options_merge_with_a_tasks_own() -> None:
    @async_wf.task(retries=2, name="declared")
    def f(x: int) -> int:
        return x + 1

    async with async_wf.Runtime() as rt:
        fut = rt.options(priority=3).submit(f, 1)
        assert await fut == 2
        assert fut.name == "declared"  # the task's own options stay
        assert fut._opts.retries == 2 and fut._opts.priority == 3
        # the module-level spelling, inside the runtime's context
        assert await async_wf.options(priority=1).submit(f, 2) == 3


async def test_bad_per_call_options_are_refused_with_the_rule() -> None:
    async with async_wf.Runtime() as rt:
        with pytest.raises(TypeError, match="unexpected keyword argument 'priorty'"):
            rt.options(priorty=1)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="retries"):
            rt.options(retries=-1)
    with pytest.raises(RuntimeError, match="no async_wf runtime is running"):
        async_wf.options(priority=1).submit(quick)
