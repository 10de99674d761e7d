"""The checkpoint log in a running workflow: re-runs, crashes, damage, code changes.

The workflows run as real processes (``tests/ckpt_app.py``) that write real
log files; every task run is counted in a file, so the tests see exactly
which tasks ran again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import async_wf
from async_wf.checkpoint import CheckpointLog, verify
from async_wf.transport.local import default_threads

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "ckpt_app.py"
LIMIT = 120


def run_app(tmp_path: Path, counts: str, *args: str, env: dict[str, str] | None = None,
            check: bool = True) -> dict[str, Any]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    e["CKPT_COUNTS"] = str(tmp_path / counts)
    e.update(env or {})
    proc = subprocess.run([sys.executable, str(APP), str(tmp_path / "run.wfck"), *args],
                          env=e, capture_output=True, text=True, timeout=LIMIT)
    if check:
        assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


def ran(tmp_path: Path, counts: str) -> Counter[str]:
    path = tmp_path / counts
    if not path.exists():
        return Counter()
    return Counter(path.read_text().split())


def results(out: dict[str, Any]) -> tuple[Any, ...]:
    return out["total"], out["leaves"], out["pairs"]


# ------------------------------------------------------------- re-run skips
@pytest.mark.parametrize("transport", ["local", "tcp"])
def test_rerun_runs_nothing_and_gives_the_same_results(tmp_path: Path, transport: str) -> None:
    first = run_app(tmp_path, "c1", "--transport", transport)
    n_tasks = 200 + 100 + 20 + 1
    assert sum(ran(tmp_path, "c1").values()) == n_tasks
    assert max(ran(tmp_path, "c1").values()) == 1
    assert first["reused"] == 0

    again = run_app(tmp_path, "c2", "--transport", transport)
    assert ran(tmp_path, "c2") == Counter()
    assert results(again) == results(first)
    assert again["reused"] == n_tasks and again["finished"] == 0


def test_reordered_submission_reuses_everything(tmp_path: Path) -> None:
    first = run_app(tmp_path, "c1", "--order", "1")
    again = run_app(tmp_path, "c2", "--order", "2")
    assert ran(tmp_path, "c2") == Counter()
    assert results(again) == results(first)


def test_changed_function_reruns_it_and_its_dependents_only(tmp_path: Path) -> None:
    first = run_app(tmp_path, "c1")
    changed = run_app(tmp_path, "c2", env={"CKPT_VARIANT": "2"})
    counts = ran(tmp_path, "c2")
    # pair's code changed: the 100 pairs rerun, and so does total (it takes
    # them); the leaves and the NumPy tasks are reused
    assert set(k.split(":")[0] for k in counts) == {"pair", "total"}
    assert sum(counts.values()) == 101
    assert changed["leaves"] == first["leaves"]
    assert changed["pairs"] != first["pairs"]
    # and back: the first version's records are still there
    run_app(tmp_path, "c3")
    assert ran(tmp_path, "c3") == Counter()


def test_failed_task_is_not_recorded_and_reruns(tmp_path: Path) -> None:
    first = run_app(tmp_path, "c1", env={"CKPT_FAIL": "7"})
    assert first["total"] == "failed: DependencyError"
    assert first["leaves"][7] is None
    again = run_app(tmp_path, "c2")
    # leaf 7, the pair that takes it and the total; nothing else
    assert ran(tmp_path, "c2") == Counter({"leaf:7": 1, "pair:6": 1, "total:0": 1})
    (tmp_path / "ref").mkdir()
    clean = run_app(tmp_path / "ref", "c")
    assert results(clean) == results(again)


# -------------------------------------------------------------------- crash
def recorded_tasks(path: Path) -> set[str]:
    """The tasks whose records are intact in the log (read-only: the tail is left alone)."""
    out = set()
    with CheckpointLog(path, readonly=True) as log:
        for p in log.problems:
            assert "torn tail" in p.reason, p  # the only damage a kill may leave
        for key in log:
            v = log.get(key)
            if isinstance(v, tuple):
                out.add(f"{v[0]}:{v[1]}")
            elif isinstance(v, float):
                out.add("total:0")
    return out


@pytest.mark.parametrize("seed", range(8))
def test_sigkill_at_a_random_moment_then_rerun(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    (tmp_path / "ref").mkdir()
    reference = run_app(tmp_path / "ref", "c")  # uninterrupted, a log of its own
    flush = ["interval", "record", "every"][seed % 3]
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    e["CKPT_COUNTS"] = str(tmp_path / "c1")
    e["CKPT_SLEEP"] = "0.01"
    log_path = tmp_path / "run.wfck"
    proc = subprocess.Popen([sys.executable, str(APP), str(log_path), "--flush", flush],
                            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill once the first tasks ran, somewhere in the run (200 leaves of 10 ms
    # on 6 threads: about 0.35 s of work after start-up)
    deadline = time.monotonic() + 30
    while not (tmp_path / "c1").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait(LIMIT)
    assert proc.returncode == -signal.SIGKILL
    done_before = recorded_tasks(log_path)

    after = run_app(tmp_path, "c2", "--flush", flush)
    again = ran(tmp_path, "c2")
    assert not done_before & set(again), f"recorded before the kill, ran again: " \
        f"{sorted(done_before & set(again))}"
    assert max(again.values(), default=1) == 1
    assert results(after) == results(reference)


@pytest.mark.parametrize("seed", range(8))
def test_sigkill_costs_only_the_running_tasks_by_default(tmp_path: Path, seed: int) -> None:
    # issue 16.5: with the default policy, a task that returned before the
    # kill is not run again, except the last batch the loop had not yet
    # taken in (at most one per thread)
    rng = random.Random(1000 + seed)
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    e.update(CKPT_COUNTS=str(tmp_path / "c1"), CKPT_DONE=str(tmp_path / "done"),
             CKPT_SLEEP="0.02")
    proc = subprocess.Popen([sys.executable, str(APP), str(tmp_path / "run.wfck")],
                            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # 200 leaves of 20 ms on default_threads() threads: about 0.7 s of work
    deadline = time.monotonic() + 30
    while not (tmp_path / "c1").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.05, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait(LIMIT)
    assert proc.returncode == -signal.SIGKILL
    returned = set(ran(tmp_path, "done"))
    run_app(tmp_path, "c2")
    again = ran(tmp_path, "c2")
    assert max(again.values(), default=1) == 1
    lost = sorted(returned & set(again))
    one_batch = default_threads()
    assert len(lost) <= one_batch, (
        f"{len(lost)} of the {len(returned)} tasks that returned before the kill ran again: "
        f"{lost[:10]}"
    )


# -------------------------------------------------------------- corruption
def test_damaged_records_are_reported_and_recomputed(tmp_path: Path) -> None:
    first = run_app(tmp_path, "c1", "--n", "40")
    log_path = tmp_path / "run.wfck"
    data = bytearray(log_path.read_bytes())
    # flip a byte inside the record of leaf 13: find its pickled value
    import pickle

    at = data.find(pickle.dumps(("leaf", 13, 169), protocol=5)[2:])
    assert at > 0
    data[at + 5] ^= 0xFF
    data += b"\x00garbage that is not a record" * 3
    log_path.write_bytes(bytes(data))

    report = verify(log_path)
    assert not report.ok
    assert any("checksum" in p.reason for p in report.problems), report.problems
    cli = subprocess.run([sys.executable, "-m", "async_wf.cli", "checkpoint", "verify",
                          str(log_path)], capture_output=True, text=True, timeout=LIMIT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 1, cli.stdout + cli.stderr

    again = run_app(tmp_path, "c2", "--n", "40")
    assert ran(tmp_path, "c2") == Counter({"leaf:13": 1})
    assert results(again) == results(first)
    assert "checksum" in again["stderr"]  # the run reported what it skipped


def test_truncated_log_loses_only_its_tail(tmp_path: Path) -> None:
    first = run_app(tmp_path, "c1", "--n", "40")
    log_path = tmp_path / "run.wfck"
    size = log_path.stat().st_size
    os.truncate(log_path, size - 7)  # the last record, cut short
    again = run_app(tmp_path, "c2", "--n", "40")
    assert sum(ran(tmp_path, "c2").values()) == 1
    assert results(again) == results(first)


# ----------------------------------------------------- what the key sees
GLOBALS_APP = """
import sys, async_wf
import helper

