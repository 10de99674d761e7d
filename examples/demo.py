"""async_wf demo: a small analysis workflow as a DAG of a few hundred tasks.

    make demo            (or: python examples/demo.py)

The workflow estimates pi by Monte Carlo, the way a real pipeline is shaped:

  fetch (async I/O, 64x)  ->  simulate (NumPy in threads, 256x)  ->  tree reduction
                          \\->  quality check (may fail: on_failure="ignore")

* a fan-out of async "download" tasks that wait on I/O concurrently;
* for each download, four NumPy simulation chunks that run in threads
  (NumPy releases the GIL, so they overlap);
* a flaky task that fails twice, then succeeds thanks to retries=2;
* the same DAG again on two worker processes (Runtime(workers=2));
* a quality check that fails on purpose for some chunks; its policy
  on_failure="ignore" gives the reduction a default value instead of
  failing the workflow;
* a binary-tree reduction of all the counts, then the estimate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time

import numpy as np

import async_wf
from async_wf import task

N_SOURCES = 64
CHUNKS_PER_SOURCE = 4
SAMPLES = 50_000


@task(name="fetch")
async def fetch(source: int) -> int:
    """Pretend to download a seed: waits on I/O without blocking the loop."""
    await asyncio.sleep(0.01)
    return 1000 + source


@task(name="simulate")
def simulate(seed: int, chunk: int) -> tuple[int, int]:
    """Draw points in the unit square; count those inside the quarter circle."""
    rng = np.random.default_rng([seed, chunk])
    xy = rng.random((SAMPLES, 2))
    inside = int(np.count_nonzero((xy * xy).sum(axis=1) <= 1.0))
    return inside, SAMPLES


@task(name="quality", on_failure="ignore", default=(0, 0))
def quality(counts: tuple[int, int], source: int) -> tuple[int, int]:
    """Reject some results on purpose: the policy replaces them with (0, 0)."""
    if source % 16 == 15:
        raise ValueError(f"source {source}: instrument flagged as faulty")
    return counts


@task(name="calibrate", retries=2)
def calibrate(attempts_file: str) -> float:
    """Fails on its first two attempts, like a flaky service; retries=2 saves it.

    The attempts are counted in a file, not a global: on worker processes
    each attempt may run in another process, with its own globals.
    """
    with open(attempts_file, "a+") as f:
        f.write("x")
        f.seek(0)
        attempt = len(f.read())
    if attempt < 3:
        raise ConnectionError(f"calibration service busy (attempt {attempt})")
    return 4.0


@task(name="combine", inline=True)
def combine(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """Add two partial counts; tiny, so it runs inline on the loop."""
    return a[0] + b[0], a[1] + b[1]


@task(name="estimate", inline=True)
def estimate(total: tuple[int, int], factor: float) -> float:
    """The Monte Carlo estimate of pi from the reduced counts."""
    inside, n = total
    return factor * inside / n


def build(attempts_file: str) -> tuple[async_wf.TaskFuture, list[async_wf.TaskFuture]]:
    """Submit the whole DAG to the current runtime; return (estimate, quality checks)."""
    seeds = [fetch(s) for s in range(N_SOURCES)]  # fan-out of async I/O
    checked = []
    for s, seed in enumerate(seeds):
        for c in range(CHUNKS_PER_SOURCE):
            checked.append(quality(simulate(seed, c), s))
    level = checked
    while len(level) > 1:  # binary-tree reduction
        nxt = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return estimate(level[0], calibrate(attempts_file)), checked


async def main() -> None:
    """Build the DAG, run it in this process and on worker processes, and report."""
    tmp = tempfile.mkdtemp(prefix="async_wf_demo_")
    t0 = time.perf_counter()
    async with async_wf.Runtime() as rt:
        pi, checked = build(os.path.join(tmp, "attempts-local"))
        value = await pi
        await rt.barrier()
        stats = rt.statistics()
    elapsed = time.perf_counter() - t0
    rejected = sum(1 for f in checked if f.exception() is not None)
    print(f"pi ~= {value:.5f}   (error {abs(value - np.pi):.2e})")
    print(
        f"{stats['finished']} tasks finished, {stats['failed']} failed and ignored "
        f"({rejected} rejected chunks), {stats['retried']} retries, "
        f"{stats['cancelled']} cancelled"
    )
    print(
        f"in this process: {stats['submitted']} tasks ({N_SOURCES * CHUNKS_PER_SOURCE * SAMPLES:,}"
        f" samples) in {elapsed:.2f} s on the {stats['core']} core"
    )

    # the same code on two worker processes, over async_wf's own TCP protocol
    t0 = time.perf_counter()
    async with async_wf.Runtime(workers=2) as rt:
        started = time.perf_counter()
        pi, _ = build(os.path.join(tmp, "attempts-workers"))
        value_w = await pi
        await rt.barrier()
        stats = rt.statistics()
    print(
        f"on {stats['workers']} worker processes: pi ~= {value_w:.5f} (same result: "
        f"{value_w == value}), {stats['submitted']} tasks in {time.perf_counter() - started:.2f}"
        f" s after a {started - t0:.2f} s start-up, {stats['bytes_sent']:,} bytes sent"
    )

    # the scheduler's own overhead, without the NumPy work: many tiny async tasks
    async with async_wf.Runtime() as rt:

        async def noop() -> None:
            return None

        n = 100_000
        t0 = time.perf_counter()
        await async_wf.gather(*[rt.submit(noop) for _ in range(n)])
        dt = time.perf_counter() - t0
    print(f"scheduler throughput: {n:,} no-op async tasks in {dt:.2f} s = {n / dt:,.0f} tasks/s")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(format="  log: %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    async_wf.run(main())
