"""Typed uses of the API that mypy must refuse, one per line marked 'error:'."""

import asyncio

import async_wf


def add(a: int, b: int) -> int:
    return a + b


async def half(x: float) -> float:
    await asyncio.sleep(0)
    return x / 2


async def main() -> None:
    async with async_wf.Runtime() as rt:
        s: str = await rt.submit(add, 1, 2)  # error: int is not str
        t: str = await rt.submit(half, 1.0)  # error: float is not str
        u: async_wf.TaskFuture[str] = async_wf.submit(add, 1, 2)  # error: TaskFuture[int]
        print(s, t, u)


def declared() -> None:
    async_wf.task(add, retires=2)  # error: no option 'retires'
    async_wf.task(add, retries="2")  # error: retries is an int
    async_wf.task(retries=1)(add).options(timeout="1")  # error: timeout is a number
    x: async_wf.TaskFunction[[str], int] = async_wf.task(add, priority=1)  # error: params
    print(x)
