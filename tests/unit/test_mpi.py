"""The MPI transport under a real mpiexec (the mpich wheel's), 2 to 4 ranks.

Each test writes an application, runs it with ``mpiexec -n N python -m
async_wf.mpi app.py`` (or plain ``mpiexec ... python app.py`` for
``async_wf.mpi.run``), and checks what it printed. The applications check
values themselves where that is simpler, and print ``OK <name>`` lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py (make test installs it)")

from async_wf._program import find_mpiexec

# runs in the first pass only (core_independent): launching under mpiexec and the rank protocol;
# the scheduling is tested elsewhere
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 120  # seconds: a hang fails the test instead of the whole run


def mpirun(tmp_path: Path, n: int, app: str, *args: str, launcher: bool = True,
           timeout: float = LIMIT, slots: int = 1) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(app))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [find_mpiexec(), "-n", str(n), sys.executable]
    cmd += ["-m", "async_wf.mpi", "--slots", str(slots), str(script)] if launcher \
        else [str(script)]
    return subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def oks(proc: subprocess.CompletedProcess[str]) -> set[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return {line.split(None, 1)[1] for line in proc.stdout.splitlines() if line.startswith("OK ")}


PLAIN = """
    import asyncio, os
    import numpy as np
    import async_wf
    from mpi4py import MPI

    def square(x):
        return x * x

    def add(a, b):
        return a + b

    async def aio(x):
        await asyncio.sleep(0.001)
        return (x, MPI.COMM_WORLD.rank)

    def where(_):
        return MPI.COMM_WORLD.rank

    def double(a):
        assert a.flags.writeable and a.flags.aligned
        return a * 2

    async def main():
        async with async_wf.Runtime() as rt:
            assert type(rt.transport).__name__ == "MpiTransport", rt.transport
            # a chain and a fan-in over 300 tasks
            xs = [rt.submit(square, i) for i in range(200)]
            total = xs[0]
            for x in xs[1:]:
                total = rt.submit(add, total, x)
            assert await total == sum(i * i for i in range(200))
            print("OK chain")
            # async def tasks run on the worker ranks' loops
            got = await async_wf.gather(*[rt.submit(aio, i) for i in range(50)])
            assert [g[0] for g in got] == list(range(50))
            assert {g[1] for g in got} <= set(range(1, MPI.COMM_WORLD.size))
            print("OK async")
            # every worker rank takes work, the root none
            ranks = set(await async_wf.gather(*[rt.submit(where, i) for i in range(400)]))
            assert ranks == set(range(1, MPI.COMM_WORLD.size)), ranks
            print("OK spread")
            # NumPy arrays travel as MPI buffers and arrive aligned and writable
            a = np.random.default_rng(1).random((512, 256))
            b = await rt.submit(double, a)
            assert np.array_equal(b, a * 2) and b.dtype == a.dtype
            print("OK numpy")
            # errors keep their type; dependents fail with DependencyError
            bad = rt.submit(int, "x")
            after = rt.submit(add, bad, 1)
            try:
                await after
            except async_wf.DependencyError as exc:
                assert isinstance(exc.__cause__, ValueError)
                print("OK errors")
            st = rt.statistics()
            assert st["workers"] == MPI.COMM_WORLD.size - 1 and st["bytes_sent"] > a.nbytes
        # a second runtime on the same ranks
        async with async_wf.Runtime() as rt:
            assert await rt.submit(add, 2, 3) == 5
            print("OK second runtime")

    async_wf.run(main())
