"""async_wf on a real Slurm: workers as job steps, automatic allocation, failures.

Run by ``make test-slurm``, which starts a private one-node cluster
(tests/slurm/cluster.sh: 2 CPUs here, so worker jobs take 1 CPU each).
Every test is bounded in time and leaves no job (``squeue`` empty) and no
worker process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import async_wf

pytestmark = pytest.mark.slurm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")
NODE = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()


def squeue_ids() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                         timeout=30, check=True)
    return out.stdout.split()


def slurm_workers() -> list[str]:
    """Worker processes started with --slurm (only this suite starts those)."""
    out = subprocess.run(["pgrep", "-af", "async_wf.worker .*--slurm"], capture_output=True,
                         text=True, timeout=10)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Each test starts and ends with an empty queue and no worker process."""
    assert squeue_ids() == [], "a job was queued before the test"
    yield
    deadline = time.monotonic() + 20
    while (squeue_ids() or slurm_workers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left, procs = squeue_ids(), slurm_workers()
    if left:
        subprocess.run(["scancel", *left], timeout=30)
    assert left == [], f"jobs left behind: {left}"
    assert procs == [], f"worker processes left behind: {procs}"


def run_job(tmp_path: Path, body: str, sbatch: str, timeout: float = 120) -> tuple[str, str]:
    """``sbatch --wait`` a job script; its id and its output."""
    script = tmp_path / "job.sh"
    out = tmp_path / "job.out"
    script.write_text(f"#!/bin/bash\n#SBATCH {sbatch} --time=5 --output={out}\n"
                      f"cd {ROOT}\n{body}\n")
    done = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], capture_output=True,
                          text=True, timeout=timeout)
    text = out.read_text() if out.exists() else ""
    assert done.returncode == 0, f"job failed ({done.returncode}): {done.stderr}\n{text}"
    return done.stdout.strip().split(";")[0], text


