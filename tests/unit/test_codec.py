"""The serialisation policy shared by the wire and the checkpoint log (async_wf._codec)."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from async_wf import _codec
from async_wf.checkpoint import CheckpointLog

# runs in the first pass only (core_independent): the serialisation policy; no scheduler
pytestmark = pytest.mark.core_independent

PKG = Path(_codec.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_lz4_has_one_home() -> None:
    """Only _codec.py compresses: the wire and the log share its policy, written once."""
    users = sorted(
        str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
        if {"lz4", "lz4.block", "lz4.frame"} & _imported_modules(p)
    )
    assert users == ["_codec.py"]


def test_compress_pays_only_when_the_trial_does() -> None:
    zeros = bytes(1 << 17)
    codec, stored = _codec.compress(zeros, 1 << 16)
    assert codec == _codec.CODEC_LZ4 and len(stored) < 1000
    assert bytes(_codec.decompress(memoryview(stored))) == zeros
    noise = os.urandom(1 << 17)
    assert _codec.compress(noise, 1 << 16) == (_codec.CODEC_RAW, noise)
    # below the threshold, or with compression off, nothing is tried
    assert _codec.compress(zeros, len(zeros) + 1) == (_codec.CODEC_RAW, zeros)
    assert _codec.compress(zeros, 0) == (_codec.CODEC_RAW, zeros)


def test_decompress_refuses_an_implausible_declared_size() -> None:
    lying = (0x7FFF0000).to_bytes(4, "little") + bytes(10)
    with pytest.raises(_codec.CodecError, match="lz4 block of 14 bytes declares 2147418112 bytes"):
        _codec.decompress(memoryview(lying))
    with pytest.raises(_codec.CodecError, match="undecodable lz4 block"):
        _codec.decompress(memoryview((100).to_bytes(4, "little") + b"\xff" * 4))


def test_pack_falls_back_to_cloudpickle_and_keeps_buffers_out_of_band() -> None:
    bufs: list[pickle.PickleBuffer] = []
    arr = np.arange(1000.0)
    blob = _codec.pack((lambda x: x + 1, arr), bufs)
    assert len(bufs) == 1
    fn, back = _codec.unpack(blob, bufs, 0, 1)
    assert fn(1) == 2 and np.array_equal(back, arr)


def test_the_log_stores_what_the_wire_would_compress(tmp_path: Path) -> None:
    """A compressible array goes through the same policy on disk: it comes back intact."""
    arr = np.zeros(300_000)
    with CheckpointLog(tmp_path / "c.awlog") as log:
        log.put_result(b"k", arr, function="f")
        log.flush()
    assert (tmp_path / "c.awlog").stat().st_size < arr.nbytes // 10
    with CheckpointLog(tmp_path / "c.awlog") as log:
        assert np.array_equal(log.get(b"k"), arr)
