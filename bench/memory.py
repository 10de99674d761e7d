"""Scheduler memory per pending task, from 10^3 to 10^6 tasks.

    python -m bench.memory --n 1000,10000,100000,1000000

What is pending: N no-op tasks ``noop(gate)``, each taking the future of one
``gate`` task that runs and blocks (a plain function polling for a file)
until the measurement is over. So every one of the N tasks has been
submitted, has its future, its entry in the scheduler and the core, its
arguments, and waits for its input: none is ready, none has been sent to a
worker. The runtime has run 1 000 other no-ops first, so that what is
allocated once (caches, pools, the function's pickle) is not counted.

Each point runs in a fresh child process, twice: once measuring the growth
of the resident set (``VmRSS``, which sees the compiled core's C memory
too), once under ``tracemalloc`` (Python's allocators only, but it says
where: the largest allocation sites are listed per task, for
``--breakdown-max`` and below). The list in which the program keeps the N
futures is subtracted: it is the program's, not the scheduler's.

Transports: ``local`` (``Runtime()``) and ``tcp`` (``Runtime(workers=2)``;
memory of the scheduler process only); cores: ``compiled`` (the Cython core)
and ``python`` (its pure-Python twin, ``ASYNC_WF_NO_EXTENSIONS=1``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any

GOAL = 1024  # bytes per pending no-op task (issue 23)
WARM = 1000


def noop(_x: Any = None) -> None:
    """The pending tasks' function."""


def gate(path: str) -> None:
    """Block until ``path`` exists: the input every pending task waits for."""
    while not os.path.exists(path):
        time.sleep(0.005)


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _child(transport: str, n: int, method: str, top: int) -> dict[str, Any]:
    import async_wf
    from async_wf import core

    rt = async_wf.Runtime() if transport == "local" else async_wf.Runtime(workers=2)
    await rt.start()
    out: dict[str, Any] = {"transport": transport, "n": n, "method": method,
                           "core": "compiled" if core.CORE_IMPL == "cython" else "python"}
    with tempfile.TemporaryDirectory() as tmp:
        release = os.path.join(tmp, "release")
        try:
            await asyncio.gather(*[rt.submit(noop, i) for i in range(WARM)])
            g = rt.submit(gate, release)
            await asyncio.sleep(0.2)  # the gate is running (on a worker for tcp)
            gc.collect()
            futs: list[Any] = []
            if method == "tracemalloc":
                tracemalloc.start(1)
                before = tracemalloc.take_snapshot() if top else None
                t_before = tracemalloc.get_traced_memory()[0]
            else:
                r_before = _rss()
            submit = rt.submit
            t0 = time.perf_counter()
            for _ in range(n):
                futs.append(submit(noop, g))
            out["submit_s"] = time.perf_counter() - t0
            for _ in range(3):
                await asyncio.sleep(0)  # whatever the scheduler defers to the loop
            gc.collect()
            own = sys.getsizeof(futs)  # the program's list, not the scheduler's
            if method == "tracemalloc":
                grown = tracemalloc.get_traced_memory()[0] - t_before
                if before is not None:
                    after = tracemalloc.take_snapshot()
                    stats = after.compare_to(before, "lineno")
                    out["sites"] = [
                        {"where": f"{os.path.relpath(s.traceback[0].filename)}:"
                                  f"{s.traceback[0].lineno}",
                         "bytes_per_task": s.size_diff / n, "blocks_per_task": s.count_diff / n}
                        for s in stats[:top] if s.size_diff > 0
                    ]
                tracemalloc.stop()
            else:
                grown = _rss() - r_before
            out["bytes_per_task"] = (grown - own) / n
            f = futs[0]
            out["sizes"] = {"TaskFuture": sys.getsizeof(f), "args tuple": sys.getsizeof(f._args),
                            "kwargs": sys.getsizeof(f._kwargs)}
            out["pending"] = sum(1 for x in futs if not x.done())
        finally:
            with open(release, "w"):
                pass
            t1 = time.perf_counter()
            await rt.close(cancel=True)
            out["close_s"] = time.perf_counter() - t1
    return out


def _run_child(transport: str, core: str, n: int, method: str, top: int,
               timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    if core == "python":
        env["ASYNC_WF_NO_EXTENSIONS"] = "1"
    else:
        env.pop("ASYNC_WF_NO_EXTENSIONS", None)
    cmd = [sys.executable, "-m", "bench.memory", "--_child", transport, str(n), method,
           str(top)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"transport": transport, "core": core, "n": n, "method": method,
                "status": f"timeout after {timeout:g} s"}
    if p.returncode != 0:
        return {"transport": transport, "core": core, "n": n, "method": method,
                "status": f"failed: {p.stderr.strip().splitlines()[-1:]}"}
    r: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    r["status"] = "ok"
    return r


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure every (transport, core, N) point; print a table, return the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="1000,10000,100000,1000000",
                   help="numbers of pending tasks, comma-separated")
    p.add_argument("--transports", default="local,tcp")
    p.add_argument("--cores", default="compiled,python")
    p.add_argument("--methods", default="rss,tracemalloc")
    p.add_argument("--breakdown-max", type=int, default=100000,
                   help="list allocation sites for N up to this (a snapshot of 10^6 "
                        "tasks' allocations costs gigabytes)")
    p.add_argument("--top", type=int, default=8, help="allocation sites listed")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child")
    p.add_argument("--json", metavar="FILE", help="write every result here")
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        transport, n, method, top = args._child
        from async_wf._loop import run

        print(json.dumps(run(_child(transport, int(n), method, int(top)))))
        return []
    try:
        ns = [int(x) for x in args.n.split(",")]
    except ValueError:
        raise SystemExit(f"--n must be comma-separated integers, got {args.n!r}") from None
    if any(x < 1 for x in ns):
        raise SystemExit(f"--n values must be >= 1, got {args.n!r}")
    choices = {"transports": ("local", "tcp"), "cores": ("compiled", "python"),
               "methods": ("rss", "tracemalloc")}
    picked: dict[str, list[str]] = {}
    for opt, allowed in choices.items():
        picked[opt] = getattr(args, opt).split(",")
        bad = [x for x in picked[opt] if x not in allowed]
        if bad:
            raise SystemExit(f"--{opt} takes {','.join(allowed)}, got {bad}")
    results = []
    print(f"# bytes per pending no-op task on the scheduler (goal <= {GOAL}); "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"{'transport':10}{'core':10}{'n':>9}{'method':>13}{'B/task':>9}{'submit us/task':>16}")
    for transport in picked["transports"]:
        for core in picked["cores"]:
            for n in ns:
                for method in picked["methods"]:
                    top = args.top if method == "tracemalloc" and n <= args.breakdown_max else 0
                    r = _run_child(transport, core, n, method, top, args.timeout)
                    results.append(r)
                    if r["status"] != "ok":
                        print(f"{transport:10}{core:10}{n:>9}{method:>13}  {r['status']}")
                        continue
                    print(f"{transport:10}{core:10}{n:>9}{method:>13}{r['bytes_per_task']:>9.0f}"
                          f"{r['submit_s'] / n * 1e6:>16.2f}", flush=True)
                    for s in r.get("sites", []):
                        print(f"{'':42}{s['bytes_per_task']:>9.1f}  {s['where']} "
                              f"({s['blocks_per_task']:.2f} blocks)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
