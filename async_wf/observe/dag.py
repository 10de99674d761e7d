"""The task graph in Graphviz DOT: ``Runtime(dag=True)`` then ``rt.dag(path)``.

The graph is what the observer recorded at submit: one node per task (up
to ``max_nodes``) and one edge per future passed as an argument, from the
input to the task that takes it. Each node is filled by the task's state
when the file is written: done, reused from a checkpoint log, failed (its
own error or a failed input), cancelled, or pending (not ended yet); the
state is also the node's tooltip, and a legend lists the colours. The
states need nothing but ``dag=True`` (see ``Observer.node_states``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from async_wf.observe._model import CANCELLED, DONE, FAILED, PENDING, REUSED

if TYPE_CHECKING:
    from async_wf.observe._events import Observer

__all__ = ["COLOURS", "dot_text", "write_dot"]

#: fill colour of each state (Graphviz colour names)
COLOURS = {DONE: "palegreen", REUSED: "lightblue", FAILED: "salmon",
           CANCELLED: "lightgrey", PENDING: "white"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot_text(obs: Observer) -> str:
    """The DOT source of the graph ``obs`` recorded."""
    state = obs.node_states()
    lines = ["digraph async_wf {", "  rankdir=LR;",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontsize=10];']
    for tid, name in obs.nodes.items():
        st = state.get(tid, PENDING)
        lines.append(f"  t{tid} [label={_quote(f'{name} #{tid}')}, fillcolor={COLOURS[st]}, "
                     f'tooltip="{st}"];')
    nodes = obs.nodes
    for a, b in obs.edges:
        if a in nodes and b in nodes:
            lines.append(f"  t{a} -> t{b};")
    lines += ["  subgraph cluster_legend {", '    label="legend"; fontsize=10; color=grey;']
    for st, colour in COLOURS.items():
        lines.append(f'    legend_{st} [label="{st}", fillcolor={colour}];')
    lines.append("  }")
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
