"""Worker processes over TCP: real processes, real sockets, 127.0.0.1 only.

Each test runs on uvloop only (the loop ``async_wf.run`` picks), except a
few that also run on the stock asyncio loop because they exercise the
transports differently (plain sockets, TLS, broken peers). Waits are
bounded by ``HANG`` to turn a hang into a failure; nothing asserts on how
fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import trustme
from tcp_helpers import (
    HANG,
    Holder,
    RawPeer,
    add,
    alive,
    async_wait_for_file,
    child_pids,
    die,
    ident,
    make_lock,
    mutate,
    pid,
    pid_of,
    poison_frame,
    raise_locked,
    raise_two_arg,
    raise_value_error,
    rendezvous,
    sleep_ms,
    square,
    start_worker,
    stop,
    until,
    wait_exit,
    wait_for_file,
    worker_env,
)

import async_wf
from async_wf import NoWorkerError, RemoteError, RemoteTraceback, WorkerLostError
from async_wf import protocol as P

UV = pytest.mark.asyncio(loop_factories=["uvloop"])
BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])


@pytest.fixture(autouse=True)
def no_orphans() -> Any:
    """Whatever a test does, no worker process it started outlives it."""
    before = child_pids()
    yield
    deadline = HANG
    left = child_pids() - before
    while left and deadline > 0:
        psutil.wait_procs([psutil.Process(p) for p in left if alive(p)], timeout=0.5)
        deadline -= 0.5
        left = {p for p in child_pids() - before if alive(p)}
    assert not left, f"processes left running: {left}"


def started_pids(started: Path) -> set[int]:
    return {int(p.name.split("-")[0]) for p in started.iterdir()}


# ------------------------------------------------------------- lifecycle


@BOTH_LOOPS
async def test_workers_run_tasks_in_their_own_processes() -> None:
    before = child_pids()  # other tests' helpers may still be winding down
    async with async_wf.Runtime(workers=2) as rt:
        workers = child_pids() - before
        assert len(workers) == 2
        pids = await async_wf.gather(*(rt.submit(pid) for _ in range(20)))
        assert os.getpid() not in pids
        assert set(pids) == workers  # both workers took tasks

        # dependencies across workers: a diamond and a chain
        a = rt.submit(square, 3)
        b = rt.submit(pid_of, a)
        c = rt.submit(pid_of, a)
        d = rt.submit(add, rt.submit(ident, 1), rt.submit(square, a))
        chain = rt.submit(ident, 0)
        for _ in range(10):
            chain = rt.submit(add, chain, 1)
        (vb, pb), (vc, pc) = await b, await c
        assert (vb, vc) == (9, 9)
        assert pb in workers and pc in workers
        assert await d == 82
        assert await chain == 10

        # lambdas and closures travel by value
        k = 10

        def make_adder(n: int) -> Any:
            return lambda x: x + n + k

        assert await rt.submit(lambda x: x * k, 4) == 40
        assert await rt.submit(make_adder(5), 1) == 16

        stats = rt.statistics()
        assert stats["workers"] == 2
        assert stats["workers_lost"] == 0
        assert stats["connections_rejected"] == 0
        assert stats["bytes_sent"] > 0 and stats["bytes_received"] > 0
    assert not child_pids() & workers, "workers outlived the runtime"


@UV
async def test_workers_stop_when_the_body_raises() -> None:
    before = child_pids()
    with pytest.raises(KeyError):
        async with async_wf.Runtime(workers=2) as rt:
            workers = child_pids() - before
            assert len(workers) == 2
            assert await rt.submit(square, 4) == 16
            rt.submit(time.sleep, 5)  # still running on exit
            raise KeyError("boom")
    await until(lambda: not any(alive(p) for p in workers), "workers to exit")


APP = textwrap.dedent(
    """
    import asyncio, os, sys, time
    import async_wf

    def double(x):  # a function of __main__: travels by value
        return 2 * x

    async def adouble(x):
        await asyncio.sleep(0)
        return 2 * x

    def make_adder(n):
        def adder(x):
            return x + n
        return adder

    async def block(path, i):
        # async: a running blocking task cannot be cancelled, so Ctrl-C would
        # wait for it (TaskFuture.cancel returns False for those)
        open(f"{path}-started-{i}", "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def main(go):
        async with async_wf.Runtime(workers=2) as rt:
            k = 10
            values = await async_wf.gather(
                rt.submit(double, 21),
                rt.submit(adouble, 4),
                rt.submit(lambda y: y + k, 1),
                rt.submit(make_adder(3), 4),
                rt.submit(os.getpid),
            )
            print("RESULTS", *values[:4], flush=True)
            print("MAIN", os.getpid() != values[4], flush=True)
            if go:
                print("READY", flush=True)
                await async_wf.gather(rt.submit(block, go, 1), rt.submit(block, go, 2))

    async_wf.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
    """
)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_app(tmp_path: Path, *args: str, **kw: Any) -> subprocess.Popen[str]:
    script = tmp_path / "app.py"
    script.write_text(APP)
    return subprocess.Popen(
        [sys.executable, str(script), *args], env=worker_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kw,
    )


def test_main_functions_lambdas_and_closures(tmp_path: Path) -> None:
    app = run_app(tmp_path)
    out, err = app.communicate(timeout=HANG * 2)
    assert app.returncode == 0, err
    assert "RESULTS 42 8 11 7" in out
    assert "MAIN True" in out


@pytest.mark.parametrize("how", ["sigkill", "sigint", "ctrl-c"])
def test_workers_die_with_their_application(tmp_path: Path, how: str) -> None:
    """SIGKILL of the application, SIGINT to it, or Ctrl-C (SIGINT to its whole
    process group) while tasks run: its workers are gone a few seconds later."""
    # SIGINT as an interactive shell leaves it: a test run started in the
    # background of a non-interactive shell inherits SIGINT ignored, and an
    # application that ignores SIGINT rightly keeps ignoring it
    app = run_app(tmp_path, str(tmp_path / "never"), start_new_session=True,
                  preexec_fn=_default_sigint)
    try:
        assert app.stdout is not None
        for line in app.stdout:
            if line.startswith("READY"):
                break
        else:
            pytest.fail(f"the app did not start: {app.communicate()[1]}")
        # signal once both tasks run on the workers: a signal that lands while
        # a task is being dispatched can be lost (see the report: TaskFuture.cancel
        # returns False for a task in transit, and asyncio.Runner then drops it)
        deadline = time.monotonic() + HANG
        while not all((tmp_path / f"never-started-{i}").exists() for i in (1, 2)):
            assert time.monotonic() < deadline, "the blocking tasks did not start"
            time.sleep(0.01)
        workers = {c.pid for c in psutil.Process(app.pid).children()}
        assert len(workers) == 2
        if how == "sigkill":
            app.kill()
        elif how == "sigint":
            app.send_signal(signal.SIGINT)
        else:
            os.killpg(app.pid, signal.SIGINT)
        app.wait(HANG)
        if how != "sigkill":
            assert app.returncode != 0  # KeyboardInterrupt
        _, left = psutil.wait_procs([psutil.Process(p) for p in workers if alive(p)], HANG)
        assert not [p for p in left if alive(p.pid)], "workers outlived their application"
    finally:
        if app.poll() is None:
            app.kill()
        app.communicate()


# --------------------------------------------------------- external workers


@UV
async def test_external_workers_join_and_leave(tmp_path: Path) -> None:
    token = tmp_path / "token"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with async_wf.Runtime(listen="tcp://127.0.0.1:0", token_file=token,
                                    prefetch=1) as rt:
            assert token.exists() and os.stat(token).st_mode & 0o777 == 0o600
            addr = rt.transport.address  # type: ignore[attr-defined]
            assert not addr.endswith(":0")
            early = rt.submit(pid_of, "early")  # no worker yet: it waits for one
            procs.append(start_worker(addr, "--token-file", str(token), "--slots", "2"))
            value, w1 = await asyncio.wait_for(early, HANG)
            assert value == "early" and w1 == procs[0].pid
            assert rt.statistics()["workers"] == 1

            # tasks with large arguments wait in the backlog: the next worker is
            # given one right after its WELCOME, in the same read
            big = b"x" * 200_000
            blocked = [rt.submit(time.sleep, 0.3) for _ in range(2)]
            sized = [rt.submit(len, big) for _ in range(6)]
            procs.append(start_worker(addr, "--token-file", str(token), cli=True))
            assert await asyncio.wait_for(async_wf.gather(*sized), HANG) == [len(big)] * 6
            await async_wf.gather(*blocked)
            await until(lambda: rt.statistics()["workers"] == 2, "the CLI worker to join")
            assert rt.statistics()["workers_lost"] == 0

            # the first worker leaves (killed): work goes on on the second
            before = rt.statistics()
            procs[0].terminate()
            await until(lambda: rt.statistics()["workers_lost"] == 1, "the loss to be seen")
            after = rt.statistics()
            # what the lost connection moved still counts
            assert after["bytes_sent"] >= before["bytes_sent"] > 6 * len(big)
            assert after["bytes_received"] >= before["bytes_received"] > 0
            results = await async_wf.gather(*(rt.submit(pid_of, i) for i in range(10)))
            assert results == [(i, procs[1].pid) for i in range(10)]
            stats = rt.statistics()
            assert stats["workers"] == 1
            assert stats["connections_rejected"] == 0
        # SHUTDOWN on exit: the remaining external worker exits cleanly
        assert await wait_exit(procs[1]) == 0
    finally:
        for p in procs:
            stop(p)


@UV
async def test_thousand_coroutines_in_flight_on_one_slot() -> None:
    n = 1000
    arrived: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the worker says how many coroutines wait, all at once, before any ends
        arrived.set_result(int(await reader.readline()))
        writer.write(b"go\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with async_wf.Runtime(workers=1, slots=1) as rt:
            futs = [rt.submit(rendezvous, port, n, i) for i in range(n)]
            assert await asyncio.wait_for(arrived, HANG) == n
            results = await asyncio.wait_for(async_wf.gather(*futs), HANG)
            assert [i for i, _ in results] == list(range(n))
            assert len({p for _, p in results}) == 1
    finally:
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------ faults


@UV
async def test_killed_worker_tasks_run_elsewhere(tmp_path: Path) -> None:
    go, started = tmp_path / "go", tmp_path / "started"
    started.mkdir()
    async with async_wf.Runtime(workers=2, slots=2) as rt:
        futs = [rt.submit(wait_for_file, str(go), str(started), i) for i in range(12)]
        await until(lambda: len(started_pids(started)) == 2, "both workers to start tasks")
        victim = next(iter(started_pids(started)))
        os.kill(victim, signal.SIGKILL)
        await until(lambda: rt.statistics()["workers_lost"] == 1, "the loss to be seen")
        go.touch()
        results = await asyncio.wait_for(async_wf.gather(*futs), HANG)
        assert [v for v, _ in results] == [i * i for i in range(12)]
        assert victim not in {p for _, p in results}
        stats = rt.statistics()
        assert stats["retried"] == 0 and stats["failed"] == 0  # retries=0 was enough
        assert stats["workers_lost"] == 1  # (a replacement is being started meanwhile)


@UV
async def test_no_worker_left_fails_pending_tasks(tmp_path: Path) -> None:
    # a worker started by hand: spawned ones would be replaced
    go, started, token = tmp_path / "go", tmp_path / "started", tmp_path / "token"
    started.mkdir()
    async with async_wf.Runtime(listen="tcp://127.0.0.1:0", token_file=token,
                                no_worker_timeout=1.5, heartbeat=0.25) as rt:
        proc = start_worker(rt.transport.address,  # type: ignore[attr-defined]
                            "--token-file", str(token))
        futs = [rt.submit(wait_for_file, str(go), str(started), i) for i in range(3)]
        dependent = rt.submit(add, futs[0], 1)
        await until(lambda: started_pids(started), "a task to start")
        os.kill(proc.pid, signal.SIGKILL)
        stop(proc)
        for f in futs:
            with pytest.raises(NoWorkerError, match="no worker connected"):
                await asyncio.wait_for(f, HANG)
        with pytest.raises(async_wf.DependencyError):
            await dependent
        assert rt.statistics()["workers"] == 0
        # a task submitted now waits for a worker again, and fails the same way
        with pytest.raises(NoWorkerError):
            await asyncio.wait_for(rt.submit(square, 2), HANG)


@UV
async def test_missed_heartbeats_drop_a_stopped_worker(tmp_path: Path) -> None:
    go, started = tmp_path / "go", tmp_path / "started"
    started.mkdir()
    async with async_wf.Runtime(workers=2, slots=2, heartbeat=0.2,
                                heartbeat_timeout=1.0) as rt:
        futs = [rt.submit(wait_for_file, str(go), str(started), i) for i in range(8)]
        await until(lambda: len(started_pids(started)) == 2, "both workers to start tasks")
        victim = next(iter(started_pids(started)))
        os.kill(victim, signal.SIGSTOP)
        try:
            go.touch()
            results = await asyncio.wait_for(async_wf.gather(*futs), HANG)
            assert [v for v, _ in results] == [i * i for i in range(8)]
            assert victim not in {p for _, p in results}
            assert rt.statistics()["workers_lost"] == 1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        # a spawned worker that was dropped is killed and replaced
        await until(lambda: not alive(victim), "the stopped worker to be gone")
        await until(lambda: rt.statistics()["workers"] == 2, "its replacement to join")


@UV
async def test_cancelled_task_is_not_rerun_when_its_worker_is_lost(tmp_path: Path) -> None:
    """A cancellation that was accepted stays a cancellation if the worker is
    then lost before confirming it (else Ctrl-C would wait for a rerun)."""
    go, started = tmp_path / "go", tmp_path / "started"
    started.mkdir()
    async with async_wf.Runtime(workers=2) as rt:
        fut = rt.submit(async_wait_for_file, str(go), str(started), 1)
        await until(lambda: started_pids(started), "the task to start")
        victim = next(iter(started_pids(started)))
        os.kill(victim, signal.SIGSTOP)  # it cannot confirm the cancellation
        try:
            assert fut.cancel()
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(fut, HANG)
        finally:
            if alive(victim):
                os.kill(victim, signal.SIGCONT)
        assert len(started_pids(started)) == 1  # it was not run again elsewhere
        assert await rt.submit(square, 3) == 9


@UV
async def test_task_that_kills_its_worker_fails_after_max_lost() -> None:
    async with async_wf.Runtime(workers=3, max_lost=2) as rt:
        with pytest.raises(WorkerLostError, match="lost"):
            await asyncio.wait_for(rt.submit(die), HANG)
        stats = rt.statistics()
        assert stats["workers_lost"] == 2 and stats["workers"] == 1
        assert await rt.submit(square, 5) == 25  # the last worker carries on


# --------------------------------------------------------------- bad input

BAD_INPUTS = [
    "random-bytes",
    "truncated-frame",
    "oversized-header",
    "auth-then-bad-magic",
    "auth-then-bad-pickle",
    "auth-then-wrong-shape",
    "auth-then-unexpected-kind",
    "auth-then-oversized",
]


@BOTH_LOOPS
@pytest.mark.parametrize("case", BAD_INPUTS)
async def test_bad_connection_is_closed_and_the_rest_goes_on(case: str) -> None:
    async with async_wf.Runtime(workers=1, max_frame=1 << 20) as rt:
        t = rt.transport
        peer = await RawPeer.connect(t.address)  # type: ignore[attr-defined]
        try:
            if case == "random-bytes":
                peer.send(b"\0\0" + os.urandom(3000))
            elif case == "truncated-frame":
                peer.send(P.HEADER.pack(P.MAGIC, P.AUTH, 0, 0, 100) + b"x" * 10)
                await peer.writer.drain()
                peer.close()
            elif case == "oversized-header":
                peer.send(P.HEADER.pack(P.MAGIC, P.AUTH, 0, 0, 1 << 40))
            else:
                await peer.handshake(t.secret)  # type: ignore[attr-defined]
                await until(lambda: rt.statistics()["workers"] == 2, "the raw peer to join")
                if case == "auth-then-bad-magic":
                    peer.send(b"XX" + os.urandom(200))
                elif case == "auth-then-bad-pickle":
                    peer.send(P.frame(P.RESULTS, [b"", b"\x80\x05not a pickle"]))
                elif case == "auth-then-wrong-shape":
                    peer.send(P.encode(P.RESULTS, 42))
                elif case == "auth-then-unexpected-kind":
                    peer.send(P.raw_frame(P.HELLO, b"x" * 34))
                else:
                    peer.send(P.HEADER.pack(P.MAGIC, P.RESULTS, 0, 0, (1 << 20) + 1))
            if case != "truncated-frame":
                assert await peer.closed_by_peer()
        finally:
            peer.close()
        await until(lambda: rt.statistics()["workers"] == 1, "only the real worker to stay")
        assert await asyncio.wait_for(rt.submit(square, 7), HANG) == 49
        stats = rt.statistics()
        if case.startswith("auth-then"):
            assert stats["workers_lost"] == 1
            assert stats["connections_rejected"] == 0
        else:
            assert stats["workers_lost"] == 0
            assert stats["connections_rejected"] == (0 if case == "truncated-frame" else 1)


@pytest.mark.slow
@UV
async def test_silent_connection_is_dropped_after_the_handshake_timeout() -> None:
    async with async_wf.Runtime(workers=1) as rt:
        peer = await RawPeer.connect(rt.transport.address)  # type: ignore[attr-defined]
        try:
            kind, _, _ = await peer.frame()
            assert kind == P.HELLO  # and then we say nothing
            assert await peer.closed_by_peer()
        finally:
            peer.close()
        await until(lambda: rt.statistics()["connections_rejected"] == 1, "the rejection")
        assert await rt.submit(square, 2) == 4


@BOTH_LOOPS
async def test_wrong_token_is_rejected(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    P.write_token_file(wrong, P.new_secret())
    async with async_wf.Runtime(workers=1) as rt:
        proc = start_worker(rt.transport.address, "--token-file", str(wrong))  # type: ignore[attr-defined]
        try:
            assert await wait_exit(proc) != 0
        finally:
            stop(proc)
        await until(lambda: rt.statistics()["connections_rejected"] == 1, "the rejection")
        assert await rt.submit(square, 6) == 36
        stats = rt.statistics()
        assert stats["workers"] == 1 and stats["workers_lost"] == 0


FAKES = ["forged-welcome-then-tasks", "tasks-instead-of-hello", "tasks-instead-of-welcome",
         "oversized-before-welcome"]


@UV
@pytest.mark.parametrize("case", FAKES)
async def test_worker_unpickles_nothing_from_a_fake_scheduler(tmp_path: Path, case: str) -> None:
    """A listener that does not know the token cannot make a worker unpickle."""
    poison = tmp_path / "unpickled"
    token = tmp_path / "token"
    P.write_token_file(token, P.new_secret())
    done = asyncio.get_running_loop().create_future()

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = RawPeer(reader, writer)
        try:
            if case == "tasks-instead-of-hello":
                peer.send(poison_frame(P.TASKS, str(poison)))
            else:
                payload, _ = P.hello_payload()
                peer.send(P.raw_frame(P.HELLO, payload))
                kind, _, _ = await peer.frame()
                assert kind == P.AUTH
                if case == "forged-welcome-then-tasks":
                    forged = P._WELCOME.pack(os.urandom(32), 1, 1.0, 0)
                    # one write: the TASKS frame arrives with the WELCOME
                    peer.send(P.raw_frame(P.WELCOME, forged) + poison_frame(P.TASKS, str(poison)))
                elif case == "tasks-instead-of-welcome":
                    peer.send(poison_frame(P.TASKS, str(poison)))
                else:
                    peer.send(P.encode(P.TASKS, b"x" * 10_000))
            await peer.closed_by_peer()
        finally:
            done.set_result(None)
            writer.close()

    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = start_worker(f"tcp://127.0.0.1:{port}", "--token-file", str(token))
    try:
        assert await wait_exit(proc) != 0
        await asyncio.wait_for(done, HANG)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "HMAC" in err or "expected" in err or "exceeds" in err, err
    finally:
        stop(proc)
        server.close()
        await server.wait_closed()
    assert not poison.exists(), "the worker unpickled bytes from an unauthenticated peer"


# ---------------------------------------------------------- serialisation


class Unpicklable:
    def __init__(self) -> None:
        self.lock = threading.Lock()


@UV
async def test_pickling_failures_fail_only_their_task() -> None:
    async with async_wf.Runtime(workers=1) as rt:
        # an unpicklable result: the pickling error's own type (TypeError here)
        with pytest.raises(TypeError, match="result could not be pickled") as ti:
            await rt.submit(make_lock)
        assert isinstance(ti.value.__cause__, RemoteTraceback)

        # an exception that cannot be pickled, one that cannot be unpickled
        with pytest.raises(RemoteError, match="LockedError") as ei:
            await rt.submit(raise_locked)
        assert isinstance(ei.value.__cause__, RemoteTraceback)
        assert "raise_locked" in ei.value.__cause__.tb
        with pytest.raises(RemoteError, match="TwoArgError") as ei:
            await rt.submit(raise_two_arg)
        assert "raise_two_arg" in ei.value.__cause__.tb  # type: ignore[union-attr]

        # an ordinary exception keeps its type, the worker's traceback as cause
        with pytest.raises(ValueError, match="plain") as vi:
            await rt.submit(raise_value_error, "plain")
        assert isinstance(vi.value.__cause__, RemoteTraceback)
        assert "raise_value_error" in str(vi.value.__cause__)

        # an unpicklable argument fails that task alone, in a batch of good ones
        good = [rt.submit(square, i) for i in range(5)]
        bad = rt.submit(ident, Unpicklable())
        more = [rt.submit(square, i) for i in range(5, 8)]
        with pytest.raises(TypeError, match="could not be pickled"):
            await bad
        assert await async_wf.gather(*good, *more) == [i * i for i in range(8)]
        # a fresh function whose first task had a bad argument still works after
        fresh = rt.submit(pid_of, Unpicklable())
        with pytest.raises(TypeError, match="could not be pickled"):
            await fresh
        assert (await rt.submit(pid_of, 1))[0] == 1

        # a function that cannot be pickled
        lock = threading.Lock()
        with pytest.raises(TypeError, match="could not be pickled"):
            await asyncio.wait_for(rt.submit(lambda: lock), HANG)

        # nothing of this cost the worker its connection
        stats = rt.statistics()
        assert stats["workers"] == 1 and stats["workers_lost"] == 0


@UV
@pytest.mark.parametrize("compress_min", [1024, 0])
async def test_numpy_arrays_arrive_intact(compress_min: int) -> None:
    rng = np.random.default_rng(7)
    arrays = {
        "zeros": np.zeros(1 << 19, dtype=np.float64),  # 4 MiB, compressible
        "noise": rng.integers(0, 256, 1 << 21, dtype=np.uint8),  # 2 MiB, not
        "floats": rng.random(5000).astype(np.float32),
        "ints": np.arange(-500, 500, dtype=np.int64).reshape(10, 100),
        "strided": np.arange(1000, dtype=np.int32)[::3],
        "fortran": np.asfortranarray(rng.random((30, 20))),
        "empty": np.empty(0, dtype=np.complex128),
        "structured": np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
    }
    async with async_wf.Runtime(workers=1, compress_min=compress_min) as rt:
        back = await rt.submit(ident, arrays)
        assert back.keys() == arrays.keys()
        for name, arr in arrays.items():
            assert back[name].dtype == arr.dtype, name
            assert back[name].shape == arr.shape, name
            np.testing.assert_array_equal(back[name], arr, err_msg=name)
        # arrays received on the worker are writable, compressed or not
        for name in ("zeros", "noise", "ints"):
            out = await rt.submit(mutate, arrays[name])
            np.testing.assert_array_equal(out, arrays[name] + 1, err_msg=name)
        sent = rt.statistics()["bytes_sent"]
        if compress_min:
            # the zeros were compressed both ways; the noise could not be
            assert sent < 3 * arrays["noise"].nbytes + arrays["zeros"].nbytes
        else:
            assert sent > 2 * arrays["zeros"].nbytes + 2 * arrays["noise"].nbytes


# ----------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ctx, str(ca_file)


@BOTH_LOOPS
async def test_tls(tls: tuple[ssl.SSLContext, str], tmp_path: Path) -> None:
    ctx, ca_file = tls
    token = tmp_path / "token"
    async with async_wf.Runtime(workers=1, ssl=ctx, tls_ca=ca_file, token_file=token) as rt:
        assert await rt.submit(square, 9) == 81
        big = np.arange(300_000, dtype=np.int64)
        np.testing.assert_array_equal(await rt.submit(ident, big), big)
        addr = rt.transport.address  # type: ignore[attr-defined]
        # a plain worker cannot join a TLS runtime ...
        plain = start_worker(addr, "--token-file", str(token))
        # ... while a TLS worker with the CA can
        good = start_worker(addr, "--token-file", str(token), "--tls-ca", ca_file)
        try:
            await until(lambda: rt.statistics()["workers"] == 2, "the TLS worker to join")
            await asyncio.sleep(1.0)  # the plain one had as long; it never joins
            assert rt.statistics()["workers"] == 2
            assert plain.poll() is None or plain.returncode != 0
        finally:
            stop(plain)
        assert await rt.submit(square, 3) == 9
    try:
        assert await wait_exit(good) == 0
    finally:
        stop(good)


@pytest.mark.slow
@UV
async def test_plain_worker_gives_up_on_a_tls_runtime(
    tls: tuple[ssl.SSLContext, str], tmp_path: Path
) -> None:
    ctx, _ = tls
    token = tmp_path / "token"
    async with async_wf.Runtime(ssl=ctx, token_file=token) as rt:
        plain = start_worker(rt.transport.address, "--token-file", str(token))  # type: ignore[attr-defined]
        try:
            # no HELLO ever comes in clear text: it exits after its silence limit
            assert await wait_exit(plain, 30) != 0
        finally:
            stop(plain)
        assert rt.statistics()["workers"] == 0


@UV
async def test_a_long_call_learnt_as_quick_does_not_lose_a_tls_worker(
    tls: tuple[ssl.SSLContext, str], tmp_path: Path
) -> None:
    # heartbeat 0.2 s: 2 s of silence drops the worker, and over TLS nothing
    # but the loop itself can send a heartbeat
    ctx, ca_file = tls
    async with async_wf.Runtime(workers=1, slots=1, ssl=ctx, tls_ca=ca_file,
                                token_file=tmp_path / "token", heartbeat=0.2) as rt:
        for _ in range(20):  # the worker would learn that sleep_ms(0) is short
            assert await asyncio.wait_for(rt.submit(sleep_ms, 0), HANG) == 0
        assert await asyncio.wait_for(rt.submit(sleep_ms, 3000), HANG) == 3000
        assert rt.statistics()["workers_lost"] == 0


# ----------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--connect", "tcp://127.0.0.1:1", "--slots", "0"], "--slots must be >= 1"),
        (["--connect", "tcp://127.0.0.1:1"], "--token-file"),
        (["--connect", "http://nowhere", "--token-file", "x"], "tcp://host:port"),
    ],
)
def test_cli_errors(args: list[str], message: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "async_wf.cli", "worker", *args],
                       env=worker_env(), capture_output=True, text=True, timeout=HANG,
                       cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_cannot_connect(tmp_path: Path) -> None:
    token = tmp_path / "token"
    P.write_token_file(token, P.new_secret())
    with socket_closed_port() as port:
        r = subprocess.run(
            [sys.executable, "-m", "async_wf.cli", "worker", "--connect",
             f"tcp://127.0.0.1:{port}", "--token-file", str(token)],
            env=worker_env(), capture_output=True, text=True, timeout=HANG,
        )
    assert r.returncode == 2
    assert "cannot connect" in r.stderr


class socket_closed_port:
    """A port on 127.0.0.1 that nothing listens on (bound, never listened)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()


async def test_function_cache_stays_bounded_with_ever_new_lambdas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a small cache so that it is dropped several times during the run
    import async_wf.transport._remote as remote
    import async_wf.transport.tcp as tcp

    monkeypatch.setattr(remote, "_FN_CACHE_MAX", 40)
    async with async_wf.Runtime(workers=1) as rt:
        results = []
        for wave in range(5):
            futs = [rt.submit(lambda x, k=k: x * k, wave) for k in range(60)]
            results.append(await asyncio.gather(*futs))
            transport = rt.transport
            assert isinstance(transport, tcp.TcpTransport)
            assert len(transport._fn_blobs) <= 40
            assert all(len(w.fids) <= 40 for w in transport._order)
        # a function sent before a cache drop still works afterwards
        same = lambda: "still here"  # noqa: E731
        assert await rt.submit(same) == "still here"
        for k in range(100):
            await rt.submit(lambda k=k: k)
        assert await rt.submit(same) == "still here"
    assert results == [[wave * k for k in range(60)] for wave in range(5)]


async def test_a_runtime_that_fails_to_start_is_not_left_current() -> None:
    @async_wf.task
    def double(x: int) -> int:
        return 2 * x

    async with async_wf.Runtime(workers=1) as first:
        port = first.transport.address.rsplit(":", 1)[1]
        with pytest.raises(OSError):
            await async_wf.Runtime(listen=f"tcp://127.0.0.1:{port}").start()
        # the first runtime is current again: a @task call submits to it
        assert await double(21) == 42
    # outside any runtime the call just runs
    assert double(21) == 42


async def test_a_bound_method_is_sent_once_not_with_every_task() -> None:
    class Model:
        def __init__(self) -> None:
            self.weights = np.ones(1 << 17)  # 1 MiB

        def score(self, i: int) -> float:
            return float(self.weights[i])

    model = Model()
    async with async_wf.Runtime(workers=1) as rt:
        # each `model.score` is a new bound-method object
        scores = await asyncio.gather(*[rt.submit(model.score, i) for i in range(50)])
        sent = rt.statistics()["bytes_sent"]
    assert scores == [1.0] * 50
    assert sent < 5 * (1 << 20), f"{sent} bytes sent: the model went out more than once"


async def test_a_value_that_cannot_be_unpickled_fails_its_task_alone() -> None:
    from tcp_helpers import Unloadable, echo, make_unloadable

    async with async_wf.Runtime(workers=1) as rt:
        # one frame each way holds good tasks and the bad one
        futs = [rt.submit(echo, i) for i in range(5)]
        bad_result = rt.submit(make_unloadable)
        bad_arg = rt.submit(echo, Unloadable())
        futs += [rt.submit(echo, i) for i in range(5, 10)]
        assert await asyncio.gather(*futs) == list(range(10))
        with pytest.raises(async_wf.RemoteError,
                           match="result of task 'make_unloadable' could not be unpickled here"):
            await bad_result
        with pytest.raises(async_wf.RemoteError,
                           match="arguments of the task could not be loaded on worker"):
            await bad_arg
        # the worker was not lost: it still runs tasks
        assert await rt.submit(echo, "still there") == "still there"
        stats = rt.statistics()
    assert stats["workers_lost"] == 0


async def test_sys_exit_in_an_async_task_fails_the_task_not_the_worker() -> None:
    from tcp_helpers import echo, exits_async

    async with async_wf.Runtime(workers=1) as rt:
        with pytest.raises(SystemExit):
            await rt.submit(exits_async)
        assert await rt.submit(echo, "alive") == "alive"
        assert rt.statistics()["workers_lost"] == 0


MAIN_VALUES_TCP = """
import dataclasses, sys
import async_wf

@dataclasses.dataclass
class Point:
    x: int

def get_x(p):
    return p.x

def scale(p, by):
    return by(p.x)

def triple(v):
    return 3 * v

async def main():
    async with async_wf.Runtime(workers=2) as rt:
        print(await rt.submit(get_x, Point(3)), await rt.submit(scale, Point(2), triple))
        back = await rt.submit(lambda: Point(5))
        print(type(back) is Point, back.x)

async_wf.run(main())
"""


def test_instances_and_functions_of_main_travel_as_arguments(tmp_path: Path) -> None:
    # issue 17.2: "RemoteError ... Can't get attribute 'Point'" on the workers
    (tmp_path / "app.py").write_text(MAIN_VALUES_TCP)
    proc = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG, env=worker_env())
    assert proc.returncode == 0, proc.stderr
    # and a result of such a class comes back as the program's own class
    assert proc.stdout.split("\n")[:2] == ["3 6", "True 5"], proc.stdout + proc.stderr


@UV
async def test_a_bound_method_does_not_keep_its_object_alive_on_the_worker(
        tmp_path: Path) -> None:
    # issue 17.5: the function cache held obj.method, and so obj, for good
    marker = tmp_path / "released"
    holder = Holder(str(marker))
    async with async_wf.Runtime(workers=1) as rt:
        assert await rt.submit(holder.value) == 7
        assert await rt.submit(square, 2) == 4  # the worker goes on to other work
        await until(marker.exists, "the worker to release the object", timeout=5)
        assert await rt.submit(holder.value) == 7  # and it can be sent again
