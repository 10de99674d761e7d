"""In-situ analytics with a real simulation under the mpich wheel's mpiexec.

The main test runs ``examples/heat_insitu.py``: four simulation ranks on a
2x2 grid publish a heat field every step; this process is the analytics
(a Runtime with two worker processes and a Hub). Everything it received
is compared, bit for bit, with a serial NumPy run of the same update under
the same steering. Other tests put a Bridge in a plain subprocess, to look
at one rule at a time, and kill the analytics to see the simulation fail.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from async_wf import protocol as P
from async_wf._program import find_mpiexec
from async_wf.insitu import ADDRESS_ENV, TOKEN_ENV, Hub

# runs in the first pass only (core_independent): the Hub/Bridge stream between simulation ranks
# and analytics
pytestmark = pytest.mark.core_independent

ROOT = Path(__file__).resolve().parents[2]


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("heat_insitu", ROOT / "examples" /
                                                  "heat_insitu.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


heat = _example()


def test_heat_insitu_matches_a_serial_run_bit_for_bit(tmp_path: Path) -> None:
    n, steps, switch, bp = 32, 40, 20, 2
    out = asyncio.run(heat.analytics(n, steps, backpressure=bp, window=3, switch=switch,
                                     threshold=0.7, record=str(tmp_path), keep=True,
                                     delay=0.01, quiet=True))
    assert out["returncode"] == 0
    assert out["switch"] == switch
    # the heater was turned on from a step the analytics chose while it ran
    assert len(out["steer"]) == 1
    _, on_step, value = out["steer"][0]
    assert 0 < on_step < steps and value == heat.HEATER
    ref = heat.serial_run(n, steps, [(on_step, value)])
    assert sorted(out["fields"]) == list(range(steps))
    q = n // 2
    window: list[Any] = []
    for t in range(steps):
        want = ref[t] if t < switch else ref[t][:q, :q]
        got = out["fields"][t]
        assert got.shape == want.shape and got.tobytes() == want.tobytes(), f"step {t}"
        assert out["stats"][t] == heat.field_stats(want), f"step {t}"
        if t == switch:
            window = []  # a new region starts a new window
        window = [*window, want][-3:]
        assert out["tmean"][t].tobytes() == np.stack(window).mean(axis=0).tobytes()
    # the heater changed the simulation: without it the field differs
    assert not np.array_equal(heat.serial_run(n, steps, [])[-1], ref[-1])
    # from the switch on, only rank 0's block overlaps the region: the others stop sending
    for t in range(steps):
        assert out["senders"][t] == ((0, 1, 2, 3) if t < switch else (0,)), f"step {t}"
        assert out["bytes"][t] == (n * n * 8 if t < switch else q * q * 8)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for rec in ranks:
        _, _, nr, nc = rec["block"]
        sent_steps = switch if rec["rank"] else steps
        assert rec["bytes_sent"] == sent_steps * nr * nc * 8
        # steering: every rank saw the heater at the same step, as the serial run assumes
        assert [b for _, b, _ in rec["seen"]] == [
            value if t >= on_step else 0.0 for t in range(steps)]
    # backpressure: step t was published only after the analytics had consumed t - B
    consumed = out["consumed_at"]
    for rec in ranks:
        for t, _, when in rec["seen"]:
            if t - bp < 0:
                continue
            first = min(ts for c, ts in consumed if c >= t - bp)
            assert when >= first, f"rank {rec['rank']} ran ahead at step {t}"
    assert max(rec["waited"] for rec in ranks) > 0  # the slow analytics held it back


SIM = textwrap.dedent("""
    import sys, time, json
    import numpy as np
    from async_wf.insitu import Block, Bridge
    steps, delay, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    b = Bridge(None, {"A": Block((4, 6), (0, 0), (4, 6)), "B": Block((3,), (0,), (3,))},
               timeout=float(sys.argv[4]) if len(sys.argv) > 4 else 20.0)
    seen = []
    for t in range(steps):
        a = np.arange(24.0).reshape(4, 6) + t
        b.publish("A", a, t)
        if mode != "skipB" or t % 2 == 0:
            b.publish("B", np.full(3, float(t)), t)
        seen.append([t, b.get("k", t, None), time.time()])
        if mode == "errors" and t == 1:
            for bad in [lambda: b.publish("A", a, 5), lambda: b.publish("A", a, 1),
                        lambda: b.publish("C", a, 1), lambda: b.publish("B", a, 1)]:
                try:
                    bad()
                except ValueError as exc:
                    print("ValueError:", exc, flush=True)
        time.sleep(delay)
    b.close()
    print(json.dumps({"seen": seen, "sent": b.bytes_sent}), flush=True)
