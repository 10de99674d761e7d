"""External programs as tasks: ``@task(binary=..., args=[...], mpi=k)`` and ``run_program``.

The program runs as a child process of whatever process runs the task (the
scheduler's, a TCP worker, an MPI worker rank), and a task waiting for its
program costs no thread.

How it is started (measured in bench/README.md, "programs"): on Linux with
pidfds (>= 5.3), ``os.posix_spawn`` (glibc spawns with ``CLONE_VFORK``: no
copy of the parent's page tables, so the cost does not grow with the
worker's memory), stdin from /dev/null, stdout and stderr into pipes read
by loop readers, or to /dev/null with ``output=False``; the exit is seen on
a pidfd registered with the loop, and the child reaped there. No thread,
child watcher or SIGCHLD handler per child. asyncio's subprocess path
(uvloop's forks a full copy of the process, and its stock twin adds a
thread per child) is kept for what ``posix_spawn`` cannot do: ``cpus=``
(pinning before exec), ``cwd=``, and systems without pidfds.

At most ``ASYNC_WF_PROGRAMS_AT_ONCE`` programs run at once per event loop
(default: 4 per CPU this process may use, at least 8); more wait for a turn.
A worker is handed every program task it gets at once, and each running
child holds descriptors that every later child's exec must close, so
without a bound 4 000 ``true`` tasks on two workers cost seconds of
blocked loop per worker (it lost its heartbeats) and ran at 66/s in-process;
with it they run at the spawn rate, and a default descriptor limit of 1 024
is not reached.
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
import weakref
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


_JOB_ENV_BPREFIXES = tuple(os.fsencode(p) for p in _JOB_ENV_PREFIXES)


def _child_envb(extra: Mapping[str, str] | None) -> dict[bytes, bytes]:
    """``_child_env`` as bytes: from CPython's encoded copy of the environment when it has one
    (a quarter of the cost of decoding every variable, per program started)."""
    raw = getattr(os.environ, "_data", None)
    items = raw.items() if isinstance(raw, dict) else os.environb.items()
    env = {k: v for k, v in items if not k.startswith(_JOB_ENV_BPREFIXES)}
    if extra:
        env.update((os.fsencode(k), os.fsencode(v)) for k, v in extra.items())
    return env


# ----------------------------------------------------------------- the fast path
_CHUNK = 1 << 16
#: every signal back to its default in the child, as a fork+exec from a fresh
#: process would have them (Python ignores SIGPIPE and SIGXFSZ; a worker
#: started in the background may ignore SIGINT). glibc's own two
#: real-time signals are not settable; glibc-linked programs set them up.
_SIGDEF = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP} \
    if hasattr(signal, "valid_signals") else frozenset()
_fast: bool | None = None
_devnull_fd = -1
#: descriptors this module holds (all close-on-exec): the scan for inheritable
#: ones skips them without a system call
_ours: set[int] = set()
_at_once: int | None = None
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
    weakref.WeakKeyDictionary()


def programs_at_once() -> int:
    """How many programs one event loop runs at once (``ASYNC_WF_PROGRAMS_AT_ONCE``).

    Raises:
        ValueError: the variable is not an int >= 1.
    """
    global _at_once
    if _at_once is None:
        text = os.environ.get("ASYNC_WF_PROGRAMS_AT_ONCE", "").strip()
        if text:
            try:
                n = int(text)
            except ValueError:
                n = 0
            if n < 1:
                raise ValueError(f"ASYNC_WF_PROGRAMS_AT_ONCE must be an int >= 1, got {text!r}")
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else os.cpu_count() or 1
            n = max(8, 4 * cpus)
        _at_once = n
    return _at_once


def _gate(loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = asyncio.Semaphore(programs_at_once())
    return gate
#: the loop classes that took a pidfd reader (checked once per class)
_loop_ok: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _fast_path(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether programs can be started with posix_spawn and reaped with a pidfd on ``loop``."""
    global _fast
    if _fast is None:
        ok = sys.platform == "linux" and hasattr(os, "pidfd_open") \
            and hasattr(os, "posix_spawn") and os.environ.get("ASYNC_WF_PROGRAM_SPAWN") != "asyncio"
        if ok:
            try:  # a kernel < 5.3, or a seccomp filter, says no here
                os.close(os.pidfd_open(os.getpid()))
            except OSError:
                ok = False
        _fast = ok
    if not _fast:
        return False
    kind = type(loop)
    known = _loop_ok.get(kind)
    if known is None:
        fd = os.pidfd_open(os.getpid())
        try:
            loop.add_reader(fd, _nothing)
            loop.remove_reader(fd)
            known = True
        except (NotImplementedError, OSError, ValueError):  # a loop without readers
            known = False
        finally:
            os.close(fd)
        _loop_ok[kind] = known
    return known


def _nothing() -> None:
    """The callback of the probe reader (never called)."""


def _devnull() -> int:
    """One /dev/null descriptor for every child's stdin (and output, without ``output``)."""
    global _devnull_fd
    if _devnull_fd < 0:
        _devnull_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        _ours.add(_devnull_fd)
    return _devnull_fd


