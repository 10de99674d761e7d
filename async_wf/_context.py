"""``task_context()``: what a running task can ask of its runtime (resumable steps).

A long task saves its state at the end of each step with ``ctx.save(state)``;
a retried or re-run task asks ``ctx.restore()`` for the last complete step and
continues from there. The states go to the runtime's checkpoint log under the
task's key. For a task on several MPI ranks each rank saves its own state, and
a step counts only once every rank has saved it.

Where the running task is found
    Whoever calls a task's function marks the call: a thread of a pool sets
    a thread-local, a coroutine task a context variable, each to
    ``[owner, token, None]``. ``task_context()`` asks the owner (the local
    transport, or the worker process) to make the context for that token,
    and keeps it in the third slot, so repeated calls share the step count.
    Marking costs one assignment per call; the context object is made only
    for tasks that ask.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import pickle
import threading
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["TaskContext", "task_context"]

_tls = threading.local()
_var: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "async_wf_task", default=None
)


class ContextOwner(Protocol):
    """Something that runs tasks and can make their contexts."""

    def task_context(self, token: Any) -> TaskContext:
        """The context of the task the call marked with ``token``."""
        ...


def mark_thread(owner: ContextOwner | None, token: Any) -> None:
    """Mark the calls this thread makes next as the task ``token`` of ``owner``."""
    _tls.cur = None if owner is None else [owner, token, None]


def mark_coroutine(owner: ContextOwner, token: Any) -> None:
    """Mark the current asyncio task as the task ``token`` of ``owner``."""
    _var.set([owner, token, None])


def start_coroutine(owner: ContextOwner, token: Any, coro: Any) -> Any:
    """Mark the current context as the task ``token`` of ``owner``; take ``coro``'s first step.

    What it yields is returned; StopIteration (with the value) if it ended.
    """
    _var.set([owner, token, None])
    return coro.send(None)


def run_firsts(q: Any, owner: ContextOwner, var: contextvars.ContextVar[Any],
               done: list[tuple[Any, Any]], queued: Any, started: Any,
               limit: int) -> tuple[int, Any, Any, Any] | None:
    """First steps of the coroutine tasks queued in ``q``, in order, while each ends there.

    The local transport's runner loop (the twin of the compiled
    ``async_wf._core.run_firsts``). Takes futures from the left of the deque
    ``q``; a future whose ``_att`` is ``queued`` (and without keyword
    arguments) is marked ``started``, and its coroutine ``_fn(*_args)`` is
    made and taken one step in a copy of the current context with ``var``
    set to ``[owner, fut, None]`` (``task_context()``'s mark). A coroutine
    that returns in that step without a ``_next`` goes to ``done`` as
    ``(fut, value)`` and the loop goes on.

    Returns None once ``limit`` tasks have started or ``q`` is empty; else,
    for the task that the caller must carry on with:

    - ``(0, fut, value, None)``: it returned ``value`` and has a ``_next``;
    - ``(1, fut, ctx, (coro, first))``: it waits for ``first``, in ``ctx``;
    - ``(2, fut, exc, None)``: making or stepping the coroutine raised ``exc``;
    - ``(3, fut, None, None)``: not such a task (taken from ``q``, not started).
    """
    n = 0
    popleft = q.popleft
    copy_context = contextvars.copy_context
    while n < limit and q:
        fut = popleft()
        if fut._att is not queued or fut._kwargs:
            return (3, fut, None, None)
        fut._att = started
        n += 1
        ctx = copy_context()
        try:
            coro, first = ctx.run(_first_step, owner, var, fut)
        except StopIteration as stop:
            if fut._next is not None:
                return (0, fut, stop.value, None)
            done.append((fut, stop.value))
            continue
        except BaseException as exc:
            return (2, fut, exc, None)
        return (1, fut, ctx, (coro, first))
    return None


def _first_step(owner: ContextOwner, var: contextvars.ContextVar[Any], fut: Any) -> Any:
    # in the task's own context: its mark, its coroutine, the first step
    var.set([owner, fut, None])
    coro = fut._fn(*fut._args)
    return coro, coro.send(None)


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on ``loop``'s thread, from any thread; its value or exception."""
    if asyncio._get_running_loop() is loop:
        return fn(*args)
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def call() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as exc:
            done.set_exception(exc)

    loop.call_soon_threadsafe(call)
    return done.result()


def dumps_state(state: Any) -> bytes:
    """Pickle a saved state now, so that later changes to it are not saved."""
    try:
        return pickle.dumps(state, protocol=5)
    except (pickle.PicklingError, AttributeError, TypeError):
        import cloudpickle  # classes and closures defined in __main__

        data: bytes = cloudpickle.dumps(state, protocol=5)
        return data


class TaskContext:
    """The running task's view of its runtime; get it with ``async_wf.task_context()``.

    Attributes:
        rank: this rank's index among the task's ranks (0 for a plain task).
        nranks: how many ranks run the task (1 for a plain task).
        step: the last step saved or restored by this rank (-1: none yet).
        gpus: the GPU ids this attempt was given (``@task(gpus=k)``), as
            ``CUDA_VISIBLE_DEVICES`` would list them; empty if it asked for none.
        cpus: the CPUs this attempt may pin to (``cores=k``), empty if unknown.
        resources: what this attempt asked for and holds, e.g.
            ``{"cores": 8, "gpus": 1}``; empty for a task that asked for nothing.
    """

    __slots__ = ("_fetch", "_restored", "_saver", "cpus", "gpus", "grant", "nranks", "rank",
                 "resources", "step")

    def __init__(
        self,
        rank: int,
        nranks: int,
        fetch: Callable[[], tuple[int, bytes] | None],
        saver: Callable[[int, bytes], None],
        grant: Any = None,
    ) -> None:
        self.rank = rank
        self.nranks = nranks
        #: the ``async_wf._resources.Grant`` of this attempt, or None
        self.grant: Any = None
        self.gpus: tuple[str, ...] = ()
        self.cpus: tuple[int, ...] = ()
        self.resources: dict[str, float] = {}
        self.step = -1
        self._fetch = fetch
        self._saver = saver
        self._restored = False
        if grant is not None:
            self.assign(grant)

    def assign(self, grant: Any) -> None:
        """Record the resources this attempt holds (an ``async_wf._resources.Grant``)."""
        self.grant = grant
        self.gpus = grant.gpu_ids
        self.cpus = grant.cpu_ids
        self.resources = dict(grant.request.amounts)

    def restore(self) -> tuple[int, Any] | None:
        """``(step, state)`` of this rank at the task's last complete step, or None.

        A step is complete when every rank of the task saved it (one rank for
        a plain task). None on a first run, or when the runtime has no
        checkpoint log, or when the saved state cannot be read (the task
        then starts over; the reason is logged).
        """
        got = self._fetch()
        if got is None:
            return None
        step, blob = got
        state = pickle.loads(blob)
        self.step = max(self.step, step)
        return step, state

    def save(self, state: Any, step: int | None = None) -> int:
        """Save this rank's ``state`` at ``step`` (default: the last step + 1); return the step.

        The state is pickled at once, so changing it afterwards does not
        change what was saved. Without a checkpoint log (or for a task
        declared ``checkpoint=False``) nothing is kept.

        Raises:
            ValueError: ``step`` is not an int above the last saved or restored step.
            Exception: what pickling ``state`` raises.
        """
        if step is None:
            step = self.step + 1
        elif isinstance(step, bool) or not isinstance(step, int) or step <= self.step:
            raise ValueError(
                f"step must be an int above the last step ({self.step}), got {step!r}"
            )
        self._saver(step, dumps_state(state))
        self.step = step
        return step

    def __repr__(self) -> str:
        return f"<TaskContext rank {self.rank} of {self.nranks}, step {self.step}>"


def task_context() -> TaskContext:
    """The context of the task that is running here: ``save`` and ``restore`` steps.

    ::

        @async_wf.task
        def simulate(n):
            ctx = async_wf.task_context()
            start, state = ctx.restore() or (-1, initial())
            for step in range(start + 1, n):
                state = advance(state)
                ctx.save(state, step)
            return state

    Raises:
        RuntimeError: not called from inside a running task.
    """
    cur = _var.get()
    if cur is None:
        cur = getattr(_tls, "cur", None)
    if cur is None:
        raise RuntimeError("task_context() is only available inside a running async_wf task")
    ctx = cur[2]
    if ctx is None:
        ctx = cur[2] = cur[0].task_context(cur[1])
    return ctx  # type: ignore[no-any-return]
