"""Shared test set-up: every async test runs on the stock asyncio loop and on uvloop.

pytest-asyncio 1.x deprecates overriding the ``event_loop_policy`` fixture
(and warnings are errors here), so the two loops are given through its
``pytest_asyncio_loop_factories`` hook instead; the test ids carry
``[asyncio]`` or ``[uvloop]`` all the same.

``ASYNC_WF_TEST_LOOPS`` (comma-separated names) narrows that to some loops:
make test's second pass, on the pure-Python core twin, runs on uvloop only,
because which core runs and which loop runs are independent of each other
(the first pass covers both loops). A test that asks for a loop left out
is skipped, with the reason given.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator

import pytest
import uvloop

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


#: narrows the loops every async test runs on (see the module docstring)
LOOPS_ENV = "ASYNC_WF_TEST_LOOPS"


def selected_loops() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop factories named by ``ASYNC_WF_TEST_LOOPS``, or all when it is unset or empty."""
    raw = os.environ.get(LOOPS_ENV, "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        return LOOP_FACTORIES
    unknown = [n for n in names if n not in LOOP_FACTORIES]
    if unknown:
        raise pytest.UsageError(
            f"{LOOPS_ENV} must be a comma-separated list of {', '.join(LOOP_FACTORIES)}, "
            f"got {raw!r}"
        )
    return {n: LOOP_FACTORIES[n] for n in names}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run each async test once per event loop implementation (those selected)."""
    return selected_loops()


class ThreadSignal:
    """An event that a worker thread sets and the event loop awaits.

    Tests use it to learn, without sleeping, that a blocking task has
    really started in its thread.
    """

    def __init__(self) -> None:
        self._ev = threading.Event()

    def set(self) -> None:
        """Set from any thread."""
        self._ev.set()

    def is_set(self) -> bool:
        return self._ev.is_set()

    async def wait(self, timeout: float = 10.0) -> None:
        """Wait without blocking the loop; fail the test instead of hanging."""
        if not await asyncio.to_thread(self._ev.wait, timeout):
            raise AssertionError(f"thread signal not set within {timeout} s")


class Gate:
    """A ``threading.Event`` that blocking tasks wait on, opened by the test.

    ``wait`` gives up after a generous bound, so that a broken test cannot
    leave a thread blocked for ever.
    """

    def __init__(self) -> None:
        self._ev = threading.Event()

    def open(self) -> None:
        self._ev.set()

    def wait(self, timeout: float = 10.0) -> bool:
        return self._ev.wait(timeout)


@pytest.fixture
def gate() -> Iterator[Gate]:
    """A ``Gate`` that is opened at teardown whatever happened."""
    g = Gate()
    yield g
    g.open()


@pytest.fixture
def new_signal() -> Callable[[], ThreadSignal]:
    """A factory of ``ThreadSignal``s: ``started = new_signal()``."""
    return ThreadSignal