SCALE = int(sys.argv[1])

def f(x):
    print("ran f", x, file=sys.stderr)
    return x * SCALE + helper.OFFSET

async def main():
    async with async_wf.Runtime(checkpoint="run.wfck") as rt:
        print(await async_wf.gather(*[rt.submit(f, i) for i in range(3)]))

async_wf.run(main())
"""


def test_a_changed_global_or_imported_constant_reruns_the_task(tmp_path: Path) -> None:
    # issue 16.1: the second run reused the first run's results
    (tmp_path / "app.py").write_text(GLOBALS_APP)

    def run(scale: int, offset: int) -> tuple[str, int]:
        (tmp_path / "helper.py").write_text(f"OFFSET = {offset}\n")
        proc = subprocess.run([sys.executable, "app.py", str(scale)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=LIMIT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip(), proc.stderr.count("ran f")

    assert run(2, 0) == ("[0, 2, 4]", 3)
    assert run(2, 0) == ("[0, 2, 4]", 0)  # nothing changed: all reused
    assert run(3, 0) == ("[0, 3, 6]", 3)
    assert run(3, 100) == ("[100, 103, 106]", 3)
    assert run(2, 0) == ("[0, 2, 4]", 0)  # the first records are still there


# ------------------------------------------------------------ what it says
def square_slowly(x: int) -> int:
    time.sleep(0.05)
    return x * x


async def test_a_resumed_run_says_what_it_reused(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # issue 16.6: only rt.statistics()["reused"] knew
    path = tmp_path / "x.wfck"
    caplog.set_level(logging.INFO, logger="async_wf")
    async with async_wf.Runtime(checkpoint=path) as rt:
        await async_wf.gather(*[rt.submit(square_slowly, i) for i in range(3)])
    said = [r.getMessage() for r in caplog.records]
    assert not any("resuming" in m for m in said), said
    assert f"checkpoint log {path}: reused 0 of 3 tasks, ran 3" in said, said
    caplog.clear()
    async with async_wf.Runtime(checkpoint=path) as rt:
        await async_wf.gather(*[rt.submit(square_slowly, i) for i in range(5)])
    said = [r.getMessage() for r in caplog.records]
    assert f"resuming from {path}: 3 records" in said, said
    assert f"checkpoint log {path}: reused 3 of 5 tasks, ran 2" in said, said


INTERRUPTED_APP = """
import sys, time, async_wf