"""


@pytest.mark.parametrize("n", [2, 3])
def test_plain_tasks_and_dependencies(tmp_path: Path, n: int) -> None:
    assert oks(mpirun(tmp_path, n, PLAIN)) == {
        "chain", "async", "spread", "numpy", "errors", "second runtime"}


GANGS = """
    import os, time
    import numpy as np
    import async_wf
    from async_wf import task
    from async_wf.mpi import MpiTaskAborted, task_comm
    from mpi4py import MPI

    @task(mpi=2)
    def allsum(x, comm):
        return comm.allreduce(x * (comm.rank + 1))

    @task(mpi=3, mpi_gather=True)
    def members(tag):
        comm = task_comm()
        buf = np.zeros(1)
        comm.Allreduce(np.array([float(MPI.COMM_WORLD.rank)]), buf)
        return (comm.rank, comm.size, MPI.COMM_WORLD.rank, float(buf[0]), tag)

    @task(mpi=2)
    def boom(comm):
        if comm.rank == 1:
            raise ValueError("rank 1 fails")
        return comm.allreduce(1)  # rank 0 waits here until aborted

    @task(mpi=3, retries=1)
    def flaky(path, comm):
        # fails on rank 2 at the first attempt, passes at the second
        if comm.rank == 2 and not os.path.exists(path):
            open(path, "w").close()
            raise RuntimeError("first attempt")
        return comm.allreduce(comm.rank)

    @task(mpi=2, timeout=1.0)
    def stuck(comm):
        if comm.rank == 0:
            comm.barrier()  # rank 1 never comes: the timeout aborts rank 0
        else:
            time.sleep(1.5)

    def plain(i):
        time.sleep(0.002)
        return i

    async def main():
        async with async_wf.Runtime() as rt:
            assert await allsum(5) == 5 * 1 + 5 * 2
            print("OK allreduce")
            got = await members("t")
            assert [g[0] for g in got] == [0, 1, 2] and {g[1] for g in got} == {3}
            assert sorted(g[2] for g in got) == [1, 2, 3] and {g[3] for g in got} == {6.0}
            print("OK gather")
            try:
                await boom()
            except ValueError as exc:
                assert "rank 1 of 2" in " ".join(exc.__notes__), exc.__notes__
                print("OK raise")
            assert await allsum(1) == 3  # the ranks are usable again
            print("OK usable after abort")
            assert await flaky(os.path.join(os.getcwd(), "flaky-marker")) == 3
            print("OK retries")
            try:
                await stuck()
            except async_wf.TaskTimeoutError:
                print("OK timeout")
            # MPI tasks of sizes 1..3 mixed with plain tasks: no deadlock, all right
            futs = []
            for i in range(30):
                futs.append(rt.submit(plain, i))
                if i % 3 == 0:
                    futs.append(allsum(i))
                if i % 5 == 0:
                    futs.append(members(i))
            values = await async_wf.gather(*futs)
            assert len(values) == len(futs)
            assert [v for v in values if isinstance(v, int) and v < 30 and v >= 0]
            st = rt.statistics()
            assert st["mpi_tasks_aborted"] >= 2, st
            print("OK mixed")
            try:
                rt.submit(allsum.options(mpi=4), 1)
            except ValueError as exc:
                assert "needs mpi=4 ranks but this job has 3" in str(exc), exc
                print("OK too large")

    async_wf.run(main())
"""


def test_mpi_tasks(tmp_path: Path) -> None:
    got = oks(mpirun(tmp_path, 4, GANGS, timeout=180))
    assert got == {"allreduce", "gather", "raise", "usable after abort", "retries", "timeout",
                   "mixed", "too large"}


PROGRAM = """
    import sys
    from mpi4py import MPI
    c = MPI.COMM_WORLD
    total = c.allreduce(c.rank)
    if c.rank == 0:
        print("size", c.size, "sum", total, "arg", sys.argv[1])
        sys.stderr.write("to stderr\\n")
    sys.exit(int(sys.argv[2]) if c.rank == 0 else 0)
"""

PROGRAM_APP = """
    import sys
    import async_wf
    from async_wf import task

    PROG = sys.argv[1]

    @task(mpi=2, binary=sys.executable, args=[PROG, "{word}", "{code}"])
    def solver(word, code=0):
        pass

    async def main():
        opts = {"local": {}, "tcp": {"workers": 1}, "mpi": {}}[sys.argv[2]]
        async with async_wf.Runtime(**opts) as rt:
            res = await solver("hello")
            assert res.returncode == 0 and "size 2 sum 1 arg hello" in res.stdout, res
            assert "to stderr" in res.stderr
            print("OK program")
            try:
                await solver("bye", code=7)
            except async_wf.ProgramError as exc:
                assert exc.result.returncode == 7 and "to stderr" in str(exc), exc
                print("OK exit code")
            res = await rt.submit(async_wf.run_program, sys.executable, [PROG, "x", "0"],
                                  nprocs=2)
            assert "size 2" in res.stdout
            print("OK run_program")

    async_wf.run(main())
