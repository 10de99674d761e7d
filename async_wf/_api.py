"""The public face: Runtime, submit, gather, wait, as_completed (and run, from _loop)."""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import ssl as _ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, Unpack, cast, overload

from async_wf._errors import RuntimeClosedError
from async_wf._futures import TaskFuture
from async_wf._launch import (
    LaunchArgs,
    choose_transport,
    fill_in_launch_defaults,
    join_address,
    split_address,
)
from async_wf._loop import run
from async_wf._options import TaskOptionArgs
from async_wf._scheduler import Scheduler
from async_wf._task import Submitter, closed, current_scheduler, find_scheduler, opened
from async_wf.checkpoint._config import Checkpoint
from async_wf.transport import Transport

if TYPE_CHECKING:
    from async_wf._allocator import Allocator
    from async_wf.observe._events import Observer

T = TypeVar("T")


class _SchedulerStatistics(TypedDict):
    submitted: int
    waiting: int
    ready: int
    running: int
    finished: int
    failed: int
    cancelled: int
    retried: int
    reused: int
    ready_queue: int  # the same as ready: the name of the Prometheus gauge
    elapsed_s: float
    tasks_per_s: float
    core: str


class RuntimeStatistics(_SchedulerStatistics, total=False):
    """What ``Runtime.statistics()`` returns, with the type of each value.

    The scheduler's counts are always there; the transport's and the
    checkpoint log's when they apply. A transport of one's own may add keys
    of its own.
    """

    # TCP and MPI transports
    workers: int
    bytes_sent: int
    bytes_received: int
    # TCP
    workers_lost: int
    workers_retired: int
    connections_rejected: int
    connections_in_handshake: int
    tasks_stolen: int  # given back unstarted by a busy worker, to run elsewhere
    tasks_sent_ahead: int  # sent to a worker before their input ended there (send_ahead)
    # plain tasks and scalar results that travelled in columns (see protocol.TASKS)
    tasks_in_columns: int
    results_in_columns: int
    # tasks that asked for resources and wait for a worker where they fit
    resource_tasks_waiting: int
    worker_resources: dict[str, str]  # "#id name" -> what it declared
    results_held: int  # results that stay on their workers now (keep_min)
    bytes_held: int  # the sizes of all results that stayed on workers
    bytes_fetched: int  # of those, what the application fetched
    results_recomputed: int  # held results made again after their worker was lost
    # with cluster=: the allocator's status (jobs pending/running, their workers)
    allocations: dict[str, Any]
    # MPI
    mpi_tasks: int
    mpi_tasks_aborted: int
    mpi_polls: int
    # with a checkpoint log
    checkpoint_recorded: int
    checkpoint_unusable: int
    checkpoint_records: int
    checkpoint_found: int


__all__ = ["Runtime", "as_completed", "current_runtime", "gather", "run", "submit", "wait"]

_current_runtime: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar(
    "async_wf_current_runtime", default=None
)


