"""Installing async_wf: a machine without a C compiler still gets a working package.

The wheel is built by the real ``pip wheel`` from a copy of the tracked
tree, with ``CC=false CXX=false`` so that every compiler call fails, and
with the shared environment's setuptools and Cython (no build isolation:
the test must not need the network). The wheel is then unpacked and
imported in a fresh interpreter, which runs a small workflow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# runs in the first pass only (core_independent): builds and imports a wheel with no compiler:
# always the pure-Python twin
pytestmark = pytest.mark.core_independent

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys, warnings
# the shared environment's editable install would map async_wf to a source
# tree: the import must come from the unpacked wheel on sys.path alone
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import async_wf

    async def main():
        async with async_wf.Runtime() as rt:
            futs = [rt.submit(pow, i, 2) for i in range(10)]
            return await rt.submit(sum, futs)

    total = async_wf.run(main())
print(async_wf.__file__)
print(async_wf.CORE_IMPL, total)
runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
print(len(runtime))
for w in runtime:
    print(w.message)
"""


def _tracked_copy(dest: Path) -> None:
    """The files git tracks, without any build output (.so, generated .c, build/)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def test_no_c_compiler_builds_a_pure_python_wheel_that_runs(tmp_path: Path) -> None:
    src, out, unpacked = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    _tracked_copy(src)
    env = {k: v for k, v in os.environ.items()
           if k not in ("ASYNC_WF_NO_EXTENSIONS", "PYTHONPATH")}
    env.update(CC="false", CXX="false", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "--no-index", "-v", "-w", str(out)],
        cwd=src, env=env, capture_output=True, text=True, timeout=300)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-3000:]
    # one line that says what happened and what it costs
    notes = [ln for ln in log.splitlines() if "pure-Python" in ln and "async_wf._core" in ln]
    assert notes, log[-3000:]
    assert "false" in notes[0] and "slower" in notes[0], notes[0]

    (wheel,) = out.glob("async_wf-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert not [n for n in names if n.endswith((".so", ".pyd"))], names
        assert "async_wf/_pycore.py" in names and "async_wf/py.typed" in names
        zf.extractall(unpacked)

    env["PYTHONPATH"] = str(unpacked)
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == str(unpacked / "async_wf" / "__init__.py"), lines
    assert lines[1:3] == ["python 285", "1"], run.stdout
    assert "async_wf._core" in lines[3] and "pure-Python" in lines[3], lines[3]
