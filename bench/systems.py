"""The child side of the suite: one system, started once, timed on a list of workloads.

``python -m bench --_child SYSTEM --_plan '[["noop", 2000], ...]'`` (under
``mpiexec -n W+1`` for the MPI systems) starts the system, then for each
``(workload, n)`` runs a warm-up and ``--repeat`` timed runs, checks every
result, and prints one JSON line as soon as that workload is done, so that
a parent that kills it on its time limit still gets what finished.

The work per task is the same everywhere: ``noop()``, ``inc(x)``,
``add(a, b)`` and ``a.sum()`` of bench/throughput.py, as plain functions
(``async def`` twins for the in-process systems: async_wf-local and raw
asyncio). The ``programs`` workload runs the program ``true`` with its
output thrown away: as a program task where the system has them (async_wf's
``@task(binary=...)``, HyperQueue's ``Job.program``), else as a function
that runs it with ``subprocess.run``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import throughput as T

_LEN = struct.Struct("<Q")


def version_of(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _line(out: dict[str, Any]) -> None:
    # one write per line: the parent reads lines as they come
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def _result(workload: str, n: int, samples: list[float], startup: float, config: str,
            version: str | None) -> dict[str, Any]:
    return {"workload": workload, "n": n, "status": "ok", "samples_s": samples,
            "startup_s": startup, "config": config, "version": version}


def _failed(workload: str, n: int, exc: BaseException) -> dict[str, Any]:
    return {"workload": workload, "n": n, "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}"[:500]}


PROGRAM = "true"


def s_program() -> None:
    """The programs workload on a system without program tasks: one ``subprocess.run``."""
    subprocess.run([PROGRAM], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)


def _true() -> None:
    """The programs workload's async_wf task: names the task; the work is the program."""


def wf_program_task() -> Any:
    """``@task(binary="true", output=False)``: the programs workload's task for async_wf.

    Before ``output=`` existed, the same task with its output kept.
    """
    import async_wf
    from async_wf._options import TaskOptionArgs

    if "output" in TaskOptionArgs.__annotations__:
        return async_wf.task(_true, binary=PROGRAM, output=False)
    return async_wf.task(_true, binary=PROGRAM)


# ------------------------------------------------------------ sync drivers
class SyncDriver:
    """A system driven by blocking calls: start, run one workload, stop."""

    config = ""
    version: str | None = None

    def start(self, workers: int) -> None:
        """Start the system and every worker (warm-up tasks included)."""

    def run(self, workload: str, n: int, data: list[Any] | None) -> Any:
        """Run one workload to its end; return its result."""
        raise NotImplementedError

    def stop(self) -> None:
        """Shut the system down, with every process it started."""


class ExecutorDriver(SyncDriver):
    """A ``concurrent.futures`` executor, one ``submit`` per task (throughput.py's rules)."""

    def __init__(self, ex: Any, config: str, version: str | None) -> None:
        self.ex = ex
        self.config = config
        self.version = version

    def start(self, workers: int) -> None:
        """Run a few no-ops, so that every worker process exists."""
        for f in [self.ex.submit(T.s_noop) for _ in range(4 * workers)]:
            f.result()

    def run(self, workload: str, n: int, data: list[Any] | None) -> Any:
        """One workload through ``throughput._procpool_run``; programs as s_program calls."""
        if workload == "programs":
            for f in [self.ex.submit(s_program) for _ in range(n)]:
                f.result()
            return n
        return T._procpool_run(self.ex, workload, n, data)

    def stop(self) -> None:
        """Shut the executor down."""
        self.ex.shutdown(wait=True, cancel_futures=True)


