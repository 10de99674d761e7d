"""Run an application over the ranks of an MPI job.

    mpiexec -n 4 python -m async_wf.mpi app.py [args...]

Rank 0 runs ``app.py`` as ``__main__``; ``Runtime()`` there (or
``Runtime(transport="mpi")``) runs its tasks on ranks 1..3, which serve
until the application ends. Inside an existing mpi4py program, the same
from a communicator, like ``mpi4py.futures.MPICommExecutor``::

    value = async_wf.mpi.run(main, comm)   # main() on the root, workers elsewhere

MPI tasks: ``@task(mpi=k)`` runs a function on k worker ranks at once, each
with a communicator of those k ranks: ``comm=`` if the function has such a
parameter, and ``task_comm()`` always. That communicator is a ``TaskComm``,
a real ``mpi4py.MPI.Intracomm`` whose collectives and receives can be
aborted: each one first waits on a non-blocking barrier (or probe), polling
with backoff, and raises ``MpiTaskAborted`` if another rank of the task
failed meanwhile. Without that, a rank that raises would leave the others
blocked for ever in their next collective (MPICH has no way to revoke a
communicator), and the job would be lost. The price is one extra barrier
per collective; calls made from C libraries on the raw handle (PETSc, say)
are not covered. The ranks stay usable for the next task.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import inspect
import logging
import os
import runpy
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from mpi4py import MPI

from async_wf import protocol as P
from async_wf._errors import RemoteError
from async_wf._futures import collect
from async_wf._held import HeldRef, data_items, read_data
from async_wf._mpi_channel import MpiChannel, new_event_loop
from async_wf._mpi_session import Session, current_session, set_current_session
from async_wf._program import ProgramError, ProgramResult, run_program
from async_wf._resources import rank_resources
from async_wf._worker import Worker

if TYPE_CHECKING:
    pass

__all__ = [
    "MpiTaskAborted",
    "ProgramError",
    "ProgramResult",
    "Session",
    "TaskComm",
    "current_session",
    "held_keys",
    "main",
    "run",
    "run_program",
    "serve",
    "task_comm",
]

T = TypeVar("T")
log = logging.getLogger("async_wf")

_TAG_MOD = 1 << 20  # gang handshakes use tags 1 .. _TAG_MOD on the tasks communicator


class MpiTaskAborted(Exception):
    """Raised in a rank of an MPI task when another rank of it failed (or it was cancelled)."""


# ------------------------------------------------------------- task side
class _Part:
    """One rank's part of a running MPI task, as the ABORT frame finds it."""

    __slots__ = ("abort",)

    def __init__(self) -> None:
        self.abort: str | None = None


def _wait(reqs: list[Any], part: _Part) -> None:
    """Wait for ``reqs``, politely, unless the task is aborted meanwhile.

    Raises:
        MpiTaskAborted: another rank of the task failed.
    """
    t0 = time.monotonic()
    while not MPI.Request.Testall(reqs):
        if part.abort is not None:
            for r in reqs:
                if r != MPI.REQUEST_NULL:
                    try:
                        r.Cancel()
                        r.Free()
                    except MPI.Exception:
                        pass  # a send or collective cannot be cancelled: leave it
            raise MpiTaskAborted(part.abort)
        _pause(t0)


def _pause(t0: float) -> None:
    """Between two polls of a wait that began at ``t0``: yield the core, then sleep longer.

    A blocking MPI call would spin on its core for the whole wait; this
    gives the core to the ranks that share it once the wait is not short.
    """
    waited = time.monotonic() - t0
    if waited < 200e-6:
        os.sched_yield()
    else:
        time.sleep(min(1e-3, waited / 10))


_local = threading.local()


def task_comm() -> TaskComm:
    """The communicator of the MPI task running in this thread.

    Raises:
        RuntimeError: not called from inside an ``mpi=k`` task.
    """
    comm: TaskComm | None = getattr(_local, "comm", None)
    if comm is None:
        raise RuntimeError("task_comm() is only available inside an mpi=k task")
    return comm


