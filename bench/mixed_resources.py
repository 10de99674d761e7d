"""Mixed resource requests: tasks of 1, 2 and 4 cores on workers of 4 cores (issue 18).

N independent tasks, each asks for ``cores`` of 1, 2 or 4 (equally likely)
and sleeps d seconds, d uniform in [``--min``, ``--max``] (20 to 200 ms),
drawn from a seeded generator. The cores are nominal: a sleeping task
holds its share as a computing one would, without needing the CPUs, so
two 4-core workers fit on a 2-core machine and what is measured is
placement: how tightly the scheduler packs requests of different sizes.

Every task records its process, its start and end (``time.time()``) and
the cores it was given (``task_context().resources``). From these:

* makespan: first submit to last result;
* ideal: the lower bound ``max(core-seconds / total cores, longest task)``;
* ratio: makespan / ideal (1.0 is perfect packing; lower is better);
* utilisation: core-seconds / (makespan * total cores), overall and in
  ``--buckets`` slices of the makespan (percent of all cores busy);
* peak: the most cores held at once on each worker, which must not exceed
  what it declared (printed as a check, ``ok`` or ``EXCEEDED``).

Runs: ``fifo`` submits in the drawn order with equal priority; ``big-first``
submits the same tasks with ``priority=cores`` so 4-core tasks go first (the
classic longest-/largest-first heuristic). ``greedy-sim`` is a reference,
not a run: a zero-overhead simulation of first-fit list scheduling with
backfill on the same workers, the same order and the same durations;
``reserve-sim`` the same with a worker kept for the first task that does
not fit (the runtime's anti-starvation rule, see docs/architecture.md);
``strict-sim`` without backfill (the head of the queue blocks).

Usage: python bench/mixed_resources.py [--n 300] [--workers 2] [--cores 4]
       [--seed 0] [--buckets 10] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import random
import sys
import time
from typing import Any

Task = tuple[int, float]  # (cores, seconds)
Span = tuple[int, float, float, float]  # (pid, start, end, cores held)

SIZES = (1, 2, 4)


def hold(seconds: float) -> Span:
    """The task: hold the cores it was given for ``seconds``; say where, when, how many."""
    import async_wf

    t0 = time.time()
    time.sleep(seconds)
    t1 = time.time()
    return os.getpid(), t0, t1, float(async_wf.task_context().resources.get("cores", 0))


def draw(n: int, seed: int, low: float, high: float) -> list[Task]:
    """The seeded list of (cores, seconds), the same for every run."""
    rng = random.Random(seed)
    return [(rng.choice(SIZES), rng.uniform(low, high)) for _ in range(n)]


def ideal(tasks: list[Task], total_cores: int) -> float:
    """The lower bound on any makespan: the work spread evenly, or the longest task."""
    return max(sum(c * d for c, d in tasks) / total_cores, max(d for _, d in tasks))


POLICIES = ("backfill", "reserve", "strict")


def simulate(tasks: list[Task], workers: int, cores: int, policy: str = "backfill") -> float:
    """Makespan of zero-overhead first-fit list scheduling under ``policy``.

    At each instant the waiting tasks, in order, start on the first worker
    with room for them. ``backfill``: a task that does not fit is passed
    over. ``strict``: the scan stops at it (FIFO, the head blocks).
    ``reserve``: passed over, but the worker with the most free cores is
    kept for the first such task (no later task starts there), the
    anti-starvation rule the runtime uses. With no latency and the same
    order, these are the references for a real run.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    free = [cores] * workers
    waiting = list(tasks)
    running: list[tuple[float, int, int]] = []  # (end, worker, cores)
    now = 0.0
    while waiting or running:
        rest: list[Task] = []
        reserved = -1
        for c, d in waiting:
            w = next((i for i in range(workers) if free[i] >= c and i != reserved), None)
            if w is None or (rest and policy == "strict"):
                if policy == "reserve" and reserved < 0:
                    reserved = max(range(workers), key=lambda i: free[i])
                rest.append((c, d))
                continue
            free[w] -= c
            heapq.heappush(running, (now + d, w, c))
        waiting = rest
        now, w, c = heapq.heappop(running)
        free[w] += c
        # every task ending at the same instant gives its cores back before the next scan
        while running and running[0][0] == now:
            _, w2, c2 = heapq.heappop(running)
            free[w2] += c2
    return now


def peaks(spans: list[Span]) -> dict[int, float]:
    """The most cores held at once in each worker process, from the recorded spans."""
    events: dict[int, list[tuple[float, float]]] = {}
    for pid, t0, t1, c in spans:
        events.setdefault(pid, []).extend([(t0, c), (t1, -c)])
    out = {}
    for pid, evs in events.items():
        # an end and a start at the same instant: the end first, as the worker frees then starts
        evs.sort()
        cur = best = 0.0
        for _t, d in evs:
            cur += d
            best = max(best, cur)
        out[pid] = best
    return out


def utilisation(spans: list[Span], t0: float, t1: float, total: int, buckets: int) -> list[float]:
    """Share of ``total`` cores busy in each of ``buckets`` equal slices of [t0, t1]."""
    width = (t1 - t0) / buckets
    busy = [0.0] * buckets
    for _pid, s, e, c in spans:
        for b in range(buckets):
            lo, hi = t0 + b * width, t0 + (b + 1) * width
            overlap = min(e, hi) - max(s, lo)
            if overlap > 0:
                busy[b] += overlap * c
    return [x / (width * total) for x in busy]


