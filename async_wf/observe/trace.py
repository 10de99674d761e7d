"""The timeline trace: Chrome trace-event JSON, for Perfetto or chrome://tracing.

One process (``pid``) per worker (per rank under MPI), plus one for the
scheduler's own process; one complete event (``"ph": "X"``) per task
attempt, with the task's name, key, number, attempt and status in
``args``. Workers do not say which of their slots ran a task, so the
threads (``tid``) of a process are lanes allocated here by interval
packing: each span goes to the lowest-numbered lane that is free at its
start, so no two spans on one lane overlap, and a worker with k slots
busy at once uses about k lanes. Bytes sent to and received from each
TCP worker over time, sampled twice a second, are counter events
(``"ph": "C"``); MPI ranks have none (their channel counts only totals).
"""

from __future__ import annotations

import heapq
import json
import os
from typing import TYPE_CHECKING, Any

from async_wf.observe._model import span_key

if TYPE_CHECKING:
    from async_wf.observe._events import Observer
    from async_wf.observe._model import Span

__all__ = ["pack_lanes", "trace_events", "write_trace"]


def pack_lanes(spans: list[tuple[float, float]]) -> list[int]:
    """Give each ``(start, end)`` span a lane so that spans on one lane never overlap.

    Greedy by start time, lowest free lane first: the number of lanes is
    the largest number of spans that overlap at one instant. A span that
    starts exactly when another ends may reuse its lane.

    Returns:
        The lane of each span, in the order given.
    """
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    busy: list[tuple[float, int]] = []  # heap of (end, lane) of the spans running
    free: list[int] = []  # heap of lanes free again
    lanes = [0] * len(spans)
    n = 0
    for i in order:
        start, end = spans[i]
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            lane = n
            n += 1
        lanes[i] = lane
        heapq.heappush(busy, (max(end, start), lane))
    return lanes


def trace_events(obs: Observer) -> list[dict[str, Any]]:
    """The trace events of everything ``obs`` recorded, metadata first."""
    t0 = obs.t0_wall
    events: list[dict[str, Any]] = []
    by_lane: dict[int, list[Span]] = {}
    for s in obs.spans:
        by_lane.setdefault(s[2], []).append(s)
    for pid in sorted(set(by_lane) | set(obs.lanes)):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": obs.lanes.get(pid, f"worker #{pid}")}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
    for pid, spans in sorted(by_lane.items()):
        lanes = pack_lanes([(s[0], s[1]) for s in spans])
        for lane in sorted(set(lanes)):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": lane,
                           "args": {"name": f"lane {lane}"}})
        for s, lane in zip(spans, lanes, strict=True):
            start, end, _pid, name, tid, attempt, status, _ckey = s
            events.append({
                "ph": "X", "name": name, "cat": "task", "pid": pid, "tid": lane,
                "ts": round((start - t0) * 1e6, 3),
                "dur": round(max(end - start, 0.0) * 1e6, 3),
                "args": {"key": span_key(s), "task": tid, "attempt": attempt, "status": status},
            })
    # MPI links count no bytes per rank (the channel counts its totals): no
    # counter for a worker that never shows a byte
    moved = {pid for *_, links in obs.samples for pid, (o, i) in links.items() if o or i}
    for t, _sub, _fin, _fail, _run, _ready, links in obs.samples:
        for pid, (out, inn) in links.items():
            if pid in moved:
                events.append({"ph": "C", "name": "bytes", "pid": pid, "tid": 0,
                               "ts": round(t * 1e6, 3),
                               "args": {"sent": out, "received": inn}})
    return events


def write_trace(obs: Observer, path: str) -> None:
    """Write the trace of ``obs`` to ``path`` (atomically: a temporary file, then rename)."""
    doc = {
        "traceEvents": trace_events(obs),
        "displayTimeUnit": "ms",
        "otherData": {"producer": "async_wf", "start_wall_s": obs.t0_wall,
                      "spans_dropped": obs.spans_dropped},
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, path)
