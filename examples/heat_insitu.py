"""In-situ analytics of a running MPI simulation: a 2D heat equation on a 2x2 grid of ranks.

    python examples/heat_insitu.py              # analytics here, simulation under mpiexec -n 4
    python examples/heat_insitu.py --n 512 --steps 200 --backpressure 4

The analytics (this process) starts a ``Runtime`` with two worker processes
and an in-situ ``Hub``, then launches the simulation with the ``mpiexec``
of the mpich wheel. Every step, each of the four ranks publishes its
block of the temperature field; the analytics

* receives the whole field assembled, with a window of the last 4 steps,
  and computes per-step statistics and the windowed temporal mean as
  async_wf tasks on the workers;
* narrows its request to the top-left quarter at ``--switch`` (named in
  advance, while the simulation runs): from that step on, only rank 0 sends
  anything;
* steers the simulation: when the hottest point falls below a threshold,
  it turns the boundary heater on (``hub.steer("boundary", 1.0)``); every
  rank reads the new boundary value at the same step (``bridge.get``).

The simulation can never run more than ``--backpressure`` steps ahead of
the analytics. ``serial_run`` is the same update in plain NumPy on one
array; the tests check the in-situ run against it, bit for bit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import numpy as np

ALPHA = 0.2
HEATER = 1.0


# ---------------------------------------------------------------- numerics
def initial_field(n: int, rows: slice = slice(None), cols: slice = slice(None)) -> Any:
    """The initial temperature (a small hot square in the middle), or a block of it."""
    i = np.arange(n)[rows, None]
    j = np.arange(n)[None, cols]
    return np.where((abs(i - n / 2) < n / 16) & (abs(j - n / 2) < n / 16), 1.0, 0.0)


def heat_update(padded: Any) -> Any:
    """One explicit step of the heat equation on a field with a one-cell halo.

    Element by element the same expression on every rank and in the serial
    run, so a distributed run gives exactly the serial run's bits.
    """
    c = padded[1:-1, 1:-1]
    return c + ALPHA * (padded[:-2, 1:-1] + padded[2:, 1:-1]
                        + padded[1:-1, :-2] + padded[1:-1, 2:] - 4.0 * c)


def serial_run(n: int, steps: int, boundary: list[tuple[int, float]]) -> list[Any]:
    """The fields of steps 0..steps-1 of a serial run whose boundary changes as given.

    ``boundary``: (from step, value) pairs, as the analytics steered them.
    """
    u = initial_field(n)
    out = []
    for t in range(steps):
        b = 0.0
        for s, v in boundary:
            if s <= t:
                b = v
        out.append(u)
        u = heat_update(np.pad(u, 1, constant_values=b))
    return out


def split(n: int, parts: int, k: int) -> tuple[int, int]:
    """Start and size of the k-th of ``parts`` near-equal pieces of ``n``."""
    base, extra = divmod(n, parts)
    start = k * base + min(k, extra)
    return start, base + (1 if k < extra else 0)


# -------------------------------------------------------------- simulation
class HeatRank:
    """This rank's block of the field on a 2D grid of ranks, advanced one step at a time."""

    def __init__(self, comm: Any, n: int) -> None:
        from mpi4py import MPI

        from async_wf.insitu import Block

        dims = MPI.Compute_dims(comm.Get_size(), 2)
        cart = self.cart = comm.Create_cart(dims, periods=[False, False])
        pr, pc = cart.Get_coords(cart.Get_rank())
        r0, nr = split(n, dims[0], pr)
        c0, nc = split(n, dims[1], pc)
        self.block = Block((n, n), (r0, c0), (nr, nc))
        self.u = initial_field(n, slice(r0, r0 + nr), slice(c0, c0 + nc))
        self._pad = np.empty((nr + 2, nc + 2))
        up, down = cart.Shift(0, 1)
        left, right = cart.Shift(1, 1)
        # my edge row or column (as an index of u), where it goes, where mine
        # comes from, its tag, and where that fills my halo
        self._halos = (
            ((0,), up, down, 0, (-1, slice(1, -1))),
            ((-1,), down, up, 1, (0, slice(1, -1))),
            ((slice(None), 0), left, right, 2, (slice(1, -1), -1)),
            ((slice(None), -1), right, left, 3, (slice(1, -1), 0)),
        )
        self._none = MPI.PROC_NULL

    def step(self, boundary: float) -> None:
        """Exchange halos with the neighbours and advance the block one step."""
        u, pad = self.u, self._pad
        pad.fill(boundary)  # the global boundary; inner edges are overwritten by halos
        pad[1:-1, 1:-1] = u
        for edge, dest, src, tag, halo in self._halos:
            # at the domain's edge, MPI.PROC_NULL leaves the boundary value in place
            buf = np.empty(u[edge].shape[0])
            self.cart.Sendrecv(np.ascontiguousarray(u[edge]), dest, tag, buf, src, tag)
            if src != self._none:
                pad[halo] = buf
        self.u = heat_update(pad)


