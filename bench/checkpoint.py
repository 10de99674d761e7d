"""What the checkpoint log costs a running workflow, and what a re-run gains.

    python bench/checkpoint.py [--transports local,tcp] [--n 20000] [--payload-n 200]
                               [--rerun-n 100000] [--index-n 1000000] [--repeat 3]
                               [--policies POLICY,...] [--json]

Measured in one run, each figure the median of ``--repeat`` runs after a
warm-up (the runs without and with the log alternated), every run with a
fresh log file:

  noop      ``--n`` independent tasks ``noop(i)`` (distinct arguments, so
            distinct keys and records), tasks/s without and with the log,
            per transport and per flush policy in ``--policies`` (the
            default policy and ``interval``), the loss in percent, and
            "scheduler +X us/task": the CPU time the log adds to the
            scheduler's process per recorded task (median CPU seconds with
            the log minus without, over n; on the local transport the
            tasks run inline, so that is all of it, and over TCP the
            workers are other processes, not counted)
            On the default policy, "where": that figure in parts. "key" is
            the scheduler's per-task key call at submit (``Recorder.key`` on
            ``noop(i)``, timed in a loop of its own); "record" and "flush" are
            the time inside ``Recorder.record`` (the records, made in one
            compiled loop per batch) and inside the log's writes of its
            buffer, both timed per call during the timed runs; "rest" is the
            figure less those three: the scheduler's own work for a recorded
            task (the slower submit and finish ways, the index). Noise moves
            each part by a few hundredths of a microsecond and "rest" by the
            whole figure's noise. "tasks a batch": finished tasks per
            ``Recorder.record`` call (one per loop iteration that had any),
            over which the per-call costs of record and flush spread.
  payload   ``--payload-n`` tasks each returning a fresh 1 MiB NumPy array,
            MB/s of results without and with the log (every array recorded)
  rerun     ``--rerun-n`` noop tasks run once with the log (time T1), then the
            same program again, finding every task in the log (time T2), both
            including submitting and awaiting every future; the speed-up is
            T1 / T2. Local transport: it has the cheapest original run, so it
            gives the lowest ratio. Also with tasks that sleep 1 ms
            (``--rerun-sleep-n`` of them, 2 worker processes), where the
            original run costs what real tasks cost.
  index     opening a log of ``--index-n`` small results (appended in batches
            of 1000, as a runtime appends them): records indexed per s

The log is written in a temporary directory on the local disk, no fsync.
As in throughput.py, the cyclic GC is collected and then disabled during
each timed stretch, on both sides alike (``--gc on`` keeps it running):
with 10^5 futures alive its full collections make the figures swing from
run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import async_wf
from async_wf._recorder import Recorder
from async_wf._scheduler import Scheduler
from async_wf.checkpoint import CheckpointLog, function_identity, task_key
from async_wf.checkpoint._log import DEFAULT_FLUSH

MIB = 1 << 20
GC_OFF = True  # --gc on sets it False


def noop(i: int) -> None:
    return None


def make_array(i: int) -> np.ndarray:
    return np.full(MIB // 8, float(i))


def nap(i: int) -> int:
    time.sleep(0.001)
    return i


async def _run(fn: Callable[[int], Any], n: int, transport: str, log: Path | None,
               flush: str | None = None, cpu: list[float] | None = None,
               calls: _CallTimes | None = None) -> float:
    """Seconds from the first submit to the last result (start-up excluded).

    ``cpu``: the CPU seconds this process (the scheduler; workers are other
    processes) spent in the same stretch are appended to it. ``calls``: made
    active for the same stretch.
    """
    opts: dict[str, Any] = {}
    if log is not None:
        opts["checkpoint"] = log if flush is None else async_wf.Checkpoint(log, flush=flush)
    if transport == "tcp":
        opts["workers"] = 2
    task = async_wf.task(fn, inline=True) if transport == "local" and fn is not nap else fn
    async with async_wf.Runtime(**opts) as rt:
        if transport == "tcp":
            await rt.submit(noop, -1)  # the workers are up
        if GC_OFF:
            gc.collect()
            gc.disable()
        if calls is not None:
            calls.active = True
        try:
            c0 = time.process_time()
            t0 = time.perf_counter()
            futs = [rt.submit(task, i) for i in range(n)]
            for f in futs:
                await f
            took = time.perf_counter() - t0
            if cpu is not None:
                cpu.append(time.process_time() - c0)
        finally:
            gc.enable()
            if calls is not None:
                calls.active = False
    return took


class _CallTimes:
    """While active, the seconds spent inside ``Recorder.record`` and the log's buffer writes.

    Both are called once per batch of finished tasks, so timing each call
    adds nothing measurable per task. ``record`` includes the writes its
    flush policy makes; ``flush`` counts every write, whoever calls it.
    """

    def __init__(self) -> None:
        self.seconds = {"record": 0.0, "flush": 0.0}
        self.calls = {"record": 0, "flush": 0}
        self.active = False

    def _timed(self, fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        """``fn``, adding the seconds of each call made while active to ``part``."""

        def timed(*args: Any) -> Any:
            if not self.active:
                return fn(*args)
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[part] += time.perf_counter() - t0
                self.calls[part] += 1

        return timed

    def __enter__(self) -> _CallTimes:
        self._saved = (Recorder.record, CheckpointLog._flush_pending)
        record, flush = self._saved
        Recorder.record = self._timed(record, "record")  # type: ignore[method-assign]
        CheckpointLog._flush_pending = self._timed(flush, "flush")  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Recorder.record, CheckpointLog._flush_pending = self._saved  # type: ignore[method-assign]


def key_seconds(tmp: Path, n: int, repeat: int) -> float:
    """Median seconds of ``n`` scheduler key calls for ``noop(i)`` (distinct i)."""

    async def one(path: Path) -> float:
        async with async_wf.Runtime(checkpoint=path) as rt:
            await rt.submit(noop, -1)  # its identity is cached, as in a run
            sched = rt._sched
            assert isinstance(sched, Scheduler) and sched._ckpt is not None
            key = sched._ckpt.key
            opts = async_wf.task(noop)._opts
            calls = [(i,) for i in range(n)]
            empty: dict[str, Any] = {}
            found: list[Any] = []
            t0 = time.perf_counter()
            for args in calls:
                key(noop, opts, args, empty, found)
            return time.perf_counter() - t0

    return statistics.median(asyncio.run(one(tmp / f"keys-{r}.wfck")) for r in range(repeat))


def run_pair(tmp: Path, fn: Callable[[int], Any], n: int, transport: str,
             repeat: int, flush: str | None = None) -> dict[str, Any]:
    """The same workload without and with a (fresh) log, with flush policy ``flush``.

    The runs alternate, without then with, after one warm-up of each: a
    drift of the machine or of this process's heap over the runs then
    weighs on both sides alike, where running all of one side first put
    it all on one.
    """
    counter = [0]

    def fresh() -> Path:
        counter[0] += 1
        return tmp / f"{fn.__name__}-{transport}-{flush}-{counter[0]}.wfck"

    cpu_bare: list[float] = []
    cpu_logged: list[float] = []
    s_bare: list[float] = []
    s_logged: list[float] = []
    asyncio.run(_run(fn, n, transport, None))  # the warm-ups: nothing of them is kept
    asyncio.run(_run(fn, n, transport, fresh(), flush))
    with _CallTimes() as calls:
        for _ in range(repeat):
            s_bare.append(asyncio.run(_run(fn, n, transport, None, cpu=cpu_bare)))
            s_logged.append(asyncio.run(_run(fn, n, transport, fresh(), flush, cpu=cpu_logged,
                                             calls=calls)))
    bare, logged = statistics.median(s_bare), statistics.median(s_logged)
    cpu_without = statistics.median(cpu_bare)
    cpu_with = statistics.median(cpu_logged)
    return {"n": n, "flush": flush or DEFAULT_FLUSH, "without_s": bare, "with_s": logged,
            "samples_without": s_bare, "samples_with": s_logged,
            "loss_pct": 100 * (1 - bare / logged),
            "sched_cpu_without_s": cpu_without, "sched_cpu_with_s": cpu_with,
            # what the log adds to the scheduler's CPU time per recorded task
            "sched_us_per_task": 1e6 * (cpu_with - cpu_without) / n,
            # the time inside record and the writes per task, the mean over the
            # timed runs (the warm-up left out)
            "record_us_per_task": 1e6 * calls.seconds["record"] / (n * repeat),
            "flush_us_per_task": 1e6 * calls.seconds["flush"] / (n * repeat),
            # finished tasks per record call: what its per-call costs spread over
            "record_batch": n * repeat / max(calls.calls["record"], 1)}


def rerun(tmp: Path, fn: Callable[[int], Any], n: int, transport: str,
          repeat: int) -> dict[str, Any]:
    """Original run with the log, then the same run again finding everything."""
    firsts, agains = [], []
    for r in range(repeat):
        path = tmp / f"rerun-{fn.__name__}-{transport}-{r}.wfck"
        firsts.append(asyncio.run(_run(fn, n, transport, path)))
        agains.append(asyncio.run(_run(fn, n, transport, path)))
    t1, t2 = statistics.median(firsts), statistics.median(agains)
    return {"n": n, "transport": transport, "original_s": t1, "rerun_s": t2,
            "speedup": t1 / t2, "samples_original": firsts, "samples_rerun": agains}


def index_rate(tmp: Path, n: int, repeat: int) -> dict[str, Any]:
    path = tmp / "index.wfck"
    fid = function_identity(noop)
    with CheckpointLog(path) as log:
        # in batches of 1000, as a runtime's loop appends them
        for lo in range(0, n, 1000):
            log.put_results([(task_key(fid, (i,), {}), None, "bench:noop", ())
                             for i in range(lo, min(n, lo + 1000))])
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with CheckpointLog(path, readonly=True) as log:
            assert len(log) == n
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "open_s": best, "records_per_s": n / best, "bytes": path.stat().st_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transports", default="local,tcp")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--payload-n", type=int, default=200)
    p.add_argument("--rerun-n", type=int, default=100_000)
    p.add_argument("--rerun-sleep-n", type=int, default=2000)
    p.add_argument("--index-n", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--policies", default=f"{DEFAULT_FLUSH},interval",
                   help="flush policies timed on the noop workload (the first is the default)")
    p.add_argument("--gc", choices=("on", "off"), default="off",
                   help="the cyclic GC during timed runs (default: off, on both sides)")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    args = p.parse_args()
    global GC_OFF
    GC_OFF = args.gc == "off"
    out: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "core": async_wf.CORE_IMPL, "gc": args.gc}
    with tempfile.TemporaryDirectory(prefix="awf-bench-ckpt-") as d:
        tmp = Path(d)
        for transport in args.transports.split(","):
            for flush in args.policies.split(","):
                r = run_pair(tmp, noop, args.n, transport, args.repeat, flush)
                out[f"noop_{transport}" + ("" if flush == DEFAULT_FLUSH else f"_{flush}")] = r
                print(f"noop     {transport:5}  n={r['n']:<7} without "
                      f"{r['n'] / r['without_s']:>9,.0f} tasks/s  with log "
                      f"{r['n'] / r['with_s']:>9,.0f} tasks/s  loss {r['loss_pct']:5.1f} %"
                      f"  scheduler +{r['sched_us_per_task']:.2f} us/task"
                      f"  flush={flush}{' (default)' if flush == DEFAULT_FLUSH else ''}",
                      flush=True)
                if flush == DEFAULT_FLUSH:
                    if "key_us_per_task" not in out:
                        out["key_us_per_task"] = 1e6 * key_seconds(tmp, args.n,
                                                                   args.repeat) / args.n
                    key_us = out["key_us_per_task"]
                    rec_us = r["record_us_per_task"]
                    # record's time includes the writes its policy makes
                    flush_us = r["flush_us_per_task"]
                    rest = r["sched_us_per_task"] - key_us - rec_us
                    print(f"  where  {transport:5}  key {key_us:.2f}  record "
                          f"{rec_us - flush_us:.2f}  flush {flush_us:.2f}  rest {rest:+.2f}"
                          f" us/task; {r['record_batch']:,.0f} tasks a batch", flush=True)
            r = run_pair(tmp, make_array, args.payload_n, transport, args.repeat)
            out[f"payload_{transport}"] = r
            mb = r["n"] * MIB / 1e6
            print(f"payload  {transport:5}  n={r['n']:<7} without {mb / r['without_s']:>9,.0f}"
                  f" MB/s     with log {mb / r['with_s']:>9,.0f} MB/s     "
                  f"  loss {r['loss_pct']:5.1f} %", flush=True)
        r = rerun(tmp, noop, args.rerun_n, "local", args.repeat)
        out["rerun_noop"] = r
        print(f"rerun    local  n={r['n']:<7} original {r['original_s']:.3f} s  "
              f"re-run {r['rerun_s']:.3f} s  speed-up {r['speedup']:.1f}x", flush=True)
        if args.rerun_sleep_n:
            r = rerun(tmp, nap, args.rerun_sleep_n, "tcp", 1)
            out["rerun_sleep1ms"] = r
            print(f"rerun    tcp    n={r['n']:<7} original {r['original_s']:.3f} s  "
                  f"re-run {r['rerun_s']:.3f} s  speed-up {r['speedup']:.1f}x  "
                  "(tasks of 1 ms, 2 workers)", flush=True)
        r = index_rate(tmp, args.index_n, args.repeat)
        out["index"] = r
        print(f"index    open {r['n']:,} records in {r['open_s']:.3f} s: "
              f"{r['records_per_s']:,.0f} records/s ({r['bytes'] / 1e6:.0f} MB)", flush=True)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
