"""The task graph in Graphviz DOT: ``Runtime(dag=True)`` then ``rt.dag(path)``.

The graph is what the observer recorded at submit: one node per task (up
to ``max_nodes``) and one edge per future passed as an argument, from the
input to the task that takes it. Nodes are coloured by what became of the
task's last attempt (from the spans, when a trace or a report also
records them; otherwise by whether it is known to have failed).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from async_wf.observe._events import Observer

__all__ = ["dot_text", "write_dot"]

_COLOURS = {"ok": "palegreen", "error": "salmon", "retry": "khaki"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot_text(obs: Observer) -> str:
    """The DOT source of the graph ``obs`` recorded."""
    status: dict[int, str] = {}
    for s in obs.spans:
        status[s[4]] = s[6]
    failed = {tid for _n, tid, _a, _tb in obs.failures}
    lines = ["digraph async_wf {", "  rankdir=LR;",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontsize=10];']
    for tid, name in obs.nodes.items():
        st = status.get(tid) or ("error" if tid in failed else "")
        colour = _COLOURS.get(st, "white")
        lines.append(f"  t{tid} [label={_quote(f'{name} #{tid}')}, fillcolor={colour}];")
    nodes = obs.nodes
    for a, b in obs.edges:
        if a in nodes and b in nodes:
            lines.append(f"  t{a} -> t{b};")
    if obs.nodes_dropped:
        lines.append(f"  // {obs.nodes_dropped} tasks not recorded (max_nodes reached)")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(obs: Observer, path: str) -> None:
    """Write the DOT source of the recorded graph to ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dot_text(obs))
    os.replace(tmp, path)
