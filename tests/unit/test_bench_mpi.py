"""bench/large_intermediates.py --transport mpi runs under mpiexec and reports before and after
(tiny sizes; the figures are not asserted, only that the bytes say what stayed on the ranks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py (make test installs it)")

pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parents[2]
LARGE = ROOT / "bench" / "large_intermediates.py"


def test_large_intermediates_over_mpi_ranks() -> None:
    out = subprocess.run([sys.executable, str(LARGE), "--transport", "mpi", "--quick", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["transport"] == "mpi" and report["workers"] == 2
    by = {r["system"]: r for r in report["results"]}
    assert set(by) == {"async_wf keep_min=0", "async_wf default"}
    assert all(r["status"] == "ok" for r in by.values()), by
    mib = 1 << 20
    # keep_min=0: each 1 MiB array crosses the root's channel twice; held: only the awaited one
    assert by["async_wf keep_min=0"]["pipeline"]["bytes_through_scheduler"] >= 19 * mib
    assert by["async_wf default"]["pipeline"]["bytes_through_scheduler"] < 2 * mib
    assert by["async_wf default"]["fanin"]["bytes_through_scheduler"] < 2 * mib


def test_mpi_measures_async_wf_alone() -> None:
    out = subprocess.run([sys.executable, str(LARGE), "--transport", "mpi", "--systems", "dask"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert "--transport mpi measures async_wf alone" in out.stderr
