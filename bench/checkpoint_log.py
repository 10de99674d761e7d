"""Benchmark the checkpoint log's storage layer (no scheduler): open, append, read.

  open_rate_per_s       records indexed per second when opening a log of --n small
                        results written with the default policy (flushes in blocks)
  open_rate_bare_per_s  the same for a log written with flush="record": every record
                        alone, checked one by one at open (the slow path)
  append_per_s[policy]  put_result of small results (an int) per second, per flush
                        policy; "interval+fsync" fdatasyncs at each flush
  get_per_s             get() of random small results per second (page cache warm)
  payload_write_mb_s    put_result of --arrays incompressible 1 MiB float64 arrays
  payload_read_mb_s     get() of the same arrays (views into one buffer per record)
  task_key_per_s        task_key() of a call with three plain arguments

Every figure is the best of --repeat runs. The file lives in --dir (default: a
temporary directory); the page cache is warm for the reads, as it is when a run
is restarted on the same machine. No fsync except in the one row that says so.

Usage: python bench/checkpoint_log.py [--n 1000000] [--append-n 200000] [--arrays 200]
                                      [--repeat 3] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from async_wf.checkpoint import CheckpointLog, function_identity, task_key

FUNCTION = "bench:noop"


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


def write_small(path: Path, n: int, **opts: Any) -> float:
    """Append n small results; return the seconds it took (close included)."""
    if path.exists():
        path.unlink()
    keys = [key(i) for i in range(n)]
    t0 = time.perf_counter()
    with CheckpointLog(path, **opts) as log:
        put = log.put_result
        for i, k in enumerate(keys):
            put(k, i, function=FUNCTION)
    return time.perf_counter() - t0


def best(repeat: int, fn: Any) -> float:
    return min(fn() for _ in range(repeat))


def open_seconds(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    log = CheckpointLog(path, readonly=True)
    dt = time.perf_counter() - t0
    n = len(log)
    log.close()
    return dt, n


def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"n": args.n, "append_n": args.append_n, "arrays": args.arrays}
    path = directory / "bench.wfck"

    # --- open: a big log written with the default policy, then a bare one
    write_small(path, args.n)
    runs = [open_seconds(path) for _ in range(args.repeat)]
    assert all(n == args.n for _, n in runs)
    out["file_mb"] = path.stat().st_size / 1e6
    out["open_s"] = min(dt for dt, _ in runs)
    out["open_rate_per_s"] = args.n / out["open_s"]

    # --- get: random small results from that log
    with CheckpointLog(path, readonly=True) as log:
        picks = [key(i) for i in random.Random(0).sample(range(args.n), min(args.n, 50_000))]

        def gets() -> float:
            t0 = time.perf_counter()
            for k in picks:
                log.get(k)
            return time.perf_counter() - t0

        out["get_per_s"] = len(picks) / best(args.repeat, gets)

    bare = directory / "bare.wfck"
    nb = min(args.n, args.append_n)
    write_small(bare, nb, flush="record")
    runs = [open_seconds(bare) for _ in range(args.repeat)]
    out["open_rate_bare_per_s"] = nb / min(dt for dt, _ in runs)
    bare.unlink()

    # --- append per policy
    policies: dict[str, dict[str, Any]] = {
        "record": {"flush": "record"},
        "every(1000)": {"flush": "every", "flush_every": 1000},
        "interval(1s)": {"flush": "interval"},
        "interval(1s)+fsync": {"flush": "interval", "fsync": True},
    }
    out["append_per_s"] = {}
    for name, opts in policies.items():
        dt = best(args.repeat, lambda opts=opts: write_small(path, args.append_n, **opts))
        out["append_per_s"][name] = args.append_n / dt

    # --- payload: 1 MiB incompressible arrays
    rng = np.random.default_rng(0)
    arrays = [rng.random(1 << 17) for _ in range(min(args.arrays, 16))]
    mb = args.arrays * arrays[0].nbytes / (1 << 20)

    def write_arrays() -> float:
        if path.exists():
            path.unlink()
        t0 = time.perf_counter()
        with CheckpointLog(path) as log:
            for i in range(args.arrays):
                log.put_result(key(i), arrays[i % len(arrays)], function="bench:array")
        return time.perf_counter() - t0

    out["payload_write_mb_s"] = mb / best(args.repeat, write_arrays)
    with CheckpointLog(path, readonly=True) as log:

        def read_arrays() -> float:
            t0 = time.perf_counter()
            for i in range(args.arrays):
                log.get(key(i))
            return time.perf_counter() - t0

        out["payload_read_mb_s"] = mb / best(args.repeat, read_arrays)
        back = log.get(key(1))
        assert (back == arrays[1 % len(arrays)]).all()
    path.unlink()

    # --- task keys
    def f(x: int, name: str, scale: float = 1.0) -> float:
        return x * scale

    fid = function_identity(f)
    calls = [((i, "sample"), {"scale": 0.5}) for i in range(100_000)]

    def keys() -> float:
        t0 = time.perf_counter()
        for a, kw in calls:
            task_key(fid, a, kw)
        return time.perf_counter() - t0

    out["task_key_per_s"] = len(calls) / best(args.repeat, keys)
    out["python"] = sys.version.split()[0]
    out["cpus"] = os.cpu_count()
    return out


def table(r: dict[str, Any]) -> str:
    rows = [
        (f"open: index {r['n']:,} small records (blocks)",
         f"{r['open_rate_per_s']:,.0f} records/s"),
        ("open: records written one by one (record)",
         f"{r['open_rate_bare_per_s']:,.0f} records/s"),
        *(
            (f"append small results, flush={name}", f"{rate:,.0f} records/s")
            for name, rate in r["append_per_s"].items()
        ),
        ("get small results", f"{r['get_per_s']:,.0f} records/s"),
        ("put 1 MiB arrays", f"{r['payload_write_mb_s']:,.0f} MiB/s"),
        ("get 1 MiB arrays", f"{r['payload_read_mb_s']:,.0f} MiB/s"),
        ("task_key, three plain arguments", f"{r['task_key_per_s']:,.0f} keys/s"),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"{a:<{width}}  {b:>22}" for a, b in rows]
    lines.append(f"(log of {r['n']:,} records: {r['file_mb']:.0f} MB; python {r['python']}, "
                 f"{r['cpus']} cpus)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="records in the log that is opened")
    p.add_argument("--append-n", type=int, default=200_000, help="records per append run")
    p.add_argument("--arrays", type=int, default=200, help="1 MiB arrays written and read")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", help="where to write the logs (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)
    for name in ("n", "append_n", "arrays", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        result = measure(args, Path(args.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="awf-ckpt-bench-") as d:
            result = measure(args, Path(d))
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
