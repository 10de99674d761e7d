"""Worker ranks over MPI: the scheduler on one rank, the other ranks run tasks.

Placement, batching and results are those of every remote transport (see
``transport._remote``); frames travel as MPI messages (``_mpi_channel``).
The worker ranks are started by ``mpiexec`` together with the scheduler's
rank and serve one runtime after another (``async_wf.mpi.serve``) until the
application ends, so a runtime starts in microseconds and there is no
handshake: the MPI job is the trust boundary.

MPI tasks (``@task(mpi=k)``)
    A *gang*: one item per rank, sent to k ranks at once, each carrying the
    ranks of the gang, this rank's index, and the communicator to use. The
    scheduler is the only place where ranks are chosen, and it places a
    gang only on ranks that are part of no other gang, all at once, so two
    MPI tasks never wait for each other's ranks: no deadlock, whatever the
    mix. MPI tasks are placed in priority order, head of line first: a large
    task is not starved by a stream of smaller ones that could squeeze past
    it. Plain blocking tasks are not sent to a rank of a gang (they would
    wait behind it), ``async def`` tasks are.

    Communicators: creating one is collective over its ranks and costs a
    round of messages, so the scheduler gives each set of ranks an id and
    reuses it (up to ``comm_cache`` sets; beyond that a gang's communicator
    is made for it and freed after). Reuse must be decided in one place, or
    one rank would create a communicator while another reused its own and
    both would wait for ever; so it is decided here and travels with the gang.

    Failure: the first rank that fails fails the task at once (its
    exception, with a note naming the rank); the others get an ABORT frame,
    which makes their next collective on the task's communicator raise
    ``MpiTaskAborted`` (see ``async_wf.mpi.TaskComm``). Their outcomes are
    then dropped; they count as busy until they report, and the aborted
    communicator is never used again. ``retries`` applies as to any task.

Results that stay on their rank (``keep_min``)
    As with TCP workers (``async_wf._held``): a result of at least
    ``keep_min`` bytes stays in the memory of the rank that made it, the
    scheduler keeps its size, type and rank, dependents go to that rank when
    it has room (``_near``), and otherwise the rank that runs one asks the
    holder for the value with a FETCH frame and gets a DATA frame back,
    rank to rank over the same channel: out-of-band pickle buffers travel as
    MPI messages of their own, from the array's memory into a fresh array.
    ``await`` of such a future fetches it from its rank the same way;
    ``result()`` too, through tags of its own (``_mpi_channel.recv_frame``).
    A value is freed on its rank (FREE) when no future and no pending task
    needs it. The results of MPI tasks always come to the scheduler (their
    ranks' parts make one value). A rank that dies takes the MPI job with it,
    so there is no lineage recompute here to speak of.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
from typing import TYPE_CHECKING, Any

from async_wf import protocol as P
from async_wf._errors import TaskTimeoutError, WorkerLostError
from async_wf._held import HeldRef, read_data
from async_wf._options import THREAD
from async_wf._resources import rank_resources
from async_wf.transport import Attempt
from async_wf.transport._remote import RemoteTransport, _Worker

if TYPE_CHECKING:
    from async_wf._futures import TaskFuture
    from async_wf._mpi_channel import Frame, MpiChannel
    from async_wf._mpi_session import Session
    from async_wf._scheduler import Scheduler

__all__ = ["MpiTransport"]

log = logging.getLogger("async_wf")

# rids and gang ids are unique in the process, not per runtime: a worker rank
# serves runtime after runtime, and a late result of a former one must never
# match a task of the current one
_RIDS = itertools.count(1)
_GANGS = itertools.count(1)


class _RankLink:
    """A worker rank's end of the channel, as ``RemoteTransport`` sees a link."""

    __slots__ = ("bytes_in", "bytes_out", "channel", "rank")

    def __init__(self, channel: MpiChannel, rank: int) -> None:
        self.channel = channel
        self.rank = rank
        self.bytes_out = 0
        self.bytes_in = 0

    def send(self, parts: list[Any]) -> None:
        self.channel.send(self.rank, parts)

    def close(self) -> None:
        pass


