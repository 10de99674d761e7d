"""In-situ analytics: a running simulation publishes arrays, the analytics consumes and steers.

Simulation side (every MPI rank)::

    bridge = Bridge(comm, {"T": Block(global_shape, start, shape)})
    for step in range(n):
        ...
        bridge.publish("T", t_block, step)     # sends only what is wanted
        bc = bridge.get("boundary", step, 0.0)  # the same value on every rank
    bridge.close()

Analytics side (an async program with a ``Runtime``)::

    hub = await Hub.start(backpressure=2)       # give hub.environ() to the simulation
    sub = hub.subscribe("T", window=4)
    async for step, data in sub:
        stats = await rt.submit(summarise, data)
        hub.steer("boundary", 1.0)              # from the earliest step still open
"""

from ._bridge import ADDRESS_ENV, TOKEN_ENV, AnalyticsTimeoutError, Bridge
from ._hub import AnalyticsThread, Hub, StepRecord, Subscription, Window
from ._layout import Block

__all__ = [
    "ADDRESS_ENV",
    "TOKEN_ENV",
    "AnalyticsThread",
    "AnalyticsTimeoutError",
    "Block",
    "Bridge",
    "Hub",
    "StepRecord",
    "Subscription",
    "Window",
]