"""


@pytest.mark.parametrize("transport", ["local", "tcp", "mpi"])
def test_external_mpi_program(tmp_path: Path, transport: str) -> None:
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(PROGRAM))
    if transport == "mpi":
        # started from a worker rank of a running MPI job: a nested mpiexec
        got = oks(mpirun(tmp_path, 2, PROGRAM_APP, str(prog), "mpi"))
    else:
        app = tmp_path / "app.py"
        app.write_text(textwrap.dedent(PROGRAM_APP))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, str(app), str(prog), transport], env=env,
                              capture_output=True, text=True, timeout=LIMIT)
        got = oks(proc)
    assert got == {"program", "exit code", "run_program"}


def test_mpi_task_refused_without_the_mpi_transport() -> None:
    import asyncio

    import async_wf

    @async_wf.task(mpi=2)
    def f(comm: object) -> int:
        return 1

    async def main() -> None:
        async with async_wf.Runtime() as rt:
            with pytest.raises(ValueError, match="needs the MPI transport"):
                rt.submit(f)

    asyncio.run(main())


def test_run_inside_an_mpi4py_program(tmp_path: Path) -> None:
    app = """
        import async_wf
        import async_wf.mpi
        from mpi4py import MPI

        def who(x):
            return (x, MPI.COMM_WORLD.rank)

        async def main():
            async with async_wf.Runtime() as rt:
                return await async_wf.gather(*[rt.submit(who, i) for i in range(20)])

        # the application's own communication works before and after
        assert MPI.COMM_WORLD.allreduce(1) == MPI.COMM_WORLD.size
        got = async_wf.mpi.run(main, MPI.COMM_WORLD, root=1)
        root_ok = False
        if MPI.COMM_WORLD.rank == 1:
            assert [g[0] for g in got] == list(range(20))
            assert {g[1] for g in got} <= {0, 2}, got
            root_ok = True
        else:
            assert got is None
        # every rank gets on with the application; one rank prints, as the
        # lines of several ranks can interleave
        after = MPI.COMM_WORLD.gather((root_ok, MPI.COMM_WORLD.allreduce(1)), root=0)
        if MPI.COMM_WORLD.rank == 0:
            if any(a[0] for a in after):
                print("OK root", flush=True)
            for r, (_, size) in enumerate(after):
                if size == 3:
                    print("OK after", r, flush=True)
    """
    got = oks(mpirun(tmp_path, 3, app, launcher=False))
    assert got == {"root", "after 0", "after 1", "after 2"}


def test_application_error_ends_the_job(tmp_path: Path) -> None:
    app = """
        import async_wf

        async def main():
            async with async_wf.Runtime() as rt:
                await rt.submit(abs, -1)
            raise SystemExit("leaving with a message")

        async_wf.run(main())
    """
    proc = mpirun(tmp_path, 3, app)
    assert proc.returncode == 1 and "leaving with a message" in proc.stderr
    proc = mpirun(tmp_path, 2, "raise KeyError('nope')\n")
    assert proc.returncode == 1 and "KeyError: 'nope'" in proc.stderr


def test_a_dead_worker_rank_ends_the_job_not_hangs(tmp_path: Path) -> None:
    app = """
        import os, time
        import async_wf

        def die(x):
            if x == 3:
                os._exit(3)
            time.sleep(0.01)
            return x

        async def main():
            async with async_wf.Runtime() as rt:
                print("started", flush=True)
                await async_wf.gather(*[rt.submit(die, i) for i in range(10)])
                print("not reached", flush=True)

        async_wf.run(main())
    """
    t0 = time.monotonic()
    proc = mpirun(tmp_path, 3, app, timeout=60)
    assert proc.returncode != 0
    assert "started" in proc.stdout and "not reached" not in proc.stdout
    assert time.monotonic() - t0 < 30


RESUME = """
    import os, sys
    import async_wf

    @async_wf.task(mpi=2, mpi_gather=True)
    def solver(n, fail_at, marker, comm=None):
        ctx = async_wf.task_context()
        got = ctx.restore()
        # one write per line: mpiexec merges the ranks' output
        sys.stdout.write(f"RESTORED {ctx.rank} {ctx.nranks} {None if got is None else got[0]}\\n")
        sys.stdout.flush()
        start, x = got if got is not None else (-1, 0)
        for step in range(start + 1, n):
            x = comm.allreduce(x + step * (ctx.rank + 1))
            ctx.save(x, step)
            if step == fail_at and ctx.rank == 1 and not os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError(f"rank 1 fails at step {step}")
        return x

    async def main():
        retries = int(sys.argv[1])
        async with async_wf.Runtime(checkpoint="m.wfck") as rt:
            try:
                print("VALUES", await rt.submit(solver.options(retries=retries), 8, 3,
                                                sys.argv[2]), flush=True)
            except RuntimeError as exc:
                print("FAILED", exc, flush=True)

    async_wf.run(main())
