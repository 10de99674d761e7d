"""``async-wf run``: an application runs with command-line runtime options, unedited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

# runs in the first pass only (core_independent): how `async-wf run` turns options into a Runtime;
# the scheduling is tested elsewhere
pytestmark = pytest.mark.core_independent

APP = textwrap.dedent('''
    import json, os, sys
    import async_wf

    def where(i):
        return os.getpid()

    async def main():
        async with async_wf.Runtime() as rt:
            futs = [rt.submit(where, i) for i in range(20)]
            pids = [await f for f in futs]
            stats = rt.statistics()
        print(json.dumps({"app": os.getpid(), "pids": sorted(set(pids)), "argv": sys.argv,
                          "reused": stats["reused"]}))

    async_wf.run(main())
''')


def _run(tmp_path: Path, *opts: str, app: str = APP) -> tuple[subprocess.CompletedProcess[str],
                                                              dict[str, Any] | None]:
    (tmp_path / "app.py").write_text(app)
    proc = subprocess.run(
        [sys.executable, "-m", "async_wf.cli", "run", *opts, "app.py", "--flag", "x"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return proc, (json.loads(lines[-1]) if lines else None)


def test_workers_run_the_tasks_in_worker_processes(tmp_path: Path) -> None:
    proc, out = _run(tmp_path, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert out is not None
    assert out["app"] not in out["pids"]  # not in the application's process
    assert out["argv"] == ["app.py", "--flag", "x"]


def test_threads_keep_the_tasks_in_process(tmp_path: Path) -> None:
    proc, out = _run(tmp_path, "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert out is not None and out["pids"] == [out["app"]]


def test_checkpoint_makes_the_second_run_reuse_every_task(tmp_path: Path) -> None:
    proc, first = _run(tmp_path, "--workers", "2", "--checkpoint", "run.wfck")
    assert proc.returncode == 0, proc.stderr
    assert first is not None and first["reused"] == 0
    assert (tmp_path / "run.wfck").stat().st_size > 0
    proc, again = _run(tmp_path, "--workers", "2", "--checkpoint", "run.wfck")
    assert proc.returncode == 0, proc.stderr
    assert again is not None and again["reused"] == 20
    assert again["pids"] == first["pids"]  # the recorded results, not new ones


def test_mpi_runs_the_application_under_mpiexec(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py")
    proc, out = _run(tmp_path, "--mpi", "3")
    assert proc.returncode == 0, proc.stderr
    assert out is not None
    assert out["app"] not in out["pids"] and 1 <= len(out["pids"]) <= 2  # the 2 worker ranks


def test_the_applications_own_transport_wins(tmp_path: Path) -> None:
    app = APP.replace("async_wf.Runtime()", "async_wf.Runtime(threads=1)")
    proc, out = _run(tmp_path, "--workers", "2", app=app)
    assert proc.returncode == 0, proc.stderr
    assert out is not None and out["pids"] == [out["app"]]
    assert "the application chooses its own transport" in proc.stderr


def test_the_exit_code_of_the_application_is_kept(tmp_path: Path) -> None:
    proc, _ = _run(tmp_path, app="import sys\nsys.exit(3)\n")
    assert proc.returncode == 3


@pytest.mark.parametrize(("opts", "message"), [
    (["--workers", "0"], "--workers: must be an integer >= 1, got '0'"),
    (["--mpi", "1"], "--mpi: must be >= 2"),
    (["--workers", "2", "--mpi", "3"], "not allowed with argument"),
    (["--metrics", "9464"], "--metrics: must be HOST:PORT (port 0: any free one), got '9464'"),
    (["--listen", "no-such-host.invalid:0"],
     "--listen: cannot resolve the host 'no-such-host.invalid'"),
    (["--metrics", "no-such-host.invalid:0"],
     "--metrics: cannot resolve the host 'no-such-host.invalid'"),
    (["--listen", ":0"],
     "--listen: must be HOST:PORT (port 0: any free one), got ':0'; give the host"),
    (["--metrics", ":0"],
     "--metrics: must be HOST:PORT (port 0: any free one), got ':0'; give the host"),
])
def test_bad_options_are_refused_with_the_rule(tmp_path: Path, opts: list[str],
                                               message: str) -> None:
    proc, _ = _run(tmp_path, *opts)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_application_is_named(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "async_wf.cli", "run", "nope.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "no such application file: 'nope.py'" in proc.stderr


def test_a_malformed_defaults_variable_names_the_rule(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    proc = subprocess.run(
        [sys.executable, "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "ASYNC_WF_DEFAULTS": '{"workers": "two"}'},
    )
    assert proc.returncode != 0
    assert "ASYNC_WF_DEFAULTS: option 'workers' must be one of" in proc.stderr
    assert "got 'two'" in proc.stderr


def test_options_after_the_application_are_its_own_and_a_warning_says_so(
        tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    proc = subprocess.run(
        [sys.executable, "-m", "async_wf.cli", "run", "app.py", "--workers", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["argv"] == ["app.py", "--workers", "2"]  # the application's own
    assert out["pids"] == [out["app"]]  # so not on workers
    assert "--workers after app.py goes to the application" in proc.stderr


def test_python_dash_m_async_wf_is_the_command(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "async_wf", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("async_wf ")


def test_run_listens_for_external_workers_with_a_token_file(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP.replace(
        "futs = [", "print('listening', rt.transport.address, flush=True)\n"
        "        futs = ["))
    token = tmp_path / "token"
    proc = subprocess.Popen(
        [sys.executable, "-m", "async_wf.cli", "run", "--listen", "tcp://127.0.0.1:0",
         "--token-file", str(token), "app.py"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening tcp://127.0.0.1:"), line + proc.stderr.read()  # type: ignore[union-attr]
    worker = subprocess.Popen([sys.executable, "-m", "async_wf.cli", "worker", "--connect",
                               line.split()[1], "--token-file", str(token)],
                              stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        worker.kill()
        worker.communicate()
    assert proc.returncode == 0, err
    res = json.loads(out.splitlines()[-1])
    assert res["app"] not in res["pids"] and len(res["pids"]) == 1  # ran on the worker
