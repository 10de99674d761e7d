"""async_wf: an asyncio-native task runtime for Python workflows.

``submit(fn, *args)`` returns an awaitable future at once; futures passed as
arguments become dependencies; ``await`` gives the result::

    import async_wf

    async def main():
        async with async_wf.Runtime() as rt:
            a = rt.submit(load, "x.csv")
            b = rt.submit(clean, a)          # runs when a is done, gets its value
            print(await b)

    async_wf.run(main())
"""

from async_wf._allocator import AllocationError, Allocator
from async_wf._api import (
    Runtime,
    as_completed,
    current_runtime,
    gather,
    options,
    submit,
    wait,
)
from async_wf._context import TaskContext, task_context
from async_wf._errors import (
    DependencyError,
    NoWorkerError,
    RemoteError,
    RemoteTraceback,
    ResourceError,
    RuntimeClosedError,
    TaskTimeoutError,
    WorkerLostError,
    WorkflowAborted,
)
from async_wf._executor import Executor, ExecutorFuture
from async_wf._futures import TaskFuture
from async_wf._loop import run
from async_wf._options import TaskOptions
from async_wf._program import ProgramError, ProgramResult, run_program
from async_wf._slurm import SlurmAllocator, SlurmJob
from async_wf._task import Submitter, TaskFunction, task
from async_wf.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointKeyError,
    CheckpointLockedError,
    FileIn,
    FileInOut,
    FileOut,
    FileRef,
)
from async_wf.checkpoint._config import Checkpoint
from async_wf.core import CORE_IMPL

__version__ = "0.1.0"

__all__ = [
    "CORE_IMPL",
    "AllocationError",
    "Allocator",
    "Checkpoint",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointKeyError",
    "CheckpointLockedError",
    "DependencyError",
    "Executor",
    "ExecutorFuture",
    "FileIn",
    "FileInOut",
    "FileOut",
    "FileRef",
    "NoWorkerError",
    "ProgramError",
    "ProgramResult",
    "RemoteError",
    "RemoteTraceback",
    "ResourceError",
    "Runtime",
    "RuntimeClosedError",
    "SlurmAllocator",
    "SlurmJob",
    "Submitter",
    "TaskFunction",
    "TaskContext",
    "TaskFuture",
    "TaskOptions",
    "TaskTimeoutError",
    "WorkerLostError",
    "WorkflowAborted",
    "__version__",
    "as_completed",
    "current_runtime",
    "gather",
    "options",
    "run",
    "run_program",
    "submit",
    "task",
    "task_context",
    "wait",
]


def _public_exception_names() -> None:
    # exceptions print and pickle as async_wf.X, where users import them from,
    # not as the private module that defines them
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) and issubclass(obj, BaseException):
            obj.__module__ = __name__


_public_exception_names()
