"""The live progress display: ``Runtime(progress=True)``, ``async-wf run --progress``.

A ``rich`` bar on stderr: tasks ended out of tasks submitted, then the
counts done, running, queued, failed (and reused from a checkpoint log,
cancelled, when there are any) and the recent rate; a resumed run first
says how many records it found. It is one line when the terminal is wide
enough, else the counts go on a second line: every count is always shown
whole (six digits and more shortened to ``123k``, ``1.23M``), never cut.

"running" counts tasks that run, "queued" those handed to a transport that
have not started: waiting for a thread of this process, or sent ahead to
a worker beyond its slots (remote transports prefetch, see
``Transport.queued``). Tasks reused from a checkpoint log count as ended.

It is refreshed by the observer's timer on the runtime's loop (five times
a second), not by a thread of rich's own, so it reads the counters without
locks. When stderr is not a terminal (a pipe, a log file, CI) it shows
nothing at all.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from async_wf.observe._events import Observer

__all__ = ["ProgressDisplay", "short_count"]

_MIN_BAR = 10  # columns: below this the counts move to a line of their own


def short_count(n: float) -> str:
    """A count in at most 5 characters: whole below 100 000, else ``123k``, ``1.23M``."""
    if n < 100_000:
        return str(int(n))
    if n < 1_000_000:
        return f"{n / 1e3:.3g}k"
    return f"{n / 1e6:.3g}M"


def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


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
        self._live: Live | None = None
        self._said_resume = False
        if not self.active:
            return
        self._live = Live(console=self.console, auto_refresh=False, transient=False)
        self._live.start()
        self.tick()

    @staticmethod
    def describe(snap: Mapping[str, Any]) -> list[Text]:
        """The counts shown beside (or under) the bar, from an observer snapshot: one per item."""
        def get(key: str) -> int:
            return int(snap.get(key, 0))

        items = [Text(f"done {short_count(get('finished'))}"),
                 Text(f"running {short_count(get('running'))}")]
        if get("queued"):
            items.append(Text(f"queued {short_count(get('queued'))}", style="dim"))
        items.append(Text(f"failed {short_count(get('failed'))}",
                          style="red" if get("failed") else ""))
        if get("reused"):
            items.append(Text(f"reused {short_count(get('reused'))}", style="cyan"))
        if get("cancelled"):
            items.append(Text(f"cancelled {short_count(get('cancelled'))}", style="yellow"))
        alloc = snap.get("allocations")
        if isinstance(alloc, Mapping) and alloc.get("jobs") is not None:
            # a cluster allocator: its jobs, and the workers they brought
            workers = sum(len(j.get("workers", ())) for j in alloc["jobs"].values())
            items.append(Text(f"jobs {alloc.get('running', 0)} running, "
                              f"{alloc.get('pending', 0)} pending, {workers} workers",
                              style="magenta"))
        rate = float(snap.get("rate", 0.0))
        items.append(Text(f"{short_count(round(rate))} tasks/s"))
        return items

    @staticmethod
    def _pack(items: list[Text], width: int) -> list[Text]:
        """``items`` joined by `` | `` into lines of at most ``width`` cells, never split."""
        lines: list[Text] = []
        line = Text()
        for item in items:
            if line.cell_len and line.cell_len + 3 + item.cell_len > width:
                lines.append(line)
                line = Text()
            if line.cell_len:
                line.append(" | ")
            line.append_text(item)
        lines.append(line)
        return lines

    def render(self) -> RenderableType:
        """What the display shows now: the bar and the counts, on one line or more."""
        snap = self.obs.snapshot
        # reused tasks count as ended: a resumed run ends at N/N, not part-way
        ended = sum(int(snap.get(k, 0)) for k in ("finished", "failed", "cancelled", "reused"))
        submitted = int(snap.get("submitted", 0))
        head = f"{short_count(ended)}/{short_count(submitted)}"
        clock = _elapsed(time.time() - self.obs.t0_wall)
        width = self.console.width
        fixed = len("async_wf") + len(head) + len(clock) + 3  # and a space between columns
        (counts, *more) = self._pack(self.describe(snap), width)
        one_line = not more and fixed + _MIN_BAR + 1 + counts.cell_len <= width
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(no_wrap=True)
        grid.add_column(ratio=1, min_width=1)
        grid.add_column(no_wrap=True)
        if one_line:
            grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        bar = ProgressBar(total=max(submitted, 1), completed=ended if submitted else 0)
        cells: list[RenderableType] = [Text("async_wf", style="bold"), bar, Text(head)]
        if one_line:
            cells.append(counts)
        cells.append(Text(clock, style="yellow"))
        grid.add_row(*cells)
        if one_line:
            return grid
        return Group(grid, counts, *more)

    def tick(self) -> None:
        """Redraw from the observer's latest snapshot."""
        live = self._live
        if live is None:
            return
        snap = self.obs.snapshot
        found = int(snap.get("checkpoint_found", 0))
        if found and not self._said_resume:
            self._said_resume = True
            live.console.print(f"async_wf: resuming from {snap.get('checkpoint_path')}: "
                               f"{found} record{'' if found == 1 else 's'}", markup=False)
        live.update(self.render(), refresh=True)

    def close(self) -> None:
        """Leave the last state on the terminal and stop."""
        if self._live is not None:
            self._live.stop()
            self._live = None
