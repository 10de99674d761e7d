"""The demo that `make demo` runs works, in-process and on worker processes alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_both_runtimes_agree() -> None:
    proc = subprocess.run(
        [sys.executable, "examples/demo.py"], cwd=ROOT, capture_output=True, text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "817 tasks finished, 16 failed and ignored (16 rejected chunks), 2 retries" in out
    assert "on 2 worker processes: pi ~= 3.14169 (same result: True)" in out
    assert "scheduler throughput: 100,000 no-op async tasks" in out
