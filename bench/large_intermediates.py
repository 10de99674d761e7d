"""Large intermediates: results that stay on their worker against results through the scheduler.

Two graphs of NumPy arrays (float64, ``--mib`` MiB each, 16 by default) on
W TCP workers (default 2):

* ``pipeline``: ``--links`` tasks (100), the first making a random array,
  each next one adding 1 to its input (``a + 1``), the application awaiting
  the last one;
* ``fanin``: ``--fan`` independent tasks (16) each making a random array, one task
  summing them all, the application awaiting the sum.

async_wf runs both twice in the same invocation, alternating run by run:
``Runtime(workers=W, keep_min=0)`` ("before": every result goes through the
scheduler, as before issue 19) and ``Runtime(workers=W)`` ("after": results
of at least 64 KiB stay on the worker that made them; dependents run there
or fetch them worker to worker). Per run: the wall time (first submit to the
awaited value) and the bytes through the scheduler's connections
(``bytes_sent + bytes_received`` of ``rt.statistics()``, the difference over
the run). The table gives the medians and ``after / before``.

Dask (``distributed``: LocalCluster, W worker processes of one thread) and
Ray (``num_cpus=W``) run the same graphs afterwards when they import; their
schedulers never carry task data (the client fetches from the workers), so
their bytes column is "n/a". The application's loop is uvloop's when
installed (``--loop asyncio`` for the stock one: on Python 3.11 it sends
frames of more than about 16 MiB several times slower). Every result is checked. The arrays are
random (seeded): async_wf compresses buffers with lz4 when that pays, so
arrays of zeros would cross any connection almost for free.

``--transport mpi`` runs async_wf alone over the worker ranks of an MPI job
instead (the script starts itself again under the mpich wheel's ``mpiexec -n
W+1 python -m async_wf.mpi``): ``MpiTransport(keep_min=0)`` against the
default, each run on a runtime of its own (one runtime holds the ranks at a
time; an MPI runtime starts in microseconds), the bytes being those of the
root rank's channel.

Usage: python bench/large_intermediates.py [--mib 16] [--links 100] [--fan 16]
       [--workers 2] [--seed 0] [--loop uvloop] [--repeat 3]
       [--systems async_wf,dask,ray] [--transport tcp|mpi] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SYSTEMS = ("async_wf", "dask", "ray")
GRAPHS = ("pipeline", "fanin")


def rand(n: int, seed: int) -> np.ndarray:
    """A seeded array of ``n`` float64 in [0, 1): random, so lz4 cannot shrink it."""
    return np.random.default_rng(seed).random(n)


def inc(a: np.ndarray) -> np.ndarray:
    """One pipeline link: a new array, the input plus one."""
    return a + 1


def total(*arrays: np.ndarray) -> np.ndarray:
    """The fan-in's reduction: the element-wise sum of its inputs."""
    out = arrays[0].copy()
    for a in arrays[1:]:
        out += a
    return out


def expected(n: int, links: int, fan: int, seed: int) -> dict[str, np.ndarray]:
    """The first and last elements each graph must give, computed here."""
    ends = [0, -1]
    fanin = sum(rand(n, seed + 1 + i)[ends] for i in range(fan))
    return {"pipeline": rand(n, seed)[ends] + (links - 1), "fanin": np.asarray(fanin)}


def check(graph: str, value: np.ndarray, n: int, want: dict[str, np.ndarray]) -> None:
    """Raise if ``value`` is not what ``graph`` must give."""
    if value.shape != (n,) or not np.allclose(value[[0, -1]], want[graph]):
        raise AssertionError(f"{graph}: wrong result (shape {value.shape}, ends "
                             f"{value[[0, -1]]}, want {want[graph]})")


Runner = Callable[[str], tuple[float, int | None]]


def new_loop(uv: bool) -> asyncio.AbstractEventLoop:
    """uvloop's loop (what ``async_wf.run`` uses) when ``uv`` and installed, else asyncio's."""
    if uv:
        with contextlib.suppress(ImportError):
            import uvloop

            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _async_wf(workers: int, keep_min: int | None, uv: bool, n: int, links: int,
              fan: int, seed: int,
              want: dict[str, np.ndarray]) -> tuple[Runner, Callable[[], None]]:
    import async_wf

    loop = new_loop(uv)
    kw: dict[str, Any] = {} if keep_min is None else {"keep_min": keep_min}
    rt = async_wf.Runtime(workers=workers, **kw)
    loop.run_until_complete(rt.start())

    def through() -> int:
        s = rt.statistics()
        return int(s["bytes_sent"]) + int(s["bytes_received"])

    async def graph(name: str) -> np.ndarray:
        if name == "pipeline":
            f = rt.submit(rand, n, seed)
            for _ in range(links - 1):
                f = rt.submit(inc, f)
            return await f
        leaves = [rt.submit(rand, n, seed + 1 + i) for i in range(fan)]
        return await rt.submit(total, *leaves)

    def run(name: str) -> tuple[float, int | None]:
        b0 = through()
        t0 = time.perf_counter()
        value = loop.run_until_complete(graph(name))
        dt = time.perf_counter() - t0
        check(name, value, n, want)
        return dt, through() - b0

    def stop() -> None:
        loop.run_until_complete(rt.close())
        loop.close()

    return run, stop


