"""Chains sent ahead to their worker (issue 19, send_ahead), on real worker processes.

A task whose only unfinished input goes to a worker follows it there and
starts when the input ends, without a round trip to the scheduler. These
tests check that the scheduler still learns every link in order, and that
failures, retries, cancellations, timeouts and a lost worker leave no task
run twice where it must not, none lost, and no credit or value behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import async_wf
from async_wf import DependencyError


def inc(x: int) -> int:
    return x + 1


def pid_inc(pair: tuple[int, int]) -> tuple[int, int]:
    return pair[0] + 1, os.getpid()


def start(x: int) -> tuple[int, int]:
    return x, os.getpid()


def boom_at(x: int, at: int) -> int:
    if x == at:
        raise ValueError(f"link {x} fails")
    return x + 1


def slow_mark(x: int, where: str, seconds: float) -> int:
    time.sleep(seconds)
    Path(where, f"ran-{x}").touch()
    return x + 1


def flaky(x: int, where: str) -> int:
    flag = Path(where, f"failed-{x}")
    if x == 5 and not flag.exists():
        flag.touch()
        raise RuntimeError("first attempt fails")
    return x + 1


def big_inc(a: np.ndarray) -> np.ndarray:
    return a + 1


def sleep_then_inc(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x + 1


def wait_for(path: str, x: int) -> int:
    """Block this worker's slot until ``path`` exists (the test says when).

    Returns ``x``, or this worker's pid when ``x`` is 0.
    """
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return x or os.getpid()


def inc_where(x: int) -> tuple[int, int]:
    # only the stolen link calls it: never learnt quick, so it waits in the pool
    return x + 1, os.getpid()


async def _until(what: str, cond: Callable[[], bool]) -> None:
    for _ in range(600):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def _idle_credit(rt: async_wf.Runtime) -> None:
    """Every credit and in-flight record is given back once the runtime is idle."""
    tr = rt._sched._transport
    for _ in range(100):
        if all(not w.inflight and w.n_thread == 0 and w.n_async == 0 for w in tr._order):
            return
        await asyncio.sleep(0.05)
    raise AssertionError([(w.inflight, w.n_thread, w.n_async) for w in tr._order])


async def test_a_chain_runs_ahead_and_every_link_is_reported_in_order() -> None:
    seen: list[int] = []
    async with async_wf.Runtime(workers=2) as rt:
        futs = [rt.submit(start, 0)]
        for _ in range(300):
            futs.append(rt.submit(pid_inc, futs[-1]))
        for i, f in enumerate(futs):
            f.add_done_callback(lambda _f, i=i: seen.append(i))
        last = await futs[-1]
        assert last[0] == 300
        assert [f.result()[0] for f in futs] == list(range(301))
        st = rt.statistics()
        assert st["tasks_sent_ahead"] >= 250, st["tasks_sent_ahead"]
        assert st["finished"] == 301
        await _idle_credit(rt)
    # the scheduler resolved each link after its input: in chain order
    assert seen == sorted(seen)


async def test_send_ahead_zero_sends_nothing_ahead() -> None:
    async with async_wf.Runtime(workers=1, send_ahead=0) as rt:
        x = rt.submit(inc, 0)
        for _ in range(50):
            x = rt.submit(inc, x)
        assert await x == 51
        assert rt.statistics()["tasks_sent_ahead"] == 0


async def test_a_failing_link_fails_the_rest_and_nothing_hangs() -> None:
    async with async_wf.Runtime(workers=1) as rt:
        futs = [rt.submit(inc, 0)]
        for _ in range(40):
            futs.append(rt.submit(boom_at, futs[-1], 10))
        with pytest.raises(DependencyError):
            await futs[-1]
        assert futs[9].result() == 10
        with pytest.raises(ValueError, match="link 10 fails"):
            futs[10].result()
        assert all(isinstance(f.exception(), DependencyError) for f in futs[11:])
        await _idle_credit(rt)
        # the worker still works, and chains still go ahead on it
        y = rt.submit(inc, 0)
        for _ in range(20):
            y = rt.submit(inc, y)
        assert await y == 21


async def test_a_retried_link_runs_its_followers_once_with_the_new_value(tmp_path: Path) -> None:
    async with async_wf.Runtime(workers=1) as rt:
        f = async_wf.task(retries=1)(flaky)
        x = rt.submit(inc, -1)
        for _ in range(15):
            x = rt.submit(f, x, str(tmp_path))
        assert await x == 15
        await _idle_credit(rt)


async def test_cancelling_a_link_sent_ahead_keeps_it_from_running(tmp_path: Path) -> None:
    async with async_wf.Runtime(workers=1) as rt:
        futs = [rt.submit(slow_mark, 0, str(tmp_path), 0.5)]
        for _ in range(1, 8):
            futs.append(rt.submit(slow_mark, futs[-1], str(tmp_path), 0.01))
        await asyncio.sleep(0.2)  # link 0 runs; the others wait on the worker
        assert rt.statistics()["tasks_sent_ahead"] >= 7
        futs[3].cancel()
        assert await futs[2] == 3
        for f in futs[3:]:
            with pytest.raises(asyncio.CancelledError):
                await f
        await asyncio.sleep(0.3)
        ran = sorted(int(p.name.split("-")[1]) for p in tmp_path.iterdir())
        assert ran == [0, 1, 2], ran
        await _idle_credit(rt)


async def test_a_timed_out_link_releases_its_followers() -> None:
    async with async_wf.Runtime(workers=2) as rt:
        slow = async_wf.task(timeout=0.3)(sleep_then_inc)
        x = rt.submit(slow, 0, 2.0)
        y = rt.submit(inc, x)
        z = rt.submit(inc, y)
        with pytest.raises(async_wf.TaskTimeoutError):
            await x
        for f in (y, z):
            with pytest.raises(DependencyError):
                await f
        # and the followers' credits came back: a new chain goes through
        w = rt.submit(inc, 0)
        for _ in range(10):
            w = rt.submit(inc, w)
        assert await w == 11


async def test_killing_the_worker_of_a_chain_loses_no_link() -> None:
    async with async_wf.Runtime(workers=2, max_lost=5) as rt:
        await rt.submit(start, 0)  # both workers up
        x = rt.submit(start, 0)
        futs = [x]
        for _ in range(400):
            futs.append(rt.submit(pid_inc, futs[-1]))
        # kill whichever worker runs the chain, mid-way
        while not futs[50].done():
            await asyncio.sleep(0.001)
        victim = futs[50].result()[1]
        os.kill(victim, signal.SIGKILL)
        last = await futs[-1]
        assert last[0] == 400
        assert [f.result()[0] for f in futs] == list(range(401))
        assert rt.statistics()["workers_lost"] == 1


async def test_held_values_in_a_chain_sent_ahead_stay_on_the_worker() -> None:
    async with async_wf.Runtime(workers=2) as rt:
        x = rt.submit(np.zeros, 64 << 10)  # 512 KiB: held on its worker
        for _ in range(30):
            x = rt.submit(big_inc, x)
        got = await x
        assert got.shape == (64 << 10,) and float(got[0]) == 30.0
        st = rt.statistics()
        assert st["tasks_sent_ahead"] >= 20
        # 31 values of 512 KiB made; only the last came to the application
        assert st["bytes_received"] < 3 * (512 << 10)


async def test_a_dependent_with_other_inputs_done_goes_ahead_with_their_values() -> None:
    async with async_wf.Runtime(workers=1) as rt:
        a = await asyncio.gather(rt.submit(inc, 1), rt.submit(inc, 2))
        assert a == [2, 3]
        done1 = rt.submit(inc, 10)
        await done1
        x = rt.submit(inc, 0)
        for _ in range(20):
            x = rt.submit(lambda v, d, k=0: v + d - 11 + k, x, done1, k=1)
        assert await x == 1 + 20
        assert rt.statistics()["tasks_sent_ahead"] >= 15



async def test_a_link_released_after_send_ahead_then_stolen_goes_with_its_values(
        tmp_path: Path) -> None:
    # Every step waits for a file the test writes, so the order is fixed:
    # 1. one batch: link0 (blocked) to worker A, link1 ahead with it; x to B,
    #    y to A (round robin passes over a busy worker), queued behind link0
    # 2. link0 ends: link1 goes into A's thread queue behind y, which now
    #    runs; the core releases link1, its arguments still holding link0's
    #    future (they were sent ahead without it)
    # 3. x ends: B is idle, steals from A the one task it has not started,
    #    link1, which must reach B with link0's value in its arguments
    go0, go_x, go_y = (str(tmp_path / n) for n in ("go0", "go_x", "go_y"))
    async with async_wf.Runtime(workers=2) as rt:
        tr = rt._sched._transport
        await asyncio.gather(*[rt.submit(start, i) for i in range(4)])
        await _until("both workers idle", lambda: all(not w.n_thread for w in tr._order)
                     and len(tr._order) == 2)
        # a STEAL of the warm-up that found nothing to give back blocks the
        # next one to the same worker until it lapses
        await asyncio.sleep(2 * tr.STEAL_LAPSE)
        try:
            st0 = rt.statistics()
            link0 = rt.submit(wait_for, go0, 41)
            link1 = rt.submit(inc_where, link0)
            x = rt.submit(wait_for, go_x, 0)
            y = rt.submit(wait_for, go_y, 0)
            await _until("all sent", lambda: all(f._att is not None for f in (link0, link1, x, y)))
            a, b = link0._att.w, x._att.w
            assert a is not b and y._att.w is a and link1._att.w is a and link1._att.ahead
            Path(go0).touch()
            assert await link0 == 41
            await _until("link1 released", lambda: not link1._att.ahead)
            assert link1._subst, "link1's arguments still hold link0's future"
            Path(go_x).touch()
            b_pid = await x
            assert await link1 == (42, b_pid)  # ran on B while y still holds A's slot
            assert not y.done()
            st = rt.statistics()
            assert st["tasks_stolen"] - st0["tasks_stolen"] == 1, (st0, st)
            assert st["tasks_sent_ahead"] - st0["tasks_sent_ahead"] == 1, (st0, st)
            Path(go_y).touch()
            assert await y != b_pid
        finally:
            for go in (go0, go_x, go_y):  # a failed step leaves no slot blocked
                Path(go).touch()
        await _idle_credit(rt)
