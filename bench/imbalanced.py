"""Imbalanced work: a heavy-tailed mix of short and long tasks on W workers (issue 18).

N independent tasks, each ``time.sleep(d)``: with probability ``--p-long``
(default 10 %) d is ``--long`` (100 ms), else ``--short`` (1 ms), drawn from
a seeded generator, so every system runs the same list in the same order.
A sleeping task holds its worker as a computing one would, and costs the
same on every system, so what differs is placement: a system that queues
short tasks behind a long one on a busy worker while another idles ends
later.

The figure is the makespan (first submit to last result) against the ideal,
the total work divided by the W workers, measured in the same run:
``ratio = makespan / ideal`` (1.0 is perfect packing; lower is better).
Systems: async_wf over TCP workers and ProcessPoolExecutor always; Dask
(``distributed``) and Ray when installed (``pip install .[peers]``).

Usage: python bench/imbalanced.py [--n 2000] [--workers 2] [--seed 0]
       [--systems async_wf-tcp,procpool,dask,ray] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

SYSTEMS = ("async_wf-tcp", "procpool", "dask", "ray")


def work(d: float) -> float:
    """The task: hold the worker for ``d`` seconds."""
    time.sleep(d)
    return d


def durations(n: int, seed: int, short: float, long: float, p_long: float) -> list[float]:
    """The seeded list of task durations, the same for every system."""
    rng = random.Random(seed)
    return [long if rng.random() < p_long else short for _ in range(n)]


def _async_wf_tcp(workers: int) -> tuple[Callable[[list[float]], None], Callable[[], None]]:
    import async_wf

    loop = asyncio.new_event_loop()
    rt = async_wf.Runtime(workers=workers)
    loop.run_until_complete(rt.start())

    async def batch(ds: list[float]) -> None:
        await async_wf.gather(*[rt.submit(work, d) for d in ds])

    def run(ds: list[float]) -> None:
        loop.run_until_complete(batch(ds))

    def stop() -> None:
        loop.run_until_complete(rt.close())
        loop.close()

    return run, stop


def _procpool(workers: int) -> tuple[Callable[[list[float]], None], Callable[[], None]]:
    ex = cf.ProcessPoolExecutor(workers)

    def run(ds: list[float]) -> None:
        for f in [ex.submit(work, d) for d in ds]:
            f.result()

    return run, ex.shutdown


def _dask(workers: int) -> tuple[Callable[[list[float]], None], Callable[[], None]]:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)

    def run(ds: list[float]) -> None:
        client.gather([client.submit(work, d, pure=False) for d in ds])

    def stop() -> None:
        client.close()
        cluster.close()

    return run, stop


def _ray(workers: int) -> tuple[Callable[[list[float]], None], Callable[[], None]]:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(work)

    def run(ds: list[float]) -> None:
        ray.get([remote.remote(d) for d in ds])

    return run, ray.shutdown


STARTERS = {"async_wf-tcp": _async_wf_tcp, "procpool": _procpool, "dask": _dask, "ray": _ray}


def measure(system: str, ds: list[float], workers: int, repeat: int) -> dict[str, Any]:
    """Start ``system``, warm it up, time ``repeat`` runs of ``ds``; the median makespan."""
    try:
        run, stop = STARTERS[system](workers)
    except ImportError as exc:
        return {"system": system, "status": "not installed", "reason": str(exc)}
    try:
        run([0.0] * (4 * workers))  # warm-up: workers started and connected
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run(ds)
            samples.append(time.perf_counter() - t0)
    finally:
        stop()
    ideal = sum(ds) / workers
    span = statistics.median(samples)
    return {"system": system, "status": "ok", "makespan_s": span, "ideal_s": ideal,
            "ratio": span / ideal, "samples_s": samples}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="tasks (default 2000)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--short", type=float, default=0.001, help="seconds of a short task")
    p.add_argument("--long", type=float, default=0.1, help="seconds of a long task")
    p.add_argument("--p-long", type=float, default=0.1, help="share of long tasks")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        p.error(f"--systems must name some of {', '.join(SYSTEMS)}; got {args.systems!r}")
    if args.n < 1 or args.workers < 1 or args.repeat < 1:
        p.error(f"--n, --workers and --repeat must be >= 1, got {args.n}, {args.workers}, "
                f"{args.repeat}")
    if not 0.0 <= args.p_long <= 1.0 or args.short < 0 or args.long < 0:
        p.error("--p-long must be in [0, 1] and --short/--long >= 0 seconds")
    ds = durations(args.n, args.seed, args.short, args.long, args.p_long)
    results = [measure(s, ds, args.workers, args.repeat) for s in systems]
    if args.json:
        print(json.dumps({"n": args.n, "workers": args.workers, "seed": args.seed,
                          "short_s": args.short, "long_s": args.long, "p_long": args.p_long,
                          "results": results}))
        return 0
    print(f"{args.n} tasks ({args.p_long:.0%} of {args.long * 1e3:g} ms, the rest "
          f"{args.short * 1e3:g} ms) on {args.workers} workers; ideal = total work / workers")
    print(f"{'system':<14} {'makespan s':>11} {'ideal s':>9} {'ratio':>7}")
    for r in results:
        if r["status"] != "ok":
            print(f"{r['system']:<14} {r['status']}")
            continue
        print(f"{r['system']:<14} {r['makespan_s']:>11.2f} {r['ideal_s']:>9.2f} "
              f"{r['ratio']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