class Runtime:
    """A task runtime living inside the caller's event loop.

    Use it as ``async with Runtime() as rt:``; inside the block
    ``rt.submit`` (or ``async_wf.submit``, or calling a ``@task`` function)
    starts tasks and returns their futures at once. Leaving the block
    normally waits for every task still running; leaving it with an
    exception cancels what has not finished.

    Args:
        threads: size of the thread pool for blocking functions, when tasks
            run in this process (default: ``min(32, cpu_count + 4)``).
        workers: start this many worker processes and run tasks on them,
            over TCP (see ``async_wf.transport.tcp``); stopped on exit.
        listen: ``host:port`` or ``tcp://host:port`` (an IPv6 host in
            brackets) on which to accept workers started by hand
            (``async-wf worker --connect ...``); implies the TCP transport.
            Default: loopback only, on a free port.
        token_file: with ``listen``: the file holding the secret that
            external workers must prove they know; created (mode 0600) with
            a fresh secret if missing.
        ssl: ``"auto"`` for TLS bound to the token (the workers it starts
            check the scheduler's certificate against the token; external
            ones take ``--tls-auto``; needs ``cryptography``), or a server
            ``ssl.SSLContext`` to require TLS from workers with your own PKI.
        wait_on_exit: wait for outstanding tasks when the block exits
            normally (True) or cancel them (False).
        transport: a ``Transport`` instance to run tasks with, or the name
            of a built-in one: ``"local"``, ``"tcp"``, ``"mpi"`` (the worker
            ranks of an MPI launch, see ``async_wf.mpi``). Default: ``"mpi"``
            on the root rank of such a launch, else ``"local"``, or ``"tcp"``
            when TCP options are given.
        checkpoint: a checkpoint log (a path, or a ``Checkpoint`` with a
            flush policy): every task that succeeds is recorded in it, and a
            task already recorded there (same function code, same inputs)
            is not run again but resolved from the log. See
            docs/checkpoint.md.
        progress: show a live progress line on the terminal (submitted,
            running, done, failed, tasks/s); nothing when stderr is not a
            terminal.
        metrics: ``"host:port"`` (or ``tcp://host:port``, as ``listen``)
            on which to serve Prometheus metrics while the runtime runs
            (port 0: a free one, see ``metrics_address``).
        trace: write a Chrome trace-event file (Perfetto, chrome://tracing)
            of every task attempt to this path at close.
        report: write a self-contained HTML report of the run to this path
            at close.
        dag: record the task graph, for ``dag(path)`` (a report records it
            too).
        initializer: a callable run once in each thread of the local
            transport (a failure breaks the pool: tasks then fail with
            ``BrokenThreadPool``) or in each worker process started with
            ``workers=`` (a failure stops the start). Not for MPI ranks or
            workers started by hand.
        cluster: workers from a batch system, over TCP: ``"slurm"`` (inside
            a Slurm allocation: one worker per node with ``srun``, see
            ``SlurmJob``) or an ``Allocator`` such as ``SlurmAllocator(...)``
            (submits worker jobs while tasks wait). The scheduler listens on
            the allocator's ``listen_host()`` unless ``listen`` is given.
        **tcp_options: further options of ``TcpTransport`` (``slots``,
            ``prefetch``, ``heartbeat``, ``no_worker_timeout``, ...);
            ``keep_min``, ``prefetch``, ``async_limit`` and ``compress_min``
            apply to ``transport="mpi"`` too (and keep an MPI launch's
            default), the others are refused there.

    All observability options are off by default, and then cost nothing
    but one ``is None`` test per batch of tasks (see ``async_wf.observe``).

    Under ``async-wf run --workers/--threads/--checkpoint`` (and
    ``--progress/--metrics/--trace/--report``), those options
    fill in what the call leaves out (see ``_launch.launch_defaults``); an option the
    application gives itself wins, and a transport it chooses itself keeps
    the command line's transport options out.

    Raises:
        ValueError: an argument breaks its rule.
        TypeError: an unknown option.
    """

    def __init__(
        self,
        *,
        threads: int | None = None,
        workers: int | None = None,
        listen: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | Literal["auto"] | None = None,
        wait_on_exit: bool = True,
        transport: Transport | Literal["local", "tcp", "mpi"] | None = None,
        checkpoint: str | os.PathLike[str] | Checkpoint | None = None,
        progress: bool | None = None,
        metrics: str | None = None,
        trace: str | os.PathLike[str] | None = None,
        report: str | os.PathLike[str] | None = None,
        dag: bool = False,
        initializer: Callable[[], Any] | None = None,
        cluster: Allocator | Literal["slurm"] | None = None,
        **tcp_options: Any,
    ) -> None:
        args = LaunchArgs(
            transport=transport, threads=threads, workers=workers, listen=listen,
            token_file=token_file, ssl=ssl, initializer=initializer, tcp_options=tcp_options,
            checkpoint=checkpoint, progress=progress, metrics=metrics, trace=trace,
            report=report, cluster=cluster)
        fill_in_launch_defaults(args)
        # (option, as given, host, port): resolved at start, before any listening
        self._addresses: list[tuple[str, str, str, int]] = []
        if args.listen is not None:
            host, port = split_address(args.listen, "listen")
            self._addresses.append(("listen", args.listen, host, port))
            args.listen = "tcp://" + join_address(host, port)
        if args.metrics is not None:
            host, port = split_address(args.metrics, "metrics")
            self._addresses.append(("metrics", args.metrics, host, port))
            args.metrics = join_address(host, port)
        self._transport: Transport = choose_transport(args, Runtime.__init__)
        self._wait_on_exit = wait_on_exit
        checkpoint = args.checkpoint
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            if not isinstance(checkpoint, str | os.PathLike):
                raise TypeError(f"checkpoint must be a path or a Checkpoint, got "
                                f"{type(checkpoint).__name__}: {checkpoint!r}")
            checkpoint = Checkpoint(checkpoint)
        self._checkpoint = checkpoint
        from async_wf.observe._events import ObserveOptions

        self._observe = ObserveOptions(
            progress=bool(args.progress), metrics=args.metrics,
            trace=None if args.trace is None else os.fspath(args.trace),
            report=None if args.report is None else os.fspath(args.report), dag=bool(dag))
        self._observer: Observer | None = None
        self._sched: Scheduler | None = None
        self._tokens: tuple[contextvars.Token[Any], contextvars.Token[Any]] | None = None
        self._closed = False

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> Runtime:
        """Start the runtime on the running loop and make it this context's current one.

        Raises:
            RuntimeError: it was started before.
            socket.gaierror: the host of ``listen`` or ``metrics`` cannot be
                resolved (the message names the option and the value).
            OSError: the transport could not listen (address in use, ...).
            CheckpointLockedError: another runtime writes the checkpoint log.
            CheckpointFormatError: the checkpoint file is not a checkpoint log.
        """
        if self._sched is not None or self._closed:
            raise RuntimeError("a Runtime can be started only once")
        loop = asyncio.get_running_loop()
        for option, given, host, port in self._addresses:
            try:
                await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                self._closed = True
                raise socket.gaierror(f"{option}={given!r}: cannot resolve the host {host!r} "
                                      f"({exc.strerror})") from None
        recorder = None
        if self._checkpoint is not None:
            from async_wf._recorder import Recorder

            recorder = Recorder(self._checkpoint, loop)
        obs = None
        if self._observe.any:
            from async_wf.observe._events import Observer

            obs = self._observer = Observer(self._observe)
            self._transport.set_observer(obs)
        sched = Scheduler(loop, self._transport, checkpoint=recorder, observer=obs)
        self._tokens = (current_scheduler.set(sched), _current_runtime.set(self))
        # the scheduler runs its callbacks in a context where it is current, so
        # that tasks started from any callback (even a thread's wake-up) can
        # submit nested tasks
        sched.set_context(contextvars.copy_context())
        self._sched = sched
        opened(loop, sched)
        try:
            await self._transport.start(sched, loop)
            if obs is not None:
                obs.start(sched, loop)
        except BaseException:
            # not left current: a @task called afterwards must run the function,
            # not submit to a runtime that will never run anything
            self._closed = True
            self._leave_context()
            closed(loop, sched)
            await sched.close(cancel=True)
            raise
        return self

    async def close(self, *, cancel: bool = False) -> None:
        """Stop: wait for outstanding tasks (or cancel them), then release resources.

        Idempotent. Futures of tasks that could not be finished fail with
        ``RuntimeClosedError``.
        """
        if self._closed or self._sched is None:
            self._closed = True
            return
        self._closed = True
        try:
            await self._sched.close(cancel=cancel)
        finally:
            closed(self._sched._loop, self._sched)
            self._leave_context()
            obs = self._observer
            if obs is not None:
                obs.close()
                obs.write_outputs()

    def _kind(self) -> str:
        name = type(self._transport).__name__.removesuffix("Transport").lower()
        workers = self._transport.statistics().get("workers")
        return name if workers is None else f"{name}, {workers} workers"

    def _counts(self) -> dict[str, int]:
        st = self._sched.statistics() if self._sched is not None else {}
        return {k: int(st.get(k, 0)) for k in
                ("submitted", "running", "finished", "reused", "failed", "cancelled")}

    def __repr__(self) -> str:
        if self._sched is None:
            state = "closed" if self._closed else "not started"
            return f"<async_wf.Runtime {self._kind()}, {state}>"
        c = self._counts()
        state = "closed" if self._closed else "running"
        reused = f", {c['reused']} reused" if c["reused"] else ""
        return (f"<async_wf.Runtime {self._kind()}, {state}: {c['submitted']} submitted, "
                f"{c['running']} running, {c['finished']} done{reused}, {c['failed']} failed>")

    def _repr_html_(self) -> str:
        """A small table and a progress bar, for Jupyter."""
        import html

        if self._sched is None:
            return f"<code>{html.escape(repr(self))}</code>"
        c = self._counts()
        ended = c["finished"] + c["reused"] + c["failed"] + c["cancelled"]
        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>"
                       for k, v in c.items())
        return (f"<div><b>async_wf.Runtime</b> {html.escape(self._kind())} "
                f"({'closed' if self._closed else 'running'})<br>"
                f"<progress value='{ended}' max='{max(c['submitted'], 1)}'></progress> "
                f"{ended}/{c['submitted']}<table>{rows}</table></div>")

    def _leave_context(self) -> None:
        """Stop being this context's current runtime (undo what ``start`` set)."""
        if self._tokens is None:
            return
        try:
            current_scheduler.reset(self._tokens[0])
            _current_runtime.reset(self._tokens[1])
        except ValueError:
            # closed from another context than it was started in
            current_scheduler.set(None)
            _current_runtime.set(None)
        self._tokens = None

    async def __aenter__(self) -> Runtime:
        return await self.start()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._sched is not None and exc_type is not None and issubclass(
            exc_type, KeyboardInterrupt | asyncio.CancelledError
        ):
            # Ctrl-C under asyncio.run arrives as a cancel of the main task
            self._sched.interrupted = True
        await self.close(cancel=exc_type is not None or not self._wait_on_exit)

    # ------------------------------------------------------------------- work
    def _scheduler(self) -> Scheduler:
        sched = self._sched
        if sched is None:
            raise RuntimeClosedError("the runtime is not started; use 'async with Runtime()'")
        return sched

    @overload
    def submit(
        self, fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kwargs: Any
    ) -> TaskFuture[T]: ...

    @overload
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> TaskFuture[T]: ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture[Any]:
        """Submit ``fn(*args, **kwargs)`` as a task; return its ``TaskFuture`` at once.

        Futures among the arguments (at any depth in lists, tuples, dicts and
        sets) become dependencies: the task starts when they are done and
        receives their values. ``fn`` may be a plain function (runs in a
        thread), an ``async def`` function (runs on the loop) or a ``@task``.

        Raises:
            TypeError: ``fn`` is not callable.
            ValueError: an argument is a future of another runtime.
            RuntimeClosedError: the runtime is not running.
            WorkflowAborted: the runtime was aborted by a failed task.
        """
        sched = self._sched
        if sched is None:
            raise RuntimeClosedError("the runtime is not started; use 'async with Runtime()'")
        return sched.submit(fn, args, kwargs)

    def options(self, **options: Unpack[TaskOptionArgs]) -> Submitter:
        """Submit calls with options of their own: ``rt.options(priority=10).submit(fn, x)``.

        Every ``@task`` option may be given; they apply on top of a task's
        own. An urgent request jumps the queue without a wrapper.

        Raises:
            TypeError: an option does not exist.
            ValueError: an option value breaks its rule.
        """
        return Submitter(dict(options), lambda: self._sched)

    async def barrier(self) -> None:
        """Wait until every task submitted so far has finished, failed or been cancelled.

        It does not raise for failed tasks; their futures do.
        """
        await self._scheduler().wait_idle()

    def statistics(self) -> RuntimeStatistics:
        """Counts and rates of this runtime.

        Returns:
            A dict with ``submitted``, ``waiting``, ``ready``, ``running``,
            ``finished``, ``failed``, ``cancelled``, ``retried``, ``reused``
            (tasks resolved from the checkpoint log without running),
            ``ready_queue`` (ready-queue length, the same as ``ready``),
            ``elapsed_s``, ``tasks_per_s`` (finished tasks per second since
            start) and ``core`` ("cython" or "python"); the transport's
            counters (``workers``, ``bytes_sent``, ...); with a checkpoint
            log also ``checkpoint_recorded`` (results appended by this run),
            ``checkpoint_unusable``, ``checkpoint_records`` (results in the
            log) and ``checkpoint_found`` (results it held when the run
            started). ``RuntimeStatistics`` lists them with their types.
        """
        sched = self._scheduler()
        stats = sched.statistics()
        stats.update(self._transport.statistics())
        ck = sched._ckpt
        if ck is not None:
            stats.update(ck.statistics())
        # the three parts are declared in RuntimeStatistics; a test keeps them so
        return cast("RuntimeStatistics", stats)

    def dag(self, path: str | os.PathLike[str]) -> None:
        """Write the graph of the tasks submitted so far to ``path`` in Graphviz DOT.

        One node per task (labelled with its name and number, coloured by
        its state), one edge per future passed as an argument.

        Raises:
            RuntimeError: the graph is not recorded: create the runtime with
                ``dag=True`` (or ``report=``).
        """
        obs = self._observer
        if obs is None or not obs.keep_graph:
            raise RuntimeError("the task graph is not recorded: use Runtime(dag=True) "
                               "to call dag()")
        from async_wf.observe.dag import write_dot

        write_dot(obs, os.fspath(path))

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the Prometheus endpoint while it runs, else None."""
        obs = self._observer
        return None if obs is None else obs.metrics_address

    @property
    def transport(self) -> Transport:
        """The transport that runs this runtime's tasks."""
        return self._transport


