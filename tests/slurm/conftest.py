"""The Slurm tests run only against a running Slurm (``make test-slurm`` starts a private one).

Every test here is marked ``slurm`` and skipped, with the reason, when
``sinfo`` cannot reach a controller: ``make test`` deselects them anyway.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def slurm_reason() -> str | None:
    """Why the Slurm tests cannot run here, or None when a controller answers."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm client on PATH (make test-slurm installs and starts a test cluster)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 10 s: no Slurm controller running"
    if out.returncode != 0 or not out.stdout.strip():
        last = (out.stderr.strip().splitlines() or ["no partition"])[-1][:200]
        return (f"no Slurm controller answers (SLURM_CONF={os.environ.get('SLURM_CONF')!r}; "
                f"{last}): make test-slurm starts a test cluster and runs these")
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test of this folder (each module marks itself ``slurm``) when no Slurm runs."""
    here = Path(__file__).parent
    mine = [i for i in items if Path(str(i.fspath)).is_relative_to(here)]
    reason = slurm_reason() if mine else None
    if reason is not None:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))