class TaskComm(MPI.Intracomm):
    """The communicator of an MPI task's ranks, with collectives that can be aborted.

    Every blocking collective, ``recv`` and ``Recv`` first waits, polling,
    on a non-blocking barrier (a probe for receives); if another rank of
    the task fails meanwhile it raises ``MpiTaskAborted`` instead of
    blocking for ever. Everything else is the ``mpi4py`` communicator.
    """

    _part: _Part

    def __new__(cls, comm: Any = None, part: _Part | None = None) -> TaskComm:
        """Wrap the handle of ``comm`` (not a copy of the communicator)."""
        self: TaskComm = super().__new__(cls, comm)
        self._part = part if part is not None else _Part()
        return self

    def _gate(self) -> None:
        _wait([MPI.Intracomm.Ibarrier(self)], self._part)

    def barrier(self) -> None:
        """Barrier (abortable)."""
        self._gate()

    def Barrier(self) -> None:
        """Barrier (abortable)."""
        self._gate()

    def recv(self, buf: Any = None, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: Any = None) -> Any:
        """Receive an object, once one has arrived (abortable)."""
        self._probe(source, tag)
        return MPI.Intracomm.recv(self, buf, source, tag, status)

    def Recv(self, buf: Any, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: Any = None) -> None:
        """Receive into a buffer, once a message has arrived (abortable)."""
        self._probe(source, tag)
        MPI.Intracomm.Recv(self, buf, source, tag, status)

    def _probe(self, source: int, tag: int) -> None:
        part = self._part
        t0 = time.monotonic()
        while not MPI.Intracomm.Iprobe(self, source, tag):
            if part.abort is not None:
                raise MpiTaskAborted(part.abort)
            _pause(t0)


