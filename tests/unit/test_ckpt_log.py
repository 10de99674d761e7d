"""The checkpoint log on real files and in real processes.

Damage is made the way it happens: files cut at every length, bytes
flipped, garbage appended, a writer killed with SIGKILL while it appends,
a writer whose disk fills up. The one rule checked throughout: whatever
happened to the file, a value read from it is the value that was written,
or an error, never something else.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from async_wf.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointLog,
    compact,
    forget_function,
    inspect,
    verify,
)
from async_wf.checkpoint import _format as F
from async_wf.checkpoint import _scan as S

ROOT = Path(__file__).resolve().parents[2]


def k(i: int) -> bytes:
    """The i-th test key (32 bytes, like a real task key)."""
    return i.to_bytes(32, "little")


def value_of(i: int) -> Any:
    """A small value that differs per key and is not trivially equal across keys."""
    return {"i": i, "s": "v" * (i % 7), "t": (i, -i)}


def fill(path: Path, n: int, **opts: Any) -> None:
    with CheckpointLog(path, **opts) as log:
        for i in range(n):
            log.put_result(k(i), value_of(i), function="m:f")


def records(path: Path) -> list[tuple[int, int, int]]:
    """(offset, type, size) of every intact record of a log, in file order."""
    data = path.read_bytes()
    out: list[tuple[int, int, int]] = []
    S._Scan(data, 16, len(data), deep=True).run(
        lambda typ, off, _klen, size: out.append((off, typ, size))
    )
    return out


def run_py(code: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, **kw,
    )


def assert_never_wrong(
    path: Path,
    expected: dict[bytes, Any],
    forgotten: dict[bytes, Any] | None = None,
    states: dict[tuple[bytes, int], Any] | None = None,
) -> int:
    """Every lookup in ``path`` gives the expected value or an error; return how many were found.

    ``forgotten``: keys with a tombstone, and their value before it. A
    damaged tombstone is skipped like any damaged record, so its key may
    come back with that value; the damage is then reported. ``states``:
    (task key, rank) -> (step, state) that ``restore`` gives, or None.
    """
    found = 0
    forgotten = forgotten or {}
    with CheckpointLog(path, readonly=True) as log:
        for (task, rank), want in (states or {}).items():
            with contextlib.suppress(CheckpointCorruptError):
                assert log.restore(task, rank) in (None, want)
        for key in log:
            if key in forgotten:
                assert log.problems, "a forgotten key is back, and nothing was reported"
                assert same(log.get(key), forgotten[key])
                continue
            assert key in expected, f"a key that was never written: {key!r}"
            try:
                value = log.get(key)
            except CheckpointCorruptError:
                continue
            assert same(value, expected[key]), key
            found += 1
    return found


# ---------------------------------------------------------------- round trips
VALUES: list[Any] = [
    None, True, 0, -1, 2**100, 1.5, float("inf"), "text", "ünïcode", b"\x00bytes", bytearray(b"ba"),
    [1, [2, [3]]], {"a": {"b": (1, 2)}}, {1, 2, 3}, frozenset({"x"}), (None,),
    np.float64(2.5), np.int8(-3), np.arange(10, dtype=np.int16),
    np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
    np.arange(12.0).reshape(3, 4).T,  # not C-contiguous
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.zeros(300_000),  # large and compressible: lz4
    np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8),  # large, incompressible
    {"arrays": [np.ones(5), np.arange(70_000, dtype=np.int32)], "meta": "x"},
    "y" * 200_000,  # a large compressible pickle payload
]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and bool(
            (a == b).all()
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[x], b[x]) for x in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


@pytest.mark.parametrize("flush", ["record", "every", "interval"])
def test_round_trip_of_many_kinds(tmp_path: Path, flush: str) -> None:
    path = tmp_path / "log.wfck"
    with CheckpointLog(path, flush=flush, flush_every=3) as log:
        for i, v in enumerate(VALUES):
            log.put_result(k(i), v, function="m:kinds", parents=(k(i + 1000),))
        # readable before and after they reach the file
        for i, v in enumerate(VALUES):
            assert same(log.get(k(i)), v), i
        assert len(log) == len(VALUES)
    with CheckpointLog(path) as log:
        assert log.problems == []
        for i, v in enumerate(VALUES):
            assert same(log.get(k(i)), v), i
            assert log.info(k(i))[:2] == ("m:kinds", (k(i + 1000),))
    assert verify(path).ok


def test_lambdas_are_stored_with_cloudpickle(tmp_path: Path) -> None:
    with CheckpointLog(tmp_path / "l.wfck") as log:
        log.put_result(k(1), lambda x: x + 41, function="m:f")
        assert log.get(k(1))(1) == 42


def test_large_arrays_are_views_into_one_record_buffer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.random(1 << 17)  # 1 MiB, incompressible
    b = rng.integers(0, 1 << 60, 1 << 16)
    with CheckpointLog(tmp_path / "a.wfck") as log:
        log.put_result(k(1), (a, b), function="m:f")
    with CheckpointLog(tmp_path / "a.wfck", readonly=True) as log:
        a2, b2 = log.get(k(1))
    assert (a2 == a).all() and (b2 == b).all() and a2.dtype == a.dtype
    for arr in (a2, b2):
        assert not arr.flags.owndata and arr.flags.writeable and arr.flags.aligned
    # both arrays live in the same buffer: the record, read once
    assert owner(a2) is owner(b2)
    assert owner(a2).nbytes < a.nbytes + b.nbytes + 4096


def owner(arr: Any) -> Any:
    """The object that owns the memory an array is a view of."""
    x = arr
    while True:
        nxt = x.base if isinstance(x, np.ndarray) else getattr(x, "obj", None)
        if nxt is None:
            return x
        x = nxt


def test_large_array_is_written_and_read_without_extra_copies(tmp_path: Path) -> None:
    a = np.random.default_rng(2).random(4 << 20)  # 32 MiB, incompressible
    with CheckpointLog(tmp_path / "big.wfck") as log:
        tracemalloc.start()
        try:
            log.put_result(k(1), a, function="m:f")
            _, write_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            back = log.get(k(1))
            _, read_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert write_peak < 1 << 20, write_peak  # the array's memory went to writev as it is
    assert read_peak < a.nbytes * 1.05, read_peak  # one buffer, the array is a view into it
    assert (back == a).all()


# ------------------------------------------------------------- index, reopen
@pytest.mark.parametrize("flush", ["record", "every", "interval"])
def test_reopen_gives_the_last_value_of_each_key(tmp_path: Path, flush: str) -> None:
    path = tmp_path / "r.wfck"
    with CheckpointLog(path, flush=flush, flush_every=7) as log:
        for i in range(300):
            log.put_result(k(i % 100), i, function="m:f")  # each key written 3 times
        log.forget(k(5))
        log.put_result(k(6), "after", function="m:f")
        log.forget(k(7))
        log.put_result(k(7), "revived", function="m:f")
        assert k(5) not in log and len(log) == 99
    with CheckpointLog(path) as log:
        assert log.problems == []
        assert len(log) == 99 and k(5) not in log
        assert log.get(k(6)) == "after" and log.get(k(7)) == "revived"
        assert log.get(k(50)) == 250
        with pytest.raises(KeyError):
            log.get(k(5))
        st = log.statistics()
        assert st.by_type == {"RESULT": 302, "STATE": 0, "COMMIT": 0, "FORGET": 2}
        assert st.results == 99 and st.functions["m:f"].results == 99


def test_blocks_make_the_index_and_are_used_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "b.wfck"
    fill(path, 5000, flush="every", flush_every=1000)
    one_by_one: list[int] = []
    orig = CheckpointLog._record_loader

    def counting(self: CheckpointLog, mm: Any) -> Any:
        inner = orig(self, mm)

        def on_record(*a: int) -> None:
            one_by_one.append(a[0])
            inner(*a)

        return on_record

    monkeypatch.setattr(CheckpointLog, "_record_loader", counting)
    with CheckpointLog(path, readonly=True) as log:
        assert len(log) == 5000
        assert log.get(k(4321)) == value_of(4321)
    assert one_by_one == []  # every record was indexed through its block


# --------------------------------------------------------------- flush policies
def file_records(path: Path) -> int:
    with CheckpointLog(path, readonly=True) as log:
        return len(log)


def test_flush_record_writes_at_once(tmp_path: Path) -> None:
    path = tmp_path / "p.wfck"
    with CheckpointLog(path, flush="record") as log:
        for i in range(5):
            log.put_result(k(i), i, function="m:f")
            assert file_records(path) == i + 1


def test_flush_every_n(tmp_path: Path) -> None:
    path = tmp_path / "p.wfck"
    with CheckpointLog(path, flush="every", flush_every=4) as log:
        for i in range(3):
            log.put_result(k(i), i, function="m:f")
        assert file_records(path) == 0
        log.put_result(k(3), 3, function="m:f")
        assert file_records(path) == 4
        log.put_result(k(4), 4, function="m:f")
        assert file_records(path) == 4
        log.flush()
        assert file_records(path) == 5


def test_flush_interval(tmp_path: Path) -> None:
    path = tmp_path / "p.wfck"
    with CheckpointLog(path, flush="interval", flush_interval=0.6) as log:
        for i in range(3):
            log.put_result(k(i), i, function="m:f")
        assert file_records(path) == 0  # buffered: less than 0.6 s since the open
        assert not log.flush_if_due()
        time.sleep(0.65)
        assert log.flush_if_due()  # what an owner's timer calls
        assert file_records(path) == 3
        log.put_result(k(3), 3, function="m:f")
        log.put_result(k(4), 4, function="m:f")
        assert file_records(path) == 3
        time.sleep(0.65)
        log.put_result(k(5), 5, function="m:f")  # an append after the interval flushes
        assert file_records(path) == 6
        log.put_result(k(6), 6, function="m:f")
        assert file_records(path) == 6
    assert file_records(path) == 7  # close flushes


def test_large_records_are_written_at_once_in_order(tmp_path: Path) -> None:
    path = tmp_path / "p.wfck"
    with CheckpointLog(path, flush="every", flush_every=1000) as log:
        log.put_result(k(0), "small", function="m:f")
        log.put_result(k(1), np.random.default_rng(0).random(20_000), function="m:f")
        assert file_records(path) == 2
        log.put_result(k(0), "superseded later", function="m:f")
        log.forget(k(1))
    with CheckpointLog(path, readonly=True) as log:
        assert log.get(k(0)) == "superseded later" and k(1) not in log


def test_fsync_policy_works(tmp_path: Path) -> None:
    fill(tmp_path / "s.wfck", 20, flush="every", flush_every=8, fsync=True)
    assert file_records(tmp_path / "s.wfck") == 20


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"flush": "sometimes"}, "flush must be 'record', 'every' or 'interval', got 'sometimes'"),
        ({"flush_every": 0}, "flush_every must be an int >= 1, got 0"),
        ({"flush_every": True}, "flush_every must be an int >= 1, got True"),
        ({"flush_interval": 0}, "flush_interval must be > 0 seconds and finite, got 0"),
        ({"flush_interval": float("nan")}, "flush_interval must be > 0 seconds and finite"),
    ],
)
def test_bad_options(tmp_path: Path, opts: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        CheckpointLog(tmp_path / "x.wfck", **opts)
    assert not (tmp_path / "x.wfck").exists()


def test_bad_arguments_and_closed_or_readonly_logs(tmp_path: Path) -> None:
    path = tmp_path / "x.wfck"
    log = CheckpointLog(path)
    log.put_result(k(2), 2, function="m:f")
    with pytest.raises(TypeError, match="key must be bytes, got str"):
        log.put_result("k", 1, function="m:f")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key must be 1 to 65535 bytes long, got 0"):
        log.put_result(b"", 1, function="m:f")
    with pytest.raises(ValueError, match="rank must be an int in"):
        log.put_state(k(1), -1, 0, None)
    with pytest.raises(pickle.PicklingError):
        log.put_result(k(1), Unpicklable(), function="m:f")
    assert k(1) not in log
    log.close()
    log.close()
    with pytest.raises(CheckpointError, match="is closed"):
        log.put_result(k(1), 1, function="m:f")
    with pytest.raises(CheckpointError, match="is closed"):
        log.get(k(2))
    ro = CheckpointLog(path, readonly=True)
    with ro, pytest.raises(CheckpointError, match="read-only"):
        ro.put_result(k(1), 1, function="m:f")


class Unpicklable:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("not today")


# ------------------------------------------------------------------ damage
def test_torn_last_record_is_cut_at_every_length(tmp_path: Path) -> None:
    base = tmp_path / "base.wfck"
    fill(base, 5, flush="record")
    good = base.read_bytes()
    with CheckpointLog(base) as log:
        log.put_result(k(99), {"last": list(range(20))}, function="m:f")
    full = base.read_bytes()
    assert full.startswith(good)
    path = tmp_path / "cut.wfck"
    for cut in range(1, len(full) - len(good)):
        path.write_bytes(full[: len(full) - cut])
        with CheckpointLog(path) as log:
            assert len(log) == 5 and k(99) not in log
            assert [p.reason for p in log.problems] == [
                f"torn tail: {len(full) - cut - len(good)} bytes after the last intact record, "
                "cut off"
            ]
            assert log.statistics().truncated_tail_bytes == len(full) - cut - len(good)
            log.put_result(k(100), "next", function="m:f")
        assert path.read_bytes().startswith(good)
        with CheckpointLog(path, readonly=True) as log:
            assert log.problems == [] and len(log) == 6 and log.get(k(4)) == value_of(4)


def test_torn_block_keeps_its_complete_records(tmp_path: Path) -> None:
    path = tmp_path / "blk.wfck"
    fill(path, 50, flush="every", flush_every=50)  # one block of 50 records
    full = path.read_bytes()
    for cut in (1, 37, 500, 2000):
        path.write_bytes(full[:-cut])
        with CheckpointLog(path, readonly=True) as log:
            n = len(log)
            assert 0 < n < 50 and [k(i) for i in range(n)] == sorted(log, key=lambda x: x[::-1])
            assert all(log.get(k(i)) == value_of(i) for i in range(n))
            assert len(log.problems) == 1 and "torn tail" in log.problems[0].reason


BIG = np.random.default_rng(5).random(8_500)  # 68 000 bytes: written directly, incompressible


def make_mixed_log(path: Path) -> dict[bytes, Any]:
    """A small log with bare records, a block, a large record, states and a commit."""
    expected: dict[bytes, Any] = {}
    with CheckpointLog(path, flush="every", flush_every=9) as log:
        for i in range(12):  # one block of 9, then 3 bare records at close
            log.put_result(k(i), value_of(i), function="m:f")
            expected[k(i)] = value_of(i)
        big = BIG
        log.put_result(k(50), big, function="m:big")
        expected[k(50)] = big
        log.put_state(k(60), 0, 1, "s0")
        log.put_state(k(60), 1, 1, "s1")
        log.commit(k(60), 1, 2)
        log.forget(k(3))
        del expected[k(3)]
    return expected


def test_a_flipped_byte_anywhere_is_detected_and_never_used(tmp_path: Path) -> None:
    src = tmp_path / "src.wfck"
    expected = make_mixed_log(src)
    data = src.read_bytes()
    path = tmp_path / "flip.wfck"
    big_at = data.find(BIG[:4].tobytes())
    assert big_at > 0
    # every byte, except inside the large array (sampled: its bytes all behave alike)
    inside = range(big_at + 64, big_at + BIG.nbytes - 64)
    positions = [i for i in range(len(data)) if i not in inside] + list(inside[::4999])
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x5A
        path.write_bytes(flipped)
        if pos < 16:
            with pytest.raises(CheckpointFormatError):
                CheckpointLog(path, readonly=True)
            continue
        found = assert_never_wrong(
            path, expected, {k(3): value_of(3)}, {(k(60), 0): (1, "s0"), (k(60), 1): (1, "s1")}
        )
        assert found >= len(expected) - 2, pos  # at most the damaged records are lost
        assert not verify(path).ok, pos


def test_damage_in_the_middle_is_reported_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "mid.wfck"
    fill(path, 20, flush="record")
    data = bytearray(path.read_bytes())
    off7 = records(path)[7][0]
    data[off7 + 30] ^= 0xFF  # inside record 7's key
    path.write_bytes(data)
    with CheckpointLog(path) as log:  # a writer: nothing is cut, it is not the tail
        assert len(log) == 19 and k(7) not in log
        assert len(log.problems) == 1
        assert log.problems[0].offset == off7
        assert "fails its checksum" in log.problems[0].reason
        assert log.statistics().corrupt == 1
    assert path.stat().st_size == len(data)
    v = verify(path)
    assert [p.offset for p in v.problems] == [off7]


def test_a_damaged_length_field_does_not_hide_later_records(tmp_path: Path) -> None:
    path = tmp_path / "len.wfck"
    fill(path, 20, flush="record")
    data = bytearray(path.read_bytes())
    recs = records(path)
    at = recs[3][0] + 12  # body_len of record 3
    span = recs[8][0] - recs[3][0]  # claims to span 5 records
    data[at : at + 8] = struct.pack("<Q", span - F.HEADER_SIZE - 32)
    path.write_bytes(data)
    with CheckpointLog(path, readonly=True) as log:
        assert sorted(log) == sorted(k(i) for i in range(20) if i != 3)


def test_garbage_appended_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "g.wfck"
    fill(path, 10)
    size = path.stat().st_size
    garbage = os.urandom(1000) + F.RECORD_MAGIC + os.urandom(100) + F.RECORD_MAGIC
    with open(path, "ab") as f:
        f.write(garbage)
    with CheckpointLog(path, readonly=True) as log:
        assert len(log) == 10
        assert log.problems[-1].reason.endswith("left in place: read-only")
    assert not verify(path).ok
    with CheckpointLog(path) as log:
        assert len(log) == 10 and log.statistics().truncated_tail_bytes == len(garbage)
    assert path.stat().st_size == size
    assert verify(path).ok


def test_large_record_damage_is_caught_by_get(tmp_path: Path) -> None:
    path = tmp_path / "big.wfck"
    arr = np.random.default_rng(0).random(S.DEFER_VERIFY // 8 + 100)
    with CheckpointLog(path, flush="record") as log:
        log.put_result(k(1), arr, function="m:f")
        log.put_result(k(2), "after", function="m:f")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the array
    path.write_bytes(data)
    with CheckpointLog(path, readonly=True) as log:
        assert k(1) in log and log.problems == []  # not checked at open: too large
        with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
            log.get(k(1))
        assert log.get(k(2)) == "after"
    v = verify(path)
    assert len(v.problems) == 1 and "checksum" in v.problems[0].reason


def test_not_a_log(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a checkpoint log\n")
    with pytest.raises(CheckpointFormatError, match="is not an async_wf checkpoint log"):
        CheckpointLog(text)
    assert text.read_text().startswith("hello")  # untouched
    newer = tmp_path / "newer.wfck"
    newer.write_bytes(F.FILE_MAGIC + struct.pack("<II", 99, 0))
    with pytest.raises(CheckpointFormatError, match="format version 99"):
        CheckpointLog(newer, readonly=True)
    with pytest.raises(CheckpointFormatError, match="not a regular file"):
        CheckpointLog(tmp_path, readonly=True)
    with pytest.raises(IsADirectoryError):
        CheckpointLog(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointFormatError, match="not a regular file"):
        CheckpointLog(tmp_path / "fifo")
    with pytest.raises(FileNotFoundError):
        CheckpointLog(tmp_path / "missing.wfck", readonly=True)


def test_empty_and_half_written_headers(tmp_path: Path) -> None:
    for size in range(16):
        path = tmp_path / f"h{size}.wfck"
        path.write_bytes(F.FILE_HEADER_BYTES[:size])
        with CheckpointLog(path, readonly=True) as log:
            assert len(log) == 0
        fill(path, 2)
        assert file_records(path) == 2


# -------------------------------------------------------------------- locks
def test_second_writer_in_this_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lock.wfck"
    with CheckpointLog(path) as log:
        log.put_result(k(1), 1, function="m:f")
        with pytest.raises(CheckpointLockedError) as info:
            CheckpointLog(path)
        assert info.value.path == str(path)
        assert info.value.pid == os.getpid()
        assert "in this process" in str(info.value)
        with CheckpointLog(path, readonly=True) as ro:  # readers take no lock
            assert len(ro) in (0, 1)
        with pytest.raises(CheckpointLockedError):
            compact(path)
        with pytest.raises(CheckpointLockedError):
            forget_function(path, "m:f")
    with CheckpointLog(path) as log:
        assert log.get(k(1)) == 1


def test_second_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lock.wfck"
    child = run_py(
        """
        import sys
        from async_wf.checkpoint import CheckpointLog
        with CheckpointLog(sys.argv[1]) as log:
            log.put_result(b"k" * 32, "child", function="m:f")
            print("locked", flush=True)
            sys.stdin.readline()
        """,
        str(path),
    )
    with child:
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "locked"
            with pytest.raises(CheckpointLockedError) as info:
                CheckpointLog(path)
            assert info.value.pid == child.pid
            assert f"process {child.pid}" in str(info.value)
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(30) == 0
        finally:
            child.kill()
    with CheckpointLog(path) as log:
        assert log.get(b"k" * 32) == "child"


def test_a_dropped_log_releases_its_lock(tmp_path: Path) -> None:
    path = tmp_path / "drop.wfck"
    log = CheckpointLog(path)
    del log
    CheckpointLog(path).close()


# ---------------------------------------------------------- MPI states
def test_states_commits_and_restore(tmp_path: Path) -> None:
    path = tmp_path / "mpi.wfck"
    t = k(7)
    with CheckpointLog(path) as log:
        assert log.restore(t, 0) is None
        log.put_state(t, 0, 1, {"rank": 0, "step": 1})
        log.put_state(t, 1, 1, np.full(3, 1.0))
        with pytest.raises(ValueError, match=r"missing ranks \[2\]"):
            log.commit(t, 1, 3)
        log.commit(t, 1, 2)
        log.put_state(t, 0, 2, {"rank": 0, "step": 2})  # step 2 not complete
        assert log.restore(t, 0) == (1, {"rank": 0, "step": 1})
        step, arr = log.restore(t, 1)  # type: ignore[misc]
        assert step == 1 and (arr == 1.0).all()
        assert log.restore(t, 2) is None
        assert log.committed(t) == (1, 2)
        with pytest.raises(ValueError, match=r"missing ranks \[1\]"):
            log.commit(t, 2, 2)
    with CheckpointLog(path) as log:
        assert log.problems == []
        assert log.restore(t, 0) == (1, {"rank": 0, "step": 1})
        log.put_state(t, 1, 2, "r1s2")
        log.commit(t, 2, 2)
        assert log.restore(t, 1) == (2, "r1s2")
    with CheckpointLog(path) as log:
        assert log.restore(t, 0) == (2, {"rank": 0, "step": 2})
        log.forget(t)
        assert log.restore(t, 0) is None
    with CheckpointLog(path, readonly=True) as log:
        assert log.restore(t, 0) is None and log.committed(t) is None


def test_a_commit_without_its_states_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.wfck"
    t = k(8)
    with CheckpointLog(path) as log:
        log.put_state(t, 0, 1, "a")
        log.put_state(t, 1, 1, "b")
        log.commit(t, 1, 2)
    with open(path, "ab") as f:  # a commit of step 2, whose states were never saved
        f.write(F._frame(F.COMMIT, t, struct.pack("<QI", 2, 2)))
        f.write(F._frame(F.RESULT, k(9), b"x" * 20))  # so that the commit is not the tail
    with CheckpointLog(path, readonly=True) as log:
        assert log.restore(t, 1) == (1, "b")
        assert any("lacks the state of ranks [0, 1]" in p.reason for p in log.problems)


def test_large_states(tmp_path: Path) -> None:
    path = tmp_path / "ls.wfck"
    big = np.random.default_rng(3).random(50_000)
    with CheckpointLog(path) as log:
        log.put_state(k(1), 0, 0, big)
        log.commit(k(1), 0, 1)
    with CheckpointLog(path) as log:
        step, back = log.restore(k(1), 0)  # type: ignore[misc]
        assert step == 0 and (back == big).all()


# ------------------------------------------------- forget, compact, inspect
def make_workflow_log(path: Path) -> None:
    """f -> g -> h (each g result has one f parent), plus an unrelated j."""
    with CheckpointLog(path) as log:
        for i in range(3):
            log.put_result(k(i), f"f{i}", function="wf:f")
            log.put_result(k(10 + i), f"g{i}", function="wf:g", parents=(k(i),))
        log.put_result(k(20), "h", function="wf:h", parents=(k(10), k(11)))
        log.put_result(k(21), "h2", function="wf:h", parents=(k(12),))
        log.put_result(k(30), "j", function="other:j")
        log.put_result(k(31), "j of g?", function="other:j2", parents=(k(99),))


def test_forget_function_follows_dependents(tmp_path: Path) -> None:
    path = tmp_path / "wf.wfck"
    make_workflow_log(path)
    assert forget_function(path, "wf:g") == 5  # 3 g, 2 h
    with CheckpointLog(path, readonly=True) as log:
        assert sorted(log) == sorted([k(0), k(1), k(2), k(30), k(31)])
    assert forget_function(path, "f") == 3  # a bare qualname, unique
    assert forget_function(path, "f") == 0
    assert forget_function(path, "nope") == 0
    with CheckpointLog(path, readonly=True) as log:
        assert sorted(log) == sorted([k(30), k(31)])


def test_forget_function_refuses_ambiguous_names(tmp_path: Path) -> None:
    path = tmp_path / "amb.wfck"
    with CheckpointLog(path) as log:
        log.put_result(k(1), 1, function="a:run")
        log.put_result(k(2), 2, function="b:run")
    with pytest.raises(ValueError, match="'run' is ambiguous: a:run, b:run"):
        forget_function(path, "run")


def test_compact_keeps_what_a_run_can_use(tmp_path: Path) -> None:
    path = tmp_path / "cmp.wfck"
    t = k(1070)
    with CheckpointLog(path, flush="every", flush_every=10) as log:
        for rnd in range(5):
            for i in range(100):
                log.put_result(k(i), (rnd, i), function="m:f")
        for i in range(50):
            log.forget(k(i))
        for step in range(3):
            log.put_state(t, 0, step, f"r0s{step}")
            log.put_state(t, 1, step, f"r1s{step}")
            log.commit(t, step, 2)
        log.put_state(t, 0, 3, "uncommitted")
        log.put_state(k(1071), 0, 0, "state of a finished task")
        log.commit(k(1071), 0, 1)
        log.put_result(k(1071), "finished", function="m:mpi")
        log.put_result(k(1072), np.random.default_rng(0).random(10_000), function="m:big")
    before = path.stat().st_size
    mode = 0o640
    os.chmod(path, mode)
    c = compact(path)
    assert c.bytes_before == before and c.bytes_after == path.stat().st_size < before - 30_000
    assert c.records_after == 50 + 2 + 2 + 1  # results, states of step 2, commit
    assert os.stat(path).st_mode & 0o777 == mode
    assert not [p for p in os.listdir(tmp_path) if p != "cmp.wfck"]
    with CheckpointLog(path, readonly=True) as log:
        assert log.problems == [] and len(log) == 52
        assert all(log.get(k(i)) == (4, i) for i in range(50, 100))
        assert log.restore(t, 1) == (2, "r1s2")
        assert log.committed(k(1071)) is None and log.get(k(1071)) == "finished"
        assert (log.get(k(1072)) == np.random.default_rng(0).random(10_000)).all()
        st = log.statistics()
        assert st.by_type == {"RESULT": 52, "STATE": 2, "COMMIT": 1, "FORGET": 0}
    assert verify(path).ok


def test_compact_drops_damaged_records(tmp_path: Path) -> None:
    path = tmp_path / "cd.wfck"
    fill(path, 20, flush="record")
    data = bytearray(path.read_bytes())
    data[records(path)[4][0] + 40] ^= 0xFF
    data += b"torn"
    path.write_bytes(data)
    c = compact(path)
    assert c.records_after == 19
    assert verify(path).ok
    assert assert_never_wrong(path, {k(i): value_of(i) for i in range(20)}) == 19


def test_inspect_counts_per_function(tmp_path: Path) -> None:
    path = tmp_path / "ins.wfck"
    make_workflow_log(path)
    t0 = time.time()
    st = inspect(path)
    assert st.results == 10 and st.records == 10
    assert {name: fs.results for name, fs in st.functions.items()} == {
        "other:j": 1, "other:j2": 1, "wf:f": 3, "wf:g": 3, "wf:h": 2
    }
    fs = st.functions["wf:f"]
    assert t0 - 60 < fs.first <= fs.last <= t0 and fs.bytes > 0
    assert st.bytes == path.stat().st_size and st.problems == []


def test_verify_unpickle_finds_values_the_program_cannot_load(tmp_path: Path) -> None:
    path = tmp_path / "up.wfck"
    mod = tmp_path / "gone_mod.py"
    mod.write_text("class Thing:\n    pass\n")
    writer = run_py(
        """
        import sys
        sys.path.insert(0, sys.argv[2])
        import gone_mod
        from async_wf.checkpoint import CheckpointLog
        with CheckpointLog(sys.argv[1]) as log:
            log.put_result(b"a" * 32, gone_mod.Thing(), function="gone_mod:make")
            log.put_result(b"b" * 32, [1, 2], function="m:ok")
        """,
        str(path), str(tmp_path),
    )
    _out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert verify(path).ok  # checksums and structure: fine
    v = verify(path, unpickle=True)
    assert v.unpickled == 1
    assert len(v.problems) == 1 and "does not unpickle: ModuleNotFoundError" in v.problems[0].reason


# ---------------------------------------------------------- real crashes
WRITER = """
import sys
import numpy as np
from async_wf.checkpoint import CheckpointLog
path, flush = sys.argv[1], sys.argv[2]
noise = np.random.default_rng(0).random(1 << 17)  # 1 MiB: the kernel may stop mid-write
with CheckpointLog(path, flush=flush, flush_every=5, flush_interval=0.01) as log:
    i = len(log)  # a re-run goes on from what the last one left
    print("start", i, flush=True)
    while True:
        if i % 100 == 0:
            noise[0] = i
            value = noise
        else:
            value = {"i": i, "pad": "x" * (i % 100)}
        log.put_result(i.to_bytes(32, "little"), value, function="m:f")
        print(i, flush=True)
        i += 1
