"""External programs as tasks: ``@task(binary=..., args=[...], mpi=k)`` and ``run_program``.

The program runs as a child process of whatever process runs the task (the
scheduler's, a TCP worker, an MPI worker rank), started with asyncio's
subprocess support, so a task waiting for its program costs no thread.
With ``mpi=k`` it is started as ``mpiexec -n k program ...`` with the
``mpiexec`` of the ``mpich`` package installed beside Python (or
``ASYNC_WF_MPIEXEC``, or the first on ``PATH``).

A program started from inside an MPI job must not believe it belongs to that
job: MPICH's process manager passes the job's identity in ``PMI_*`` and
``HYDRA_*`` variables, and a child ``mpiexec`` that inherits them tries to
join the parent job. They are removed from the child's environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from async_wf._options import TaskOptions

__all__ = ["ProgramError", "ProgramResult", "ProgramTask", "find_mpiexec", "run_program"]

_JOB_ENV_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPIR_CVAR_CH4_", "OMPI_", "MPI_LOCALRANKID",
                     "MPI_LOCALNRANKS")
_TAIL = 2000


@dataclass(frozen=True)
class ProgramResult:
    """What a finished program left: its command, exit code and output."""

    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class ProgramError(Exception):
    """A program run as a task exited with a non-zero code (or was killed)."""

    def __init__(self, result: ProgramResult) -> None:
        self.result = result
        how = (f"was killed by signal {-result.returncode}" if result.returncode < 0
               else f"exited with code {result.returncode}")
        tail = result.stderr[-_TAIL:].strip()
        super().__init__(
            f"{' '.join(result.command)} {how}" + (f"; stderr ends with:\n{tail}" if tail else "")
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProgramError, (self.result,))


def find_mpiexec() -> str:
    """The ``mpiexec`` to start MPI programs with.

    Raises:
        FileNotFoundError: none is installed (``pip install mpich``).
    """
    env = os.environ.get("ASYNC_WF_MPIEXEC")
    if env:
        return env
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found:
        return found
    raise FileNotFoundError(
        "no mpiexec found beside Python or on PATH; install the mpich package "
        "(pip install mpich) or set ASYNC_WF_MPIEXEC"
    )


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_JOB_ENV_PREFIXES)}
    if extra:
        env.update(extra)
    return env


async def run_program(
    program: str | os.PathLike[str],
    args: Sequence[str | os.PathLike[str]] = (),
    *,
    nprocs: int | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cpus: Sequence[int] | None = None,
) -> ProgramResult:
    """Run ``program args...`` (under ``mpiexec -n nprocs`` if given); capture its output.

    Usable directly as a task: ``rt.submit(run_program, "./solver", ["-n", "8"], nprocs=4)``.
    If the task is cancelled or times out, the program's process group is
    killed. ``cpus`` pins the program (and what it starts) to those CPUs.

    Raises:
        ProgramError: the program exited with a non-zero code (``check=True``).
        FileNotFoundError: the program (or ``mpiexec``) does not exist.
        ValueError: ``nprocs`` is not an int >= 1.
    """
    cmd = [os.fspath(program), *(os.fspath(a) for a in args)]
    if nprocs is not None:
        if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
            raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
        cmd = [find_mpiexec(), "-n", str(nprocs), *cmd]
    child_env = _child_env(env)
    pinned = None
    if cpus:
        mask = [int(c) for c in cpus]

        def pinned() -> None:
            # in the child, before exec: every thread the program starts inherits it
            os.sched_setaffinity(0, mask)
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=cwd, env=child_env,
            start_new_session=True,  # its own process group: a cancel kills mpiexec's ranks too
            preexec_fn=pinned,
        )
    except FileNotFoundError as exc:
        if exc.filename not in (None, cmd[0]) and os.path.sep in os.fspath(program):
            raise
        where = (child_env or os.environ).get("PATH", "")
        raise FileNotFoundError(
            exc.errno, f"program {cmd[0]!r} not found (PATH={where})", cmd[0]
        ) from None
    try:
        out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    code = proc.returncode
    assert code is not None
    result = ProgramResult(tuple(cmd), code, out.decode(errors="replace"),
                           err.decode(errors="replace"))
    if check and code != 0:
        raise ProgramError(result)
    return result


class ProgramTask:
    """The work of a ``@task(binary=...)``: fill ``args`` from the call, run the program."""

    def __init__(self, fn: Callable[..., Any], opts: TaskOptions) -> None:
        self.fn = fn
        self.__qualname__ = getattr(fn, "__qualname__", type(fn).__qualname__)
        self.__module__ = getattr(fn, "__module__", __name__)
        self.binary = opts.binary
        self.args = opts.args or ()
        self.nprocs = opts.mpi
        self.resourced = opts.request is not None
        self.pin = opts.pin
        self._sig = inspect.signature(fn)
        names = set(self._sig.parameters)
        for a in self.args:
            for field in _fields(a):
                if field not in names:
                    raise ValueError(
                        f"args entry {a!r} names {{{field}}}, which is not a parameter of "
                        f"{getattr(fn, '__qualname__', fn)!r} (parameters: {sorted(names)})"
                    )

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "binary": self.binary, "args": self.args, "nprocs": self.nprocs,
                "resourced": self.resourced, "pin": self.pin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__qualname__ = getattr(self.fn, "__qualname__", type(self.fn).__qualname__)
        self._sig = inspect.signature(self.fn)

    async def __call__(self, *args: Any, **kwargs: Any) -> ProgramResult:
        """Run the program with the command line filled from this call's arguments."""
        bound = self._sig.bind(*args, **kwargs)
        bound.apply_defaults()
        values = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
                  for k, v in bound.arguments.items()}
        line = [a.format(**values) for a in self.args]
        assert self.binary is not None
        env = None
        cpus = None
        if self.resourced:
            # the devices and cores of this attempt, in the program's environment
            from async_wf._context import task_context
            from async_wf._resources import task_env

            grant = task_context().grant
            if grant is not None:
                env = task_env(grant, os.environ)
                cpus = grant.cpu_ids if self.pin else None
        return await run_program(self.binary, line, nprocs=self.nprocs, env=env, cpus=cpus)

    def __repr__(self) -> str:
        return f"<program task {self.binary!r} {list(self.args)!r} mpi={self.nprocs}>"


def _fields(template: str) -> list[str]:
    """The parameter names a format template refers to (``{cfg.path}`` -> ``cfg``)."""
    import re
    import string

    return [re.split(r"[.\[]", f, maxsplit=1)[0]
            for _, f, _, _ in string.Formatter().parse(template) if f]