def step(i):
    time.sleep(0.05)
    return i

async def main():
    async with async_wf.Runtime(checkpoint="run.wfck") as rt:
        await async_wf.gather(*[rt.submit(step, i) for i in range(400)])

async_wf.run(main())
"""


def test_ctrl_c_of_a_recorded_run_says_how_to_resume(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(INTERRUPTED_APP)
    # Ctrl-C as a terminal sends it: a suite started in the background by a
    # non-interactive shell inherits SIGINT ignored, and so would the app
    proc = subprocess.Popen([sys.executable, "app.py", "--its", "args"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + LIMIT
    while (not (tmp_path / "run.wfck").exists()
           or (tmp_path / "run.wfck").stat().st_size < 4096):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=LIMIT)
    assert proc.returncode != 0
    m = re.search(r"interrupted: (\d+) finished tasks are recorded in run\.wfck; run the "
                  r"same command again to resume", err)
    assert m, err
    assert "app.py --its args" in err, err
    with CheckpointLog(tmp_path / "run.wfck", readonly=True) as log:
        assert len(log) >= int(m.group(1)) > 0


def big_array(i: int) -> np.ndarray:
    return np.full(1 << 16, float(i))  # 512 KiB


async def test_large_recorded_results_warn_once_per_function(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # issue 16: intermediates that make the log much larger than needed
    ck = async_wf.Checkpoint(tmp_path / "x.wfck", warn_bytes=1 << 20)
    caplog.set_level(logging.WARNING, logger="async_wf")
    async with async_wf.Runtime(checkpoint=ck) as rt:
        await async_wf.gather(*[rt.submit(big_array, i) for i in range(6)])
        await rt.submit(square, 3)
    said = [r.getMessage() for r in caplog.records if "checkpoint=False" in r.getMessage()]
    assert len(said) == 1, said
    assert "big_array" in said[0] and "MiB" in said[0], said
    with pytest.raises(ValueError, match="warn_bytes must be an int >= 0, got -1"):
        async with async_wf.Runtime(checkpoint=async_wf.Checkpoint(tmp_path / "y.wfck",
                                                                   warn_bytes=-1)):
            pass


# ------------------------------------------------------------- in-process API
def square(x: int) -> int:
    return x * x


async def test_second_writer_gets_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "x.wfck"
    async with async_wf.Runtime(checkpoint=path) as rt:
        assert await rt.submit(square, 3) == 9
        with pytest.raises(async_wf.CheckpointLockedError, match=r"x\.wfck"):
            async with async_wf.Runtime(checkpoint=path):
                pass
    # and once the first is done, the log opens again
    async with async_wf.Runtime(checkpoint=path) as rt:
        f = rt.submit(square, 3)
        assert isinstance(f, async_wf._futures.RecordedFuture)
        assert await f == 9


async def test_unhashable_argument_names_it_and_the_way_out(tmp_path: Path) -> None:
    lock = asyncio.Lock()
    async with async_wf.Runtime(checkpoint=tmp_path / "x.wfck") as rt:
        with pytest.raises(async_wf.CheckpointKeyError) as err:
            rt.submit(lambda a, b: 1, 1, lock)
        msg = str(err.value)
        assert "argument 1" in msg and "Lock" in msg and "checkpoint=False" in msg
        # the ways out: not recorded, or a key function
        quiet = async_wf.task(lambda a, b: a, checkpoint=False)
        assert await rt.submit(quiet, 5, lock) == 5
        keyed = async_wf.task(lambda a, b: a + 1, key=lambda a, b: a)
        assert await rt.submit(keyed, 5, lock) == 6


async def test_recorded_chain_reads_only_what_is_awaited(tmp_path: Path) -> None:
    path = tmp_path / "x.wfck"

    def step(a: np.ndarray) -> np.ndarray:
        return a + 1

    async with async_wf.Runtime(checkpoint=path) as rt:
        x = rt.submit(np.zeros, 100_000)
        for _ in range(20):
            x = rt.submit(step, x)
        assert (await x == 20).all()
    async with async_wf.Runtime(checkpoint=path) as rt:
        x = rt.submit(np.zeros, 100_000)
        for _ in range(20):
            x = rt.submit(step, x)
        assert rt.statistics()["reused"] == 21
        assert (await x == 20).all()
        assert rt.statistics()["finished"] == 0


class CallLog(list[str]):
    """The calls the tasks below made.

    Not a plain list: a plain list read by a task's function is part of its
    key (a module-level value), and this one grows between the runs of a
    test; an instance of a class of its own has no stable hash and is left out.
    """


CALLS = CallLog()


@async_wf.task(checkpoint=False)
def big(n: int) -> list[int]:
    CALLS.append("big")
    return list(range(n))


def length(xs: list[int]) -> int:
    CALLS.append("length")
    return len(xs)


def counted(x: int) -> int:
    CALLS.append(f"counted {x}")
    return x


async def test_checkpoint_false_is_not_recorded_but_keys_its_dependents(
        tmp_path: Path) -> None:
    path = tmp_path / "x.wfck"
    CALLS.clear()
    for _ in range(2):
        async with async_wf.Runtime(checkpoint=path) as rt:
            assert await rt.submit(length, big(10)) == 10
    # big ran both times (not recorded); length ran once (its key is big's key)
    assert CALLS == ["big", "length", "big"]


async def test_version_invalidates_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "x.wfck"
    CALLS.clear()
    for version in ("1", "1", "2"):
        async with async_wf.Runtime(checkpoint=path) as rt:
            await rt.submit(async_wf.task(counted, version=version), 1)
    assert CALLS == ["counted 1", "counted 1"]


# ----------------------------------------------------- resumable long tasks
@async_wf.task(retries=1)
def stepping(n: int, fail_at: int, seen: list[Any]) -> list[int]:
    ctx = async_wf.task_context()
    got = ctx.restore()
    seen.append(got)
    start, acc = got if got is not None else (-1, [])
    for step in range(start + 1, n):
        if step == fail_at and len(seen) == 1:
            raise RuntimeError("first attempt dies here")
        acc = [*acc, step * step]
        ctx.save(acc, step)
    return acc


async def test_retry_resumes_from_the_last_saved_step(tmp_path: Path) -> None:
    seen: list[Any] = []
    async with async_wf.Runtime(checkpoint=tmp_path / "x.wfck") as rt:
        out = await rt.submit(stepping, 6, 4, seen)
    assert out == [s * s for s in range(6)]
    assert seen == [None, (3, [0, 1, 4, 9])]


async def test_without_a_log_save_and_restore_do_nothing() -> None:
    seen: list[Any] = []
    async with async_wf.Runtime() as rt:
        out = await rt.submit(stepping.options(retries=1), 5, 3, seen)
    assert out == [s * s for s in range(5)]
    assert seen == [None, None]
    with pytest.raises(RuntimeError, match="inside a running async_wf task"):
        async_wf.task_context()


async def test_save_rejects_a_step_that_goes_back(tmp_path: Path) -> None:
    def task_fn() -> str:
        ctx = async_wf.task_context()
        ctx.save("a", 3)
        with pytest.raises(ValueError, match="above the last step"):
            ctx.save("b", 3)
        return "ok"

    async with async_wf.Runtime(checkpoint=tmp_path / "x.wfck") as rt:
        assert await rt.submit(task_fn) == "ok"


RESUME_APP = """
import os, signal, sys, async_wf