def result_line(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert lines, f"no result in the job's output:\n{text}"
    out: dict[str, Any] = json.loads(lines[-1])
    return out


# ------------------------------------------------------- inside an allocation
@pytest.mark.parametrize("how", ["cluster=slurm", "async-wf run --slurm"])
def test_workflow_inside_an_allocation_runs_on_srun_workers(tmp_path: Path, how: str) -> None:
    app = HERE / "apps" / "inside.py"
    cmd = f"{PY} {app}" if how == "cluster=slurm" else \
        f"INSIDE_MODE=plain {PY} -m async_wf run --slurm {app}"
    job, text = run_job(tmp_path, cmd, "--nodes=1 --ntasks=1 --cpus-per-task=2")
    out = result_line(text)
    assert [r["square"] for r in out["results"]] == [i * i for i in range(8)]
    for r in out["results"]:
        # run by a worker in a job step of this job (the batch script has no step id)
        assert r["job"] == job and r["step"] is not None and r["step"].isdigit()
        assert r["pid"] != out["app_pid"]
    # one worker for the one node, declaring the job's 2 CPUs and its memory
    assert list(out["workers"]) == [f"#1 slurm-{job}-{NODE}"]
    assert out["workers"][f"#1 slurm-{job}-{NODE}"].startswith("cores=2, memory=1 GiB")
    assert out["allocations"]["kind"] == "slurm-job"


def test_one_worker_per_task_inside_an_allocation(tmp_path: Path) -> None:
    job, text = run_job(tmp_path, f"INSIDE_MODE=task {PY} {HERE / 'apps' / 'inside.py'}",
                        "--ntasks=2 --cpus-per-task=1")
    out = result_line(text)
    assert [r["square"] for r in out["results"]] == [i * i for i in range(8)]
    assert all(r["job"] == job and r["step"] is not None for r in out["results"])
    # two workers, one per task, each with its one CPU and 512 MiB (DefMemPerCPU)
    # and when their job ends (the job's time limit, from squeue)
    assert [v.split(";")[0] for v in out["workers"].values()] == \
        ["cores=1, memory=512 MiB, gpus=0"] * 2
    assert all("; ends in " in v for v in out["workers"].values())
    assert sorted(n.split()[1] for n in out["workers"]) == \
        [f"slurm-{job}-{NODE}-0", f"slurm-{job}-{NODE}-1"]


def test_a_worker_step_that_fails_at_start_fails_the_runtime_start(tmp_path: Path) -> None:
    t0 = time.monotonic()
    job, text = run_job(tmp_path, f"INSIDE_MODE=broken {PY} {HERE / 'apps' / 'inside.py'}",
                        "--ntasks=1")
    out = result_line(text)
    assert f"the srun step of the workers of Slurm job {job} ended" in out["error"]
    assert "before its 1 worker(s) joined" in out["error"]
    assert time.monotonic() - t0 < 30  # at once, not after start_timeout


@pytest.mark.parametrize("launcher", ["mpiexec", "srun-pmi2"])
def test_mpi_mode_inside_an_allocation(tmp_path: Path, launcher: str) -> None:
    app = f"{PY} -m async_wf.mpi {HERE / 'apps' / 'mpi_app.py'}"
    cmd = f"{MPIEXEC} -n 2 {app}" if launcher == "mpiexec" else f"srun --mpi=pmi2 -n 2 {app}"
    job, text = run_job(tmp_path, cmd, "--ntasks=2")
    out = result_line(text)
    assert [r["square"] for r in out["results"]] == [i * i for i in range(6)]
    for r in out["results"]:
        # the worker rank (rank 1; rank 0 runs the application) is a job step
        assert r["job"] == job and r["step"] is not None and r["rank"] == "1"


# ----------------------------------------------------- automatic allocation
def slow_where(i: int, pause: float, marker_dir: str | None = None) -> tuple[int, str | None]:
    job = os.environ.get("SLURM_JOB_ID")
    if marker_dir is not None:
        Path(marker_dir, f"started-{job}-{i}").touch()
    time.sleep(pause)
    return i * i, job


def token_only_in_environments(token: str, jobs: list[str]) -> bool:
    """The token is in the workers' environments, not their command lines or job scripts."""
    pids = [line.split()[0] for line in slurm_workers()]
    for pid in pids:  # the workers, and the srun that started them
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except FileNotFoundError:
            continue  # ended meanwhile
        assert token not in cmdline
        assert f"ASYNC_WF_TOKEN={token}" in environ.split("\0")
    for jid in jobs:
        for cmd in (["scontrol", "show", "job", "-o", jid],
                    ["scontrol", "write", "batch_script", jid, "-"]):
            shown = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            assert shown.returncode == 0 and token not in shown.stdout
    return bool(pids)


def test_automatic_allocation_submits_runs_and_idle_jobs_end(tmp_path: Path) -> None:
    alloc = async_wf.SlurmAllocator("debug", time="5:00", cores=1, max_jobs=2,
                                    idle_timeout=3, poll=0.5,
                                    output=str(tmp_path / "w-%j.out"))

    async def main() -> None:
        async with async_wf.Runtime(cluster=alloc, prefetch=1) as rt:
            seen: dict[str, list[str]] = {}
            futs = [rt.submit(slow_where, i, 1.2) for i in range(8)]
            token = rt._transport.secret.hex()  # type: ignore[attr-defined]
            checked = False
            while not all(f.done() for f in futs):
                for jid, j in rt.statistics()["allocations"]["jobs"].items():
                    if j["workers"]:
                        seen[jid] = j["workers"]
                if not checked and seen:
                    checked = token_only_in_environments(token, list(seen))
                await asyncio.sleep(0.1)
            assert checked
            out = [f.result() for f in futs]
            assert [sq for sq, _ in out] == [i * i for i in range(8)]
            jobs = {jid for _, jid in out}
            assert jobs <= set(alloc.ended) | set(alloc.jobs)  # ran in our worker jobs
            # two jobs (max_jobs), each with its worker named after it
            assert alloc.n_sbatch == 2 and len(seen) == 2
            for jid, names in seen.items():
                assert len(names) == 1 and names[0].startswith(f"slurm-{jid}-")
            # with nothing left to do, the workers exit after idle_timeout and
            # their jobs end by themselves, before the runtime closes
            deadline = time.monotonic() + 30
            while alloc.jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert alloc.jobs == {}
            assert set(alloc.ended.values()) == {"COMPLETED"}
            assert rt.statistics()["workers"] == 0

    asyncio.run(asyncio.wait_for(main(), 90))
    assert squeue_ids() == []


def test_scancel_of_a_worker_job_reruns_its_tasks_in_a_replacement(tmp_path: Path) -> None:
    # the second partition; one job at a time, so the replacement is certain
    alloc = async_wf.SlurmAllocator("fail", time="5:00", cores=1, max_jobs=1,
                                    idle_timeout=5, poll=0.5,
                                    output=str(tmp_path / "w-%j.out"))
    markers = tmp_path / "markers"
    markers.mkdir()

    async def main() -> None:
        async with async_wf.Runtime(cluster=alloc, prefetch=1) as rt:
            futs = [rt.submit(slow_where, i, 1.5, str(markers)) for i in range(4)]
            while not any(markers.iterdir()):
                await asyncio.sleep(0.1)
            first = next(markers.iterdir()).name.split("-")[1]
            subprocess.run(["scancel", first], check=True, timeout=30)
            out = await asyncio.gather(*futs)
            assert [sq for sq, _ in out] == [i * i for i in range(4)]
            # the tasks lost with the cancelled job ran in its replacement
            assert {jid for _, jid in out} - {first}
            assert alloc.n_sbatch == 2 and alloc.n_replaced == 1
            assert alloc.ended[first] == "CANCELLED"
            assert rt.statistics()["workers_lost"] >= 1

    asyncio.run(asyncio.wait_for(main(), 90))
    assert squeue_ids() == []


def test_invalid_partition_is_reported_once_and_stops_submitting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # count the sbatch calls outside the allocator too: a wrapper first on
    # PATH logs each call, then runs the real sbatch
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True).stdout.strip()
    calls = tmp_path / "sbatch-calls"
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    alloc = async_wf.SlurmAllocator("no-such-partition", time="5:00", cores=1, max_jobs=4,
                                    poll=0.5)

    async def main() -> None:
        async with async_wf.Runtime(cluster=alloc) as rt:
            futs = [rt.submit(slow_where, i, 0.1) for i in range(3)]
            for f in futs:
                with pytest.raises(async_wf.AllocationError) as info:
                    await f
                msg = str(info.value)
                assert "partition 'no-such-partition'" in msg
                assert "sbatch: " in msg and "invalid partition" in msg.lower()
            await asyncio.sleep(3)  # more ticks: still no second sbatch
            stats = rt.statistics()["allocations"]
            assert stats["sbatch_calls"] == 1 and stats["jobs"] == {}
            assert "no-such-partition" in stats["error"]
            # a task submitted now fails too (no worker will come), without sbatch
            t0 = time.monotonic()
            with pytest.raises(async_wf.AllocationError, match="no-such-partition"):
                await rt.submit(slow_where, 9, 0.1)
            assert time.monotonic() - t0 < 5

    asyncio.run(asyncio.wait_for(main(), 60))
    assert alloc.n_sbatch == 1
    assert len(calls.read_text().splitlines()) == 1
    assert "--partition=no-such-partition" in calls.read_text()
    assert squeue_ids() == []


