"""``Checkpoint``: how a runtime records finished tasks, as the user configures it.

A plain value object: ``async_wf._recorder.Recorder`` reads it to open the
log; nothing here imports the runtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from async_wf.checkpoint._log import (
    DEFAULT_FLUSH,
    DEFAULT_FLUSH_EVERY,
    DEFAULT_FLUSH_INTERVAL,
)


@dataclass(frozen=True)
class Checkpoint:
    """Where and how a runtime records finished tasks; ``Runtime(checkpoint=...)``.

    A plain path is the same as ``Checkpoint(path)``. docs/checkpoint.md
    says exactly what each flush policy keeps after a crash or a power loss.

    Args:
        path: the log file, created if missing. One runtime at a time may
            write it: a second gets ``CheckpointLockedError``.
        flush: when records are written to the file: ``"record"``
            (default: the results of the tasks that finished in one loop
            iteration are written, with one call, before their dependents
            are dispatched, so a SIGKILL costs only the running tasks),
            ``"every"`` (every ``flush_every`` records) or ``"interval"``
            (at most every ``flush_interval`` seconds, and by a timer when
            tasks stop finishing; a SIGKILL loses up to that much).
        flush_every: records per write with ``flush="every"``.
        flush_interval: seconds between writes with ``flush="interval"``.
        fsync: make every write durable (``fdatasync``) against power loss.
        warn_bytes: once a function's recorded results (arrays and bytes,
            counted by their size in memory) pass this many bytes in a run,
            a warning says so once, pointing at ``@task(checkpoint=False)``
            for intermediates; 0 turns it off. Default 1 GiB.
        strict: a module-level value that a task's function reads and that
            has no stable hash (a logger, a lock, a client) fails ``submit``
            with ``CheckpointKeyError`` naming it, rather than being left
            out of the key (logged at DEBUG; ``async_wf.checkpoint.explain``).

    Raises:
        ValueError: an option breaks its rule (checked when the log opens).
    """

    path: str | os.PathLike[str]
    flush: str = DEFAULT_FLUSH
    flush_every: int = DEFAULT_FLUSH_EVERY
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    fsync: bool = False
    strict: bool = False
    warn_bytes: int = 1 << 30