def long(n, marker):
    ctx = async_wf.task_context()
    got = ctx.restore()
    print("RESTORED", None if got is None else got[0], flush=True)
    start, total = got if got is not None else (-1, 0)
    for step in range(start + 1, n):
        total += step
        ctx.save(total, step)
        if step == 5 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)   # the whole process dies mid-task
    return total

async def main():
    kw = {"workers": 2} if sys.argv[3] == "tcp" else {}
    async with async_wf.Runtime(checkpoint=sys.argv[1], **kw) as rt:
        print("TOTAL", await rt.submit(long, 10, sys.argv[2]), flush=True)

async_wf.run(main())
"""


@pytest.mark.parametrize("transport", ["local", "tcp"])
def test_killed_long_task_resumes_after_rerun(tmp_path: Path, transport: str) -> None:
    app = tmp_path / "resume.py"
    app.write_text(RESUME_APP)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(app), str(tmp_path / "r.wfck"), str(tmp_path / "killed"),
            transport]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=LIMIT)
    assert (tmp_path / "killed").exists()
    assert "RESTORED None" in first.stdout
    if transport == "tcp":
        # the worker process died: the runtime runs the task again on the
        # other worker, which resumes after the last saved step
        assert first.returncode == 0, first.stderr
        assert "RESTORED 5" in first.stdout
        assert f"TOTAL {sum(range(10))}" in first.stdout
        return
    assert "TOTAL" not in first.stdout
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=LIMIT)
    assert second.returncode == 0, second.stderr
    assert "RESTORED 5" in second.stdout
    assert f"TOTAL {sum(range(10))}" in second.stdout


# an Event, not a dict: the switch stands for a change the key cannot see
# (another version of the class's module), so it must not be in the key
BROKEN = threading.Event()


class Touchy:
    """A result that cannot be unpickled while BROKEN is set (a class that changed)."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __setstate__(self, state: dict[str, Any]) -> None:
        if BROKEN.is_set():
            raise ValueError("this code cannot read the old Touchy")
        self.__dict__.update(state)


def make_touchy(x: int) -> Touchy:
    CALLS.append(f"touchy {x}")
    return Touchy(x)


async def test_unreadable_record_reruns_the_task_and_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "x.wfck"
    CALLS.clear()
    async with async_wf.Runtime(checkpoint=path) as rt:
        assert (await rt.submit(make_touchy, 4)).x == 4
    BROKEN.set()
    try:
        async with async_wf.Runtime(checkpoint=path) as rt:
            f = rt.submit(make_touchy, 4)
            assert isinstance(f, async_wf._futures.RecordedFuture)
            got = await f  # the read fails: the task runs instead
            assert rt.statistics()["checkpoint_unusable"] == 1
    finally:
        BROKEN.clear()
    assert got.x == 4 and CALLS == ["touchy 4", "touchy 4"]
    async with async_wf.Runtime(checkpoint=path) as rt:
        assert (await rt.submit(make_touchy, 4)).x == 4
    assert CALLS == ["touchy 4", "touchy 4"]  # the rerun's record is used now
