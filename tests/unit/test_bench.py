"""Smoke tests of the benchmark scripts: they run, agree with their baseline, and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    out: dict[str, object] = json.loads(lines[0])
    return out


@pytest.mark.parametrize("kind", ["async", "thread", "inline"])
@pytest.mark.parametrize("workload", ["noop", "chain", "fanin"])
def test_throughput_script_reports_every_field(workload: str, kind: str) -> None:
    out = _run(
        "bench/throughput.py", "--workload", workload, "--kind", kind,
        "--n", "300", "--repeat", "1", "--json",
    )
    assert out["workload"] == workload
    assert out["transport"] == "local"
    assert out["n"] == 300
    assert out["tasks"] == (599 if workload == "fanin" else 300)
    for key in ("seconds", "tasks_per_s", "baseline_tasks_per_s", "ratio", "startup_s"):
        value = out[key]
        assert isinstance(value, float) and value > 0, (key, value)


def test_throughput_script_rejects_bad_n() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--n", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--n and --repeat must be >= 1, got 0" in proc.stderr


# ------------------------------------------------------------- tcp transport
# Only ProcessPoolExecutor is compared here: it is in the standard library,
# so these tests do not depend on Dask being installed.

_TCP_KEYS = ("seconds", "tasks_per_s", "baseline_tasks_per_s", "ratio", "startup_s")
_PEER_KEYS = ("tasks_per_s", "seconds", "samples_s", "status", "startup_s", "version")


@pytest.mark.parametrize(("workload", "n"), [
    ("noop", 200), ("chain", 200), ("fanin", 200), ("payload", 4),
])
def test_throughput_tcp_against_procpool_reports_every_field(workload: str, n: int) -> None:
    out = _run(
        "bench/throughput.py", "--transport", "tcp", "--workers", "2", "--peers", "procpool",
        "--workload", workload, "--n", str(n), "--repeat", "1", "--json",
    )
    assert out["workload"] == workload
    assert out["transport"] == "tcp"
    assert out["kind"] == "thread"
    assert out["workers"] == 2
    assert out["n"] == n
    assert out["tasks"] == (2 * n - 1 if workload == "fanin" else n)
    for key in _TCP_KEYS:
        value = out[key]
        assert isinstance(value, float) and value > 0, (key, value)
    assert isinstance(out["baseline"], str) and "ProcessPoolExecutor" in out["baseline"]
    peers = out["peers"]
    assert isinstance(peers, dict) and set(peers) == {"procpool"}
    pp = peers["procpool"]
    for key in _PEER_KEYS:
        assert key in pp, key
    assert pp["status"] == "ok", pp
    assert len(pp["samples_s"]) == 1
    assert pp["tasks_per_s"] == out["baseline_tasks_per_s"]
    ratios = out["ratios"]
    assert isinstance(ratios, dict)
    assert ratios["procpool"] == pytest.approx(out["tasks_per_s"] / pp["tasks_per_s"])
    assert ratios["procpool"] == out["ratio"]
    if workload == "payload":
        assert out["mb_per_s"] > 0 and pp["mb_per_s"] > 0
    if workload == "chain":
        assert out["chain_us_per_task"] > 0 and pp["chain_us_per_task"] > 0


def test_throughput_tcp_reports_a_peer_over_its_time_limit_as_failed() -> None:
    out = _run(
        "bench/throughput.py", "--transport", "tcp", "--peers", "procpool",
        "--peer-timeout", "0.01", "--n", "10", "--repeat", "1", "--json",
    )
    pp = out["peers"]["procpool"]  # type: ignore[index]
    assert pp["status"] == "failed"
    assert "timed out" in pp["reason"]
    assert pp["tasks_per_s"] is None
    assert out["ratios"] == {"procpool": None}
    assert out["baseline_tasks_per_s"] is None and out["ratio"] is None


def test_throughput_payload_needs_tcp() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--workload", "payload"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--workload payload needs --transport tcp" in proc.stderr


def test_checkpoint_script_reports_every_figure() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/checkpoint.py", "--n", "300", "--payload-n", "4",
         "--rerun-n", "300", "--rerun-sleep-n", "20", "--index-n", "2000", "--repeat", "1",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    for name in ("noop_local", "payload_local", "noop_tcp", "payload_tcp"):
        assert out[name]["with_s"] > 0 and out[name]["without_s"] > 0
    assert out["rerun_noop"]["speedup"] > 0 and out["rerun_sleep1ms"]["n"] == 20
    assert out["index"]["n"] == 2000 and out["index"]["records_per_s"] > 0