def simulate(n: int, steps: int, record: str | None) -> None:
    """One rank of the simulation (run under mpiexec): publish, read steering, step."""
    from mpi4py import MPI

    from async_wf.insitu import Bridge

    comm = MPI.COMM_WORLD
    rank = HeatRank(comm, n)
    seen: list[Any] = []
    bridge = Bridge(comm, {"T": rank.block}, timeout=30.0)
    try:
        for t in range(steps):
            b = bridge.get("boundary", t, 0.0)
            bridge.publish("T", rank.u, t)
            seen.append([t, b, time.time()])
            rank.step(b)
    finally:
        bridge.close()
    if record:
        blk = rank.block
        with open(os.path.join(record, f"rank{comm.Get_rank()}.json"), "w") as f:
            json.dump({"rank": comm.Get_rank(), "block": [*blk.start, *blk.shape],
                       "seen": seen, "bytes_sent": bridge.bytes_sent,
                       "waited": bridge.waited}, f)


# --------------------------------------------------------------- analytics
def field_stats(field: Any) -> tuple[float, float, float]:
    """Minimum, maximum and mean of a field (runs as a task on a worker)."""
    return float(field.min()), float(field.max()), float(field.mean())


def temporal_mean(window: Any) -> Any:
    """The mean over the window's steps, point by point (runs as a task)."""
    return window.mean(axis=0)


async def analytics(n: int = 64, steps: int = 60, *, backpressure: int = 2, window: int = 4,
                    switch: int = 30, threshold: float = 0.6, nprocs: int = 4,
                    workers: int = 2, record: str | None = None, keep: bool = False,
                    delay: float = 0.0, quiet: bool = False) -> dict[str, Any]:
    """Run the simulation under mpiexec and analyse it while it runs; return what was seen.

    ``keep``: also return every received field (for tests). ``delay``: seconds
    of extra "work" per step, to show backpressure.
    """
    import async_wf
    from async_wf._program import find_mpiexec
    from async_wf.insitu import Hub

    out: dict[str, Any] = {"stats": {}, "tmean": {}, "fields": {}, "senders": {},
                           "steer": [], "switch": None, "bytes": {}}
    async with async_wf.Runtime(workers=workers) as rt:
        hub = await Hub.start(backpressure=backpressure)
        sub = hub.subscribe("T", window=window)
        cmd = [find_mpiexec(), "-n", str(nprocs), sys.executable, os.path.abspath(__file__),
               "--simulate", "--n", str(n), "--steps", str(steps)]
        if record:
            cmd += ["--record", record]
        sim = await asyncio.create_subprocess_exec(*cmd, env={**os.environ, **hub.environ()})
        heater_on = False
        t0 = time.perf_counter()
        async for step, win in sub:
            field = win[-1]
            stats = rt.submit(field_stats, field)
            tmean = rt.submit(temporal_mean, win)
            if step == 5:
                # named in advance, effective at `switch` on every rank
                out["switch"] = sub.change(region=np.s_[: n // 2, : n // 2], step=switch)
            mn, mx, mean = await stats
            out["stats"][step] = (mn, mx, mean)
            out["tmean"][step] = await tmean
            rec = sub.record(step)
            assert rec is not None
            out["senders"][step] = rec.senders
            out["bytes"][step] = rec.nbytes
            if keep:
                out["fields"][step] = field
            if not heater_on and mx < threshold:
                heater_on = True
                eff = hub.steer("boundary", HEATER)
                out["steer"].append(("boundary", eff, HEATER))
            if not quiet and step % 10 == 0:
                print(f"step {step:4d}: min {mn:.4f} max {mx:.4f} mean {mean:.5f}  "
                      f"{rec.nbytes:>8,d} B from ranks {list(rec.senders)}  "
                      f"latency {rec.latency * 1e3:.2f} ms", flush=True)
            if delay:
                await asyncio.sleep(delay)
        code = await sim.wait()
        out["elapsed"] = time.perf_counter() - t0
        out["returncode"] = code
        out["hub"] = hub.stats()
        out["consumed_at"] = list(hub.consumed_at)
        await hub.close()
    if not quiet:
        total = sum(out["bytes"].values())
        print(f"{len(out['stats'])} steps analysed in {out['elapsed']:.2f} s; "
              f"{total:,d} bytes received ({total / max(1, len(out['bytes'])):,.0f} per step); "
              f"region narrowed from step {out['switch']}; heater on from step "
              f"{out['steer'][0][1] if out['steer'] else None}; simulation exit code {code}")
    return out


def main() -> int:
    """Command line: the analytics (default) or one simulation rank (--simulate)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--simulate", action="store_true", help="run as a simulation rank")
    ap.add_argument("--n", type=int, default=128, help="global grid size (n x n)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--backpressure", type=int, default=2)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--switch", type=int, default=40, help="step of the region change")
    ap.add_argument("--threshold", type=float, default=0.6,
                    help="turn the heater on when the maximum falls below this")
    ap.add_argument("--record", help="simulation: directory for per-rank records")
    args = ap.parse_args()
    if args.simulate:
        try:
            simulate(args.n, args.steps, args.record)
        except BaseException as exc:
            # one rank failing (say, the analytics is gone) must end the
            # whole job: its neighbours would wait in the halo exchange for ever
            import time
            import traceback

            from mpi4py import MPI

            # the message first, in one write: Abort may cut what follows
            # before mpiexec has forwarded it
            sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
            sys.stderr.flush()
            traceback.print_exc()
            sys.stderr.flush()
            time.sleep(0.2)  # let mpiexec forward it before the job is torn down
            MPI.COMM_WORLD.Abort(1)
        return 0
    out = asyncio.run(analytics(args.n, args.steps, backpressure=args.backpressure,
                                window=args.window, switch=args.switch,
                                threshold=args.threshold))
    return int(out["returncode"])


if __name__ == "__main__":
    sys.exit(main())
