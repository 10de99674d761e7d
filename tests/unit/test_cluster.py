"""Cluster plumbing that needs no Slurm: the job step's environment, options, --idle-timeout.

The real Slurm tests are in tests/slurm (``make test-slurm``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import async_wf
from async_wf._launch import DEFAULTS_ENV
from async_wf._slurm import slurm_worker_args

ROOT = Path(__file__).resolve().parents[2]


def test_a_node_worker_declares_the_cpus_and_memory_slurm_gave_its_node() -> None:
    env = {"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "n7", "SLURM_CPUS_ON_NODE": "8",
           "SLURM_MEM_PER_NODE": "4096"}
    assert slurm_worker_args(env) == {"name": "slurm-42-n7", "cores": 8,
                                      "memory": 4096 << 20, "gpus": 0,
                                      "end_time": None}  # no such job to ask squeue about
    # memory per CPU: times the cores
    env2 = {"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "n7", "SLURM_CPUS_ON_NODE": "2",
            "SLURM_MEM_PER_CPU": "512"}
    assert slurm_worker_args(env2)["memory"] == 1024 << 20


def test_a_task_worker_takes_its_cpus_its_share_of_memory_and_its_gpus() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURMD_NODENAME": "g1", "SLURM_PROCID": "3",
           "SLURM_CPUS_PER_TASK": "4", "SLURM_MEM_PER_NODE": "8000",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_GPUS": "0,1",
           "CUDA_VISIBLE_DEVICES": "1"}
    got = slurm_worker_args(env, "task")
    assert got == {"name": "slurm-7-g1-3", "cores": 4, "memory": 4000 << 20, "gpus": ["1"],
                   "end_time": None}


def test_worker_slurm_outside_a_job_step_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["ASYNC_WF_TOKEN"] = "00" * 16
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "async_wf.worker", "--connect",
                           "tcp://127.0.0.1:9", "--slurm"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode != 0
    assert "--slurm needs a Slurm job step's environment" in proc.stderr


def test_cluster_slurm_outside_an_allocation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(async_wf.AllocationError, match="inside a Slurm allocation"):
        async_wf.Runtime(cluster="slurm")
    with pytest.raises(ValueError, match=r"cluster must be 'slurm'.*got 'pbs'"):
        async_wf.Runtime(cluster="pbs")  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_jobs": 0}, "max_jobs must be an int >= 1, got 0"),
    ({"nodes_per_job": 1.5}, "nodes_per_job must be an int >= 1"),
    ({"idle_timeout": 0}, "idle_timeout must be a number of seconds > 0"),
    ({"time": "one hour"}, "time must be a Slurm time limit"),
    ({"cores": 0}, "cores must be an int >= 1"),
])
def test_allocator_options_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        async_wf.SlurmAllocator("debug", **kwargs)  # type: ignore[arg-type]


def test_the_job_script_and_command_carry_no_token() -> None:
    alloc = async_wf.SlurmAllocator("p1", time="0:30:00", cores=2, nodes_per_job=3,
                                    idle_timeout=60, memory="4G")
    script = alloc.script("tcp://10.0.0.1:7450", ["--tls-auto"])
    cmd = alloc.sbatch_command()
    assert "--idle-timeout 60" in script and "--slurm node" in script
    assert "--nodes=3" in script and "--tls-auto" in script
    assert "--partition=p1" in cmd and "--time=0:30:00" in cmd and "--mem=4G" in cmd
    for text in (script, " ".join(cmd)):
        assert "TOKEN" not in text.upper()


def test_async_wf_run_slurm_sets_the_cluster_default(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("import os\nprint(os.environ['ASYNC_WF_DEFAULTS'])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "async_wf", "run", "--slurm", str(app)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == '{"cluster": "slurm"}', out.stderr
    assert DEFAULTS_ENV == "ASYNC_WF_DEFAULTS"


async def test_a_worker_with_idle_timeout_exits_after_its_last_task(tmp_path: Path) -> None:
    token = tmp_path / "token"
    async with async_wf.Runtime(listen="127.0.0.1:0", token_file=str(token),
                                no_worker_timeout=30) as rt:
        address = rt._transport.address  # type: ignore[attr-defined]  # the port it got
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "async_wf.worker", "--connect", address,
                                 "--token-file", str(token), "--idle-timeout", "1.5",
                                 "--reconnect", "0"], env=env)
        try:
            assert await rt.submit(pow, 3, 2) == 9
            t_done = time.monotonic()
            code = await asyncio.to_thread(proc.wait, 20)
            idle = time.monotonic() - t_done
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0
        assert 1.0 < idle < 6.0  # the idle timeout, give or take a heartbeat
        await asyncio.sleep(0.2)  # the scheduler's side of the closed connection
        assert rt.statistics()["workers"] == 0


def test_the_progress_line_shows_the_allocator_s_jobs_and_workers() -> None:
    from async_wf.observe.progress import ProgressDisplay

    snap = {"finished": 3, "allocations": {
        "kind": "slurm", "pending": 1, "running": 2,
        "jobs": {"11": {"state": "RUNNING", "workers": ["slurm-11-n1"]},
                 "12": {"state": "RUNNING", "workers": ["slurm-12-n1", "slurm-12-n2"]},
                 "13": {"state": "PENDING", "workers": []}}}}
    shown = " | ".join(t.plain for t in ProgressDisplay.describe(snap))
    assert "jobs 2 running, 1 pending, 3 workers" in shown, shown
    # without an allocator, nothing about jobs
    assert "jobs" not in " ".join(t.plain for t in ProgressDisplay.describe({"finished": 3}))