class _Gang(Attempt):
    """One MPI task placed on its ranks (``TaskFuture._att`` while it runs)."""

    __slots__ = ("comm_id", "create", "fut", "id", "index", "left", "ranks", "reported",
                 "restore", "values")

    def __init__(self, fut: TaskFuture[Any], ranks: list[_Worker], comm_id: int,
                 create: bool, restore: tuple[int, list[Any]] | None) -> None:
        self.id = next(_GANGS)
        self.timer = None
        self.fut = fut
        self.ranks = ranks
        self.index = {w.id: i for i, w in enumerate(ranks)}
        self.comm_id = comm_id
        self.create = create
        self.values: list[Any] = [None] * len(ranks)
        self.left = len(ranks)
        self.reported = False
        # the last complete step of the task (a checkpointed one) and each rank's state
        self.restore = restore

    def extra(self, w: _Worker) -> tuple[Any, ...]:
        opts = self.fut._opts
        index = self.index[w.id]
        restore = self.restore
        return (self.id, tuple(r.id for r in self.ranks), index, self.comm_id,
                self.create, opts.mpi_gather,
                None if restore is None else (restore[0], restore[1][index]))


class MpiTransport(RemoteTransport):
    """Runs tasks on the worker ranks of an MPI job.

    A rank gets new blocking tasks once half its credit is back, in one
    frame: each MPI message is received on its own, so without it a
    result frame of one task bought a task frame of one, and no-op tasks
    ran at 8 000-16 000/s instead of 58 000/s.

    Made by ``Runtime(transport="mpi")`` inside a program started with
    ``mpiexec -n N python -m async_wf.mpi app.py`` or ``async_wf.mpi.run``,
    which set up the ranks (``Session``).

    Args:
        session: the ranks and communicators (default: those of the launch).
        prefetch: blocking tasks outstanding per worker slot (an MPI task
            placed on a rank goes ahead of the plain tasks queued there).
        async_limit: ``async def`` tasks outstanding per rank.
        compress_min: lz4 threshold for buffers (0: never); MPI on one node
            moves memory faster than lz4 compresses it, hence off by default.
        comm_cache: how many sets of ranks keep their communicator.
        ranks: use only the first this many worker ranks (default: all);
            ``Executor(max_workers=N)`` sets it, as ``MPIPoolExecutor`` does.
        keep_min: a result of at least this many bytes stays on the rank
            that made it (0: every result comes to the scheduler's rank);
            with a checkpoint log, every result comes (it is recorded).

    Raises:
        RuntimeError: not inside an MPI launch (see above).
        ValueError: an argument breaks its rule.
    """

    refill = 0.5

    def __init__(
        self,
        session: Session | None = None,
        *,
        prefetch: int = 64,
        async_limit: int = 4096,
        compress_min: int = 0,
        comm_cache: int = 64,
        ranks: int | None = None,
        keep_min: int = 64 << 10,
    ) -> None:
        for name, value, low in (("prefetch", prefetch, 1), ("async_limit", async_limit, 1),
                                 ("compress_min", compress_min, 0),
                                 ("comm_cache", comm_cache, 0), ("keep_min", keep_min, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        super().__init__(prefetch=prefetch, async_limit=async_limit,
                         compress_min=compress_min, max_lost=1)
        if session is None:
            from async_wf._mpi_session import current_session

            session = current_session()
            if session is None:
                raise RuntimeError(
                    "the MPI transport needs worker ranks that serve it: start the program "
                    "with 'mpiexec -n N python -m async_wf.mpi app.py', or call "
                    "async_wf.mpi.run(main) on every rank"
                )
        self.session = session
        n = len(session.workers)
        if ranks is not None and (isinstance(ranks, bool) or not isinstance(ranks, int)
                                  or not 1 <= ranks <= n):
            raise ValueError(f"ranks must be an int from 1 to the job's {n} worker rank(s) "
                             f"(mpiexec -n {n + 1}), got {ranks!r}")
        #: the worker ranks this transport runs tasks on
        self.ranks = session.workers[:ranks] if ranks is not None else list(session.workers)
        self._rids = _RIDS
        self._channel: MpiChannel | None = None
        self._gangq: list[tuple[int, int, TaskFuture[Any]]] = []
        self._comm_ids: dict[tuple[int, ...], int] = {}
        self._next_comm = itertools.count(1)
        self._comm_cache = comm_cache
        self.n_mpi_tasks = 0
        self.n_aborted = 0
        self._keep_min = keep_min
        # one blocking fetch at a time: its answer comes on tags of its own
        self._sync_lock = threading.Lock()

    async def start(self, sched: Scheduler, loop: asyncio.AbstractEventLoop) -> None:
        """Take the worker ranks of the session.

        Raises:
            RuntimeError: another runtime of this process is using them.
        """
        from async_wf._mpi_channel import MpiChannel

        self.session.acquire(self)
        self._sched = sched
        self._loop = loop
        ch = MpiChannel(self.session.ctrl, loop, self._on_frames, self._on_error)
        self._channel = ch
        ch.start()
        # the runtime's settings, before any task (frames from one rank keep
        # their order); with a checkpoint log every result must come here
        keep = self._keep_min if sched._ckpt is None else 0
        settings = P.encode(P.WELCOME, (keep,))
        for rank in self.ranks:
            ch.send(rank, settings)
            w = _Worker(_RankLink(ch, rank), rank, self.session.slots, 0, f"rank {rank}",
                        self._prefetch, self._async_limit, rank_resources(self.session.slots))
            w.data_addr = f"mpi:{rank}"  # how ranks name a holder (``async_wf.mpi``)
            self._join(w)

    def check_options(self, fn: Any, mpi: int) -> None:
        """Refuse at submit an MPI task larger than the job's worker ranks.

        Raises:
            ValueError: ``mpi`` exceeds the number of worker ranks.
        """
        if mpi > len(self.ranks):
            if len(self.ranks) < len(self.session.workers):
                raise ValueError(
                    f"task {getattr(fn, '__qualname__', fn)!r} needs mpi={mpi} ranks but this "
                    f"runtime uses {len(self.ranks)} of the job's {len(self.session.workers)} "
                    f"worker ranks (ranks={len(self.ranks)})")
            raise ValueError(
                f"task {getattr(fn, '__qualname__', fn)!r} needs mpi={mpi} ranks but this job "
                f"has {len(self.session.workers)} worker rank(s) "
                f"(mpiexec -n {len(self.session.workers) + 1}); start it with at least "
                f"-n {mpi + 1}"
            )

    # --------------------------------------------------------------- frames
    def _on_frames(self, frames: list[Frame]) -> None:
        for src, kind, payload, buffers in frames:
            w = self._workers.get(src)
            if w is None:
                continue  # a rank dropped for a bad frame, or a runtime's late traffic
            if kind == P.DATA and not w.fetches:
                # the answer to a fetch of a former runtime, closed while it
                # waited (MPI has no connection that would take it along)
                continue
            try:
                self._on_worker_frame(w, kind, payload, buffers)
            except P.ProtocolError as exc:
                self._on_error(src, exc)

    def _on_error(self, src: int, exc: BaseException) -> None:
        w = self._workers.get(src)
        if w is None:
            return
        log.error("rank %d sent an invalid frame (%s); it gets no more tasks", src, exc)
        for rid in [r for r in w.inflight if r in self._parts]:
            fut = w.inflight.pop(rid)
            w.count(fut._kind, -1)
            self._part_outcome(w, self._parts.pop(rid), P.R_ERROR,
                               WorkerLostError(f"rank {src} sent an invalid frame: {exc}"))
        self._release(w, exc)

    # ---------------------------------------------------------------- gangs
    def dispatch(self, futs: list[TaskFuture[Any]]) -> None:
        """Place plain tasks as every remote transport does; queue MPI tasks for ranks."""
        plain = futs
        if any(f._opts.mpi is not None and f._opts.binary is None for f in futs):
            plain = []
            for f in futs:
                if f._opts.mpi is not None and f._opts.binary is None:
                    f._att = None
                    self._seq += 1
                    heapq.heappush(self._gangq, (-f._opts.priority, self._seq, f))
                else:
                    plain.append(f)
        if plain:
            super().dispatch(plain)
        if self._gangq:
            self._place_gangs()

    def _place_backlog(self) -> None:
        super()._place_backlog()
        if self._gangq:
            self._place_gangs()

    def _place_gangs(self) -> None:
        q = self._gangq
        while q:
            fut = q[0][2]
            if fut.done():
                heapq.heappop(q)
                continue
            k = fut._opts.mpi
            assert k is not None
            free = [w for w in self._order if w.held is None]
            if len(free) < k:
                return  # head of line: nothing overtakes it
            heapq.heappop(q)
            # the least loaded ranks; ties by rank, so that the same sets recur
            # and their communicators are reused
            free.sort(key=lambda w: (w.n_thread, w.id))
            ranks = sorted(free[:k], key=lambda w: w.id)
            self._start_gang(fut, ranks)

    def _start_gang(self, fut: TaskFuture[Any], ranks: list[_Worker]) -> None:
        key = tuple(w.id for w in ranks)
        comm_id = self._comm_ids.get(key)
        create = comm_id is None
        if comm_id is None:
            comm_id = next(self._next_comm)
            if len(self._comm_ids) < self._comm_cache:
                self._comm_ids[key] = comm_id
            else:
                comm_id = -comm_id  # made for this task only, freed after it
        sched = self._sched
        assert sched is not None
        gang = _Gang(fut, ranks, comm_id, create, sched.restore_blobs(fut, len(ranks)))
        fut._att = gang
        self.n_mpi_tasks += 1
        for w in ranks:
            w.held = gang
            w.count(THREAD, 1)
            rid = self._send_tasks(w, [fut], (P.K_MPI, gang.extra(w)))
            if rid == 0:
                # the function or the arguments could not be pickled: the task
                # has failed already (_unsendable); the ranks are free again
                for r in ranks:
                    r.held = None
                self._forget_comm(gang)
                return
            self._parts[rid] = gang
        timeout = fut._opts.timeout
        if timeout is not None:
            loop = self._loop
            assert loop is not None
            gang.timer = loop.call_later(timeout, self._gang_timeout, gang)

    def _forget_comm(self, gang: _Gang) -> None:
        key = tuple(w.id for w in gang.ranks)
        if self._comm_ids.get(key) == gang.comm_id:
            del self._comm_ids[key]

    def _part_index(self, w: _Worker, owner: Any) -> tuple[int, int]:
        return owner.index[w.id], len(owner.ranks)

    def _part_outcome(self, w: _Worker, owner: Any, status: int, value: Any) -> None:
        """One rank's outcome of an MPI task."""
        gang: _Gang = owner
        w.held = None
        gang.left -= 1
        fut = gang.fut
        if not gang.reported:
            if status == P.R_OK:
                gang.values[gang.index[w.id]] = value
                if gang.left == 0:
                    gang.reported = True
                    gang.stop_timer()
                    fut._att = None
                    self._outcome(fut, P.R_OK,
                                  gang.values if fut._opts.mpi_gather else gang.values[0])
            else:
                if status == P.R_ERROR and isinstance(value, BaseException):
                    value.add_note(f"(on rank {gang.index[w.id]} of {len(gang.ranks)} of the "
                                   f"MPI task, world rank {w.id})")
                self._fail_gang(gang, status, value, f"rank {gang.index[w.id]} of the task "
                                f"failed: {type(value).__name__}: {value}")

    def _fail_gang(self, gang: _Gang, status: int, value: Any, why: str) -> None:
        """Report the task failed (or cancelled) now, and stop its other ranks."""
        gang.reported = True
        fut = gang.fut
        gang.stop_timer()
        fut._att = None
        if gang.left:
            self.n_aborted += 1
            self._forget_comm(gang)
            frame = P.encode(P.ABORT, (gang.id, why))
            for r in gang.ranks:
                if r.held is gang:
                    r.stream.send(frame)
        if not fut.done():
            self._outcome(fut, status, value)

    def _gang_timeout(self, gang: _Gang) -> None:
        fut = gang.fut
        gang.timer = None
        if gang.reported or fut.done():
            return
        limit = fut._opts.timeout or 0.0
        self._fail_gang(gang, P.R_ERROR, TaskTimeoutError(fut.name, limit),
                        f"the task timed out after {limit:g} s")

    def cancel_running(self, fut: TaskFuture[Any], msg: Any) -> bool:
        """Drop a queued MPI task, abort a running one; plain tasks as every remote transport."""
        run = fut._att
        if isinstance(run, _Gang):
            if not run.reported:
                self._fail_gang(run, P.R_CANCELLED, None, "the task was cancelled")
            return True
        if run is None and fut._opts.mpi is not None and fut._opts.binary is None:
            for i, item in enumerate(self._gangq):
                if item[2] is fut:
                    self._gangq.pop(i)
                    heapq.heapify(self._gangq)
                    sched = self._sched
                    assert sched is not None
                    sched.task_cancelled(fut, msg)
                    return True
            return False
        return super().cancel_running(fut, msg)

    # ------------------------------------------------------- held results
    def fetch_held(self, ref: HeldRef) -> Any:
        """The value of a result held on a rank, fetched now (blocking): ``result()``.

        The loop of this rank may be the caller's, held up in this call, so
        the answer cannot come through the channel: the rank sends it on tags
        of its own, received here (``MpiChannel.recv_frame``).

        Raises:
            WorkerLostError: the runtime is closed, or the rank no longer holds it.
        """
        if ref.inline:
            return ref.value
        if ref.fetched:
            return ref.cached
        ch = self._channel
        if ch is None or ref.wid not in self._workers or self._closing:
            raise WorkerLostError(f"{ref!r}: the runtime that made it is closed")
        with self._sync_lock:
            # a 1-tuple: answer on the blocking fetch's tags (async_wf.mpi)
            ch.send(ref.wid, P.encode(P.FETCH, ([ref.key],)))
            kind, payload, buffers = ch.recv_frame(ref.wid)
        if kind != P.DATA:
            raise P.ProtocolError(f"expected DATA, got {P.KIND_NAMES.get(kind, kind)}")
        got = read_data(payload, buffers).get(ref.key)
        if got is None or isinstance(got, KeyError):
            raise WorkerLostError(f"{ref!r}: its rank no longer holds it")
        self.bytes_fetched += ref.size
        ref.cached = got
        return got

    # ----------------------------------------------------------------- close
    def statistics(self) -> dict[str, Any]:
        """Worker ranks, MPI tasks run and aborted, bytes moved, results held on ranks."""
        ch = self._channel
        return {
            "workers": len(self._workers),
            "mpi_tasks": self.n_mpi_tasks,
            "mpi_tasks_aborted": self.n_aborted,
            "bytes_sent": ch.bytes_out if ch else 0,
            "bytes_received": ch.bytes_in if ch else 0,
            "mpi_polls": ch.polls if ch else 0,
            "results_held": len(self._held),
            "bytes_held": self.bytes_held,
            "bytes_fetched": self.bytes_fetched,
            "results_recomputed": self.n_recomputed,
        }

    async def close(self) -> None:
        """Release the worker ranks for the next runtime of this process."""
        if self._closing:
            return
        self._closing = True
        ch = self._channel
        if ch is not None:
            frame = P.raw_frame(P.SHUTDOWN)
            for rank in self.session.workers:
                ch.send(rank, frame)
            await ch.aclose()
        self.session.release(self)
