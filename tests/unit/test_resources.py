"""The resource model of issue 18 (async_wf._resources): parsing, wire forms, detection,
the worker's Allocator under real threads, the scheduler's Ledger, task env and pinning."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from async_wf import _resources as res
from async_wf._resources import (
    CORES,
    GPU_VARS,
    GPUS,
    MEMORY,
    OMP_FAMILY,
    Allocator,
    Declared,
    Grant,
    Ledger,
    Request,
    format_memory,
    parse_memory,
    parse_resource_list,
    pin,
    task_env,
)

GiB = 1 << 30
MiB = 1 << 20


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def _declared(cores: int = 4, memory: int = 10 * GiB, gpu_ids: tuple[str, ...] = (),
              cpu_ids: tuple[int, ...] = (), **custom: float) -> Declared:
    return Declared({CORES: cores, MEMORY: memory, GPUS: len(gpu_ids), **custom},
                    gpu_ids, cpu_ids)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "expected"), [
    (1024, 1024),
    (0, 0),
    ("512MiB", 512 * MiB),
    ("16GiB", 16 * GiB),
    ("16 GiB", 16 * GiB),
    (" 16 gib ", 16 * GiB),
    ("2G", 2 * GiB),
    ("2g", 2 * GiB),
    ("2Gi", 2 * GiB),
    ("1.5GB", 1_500_000_000),
    ("1.1GB", 1_100_000_000),
    ("100k", 100 * 1024),
    ("100KB", 100_000),
    ("3T", 3 << 40),
    ("1P", 1 << 50),
    ("100", 100),
    ("100B", 100),
    ("1e3", 1000),
    ("0.5", 1),  # a fractional byte rounds up: a request is never silently 0
    (".5K", 512),
    (2.0, 2),
])
def test_parse_memory_accepts(text: int | str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", [
    -1, "-1G", True, False, "nan", "inf", float("nan"), float("inf"), -0.5, "", "G",
    "12 parsecs", "1.5XB", "1GiBs", "1 2G", "0x10", None, [1], "1e400",
])
def test_parse_memory_refuses_with_the_rule_and_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match="memory size") as info:
        parse_memory(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


def test_parse_memory_names_an_unknown_unit() -> None:
    with pytest.raises(ValueError, match="unknown unit 'XB'"):
        parse_memory("1.5XB")


@pytest.mark.parametrize(("n", "text"), [
    (16 * GiB, "16 GiB"), (3 * GiB // 2, "1.5 GiB"), (512 * MiB, "512 MiB"),
    (100, "100 B"), (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (5 << 40, "5 TiB"),
    (1 << 60, "1024 PiB"),
])
def test_format_memory(n: int, text: str) -> None:
    assert format_memory(n) == text


def test_parse_resource_list() -> None:
    assert parse_resource_list("licence=2,fpga=1") == {"licence": 2.0, "fpga": 1.0}
    # repeated flags joined by the caller leave empty items and spaces
    assert parse_resource_list(" licence = 2 ,, fpga=0.5,") == {"licence": 2.0, "fpga": 0.5}
    assert parse_resource_list("") == {}
    assert parse_resource_list("a.b:c-d_e=0") == {"a.b:c-d_e": 0.0}


@pytest.mark.parametrize(("text", "match"), [
    ("licence", "NAME=AMOUNT, got 'licence'"),
    ("licence=two", "'licence=two': the amount must be a number"),
    ("licence=nan", "'licence=nan': the amount must be a finite number >= 0"),
    ("licence=-1", "'licence=-1': the amount must be a finite number >= 0"),
    ("=1", "resource name must start"),
    ("9lives=1", "'9lives'"),
    ("a b=1", "'a b'"),
    ("licence=1,licence=2", "'licence' is given twice"),
    ("x" * 65 + "=1", "at most 64 characters"),
])
def test_parse_resource_list_names_the_offending_item(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_resource_list(text)


# ---------------------------------------------------------------- Request


def test_request_of_nothing_is_none() -> None:
    assert Request.of(None, None, None, None) is None
    assert Request.of(None, None, None, {}) is None


def test_request_of_stores_sorted_amounts() -> None:
    req = Request.of(8, "16GiB", 1, {"licence": 1, "fpga": 0.5})
    assert req is not None
    assert req.amounts == (
        ("cores", 8), ("fpga", 0.5), ("gpus", 1), ("licence", 1), ("memory", 16 * GiB))
    assert (req.cores, req.gpus, req.memory) == (8, 1, 16 * GiB)
    assert req.get("licence") == 1 and req.get("nothing") == 0
    assert req.describe() == "cores=8, memory=16 GiB, gpus=1, fpga=0.5, licence=1"
    only = Request.of(None, None, None, {"licence": 1})
    assert only is not None
    assert (only.cores, only.gpus, only.memory) == (0, 0, 0)
    assert only.describe() == "licence=1"
    # frozen and hashable: it can key caches and travel in sets
    assert hash(req) == hash(Request.of(8, 16 * GiB, 1, {"fpga": 0.5, "licence": 1}))


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"cores": 0}, ValueError, "cores must be an int >= 1, got 0"),
    ({"cores": -2}, ValueError, "cores must be an int >= 1, got -2"),
    ({"cores": True}, TypeError, "cores must be an int >= 1, got True"),
    ({"cores": 2.5}, TypeError, "cores must be an int >= 1, got 2.5"),
    ({"gpus": 0}, ValueError, "gpus must be an int >= 1, got 0"),
    ({"gpus": "1"}, TypeError, "gpus must be an int >= 1, got '1'"),
    ({"memory": 0}, ValueError, "memory must be > 0 bytes, got 0"),
    ({"memory": "lots"}, ValueError, "memory: .*'lots'"),
    ({"memory": -5}, ValueError, "memory: .*-5"),
    ({"resources": {"gpus": 1}}, ValueError, "'gpus' is not a custom resource; use the gpus="),
    ({"resources": {"cores": 1}}, ValueError, "use the cores= option"),
    ({"resources": {"memory": 1}}, ValueError, "use the memory= option"),
    ({"resources": {"licence": 0}}, ValueError, r"resources\['licence'\] must be .* > 0, got 0"),
    ({"resources": {"licence": -1}}, ValueError, "got -1"),
    ({"resources": {"licence": math.nan}}, ValueError, "got nan"),
    ({"resources": {"licence": math.inf}}, ValueError, "got inf"),
    ({"resources": {"licence": True}}, TypeError, "got True"),
    ({"resources": {"licence": "1"}}, TypeError, "got '1'"),
    ({"resources": {3: 1}}, ValueError, "resource name must be a str, got 3"),
    ({"resources": {"a b": 1}}, ValueError, "'a b'"),
    ({"resources": [("licence", 1)]}, TypeError, "resources must be a mapping"),
])
def test_request_of_refuses(kwargs: dict[str, object], exc: type[Exception], match: str) -> None:
    args: dict[str, object] = {"cores": None, "memory": None, "gpus": None, "resources": None}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        Request.of(**args)  # type: ignore[arg-type]


def test_request_refuses_bad_direct_construction() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        Request(())
    with pytest.raises(ValueError, match="sorted by unique name"):
        Request((("memory", 1), ("cores", 1)))
    with pytest.raises(ValueError, match=r"cores must be an int >= 1, got 1\.5"):
        Request((("cores", 1.5),))


def test_request_wire_round_trip_through_json_and_pickle() -> None:
    req = Request.of(2, "1.5GB", 2, {"licence": 0.25})
    assert req is not None
    wire = req.to_wire()
    assert Request.from_wire(json.loads(json.dumps(wire))) == req
    assert Request.from_wire(pickle.loads(pickle.dumps(wire))) == req
    assert pickle.loads(pickle.dumps(req)) == req
    # order on the wire does not matter; whole floats for whole amounts are fine
    assert Request.from_wire([["memory", 1500000000.0], ["cores", 2.0], ["gpus", 2],
                              ["licence", 0.25]]) == req


@pytest.mark.parametrize(("obj", "match"), [
    ({"cores": 1}, "must be a list"),
    ("cores=1", "must be a list"),
    (None, "must be a list"),
    ([], "must not be empty"),
    ([["cores"]], r"must be \[name, amount\]"),
    ([["cores", 1, 2]], r"must be \[name, amount\]"),
    (["cores"], r"must be \[name, amount\]"),
    ([[1, 1]], "resource name must be a str"),
    ([["x" * 65, 1]], "at most 64 characters"),
    ([["bad name", 1]], "'bad name'"),
    ([["cores", 1], ["cores", 2]], "names 'cores' twice"),
    ([["cores", True]], "got True"),
    ([["cores", "1"]], "got '1'"),
    ([["cores", 0]], "got 0"),
    ([["cores", 1.5]], "whole number, got 1.5"),
    ([["gpus", 0.5]], "whole number, got 0.5"),
    ([["memory", -1]], "got -1"),
    ([["licence", math.nan]], "got nan"),
    ([["licence", math.inf]], "got inf"),
    ([["licence", 0]], "got 0"),
    ([["licence", None]], "got None"),
    ([[f"r{i}", 1] for i in range(68)], "too many amounts: 68"),
    ([[f"r{i}", 1] for i in range(65)], "at most 64 custom resources"),
])
def test_request_from_wire_refuses_malformed(obj: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Request.from_wire(obj)


# ---------------------------------------------------------------- Declared


def test_declared_describe_fits_and_shortfall() -> None:
    d = _declared(32, 120 * GiB, ("0", "1", "2", "3"), licence=2)
    assert d.describe() == "cores=32, memory=120 GiB, gpus=4, licence=2"
    assert _declared(1, 0).describe() == "cores=1, memory=0 B, gpus=0"
    fits = Request.of(32, "120GiB", 4, {"licence": 2})
    assert fits is not None and d.fits(fits) and d.shortfall(fits) == ""
    too_big = Request.of(33, "121GiB", 4, {"licence": 1, "fpga": 1})
    assert too_big is not None and not d.fits(too_big)
    assert d.shortfall(too_big) == "cores=33 > 32, fpga=1 > 0, memory=121 GiB > 120 GiB"
    gpus = Request.of(None, None, 2, None)
    assert gpus is not None
    assert _declared(gpu_ids=("0",)).shortfall(gpus) == "gpus=2 > 1"


def test_declared_fits_with_float_tolerance() -> None:
    d = _declared(licence=0.1 + 0.2)  # 0.30000000000000004
    exact = Request.of(None, None, None, {"licence": 0.3})
    assert exact is not None and d.fits(exact)
    d2 = _declared(licence=0.3)
    sloppy = Request.of(None, None, None, {"licence": 0.1 + 0.2})
    assert sloppy is not None and d2.fits(sloppy)


def test_declared_wire_round_trip_through_json() -> None:
    d = _declared(4, 8 * GiB, ("GPU-8a3c5e5b-1111", "GPU-77"), (0, 1, 2, 3, 4), licence=1.5)
    wire = d.to_wire()
    assert wire == {"amounts": {"cores": 4, "memory": 8 * GiB, "gpus": 2, "licence": 1.5},
                    "gpu_ids": ["GPU-8a3c5e5b-1111", "GPU-77"], "cpu_ids": [0, 1, 2, 3, 4]}
    back = Declared.from_wire(json.loads(json.dumps(wire)))
    assert back == d
    assert isinstance(back.amounts[CORES], int) and isinstance(back.amounts[MEMORY], int)
    assert Declared.from_wire(pickle.loads(pickle.dumps(wire))) == d


def _wire(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"amounts": {"cores": 2, "memory": 1024, "gpus": 1},
                               "gpu_ids": ["0"], "cpu_ids": [0, 1]}
    base.update(changes)
    return base


def _amounts(**changes: object) -> dict[str, object]:
    amounts: dict[str, object] = {"cores": 2, "memory": 1024, "gpus": 1}
    amounts.update(changes)
    return amounts


@pytest.mark.parametrize(("obj", "match"), [
    ([], "must be a dict, got list"),
    ("{}", "must be a dict, got str"),
    (_wire(extra=1), "unknown keys: 'extra'"),
    ({**_wire(), 7: 1}, "unknown keys: 7"),
    ({"amounts": _amounts(), "gpu_ids": ["0"]}, "lacks keys: cpu_ids"),
    (_wire(amounts=[["cores", 2]]), "amounts must be a dict"),
    (_wire(amounts={**_amounts(), 5: 1}), "resource name must be a str, got 5"),
    (_wire(amounts=_amounts(**{"x" * 65: 1})), "at most 64 characters"),
    (_wire(amounts=_amounts(**{f"r{i}": 1 for i in range(65)})), "at most 64 custom"),
    (_wire(amounts=_amounts(licence=math.inf)), "'licence' must be a finite number >= 0, got inf"),
    (_wire(amounts=_amounts(licence=math.nan)), "got nan"),
    (_wire(amounts=_amounts(licence=-1)), "got -1"),
    (_wire(amounts=_amounts(licence=True)), "got True"),
    (_wire(amounts=_amounts(cores=True)), "got True"),
    (_wire(amounts=_amounts(cores=0)), "cores must be an int >= 1, got 0"),
    (_wire(amounts=_amounts(cores=1.5)), "whole number, got 1.5"),
    (_wire(amounts=_amounts(memory=-1)), "got -1"),
    (_wire(amounts={"cores": 2, "gpus": 1}), "lack 'memory'"),
    (_wire(amounts=_amounts(gpus=2)), "gpus=2 but 1 gpu_ids"),
    (_wire(gpu_ids="0"), "gpu_ids must be a list of str"),
    (_wire(gpu_ids=[0]), "GPU id must be a non-empty str"),
    (_wire(gpu_ids=[""]), "GPU id must be a non-empty str"),
    (_wire(gpu_ids=["0,1"]), "without ','"),
    (_wire(amounts=_amounts(gpus=2), gpu_ids=["0", "0"]), "GPU ids must be unique"),
    (_wire(cpu_ids=(0, 1)), "cpu_ids must be a list of int"),
    (_wire(cpu_ids=["0", "1"]), "CPU id must be an int >= 0, got '0'"),
    (_wire(cpu_ids=[0, True]), "got True"),
    (_wire(cpu_ids=[0, -1]), "got -1"),
    (_wire(cpu_ids=[0, 0]), "CPU ids must be unique"),
    (_wire(cpu_ids=[0]), "cores=2 but only 1 cpu_ids"),
])
def test_declared_from_wire_refuses_malformed(obj: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Declared.from_wire(obj)


def test_declared_from_wire_accepts_empty_cpu_ids() -> None:
    assert Declared.from_wire(_wire(cpu_ids=[])).cpu_ids == ()


# ---------------------------------------------------------------- detection


@pytest.fixture
def no_gpu_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GPU variable set and no nvidia-smi on PATH: detection sees no GPUs."""
    monkeypatch.delenv("ASYNC_WF_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    return monkeypatch


def test_detect_matches_this_machine() -> None:
    d = Declared.detect()
    affinity = os.sched_getaffinity(0)
    assert d.amounts[CORES] == len(affinity)
    assert d.cpu_ids == tuple(sorted(affinity))
    assert 0 < d.amounts[MEMORY] <= _mem_total()
    assert d.amounts[GPUS] == len(d.gpu_ids)


def test_detect_sees_a_cgroup_limit(tmp_path: Path) -> None:
    # the files a cgroup mount would hold, for whichever version this host uses
    (tmp_path / "memory.max").write_text("123456789\n")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("123456789\n")
    assert res._cgroup_limit(tmp_path) == 123456789
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    limit = res._cgroup_limit(tmp_path)
    assert limit is None or limit >= _mem_total()  # "no limit", in either spelling
    assert res._cgroup_limit(tmp_path / "absent") is None


@pytest.mark.parametrize(("value", "ids"), [
    ("a,b", ("a", "b")),
    (" 3 , 1 ", ("3", "1")),
    ("", ()),
    ("-1", ()),
])
def test_async_wf_gpus_overrides_detection(no_gpu_env: pytest.MonkeyPatch, value: str,
                                            ids: tuple[str, ...]) -> None:
    no_gpu_env.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    no_gpu_env.setenv("ASYNC_WF_GPUS", value)
    d = Declared.detect()
    assert d.gpu_ids == ids and d.amounts[GPUS] == len(ids)


@pytest.mark.parametrize(("value", "ids"), [
    ("2,3", ("2", "3")),
    ("GPU-5d1c3a2e-aaaa,GPU-1b2c", ("GPU-5d1c3a2e-aaaa", "GPU-1b2c")),
    ("MIG-GPU-5d1c/1/0", ("MIG-GPU-5d1c/1/0",)),
    ("", ()),
    ("-1", ()),
    ("NoDevFiles", ()),
    ("0,-1,2", ("0",)),  # CUDA ignores the ids after the first invalid one
])
def test_cuda_visible_devices_gives_the_ids(no_gpu_env: pytest.MonkeyPatch, value: str,
                                            ids: tuple[str, ...]) -> None:
    no_gpu_env.setenv("CUDA_VISIBLE_DEVICES", value)
    assert Declared.detect().gpu_ids == ids


def test_detection_in_a_fresh_process() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ASYNC_WF_GPUS",)}
    env["CUDA_VISIBLE_DEVICES"] = "GPU-aa,GPU-bb"
    code = ("from async_wf._resources import Declared; import json; "
            "print(json.dumps(Declared.detect().to_wire()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    d = Declared.from_wire(json.loads(out))
    assert d.gpu_ids == ("GPU-aa", "GPU-bb") and d.amounts[CORES] == len(os.sched_getaffinity(0))


def _fake_nvidia_smi(tmp_path: Path, body: str) -> None:
    exe = tmp_path / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def test_nvidia_smi_counts_gpus(no_gpu_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path, 'echo "GPU 0: NVIDIA H100 (UUID: GPU-1)"\n'
                               'echo "GPU 1: NVIDIA H100 (UUID: GPU-2)"\n'
                               'echo "  MIG 1g.10gb Device 0: (UUID: MIG-1)"')
    no_gpu_env.setenv("PATH", str(tmp_path))
    assert Declared.detect().gpu_ids == ("0", "1")


def test_nvidia_smi_failure_means_no_gpus(no_gpu_env: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path, 'echo "GPU 0: would be here"; echo "NVML failed" >&2; exit 9')
    no_gpu_env.setenv("PATH", str(tmp_path))
    assert Declared.detect().gpu_ids == ()


def test_no_gpu_source_means_no_gpus(no_gpu_env: pytest.MonkeyPatch) -> None:
    d = Declared.detect()
    assert d.gpu_ids == () and d.amounts[GPUS] == 0


# ---------------------------------------------------------------- build


def test_build_takes_given_parts_and_detects_the_rest(no_gpu_env: pytest.MonkeyPatch) -> None:
    no_gpu_env.setenv("ASYNC_WF_GPUS", "7,9,11")
    d = Declared.build(cores=1, memory="2G", gpus=2, resources="licence=2,fpga=0.5")
    assert d.amounts == {CORES: 1, MEMORY: 2 * GiB, GPUS: 2, "licence": 2.0, "fpga": 0.5}
    assert d.gpu_ids == ("7", "9")
    assert d.cpu_ids == tuple(sorted(os.sched_getaffinity(0)))
    # more GPUs than detected: ids 0..n-1, as for a worker told what it has
    assert Declared.build(gpus=4).gpu_ids == ("0", "1", "2", "3")
    assert Declared.build(gpus=0).gpu_ids == ()
    assert Declared.build(gpus=["GPU-x", "GPU-y"]).gpu_ids == ("GPU-x", "GPU-y")
    assert Declared.build(gpus="3,5").gpu_ids == ("3", "5")
    assert Declared.build(resources={"licence": 1}).amounts["licence"] == 1
    assert Declared.build().amounts[MEMORY] == Declared.detect().amounts[MEMORY]


def test_build_beyond_the_affinity_mask_gives_no_cpu_ids() -> None:
    many = len(os.sched_getaffinity(0)) + 1
    d = Declared.build(cores=many, gpus=0)
    assert d.amounts[CORES] == many and d.cpu_ids == ()


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"cores": 0}, ValueError, "cores must be an int >= 1, got 0"),
    ({"cores": True}, TypeError, "cores must be an int >= 1, got True"),
    ({"memory": -1}, ValueError, "memory size.*-1"),
    ({"memory": "1 furlong"}, ValueError, "unknown unit"),
    ({"gpus": -1}, ValueError, "gpus must be an int >= 0, got -1"),
    ({"gpus": 1.5}, TypeError, "gpus must be an int >= 0 or a list"),
    ({"gpus": ["0", "0"]}, ValueError, "GPU ids must be unique"),
    ({"gpus": [0, 1]}, ValueError, "GPU id must be a non-empty str"),
    ({"resources": "licence=-1"}, ValueError, "'licence=-1'"),
    ({"resources": {"licence": -1}}, ValueError, r"resources\['licence'\].*>= 0, got -1"),
    ({"resources": {"licence": math.inf}}, ValueError, "got inf"),
    ({"resources": {"gpus": 1}}, ValueError, "use the gpus= option"),
    ({"resources": "cores=2"}, ValueError, "use the cores= option"),
])
def test_build_refuses(no_gpu_env: pytest.MonkeyPatch, kwargs: dict[str, object],
                       exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        Declared.build(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Allocator


def _req(cores: int | None = None, memory: int | str | None = None, gpus: int | None = None,
         **custom: float) -> Request:
    req = Request.of(cores, memory, gpus, custom or None)
    assert req is not None
    return req


def test_allocator_hands_out_lowest_ids_all_or_nothing() -> None:
    alloc = Allocator(_declared(4, 8 * GiB, ("a", "b", "c"), (10, 11, 12, 13, 14, 15)))
    g1 = alloc.try_take(_req(cores=1, gpus=1))
    g2 = alloc.try_take(_req(cores=2, gpus=1))
    assert g1 == Grant(_req(cores=1, gpus=1), ("a",), (10,))
    assert g2 is not None and g2.gpu_ids == ("b",) and g2.cpu_ids == (11, 12)
    assert alloc.used_cores() == 3
    # not enough cores: nothing is taken, not even the free GPU
    before = alloc.free()
    assert alloc.try_take(_req(cores=2, gpus=1)) is None
    assert alloc.try_take(_req(licence=1)) is None  # never declared
    assert alloc.free() == before
    alloc.give(g1)
    g3 = alloc.try_take(_req(gpus=2, memory="1G"))
    assert g3 is not None and g3.gpu_ids == ("a", "c") and g3.cpu_ids == ()
    assert alloc.free()[MEMORY] == 7 * GiB
    alloc.give(g2)
    alloc.give(g3)
    assert alloc.free() == {CORES: 4, MEMORY: 8 * GiB, GPUS: 3}
    assert alloc.used_cores() == 0


def test_allocator_without_cpu_ids_grants_none() -> None:
    alloc = Allocator(_declared(2))
    g = alloc.try_take(_req(cores=2))
    assert g is not None and g.cpu_ids == () and g.gpu_ids == ()


def test_allocator_give_refuses_what_it_did_not_hand_out() -> None:
    alloc = Allocator(_declared(2, GiB, ("a", "b"), (0, 1)))
    g = alloc.try_take(_req(cores=1, gpus=1))
    assert g is not None and g.gpu_ids == ("a",)
    alloc.give(g)
    with pytest.raises(ValueError, match="would make cores 3 free of 2 declared"):
        alloc.give(g)
    held = alloc.try_take(_req(cores=1, gpus=1))
    assert held is not None and held.gpu_ids == ("a",) and held.cpu_ids == (0,)
    snapshot = alloc.free()
    with pytest.raises(ValueError, match="GPU id 'z', which was never declared"):
        alloc.give(Grant(_req(gpus=1), ("z",), ()))
    with pytest.raises(ValueError, match="GPU id 'b', which is not taken"):
        alloc.give(Grant(_req(gpus=1), ("b",), ()))
    with pytest.raises(ValueError, match="CPU id 1, which is not taken"):
        alloc.give(Grant(_req(cores=1), (), (1,)))
    with pytest.raises(ValueError, match="ids do not match its request"):
        alloc.give(Grant(_req(cores=1, gpus=1), ("b",), ()))
    with pytest.raises(ValueError, match="ids do not match its request"):
        alloc.give(Grant(_req(cores=1), ("b",), (1,)))
    assert alloc.free() == snapshot  # failed gives changed nothing
    alloc.give(held)
    assert alloc.try_take(_req(gpus=2)) is not None  # both ids are free again


def test_allocator_float_amounts_add_up() -> None:
    alloc = Allocator(_declared(licence=0.3))
    grants = [alloc.try_take(_req(licence=0.1)) for _ in range(3)]
    assert all(g is not None for g in grants)
    assert alloc.try_take(_req(licence=0.1)) is None
    for g in grants:
        assert g is not None
        alloc.give(g)
    assert alloc.free()["licence"] == 0.3


def test_allocator_under_threads_never_overcommits() -> None:
    declared = _declared(4, 10 * GiB, ("g0", "g1", "g2"), tuple(range(6)), licence=1.0)
    alloc = Allocator(declared)
    requests = [_req(cores=1), _req(cores=2, gpus=1), _req(gpus=2, memory="3GiB"),
                _req(cores=1, licence=0.1), _req(memory="4G", licence=0.7), _req(cores=3),
                _req(gpus=1, licence=0.2)]
    check = threading.Lock()
    held_gpus: set[str] = set()
    held_cpus: set[int] = set()
    used = {name: 0.0 for name in declared.amounts}
    errors: list[str] = []
    granted = [0]
    start = threading.Barrier(8)

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for _ in range(1500):
            grant = alloc.try_take(rng.choice(requests))
            if grant is None:
                continue
            with check:
                granted[0] += 1
                if held_gpus & set(grant.gpu_ids) or held_cpus & set(grant.cpu_ids):
                    errors.append(f"ids handed out twice: {grant}")
                if len(grant.cpu_ids) != grant.request.cores:
                    errors.append(f"wrong cpu count: {grant}")
                held_gpus.update(grant.gpu_ids)
                held_cpus.update(grant.cpu_ids)
                for name, v in grant.request.amounts:
                    used[name] += v
                    if used[name] > declared.amounts[name] + 1e-9:
                        errors.append(f"{name} overcommitted: {used[name]}")
            with check:
                held_gpus.difference_update(grant.gpu_ids)
                held_cpus.difference_update(grant.cpu_ids)
                for name, v in grant.request.amounts:
                    used[name] -= v
            alloc.give(grant)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    # switch threads as often as the interpreter allows, so that an unlocked
    # check-then-take would interleave (with the default 5 ms it rarely does)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert granted[0] > 1000
    assert alloc.free() == declared.amounts
    assert alloc.used_cores() == 0


# ---------------------------------------------------------------- Ledger


def test_ledger_accounts_free_amounts() -> None:
    ledger = Ledger(_declared(4, 8 * GiB, ("a", "b"), licence=1))
    big = _req(cores=3, gpus=1, memory="6GiB")
    assert ledger.fits_now(big)
    assert not ledger.fits_now(big, extra_cores=2)
    assert ledger.fits_now(_req(memory="1G"), extra_cores=4)  # asks no cores
    ledger.take(big)
    assert ledger.free == {CORES: 1, MEMORY: 2 * GiB, GPUS: 1, "licence": 1}
    assert not ledger.fits_now(_req(cores=2))
    assert not ledger.fits_now(_req(fpga=1))
    with pytest.raises(ValueError, match="only 1 of cores free"):
        ledger.take(_req(cores=2, gpus=1))
    assert ledger.free[GPUS] == 1  # the failed take changed nothing
    ledger.give(big)
    assert ledger.free == {CORES: 4, MEMORY: 8 * GiB, GPUS: 2, "licence": 1}
    with pytest.raises(ValueError, match="would make gpus 3 free of 2 declared"):
        ledger.give(_req(gpus=1))
    with pytest.raises(ValueError, match="would make fpga 1 free of 0 declared"):
        ledger.give(_req(fpga=1))


def test_ledger_float_sums_do_not_drift() -> None:
    ledger = Ledger(_declared(licence=1))
    tenth = _req(licence=0.1)
    for _ in range(1000):
        for _ in range(10):
            assert ledger.fits_now(tenth)
            ledger.take(tenth)
        assert not ledger.fits_now(tenth)
        for _ in range(10):
            ledger.give(tenth)
    assert ledger.free["licence"] == 1


# ---------------------------------------------------------------- task env, pinning


def test_task_env_gpus_and_threads() -> None:
    grant = Grant(_req(cores=4, gpus=2), ("GPU-a", "GPU-c"), (0, 1, 2, 3))
    env = task_env(grant, {"MKL_NUM_THREADS": "1"}, declared_gpus=4)
    assert {k: env[k] for k in GPU_VARS} == dict.fromkeys(GPU_VARS, "GPU-a,GPU-c")
    assert "MKL_NUM_THREADS" not in env  # the user's choice wins
    assert all(env[v] == "4" for v in OMP_FAMILY if v != "MKL_NUM_THREADS")
    assert set(env) == set(GPU_VARS) | (set(OMP_FAMILY) - {"MKL_NUM_THREADS"})


def test_task_env_hides_gpus_not_asked_for() -> None:
    grant = Grant(_req(memory="1G"), (), ())
    assert task_env(grant, {}, declared_gpus=2) == dict.fromkeys(GPU_VARS, "")
    assert task_env(grant, {}) == {}
    assert task_env(grant, {"CUDA_VISIBLE_DEVICES": "0,1"}, declared_gpus=0) == {}


def test_task_env_reaches_a_child_process() -> None:
    grant = Grant(_req(cores=2, gpus=1), ("3",), ())
    base = dict(os.environ)
    base["CUDA_VISIBLE_DEVICES"] = "2,3"  # the worker's own view: the task narrows it
    base.pop("OMP_NUM_THREADS", None)
    env = {**base, **task_env(grant, base, declared_gpus=2)}
    code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.split() == ["3", "2"]


def test_pin_changes_only_the_calling_thread() -> None:
    mine = os.sched_getaffinity(0)
    target = max(mine)
    seen: dict[str, object] = {}

    def run() -> None:
        pin([target])
        seen["self"] = os.sched_getaffinity(0)
        seen["by_id"] = os.sched_getaffinity(threading.get_native_id())
        pin([])  # a no-op: the pin stays
        seen["after_noop"] = os.sched_getaffinity(0)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    assert seen == {"self": {target}, "by_id": {target}, "after_noop": {target}}
    assert os.sched_getaffinity(0) == mine


def test_pin_refuses_cpus_outside_the_machine() -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pin([1 << 20])
        except (OSError, ValueError) as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    assert len(errors) == 1