def _inheritable() -> list[int]:
    """The descriptors above 2 that a child would inherit (close_fds=True closes them).

    Python opens everything non-inheritable; these come from C libraries
    (an MPI library's process-manager socket) or an explicit set_inheritable.
    """
    out = []
    ours = _ours
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in ours:
            try:
                if os.get_inheritable(fd):
                    out.append(fd)
            except OSError:  # the listing's own, closed by now
                pass
    return out


class _Child:
    """A program started with posix_spawn, watched by loop readers: its pidfd and its pipes."""

    __slots__ = ("chunks", "code", "exited", "finished", "loop", "open", "pid", "pidfd")

    def __init__(self, loop: asyncio.AbstractEventLoop, pid: int, pidfd: int,
                 pipes: Sequence[int]) -> None:
        self.loop = loop
        self.pid = pid
        self.pidfd = pidfd
        self.code: int | None = None
        #: set when the child is reaped; ``finished`` also waits for its pipes' ends
        self.exited: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.chunks: list[list[bytes]] = [[] for _ in pipes]
        self.open = len(pipes)
        _ours.add(pidfd)
        _ours.update(pipes)
        loop.add_reader(pidfd, self._on_exit)
        for i, fd in enumerate(pipes):
            loop.add_reader(fd, self._on_pipe, fd, i)

    def _on_pipe(self, fd: int, i: int) -> None:
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.chunks[i].append(data)
            return
        self._close_pipe(fd)
        self._maybe_finished()

    def _close_pipe(self, fd: int) -> None:
        self.loop.remove_reader(fd)
        _ours.discard(fd)
        os.close(fd)
        self.open -= 1

    def _on_exit(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # reaped by someone else (a waitpid(-1) of another library): the code is lost
            pid, code = self.pid, 255
        else:
            code = os.waitstatus_to_exitcode(status) if pid else 0
        if not pid:
            return  # not yet: the reader fires again
        self.loop.remove_reader(self.pidfd)
        _ours.discard(self.pidfd)
        os.close(self.pidfd)
        self.code = code
        if not self.exited.done():
            self.exited.set_result(None)
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self.code is not None and not self.open and not self.finished.done():
            self.finished.set_result(None)

    def output(self, i: int) -> str:
        """What pipe ``i`` (0: stdout, 1: stderr) carried, decoded."""
        return b"".join(self.chunks[i]).decode(errors="replace") if self.chunks else ""

    def abandon_pipes(self, pipes: Sequence[int]) -> None:
        """Stop reading the pipes still open (a grandchild in a session of its own may hold
        them open for ever); the exit is still reaped by its reader."""
        for fd in pipes:
            # remove_reader says whether fd was still watched, so still ours to close
            if self.open and self.loop.remove_reader(fd):
                _ours.discard(fd)
                os.close(fd)
                self.open -= 1


def _spawn(loop: asyncio.AbstractEventLoop, cmd: list[str], env: dict[bytes, bytes],
           output: bool) -> tuple[_Child, list[int]]:
    """Start ``cmd`` in a session of its own; return the watched child and its pipes' ends."""
    name = cmd[0]
    spawn = os.posix_spawn
    if os.sep not in name:
        path = env.get(b"PATH")
        if path == os.environb.get(b"PATH"):
            spawn = os.posix_spawnp  # searches this process's PATH: the same
        else:
            found = shutil.which(name, path=os.fsdecode(path) if path is not None else None)
            if found is None:
                raise FileNotFoundError(2, "No such file or directory", name)
            name = found
    dn = _devnull()
    actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable()]
    actions.append((os.POSIX_SPAWN_DUP2, dn, 0))
    reads: list[int] = []
    writes: list[int] = []
    try:
        if output:
            for target in (1, 2):
                r, w = os.pipe2(os.O_CLOEXEC)
                reads.append(r)
                writes.append(w)
                os.set_blocking(r, False)  # the read end only: the child's end stays blocking
                actions.append((os.POSIX_SPAWN_DUP2, w, target))
        else:
            actions += [(os.POSIX_SPAWN_DUP2, dn, 1), (os.POSIX_SPAWN_DUP2, dn, 2)]
        pid = spawn(name, cmd, env, file_actions=actions, setsid=True, setsigdef=_SIGDEF,
                    setsigmask=())
    except BaseException:
        for fd in reads:
            os.close(fd)
        raise
    finally:
        for fd in writes:
            os.close(fd)
    pidfd = -1
    try:
        pidfd = os.pidfd_open(pid)
        return _Child(loop, pid, pidfd, reads), reads
    except BaseException:
        # out of descriptors, say: end the child here rather than leave it unreaped
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
        for fd in [*reads, pidfd] if pidfd >= 0 else reads:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(fd)
            _ours.discard(fd)
            os.close(fd)
        raise