""")


async def _start_sim(hub: Hub, *args: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", SIM, *map(str, args), env={**os.environ, **hub.environ()},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


async def test_region_window_steering_and_skipped_steps() -> None:
    hub = await Hub.start(backpressure=1)
    a = hub.subscribe("A", region=np.s_[1:3, 2:5], window=2)
    bsub = hub.subscribe("B")
    assert hub.steer("k", "x", step=3) == 3
    sim = await _start_sim(hub, 8, 0.0, "skipB")
    got_a: list[tuple[int, Any]] = []
    got_b: list[int] = []

    async def take_b() -> None:
        async for step, data in bsub:
            assert data.tolist() == [float(step)] * 3
            got_b.append(step)

    tb = asyncio.ensure_future(take_b())
    async for step, data in a:
        got_a.append((step, data))
        if step == 4:
            early = hub.earliest_step()
            assert early <= 5  # consumed <= 3 while step 4 is held, B = 1
            with pytest.raises(ValueError, match=rf"steer\('k'\) at step {early - 1}: the "
                               rf"simulation may already be at step {early - 1} .* name a "
                               rf"step >= {early}, or step=None"):
                hub.steer("k", "too late", step=early - 1)
            y_from = hub.steer("k", "y")
            assert y_from == early
    await tb
    out, err = await sim.communicate()
    assert sim.returncode == 0, err.decode()
    res = json.loads(out.decode().splitlines()[-1])
    base = np.arange(24.0).reshape(4, 6)[1:3, 2:5]
    assert [s for s, _ in got_a] == list(range(8))
    for step, data in got_a:
        want = [base + s for s in range(max(0, step - 1), step + 1)]
        assert np.array_equal(data, np.stack(want))
    assert got_b == [0, 2, 4, 6]  # the steps where B was not published are skipped
    assert [k for _, k, _ in res["seen"]] == [
        None if t < 3 else "x" if t < y_from else "y" for t in range(8)]
    assert res["sent"] == 8 * 6 * 8 + 4 * 3 * 8
    await hub.close()


async def test_bad_input_gets_clear_errors_and_bad_frames_close_one_connection() -> None:
    hub = await Hub.start(backpressure=2)
    with pytest.raises(ValueError, match="window must be >= 1 step, got 0"):
        hub.subscribe("A", window=0)
    with pytest.raises(ValueError, match="backpressure must be >= 1 step, got 0"):
        Hub(backpressure=0)
    host, port = hub.address.removeprefix("tcp://").split(":")
    # garbage instead of AUTH, then a wrong token: each closes its own connection
    for wrong_token in (False, True):
        reader, writer = await asyncio.open_connection(host, int(port))
        kind, payload, _ = P.FrameDecoder().feed(await reader.readexactly(16 + 34))[0]
        assert kind == P.HELLO
        if wrong_token:
            auth, _, _ = P.answer_hello(bytes(payload), b"x" * 32, 1, "intruder")
            writer.write(b"".join(P.raw_frame(P.AUTH, auth)))
        else:
            writer.write(b"garbage" * 10)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert hub.rejected == 2
    sub = hub.subscribe("A")
    sim = await _start_sim(hub, 3, 0.0, "errors")
    steps = [s async for s, _ in sub]
    out, err = await sim.communicate()
    assert sim.returncode == 0, err.decode()
    assert steps == [0, 1, 2]
    text = out.decode()
    assert "publish steps must be consecutive: got 5 after 1" in text
    assert "array 'A' was already published at step 1" in text
    assert "unknown array 'C'; this bridge publishes ['A', 'B']" in text
    assert "array 'B': block of shape (4, 6) does not match its layout (3,)" in text
    with pytest.raises(ValueError, match="no rank publishes an array named 'nope'"):
        hub.subscribe("nope")
    await hub.close()


async def _authed(hub: Hub) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to ``hub`` that has passed the handshake."""
    host, port = hub.address.removeprefix("tcp://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    dec = P.FrameDecoder()
    _, hello, _ = dec.feed(await reader.readexactly(16 + 34))[0]
    auth, nonce_s, nonce_w = P.answer_hello(bytes(hello), hub.secret, 1, "test")
    writer.write(b"".join(P.raw_frame(P.AUTH, auth)))
    kind, welcome, _ = dec.feed(await reader.readexactly(16 + P._WELCOME.size))[0]
    assert kind == P.WELCOME
    P.check_welcome(bytes(welcome), hub.secret, nonce_s, nonce_w)
    return reader, writer


async def test_malformed_messages_and_silent_peers_lose_their_connection_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from async_wf.insitu import _hub

    monkeypatch.setattr(_hub, "HANDSHAKE_TIMEOUT", 0.2)
    hub = await Hub.start()
    bad = [("piece", 1, 0),                               # too short
           ("layout", 0, 2, {"A": ((4,), (0,), (9,))}),   # a block outside its array
           ("waiting", 1, 5),                             # not registered as rank 1
           ("hello?",)]                                   # unknown
    for msg in bad:
        reader, writer = await _authed(hub)
        writer.write(b"".join(P.encode(P.INSITU, msg)))
        assert await asyncio.wait_for(reader.read(), 10) == b"", msg
        writer.close()
    host, port = hub.address.removeprefix("tcp://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))  # says nothing
    await reader.readexactly(16 + 34)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert hub.rejected == len(bad) + 1
    # the hub still serves a real simulation
    sub = hub.subscribe("B")
    sim = await _start_sim(hub, 2, 0.0, "-")
    assert [s async for s, _ in sub] == [0, 1]
    _, err = await sim.communicate()
    assert sim.returncode == 0, err.decode()
    await hub.close()


async def test_a_closed_subscription_releases_the_simulation() -> None:
    hub = await Hub.start(backpressure=1)
    sub = hub.subscribe("A")
    sim = await _start_sim(hub, 30, 0.0, "-")
    async for step, _ in sub:
        if step == 3:
            break
    sub.close()
    _, err = await asyncio.wait_for(sim.communicate(), 30)
    assert sim.returncode == 0, err.decode()
    assert hub.stats()["ranks"][0]["pieces"] <= 3 + 3  # it stopped sending soon after
    await hub.close()


async def test_closing_the_hub_ends_its_subscriptions_and_frees_the_simulation() -> None:
    hub = await Hub.start(backpressure=1)
    sub = hub.subscribe("A")
    sim = await _start_sim(hub, 40, 0.01, "-")
    seen = []

    async def consume() -> None:
        async for step, _ in sub:
            seen.append(step)
            if step == 2:
                await hub.close()

    await asyncio.wait_for(consume(), 30)
    _, err = await asyncio.wait_for(sim.communicate(), 30)
    assert sim.returncode == 0, err.decode()  # it ran on to its end without analytics
    assert seen == [0, 1, 2]


async def test_callbacks_follow_a_change_of_array_at_the_named_step() -> None:
    hub = await Hub.start(backpressure=1)
    sub = hub.subscribe("A", region=((0, 2), (0, 6)))
    assert sub.change(name="B", step=3) == 3
    seen: list[tuple[int, tuple[int, ...]]] = []

    async def on_step(step: int, data: Any) -> None:
        await asyncio.sleep(0)
        seen.append((step, data.shape))

    driver = sub.on_step(on_step)
    sim = await _start_sim(hub, 6, 0.0, "-")
    await asyncio.wait_for(driver, 30)
    _, err = await sim.communicate()
    assert sim.returncode == 0, err.decode()
    assert seen == [(0, (2, 6)), (1, (2, 6)), (2, (2, 6)), (3, (3,)), (4, (3,)), (5, (3,))]
    await hub.close()


async def test_an_analytics_that_stops_consuming_times_the_simulation_out() -> None:
    hub = await Hub.start(backpressure=2)
    hub.subscribe("A")  # never consumed
    sim = await _start_sim(hub, 50, 0.0, "-", 1.0)
    _, err = await asyncio.wait_for(sim.communicate(), 30)
    assert sim.returncode == 1
    assert ("AnalyticsTimeoutError: rank 0: the analytics has not consumed step 0 within "
            "1 s (backpressure 2); is it still running?") in err.decode()
    await hub.close()


async def test_a_simulation_started_first_waits_for_the_hub() -> None:
    with socket.socket() as s:  # a free port for the hub that does not exist yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = P.new_secret()
    env = {**os.environ, ADDRESS_ENV: f"tcp://127.0.0.1:{port}", TOKEN_ENV: secret.hex()}
    sim = await asyncio.create_subprocess_exec(sys.executable, "-c", SIM, "3", "0", "-",
                                               env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE)
    await asyncio.sleep(0.5)
    hub = await Hub.start(f"127.0.0.1:{port}", secret=secret)
    wrong = hub.subscribe("nope")  # checked once the ranks have said what they publish
    sub = hub.subscribe("B")
    assert [(s, d.tolist()) async for s, d in sub] == [(t, [float(t)] * 3) for t in range(3)]
    with pytest.raises(ValueError, match=r"no rank publishes an array named 'nope'; the "
                                         r"simulation publishes \['A', 'B'\]"):
        async for _ in wrong:
            pass
    _, err = await sim.communicate()
    assert sim.returncode == 0, err.decode()
    await hub.close()


ON_RANK0 = textwrap.dedent("""
    import json
    import numpy as np
    from mpi4py import MPI
    from async_wf.insitu import AnalyticsThread, Block, Bridge
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()

    async def analytics(hub):
        sums = []
        async for step, data in hub.subscribe("x"):
            sums.append(float(data.sum()))
            if step == 2:
                hub.steer("scale", 10.0, step=5)
        return sums

    th = AnalyticsThread(analytics, backpressure=1) if rank == 0 else None
    addr, secret = comm.bcast((th.address, th.secret) if th else None, 0)
    bridge = Bridge(comm, {"x": Block((size * 4,), (rank * 4,), (4,))}, address=addr,
                    token=secret)
    for t in range(8):
        scale = bridge.get("scale", t, 1.0)
        bridge.publish("x", np.full(4, scale * t), t)
    bridge.close()
    if th is not None:
        print(json.dumps(th.join(30)), flush=True)
""")


def test_the_analytics_can_run_in_a_thread_of_rank_0(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(ON_RANK0)
    proc = subprocess.run([find_mpiexec(), "-n", "3", sys.executable, "-m", "mpi4py", str(app)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sums = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sums == [12.0 * t * (10.0 if t >= 5 else 1.0) for t in range(8)]


ANALYTICS = textwrap.dedent("""
    import asyncio, json, sys
    from async_wf.insitu import ADDRESS_ENV, TOKEN_ENV, Hub
    async def main():
        hub = await Hub.start(backpressure=2)
        sub = hub.subscribe("T")
        print(json.dumps(hub.environ()), flush=True)
        async for step, data in sub:
            print("step", step, flush=True)
            await asyncio.sleep(0.05)
    asyncio.run(main())
""")


def test_killing_the_analytics_fails_the_simulation_with_a_clear_error() -> None:
    analytics = subprocess.Popen([sys.executable, "-c", ANALYTICS], stdout=subprocess.PIPE,
                                 text=True)
    assert analytics.stdout is not None
    env = {**os.environ, **json.loads(analytics.stdout.readline())}
    sim = subprocess.Popen([find_mpiexec(), "-n", "4", sys.executable,
                            str(ROOT / "examples" / "heat_insitu.py"), "--simulate", "--n", "32",
                            "--steps", "100000"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in analytics.stdout:
            if line.startswith("step 5"):
                break
        analytics.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = sim.communicate(timeout=60)
        assert time.monotonic() - t0 < 45
    finally:
        analytics.kill()
        sim.kill()
        analytics.wait()
        sim.wait()
        analytics.stdout.close()
    assert sim.returncode != 0
    assert "AnalyticsTimeoutError" in err
    assert "connection to the analytics hub at tcp://127.0.0.1:" in err


def test_the_insitu_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "insitu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "insitu.py"), "--sizes", "32",
                           "--steps", "5", "--ranks", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in res] == ["off", "idle", "full", "task"]
    assert [r["bytes_per_step"] for r in res] == [0, 0, 32 * 32 * 8, 32 * 32 * 8]
    assert res[3]["task_roundtrip_s"] > 0 and res[2]["latency_s"] > 0


SIM_TQ = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from async_wf.insitu import AnalyticsTimeoutError, Block, Bridge
    steps, delay = int(sys.argv[1]), float(sys.argv[2])
    b = Bridge(None, {"T": Block((3,), (0,), (3,)), "Q": Block((3,), (0,), (3,))}, timeout=20)
    error = None
    for t in range(steps):
        try:
            b.publish("T", np.full(3, float(t)), t)
            b.publish("Q", np.full(3, -float(t)), t)
        except AnalyticsTimeoutError as exc:
            error = str(exc)
            break
        time.sleep(delay)
    print(json.dumps({"state": b.state, "reason": b.reason, "error": error}), flush=True)
    b.close()
""")


async def _start_tq(hub: Hub, steps: int, delay: float) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", SIM_TQ, str(steps), str(delay), env={**os.environ, **hub.environ()},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def test_a_window_restarts_when_the_array_changes_and_knows_its_steps() -> None:
    hub = await Hub.start(backpressure=1)
    sub = hub.subscribe("T", window=2)
    assert sub.change(name="Q", step=3) == 3  # the same shape as T: must not be stacked with it
    sim = await _start_tq(hub, 6, 0.0)
    got = [(s, d.steps, d.tolist()) async for s, d in sub]
    _, err = await sim.communicate()
    assert sim.returncode == 0, err.decode()
    assert got == [(0, (0,), [[0.0] * 3]), (1, (0, 1), [[0.0] * 3, [1.0] * 3]),
                   (2, (1, 2), [[1.0] * 3, [2.0] * 3]), (3, (3,), [[-3.0] * 3]),
                   (4, (3, 4), [[-3.0] * 3, [-4.0] * 3]), (5, (4, 5), [[-4.0] * 3, [-5.0] * 3])]
    await hub.close()


async def test_a_bridge_tells_a_finished_analytics_from_a_lost_one() -> None:
    hub = await Hub.start(backpressure=1)
    sub = hub.subscribe("T")
    sim = await _start_tq(hub, 30, 0.01)
    async for step, _ in sub:
        if step == 2:
            break
    await hub.close()  # finished: the simulation runs on
    out, err = await asyncio.wait_for(sim.communicate(), 60)
    assert sim.returncode == 0, err.decode()
    res = json.loads(out.decode().splitlines()[-1])
    assert res == {"state": "finished", "reason": "the analytics closed the hub", "error": None}

    hub = await Hub.start(backpressure=1)
    sub = hub.subscribe("T")
    sim = await _start_tq(hub, 30, 0.01)
    async for step, _ in sub:
        if step == 2:
            break
    for stream in list(hub._streams.values()):
        # the connection breaks without a goodbye, as when the analytics dies
        stream.abort(ConnectionResetError("test"))
    out, err = await asyncio.wait_for(sim.communicate(), 60)
    assert sim.returncode == 0, err.decode()
    res = json.loads(out.decode().splitlines()[-1])
    assert res["state"] == "lost" and res["error"] is not None
    assert res["reason"].startswith("connection to the analytics hub at tcp://127.0.0.1:")
    await hub.close()


async def test_a_late_subscription_says_from_which_step_it_starts(
        caplog: pytest.LogCaptureFixture) -> None:
    hub = await Hub.start(backpressure=1, idle_lease=16)
    early = hub.subscribe("T")
    sim = await _start_tq(hub, 60, 0.005)
    async for step, _ in early:
        if step == 3:
            break
    early.close()
    await asyncio.sleep(0.05)
    with caplog.at_level("WARNING", logger="async_wf.insitu"):
        late = hub.subscribe("Q")
    steps = [s async for s, _ in late]
    assert steps[0] == late.first_step
    msgs = [r.getMessage() for r in caplog.records]
    assert any(f"subscription {late.id} starts at step {late.first_step}" in m
               and "idle_lease" in m for m in msgs), msgs
    _, err = await asyncio.wait_for(sim.communicate(), 60)
    assert sim.returncode == 0, err.decode()
    await hub.close()
