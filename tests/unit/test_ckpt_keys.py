"""Checkpoint keys: stable content hashes, function identities, task keys, FileRef.

Functions whose identity is compared are made from source text with
``exec``, the way a program's module is compiled, so that "the same code"
and "changed code" are real code objects, not mocks. Stability across
processes and hash seeds is checked in real subprocesses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections import namedtuple
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import pytest

from async_wf import task
from async_wf.checkpoint import (
    CheckpointKeyError,
    FileRef,
    _keys,
    function_identity,
    stable_hash,
    task_key,
)

ROOT = Path(__file__).resolve().parents[2]


def compile_module(source: str, name: str = "wfmod") -> dict[str, Any]:
    """Run ``source`` as the body of a module called ``name``; return its namespace."""
    ns: dict[str, Any] = {"__name__": name}
    exec(compile(textwrap.dedent(source), f"<{name}>", "exec"), ns)
    return ns


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclasses.dataclass(frozen=True)
class Cfg:
    n: int
    opts: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class OtherCfg:
    n: int
    opts: tuple[Any, ...] = ()


class Point(NamedTuple):
    x: int
    y: int


PointT = namedtuple("PointT", "x y")


# ------------------------------------------------------------------- values
def test_types_are_told_apart() -> None:
    values = [
        None, True, False, 0, 1, 1.0, 1 + 0j, "1", b"1", bytearray(b"1"),
        np.int64(1), np.int32(1), np.float64(1.0), np.bool_(True), np.str_("1"),
        [1], (1,), {1}, frozenset({1}), {1: None}, Point(1, 2), (1, 2), [1, 2],
        PointT(1, 2), Cfg(1), OtherCfg(1), Color.RED, Path("1"), np.array([1]),
        np.array([1.0]), np.array(1), "", b"", (), [], {}, frozenset(), set(),
        2**64, -(2**64),
    ]
    hashes = [stable_hash(v) for v in values]
    assert all(len(h) == 32 for h in hashes)
    assert len(set(hashes)) == len(values)


def test_equal_values_hash_equal() -> None:
    assert stable_hash([1, "a", (2.5, None)]) == stable_hash([1, "a", (2.5, None)])
    assert stable_hash({"a": [1, 2], "b": {3}}) == stable_hash({"b": {3}, "a": [1, 2]})
    assert stable_hash(Cfg(3, ("x",))) == stable_hash(Cfg(3, ("x",)))
    assert stable_hash(2**200) == stable_hash(2**200)
    assert stable_hash(2**200) != stable_hash(2**200 + 1)


def test_floats_zero_signs_and_nans() -> None:
    assert stable_hash(-0.0) != stable_hash(0.0)
    nan_bits = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_0000_0001))[0]
    nans = [float("nan"), -float("nan"), float("inf") - float("inf"), np.nan, nan_bits]
    assert len({stable_hash(x) for x in nans}) == 1
    assert stable_hash(float("inf")) != stable_hash(float("-inf"))
    assert stable_hash(complex(0.0, -0.0)) != stable_hash(complex(0.0, 0.0))
    assert stable_hash(complex(float("nan"), 1)) == stable_hash(complex(np.nan, 1))


def test_dicts_ignore_insertion_order_but_not_pairing() -> None:
    a = {f"k{i}": i for i in range(50)}
    b = dict(reversed(list(a.items())))
    assert list(a) != list(b)
    assert stable_hash(a) == stable_hash(b)
    assert stable_hash({1: 2, 3: 4}) != stable_hash({1: 4, 3: 2})
    assert stable_hash({"a": 1}) != stable_hash({"a": 1.0})
    assert stable_hash({(1, 2): "x"}) == stable_hash({(1, 2): "x"})


def test_sets_ignore_order() -> None:
    words = [f"w{i}" for i in range(100)]
    assert stable_hash(set(words)) == stable_hash(set(reversed(words)))
    assert stable_hash(frozenset(words)) == stable_hash(frozenset(reversed(words)))
    assert stable_hash(set(words)) != stable_hash(frozenset(words))
    assert stable_hash({1, 2}) != stable_hash({1, 3})


def test_dataclass_namedtuple_enum() -> None:
    assert stable_hash(Cfg(1)) != stable_hash(Cfg(2))
    assert stable_hash(Cfg(1, (1,))) != stable_hash(Cfg(1, (1.0,)))
    assert stable_hash(Point(1, 2)) != stable_hash(Point(2, 1))
    assert stable_hash(Color.RED) != stable_hash(Color.BLUE)
    assert stable_hash(Color.RED) == stable_hash(Color(1))

    class Perm(enum.IntFlag):
        R = 4
        W = 2

    assert stable_hash(Perm.R | Perm.W) != stable_hash(Perm.R)
    assert stable_hash(Perm.R | Perm.W) == stable_hash(Perm(6))
    assert stable_hash(Perm.R) != stable_hash(4)


def test_paths_hash_as_text() -> None:
    assert stable_hash(Path("a/b")) == stable_hash(PurePosixPath("a/b"))
    assert stable_hash(Path("a/b")) != stable_hash("a/b")
    assert stable_hash(Path("a/b")) != stable_hash(Path("a/c"))


def test_functions_as_values() -> None:
    ns = compile_module("def f(x):\n    return x + 1\n")
    assert stable_hash(ns["f"]) == stable_hash(ns["f"])
    assert stable_hash([len, ns["f"]]) != stable_hash([len, len])


# ------------------------------------------------------------------- numpy
def test_numpy_arrays_by_dtype_shape_and_data() -> None:
    a = np.arange(12, dtype=np.int64)
    assert stable_hash(a) == stable_hash(a.copy())
    assert stable_hash(a) != stable_hash(a.astype(np.int32))
    assert stable_hash(a) != stable_hash(a.reshape(3, 4))
    assert stable_hash(a.reshape(3, 4)) != stable_hash(a.reshape(4, 3))
    b = a.copy()
    b[5] = -1
    assert stable_hash(a) != stable_hash(b)
    # layout does not matter, content does
    m = np.arange(20.0).reshape(4, 5)
    assert stable_hash(m.T) == stable_hash(np.ascontiguousarray(m.T))
    assert stable_hash(m[:, ::2]) == stable_hash(m[:, ::2].copy())
    assert stable_hash(np.asfortranarray(m)) == stable_hash(m)
    # structured, datetime and object arrays
    rec = np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")])
    rec2 = np.array([(1, 2.5)], dtype=[("c", "<i4"), ("b", "<f8")])
    assert stable_hash(rec) != stable_hash(rec2)
    t = np.array(["2024-01-01"], dtype="datetime64[ns]")
    assert stable_hash(t) == stable_hash(t.copy())
    objs = np.array([{"a": 1}, "x", 3], dtype=object)
    assert stable_hash(objs) == stable_hash(np.array([{"a": 1}, "x", 3], dtype=object))
    assert stable_hash(objs) != stable_hash(np.array([{"a": 2}, "x", 3], dtype=object))
    assert stable_hash(np.float32(1.5)) == stable_hash(np.float32(1.5))
    assert stable_hash(np.float32(1.5)) != stable_hash(np.float64(1.5))


def test_contiguous_array_is_hashed_without_a_copy() -> None:
    a = np.random.default_rng(1).random(4 << 20)  # 32 MiB
    tracemalloc.start()
    try:
        stable_hash(a)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_numpy_subclasses_other_than_memmap_are_refused(tmp_path: Path) -> None:
    mm = np.memmap(tmp_path / "m.bin", dtype=np.int16, mode="w+", shape=(8,))
    mm[:] = np.arange(8)
    assert stable_hash(mm) == stable_hash(np.arange(8, dtype=np.int16))
    with pytest.raises(CheckpointKeyError, match="MaskedArray"):
        stable_hash(np.ma.masked_array([1, 2], mask=[0, 1]))


# ------------------------------------------------------------------ errors
def test_error_names_the_argument_path_type_and_way_out() -> None:
    fid = b"f" * 32
    cfg = {"opts": [1, 2, threading.Lock()]}
    with pytest.raises(CheckpointKeyError) as info:
        task_key(fid, (1,), {"cfg": cfg})
    msg = str(info.value)
    assert msg.startswith("argument 'cfg' -> ['opts'][2]: ")
    assert "_thread:lock" in msg or "_thread.lock" in msg
    assert "checkpoint=False" in msg and "key=" in msg

    with pytest.raises(CheckpointKeyError, match=r"^argument 1 -> \[0\]\.opts\[1\]: .*object"):
        task_key(fid, (0, [Cfg(1, (2, object()))]), {})
    with pytest.raises(CheckpointKeyError, match=r"^value -> \{.*\}: "):
        stable_hash({object()})
    with pytest.raises(CheckpointKeyError, match=r"^value -> <key .*>: "):
        stable_hash({object(): 1})


def test_arbitrary_objects_never_fall_back_to_identity() -> None:
    class Thing:
        def __repr__(self) -> str:
            return "Thing()"

    with pytest.raises(CheckpointKeyError, match="Thing has no stable hash"):
        stable_hash(Thing())
    with pytest.raises(CheckpointKeyError):
        stable_hash(memoryview(b"x"))


def test_cycles_are_an_error_not_a_recursion_error() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(CheckpointKeyError, match=r"^value -> \[1\]: .*contains itself"):
        stable_hash(loop)
    d: dict[str, Any] = {}
    d["me"] = [d]
    with pytest.raises(CheckpointKeyError, match="contains itself"):
        task_key(b"f", (), {"d": d})
    # a value seen twice is not a cycle
    shared = [1, 2]
    assert stable_hash([shared, shared]) == stable_hash([[1, 2], [1, 2]])


def test_deep_nesting_is_an_error() -> None:
    deep: Any = 0
    for _ in range(_keys.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(CheckpointKeyError, match="nests deeper"):
        stable_hash(deep)
    ok: Any = 0
    for _ in range(_keys.MAX_DEPTH - 1):
        ok = (ok,)
    stable_hash(ok)


# --------------------------------------------------------------- task keys
def test_task_key_kwargs_order_and_position() -> None:
    fid = b"f" * 32
    assert task_key(fid, (1,), {"a": 1, "b": 2}) == task_key(fid, (1,), {"b": 2, "a": 1})
    assert task_key(fid, (1, 2), {}) != task_key(fid, (1,), {"b": 2})
    assert task_key(fid, (1,), {}) != task_key(b"g" * 32, (1,), {})
    assert task_key(fid, ((1, 2),), {}) != task_key(fid, (1, 2), {})


def test_leaf_stands_in_for_objects_at_any_depth() -> None:
    class Fut:
        def __init__(self, key: bytes) -> None:
            self.key = key

    def leaf(obj: Any) -> bytes | None:
        return obj.key if isinstance(obj, Fut) else None

    fid = b"f" * 32
    k1 = task_key(fid, (Fut(b"A" * 32), {"x": [Fut(b"B" * 32)]}), {}, leaf)
    k2 = task_key(fid, (Fut(b"A" * 32), {"x": [Fut(b"B" * 32)]}), {}, leaf)
    k3 = task_key(fid, (Fut(b"A" * 32), {"x": [Fut(b"C" * 32)]}), {}, leaf)
    assert k1 == k2 != k3
    # a future's key is not confused with a bytes argument equal to it
    assert task_key(fid, (Fut(b"A" * 32),), {}, leaf) != task_key(fid, (b"A" * 32,), {}, leaf)
    with pytest.raises(CheckpointKeyError):
        task_key(fid, (Fut(b"A"),), {})  # without the leaf it is an unknown object
    with pytest.raises(TypeError, match="leaf must return bytes"):
        task_key(fid, (1,), {}, lambda o: "nope")


# -------------------------------------------------------------- functions
V1 = """
def helper(x):
    return x * 2