"""


def serial_solver(n: int) -> int:
    x = 0
    for step in range(n):
        x = 2 * x + 3 * step  # allreduce over ranks 0 and 1 of x + step * (rank + 1)
    return x


def restored(out: str) -> set[tuple[int, str]]:
    return {(int(line.split()[1]), line.split()[3]) for line in out.splitlines()
            if line.startswith("RESTORED")}


def test_mpi_task_resumes_from_its_last_complete_step(tmp_path: Path) -> None:
    want = serial_solver(8)
    # a retry in the same run: rank 1 fails after saving step 3; the retry
    # starts on both ranks from the last step both saved (3, or 2 if rank 0's
    # save of 3 came after the failure)
    proc = mpirun(tmp_path, 3, RESUME, "1", str(tmp_path / "m1"))
    assert proc.returncode == 0, proc.stderr
    assert f"VALUES [{want}, {want}]" in proc.stdout, proc.stdout
    steps = restored(proc.stdout)
    assert {(0, "None"), (1, "None")} <= steps, proc.stdout
    again = steps - {(0, "None"), (1, "None")}
    assert len(again) == 2 and {s for _, s in again} in ({"3"}, {"2"}), steps

    # across runs: the first job fails the task, the second resumes it
    proc = mpirun(tmp_path, 3, RESUME.replace("m.wfck", "m2.wfck"), "0", str(tmp_path / "m2"))
    assert proc.returncode == 0, proc.stderr
    assert "FAILED rank 1 fails at step 3" in proc.stdout, proc.stdout
    proc = mpirun(tmp_path, 3, RESUME.replace("m.wfck", "m2.wfck"), "0", str(tmp_path / "m2"))
    assert proc.returncode == 0, proc.stderr
    assert f"VALUES [{want}, {want}]" in proc.stdout, proc.stdout
    steps = restored(proc.stdout)
    assert {s for _, s in steps} in ({"3"}, {"2"}), steps


MAIN_VALUES = """
    import dataclasses
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
        async with async_wf.Runtime() as rt:
            print("OK x", await rt.submit(get_x, Point(3)))
            print("OK fn", await rt.submit(scale, Point(2), triple))

    async_wf.run(main())
"""


LEARNT_QUICK = """
    import time
    import async_wf

    def nap(seconds):
        time.sleep(seconds)

    async def main():
        async with async_wf.Runtime() as rt:
            for _ in range(20):  # one at a time: the rank learns that sleep(0) is short
                await rt.submit(time.sleep, 0)
            t0 = time.monotonic()
            at = []
            quick = [rt.submit(time.sleep, 0) for _ in range(2)]
            for f in quick:
                f.add_done_callback(lambda _: at.append(time.monotonic() - t0))
            slow = rt.submit(time.sleep, 1.5)
            await async_wf.gather(*quick)
            await slow
            took = time.monotonic() - t0
            assert took >= 1.5 and max(at) < 0.5, (at, took)
            print("OK quick first")
            # the slow call first: the calls behind it in its batch go on
            for _ in range(20):
                await rt.submit(nap, 0)
            t0 = time.monotonic()
            at = []
            slow = rt.submit(nap, 1.5)
            quick = [rt.submit(nap, 0) for _ in range(2)]
            for f in quick:
                f.add_done_callback(lambda _: at.append(time.monotonic() - t0))
            await async_wf.gather(*quick)
            await slow
            took = time.monotonic() - t0
            assert took >= 1.5 and max(at) < 0.5, (at, took)
            print("OK slow first")

    async_wf.run(main())
"""


def test_instances_and_functions_of_main_travel_as_arguments(tmp_path: Path) -> None:
    # issue 17.2: "Can't get attribute 'Point'" on the worker ranks
    assert oks(mpirun(tmp_path, 2, MAIN_VALUES)) == {"x 3", "fn 6"}


def test_a_slow_call_of_a_function_learnt_as_quick_holds_no_other_task(tmp_path: Path) -> None:
    # the worker ranks run tasks with the TCP worker's code (MpiWorker)
    assert oks(mpirun(tmp_path, 2, LEARNT_QUICK)) == {"quick first", "slow first"}


RESOURCES = """
    import time
    import async_wf
    from mpi4py import MPI

    def held(s):
        t0 = time.time()
        time.sleep(s)
        return MPI.COMM_WORLD.rank, t0, time.time(), async_wf.task_context().resources

    async def main():
        async with async_wf.Runtime() as rt:
            futs = [rt.options(cores=1 + i % 2).submit(held, 0.03) for i in range(16)]
            spans = await async_wf.gather(*futs)
            for rank in {s[0] for s in spans}:
                mine = [s for s in spans if s[0] == rank]
                for _r, t0, _t1, _res in mine:
                    # the cores held at each start never exceed the rank's 2 slots
                    at = sum(s[3]["cores"] for s in mine if s[1] <= t0 < s[2])
                    assert at <= 2, (rank, at, mine)
            assert {s[0] for s in spans} == {1, 2}
            print("OK fit")
            try:
                await rt.options(cores=3).submit(held, 0)
            except async_wf.ResourceError as exc:
                assert "cores=3" in str(exc)
                print("OK unfit")

    async_wf.run(main())
"""


def test_resource_tasks_on_mpi_ranks(tmp_path: Path) -> None:
    # worker ranks declare their --slots as cores (they join without a handshake)
    assert oks(mpirun(tmp_path, 3, RESOURCES, slots=2)) == {"fit", "unfit"}
