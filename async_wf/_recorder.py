"""The checkpoint log as a runtime uses it: keys at submit, records at completion.

``Recorder`` is what the scheduler holds, made from the user's
``Checkpoint`` (``checkpoint/_config.py``): the runtime's side of the
storage package ``async_wf.checkpoint``, which knows nothing of the
runtime. It computes each task's key when the task is submitted (from the
function's identity, the keys of the futures it receives and a content
hash of its other arguments), says whether the log has a result for it,
reads that result when it is wanted, appends the results of tasks that
finish, and keeps the states that long tasks save per step.

Everything here runs on the scheduler's event loop thread, like the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import shlex
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from async_wf._extension import compiled
from async_wf._futures import TaskFuture, _fn_name
from async_wf.checkpoint._config import Checkpoint
from async_wf.checkpoint._keys import (
    CheckpointError,
    CheckpointKeyError,
    FileArg,
    FileRef,
    KeyReport,
    _identity,
    _quick_key,
    function_identity,
    stable_hash,
    task_key,
)
from async_wf.checkpoint._log import CheckpointLog

if TYPE_CHECKING:
    from async_wf._files import FilePlan
    from async_wf._options import TaskOptions

log = logging.getLogger("async_wf")

#: values smaller than this are not counted toward warn_bytes (cheap to record)
_BIG_VALUE = 64 << 10
_FID_CACHE = 10_000  # function identities kept per runtime (lambdas made in a loop)

_ext = compiled()
if _ext is not None:
    # the compiled per-task loops read these classes' slots at their offsets
    from async_wf._options import TaskOptions as _TaskOptions

    _ext.bind_task_types(TaskFuture, _TaskOptions)


def _leaf(obj: Any) -> bytes | None:
    # a future stands for its task's key; Recorder.key checked they all have one
    if isinstance(obj, TaskFuture):
        key: bytes = obj._ckey  # type: ignore[assignment]
        return key
    return None


def _file_leaf(produced: dict[str, TaskFuture[Any]]) -> Callable[[Any], bytes | None]:
    """``_leaf``, and a file written earlier in the run stands for its writer's key."""

    def leaf(obj: Any) -> bytes | None:
        if isinstance(obj, TaskFuture):
            key: bytes = obj._ckey  # type: ignore[assignment]
            return key
        if isinstance(obj, FileRef):
            writer = produced.get(os.path.abspath(obj.path))
            if writer is not None:
                # not the content, which does not exist yet at submit; the
                # kind and the path as given, as their encodings hold them
                return stable_hash((type(obj).__name__, obj.by, obj.path,
                                    writer._ckey))
        return None

    return leaf


#: the name under which the outputs of a task are recorded (``async-wf checkpoint inspect``)
OUTPUTS_NAME = "async_wf:file outputs"


def outputs_key(key: bytes) -> bytes:
    """The key of the record that holds the outputs of the task whose key is ``key``."""
    return hashlib.blake2b(b"outputs\0" + key, digest_size=len(key)).digest()


def _program_identity(fn: Any, version: str | None, strict: bool) -> bytes | None:
    """The identity of a ``binary=`` task: its function plus the command line."""
    from async_wf._program import ProgramTask

    if not isinstance(fn, ProgramTask):
        return None
    parts: tuple[Any, ...] = (function_identity(fn.fn, version, strict), str(fn.binary),
                               tuple(fn.args), fn.nprocs)
    if not getattr(fn, "output", True):
        # its results carry no output: not those of the same program with output kept
        parts += ("output", False)
    return stable_hash(parts)