def f(x, scale=3):
    return helper(x) + scale
"""


def test_same_code_same_identity_changed_code_new_identity() -> None:
    a = compile_module(V1)
    b = compile_module(V1)
    assert a["f"] is not b["f"]
    assert function_identity(a["f"]) == function_identity(b["f"])
    # moving the function down (line numbers) and editing comments keep it
    moved = compile_module("\n\n# a comment\n" + V1.replace("return x * 2", "return x * 2  # c"))
    assert function_identity(moved["f"]) == function_identity(a["f"])
    body = compile_module(V1.replace("+ scale", "- scale"))
    assert function_identity(body["f"]) != function_identity(a["f"])
    default = compile_module(V1.replace("scale=3", "scale=4"))
    assert function_identity(default["f"]) != function_identity(a["f"])
    # a changed helper of the same module changes its callers too
    helper = compile_module(V1.replace("x * 2", "x * 5"))
    assert function_identity(helper["f"]) != function_identity(a["f"])
    # the module and the name are part of it
    other = compile_module(V1, name="elsewhere")
    assert function_identity(other["f"]) != function_identity(a["f"])


def test_one_default_without_a_stable_hash_does_not_hide_the_others() -> None:
    src = """
    import threading
    LOCK = threading.Lock()

    def f(x, scale=3, lock=LOCK, *, mode="fast"):
        return x * scale
    """
    a = compile_module(src)
    assert function_identity(a["f"]) == function_identity(compile_module(src)["f"])
    for old, new in (("scale=3", "scale=4"), ('mode="fast"', 'mode="slow"')):
        changed = compile_module(src.replace(old, new))
        assert function_identity(changed["f"]) != function_identity(a["f"])


def test_classes_and_methods_include_their_code() -> None:
    src = """
    class Model:
        def __init__(self, k):
            self.k = k

        def helper(self, x):
            return x + 1

        def run(self, x):
            return self.helper(x) * 2

    def train(x):
        return Model(x).run(x)
    """
    a = compile_module(src)
    helper = compile_module(src.replace("x + 1", "x + 2"))
    assert function_identity(a["train"]) == function_identity(compile_module(src)["train"])
    # a changed method of a class the function uses changes the function
    assert function_identity(helper["train"]) != function_identity(a["train"])
    # and the class itself, as a task function or as an argument
    assert function_identity(helper["Model"]) != function_identity(a["Model"])
    assert stable_hash(helper["Model"]) != stable_hash(a["Model"])


def test_identity_does_not_change_when_the_function_has_run() -> None:
    # CPython 3.11 rewrites hot bytecode in place (specialisation); the
    # identity must be taken from the code as compiled
    ns = compile_module(V1)
    before = function_identity(ns["f"])
    for i in range(5000):
        ns["f"](i)
        ns["f"](float(i))
    assert function_identity(ns["f"]) == before
    _keys._code_digest.cache_clear()
    assert function_identity(ns["f"]) == before


def test_version_changes_identity() -> None:
    ns = compile_module(V1)
    ids = {function_identity(ns["f"], v) for v in (None, "1", "2", "")}
    assert len(ids) == 4


def test_closures_by_value() -> None:
    src = """
    def make(k):
        def inner(x):
            return x + k
        return inner
    """
    ns = compile_module(src)
    assert function_identity(ns["make"](1)) == function_identity(ns["make"](1))
    assert function_identity(ns["make"](1)) != function_identity(ns["make"](2))
    # a closure over a value without a stable hash still has an identity
    lock_a, lock_b = threading.Lock(), threading.Lock()
    assert function_identity(ns["make"](lock_a)) == function_identity(ns["make"](lock_b))


def test_recursive_functions_terminate() -> None:
    src = """
    def fact(n):
        return 1 if n < 2 else n * fact(n - 1)

    def make():
        def again(n):
            return n if n < 1 else again(n - 1)
        return again

    def ping(n):
        return pong(n - 1) if n else 0

    def pong(n):
        return ping(n - 1) if n else 1
    """
    ns = compile_module(src)
    for name in ("fact", "ping", "pong"):
        assert len(function_identity(ns[name])) == 32
    assert function_identity(ns["make"]()) == function_identity(ns["make"]())


def test_partials_methods_builtins_and_wrappers() -> None:
    ns = compile_module(V1)
    f = ns["f"]
    assert function_identity(functools.partial(f, 1)) != function_identity(functools.partial(f, 2))
    assert function_identity(functools.partial(f, 1)) == function_identity(functools.partial(f, 1))
    with pytest.raises(CheckpointKeyError, match=r"functools\.partial"):
        function_identity(functools.partial(f, object()))

    @dataclasses.dataclass(frozen=True)
    class Scaler:
        k: int

        def apply(self, x: int) -> int:
            return x * self.k

    assert function_identity(Scaler(2).apply) != function_identity(Scaler(3).apply)
    assert function_identity(Scaler(2).apply) == function_identity(Scaler(2).apply)

    class Plain:
        def run(self) -> None:
            pass

    with pytest.raises(CheckpointKeyError, match=r"bound to an instance of .*Plain"):
        function_identity(Plain().run)

    assert function_identity(len) != function_identity(abs)
    assert function_identity(np.add) != function_identity(np.multiply)
    # @task and lru_cache give the identity of the function they wrap
    wrapped = task(f)
    assert function_identity(wrapped) == function_identity(f)
    assert function_identity(functools.lru_cache(f)) == function_identity(f)


# -------------------------------------------------------------- FileRef
def test_fileref_by_content(tmp_path: Path) -> None:
    p = tmp_path / "data.bin"
    p.write_bytes(b"x" * 3_000_000)  # several chunks
    ref = FileRef(p)
    k1 = stable_hash(ref)
    os.utime(p, ns=(1, 1))  # touch: content unchanged
    assert stable_hash(FileRef(p)) == k1
    copy = tmp_path / "copy.bin"
    copy.write_bytes(p.read_bytes())
    assert stable_hash(FileRef(copy)) == k1  # the path is not part of a content key
    with open(p, "r+b") as f:
        f.seek(2_500_000)
        f.write(b"y")
    assert stable_hash(FileRef(p)) != k1
    assert stable_hash(FileRef(p)) != stable_hash(FileRef(p, by="mtime"))


def test_fileref_by_mtime(tmp_path: Path) -> None:
    p = tmp_path / "data.txt"
    p.write_text("abc")
    os.utime(p, ns=(10**18, 10**18))
    k1 = stable_hash(FileRef(p, by="mtime"))
    os.utime(p, ns=(10**18, 10**18 + 1))
    k2 = stable_hash(FileRef(p, by="mtime"))
    assert k1 != k2
    # same size, same mtime, other bytes: not seen (the documented trade-off)
    p.write_text("xyz")
    os.utime(p, ns=(10**18, 10**18 + 1))
    assert stable_hash(FileRef(p, by="mtime")) == k2


def test_fileref_is_a_path(tmp_path: Path) -> None:
    p = tmp_path / "d.txt"
    p.write_text("hello")
    ref = FileRef(str(p))
    assert os.fspath(ref) == str(p) == str(ref)
    with open(ref) as f:
        assert f.read() == "hello"
    assert Path(ref) == p
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert repr(ref) == f"FileRef({str(p)!r}, by='content')"
    with pytest.raises(ValueError, match="FileRef by must be 'content' or 'mtime', got 'size'"):
        FileRef(p, by="size")
    missing = FileRef(tmp_path / "missing")
    with pytest.raises(CheckpointKeyError, match=r"argument 0: FileRef\('.*missing.* be read"):
        task_key(b"f", (missing,), {})


# ------------------------------------------------- stability across runs
MODULE = """
import dataclasses

