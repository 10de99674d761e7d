"""Which blocking calls a TCP worker runs on its loop, on real worker processes.

A function whose calls have proved short runs on the worker's loop
(``_worker.INLINE_BELOW``). One long call there may be the machine's doing
(the worker stopped or preempted mid-call): the function must stay on the
loop. A function that is slow itself (it sleeps, or computes) must leave
the loop by its second long call.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import async_wf
from async_wf._worker import INLINE_NEVER, INLINE_STRIKE_WINDOW

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="reads a worker's state from /proc")


def where(stop: bool) -> tuple[bool, int]:
    """(ran on the worker's loop thread, worker pid); ``stop``: stop the worker mid-call."""
    if stop:
        os.kill(os.getpid(), signal.SIGSTOP)  # the test continues it
    return threading.current_thread() is threading.main_thread(), os.getpid()


def nap(ms: float) -> bool:
    time.sleep(ms / 1000)
    return threading.current_thread() is threading.main_thread()


def spin(ms: float) -> bool:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return threading.current_thread() is threading.main_thread()


async def _sequential(rt: async_wf.Runtime, fn: Callable[[Any], Any], arg: Any,
                      n: int) -> list[Any]:
    # one task a batch, awaited one by one
    return [await asyncio.wait_for(rt.submit(fn, arg), 20) for _ in range(n)]


def _state(pid: int) -> str:
    # the field after the command name, which is in parentheses
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def _stopped_once(rt: async_wf.Runtime, pid: int) -> tuple[bool, int]:
    """One call of ``where`` during which the worker is stopped for 0.1 s."""
    fut = rt.submit(where, True)
    for _ in range(2000):
        if _state(pid) == "T":
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("the worker never stopped")
    await asyncio.sleep(0.1)  # far longer than INLINE_NEVER
    os.kill(pid, signal.SIGCONT)
    return await asyncio.wait_for(fut, 20)


async def _on_loop_again(rt: async_wf.Runtime, fn: Callable[[Any], Any], arg: Any,
                         on: Callable[[Any], bool]) -> int:
    """Calls of ``fn(arg)`` until one runs on the loop; how many it took (AssertionError: 40).

    A call slowed by load (but under INLINE_NEVER) feeds the average and
    sends the function to the threads for a few calls; it comes back.
    """
    for n in range(1, 41):
        if on(await asyncio.wait_for(rt.submit(fn, arg), 20)):
            return n
    raise AssertionError(f"{fn.__name__} never came back to the loop")


async def test_a_quick_function_stopped_mid_call_stays_on_the_loop() -> None:
    assert 10 * INLINE_NEVER < 0.1  # the stop below is long, by far
    async with async_wf.Runtime(workers=1) as rt:
        await _sequential(rt, where, False, 20)
        pid = (await _sequential(rt, where, False, 1))[0][1]
        await _on_loop_again(rt, where, False, lambda r: bool(r[0]))
        # stopped once: the machine's doing, not the function's (before, it
        # was in the threads for good from here on)
        assert await _stopped_once(rt, pid) == (True, pid)
        await _on_loop_again(rt, where, False, lambda r: bool(r[0]))
        await _sequential(rt, where, False, 2 * INLINE_STRIKE_WINDOW)
        # again, far from the first: a stop now and then is forgotten
        await _on_loop_again(rt, where, False, lambda r: bool(r[0]))
        assert await _stopped_once(rt, pid) == (True, pid)
        await _on_loop_again(rt, where, False, lambda r: bool(r[0]))
        assert rt.statistics()["workers_lost"] == 0


@pytest.mark.parametrize("slow", [nap, spin], ids=["sleeps", "computes"])
async def test_a_function_slow_itself_leaves_the_loop_by_its_second_long_call(
        slow: Callable[[float], bool]) -> None:
    async with async_wf.Runtime(workers=1) as rt:
        await _sequential(rt, slow, 0, 20)
        await _on_loop_again(rt, slow, 0, bool)
        long_calls = await _sequential(rt, slow, 30, 2)
        assert long_calls[0] is True, long_calls  # the first long call, on the loop
        # from then on in a thread, quick or not
        after = await _sequential(rt, slow, 0, 20)
        assert not any(after), after
        assert await _sequential(rt, slow, 30, 1) == [False]


async def test_a_function_slow_now_and_then_leaves_the_loop() -> None:
    # a second long call a few calls after the first (not right after it)
    async with async_wf.Runtime(workers=1) as rt:
        await _sequential(rt, nap, 0, 20)
        await _on_loop_again(rt, nap, 0, bool)
        assert await _sequential(rt, nap, 30, 1) == [True]
        await _sequential(rt, nap, 0, 2)
        n = await _on_loop_again(rt, nap, 0, bool)
        assert n + 2 < INLINE_STRIKE_WINDOW  # at most that many calls on the loop since
        assert await _sequential(rt, nap, 30, 1) == [True]
        assert not any(await _sequential(rt, nap, 0, 20))
