"""The live progress line: ``Runtime(progress=True)``, ``async-wf run --progress``.

A ``rich`` progress bar on stderr: tasks ended out of tasks submitted, with
the counts running, done, reused from a checkpoint log, failed and the
recent rate; a resumed run first says how many records it found. It is
refreshed by the observer's timer on the runtime's loop (five times a second), not by a
thread of rich's own, so it reads the counters without locks. When stderr
is not a terminal (a pipe, a log file, CI) it shows nothing at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from async_wf.observe._events import Observer

__all__ = ["ProgressDisplay"]


class ProgressDisplay:
    """The progress bar of one runtime; ``active`` is False when stderr is not a terminal.

    Args:
        obs: the runtime's observer, whose ``snapshot`` it shows.
        console: where to draw (default: stderr).
    """

    def __init__(self, obs: Observer, console: Console | None = None) -> None:
        self.obs = obs
        self.console = console or Console(stderr=True)
        self.active = self.console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._said_resume = False
        if not self.active:
            return
        self._progress = Progress(
            TextColumn("[bold]async_wf"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=self.console,
            auto_refresh=False,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("tasks", total=0, counts="")
        self.tick()

    @staticmethod
    def describe(snap: dict[str, object]) -> str:
        """The counts shown beside the bar, from an observer snapshot."""
        reused = int(snap.get("reused", 0))  # type: ignore[call-overload]
        return (f"submitted {snap.get('submitted', 0)} | running {snap.get('running', 0)} | "
                f"done {snap.get('finished', 0)} | "
                + (f"[cyan]reused {reused}[/] | " if reused else "")
                + f"failed {snap.get('failed', 0)} | "
                f"{float(snap.get('rate', 0.0)):.0f} tasks/s")  # type: ignore[arg-type]

    def tick(self) -> None:
        """Redraw from the observer's latest snapshot."""
        progress = self._progress
        if progress is None or self._task is None:
            return
        snap = self.obs.snapshot
        found = int(snap.get("checkpoint_found", 0))
        if found and not self._said_resume:
            self._said_resume = True
            progress.console.print(f"async_wf: resuming from {snap.get('checkpoint_path')}: "
                                   f"{found} record{'' if found == 1 else 's'}", markup=False)
        # reused tasks count as done: a resumed run ends at N/N, not part-way
        ended = int(snap.get("finished", 0)) + int(snap.get("failed", 0)) \
            + int(snap.get("cancelled", 0)) + int(snap.get("reused", 0))
        progress.update(self._task, total=int(snap.get("submitted", 0)), completed=ended,
                        counts=self.describe(snap))
        progress.refresh()

    def close(self) -> None:
        """Leave the last state on the terminal and stop."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
