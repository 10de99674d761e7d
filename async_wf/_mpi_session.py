"""An MPI job's ranks as runtimes use them (``Session``), and the process's default one.

This module does not import mpi4py until a ``Session`` is made, so that the
runtime can ask whether it runs under ``python -m async_wf.mpi`` without
initialising MPI.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from async_wf import protocol as P

if TYPE_CHECKING:
    from async_wf.transport.mpi import MpiTransport

__all__ = ["Session", "current_session", "set_current_session"]

#: seconds a runtime waits for the worker ranks held by a runtime of another thread
ACQUIRE_WAIT = 30.0


class Session:
    """The ranks of an MPI job as runtimes use them: a root that schedules, workers that serve.

    Collective: every rank of ``comm`` must make it, with the same arguments.

    Args:
        comm: the communicator (default ``MPI.COMM_WORLD``).
        root: the rank that runs the application and the scheduler.
        slots: threads per worker rank for blocking tasks.

    Raises:
        ValueError: ``root`` is not a rank of ``comm``, or ``slots`` < 1.
        RuntimeError: MPI is not initialised with ``MPI_THREAD_MULTIPLE``.
    """

    def __init__(self, comm: Any = None, root: int = 0, slots: int = 1) -> None:
        from mpi4py import MPI

        from async_wf._mpi_channel import require_thread_multiple

        require_thread_multiple()
        comm = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(root, int) or not 0 <= root < comm.size:
            raise ValueError(f"root must be a rank of the communicator (0..{comm.size - 1}), "
                             f"got {root!r}")
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1, got {slots!r}")
        self.comm = comm
        self.root = root
        self.rank = comm.rank
        self.size = comm.size
        self.slots = slots
        # private communicators: our frames and task hand-shakes never match
        # the application's own messages on comm
        self.ctrl = comm.Dup()
        self.tasks = comm.Dup()
        self.workers = [r for r in range(comm.size) if r != root]
        self._user: MpiTransport | None = None
        self._user_thread = 0
        self._free = threading.Condition()

    @property
    def is_root(self) -> bool:
        """Whether this rank runs the application."""
        return bool(self.rank == self.root)

    def acquire(self, transport: MpiTransport) -> None:
        """Give the worker ranks to ``transport``.

        A runtime of another thread that holds them (an ``Executor``
        dropped or shut down without waiting, whose tasks are finishing) is
        waited for, up to ``ACQUIRE_WAIT`` seconds; one of this thread
        cannot finish while we wait, so it is an error at once.

        Raises:
            RuntimeError: not the root, or another runtime holds them.
        """
        if not self.is_root:
            raise RuntimeError(f"only the root rank ({self.root}) can run a runtime on this "
                               f"session; this is rank {self.rank}")
        if len(self.workers) == 0:
            raise RuntimeError("the MPI job has no worker rank: start it with mpiexec -n 2 "
                               "or more")
        me = threading.get_ident()
        with self._free:
            if self._user is not None and self._user_thread != me:
                self._free.wait_for(lambda: self._user is None, ACQUIRE_WAIT)
            if self._user is not None:
                waited = f" (waited {ACQUIRE_WAIT:g} s)" if self._user_thread != me else ""
                raise RuntimeError("the worker ranks are in use by another runtime of this "
                                   f"process{waited}; close it first")
            self._user = transport
            self._user_thread = me

    def release(self, transport: MpiTransport) -> None:
        """Take the worker ranks back from ``transport``."""
        with self._free:
            if self._user is transport:
                self._user = None
                self._free.notify_all()

    def exit_workers(self) -> None:
        """Tell every worker rank that the application is over (root only; blocking)."""
        from mpi4py import MPI

        from async_wf._mpi_channel import TAG_HEAD

        frame = b"".join(P.raw_frame(P.EXIT))
        reqs = [self.ctrl.Isend(frame, r, TAG_HEAD) for r in self.workers]
        MPI.Request.Waitall(reqs)


_session: Session | None = None


def current_session() -> Session | None:
    """The session this process's runtimes use by default (set by the launcher and ``run``)."""
    return _session


def set_current_session(session: Session | None) -> Session | None:
    """Make ``session`` the default of this process's runtimes; return the one before."""
    global _session
    previous, _session = _session, session
    return previous
