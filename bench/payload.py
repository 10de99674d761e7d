"""Payload throughput over TCP against the wire limit, measured in the same run.

    python -m bench.payload --n 200 --repeat 5 --workers 2

The workload is the suite's ``payload``: n tasks, each taking a distinct
1 MiB float64 array (``bench.throughput.make_payload``) and returning its
sum, on ``Runtime(workers=W)``. Only the arrays travel far (scheduler to
worker); each result is one float.

The baseline moves the same bytes with nothing but sockets: W echo
processes, each receiving arrays with ``recv_into`` straight into a
preallocated NumPy buffer, summing it and answering 8 bytes; the parent, one
event loop as a scheduler is, sends each connection its arrays with one
``writelines`` of views of their memory. One kernel copy on each side and the same sums:
no framing, no pickling, no scheduler, so ``ratio = async_wf / wire`` is
the share of the wire limit that the runtime keeps.

Each figure is the median of ``--repeat`` runs after one warm-up run, in
GB/s (10^9 bytes per second). ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench import throughput as T

_SUM = struct.Struct("!d")


def _wire_echo() -> None:
    """``python -m bench.payload --_echo``: receive arrays, answer their sums."""
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    arr = np.empty(T.PAYLOAD_LEN, dtype=np.float64)
    view = memoryview(arr).cast("B")
    while True:
        got = 0
        while got < view.nbytes:
            k = conn.recv_into(view[got:])
            if k == 0:
                return
            got += k
        conn.sendall(_SUM.pack(float(arr.sum())))


class _Sums(asyncio.Protocol):
    """The parent's end of one echo connection: collects the 8-byte sums."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.want = 0
        self.done: asyncio.Future[list[float]] | None = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.done is not None and len(self.buf) >= self.want * _SUM.size:
            sums = [v for (v,) in _SUM.iter_unpack(bytes(self.buf[: self.want * _SUM.size]))]
            del self.buf[: self.want * _SUM.size]
            self.done.set_result(sums)
            self.done = None


class Wire:
    """W echo processes over loopback TCP; arrays round-robin, sums back in order.

    The parent is one event loop, as a scheduler is: each connection gets
    its arrays with one ``writelines`` of views of their memory.
    """

    async def start(self, workers: int) -> None:
        """Start the echo processes and connect to each."""
        self.procs = [subprocess.Popen([sys.executable, "-m", "bench.payload", "--_echo"],
                                       stdout=subprocess.PIPE, text=True)
                      for _ in range(workers)]
        loop = asyncio.get_running_loop()
        self.conns: list[tuple[asyncio.Transport, _Sums]] = []
        for p in self.procs:
            assert p.stdout is not None
            port = int(p.stdout.readline())
            tr, proto = await loop.create_connection(_Sums, "127.0.0.1", port)
            tr.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns.append((tr, proto))

    async def run(self, data: list[Any]) -> list[float]:
        """Send every array, return the sums in the order of ``data``."""
        k = len(self.conns)
        loop = asyncio.get_running_loop()
        waits = []
        for c, (tr, proto) in enumerate(self.conns):
            mine = data[c::k]
            proto.want = len(mine)
            proto.done = loop.create_future()
            waits.append(proto.done)
            tr.writelines([memoryview(a).cast("B") for a in mine])
        got = await asyncio.gather(*waits)
        out: list[float] = [0.0] * len(data)
        for c in range(k):
            out[c::k] = got[c]
        return out

    async def close(self) -> None:
        """Close the connections; the echo processes exit at end of stream."""
        for tr, _ in self.conns:
            tr.close()
        deadline = time.monotonic() + 10
        for p in self.procs:
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the loop must run for the close to happen
            if p.poll() is None:
                p.kill()
                p.wait()


def _median_rate(samples: list[float], n: int) -> float:
    return n * T.MIB / statistics.median(samples) / 1e9


async def _async_wf(n: int, repeat: int, workers: int, data: list[Any]) -> list[float]:
    import async_wf

    rt = await async_wf.Runtime(workers=workers).start()
    try:
        samples = []
        for i in range(repeat + 1):
            dt, res = await T._timed(lambda: T.wf_workload(rt, "payload", n, "thread", data))
            T.check_result("payload", n, res, data)
            if i:
                samples.append(dt)
        return samples
    finally:
        await rt.close()


async def _wire(n: int, repeat: int, workers: int, data: list[Any]) -> list[float]:
    want = [float(a.sum()) for a in data]
    wire = Wire()
    await wire.start(workers)
    try:
        samples = []
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            got = await wire.run(data)
            dt = time.perf_counter() - t0
            if got != want:
                raise AssertionError("the echo processes' sums differ from numpy's")
            if i:
                samples.append(dt)
        return samples
    finally:
        await wire.close()


async def _both(n: int, repeat: int, workers: int,
                data: list[Any]) -> tuple[list[float], list[float]]:
    return (await _wire(n, repeat, workers, data),
            await _async_wf(n, repeat, workers, data))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure the wire limit and async_wf in one run; print and return the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="arrays (tasks) per run")
    p.add_argument("--repeat", type=int, default=5, help="measured runs after one warm-up")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--_echo", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._echo:
        _wire_echo()
        return {}
    for name in ("n", "repeat", "workers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    from async_wf._loop import run

    data = T.make_payload(args.n, args.seed)
    wire_s, wf_s = run(_both(args.n, args.repeat, args.workers, data))
    wire_gbs = _median_rate(wire_s, args.n)
    wf_gbs = _median_rate(wf_s, args.n)
    out = {"n": args.n, "repeat": args.repeat, "workers": args.workers,
           "array_bytes": T.MIB, "wire_gb_per_s": wire_gbs, "async_wf_gb_per_s": wf_gbs,
           "ratio": wf_gbs / wire_gbs, "wire_samples_s": wire_s, "async_wf_samples_s": wf_s,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(),
           "python": platform.python_version()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"payload, {args.n} x 1 MiB arrays, {args.workers} workers, median of "
              f"{args.repeat}")
        print(f"  wire limit (raw sockets, recv_into): {wire_gbs:6.2f} GB/s")
        print(f"  async_wf Runtime(workers={args.workers}):      {wf_gbs:6.2f} GB/s  "
              f"({out['ratio']:.2f}x the wire limit)")
    return out


if __name__ == "__main__":
    main()
