"""Chain latency: the cost of one dependent link, against a loopback TCP round trip.

A chain of ``--n`` tasks (2000), each taking the previous one's result, on
2 TCP workers that the script starts by hand (``python -m async_wf.worker
--connect ... --resources w0=1``, and ``w1=1`` for the other), so that a
task can be sent to one worker or the other. Every link waits for its input,
so the time per link is the scheduler's latency: result in, next task out.

The baseline, measured in the same run and interleaved with the chains, is
a loopback TCP round trip: an asyncio echo server in a process of its own
and ``--n`` round trips of 8 bytes from the scheduler's loop (uvloop on both
ends when installed, as async_wf uses). ``ratio`` = µs per link / µs per
round trip; a link needs at least one round trip (the result to the
scheduler, the next task back), so 1.0 is the floor.

Rows:

* ``rtt``: the echo round trip.
* ``chain same-ok``: default placement; the worker may run link after link,
  and up to ``send_ahead`` links (the transport's default) wait there for
  their input, so that a link starts when its input ends there.
* ``chain no-ahead``: the same on the same runtime with ``send_ahead`` set
  to 0 for the row: each link waits for the scheduler (the "before").
* ``chain w0 only``: every link asks for ``resources={"w0": 1}``: one
  worker, through the resource-aware path (the control for the next row).
* ``chain across``: links alternate ``resources={"w0": 1}`` and ``{"w1": 1}``,
  so each runs on the other worker than its input.
* ``array keep_min=0`` and ``array default``: ``--array-n`` links (500) each
  taking a ``--array-mib`` (1 MiB) random array and returning a copy with
  its own process id written into it, on ``Runtime(workers=2, keep_min=0)``
  (every array through the scheduler) and ``Runtime(workers=2)`` (held:
  the chain should stay on one worker and nothing large cross the
  scheduler).

Each link records its process, so ``switches`` counts the links that ran on
another process than their input. Medians of ``--repeat`` rounds (3), with
min and max; ``MB via sched`` is ``bytes_sent + bytes_received`` of
``rt.statistics()`` over the run.

Usage: python bench/chain_latency.py [--n 2000] [--array-n 500] [--array-mib 1]
       [--repeat 3] [--seed 0] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

ECHO = """
import asyncio, sys
try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
async def main():
    async def echo(r, w):
        while data := await r.read(4096):
            w.write(data)
    s = await asyncio.start_server(echo, "127.0.0.1", 0)
    print(s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()
asyncio.run(main())
"""

State = tuple[int, int, int]  # links so far, process of the last, switches


def link(state: State) -> State:
    """One link: count it, and count a switch if the last ran in another process."""
    n, last, switches = state
    pid = os.getpid()
    return n + 1, pid, switches + (last not in (0, pid))


def rand(n: int, seed: int) -> np.ndarray:
    """A seeded random array (random, so lz4 cannot shrink it on the wire)."""
    return np.random.default_rng(seed).random(n)


def stamp(a: np.ndarray, i: int) -> np.ndarray:
    """One array link: a copy of the input with this process's id at index ``i``."""
    b = a.copy()
    b[i] = os.getpid()
    return b


def count_switches(pids: list[int]) -> int:
    """Links that ran in another process than the link before them."""
    return sum(1 for a, b in itertools.pairwise(pids) if a != b)


async def echo_rtt(port: int, n: int) -> float:
    """Seconds per round trip of 8 bytes to the echo server, over ``n`` trips."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        msg = b"12345678"
        for _ in range(10):  # warm-up
            w.write(msg)
            await r.readexactly(8)
        t0 = time.perf_counter()
        for _ in range(n):
            w.write(msg)
            await r.readexactly(8)
        return (time.perf_counter() - t0) / n
    finally:
        w.close()


def _worker_env() -> dict[str, str]:
    from async_wf.protocol import SYS_PATH_ENV

    env = dict(os.environ)
    # the workers import what this script imports (bench/ on the path)
    env[SYS_PATH_ENV] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    env.pop("ASYNC_WF_TOKEN", None)
    return env


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the echo server, the runtimes and their workers; measure each row per round."""
    import async_wf

    procs: list[subprocess.Popen[bytes]] = []
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    procs.append(echo)
    assert echo.stdout is not None
    port = int(echo.stdout.readline())
    tmp = tempfile.mkdtemp(prefix="chain_latency_")
    token = os.path.join(tmp, "token")
    rt = async_wf.Runtime(listen="tcp://127.0.0.1:0", token_file=token)
    before = async_wf.Runtime(workers=2, keep_min=0)
    after = async_wf.Runtime(workers=2)
    samples: dict[str, list[dict[str, float]]] = {}
    try:
        await rt.start()
        await before.start()
        await after.start()
        address = rt.transport.address  # type: ignore[attr-defined]
        for name in ("w0", "w1"):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "async_wf.worker", "--connect", address,
                 "--token-file", token, "--resources", f"{name}=1"],
                env=_worker_env(), stdin=subprocess.DEVNULL))
        t0 = time.monotonic()
        while rt.statistics()["workers"] < 2:
            if time.monotonic() - t0 > 60:
                raise RuntimeError("the two workers did not connect within 60 s")
            await asyncio.sleep(0.05)
        on = [rt.options(resources={"w0": 1}), rt.options(resources={"w1": 1})]
        size = int(args.array_mib * (1 << 20)) // 8
        if size < args.array_n:
            raise ValueError(f"--array-mib too small for --array-n={args.array_n} stamps")

        def through(r: Any) -> int:
            s = r.statistics()
            return int(s["bytes_sent"]) + int(s["bytes_received"])

        tr = rt.transport
        default_ahead = tr.send_ahead

        async def chain(mode: str) -> dict[str, float]:
            tr.send_ahead = 0 if mode == "no-ahead" else default_ahead
            t0 = time.perf_counter()
            f: Any = (0, 0, 0)
            for i in range(args.n):
                f = (rt if mode in ("any", "no-ahead")
                     else on[i % 2 if mode == "across" else 0]).submit(link, f)
            n, _, switches = await f
            dt = time.perf_counter() - t0
            tr.send_ahead = default_ahead
            if n != args.n:
                raise AssertionError(f"chain counted {n} links, want {args.n}")
            return {"s_per_link": dt / args.n, "switches": switches}

        async def array(r: Any) -> dict[str, float]:
            b0 = through(r)
            t0 = time.perf_counter()
            f: Any = r.submit(rand, size, args.seed)
            for i in range(args.array_n):
                f = r.submit(stamp, f, i)
            a = await f
            dt = time.perf_counter() - t0
            want = rand(size, args.seed)
            if a.shape != want.shape or not np.array_equal(a[args.array_n:],
                                                           want[args.array_n:]):
                raise AssertionError("the array chain's result is wrong")
            pids = [int(x) for x in a[:args.array_n]]
            return {"s_per_link": dt / (args.array_n + 1),
                    "switches": count_switches(pids),
                    "bytes_through_scheduler": through(r) - b0}

        async def rtt() -> dict[str, float]:
            return {"s_per_link": await echo_rtt(port, args.n)}

        rows: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {
            "rtt": rtt,
            "chain same-ok": lambda: chain("any"),
            "chain no-ahead": lambda: chain("no-ahead"),
            "chain w0 only": lambda: chain("w0"),
            "chain across": lambda: chain("across"),
            "array keep_min=0": lambda: array(before),
            "array default": lambda: array(after),
        }
        for fn in rows.values():  # warm-up: imports, connections
            await fn()
        for _ in range(args.repeat):
            for name, fn in rows.items():
                samples.setdefault(name, []).append(await fn())
    finally:
        for r in (rt, before, after):
            with contextlib.suppress(Exception):
                await r.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
        with contextlib.suppress(OSError):
            os.remove(token)
            os.rmdir(tmp)
    base = statistics.median(s["s_per_link"] for s in samples["rtt"])
    out: list[dict[str, Any]] = []
    for name, xs in samples.items():
        t = [x["s_per_link"] * 1e6 for x in xs]
        row: dict[str, Any] = {"row": name, "us": statistics.median(t), "min_us": min(t),
                               "max_us": max(t), "samples_us": t,
                               "ratio": statistics.median(t) / (base * 1e6)}
        for key in ("switches", "bytes_through_scheduler"):
            if key in xs[0]:
                row[key] = statistics.median(x[key] for x in xs)
        out.append(row)
    return {"n": args.n, "array_n": args.array_n, "array_mib": args.array_mib,
            "repeat": args.repeat, "seed": args.seed, "rtt_us": base * 1e6, "results": out}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="links of the small chains")
    p.add_argument("--array-n", type=int, default=500, help="links of the array chains")
    p.add_argument("--array-mib", type=float, default=1.0, help="MiB per array")
    p.add_argument("--repeat", type=int, default=3, help="measured rounds after a warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="100 links, 20 array links, one round")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.array_n, args.repeat = 100, 20, 1
    if args.n < 2 or args.array_n < 1 or args.repeat < 1:
        p.error(f"--n must be >= 2 and --array-n, --repeat >= 1; got {args.n}, "
                f"{args.array_n}, {args.repeat}")
    if int(args.array_mib * (1 << 20)) // 8 < args.array_n:
        p.error(f"--array-mib must hold --array-n float64 stamps, got {args.array_mib}")
    import async_wf

    report = async_wf.run(run(args))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"chains of {args.n} links (array chains: {args.array_n} links of "
          f"{args.array_mib:g} MiB) on 2 TCP workers; loopback round trip "
          f"{report['rtt_us']:.1f} µs; median of {args.repeat}")
    print(f"{'row':<18} {'µs/link':>9} {'min-max':>15} {'/ rtt':>7} {'switches':>9} "
          f"{'MB via sched':>13}")
    for r in report["results"]:
        sw = "" if "switches" not in r else f"{r['switches']:.0f}"
        mb = ("" if "bytes_through_scheduler" not in r
              else f"{r['bytes_through_scheduler'] / 1e6:,.1f}")
        print(f"{r['row']:<18} {r['us']:>9.1f} {r['min_us']:>7.1f}-{r['max_us']:<7.1f} "
              f"{r['ratio']:>7.2f} {sw:>9} {mb:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