def _dask(workers: int, n: int, links: int, fan: int, seed: int,
          want: dict[str, np.ndarray]) -> tuple[Runner, Callable[[], None]]:
    import logging

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)

    def run(name: str) -> tuple[float, int | None]:
        t0 = time.perf_counter()
        if name == "pipeline":
            f = client.submit(rand, n, seed, pure=False)
            for _ in range(links - 1):
                f = client.submit(inc, f, pure=False)
        else:
            leaves = [client.submit(rand, n, seed + 1 + i, pure=False) for i in range(fan)]
            f = client.submit(total, *leaves, pure=False)
        value = f.result()
        dt = time.perf_counter() - t0
        check(name, value, n, want)
        return dt, None

    def stop() -> None:
        client.close()
        cluster.close()

    return run, stop


def _ray(workers: int, n: int, links: int, fan: int, seed: int,
         want: dict[str, np.ndarray]) -> tuple[Runner, Callable[[], None]]:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    r_rand, r_inc = ray.remote(num_cpus=1)(rand), ray.remote(num_cpus=1)(inc)
    r_total = ray.remote(num_cpus=1)(total)

    def run(name: str) -> tuple[float, int | None]:
        t0 = time.perf_counter()
        if name == "pipeline":
            ref = r_rand.remote(n, seed)
            for _ in range(links - 1):
                ref = r_inc.remote(ref)
        else:
            ref = r_total.remote(*[r_rand.remote(n, seed + 1 + i) for i in range(fan)])
        value = ray.get(ref)
        dt = time.perf_counter() - t0
        check(name, value, n, want)
        return dt, None

    return run, ray.shutdown


def _async_wf_mpi(keep_min: int | None, n: int, links: int, fan: int, seed: int,
                  want: dict[str, np.ndarray]) -> tuple[Runner, Callable[[], None]]:
    """Like ``_async_wf``, over the worker ranks of this MPI job: a runtime per run."""
    import async_wf
    from async_wf._mpi_channel import new_event_loop
    from async_wf.transport.mpi import MpiTransport

    loop = new_event_loop()  # the loop that polls MPI, as the launcher's
    kw: dict[str, Any] = {} if keep_min is None else {"keep_min": keep_min}

    async def graph(name: str) -> tuple[np.ndarray, float, int]:
        async with async_wf.Runtime(transport=MpiTransport(**kw)) as rt:
            t0 = time.perf_counter()
            if name == "pipeline":
                f = rt.submit(rand, n, seed)
                for _ in range(links - 1):
                    f = rt.submit(inc, f)
            else:
                leaves = [rt.submit(rand, n, seed + 1 + i) for i in range(fan)]
                f = rt.submit(total, *leaves)
            value = await f
            dt = time.perf_counter() - t0
            s = rt.statistics()
            return value, dt, int(s["bytes_sent"]) + int(s["bytes_received"])

    def run(name: str) -> tuple[float, int | None]:
        value, dt, nbytes = loop.run_until_complete(graph(name))
        check(name, value, n, want)
        return dt, nbytes

    return run, loop.close


def summarise(label: str, samples: dict[str, list[tuple[float, int | None]]]) -> dict[str, Any]:
    """Median, min and max of the wall times and the median bytes, per graph."""
    out: dict[str, Any] = {"system": label, "status": "ok"}
    for g, xs in samples.items():
        times = [t for t, _ in xs]
        nbytes = [b for _, b in xs if b is not None]
        out[g] = {"wall_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                  "samples_s": times,
                  "bytes_through_scheduler": statistics.median(nbytes) if nbytes else None}
    return out


def measure_async_wf(workers: int, uv: bool, n: int, links: int, fan: int, seed: int,
                     want: dict[str, np.ndarray], repeat: int,
                     mpi: bool = False) -> list[dict[str, Any]]:
    """Before (keep_min=0) and after (default) on two runtimes, alternating run by run."""
    sides = {"async_wf keep_min=0": 0, "async_wf default": None}
    started = {k: _async_wf_mpi(v, n, links, fan, seed, want) if mpi
               else _async_wf(workers, v, uv, n, links, fan, seed, want)
               for k, v in sides.items()}
    samples: dict[str, dict[str, list[tuple[float, int | None]]]] = {
        k: {g: [] for g in GRAPHS} for k in sides}
    try:
        for run, _ in started.values():  # warm-up: workers up, functions imported
            for g in GRAPHS:
                run(g)
        for _ in range(repeat):
            for k, (run, _) in started.items():
                for g in GRAPHS:
                    samples[k][g].append(run(g))
    finally:
        for _, stop in started.values():
            stop()
    return [summarise(k, samples[k]) for k in sides]