@dataclasses.dataclass(frozen=True)
class Cfg:
    name: str
    tags: frozenset

def helper(x):
    return {"a", "b", "c"}, x

def work(x, cfg, *, scale=1.5):
    return helper(x), cfg, scale
"""

PROBE = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import ckmod
from async_wf.checkpoint import FileRef, function_identity, stable_hash, task_key

words = frozenset(f"w{i}" for i in range(200))
values = {
    "words": words,
    "dict": {f"k{i}": {i, str(i)} for i in range(50)},
    "cfg": ckmod.Cfg("x", words),
    "array": np.arange(1000, dtype=np.float32).reshape(10, 100),
    "file": FileRef(sys.argv[2]),
}
fid = function_identity(ckmod.work, "2")
out = {name: stable_hash(v).hex() for name, v in values.items()}
out["function"] = fid.hex()
out["task"] = task_key(fid, (values["dict"], values["cfg"]), {"scale": 2.0}).hex()
print(json.dumps(out, sort_keys=True))
"""


def test_stable_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    (tmp_path / "ckmod.py").write_text(MODULE)
    data = tmp_path / "data.txt"
    data.write_text("payload")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    outs = []
    for seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, str(probe), str(tmp_path), str(data)],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1] == outs[2]
    # and the same in this process
    sys.path.insert(0, str(tmp_path))
    try:
        import ckmod  # type: ignore[import-not-found]

        assert function_identity(ckmod.work, "2").hex() == outs[0]["function"]
        assert stable_hash(FileRef(data)).hex() == outs[0]["file"]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ckmod", None)


