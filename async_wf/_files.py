"""The order of tasks that share files: who waits for whom (``FileIn``/``FileOut``/``FileInOut``).

The scheduler keeps, per path (made absolute), the last task that writes it
and the tasks that have read that version since. A task that reads a path
waits for its writer (read after write); a task that writes it waits for
the writer and for those readers (write after write, write after read), and
then becomes the writer. That is the order PyCOMPSs gives ``FILE_IN``,
``FILE_OUT`` and ``FILE_INOUT``, without its renaming of versions: a writer
waits for the readers of the previous version instead of writing a copy.

The key of a task that reads a path written in this run stands for that
writer's key and the path, since the content does not exist at submit.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from async_wf._futures import RecordedFuture
from async_wf.checkpoint._keys import FileArg, FileInOut, FileOut, FileRef

if TYPE_CHECKING:
    from async_wf._futures import TaskFuture

#: done readers are dropped from a path's list when it grows past this
_PRUNE_AT = 64


class FilePlan:
    """What one task does with files: the paths it reads and writes, its outputs."""

    __slots__ = ("deps", "outputs", "produced", "reads", "writes")

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.writes: list[str] = []
        #: the FileOut/FileInOut arguments, whose content is recorded
        self.outputs: list[FileArg] = []
        #: the tasks it must wait for
        self.deps: list[TaskFuture[Any]] = []
        #: absolute path -> the task that writes it, for the paths it reads
        self.produced: dict[str, TaskFuture[Any]] = {}


class FileOrder:
    """Per runtime: the writer and the readers of each path (see the module docstring)."""

    def __init__(self) -> None:
        self._writer: dict[str, TaskFuture[Any]] = {}
        self._readers: dict[str, list[TaskFuture[Any]]] = {}

    def plan(self, files: list[FileArg]) -> FilePlan:
        """The paths, outputs and waits of a task that receives ``files``."""
        plan = FilePlan()
        for f in files:
            path = os.path.abspath(f.path)
            if isinstance(f, FileOut | FileInOut):
                plan.writes.append(path)
                plan.outputs.append(f)
            if isinstance(f, FileRef):
                plan.reads.append(path)
        deps = plan.deps
        for path in plan.reads:
            w = self._writer.get(path)
            if w is not None:
                plan.produced[path] = w
                if w not in deps:
                    deps.append(w)
        for path in plan.writes:
            w = self._writer.get(path)
            if w is not None and w not in deps:
                deps.append(w)
            for r in self._readers.get(path, ()):
                if r not in deps:
                    deps.append(r)
        return plan

    def register(self, fut: TaskFuture[Any], plan: FilePlan) -> None:
        """Record that ``fut`` (submitted with ``plan``) reads and writes its paths."""
        written = set(plan.writes)
        for path in plan.reads:
            if path in written:
                continue
            readers = self._readers.setdefault(path, [])
            if len(readers) >= _PRUNE_AT:
                # a recorded reader counts as done (done() would read its record)
                readers[:] = [r for r in readers
                              if type(r) is not RecordedFuture and not r.done()]
            readers.append(fut)
        for path in written:
            self._writer[path] = fut
            self._readers[path] = []
