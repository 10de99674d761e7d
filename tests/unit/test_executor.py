"""``async_wf.Executor``: the ``concurrent.futures.Executor`` face for synchronous code."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from async_wf import DependencyError, Executor, ExecutorFuture, RuntimeClosedError, task

# module-level functions, so that ProcessPoolExecutor can pickle them


ROOT = Path(__file__).resolve().parents[2]


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def total(xs: Any) -> int:
    if isinstance(xs, dict):
        return sum(xs.values())
    return sum(xs)


def fail(msg: str) -> None:
    raise ValueError(msg)


async def asquare(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def workload(ex: cf.Executor) -> list[int]:
    """The same code for any executor: the one-line switch."""
    futs = [ex.submit(square, i) for i in range(8)]
    mapped = list(ex.map(add, range(8), range(8, 16)))
    return [f.result() for f in futs] + mapped


def test_submit_and_result() -> None:
    with Executor(max_workers=2) as ex:
        fut = ex.submit(add, 1, b=2)
        assert isinstance(fut, cf.Future)
        assert isinstance(fut, ExecutorFuture)
        assert fut.result(timeout=10) == 3
        assert fut.done()
        assert fut.exception() is None
        assert ex.submit(asquare, 7).result(timeout=10) == 49


def test_map_keeps_order() -> None:
    with Executor() as ex:
        assert list(ex.map(square, range(50), timeout=10)) == [i * i for i in range(50)]
        assert list(ex.map(add, [1, 2], [10, 20])) == [11, 22]


def test_futures_as_dependencies_also_nested() -> None:
    with Executor() as ex:
        a = ex.submit(square, 3)
        b = ex.submit(square, 4)
        c = ex.submit(add, a, b)
        d = ex.submit(total, [a, b, c])
        e = ex.submit(total, {"x": a, "y": c})
        f = ex.submit(lambda x: x, [(a, {"k": frozenset([b])})])
        assert c.result(timeout=10) == 25
        assert d.result(timeout=10) == 9 + 16 + 25
        assert e.result(timeout=10) == 34
        assert f.result(timeout=10) == [(9, {"k": frozenset([16])})]


def test_exceptions_propagate_and_dependents_fail() -> None:
    with Executor() as ex:
        bad = ex.submit(fail, "nope")
        dep = ex.submit(add, bad, 1)
        with pytest.raises(ValueError, match="nope"):
            bad.result(timeout=10)
        assert isinstance(bad.exception(timeout=10), ValueError)
        with pytest.raises(DependencyError, match="upstream task 'fail' failed"):
            dep.result(timeout=10)


def test_task_options_apply_through_the_executor() -> None:
    calls = []
    lock = threading.Lock()

    def flaky() -> int:
        with lock:
            calls.append(1)
            n = len(calls)
        if n < 3:
            raise ValueError("again")
        return n

    with Executor() as ex:
        assert ex.submit(task(flaky, retries=2)).result(timeout=10) == 3


def test_cannot_submit_after_shutdown() -> None:
    ex = Executor()
    assert ex.submit(square, 2).result(timeout=10) == 4
    ex.shutdown()
    with pytest.raises(RuntimeError, match="cannot submit after shutdown"):
        ex.submit(square, 2)
    with pytest.raises(RuntimeClosedError):
        ex.submit(square, 2)
    ex.shutdown()  # a second shutdown is harmless


def test_shutdown_waits_for_running_tasks() -> None:
    release = threading.Event()
    started = threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "done"

    ex = Executor(max_workers=1)
    fut = ex.submit(slow)
    dep = ex.submit(add, fut, "!")
    assert started.wait(10)
    threading.Timer(0.01, release.set).start()
    ex.shutdown(wait=True)
    assert fut.result(timeout=0) == "done"
    assert dep.result(timeout=0) == "done!"


def test_shutdown_cancel_futures_cancels_what_has_not_started() -> None:
    release = threading.Event()
    started = threading.Event()
    ran: list[int] = []

    def blocker() -> str:
        started.set()
        release.wait(10)
        return "blocker"

    def record(i: int, *deps: Any) -> int:
        ran.append(i)
        return i

    ex = Executor(max_workers=1)
    hold = ex.submit(blocker)
    assert started.wait(10)
    waiting = [ex.submit(record, i, hold) for i in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    release.set()
    ex.shutdown(wait=True)
    assert hold.result(timeout=0) == "blocker"
    for fut in waiting:
        assert fut.done()
        with pytest.raises(cf.CancelledError):
            fut.result(timeout=0)
    assert ran == []


def test_submit_refuses_non_callable() -> None:
    with Executor() as ex, pytest.raises(TypeError, match="submit needs a callable, got int: 5"):
        ex.submit(5)  # type: ignore[arg-type]


def test_future_of_another_executor_is_refused() -> None:
    with Executor() as ex1, Executor() as ex2:
        a = ex1.submit(square, 2)
        a.result(timeout=10)
        b = ex2.submit(add, a, 1)
        with pytest.raises(ValueError, match="future of another runtime"):
            b.result(timeout=10)


def test_invalid_max_workers() -> None:
    # the standard library's words, and the value
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_workers must be greater than 0, got {bad}"):
            Executor(max_workers=bad)


# ------------------------------------------- concurrent.futures semantics (17)
def _cancel_queued_behind_a_blocker(busy_loop: float) -> int:
    """Queue 50 calls behind a running one, shutdown(cancel_futures=True), release it.

    ``busy_loop``: seconds the loop thread is kept busy elsewhere just
    before the shutdown. Returns how many of the 50 ended cancelled.
    """
    started = threading.Event()
    release = threading.Event()

    def blocker() -> None:
        started.set()
        release.wait(10)

    ex = Executor(max_workers=1)
    ex.submit(blocker)
    assert started.wait(10)
    queued = [ex.submit(square, i) for i in range(50)]
    if busy_loop:
        time.sleep(0.05)  # the inbox is handed over before the loop is kept busy
        loop = ex._svc.loop
        assert loop is not None
        loop.call_soon_threadsafe(time.sleep, busy_loop)
    ex.shutdown(wait=False, cancel_futures=True)
    release.set()
    ex.shutdown(wait=True)
    return len([f for f in queued if f.cancelled()])


def test_shutdown_cancel_futures_leaves_them_cancelled_not_failed() -> None:
    n = _cancel_queued_behind_a_blocker(0.0)
    assert n == 50, f"{n} of 50 cancelled"


def test_shutdown_cancel_futures_cancels_before_it_returns_even_with_a_busy_loop() -> None:
    # The caller may release the running call the moment shutdown returns (as
    # concurrent.futures allows: the queued calls are cancelled by then). A
    # loop thread slow to react (a loaded machine) must not let the freed
    # thread start the queued calls in between: CI saw 35 of 50 run.
    n = _cancel_queued_behind_a_blocker(0.3)
    assert n == 50, f"{n} of 50 cancelled"


def test_cancel_succeeds_for_a_task_waiting_for_its_inputs() -> None:
    release = threading.Event()
    ran: list[int] = []

    def slow() -> int:
        release.wait(10)
        return 1

    def record(x: int) -> int:
        ran.append(x)
        return x

    with Executor(max_workers=2) as ex:
        a = ex.submit(slow)
        b = ex.submit(record, a)
        c = ex.submit(record, 5)  # queued behind nothing: may start at once
        assert c.result(timeout=10) == 5
        assert b.cancel() is True
        assert b.cancelled()
        release.set()
        assert a.result(timeout=10) == 1
    assert ran == [5]
    with pytest.raises(cf.CancelledError):
        b.result(timeout=0)


def test_map_validates_chunksize_and_cancels_on_timeout() -> None:
    ran: list[int] = []

    def nap(i: int) -> int:
        ran.append(i)
        threading.Event().wait(0.2)
        return i

    with Executor(max_workers=1) as ex:
        with pytest.raises(ValueError, match="chunksize must be >= 1, got 0"):
            ex.map(square, [1], chunksize=0)
        results = ex.map(nap, range(30), timeout=0.5)
        with pytest.raises(TimeoutError):
            list(results)
    # the calls that had not started when map gave up were cancelled
    assert len(ran) < 10, ran


EXIT_APP = """
import sys, time, async_wf

