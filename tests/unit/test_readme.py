"""The README's Python examples run as written and print what they claim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# runs in the first pass only (core_independent): the README's examples run as written (a docs
# check)
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parents[2]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_tour_runs_and_prints_the_documented_result() -> None:
    blocks = _python_blocks()
    assert len(blocks) >= 3
    tour = blocks[0]
    proc = subprocess.run(
        [sys.executable, "-c", tour], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "139"


def test_readme_executor_snippet_runs() -> None:
    blocks = _python_blocks()
    tour = blocks[0].split("async def main")[0]  # the task definitions
    executor = next(b for b in blocks if "async_wf.Executor" in b)
    proc = subprocess.run(
        [sys.executable, "-c", tour + "\n" + executor],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3 [1, 2]"


def test_readme_worker_snippet_runs_on_worker_processes() -> None:
    block = next(b for b in _python_blocks() if "Runtime(workers=2)" in b)
    body = "\n".join("    " + line for line in block.splitlines())
    program = (
        "import async_wf\n\nasync def main():\n" + body + "\n    print(total)\n\n"
        "async_wf.run(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "285"
