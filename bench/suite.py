"""The benchmark suite: async_wf and the systems users would otherwise pick, same workloads.

    python -m bench [--systems S,...] [--workloads W,...] [--n N] [--repeat R]
                    [--workers W] [--timeout S] [--json FILE] [--png FILE] [--quick]
    python -m bench --scaling [--scaling-n 1000,10000,100000,1000000] [--png FILE]

Systems: async_wf-local (in-process), async_wf-tcp (worker processes over
TCP), async_wf-mpi (worker ranks under mpiexec), dask, ray, parsl, mpi4py
(mpi4py.futures under mpiexec), procpool (concurrent.futures
ProcessPoolExecutor); and two physical references: asyncio (bare asyncio
tasks in one process) and socket (a loopback TCP round trip of batched
pickled calls to echo processes, no scheduler at all).

The ``programs`` workload (on request: ``--workloads programs``) runs n
independent external programs (``true``) as tasks, no output kept; it adds
hyperqueue (HyperQueue's ``LocalCluster``, which runs programs only) to
the systems. The references cannot run programs and skip it.

Each system runs in a subprocess of its own (bench/systems.py), started
once for all the workloads, with a time limit; see bench/README.md for the
fairness rules. The terminal gets a table (median tasks/s per system and
workload, MB/s for payload) and the ratios of async_wf over each peer
measured in the same run; ``--json`` writes every sample and the versions of
every package, ``--png`` a chart of the same table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import throughput as T
from bench.systems import version_of

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("async_wf-local", "async_wf-tcp", "async_wf-mpi", "dask", "ray", "parsl", "mpi4py",
           "procpool", "hyperqueue")
REFERENCES = ("asyncio", "socket")
ALL = SYSTEMS + REFERENCES
WORKLOADS = ("noop", "chain", "fanin", "payload", "programs")
#: what runs without --workloads: programs is asked for by name (it spawns
#: thousands of processes, and adds a peer of its own)
DEFAULT_WORKLOADS = ("noop", "chain", "fanin", "payload")
DEFAULT_N = {"noop": 10000, "chain": 1000, "fanin": 5000, "payload": 100, "programs": 4000}
QUICK_N = {"noop": 1000, "chain": 100, "fanin": 500, "payload": 20, "programs": 200}
#: the workloads a system cannot run, and why: reported as "n/a", never started
CANNOT = {
    "asyncio": ({"programs"}, "a reference of Python calls: it runs no programs"),
    "socket": ({"programs"}, "a reference of Python calls: it runs no programs"),
    "hyperqueue": (set(DEFAULT_WORKLOADS), "HyperQueue runs programs here, not Python functions"),
}
#: the async_wf system each other system is compared with: the one that runs
#: tasks the same way (worker processes, MPI ranks, or in-process)
COMPARED_WITH = {
    "dask": "async_wf-tcp", "ray": "async_wf-tcp", "parsl": "async_wf-tcp",
    "procpool": "async_wf-tcp", "socket": "async_wf-tcp", "mpi4py": "async_wf-mpi",
    "asyncio": "async_wf-local", "hyperqueue": "async_wf-tcp",
}
MPI_SYSTEMS = ("async_wf-mpi", "mpi4py")
#: the package a system needs beyond the standard library, and how to get it
NEEDS = {"dask": "distributed", "ray": "ray", "parsl": "parsl", "mpi4py": "mpi4py",
         "async_wf-mpi": "mpi4py", "hyperqueue": "hyperqueue"}
VERSIONS = ("async_wf", "numpy", "cloudpickle", "lz4", "uvloop", "dask", "distributed", "ray",
            "parsl", "mpi4py", "mpich", "hyperqueue", "matplotlib", "psutil")
_MARK = "ASYNC_WF_BENCH_RUN"


# ------------------------------------------------------------ running one
def _sweep(mark: str) -> int:
    """Kill every process still carrying this run's mark in its environment.

    Peers start daemons in sessions of their own (Ray's raylet, Parsl's
    interchange); the mark is inherited by all of them, the process group
    is not. Returns how many were killed.
    """
    import psutil

    killed = 0
    me = os.getpid()
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if p.environ().get(_MARK) == mark:
                p.kill()
                killed += 1
    return killed


def run_system(system: str, plan: list[tuple[str, int]], args: argparse.Namespace
               ) -> list[dict[str, Any]]:
    """Measure ``plan`` on one system in its own subprocess; a result per item, in order."""
    cannot, why_not = CANNOT.get(system, (set(), ""))
    skipped = {(w, n): {"workload": w, "n": n, "status": "n/a", "reason": why_not}
               for w, n in plan if w in cannot}
    runs = [item for item in plan if tuple(item) not in skipped]
    if not runs:
        return [skipped[w, n] for w, n in plan]
    need = NEEDS.get(system)
    if need is not None and version_of(need) is None:
        how = 'pip install -e ".[mpi]"' if system in MPI_SYSTEMS else \
            'pip install -e ".[peers]"'
        return [skipped.get((w, n)) or {"workload": w, "n": n, "status": "not installed",
                                        "reason": f"needs {need}: {how}"} for w, n in plan]
    plan_in = plan
    plan = runs
    cmd = [sys.executable, "-m", "bench", "--_child", system, "--_plan", json.dumps(plan),
           "--workers", str(args.workers), "--repeat", str(args.repeat),
           "--seed", str(args.seed), "--gc", args.gc]
    if system in MPI_SYSTEMS:
        from async_wf._program import find_mpiexec

        cmd = [find_mpiexec(), "-n", str(args.workers + 1), *cmd]
    mark = uuid.uuid4().hex
    env = dict(os.environ, **{_MARK: mark})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # the environment's scripts first: Parsl starts its interchange and
    # worker pool by command name
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(filter(None, [bindir, env.get("PATH")]))
    try:
        out, err, code, why = T.run_limited(cmd, args.timeout, env, str(ROOT))
    finally:
        _sweep(mark)
    got: dict[tuple[str, int], dict[str, Any]] = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            got[r["workload"], r["n"]] = r
    if why is None and code != 0:
        tail = " | ".join(err.strip().splitlines()[-3:])
        why = f"exit code {code}: {tail}"[:500]
    results = []
    for w, n in plan_in:
        r = skipped.get((w, n)) or got.get((w, n)) or {
            "workload": w, "n": n, "status": "failed", "reason": why or "no result (see stderr)"}
        _summarise(r)
        results.append(r)
    return results


def _summarise(r: dict[str, Any]) -> None:
    """Add median/min/max seconds and rates to an ok result."""
    if r.get("status") != "ok":
        return
    s = r["samples_s"]
    tasks = T.tasks_in(r["workload"], r["n"])
    med = statistics.median(s)
    r.update({"tasks": tasks, "median_s": med, "min_s": min(s), "max_s": max(s),
              "tasks_per_s": tasks / med, "us_per_task": med / tasks * 1e6})
    if r["workload"] == "payload":
        r["mb_per_s"] = tasks * T.MIB / med / 1e6


# ------------------------------------------------------------------ output
def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"]
    if r["workload"] == "payload":
        return f"{r['mb_per_s']:,.0f} MB/s"
    return f"{r['tasks_per_s']:,.0f}"


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{system: {workload: async_wf rate / its rate}}`` for every non-async_wf system."""
    out: dict[str, dict[str, Any]] = {}
    for system, per in results.items():
        ref = COMPARED_WITH.get(system)
        if ref is None:
            continue
        row: dict[str, Any] = {"compared_with": ref}
        for w, r in per.items():
            a = results.get(ref, {}).get(w)
            ok = r["status"] == "ok" and a is not None and a["status"] == "ok"
            row[w] = a["tasks_per_s"] / r["tasks_per_s"] if ok else None  # type: ignore[index]
        out[system] = row
    return out


