"""Workers on other hosts: Linux network namespaces joined by a bridge (issue 19).

``make test-hosts`` runs these as root (it installs iproute2 with apt where
it can); elsewhere they are skipped, saying why. Each namespace is a host
with its own address; the scheduler listens on the bridge's. What they
check: the results, that held results really move worker to worker (the
byte counters of each worker's data port, read by a task on that worker,
and the scheduler's own), and that losing a host makes its held results
again on the other.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tcp_helpers as th

import async_wf
from async_wf._held import transfer_counters

pytestmark = [pytest.mark.hosts]

BRIDGE, HUB = "awf-br0", "10.202.0.1"
HOSTS = [("awf-h1", "awf-b1", "awf-e1", "10.202.0.11"),
         ("awf-h2", "awf-b2", "awf-e2", "10.202.0.12")]
MIB = 1 << 20


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _cleanup() -> None:
    for ns, veth, _e, _a in HOSTS:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@pytest.fixture
def hosts() -> Iterator[list[tuple[str, str]]]:
    """Two namespaces, each a host on 10.202.0.0/24, bridged to this one."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("hosts in network namespaces need root and iproute2 "
                    "('make test-hosts' installs it)")
    _cleanup()
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{HUB}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for ns, veth, inner, addr in HOSTS:
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", veth, "master", BRIDGE)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        _cleanup()
        pytest.skip(f"network namespaces are not permitted here: {exc.stderr!r}")
    try:
        yield [(ns, addr) for ns, _v, _i, addr in HOSTS]
    finally:
        _cleanup()


def start_host_worker(ns: str, address: str, token: Path, label: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "async_wf.worker",
         "--connect", address, "--token-file", str(token), "--slots", "2",
         "--resources", f"{label}=1", "--reconnect", "0"],
        env=th.worker_env(), stdin=subprocess.DEVNULL)


def made_here(i: int) -> tuple[np.ndarray, str]:
    import socket

    return np.full(2 * MIB // 8, float(i)), socket.gethostname() + str(os.getpid())


def array_of(pair: tuple[np.ndarray, str]) -> np.ndarray:
    return pair[0]


def total(*arrs: np.ndarray) -> float:
    return float(sum(a.sum() for a in arrs))


def counters() -> dict[str, int]:
    return transfer_counters()


def pid_near(_a: np.ndarray) -> int:
    return os.getpid()


async def test_held_results_move_between_hosts(hosts: list[tuple[str, str]],
                                               tmp_path: Path) -> None:
    token = tmp_path / "token"
    async with async_wf.Runtime(listen=f"tcp://{HUB}:0", token_file=token) as rt:
        addr = rt.transport.address  # type: ignore[attr-defined]
        procs = [start_host_worker(ns, addr, token, f"h{i}")
                 for i, (ns, _a) in enumerate(hosts)]
        try:
            await th.until(lambda: rt.statistics()["workers"] == 2, "both hosts join")
            # four parts on each host (the label resource pins them), summed on host 0
            parts = [rt.options(resources={f"h{i % 2}": 1}).submit(made_here, i)
                     for i in range(8)]
            arrays = [rt.options(resources={f"h{i % 2}": 1}).submit(array_of, p)
                      for i, p in enumerate(parts)]
            s = await rt.options(resources={"h0": 1}).submit(total, *arrays)
            c0 = await rt.options(resources={"h0": 1}).submit(counters)
            c1 = await rt.options(resources={"h1": 1}).submit(counters)
            st = rt.statistics()
        finally:
            for p in procs:
                th.stop(p)
    assert s == sum(i * (2 * MIB // 8) for i in range(8))
    # host 0 fetched host 1's four arrays from host 1's data port
    assert c0["bytes_fetched"] >= 4 * 2 * MIB, c0
    assert c1["bytes_served"] >= 4 * 2 * MIB, c1
    assert st["bytes_received"] < MIB, st["bytes_received"]


async def test_losing_a_host_makes_its_results_again(hosts: list[tuple[str, str]],
                                                     tmp_path: Path) -> None:
    token = tmp_path / "token"
    async with async_wf.Runtime(listen=f"tcp://{HUB}:0", token_file=token,
                                no_worker_timeout=30) as rt:
        addr = rt.transport.address  # type: ignore[attr-defined]
        procs = [start_host_worker(ns, addr, token, f"h{i}")
                 for i, (ns, _a) in enumerate(hosts)]
        try:
            await th.until(lambda: rt.statistics()["workers"] == 2, "both hosts join")
            x = rt.submit(made_here, 7)
            a = rt.submit(array_of, x)  # runs where x is, by locality
            victim = await rt.submit(pid_near, a)  # and so does this one
            os.kill(victim, signal.SIGKILL)  # that worker dies with x and a
            await th.until(lambda: rt.statistics()["workers"] == 1, "the loss is seen")
            # a dependent of a: x and a run again on the other host, then it
            got = await asyncio.wait_for(rt.submit(total, a), 60)
            st = rt.statistics()
        finally:
            for p in procs:
                th.stop(p)
    assert got == 7.0 * (2 * MIB // 8)
    assert st["results_recomputed"] >= 2, st["results_recomputed"]
    assert st["retried"] == 0
