"""Results that stay on their rank (issue 19) under a real mpiexec: 1 root + 2 worker ranks.

The application checks each value itself and prints ``OK <name>`` lines;
what went where is read from byte counters: the root's channel
(``rt.statistics()``: everything through the scheduler's rank) and each
worker rank's own (``transfer_counters()``, asked of both ranks at once by
an ``mpi=2`` task that gathers them, with ``held_keys()``: what a rank
still holds).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py (make test installs it)")

from tests.unit.test_mpi import mpirun, oks

pytestmark = pytest.mark.core_independent

HELD = """
    import asyncio, gc, time
    import numpy as np
    import async_wf
    from async_wf import task
    from async_wf._held import transfer_counters
    from async_wf.mpi import held_keys
    from async_wf.transport.mpi import MpiTransport
    from mpi4py import MPI

    MIB = 1 << 20

    def make(i, mib=2):
        # random: the ranks compress what they send the root when that pays,
        # and arrays of one value would cross for free, counters and all
        return np.random.default_rng(i).random(mib * MIB // 8) + i

    def inc(a):
        return a + 1

    def chain(k):
        a = make(0)
        for _ in range(k):
            a = inc(a)
        return a

    def rank_of(a):
        return MPI.COMM_WORLD.rank, float(a[0])

    def made_on(i):
        import time
        time.sleep(0.05)  # long enough that the batch spreads over both ranks
        return make(i), MPI.COMM_WORLD.rank

    def sleepy(a, seconds):
        import time
        time.sleep(seconds)
        return MPI.COMM_WORLD.rank

    def first(pair):
        return pair[0]

    def total(*arrs):
        return float(sum(a.sum() for a in arrs)), MPI.COMM_WORLD.rank

    @task(mpi=2, mpi_gather=True)
    def counters(comm):
        return MPI.COMM_WORLD.rank, transfer_counters(), held_keys()

    @task(mpi=2, mpi_gather=True)
    def gang_sum(a, comm):
        # a large input held on one rank: each rank of the task gets it
        return comm.allreduce(float(a.sum())), np.full(MIB // 8, comm.rank + 1.0)

    async def ranks(rt):
        got = await counters()
        return {r: (c, keys) for r, c, keys in got}

    async def main():
        n = 2 * MIB // 8
        async with async_wf.Runtime(transport=MpiTransport()) as rt:
            # a pipeline: every link on the rank that holds its input
            x = rt.submit(make, 0)
            for _ in range(20):
                x = rt.submit(inc, x)
            where = [await rt.submit(rank_of, x) for _ in range(3)]
            got = await x
            st = rt.statistics()
            assert np.array_equal(got, chain(20))
            assert len({w[0] for w in where}) == 1 and int(where[0][1]) == 20, where
            # 21 arrays of 2 MiB were made; one came to the application
            assert st["bytes_received"] < 3 * MIB, st
            assert st["bytes_sent"] < MIB, st
            assert got.nbytes <= st["bytes_fetched"] < got.nbytes + 4096, st
            assert st["results_held"] >= 1, st
            print("OK pipeline stays on its rank")

            # parts made on both ranks, summed by one task: the other rank's
            # parts go rank to rank, not through the root
            before = await ranks(rt)
            st0 = rt.statistics()
            parts = [rt.submit(made_on, i) for i in range(8)]
            made = {p[0] for p in await async_wf.gather(
                *[rt.submit(rank_of, rt.submit(first, p)) for p in parts])}
            arrays = [rt.submit(first, p) for p in parts]
            s, summer = await rt.submit(total, *arrays)
            after = await ranks(rt)
            st1 = rt.statistics()
            assert s == float(sum(make(i).sum() for i in range(8))), s
            assert made == {1, 2}, made
            other = 3 - summer
            served = after[other][0]["bytes_served"] - before[other][0]["bytes_served"]
            fetched = after[summer][0]["bytes_fetched"] - before[summer][0]["bytes_fetched"]
            moved = (st1["bytes_received"] - st0["bytes_received"]
                     + st1["bytes_sent"] - st0["bytes_sent"])
            # at least one 2 MiB part of the other rank went rank to rank
            assert fetched >= 2 * MIB and served >= fetched, (served, fetched)
            assert moved < MIB, moved
            print("OK rank to rank", fetched, moved)

            # the application awaits a held result, or asks result() for one
            fut = rt.submit(make, 3)
            while not fut.done():  # no callback: nobody waits, so it is not fetched yet
                await asyncio.sleep(0.01)
            assert type(fut).__name__ == "TaskFuture"
            f0 = rt.statistics()["bytes_fetched"]
            a = fut.result()  # blocking: fetched on the blocking fetch's tags
            assert np.array_equal(a, make(3)) and a.flags.writeable
            assert fut.result() is a
            assert rt.statistics()["bytes_fetched"] - f0 >= a.nbytes
            b = await rt.submit(make, 4)
            assert np.array_equal(b, make(4))
            print("OK application fetch")

            # the holder's loop serves a fetch while its slot runs a long task
            h = rt.submit(make, 5)
            busy = rt.submit(sleepy, h, 2.0)  # runs where h is
            await asyncio.sleep(0.3)
            holder = h._held.wid  # the rank that holds it
            t0 = time.monotonic()
            assert np.array_equal(await h, make(5))
            waited = time.monotonic() - t0
            assert waited < 1.0 and not busy.done(), waited
            assert await busy == holder
            print("OK served while busy")

            # an MPI task takes a held input on both ranks; its result comes back whole
            h = rt.submit(make, 1)
            red, pieces = zip(*await gang_sum(h))
            assert red == (2 * float(make(1).sum()),) * 2, red
            assert [float(p[0]) for p in pieces] == [1.0, 2.0]
            print("OK mpi task with a held input")

            # what nobody needs is freed on its rank
            del x, got, parts, arrays, fut, a, b, h
            gc.collect()
            await asyncio.sleep(0.2)
            assert rt.statistics()["results_held"] == 0, rt.statistics()
            left = await ranks(rt)
            assert all(keys == [] for _c, keys in left.values()), left
            print("OK freed")

        # before: keep_min=0 sends every result to the root
        async with async_wf.Runtime(transport=MpiTransport(keep_min=0)) as rt:
            x = rt.submit(make, 0)
            for _ in range(5):
                x = rt.submit(inc, x)
            assert np.array_equal(await x, chain(5))
            st = rt.statistics()
            assert st["results_held"] == 0, st
            assert st["bytes_received"] > 6 * 2 * MIB and st["bytes_sent"] > 5 * 2 * MIB, st
            print("OK keep_min=0")

    async_wf.run(main())
"""


def test_results_stay_on_their_rank(tmp_path: Path) -> None:
    got = oks(mpirun(tmp_path, 3, HELD, timeout=180))
    assert {g.split()[0] if g.startswith("rank to rank") else g for g in got} >= {
        "pipeline stays on its rank", "application fetch", "mpi task with a held input",
        "freed", "keep_min=0", "served while busy"}
    assert any(g.startswith("rank to rank") for g in got), got


DAG = """
    import asyncio, gc, random
    import numpy as np
    import async_wf
    from async_wf import task
    from async_wf.mpi import held_keys
    from async_wf.transport.mpi import MpiTransport
    from mpi4py import MPI

    def leaf(i):
        return np.random.default_rng(i).random(20000 + i)  # 160 KB: held

    def comb(*xs):
        n = min(len(x) for x in xs)
        return sum(x[:n] for x in xs) / len(xs) + 1

    @task(mpi=3, mpi_gather=True)
    def holding(comm):
        return held_keys()

    async def main():
        rng = random.Random(5)
        async with async_wf.Runtime(transport=MpiTransport()) as rt:
            # a random graph over 3 worker ranks: inputs on 1 to 4 ranks each
            futs, local = [], []
            for i in range(30):
                futs.append(rt.submit(leaf, i))
                local.append(leaf(i))
            for _ in range(200):
                idx = [rng.randrange(len(futs)) for _ in range(rng.randint(1, 4))]
                futs.append(rt.submit(comb, *[futs[i] for i in idx]))
                local.append(comb(*[local[i] for i in idx]))
            pick = [rng.randrange(len(futs)) for _ in range(40)]
            got = await asyncio.gather(*[futs[i] for i in pick])
            assert all(np.array_equal(g, local[i]) for i, g in zip(pick, got))
            st = rt.statistics()
            assert st["results_held"] > 0 and st["bytes_received"] < st["bytes_held"] / 2, st
            print("OK random graph")
            del futs, got
            gc.collect()
            await asyncio.sleep(0.3)
            assert rt.statistics()["results_held"] == 0
            assert await holding() == [[], [], []]
            print("OK all freed")

    async_wf.run(main())
"""


def test_a_random_graph_over_three_ranks(tmp_path: Path) -> None:
    assert oks(mpirun(tmp_path, 4, DAG, timeout=180)) == {"random graph", "all freed"}


OPTIONS = """
    import asyncio
    import numpy as np
    import async_wf
    from async_wf.transport.mpi import MpiTransport

    KIB = 1 << 10

    def make(i, kib):
        return np.random.default_rng(i).random(kib * KIB // 8)

    def sizes(*arrs):
        return [a.nbytes for a in arrs]

    async def main():
        # keep_min=0 through Runtime: every result comes to the root
        async with async_wf.Runtime(transport="mpi", keep_min=0) as rt:
            assert isinstance(rt._transport, MpiTransport)
            a = rt.submit(make, 0, 2048)
            assert await rt.submit(sizes, a) == [2048 * KIB]
            st = rt.statistics()
            assert st["results_held"] == 0 and st["bytes_received"] > 2048 * KIB, st
            print("OK keep_min=0")

        # a threshold above the default: 512 KiB comes back, 2 MiB stays
        async with async_wf.Runtime(transport="mpi", keep_min=1 << 20) as rt:
            small, big = rt.submit(make, 1, 512), rt.submit(make, 2, 2048)
            assert await rt.submit(sizes, small, big) == [512 * KIB, 2048 * KIB]
            st = rt.statistics()
            assert st["results_held"] == 1, st
            assert 512 * KIB <= st["bytes_received"] < 1024 * KIB, st
            print("OK keep_min=1 MiB")

        # no transport named: an option both transports have keeps the launch's
        async with async_wf.Runtime(keep_min=0) as rt:
            assert isinstance(rt._transport, MpiTransport), rt._transport
            assert np.array_equal(await rt.submit(make, 3, 256), make(3, 256))
            assert rt.statistics()["results_held"] == 0
            print("OK launch default")

        # an option only TCP workers have is still refused, by name
        try:
            async_wf.Runtime(transport="mpi", keep_min=0, slots=2)
        except ValueError as e:
            assert "slots" in str(e) and "keep_min" in str(e), e
            print("OK tcp-only refused")

    async_wf.run(main())
"""


def test_runtime_options_reach_the_mpi_transport(tmp_path: Path) -> None:
    # Runtime(transport="mpi", keep_min=...) was refused as a TCP option (issue 19)
    assert oks(mpirun(tmp_path, 2, OPTIONS, timeout=120)) == {
        "keep_min=0", "keep_min=1 MiB", "launch default", "tcp-only refused"}
