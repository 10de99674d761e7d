"""bench/payload.py and bench/memory.py run and report what they promise
(tiny sizes; figures are not asserted, only that they are sane)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_payload_benchmark_reports_async_wf_against_the_wire() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.payload", "--n", "6", "--repeat", "1", "--workers", "1",
         "--json"], capture_output=True, text=True, timeout=180, cwd=ROOT, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n"] == 6 and r["workers"] == 1 and r["array_bytes"] == 1 << 20
    assert len(r["wire_samples_s"]) == len(r["async_wf_samples_s"]) == 1
    assert r["wire_gb_per_s"] > 0 and r["async_wf_gb_per_s"] > 0
    assert abs(r["ratio"] - r["async_wf_gb_per_s"] / r["wire_gb_per_s"]) < 1e-9


def test_memory_benchmark_counts_pending_tasks_and_says_where(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--n", "3000", "--transports", "local",
         "--cores", "compiled,python", "--json", str(path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
    assert "bytes per pending no-op task" in out.stdout
    results = json.loads(path.read_text())
    assert [(r["core"], r["method"]) for r in results] == [
        ("compiled", "rss"), ("compiled", "tracemalloc"),
        ("python", "rss"), ("python", "tracemalloc")]
    for r in results:
        assert r["status"] == "ok", r
        assert r["pending"] == 3000  # every task was still waiting for the gate
    traced = [r for r in results if r["method"] == "tracemalloc"]
    for r in traced:
        # a future, its arguments, its entries: some hundreds of bytes, not nothing
        assert 100 < r["bytes_per_task"] < 10_000, r
        where = [s["where"] for s in r["sites"]]
        assert any("_scheduler.py" in w for w in where), where


def test_memory_benchmark_refuses_bad_options() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--cores", "fast"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0 and "--cores takes compiled,python" in out.stderr