async def _run_fast(loop: asyncio.AbstractEventLoop, cmd: list[str], env: dict[bytes, bytes],
                    output: bool) -> tuple[int, str, str]:
    child, pipes = _spawn(loop, cmd, env, output)
    try:
        await child.finished
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        try:
            with contextlib.suppress(Exception):
                await asyncio.shield(child.exited)
        finally:
            child.abandon_pipes(pipes)
        raise
    assert child.code is not None
    return child.code, child.output(0), child.output(1)


def _not_found(exc: FileNotFoundError, program: str | os.PathLike[str], cmd0: str,
               path: str | None) -> FileNotFoundError | None:
    """The error for a program that is not there, naming the PATH searched (None: re-raise)."""
    if exc.filename not in (None, cmd0) and os.path.sep in os.fspath(program):
        return None
    return FileNotFoundError(exc.errno, f"program {cmd0!r} not found (PATH={path or ''})", cmd0)


async def run_program(
    program: str | os.PathLike[str],
    args: Sequence[str | os.PathLike[str]] = (),
    *,
    nprocs: int | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cpus: Sequence[int] | None = None,
    output: bool = True,
) -> ProgramResult:
    """Run ``program args...`` (under ``mpiexec -n nprocs`` if given); capture its output.

    Usable directly as a task: ``rt.submit(run_program, "./solver", ["-n", "8"], nprocs=4)``.
    If the task is cancelled or times out, the program's process group is
    killed. ``cpus`` pins the program (and what it starts) to those CPUs.
    ``output=False`` sends stdout and stderr to /dev/null: the result's
    ``stdout`` and ``stderr`` are empty, and so is the stderr tail of a
    ``ProgramError``; for many short programs whose output nobody reads.

    Raises:
        ProgramError: the program exited with a non-zero code (``check=True``).
        FileNotFoundError: the program (or ``mpiexec``) does not exist.
        ValueError: ``nprocs`` is not an int >= 1.
        TypeError: ``output`` is not True or False.
    """
    cmd = [os.fspath(program), *(os.fspath(a) for a in args)]
    if nprocs is not None:
        if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
            raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
        cmd = [find_mpiexec(), "-n", str(nprocs), *cmd]
    if not isinstance(output, bool):
        raise TypeError(f"output must be True or False, got {output!r}")
    loop = asyncio.get_running_loop()
    async with _gate(loop):
        code, out, err = await _run(loop, program, cmd, cwd, env, cpus, output)
    result = ProgramResult(tuple(cmd), code, out, err)
    if check and code != 0:
        raise ProgramError(result)
    return result


async def _run(loop: asyncio.AbstractEventLoop, program: str | os.PathLike[str], cmd: list[str],
               cwd: str | os.PathLike[str] | None, env: Mapping[str, str] | None,
               cpus: Sequence[int] | None, output: bool) -> tuple[int, str, str]:
    """Start ``cmd`` on the fast path where it can, else asyncio's; wait for it."""
    if not cpus and cwd is None and _fast_path(loop):
        envb = _child_envb(env)
        try:
            code, out, err = await _run_fast(loop, cmd, envb, output)
        except FileNotFoundError as exc:
            path = envb.get(b"PATH")
            error = _not_found(exc, program, cmd[0], os.fsdecode(path) if path else None)
            if error is None:
                raise
            raise error from None
        return code, out, err
    return await _run_asyncio(program, cmd, cwd, _child_env(env), cpus, output)


async def _run_asyncio(program: str | os.PathLike[str], cmd: list[str],
                       cwd: str | os.PathLike[str] | None, child_env: dict[str, str],
                       cpus: Sequence[int] | None, output: bool) -> tuple[int, str, str]:
    """The portable path: asyncio's subprocess support (and pinning before exec)."""
    pinned = None
    if cpus:
        mask = [int(c) for c in cpus]

        def pinned() -> None:
            # in the child, before exec: every thread the program starts inherits it
            os.sched_setaffinity(0, mask)
    where = asyncio.subprocess.PIPE if output else asyncio.subprocess.DEVNULL
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=where, stderr=where, cwd=cwd,
            env=child_env,
            start_new_session=True,  # its own process group: a cancel kills mpiexec's ranks too
            preexec_fn=pinned,
        )
    except FileNotFoundError as exc:
        error = _not_found(exc, program, cmd[0], (child_env or os.environ).get("PATH", ""))
        if error is None:
            raise
        raise error from None
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
    return (code, out.decode(errors="replace") if out else "",
            err.decode(errors="replace") if err else "")


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
        self.output = opts.output
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
                "resourced": self.resourced, "pin": self.pin, "output": self.output}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.output = True  # pickled before output= existed
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
        return await run_program(self.binary, line, nprocs=self.nprocs, env=env, cpus=cpus,
                                 output=self.output)

    def __repr__(self) -> str:
        return f"<program task {self.binary!r} {list(self.args)!r} mpi={self.nprocs}>"


def _fields(template: str) -> list[str]:
    """The parameter names a format template refers to (``{cfg.path}`` -> ``cfg``)."""
    import re
    import string

    return [re.split(r"[.\[]", f, maxsplit=1)[0]
            for _, f, _, _ in string.Formatter().parse(template) if f]
