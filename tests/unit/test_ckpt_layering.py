"""The checkpoint package is storage only: it never imports the runtime (issue 15)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import async_wf.checkpoint

# runs in the first pass only (core_independent): what the checkpoint package imports; no task
# runs
pytestmark = pytest.mark.core_independent

CKPT = Path(async_wf.checkpoint.__file__).parent
#: what async_wf.checkpoint may import of async_wf, lazily or not
ALLOWED = (
    "async_wf.checkpoint", "async_wf._codec", "async_wf._errors", "async_wf._extension",
    "async_wf._core",  # the compiled twins of the hot paths, loaded by _extension
)


def _async_wf_imports(path: Path) -> set[str]:
    """Every module of async_wf that ``path`` imports, anywhere in it (functions included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("async_wf"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = "async_wf.checkpoint" if node.level == 1 else "async_wf"
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod == "async_wf":
                out.update(f"async_wf.{a.name}" for a in node.names)
            elif mod.startswith("async_wf"):
                out.add(mod)
    return out


def test_checkpoint_package_imports_nothing_of_the_runtime() -> None:
    bad = {
        f"{p.name}: {m}"
        for p in sorted(CKPT.glob("*.py"))
        for m in _async_wf_imports(p)
        if not any(m == a or m.startswith(a + ".") for a in ALLOWED)
    }
    assert not bad, sorted(bad)


def test_importing_the_checkpoint_package_leaves_the_runtime_unloaded() -> None:
    code = (
        "import sys, async_wf.checkpoint as c\n"
        "c.CheckpointLog, c.inspect, c.verify, c.task_key\n"
        "from async_wf.checkpoint import _cli, _config\n"
        "print(sorted(m for m in sys.modules if m.startswith('async_wf.')))\n"
    )
    # the package's own __init__ is the runtime's: load the checkpoint modules without it
    stub = (
        "import importlib.util, sys, types\n"
        f"pkg = types.ModuleType('async_wf'); pkg.__path__ = [{str(CKPT.parent)!r}]\n"
        "sys.modules['async_wf'] = pkg\n"
    )
    out = subprocess.run([sys.executable, "-c", stub + code], capture_output=True, text=True,
                         check=True).stdout
    loaded = eval(out)
    assert not [m for m in loaded if not m.startswith(ALLOWED)], loaded
