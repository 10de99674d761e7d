"""Observability: progress display, Prometheus metrics, timeline trace, HTML report, DAG.

All of it is off by default. ``Runtime(progress=True, metrics="host:port",
trace="run.json", report="run.html", dag=True)`` turns pieces on; the
runtime then has one ``Observer`` (``_events.py``) that the scheduler and
the transports report to, and the display, server and writers read from.
The libraries (``rich``, ``prometheus_client``) are imported only when
their feature is on, and are the ``[observe]`` extra, not dependencies.
"""

from async_wf.observe._events import ObserveOptions, Observer

__all__ = ["ObserveOptions", "Observer"]