_QUICK_ARGS = [
    (1,), ("a", 2.5, None), (float("nan"), -0.0, "\u00e9\udc80"), (), (1 << 62, -5),
    (-(1 << 63), (1 << 63) - 1), (float("inf"), -float("nan"), "x" * 1000),
    tuple(range(100)),
]


def _quick_twins() -> list[object]:
    from async_wf.checkpoint import _keys

    twins: list[object] = [_keys._quick_key_py]
    try:
        from async_wf import _core
    except ImportError:  # not built: the Python twin is all there is
        return twins
    return [*twins, _core.quick_key]


def _general_key(fid: bytes, args: tuple[object, ...], leaf: Any = None) -> bytes:
    """``task_key`` through the general encoder, bypassing the quick path."""
    from async_wf.checkpoint import _keys

    enc = _keys._Encoder(leaf)
    enc.buf += _keys._U64(len(fid)) + fid + _keys._U64(len(args))
    for a in args:
        enc.value(a)
    enc.buf += _keys._U64(0)
    return _keys._digest(_keys._TASK_HASH, enc.buf)


@pytest.mark.parametrize("twin", _quick_twins(), ids=["python", "compiled"][: len(_quick_twins())])
@pytest.mark.parametrize("args", _QUICK_ARGS)
def test_the_quick_path_gives_the_general_encoders_key(twin: Any, args: tuple[object, ...]) -> None:
    fid = function_identity(len)
    quick = twin(fid, args, None)
    assert quick is not None
    assert quick == _general_key(fid, args)
    assert task_key(fid, args, {}) == quick


