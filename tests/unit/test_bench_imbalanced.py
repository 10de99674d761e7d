"""bench/imbalanced.py runs and reports what it promises (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# runs in the first pass only (core_independent): the benchmark script runs and reports
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parents[2]


def test_imbalanced_benchmark_reports_makespan_against_the_ideal() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "imbalanced.py"), "--n", "40", "--repeat", "1",
         "--systems", "async_wf-tcp,procpool", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["n"] == 40 and report["workers"] == 2
    by = {r["system"]: r for r in report["results"]}
    assert set(by) == {"async_wf-tcp", "procpool"}
    for r in by.values():
        assert r["status"] == "ok", r
        # the same seeded list for both: the same ideal; no run beats it
        assert r["ideal_s"] == by["procpool"]["ideal_s"] > 0
        assert r["makespan_s"] >= r["ideal_s"] * 0.99
        assert abs(r["ratio"] - r["makespan_s"] / r["ideal_s"]) < 1e-9


def test_imbalanced_benchmark_refuses_an_unknown_system() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "imbalanced.py"), "--systems", "slurm"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert "--systems must name some of async_wf-tcp, procpool, dask, ray; got 'slurm'" \
        in out.stderr
