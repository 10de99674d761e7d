"""Faults and hostile input that must stay contained: one bad value, one bad peer.

Each test reproduces a failure mode found by the adversarial campaign of
issue 22 with real processes and sockets.
"""

from __future__ import annotations

from typing import Any

import pytest

import async_wf


def _depth(x: Any) -> int:
    n = 0
    while isinstance(x, list) and x:
        x, n = x[0], n + 1
    return n


def _first_leaf(x: Any) -> Any:
    while isinstance(x, list):
        x = x[0]
    return x


async def test_self_referencing_and_very_deep_arguments_are_accepted() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    deep: list[Any] = []
    for _ in range(50_000):
        deep = [deep]
    d: dict[str, Any] = {}
    d["self"] = d
    async with async_wf.Runtime() as rt:
        assert await rt.submit(len, loop) == 2
        assert await rt.submit(_depth, deep) == 50_000
        assert await rt.submit(len, d) == 1
        # a future beside a cycle is still found and replaced by its value
        three = rt.submit(len, [1, 2, 3])
        assert await rt.submit(lambda a, b: (a, len(b)), three, loop) == (3, 2)
        # and one nested 200 levels deep too
        nested: list[Any] = [three]
        for _ in range(200):
            nested = [nested]
        assert await rt.submit(_first_leaf, nested) == 3


async def test_a_future_inside_a_self_referencing_container_gets_a_clear_error() -> None:
    async with async_wf.Runtime() as rt:
        f = rt.submit(len, [1])
        box: list[Any] = [f]
        box.append(box)
        with pytest.raises(ValueError, match="self-referencing container"):
            rt.submit(len, box)
        await f
