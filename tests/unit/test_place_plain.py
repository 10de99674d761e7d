"""``RemoteTransport._place_plain`` decides as the per-task rules decide (issue 23).

Placement of plain blocking tasks reads the workers' credit once per run of
tasks instead of calling ``_pick``, ``_pick_quick`` and ``_Worker.count``
per task. These tests build worker states at random (credit, slots, budget,
quarantine, a holder, a reservation, quick functions, the round-robin
position) and check, on two identical copies, that the run placement and
the per-task rules give the same tasks to the same workers in the same
order, send the same tasks to the backlog, and leave the same credit,
budget, hysteresis state and round-robin position behind.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections.abc import Iterator
from typing import Any

import pytest

from async_wf import protocol as P
from async_wf._futures import TaskFuture
from async_wf._options import DEFAULT_OPTIONS, INLINE, THREAD, TaskOptions
from async_wf.transport._remote import RemoteTransport, _Worker
from async_wf.transport.tcp import TcpTransport


def fa() -> None:
    """A function the workers may have learnt quick."""


def fb() -> None:
    """Another one."""


def fc() -> None:
    """One never sent: no function id."""


PREFETCH = 2


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def transport(rng: random.Random, n_workers: int) -> RemoteTransport:
    """A transport (never started) with ``n_workers`` workers in a random state of credit."""
    t = TcpTransport(prefetch=PREFETCH, async_limit=100)
    t._fn_blobs = {id(fa): (fa, 1, b""), id(fb): (fb, 2, b"")}
    for wid in range(n_workers):
        slots = rng.randint(1, 3)
        w = _Worker(None, wid, slots, 1000 + wid, f"w{wid}", PREFETCH, 100)  # type: ignore[arg-type]
        w.quick_fids = rng.choice([set(), set(), {1}, {1, 2}, {2}])
        w.thread_limit = slots * PREFETCH * (P.QUICK_CREDIT if w.quick_fids else 1)
        w.thread_refill = w.thread_limit // 2
        w.n_thread = rng.randint(0, w.thread_limit + 1)
        w.thread_open = w.n_thread < w.thread_limit and rng.random() < 0.9
        w.budget = rng.choice([-1, -1, -1, 0, 1, 2, 5])
        w.quarantine = rng.choice([0, 0, 0, 0, 17])
        w.held = rng.choice([None] * 9 + [object()])
        w.reserved = rng.random() < 0.1
        t._workers[wid] = w
        t._order.append(w)
    t._rr = rng.randint(0, n_workers)  # n_workers: past the end, as after a worker left
    return t


def tasks(rng: random.Random, loop: asyncio.AbstractEventLoop, n: int) -> list[TaskFuture[Any]]:
    """``n`` plain blocking tasks of the three functions, with two priorities."""
    high = TaskOptions(priority=5)
    out: list[TaskFuture[Any]] = []
    for i in range(n):
        f: TaskFuture[Any] = TaskFuture(loop=loop)
        f._fn = rng.choice([fa, fa, fa, fb, fc])
        f._kind = rng.choice([THREAD, THREAD, INLINE])
        f._opts = high if rng.random() < 0.2 else DEFAULT_OPTIONS
        f._refs = None
        f._lost = 0
        f._att = None
        f._id = i
        out.append(f)
    return out


def per_task(t: RemoteTransport, futs: list[TaskFuture[Any]],
             batches: dict[_Worker, list[Any]]) -> None:
    """What ``dispatch`` does for a lone plain task, for each of them: the reference."""
    for fut in futs:
        w = t._pick(fut._kind)
        if w is not None and w.quick_fids:
            w = t._pick_quick(fut, w)
        if w is None:
            t._seq += 1
            heapq.heappush(t._backlog[1], (-fut._opts.priority, t._seq, fut))
            fut._att = None
            continue
        w.count(fut._kind, 1)
        batches.setdefault(w, []).append(fut)


def state(t: RemoteTransport, batches: dict[_Worker, list[Any]]) -> Any:
    """Everything placement decides, by worker position and task number."""
    workers = [(w.n_thread, w.budget, w.thread_open) for w in t._order]
    sent = [(w.id, [f._id for f in fs]) for w, fs in batches.items()]
    backlog = sorted((p, s, f._id) for p, s, f in t._backlog[1])
    return t._rr, t._seq, workers, sent, backlog


@pytest.mark.parametrize("seed", range(300))
def test_run_placement_decides_as_the_per_task_rules(
        seed: int, loop: asyncio.AbstractEventLoop) -> None:
    n_workers = random.Random(seed).randint(0, 4)
    futs = tasks(random.Random(seed + 1), loop, random.Random(seed + 2).randint(1, 60))

    ref = transport(random.Random(seed), n_workers)
    ref_batches: dict[_Worker, list[Any]] = {}
    per_task(ref, futs, ref_batches)
    expected = state(ref, ref_batches)

    run = transport(random.Random(seed), n_workers)
    run_batches: dict[_Worker, list[Any]] = {}
    assert run._place_plain(futs, 0, run_batches) == len(futs)
    assert state(run, run_batches) == expected


def test_a_run_ends_at_the_first_task_that_is_not_plain(
        loop: asyncio.AbstractEventLoop) -> None:
    rng = random.Random(7)
    t = transport(rng, 2)
    for w in t._order:
        w.n_thread, w.thread_open, w.budget, w.quarantine, w.held, w.reserved = (
            0, True, -1, 0, None, False)
    futs = tasks(rng, loop, 6)
    futs[3]._kind = 0  # async def: counted against the async credit, by dispatch
    batches: dict[_Worker, list[Any]] = {}
    assert t._place_plain(futs, 0, batches) == 3
    assert sorted(f._id for fs in batches.values() for f in fs) == [0, 1, 2]
    assert t._place_plain(futs, 3, batches) == 3  # nothing placed: dispatch's turn
    assert t._place_plain(futs, 4, batches) == 6
    assert sum(w.n_thread for w in t._order) == 5
