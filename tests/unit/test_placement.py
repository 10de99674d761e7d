"""Resources and placement on real worker processes (issue 18).

Each task records where and when it ran and what it held; the tests check
the records, never the scheduler's own bookkeeping: at no instant do the
tasks on a worker hold more than it declared, GPU ids are never shared,
resources come back after a failure, a timeout and a killed worker, and an
idle worker takes queued work from a busy one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import async_wf
from async_wf import ResourceError
from tests.tcp_helpers import start_worker, stop, until

Span = tuple[int, float, float, dict[str, float], tuple[str, ...]]


def held(seconds: float) -> Span:
    """Sleep, and say which process ran it, when, and what it held."""
    t0 = time.time()
    time.sleep(seconds)
    ctx = async_wf.task_context()
    return os.getpid(), t0, time.time(), ctx.resources, ctx.gpus


def plain(seconds: float) -> Span:
    """A task that asks for nothing: one slot, counted as one core where it runs."""
    t0 = time.time()
    time.sleep(seconds)
    return os.getpid(), t0, time.time(), {"cores": 1}, ()


def boom() -> None:
    raise ValueError("boom")


def kill_my_worker_once(flag: str) -> Span:
    # the first attempt takes its worker down with it
    if not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return held(0.01)


def peak(spans: list[Span], name: str) -> dict[int, float]:
    """The most of ``name`` held at once on each process, from the recorded spans."""
    out: dict[int, float] = {}
    events: dict[int, list[tuple[float, float]]] = {}
    for pid, t0, t1, res, _gpus in spans:
        amount = res.get(name, 0)
        if amount:
            events.setdefault(pid, []).extend([(t0, amount), (t1, -amount)])
    for pid, evs in events.items():
        # an end and a start at the same instant: the end first
        evs.sort(key=lambda e: (e[0], e[1]))
        cur = best = 0.0
        for _t, d in evs:
            cur += d
            best = max(best, cur)
        out[pid] = best
    return out


async def test_tasks_never_hold_more_than_their_worker_declared() -> None:
    async with async_wf.Runtime(workers=2, worker_resources={"cores": 4}) as rt:
        futs = []
        for i in range(36):
            cores = (1, 2, 4)[i % 3]
            futs.append(rt.options(cores=cores).submit(held, 0.03 + 0.01 * (i % 4)))
            if i % 4 == 0:
                futs.append(rt.submit(plain, 0.02))  # slot tasks count as a core each
        spans = await async_wf.gather(*futs)
    peaks = peak(spans, "cores")
    assert len(peaks) == 2, "both workers ran tasks"
    assert max(peaks.values()) <= 4, peaks
    # and the packing is not trivially serial: 4-core tasks aside, work overlapped
    assert max(peaks.values()) >= 2, peaks


async def test_named_resources_bound_concurrency_across_workers() -> None:
    async with async_wf.Runtime(workers=2, worker_resources={"resources": {"licence": 1}}) as rt:
        spans = await async_wf.gather(
            *[rt.options(resources={"licence": 1}).submit(held, 0.05) for _ in range(6)])
    assert all(v == 1 for v in peak(spans, "licence").values())
    assert len({s[0] for s in spans}) == 2


async def test_each_gpu_task_sees_its_own_devices() -> None:
    gpus = ["fake0", "fake1", "fake2"]
    async with async_wf.Runtime(workers=1, slots=3,
                                worker_resources={"cores": 3, "gpus": gpus}) as rt:
        spans = await async_wf.gather(
            *[rt.options(gpus=1 + i % 2).submit(held, 0.05) for i in range(8)])

        @async_wf.task(binary="sh", args=["-c", "echo $CUDA_VISIBLE_DEVICES "
                                          "$ROCR_VISIBLE_DEVICES $HIP_VISIBLE_DEVICES "
                                          "$OMP_NUM_THREADS"], gpus=2, cores=2)
        def show() -> None: ...

        out = (await show()).stdout.split()
    for _pid, _t0, _t1, res, ids in spans:
        assert len(ids) == res["gpus"] and set(ids) <= set(gpus)
    # no two tasks that overlapped in time shared a device
    for a in spans:
        for b in spans:
            if a is not b and a[1] < b[2] and b[1] < a[2]:
                assert not set(a[4]) & set(b[4]), (a, b)
    assert len(set(out[:3])) == 1 and len(out[0].split(",")) == 2, out
    assert set(out[0].split(",")) <= set(gpus) and out[3] == "2"


@pytest.mark.parametrize("workers", [0, 2])
async def test_a_request_no_worker_can_meet_fails_at_once(workers: int) -> None:
    opts: dict[str, Any] = {"workers": workers} if workers else {}
    async with async_wf.Runtime(**opts) as rt:
        t0 = time.monotonic()
        with pytest.raises(ResourceError) as err:
            await rt.options(cores=512, name="huge").submit(held, 0)
        assert time.monotonic() - t0 < 5
        msg = str(err.value)
        assert "'huge'" in msg and "cores=512" in msg and "cores=" in msg.split("cores=512")[1]
        # the runtime goes on: a request that fits still runs
        assert (await rt.options(cores=1).submit(held, 0))[3] == {"cores": 1}


async def test_an_idle_worker_takes_queued_work_from_a_busy_one() -> None:
    async with async_wf.Runtime(workers=2, slots=1) as rt:
        long = rt.submit(plain, 1.5)
        await asyncio.sleep(0.2)  # it runs, on one of the two workers
        shorts = [rt.submit(plain, 0.02) for _ in range(40)]
        spans = await async_wf.gather(long, *shorts)
    long_end = spans[0][2]
    late = [s for s in spans[1:] if s[2] > long_end]
    # prefetch sends about half of the short tasks behind the long one; without
    # stealing they would end after it
    assert not late, f"{len(late)} short tasks waited behind the long one"
    assert rt.statistics().get("tasks_stolen", 0) > 0


async def test_resources_come_back_after_failure_timeout_and_a_killed_worker(
        tmp_path: os.PathLike[str]) -> None:
    async with async_wf.Runtime(workers=1, worker_resources={"cores": 2}) as rt:
        whole = rt.options(cores=2)
        with pytest.raises(ValueError, match="boom"):
            await whole.submit(boom)
        assert (await whole.submit(held, 0))[3] == {"cores": 2}
        # a timed-out blocking task runs on in its thread: its cores stay taken
        # until it ends, so the next whole-worker task starts only after it
        t0 = time.time()
        with pytest.raises(async_wf.TaskTimeoutError):
            await rt.options(cores=2, timeout=0.2).submit(held, 1.0)
        after = await whole.submit(held, 0)
        assert after[1] >= t0 + 0.95, after[1] - t0
        # the worker dies under a task: the replacement runs it, with its cores
        flag = os.path.join(tmp_path, "killed")
        span = await whole.submit(kill_my_worker_once, flag)
        assert os.path.exists(flag) and span[3] == {"cores": 2}
        assert (await whole.submit(held, 0))[3] == {"cores": 2}
        assert rt.statistics()["workers_lost"] == 1


async def test_external_workers_declare_on_the_command_line(tmp_path: Any) -> None:
    token = os.path.join(tmp_path, "token")
    async with async_wf.Runtime(listen="tcp://127.0.0.1:0", no_worker_timeout=5,
                                token_file=token) as rt:
        w = start_worker(rt.transport.address,  # type: ignore[attr-defined]
                         "--token-file", token, "--cores", "3", "--memory", "1GiB",
                         "--gpus", "x,y", "--resources", "licence=2")
        try:
            await until(lambda: rt.statistics()["workers"] == 1, "the worker joins")
            span = await rt.options(cores=3, memory="1GiB", gpus=2,
                                    resources={"licence": 2}).submit(held, 0)
            assert span[3] == {"cores": 3, "memory": 1 << 30, "gpus": 2, "licence": 2}
            assert sorted(span[4]) == ["x", "y"]
            declared = rt.statistics()["worker_resources"]
            assert list(declared.values()) == ["cores=3, memory=1 GiB, gpus=2, licence=2"]
            # more than this worker has, while others may still connect: it waits
            # no_worker_timeout for one, then fails naming the largest
            t0 = time.monotonic()
            with pytest.raises(ResourceError, match="gpus=4"):
                await rt.options(gpus=4).submit(held, 0)
            assert 4 < time.monotonic() - t0 < 15
        finally:
            stop(w)


def test_bad_worker_declarations_are_usage_errors() -> None:
    for flags, rule in ((["--memory", "lots"], "memory"), (["--cores", "0"], "cores"),
                        (["--resources", "licence"], "licence")):
        r = subprocess.run([sys.executable, "-m", "async_wf.worker", "--connect",
                            "tcp://127.0.0.1:9", *flags], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0
        assert rule in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_options_check_requests() -> None:
    with pytest.raises(ValueError, match="cores"):
        async_wf.task(cores=0)(held)
    with pytest.raises(ValueError, match="inline"):
        async_wf.task(cores=1, inline=True)(held)
    with pytest.raises(ValueError, match="pin"):
        async_wf.task(pin=True)(held)
    t = async_wf.task(held).options(cores=2, memory="2GiB", gpus=1, resources={"fpga": 1})
    req = t.task_options.request
    assert req is not None and req.describe() == "cores=2, memory=2 GiB, gpus=1, fpga=1"


async def test_priority_holds_in_a_workers_own_queue() -> None:
    # with the default prefetch, 60 tasks are sent ahead to the one worker;
    # an urgent call sent after them starts at the head of its queue
    async with async_wf.Runtime(workers=1, slots=1) as rt:
        queued = [rt.submit(plain, 0.02) for _ in range(60)]
        await asyncio.sleep(0.1)
        urgent = await rt.options(priority=10).submit(plain, 0)
        ends = sorted(s[2] for s in await async_wf.gather(*queued))
    assert sum(e < urgent[1] for e in ends) < 20, "the urgent call waited behind the queue"


async def test_cancelling_a_waiting_big_task_frees_the_worker_kept_for_it() -> None:
    # one worker of 2 cores, kept free for a 2-core task that waits behind a
    # plain one; once that task is cancelled, plain tasks run there again
    async with async_wf.Runtime(workers=1, worker_resources={"cores": 2}) as rt:
        first = rt.submit(plain, 0.3)
        await asyncio.sleep(0.1)
        big = rt.options(cores=2, priority=5).submit(held, 0.1)
        gate = rt.options(cores=2).submit(held, 5)  # waits behind big
        await asyncio.sleep(0.05)
        gate.cancel()
        await first
        await big
        assert (await asyncio.wait_for(rt.submit(plain, 0), 10))[3] == {"cores": 1}


def affinity() -> tuple[list[int], list[int]]:
    return sorted(os.sched_getaffinity(0)), sorted(async_wf.task_context().cpus)


async def test_pinned_tasks_run_on_their_cpus_and_let_the_thread_go() -> None:
    async with async_wf.Runtime(workers=1, worker_resources={"cores": 1}) as rt:
        mask, cpus = await rt.options(cores=1, pin=True).submit(affinity)
        assert mask == cpus and len(mask) == 1
        # the same thread, next task unpinned: the whole mask again
        after, _ = await rt.options(cores=1).submit(affinity)
        assert after == sorted(os.sched_getaffinity(0))


def my_pid() -> int:
    return os.getpid()


async def test_a_worker_about_to_end_gets_only_what_it_can_finish(tmp_path: Any) -> None:
    token = os.path.join(tmp_path, "token")
    async with async_wf.Runtime(listen="tcp://127.0.0.1:0", token_file=token) as rt:
        addr = rt.transport.address  # type: ignore[attr-defined]
        ending = start_worker(addr, "--token-file", token, "--end-time", str(time.time() + 30))
        staying = None
        try:
            await until(lambda: rt.statistics()["workers"] == 1, "the ending worker joins")
            there = await rt.options(time=1).submit(my_pid)  # it has time for this
            assert there == await rt.submit(my_pid)  # and for tasks that say nothing
            long = rt.options(time=600).submit(my_pid)
            await asyncio.sleep(1.0)
            assert not long.done(), "a 10-minute task went to a worker ending in 30 s"
            staying = start_worker(addr, "--token-file", token)
            assert await asyncio.wait_for(long, 30) != there
        finally:
            stop(ending)
            if staying is not None:
                stop(staying)