@pytest.mark.parametrize("twin", _quick_twins(), ids=["python", "compiled"][: len(_quick_twins())])
def test_the_quick_path_declines_what_only_the_general_encoder_takes(twin: Any) -> None:
    fid = function_identity(len)
    for args in [(1 << 63,), (-(1 << 63) - 1,), (True,), (b"x",), ((1,),), (1.5, [2])]:
        assert twin(fid, args, None) is None, args
    # a leaf's bytes stand for the argument, as in the general encoder
    marker = object()
    def leaf(obj: object) -> bytes | None:
        return b"K" * 32 if obj is marker else None
    assert twin(fid, (marker, 3), leaf) == _general_key(fid, (marker, 3), leaf)
    assert twin(fid, (marker,), lambda obj: "not bytes") is None


def test_args_given_as_a_list_key_like_the_same_tuple() -> None:
    # the quick paths take tuples only; a list goes the general way, same key
    fid = function_identity(len)
    assert task_key(fid, [1, "a", None], {}) == task_key(fid, (1, "a", None), {})


# ------------------------------------------------------- globals (issue 16.1)
GLOBALS_SRC = """
import logging
import {helper}

SCALE = {scale}
TABLE = {{"a": (1, 2.5, None), "b": [True, b"x"]}}
log = logging.getLogger("wf")

def f(x):
    log.debug("f")
    return x * SCALE + {helper}.OFFSET + TABLE["a"][0]

def g(x):
    return f(x)          # a helper's globals count for its callers

def h(x):
    return x + 1         # reads nothing
"""


