"""Errors that say what to do (issue 21, "errors" part): each message checked."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import async_wf


def add(a: int, b: int) -> int:
    return a + b


def slow_add(a: int, b: int) -> int:
    time.sleep(0.3)
    return a + b


async def test_a_forgotten_await_says_so() -> None:
    async with async_wf.Runtime() as rt:
        fut = rt.submit(add, 1, 2)
        for attempt in (lambda: fut + 1, lambda: 1 + fut, lambda: fut * 2, lambda: fut - 1,
                        lambda: fut / 2, lambda: fut[0], lambda: bool(fut),
                        lambda: fut < 3, lambda: len(fut)):  # type: ignore[operator,index,arg-type]
            with pytest.raises(TypeError, match=r"TaskFuture .*did you forget 'await'"):
                attempt()
        assert await fut == 3  # and await still works


@pytest.mark.core_independent
def test_unknown_runtime_option_suggests_the_closest_name() -> None:
    with pytest.raises(TypeError, match=r"Runtime\(\) got an unknown option 'worker'; "
                                        r"did you mean 'workers'\?"):
        async_wf.Runtime(worker=2)
    with pytest.raises(TypeError, match=r"unknown option 'heartbeats'; did you mean 'heartbeat'"):
        async_wf.Runtime(workers=1, heartbeats=1.0)
    with pytest.raises(TypeError, match=r"unknown option 'zzz'"):
        async_wf.Runtime(zzz=1)


@pytest.mark.core_independent
def test_exception_classes_print_as_the_package() -> None:
    for cls in (async_wf.DependencyError, async_wf.TaskTimeoutError, async_wf.WorkflowAborted,
                async_wf.RuntimeClosedError, async_wf.RemoteError, async_wf.NoWorkerError,
                async_wf.WorkerLostError, async_wf.CheckpointKeyError,
                async_wf.CheckpointError):
        assert cls.__module__ == "async_wf", cls
        assert repr(cls).startswith("<class 'async_wf."), repr(cls)


def test_run_inside_a_running_loop_suggests_await() -> None:
    async def main() -> int:
        return 1

    async def outer() -> None:
        coro = main()
        try:
            with pytest.raises(RuntimeError, match=r"use 'await main\(\)'"):
                async_wf.run(coro)
        finally:
            coro.close()

    asyncio.run(outer())


async def test_result_of_a_pending_task_says_await_on_the_loop_and_waits_elsewhere() -> None:
    async with async_wf.Runtime() as rt:
        fut = rt.submit(slow_add, 2, 3)
        with pytest.raises(asyncio.InvalidStateError, match=r"not done yet.*'await'"):
            fut.result()
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(fut.result()))
        t.start()
        assert await fut == 5
        await asyncio.to_thread(t.join, 10)
        assert got == [5]


@pytest.mark.core_independent
@pytest.mark.parametrize(("args", "env", "message"), [
    (["--token-file", "/nonexistent/token"], {},
     "async-wf worker: cannot read the token file '/nonexistent/token'"),
    (["--token-file", "BADTOKEN"], {},
     "async-wf worker: the token file 'BADTOKEN' must hold a hex token"),
    ([], {"ASYNC_WF_TOKEN": "xyz"},
     "async-wf worker: ASYNC_WF_TOKEN must hold a hex token"),
])
def test_token_problems_are_one_line(tmp_path: Path, args: list[str], env: dict[str, str],
                                     message: str) -> None:
    (tmp_path / "BADTOKEN").write_text("not hex\n")
    proc = subprocess.run([sys.executable, "-m", "async_wf", "worker", "--connect",
                           "tcp://127.0.0.1:9", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.core_independent
async def test_a_missing_program_is_named_with_the_path() -> None:
    async with async_wf.Runtime() as rt:
        t = async_wf.task(lambda: None, binary="nosuch-program-xyz")
        with pytest.raises(FileNotFoundError,
                           match=r"program 'nosuch-program-xyz' not found \(PATH="):
            await rt.submit(t)


REPL = """\
import async_wf, os
rt = await async_wf.Runtime(workers=1).start()
where = async_wf.task(lambda: os.getpid())
print("TASK", await where() != os.getpid())
print("SUBMIT", await async_wf.submit(os.getpid) != os.getpid())
await rt.close()
print("AFTER", where() == os.getpid())
"""


def test_a_runtime_started_at_the_top_level_of_a_repl_serves_later_statements() -> None:
    # python -m asyncio runs each statement in a task of its own, as a
    # notebook runs each cell: the runtime must stay current between them
    proc = subprocess.run([sys.executable, "-m", "asyncio"], input=REPL, capture_output=True,
                          text=True, timeout=120)
    out = dict(re.findall(r"(TASK|SUBMIT|AFTER) (True|False)", proc.stdout))
    assert out == {"TASK": "True", "SUBMIT": "True", "AFTER": "True"}, proc.stdout + proc.stderr


async def test_runtime_and_future_reprs_say_where_things_stand() -> None:
    rt = async_wf.Runtime(threads=2)
    assert repr(rt) == "<async_wf.Runtime local, not started>"
    async with rt:
        fut = rt.submit(slow_add, 1, 2)
        text = repr(rt)
        assert text.startswith("<async_wf.Runtime local, running: 1 submitted"), text
        html = rt._repr_html_()
        assert "<table" in html and "submitted" in html and "<progress" in html
        assert await fut == 3
        assert "1 done" in repr(rt)
        assert repr(fut) == "<TaskFuture #1 'slow_add' finished>"
        assert fut._repr_html_().count("finished") == 1
    assert repr(rt).startswith("<async_wf.Runtime local, closed: 1 submitted")


UNSEEN = """\
import asyncio, sys, traceback, async_wf

