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
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from async_wf._held import HeldRef
from async_wf._options import TaskOptions

if TYPE_CHECKING:
    from async_wf._scheduler import Scheduler

_CONTAINERS = (list, tuple, dict, set, frozenset)
# what can hold no future: replace_in passes these by without a call
_LEAVES = frozenset((int, float, str, bytes, bool, type(None), complex))


_T = TypeVar("_T")
_future_result = asyncio.Future.result



def input_value(fut: TaskFuture[Any]) -> Any:
    """The value a dependent task receives for its finished input ``fut``.

    For a result held on a worker, that is where it is (even when the
    application fetched it: workers fetch their own); for an ignored
    failure, the task's ``default``.
    """
    if fut._ignored:
        return fut._opts.default
    held = fut._held
    if held is not None:
        return held
    return _future_result(fut)  # done: asyncio's own, not the waiting override

def flat_values(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``args`` with each finished input replaced by ``input_value``, when it is flat.

    Flat: every item is a plain ``TaskFuture`` or a scalar (the common
    call). None for anything else, which ``replace_in`` walks instead.
    """
    out = []
    for x in args:
        t = type(x)
        if t is TaskFuture:
            # input_value written out: asyncio's own _result of a done future
            out.append(x._result if not x._ignored and x._held is None else input_value(x))
        elif t in _LEAVES:
            out.append(x)
        else:
            return None
    return tuple(out)


def with_input(fut: TaskFuture[Any], dep: Any, value: Any) -> tuple[Any, Any]:
    """``fut``'s arguments and keywords with ``value`` for its input ``dep``, still unfinished
    here (a task sent ahead of it), and the values of its other, finished inputs."""

    args = fut._args
    if type(args) is tuple and not fut._kwargs:
        # flat arguments (the common call): no walk, no call per item
        out = []
        for x in args:
            t = type(x)
            if x is dep:
                out.append(value)
            elif t is TaskFuture:
                out.append(x._result if not x._ignored and x._held is None else input_value(x))
            elif t in _LEAVES:
                out.append(x)
            else:
                break
        else:
            return tuple(out), fut._kwargs

    def put(d: TaskFuture[Any]) -> Any:
        return value if d is dep else input_value(d)

    args = replace_in(fut._args, TaskFuture, put)
    kwargs = replace_in(fut._kwargs, TaskFuture, put) if fut._kwargs else fut._kwargs
    return args, kwargs


class TaskFuture(asyncio.Future[_T]):
    """The awaitable result of a submitted task.

    Returned at once by ``submit``; ``await`` gives the task's result or
    raises its exception. Passing it as an argument to another ``submit``
    makes that task depend on this one. Besides the ``asyncio.Future`` API it
    has ``name`` and ``id``.
    """

    __slots__ = (
        "_args",
        "_att",
        "_attempt",
        "_cancelling",
        "_ckey",
        "_cparents",
        "_fn",
        "_group",
        "_handle",
        "_held",
        "_id",
        "_ignored",
        "_kind",
        "_kwargs",
        "_lost",
        "_next",
        "_obs_t",
        "_opts",
        "_origin",
        "_refs",
        "_sched",
        "_subst",
        "_unrun",
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
    # the transport's record of the current attempt (where it runs, its
    # timeout timer), of the transport's own type; None while not dispatched
    _att: Any
    _ignored: bool
    # failed without running, with the DependencyError the scheduler made
    # (not one the task raised: that is the task's own error)
    _unrun: bool
    _lost: int  # workers lost while it ran on them (remote transports)
    # only with an observer: when the current attempt was dispatched, or
    # (start, end, lane) once the transport says when it ran
    _obs_t: float | tuple[float, float, int]
    _ckey: bytes | None
    _cparents: tuple[bytes, ...] | None  # keys of the inputs; None: not recorded
    # set only on failed futures linked by link_echo (their class is swapped
    # for a _Linked one); an ordinary future never has them
    _origin: TaskFuture[Any] | None
    _group: list[Any] | None
    # results that stayed on workers (async_wf._held): the references among
    # this task's inputs once they are substituted (None: none), and, for a
    # HeldFuture, where its own value is
    _refs: list[Any] | None
    _held: Any
    # a task submitted while this one was its only unfinished input: the
    # transport may send it ahead to this one's worker (send_ahead)
    _next: TaskFuture[Any] | None

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

    def _cancel_now(self, msg: Any = None) -> None:
        """Mark the future cancelled (scheduler use only)."""
        super().cancel(msg)

    def __repr__(self) -> str:
        state = "pending"
        if self.cancelled():
            state = "cancelled"
        elif self.done():
            # not exception(): looking must not count as retrieving it
            state = "failed" if self._exception is not None else "finished"
        return f"<TaskFuture #{self._id} {self.name!r} {state}>"

    def _repr_html_(self) -> str:
        """The repr, for Jupyter (escaped)."""
        import html

        return f"<code>{html.escape(repr(self))}</code>"

    def result(self) -> Any:
        """The task's result; in a thread other than the runtime's loop, wait for it.

        On the loop's thread a task that is not done raises
        ``InvalidStateError`` saying to ``await`` it (waiting there would
        block the loop that runs the task); in any other thread the call
        waits, as ``concurrent.futures.Future.result()`` does.

        Raises:
            asyncio.InvalidStateError: not done, on the loop's thread, or
                its loop is not running.
            asyncio.CancelledError: the task was cancelled.
            Exception: what the task raised.
        """
        # asyncio's own first: gather calls this for every future it waits for
        try:
            return _future_result(self)
        except asyncio.InvalidStateError:
            if self.done():
                raise  # what the task itself raised
        self._wait_outside_loop()
        return _future_result(self)

    def _wait_outside_loop(self) -> None:
        loop = self.get_loop()
        if asyncio._get_running_loop() is loop:
            raise asyncio.InvalidStateError(
                f"task {self.name!r} is not done yet: use 'await' on it (or a done "
                "callback); result() waits only when called from another thread"
            )
        if loop.is_closed() or not loop.is_running():
            raise asyncio.InvalidStateError(
                f"task {self.name!r} is not done and its runtime's loop is not running"
            )
        done = threading.Event()
        loop.call_soon_threadsafe(self.add_done_callback, lambda _f: done.set())
        done.wait()

    # A future used as if it were its value is the commonest slip of a new
    # user: say so, instead of Python's "unsupported operand type(s)".
    def _not_a_value(self, *_: Any) -> Any:
        raise TypeError(
            f"a TaskFuture ({self!r}) is not its task's result: did you forget 'await'? "
            "(value = await fut)"
        )

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _not_a_value
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = _not_a_value
    __mod__ = __rmod__ = __pow__ = __rpow__ = __matmul__ = __rmatmul__ = _not_a_value
    __neg__ = __pos__ = __abs__ = __getitem__ = __len__ = __bool__ = _not_a_value
    __lt__ = __le__ = __gt__ = __ge__ = __float__ = __int__ = __index__ = _not_a_value


class RecordedFuture(TaskFuture[_T]):
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


# A failure reported once
# ------------------------
# asyncio prints "exception was never retrieved" with the traceback when a
# failed future nobody looked at is freed. The dependents of a failed task
# fail with an error whose __cause__ is that failure (DependencyError,
# WorkflowAborted): whoever awaits one of them has seen it, and the upstream
# future, usually never awaited, must then not print it a second time at
# exit. A failure nobody saw is still printed, once, for the future that
# raised it (its echoes say nothing of their own).
#
# link_echo puts an echo in its origin's group: the echo keeps the origin
# alive, and the origin keeps a count of the members not yet freed and
# whether the user retrieved any of them (asyncio's own flag, read when a
# member is freed). The last member freed decides: normally the origin,
# which its echoes outlive; in a garbage cycle (a raised error's traceback
# holds the frame that holds the futures) the order is arbitrary, so an
# echo freed last reports for its origin, as asyncio would have. Only failed
# futures change class (for the __del__), so the others pay nothing.
# Neither the scheduler nor repr() calls exception() on a future: that
# would count as the user having retrieved it.


class _Linked:
    """Mixin for failed futures in a group made by ``link_echo`` (see above)."""

    __slots__ = ()

    def __del__(self) -> None:
        fut: Any = self
        origin = fut._origin if fut._origin is not None else fut
        group = origin._group  # [members not yet freed, retrieved by the user]
        if not fut._log_traceback:
            group[1] = True
        group[0] -= 1
        unseen_last = group[0] == 0 and not group[1]
        if fut is origin:
            if unseen_last:
                super().__del__()  # type: ignore[misc]  # asyncio's report
            return
        if unseen_last:
            context = {"message": f"{type(origin).__name__} exception was never retrieved",
                       "exception": origin._exception, "future": origin}
            if origin._source_traceback:
                context["source_traceback"] = origin._source_traceback
            origin.get_loop().call_exception_handler(context)


class _LinkedTask(_Linked, TaskFuture[_T]):
    __slots__ = ()


class _LinkedRecorded(_Linked, RecordedFuture[_T]):
    __slots__ = ()


# the message asyncio prints names the class: keep the public names
_LinkedTask.__name__ = _LinkedTask.__qualname__ = "TaskFuture"
_LinkedRecorded.__name__ = _LinkedRecorded.__qualname__ = "RecordedFuture"


class HeldFuture(TaskFuture[_T]):
    """A task whose value stayed on the worker that computed it (``async_wf._held``).

    Its class is swapped in when the worker reports the result as held;
    ``await`` and ``result()`` fetch the value from the worker the first
    time (``result()`` blocks for the transfer, as it must), and keep it.
    Dependents never fetch through here: they get the reference and fetch
    worker to worker.
    """

    __slots__ = ()

    def result(self) -> _T:
        """The task's value, fetched from its worker on first use (blocking)."""
        ref: Any = super().result()
        if type(ref) is not HeldRef:
            return ref  # type: ignore[no-any-return]
        got: Any = self._sched.fetch_held(self, ref)
        return got  # type: ignore[no-any-return]

    def __await__(self) -> Generator[Any, None, _T]:
        """Wait for the task, then fetch its value from its worker without blocking."""
        ref: Any = yield from super().__await__()
        if type(ref) is not HeldRef:
            return ref  # type: ignore[no-any-return]
        got: Any = yield from self._sched.fetch_held_async(self, ref).__await__()
        return got  # type: ignore[no-any-return]

    __iter__ = __await__


HeldFuture.__name__ = HeldFuture.__qualname__ = "TaskFuture"


def _linked(fut: TaskFuture[Any]) -> None:
    if not isinstance(fut, _Linked):
        fut._origin = None
        fut._group = [1, False]
        fut.__class__ = _LinkedRecorded if isinstance(fut, RecordedFuture) else _LinkedTask


def link_echo(failed: TaskFuture[Any], echo: TaskFuture[Any]) -> None:
    """``echo`` failed with an error caused by ``failed``'s: report the failure once.

    ``failed`` may itself be an echo (a task submitted after its input had
    failed without running): ``echo`` then joins the same origin. Call it
    once ``echo`` holds its error, and do not set its ``_log_traceback``
    (that flag tells whether the user retrieved it).
    """
    _linked(failed)
    origin = failed._origin if failed._origin is not None else failed
    echo._origin = origin
    echo._group = None
    echo.__class__ = _LinkedRecorded if isinstance(echo, RecordedFuture) else _LinkedTask
    group = origin._group
    assert group is not None
    group[0] += 1


def _fn_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        inner = getattr(fn, "func", None)  # functools.partial
        return _fn_name(inner) if inner is not None else type(fn).__name__
    return str(name)


#: nesting depth of arguments searched recursively; deeper (or cyclic)
#: structures are walked with an explicit stack, so that no argument can
#: exhaust the interpreter's recursion limit at submit
_MAX_DEPTH = 100


def _is_future(obj: Any, cls: type) -> bool:
    t = type(obj)
    return t is cls or (t not in _CONTAINERS and isinstance(obj, cls))


def _children(obj: Any) -> list[Any]:
    """The items of a container ``collect`` looks into (keys and values of a dict)."""
    if type(obj) is dict:
        return [x for kv in obj.items() for x in kv]
    if type(obj) in _CONTAINERS or isinstance(obj, tuple):
        return list(obj)
    return []


def _self_referencing(fut: Any) -> ValueError:
    return ValueError(
        f"a future inside a self-referencing container cannot be an argument: {fut!r} "
        "is reachable through a cycle of containers; pass it outside the cycle"
    )


def collect(obj: Any, cls: type, out: list[Any], _depth: int = 0) -> bool:
    """Append every instance of ``cls`` found in ``obj`` to ``out``.

    Returns:
        True if at least one was found.

    Raises:
        ValueError: a future sits inside a self-referencing container (it
            could not be replaced by its value).
    """
    t = type(obj)
    if t is cls or (t not in _CONTAINERS and isinstance(obj, cls)):
        out.append(obj)
        return True
    if _depth >= _MAX_DEPTH:
        return _collect_deep(obj, cls, out)
    if t is dict:
        found = False
        for k, v in obj.items():
            if collect(k, cls, out, _depth + 1):
                found = True
            if collect(v, cls, out, _depth + 1):
                found = True
        return found
    if t in _CONTAINERS or isinstance(obj, tuple):
        found = False
        for x in obj:
            if collect(x, cls, out, _depth + 1):
                found = True
        return found
    return False


def _collect_deep(obj: Any, cls: type, out: list[Any]) -> bool:
    """``collect`` for what lies below ``_MAX_DEPTH``: an explicit stack, cycle-safe."""
    seen: set[int] = set()
    stack = [obj]
    found: list[Any] = []
    cyclic = False
    while stack:
        o = stack.pop()
        if _is_future(o, cls):
            found.append(o)
            continue
        kids = _children(o)
        if not kids:
            continue
        if id(o) in seen:
            # seen twice: shared (harmless) or a cycle; only a cycle matters,
            # and only when a future is found too (checked below)
            cyclic = cyclic or _on_cycle(o)
            continue
        seen.add(id(o))
        stack.extend(kids)
    if found and cyclic:
        raise _self_referencing(found[0])
    out.extend(found)
    return bool(found)


def _on_cycle(start: Any) -> bool:
    """True when ``start`` can reach itself through containers."""
    seen: set[int] = set()
    stack = list(_children(start))
    while stack:
        o = stack.pop()
        if o is start:
            return True
        if id(o) in seen:
            continue
        seen.add(id(o))
        stack.extend(_children(o))
    return False


def replace_in(obj: Any, cls: type, fn: Callable[[Any], Any], _depth: int = 0) -> Any:
    """Return ``obj`` with every instance of ``cls`` inside replaced by ``fn(it)``.

    Containers holding a replaced item are rebuilt with their own type; the
    others, and everything that is not a container, are kept as they are.
    Call it only on arguments that ``collect`` found futures in.
    """
    t = type(obj)
    if t is cls or (t not in _CONTAINERS and isinstance(obj, cls)):
        return fn(obj)
    if _depth >= _MAX_DEPTH:
        return _replace_deep(obj, cls, fn)
    d = _depth + 1
    if t is tuple:
        # the common case, a call's flat arguments: no call per plain item
        items = [fn(x) if type(x) is cls
                 else x if type(x) in _LEAVES else replace_in(x, cls, fn, d) for x in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return tuple(items)
    if t is list:
        new = [replace_in(x, cls, fn, d) for x in obj]
        return obj if all(a is b for a, b in zip(new, obj, strict=True)) else new
    if t is dict:
        pairs = [(replace_in(k, cls, fn, d), replace_in(v, cls, fn, d)) for k, v in obj.items()]
        same = all(k2 is k and v2 is v for (k2, v2), (k, v) in zip(pairs, obj.items(),
                                                                   strict=True))
        return obj if same else dict(pairs)
    if t in _CONTAINERS or isinstance(obj, tuple):
        items = [replace_in(x, cls, fn, d) for x in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return _rebuild(obj, items)
    return obj


def _rebuild(obj: Any, items: list[Any]) -> Any:
    """A container of ``obj``'s type holding ``items``."""
    t = type(obj)
    if t is list:
        return items
    if t is dict:
        return dict(zip(items[::2], items[1::2], strict=True))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return t(*items)
    return t(items)


def _replace_deep(obj: Any, cls: type, fn: Callable[[Any], Any]) -> Any:
    """``replace_in`` below ``_MAX_DEPTH``: post-order with an explicit stack."""
    memo: dict[int, Any] = {}
    expanding: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    cyclic = replaced = False
    while stack:
        o, ready = stack.pop()
        oid = id(o)
        if oid in memo:
            continue
        if not ready:
            if oid in expanding:
                continue
            expanding.add(oid)
            stack.append((o, True))
            for c in _children(o):
                if _children(c) and id(c) not in memo:
                    if id(c) in expanding:
                        cyclic = True
                    else:
                        stack.append((c, False))
            continue
        expanding.discard(oid)
        kids = _children(o)
        new = []
        for c in kids:
            if _is_future(c, cls):
                new.append(fn(c))
                replaced = True
            else:
                new.append(memo.get(id(c), c))
        same = all(a is b for a, b in zip(new, kids, strict=True))
        memo[oid] = o if same else _rebuild(o, new)
    if cyclic and replaced:
        raise _self_referencing(obj)
    return memo.get(id(obj), obj) if _children(obj) else obj
