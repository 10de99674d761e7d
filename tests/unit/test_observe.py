"""Observability: trace, metrics, progress, report, DAG, worker logs, ``async-wf run`` flags.

Each test runs a real runtime (in-process or with TCP worker processes) and
checks what it produced: a trace file, a scrape over HTTP, a terminal's
bytes, a page rendered by a real browser, log records.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import pty
import random
import re
import select
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tcp_helpers import HANG, RawPeer, log_warning, sleep_ms, square, until

import async_wf
from async_wf import protocol as P
from async_wf.observe.trace import pack_lanes

UV = pytest.mark.asyncio(loop_factories=["uvloop"])
REPO = Path(__file__).resolve().parents[2]


def blocking(x: int) -> int:
    time.sleep(0.002)
    return x


async def coro(x: int) -> int:
    await asyncio.sleep(0)
    return x + 1


def fails(x: int) -> int:
    raise ValueError(f"bad input {x}")


@async_wf.task(retries=1)
def flaky(marker: str, x: int) -> int:
    """Fails the first time (whichever process runs it), then returns ``x``."""
    try:
        with open(marker, "x"):
            pass
    except FileExistsError:
        return x
    raise RuntimeError("first attempt fails")


async def _workload(rt: async_wf.Runtime, marker_dir: Path) -> tuple[int, int]:
    """20 blocking tasks, 20 coroutines, a sum of them, a failure, a retried task.

    Returns (tasks submitted, attempts made).
    """
    a = [rt.submit(blocking, i) for i in range(20)]
    b = [rt.submit(coro, i) for i in range(20)]
    total = rt.submit(sum, a + b)
    bad = rt.submit(fails, 7)
    again = flaky(os.path.join(marker_dir, "flaky"), 5)
    assert await total == sum(range(20)) + sum(range(1, 21))
    with pytest.raises(ValueError, match="bad input 7"):
        await bad
    assert await again == 5
    return 43, 44


def _spans(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    return [e for e in events if e["ph"] == "X"], [e for e in events if e["ph"] == "M"]


def _check_trace(path: Path, tasks: int, attempts: int) -> list[dict[str, Any]]:
    spans, meta = _spans(path)
    assert len(spans) == attempts
    assert len({e["args"]["task"] for e in spans}) == tasks  # every task has a span
    for e in spans:
        assert e["dur"] >= 0 and e["ts"] >= 0 and e["name"] and e["args"]["key"]
    named = {e["pid"] for e in meta if e["name"] == "process_name"}
    assert {e["pid"] for e in spans} <= named
    lanes: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for e in spans:
        lanes.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for iv in lanes.values():  # no two spans overlap on one lane
        iv.sort()
        for (_, end), (start, _) in itertools.pairwise(iv):
            assert start >= end
    statuses = sorted(e["args"]["status"] for e in spans)
    assert statuses.count("error") == 1 and statuses.count("retry") == 1
    return spans


# ------------------------------------------------------------------ trace
@pytest.mark.core_independent
def test_pack_lanes_never_overlaps_and_uses_the_fewest_lanes() -> None:
    rng = random.Random(7)
    for _ in range(200):
        spans = []
        for _ in range(rng.randint(0, 40)):
            a = rng.uniform(0, 10)
            spans.append((a, a + rng.choice([0.0, rng.uniform(0, 3)])))
        lanes = pack_lanes(spans)
        by: dict[int, list[tuple[float, float]]] = {}
        for s, lane in zip(spans, lanes, strict=True):
            by.setdefault(lane, []).append(s)
        for iv in by.values():
            iv.sort()
            for (_, e), (s, _) in itertools.pairwise(iv):
                assert s >= e
        # as many lanes as the most spans open at one instant (a span of no
        # length is open at its instant too)
        most = max((sum(1 for a, b in spans if a <= t < b) + (t == u) for t, u in spans),
                   default=0)
        assert len(set(lanes)) == most


async def test_trace_local(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    async with async_wf.Runtime(threads=4, trace=path) as rt:
        tasks, attempts = await _workload(rt, tmp_path)
    spans = _check_trace(path, tasks, attempts)
    assert {e["pid"] for e in spans} == {0}
    # blocking tasks are timed in their thread: never more than 4 at once
    blk = [(e["ts"], e["ts"] + e["dur"]) for e in spans if e["name"].endswith("blocking")]
    assert len(blk) == 20
    assert max(sum(1 for a, b in blk if a <= t < b) for t, _ in blk) <= 4


@UV
async def test_trace_tcp_one_lane_per_slot(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    async with async_wf.Runtime(workers=2, trace=path) as rt:
        # both workers first: a worker that joins late leaves the other all the
        # coroutines, which then overlap its first blocking task (another lane)
        await until(lambda: rt.statistics()["workers"] == 2, "both workers")
        tasks, attempts = await _workload(rt, tmp_path)
        wids = {w for w, _n, _o, _i in rt.transport.link_bytes()}
    spans = _check_trace(path, tasks, attempts)
    assert {e["pid"] for e in spans} <= wids and len(wids) == 2
    # blocking tasks run on the single slot of each worker, plus, for a
    # function the worker has learnt as quick, inline on its loop beside that
    # slot: at most two lanes each (one was asserted, and failed under load)
    for w in wids:
        lanes = {e["tid"] for e in spans if e["pid"] == w and e["name"].endswith("blocking")}
        assert 0 in lanes or not lanes
        assert len(lanes) <= 2, lanes
    doc = json.loads(path.read_text())
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C"]
    assert counters and all(e["pid"] in wids for e in counters)
    assert max(e["args"]["sent"] for e in counters) > 0


# ---------------------------------------------------------------- metrics
def _scrape(addr: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=HANG) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@UV
async def test_metrics_scraped_over_http_during_a_tcp_run(tmp_path: Path) -> None:
    async with async_wf.Runtime(workers=2, metrics="127.0.0.1:0",
                                checkpoint=tmp_path / "ck.wfck") as rt:
        addr = rt.metrics_address
        assert addr is not None and addr[1] > 0
        futs = [rt.submit(square, i) for i in range(30)]
        assert sum(await async_wf.gather(*futs)) == sum(i * i for i in range(30))
        slow = rt.submit(sleep_ms, 3000)
        fn = "square"

        def settled() -> bool:
            m = _scrape(addr)
            return (m.get(("async_wf_tasks_now", (("state", "running"),))) == 1
                    and m.get(("async_wf_checkpoint_records_total", ())) == 30)

        # the gauges come from a sample taken twice a second
        await until(settled, "a sample with the long task running")
        m = await asyncio.to_thread(_scrape, addr)
        assert m[("async_wf_tasks_total", (("function", fn), ("state", "done")))] == 30
        assert m[("async_wf_tasks_total", (("function", fn), ("state", "failed")))] == 0
        assert m[("async_wf_task_duration_seconds_count", (("function", fn),))] == 30
        assert m[("async_wf_task_duration_seconds_bucket",
                  (("function", fn), ("le", "+Inf")))] == 30
        assert m[("async_wf_workers", ())] == 2
        assert m[("async_wf_workers_lost_total", ())] == 0
        assert m[("async_wf_sent_bytes_total", ())] > 0
        assert m[("async_wf_received_bytes_total", ())] > 0
        assert m[("async_wf_checkpoint_written_bytes_total", ())] > 0
        assert m[("async_wf_ready_queue", ())] == 0
        slow.cancel()
    assert rt.metrics_address is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=2)


@pytest.mark.core_independent
async def test_metrics_address_is_checked() -> None:
    with pytest.raises(ValueError, match="host:port"):
        async_wf.Runtime(metrics="localhost")


@pytest.mark.core_independent
async def test_metrics_address_in_use_fails_the_start() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rt = async_wf.Runtime(metrics=f"127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(OSError):
            await rt.start()
    with pytest.raises(RuntimeError, match="no async_wf runtime"):
        async_wf.current_runtime()


# --------------------------------------------------------------- progress
PROGRESS_APP = textwrap.dedent('''
    import asyncio, async_wf

    async def noop(i):
        await asyncio.sleep(0.001)

    async def main():
        async with async_wf.Runtime(progress=True) as rt:
            await async_wf.gather(*[rt.submit(noop, i) for i in range(300)])
            await asyncio.sleep(0.3)

    async_wf.run(main())
''')


@pytest.mark.core_independent
def test_progress_is_quiet_when_not_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(PROGRESS_APP)
    proc = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def _on_a_terminal(tmp_path: Path, *args: str) -> tuple[int, str]:
    """Run ``python app.py args`` on a pseudo-terminal: (exit code, text without escapes)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "160"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=tmp_path, stdin=slave,
                            stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(timeout=HANG)
    return proc.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))