def fail():
    raise ValueError("a-failed")

def follow(x):
    return x

async def main():
    async with async_wf.Runtime() as rt:
        a = rt.submit(fail)
        b = rt.submit(follow, a)
        c = rt.submit(follow, b)
        await asyncio.wait([a, b, c])
        late = rt.submit(follow, b)
        await asyncio.wait([late])
        if {seen!r} == "nobody":
            return
        try:
            await {{"b": b, "c": c, "late": late}}[{seen!r}]
        except async_wf.DependencyError:
            traceback.print_exc()

async_wf.run(main())
"""


@pytest.mark.parametrize("seen", ["b", "c", "late", "nobody"])
def test_a_failure_is_reported_once(seen: str) -> None:
    # a's failure reached the user through a dependent's DependencyError
    # (its cause): at exit a must not print the same traceback again; a
    # failure nobody saw is still reported, once (not once per dependent)
    proc = subprocess.run([sys.executable, "-c", UNSEEN.format(seen=seen)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("ValueError: a-failed") == 1, proc.stderr
    never = proc.stderr.count("exception was never retrieved")
    assert never == (1 if seen == "nobody" else 0), proc.stderr


@pytest.mark.core_independent
@pytest.mark.parametrize("option", ["listen", "metrics"])
async def test_an_unresolvable_host_names_the_option(option: str) -> None:
    addr = "tcp://no-such-host.invalid:0"
    rt = async_wf.Runtime(workers=1, **{option: addr})
    with pytest.raises(OSError, match=rf"^{option}='tcp://no-such-host\.invalid:0': cannot "
                                      r"resolve the host 'no-such-host\.invalid'"):
        await rt.start()
    await rt.close()


@pytest.mark.core_independent
@pytest.mark.parametrize("option", ["listen", "metrics"])
@pytest.mark.parametrize("addr", ["127.0.0.1:0", "tcp://localhost:0", "tcp://[::1]:0"])
async def test_listen_and_metrics_take_the_same_addresses(option: str, addr: str) -> None:
    if "::1" in addr and not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    # listen: a worker process connects to the address the runtime gives it
    workers = {"workers": 1} if option == "listen" else {}
    async with async_wf.Runtime(**workers, **{option: addr}) as rt:
        assert await rt.submit(add, 1, 2) == 3
        if option == "metrics":
            assert rt.metrics_address is not None and rt.metrics_address[1] > 0


@pytest.mark.core_independent
@pytest.mark.parametrize("option", ["listen", "metrics"])
@pytest.mark.parametrize("addr", [":0", "tcp://:0", "9464", "tcp://host", "host:port"])
def test_listen_and_metrics_refuse_the_same_addresses(option: str, addr: str) -> None:
    with pytest.raises(ValueError, match=rf"^{option} must be 'host:port' or 'tcp://host:port'"
                                         rf".*got '{re.escape(addr)}'"):
        async_wf.Runtime(workers=1, **{option: addr})


PIPELINE = """\
import asyncio, async_wf

def fail():
    raise ValueError("a-failed")

def step(x):
    return x

async def main():
    async with async_wf.Runtime() as rt:
        x = rt.submit(fail)
        await asyncio.wait([x])
        for _ in range(3000):  # each step's input has failed: a long chain
            x = rt.submit(step, x)
        if {seen}:
            await asyncio.gather(x, return_exceptions=True)

async_wf.run(main())
"""


@pytest.mark.parametrize("seen", [True, False])
def test_a_failure_at_the_head_of_a_dropped_pipeline_is_reported_once(seen: bool) -> None:
    # the user keeps only the last future: the failed head and the steps in
    # between are dropped long before the last step is looked at
    proc = subprocess.run([sys.executable, "-c", PIPELINE.format(seen=seen)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    never = proc.stderr.count("exception was never retrieved")
    assert never == (0 if seen else 1), proc.stderr