def _module_with(tmp_path: Path, scale: int, offset: object, where: str) -> dict[str, Any]:
    """A module reading SCALE, TABLE and helper.OFFSET, with ``helper`` a real imported module.

    Each ``where`` is a directory of its own with its own ``helper.py``; the
    module has the same name each time, as in two runs of one program.
    """
    d = tmp_path / where
    d.mkdir()
    (d / "helper.py").write_text(f"OFFSET = {offset!r}\nimport os\nNAMES = os.sep\n")
    sys.path.insert(0, str(d))
    try:
        return compile_module(GLOBALS_SRC.format(helper="helper", scale=scale), "wfglobals")
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("helper", None)


def test_globals_a_function_reads_are_in_its_identity(tmp_path: Path) -> None:
    base, same, scale, offset = (
        _module_with(tmp_path, 2, 10, "a"), _module_with(tmp_path, 2, 10, "b"),
        _module_with(tmp_path, 3, 10, "c"), _module_with(tmp_path, 2, 11, "d"),
    )
    ids = {k: function_identity(m["f"]) for k, m in
           {"base": base, "same": same, "scale": scale, "offset": offset}.items()}
    assert ids["base"] == ids["same"]
    assert ids["scale"] != ids["base"], "SCALE = 3 instead of 2 must change the key"
    assert ids["offset"] != ids["base"], "helper.OFFSET = 11 instead of 10 must change the key"
    assert function_identity(scale["g"]) != function_identity(base["g"])
    assert function_identity(scale["h"]) == function_identity(base["h"])
    base["TABLE"]["b"].append(3)  # a container read by f, changed in place
    assert function_identity(base["f"]) != ids["base"]


