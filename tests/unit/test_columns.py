"""Columns of plain tasks and scalar results on the wire (protocol.TASKS), on real workers.

Plain tasks of one function with small scalar arguments travel as one
column item, their arguments in the frame's own pickle; scalar results come
back the same way. These tests check that every value keeps its exact type
and value, that anything else (a subclass, a big int, a long string, keyword
arguments, a failure) still goes by a blob of its own and fails only its
task, that frames still split under a small frame limit, and that a
malformed column closes only the connection it came on.
"""

from __future__ import annotations

import asyncio
import enum
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from tcp_helpers import HANG, RawPeer, square, start_worker, stop, until, wait_exit

import async_wf
from async_wf import protocol as P

UV = pytest.mark.asyncio(loop_factories=["uvloop"])
ROOT = Path(__file__).resolve().parents[2]


class Colour(enum.IntEnum):
    RED = 1


def ident(x: Any) -> Any:
    return x


def typed(x: Any) -> tuple[str, Any]:
    return type(x).__name__, x


def two(a: Any, b: Any) -> Any:
    return (a, b)


def fail_on(i: int, bad: int) -> int:
    if i == bad:
        raise ValueError(f"task {i} fails")
    return i * 2


async def a_double(i: int) -> int:
    await asyncio.sleep(0)
    return i * 2


VALUES: list[Any] = [
    0, -1, 7, (1 << 62) - 1, -(1 << 62) + 1,  # in a column
    1 << 62, 1 << 70, -(1 << 80),  # too large: a blob of their own
    1.5, float("inf"), True, False, None,
    "", "é" * 256, "x" * 257, b"", b"\x00" * 256, b"y" * 257,
    Colour.RED,  # an int subclass: never in a column
    [1, 2], (3,), {"k": 1},
]


@UV
async def test_every_value_keeps_its_type_and_value_through_columns() -> None:
    async with async_wf.Runtime(workers=2) as rt:
        futs = [rt.submit(ident, v) for v in VALUES * 20]
        got = await async_wf.gather(*futs)
        for v, g in zip(VALUES * 20, got, strict=True):
            assert type(g) is type(v) and g == v, (v, g)
        kinds = await async_wf.gather(*[rt.submit(typed, v) for v in VALUES])
        assert [k for k, _ in kinds] == [type(v).__name__ for v in VALUES]
        # keyword arguments and several positional ones
        assert await rt.submit(two, 1, b=2) == (1, 2)
        assert await async_wf.gather(*[rt.submit(two, i, "s") for i in range(50)]) \
            == [(i, "s") for i in range(50)]
        st = rt.statistics()
        # most went in columns, the subclass and the large ones did not
        assert st["tasks_in_columns"] >= 15 * 20, st
        assert st["results_in_columns"] >= 14 * 20, st
        n = len(VALUES) * 21 + 51
        assert st["tasks_in_columns"] < n and st["results_in_columns"] < n, st


@UV
async def test_a_failure_in_a_column_fails_its_task_only() -> None:
    async with async_wf.Runtime(workers=2) as rt:
        futs = [rt.submit(fail_on, i, 37) for i in range(200)]
        done = await asyncio.gather(*futs, return_exceptions=True)
        for i, r in enumerate(done):
            if i == 37:
                assert isinstance(r, ValueError) and "task 37 fails" in str(r)
            else:
                assert r == i * 2
        assert rt.statistics()["tasks_in_columns"] >= 190


@UV
async def test_async_tasks_in_columns_and_dependents() -> None:
    async with async_wf.Runtime(workers=2) as rt:
        firsts = [rt.submit(a_double, i) for i in range(300)]
        # two inputs each: not chained (send-ahead), sent when ready, in columns
        pairs = [rt.submit(two, firsts[i], firsts[i + 1]) for i in range(0, 300, 2)]
        assert await async_wf.gather(*pairs) == [(i * 2, i * 2 + 2) for i in range(0, 300, 2)]
        assert rt.statistics()["tasks_in_columns"] >= 450


SMALL_FRAMES = textwrap.dedent('''
    import async_wf

    def ident(x):
        return x

    async def main():
        async with async_wf.Runtime(workers=2) as rt:
            args = [str(i).rjust(250, "z") for i in range(3000)]
            got = await async_wf.gather(*[rt.submit(ident, a) for a in args])
            assert got == args, "wrong results"
            st = rt.statistics()
            assert st["tasks_in_columns"] == 3000, st
            assert st["results_in_columns"] == 3000, st
        print("ok", st["bytes_sent"])

    async_wf.run(main())
''')