"""
NOISE = np.random.default_rng(0).random(1 << 17)


def expected_value(i: int) -> Any:
    if i % 100 == 0:
        NOISE[0] = i
        return NOISE
    return {"i": i, "pad": "x" * (i % 100)}


@pytest.mark.parametrize(("flush", "seed"), [("record", 0), ("every", 1), ("interval", 2)])
def test_sigkill_while_appending_leaves_an_intact_prefix(
    tmp_path: Path, flush: str, seed: int
) -> None:
    path = tmp_path / "kill.wfck"
    rng = np.random.default_rng(seed)
    for _ in range(2):
        with run_py(WRITER, str(path), flush) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            start = proc.stdout.readline()
            assert start.startswith("start"), proc.stderr.read()
            time.sleep(rng.uniform(0.05, 0.2))  # a random moment: maybe inside a write
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # every number printed was printed after its put returned
            printed = proc.stdout.read().splitlines()
            acknowledged = int(printed[-1]) if printed else int(start.split()[1]) - 1
        with CheckpointLog(path) as log:  # cuts a torn tail; no other damage
            assert all("torn tail" in p.reason for p in log.problems), log.problems
            n = len(log)
            assert set(log) == {i.to_bytes(32, "little") for i in range(n)}  # a prefix
            for i in range(n):
                assert same(log.get(i.to_bytes(32, "little")), expected_value(i))
            if flush == "record":
                # every put that returned before the kill is in the file
                assert n >= acknowledged + 1
            elif flush == "every":
                assert n >= acknowledged + 1 - 4
    path.unlink()  # some 30 MB


def test_a_failed_write_breaks_the_log_but_keeps_the_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "full.wfck"
    child = run_py(
        """
        import resource, signal, sys
        from async_wf.checkpoint import CheckpointLog, CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        log = CheckpointLog(sys.argv[1], flush="every", flush_every=10)
        n = 0
        try:
            while True:
                log.put_result(n.to_bytes(32, "little"), {"n": n}, function="m:f")
                n += 1
        except CheckpointError as exc:
            print("failed", n, exc, flush=True)
        try:
            log.put_result(b"z" * 32, 1, function="m:f")
        except CheckpointError as exc:
            print("refused", exc, flush=True)
        log.close()
        """,
        str(path),
    )
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("failed") and "File too large" in lines[0]
    assert lines[1].startswith("refused") and "no more records after a failed write" in lines[1]
    with CheckpointLog(path, readonly=True) as log:
        assert log.problems == []
        n = len(log)
        assert n > 0 and set(log) == {i.to_bytes(32, "little") for i in range(n)}
        assert all(log.get(i.to_bytes(32, "little")) == {"n": i} for i in range(n))


def test_public_names_are_documented() -> None:
    import inspect as pyinspect

    import async_wf.checkpoint as ck

    for name in ck.__all__:
        obj = getattr(ck, name)
        assert pyinspect.getdoc(obj), name
        if pyinspect.isclass(obj):
            for attr, member in vars(obj).items():
                if isinstance(member, property):
                    member = member.fget
                api = not attr.startswith("_") or attr in PROTOCOL_METHODS
                if pyinspect.isfunction(member) and api:
                    assert member.__doc__, f"{name}.{attr}"


PROTOCOL_METHODS = {"__contains__", "__len__", "__iter__", "__fspath__", "__enter__", "__exit__"}


# ------------------------------------------------- the compiled twins agree
def _twins(name: str) -> list[Any]:
    """The Python function ``_format._py_<name>`` and, when built, ``_core.<name>``."""
    out = [getattr(F, f"_py_{name}")]
    try:
        from async_wf import _core
    except ImportError:
        return out
    return [*out, getattr(_core, name)]


@pytest.mark.parametrize("parents", [(), (k(1),), (k(2), b"x", b"y" * 300)])
@pytest.mark.parametrize("payload", [pickle.dumps(None, 5), pickle.dumps(list(range(500)), 5)])
@pytest.mark.parametrize("name", [b"m:f", b"mod.sub:Cls.method" * 3, b""])
def test_both_record_builders_write_the_same_bytes(
    parents: tuple[bytes, ...], payload: bytes, name: bytes
) -> None:
    recs = [build(k(7), 1234.5, name, parents, payload) for build in _twins("result_record")]
    assert len(set(recs)) == 1
    # and the record reads back through the general parser
    rec = recs[0]
    assert rec[:4] == F.RECORD_MAGIC
    assert int.from_bytes(rec[4:8], "little") == __import__("zlib").crc32(rec[8:])
    meta_at = F.HEADER_SIZE + len(k(7))
    got_name, got_parents, when, vpos = F._parse_result_meta(
        memoryview(rec), 0, meta_at, len(rec), lambda r: AssertionError(r))
    assert (got_name, tuple(got_parents), when) == (name.decode(), parents, 1234.5)
    assert vpos % 16 == 0


@pytest.mark.parametrize("build", _twins("result_record"))
def test_both_record_builders_refuse_bad_parents_alike(build: Any) -> None:
    with pytest.raises(TypeError, match="parent key must be bytes, got str"):
        build(k(1), 0.0, b"m:f", ("abc",), b"N.")
    with pytest.raises(ValueError, match="parent key must be 1 to 65535 bytes long, got 0"):
        build(k(1), 0.0, b"m:f", (b"",), b"N.")
    with pytest.raises(ValueError, match="function name must be < 64 KiB"):
        build(k(1), 0.0, b"x" * 70000, (), b"N.")


@pytest.mark.parametrize("read", _twins("mapped_payload"))
def test_both_mapped_readers_take_only_whole_checked_small_records(read: Any) -> None:
    payload = pickle.dumps({"a": 1}, 5)
    rec = F._py_result_record(k(3), 1.0, b"m:f", (k(4),), payload)
    buf = bytearray(b"\0" * 32 + rec + b"\0" * 8)
    assert read(buf, 32, k(3)) == payload
    assert read(bytes(buf), 32, k(3)) == payload
    assert read(buf, 32, k(9)) is None  # another key
    assert read(buf, 31, k(3)) is None  # not at a record
    assert read(buf[: 32 + len(rec) - 1], 32, k(3)) is None  # cut short
    for at in (9, F.HEADER_SIZE + 3, len(rec) - 1):  # a flipped byte anywhere
        bad = bytearray(buf)
        bad[32 + at] ^= 0x10
        assert read(bad, 32, k(3)) is None, at
    assert read(buf, -1, k(3)) is None
    assert read(buf, len(buf), k(3)) is None


def test_the_compiled_crc_is_zlibs() -> None:
    _core = pytest.importorskip("async_wf._core")
    import zlib

    rng = np.random.default_rng(5)
    for n in (0, 1, 7, 64, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _core.crc32(data) == zlib.crc32(data)
