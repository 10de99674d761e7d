"""Workers from Slurm: inside an allocation (``SlurmJob``) or by sbatch (``SlurmAllocator``).

Both are ``Allocator``s for the TCP transport (``Runtime(cluster=...)``):
the scheduler listens, the workers run ``python -m async_wf.worker
--connect ... --slurm`` as Slurm job steps and declare what Slurm gave
them. The token travels in the environment, which ``srun`` and ``sbatch``
pass on to the job (``--export=ALL``, their default), never on a command
line, where ``ps`` and ``squeue`` would show it.

Which address the workers connect to (``listen_host``): loopback when every
node that may run a worker is this machine; else this machine's address on
the route to the first other node (the interface the nodes reach it by).
``Runtime(listen=...)`` overrides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from async_wf._allocator import AllocationError, Allocator

__all__ = ["SlurmAllocator", "SlurmJob", "slurm_worker_args"]

log = logging.getLogger("async_wf")

#: job states in which a job holds or waits for nodes (squeue's %T)
_LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING",
         "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
_NAME = re.compile(r"^slurm-(\d+)-")
#: consecutive worker jobs that may end before any of their workers connected
_MAX_DEAD_JOBS = 5


def _command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AllocationError(f"{name} is not on PATH: is this a Slurm node (login node)?")
    return path


def hostnames(nodelist: str) -> list[str]:
    """The host names of a Slurm node list (``node[01-03],gpu1``), from ``scontrol``."""
    if not nodelist:
        return []
    out = subprocess.run([_command("scontrol"), "show", "hostnames", nodelist],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return []
    return out.stdout.split()


def route_host(nodes: Sequence[str]) -> str:
    """The address to listen on for workers on ``nodes`` (the rule of the module docstring)."""
    me = {socket.gethostname(), socket.gethostname().split(".")[0], "localhost"}
    others = [n for n in nodes if n not in me and n.split(".")[0] not in me]
    if not others:
        return "127.0.0.1"
    try:
        peer = socket.getaddrinfo(others[0], 9, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))  # no packet is sent: this only picks the route
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _mb(value: str | None) -> int | None:
    return int(value) * 1024 * 1024 if value and value.isdigit() else None


def _first_count(per_node: str | None) -> int | None:
    """The first count of a Slurm per-node list such as ``2(x3),1``."""
    if not per_node:
        return None
    m = re.match(r"(\d+)", per_node)
    return int(m.group(1)) if m else None


def slurm_worker_args(env: Mapping[str, str],
                      per: Literal["node", "task"] = "node") -> dict[str, Any]:
    """What a worker started by ``srun`` declares, from its job step's environment.

    ``per="node"``: the CPUs Slurm gave the job on this node
    (``SLURM_CPUS_ON_NODE``); ``per="task"``: ``SLURM_CPUS_PER_TASK`` (1 if
    unset). Memory: ``SLURM_MEM_PER_NODE`` (shared by the node's tasks when
    ``per="task"``), else ``SLURM_MEM_PER_CPU`` times the cores; none given:
    left to detection. GPUs: the ids in ``CUDA_VISIBLE_DEVICES`` when Slurm
    gave the job GPUs (``SLURM_STEP_GPUS``/``SLURM_JOB_GPUS``), else none.
    The name is ``slurm-JOBID-NODE`` (``-RANK`` added per task).

    Returns:
        ``{"name", "cores", "memory", "gpus"}``; ``memory`` may be None.

    Raises:
        ValueError: the environment is not a Slurm job step's (no ``SLURM_JOB_ID``).
    """
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job:
        raise ValueError("--slurm needs a Slurm job step's environment (run it with srun): "
                         "SLURM_JOB_ID is not set")
    node = env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    if per == "task":
        cores = int(env.get("SLURM_CPUS_PER_TASK") or 1)
        name = f"slurm-{job}-{node}-{env.get('SLURM_PROCID', '0')}"
    else:
        cores = int(env.get("SLURM_CPUS_ON_NODE") or _first_count(
            env.get("SLURM_JOB_CPUS_PER_NODE")) or 1)
        name = f"slurm-{job}-{node}"
    memory = _mb(env.get("SLURM_MEM_PER_NODE"))
    if memory is not None and per == "task":
        tasks_here = int(env.get("SLURM_NTASKS_PER_NODE") or _first_count(
            env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")) or 1)
        memory //= max(tasks_here, 1)
    if memory is None:
        per_cpu = _mb(env.get("SLURM_MEM_PER_CPU"))
        memory = None if per_cpu is None else per_cpu * cores
    gpus: int | list[str] = 0
    if env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS"):
        ids = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        gpus = ids or [g for g in (env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS")
                                   or "").split(",") if g]
    return {"name": name, "cores": cores, "memory": memory, "gpus": gpus,
            "end_time": job_end_time(job)}


def job_end_time(job: str) -> float | None:
    """When Slurm will end job ``job`` (seconds since the epoch), or None if unknown.

    From ``squeue -o %e`` (local time); a job without a time limit, or a
    ``squeue`` that fails, gives None: the worker then declares no end.
    """
    try:
        out = subprocess.run([_command("squeue"), "-h", "-j", job, "-o", "%e"],
                             capture_output=True, text=True, timeout=10)
        text = out.stdout.strip()
        return datetime.datetime.fromisoformat(text).timestamp() if out.returncode == 0 \
            and text[:1].isdigit() else None
    except (OSError, ValueError, subprocess.TimeoutExpired, AllocationError):
        return None


def _worker_command(python: str, address: str, per: str, args: Sequence[str]) -> list[str]:
    return [python, "-m", "async_wf.worker", "--connect", address, "--slurm", per, *args]


class SlurmJob(Allocator):
    """The workers of the Slurm allocation this program runs in (``Runtime(cluster="slurm")``).

    Starts one worker per allocated node (``per="node"``, each with the
    node's CPUs) or per task (``per="task"``: ``SLURM_NTASKS`` workers of
    ``SLURM_CPUS_PER_TASK`` cores) in one ``srun`` step, and ends that step
    at close.

    Args:
        per: ``"node"`` or ``"task"``.
        python: the interpreter the nodes run (default: this one's path,
            which a shared file system makes the same there).
        srun_args: further ``srun`` options (e.g. ``["--mpi=none"]``).

    Raises:
        AllocationError: not inside a Slurm allocation (no ``SLURM_JOB_ID``).
        ValueError: ``per`` is neither ``"node"`` nor ``"task"``.
    """

    def __init__(self, per: Literal["node", "task"] = "node", *, python: str | None = None,
                 srun_args: Sequence[str] = ()) -> None:
        if per not in ("node", "task"):
            raise ValueError(f"per must be 'node' or 'task', got {per!r}")
        self.job_id = os.environ.get("SLURM_JOB_ID")
        if not self.job_id:
            raise AllocationError("cluster='slurm' runs inside a Slurm allocation (a job "
                                  "script run by sbatch, or salloc): SLURM_JOB_ID is not set")
        self.per = per
        self.python = python or sys.executable
        self.srun_args = list(srun_args)
        self.nodes = hostnames(os.environ.get("SLURM_JOB_NODELIST", ""))
        self._proc: asyncio.subprocess.Process | None = None
        self._workers: list[str] = []
        self._warned = False
        self._all_joined = False

    def initial_workers(self) -> int:
        """One per node (``SLURM_JOB_NUM_NODES``), or per task (``SLURM_NTASKS``)."""
        env = os.environ
        if self.per == "node":
            return int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        return int(env.get("SLURM_NTASKS") or 1)

    def listen_host(self) -> str:
        """Loopback when the job's nodes are this machine, else this machine's route to them."""
        return route_host(self.nodes)

    def srun_command(self, address: str, args: Sequence[str]) -> list[str]:
        """The ``srun`` command line that starts the workers (no secret in it)."""
        env = os.environ
        n = self.initial_workers()
        if self.per == "node":
            # the smallest node's CPUs: one srun shape must fit every node
            counts = re.findall(r"(\d+)(?:\(x\d+\))?", env.get("SLURM_JOB_CPUS_PER_NODE", ""))
            cpus = min((int(c) for c in counts), default=1)
            shape = [f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
                     f"--cpus-per-task={cpus}"]
        else:
            shape = [f"--ntasks={n}", f"--cpus-per-task={env.get('SLURM_CPUS_PER_TASK') or 1}"]
        return [_command("srun"), "--kill-on-bad-exit=0", "--job-name=async-wf-workers",
                *shape, *self.srun_args, *_worker_command(self.python, address, self.per, args)]

    async def start(self, address: str, env: Mapping[str, str], args: Sequence[str]) -> None:
        """Start the ``srun`` step of the workers; they connect to ``address``."""
        cmd = self.srun_command(address, args)
        log.info("starting the workers of Slurm job %s: %s", self.job_id, " ".join(cmd))
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, env={**os.environ, **env}, stdin=subprocess.DEVNULL)

    async def tick(self, waiting: int, workers: Sequence[str]) -> None:
        """Note the workers; say once if the step ended while tasks wait.

        Raises:
            AllocationError: the step ended before all its workers joined.
        """
        self._workers = list(workers)
        proc = self._proc
        if len(workers) >= self.initial_workers():
            self._all_joined = True
        if proc is not None and proc.returncode is not None and not self._all_joined:
            raise AllocationError(f"the srun step of the workers of Slurm job {self.job_id} "
                                  f"ended (exit code {proc.returncode}) before its "
                                  f"{self.initial_workers()} worker(s) joined; see its output")
        if proc is not None and proc.returncode is not None and waiting and not self._warned:
            self._warned = True
            log.error("the srun step of the workers of Slurm job %s ended (exit code %d) "
                      "while %d task(s) wait", self.job_id, proc.returncode, waiting)

    def status(self) -> dict[str, Any]:
        """This job, its step's state and its workers."""
        proc = self._proc
        step = "not started" if proc is None else (
            "running" if proc.returncode is None else f"ended ({proc.returncode})")
        # running only while the step runs: an ended step brings no more workers
        return {"kind": "slurm-job", "pending": 0,
                "running": int(proc is not None and proc.returncode is None),
                "jobs": {self.job_id: {"state": "RUNNING", "step": step,
                                       "workers": list(self._workers)}}}

    async def close(self) -> None:
        """Let the step end (its workers were told to stop), else stop it."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5.0)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()  # srun passes it to the tasks and ends the step
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


@dataclass
class _Job:
    id: str
    state: str = "PENDING"
    reason: str = ""
    submitted: float = field(default_factory=time.monotonic)
    workers: list[str] = field(default_factory=list)
    ever_connected: bool = False


class SlurmAllocator(Allocator):
    """Submits worker jobs to Slurm while tasks wait (``Runtime(cluster=SlurmAllocator(...))``).

    Each job runs ``srun`` of one worker per node, which exits after
    ``idle_timeout`` seconds without a task, ending its job. While tasks
    wait beyond what the live jobs give (``nodes_per_job * cores`` task
    slots each), one more job is submitted per tick, up to ``max_jobs``
    queued or running. A job that ends (cancelled, failed, timed out) while
    tasks wait is replaced by the same rule. An ``sbatch`` refusal raises
    ``AllocationError`` once and nothing more is submitted; so does a run of
    jobs that end before any worker connects. ``close()`` cancels every job
    still queued or running.

    Args:
        partition: ``--partition`` (default: the cluster's default one).
        time: ``--time`` of each job (``"1:00:00"``).
        nodes_per_job: ``--nodes`` of each job.
        max_jobs: worker jobs queued or running at once.
        idle_timeout: seconds a worker waits without a task before it exits.
        cores: CPUs per node (``--cpus-per-task``); None: whole nodes
            (``--exclusive``).
        memory: ``--mem`` per node (e.g. ``"4G"``); None: the partition's default.
        gpus: ``--gpus-per-node``; None: none asked for.
        account, qos: ``--account``, ``--qos``.
        sbatch_args: further ``sbatch`` options.
        python: the interpreter on the nodes (default: this one's path).
        output: ``--output`` of the jobs (``%j``: the job id); default /dev/null.
        poll: seconds between two ``squeue`` calls.
        job_name: ``--job-name`` of the jobs.

    Raises:
        ValueError: an argument breaks its rule.
    """

    def __init__(
        self,
        partition: str | None = None,
        *,
        time: str = "1:00:00",
        nodes_per_job: int = 1,
        max_jobs: int = 4,
        idle_timeout: float = 300.0,
        cores: int | None = None,
        memory: str | None = None,
        gpus: int | None = None,
        account: str | None = None,
        qos: str | None = None,
        sbatch_args: Sequence[str] = (),
        python: str | None = None,
        output: str = "/dev/null",
        poll: float = 2.0,
        job_name: str = "async-wf-worker",
    ) -> None:
        for name, value, low in (("nodes_per_job", nodes_per_job, 1), ("max_jobs", max_jobs, 1),
                                 ("cores", cores, 1), ("gpus", gpus, 0)):
            if value is None and name in ("cores", "gpus"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name, fvalue in (("idle_timeout", idle_timeout), ("poll", poll)):
            if isinstance(fvalue, bool) or not isinstance(fvalue, int | float) or fvalue <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {fvalue!r}")
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", time):
            raise ValueError(f"time must be a Slurm time limit such as '1:00:00' or "
                             f"'2-00:00:00', got {time!r}")
        self.partition = partition
        self.time = time
        self.nodes_per_job = nodes_per_job
        self.max_jobs = max_jobs
        self.idle_timeout = float(idle_timeout)
        self.cores = cores
        self.memory = memory
        self.gpus = gpus
        self.account = account
        self.qos = qos
        self.sbatch_args = list(sbatch_args)
        self.python = python or sys.executable
        self.output = output
        self.poll = float(poll)
        self.job_name = job_name
        #: ``sbatch`` calls made, refused ones included
        self.n_sbatch = 0
        #: jobs that ended (not by the workers' own idle exit) while tasks waited
        self.n_replaced = 0
        self.jobs: dict[str, _Job] = {}
        self.ended: dict[str, str] = {}  # job id -> final state
        self._address: str | None = None
        self._env: dict[str, str] = {}
        self._args: list[str] = []
        self._next_poll = 0.0
        self._dead_in_a_row = 0
        self._closed = False
        self._submitting: asyncio.Future[None] | None = None

    def listen_host(self) -> str:
        """Loopback when the partition's nodes are this machine, else the route to them."""
        cmd = [_command("sinfo"), "-h", "-o", "%N"]
        if self.partition:
            cmd += ["-p", self.partition]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        nodes = hostnames(",".join(out.stdout.split())) if out.returncode == 0 else []
        return route_host(nodes)

    def script(self, address: str, args: Sequence[str]) -> str:
        """The batch script of a worker job (the token is not in it: it is in the environment)."""
        worker = _worker_command(self.python, address, "node",
                                 [*args, "--idle-timeout", f"{self.idle_timeout:g}",
                                  "--reconnect", "10"])
        srun = ["srun", "--kill-on-bad-exit=0", "--ntasks-per-node=1",
                f"--nodes={self.nodes_per_job}", f"--ntasks={self.nodes_per_job}"]
        if self.cores is not None:
            srun.append(f"--cpus-per-task={self.cores}")
        return "#!/bin/sh\n# an async_wf worker job: one worker per node\nexec " + \
            " ".join(_quote(a) for a in srun + worker) + "\n"

    def sbatch_command(self) -> list[str]:
        """The ``sbatch`` command line of one worker job (the script comes on stdin).

        It names ``sbatch`` as it is typed; submitting looks it up on PATH
        (and fails with ``AllocationError`` there), so the line can be shown
        or checked on a machine without Slurm.
        """
        cmd = ["sbatch", "--parsable", f"--job-name={self.job_name}",
               f"--time={self.time}", f"--nodes={self.nodes_per_job}",
               "--ntasks-per-node=1", f"--output={self.output}", "--export=ALL"]
        if self.partition:
            cmd.append(f"--partition={self.partition}")
        if self.cores is not None:
            cmd.append(f"--cpus-per-task={self.cores}")
        else:
            cmd.append("--exclusive")
        if self.memory is not None:
            cmd.append(f"--mem={self.memory}")
        if self.gpus is not None:
            cmd.append(f"--gpus-per-node={self.gpus}")
        if self.account:
            cmd.append(f"--account={self.account}")
        if self.qos:
            cmd.append(f"--qos={self.qos}")
        return cmd + self.sbatch_args

    async def start(self, address: str, env: Mapping[str, str], args: Sequence[str]) -> None:
        """Remember where workers connect; jobs are submitted by ``tick`` when tasks wait."""
        self._closed = False
        self._address = address
        self._env = dict(env)
        self._args = list(args)

    async def _run(self, cmd: list[str], stdin: str | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **self._env})
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(None if stdin is None else stdin.encode()), 60.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, "", f"{cmd[0]} did not answer within 60 s"
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    def _refuse(self, why: str) -> AllocationError:
        where = f"partition {self.partition!r}" if self.partition else "the default partition"
        self.error = AllocationError(f"Slurm refused worker jobs for {where}: {why}; "
                                     f"no more jobs are submitted")
        return self.error

    async def _submit(self) -> None:
        # shielded, and awaited by close(): a job that sbatch created must be
        # recorded (and so cancelled at close) even if the runtime closes meanwhile
        self._submitting = asyncio.ensure_future(self._sbatch())
        await asyncio.shield(self._submitting)

    async def _sbatch(self) -> None:
        assert self._address is not None
        self.n_sbatch += 1
        cmd = self.sbatch_command()
        cmd[0] = _command(cmd[0])
        code, out, err = await self._run(cmd,
                                         self.script(self._address, self._args))
        if code != 0:
            msg = " ".join(err.replace("sbatch: error: ", "").split()) \
                or f"exited with code {code}"
            raise self._refuse(f"sbatch: {msg}")
        job_id = out.strip().split(";")[0]
        self.jobs[job_id] = _Job(job_id)
        log.info("submitted Slurm worker job %s", job_id)

    async def _poll(self) -> None:
        if not self.jobs:
            return
        code, out, _ = await self._run([_command("squeue"), "-h", "-o", "%i|%T|%r",
                                        "-j", ",".join(self.jobs)])
        seen: dict[str, tuple[str, str]] = {}
        if code == 0:
            for line in out.splitlines():
                jid, _, rest = line.partition("|")
                state, _, reason = rest.partition("|")
                seen[jid.strip()] = (state.strip(), reason.strip())
        elif "Invalid job id" not in out:
            return  # squeue failed (the controller is busy): try again at the next poll
        for jid, job in list(self.jobs.items()):
            if jid in seen and seen[jid][0] in _LIVE:
                job.state, job.reason = seen[jid]
                continue
            final = seen[jid][0] if jid in seen else await self._final_state(jid)
            del self.jobs[jid]
            self.ended[jid] = final
            self._ended(job, final)

    async def _final_state(self, jid: str) -> str:
        code, out, _ = await self._run([_command("scontrol"), "show", "job", "-o", jid])
        m = re.search(r"JobState=(\S+)", out) if code == 0 else None
        return m.group(1) if m else "ENDED"

    def _ended(self, job: _Job, final: str) -> None:
        if final != "COMPLETED":
            self.n_replaced += 1
            log.warning("Slurm worker job %s ended: %s", job.id, final)
        else:
            log.info("Slurm worker job %s ended: %s", job.id, final)
        if job.ever_connected:
            self._dead_in_a_row = 0
        else:
            self._dead_in_a_row += 1
            if self._dead_in_a_row >= _MAX_DEAD_JOBS:
                raise self._refuse(f"{self._dead_in_a_row} worker jobs in a row ended "
                                   f"({final}) before a worker connected; see their output "
                                   f"(output=)")

    async def tick(self, waiting: int, workers: Sequence[str]) -> None:
        """Poll the jobs' states, attribute the workers, submit a job if tasks wait.

        Raises:
            AllocationError: ``sbatch`` refused (once: afterwards this does nothing).
        """
        if self.error is not None or self._closed or self._address is None:
            return
        for job in self.jobs.values():
            job.workers = []
        for name in workers:
            m = _NAME.match(name)
            mine = self.jobs.get(m.group(1)) if m else None
            if mine is not None:
                job = mine
                job.workers.append(name)
                job.ever_connected = True
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self.poll
            await self._poll()
        slots = self.nodes_per_job * (self.cores or 1)
        if waiting > len(self.jobs) * slots and len(self.jobs) < self.max_jobs:
            await self._submit()

    def status(self) -> dict[str, Any]:
        """Jobs pending and running with their workers; sbatch calls; jobs replaced."""
        jobs = {jid: {"state": j.state, "reason": j.reason, "workers": list(j.workers)}
                for jid, j in self.jobs.items()}
        return {
            "kind": "slurm",
            "pending": sum(j.state == "PENDING" for j in self.jobs.values()),
            "running": sum(j.state != "PENDING" for j in self.jobs.values()),
            "jobs": jobs,
            "ended": dict(self.ended),
            "sbatch_calls": self.n_sbatch,
            "replaced": self.n_replaced,
            "error": None if self.error is None else str(self.error),
        }

    async def close(self) -> None:
        """Cancel every job still queued or running (``scancel``), and wait until they leave."""
        self._closed = True
        if self._submitting is not None and not self._submitting.done():
            with contextlib.suppress(Exception):
                await self._submitting
        if not self.jobs:
            return
        ids = list(self.jobs)
        await self._run([_command("scancel"), *ids])
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            code, out, _ = await self._run([_command("squeue"), "-h", "-o", "%i", "-j",
                                            ",".join(ids)])
            if code != 0 or not out.split():
                break
            await asyncio.sleep(0.3)
        for jid in ids:
            self.ended.setdefault(jid, "CANCELLED")
        self.jobs.clear()


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
