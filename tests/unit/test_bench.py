"""Smoke tests of the benchmark scripts: they run, agree with their baseline, and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

# runs in the first pass only (core_independent): the benchmark scripts run and report; their
# figures are for the compiled core
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parents[2]


#: set in the environment of a benchmark run this test file starts, with a
#: value of its own: every process of that run inherits it
TEST_MARK = "ASYNC_WF_TEST_BENCH_MARK"


def _run(*args: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    out: dict[str, object] = json.loads(lines[0])
    return out


@pytest.mark.parametrize("kind", ["async", "thread", "inline"])
@pytest.mark.parametrize("workload", ["noop", "chain", "fanin"])
def test_throughput_script_reports_every_field(workload: str, kind: str) -> None:
    out = _run(
        "bench/throughput.py", "--workload", workload, "--kind", kind,
        "--n", "300", "--repeat", "1", "--json",
    )
    assert out["workload"] == workload
    assert out["transport"] == "local"
    assert out["n"] == 300
    assert out["tasks"] == (599 if workload == "fanin" else 300)
    for key in ("seconds", "tasks_per_s", "baseline_tasks_per_s", "ratio", "startup_s"):
        value = out[key]
        assert isinstance(value, float) and value > 0, (key, value)


def test_throughput_script_rejects_bad_n() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--n", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--n and --repeat must be >= 1, got 0" in proc.stderr


# ------------------------------------------------------------- tcp transport
# Only ProcessPoolExecutor is compared here: it is in the standard library,
# so these tests do not depend on Dask being installed.

_TCP_KEYS = ("seconds", "tasks_per_s", "baseline_tasks_per_s", "ratio", "startup_s")
_PEER_KEYS = ("tasks_per_s", "seconds", "samples_s", "status", "startup_s", "version")


@pytest.mark.parametrize(("workload", "n"), [
    ("noop", 200), ("chain", 200), ("fanin", 200), ("payload", 4),
])
def test_throughput_tcp_against_procpool_reports_every_field(workload: str, n: int) -> None:
    out = _run(
        "bench/throughput.py", "--transport", "tcp", "--workers", "2", "--peers", "procpool",
        "--workload", workload, "--n", str(n), "--repeat", "1", "--json",
    )
    assert out["workload"] == workload
    assert out["transport"] == "tcp"
    assert out["kind"] == "thread"
    assert out["workers"] == 2
    assert out["n"] == n
    assert out["tasks"] == (2 * n - 1 if workload == "fanin" else n)
    for key in _TCP_KEYS:
        value = out[key]
        assert isinstance(value, float) and value > 0, (key, value)
    assert isinstance(out["baseline"], str) and "ProcessPoolExecutor" in out["baseline"]
    peers = out["peers"]
    assert isinstance(peers, dict) and set(peers) == {"procpool"}
    pp = peers["procpool"]
    for key in _PEER_KEYS:
        assert key in pp, key
    assert pp["status"] == "ok", pp
    assert len(pp["samples_s"]) == 1
    assert pp["tasks_per_s"] == out["baseline_tasks_per_s"]
    ratios = out["ratios"]
    assert isinstance(ratios, dict)
    assert ratios["procpool"] == pytest.approx(out["tasks_per_s"] / pp["tasks_per_s"])
    assert ratios["procpool"] == out["ratio"]
    if workload == "payload":
        assert out["mb_per_s"] > 0 and pp["mb_per_s"] > 0
    if workload == "chain":
        assert out["chain_us_per_task"] > 0 and pp["chain_us_per_task"] > 0


def test_throughput_tcp_reports_a_peer_over_its_time_limit_as_failed() -> None:
    out = _run(
        "bench/throughput.py", "--transport", "tcp", "--peers", "procpool",
        "--peer-timeout", "0.01", "--n", "10", "--repeat", "1", "--json",
    )
    pp = out["peers"]["procpool"]  # type: ignore[index]
    assert pp["status"] == "failed"
    assert "timed out" in pp["reason"]
    assert pp["tasks_per_s"] is None
    assert out["ratios"] == {"procpool": None}
    assert out["baseline_tasks_per_s"] is None and out["ratio"] is None


def test_throughput_payload_needs_tcp() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--workload", "payload"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--workload payload needs --transport tcp" in proc.stderr


def test_checkpoint_script_reports_every_figure() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/checkpoint.py", "--n", "300", "--payload-n", "4",
         "--rerun-n", "300", "--rerun-sleep-n", "20", "--index-n", "2000", "--repeat", "1",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    for name in ("noop_local", "payload_local", "noop_tcp", "payload_tcp"):
        assert out[name]["with_s"] > 0 and out[name]["without_s"] > 0
    for name in ("noop_local", "noop_tcp"):  # the scheduler's CPU per recorded task
        assert out[name]["sched_cpu_with_s"] > 0 and "sched_us_per_task" in out[name]
        # the figure in parts: time really spent making and writing records
        assert out[name]["record_us_per_task"] > out[name]["flush_us_per_task"] > 0
        # tasks per Recorder.record call: the batch its per-call costs spread over
        assert 1 <= out[name]["record_batch"] <= 300
    assert out["key_us_per_task"] > 0
    assert proc.stdout.count(" tasks a batch") == 2
    assert proc.stdout.count("  where  ") == 2
    assert out["rerun_noop"]["speedup"] > 0 and out["rerun_sleep1ms"]["n"] == 20
    assert out["index"]["n"] == 2000 and out["index"]["records_per_s"] > 0


# ------------------------------------------------------ the suite (python -m bench)
_AWF_SYSTEMS = "async_wf-local,async_wf-tcp,async_wf-mpi,asyncio,socket,procpool"


def test_the_suite_runs_every_async_wf_system_and_reports(tmp_path: Path) -> None:
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--systems", _AWF_SYSTEMS, "--n", "16",
         "--repeat", "1", "--timeout", "120", "--json", str(js), "--png", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(js.read_text())
    assert out["workers"] == 2 and out["repeat"] == 1
    assert out["versions"]["async_wf"] and out["versions"]["numpy"]
    assert out["machine"]["cpus"] >= 1 and out["command"].startswith("python -m bench")
    results = out["results"]
    assert list(results) == _AWF_SYSTEMS.split(",")
    for system, per in results.items():
        assert list(per) == ["noop", "chain", "fanin", "payload"], system
        for w, r in per.items():
            assert r["status"] == "ok", (system, w, r)
            assert r["n"] == 16 and len(r["samples_s"]) == 1
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
            assert r["tasks"] == (31 if w == "fanin" else 16)
            assert r["tasks_per_s"] == pytest.approx(r["tasks"] / r["median_s"])
            assert r["startup_s"] >= 0 and r["config"]
        assert per["payload"]["mb_per_s"] > 0
    # each peer against the async_wf system that runs tasks the same way
    rat = out["ratios"]
    assert rat["procpool"]["compared_with"] == "async_wf-tcp"
    assert rat["asyncio"]["compared_with"] == "async_wf-local"
    for w in ("noop", "chain", "fanin", "payload"):
        want = results["async_wf-tcp"][w]["tasks_per_s"] / results["procpool"][w]["tasks_per_s"]
        assert rat["procpool"][w] == pytest.approx(want)
    assert "async_wf / system" in proc.stdout and "procpool" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_suite_reports_a_system_over_its_time_limit_and_cleans_up(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    js = tmp_path / "out.json"
    before = {p.pid for p in psutil.process_iter()}
    mark = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--systems", "async_wf-tcp", "--workloads", "chain",
         "--n", "1000000", "--repeat", "1", "--timeout", "8", "--json", str(js)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, TEST_MARK: mark},
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(js.read_text())["results"]["async_wf-tcp"]["chain"]
    assert r["status"] == "failed" and "timed out after 8 s" in r["reason"]
    # the child, its worker processes and everything they started are gone
    # (only processes carrying this run's mark: other test runs on the
    # machine may start workers of their own meanwhile)
    assert _leftovers(before, mark) == []


def test_the_suite_reports_a_peer_that_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from bench import suite

    args = argparse.Namespace(workers=2, repeat=1, seed=0, gc="off", timeout=10)
    monkeypatch.setitem(suite.NEEDS, "procpool", "no-such-package-for-async-wf")
    got = suite.run_system("procpool", [("noop", 10), ("chain", 5)], args)
    assert [r["status"] for r in got] == ["not installed", "not installed"]
    assert "no-such-package-for-async-wf" in got[0]["reason"]


def test_the_suite_scaling_mode_sweeps_sizes(tmp_path: Path) -> None:
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--scaling", "--scaling-n", "10,100",
         "--systems", "async_wf-local,asyncio", "--repeat", "1", "--json", str(js),
         "--png", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    sc = json.loads(js.read_text())["scaling"]
    assert sc["workload"] == "noop"
    for system in ("async_wf-local", "asyncio"):
        pts = sc["points"][system]
        assert [p["n"] for p in pts] == [10, 100]
        assert all(p["status"] == "ok" and p["us_per_task"] > 0 for p in pts)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_suite_rejects_an_unknown_system() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--systems", "async_wf-local,spark"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--systems must be a comma-separated list of" in proc.stderr
    assert "'async_wf-local,spark'" in proc.stderr


def _leftovers(before: set[int], mark: str) -> list[Any]:
    """Worker processes not in ``before`` that the run marked ``mark`` left behind."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if p.pid not in before and "async_wf.worker" in " ".join(p.info["cmdline"] or [])
            and _marked(p, mark)]


