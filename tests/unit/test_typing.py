"""The API's types, checked by mypy itself on typed snippets (tests/typing/)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# runs in the first pass only (core_independent): mypy reads the source; no task runs
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parents[2]


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                           "--cache-dir", str(ROOT / ".mypy_cache"), str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_typed_uses_pass_mypy() -> None:
    proc = _mypy(ROOT / "tests" / "typing" / "typed_ok.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wrongly_typed_uses_fail_mypy_on_each_marked_line() -> None:
    path = ROOT / "tests" / "typing" / "typed_bad.py"
    want = {i for i, line in enumerate(path.read_text().splitlines(), 1) if "# error:" in line}
    proc = _mypy(path)
    got = {int(m.group(1)) for m in re.finditer(r"typed_bad\.py:(\d+): error", proc.stdout)}
    assert got == want, proc.stdout
