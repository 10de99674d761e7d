"""The ``task`` decorator and the context that knows the current runtime."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import weakref
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, Unpack, cast, overload

from async_wf._options import ASYNC, TaskOptionArgs, TaskOptions, kind_of

if TYPE_CHECKING:
    from async_wf._futures import TaskFuture
    from async_wf._scheduler import Scheduler

P = ParamSpec("P")
R = TypeVar("R")

#: the scheduler of the runtime entered in this context (None outside any)
current_scheduler: contextvars.ContextVar[Scheduler | None] = contextvars.ContextVar(
    "async_wf_current_scheduler", default=None
)

#: the open schedulers of each event loop: a notebook cell or a statement of
#: ``python -m asyncio`` runs in a task of its own, whose context does not
#: see what an earlier cell's ``await Runtime().start()`` set
_open: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Scheduler]] = \
    weakref.WeakKeyDictionary()


def opened(loop: asyncio.AbstractEventLoop, sched: Scheduler) -> None:
    """Note that ``sched`` runs on ``loop`` until ``closed`` is called."""
    _open.setdefault(loop, []).append(sched)


def closed(loop: asyncio.AbstractEventLoop, sched: Scheduler) -> None:
    """Undo ``opened``."""
    scheds = _open.get(loop)
    if scheds is not None and sched in scheds:
        scheds.remove(sched)
        if not scheds:
            del _open[loop]


def find_scheduler() -> Scheduler | None:
    """The scheduler a call here goes to: this context's, else the one open on this loop.

    Raises:
        RuntimeError: no runtime in this context and several open on this
            loop: which one is meant is not clear.
    """
    sched = current_scheduler.get()
    if sched is not None or not _open:
        return sched
    loop = asyncio._get_running_loop()
    if loop is None:
        return None  # a thread without a loop: a blocking task calls its helpers inline
    scheds = _open.get(loop)
    if not scheds:
        return None
    if len(scheds) > 1:
        raise RuntimeError(
            f"{len(scheds)} async_wf runtimes are open on this event loop and none is entered "
            "here: use rt.submit(...) to say which, or 'async with' one of them"
        )
    return scheds[0]


class TaskFunction(Generic[P, R]):
    """A function declared as a task with ``@async_wf.task(...)``.

    Calling it inside a running runtime submits it there and returns a
    ``TaskFuture``; calling it anywhere else runs the function as it is, so
    the same code can be run and tested serially.
    """

    __slots__ = ("__dict__", "__weakref__", "_fn", "_kind", "_opts")

    def __init__(self, fn: Callable[P, R], opts: TaskOptions) -> None:
        from async_wf._program import ProgramTask

        if not callable(fn):
            raise TypeError(f"task needs a callable, got {type(fn).__name__}: {fn!r}")
        if isinstance(fn, TaskFunction):
            fn = fn._fn
        if isinstance(fn, ProgramTask):
            fn = fn.fn
        functools.update_wrapper(self, fn)
        if opts.binary is not None:
            # the function only names the task and its parameters: the work is the program
            fn = cast("Callable[P, R]", ProgramTask(fn, opts))
        elif opts.mpi is not None and kind_of(fn, opts) == ASYNC:
            raise ValueError(
                f"an mpi=k task must be a plain function (its ranks block in MPI calls), "
                f"got the coroutine function {getattr(fn, '__qualname__', fn)!r}"
            )
        self._fn: Callable[P, R] = fn
        self._opts = opts
        self._kind = kind_of(fn, opts)

    @property
    def task_options(self) -> TaskOptions:
        """The options this task is submitted with."""
        return self._opts

    def options(self, **changes: Unpack[TaskOptionArgs]) -> TaskFunction[P, R]:
        """Return the same task with some options changed, e.g. ``f.options(retries=3)``.

        Raises:
            ValueError: an option value breaks its rule.
            TypeError: an option does not exist.
        """
        return TaskFunction(self._fn, self._opts.merged(**changes))

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskFuture[Any]:
        """Submit to the current runtime; unlike a call, fails outside a runtime.

        Raises:
            RuntimeError: no runtime is running in this context.
        """
        sched = find_scheduler()
        if sched is None:
            raise RuntimeError(
                "no async_wf runtime is running here; cannot submit "
                f"{getattr(self._fn, '__qualname__', self._fn)!r}"
            )
        return sched.submit(self, args, kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Submit inside a running runtime (returns a TaskFuture), else call the function."""
        sched = find_scheduler()
        if sched is None or not sched.accepting:
            return self._fn(*args, **kwargs)
        return sched.submit(self, args, kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskFunction, (self._fn, self._opts))

    def __repr__(self) -> str:
        return f"<async_wf task {getattr(self._fn, '__qualname__', self._fn)!r} {self._opts}>"


