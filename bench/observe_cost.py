"""What observability costs on no-op tasks: options off, and metrics + trace on.

    python bench/observe_cost.py --n 50000 --repeat 5
    python bench/observe_cost.py --base /path/to/checkout/of/main   # also: before the feature

Each measurement is one subprocess that starts a runtime, warms it up,
then times ``n`` independent no-op tasks from the first submit to the
last result (start-up and the writing of the trace at close excluded).
Variants run interleaved, repeat after repeat, so that a drift of the
machine hits them all alike; the median and the best of the repeats are
reported (on a shared machine the best is the less noisy of the two).

Transports: ``local`` (``async def`` no-ops on the loop) and ``tcp`` (2
worker processes, blocking no-ops). Variants: ``off`` (this checkout, no
option), ``on`` (this checkout, ``metrics`` on a free port and ``trace``),
and with ``--base DIR``, ``base`` (another checkout, e.g. main before this
feature, no option): ``off`` against ``base`` is the cost when off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

CHILD = r'''
import asyncio, json, sys, time
import psutil
import async_wf

ME = psutil.Process()

def cpu():
    """CPU seconds of this process (all threads) and of its worker processes."""
    t = ME.cpu_times()
    workers = sum(c.cpu_times().user + c.cpu_times().system for c in ME.children())
    return t.user + t.system, workers

async def anoop():
    return None

def snoop():
    return None

async def main(transport, variant, n, trace):
    kw = {"workers": 2} if transport == "tcp" else {}
    if variant == "on":
        kw.update(metrics="127.0.0.1:0", trace=trace)
    fn = snoop if transport == "tcp" else anoop
    async with async_wf.Runtime(**kw) as rt:
        await async_wf.gather(*[rt.submit(fn) for _ in range(2000)])
        c0 = cpu()
        t0 = time.perf_counter()
        await async_wf.gather(*[rt.submit(fn) for _ in range(n)])
        dt = time.perf_counter() - t0
        c1 = cpu()
    print(json.dumps({"tasks_per_s": n / dt, "sched_cpu_us": (c1[0] - c0[0]) / n * 1e6,
                      "worker_cpu_us": (c1[1] - c0[1]) / n * 1e6}))

async_wf.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
'''


def measure(tree: Path, transport: str, variant: str, n: int, tmp: str) -> dict[str, float]:
    """One run in a subprocess importing async_wf from ``tree``.

    Returns tasks/s and the CPU microseconds per task of the scheduler's
    process and of the workers (less disturbed than the rate by other
    load on the machine).
    """
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("ASYNC_WF_DEFAULTS", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, transport, variant, str(n),
         os.path.join(tmp, "trace.json")],
        env=env, capture_output=True, text=True, timeout=600, check=True)
    got: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def main() -> None:
    """Run the comparison and print (and optionally save) the medians."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--transports", default="local,tcp")
    ap.add_argument("--base", type=Path, help="a checkout to compare with (its 'off')")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    variants = [("base", args.base)] if args.base else []
    variants += [("off", HERE), ("on", HERE)]
    results: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[tuple[float, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for transport in args.transports.split(","):
                for name, tree in variants:
                    got = measure(tree, transport, "on" if name == "on" else "off",
                                  args.n, tmp)
                    results.setdefault(transport, {}).setdefault(name, []).append(
                        got["tasks_per_s"])
                    cpu.setdefault(transport, {}).setdefault(name, []).append(
                        (got["sched_cpu_us"], got["worker_cpu_us"]))
    summary = {}
    for transport, by in results.items():
        for what, agg in (("median", statistics.median), ("best", max)):
            val = {k: agg(v) for k, v in by.items()}
            summary.setdefault(transport, {"runs": by})[f"{what}_tasks_per_s"] = val
            line = ", ".join(f"{k} {v:,.0f}/s" for k, v in val.items())
            extra = ""
            if "base" in val:
                extra = f", off vs base {100 * (1 - val['off'] / val['base']):+.1f} %"
            print(f"{transport} {what}: {line}; on vs off "
                  f"{100 * (1 - val['on'] / val['off']):+.1f} % slower{extra}")
        per = {k: (statistics.median(c[0] for c in v), statistics.median(c[1] for c in v))
               for k, v in cpu[transport].items()}
        summary[transport]["median_cpu_us_per_task"] = per
        print(f"{transport} CPU per task (median; scheduler process + workers): " + ", ".join(
            f"{k} {a:.2f} + {b:.2f} us" for k, (a, b) in per.items()))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
