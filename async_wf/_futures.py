"""TaskFuture and the discovery of futures inside task arguments.

A ``TaskFuture`` is an ``asyncio.Future`` (so ``asyncio.wait``, ``gather``
and ``wait_for`` take it as it is) that also carries what the scheduler needs
to run its task: the function, the arguments and the options. Keeping it all
on one object saves an allocation per task; the fields are dropped once the
task is done so that a future kept by the user does not pin its inputs.

Futures are found in arguments at any depth inside list, tuple (named tuples
included), dict (keys and values), set and frozenset. Other objects are not
looked into: a future hidden in an attribute of a custom object is passed
as the future itself, not its value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from async_wf._options import TaskOptions

if TYPE_CHECKING:
    from async_wf._scheduler import Scheduler

_CONTAINERS = (list, tuple, dict, set, frozenset)


class TaskFuture(asyncio.Future[Any]):
    """The awaitable result of a submitted task.

    Returned at once by ``submit``; ``await`` gives the task's result or
    raises its exception. Passing it as an argument to another ``submit``
    makes that task depend on this one. Besides the ``asyncio.Future`` API it
    has ``name`` and ``id``.
    """

    __slots__ = (
        "_args",
        "_attempt",
        "_cancelling",
        "_ckey",
        "_cparents",
        "_fn",
        "_handle",
        "_id",
        "_ignored",
        "_kind",
        "_kwargs",
        "_lost",
        "_obs_t",
        "_opts",
        "_run",
        "_sched",
        "_subst",
        "_t0",
        "_timed_out",
        "_timer",
    )

    _sched: Scheduler
    _fn: Callable[..., Any] | None
    _args: tuple[Any, ...]
    _kwargs: dict[str, Any]
    _opts: TaskOptions
    _handle: int
    _id: int
    _kind: int
    _subst: bool
    _attempt: int
    _cancelling: bool
    _run: Any
    _timer: asyncio.TimerHandle | None
    _timed_out: bool
    _ignored: bool
    _lost: int
    _t0: float
    # only with an observer: when the current attempt was dispatched, or
    # (start, end, lane) once the transport says when it ran
    _obs_t: float | tuple[float, float, int]
    _ckey: bytes | None
    _cparents: tuple[bytes, ...] | None  # keys of the inputs; None: not recorded

    @property
    def name(self) -> str:
        """The task's name: ``name=`` if given, else the function's qualified name."""
        name = self._opts.name
        if name is not None:
            return name
        return _fn_name(self._fn) if self._fn is not None else f"task-{self._id}"

    @property
    def id(self) -> int:
        """The task's number in its runtime, in order of submission (from 1)."""
        return self._id

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the future, its task and, transitively, its successors.

        A task that has not started never runs. A running ``async def`` task
        gets ``CancelledError`` raised inside it. A blocking function already
        running cannot be interrupted: as with ``loop.run_in_executor``, the
        future is cancelled at once all the same (so whoever awaits it is
        not held up) and the call's result is dropped when it ends.

        Returns:
            True, unless the future was already done.
        """
        if self.done():
            return False
        return self._sched._cancel(self, msg)

    def _stop_timer(self) -> None:
        """Cancel the timeout timer of the current attempt, if any."""
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None

    def _cancel_now(self, msg: Any = None) -> None:
        """Mark the future cancelled (scheduler use only)."""
        super().cancel(msg)

    def __repr__(self) -> str:
        state = "pending"
        if self.cancelled():
            state = "cancelled"
        elif self.done():
            state = "failed" if self.exception() is not None else "finished"
        return f"<TaskFuture #{self._id} {self.name!r} {state}>"


class RecordedFuture(TaskFuture):
    """The future of a task whose result is in the checkpoint log.

    It is logically done from the moment of ``submit``, but its value is
    read from the log only when something looks at it: ``await``,
    ``result``, ``done``, a done callback (``gather``, ``wait``), or a
    dependent task that has to run. A chain of recorded tasks whose end
    alone is awaited reads one record. If the record turns out to be
    unusable (damaged since the log was opened, or a class it needs is
    gone), the task is run instead, as if it had never been recorded.
    """

    __slots__ = ("_unread",)

    _unread: bool

    def _read(self) -> None:
        if self._unread:
            self._unread = False
            self._sched._read_recorded(self)

    def done(self) -> bool:
        """True once the value is read (it is read now if it was not)."""
        self._read()
        return super().done()

    def result(self) -> Any:
        """The recorded value, read from the log on first use."""
        self._read()
        return super().result()

    def exception(self) -> BaseException | None:
        """None: a recorded task succeeded (unless it had to be rerun and failed)."""
        self._read()
        return super().exception()

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Any = None) -> None:
        """As ``asyncio.Future.add_done_callback``; reads the value first."""
        self._read()
        super().add_done_callback(fn, context=context)

    def __await__(self) -> Any:
        self._read()
        return super().__await__()

    __iter__ = __await__


def _fn_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        inner = getattr(fn, "func", None)  # functools.partial
        return _fn_name(inner) if inner is not None else type(fn).__name__
    return str(name)


def collect(obj: Any, cls: type, out: list[Any]) -> bool:
    """Append every instance of ``cls`` found in ``obj`` to ``out``.

    Returns:
        True if at least one was found.
    """
    t = type(obj)
    if t is cls or (t not in _CONTAINERS and isinstance(obj, cls)):
        out.append(obj)
        return True
    if t is dict:
        found = False
        for k, v in obj.items():
            if collect(k, cls, out):
                found = True
            if collect(v, cls, out):
                found = True
        return found
    if t in _CONTAINERS or isinstance(obj, tuple):
        found = False
        for x in obj:
            if collect(x, cls, out):
                found = True
        return found
    return False


def replace_in(obj: Any, cls: type, fn: Callable[[Any], Any]) -> Any:
    """Return ``obj`` with every instance of ``cls`` inside replaced by ``fn(it)``.

    Containers are rebuilt with their own type; everything else is kept as
    it is. Call it only on arguments that ``collect`` found futures in.
    """
    t = type(obj)
    if t is cls or (t not in _CONTAINERS and isinstance(obj, cls)):
        return fn(obj)
    if t is list:
        return [replace_in(x, cls, fn) for x in obj]
    if t is tuple:
        return tuple([replace_in(x, cls, fn) for x in obj])
    if t is dict:
        return {replace_in(k, cls, fn): replace_in(v, cls, fn) for k, v in obj.items()}
    if t is set or t is frozenset:
        return t(replace_in(x, cls, fn) for x in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return t(*[replace_in(x, cls, fn) for x in obj])
    if isinstance(obj, tuple):
        return t([replace_in(x, cls, fn) for x in obj])
    return obj
