"""Benchmark the task core: compiled ``async_wf._core`` against ``async_wf._pycore``.

Builds a seeded random DAG of N tasks (task i has 0-3 inputs drawn from
tasks i-1000 .. i-1), then, for each implementation in the same process:

  add_s       add all N tasks with one ``add_many`` call (inputs as Python lists)
  release_s   run the DAG to completion: loop ``pop(4096)`` -> ``finish_many``
  total_s     add_s + release_s
  releases_per_s    N / total_s: tasks added and released per second
  add_csr_s   add the same DAG with one ``add_csr`` call from int64 arrays
              (fresh core; reported alongside, not part of total_s)

Each timing is the best of --repeat runs on a fresh core. The pure-Python twin
may run on fewer tasks (--py-n); the speedup compares per-task times, so it
stays fair. Targets: speedup >= 10 and >= 2,000,000 releases/s compiled.

Usage: python bench/core.py [--n 1000000] [--py-n N] [--repeat 3] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from async_wf import _pycore

try:
    from async_wf import _core
except ImportError:  # pragma: no cover - reported in the output
    _core = None  # type: ignore[assignment]

WINDOW = 1000
POP_BATCH = 4096


def make_dag(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (indptr, indices) of the DAG; indices are earlier task positions."""
    rng = np.random.default_rng(seed)
    deg = rng.integers(0, 4, size=n)
    deg[0] = 0
    pos = np.arange(n)
    deg = np.minimum(deg, pos)  # task i has at most i earlier tasks to name
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(deg, out=indptr[1:])
    owner = np.repeat(pos, deg)
    back = rng.integers(1, WINDOW + 1, size=len(owner))
    back = np.minimum(back, owner)  # stay within the tasks that exist
    indices = (owner - back).astype(np.int64)
    return indptr, indices


def as_handle_lists(indptr: np.ndarray, indices: np.ndarray) -> list[list[int]]:
    # On a fresh core the i-th task added gets generation 1, slot i.
    handles = ((1 << 32) | indices).tolist()
    ptr = indptr.tolist()
    return [handles[ptr[i] : ptr[i + 1]] for i in range(len(ptr) - 1)]


def release(core: Any) -> int:
    done = 0
    pop, finish_many = core.pop, core.finish_many
    while batch := pop(POP_BATCH):
        finish_many(batch)
        done += len(batch)
    return done


def measure(cls: Any, n: int, seed: int, repeat: int) -> dict[str, float]:
    indptr, indices = make_dag(n, seed)
    lists = as_handle_lists(indptr, indices)
    best: dict[str, float] = {}
    for _ in range(repeat):
        core = cls()
        t0 = time.perf_counter()
        core.add_many(lists)
        t1 = time.perf_counter()
        done = release(core)
        t2 = time.perf_counter()
        if done != n or core.counts()[3] != n:
            raise SystemExit(f"{cls.__module__}: released {done} of {n} tasks")
        del core
        core = cls()
        t3 = time.perf_counter()
        core.add_csr(indptr, indices)
        t4 = time.perf_counter()
        del core
        for key, val in (("add_s", t1 - t0), ("release_s", t2 - t1), ("total_s", t2 - t0),
                         ("add_csr_s", t4 - t3)):
            best[key] = min(best.get(key, val), val)
    best["releases_per_s"] = n / best["total_s"]
    best["n"] = n
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--n", type=int, default=1_000_000, help="tasks in the DAG (default 1000000)")
    ap.add_argument("--py-n", type=int, default=None,
                    help="tasks for the pure-Python twin (default: same as --n)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing, best kept (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="DAG seed (default 0)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args(argv)
    py_n = args.py_n or args.n

    results: dict[str, Any] = {"n": args.n}
    if _core is None:
        print("async_wf._core is not built; only the pure-Python twin runs", file=sys.stderr)
    else:
        results["cython"] = measure(_core.Core, args.n, args.seed, args.repeat)
    results["python"] = measure(_pycore.Core, py_n, args.seed, max(1, args.repeat - 1))
    if "cython" in results:
        # Per-task times, so a smaller --py-n does not skew the ratio.
        py_per = results["python"]["total_s"] / py_n
        c_per = results["cython"]["total_s"] / args.n
        results["speedup"] = py_per / c_per

    if args.json:
        print(json.dumps(results))
        return 0
    print(f"core benchmark: random DAG, 0-3 inputs from the previous {WINDOW} tasks, "
          f"seed {args.seed}")
    head = f"{'impl':<8}{'tasks':>10}{'add_many s':>12}{'release s':>11}{'total s':>10}" \
           f"{'releases/s':>14}{'add_csr s':>11}"
    print(head)
    print("-" * len(head))
    for impl in ("cython", "python"):
        r = results.get(impl)
        if r is None:
            continue
        print(f"{impl:<8}{r['n']:>10}{r['add_s']:>12.3f}{r['release_s']:>11.3f}"
              f"{r['total_s']:>10.3f}{r['releases_per_s']:>14,.0f}{r['add_csr_s']:>11.3f}")
    if "speedup" in results:
        print(f"speedup (python / cython, per task): {results['speedup']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