class DaskDriver(SyncDriver):
    """Dask distributed: LocalCluster of worker processes, one thread each."""

    version = version_of("distributed")

    def start(self, workers: int) -> None:
        """LocalCluster set up for throughput, as throughput.py does."""
        import logging

        import dask
        from distributed import Client, LocalCluster

        dask.config.set({"distributed.scheduler.worker-saturation": "inf"})
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(workers)
        self.client.gather([self.client.submit(T.s_noop, pure=False) for _ in range(4 * workers)])
        self.config = (f"LocalCluster(n_workers={workers}, threads_per_worker=1, processes=True,"
                       " dashboard_address=None), worker-saturation inf; client.submit("
                       "pure=False) per task, futures as arguments")

    def run(self, workload: str, n: int, data: list[Any] | None) -> Any:
        """One workload through ``throughput._dask_run``; programs as s_program calls."""
        if workload == "programs":
            self.client.gather([self.client.submit(s_program, pure=False) for _ in range(n)])
            return n
        return T._dask_run(self.client, workload, n, data)

    def stop(self) -> None:
        """Close the client and the cluster."""
        self.client.close()
        self.cluster.close()


class RayDriver(SyncDriver):
    """Ray: a local cluster of ``workers`` CPUs, one remote call per task."""

    version = version_of("ray")

    def start(self, workers: int) -> None:
        """``ray.init`` with the dashboard off; warm-up calls start every worker."""
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        self.ray = ray
        self.noop = ray.remote(T.s_noop)
        self.inc = ray.remote(T.s_inc)
        self.add = ray.remote(T.s_add)
        self.sum = ray.remote(T.s_sum)
        self.program = ray.remote(s_program)
        ray.get([self.noop.remote() for _ in range(4 * workers)])
        self.config = (f"ray.init(num_cpus={workers}, include_dashboard=False); one "
                       ".remote() per task (num_cpus=1 each), ObjectRefs as arguments, "
                       "ray.get at the end")

    def run(self, workload: str, n: int, data: list[Any] | None) -> Any:
        """The workload as remote calls; dependencies travel as ObjectRefs."""
        get = self.ray.get
        if workload == "programs":
            get([self.program.remote() for _ in range(n)])
            return n
        if workload == "noop":
            get([self.noop.remote() for _ in range(n)])
            return n
        if workload == "payload":
            assert data is not None
            return get([self.sum.remote(a) for a in data])
        if workload == "chain":
            ref = self.inc.remote(0)
            for _ in range(n - 1):
                ref = self.inc.remote(ref)
            return get(ref)
        level = [self.inc.remote(i) for i in range(n)]
        while len(level) > 1:
            nxt = [self.add.remote(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        return get(level[0])

    def stop(self) -> None:
        """``ray.shutdown()``: stops the raylet and the workers."""
        self.ray.shutdown()


class ParslDriver(SyncDriver):
    """Parsl: the HighThroughputExecutor on this node, one app call per task."""

    version = version_of("parsl")

    def start(self, workers: int) -> None:
        """HTEX with ``workers`` workers on one local block; warm-up calls."""
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider

        self.tmp = tempfile.TemporaryDirectory(prefix="awf-bench-parsl-")
        htex = HighThroughputExecutor(
            label="htex", max_workers_per_node=workers, cores_per_worker=1,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
        )
        self.dfk = parsl.load(Config(executors=[htex], run_dir=self.tmp.name, strategy="none",
                                     usage_tracking=0))
        self.parsl = parsl
        self.noop = parsl.python_app(T.s_noop)
        self.inc = parsl.python_app(T.s_inc)
        self.add = parsl.python_app(T.s_add)
        self.sum = parsl.python_app(T.s_sum)
        self.program = parsl.python_app(s_program)
        for f in [self.noop() for _ in range(4 * workers)]:
            f.result()
        self.config = (f"HighThroughputExecutor(max_workers_per_node={workers}, "
                       "cores_per_worker=1, LocalProvider(1 block)), strategy none; one "
                       "python_app call per task, AppFutures as arguments")

    def run(self, workload: str, n: int, data: list[Any] | None) -> Any:
        """The workload as app calls; dependencies travel as AppFutures."""
        if workload == "programs":
            for f in [self.program() for _ in range(n)]:
                f.result()
            return n
        if workload == "noop":
            for f in [self.noop() for _ in range(n)]:
                f.result()
            return n
        if workload == "payload":
            assert data is not None
            return [f.result() for f in [self.sum(a) for a in data]]
        if workload == "chain":
            f = self.inc(0)
            for _ in range(n - 1):
                f = self.inc(f)
            return f.result()
        level = [self.inc(i) for i in range(n)]
        while len(level) > 1:
            nxt = [self.add(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        return level[0].result()

    def stop(self) -> None:
        """Clean the DataFlowKernel up (stops the interchange and the workers)."""
        self.dfk.cleanup()
        self.parsl.clear()
        self.tmp.cleanup()


class HyperQueueDriver(SyncDriver):
    """HyperQueue: a ``LocalCluster`` of W one-core workers; one job of n program tasks."""

    version = version_of("hyperqueue")

    def start(self, workers: int) -> None:
        """Start the server and W workers of one core each; a warm-up job reaches them all."""
        from hyperqueue.cluster import LocalCluster, WorkerConfig

        self.tmp = tempfile.TemporaryDirectory(prefix="awf-bench-hq-")
        where: Any = self.tmp.name  # its annotation says Path; its Rust side takes str only
        self.cluster = LocalCluster(server_dir=where)
        for _ in range(workers):
            self.cluster.start_worker(WorkerConfig(cores=1))
        self.client = self.cluster.client()
        self.run("programs", 4 * workers, None)
        self.config = (f"LocalCluster with {workers} workers of WorkerConfig(cores=1); one Job "
                       f"of n job.program([{PROGRAM!r}], stdout=None, stderr=None), "
                       "client.submit + wait_for_jobs (whose client polls once a second)")

    def run(self, workload: str, n: int, data: list[Any] | None) -> Any:
        """n program tasks in one job, submitted and waited for."""
        from hyperqueue import Job

        if workload != "programs":
            raise ValueError(f"hyperqueue runs the programs workload only, got {workload!r}")
        job = Job()
        for _ in range(n):
            job.program([PROGRAM], stdout=None, stderr=None)
        self.client.wait_for_jobs([self.client.submit(job)])
        return n

    def stop(self) -> None:
        """Stop the server and its workers."""
        self.cluster.stop()
        self.tmp.cleanup()


def _sync_child(driver: SyncDriver, plan: list[tuple[str, int]], workers: int, repeat: int,
                seed: int) -> None:
    t0 = time.perf_counter()
    driver.start(workers)
    startup = time.perf_counter() - t0
    try:
        for workload, n in plan:
            data = T.make_payload(n, seed) if workload == "payload" else None
            try:
                samples = _timed_sync(lambda w=workload, n=n, d=data: driver.run(w, n, d),
                                      workload, n, data, repeat)
            except Exception as exc:
                _line(_failed(workload, n, exc))
                continue
            _line(_result(workload, n, samples, startup, driver.config, driver.version))
    finally:
        driver.stop()


def _timed_sync(run: Callable[[], Any], workload: str, n: int, data: list[Any] | None,
                repeat: int) -> list[float]:
    samples = []
    for i in range(repeat + 1):
        with T.gc_quiet():
            t1 = time.perf_counter()
            res = run()
            dt = time.perf_counter() - t1
        T.check_result(workload, n, res, data)
        if i:
            samples.append(dt)
    return samples


# ----------------------------------------------------------- async drivers
async def raw_asyncio(workload: str, n: int, data: list[Any] | None) -> Any:
    """The reference: the same graph as bare asyncio tasks in this process."""
    if workload == "payload":
        assert data is not None
        create = asyncio.get_running_loop().create_task
        return await asyncio.gather(*[create(T.a_sum(a)) for a in data])
    return await T.raw_workload(workload, n)


def _echo_server() -> None:
    """``python -m bench --_echo``: the far end of the socket reference.

    Listens on loopback, prints its port, serves one connection: each frame
    (8-byte length, a pickled list of calls) is answered with one frame of
    the pickled list of their results.
    """
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = conn.makefile("rb")
    ops = {0: T.s_noop, 1: T.s_inc, 2: T.s_add, 3: T.s_sum}
    while True:
        head = f.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        calls = pickle.loads(f.read(_LEN.unpack(head)[0]))
        out = pickle.dumps([ops[c[0]](*c[1:]) for c in calls], protocol=5)
        conn.sendall(_LEN.pack(len(out)) + out)


class SocketReference:
    """W echo processes over loopback TCP: batched pickled calls, no scheduler at all."""

    BATCH = 1000  # calls per frame; payload frames carry 8 arrays

    async def start(self, workers: int) -> None:
        """Start the echo processes and connect to each."""
        self.procs = [subprocess.Popen([sys.executable, "-m", "bench", "--_echo"],
                                       stdout=subprocess.PIPE, text=True)
                      for _ in range(workers)]
        self.conns = []
        for p in self.procs:
            assert p.stdout is not None
            port = int(p.stdout.readline())
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns.append((r, w))

    async def _batches(self, calls: list[tuple[Any, ...]], batch: int) -> list[Any]:
        """Send ``calls`` in frames round-robin over the connections; results in order."""
        frames = [calls[i:i + batch] for i in range(0, len(calls), batch)]
        k = len(self.conns)

        async def one(c: int) -> list[tuple[int, list[Any]]]:
            r, w = self.conns[c]
            mine = list(range(c, len(frames), k))

            async def send() -> None:
                for j in mine:
                    data = pickle.dumps(frames[j], protocol=5)
                    w.write(_LEN.pack(len(data)))
                    w.write(data)
                    await w.drain()

            sender = asyncio.ensure_future(send())
            got = []
            for j in mine:
                size = _LEN.unpack(await r.readexactly(_LEN.size))[0]
                got.append((j, pickle.loads(await r.readexactly(size))))
            await sender
            return got

        parts = await asyncio.gather(*[one(c) for c in range(k)])
        out: list[Any] = [None] * len(frames)
        for part in parts:
            for j, res in part:
                out[j] = res
        return [x for res in out for x in res]

    async def run(self, workload: str, n: int, data: list[Any] | None) -> Any:
        """The workload as frames of calls; chain is one round trip per call."""
        if workload == "noop":
            await self._batches([(0,)] * n, self.BATCH)
            return n
        if workload == "payload":
            assert data is not None
            return await self._batches([(3, a) for a in data], 8)
        if workload == "chain":
            v = 0
            for _ in range(n):
                v = (await self._batches([(1, v)], 1))[0]
            return v
        level = await self._batches([(1, i) for i in range(n)], self.BATCH)
        while len(level) > 1:
            pairs = [(2, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            nxt = await self._batches(pairs, self.BATCH)
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        return level[0]

    async def stop(self) -> None:
        """Close the connections; the echo processes exit at end of stream."""
        for _, w in self.conns:
            w.close()
            await w.wait_closed()  # the close reaches the echo process: it exits
        for p in self.procs:
            p.wait(timeout=10)


async def _async_child(system: str, plan: list[tuple[str, int]], workers: int, repeat: int,
                       seed: int) -> None:
    import async_wf

    t0 = time.perf_counter()
    rt: Any = None
    sock: SocketReference | None = None
    run: Callable[[str, int, list[Any] | None], Awaitable[Any]]
    if system == "asyncio":
        run = raw_asyncio
        config, version = "asyncio.create_task per task, gather at the end", None
    elif system == "socket":
        sock = SocketReference()
        await sock.start(workers)
        run = sock.run
        config = (f"{workers} echo processes over loopback TCP, pickled calls in frames of "
                  f"{SocketReference.BATCH} (payload: 8), chain: one round trip per call")
        version = None
    else:
        if system == "async_wf-local":
            rt = await async_wf.Runtime().start()
            kind, config = "async", "Runtime() in-process, async def tasks"
            if any(w == "programs" for w, _ in plan):
                config += "; programs: @task(binary='true', output=False)"
        elif system == "async_wf-tcp":
            rt = await async_wf.Runtime(workers=workers).start()
            kind, config = "thread", f"Runtime(workers={workers}): worker processes over TCP"
            if any(w == "programs" for w, _ in plan):
                config += "; programs: @task(binary='true', output=False)"
        else:
            rt = await async_wf.Runtime(transport="mpi").start()
            kind, config = "thread", f"async_wf.mpi.run, {workers} worker ranks"
        version = version_of("async_wf")

        prog = wf_program_task()

        async def programs(n: int) -> int:
            await asyncio.gather(*[rt.submit(prog) for _ in range(n)])
            return n

        def run(w: str, n: int, d: list[Any] | None) -> Awaitable[Any]:
            if w == "programs":
                return programs(n)
            return T.wf_workload(rt, w, n, kind, d)
    startup = time.perf_counter() - t0
    try:
        for workload, n in plan:
            data = T.make_payload(n, seed) if workload == "payload" else None
            try:
                samples = []
                for i in range(repeat + 1):
                    dt, res = await T._timed(lambda w=workload, n=n, d=data: run(w, n, d))
                    T.check_result(workload, n, res, data)
                    if i:
                        samples.append(dt)
            except Exception as exc:
                _line(_failed(workload, n, exc))
                continue
            _line(_result(workload, n, samples, startup, config, version))
    finally:
        if rt is not None:
            await rt.close()
        if sock is not None:
            await sock.stop()


def child(system: str, plan: list[tuple[str, int]], workers: int, repeat: int,
          seed: int) -> None:
    """Run ``plan`` on ``system`` in this process (or this MPI job); print JSON lines."""
    import async_wf

    if system in ("async_wf-local", "async_wf-tcp", "asyncio", "socket"):
        async_wf.run(_async_child(system, plan, workers, repeat, seed))
    elif system == "async_wf-mpi":
        from mpi4py import MPI

        import async_wf.mpi

        size = MPI.COMM_WORLD.size
        async_wf.mpi.run(lambda: _async_child(system, plan, size - 1, repeat, seed))
    elif system == "mpi4py":
        import mpi4py
        from mpi4py import MPI
        from mpi4py.futures import MPICommExecutor

        comm = MPI.COMM_WORLD
        with MPICommExecutor(comm, root=0) as ex:
            if ex is not None:
                backoff = os.environ.get("MPI4PY_FUTURES_BACKOFF", "default")
                driver = ExecutorDriver(
                    ex, f"MPICommExecutor(COMM_WORLD, root=0), {comm.size - 1} worker ranks, "
                    f"MPI4PY_FUTURES_BACKOFF={backoff}; one submit per task",
                    f"{mpi4py.__version__} ({MPI.Get_library_version().splitlines()[0]})")
                _sync_child(_NoShutdown(driver), plan, comm.size - 1, repeat, seed)
    elif system == "procpool":
        from concurrent.futures import ProcessPoolExecutor

        _sync_child(ExecutorDriver(
            ProcessPoolExecutor(workers),
            f"ProcessPoolExecutor(max_workers={workers}), fork; one submit per task",
            sys.version.split()[0]), plan, workers, repeat, seed)
    elif system == "dask":
        _sync_child(DaskDriver(), plan, workers, repeat, seed)
    elif system == "ray":
        _sync_child(RayDriver(), plan, workers, repeat, seed)
    elif system == "parsl":
        _sync_child(ParslDriver(), plan, workers, repeat, seed)
    elif system == "hyperqueue":
        _sync_child(HyperQueueDriver(), plan, workers, repeat, seed)
    else:
        raise SystemExit(f"unknown system {system!r}")


class _NoShutdown(SyncDriver):
    """An executor driver whose executor is shut down by its ``with`` block, not by stop()."""

    def __init__(self, inner: ExecutorDriver) -> None:
        self.inner = inner
        self.config = inner.config
        self.version = inner.version

    def start(self, workers: int) -> None:
        """Start the inner driver's workers."""
        self.inner.start(workers)

    def run(self, workload: str, n: int, data: list[Any] | None) -> Any:
        """Run on the inner driver."""
        return self.inner.run(workload, n, data)