def test_globals_without_a_stable_hash_are_left_out_visibly_or_refused(tmp_path: Path) -> None:
    m = _module_with(tmp_path, 2, 10, "a")
    seen = _keys.explain(m["f"])
    assert ("wfglobals:f", "SCALE", "int") in seen.included
    assert ("wfglobals:f", "helper.OFFSET", "int") in seen.included
    assert ("wfglobals:f", "log", "logging.Logger") in seen.left_out
    with pytest.raises(CheckpointKeyError, match=r"global 'log' of wfglobals:f .*logging\.Logger"):
        function_identity(m["f"], strict=True)
    assert function_identity(m["h"], strict=True) == function_identity(m["h"])


# ------------------------------------------- directories and stores (16.3/4)
def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_fileref_on_a_directory_keys_its_whole_tree(tmp_path: Path) -> None:
    files = {"a.nc": b"A" * 2_000_000, "sub/b.nc": b"B", "sub/deeper/c": b"C"}
    one = _tree(tmp_path / "one", files)
    two = _tree(tmp_path / "two", files)
    k = stable_hash(FileRef(one))
    assert stable_hash(FileRef(two)) == k  # same tree elsewhere: same content key
    (two / "sub" / "b.nc").write_bytes(b"b")
    assert stable_hash(FileRef(two)) != k, "a changed file inside must change the key"
    two = _tree(tmp_path / "three", files)
    (two / "sub" / "extra").write_bytes(b"")
    assert stable_hash(FileRef(two)) != k, "an added (even empty) file must change the key"
    two = _tree(tmp_path / "four", files)
    (two / "sub" / "b.nc").rename(two / "sub" / "b2.nc")
    assert stable_hash(FileRef(two)) != k, "a renamed file must change the key"
    by_mtime = stable_hash(FileRef(one, by="mtime"))
    os.utime(one / "sub" / "deeper" / "c", ns=(1, 1))
    assert stable_hash(FileRef(one, by="mtime")) != by_mtime
    assert stable_hash(FileRef(one)) == k  # touched, content unchanged


def test_a_zarr_store_rewritten_in_place_changes_the_key(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    z = zarr.open_array(str(tmp_path / "s.zarr"), mode="w", shape=(100,), chunks=(10,),
                        dtype="f8")
    z[:] = np.arange(100.0)
    as_array = stable_hash(z)
    as_store = stable_hash(FileRef(tmp_path / "s.zarr", by="mtime"))
    z[40:50] = -1.0  # one chunk, same shape and metadata
    assert stable_hash(zarr.open_array(str(tmp_path / "s.zarr"), mode="r")) != as_array
    assert stable_hash(FileRef(tmp_path / "s.zarr", by="mtime")) != as_store


XR_PROBE = """
import sys, numpy as np, pandas as pd, xarray as xr
from async_wf.checkpoint import stable_hash
scale = float(sys.argv[1])
ds = xr.Dataset({"t": (("x", "y"), np.arange(12.0).reshape(3, 4) * scale)},
                coords={"x": [10, 20, 30]}, attrs={"units": "K"})
df = pd.DataFrame({"a": np.arange(5) * scale, "b": list("vwxyz")})
print(stable_hash(ds).hex(), stable_hash(ds["t"]).hex(), stable_hash(df).hex(),
      stable_hash(ds.chunk({"x": 1})).hex())
"""


def test_xarray_pandas_and_dask_objects_have_stable_keys(tmp_path: Path) -> None:
    pytest.importorskip("xarray")
    pytest.importorskip("dask")
    (tmp_path / "probe.py").write_text(XR_PROBE)

    def probe(scale: str, seed: str) -> list[str]:
        proc = subprocess.run([sys.executable, str(tmp_path / "probe.py"), scale],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONHASHSEED": seed,
                                   "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    first = probe("1", "1")
    assert len(set(first)) == 4
    assert probe("1", "2") == first  # another process, another hash seed
    assert all(a != b for a, b in zip(probe("2", "1"), first, strict=True))
