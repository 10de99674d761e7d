"""The checkpoint log's bulk paths: the compiled code and its Python twin write the same file.

``CheckpointLog.put_results`` appends the common small records of a batch
in one compiled call (``_core.append_small_results``), and
``CheckpointLog.put_done`` (what ``Recorder.record`` calls with the
scheduler's finished tasks) writes them straight from the futures in
another (``_core.append_done``); without the extension (or with
``ASYNC_WF_NO_EXTENSIONS``) the Python loops do it. These tests run both
on the same items, on real files, and compare the bytes and the index;
the compiled BLAKE2b, CRC-32 and pickles of scalars are compared with
``hashlib``, ``zlib`` and ``pickle`` themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import random
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import async_wf
from async_wf import _recorder
from async_wf.checkpoint import CheckpointLog
from async_wf.checkpoint import _format as F
from async_wf.checkpoint import _log as L

try:
    from async_wf import _core
except ImportError:  # not built: the twins are compared with themselves only
    _core = None  # type: ignore[assignment]

compiled_only = pytest.mark.skipif(
    _core is None or L._append_small is None, reason="the compiled extension is not in use"
)


def k(i: int) -> bytes:
    return i.to_bytes(32, "little")


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("not this one")


def _items() -> list[tuple[bytes, Any, str, tuple[bytes, ...]]]:
    """Every kind of item put_results meets, in an order that mixes the paths."""
    scalars: list[Any] = [
        None, True, False, 0, 1, 255, 256, 65535, 65536, -1, -255, -256, 2**31 - 1, -(2**31),
        2**31, -(2**31) - 1, 2**63, 1.5, -0.0, float("inf"), float("nan"), 1e300,
    ]
    values: list[Any] = [
        *scalars, "", "a", "x" * 300, (1, "b"), [1, 2.5], {"a": 1}, b"raw", 3 + 4j,
        np.arange(10), np.zeros(1 << 14),  # buffers: the general path (one large)
        b"z" * (70 << 10),  # 70 KiB: compressed, written at once
        _Unpicklable(), list(range(2000)),
    ]
    items = []
    for i, v in enumerate(values * 3):
        parents = tuple(k(10_000 + j) for j in range(i % 3))
        name = ["m:f", "mod.sub:Cls.method", "m:\u00e9"][i % 3]
        items.append((k(i % (len(values) * 2)), v, name, parents))  # some keys repeat
    return items


def _write(path: Path, batches: list[list[Any]], fast: bool, monkeypatch: pytest.MonkeyPatch,
           **opts: Any) -> tuple[bytes, dict[bytes, int], list[list[bytes]]]:
    with monkeypatch.context() as m:
        m.setattr(L, "_clock", lambda: 1234.5)
        m.setattr(L, "PENDING_MAX", 4096)  # several full buffers per batch
        if not fast:
            m.setattr(L, "_append_small", None)
        failed = []
        with CheckpointLog(path, **opts) as log:
            for batch in batches:
                failed.append([key for key, _ in log.put_results(batch)])
            index = dict(log._results)
    return path.read_bytes(), index, failed


@compiled_only
@pytest.mark.parametrize("opts", [{}, {"flush": "every", "flush_every": 7},
                                  {"flush": "interval"}])
def test_the_bulk_append_writes_the_bytes_of_the_python_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opts: dict[str, Any]
) -> None:
    items = _items()
    batches = [items[:5], items[5:40], items[40:41], items[41:]]
    fast = _write(tmp_path / "fast.wfck", batches, True, monkeypatch, **opts)
    slow = _write(tmp_path / "slow.wfck", batches, False, monkeypatch, **opts)
    assert fast[0] == slow[0]
    assert fast[1] == slow[1]
    assert fast[2] == slow[2] and any(fast[2])  # the unpicklable values, alike
    # and what was written reads back: the last record of each key
    last = {key: v for key, v, _, _ in items if not isinstance(v, _Unpicklable)}
    with CheckpointLog(tmp_path / "fast.wfck", readonly=True) as log:
        assert not log.problems
        assert set(log) == set(last)
        for key, v in last.items():
            got = log.get(key)
            if isinstance(v, np.ndarray):
                assert (got == v).all()
            elif isinstance(v, float) and v != v:
                assert got != got
            else:
                assert got == v and type(got) is type(v)


@compiled_only
def test_records_buffered_before_a_block_are_read_at_their_moved_offsets(
    tmp_path: Path,
) -> None:
    # "every": records wait in the buffer; a read flushes them behind a BLOCK
    # index, which moves every one of them (fix_results)
    with CheckpointLog(tmp_path / "x.wfck", flush="every", flush_every=10_000) as log:
        log.put_results([(k(i), i, "m:f", ()) for i in range(50)])
        log.put_results([(k(7), "again", "m:f", ())])  # supersedes a buffered record
        assert log.get(k(3)) == 3
        assert log.get(k(7)) == "again"
        assert all(log.get(k(i)) == i for i in range(50) if i != 7)
    with CheckpointLog(tmp_path / "x.wfck", readonly=True) as log:
        assert log.get(k(7)) == "again" and log.get(k(49)) == 49 and not log.problems


def _buffered(n: int) -> tuple[bytearray, bytearray, list[bytes], dict[bytes, int]]:
    """n buffered records (RESULTs and tombstones) as a log holds them, at base 100."""
    data, sizes, pkeys, results = bytearray(), bytearray(), [], {}
    for i in range(n):
        key = k(i % 9)
        rec = (F._frame(F.FORGET, key, b"") if i % 5 == 4
               else F._py_result_record(key, 1.0, b"m:f", (), pickle.dumps(i, 5)))
        if i % 5 != 4:
            pkeys.append(key)
            results[key] = 100 + len(data)
        else:
            results.pop(key, None)
        data += rec
        sizes += struct.pack("<I", len(rec))
    return data, sizes, pkeys, results


@compiled_only
def test_both_index_fixers_move_only_the_entries_that_still_point_at_their_record() -> None:
    data, sizes, pkeys, results = _buffered(40)
    want = dict(results)
    F._py_fix_results(want, pkeys, data, sizes, 100, 56)
    got = dict(results)
    _core.fix_results(got, pkeys, data, sizes, 100, 56)
    assert got == want
    assert got == {key: off + 56 for key, off in results.items()}


@compiled_only
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 100, 127, 128, 129, 255, 256, 257, 1000])
def test_the_compiled_blake2b_is_hashlibs(n: int) -> None:
    data = random.Random(n).randbytes(n)
    for person, size in [(b"", 64), (b"awf-task-1", 32), (b"p" * 16, 1), (b"x", 20)]:
        want = hashlib.blake2b(data, digest_size=size, person=person).digest()
        assert _core.blake2b(data, person, size) == want
    with pytest.raises(ValueError, match="digest_size must be 1 to 64, got 65"):
        _core.blake2b(b"", b"", 65)
    with pytest.raises(ValueError, match="person must be at most 16 bytes, got 17"):
        _core.blake2b(b"", b"p" * 17, 32)


@compiled_only
@pytest.mark.parametrize("table", [False, True], ids=["dispatched", "table"])
def test_the_compiled_crc32_is_zlibs_at_every_length_and_alignment(table: bool) -> None:
    # "dispatched" folds with carry-less multiplication where the CPU has it
    # (lengths of 64 bytes and more), "table" is the way of other CPUs
    rnd = random.Random(1)
    block = rnd.randbytes(70_000)
    for start in range(8):
        for n in range(0, 300):
            chunk = block[start : start + n]
            assert _core.crc32(chunk, table) == zlib.crc32(chunk), (start, n)
    for n in (4096, 65_536 + 15, 69_000):
        chunk = block[3 : 3 + n]
        assert _core.crc32(chunk, table) == zlib.crc32(chunk), n
    assert _core.crc32(bytearray(block), table) == zlib.crc32(block)


def _x_pow_mod(e: int, poly: int = 0x104C11DB7) -> int:
    r = 1
    for _ in range(e):
        r <<= 1
        if r >> 32 & 1:
            r ^= poly
    return r


def _reflect(v: int, bits: int) -> int:
    return int(f"{v:0{bits}b}"[::-1], 2)


def test_the_folding_constants_are_the_powers_of_x_they_claim() -> None:
    # each constant of the carry-less CRC is x^e mod P, bit-reflected and
    # shifted left once; the Barrett constant is floor(x^64 / P), reflected
    header = Path(__file__).parents[2] / "src_cython" / "crc32_clmul.h"
    consts = {m[0]: int(m[1], 16)
              for m in re.findall(r"#define AWF_(\w+) (0x[0-9a-f]+)ULL", header.read_text())}
    powers = {"K1": 4 * 128 + 32, "K2": 4 * 128 - 32, "K3": 128 + 32, "K4": 128 - 32, "K5": 64}
    for name, e in powers.items():
        assert consts[name] == _reflect(_x_pow_mod(e), 32) << 1, name
    assert consts["POLY"] == _reflect(0x104C11DB7, 33)
    q, a = 0, 1 << 64
    while a.bit_length() >= 33:
        shift = a.bit_length() - 33
        q |= 1 << shift
        a ^= 0x104C11DB7 << shift
    assert consts["MU"] == _reflect(q, 33)


@compiled_only
def test_the_compiled_scalar_pickles_are_pickles_own() -> None:
    values: list[Any] = [None, True, False, float("nan"), -float("nan"), 0.1, -0.0, 1e-310]
    for b in range(32):
        for d in (-1, 0, 1):
            values += [(1 << b) + d, -(1 << b) + d]
    for v in values:
        got = _core.scalar_pickle(v)
        if isinstance(v, int) and not -(2**31) <= v < 2**31:
            assert got is None, v
        else:
            assert got == pickle.dumps(v, protocol=5), v
    for other in ["a", b"a", 2**40, (1,), 1 + 2j, np.float64(1.0)]:
        assert _core.scalar_pickle(other) is None


# ----------------------------------------------------------- the recorder
@async_wf.task(name="named-inc")
def named(x: int) -> int:
    return x + 1


def plain(x: int) -> Any:
    return [None, x, float(x), str(x), (x,), b"b" * x, np.arange(x)][x % 7]


class CallableObject:
    __hash__ = None  # type: ignore[assignment]  # unhashable: never cached

    def __call__(self, x: int) -> int:
        return -x


def _record_run(path: Path, fast: bool,
                monkeypatch: pytest.MonkeyPatch) -> tuple[dict[bytes, Any], bytes]:
    async def main() -> None:
        async with async_wf.Runtime(checkpoint=path) as rt:
            futs = []
            for i in range(60):
                futs.append(rt.submit(plain, i))
                futs.append(rt.submit(named, i))
                futs.append(rt.submit(CallableObject(), i))
                futs.append(rt.submit(plain, i % 5))  # identical tasks: one record each
            await asyncio.gather(*futs)

    with monkeypatch.context() as m:
        m.setattr(L, "_clock", lambda: 1234.5)
        if not fast:
            m.setattr(L, "_append_done", None)
        asyncio.run(main())
    out = {}
    with CheckpointLog(path, readonly=True) as log:
        for key in log:
            v = log.get(key)
            out[key] = (log.info(key).function, log.info(key).parents,
                        v.tolist() if isinstance(v, np.ndarray) else v)
    return out, path.read_bytes()


class _Done:
    """A finished task as the scheduler hands it to ``Recorder.record``: what the log reads."""

    def __init__(self, fn: Any, i: int, name: str | None, parents: tuple[bytes, ...]) -> None:
        self._fn = fn
        self._opts = async_wf.task(fn, name=name)._opts if name else _PLAIN_OPTS
        self._ckey = k(i)
        self._cparents = parents
        self.name = name or getattr(fn, "__name__", type(fn).__name__)


_PLAIN_OPTS = async_wf.task(plain)._opts


def _record_batches(path: Path, fast: bool, monkeypatch: pytest.MonkeyPatch,
                    flush: str) -> tuple[bytes, dict[bytes, int], int]:
    values: list[Any] = [None, 7, 2**40, 1.5, "s", (1, 2), [3], {"a": 1}, b"b" * 10,
                         b"c" * (70 << 10), np.arange(5), 1 + 2j, _Unpicklable(),
                         list(range(3000))]
    pairs = []
    for i in range(200):
        fn = [plain, named, CallableObject()][i % 3]
        name = "named-inc" if fn is named else None
        parents = tuple(k(5000 + j) for j in range(i % 4))
        # keys repeat, within a batch and across batches: one record each
        pairs.append((_Done(fn, i % 150, name, parents), values[i % len(values)]))
    with monkeypatch.context() as m:
        m.setattr(L, "_clock", lambda: 1234.5)
        m.setattr(L, "PENDING_MAX", 4096)  # full buffers inside batches
        if not fast:
            m.setattr(L, "_append_done", None)
        loop = asyncio.new_event_loop()
        try:
            rec = _recorder.Recorder(async_wf.Checkpoint(path, flush=flush), loop)
            for lo, hi in [(0, 3), (3, 80), (80, 81), (81, 200)]:
                rec.record(pairs[lo:hi])  # type: ignore[arg-type]
            index = dict(rec.log._results)
            rec.close()
        finally:
            loop.close()
    return path.read_bytes(), index, rec.n_recorded


@compiled_only
@pytest.mark.parametrize("flush", ["record", "interval"])
def test_put_done_writes_the_bytes_of_the_python_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush: str
) -> None:
    fast = _record_batches(tmp_path / "fast.wfck", True, monkeypatch, flush)
    slow = _record_batches(tmp_path / "slow.wfck", False, monkeypatch, flush)
    assert fast[0] == slow[0]
    assert fast[1] == slow[1]
    assert fast[2] == slow[2]
    # one record per key but for the unpicklable values
    assert fast[2] == len(fast[1]) > 100
    with CheckpointLog(tmp_path / "fast.wfck", readonly=True) as log:
        assert not log.problems and len(log) == fast[2]
        assert log.get(k(1)) == 7 and log.info(k(1)).parents == (k(5000),)


@compiled_only
def test_the_recorders_compiled_loop_records_what_its_python_loop_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, _ = _record_run(tmp_path / "fast.wfck", True, monkeypatch)
    slow, _ = _record_run(tmp_path / "slow.wfck", False, monkeypatch)
    assert fast == slow
    names = {f for f, _, _ in fast.values()}
    assert names == {f"{__name__}:plain", f"{__name__}:named-inc",
                     f"{__name__}:CallableObject"}
    assert len(fast) == 60 * 3


def test_a_rerun_finds_every_record_made_in_bulk(tmp_path: Path) -> None:
    # on whichever twin this process runs: the records of a run are found
    # by the next one (keys at submit, records in bulk at completion)
    path = tmp_path / "run.wfck"

    async def run() -> tuple[list[Any], int]:
        async with async_wf.Runtime(checkpoint=path) as rt:
            futs = [rt.submit(plain, i) for i in range(300)]
            values = [await f for f in futs]
            return [v.tolist() if isinstance(v, np.ndarray) else v for v in values], \
                rt.statistics()["checkpoint_recorded"]

    first, recorded = asyncio.run(run())
    assert recorded == 300
    again, recorded = asyncio.run(run())
    assert again == first and recorded == 0
    assert os.path.getsize(path) > 0


def test_the_recorders_compiled_key_and_in_are_its_python_twins(tmp_path: Path) -> None:
    # on whichever twin this process runs, against the Python one on the same
    # recorder: the same key for every kind of call, the same answer for `in`
    loop = asyncio.new_event_loop()
    try:
        rec = _recorder.Recorder(async_wf.Checkpoint(tmp_path / "k.wfck"), loop)
        versioned = async_wf.task(plain, version="2")._opts
        keyed = async_wf.task(plain, key=lambda x: x % 2)._opts
        calls: list[tuple[Any, Any, tuple[Any, ...], dict[str, Any]]] = [
            (plain, _PLAIN_OPTS, (1,), {}), (plain, _PLAIN_OPTS, ("s", 2.5, None), {}),
            (plain, _PLAIN_OPTS, (2**70,), {}), (plain, _PLAIN_OPTS, ((1, 2),), {}),
            (plain, _PLAIN_OPTS, (), {"x": 3}), (plain, versioned, (1,), {}),
            (plain, keyed, (5,), {}), (named, _PLAIN_OPTS, (1,), {}),
        ]
        for fn, opts, args, kwargs in calls * 2:  # the second time, identities are cached
            got = rec.key(fn, opts, args, kwargs, [], None)
            want = _recorder._RecorderFastPy.key(rec, fn, opts, args, kwargs, [], None)
            assert got == want and type(got) is bytes, (fn, args, kwargs)
        assert rec.key(plain, _PLAIN_OPTS, (1,), {}, [], None) != \
            rec.key(plain, versioned, (1,), {}, [], None)
        key = rec.key(plain, _PLAIN_OPTS, (1,), {}, [], None)
        assert key is not None and key not in rec
        rec.log.put_result(key, 2, function="m:plain")
        assert key in rec and _recorder._RecorderFastPy.__contains__(rec, key)
        rec.close()
    finally:
        loop.close()


@compiled_only
def test_binding_the_task_types_refuses_a_field_that_is_not_an_object_slot(
    tmp_path: Path,
) -> None:
    # the compiled loops read the futures' fields at the offsets of their
    # slots; a class whose field is anything else is refused, and the
    # binding made at import stays (the runtime's records are unchanged)
    from async_wf._futures import TaskFuture
    from async_wf._options import TaskOptions

    class Plain:
        _ckey = _fn = _opts = _cparents = None

    with pytest.raises(TypeError, match=r"Plain\._ckey is not a slot: NoneType"):
        _core.bind_task_types(Plain, TaskOptions)
    with pytest.raises(TypeError, match=r"TaskFuture\.name is not a slot: property"):
        _core.bind_task_types(TaskFuture, TaskFuture)

    # the refused calls left the binding made at import: a run records its
    # tasks (the compiled loop reads the real futures' slots) as before
    async def main() -> list[Any]:
        async with async_wf.Runtime(checkpoint=tmp_path / "after.wfck") as rt:
            # x % 7 == 1: plain returns x, an int the compiled loop records
            return await asyncio.gather(*(rt.submit(plain, i) for i in range(1, 40, 7)))

    assert asyncio.run(main()) == [1, 8, 15, 22, 29, 36]
    with CheckpointLog(tmp_path / "after.wfck", readonly=True) as log:
        assert not log.problems
        assert sorted(log.get(key) for key in log) == [1, 8, 15, 22, 29, 36]
    _core.bind_task_types(TaskFuture, TaskOptions)  # what _recorder binds: accepted


@compiled_only
def test_the_guessed_block_index_leaves_every_entry_at_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # under "record", put_done counts the BLOCK index its flush will write in
    # the offsets it gives; batches with skipped keys, general pairs, big
    # values and full buffers make the guess wrong, and the flush moves them
    path = tmp_path / "guess.wfck"
    _bytes, index, n = _record_batches(path, True, monkeypatch, "record")
    with CheckpointLog(path, readonly=True) as log:
        assert not log.problems and len(log) == n
        assert log._results == index  # the offsets a scan of the file finds


@compiled_only
def test_a_batch_whose_guess_holds_is_not_moved_at_its_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved: list[int] = []
    fix = L._fix_results
    monkeypatch.setattr(L, "_fix_results", lambda *a: (moved.append(a[5]), fix(*a)))
    loop = asyncio.new_event_loop()
    try:
        rec = _recorder.Recorder(async_wf.Checkpoint(tmp_path / "g.wfck"), loop)
        pairs = [(_Done(plain, i, None, ()), i) for i in range(300)]
        rec.record(pairs[:200])  # type: ignore[arg-type]  # a BLOCK, guessed right
        rec.record(pairs[200:203])  # type: ignore[arg-type]  # too few for a BLOCK
        assert moved == []
        rec.record(pairs[:100] + pairs[203:253])  # type: ignore[arg-type]
        assert moved == [-400]  # 100 pairs found recorded: 50 records, not 150
        for i in (0, 150, 202, 252):
            assert rec.log.get(k(i)) == i  # read in this process, at the offsets kept
        rec.close()
    finally:
        loop.close()
    with CheckpointLog(tmp_path / "g.wfck", readonly=True) as log:
        assert len(log) == 253 and not log.problems