def _gated(name: str) -> Callable[..., Any]:
    base = getattr(MPI.Intracomm, name)

    def method(self: TaskComm, *args: Any, **kwargs: Any) -> Any:
        self._gate()
        return base(self, *args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"TaskComm.{name}"
    method.__doc__ = f"``{name}`` of mpi4py, after a barrier that can be aborted."
    return method


for _name in ("bcast", "gather", "scatter", "allgather", "alltoall", "reduce", "allreduce",
              "scan", "exscan", "Bcast", "Gather", "Gatherv", "Scatter", "Scatterv",
              "Allgather", "Allgatherv", "Alltoall", "Alltoallv", "Reduce", "Allreduce",
              "Reduce_scatter", "Reduce_scatter_block", "Scan", "Exscan"):
    setattr(TaskComm, _name, _gated(_name))


# ----------------------------------------------------------- worker ranks
class _Link:
    __slots__ = ("channel", "root")

    def __init__(self, channel: MpiChannel, root: int) -> None:
        self.channel = channel
        self.root = root

    def send(self, parts: list[Any]) -> None:
        self.channel.send(self.root, parts)


class _RankPeer:
    """Another worker rank as a holder of results: FETCH out, DATA back, in order.

    What ``Worker._fetch_then_start`` asks of a data port's connection; over
    MPI it is the channel itself (no connection, no handshake).
    """

    __slots__ = ("lost", "rank", "worker")

    def __init__(self, worker: MpiWorker, rank: int) -> None:
        self.worker = worker
        self.rank = rank
        self.lost = False

    async def fetch(self, keys: list[int]) -> dict[int, Any]:
        """The values of ``keys`` held on this rank (a ``KeyError`` for each one it lacks).

        Raises:
            ConnectionError: the runtime ended before the answer.
        """
        fut: asyncio.Future[dict[int, Any]] = asyncio.get_running_loop().create_future()
        self.worker._asked.setdefault(self.rank, collections.deque()).append((set(keys), fut))
        self.worker._channel.send(self.rank, P.encode(P.FETCH, keys))
        return await fut


class MpiWorker(Worker):
    """A worker rank's service of one runtime: the TCP worker's execution, MPI's frames."""

    def __init__(self, session: Session, link: _Link, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(b"", session.slots, f"rank {session.rank}",
                         declared=rank_resources(session.slots))
        from async_wf._threads import ThreadPool

        self.session = session
        self.worker_id = session.rank
        self._state = "ready"
        self._stream = link  # type: ignore[assignment]
        self._loop = loop
        self._pool = ThreadPool(session.slots, loop, self._on_thread_results,
                                claim=self._claim, name="async_wf-rank", owner=self)
        self._parts: dict[int, _Part] = {}
        self._wants_comm: dict[int, bool] = {}
        self._comms: dict[int, Any] = {}
        self._detached = False
        # the guard sends what a long call on the loop would hold up (see
        # Worker._rescue) through the channel: MPI is initialised with
        # MPI_THREAD_MULTIPLE, and a small frame leaves at once (a large
        # one's buffers move when the loop's selector progresses again)
        self._guard_can = True
        self._beats = False
        self._channel = link.channel
        # our FETCHes to other ranks, by rank, answered in order (_RankPeer)
        self._asked: dict[int, collections.deque[
            tuple[set[int], asyncio.Future[dict[int, Any]]]]] = {}
        # the rids of MPI tasks' parts: their results always go to the root
        self._no_keep: set[int] = set()
        self.forward_logs()

    def on_frame(self, kind: int, payload: memoryview, buffers: list[Any]) -> None:
        """Handle one frame of the runtime (SHUTDOWN and EXIT are the caller's)."""
        if kind == P.TASKS:
            self._run_batch(P.loads(payload, buffers), buffers)
        elif kind == P.CANCEL:
            self._cancel(P.loads(payload, buffers))
        elif kind == P.STEAL:
            self._give_back(P.loads(payload, buffers))
        elif kind == P.ABORT:
            gang_id, why = P.loads(payload, buffers)
            part = self._parts.get(gang_id)
            if part is not None:
                part.abort = why
        elif kind == P.FETCH:
            self.serve_fetch(self.session.root, P.loads(payload, buffers))
        elif kind == P.FREE:
            self._free(P.loads(payload, buffers))
        elif kind == P.WELCOME:
            # the runtime's settings (there is no handshake over MPI)
            settings = P.loads(payload, buffers)
            if (type(settings) is not tuple or len(settings) != 1
                    or type(settings[0]) is not int or settings[0] < 0):
                raise P.ProtocolError(f"malformed settings {settings!r:.80}")
            self._joining.keep_min = settings[0]
        else:
            raise P.ProtocolError(f"unexpected {P.KIND_NAMES[kind]} frame from the root")

    def on_peer_frame(self, src: int, kind: int, payload: memoryview,
                      buffers: list[Any]) -> None:
        """Handle a frame of another worker rank: a FETCH to serve, or the DATA we asked for."""
        if kind == P.FETCH:
            self.serve_fetch(src, P.loads(payload, buffers))
        elif kind == P.DATA:
            got = read_data(payload, buffers)
            q = self._asked.get(src)
            if not q or q[0][0] != set(got):
                # the answer to a fetch of a former runtime of this rank (keys
                # are never reused): dropped, or it would answer ours
                log.debug("rank %d: DATA from rank %d nobody waits for", self.session.rank, src)
                return
            fut = q.popleft()[1]
            if not fut.done():
                fut.set_result(got)
        else:
            raise P.ProtocolError(f"a worker rank takes FETCH and DATA from another, "
                                  f"got {P.KIND_NAMES[kind]}")

    def serve_fetch(self, src: int, keys: Any) -> None:
        """Answer a FETCH from rank ``src`` with the values held here (DATA).

        ``keys``: a list, answered through the channel; or the list in a
        1-tuple, from the root blocked in ``result()``, answered on the
        tags of a blocking fetch. Buffers are never compressed: MPI moves
        memory faster than lz4 would shrink it.
        """
        sync = type(keys) is tuple and len(keys) == 1
        bufs: list[Any] = []
        items = data_items(self._store, keys[0] if sync else keys, bufs)
        self._channel.send(src, P.encode(P.DATA, items, 0, bufs), sync=sync)

    def _peer(self, addr: str) -> Any:
        # a holder's address is "mpi:<rank>" (transport.mpi); MPI needs no connection
        return _RankPeer(self, int(addr.rpartition(":")[2]))

    def detach(self) -> None:
        """The runtime is over: drop queued work and held results, report nothing more."""
        self._detached = True
        self._store.clear()
        for q in self._asked.values():
            for _keys, fut in q:
                if not fut.done():
                    fut.set_exception(ConnectionError("the runtime was closed"))
        self._asked.clear()
        self._guard_stop.set()
        self._guard_wake.set()
        self.stop_forwarding()
        for t in self._async.values():
            t.cancel()
        for part in self._parts.values():
            part.abort = "the runtime was closed"
        assert self._pool is not None
        self._pool.close(drop_queued=True)
        if self._rpool is not None:
            self._rpool.close(drop_queued=True)

    def _flush(self) -> None:
        if self._detached:
            self._flush_pending = False
            self._out = []
            return
        no_keep = self._no_keep
        if no_keep and any(item[0] in no_keep for item in self._out):
            # an MPI task's part: its value is one piece of the task's, which
            # the root puts together. The whole flush sends its values then
            # (rare: MPI tasks are few and long); the guard's flush never
            # runs beside the loop's (Worker._rescue)
            for item in self._out:
                no_keep.discard(item[0])
            keep = self._joining.keep_min
            self._joining.keep_min = 0
            try:
                super()._flush()
            finally:
                self._joining.keep_min = keep
            return
        super()._flush()

    def _report(self, rid: int, status: int, value: Any, tb: str | None) -> None:
        if status == P.R_NOINPUT and rid in self._no_keep:
            # an MPI task's part cannot be put back alone (its other ranks wait)
            status = P.R_ERROR
            value = RemoteError(f"rank {self.session.rank}: inputs {value} of the MPI task "
                                "are held nowhere any more")
        super()._report(rid, status, value, tb)

    def _start_loaded(self, loaded: tuple[Any, ...]) -> None:
        rid, fid, kind, fn, args, kwargs, extra = loaded
        if kind == P.K_MPI:
            self._start_part(kind, rid, fid, fn, args, kwargs, extra)  # its inputs are here
        else:
            super()._start_loaded(loaded)

    def _can_send_now(self) -> bool:
        return not self._detached

    def _send_now(self, parts: list[Any]) -> None:
        link = self._stream
        assert link is not None
        link.send(parts)

    def _start_part(self, kind: int, rid: int, fid: int, fn: Any, args: Any, kwargs: Any,
                    gang: Any) -> None:
        """Start this rank's part of an MPI task (``gang``: its item's extra)."""
        if kind != P.K_MPI:
            super()._start_part(kind, rid, fid, fn, args, kwargs, gang)
            return
        self._no_keep.add(rid)
        refs: list[HeldRef] = []
        collect(args, HeldRef, refs)
        if kwargs:
            collect(kwargs, HeldRef, refs)
        if refs:
            # inputs held on ranks: this one's are at hand, the others come
            # first (the task's other ranks wait for this one in _enter)
            loaded = (rid, fid, kind, fn, args, kwargs, gang)
            missing = [r for r in refs if not r.inline
                       and not (r.wid == self.worker_id and r.key in self._store)]
            if missing:
                loop = self._loop
                assert loop is not None
                loop.call_soon_threadsafe(self._spawn_fetch, loaded, missing)
                return
            _, _, _, fn, args, kwargs, _ = self._with_inputs(loaded, {})
        part = _Part()
        self._parts[gang[0]] = part
        self._ctx_info[rid] = (gang[2], len(gang[1]), gang[6])
        wants = self._wants_comm.get(fid)
        if wants is None:
            try:
                wants = "comm" in inspect.signature(fn).parameters
            except (TypeError, ValueError):
                wants = False
            self._wants_comm[fid] = wants
        self._in_pool.add(rid)
        assert self._pool is not None
        # ahead of any plain task queued here: the other ranks are waiting for it
        self._pool.put((rid, fid), self._run_part, (fn, args, kwargs, gang, part, wants), {},
                       priority=1 << 40)

    def _run_part(self, fn: Any, args: Any, kwargs: Any, gang: Any, part: _Part,
                  wants: bool) -> Any:
        gang_id, ranks, index, comm_id, create, gather, _restore = gang
        try:
            comm = self._enter(gang_id, ranks, index, comm_id, create, part)
            tc = TaskComm(comm, part)
            _local.comm = tc
            try:
                value = fn(*args, **{**kwargs, "comm": tc}) if wants else fn(*args, **kwargs)
            finally:
                _local.comm = None
            if comm_id < 0:
                comm.Free()
            return value if gather or index == 0 else None
        except MpiTaskAborted:
            self._comms.pop(comm_id, None)  # a communicator with half-done calls: never again
            raise
        finally:
            self._parts.pop(gang_id, None)

    def _enter(self, gang_id: int, ranks: tuple[int, ...], index: int, comm_id: int,
               create: bool, part: _Part) -> Any:
        """Meet the other ranks of the task (abortably), then get its communicator.

        Making a communicator blocks until every rank of the group calls it;
        a rank that failed before (its arguments would not load) would never
        come. So the ranks first meet with messages that can be waited for
        abortably, and only then make or reuse the communicator.
        """
        tasks = self.session.tasks
        if len(ranks) > 1:
            tag = gang_id % _TAG_MOD + 1
            token = bytearray(1)
            if index == 0:
                _wait([tasks.Irecv(bytearray(1), r, tag) for r in ranks[1:]], part)
                _wait([tasks.Isend(token, r, tag) for r in ranks[1:]], part)
            else:
                _wait([tasks.Isend(token, ranks[0], tag)], part)
                _wait([tasks.Irecv(bytearray(1), ranks[0], tag)], part)
        if not create:
            comm = self._comms.get(comm_id)
            if comm is None:
                raise RemoteError(f"rank {self.session.rank} has no communicator #{comm_id}")
            return comm
        group = tasks.Get_group().Incl(list(ranks))
        comm = tasks.Create_group(group, abs(comm_id) % _TAG_MOD)
        group.Free()
        if comm_id > 0:
            self._comms[comm_id] = comm
        return comm


#: the worker of this rank's current runtime (``held_keys``)
_current: list[MpiWorker] = []


def held_keys() -> list[int]:
    """The keys of the results held on this worker rank now (empty elsewhere).

    Called in a task, it shows what stayed on its rank and what was freed.
    """
    return sorted(_current[0]._store) if _current else []


async def _serve(session: Session) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    holder = _current

    def on_frames(frames: list[tuple[int, int, memoryview, list[Any]]]) -> None:
        for src, kind, payload, buffers in frames:
            if done.done():
                return
            if src != session.root:
                try:
                    holder[0].on_peer_frame(src, kind, payload, buffers)
                except P.ProtocolError as exc:
                    log.error("rank %d: invalid frame from rank %d dropped: %s",
                              session.rank, src, exc)
                continue
            if kind == P.EXIT:
                done.set_result(0)
                return
            if kind == P.SHUTDOWN:
                holder[0].detach()
                holder[0] = MpiWorker(session, link, loop)
                continue
            try:
                holder[0].on_frame(kind, payload, buffers)
            except P.ProtocolError as exc:
                log.error("rank %d: invalid frame from the root dropped: %s", session.rank, exc)

    def on_error(src: int, exc: BaseException) -> None:
        log.error("rank %d: invalid frame from rank %d dropped: %s", session.rank, src, exc)

    channel = MpiChannel(session.ctrl, loop, on_frames, on_error)
    link = _Link(channel, session.root)
    holder.append(MpiWorker(session, link, loop))
    channel.start()
    try:
        return await done
    finally:
        holder[0].detach()
        holder.clear()
        await channel.aclose()


def serve(session: Session) -> int:
    """Serve the root's runtimes on this worker rank until the application ends (blocking)."""
    import faulthandler

    # a task that crashes the interpreter takes the MPI job down (mpiexec kills
    # every rank): leave at least the Python traceback of where it happened
    faulthandler.enable()
    loop = new_event_loop()
    try:
        return loop.run_until_complete(_serve(session))
    finally:
        loop.close()


# ----------------------------------------------------------------- entries
def run(
    main: Callable[[], Coroutine[Any, Any, T]], comm: Any = None, root: int = 0, *,
    slots: int = 1,
) -> T | None:
    """Run ``main()`` on the root rank of ``comm`` while the other ranks serve its tasks.

    Collective: call it on every rank. On the root, ``main()`` runs on an
    event loop that polls MPI, with this session as the default of
    ``Runtime()``; its value is returned. The other ranks return None once
    it has finished (or raised).

    Raises:
        Exception: on the root, what ``main()`` raised.
    """
    session = Session(comm, root, slots)
    if not session.is_root:
        serve(session)
        return None
    previous = set_current_session(session)
    try:
        loop = new_event_loop()
        try:
            return loop.run_until_complete(main())
        finally:
            loop.close()
    finally:
        set_current_session(previous)
        session.exit_workers()


def main(argv: list[str] | None = None) -> int:
    """``python -m async_wf.mpi [--slots N] app.py [args...]`` (every rank runs it)."""
    p = argparse.ArgumentParser(
        prog="python -m async_wf.mpi",
        description="Run app.py on rank 0 with the other ranks of the MPI job as its workers.",
    )
    p.add_argument("--slots", type=int, default=1,
                   help="threads per worker rank for blocking tasks (default 1)")
    p.add_argument("-m", dest="module", help="run a module (like python -m) instead of a file")
    p.add_argument("script", nargs="?", help="the application (a .py file)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    ns = p.parse_args(argv)
    if ns.module is None and ns.script is None:
        p.error("give the application: app.py or -m module")
    if ns.slots < 1:
        p.error(f"--slots must be >= 1, got {ns.slots}")
    session = Session(MPI.COMM_WORLD, 0, ns.slots)
    if not session.is_root:
        return serve(session)
    set_current_session(session)
    code = 0
    try:
        if ns.module is not None:
            sys.argv = [ns.module, *([ns.script] if ns.script else []), *ns.args]
            runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [ns.script, *ns.args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
            runpy.run_path(ns.script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        set_current_session(None)
        session.exit_workers()
    return code


if __name__ == "__main__":
    from async_wf.mpi import main as _main

    sys.exit(_main())
