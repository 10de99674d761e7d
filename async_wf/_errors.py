"""Exception types of async_wf.

A task's own exception reaches the awaiting caller as itself (same type,
same traceback) with a note naming the task; the types here describe what
the runtime adds on top: a task that could not run because an input failed,
a task that ran out of time, a runtime that was aborted or closed.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor


class DependencyError(Exception):
    """A task did not run because a task it depends on failed.

    ``__cause__`` is the exception of the failed upstream task.

    Attributes:
        task: name of the task that did not run.
        upstream: name of the failed task it (transitively) depends on.
    """

    def __init__(self, task: str, upstream: str) -> None:
        super().__init__(f"task {task!r} did not run: upstream task {upstream!r} failed")
        self.task = task
        self.upstream = upstream

    def __reduce__(self) -> tuple[type[DependencyError], tuple[str, str]]:
        return (type(self), (self.task, self.upstream))


class TaskTimeoutError(TimeoutError):
    """A task ran longer than its ``timeout``; counts as a failure of that task."""

    def __init__(self, task: str, timeout: float) -> None:
        super().__init__(f"task {task!r} exceeded its timeout of {timeout:g} s")
        self.task = task
        self.timeout = timeout

    def __reduce__(self) -> tuple[type[TaskTimeoutError], tuple[str, float]]:
        return (type(self), (self.task, self.timeout))


class WorkflowAborted(BrokenExecutor):
    """The runtime stopped because a task with ``on_failure="abort"`` failed.

    Every future that was pending then fails with this error; ``__cause__``
    is the exception of the task that caused the abort.
    """


class RuntimeClosedError(RuntimeError):
    """The runtime is not running: not started yet, or already shut down."""


class RemoteError(Exception):
    """An exception from a worker that could not travel as itself.

    Its message gives the original type and text; the worker's traceback is
    in ``__cause__`` like for every remote exception.
    """


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\n(traceback on the worker)\n{self.tb}"


class NoWorkerError(RuntimeError):
    """No worker was connected for ``no_worker_timeout`` seconds while tasks waited."""


class WorkerLostError(RuntimeError):
    """A task was running on ``max_lost`` workers that were all lost."""


class ResourceError(ValueError):
    """A task asks for more cores, memory, GPUs or named resources than any worker has."""


def retyped(exc: BaseException, message: str,
            fallback: type[Exception]) -> Exception | SystemExit:
    """An exception of ``exc``'s type that says ``message``, or ``fallback(message)``.

    For errors the runtime reports on a value's behalf (an argument or a
    result that could not be pickled): the caller's ``except PicklingError``
    or ``except TypeError`` keeps working, as with ``concurrent.futures``.
    A type that cannot be built from one message (or is neither an
    ``Exception`` nor ``SystemExit``) gives ``fallback``.
    """
    kind = type(exc)
    # SystemExit too (concurrent.futures hands it over as it is); never
    # KeyboardInterrupt or GeneratorExit, which are the runtime's to see
    if issubclass(kind, Exception | SystemExit):
        try:
            made = kind(message)
        except Exception:
            pass
        else:
            if str(made) == message:
                return made
    return fallback(message)