def table(results: dict[str, dict[str, dict[str, Any]]], workloads: list[str]) -> str:
    """The terminal table: rates, then the ratios."""
    lines = []
    head = f"{'system':16}" + "".join(f"{w + (' (tasks/s)' if w != 'payload' else ''):>20}"
                                      for w in workloads) + f"{'start-up s':>12}"
    lines += [head, "-" * len(head)]
    for system, per in results.items():
        start = next((r["startup_s"] for r in per.values() if r["status"] == "ok"), None)
        lines.append(f"{system:16}" + "".join(f"{_cell(per.get(w)):>20}" for w in workloads)
                     + (f"{start:>12.2f}" if start is not None else f"{'-':>12}"))
    rat = ratios(results)
    if rat:
        lines += ["", "async_wf / system, same workload, same run (>1: async_wf is faster)"]
        for system, row in rat.items():
            cells = "".join(f"{(f'{row[w]:.2f}x' if row.get(w) else '-'):>20}"
                            for w in workloads)
            lines.append(f"{system:16}{cells}   vs {row['compared_with']}")
    for system, per in results.items():
        for r in per.values():
            if r["status"] != "ok":
                lines.append(f"{system} {r['workload']}: {r['status']}: {r.get('reason', '')}")
    return "\n".join(lines)


