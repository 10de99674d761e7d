"""The interface between the TCP transport and a batch system that starts its workers.

An ``Allocator`` gets workers from elsewhere (Slurm jobs today; Kubernetes
pods could be next): the transport listens, hands the allocator the address
and the environment a worker needs (the token travels there, never on a
command line), then calls ``tick`` about once a second with the backlog and
the workers connected, and ``close`` at the end. Workers join over the
ordinary authenticated TCP handshake; the allocator never talks to them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["AllocationError", "Allocator"]


class AllocationError(RuntimeError):
    """A batch system refused to start workers (a bad partition, a quota).

    Raised (and given to the waiting tasks) once; the allocator then stops
    asking for workers.
    """


class Allocator(ABC):
    """Starts and stops worker processes through a batch system, for a ``TcpTransport``."""

    #: the last refusal, once the allocator gave up asking for workers
    error: AllocationError | None = None

    @abstractmethod
    def listen_host(self) -> str:
        """The host the scheduler should listen on so that the workers reach it."""

    @abstractmethod
    async def start(self, address: str, env: Mapping[str, str], args: Sequence[str]) -> None:
        """Begin: workers connect to ``address`` (``tcp://host:port``).

        ``env`` holds what a worker process needs in its environment (the
        token among it); ``args`` are extra worker options (e.g. ``--tls-auto``).

        Raises:
            AllocationError: the batch system refused at once.
        """

    @abstractmethod
    async def tick(self, waiting: int, workers: Sequence[str]) -> None:
        """Adjust to the load: ``waiting`` tasks not done, ``workers`` the names connected.

        Raises:
            AllocationError: the batch system refused a request (raised once).
        """

    def initial_workers(self) -> int:
        """Workers to wait for before the first task runs (0: none, the default)."""
        return 0

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """Allocations by state and the workers of each, for ``statistics()``."""

    @abstractmethod
    async def close(self) -> None:
        """Cancel every allocation made; the workers are told to stop before."""