class _RecorderFastPy:
    """The pure-Python twin of ``_core.RecorderFast``: ``Recorder.key``'s commonest call, ``in``.

    ``key`` takes a call with no futures, no keyword arguments, no ``key=``
    or ``version=`` option, whose function's identity is cached, and whose
    arguments ``_quick_key`` encodes; anything else goes to ``_key``.
    """

    _fids: dict[Any, bytes]
    _live: dict[bytes, int]

    def key(
        self,
        fn: Callable[..., Any],
        opts: TaskOptions,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        found: list[TaskFuture[Any]],
        plan: FilePlan | None = None,
    ) -> bytes | None:
        """The task's key, or None when it cannot have one (``Recorder._key`` says when).

        Raises:
            CheckpointKeyError: see ``Recorder._key``.
        """
        if (not found and not kwargs and type(args) is tuple and opts.key is None
                and opts.version is None):
            try:
                fid = self._fids.get(fn)
            except TypeError:  # an unhashable callable object
                fid = None
            if type(fid) is bytes:
                key = _quick_key(fid, args, None)
                if key is not None:
                    return key
        return self._key(fn, opts, args, kwargs, found, plan)

    def _key(
        self,
        fn: Callable[..., Any],
        opts: TaskOptions,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        found: list[TaskFuture[Any]],
        plan: FilePlan | None = None,
    ) -> bytes | None:
        raise NotImplementedError

    def __contains__(self, key: bytes) -> bool:
        """Whether the log has a result for ``key``."""
        return key in self._live


if TYPE_CHECKING:
    _RecorderFast = _RecorderFastPy
else:
    # the scheduler's per-task calls (key, in) without a Python frame
    _RecorderFast = _RecorderFastPy if _ext is None else _ext.RecorderFast