async def _run(rt: Any, tasks: list[Task], big_first: bool) -> tuple[float, float, list[Span]]:
    import async_wf

    t0 = time.time()
    futs = [rt.options(cores=c, priority=c if big_first else 0).submit(hold, d)
            for c, d in tasks]
    spans: list[Span] = list(await async_wf.gather(*futs))
    return t0, time.time(), spans


def measure(tasks: list[Task], workers: int, cores: int, buckets: int) -> list[dict[str, Any]]:
    """Run ``tasks`` in FIFO and big-first order on one runtime; a report per run."""
    import async_wf

    total = workers * cores
    bound = ideal(tasks, total)
    work = sum(c * d for c, d in tasks)

    async def go() -> list[dict[str, Any]]:
        out = []
        async with async_wf.Runtime(workers=workers, slots=cores,
                                    worker_resources={"cores": cores}) as rt:
            # warm-up: both workers connected, the function shipped
            await _run(rt, [(1, 0.0)] * (2 * total), False)
            for name, big in (("fifo", False), ("big-first", True)):
                t0, t1, spans = await _run(rt, tasks, big)
                pk = peaks(spans)
                span = t1 - t0
                stats = rt.statistics()
                out.append({
                    "run": name, "makespan_s": span, "ideal_s": bound, "ratio": span / bound,
                    "utilisation": work / (span * total),
                    "over_time": utilisation(spans, t0, t1, total, buckets),
                    "peak_cores": sorted(pk.values()), "workers_seen": len(pk),
                    "peak_ok": all(v <= cores for v in pk.values()),
                    "held_ok": all(c == want for (want, _), (_, _, _, c)
                                   in zip(tasks, spans, strict=True)),
                    "tasks_stolen": stats.get("tasks_stolen"),
                })
        return out

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--n", type=int, default=300, help="tasks (default 300)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cores", type=int, default=4, help="cores each worker declares")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min", type=float, default=0.02, help="shortest task, seconds")
    p.add_argument("--max", type=float, default=0.2, help="longest task, seconds")
    p.add_argument("--buckets", type=int, default=10, help="slices of the utilisation line")
    p.add_argument("--quick", action="store_true", help="30 tasks of 10 to 40 ms")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.min, args.max = 30, 0.01, 0.04
    if args.n < 1 or args.workers < 1 or args.buckets < 1:
        p.error(f"--n, --workers and --buckets must be >= 1, got {args.n}, {args.workers}, "
                f"{args.buckets}")
    if args.cores < max(SIZES):
        p.error(f"--cores must be >= {max(SIZES)} (the largest task), got {args.cores}")
    if not 0 <= args.min <= args.max:
        p.error(f"need 0 <= --min <= --max seconds, got {args.min}, {args.max}")
    tasks = draw(args.n, args.seed, args.min, args.max)
    results = measure(tasks, args.workers, args.cores, args.buckets)
    sim = simulate(tasks, args.workers, args.cores)
    reserve = simulate(tasks, args.workers, args.cores, "reserve")
    strict = simulate(tasks, args.workers, args.cores, "strict")
    bound = ideal(tasks, args.workers * args.cores)
    work = sum(c * d for c, d in tasks)
    if args.json:
        print(json.dumps({"n": args.n, "workers": args.workers, "cores": args.cores,
                          "seed": args.seed, "core_seconds": work, "ideal_s": bound,
                          "greedy_sim_s": sim, "reserve_sim_s": reserve,
                          "strict_fifo_sim_s": strict, "results": results}))
        return 0
    total = args.workers * args.cores
    print(f"{args.n} tasks of {'/'.join(map(str, SIZES))} cores, {args.min * 1e3:g}-"
          f"{args.max * 1e3:g} ms, {work:.1f} core-s, on {args.workers} workers x "
          f"{args.cores} cores; ideal = max(core-s / {total}, longest) = {bound:.2f} s")
    print(f"{'run':<11} {'makespan s':>11} {'ratio':>7} {'util':>6} {'stolen':>7}  "
          f"{'peak/worker':<12} utilisation over time (%)")
    for r in results:
        line = " ".join(f"{100 * u:3.0f}" for u in r["over_time"])
        pk = "/".join(f"{v:g}" for v in r["peak_cores"])
        mark = "ok" if r["peak_ok"] and r["held_ok"] else "EXCEEDED"
        print(f"{r['run']:<11} {r['makespan_s']:>11.2f} {r['ratio']:>7.3f} "
              f"{r['utilisation']:>6.1%} {r['tasks_stolen']!s:>7}  {pk + ' ' + mark:<12} {line}")
    print(f"{'greedy-sim':<11} {sim:>11.2f} {sim / bound:>7.3f} {work / (sim * total):>6.1%}"
          f"  (zero-overhead first-fit with backfill, same order)")
    print(f"{'reserve-sim':<11} {reserve:>11.2f} {reserve / bound:>7.3f} "
          f"{work / (reserve * total):>6.1%}  (the same, the head's worker kept for it: the "
          f"runtime's rule)")
    print(f"{'strict-sim':<11} {strict:>11.2f} {strict / bound:>7.3f} "
          f"{work / (strict * total):>6.1%}  (zero-overhead first-fit, strict FIFO: no backfill)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