@pytest.mark.core_independent
def test_progress_draws_on_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(PROGRESS_APP)
    code, text = _on_a_terminal(tmp_path)
    assert code == 0, text
    assert "300/300" in text
    # submitted is the bar's total ("300/300"), not repeated among the counts
    assert "done 300" in text and "failed 0" in text and "submitted" not in text
    assert re.search(r"\| [1-9]\d* tasks/s", text)  # some redraw saw tasks ending


def test_progress_of_a_resumed_run_counts_reused_tasks(tmp_path: Path) -> None:
    # issue 16.6: a resumed run ended at "134/208", which looks like a failure
    app = PROGRESS_APP.replace("Runtime(progress=True)",
                               "Runtime(progress=True, checkpoint='run.wfck')")
    app = app.replace("range(300)", "range(int(__import__('sys').argv[1]))")
    (tmp_path / "app.py").write_text(app)
    code, text = _on_a_terminal(tmp_path, "200")
    assert code == 0, text
    code, text = _on_a_terminal(tmp_path, "300")
    assert code == 0, text
    assert "300/300" in text, text[-500:]
    assert "reused 200" in text and "done 100" in text, text[-500:]
    assert "resuming from run.wfck: 200 records" in text, text[-500:]


# ----------------------------------------------------------------- report
def _report_data(path: Path) -> dict[str, Any]:
    page = path.read_text()
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert m is not None
    data: dict[str, Any] = json.loads(m.group(1))
    return data