class Recorder(_RecorderFast):
    """The scheduler's side of a checkpoint log (see the module docstring).

    Args:
        config: the user's ``Checkpoint``.
        loop: the scheduler's loop, for the flush timer.

    Raises:
        CheckpointLockedError: another runtime writes the log.
        CheckpointFormatError: the file is not a checkpoint log.
        ValueError: a flush option breaks its rule.
    """

    def __init__(self, config: Checkpoint, loop: asyncio.AbstractEventLoop) -> None:
        wb = config.warn_bytes
        if isinstance(wb, bool) or not isinstance(wb, int) or wb < 0:
            raise ValueError(f"warn_bytes must be an int >= 0, got {wb!r}")
        self.config = config
        # bytes of the large values recorded per function name, until warned
        self._big: dict[str, int] = {}
        self.log = CheckpointLog(
            config.path,
            flush=config.flush,
            flush_every=config.flush_every,
            flush_interval=config.flush_interval,
            fsync=config.fsync,
        )
        self._loop = loop
        # function object (or (function, version)) -> function_identity
        self._fids: dict[Any, bytes] = {}
        self._names: dict[tuple[Any, str | None], str] = {}
        # the record name of each function called without name= (the key
        # the compiled loop of record() looks up; bounded like _names)
        self._fn_names: dict[Any, str] = {}
        # the log's index: a key is recorded when it is in here
        self._live = self.log._results
        #: the log's last committed step of each task that saved steps, key ->
        #: (step, ranks): while it is empty no task has a step to restore, and a
        #: transport asks ``restore`` nothing (the same dict all along)
        self.commits = self.log._commits
        self._warned: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._reader: CheckpointLog | None = None
        # tasks with FileOut/FileInOut arguments -> those arguments; weak, so
        # that a task that fails (and is never recorded) leaves nothing here
        self._outputs: weakref.WeakKeyDictionary[TaskFuture[Any], list[FileArg]] = \
            weakref.WeakKeyDictionary()
        # state saves of tasks on several ranks: key -> step -> ranks that saved
        self._saves: dict[bytes, dict[int, set[int]]] = {}
        #: results appended, recorded results that could not be used
        self.n_recorded = 0
        self.n_unusable = 0
        self.found_at_open = len(self.log)
        if self.found_at_open:
            log.info("resuming from %s: %d record%s", self.log.path, self.found_at_open,
                     "" if self.found_at_open == 1 else "s")
        for problem in self.log.problems[:5]:
            log.warning("checkpoint log %s: %s at byte %d", self.log.path, problem.reason,
                        problem.offset)
        if len(self.log.problems) > 5:
            log.warning("checkpoint log %s: %d more problems (async-wf checkpoint verify %s)",
                        self.log.path, len(self.log.problems) - 5, self.log.path)
        if config.flush == "interval" and math.isfinite(config.flush_interval):
            self._timer = loop.call_later(config.flush_interval, self._tick)

    # ------------------------------------------------------------------ keys
    def identity(self, fn: Callable[..., Any], version: str | None) -> bytes:
        """``function_identity(fn, version)``, cached per function object."""
        # keyed by the function alone when there is no version: no tuple to
        # build and hash per task
        ck: Any = fn if version is None else (fn, version)
        try:
            fid = self._fids.get(ck)
        except TypeError:  # an unhashable callable object
            ck, fid = None, None
        if fid is None:
            strict = self.config.strict
            fid = _program_identity(fn, version, strict)
            if fid is None:
                seen = KeyReport(_fn_name(fn))
                fid = _identity(fn, version, strict, seen)
                if seen.left_out:
                    log.debug("the key of %s leaves out %s: no stable hash (a change of "
                              "them reruns nothing)", seen.function,
                              ", ".join(f"{g} ({t})" for _, g, t in seen.left_out))
            if ck is not None:
                if len(self._fids) >= _FID_CACHE:
                    self._fids.clear()
                self._fids[ck] = fid
        return fid

    def _key(
        self,
        fn: Callable[..., Any],
        opts: TaskOptions,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        found: list[TaskFuture[Any]],
        plan: FilePlan | None = None,
    ) -> bytes | None:
        """The task's key, or None when it cannot have one (``key`` but for its commonest call).

        A task has no key when one of its inputs has none, or when it is
        declared ``checkpoint=False`` and its arguments have no stable hash.

        Raises:
            CheckpointKeyError: an argument (or the function) has no stable
                hash and the task is recorded; the message names the
                argument and the ways out.
        """
        if found:
            for dep in found:
                if dep._ckey is None:
                    name = opts.name or _fn_name(fn)
                    self._warn_once(
                        name, f"task {name!r} is not recorded in the checkpoint log: its input "
                        f"from task {dep.name!r} has no key"
                    )
                    return None
            leaf = _leaf if plan is None or not plan.produced else _file_leaf(plan.produced)
        else:
            leaf = None
        version = opts.version
        try:
            fid = self._fids.get(fn if version is None else (fn, version))
        except TypeError:
            fid = None
        try:
            if fid is None:
                fid = self.identity(fn, version)
            if opts.key is not None:
                return task_key(fid, (opts.key(*args, **kwargs),), {}, leaf)
            if not kwargs:
                # task_key's own first step, without its call
                key = _quick_key(fid, args, leaf)
                if key is not None:
                    return key
            return task_key(fid, args, kwargs, leaf)
        except CheckpointKeyError as exc:
            if not opts.checkpoint:
                return None
            raise CheckpointKeyError(f"task {opts.name or _fn_name(fn)!r}: {exc}") from None

    # -------------------------------------------------------------- outputs
    def expect_outputs(self, fut: TaskFuture[Any], outputs: list[FileArg]) -> None:
        """Record the content of ``outputs`` with ``fut``'s result when it finishes."""
        self._outputs[fut] = outputs

    def outputs_match(self, key: bytes, name: str) -> bool:
        """Whether the recorded outputs of task ``key`` are still there, unchanged.

        When they are not, the task's record is forgotten (a tombstone), so
        that its rerun is recorded in its place.
        """
        okey = outputs_key(key)
        why = None
        if okey not in self.log:
            why = "its outputs were not recorded"
        else:
            try:
                recorded = self.read(okey)
            except Exception as exc:
                recorded = ()
                why = f"the record of its outputs cannot be read ({exc})"
            for path, by, digest in recorded:
                try:
                    now = FileRef(path, by).digest()
                except OSError:
                    why = f"its output {path} is missing"
                    break
                if now != digest:
                    why = f"its output {path} changed since it ran"
                    break
        if why is None:
            return True
        log.info("task %r: %s; running it again", name, why)
        if not self._closed:
            try:
                self.log.forget(key)
            except CheckpointError as err:
                self._warn_once("", f"checkpoint log {self.log.path}: no more records: {err}")
        return False

    def read(self, key: bytes) -> Any:
        """The recorded result of ``key``.

        Raises:
            CheckpointCorruptError: the record is damaged.
            Exception: what unpickling raises.
        """
        if self._closed:
            # a future awaited after its runtime ended: read from a read-only
            # view, which takes no lock (another run may write the log now)
            if self._reader is None:
                self._reader = CheckpointLog(self.config.path, readonly=True)
            return self._reader.get(key)
        return self.log.get(key)

    def unusable(self, name: str, key: bytes, exc: BaseException) -> None:
        """Report a recorded result that could not be read; the task reruns."""
        self.n_unusable += 1
        log.warning("task %r: its recorded result cannot be used (%s: %s); running it again",
                    name, type(exc).__name__, exc)
        if not self._closed and key in self.log:
            # a tombstone, so that the rerun's result is recorded in its place
            # (the damaged bytes stay for verify to report)
            try:
                self.log.forget(key)
            except CheckpointError as err:
                self._warn_once("", f"checkpoint log {self.log.path}: no more records: {err}")

    def record(self, done: list[tuple[TaskFuture[Any], Any]]) -> None:
        """Append the results of tasks that finished; failures only warn."""
        log_ = self.log
        try:
            # the common pairs in one compiled loop (CheckpointLog.put_done),
            # unless tasks with file outputs wait for their records; _item
            # makes the records of the others (a task with name=, a function
            # not seen yet, a value whose size counts toward warn_bytes)
            tried, failed = log_.put_done(done, self._item,
                                          None if self._outputs else self._fn_names, _BIG_VALUE)
        except CheckpointError as exc:
            # a failed write (disk full): the log refuses further records
            self._warn_once("", f"checkpoint log {log_.path}: no more records: {exc}")
            return
        self.n_recorded += tried - len(failed)
        for key, err in failed:
            fut = next(f for f, _ in done if f._ckey == key)
            self._warn_once(
                fut.name, f"task {fut.name!r}: result not recorded, it cannot be pickled "
                f"({type(err).__name__}: {err}); declare it with checkpoint=False"
            )

    def _item(self, fut: TaskFuture[Any], value: Any,
              items: list[tuple[bytes, Any, str, tuple[bytes, ...]]]) -> None:
        """Add the record(s) of one finished task to ``items`` (``put_done``'s general way)."""
        key = fut._ckey
        assert key is not None and fut._cparents is not None
        if key in self._live:
            return  # an identical task (same key) finished earlier
        fn = fut._fn
        opts_name = fut._opts.name
        names = self._names
        nk = (fn, opts_name)
        try:
            name = names.get(nk)
            hashable = True
        except TypeError:  # an unhashable callable object: not cached
            name, hashable = None, False
        if name is None:
            name = f"{getattr(fn, '__module__', None) or '?'}:{fut.name}"
            if hashable and len(names) < _FID_CACHE:
                names[nk] = name
                if opts_name is None and len(self._fn_names) < _FID_CACHE:
                    self._fn_names[fn] = name
        items.append((key, value, name, fut._cparents))
        nbytes = getattr(value, "nbytes", None)
        if type(nbytes) is int and nbytes >= _BIG_VALUE:
            self._count_big(name, nbytes)
        elif type(value) is bytes and len(value) >= _BIG_VALUE:
            self._count_big(name, len(value))
        if self._outputs:
            outs = self._outputs.pop(fut, None)
            if outs is not None:
                self._add_outputs(items, fut, key, outs)

    def _count_big(self, name: str, nbytes: int) -> None:
        limit = self.config.warn_bytes
        total = self._big.get(name, 0)
        if not limit or total < 0:
            return  # off, or warned already
        total += nbytes
        if total < limit:
            self._big[name] = total
            return
        self._big[name] = -1
        log.warning("task function %s has put %.0f MiB of results in the checkpoint log %s "
                    "in this run; if they are intermediates that are cheap to recompute, "
                    "declare it @task(checkpoint=False): its dependents are still recorded",
                    name, total / (1 << 20), self.log.path)

    def _add_outputs(self, items: list[tuple[bytes, Any, str, tuple[bytes, ...]]],
                     fut: TaskFuture[Any], key: bytes, outs: list[FileArg]) -> None:
        recorded = []
        for out in outs:
            try:
                recorded.append((out.path, out.by, FileRef(out.path, out.by).digest()))
            except OSError as exc:
                # recorded without its outputs: the next run finds no outputs
                # record and runs the task again
                self._warn_once(fut.name, f"task {fut.name!r} finished but its output "
                                f"{out.path} cannot be read ({exc.strerror or exc}); it "
                                "will run again in the next run")
                return
        items.append((outputs_key(key), tuple(recorded), OUTPUTS_NAME, (key,)))

    # -------------------------------------------------------------- states
    def save(self, key: bytes, rank: int, nranks: int, step: int, state: Any) -> None:
        """Record ``rank``'s state of task ``key`` at ``step``; commit once all ranks have.

        The commit is written to the file at once (and synced with ``fsync``).

        Raises:
            CheckpointError: the log takes no records.
            Exception: what pickling the state raises.
        """
        self.log.put_state(key, rank, step, state)
        if nranks > 1:
            steps = self._saves.setdefault(key, {})
            ranks = steps.setdefault(step, set())
            ranks.add(rank)
            if len(ranks) < nranks:
                return
            for s in [s for s in steps if s <= step]:
                del steps[s]
        self.log.commit(key, step, nranks)
        # a step stands for a long stretch of work: written at once, whatever
        # the flush policy, so that a crash right after it does not lose it
        self.log.flush()

    def restore(self, key: bytes, nranks: int) -> tuple[int, list[Any]] | None:
        """(step, the state of each rank) of the task's last complete step, or None.

        None when nothing was committed, when the commit was made by another
        number of ranks, or when a state cannot be read (reported).
        """
        committed = self.log.committed(key)
        if committed is None or committed[1] != nranks:
            return None
        states = []
        for rank in range(nranks):
            try:
                got = self.log.restore(key, rank)
            except Exception as exc:
                log.warning("checkpoint log %s: saved state of rank %d unusable (%s); the "
                            "task starts over", self.log.path, rank, exc)
                return None
            if got is None:
                return None
            states.append(got[1])
        return committed[0], states

    # ------------------------------------------------------------ lifecycle
    def _tick(self) -> None:
        self._timer = None
        try:
            self.log.flush_if_due()
        except CheckpointError as exc:
            self._warn_once("", f"checkpoint log {self.log.path}: no more records: {exc}")
            return
        self._timer = self._loop.call_later(self.config.flush_interval, self._tick)

    def close(self, reused: int = 0, submitted: int = 0, ran: int = 0,
              interrupted: bool = False) -> None:
        """Write what is buffered and close the log; later reads use a read-only view.

        Logs what the run did with the log (``reused`` of ``submitted`` tasks
        came from it, ``ran`` were executed) at INFO, and with
        ``interrupted`` a warning that says how to resume.
        """
        if self._closed:
            return
        log.info("checkpoint log %s: reused %d of %d tasks, ran %d", self.log.path, reused,
                 submitted, ran)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self.log.close()
        except CheckpointError as exc:
            log.error("checkpoint log %s: closing failed: %s", self.log.path, exc)
        if interrupted:
            n = len(self.log)
            log.warning("interrupted: %d finished task%s recorded in %s; run the same command "
                        "again to resume from them: %s", n, " is" if n == 1 else "s are",
                        self.log.path, shlex.join(["python", *sys.argv]))

    def statistics(self) -> dict[str, int]:
        """Counts for ``Runtime.statistics``."""
        return {
            "checkpoint_recorded": self.n_recorded,
            "checkpoint_unusable": self.n_unusable,
            "checkpoint_records": len(self.log),
            "checkpoint_found": self.found_at_open,
        }

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)
