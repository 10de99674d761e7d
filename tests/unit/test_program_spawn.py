"""Programs as tasks: how they are started, reaped, captured and killed (async_wf/_program.py).

Every test runs real programs (sh, the Python running the tests) and looks at
the real processes in /proc. Most run on both start paths: ``spawn``
(posix_spawn, a pidfd reader: the default on Linux) and ``asyncio`` (asyncio's
subprocess support: with ``cwd=``/``cpus=``, or where pidfds are missing).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import async_wf
from async_wf import ProgramError, run_program
from async_wf import _program as P

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


@pytest.fixture(params=["spawn", "asyncio"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Which start path the test's programs take."""
    if request.param == "asyncio":
        monkeypatch.setattr(P, "_fast", False)
    yield request.param


def _children() -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is this one."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me:
            out.append((int(name), fields[0]))
    return out


def _gone(pid: int) -> bool:
    """The process does not exist, or is a zombie (then someone else must reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def _wait_for(cond: Any, limit: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_linux_with_pidfds_takes_the_spawn_path() -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("this Python has no os.pidfd_open")
    assert P._fast_path(asyncio.get_running_loop())


async def test_exit_code_and_both_outputs_are_kept(path: str) -> None:
    res = await run_program("sh", ["-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")
    assert res.command == ("sh", "-c", "echo out; echo err >&2; exit 3")


async def test_output_larger_than_a_pipe_is_kept_whole(path: str) -> None:
    code = "import sys; sys.stdout.write('x' * 3_000_000); sys.stderr.write('y' * 200_000)"
    res = await run_program(sys.executable, ["-c", code])
    assert res.stdout == "x" * 3_000_000 and res.stderr == "y" * 200_000


async def test_a_failing_program_raises_with_its_stderr(path: str) -> None:
    with pytest.raises(ProgramError) as err:
        await run_program("sh", ["-c", "echo it broke >&2; exit 7"])
    assert err.value.result.returncode == 7
    assert "exited with code 7" in str(err.value) and "it broke" in str(err.value)


async def test_a_program_killed_by_a_signal_says_which(path: str) -> None:
    with pytest.raises(ProgramError, match="was killed by signal 9") as err:
        await run_program("sh", ["-c", "kill -9 $$"])
    assert err.value.result.returncode == -signal.SIGKILL


async def test_without_output_nothing_is_kept(path: str) -> None:
    res = await run_program("sh", ["-c", "echo out; echo err >&2"], output=False)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    with pytest.raises(ProgramError) as err:
        await run_program("sh", ["-c", "echo it broke >&2; exit 4"], output=False)
    assert err.value.result.returncode == 4 and "stderr ends with" not in str(err.value)
    with pytest.raises(TypeError, match="output must be True or False, got 'no'"):
        await run_program("true", output="no")  # type: ignore[arg-type]


async def test_a_missing_program_names_the_path_searched(path: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"program 'nosuch-prog-xyz' not found \(PATH="):
        await run_program("nosuch-prog-xyz")
    with pytest.raises(FileNotFoundError, match="nosuch-dir-xyz"):
        await run_program(str(tmp_path / "nosuch-dir-xyz" / "prog"))


async def test_the_program_is_searched_on_the_path_it_is_given(path: str, tmp_path: Path) -> None:
    prog = tmp_path / "only-here-xyz"
    prog.write_text("#!/bin/sh\necho found $FOO\n")
    prog.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "FOO": "bar"}
    res = await run_program("only-here-xyz", env=env)
    assert res.stdout == "found bar\n"
    with pytest.raises(FileNotFoundError, match="not found"):
        await run_program("only-here-xyz")


async def test_the_child_environment_drops_the_mpi_job(path: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("HYDRA_CONTROL_FD", "9")
    monkeypatch.setenv("KEEP_ME_XYZ", "kept")
    res = await run_program("sh", ["-c", "echo $PMI_RANK/$HYDRA_CONTROL_FD/$KEEP_ME_XYZ/$EXTRA"],
                            env={"EXTRA": "extra"})
    assert res.stdout == "//kept/extra\n"


async def test_the_child_starts_in_a_session_of_its_own_with_default_signals(path: str) -> None:
    res = await run_program(sys.executable, ["-c", "import os; print(os.getsid(0) == os.getpid())"])
    assert res.stdout == "True\n"
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a worker started with &
    try:
        # grep, not Python: Python ignores SIGPIPE and SIGXFSZ itself at start
        res = await run_program("grep", ["SigIgn", "/proc/self/status"])
    finally:
        signal.signal(signal.SIGINT, old)
    ignored = int(res.stdout.split()[1], 16)
    assert ignored & (1 << (signal.SIGPIPE - 1)) == 0, hex(ignored)
    if path == "spawn":
        # every signal (stock asyncio's path resets only SIGPIPE and SIGXFSZ), but
        # glibc's posix_spawn leaves its own two real-time signals (32, 33) ignored
        assert ignored & ~((1 << 31) | (1 << 32)) == 0, hex(ignored)


async def test_inheritable_descriptors_are_not_inherited() -> None:
    # the spawn path only: uvloop's subprocess path passes them on (the stock
    # asyncio one closes them)
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        res = await run_program(sys.executable, ["-c",
                                                 "import os; print(os.listdir('/proc/self/fd'))"])
    finally:
        os.close(r)
        os.close(w)
    assert str(w) not in res.stdout.strip("[]\n").replace("'", "").split(", "), res.stdout


async def test_many_at_once_leave_no_zombie_and_no_descriptor(path: str) -> None:
    await run_program("true")  # what is opened once (the /dev/null of the children) is open
    before = len(os.listdir("/proc/self/fd"))
    results = await asyncio.gather(*[run_program("sh", ["-c", f"exit {i % 3}"], check=False)
                                     for i in range(150)])
    assert [r.returncode for r in results] == [i % 3 for i in range(150)]
    assert [c for c in _children() if c[1] == "Z"] == []
    assert len(os.listdir("/proc/self/fd")) <= before


async def _started(pids: Path) -> tuple[int, int]:
    await _wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    sh, sleeper = map(int, pids.read_text().split())
    return sh, sleeper


SCRIPT = "sleep 60 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"


@pytest.mark.parametrize("output", [True, False])
async def test_a_cancel_kills_the_whole_group_and_reaps(path: str, tmp_path: Path,
                                                        output: bool) -> None:
    pids = tmp_path / "pids"
    t = asyncio.ensure_future(run_program("sh", ["-c", SCRIPT.format(pids=pids)], output=output))
    sh, sleeper = await _started(pids)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    # the shell is reaped by us (no zombie left); its grandchild, in the same
    # group, is killed too (reaped by whoever adopted it)
    await _wait_for(lambda: not Path(f"/proc/{sh}").exists())
    await _wait_for(lambda: _gone(sleeper))
    assert sh not in [c[0] for c in _children()]


async def test_a_task_timeout_kills_the_program_group(path: str, tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    @async_wf.task(binary="sh", args=["-c", SCRIPT.format(pids=pids)], timeout=1.0)
    def slow() -> None: ...

    async with async_wf.Runtime() as rt:
        t0 = time.monotonic()
        with pytest.raises(async_wf.TaskTimeoutError):
            await rt.submit(slow)
        assert time.monotonic() - t0 < 30
    sh, sleeper = map(int, pids.read_text().split())
    await _wait_for(lambda: not Path(f"/proc/{sh}").exists())
    await _wait_for(lambda: _gone(sleeper))


async def test_a_grandchild_holding_the_pipes_does_not_block_a_cancel(tmp_path: Path) -> None:
    # the grandchild leaves the group (setsid), so the kill does not reach it,
    # and it keeps stdout open: the cancel must still return, and the child be reaped
    pids = tmp_path / "pids"
    script = (f"setsid sleep 30 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; "
              "echo started; wait")
    t = asyncio.ensure_future(run_program("sh", ["-c", script]))
    sh, sleeper = await _started(pids)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(t, 10)
    await _wait_for(lambda: not Path(f"/proc/{sh}").exists())
    os.kill(sleeper, signal.SIGKILL)


@pytest.mark.parametrize("workers", [0, 1])
async def test_program_tasks_with_and_without_output_on_each_transport(workers: int) -> None:
    @async_wf.task(binary="sh", args=["-c", "echo {word}; exit {code}"])
    def say(word: str, code: int = 0) -> None: ...

    quiet = say.options(output=False)
    opts: dict[str, Any] = {"workers": workers} if workers else {}
    async with async_wf.Runtime(**opts) as rt:
        loud = await asyncio.gather(*[rt.submit(say, f"w{i}") for i in range(40)])
        silent = await asyncio.gather(*[rt.submit(quiet, f"w{i}") for i in range(40)])
        with pytest.raises(ProgramError, match="exited with code 5"):
            await rt.submit(quiet, "x", 5)
    assert [r.stdout for r in loud] == [f"w{i}\n" for i in range(40)]
    assert {(r.returncode, r.stdout, r.stderr) for r in silent} == {(0, "", "")}
    assert quiet.task_options.output is False and say.task_options.output is True


def test_output_is_an_option_of_program_tasks_only() -> None:
    with pytest.raises(ValueError, match=r"output=False .* applies to a binary= task"):
        async_wf.task(lambda: None, output=False)
    with pytest.raises(TypeError, match="output must be True or False, got 0"):
        async_wf.task(lambda: None, binary="true", output=0)  # type: ignore[call-overload]


SPAN = "import time; t = time.monotonic(); time.sleep(0.3); print(t, time.monotonic())"


async def test_at_most_the_set_number_of_programs_run_at_once(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNC_WF_PROGRAMS_AT_ONCE", "3")
    monkeypatch.setattr(P, "_at_once", None)
    assert P.programs_at_once() == 3
    results = await asyncio.gather(*[run_program(sys.executable, ["-c", SPAN])
                                     for _ in range(9)])
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert 1 <= most <= 3, spans


def test_a_bad_number_of_programs_at_once_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "_at_once", None)
    monkeypatch.setenv("ASYNC_WF_PROGRAMS_AT_ONCE", "0")
    with pytest.raises(ValueError, match="ASYNC_WF_PROGRAMS_AT_ONCE must be an int >= 1, got '0'"):
        P.programs_at_once()
    monkeypatch.delenv("ASYNC_WF_PROGRAMS_AT_ONCE")
    assert P.programs_at_once() >= 8


async def test_thousands_submitted_at_once_all_run_and_are_reaped(tmp_path: Path) -> None:
    @async_wf.task(binary="true", output=False)
    def true() -> None: ...

    async with async_wf.Runtime(workers=1) as rt:
        results = await asyncio.gather(*[rt.submit(true) for _ in range(1500)])
    assert {r.returncode for r in results} == {0}
    assert [c for c in _children() if c[1] == "Z"] == []


def test_a_checkpoint_key_tells_a_program_without_output_apart() -> None:
    from async_wf._recorder import _program_identity
    from async_wf.checkpoint._keys import function_identity, stable_hash

    @async_wf.task(binary="sh", args=["-c", "echo {x}"])
    def echo(x: int) -> None: ...

    kept = _program_identity(echo._fn, None, True)
    dropped = _program_identity(echo.options(output=False)._fn, None, True)
    assert kept is not None and dropped is not None and kept != dropped
    # the keys of tasks that keep their output are those recorded before output= existed
    prog = echo._fn
    assert isinstance(prog, P.ProgramTask)
    assert kept == stable_hash((function_identity(prog.fn, None, True), "sh",
                                ("-c", "echo {x}"), None))