@pytest.mark.core_independent
@UV
async def test_report_tcp(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    async with async_wf.Runtime(workers=2, report=path) as rt:
        tasks, attempts = await _workload(rt, tmp_path)
    data = _report_data(path)
    assert len(data["stream"]) == attempts == data["stream_total"]
    assert sum(data["throughput"]["bins"]) == attempts
    fns = {f["name"].rsplit(".", 1)[-1]: f for f in data["functions"]}
    assert fns["blocking"]["done"] == 20 and fns["fails"]["failed"] == 1
    assert fns["flaky"]["retried"] == 1 and fns["flaky"]["done"] == 1
    (fail,) = [g for g in data["failure_groups"] if g["function"].endswith("fails")]
    assert "ValueError: bad input 7" in fail["traceback"]
    assert data["summary"]["workers (most at once)"] == 2
    g = data["graph"]
    assert g["tasks"] == tasks and g["edges"] == 40 and g["depth"] == 2
    assert "<script src" not in path.read_text()  # self-contained: nothing to fetch


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


async def _dump_dom(browser: str, page: Path, tmp_path: Path) -> tuple[str, str]:
    """The DOM a headless browser built from ``page`` after its scripts ran, and its stderr."""
    proc = await asyncio.create_subprocess_exec(
        browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom",
        f"--user-data-dir={tmp_path / 'profile'}", page.as_uri(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return out.decode(), err.decode()


@pytest.mark.core_independent
@pytest.mark.skipif(_chromium() is None, reason="no chromium, chromium-browser or "
                    "google-chrome on PATH: run 'make test-browser' to install Debian's "
                    "chromium and run this test")
async def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    async with async_wf.Runtime(threads=4, report=path) as rt:
        _tasks, attempts = await _workload(rt, tmp_path)
    browser = _chromium()
    assert browser is not None
    dom, err = await _dump_dom(browser, path, tmp_path)
    assert 'data-rendered="yes"' in dom, err[-2000:]
    # what the page's own script built: one rect per attempt, a row per function
    assert len(re.findall(r'<rect [^>]*class="task"', dom)) == attempts
    assert len(re.findall(r'<tr class="fn"', dom)) == 5
    assert dom.count('<details class="failure"') == 2  # the failure and the retried attempt
    assert "<polyline" in dom


# -------------------------------------------------------------------- dag
@pytest.mark.core_independent
async def test_dag_dot(tmp_path: Path) -> None:
    async with async_wf.Runtime(dag=True) as rt:
        a = rt.submit(coro, 1)
        b = rt.submit(coro, 2)
        c = rt.submit(sum, [a, b])
        assert await c == 5
        rt.dag(tmp_path / "g.dot")
    text = (tmp_path / "g.dot").read_text()
    assert text.startswith("digraph async_wf {")
    assert re.findall(r"t(\d+) -> t(\d+);", text) == [("1", "3"), ("2", "3")]
    assert len(re.findall(r"^  t\d+ \[label=", text, re.M)) == 3
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", "-o", os.devnull, str(tmp_path / "g.dot")], check=True)


@pytest.mark.core_independent
async def test_dag_needs_recording(tmp_path: Path) -> None:
    async with async_wf.Runtime() as rt:
        with pytest.raises(RuntimeError, match=r"Runtime\(dag=True\)"):
            rt.dag(tmp_path / "g.dot")


# ---------------------------------------------------------------- logging
@pytest.mark.core_independent
@UV
async def test_worker_log_records_reach_the_scheduler(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with async_wf.Runtime(workers=1) as rt:
        assert await rt.submit(log_warning, "hello") == "hello"
        wid = rt.transport.link_bytes()[0][0]

        def seen() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "async_wf.worker"
                    and "task says hello" in r.getMessage()]

        await until(seen, "the forwarded record")
    (rec,) = seen()
    assert rec.levelno == logging.WARNING
    assert rec.worker_id == wid  # type: ignore[attr-defined]
    assert rec.worker_logger == "app.tasks"  # type: ignore[attr-defined]
    assert f"worker #{wid}" in rec.getMessage()


@pytest.mark.core_independent
@UV
@pytest.mark.parametrize("frame", ["wrong-shape", "wrong-types", "bad-timings"])
async def test_malformed_log_or_timing_frame_closes_that_connection_only(frame: str) -> None:
    async with async_wf.Runtime(workers=1) as rt:
        t = rt.transport
        peer = await RawPeer.connect(t.address)  # type: ignore[attr-defined]
        try:
            await peer.handshake(t.secret)  # type: ignore[attr-defined]
            await until(lambda: rt.statistics()["workers"] == 2, "the raw peer to join")
            if frame == "wrong-shape":
                peer.send(P.encode(P.LOG, 42))
            elif frame == "bad-timings":
                peer.send(P.encode(P.RESULTS, ([], "not an offset", [])))
            else:
                peer.send(P.encode(P.LOG, [("app", "WARNING", "msg", 1.0)]))
            assert await peer.closed_by_peer()
        finally:
            peer.close()
        await until(lambda: rt.statistics()["workers"] == 1, "only the real worker to stay")
        assert await asyncio.wait_for(rt.submit(square, 7), HANG) == 49
        assert rt.statistics()["workers_lost"] == 1


# -------------------------------------------------------------------- cli
CLI_APP = textwrap.dedent('''
    import os, time
    import async_wf

    def work(i):
        time.sleep(0.001)
        return os.getpid()

    async def main():
        async with async_wf.Runtime() as rt:
            pids = await async_wf.gather(*[rt.submit(work, i) for i in range(40)])
        print(len(set(pids)), "worker processes")

    async_wf.run(main())
''')


@pytest.mark.core_independent
def test_cli_run_with_observability(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(CLI_APP)
    proc = subprocess.run(
        [sys.executable, "-m", "async_wf.cli", "run", "--workers", "2", "--checkpoint",
         "f.wfck", "--progress", "--trace", "t.json", "--report", "r.html", "app.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2 worker processes"
    assert proc.stderr == ""  # --progress is quiet off a terminal
    spans, _meta = _spans(tmp_path / "t.json")
    assert len(spans) == 40
    assert len({e["pid"] for e in spans}) == 2
    assert len(_report_data(tmp_path / "r.html")["stream"]) == 40
    assert (tmp_path / "f.wfck").stat().st_size > 0


@pytest.mark.core_independent
def test_cli_help_lists_every_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "async_wf.cli", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("run", "worker", "checkpoint"):
        assert re.search(rf"^\s+{cmd}\s+\S", proc.stdout, re.M), proc.stdout
    proc = subprocess.run([sys.executable, "-m", "async_wf.cli", "run", "--help"],
                          capture_output=True, text=True, timeout=60)
    for flag in ("--progress", "--trace", "--metrics", "--report", "--checkpoint"):
        assert flag in proc.stdout


# -------------------------------------------------------------------- mpi
MPI_APP = textwrap.dedent('''
    import logging, time
    import async_wf

    def work(i):
        time.sleep(0.002)
        if i == 3:
            logging.getLogger("app").warning("task %d on a rank warns", i)
        return i

    async def main():
        async with async_wf.Runtime(trace="t.json") as rt:
            print(sum(await async_wf.gather(*[rt.submit(work, i) for i in range(40)])))

    async_wf.run(main())
''')


@pytest.mark.core_independent
def test_mpi_trace_has_a_process_per_rank_and_rank_logs_come_back(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py (make test installs it)")
    from async_wf._program import find_mpiexec

    (tmp_path / "app.py").write_text(MPI_APP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [find_mpiexec(), "-n", "3", sys.executable, "-m", "async_wf.mpi", "app.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(sum(range(40)))
    # logged again on rank 0 under async_wf.worker (Python's last-resort handler)
    assert re.search(r"worker #[12] rank [12]: app: task 3 on a rank warns", proc.stderr)
    spans, meta = _spans(tmp_path / "t.json")
    assert len(spans) == 40
    names = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert {names[e["pid"]] for e in spans} <= {"worker #1 rank 1", "worker #2 rank 2"}
    for pid in {e["pid"] for e in spans}:  # one slot per rank: one lane
        assert {e["tid"] for e in spans if e["pid"] == pid} == {0}


# ------------------------------------------------- optional libraries (issue 21)
BLOCKER = textwrap.dedent('''
    import sys

    class Blocker:
        """Makes {mod} look uninstalled, as in an install without the [observe] extra."""

        def find_spec(self, name, path=None, target=None):
            if name == "{mod}" or name.startswith("{mod}."):
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
''')

NO_LIB_APP = textwrap.dedent('''
    import async_wf

    async def main():
        async with async_wf.Runtime({option}) as rt:
            print(await rt.submit(sum, [1, 2]))

    async_wf.run(main())
''')


@pytest.mark.core_independent
@pytest.mark.parametrize(("mod", "option", "said"), [
    ("rich", "progress=True", "Runtime(progress=True)"),
    ("prometheus_client", "metrics='127.0.0.1:0'", "Runtime(metrics=...)"),
])
def test_a_missing_observe_library_is_one_clear_line(tmp_path: Path, mod: str, option: str,
                                                     said: str) -> None:
    blocker = BLOCKER.format(mod=mod)
    (tmp_path / "app.py").write_text(blocker + NO_LIB_APP.format(option=option))
    proc = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: "), proc.stderr
    assert said in last and f"'{mod}'" in last, last
    assert "pip install 'async-wf[observe]'" in last, last
    # the same line, alone and without a traceback, from async-wf run
    flag = "--progress" if mod == "rich" else "--metrics=127.0.0.1:0"
    (tmp_path / "plain.py").write_text(NO_LIB_APP.format(option=""))
    cli = subprocess.run(
        [sys.executable, "-c", blocker + "from async_wf.cli import main\n"
         f"raise SystemExit(main(['run', '{flag}', 'plain.py']))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2, cli.stderr
    (line,) = cli.stderr.strip().splitlines()
    assert "pip install 'async-wf[observe]'" in line and f"'{mod}'" in line, line
    assert cli.stdout == ""
    # an observability feature without a library still works without them
    (tmp_path / "dag.py").write_text(blocker + NO_LIB_APP.format(option="dag=True"))
    ok = subprocess.run([sys.executable, "dag.py"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "3", ok.stderr


# ------------------------------------------------------ observability polish (issue 21)
_ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _render_progress(snap: dict[str, Any], width: int = 80) -> list[str]:
    """The progress display drawn once on a terminal ``width`` columns wide: its lines."""
    import io

    from rich.console import Console

    from async_wf.observe import ObserveOptions, Observer
    from async_wf.observe.progress import ProgressDisplay

    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system="standard")
    obs = Observer(ObserveOptions(progress=True))
    obs.snapshot = snap
    display = ProgressDisplay(obs, console)
    assert display.active
    display.close()
    text = _ESC.sub("", buf.getvalue()).replace("\r", "\n")
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()]


@pytest.mark.core_independent
@pytest.mark.parametrize("snap", [
    {"submitted": 300, "finished": 300, "failed": 0, "running": 0, "rate": 0.0},
    {"submitted": 5000, "finished": 1234, "failed": 3, "running": 8, "queued": 120,
     "reused": 200, "cancelled": 2, "rate": 1520.4},
    {"submitted": 2_000_000, "finished": 1_234_567, "failed": 12_345, "running": 16,
     "queued": 1024, "reused": 34_567, "cancelled": 99_999, "rate": 123_456.0},
])
def test_progress_fits_80_columns_with_every_count_whole(snap: dict[str, Any]) -> None:
    lines = _render_progress(snap)
    assert lines and all(len(ln) <= 80 for ln in lines), lines
    text = " ".join(lines)
    assert "…" not in text and "..." not in text, lines
    ended = (snap["finished"] + snap["failed"] + snap.get("cancelled", 0)
             + snap.get("reused", 0))

    def num(n: float) -> str:  # counts of six digits and more are shortened, not cut
        return str(int(n)) if n < 100_000 else (f"{n / 1e6:.3g}M" if n >= 1e6 else
                                                f"{n / 1e3:.3g}k")


    def whole(item: str) -> bool:  # on one line: not cut, not wrapped in two
        return any(item in ln for ln in lines)

    assert whole(f"{num(ended)}/{num(snap['submitted'])}"), lines
    for label, key in (("done", "finished"), ("running", "running"), ("failed", "failed")):
        assert whole(f"{label} {num(snap[key])}"), (label, lines)
    for label in ("queued", "reused", "cancelled"):
        if snap.get(label):
            assert whole(f"{label} {num(snap[label])}"), (label, lines)
        else:
            assert label not in text, lines  # zero: not shown
    assert whole(f"{num(round(snap['rate']))} tasks/s"), lines


def slow_block(ms: int) -> int:
    time.sleep(ms / 1000)
    return ms


@pytest.mark.parametrize("kind", ["local", "tcp"])
async def test_running_counts_tasks_that_run_not_those_queued(kind: str) -> None:
    # 8 blocking tasks, 2 threads (or 1 worker with 1 slot): 2 (or 1) run, the
    # others wait in the thread pool's queue (or were sent ahead to the worker)
    opts: dict[str, Any] = {"threads": 2} if kind == "local" else {"workers": 1}
    runs = 2 if kind == "local" else 1
    async with async_wf.Runtime(metrics="127.0.0.1:0", **opts) as rt:
        if kind == "tcp":
            await until(lambda: rt.statistics()["workers"] == 1, "the worker")
        futs = [rt.submit(slow_block, 400) for _ in range(8)]
        addr = rt.metrics_address
        assert addr is not None

        seen: list[tuple[float, float, float]] = []

        def one_sample() -> bool:
            """Running, queued and finished, all three from one scrape (one snapshot)."""
            m = _scrape(addr)
            seen.append(tuple(  # type: ignore[arg-type]
                m.get((name, (("state", state),)), -1.0) for name, state in (
                    ("async_wf_tasks_now", "running"), ("async_wf_tasks_now", "queued"),
                    ("async_wf_runtime_tasks_total", "finished"))))
            running, queued, finished = seen[-1]
            # a thread that just ended a task and took the next one counts both
            # until the loop hears of the first: wait for a steady sample
            return finished < 8 - runs and running == runs and \
                queued == 8 - runs - finished
        await until(one_sample, "a sample with only the task slots running")
        for f in futs:
            f.cancel()


async def test_dag_alone_colours_nodes_by_state(tmp_path: Path) -> None:
    async with async_wf.Runtime(dag=True) as rt:
        ok = rt.submit(coro, 1)
        bad = rt.submit(fails, 2)
        after_bad = rt.submit(coro, bad)
        hung = rt.submit(asyncio.sleep, 30)
        dropped = rt.submit(asyncio.sleep, 30)
        assert await ok == 2
        with pytest.raises(ValueError):
            await bad
        with pytest.raises(async_wf.DependencyError):
            await after_bad
        dropped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dropped
        rt.dag(tmp_path / "g.dot")
        hung.cancel()
    text = (tmp_path / "g.dot").read_text()
    colour = dict(re.findall(r"^  t(\d+) \[.*fillcolor=(\w+)", text, re.M))
    state = dict(re.findall(r'^  t(\d+) \[.*tooltip="(\w+)', text, re.M))
    want = {ok: ("done", "palegreen"), bad: ("failed", "salmon"),
            after_bad: ("failed", "salmon"), hung: ("pending", "white"),
            dropped: ("cancelled", "lightgrey")}
    for f, (st, col) in want.items():
        assert (state[str(f._id)], colour[str(f._id)]) == (st, col), (f, text)
    assert "legend" in text


def raises_key(i: int) -> int:
    raise KeyError(i)


@pytest.mark.core_independent
async def test_report_throughput_scale_is_robust_and_failures_are_grouped(
        tmp_path: Path) -> None:
    path = tmp_path / "run.html"
    async with async_wf.Runtime(threads=1, report=path) as rt:
        # a steady trickle, then a burst of thousands ending at once: the spike
        for i in range(40):
            await rt.submit(slow_block, 10 + i % 2)
        burst = [rt.submit(coro, i) for i in range(3000)]
        bad = [rt.submit(fails, i) for i in range(5)] + [rt.submit(raises_key, 1)]
        await async_wf.gather(*burst, *bad, return_exceptions=True)
    data = _report_data(path)
    tp = data["throughput"]
    assert sum(tp["bins"]) == 40 + 3000 + 6
    peak = max(tp["bins"])
    # the scale follows the trickle; the spike is clipped and listed with its value
    assert tp["scale"] < peak / 10, tp
    assert [i for i, c in tp["clipped"]] == [i for i, c in enumerate(tp["bins"])
                                             if c > tp["scale"]], tp
    assert max(c for _i, c in tp["clipped"]) == peak
    groups = data["failure_groups"]
    assert [(g["type"], g["function"].rsplit(".", 1)[-1], g["count"]) for g in groups] == [
        ("ValueError", "fails", 5), ("KeyError", "raises_key", 1)], groups
    assert "ValueError: bad input 0" in groups[0]["traceback"]
    assert groups[0]["tasks"][:1] == [bad[0]._id]
    browser = _chromium()
    if browser is None:
        return  # the page's drawing is checked where a browser is (make test-browser)
    dom, _err = await _dump_dom(browser, path, tmp_path)
    assert len(re.findall(r'<text [^>]*class="clipped"', dom)) == len(tp["clipped"])
    assert "5 \u00d7 ValueError in " in dom and "(5 failed; tasks #" in dom


async def test_dag_shows_tasks_reused_from_a_checkpoint(tmp_path: Path) -> None:
    for run in range(2):
        async with async_wf.Runtime(dag=True, checkpoint=tmp_path / "ck.wfck") as rt:
            a = rt.submit(coro, 1)
            b = rt.submit(coro, a)
            assert await b == 3
            rt.dag(tmp_path / f"g{run}.dot")
    first, second = ((tmp_path / f"g{r}.dot").read_text() for r in range(2))
    assert re.findall(r'tooltip="(\w+)"', first) == ["done", "done"]
    # the second run ran nothing: both come from the log, and the edge is still there
    assert re.findall(r'tooltip="(\w+)"', second) == ["reused", "reused"]
    assert re.findall(r"t(\d+) -> t(\d+);", second) == [(str(a._id), str(b._id))]
