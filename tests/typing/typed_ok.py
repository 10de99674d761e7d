"""Typed uses of the API that mypy must accept (tests/unit/test_typing.py)."""

import asyncio

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
