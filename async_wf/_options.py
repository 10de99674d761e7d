"""Per-task options, validated once when a task function is declared."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import FunctionType
from typing import Any, TypedDict

from async_wf._resources import Request

ON_FAILURE = ("fail", "cancel_successors", "ignore", "abort")
_PRIO_LIMIT = 1 << 31

# task kinds: how a transport must run the function (a number, as it travels
# in TASKS frames and indexes the transports' per-kind tables)
ASYNC = 0  # async def: a coroutine on an event loop
THREAD = 1  # blocking function: a thread (or a worker's slot)
INLINE = 2  # small function run directly on the scheduler's loop

_CO_COROUTINE = inspect.CO_COROUTINE


class TaskOptionArgs(TypedDict, total=False):
    """The keyword options of ``@task`` and ``TaskFunction.options``, with their types.

    This is the one list of task options that callers see: ``task`` and
    ``options`` take ``**options: Unpack[TaskOptionArgs]``, so mypy checks
    each option's name and type, and ``TaskOptions`` stores each under the
    same name (its fields add the defaults and the rules). Adding an option
    means a key here, a field there (a test keeps the two alike) and its
    rule in ``TaskOptions.__post_init__``; its meaning goes in ``task``'s
    docstring.
    """

    name: str | None
    retries: int
    timeout: float | None
    on_failure: str
    default: Any
    priority: int
    inline: bool
    mpi: int | None
    mpi_gather: bool
    binary: str | None
    args: Sequence[str] | None
    output: bool
    checkpoint: bool
    version: str | None
    key: Callable[..., Any] | None
    cores: int | None
    memory: int | str | None
    gpus: int | None
    resources: Mapping[str, float] | None
    pin: bool
    time: float | None


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Options of a task; see ``async_wf.task`` for their meaning.

    Built from ``TaskOptionArgs`` by field name (``from_args``, ``merged``).
    """

    name: str | None = None
    retries: int = 0
    timeout: float | None = None
    on_failure: str = "fail"
    default: Any = None
    priority: int = 0
    inline: bool = False
    mpi: int | None = None
    mpi_gather: bool = False
    binary: str | None = None
    args: tuple[str, ...] | None = None
    output: bool = True
    checkpoint: bool = True
    version: str | None = None
    key: Callable[..., Any] | None = None
    cores: int | None = None
    memory: int | str | None = None
    gpus: int | None = None
    resources: Mapping[str, float] | None = None
    pin: bool = False
    time: float | None = None
    _has_default: bool = field(default=False, repr=False)
    #: cores, memory, gpus and resources as one ``Request``; None when the
    #: task asks for nothing (the fast path: one slot, no accounting)
    request: Request | None = field(default=None, init=False, repr=False, compare=False)
    #: none of the options that change how a worker runs it or when it is
    #: given up (resources, a timeout, a priority, ``time=``, MPI, a program,
    #: inline): such tasks of one function travel as one column (see
    #: ``protocol.TASKS``)
    plain: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.timeout is not None:
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float):
                raise TypeError(f"timeout must be a number of seconds, got {self.timeout!r}")
            if not (self.timeout > 0 and math.isfinite(self.timeout)):
                raise ValueError(f"timeout must be > 0 seconds and finite, got {self.timeout!r}")
        if self.on_failure not in ON_FAILURE:
            raise ValueError(
                f"on_failure must be one of {', '.join(map(repr, ON_FAILURE))}, "
                f"got {self.on_failure!r}"
            )
        if (
            not isinstance(self.priority, int)
            or isinstance(self.priority, bool)
            or not -_PRIO_LIMIT <= self.priority < _PRIO_LIMIT
        ):
            raise ValueError(f"priority must be a signed 32-bit int, got {self.priority!r}")
        if self.inline and self.timeout is not None:
            raise ValueError(
                f"timeout={self.timeout!r} needs a task that can be interrupted; an inline "
                "task runs on the event loop and cannot be"
            )
        if self.mpi is not None and (
            isinstance(self.mpi, bool) or not isinstance(self.mpi, int) or self.mpi < 1
        ):
            raise ValueError(f"mpi must be an int >= 1 (ranks), got {self.mpi!r}")
        if self.mpi_gather and (self.mpi is None or self.binary is not None):
            raise ValueError("mpi_gather=True applies to a Python function with mpi=k")
        if self.binary is not None:
            if not isinstance(self.binary, str | os.PathLike) or not os.fspath(self.binary):
                raise ValueError(f"binary must be a program path or name, got {self.binary!r}")
            if self.inline:
                raise ValueError("a binary= task runs a process; it cannot be inline")
        if not isinstance(self.output, bool):
            raise TypeError(f"output must be True or False, got {self.output!r}")
        if not self.output and self.binary is None:
            raise ValueError("output=False throws away a program's output; it applies to a "
                             "binary= task")
        if self.args is not None:
            if self.binary is None:
                raise ValueError("args= are the command line of a binary= task; give binary=")
            args: Any = self.args
            if isinstance(args, str) or not all(isinstance(a, str | os.PathLike) for a in args):
                raise TypeError(f"args must be a list of strings, got {self.args!r}")
            object.__setattr__(self, "args", tuple(os.fspath(a) for a in self.args))
        if self.mpi is not None and self.binary is None and self.inline:
            raise ValueError("an mpi=k task runs on worker ranks; it cannot be inline")
        if not isinstance(self.checkpoint, bool):
            raise TypeError(f"checkpoint must be True or False, got {self.checkpoint!r}")
        if self.version is not None and not isinstance(self.version, str):
            raise TypeError(f"version must be a str, got {type(self.version).__name__}: "
                            f"{self.version!r}")
        if self.key is not None and not callable(self.key):
            raise TypeError(f"key must be a function of the task's arguments, got {self.key!r}")
        self._check_request()
        object.__setattr__(self, "plain", (
            self.request is None and self.timeout is None and self.priority == 0
            and self.time is None and self.mpi is None and self.binary is None
            and not self.inline))
        if self._has_default and self.on_failure != "ignore":
            raise ValueError(
                "default= only applies with on_failure='ignore', "
                f"got on_failure={self.on_failure!r}"
            )

    def _check_request(self) -> None:
        req = Request.of(self.cores, self.memory, self.gpus, self.resources)
        object.__setattr__(self, "request", req)
        if self.resources is not None:
            object.__setattr__(self, "resources", dict(self.resources))
        if self.time is not None and (
                isinstance(self.time, bool) or not isinstance(self.time, int | float)
                or not (self.time > 0 and math.isfinite(self.time))):
            raise ValueError(f"time must be the seconds one attempt is expected to take, > 0 "
                             f"and finite, got {self.time!r}")
        if not isinstance(self.pin, bool):
            raise TypeError(f"pin must be True or False, got {self.pin!r}")
        if self.pin and not self.cores:
            raise ValueError("pin=True pins a task to the cores it asks for: give cores=k")
        if req is None:
            return
        if self.inline:
            raise ValueError(
                f"a task that asks for resources ({req.describe()}) runs where they are "
                "free, in a thread of its own; it cannot be inline"
            )
        if self.mpi is not None and self.binary is None:
            raise ValueError(
                f"an mpi=k task holds whole worker ranks; it cannot ask for resources "
                f"({req.describe()})"
            )

    @classmethod
    def from_args(cls, options: Mapping[str, Any], caller: str) -> TaskOptions:
        """Return the options ``options`` (keyword options given to ``caller``), validated.

        Raises:
            TypeError: a key is not an option; the message is Python's own for
                an unknown keyword argument of ``caller``.
            ValueError: an option value breaks its rule.
        """
        for k in options:
            if k not in _OPTION_NAMES:
                raise TypeError(f"{caller}() got an unexpected keyword argument {k!r}")
        changes = dict(options)
        args = changes.get("args")
        if args is not None:
            changes["args"] = tuple(args)
        return DEFAULT_OPTIONS.merged(**changes)

    def merged(self, **changes: Any) -> TaskOptions:
        """Return a copy with ``changes`` applied and validated."""
        if "default" in changes:
            changes["_has_default"] = True
        return replace(self, **changes)


DEFAULT_OPTIONS = TaskOptions()
_OPTION_NAMES = frozenset(TaskOptionArgs.__annotations__)


def kind_of(fn: Callable[..., Any], opts: TaskOptions) -> int:
    """Return how ``fn`` must run with ``opts``: ASYNC, THREAD or INLINE."""
    if type(fn) is FunctionType:
        is_async = bool(fn.__code__.co_flags & _CO_COROUTINE)
    else:
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with async __call__
        )
    if is_async:
        return ASYNC
    return INLINE if opts.inline else THREAD