def test_columns_split_frames_under_a_small_frame_limit(tmp_path: Path) -> None:
    # 3000 arguments of 250 characters: about 3 MB of columns, 48 times the
    # 64 KiB limit that both ends use here
    (tmp_path / "app.py").write_text(SMALL_FRAMES)
    env = {**os.environ, P.MAX_FRAME_ENV: "65536",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(tmp_path / "app.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


def noop() -> None:
    return None


def nap() -> None:
    time.sleep(0.01)


@UV
async def test_a_worker_that_runs_everything_on_its_loop_gets_a_larger_credit() -> None:
    async with async_wf.Runtime(workers=1) as rt:
        t: Any = rt.transport
        (w,) = t._order
        base = w.thread_limit
        for _ in range(5):
            await async_wf.gather(*[rt.submit(noop) for _ in range(2000)])
        await until(lambda: w.thread_limit == base * P.QUICK_CREDIT, "the quick credit")
        # a function it has not learnt quick gets the normal credit at once:
        # 300 of them do not all go to its queue
        naps = [rt.submit(nap) for _ in range(300)]
        await asyncio.sleep(0.05)
        assert w.n_thread <= base, (w.thread_limit, w.n_thread)
        # and once one of them has needed a thread, the worker says so
        await until(lambda: w.thread_limit == base, "the normal credit")
        for f in naps:
            f.cancel()
        await asyncio.gather(*naps, return_exceptions=True)
        await until(lambda: w.n_thread == 0, "the credit back")
        assert sum(f.cancelled() for f in naps) >= 300 - base - 1


@UV
@pytest.mark.parametrize("item", [
    ([1, 2], [3]),  # lengths differ
    ((1, 2), (3, 4)),  # not lists
    "quick",  # a QUICK frame that is not a bool
])
async def test_a_malformed_column_or_quick_frame_closes_that_connection_only(item: Any) -> None:
    async with async_wf.Runtime(workers=1) as rt:
        t = rt.transport
        peer = await RawPeer.connect(t.address)  # type: ignore[attr-defined]
        try:
            await peer.handshake(t.secret)  # type: ignore[attr-defined]
            await until(lambda: rt.statistics()["workers"] == 2, "the raw peer to join")
            if item == "quick":
                peer.send(P.encode(P.QUICK, True))
            else:
                peer.send(P.encode(P.RESULTS, [item]))
            assert await peer.closed_by_peer()
        finally:
            peer.close()
        await until(lambda: rt.statistics()["workers"] == 1, "only the real worker to stay")
        assert await asyncio.wait_for(rt.submit(square, 7), HANG) == 49


@UV
@pytest.mark.parametrize("column", [
    ("one", 1, P.K_THREAD, [()]),  # a rid that is not an int
    (1, 1, P.K_THREAD, ((),)),  # arguments not in a list
    (1, 1, P.K_MPI, [()]),  # a kind that has no columns
])
async def test_a_malformed_task_column_ends_the_worker_with_the_rule(
        tmp_path: Path, column: Any) -> None:
    """A scheduler that holds the token but sends a bad column: the worker names it."""
    token = tmp_path / "token"
    secret = P.new_secret()
    P.write_token_file(token, secret)
    done = asyncio.get_running_loop().create_future()

    async def scheduler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = RawPeer(reader, writer)
        try:
            payload, nonce_s = P.hello_payload()
            peer.send(P.raw_frame(P.HELLO, payload))
            kind, payload, _ = await peer.frame()
            assert kind == P.AUTH
            _slots, _pid, _name, nonce_w, _res = P.check_auth(payload, secret, nonce_s)
            peer.send(P.raw_frame(P.WELCOME, P.welcome_payload(secret, nonce_s, nonce_w, 1, 1.0)))
            peer.send(P.encode(P.TASKS, ([(1, b"")], [column], 0, 0)))
            await peer.closed_by_peer()
        finally:
            if not done.done():  # the worker may try again
                done.set_result(None)
            writer.close()

    server = await asyncio.start_server(scheduler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = start_worker(f"tcp://127.0.0.1:{port}", "--token-file", str(token))
    try:
        assert await wait_exit(proc) != 0
        await asyncio.wait_for(done, HANG)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "column of tasks" in err, err
    finally:
        stop(proc)
        server.close()
        await server.wait_closed()


@UV
async def test_checkpointed_tasks_go_in_columns_and_a_rerun_finds_them(tmp_path: Path) -> None:
    # the log needs nothing from the worker for a task without a committed
    # step: such tasks take the bulk path too, and their records are whole
    log = tmp_path / "run.wfck"
    async with async_wf.Runtime(workers=2, checkpoint=log) as rt:
        got = await async_wf.gather(*[rt.submit(square, i) for i in range(600)])
        stats = rt.statistics()
    assert got == [i * i for i in range(600)]
    assert stats["tasks_in_columns"] >= 500, stats["tasks_in_columns"]
    assert stats["checkpoint_recorded"] == 600
    async with async_wf.Runtime(workers=2, checkpoint=log) as rt:
        again = await async_wf.gather(*[rt.submit(square, i) for i in range(600)])
        stats = rt.statistics()
    assert again == got
    assert stats["reused"] == 600 and stats["tasks_in_columns"] == 0
