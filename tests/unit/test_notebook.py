"""async_wf in a real Jupyter kernel (ipykernel driven by nbclient, issue 21).

A notebook runs each cell as a separate top-level ``await``: the runtime
started in one cell must serve the cells after it, a ``@task`` must run on
the workers (never silently in the kernel), and the blocking helpers must
say what to do on the kernel's loop.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# runs in the first pass only (core_independent): the kernel's event loop and cells; the
# scheduling is tested elsewhere
pytestmark = pytest.mark.core_independent

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (the dev extra)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (the dev extra)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (the dev extra)")

CELLS = [
    """\
import asyncio, os, async_wf
rt = await async_wf.Runtime(workers=2).start()
print("STARTED", repr(rt))
""",
    """\
@async_wf.task
def where(x):
    import os
    return os.getpid(), x

pid, x = await where(7)
print("TASK", pid != os.getpid(), x)
""",
    """\
def triple(x):
    import os
    return os.getpid(), 3 * x

pid, y = await async_wf.submit(triple, 1)
print("SUBMIT", pid != os.getpid(), y)
""",
    """\
def nap(s):
    import time
    time.sleep(s)
    return s

fut = async_wf.submit(nap, 2.0)
print("PENDING", repr(fut))
try:
    fut.result()
except asyncio.InvalidStateError as exc:
    print("RESULT", "await" in str(exc), str(exc))
await fut
""",
    """\
print("REPR", repr(fut))
html = rt._repr_html_()
print("HTML", "<table" in html and "submitted" in html)
print("RTREPR", repr(rt))
""",
    """\
await rt.close()
print("CLOSED", repr(rt))
""",
]


def _kernel_dir(tmp_path: Path) -> Path:
    """A kernelspec that runs this interpreter (the venv's), not one found on the machine."""
    root = tmp_path / "jupyter"
    spec = root / "kernels" / "async-wf-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "async_wf test", "language": "python",
    }))
    return root


def test_a_runtime_started_in_a_notebook_cell_serves_the_later_cells(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_dir(tmp_path)))
    # the kernel imports this checkout of async_wf, as the test does
    here = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    client = nbclient.NotebookClient(nb, kernel_name="async-wf-test", timeout=60,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    out = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", [])
                  if o.get("output_type") == "stream")
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] if " " in line else ""
             for line in out.splitlines()}
    assert lines["STARTED"].startswith("<async_wf.Runtime "), out
    assert lines["TASK"] == "True 7", out
    assert lines["SUBMIT"] == "True 3", out
    assert lines["RESULT"].startswith("True "), out
    assert "not done yet" in lines["RESULT"], out
    assert lines["PENDING"] == "<TaskFuture #3 'nap' pending>", out
    assert lines["REPR"] == "<TaskFuture #3 'nap' finished>", out
    assert lines["HTML"] == "True", out
    assert lines["RTREPR"].startswith("<async_wf.Runtime "), out
    assert "3 submitted" in lines["RTREPR"] and "3 done" in lines["RTREPR"], out
    assert lines["CLOSED"].startswith("<async_wf.Runtime ") and "closed" in lines["CLOSED"], out
