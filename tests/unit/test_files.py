"""Files with directions: FileIn, FileOut, FileInOut (issue 16.2).

A task that writes a path (``FileOut``/``FileInOut``) is that path's
producer: later tasks that read it wait for it, later writers wait for its
readers, as PyCOMPSs orders FILE_IN / FILE_OUT / FILE_INOUT. With a
checkpoint log, the producer's outputs are recorded and checked before its
result is reused. Real files, real processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import async_wf
from async_wf import FileIn, FileInOut, FileOut

ROOT = Path(__file__).resolve().parents[2]


def write_slowly(out: FileOut, text: str, delay: float) -> str:
    time.sleep(delay)
    Path(out).write_text(text)
    return text


def read(inp: FileIn) -> str:
    return Path(inp).read_text()


def append(f: FileInOut, text: str, delay: float) -> None:
    time.sleep(delay)
    with open(f, "a") as fh:
        fh.write(text)


@pytest.mark.parametrize("workers", [None, 2])
async def test_readers_wait_for_writers_and_writers_for_readers(
        tmp_path: Path, workers: int | None) -> None:
    path = tmp_path / "data.txt"
    async with async_wf.Runtime(workers=workers) as rt:
        w1 = rt.submit(write_slowly, FileOut(path), "v1", 0.3)
        r1 = rt.submit(read, FileIn(path))          # after w1, though nothing links them
        w2 = rt.submit(write_slowly, FileOut(path), "v2", 0.0)  # after r1 has read v1
        r2 = rt.submit(read, FileIn(path))
        assert await async_wf.gather(w1, r1, w2, r2) == ["v1", "v1", "v2", "v2"]


async def test_inout_serialises_the_writers_in_submission_order(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("")
    async with async_wf.Runtime(threads=8) as rt:
        # the first sleeps longest: without ordering they would land reversed
        await async_wf.gather(*[rt.submit(append, FileInOut(path), str(i), 0.05 * (5 - i))
                                for i in range(6)])
    assert path.read_text() == "012345"


async def test_a_failed_writer_fails_its_readers(tmp_path: Path) -> None:
    def broken(out: FileOut) -> None:
        raise OSError("disk on fire")

    async with async_wf.Runtime() as rt:
        w = rt.submit(broken, FileOut(tmp_path / "x"))
        r = rt.submit(read, FileIn(tmp_path / "x"))
        with pytest.raises(OSError):
            await w
        with pytest.raises(async_wf.DependencyError):
            await r


def test_directions_are_paths_and_pickle(tmp_path: Path) -> None:
    import pickle

    for cls in (FileIn, FileOut, FileInOut):
        f = cls(tmp_path / "a")
        assert os.fspath(f) == str(tmp_path / "a")
        g = pickle.loads(pickle.dumps(f))
        assert type(g) is cls and g == f
        assert repr(f).startswith(cls.__name__ + "(")
    assert FileIn(tmp_path / "a") != FileOut(tmp_path / "a")
    with pytest.raises(ValueError, match="by must be 'content' or 'mtime', got 'size'"):
        FileOut(tmp_path / "a", by="size")


PIPELINE = """
import os, sys, async_wf
from pathlib import Path
from async_wf import FileIn, FileOut

def produce(out, n):
    print("ran produce", file=sys.stderr)
    Path(out).parent.mkdir(exist_ok=True)
    Path(out).write_text("x" * n)
    return n

def consume(inp):
    print("ran consume", file=sys.stderr)
    if os.environ.get("FAIL_CONSUME"):
        raise RuntimeError("consume fails on purpose")
    return len(Path(inp).read_text())

async def main():
    async with async_wf.Runtime(checkpoint="run.wfck") as rt:
        p = rt.submit(produce, FileOut("out/a.txt"), 5)
        c = rt.submit(consume, FileIn("out/a.txt"))   # out/a.txt does not exist yet
        print(await p, await c)

async_wf.run(main())
"""


def _run(tmp_path: Path, **env: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    return proc.returncode, proc.stdout.strip(), proc.stderr


def test_a_deleted_or_changed_output_reruns_its_producer(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(PIPELINE)
    code, out, err = _run(tmp_path, FAIL_CONSUME="1")
    assert code != 0 and "consume fails on purpose" in err  # produce is recorded
    assert err.count("ran produce") == 1
    (tmp_path / "out" / "a.txt").unlink()
    code, out, err = _run(tmp_path)
    assert code == 0, err
    assert out == "5 5"
    assert err.count("ran produce") == 1, "the output is gone: the producer must run again"
    code, out, err = _run(tmp_path)
    assert code == 0 and out == "5 5" and "ran" not in err, err  # all reused
    (tmp_path / "out" / "a.txt").write_text("tampered")
    code, out, err = _run(tmp_path)
    assert code == 0 and out == "5 5", err
    assert err.count("ran produce") == 1, "a changed output must rerun its producer"
    assert (tmp_path / "out" / "a.txt").read_text() == "xxxxx"