class Submitter:
    """Submits calls with options of their own: ``rt.options(priority=10).submit(fn, x)``.

    The options apply to each call submitted through it, on top of a
    ``@task``'s own (a plain function starts from the defaults), so an
    urgent or fragile call needs no wrapper. Made by ``Runtime.options``
    and ``async_wf.options``; the options are checked when it is made.
    """

    __slots__ = ("_changes", "_find", "_opts")

    def __init__(self, changes: dict[str, Any],
                 find: Callable[[], Scheduler | None]) -> None:
        # checked now, against the defaults: a bad option fails at the call
        # that names it, not at the first submit
        self._opts = TaskOptions.from_args(changes, "options")
        self._changes = changes
        self._find = find

    @overload
    def submit(
        self, fn: Callable[..., Coroutine[Any, Any, R]], /, *args: Any, **kwargs: Any
    ) -> TaskFuture[R]: ...

    @overload
    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> TaskFuture[R]: ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture[Any]:
        """Submit ``fn(*args, **kwargs)`` with these options; see ``Runtime.submit``.

        Raises:
            RuntimeError: no runtime is running here (``async_wf.options``).
            TypeError: ``fn`` is not callable.
        """
        sched = self._find()
        if sched is None:
            raise RuntimeError(
                "no async_wf runtime is running here; cannot submit "
                f"{getattr(fn, '__qualname__', fn)!r}"
            )
        if type(fn) is TaskFunction:
            tf: TaskFunction[..., Any] = TaskFunction(fn._fn, fn._opts.merged(**self._changes))
        else:
            tf = TaskFunction(fn, self._opts)
        return sched.submit(tf, args, kwargs)

    def __repr__(self) -> str:
        return f"<async_wf options {self._changes}>"


@overload
def task(
    fn: None = None, /, **options: Unpack[TaskOptionArgs]
) -> Callable[[Callable[P, R]], TaskFunction[P, R]]: ...


@overload
def task(fn: Callable[P, R], /, **options: Unpack[TaskOptionArgs]) -> TaskFunction[P, R]: ...


def task(
    fn: Callable[P, R] | None = None, /, **options: Unpack[TaskOptionArgs]
) -> TaskFunction[P, R] | Callable[[Callable[P, R]], TaskFunction[P, R]]:
    """Declare a function as a task, with options.

    Use as ``@task``, ``@task(retries=2)``, or ``task(fn, retries=2)`` to
    wrap an existing function without decorating it.

    Args:
        fn: the function (plain or ``async def``).
        name: the task's name in errors and statistics (default: qualified name).
        retries: how many times to re-run the task after it raises (>= 0).
        timeout: seconds one attempt may take; running longer is a failure
            (``TaskTimeoutError``). An ``async def`` task is cancelled; a
            blocking function cannot be stopped, so it runs on in its thread
            and its result is discarded.
        on_failure: what a failure (after retries) does to the rest:
            ``"fail"`` (default; dependents fail with ``DependencyError``),
            ``"cancel_successors"`` (dependents are cancelled), ``"ignore"``
            (dependents run and receive ``default``), ``"abort"`` (the runtime
            stops and every pending future fails with ``WorkflowAborted``).
        default: the value dependents receive with ``on_failure="ignore"``.
        priority: higher-priority ready tasks are dispatched first
            (signed 32-bit; ties go in order of readiness).
        inline: run a plain function directly on the event loop instead of a
            thread: for tiny functions, where a thread costs more than the work.
        mpi: run on this many MPI ranks at once. A Python function then runs
            on ``mpi`` worker ranks of the MPI transport, each calling it with
            a sub-communicator of those ranks (as ``comm=`` if the function
            has such a parameter; always as ``async_wf.mpi.task_comm()``);
            the task's value is that of the function on the first of them.
            With ``binary``, the program is started with ``mpiexec -n mpi``
            instead, on any transport.
        mpi_gather: with ``mpi``: the value is the list of every rank's value.
        binary: run this program as the task (see ``args``); the task's value
            is an ``async_wf.ProgramResult``; a non-zero exit code fails it
            with ``ProgramError``. The function's body is not run: it names
            the task and its parameters fill ``args``.
        args: the program's command line; ``{name}`` is replaced by the
            argument ``name`` the task is called with.
        output: with ``binary``: keep the program's stdout and stderr in its
            ``ProgramResult`` (default). False sends them to /dev/null, for
            many short programs whose output nobody reads: it costs no pipes,
            and the result (and a ``ProgramError``) carries no output.
        checkpoint: with ``Runtime(checkpoint=...)``: record this task's
            results in the log (default). False for results too large to
            store or cheaper to recompute; the task still gets a key, so its
            dependents are recorded.
        version: part of the task's key: change it to invalidate the
            recorded results by hand (say, after changing a library the
            function calls, which the key does not see).
        key: a function called with the task's arguments whose return value
            stands for them in the key: for arguments without a stable
            hash. Futures in its return value count by their tasks' keys.
        cores: CPU cores the task needs (an int >= 1): it starts only on a
            worker with that many free, and a program task gets
            ``OMP_NUM_THREADS`` (and its family) set to it.
        memory: memory the task needs, bytes or a size such as ``"16GiB"``
            (accounted, not enforced).
        gpus: GPUs the task needs; it gets that many device ids of its
            worker (``task_context().gpus``; ``CUDA_VISIBLE_DEVICES`` for a
            program task).
        resources: named amounts the task needs, e.g. ``{"licence": 1}``;
            workers declare theirs with ``--resources licence=2``.
        pin: with ``cores``: pin the task's thread (or program) to the
            CPUs it was given.
        time: the seconds one attempt is expected to take: a worker that
            will be gone before then (its batch job ends: ``--end-time``,
            or ``--slurm``) does not get it, so no work is cut off by a
            job's time limit.

    A task that asks for more than any worker has fails with
    ``ResourceError`` when it is submitted to run.

    Raises:
        ValueError: an option breaks its rule (the message names the value).
    """
    opts = TaskOptions.from_args(options, "task")
    if fn is None:
        return lambda f: TaskFunction(f, opts)
    return TaskFunction(fn, opts)