def _marked(p: Any, mark: str) -> bool:
    """True when process ``p`` inherited ``TEST_MARK=mark`` (it belongs to that run)."""
    try:
        return bool(p.environ().get(TEST_MARK) == mark)
    except Exception:  # gone, or not ours to read
        return False


def test_the_leftover_check_counts_only_the_processes_of_its_own_run() -> None:
    # another make test on the machine runs this suite too: its workers
    # (marked by its own benchmark run) are not this run's leftovers
    psutil = pytest.importorskip("psutil")
    before = {p.pid for p in psutil.process_iter()}
    mine, theirs = uuid.uuid4().hex, uuid.uuid4().hex
    looks_like_a_worker = [sys.executable, "-c", "import time; time.sleep(60)",
                           "-m", "async_wf.worker"]
    envs = [{TEST_MARK: mine, "ASYNC_WF_BENCH_RUN": "a"},
            {TEST_MARK: theirs, "ASYNC_WF_BENCH_RUN": "b"},
            {"ASYNC_WF_BENCH_RUN": "c"}]
    procs = [subprocess.Popen(looks_like_a_worker, env={**os.environ, **env}) for env in envs]
    try:
        assert [p.pid for p in _leftovers(before, mine)] == [procs[0].pid]
    finally:
        for p in procs:
            p.kill()
            p.wait()
