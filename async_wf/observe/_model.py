"""What the observer records, as its writers read it: spans, duration buckets.

Kept apart from the ``Observer`` so that the writers (trace, report,
metrics), which the observer imports only when asked for, do not import it
back.
"""

from __future__ import annotations

__all__ = ["BUCKETS", "CANCELLED", "DONE", "ERROR", "FAILED", "LOCAL_LANE", "OK", "PENDING",
           "RETRY", "REUSED", "Span", "span_key"]

#: upper bounds (seconds) of the task-duration histogram buckets
BUCKETS: tuple[float, ...] = (
    1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0,
)

#: span statuses
OK, ERROR, RETRY = "ok", "error", "retry"

#: final states of a task in the recorded graph (PENDING: not ended yet)
DONE, FAILED, CANCELLED, REUSED, PENDING = "done", "failed", "cancelled", "reused", "pending"

#: lane (trace pid) of work run in the scheduler's own process
LOCAL_LANE = 0

# (start s, end s, lane, name, task id, attempt, status, checkpoint key or None)
Span = tuple[float, float, int, str, int, int, str, bytes | None]


def span_key(span: Span) -> str:
    """The key a trace or report shows for a span: the checkpoint key, else name-number."""
    ckey = span[7]
    return ckey.hex()[:16] if ckey is not None else f"{span[3]}-{span[4]}"
