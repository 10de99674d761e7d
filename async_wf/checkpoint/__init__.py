"""The incremental checkpoint log: task keys, the append-only log file, its tools.

``task_key`` and ``function_identity`` make deterministic, content-addressed
keys (``explain`` says what a function's identity sees); ``CheckpointLog``
stores results, MPI task states and commits under them; ``inspect``,
``verify``, ``compact`` and ``forget_function`` are what ``async-wf
checkpoint`` runs. docs/checkpoint.md describes the format and its
guarantees.
"""

from async_wf.checkpoint._format import CheckpointCorruptError, CheckpointFormatError
from async_wf.checkpoint._keys import (
    CheckpointError,
    CheckpointKeyError,
    FileArg,
    FileIn,
    FileInOut,
    FileOut,
    FileRef,
    KeyReport,
    explain,
    function_identity,
    stable_hash,
    task_key,
    tree_digest,
)
from async_wf.checkpoint._log import (
    CheckpointLockedError,
    CheckpointLog,
    FunctionStats,
    LogStatistics,
    ResultInfo,
)
from async_wf.checkpoint._scan import Problem
from async_wf.checkpoint._tools import (
    Compaction,
    Verification,
    compact,
    forget_function,
    inspect,
    verify,
)

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointKeyError",
    "CheckpointLockedError",
    "CheckpointLog",
    "Compaction",
    "FileArg",
    "FileIn",
    "FileInOut",
    "FileOut",
    "FileRef",
    "FunctionStats",
    "KeyReport",
    "LogStatistics",
    "Problem",
    "ResultInfo",
    "Verification",
    "compact",
    "explain",
    "forget_function",
    "function_identity",
    "inspect",
    "stable_hash",
    "task_key",
    "tree_digest",
    "verify",
]
