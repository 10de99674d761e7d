"""The HTML report: ``Runtime(report="run.html")``, written when the runtime closes.

One self-contained file: the data as JSON inside the page and a small
script that draws it with the browser's own SVG, so it opens offline and
needs no library. Sections: a summary, the task stream (one row of lanes
per worker, one rectangle per task attempt), durations by function,
throughput over time (on a scale that one spike does not set: see
``robust_scale``), failures grouped by exception type and function with
counts and the first traceback of each, and a summary of the task graph.
The task stream shows at most ``MAX_STREAM`` attempts (evenly sampled
beyond that, and said so), to keep the page light enough to open.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from async_wf.observe.trace import pack_lanes

if TYPE_CHECKING:
    from async_wf.observe._events import Observer

__all__ = ["MAX_STREAM", "report_data", "robust_scale", "write_report"]

MAX_STREAM = 20_000


def _graph_summary(obs: Observer) -> dict[str, Any]:
    nodes = obs.nodes
    indeg: dict[int, int] = dict.fromkeys(nodes, 0)
    succ: dict[int, list[int]] = defaultdict(list)
    n_edges = 0
    for a, b in obs.edges:
        if a in nodes and b in nodes:
            indeg[b] += 1
            succ[a].append(b)
            n_edges += 1
    # longest path in tasks, by ids: an input is always submitted before its user
    depth: dict[int, int] = {}
    for tid in sorted(nodes):
        d = depth.get(tid, 1)
        depth[tid] = d
        for s in succ.get(tid, ()):
            if depth.get(s, 1) < d + 1:
                depth[s] = d + 1
    by_fn: dict[str, int] = defaultdict(int)
    for name in nodes.values():
        by_fn[name] += 1
    return {
        "recorded": obs.keep_graph,
        "tasks": len(nodes),
        "edges": n_edges,
        "roots": sum(1 for v in indeg.values() if v == 0),
        "leaves": sum(1 for t in nodes if not succ.get(t)),
        "depth": max(depth.values(), default=0),
        "by_function": sorted(by_fn.items(), key=lambda kv: -kv[1]),
        "dropped": obs.nodes_dropped,
    }


def robust_scale(bins: list[int]) -> int:
    """The top of the chart's scale: the largest bin that is not a spike.

    A spike is a bin above three times the 75th percentile of the non-empty
    bins: it stands out from at least three quarters of the run (a burst
    that a loaded machine spreads over a few bins is still one). Thousands of
    tasks that end at once (a burst of trivial tasks, the results of a
    worker's prefetch arriving together) would otherwise flatten the rest
    of the chart to a line at zero; they are drawn clipped, with their value.
    """
    filled = sorted(b for b in bins if b)
    if not filled:
        return 0
    p75 = filled[(len(filled) - 1) * 3 // 4]
    return max(b for b in filled if b <= 3 * p75)


def _throughput(spans: list[Any], t0: float, nbins: int = 60) -> dict[str, Any]:
    """Attempts ended per time bin, binned here so that the page stays small.

    ``scale``: the top of the chart (``robust_scale``); ``clipped``: the
    bins above it, as ``[index, count]``.
    """
    if not spans:
        return {"end": 0.0, "bins": [], "scale": 0, "clipped": []}
    end = max(max(s[1] for s in spans) - t0, 1e-6)
    bins = [0] * nbins
    for s in spans:
        bins[min(nbins - 1, max(0, int(nbins * (s[1] - t0) / end)))] += 1
    scale = robust_scale(bins)
    return {"end": end, "bins": bins, "scale": scale,
            "clipped": [[i, b] for i, b in enumerate(bins) if b > scale]}


def report_data(obs: Observer) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data."""
    t0 = obs.t0_wall
    spans = obs.spans
    step = max(1, -(-len(spans) // MAX_STREAM))
    shown = spans[::step]
    by_lane: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(shown):
        by_lane[s[2]].append(i)
    stream = []
    for pid in sorted(by_lane):
        idx = by_lane[pid]
        lanes = pack_lanes([(shown[i][0], shown[i][1]) for i in idx])
        for i, lane in zip(idx, lanes, strict=True):
            s = shown[i]
            stream.append([pid, lane, round(s[0] - t0, 6), round(s[1] - t0, 6), s[3], s[4],
                           s[5], s[6]])
    longest: dict[str, float] = defaultdict(float)
    for s in spans:
        d = s[1] - s[0]
        if d > longest[s[3]]:
            longest[s[3]] = d
    fns = []
    for name, st in sorted(obs.fns.items()):
        n = st.done + st.failed + st.retried
        fns.append({"name": name, "done": st.done, "failed": st.failed,
                    "retried": st.retried, "total_s": st.total,
                    "mean_s": st.total / n if n else 0.0, "max_s": longest[name]})
    snap = obs.snapshot
    return {
        "title": f"async_wf run of {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t0))}",
        "summary": {**{k: snap.get(k) for k in (
            "submitted", "finished", "failed", "cancelled", "retried", "reused", "elapsed_s",
            "workers_lost", "bytes_sent", "bytes_received", "core")},
            "workers (most at once)": obs.most_workers},
        "lanes": {str(k): v for k, v in obs.lanes.items()},
        "stream": stream,
        "stream_total": len(spans),
        "spans_dropped": obs.spans_dropped,
        "throughput": _throughput(spans, t0),
        "functions": fns,
        # most frequent first; the first traceback of each kind
        "failure_groups": [
            {"type": g.type, "function": g.function, "count": g.count, "final": g.final,
             "tasks": g.task_ids, "attempt": g.attempt, "traceback": g.traceback}
            for g in sorted(obs.failure_groups.values(), key=lambda g: -g.count)],
        "graph": _graph_summary(obs),
    }


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>%(title)s</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.bar{display:inline-block;height:10px;background:#4a90d9}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
svg text{font-size:11px}.note{color:#777}
</style></head><body>
<h1 id="title"></h1>
<table id="summary"></table>
<h2>Task stream</h2><p class="note" id="stream-note"></p><div id="stream"></div>
<h2>Durations by function</h2><table id="durations"></table>
<h2>Throughput over time</h2><div id="throughput"></div>
<h2>Failures</h2><div id="failures"></div>
<h2>Task graph</h2><table id="graph"></table>
<script type="application/json" id="data">%(data)s</script>
<script>
(function () {
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4))
                                   : document.createElement(tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function row(table, cells, head) {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(el(head ? "th" : "td", {}, String(c)));
  table.appendChild(tr);
}
function fmt(s) { return s >= 1 ? s.toFixed(2) + " s" : (s * 1000).toFixed(3) + " ms"; }
document.getElementById("title").textContent = D.title;
const sum = document.getElementById("summary");
for (const k in D.summary) {
  const v = D.summary[k];
  if (v !== null) row(sum, [k, typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : v]);
}

// the task stream: one band per worker, one row per lane, one rect per attempt
const names = D.functions.map(f => f.name);
function colour(name, status) {
  if (status === "error") return "#d9534f";
  if (status === "retry") return "#f0ad4e";
  const i = names.indexOf(name);
  return "hsl(" + ((i * 137) %% 360) + ",55%%,55%%)";
}
const W = 1100, LEFT = 170, LH = 14;
let tmax = 0;
for (const s of D.stream) tmax = Math.max(tmax, s[3]);
tmax = tmax || 1;
const rows = {};
for (const s of D.stream) rows[s[0]] = Math.max(rows[s[0]] || 0, s[1] + 1);
const pids = Object.keys(rows).map(Number).sort((a, b) => a - b);
const band = {};
let y = 0;
for (const p of pids) { band[p] = y; y += rows[p] * LH + 6; }
const svg = el("svg:svg", {width: W, height: y + 20, id: "stream-svg"});
for (const p of pids) {
  svg.appendChild(el("svg:text", {x: 0, y: band[p] + 11}, D.lanes[p] || ("worker " + p)));
}
for (const s of D.stream) {
  const [pid, lane, a, b, name, task, attempt, status] = s;
  const x = LEFT + (W - LEFT - 5) * a / tmax;
  const w = Math.max(0.5, (W - LEFT - 5) * (b - a) / tmax);
  const r = el("svg:rect", {x: x, y: band[pid] + lane * LH, width: w, height: LH - 2,
                            fill: colour(name, status), "class": "task",
                            "data-task": task});
  r.appendChild(el("svg:title", {}, name + " #" + task + " attempt " + attempt + " (" +
                                    status + ", " + fmt(b - a) + ")"));
  svg.appendChild(r);
}
svg.appendChild(el("svg:text", {x: LEFT, y: y + 14}, "0 s"));
svg.appendChild(el("svg:text", {x: W - 60, y: y + 14}, tmax.toFixed(3) + " s"));
document.getElementById("stream").appendChild(svg);
document.getElementById("stream-note").textContent =
  D.stream.length + " of " + D.stream_total + " task attempts shown" +
  (D.spans_dropped ? "; " + D.spans_dropped + " not recorded" : "");

// durations by function
const dur = document.getElementById("durations");
row(dur, ["function", "done", "failed", "retried", "mean", "max", "total", ""], true);
let tot = 0;
for (const f of D.functions) tot = Math.max(tot, f.total_s);
for (const f of D.functions) {
  const tr = el("tr", {"class": "fn"});
  for (const c of [f.name, f.done, f.failed, f.retried, fmt(f.mean_s),
                   fmt(f.max_s), fmt(f.total_s)]) tr.appendChild(el("td", {}, String(c)));
  const td = el("td");
  td.appendChild(el("span", {"class": "bar",
                             style: "width:" + (200 * f.total_s / (tot || 1)) + "px"}));
  tr.appendChild(td);
  dur.appendChild(tr);
}

// throughput: attempts ended per bin, on a scale that a spike does not set:
// bins above it are drawn at the top, marked with a triangle and their rate
const H = 160, TOP = 20, bins = D.throughput.bins, NB = bins.length, end = D.throughput.end;
const tp = el("svg:svg", {width: W, height: H + TOP + 30, id: "throughput-svg"});
if (NB) {
  const scale = D.throughput.scale || 1, dt = end / NB;
  const xs = i => LEFT + (W - LEFT - 5) * (i + 0.5) / NB;
  const pts = bins.map((c, i) =>
    xs(i) + "," + (TOP + H - H * Math.min(c, scale) / scale)).join(" ");
  tp.appendChild(el("svg:polyline", {points: pts, fill: "none", stroke: "#4a90d9",
                                     "stroke-width": 2}));
  for (const [i, c] of D.throughput.clipped) {
    const m = el("svg:text", {x: xs(i) - 4, y: TOP - 4, "class": "clipped",
                              fill: "#d9534f"}, "\u25B2 " + (c / dt).toFixed(0) + "/s");
    m.appendChild(el("svg:title", {}, "clipped: " + c + " tasks ended in this bin"));
    tp.appendChild(m);
  }
  tp.appendChild(el("svg:text", {x: 0, y: TOP + 10}, (scale / dt).toFixed(0) + " tasks/s"));
  tp.appendChild(el("svg:text", {x: 0, y: TOP + H}, "0"));
  tp.appendChild(el("svg:text", {x: LEFT, y: TOP + H + 25}, "0 s"));
  tp.appendChild(el("svg:text", {x: W - 60, y: TOP + H + 25}, end.toFixed(3) + " s"));
}
document.getElementById("throughput").appendChild(tp);
if (D.throughput.clipped.length) {
  document.getElementById("throughput").appendChild(el("p", {"class": "note"},
    D.throughput.clipped.length + " bin(s) above the scale, clipped (\u25B2): the scale " +
    "is set by the rest of the run"));
}

// failures: one entry per (exception type, function), most frequent first
const fl = document.getElementById("failures");
if (!D.failure_groups.length) fl.appendChild(el("p", {}, "No task failed."));
for (const g of D.failure_groups) {
  const d = el("details", {"class": "failure"});
  const retried = g.count - g.final;
  d.appendChild(el("summary", {}, g.count + " \u00D7 " + g.type + " in " + g.function +
    " (" + g.final + " failed" + (retried ? ", " + retried + " retried" : "") + "; tasks #" +
    g.tasks.join(", #") + (g.tasks.length < g.count ? ", ..." : "") + ")"));
  d.appendChild(el("p", {"class": "note"}, "first: task #" + g.tasks[0] + " attempt " +
                   g.attempt));
  d.appendChild(el("pre", {}, g.traceback));
  fl.appendChild(d);
}

// the task graph
const g = document.getElementById("graph"), G = D.graph;
if (!G.recorded) row(g, ["not recorded"]);
else {
  for (const k of ["tasks", "edges", "roots", "leaves", "depth", "dropped"]) row(g, [k, G[k]]);
  for (const [n, c] of G.by_function) row(g, ["tasks of " + n, c]);
}
document.body.setAttribute("data-rendered", "yes");
})();
</script></body></html>
"""


def render(obs: Observer) -> str:
    """The page's HTML."""
    data = report_data(obs)
    # "</" must not appear inside the script element, nor "<!--"
    text = json.dumps(data).replace("</", "<\\/").replace("<!--", "<\\!--")
    return _PAGE % {"title": html.escape(data["title"]), "data": text}


def write_report(obs: Observer, path: str) -> None:
    """Write the report of ``obs`` to ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render(obs))
    os.replace(tmp, path)
