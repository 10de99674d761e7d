"""The in-process runner's loop: the compiled ``run_firsts`` against its pure-Python twin.

Both take the same deque of task-like objects with real coroutine
functions and must give the same answers in the same order, leave the
same marks and outcomes, and run each coroutine in a context of its own
that ``task_context()``'s variable marks.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import os
from types import SimpleNamespace
from typing import Any

import pytest

from async_wf import _context

_NO_EXT = os.environ.get("ASYNC_WF_NO_EXTENSIONS", "") not in ("", "0")
QUEUED, STARTED, OTHER = object(), object(), object()
seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


def twins() -> list[Any]:
    out: list[Any] = [_context.run_firsts]
    if not _NO_EXT:
        from async_wf import _core

        out.append(_core.run_firsts)
    return out


async def ends(x: int) -> int:
    seen.set(f"ends{x}")  # set in the task's own context, not the caller's
    mark = _context._var.get()
    assert mark is not None and mark[1].name == f"t{x}"
    return x * 2


async def waits(x: int) -> int:
    await asyncio.sleep(0)
    return x


async def raises(x: int) -> int:
    raise ValueError(f"bad {x}")


async def cancels(x: int) -> int:
    raise asyncio.CancelledError("stop")


def task(name: str, fn: Any, *args: Any, att: Any = QUEUED, kwargs: Any = None,
         nxt: Any = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, _fn=fn, _args=args, _kwargs=kwargs or {}, _att=att,
                           _next=nxt)


def script() -> list[SimpleNamespace]:
    return [task("t1", ends, 1), task("t2", ends, 2),
            task("t3", ends, 3, nxt=object()),        # a successor: back to the caller
            task("t4", waits, 4),                     # suspends
            task("t5", raises, 5),                    # raises
            task("t6", ends, 6, att=OTHER),           # not a plain queued one
            task("t7", ends, 7, kwargs={"x": 7}),     # keyword arguments: the general path
            task("t8", cancels, 8),
            task("t9", ends, 9), task("t10", ends, 10), task("t11", ends, 11)]


def drive(run_firsts: Any, limit: int) -> list[Any]:
    q = collections.deque(script())
    done: list[tuple[Any, Any]] = []
    log: list[Any] = []
    owner = object()
    while q:
        got = run_firsts(q, owner, _context._var, done, QUEUED, STARTED, limit)
        if got is None:
            log.append(("burst", [(f.name, v) for f, v in done], len(q)))
            done.clear()
            continue
        why, fut, a, b = got
        desc: Any = None
        if why == 0:
            desc = a
        elif why == 1:
            ctx, (coro, first) = a, b
            assert isinstance(ctx, contextvars.Context) and ctx[_context._var][1] is fut
            coro.close()
            desc = type(first).__name__
        elif why == 2:
            desc = (type(a).__name__, str(a))
        log.append((why, fut.name, fut._att is STARTED, desc, [f.name for f, _ in done]))
        done.clear()
    assert seen.get() == ""  # no task's context leaked into the caller's
    assert _context._var.get() is None
    return log


@pytest.mark.parametrize("limit", [1, 2, 64])
def test_the_compiled_runner_loop_answers_as_its_twin(limit: int) -> None:
    logs = [drive(f, limit) for f in twins()]
    want = drive(_context.run_firsts, limit)
    assert [(x[0], x[1]) for x in want if x[0] != "burst"] == [
        (0, "t3"), (1, "t4"), (2, "t5"), (3, "t6"), (3, "t7"), (2, "t8")]
    finished = [n for x in want for n in (
        [name for name, _ in x[1]] if x[0] == "burst" else x[4])]
    assert finished == ["t1", "t2", "t9", "t10", "t11"]
    for log in logs:
        assert log == want
