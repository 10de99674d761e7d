"""What in-situ analytics costs a simulation: time per step with and without publishing.

    python bench/insitu.py [--sizes 256,1024,2048] [--ranks 4] [--steps 100] [--repeat 3]
                           [--json out.json]

The simulation is the heat equation of examples/heat_insitu.py on a 2D
grid of ranks under mpiexec. For each global size it runs four times, in
the same invocation:

  off    no bridge at all: the baseline
  idle   a bridge, publishing every step, but nobody subscribed
  full   the whole field subscribed; the analytics takes each step at once
  task   the same, and the analytics runs one async_wf task on each step
         (a local Runtime) before taking the next: per-step scheduling cost

and prints the simulation's time per step (median over ranks of the loop's
wall time / steps), its ratio to ``off``, the median time of one
``publish`` call, the time per step ``publish`` waited for the analytics
(backpressure; both medians over ranks), the bytes moved per step, the
latency from the last rank's publish to the analytics' loop body (median),
and the hub's own time per step (bookkeeping and assembly copies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import heat_insitu as heat  # noqa: E402


def rank_main(n: int, steps: int, mode: str) -> None:
    """One simulation rank: the heat loop, with or without a bridge; rank 0 prints timings."""
    from mpi4py import MPI

    from async_wf.insitu import Bridge

    comm = MPI.COMM_WORLD
    rank = heat.HeatRank(comm, n)
    bridge = Bridge(comm, {"T": rank.block}) if mode != "off" else None
    comm.Barrier()
    t0 = time.perf_counter()
    in_publish = []
    for t in range(steps):
        if bridge is not None:
            tp = time.perf_counter()
            bridge.publish("T", rank.u, t)
            in_publish.append(time.perf_counter() - tp)
        rank.step(0.0)
    took = time.perf_counter() - t0
    waited = 0.0
    if bridge is not None:
        bridge.close()
        waited = bridge.waited
    # the median call, not the mean: with more ranks than cores, a rank
    # descheduled inside publish would otherwise count a time slice as publishing
    med = statistics.median(in_publish) if in_publish else 0.0
    times = comm.gather((took / steps, med, waited / steps), 0)
    if comm.Get_rank() == 0:
        print(json.dumps({"per_step": statistics.median(t[0] for t in times),
                          "publish": statistics.median(t[1] for t in times),
                          "waited": statistics.median(t[2] for t in times)}), flush=True)


async def run_case(n: int, steps: int, ranks: int, mode: str) -> dict[str, Any]:
    """Run one simulation under mpiexec with the analytics of ``mode`` here."""
    import async_wf
    from async_wf._program import find_mpiexec
    from async_wf.insitu import Hub

    hub = await Hub.start(backpressure=4)
    sub = hub.subscribe("T") if mode in ("full", "task") else None
    # -m mpi4py: an exception on one rank aborts the job instead of leaving
    # its neighbours in a halo exchange for ever
    cmd = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", __file__, "--rank",
           "--n", str(n), "--steps", str(steps), "--mode", mode]
    env = {**os.environ, **hub.environ()}
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.PIPE)
    lat: list[float] = []
    task_rt: list[float] = []
    if sub is not None:
        async with async_wf.Runtime() as rt:
            async for step, data in sub:
                now = time.time()
                rec = sub.record(step)
                assert rec is not None
                lat.append(now - rec.published)
                if mode == "task":
                    t0 = time.perf_counter()
                    await rt.submit(np.ndarray.max, data)
                    task_rt.append(time.perf_counter() - t0)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{mode} n={n}: the simulation failed ({proc.returncode})")
    res = json.loads(out.decode().splitlines()[-1])
    records = list(sub.history) if sub is not None else []
    await hub.close()
    return {
        "mode": mode, "n": n, "ranks": ranks, "steps": steps,
        "per_step_s": res["per_step"],
        "publish_s": res["publish"],
        "waited_s": res["waited"],
        "bytes_per_step": hub.bytes_received / steps,
        "latency_s": statistics.median(lat) if lat else None,
        "hub_per_step_s": statistics.median(r.assembly for r in records) if records else None,
        "task_roundtrip_s": statistics.median(task_rt) if task_rt else None,
    }


def main() -> int:
    """Command line: the benchmark (default) or one simulation rank (--rank)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="off", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="256,1024,2048", help="global grid sizes (n x n)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported")
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args()
    if args.rank:
        rank_main(args.n, args.steps, args.mode)
        return 0
    results = []
    print(f"{'n':>6} {'mode':>5} {'ms/step':>9} {'vs off':>7} {'publish ms':>10} "
          f"{'waiting':>8} {'MB/step':>8} "
          f"{'latency ms':>10} {'hub ms/step':>11} {'task ms':>8}")
    modes = ("off", "idle", "full", "task")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.3f}"

    for n in (int(x) for x in args.sizes.split(",")):
        # the modes interleaved, --repeat rounds, so a noisy moment of the
        # machine hits every mode alike; each figure is the median of rounds
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(args.repeat):
            for mode in modes:
                runs[mode].append(asyncio.run(run_case(n, args.steps, args.ranks, mode)))
        base = None
        for mode in modes:
            r = dict(runs[mode][0])
            for k in ("per_step_s", "publish_s", "waited_s", "latency_s", "hub_per_step_s",
                      "task_roundtrip_s"):
                vals = [x[k] for x in runs[mode] if x[k] is not None]
                r[k] = statistics.median(vals) if vals else None
            r["samples"] = runs[mode]
            results.append(r)
            base = base or r["per_step_s"]
            print(f"{n:>6} {mode:>5} {r['per_step_s'] * 1e3:>9.3f} "
                  f"{r['per_step_s'] / base:>6.2f}x {ms(r['publish_s']):>10} "
                  f"{ms(r['waited_s']):>8} "
                  f"{r['bytes_per_step'] / 1e6:>8.2f} "
                  f"{ms(r['latency_s']):>10} {ms(r['hub_per_step_s']):>11} "
                  f"{ms(r['task_roundtrip_s']):>8}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "cores": os.cpu_count(),
                                               "date": time.strftime("%Y-%m-%d")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
