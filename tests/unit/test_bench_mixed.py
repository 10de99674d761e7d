"""bench/mixed_resources.py runs and reports what it promises (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "mixed_resources.py"


def test_mixed_resources_benchmark_reports_packing_against_the_bound() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["n"] == 30 and report["workers"] == 2 and report["cores"] == 4
    # the bound is a bound: neither the simulations nor the real runs beat it
    assert report["ideal_s"] > 0
    assert report["greedy_sim_s"] >= report["ideal_s"] * 0.999
    assert report["reserve_sim_s"] >= report["ideal_s"] * 0.999
    assert report["strict_fifo_sim_s"] >= report["greedy_sim_s"] * 0.999
    assert [r["run"] for r in report["results"]] == ["fifo", "big-first"]
    for r in report["results"]:
        assert r["makespan_s"] >= r["ideal_s"] * 0.99
        assert abs(r["ratio"] - r["makespan_s"] / r["ideal_s"]) < 1e-9
        assert 0 < r["utilisation"] <= 1.0
        assert len(r["over_time"]) == 10
        # every task got the cores it asked for, and no worker held more than its 4
        assert r["held_ok"] and r["peak_ok"], r
        assert r["workers_seen"] >= 1 and max(r["peak_cores"]) <= 4


def test_mixed_resources_benchmark_prints_a_table() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("30 tasks of 1/2/4 cores")
    rows = {line.split()[0] for line in lines[2:]}
    assert rows == {"fifo", "big-first", "greedy-sim", "reserve-sim", "strict-sim"}
    assert "EXCEEDED" not in out.stdout


def test_mixed_resources_benchmark_refuses_workers_smaller_than_a_task() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--cores", "2"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert "--cores must be >= 4 (the largest task), got 2" in out.stderr