def measure_peer(system: str, workers: int, n: int, links: int, fan: int, seed: int,
                 want: dict[str, np.ndarray], repeat: int) -> dict[str, Any]:
    """One peer: start it, one warm-up of each graph, then ``repeat`` runs of each."""
    starter = _dask if system == "dask" else _ray
    try:
        run, stop = starter(workers, n, links, fan, seed, want)
    except ImportError as exc:
        return {"system": system, "status": "not installed", "reason": str(exc)}
    samples: dict[str, list[tuple[float, int | None]]] = {g: [] for g in GRAPHS}
    try:
        for g in GRAPHS:
            run(g)
        for _ in range(repeat):
            for g in GRAPHS:
                samples[g].append(run(g))
    except Exception as exc:  # a peer that fails is reported, never dropped
        return {"system": system, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        stop()
    return summarise(system, samples)


def _mb(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 1e6:,.0f}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=float, default=16.0, help="MiB per array (default 16)")
    p.add_argument("--links", type=int, default=100, help="pipeline tasks (default 100)")
    p.add_argument("--fan", type=int, default=16, help="fan-in leaves (default 16)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="array i is default_rng(seed + i)")
    p.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"],
                   help="the application's loop for async_wf (default uvloop, as async_wf.run)")
    p.add_argument("--repeat", type=int, default=3, help="measured runs after one warm-up")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--transport", default="tcp", choices=["tcp", "mpi"],
                   help="async_wf's workers: TCP processes (default), or the worker ranks "
                   "of an MPI job (async_wf only)")
    p.add_argument("--quick", action="store_true", help="1 MiB arrays, 10 links, 4 leaves, "
                   "one run, async_wf only unless --systems says otherwise")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    if args.quick:
        args.mib, args.links, args.fan, args.repeat = 1.0, 10, 4, 1
        if "--systems" not in given:
            args.systems = "async_wf"
    mpi = args.transport == "mpi"
    if mpi:
        if "--systems" in given and args.systems != "async_wf":
            p.error("--transport mpi measures async_wf alone (--systems async_wf)")
        args.systems = "async_wf"
        from async_wf._mpi_session import current_session

        if current_session() is None:
            # not under the launcher yet: start this script again as an MPI job
            from async_wf._program import find_mpiexec

            return subprocess.call(
                [find_mpiexec(), "-n", str(args.workers + 1), sys.executable, "-m",
                 "async_wf.mpi", os.path.abspath(__file__), *given],
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     os.environ.get("PYTHONPATH", "")])})
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        p.error(f"--systems must name some of {', '.join(SYSTEMS)}; got {args.systems!r}")
    if args.links < 2 or args.fan < 1 or args.workers < 1 or args.repeat < 1:
        p.error(f"--links must be >= 2 and --fan, --workers, --repeat >= 1; got {args.links}, "
                f"{args.fan}, {args.workers}, {args.repeat}")
    n = int(args.mib * (1 << 20)) // 8
    if n < 1:
        p.error(f"--mib must give at least one float64, got {args.mib}")
    want = expected(n, args.links, args.fan, args.seed)
    results: list[dict[str, Any]] = []
    if "async_wf" in systems:
        results += measure_async_wf(args.workers, args.loop == "uvloop", n, args.links,
                                    args.fan, args.seed, want, args.repeat, mpi)
    for s in systems:
        if s != "async_wf":
            results.append(measure_peer(s, args.workers, n, args.links, args.fan, args.seed,
                                        want, args.repeat))
    ratios: dict[str, dict[str, float]] = {}
    by = {r["system"]: r for r in results if r["status"] == "ok"}
    before, after = by.get("async_wf keep_min=0"), by.get("async_wf default")
    if before and after:
        for g in GRAPHS:
            bb, ab = before[g]["bytes_through_scheduler"], after[g]["bytes_through_scheduler"]
            ratios[g] = {"wall": after[g]["wall_s"] / before[g]["wall_s"],
                         "bytes": ab / bb if bb else float("nan")}
    if args.json:
        print(json.dumps({"mib": args.mib, "seed": args.seed, "loop": args.loop,
                          "transport": args.transport,
                          "links": args.links, "fan": args.fan,
                          "workers": args.workers, "repeat": args.repeat,
                          "results": results, "after_over_before": ratios}))
        return 0
    print(f"pipeline: {args.links} tasks of {args.mib:g} MiB arrays, each a + 1 of the last; "
          f"fanin: {args.fan} arrays of {args.mib:g} MiB summed by one task; "
          f"{args.workers} {'worker ranks (MPI)' if mpi else 'TCP workers'}, "
          f"median of {args.repeat}")
    print(f"{'system':<20} {'graph':<9} {'wall s':>8} {'min-max s':>13} {'MB via sched':>13}")
    for r in results:
        if r["status"] != "ok":
            print(f"{r['system']:<20} {r['status']}: {r.get('reason', '')}")
            continue
        for g in GRAPHS:
            x = r[g]
            print(f"{r['system']:<20} {g:<9} {x['wall_s']:>8.3f} "
                  f"{x['min_s']:>6.2f}-{x['max_s']:<6.2f} {_mb(x['bytes_through_scheduler']):>13}")
    for g, q in ratios.items():
        print(f"after / before, {g}: wall {q['wall']:.3f}, bytes through the scheduler "
              f"{q['bytes']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
