"""Scheduler throughput of async_wf against raw asyncio, measured in the same run.

    python bench/throughput.py --transport local --workload noop --n 100000 --json

Workloads (the same graph is built both ways):
    noop   n independent tasks that return at once
    chain  n tasks, each taking the previous one's result (latency-bound)
    fanin  n leaf tasks reduced pairwise by a binary tree of n-1 tasks

The baseline is the same graph with raw asyncio in the same process:
``asyncio.create_task`` per task, each task awaiting the tasks it depends
on, and ``asyncio.gather`` at the end. It is the floor cost of one asyncio
task per node; async_wf adds futures, dependency tracking and dispatch on
top, so ``ratio = tasks_per_s / baseline_tasks_per_s`` is the share of the
raw asyncio rate that the runtime keeps.

Each measurement is the median of ``--repeat`` runs after one warm-up run.
Times cover everything from the first submit to the last result; start-up
of the runtime is excluded and reported separately.

With ``--transport tcp --workers 2`` async_wf runs the tasks on 2 worker
processes over its TCP transport, and the same workloads (plus ``payload``:
tasks each taking a distinct 1 MiB NumPy array and returning its sum) are
timed in the same invocation on the peers ``concurrent.futures.
ProcessPoolExecutor`` and Dask distributed, each in a subprocess of its own
with a time limit::

    python bench/throughput.py --transport tcp --workers 2 --workload payload --n 200 --json

With ``--transport mpi``, under ``mpiexec -n 3`` (a scheduler rank and 2
worker ranks), async_wf runs on its MPI transport, and then, in the same
MPI job, on the same ranks, ``mpi4py.futures.MPICommExecutor`` runs the
same workloads (MPI peers cannot live in a subprocess of their own)::

    mpiexec -n 3 python bench/throughput.py --transport mpi --workload noop --n 20000

See bench/README.md for the rules that keep the comparison fair.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np

import async_wf

WORKLOADS = ("noop", "chain", "fanin")
TCP_WORKLOADS = (*WORKLOADS, "payload")
KINDS = ("async", "thread", "inline")
PEERS = ("procpool", "dask")
MPI_PEERS = ("mpi4py",)
PAYLOAD_LEN = 131072  # float64 values: 1 MiB per array
MIB = 1 << 20


# ------------------------------------------------------------------ tasks
async def a_noop() -> None:
    return None


async def a_inc(x: int) -> int:
    return x + 1


async def a_add(a: int, b: int) -> int:
    return a + b


def s_noop() -> None:
    return None


def s_inc(x: int) -> int:
    return x + 1


def s_add(a: int, b: int) -> int:
    return a + b


async def a_sum(a: Any) -> float:
    return float(a.sum())


def s_sum(a: Any) -> float:
    return float(a.sum())


# ---------------------------------------------------------------- async_wf
def _fns(kind: str) -> tuple[Any, Any, Any]:
    if kind == "async":
        return a_noop, a_inc, a_add
    if kind == "thread":
        return s_noop, s_inc, s_add
    opts = {"inline": True}
    return (
        async_wf.task(s_noop, **opts),
        async_wf.task(s_inc, **opts),
        async_wf.task(s_add, **opts),
    )


async def wf_workload(
    rt: async_wf.Runtime, workload: str, n: int, kind: str, data: list[Any] | None = None
) -> Any:
    """Build and run one workload on a started runtime; return its result."""
    noop, inc, add = _fns(kind)
    submit = rt.submit
    if workload == "payload":
        assert data is not None
        fsum = a_sum if kind == "async" else s_sum
        if kind == "inline":
            fsum = async_wf.task(s_sum, inline=True)
        return await asyncio.gather(*[submit(fsum, a) for a in data])
    if workload == "noop":
        await asyncio.gather(*[submit(noop) for _ in range(n)])
        return n
    if workload == "chain":
        f = submit(inc, 0)
        for _ in range(n - 1):
            f = submit(inc, f)
        return await f
    if workload == "fanin":
        level = [submit(inc, i) for i in range(n)]
        while len(level) > 1:
            nxt = [submit(add, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        return await level[0]
    raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")


def make_payload(n: int, seed: int = 0) -> list[Any]:
    """n distinct 1 MiB float64 arrays (distinct objects: pickle would memoize a shared one)."""
    return [np.random.default_rng(seed + i).random(PAYLOAD_LEN) for i in range(n)]


def check_result(workload: str, n: int, result: Any, data: list[Any] | None = None) -> None:
    """Raise AssertionError unless ``result`` is what the workload must give."""
    if workload == "payload":
        assert data is not None
        want = np.array([a.sum() for a in data])
        got = np.asarray(result, dtype=np.float64)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-12, atol=0.0):
            raise AssertionError(f"payload sums differ from numpy's: {got[:3]} vs {want[:3]}")
        return
    want_v = n * (n + 1) // 2 if workload == "fanin" else n
    if result != want_v:
        raise AssertionError(f"{workload}: result {result!r}, expected {want_v!r}")


def tasks_in(workload: str, n: int) -> int:
    """Number of tasks the workload runs."""
    return 2 * n - 1 if workload == "fanin" else n


# ------------------------------------------------------------- raw asyncio
async def raw_workload(workload: str, n: int) -> Any:
    """The same graph as plain asyncio tasks awaiting each other."""
    create = asyncio.get_running_loop().create_task
    if workload == "noop":
        await asyncio.gather(*[create(a_noop()) for _ in range(n)])
        return n

    async def link(prev: Awaitable[int] | int) -> int:
        v = prev if isinstance(prev, int) else await prev
        return v + 1

    async def pair(a: Awaitable[int] | int, b: Awaitable[int] | int) -> int:
        x = a if isinstance(a, int) else await a
        y = b if isinstance(b, int) else await b
        return x + y

    if workload == "chain":
        t: Any = create(link(1 - 1))
        for _ in range(n - 1):
            t = create(link(t))
        return await t
    if workload == "fanin":
        level: list[Any] = [create(link(i)) for i in range(n)]
        while len(level) > 1:
            nxt = [create(pair(level[i], level[i + 1])) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        return await level[0]
    raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")


# ------------------------------------------------------------------ driver
# With 10^5 live tasks, full collections of the cyclic GC dominate and make
# both sides' figures swing by 2x from run to run; by default it is collected
# before and disabled during each timed run, on both sides alike (--gc on
# keeps it running). Worker processes keep theirs.
GC_OFF = True


@contextlib.contextmanager
def gc_quiet() -> Iterator[None]:
    """Collect, then disable the cyclic GC for the block (if GC_OFF)."""
    if not GC_OFF:
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    with gc_quiet():
        return await _timed_inner(fn)


async def _timed_inner(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = await fn()
    return time.perf_counter() - t0, result


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run warm-up plus ``repeat`` measured runs of async_wf and the baseline."""
    n = args.n
    ntasks = tasks_in(args.workload, n)
    t0 = time.perf_counter()
    rt = await async_wf.Runtime(threads=args.threads).start()
    startup = time.perf_counter() - t0
    wf_times: list[float] = []
    raw_times: list[float] = []
    try:
        for i in range(args.repeat + 1):
            # alternate so that drift of the machine hits both alike
            dt, res_wf = await _timed(lambda: wf_workload(rt, args.workload, n, args.kind))
            dr, res_raw = await _timed(lambda: raw_workload(args.workload, n))
            if res_wf != res_raw:
                raise AssertionError(f"results differ: async_wf {res_wf!r} != asyncio {res_raw!r}")
            if i:
                wf_times.append(dt)
                raw_times.append(dr)
        stats = rt.statistics()
    finally:
        await rt.close()
    med = statistics.median(wf_times)
    med_raw = statistics.median(raw_times)
    return {
        "workload": args.workload,
        "transport": args.transport,
        "kind": args.kind,
        "n": n,
        "tasks": ntasks,
        "seconds": med,
        "tasks_per_s": ntasks / med,
        "baseline": "raw asyncio create_task + gather",
        "baseline_seconds": med_raw,
        "baseline_tasks_per_s": ntasks / med_raw,
        "ratio": med_raw / med,
        "per_task_us": med / ntasks * 1e6,
        "samples_s": wf_times,
        "baseline_samples_s": raw_times,
        "startup_s": startup,
        "core": stats["core"],
        "loop": type(asyncio.get_running_loop()).__module__,
        "gc": "off" if GC_OFF else "on",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


# ------------------------------------------------------- tcp: async_wf side
def _rates(workload: str, n: int, times: list[float]) -> dict[str, Any]:
    """Median seconds, tasks/s and the workload's own figure (MB/s, chain latency)."""
    ntasks = tasks_in(workload, n)
    med = statistics.median(times)
    out: dict[str, Any] = {"seconds": med, "tasks_per_s": ntasks / med, "samples_s": times}
    if workload == "payload":
        out["mb_per_s"] = ntasks * MIB / med / 1e6
    if workload == "chain":
        out["chain_us_per_task"] = med / ntasks * 1e6
    return out


async def measure_tcp(args: argparse.Namespace) -> dict[str, Any]:
    """async_wf on ``--workers`` processes (TCP) or ranks (MPI): warm-up + ``repeat`` runs."""
    n = args.n
    data = make_payload(n, args.seed) if args.workload == "payload" else None
    t0 = time.perf_counter()
    if args.transport == "mpi":
        rt = await async_wf.Runtime(transport="mpi").start()
    else:
        rt = await async_wf.Runtime(workers=args.workers).start()
    startup = time.perf_counter() - t0
    times: list[float] = []
    try:
        for i in range(args.repeat + 1):
            dt, res = await _timed(lambda: wf_workload(rt, args.workload, n, args.kind, data))
            check_result(args.workload, n, res, data)
            if i:
                times.append(dt)
        stats = rt.statistics()
    finally:
        await rt.close()
    ntasks = tasks_in(args.workload, n)
    out: dict[str, Any] = {
        "workload": args.workload,
        "transport": args.transport,
        "kind": args.kind,
        "workers": args.workers,
        "n": n,
        "tasks": ntasks,
    }
    out.update(_rates(args.workload, n, times))
    out["per_task_us"] = out["seconds"] / ntasks * 1e6
    out.update({
        "startup_s": startup,
        "core": stats["core"],
        "loop": type(asyncio.get_running_loop()).__module__,
        "gc": "off" if GC_OFF else "on",
        "bytes_sent": stats.get("bytes_sent"),
        "bytes_received": stats.get("bytes_received"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "async_wf_source": _source_digest(),
    })
    return out


def _source_digest() -> str:
    """Short sha256 of async_wf's .py files: which code a figure was measured on."""
    import hashlib
    from pathlib import Path

    root = Path(async_wf.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ peers
# Each peer runs in a subprocess of its own (this script with --_peer NAME),
# which prints one JSON line; the parent kills its whole process group when
# it exceeds --peer-timeout, and after it exits, so nothing it started lingers.

def _procpool_run(ex: Any, workload: str, n: int, data: list[Any] | None) -> Any:
    """One workload on a ProcessPoolExecutor; return its result."""
    from concurrent.futures import as_completed

    submit = ex.submit
    if workload == "noop":
        futs = [submit(s_noop) for _ in range(n)]
        for f in futs:
            f.result()
        return n
    if workload == "payload":
        assert data is not None
        futs = [submit(s_sum, a) for a in data]
        return [f.result() for f in futs]
    if workload == "chain":
        # no dependencies in this API: submit the next one when the result is back
        v = 0
        for _ in range(n):
            v = submit(s_inc, v).result()
        return v
    if workload == "fanin":
        # level by level; a pair is submitted as soon as both its inputs are known
        level: list[Any] = [submit(s_inc, i) for i in range(n)]
        while len(level) > 1:
            m = len(level)
            nxt: list[Any] = [None] * ((m + 1) // 2)
            if m % 2:
                nxt[-1] = level[-1]
            where = {f: i for i, f in enumerate(level)}
            vals: dict[int, Any] = {}
            for f in as_completed(level):
                i = where[f]
                if m % 2 and i == m - 1:
                    continue
                vals[i] = f.result()
                j = i ^ 1
                if j in vals:
                    lo = min(i, j)
                    nxt[lo // 2] = submit(s_add, vals[lo], vals[lo + 1])
            level = nxt
        return level[0].result()
    raise ValueError(f"workload must be one of {TCP_WORKLOADS}, got {workload!r}")


def _dask_run(client: Any, workload: str, n: int, data: list[Any] | None) -> Any:
    """One workload on a Dask client; dependencies travel as futures."""
    submit = client.submit
    if workload == "noop":
        futs = [submit(s_noop, pure=False) for _ in range(n)]
        client.gather(futs)
        return n
    if workload == "payload":
        assert data is not None
        # the arrays go as arguments, as for the other systems (no client.scatter)
        return client.gather([submit(s_sum, a, pure=False) for a in data])
    if workload == "chain":
        f = submit(s_inc, 0, pure=False)
        for _ in range(n - 1):
            f = submit(s_inc, f, pure=False)
        return f.result()
    if workload == "fanin":
        level = [submit(s_inc, i, pure=False) for i in range(n)]
        while len(level) > 1:
            nxt = [submit(s_add, level[i], level[i + 1], pure=False)
                   for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        return level[0].result()
    raise ValueError(f"workload must be one of {TCP_WORKLOADS}, got {workload!r}")


def peer_version(name: str) -> str | None:
    """Version of the peer's package, or None when it is not installed."""
    if name == "procpool":
        return f"python {platform.python_version()}"
    if importlib.util.find_spec("distributed") is None:
        return None
    return f"distributed {importlib.metadata.version('distributed')}"


def peer_measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """In the peer's subprocess: start it, warm up, time ``repeat`` runs, shut it down."""
    n, workers, workload = args.n, args.workers, args.workload
    data = make_payload(n, args.seed) if workload == "payload" else None
    stop: Callable[[], None]
    t0 = time.perf_counter()
    if name == "procpool":
        from concurrent.futures import ProcessPoolExecutor

        ex = ProcessPoolExecutor(workers)
        for f in [ex.submit(s_noop) for _ in range(4 * workers)]:  # start every process
            f.result()

        def run_once() -> Any:
            return _procpool_run(ex, workload, n, data)

        def stop() -> None:
            ex.shutdown(wait=True, cancel_futures=True)

        config = (f"ProcessPoolExecutor(max_workers={workers}), default start method "
                  "(fork on Linux); one submit per task")
    elif name == "dask":
        import logging

        import dask
        from distributed import Client, LocalCluster

        # throughput set-up: no dashboard; queuing of root tasks off, so that
        # "all runnable tasks are immediately sent to workers" (the config
        # schema's words for worker-saturation inf), like the others' prefetch
        dask.config.set({"distributed.scheduler.worker-saturation": "inf"})
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
        client.wait_for_workers(workers)
        client.gather([client.submit(s_noop, pure=False) for _ in range(4 * workers)])

        def run_once() -> Any:
            return _dask_run(client, workload, n, data)

        def stop() -> None:
            client.close()
            cluster.close()

        config = (f"LocalCluster(n_workers={workers}, threads_per_worker=1, processes=True, "
                  "dashboard_address=None), worker-saturation inf + Client; "
                  "client.submit(pure=False) per task, futures as arguments")
    else:
        raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")
    startup = time.perf_counter() - t0
    times: list[float] = []
    try:
        for i in range(args.repeat + 1):
            with gc_quiet():
                t1 = time.perf_counter()
                res = run_once()
                dt = time.perf_counter() - t1
            check_result(workload, n, res, data)
            if i:
                times.append(dt)
    finally:
        stop()
    out: dict[str, Any] = {"status": "ok", "startup_s": startup, "version": peer_version(name),
                           "config": config}
    out.update(_rates(workload, n, times))
    return out


def run_limited(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
                cwd: str | None = None) -> tuple[str, str, int, str | None]:
    """Run ``cmd`` in a session of its own for at most ``timeout`` seconds.

    Returns (stdout, stderr, exit code, why it was killed or None). On
    time-out, and after it exits, its whole process group is killed, so
    nothing it started lingers; the output it wrote before is kept.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd or os.getcwd(), env=env)
    why = None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        why = f"timed out after {timeout:g} s (killed)"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a process that exited
    return out, err, proc.returncode, why


def _empty_peer(status: str, reason: str, version: str | None) -> dict[str, Any]:
    return {"status": status, "reason": reason, "tasks_per_s": None, "seconds": None,
            "samples_s": None, "startup_s": None, "version": version}


def run_peer(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one peer in its own subprocess, limited to ``--peer-timeout`` seconds."""
    version = peer_version(name)
    if version is None:
        return _empty_peer("not installed",
                           "pip install 'dask[distributed]' (or async_wf[peers])", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--_peer", name,
           "--transport", "tcp", "--workload", args.workload, "--n", str(args.n),
           "--repeat", str(args.repeat), "--workers", str(args.workers),
           "--seed", str(args.seed), "--gc", args.gc]
    out, err, code, reason = run_limited(cmd, args.peer_timeout)
    if reason is not None:
        return _empty_peer("failed", reason, version)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if code == 0 and result.get("status") == "ok":
        return result
    why = result.get("reason") or " | ".join(err.strip().splitlines()[-3:])
    return _empty_peer("failed", f"exit code {code}: {why}", version)


# ------------------------------------------------------------------ output
def _summary(out: dict[str, Any]) -> str:
    """The one-line human summary of the local transport (unchanged)."""
    return (
        f"{out['workload']:6} {out['transport']}/{out['kind']:6} n={out['n']:<8} "
        f"{out['tasks_per_s']:>10,.0f} tasks/s ({out['per_task_us']:.2f} us/task)   "
        f"raw asyncio {out['baseline_tasks_per_s']:>10,.0f} tasks/s   "
        f"ratio {out['ratio']:.2f}   [{out['core']} core, {out['loop']}]"
    )


def _extra(r: dict[str, Any]) -> str:
    if r.get("mb_per_s") is not None:
        return f"   {r['mb_per_s']:>8,.0f} MB/s"
    if r.get("chain_us_per_task") is not None:
        return f"   {r['chain_us_per_task']:>8,.0f} us/dependent task"
    return ""


def _tcp_summaries(out: dict[str, Any]) -> list[str]:
    """One line per system: async_wf, then each peer with the ratio async_wf / peer."""
    lines = [
        f"{out['workload']:7} async_wf  {out['transport']}/{out['kind']:6} "
        f"workers={out['workers']} n={out['n']:<7} "
        f"{out['tasks_per_s']:>10,.0f} tasks/s{_extra(out)}   "
        f"start-up {out['startup_s']:.2f} s   [{out['core']} core, {out['loop']}]"
    ]
    for name, r in out["peers"].items():
        if r["status"] != "ok":
            lines.append(f"{out['workload']:7} {name:9} {r['status']}: {r.get('reason', '')}")
            continue
        lines.append(
            f"{out['workload']:7} {name:9} {'':11} workers={out['workers']} "
            f"n={out['n']:<7} {r['tasks_per_s']:>10,.0f} tasks/s{_extra(r)}   "
            f"start-up {r['startup_s']:.2f} s   async_wf/{name} {out['ratios'][name]:.2f}   "
            f"[{r['version']}]"
        )
    return lines


def _run_on_loop(main: Any, loop: str) -> Any:
    """Run a coroutine on uvloop (async_wf.run) or on stock asyncio."""
    return async_wf.run(main) if loop == "uvloop" else asyncio.run(main)


def run_tcp(args: argparse.Namespace) -> dict[str, Any]:
    """async_wf over TCP, then each selected peer in its subprocess; one result dict."""
    out: dict[str, Any] = _run_on_loop(measure_tcp(args), args.loop)
    peers = {name: run_peer(name, args) for name in args.peers}
    ratios = {
        name: (out["tasks_per_s"] / r["tasks_per_s"] if r["status"] == "ok" else None)
        for name, r in peers.items()
    }
    base = peers.get("procpool")
    if base is not None and base["status"] == "ok":
        out.update({
            "baseline": "concurrent.futures.ProcessPoolExecutor, one submit per task",
            "baseline_seconds": base["seconds"],
            "baseline_tasks_per_s": base["tasks_per_s"],
            "ratio": ratios["procpool"],
            "baseline_samples_s": base["samples_s"],
        })
    else:
        out.update({"baseline": None, "baseline_seconds": None, "baseline_tasks_per_s": None,
                    "ratio": None, "baseline_samples_s": None})
    out["peers"] = peers
    out["ratios"] = ratios
    return out


# ------------------------------------------------------------------- mpi
def _executor_measure(ex: Any, args: argparse.Namespace, config: str,
                      version: str) -> dict[str, Any]:
    """Time a ``concurrent.futures`` executor already started: warm-up + ``repeat`` runs."""
    n, workload = args.n, args.workload
    data = make_payload(n, args.seed) if workload == "payload" else None
    times: list[float] = []
    for i in range(args.repeat + 1):
        with gc_quiet():
            t1 = time.perf_counter()
            res = _procpool_run(ex, workload, n, data)
            dt = time.perf_counter() - t1
        check_result(workload, n, res, data)
        if i:
            times.append(dt)
    out: dict[str, Any] = {"status": "ok", "version": version, "config": config}
    out.update(_rates(workload, n, times))
    return out


def run_mpi(args: argparse.Namespace) -> dict[str, Any] | None:
    """async_wf's MPI transport, then mpi4py.futures, on the ranks of this MPI job.

    Collective: every rank runs it; rank 0 returns the result, the others None.
    """
    import mpi4py
    from mpi4py import MPI
    from mpi4py.futures import MPICommExecutor

    import async_wf.mpi

    comm = MPI.COMM_WORLD
    if comm.size < 2:
        raise SystemExit("--transport mpi runs under mpiexec -n 3 (1 scheduler + 2 workers)")
    args.workers = comm.size - 1
    out = async_wf.mpi.run(lambda: measure_tcp(args), comm)
    peers: dict[str, Any] = {}
    if "mpi4py" in args.peers:
        version = f"mpi4py {mpi4py.__version__}, {MPI.Get_library_version().splitlines()[0]}"
        t0 = time.perf_counter()
        with MPICommExecutor(comm, root=0) as ex:
            if ex is not None:
                # start every worker before timing, as for the other peers
                for f in [ex.submit(s_noop) for _ in range(4 * args.workers)]:
                    f.result()
                startup = time.perf_counter() - t0
                backoff = os.environ.get("MPI4PY_FUTURES_BACKOFF", "default (0.001)")
                r = _executor_measure(
                    ex, args, f"MPICommExecutor(COMM_WORLD, root=0), {args.workers} worker "
                    f"ranks, MPI4PY_FUTURES_BACKOFF={backoff}; one submit per task", version)
                r["startup_s"] = startup
                peers["mpi4py"] = r
    if out is None:
        return None
    out["peers"] = peers
    out["ratios"] = {name: out["tasks_per_s"] / r["tasks_per_s"] for name, r in peers.items()}
    base = peers.get("mpi4py")
    out.update({
        "baseline": "mpi4py.futures.MPICommExecutor" if base else None,
        "baseline_seconds": base["seconds"] if base else None,
        "baseline_tasks_per_s": base["tasks_per_s"] if base else None,
        "ratio": out["ratios"].get("mpi4py"),
        "baseline_samples_s": base["samples_s"] if base else None,
    })
    return out


def _peer_list(text: str) -> list[str]:
    if text == "none":
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in PEERS + MPI_PEERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            "peers must be 'none' or a comma-separated list of "
            f"{', '.join(PEERS + MPI_PEERS)}; got {text!r}"
        )
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--transport", default="local", choices=["local", "tcp", "mpi"],
                   help="mpi: run under mpiexec -n 3 (1 scheduler rank + 2 workers)")
    p.add_argument("--workload", default="noop", choices=TCP_WORKLOADS,
                   help="payload: tasks each taking a distinct 1 MiB array (tcp only)")
    p.add_argument("--kind", default=None, choices=KINDS,
                   help="task functions: async def (default for local), plain functions in "
                        "threads (default for tcp: what the peers run), or inline")
    p.add_argument("--n", type=int, default=100_000, help="tasks (leaves for fanin)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=None,
                   help="tcp: worker processes of async_wf and of each peer (default 2)")
    p.add_argument("--peers", type=_peer_list, default=None,
                   help="tcp: peers to time in the same run: procpool,dask (default) or none")
    p.add_argument("--peer-timeout", type=float, default=120.0,
                   help="tcp: seconds a peer's subprocess may take in all (default 120)")
    p.add_argument("--seed", type=int, default=0,
                   help="payload: array i is default_rng(seed + i).random(131072)")
    p.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    p.add_argument("--gc", default="off", choices=["off", "on"],
                   help="cyclic GC during timed runs in this process (default off, both sides)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--_peer", choices=PEERS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global GC_OFF
    GC_OFF = args.gc == "off"
    if args.n < 1 or args.repeat < 1:
        p.error(f"--n and --repeat must be >= 1, got {args.n} and {args.repeat}")
    if args.transport == "local":
        for opt, value in (("--workers", args.workers), ("--peers", args.peers),
                           ("--_peer", args._peer)):
            if value is not None:
                p.error(f"{opt} applies to --transport tcp")
        if args.workload not in WORKLOADS:
            p.error(f"--workload {args.workload} needs --transport tcp")
        args.kind = args.kind or "async"
    else:
        if args.threads is not None:
            p.error("--threads applies to --transport local; tcp workers have 1 slot each")
        args.kind = args.kind or "thread"
        args.workers = 2 if args.workers is None else args.workers
        if args.workers < 1:
            p.error(f"--workers must be >= 1, got {args.workers}")
        if args.peer_timeout <= 0:
            p.error(f"--peer-timeout must be > 0, got {args.peer_timeout:g}")
        if args.transport == "mpi":
            args.peers = list(MPI_PEERS) if args.peers is None else args.peers
            if [x for x in args.peers if x not in MPI_PEERS]:
                p.error(f"--transport mpi compares with {', '.join(MPI_PEERS)} only")
        else:
            args.peers = list(PEERS) if args.peers is None else args.peers
            if [x for x in args.peers if x not in PEERS]:
                p.error(f"--transport tcp compares with {', '.join(PEERS)} only")
    if args._peer is not None:
        # inside a peer's subprocess: one JSON line on stdout, whatever happens
        try:
            res = peer_measure(args._peer, args)
        except BaseException as exc:
            print(json.dumps(_empty_peer("failed", f"{type(exc).__name__}: {exc}",
                                         peer_version(args._peer))))
            sys.stdout.flush()
            raise
        print(json.dumps(res))
        return 0
    if args.transport == "mpi":
        res = run_mpi(args)
        if res is None:
            return 0  # a worker rank: rank 0 reports
        for line in _tcp_summaries(res):
            print(line, file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps(res))
        return 0
    if args.transport == "tcp":
        out = run_tcp(args)
        for line in _tcp_summaries(out):
            print(line, file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps(out))
        return 0
    out = _run_on_loop(measure(args), args.loop)
    if args.json:
        print(json.dumps(out))
    else:
        print(_summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
