"""``async-wf checkpoint``, run as the user runs it: a subprocess per command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from async_wf.checkpoint import CheckpointLog

# runs in the first pass only (core_independent): the checkpoint CLI's commands on log files (the
# format twins are compared in test_ckpt_log)
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, exe: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = exe or [sys.executable, "-m", "async_wf.cli"]
    return subprocess.run(
        [*cmd, "checkpoint", *args], capture_output=True, text=True, env=env, timeout=60
    )


def k(i: int) -> bytes:
    return i.to_bytes(32, "little")


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    """A log of a small workflow: load -> clean (one per load), and report."""
    path = tmp_path / "results.wfck"
    with CheckpointLog(path) as log:
        for i in range(4):
            log.put_result(k(i), list(range(i)), function="pipeline:load")
            log.put_result(k(10 + i), i * 2, function="pipeline:clean", parents=(k(i),))
        log.put_result(k(20), "ok", function="pipeline:report")
        log.put_result(k(0), [], function="pipeline:load")  # superseded
    return path


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_inspect(log_file: Path) -> None:
    proc = cli("inspect", str(log_file))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"{log_file}: ")
    assert "records   10 (RESULT 10)" in out
    assert "live      9 results" in out
    assert "damage    none found" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[5:] if line.strip()}
    assert rows["pipeline:load"][1] == "4"
    assert rows["pipeline:clean"][1] == "4"
    assert rows["pipeline:report"][1] == "1"


def test_verify_ok_then_damaged(log_file: Path) -> None:
    proc = cli("verify", str(log_file))
    assert proc.returncode == 0, proc.stderr
    ok = rf"{re.escape(str(log_file))}: OK \(10 records, [\d.]+ KiB\)\n"
    assert re.fullmatch(ok, proc.stdout)
    data = bytearray(log_file.read_bytes())
    data[100] ^= 0xFF
    log_file.write_bytes(data)
    proc = cli("verify", str(log_file))
    assert proc.returncode == 1
    assert "1 problem(s)" in proc.stdout and "offset " in proc.stdout


def test_verify_unpickle(log_file: Path) -> None:
    proc = cli("verify", "--unpickle", str(log_file))
    assert proc.returncode == 0, proc.stderr
    assert "9 values unpickled" in proc.stdout


def test_compact(log_file: Path) -> None:
    proc = cli("compact", str(log_file))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{log_file}: 10 records (")
    assert "-> 9 records (" in proc.stdout
    with CheckpointLog(log_file, readonly=True) as log:
        assert len(log) == 9 and log.get(k(0)) == []


def test_forget(log_file: Path) -> None:
    proc = cli("forget", str(log_file), "--function", "pipeline:load")
    assert proc.returncode == 0, proc.stderr
    assert "forgot 8 result(s)" in proc.stdout
    with CheckpointLog(log_file, readonly=True) as log:
        assert list(log) == [k(20)]
    proc = cli("forget", str(log_file), "--function", "load")
    assert proc.returncode == 1
    assert "no live results of function 'load'; functions in the log: pipeline:report" in (
        proc.stdout
    )


def test_errors_are_one_line(tmp_path: Path, log_file: Path) -> None:
    one_line_error(cli("inspect", str(tmp_path / "missing.wfck")), "No such file")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a log")
    one_line_error(cli("verify", str(notes)), "is not an async_wf checkpoint log")
    with CheckpointLog(log_file):  # a running writer holds the lock
        one_line_error(cli("compact", str(log_file)), "is locked by process", str(os.getpid()))


def test_usage_errors() -> None:
    proc = cli("forget", "x.wfck")
    assert proc.returncode == 2 and "--function" in proc.stderr
    proc = cli("--help")
    assert proc.returncode == 0
    for action in ("inspect", "verify", "compact", "forget"):
        assert action in proc.stdout


def test_console_script(log_file: Path) -> None:
    exe = shutil.which("async-wf", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the async-wf console script is not installed in this environment")
    proc = cli("verify", str(log_file), exe=[exe])
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


EXPLAINED_APP = """
import logging, sys
import helper

SCALE = int(sys.argv[1])
log = logging.getLogger("app")

def f(x):
    log.info("f")
    return x * SCALE + helper.OFFSET

if __name__ == "__main__":
    raise SystemExit("the program's main part must not run")
"""


def test_explain_lists_what_the_key_sees(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(EXPLAINED_APP)
    (tmp_path / "helper.py").write_text("OFFSET = 7\n")
    proc = cli("explain", str(tmp_path / "app.py") + ":f", "3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    included, _, left_out = out.partition("left out")
    assert re.search(r"SCALE\s+\(int, read by __async_wf_explain__:f\)", included), out
    assert re.search(r"helper\.OFFSET\s+\(int", included), out
    assert re.search(r"log\s+\(logging\.Logger", left_out), out
    bad = cli("explain", str(tmp_path / "app.py") + ":nope", "3")
    assert bad.returncode == 2 and "has no 'nope'" in bad.stderr
