"""The Prometheus endpoint: ``Runtime(metrics="127.0.0.1:9464")``.

Nothing here is updated per task. The observer keeps plain counters and
histogram buckets (ints in Python lists, updated on the loop), and a
collector turns them into Prometheus metric families when the endpoint is
scraped. Against ``Counter.inc`` and ``Histogram.observe`` per task (a lock
and a label lookup each), this keeps the cost of metrics on the loop to a
few list operations per task. Each runtime has its own
``CollectorRegistry``, so several runtimes (and tests) do not clash in the
process-wide default registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from async_wf.observe._model import BUCKETS

if TYPE_CHECKING:
    from async_wf.observe._events import Observer

__all__ = ["MetricsServer"]


class _RuntimeCollector(Collector):
    """Reads the observer's counters at each scrape."""

    def __init__(self, obs: Observer) -> None:
        self.obs = obs

    def collect(self) -> Iterator[Metric]:
        obs = self.obs
        snap = obs.snapshot
        fns = dict(obs.fns)  # a copy: the loop thread adds functions meanwhile
        tasks = CounterMetricFamily(
            "async_wf_tasks", "Task attempts by outcome and function",
            labels=["state", "function"])
        for name, st in sorted(fns.items()):
            tasks.add_metric(["done", name], st.done)
            tasks.add_metric(["failed", name], st.failed)
            tasks.add_metric(["retried", name], st.retried)
        yield tasks
        now = GaugeMetricFamily("async_wf_tasks_now", "Tasks in each state now",
                                labels=["state"])
        for state in ("waiting", "ready", "queued", "running"):
            now.add_metric([state], snap.get(state, 0))
        yield now
        totals = CounterMetricFamily("async_wf_runtime_tasks",
                                     "Tasks of the runtime by final state (all functions)",
                                     labels=["state"])
        for state in ("submitted", "finished", "failed", "cancelled", "retried", "reused"):
            totals.add_metric([state], snap.get(state, 0))
        yield totals
        hist = HistogramMetricFamily("async_wf_task_duration_seconds",
                                     "Duration of task attempts", labels=["function"])
        for name, st in sorted(fns.items()):
            counts = list(st.buckets)
            acc = 0
            buckets: list[tuple[str, float]] = []
            for bound, c in zip((*BUCKETS, float("inf")), counts, strict=True):
                acc += c
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            hist.add_metric([name], buckets, st.total)
        yield hist
        yield GaugeMetricFamily("async_wf_ready_queue", "Ready-queue length",
                                value=snap.get("ready_queue", 0))
        yield GaugeMetricFamily("async_wf_workers", "Workers connected",
                                value=snap.get("workers", 0))
        yield CounterMetricFamily("async_wf_workers_lost", "Workers lost",
                                  value=snap.get("workers_lost", 0))
        yield CounterMetricFamily("async_wf_sent_bytes", "Bytes sent to workers",
                                  value=snap.get("bytes_sent", 0))
        yield CounterMetricFamily("async_wf_received_bytes", "Bytes received from workers",
                                  value=snap.get("bytes_received", 0))
        yield CounterMetricFamily("async_wf_checkpoint_records",
                                  "Records written to the checkpoint log",
                                  value=snap.get("checkpoint_recorded", 0))
        yield CounterMetricFamily("async_wf_checkpoint_written_bytes",
                                  "Size of the checkpoint log",
                                  value=snap.get("checkpoint_bytes", 0))
        yield GaugeMetricFamily("async_wf_tasks_per_second", "Tasks ended per second, recently",
                                value=snap.get("rate", 0.0))
        alloc = snap.get("allocations")
        if isinstance(alloc, dict) and isinstance(alloc.get("jobs"), dict):
            jobs = GaugeMetricFamily("async_wf_allocations", "Batch jobs of the allocator by state",
                                     labels=["state"])
            jobs.add_metric(["pending"], alloc.get("pending", 0))
            jobs.add_metric(["running"], alloc.get("running", 0))
            yield jobs
            per = GaugeMetricFamily("async_wf_allocation_workers", "Workers of each batch job",
                                    labels=["job"])
            for jid, j in sorted(alloc["jobs"].items()):
                per.add_metric([str(jid)], len(j.get("workers", ())))
            yield per


class MetricsServer:
    """Serves the metrics of one runtime over HTTP in a daemon thread, until ``close``.

    Args:
        obs: the runtime's observer.
        addr: ``"host:port"``; port 0 binds a free one (see ``address``).

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, obs: Observer, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RuntimeCollector(obs))
        self._server: Any
        self._server, self._thread = start_http_server(int(port), host.strip("[]"),
                                                       registry=self.registry)
        bound = self._server.server_address
        self.address: tuple[str, int] | None = (str(bound[0]), int(bound[1]))

    def tick(self) -> None:
        """Nothing to do: scrapes read the observer's snapshot."""

    def close(self) -> None:
        """Stop serving and free the port."""
        self.address = None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