def _metrics_text(host: str, port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_a_worker_job_near_its_time_limit_gets_no_task_it_cannot_finish(
        tmp_path: Path) -> None:
    # jobs of 1 minute: their workers declare when they end (squeue's end
    # time, through --slurm), and a task declared to take 10 minutes is not
    # given to them, while one of 1 s is
    alloc = async_wf.SlurmAllocator("debug", time="1:00", cores=1, max_jobs=1,
                                    idle_timeout=30, poll=0.5,
                                    output=str(tmp_path / "w-%j.out"))

    async def main() -> None:
        async with async_wf.Runtime(cluster=alloc, metrics="127.0.0.1:0") as rt:
            short = await rt.options(time=1).submit(slow_where, 3, 0.1)
            assert short[0] == 9
            # the metrics show the job and its worker
            await asyncio.sleep(1.5)  # the observer samples every second
            host, port = rt.metrics_address  # type: ignore[misc]
            text = await asyncio.to_thread(_metrics_text, host, port)
            assert 'async_wf_allocations{state="running"} 1.0' in text, text
            assert "async_wf_allocation_workers{job=" in text
            ends = list(rt.statistics()["worker_resources"].values())
            assert len(ends) == 1 and "ends in" in ends[0], ends
            left = float(ends[0].split("ends in ")[1].split(" s")[0])
            assert 0 < left <= 60, ends
            long = rt.options(time=600).submit(slow_where, 4, 0.1)
            await asyncio.sleep(3)
            assert not long.done(), "a 10-minute task went to a job with a minute left"
            long.cancel()

    asyncio.run(asyncio.wait_for(main(), 90))
    assert squeue_ids() == []