def slow(path):
    time.sleep(0.5)
    open(path, "w").write("done")

ex = async_wf.Executor(max_workers=1)
ex.submit(slow, sys.argv[1])
# no shutdown: the interpreter's exit waits for the running task
"""


def test_interpreter_exit_lets_running_tasks_finish(tmp_path: Path) -> None:
    marker = tmp_path / "done"
    proc = subprocess.run([sys.executable, "-c", EXIT_APP, str(marker)], capture_output=True,
                          text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "done"
    assert proc.stderr == ""


def test_tasks_run_on_uvloop_and_statistics() -> None:
    async def loop_type() -> str:
        return type(asyncio.get_running_loop()).__module__

    with Executor() as ex:
        assert ex.submit(loop_type).result(timeout=10).startswith("uvloop")
        ex.submit(square, 1).result(timeout=10)
        stats = ex.statistics()
    assert stats["submitted"] == 2
    assert stats["finished"] == 2


def test_many_threads_submitting_at_once() -> None:
    with Executor() as ex:
        results: list[list[int]] = []

        def client(k: int) -> None:
            results.append(
                [f.result(timeout=10) for f in [ex.submit(add, k, i) for i in range(100)]]
            )

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(r[0] for r in results) == [0, 1, 2, 3]
    assert all(len(r) == 100 for r in results)


_SWITCH_SCRIPT = """
import concurrent.futures as cf, json, multiprocessing as mp, sys
sys.path.insert(0, sys.argv[1])
from test_executor import workload
# fork before any thread exists; the pool's children then need no re-import
with cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork")) as pool:
    expected = workload(pool)