def chart(results: dict[str, dict[str, dict[str, Any]]], workloads: list[str], path: str,
          title: str) -> None:
    """Grouped bars, one group per workload, one bar per system, tasks/s on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(results)
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / max(len(systems), 1)
    cmap = plt.get_cmap("tab10")
    for i, system in enumerate(systems):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            r = results[system].get(w)
            if r is not None and r["status"] == "ok":
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(r["tasks_per_s"])
        hatch = "//" if system in REFERENCES else None
        ax.bar(xs, ys, width, label=system, color=cmap(i % 10), hatch=hatch,
               edgecolor="black", linewidth=0.4)
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([f"{w}\n(1 MiB tasks)" if w == "payload" else w for w in workloads])
    ax.set_ylabel("tasks per second (median, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_chart(points: dict[str, list[dict[str, Any]]], path: str, title: str) -> None:
    """Microseconds per task against the number of tasks, log-log, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for system, rows in points.items():
        ok = [r for r in rows if r["status"] == "ok"]
        if ok:
            ax.plot([r["tasks"] for r in ok], [r["us_per_task"] for r in ok], "o-",
                    label=system, linestyle="--" if system in REFERENCES else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks in the graph")
    ax.set_ylabel("µs per task (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> dict[str, str | None]:
    return {p: version_of(p) for p in VERSIONS} | {"python": platform.python_version()}


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


# ------------------------------------------------------------------- main
def _list(kind: str, allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in names if t not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"{kind} must be a comma-separated list of {', '.join(allowed)}; got {text!r}")
        return list(dict.fromkeys(names))
    return parse


def _ns(text: str) -> list[int]:
    try:
        ns = [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        ns = []
    if not ns or min(ns) < 1:
        raise argparse.ArgumentTypeError(f"--scaling-n must be positive numbers, got {text!r}")
    return sorted(ns)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--systems", type=_list("--systems", ALL), default=None,
                   help="default: every system that runs one of the workloads")
    p.add_argument("--workloads", type=_list("--workloads", WORKLOADS),
                   default=list(DEFAULT_WORKLOADS),
                   help="default: noop,chain,fanin,payload (programs on request)")
    p.add_argument("--n", type=int, default=None,
                   help="tasks per workload (default: noop 10000, chain 1000, fanin 5000 "
                        "leaves, payload 100, programs 4000)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds one system may take for all its workloads, start-up included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gc", choices=("on", "off"), default="off")
    p.add_argument("--quick", action="store_true",
                   help="small n, one repeat: the whole suite in about a minute")
    p.add_argument("--scaling", action="store_true",
                   help="sweep the number of tasks (--scaling-n) on one workload instead")
    p.add_argument("--scaling-n", type=_ns, default=[1000, 10000, 100000, 1000000])
    p.add_argument("--scaling-workload", choices=WORKLOADS[:3], default="noop")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--png", metavar="FILE")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_plan", help=argparse.SUPPRESS)
    p.add_argument("--_echo", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1 or args.workers < 1 or (args.n is not None and args.n < 1):
        p.error(f"--n, --repeat and --workers must be >= 1, got n={args.n}, "
                f"repeat={args.repeat}, workers={args.workers}")
    if args.quick:
        args.repeat = 1
    if args.systems is None:
        wanted = set(args.workloads if not args.scaling else [args.scaling_workload])
        args.systems = [s for s in ALL if wanted - CANNOT.get(s, (set(), ""))[0]]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the suite (or, with the hidden options, one child or one echo server)."""
    args = parse_args(argv)
    T.GC_OFF = args.gc == "off"
    if args._echo:
        from bench.systems import _echo_server

        _echo_server()
        return 0
    if args._child:
        from bench.systems import child

        child(args._child, [tuple(x) for x in json.loads(args._plan)], args.workers,
              args.repeat, args.seed)
        return 0
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    head = {"date": when, "command": command, "machine": _machine(), "versions": _versions(),
            "workers": args.workers, "repeat": args.repeat, "gc": args.gc}
    title = (f"{command}\n{when[:10]}, {os.cpu_count()} cores, {args.workers} workers, "
             f"median of {args.repeat}")
    if args.scaling:
        return _scaling(args, head, title)
    plan = [(w, args.n or (QUICK_N if args.quick else DEFAULT_N)[w]) for w in args.workloads]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for system in args.systems:
        t0 = time.perf_counter()
        results[system] = {r["workload"]: r for r in run_system(system, plan, args)}
        print(f"# {system}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(table(results, args.workloads))
    out = head | {"results": results, "ratios": ratios(results)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        chart(results, args.workloads, args.png, title)
    return 0


def _scaling(args: argparse.Namespace, head: dict[str, Any], title: str) -> int:
    """Each system on growing graphs, as far as it gets within --timeout in all."""
    w = args.scaling_workload
    plan = [(w, n) for n in args.scaling_n]
    points: dict[str, list[dict[str, Any]]] = {}
    for system in args.systems:
        # one child runs the whole sweep, smallest first, within --timeout:
        # the sizes it did not reach are reported as failed (timed out)
        points[system] = run_system(system, plan, args)
        for r in points[system]:
            cell = (f"{r['us_per_task']:.2f} us/task" if r["status"] == "ok"
                    else r["status"])
            print(f"{system:16} {w} n={r['n']:<9} {cell}", flush=True)
    out = head | {"scaling": {"workload": w, "points": points}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.png:
        scaling_chart(points, args.png, title)
    return 0
