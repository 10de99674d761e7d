"""``Executor`` in MPI mode, under a real mpiexec: what ``MPIPoolExecutor`` users rely on.

The application runs with ``mpiexec -n 4 python -m async_wf.mpi app.py``:
rank 0 runs it, ranks 1-3 serve. It checks each behaviour itself and prints
``OK <name>``; the test checks which lines came out (issue 17).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py (make test installs it)")

from tests.unit.test_mpi import mpirun, oks

# runs in the first pass only (core_independent): the Executor face on MPI ranks; the scheduling
# is tested elsewhere
pytestmark = pytest.mark.core_independent

APP = """
    import gc, os, threading, time
    import concurrent.futures as cf
    from mpi4py import MPI
    import async_wf

    def rank(_=None):
        return MPI.COMM_WORLD.rank

    def slow_rank(t):
        time.sleep(t)
        return MPI.COMM_WORLD.rank

    def add(a, b):
        return a + b

    def boom(x):
        raise KeyError(x)

    # the worker ranks run the tasks, all three by default
    with async_wf.Executor() as ex:
        assert ex.num_workers == 3, ex.num_workers
        seen = set(ex.map(slow_rank, [0.05] * 12))
        assert seen == {1, 2, 3}, seen
    print("OK default uses every worker rank")

    # max_workers=N: N worker ranks, as MPIPoolExecutor(max_workers=N)
    with async_wf.Executor(max_workers=2) as ex:
        assert ex.num_workers == 2, ex.num_workers
        seen = set(ex.map(slow_rank, [0.05] * 12))
        assert seen == {1, 2}, seen
    print("OK max_workers ranks")

    # one executor after another
    for i in range(3):
        with async_wf.Executor() as ex:
            assert ex.submit(add, i, 1).result(timeout=30) == i + 1
    print("OK executors in sequence")

    # an executor dropped without shutdown() does not keep the ranks
    ex = async_wf.Executor()
    assert ex.submit(add, 1, 1).result(timeout=30) == 2
    running = ex.submit(slow_rank, 0.5)  # still running when it is dropped
    del ex
    gc.collect()
    t0 = time.monotonic()
    with async_wf.Executor() as ex:
        assert ex.submit(add, 2, 2).result(timeout=30) == 4
    assert time.monotonic() - t0 < 20
    assert running.result(timeout=30) in (1, 2, 3)  # it finished, and then let go
    print("OK dropped executor releases the ranks")

    with async_wf.Executor(max_workers=1) as ex:
        # futures as arguments are dependencies
        a = ex.submit(add, 1, 2)
        b = ex.submit(add, a, 10)
        assert b.result(timeout=30) == 13
        # an exception comes back as itself, with the rank's traceback as cause
        f = ex.submit(boom, "k")
        try:
            f.result(timeout=30)
        except KeyError as exc:
            assert exc.args == ("k",)
            assert "boom" in str(exc.__cause__), exc.__cause__
        else:
            raise AssertionError("no KeyError")
        # starmap, unordered map, bootup
        assert list(ex.starmap(add, [(1, 2), (3, 4)])) == [3, 7]
        assert sorted(ex.map(add, [1, 2, 3], [1, 1, 1], unordered=True)) == [2, 3, 4]
        assert ex.bootup() is ex
        # cancel works until a task starts: one rank, one slot, its queue
        # full of slow calls: the last submitted has not started. The rank
        # takes dozens ahead (64 here), which shutdown lets finish: 0.02 s
        # each keeps that wait short while 200 of them still take 4 s
        busy = [ex.submit(slow_rank, 0.02) for _ in range(200)]
        late = ex.submit(add, 0, 0)
        assert late.cancel() and late.cancelled()
        ex.shutdown(cancel_futures=True)
        assert any(f.cancelled() for f in busy), "nothing cancelled"
        assert not any(f.cancelled() for f in busy[:1])
    print("OK futures, errors, maps, cancel")
"""


def test_executor_on_the_ranks_of_an_mpi_launch(tmp_path: Path) -> None:
    assert oks(mpirun(tmp_path, 4, APP)) == {
        "default uses every worker rank",
        "max_workers ranks",
        "executors in sequence",
        "dropped executor releases the ranks",
        "futures, errors, maps, cancel",
    }


def test_max_workers_beyond_the_worker_ranks_is_refused(tmp_path: Path) -> None:
    app = """
        import async_wf
        try:
            async_wf.Executor(max_workers=5)
        except ValueError as exc:
            assert "ranks must be an int from 1 to the job's 2 worker rank(s)" in str(exc), exc
            assert "got 5" in str(exc), exc
            print("OK refused")
    """
    assert oks(mpirun(tmp_path, 3, app)) == {"refused"}