import async_wf
with async_wf.Executor(max_workers=2) as ex:
    got = workload(ex)
print(json.dumps([expected, got]))
"""


def test_same_results_as_process_pool_executor() -> None:
    # run in a child interpreter: a process pool leaves helper processes (the
    # resource tracker) behind, which other tests that count children would see
    out = subprocess.run(
        [sys.executable, "-c", _SWITCH_SCRIPT, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    expected, got = json.loads(out.stdout)
    assert got == expected
    assert got[:8] == [i * i for i in range(8)]
    assert got[8:] == [i + i + 8 for i in range(8)]


def test_executor_is_a_concurrent_futures_executor() -> None:
    assert issubclass(Executor, cf.Executor)
    with Executor(max_workers=2) as ex:
        assert workload(ex) == [i * i for i in range(8)] + [2 * i + 8 for i in range(8)]


def test_initializer_runs_once_in_each_thread() -> None:
    seen: list[str] = []
    local = threading.local()

    def init(tag: str) -> None:
        local.tag = tag
        seen.append(threading.current_thread().name)

    def tag(i: int) -> str:
        threading.Event().wait(0.01)
        return str(local.tag)

    with Executor(max_workers=3, initializer=init, initargs=("ready",)) as ex:
        assert set(ex.map(tag, range(30))) == {"ready"}
    assert 1 <= len(seen) <= 3 and len(set(seen)) == len(seen)


def test_initializer_runs_in_each_worker_process() -> None:
    import tcp_helpers as th

    with Executor(workers=2, initializer=th.set_env_flag, initargs=("yes",)) as ex:
        futs = [ex.submit(th.env_flag) for _ in range(20)]
        assert {f.result(timeout=60) for f in futs} == {"yes"}


def test_a_failing_initializer_breaks_the_pool_as_the_standard_library_does() -> None:
    def bad() -> None:
        raise ValueError("no database")

    with Executor(max_workers=1, initializer=bad) as ex:
        fut = ex.submit(square, 2)
        with pytest.raises(cf.BrokenExecutor, match="initializer failed"):
            fut.result(timeout=10)


def test_constructor_names_what_the_user_passed() -> None:
    with pytest.raises(TypeError, match="initializer must be callable, got int"):
        Executor(initializer=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1, got 0"):
        Executor(workers=1, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="max_tasks_per_child applies to worker processes"):
        Executor(max_workers=2, max_tasks_per_child=5)


def _pid(i: int) -> tuple[int, int]:
    import os

    return i, os.getpid()


def test_max_tasks_per_child_replaces_each_worker_process_after_that_many_tasks() -> None:
    # as ProcessPoolExecutor(max_tasks_per_child=3): a process runs at most
    # 3 tasks, then a fresh one takes its place; nothing is lost or re-run
    with Executor(workers=2, max_tasks_per_child=3) as ex:
        got = list(ex.map(_pid, range(20)))
        stats = ex.statistics()
    assert [i for i, _ in got] == list(range(20))
    per_pid: dict[int, int] = {}
    for _, pid in got:
        per_pid[pid] = per_pid.get(pid, 0) + 1
    assert max(per_pid.values()) <= 3, per_pid
    assert len(per_pid) >= 7, per_pid
    assert stats["workers_lost"] == 0, stats


# -------------------------- gaps found by the standard library's suite (17)
def test_shutdown_cancel_futures_lets_the_tasks_already_taken_run() -> None:
    # as ThreadPoolExecutor: what threads have taken runs, the rest is cancelled
    ran = threading.Event()

    def nap(i: int) -> int:
        ran.set()
        threading.Event().wait(0.05)
        return i

    ex = Executor(max_workers=2)
    futs = [ex.submit(nap, i) for i in range(50)]
    # a thread has taken one (on a loaded machine that can take a while):
    # the property is about what happens to the calls already taken
    assert ran.wait(10)
    ex.shutdown(wait=True, cancel_futures=True)
    cancelled = sum(f.cancelled() for f in futs)
    finished = sum(f.done() and not f.cancelled() for f in futs)
    assert ran.is_set() and finished >= 1, (finished, cancelled)
    assert cancelled >= 40 and finished + cancelled == 50


def test_no_workers_is_refused_with_the_standard_words() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_workers must be greater than 0, got {bad}"):
            Executor(workers=bad)


SUBMIT_AT_EXIT = """
import atexit, async_wf
ex = async_wf.Executor(max_workers=1)
def late():
    try:
        ex.submit(print, "no")
    except RuntimeError as exc:
        print(type(exc).__mro__[-3].__name__, exc)
