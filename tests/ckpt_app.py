"""A workflow for the checkpoint tests, run as a real process.

    CKPT_COUNTS=FILE python tests/ckpt_app.py LOG [--n N] [--order SEED]
                        [--transport local|tcp] [--flush POLICY]

It builds ``n`` leaves, a pairwise tree over them, a NumPy task per leaf
and a total, awaits everything and prints one JSON line of results. Every
task run appends ``name:i`` to CKPT_COUNTS (one ``write`` on an ``O_APPEND``
file, so lines from threads and worker processes never interleave), so a
test can tell which tasks ran. ``--order`` submits the leaves in a shuffled
order. Environment: CKPT_VARIANT=2 changes the code of ``pair`` (and so the
keys of the tree and the total); CKPT_FAIL=I makes leaf I raise;
CKPT_SLEEP=S makes each leaf sleep S seconds; with CKPT_DONE=FILE a leaf
also notes there that it is about to return.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

import numpy as np

import async_wf


def mark(what: str, path: str = "") -> None:
    # the file is read from the environment at each call, not from a global
    # or a default: those are part of a task's key, and each run of a test
    # counts into a file of its own
    fd = os.open(path or os.environ["CKPT_COUNTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what}\n".encode())
    finally:
        os.close(fd)


def done(what: str) -> None:
    """Note in CKPT_DONE (if set) that a task is about to return."""
    path = os.environ.get("CKPT_DONE")
    if path:
        mark(what, path)


def leaf(i: int) -> tuple[str, int, int]:
    mark(f"leaf:{i}")
    # from the environment at each call: a global would be part of the key
    sleep = float(os.environ.get("CKPT_SLEEP", "0"))
    if sleep:
        time.sleep(sleep)
    if i == int(os.environ.get("CKPT_FAIL", "-1")):
        raise RuntimeError(f"leaf {i} fails on purpose")
    done(f"leaf:{i}")
    return ("leaf", i, i * i)


if os.environ.get("CKPT_VARIANT") == "2":
    def pair(a: tuple[str, int, int], b: tuple[str, int, int]) -> tuple[str, int, int]:
        mark(f"pair:{a[1]}")
        return ("pair", a[1], a[2] + b[2] + 1)  # the changed code
else:
    def pair(a: tuple[str, int, int], b: tuple[str, int, int]) -> tuple[str, int, int]:
        mark(f"pair:{a[1]}")
        return ("pair", a[1], a[2] + b[2])


def vec(x: tuple[str, int, int]) -> np.ndarray:
    mark(f"vec:{x[1]}")
    return np.arange(1000, dtype=np.float64) * x[2]


def total(parts: list[tuple[str, int, int]], arrays: list[np.ndarray]) -> float:
    mark("total:0")
    return float(sum(p[2] for p in parts) + sum(float(a.sum()) for a in arrays))


async def main(args: argparse.Namespace) -> None:
    ck = async_wf.Checkpoint(args.log) if args.flush is None else \
        async_wf.Checkpoint(args.log, flush=args.flush)
    opts: dict[str, object] = {"checkpoint": ck}
    if args.transport == "tcp":
        opts["workers"] = 2
    order = list(range(args.n))
    if args.order is not None:
        random.Random(args.order).shuffle(order)
    async with async_wf.Runtime(**opts) as rt:  # type: ignore[arg-type]
        leaves: dict[int, async_wf.TaskFuture] = {}
        for i in order:
            leaves[i] = rt.submit(leaf, i)
        pairs = [rt.submit(pair, leaves[i], leaves[i + 1]) for i in range(0, args.n - 1, 2)]
        arrays = [rt.submit(vec, leaves[i]) for i in range(0, args.n, 10)]
        t = rt.submit(total, pairs, arrays)
        out: dict[str, object] = {}
        try:
            out["total"] = await t
        except Exception as exc:
            out["total"] = f"failed: {type(exc).__name__}"
        got = await asyncio.gather(*[leaves[i] for i in range(args.n)], return_exceptions=True)
        out["leaves"] = [None if isinstance(g, Exception) else list(g) for g in got]
        got = await asyncio.gather(*pairs, return_exceptions=True)
        out["pairs"] = [list(g) for g in got if not isinstance(g, Exception)]
        stats = rt.statistics()
        out["reused"] = stats["reused"]
        out["finished"] = stats["finished"]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("log")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--order", type=int)
    p.add_argument("--transport", default="local")
    p.add_argument("--flush")
    a = p.parse_args()
    if not os.environ.get("CKPT_COUNTS"):
        sys.exit("set CKPT_COUNTS")
    asyncio.run(main(a))