def current_runtime() -> Runtime:
    """Return the runtime entered in this context.

    Raises:
        RuntimeError: no runtime is running here.
    """
    rt = _current_runtime.get()
    # a closing runtime still serves the tasks it waits for (they may submit)
    if rt is None or rt._sched is None or (rt._closed and not rt._sched.accepting):
        raise RuntimeError("no async_wf runtime is running here; use 'async with Runtime()'")
    return rt


@overload
def submit(
    fn: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kwargs: Any
) -> TaskFuture[T]: ...


@overload
def submit(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> TaskFuture[T]: ...


def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture[Any]:
    """Submit a task to the runtime of the current context; see ``Runtime.submit``.

    Raises:
        RuntimeError: no runtime is running in this context.
    """
    sched = find_scheduler()
    if sched is None:
        raise RuntimeError("no async_wf runtime is running here; use 'async with Runtime()'")
    return sched.submit(fn, args, kwargs)


def options(**options: Unpack[TaskOptionArgs]) -> Submitter:
    """Per-call options for the runtime of the current context; see ``Runtime.options``.

    Raises:
        TypeError: an option does not exist.
        ValueError: an option value breaks its rule.
    """
    return Submitter(dict(options), find_scheduler)


async def gather(*futs: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
    """Wait for all ``futs``; return their results in order.

    Like ``asyncio.gather`` but returns a list. With ``return_exceptions``,
    exceptions take the place of results instead of being raised.
    """
    return list(await asyncio.gather(*futs, return_exceptions=return_exceptions))


async def wait(
    futs: Iterable[asyncio.Future[Any]],
    *,
    timeout: float | None = None,
    return_when: Literal["FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"] = "ALL_COMPLETED",
) -> tuple[set[asyncio.Future[Any]], set[asyncio.Future[Any]]]:
    """Wait for futures; return ``(done, pending)``, as ``asyncio.wait`` does.

    Raises:
        ValueError: ``futs`` is empty or ``return_when`` is not one of the three.
    """
    fs = set(futs)
    if not fs:
        raise ValueError("wait needs at least one future, got none")
    if return_when not in ("FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"):
        raise ValueError(
            "return_when must be 'FIRST_COMPLETED', 'FIRST_EXCEPTION' or 'ALL_COMPLETED', "
            f"got {return_when!r}"
        )
    return await asyncio.wait(fs, timeout=timeout, return_when=return_when)


async def as_completed(
    futs: Iterable[asyncio.Future[T]], *, timeout: float | None = None
) -> AsyncIterator[asyncio.Future[T]]:
    """Yield the futures themselves, each as soon as it is done.

    ``async for f in as_completed(futs): f.result()``. Unlike
    ``asyncio.as_completed`` it yields the original futures, so a caller can
    tell which one finished.

    Raises:
        TimeoutError: ``timeout`` seconds passed before all were done.
    """
    fs = list(dict.fromkeys(futs))
    if not fs:
        return
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[asyncio.Future[T]] = asyncio.Queue()
    for f in fs:
        f.add_done_callback(q.put_nowait)
    deadline = None if timeout is None else loop.time() + timeout
    try:
        for _ in range(len(fs)):
            if deadline is None:
                yield await q.get()
            else:
                left = deadline - loop.time()
                try:
                    yield await asyncio.wait_for(q.get(), max(left, 0))
                except TimeoutError:
                    raise TimeoutError(
                        f"as_completed: {len(fs)} futures not all done after {timeout} s"
                    ) from None
    finally:
        for f in fs:
            f.remove_done_callback(q.put_nowait)