atexit.register(late)
"""


def test_submit_after_interpreter_shutdown_uses_the_standard_words() -> None:
    proc = subprocess.run([sys.executable, "-c", SUBMIT_AT_EXIT], capture_output=True,
                          text=True, timeout=60, cwd=str(ROOT))
    assert "cannot schedule new futures after interpreter shutdown" in proc.stdout, \
        proc.stdout + proc.stderr


# ---------------------------------------- mpi4py.futures' additions (17)
def test_mpi4py_style_starmap_unordered_map_bootup_and_num_workers() -> None:
    def slow_echo(x: int) -> int:
        threading.Event().wait(0.02 * (5 - x))
        return x

    with Executor(max_workers=3) as ex:
        assert ex.bootup() is ex and ex.bootup(wait=False) is ex
        assert ex.num_workers == 3
        assert list(ex.starmap(add, [(1, 2), (3, 4)])) == [3, 7]
        assert list(ex.starmap(add, iter([(1, 1)]), chunksize=2)) == [2]
        got = list(ex.map(slow_echo, range(5), unordered=True))
        assert sorted(got) == [0, 1, 2, 3, 4] and got != [0, 1, 2, 3, 4], got
    with Executor(workers=2) as ex:
        assert ex.num_workers == 2


def test_an_executor_dropped_without_shutdown_stops_its_thread_after_its_tasks() -> None:
    import gc
    import time

    before = {t for t in threading.enumerate() if t.name == "async_wf-executor"}
    ex = Executor(max_workers=1)
    fut = ex.submit(time.sleep, 0.2)
    del ex
    gc.collect()
    # the task still finishes, then the loop thread ends
    assert fut.result(timeout=10) is None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = {t for t in threading.enumerate() if t.name == "async_wf-executor"} - before
        if not left:
            break
        time.sleep(0.05)
    assert not left, left


class _RefusesPickle:
    def __reduce__(self) -> Any:
        import pickle

        raise pickle.PicklingError("this object refuses to be pickled")


def _ident(x: Any) -> Any:
    return x


def _a_lock() -> Any:
    return threading.Lock()


def test_pickling_errors_keep_their_type_on_worker_processes() -> None:
    # as ProcessPoolExecutor: the original exception type, so that
    # `except PicklingError` / `except TypeError` keep working
    import pickle

    with Executor(workers=1) as ex:
        with pytest.raises(pickle.PicklingError, match="refuses to be pickled") as info:
            ex.submit(_ident, _RefusesPickle()).result(timeout=30)
        assert "the arguments of task" in str(info.value)
        with pytest.raises(TypeError, match=r"cannot pickle '_thread\.lock' object"):
            ex.submit(_ident, threading.Lock()).result(timeout=30)
        with pytest.raises(TypeError, match=r"result could not be pickled.*_thread\.lock"):
            ex.submit(_a_lock).result(timeout=30)


# ---------------------- gaps found by the upstream suites' second run (17)
def test_wait_and_as_completed_see_a_cancelled_call() -> None:
    # concurrent.futures.wait/as_completed count a cancelled future as done
    with Executor(max_workers=1) as ex:
        ex.submit(time_sleep, 0.3)
        f = ex.submit(time_sleep, 0)
        assert f.cancel()
        done, not_done = cf.wait([f], timeout=5)
        assert done == {f} and not not_done
        assert list(cf.as_completed([f], timeout=5)) == [f]


def time_sleep(t: float) -> None:
    import time

    time.sleep(t)


def test_bootup_after_shutdown_raises_and_num_workers_drops_to_zero() -> None:
    ex = Executor(max_workers=2)
    assert ex.num_workers == 2
    ex.shutdown()
    assert ex.num_workers == 0
    with pytest.raises(RuntimeError, match="cannot bootup after shutdown"):
        ex.bootup()


def test_a_later_shutdown_with_cancel_futures_still_cancels() -> None:
    ex = Executor(max_workers=1)
    ex.submit(time_sleep, 0.3)
    rest = [ex.submit(time_sleep, 0.05) for _ in range(20)]
    ex.shutdown(wait=False)
    ex.shutdown(wait=True, cancel_futures=True)
    assert sum(f.cancelled() for f in rest) >= 15, [f.cancelled() for f in rest]


def _result_that_exits_when_pickled() -> Any:
    class ExitsWhenPickled:
        def __reduce__(self) -> Any:
            raise SystemExit(1)

    return ExitsWhenPickled()


def test_systemexit_while_pickling_a_result_fails_that_task_not_the_worker() -> None:
    with Executor(workers=1) as ex:
        f = ex.submit(_result_that_exits_when_pickled)
        assert isinstance(f.exception(timeout=30), SystemExit)
        assert ex.submit(int, "7").result(timeout=30) == 7
        assert ex.statistics()["workers_lost"] == 0


def _put(proxy: Any, key: str) -> str:
    proxy[key] = "here"
    return key


def test_multiprocessing_manager_proxies_reach_worker_processes() -> None:
    import multiprocessing as mp

    with mp.Manager() as manager, Executor(workers=1) as ex:
        shared = manager.dict()
        assert ex.submit(_put, shared, "k").result(timeout=30) == "k"
        assert shared["k"] == "here"


def test_submit_raises_once_the_thread_initializer_has_failed() -> None:
    # as ThreadPoolExecutor: once broken, submit() itself raises BrokenThreadPool
    def bad() -> None:
        raise ValueError("no database")

    with Executor(max_workers=1, initializer=bad) as ex:
        first = ex.submit(int, "1")
        with pytest.raises(cf.BrokenExecutor):
            first.result(timeout=10)
        with pytest.raises(cf.BrokenExecutor, match="initializer failed") as info:
            ex.submit(int, "2")
        assert isinstance(info.value.__cause__, ValueError)
