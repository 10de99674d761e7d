"""bench/large_intermediates.py and bench/chain_latency.py run and report what they
promise (tiny sizes; figures are not asserted, only that they are sane)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LARGE = ROOT / "bench" / "large_intermediates.py"
CHAIN = ROOT / "bench" / "chain_latency.py"


def _json(script: Path, *args: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run([sys.executable, str(script), *args, "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    report: dict = json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[type-arg]
    return report


def test_large_intermediates_reports_time_and_bytes_before_and_after() -> None:
    report = _json(LARGE, "--quick")
    assert (report["mib"], report["links"], report["fan"], report["workers"]) == (1.0, 10, 4, 2)
    by = {r["system"]: r for r in report["results"]}
    assert set(by) == {"async_wf keep_min=0", "async_wf default"}
    for r in by.values():
        assert r["status"] == "ok", r
        for g in ("pipeline", "fanin"):
            assert r[g]["wall_s"] > 0 and r[g]["min_s"] <= r[g]["wall_s"] <= r[g]["max_s"]
            assert r[g]["bytes_through_scheduler"] > 0
    before, after = by["async_wf keep_min=0"], by["async_wf default"]
    # with keep_min=0 every 1 MiB array comes to the scheduler (a link sent ahead
    # to its input's worker takes the value there, so nothing goes back out);
    # held, only the awaited one does (plus small frames)
    mib = 1 << 20
    assert before["pipeline"]["bytes_through_scheduler"] >= 10 * mib
    assert after["pipeline"]["bytes_through_scheduler"] < 2 * mib
    assert before["fanin"]["bytes_through_scheduler"] >= 9 * mib
    assert after["fanin"]["bytes_through_scheduler"] < 2 * mib
    ratios = report["after_over_before"]
    assert set(ratios) == {"pipeline", "fanin"}
    assert 0 < ratios["pipeline"]["bytes"] < 0.2 and ratios["pipeline"]["wall"] > 0


def test_large_intermediates_prints_a_table() -> None:
    out = subprocess.run([sys.executable, str(LARGE), "--quick"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("pipeline: 10 tasks of 1 MiB arrays")
    rows = [line for line in lines if line.startswith("async_wf")]
    assert len(rows) == 4
    assert sum(line.startswith("after / before") for line in lines) == 2


def test_large_intermediates_refuses_an_unknown_system() -> None:
    out = subprocess.run([sys.executable, str(LARGE), "--systems", "spark"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert "--systems must name some of async_wf, dask, ray; got 'spark'" in out.stderr


def test_chain_latency_reports_links_against_a_round_trip() -> None:
    report = _json(CHAIN, "--quick")
    assert (report["n"], report["array_n"], report["repeat"]) == (100, 20, 1)
    assert report["rtt_us"] > 0
    by = {r["row"]: r for r in report["results"]}
    assert list(by) == ["rtt", "chain same-ok", "chain no-ahead", "chain w0 only",
                        "chain across", "array keep_min=0", "array default"]
    assert by["rtt"]["ratio"] == 1.0
    for r in by.values():
        assert r["us"] > 0 and r["min_us"] <= r["us"] <= r["max_us"]
    # forced across: every link after the first ran on the other worker; pinned: none
    assert by["chain w0 only"]["switches"] == 0
    assert by["chain no-ahead"]["switches"] == 0
    assert by["chain across"]["switches"] == 99
    # held arrays: a chain of 1 MiB results does not cross the scheduler
    assert by["array default"]["bytes_through_scheduler"] < 2 * (1 << 20)
    assert by["array keep_min=0"]["bytes_through_scheduler"] >= 20 * (1 << 20)


def test_chain_latency_prints_a_table() -> None:
    out = subprocess.run([sys.executable, str(CHAIN), "--quick"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("chains of 100 links")
    assert [line.split()[0] for line in lines[2:]] == ["rtt", "chain", "chain", "chain",
                                                       "chain", "array", "array"]


def test_chain_latency_refuses_a_one_link_chain() -> None:
    out = subprocess.run([sys.executable, str(CHAIN), "--n", "1"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert "--n must be >= 2" in out.stderr
