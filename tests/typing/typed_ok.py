"""Typed uses of the API that mypy must accept (tests/unit/test_typing.py)."""

import asyncio
from collections.abc import Coroutine
from typing import Any

import async_wf


def add(a: int, b: int) -> int:
    return a + b


async def half(x: float) -> float:
    await asyncio.sleep(0)
    return x / 2


async def main() -> None:
    async with async_wf.Runtime() as rt:
        f: async_wf.TaskFuture[int] = rt.submit(add, 1, 2)
        total: int = await f
        h: float = await rt.submit(half, 3.0)  # an async def's result, not a coroutine
        g: int = await async_wf.submit(add, total, 1)
        print(total, h, g)


@async_wf.task(retries=2, on_failure="ignore", default=0, args=None)
def inc(x: int) -> int:
    return x + 1


async def futures_into_a_task() -> None:
    # a @task call is checked against its own signature (README, Types): with a
    # future among the arguments, submit() keeps the result typed
    async with async_wf.Runtime() as rt:
        two: async_wf.TaskFuture[int] = rt.submit(inc, 1)
        three: int = await rt.submit(inc, two)
        four: int = await async_wf.submit(inc, rt.submit(add, two, 1))
        print(three, four)


def declared() -> None:
    a: async_wf.TaskFunction[[int], int] = inc
    b: async_wf.TaskFunction[[int, int], int] = async_wf.task(add, priority=1, name="add")
    c: async_wf.TaskFunction[[float], Coroutine[Any, Any, float]] = async_wf.task(half)
    d: async_wf.TaskFunction[[int], int] = inc.options(timeout=2.5, version="2")
    print(a, b, c, d)
