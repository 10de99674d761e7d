"""Transports: where ready tasks run.

A transport receives batches of ready tasks from the scheduler, runs them,
and reports each attempt's outcome back through ``Scheduler.task_ok``,
``task_error`` or ``task_cancelled``. It says how many more tasks it can take
right now through ``capacity``, which is how the scheduler applies flow
control: tasks it cannot take stay in the core's ready queue, in priority
order, rather than in an unbounded queue of the transport's.
"""

from __future__ import annotations

import abc
import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from async_wf._futures import TaskFuture
    from async_wf._scheduler import Scheduler
    from async_wf.observe._events import Observer

__all__ = ["Transport"]


class Attempt:
    """What a transport keeps of a task's current attempt, in ``TaskFuture._att``.

    Each transport subclasses it with what it needs (where the attempt
    runs, its state); all of them have the attempt's timeout timer.
    """

    __slots__ = ("timer",)

    def __init__(self) -> None:
        self.timer: asyncio.TimerHandle | None = None

    def stop_timer(self) -> None:
        """Disarm the timeout of this attempt."""
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None


class Transport(abc.ABC):
    """Interface between the scheduler and whatever runs the tasks."""

    #: the runtime's observer (``async_wf.observe``), None when observability is off
    _obs: Observer | None = None

    def set_observer(self, obs: Observer) -> None:
        """Report task timings to ``obs`` (called before ``start``, only when one is on)."""
        self._obs = obs

    def link_bytes(self) -> list[tuple[int, str, int, int]]:
        """Per connected worker: (lane id, name, bytes sent to it, bytes received from it)."""
        return []

    @abc.abstractmethod
    async def start(self, sched: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
        """Get ready to run tasks for ``sched`` on ``loop``."""

    @abc.abstractmethod
    def capacity(self) -> int:
        """How many more tasks ``dispatch`` may be given now."""

    @abc.abstractmethod
    def dispatch(self, futs: list[TaskFuture[Any]]) -> None:
        """Start running these tasks (their arguments are already resolved)."""

    @abc.abstractmethod
    def cancel_running(self, fut: TaskFuture[Any], msg: Any) -> bool:
        """Try to stop a task that was dispatched; True if the request took.

        True means the work will stop and the transport will report that
        with ``task_cancelled`` (or has already done so). False means the
        work cannot be stopped: the scheduler then cancels the future at
        once, and any outcome reported for it later is ignored. With True,
        the transport has disarmed the attempt's timeout.
        """

    #: how many dependent tasks may follow a task to its worker before it
    #: finishes (RemoteTransport); 0: none, every dependent waits for the scheduler
    send_ahead = 0

    def cancel_ahead(self, fut: TaskFuture[Any]) -> None:
        """``fut``, still waiting for its input, is cancelled: drop it where it was sent ahead."""
        return  # only transports that send ahead have anything to drop

    def broken(self) -> BaseException | None:
        """Why this transport can run nothing any more (a failed thread initializer), or None.

        May be asked from another thread (the Executor's ``submit``).
        """
        return None

    def started(self, fut: TaskFuture[Any]) -> bool:
        """Whether the current attempt of a dispatched task has left the queue.

        May be asked from another thread (the Executor's ``cancel``): a stale
        answer only moves the moment from which cancelling refuses. Each
        transport keeps its per-attempt record in ``fut._att``; by default a
        task with one has started.
        """
        return fut._att is not None

    def check_options(self, fn: Any, mpi: int) -> None:
        """Refuse, at submit, an MPI task (``@task(mpi=k)``) this transport cannot run.

        Raises:
            ValueError: always, unless a transport that runs MPI tasks overrides it.
        """
        raise ValueError(
            f"task {getattr(fn, '__qualname__', fn)!r} has mpi={mpi}: a Python function on "
            f"several ranks needs the MPI transport (start with 'mpiexec -n N python -m "
            f"async_wf.mpi app.py'), not {type(self).__name__}; an MPI program "
            "(binary=...) runs with any transport"
        )

    def statistics(self) -> dict[str, Any]:
        """Transport-specific counters merged into ``Runtime.statistics()``."""
        return {}

    def hold_inputs(self, fut: TaskFuture[Any], refs: list[Any]) -> None:
        """``fut`` needs these held results (``async_wf._held.HeldRef``) until it is over.

        Only transports whose workers keep results get any.
        """
        return None

    def fetch_held(self, ref: Any) -> Any:
        """The value of a held result, fetched now, blocking.

        Raises:
            TypeError: this transport holds no results (it never makes a HeldRef).
        """
        raise TypeError(f"{type(self).__name__} keeps no results on workers")

    async def fetch_held_async(self, ref: Any) -> Any:
        """The value of a held result, fetched without blocking the loop.

        Raises:
            TypeError: this transport holds no results.
        """
        raise TypeError(f"{type(self).__name__} keeps no results on workers")

    def queued(self) -> int:
        """How many dispatched tasks have not started, as far as this process knows.

        The core counts a task as running from dispatch to its outcome; a
        transport that queues tasks (a thread pool's queue, tasks sent ahead
        to a worker beyond its slots) says here how many of those wait, so
        that the progress display and the metrics show what really runs.
        Read by the observer at each sample, not per task.
        """
        return 0

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything: threads, processes, connections."""
