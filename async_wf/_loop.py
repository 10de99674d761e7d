"""The event loop async_wf runs on: ``run(main)`` and the loop factory it uses.

Kept apart from the public API so that a worker process or rank can get
the same loop without importing ``Runtime`` and everything behind it: this
module imports nothing of async_wf at import time (the MPI loop is imported
only on the root rank of an MPI launch).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["loop_factory", "mpi_launched", "run"]


def mpi_launched() -> bool:
    """Whether this is the root rank of an MPI launch (without importing mpi4py)."""
    # the launcher made a session if and only if it imported this module
    mod = sys.modules.get("async_wf._mpi_session")
    return mod is not None and mod.current_session() is not None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop ``run`` makes here; None for asyncio's default.

    On the root rank of an MPI launch, an asyncio loop that polls MPI
    itself (``async_wf._mpi_channel``); else uvloop's when installed.
    """
    if mpi_launched():
        from async_wf._mpi_channel import new_event_loop

        return new_event_loop
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Run an async ``main()`` to completion on uvloop when installed, else asyncio.

    On the root rank of an MPI launch (``python -m async_wf.mpi``), the loop
    is an asyncio loop that polls MPI itself (see ``async_wf._mpi_channel``).

    Args:
        main: the coroutine, e.g. ``main()``.
        debug: asyncio debug mode.

    Raises:
        RuntimeError: called from a running event loop.
    """
    # checked before a loop is made, as asyncio.run does: the Runner would
    # otherwise fail again while closing its new loop
    if asyncio._get_running_loop() is not None:
        name = getattr(main, "__name__", None) or "main"
        raise RuntimeError(
            f"async_wf.run() cannot be called from a running event loop (a notebook, "
            f"python -m asyncio, or async code): use 'await {name}()' there instead"
        )
    with asyncio.Runner(debug=debug, loop_factory=loop_factory()) as runner:
        return runner.run(main)
