"""The wire protocol: frame encoding and the incremental FrameDecoder, the
HMAC handshake functions, token files. One loopback test of FrameStream
(a bad large frame); the rest of the socket tests are test_tcp's."""

from __future__ import annotations

import itertools
import os
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_wf import protocol as P

# runs in the first pass only (core_independent): frame codec, handshake and token files; no
# scheduler
pytestmark = pytest.mark.core_independent

# ----------------------------------------------------------------- helpers


def wire(parts: list[Any]) -> bytes:
    """A frame's parts (as ``encode`` returns them) joined into bytes."""
    return b"".join(bytes(p) for p in parts)


def decode_in_chunks(data: bytes, size: int, max_frame: int = P.DEFAULT_MAX_FRAME) -> list[Any]:
    """Feed ``data`` through get_buffer/received, at most ``size`` bytes at a time."""
    dec = P.FrameDecoder(max_frame)
    out: list[Any] = []
    pos = 0
    while pos < len(data):
        buf = dec.get_buffer()
        assert buf.nbytes > 0, "the decoder offered an empty buffer"
        k = min(size, buf.nbytes, len(data) - pos)
        buf[:k] = data[pos : pos + k]
        pos += k
        out.extend(dec.received(k))
        # a handshake frame ends a batch; what follows is decoded on the next call
        while out and out[-1][0] <= P.WELCOME and (more := dec.received(0)):
            out.extend(more)
    return out


def load(frame: tuple[int, memoryview, list[Any]]) -> Any:
    _kind, payload, bufs = frame
    return P.loads(payload, bufs)


def header(kind: int = P.TASKS, nbufs: int = 0, body_len: int = 0, magic: bytes = P.MAGIC) -> bytes:
    return P.HEADER.pack(magic, kind, 0, nbufs, body_len)


ARRAYS = {
    "zeros": np.zeros(300_000, dtype=np.float64),  # compressible
    "random": np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8),  # not
    "small": np.arange(10, dtype=np.int16),
    "structured": np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
}


def check_arrays(back: dict[str, Any]) -> None:
    assert back.keys() == ARRAYS.keys()
    for name, arr in ARRAYS.items():
        assert back[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(back[name], arr)


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("compress_min", [0, 1024])
def test_numpy_round_trip_out_of_band(compress_min: int) -> None:
    parts = P.encode(P.TASKS, ARRAYS, compress_min)
    nbufs = P.HEADER.unpack_from(parts[0])[3]
    assert nbufs == len(ARRAYS)  # each array's data travels out of band
    table = bytes(parts[1])
    codecs = [P.TABLE_ENTRY.unpack_from(table, i * P.TABLE_ENTRY.size)[1] for i in range(nbufs)]
    if compress_min:
        assert P.CODEC_LZ4 in codecs  # the zeros
        assert codecs.count(P.CODEC_RAW) >= 1  # the random bytes: a trial showed no gain
    else:
        assert set(codecs) == {P.CODEC_RAW}
    data = wire(parts)
    if compress_min:
        assert len(data) < ARRAYS["zeros"].nbytes  # the zeros were compressed
    frames = P.FrameDecoder(P.DEFAULT_MAX_FRAME).feed(data)
    assert len(frames) == 1 and frames[0][0] == P.TASKS
    back = load(frames[0])
    check_arrays(back)
    for name, arr in back.items():
        assert arr.flags.writeable, name  # compressed or not, tasks may change them in place


def test_chunked_decoding_every_chunk_size() -> None:
    """Frames split into chunks of every size 1..N decode identically."""
    msgs = [
        (P.TASKS, {"x": np.arange(50, dtype=np.int32), "s": "small"}),
        (P.HEARTBEAT, None),
        (P.RESULTS, [np.zeros(2000, dtype=np.uint8), b"payload" * 20]),
        (P.CANCEL, [1, 2, 3]),
    ]
    data = b"".join(wire(P.encode(k, m, compress_min=64)) for k, m in msgs)
    data += wire(P.raw_frame(P.HEARTBEAT))
    for size in range(1, len(data) + 1):
        frames = decode_in_chunks(data, size)
        assert [f[0] for f in frames] == [k for k, _ in msgs] + [P.HEARTBEAT], size
        for (_kind, msg), frame in zip(msgs, frames, strict=False):
            back = load(frame)
            if isinstance(msg, dict):
                np.testing.assert_array_equal(back["x"], msg["x"])
                assert back["s"] == "small"
            elif isinstance(msg, list) and msg and isinstance(msg[0], np.ndarray):
                np.testing.assert_array_equal(back[0], msg[0])
                assert back[1] == msg[1]
            else:
                assert back == msg


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 16, 1 << 20])
def test_large_frame_in_chunks(chunk: int) -> None:
    """Frames larger than the staging buffer take the direct-receive path."""
    msg = {"a": np.random.default_rng(1).random(100_000), "b": np.ones(70_000, np.uint8)}
    one = wire(P.encode(P.RESULTS, msg, compress_min=1024))
    data = wire(P.raw_frame(P.HEARTBEAT)) + one + one + wire(P.raw_frame(P.HEARTBEAT))
    frames = decode_in_chunks(data, chunk)
    assert [f[0] for f in frames] == [P.HEARTBEAT, P.RESULTS, P.RESULTS, P.HEARTBEAT]
    for f in frames[1:3]:
        back = load(f)
        np.testing.assert_array_equal(back["a"], msg["a"])
        np.testing.assert_array_equal(back["b"], msg["b"])


# a frame with large buffers between small ones, and one whose first part is small
BIG_MIX = {
    "a": np.random.default_rng(2).random(P.OWN_MIN // 8 + 3),  # > OWN_MIN, not a page multiple
    "tiny": np.arange(7, dtype=np.int8),  # leaves the next buffer at an odd offset on the wire
    "b": np.random.default_rng(3).integers(0, 1 << 30, 40_000, dtype=np.int32),
    "c": np.random.default_rng(4).random(131072),  # 1 MiB
    "small": np.ones(100, dtype=np.float32),
}


@pytest.mark.parametrize("chunk", [1000, 4096, 65537, 1 << 20, 1 << 24])
def test_large_buffers_land_aligned_in_their_own_memory(chunk: int) -> None:
    """Several frames with several large buffers, cut anywhere: each large
    buffer becomes an aligned, writable array on memory of its own."""
    one = wire(P.encode(P.TASKS, BIG_MIX, compress_min=0))
    small = wire(P.encode(P.CANCEL, [1, 2]))
    data = one + small + one + one
    frames = decode_in_chunks(data, chunk)
    assert [f[0] for f in frames] == [P.TASKS, P.CANCEL, P.TASKS, P.TASKS]
    assert load(frames[1]) == [1, 2]
    bases = set()
    for f in (frames[0], frames[2], frames[3]):
        back = load(f)
        for name, arr in BIG_MIX.items():
            assert back[name].dtype == arr.dtype
            np.testing.assert_array_equal(back[name], arr)
            assert back[name].flags.writeable, name
            if arr.nbytes >= P.OWN_MIN:
                assert back[name].ctypes.data % P.RECV_ALIGN == 0, (name, chunk)
                bases.add(back[name].ctypes.data)
    # every large array of the three frames is alive, so none shares memory
    assert len(bases) == 3 * 3


def test_pool_reuses_memory_only_when_its_arrays_are_gone() -> None:
    pool = P.BufferPool()
    arr = np.random.default_rng(5).random(100_000)
    other = arr[::-1].copy()

    def recv(a: Any) -> Any:
        dec = P.FrameDecoder(P.DEFAULT_MAX_FRAME, pool=pool)
        (frame,) = dec.feed(wire(P.encode(P.RESULTS, a, compress_min=0)))
        return load(frame)

    kept = recv(arr)
    assert (pool.mapped, pool.reused) == (1, 0)
    got = recv(other)  # `kept` still lives on its buffer: a second one is mapped
    assert (pool.mapped, pool.reused) == (2, 0)
    np.testing.assert_array_equal(kept, arr)
    np.testing.assert_array_equal(got, other)
    addr = got.ctypes.data
    del got
    again = recv(arr)  # `got`'s buffer is free now: taken again, nothing mapped
    assert (pool.mapped, pool.reused) == (2, 1)
    assert again.ctypes.data == addr
    np.testing.assert_array_equal(again, arr)
    np.testing.assert_array_equal(kept, arr)  # untouched by the receive into the other buffer
    # a view of a view still holds the buffer
    view = again[10:20]
    del again
    recv(other)
    assert pool.mapped == 3
    assert view[0] == arr[10]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_received_memory_is_private_to_the_process() -> None:
    """A task that forks: the child's writes to a received array stay in the child."""
    arr = np.random.default_rng(7).random(100_000)
    (frame,) = P.FrameDecoder(P.DEFAULT_MAX_FRAME).feed(
        wire(P.encode(P.RESULTS, arr, compress_min=0)))
    back = load(frame)
    assert back.nbytes >= P.OWN_MIN
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running the parent's cleanup
        back[:] = -1.0
        os._exit(0 if back[0] == -1.0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(back, arr)


def test_pool_forgets_the_oldest_beyond_its_size() -> None:
    pool = P.BufferPool(max_bytes=3 << 20)
    held = [pool.take(1 << 20) for _ in range(5)]
    assert pool.mapped == 5
    del held
    for _ in range(5):
        pool.take(1 << 20)  # three are still tracked, free: taken again and again
    assert pool.reused == 5 and pool.mapped == 5
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        P.BufferPool(max_bytes=-1)


def test_large_frame_reads_stop_at_the_next_frames_head() -> None:
    """After a large frame the decoder offers only as much staging as its
    head took, so the next large frame's buffer is read into its own memory."""
    one = wire(P.encode(P.TASKS, [np.ones(200_000)], compress_min=0))
    dec = P.FrameDecoder(P.DEFAULT_MAX_FRAME)
    assert len(dec.feed(one)) == 1
    head = dec.get_buffer().nbytes
    assert head < 1024
    # the next read takes exactly the next frame's head; its array is not in staging
    buf = dec.get_buffer()
    buf[:] = one[:head]
    assert dec.received(head) == []
    rest = dec.get_buffer()
    assert rest.nbytes == len(one) - head
    rest[:] = one[head:]
    (frame,) = dec.received(len(one) - head)
    np.testing.assert_array_equal(load(frame)[0], np.ones(200_000))
    # a small frame afterwards still decodes, in as many reads as it takes
    assert [f[0] for f in decode_in_chunks(wire(P.raw_frame(P.HEARTBEAT)) * 3, 5)] == [
        P.HEARTBEAT] * 3


def test_malformed_large_frames() -> None:
    """The checks of small frames hold on the large-frame path too."""
    big = P.FrameDecoder.STAGING * 2
    # the table declares more than the body holds
    body = P.TABLE_ENTRY.pack(big * 2, P.CODEC_RAW) + b"x" * big
    with pytest.raises(P.ProtocolError, match="buffer table declares"):
        P.FrameDecoder(P.DEFAULT_MAX_FRAME).feed(header(nbufs=1, body_len=len(body)) + body)
    # an unknown codec on a large buffer
    body = P.TABLE_ENTRY.pack(big, 9) + b"x" * big
    with pytest.raises(P.ProtocolError, match="unknown buffer codec"):
        P.FrameDecoder(P.DEFAULT_MAX_FRAME).feed(header(nbufs=1, body_len=len(body)) + body)
    # a corrupt lz4 block declaring far more than it could hold
    blob = struct.pack("<I", 1 << 30) + b"\xff" * big
    body = P.TABLE_ENTRY.pack(len(blob), P.CODEC_LZ4) + blob
    with pytest.raises(P.ProtocolError, match="corrupt lz4"):
        P.FrameDecoder(P.DEFAULT_MAX_FRAME).feed(header(nbufs=1, body_len=len(body)) + body)


async def test_a_bad_large_frame_closes_only_its_connection() -> None:
    """Over real loopback sockets: one peer sends a large frame whose table
    lies, another a good large frame; the first is closed, the second decoded."""
    import asyncio

    loop = asyncio.get_running_loop()
    got: list[Any] = []
    lost: list[Any] = []

    def make() -> P.FrameStream:
        return P.FrameStream(lambda k, p, b: got.append((k, P.loads(p, b))),
                             lambda s, exc: lost.append(exc), P.DEFAULT_MAX_FRAME)

    server = await loop.create_server(make, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, bad = await asyncio.open_connection("127.0.0.1", port)
        _, good = await asyncio.open_connection("127.0.0.1", port)
        big = P.FrameDecoder.STAGING * 4
        body = P.TABLE_ENTRY.pack(big * 2, P.CODEC_RAW) + b"x" * big
        bad.write(header(nbufs=1, body_len=len(body)) + body)
        arr = np.random.default_rng(6).random(300_000)
        good.writelines(P.encode(P.RESULTS, [arr, arr[::2].copy()], compress_min=0))
        for _ in range(500):
            if got and lost:
                break
            await asyncio.sleep(0.01)
        assert len(lost) == 1 and isinstance(lost[0], P.ProtocolError)
        assert "buffer table declares" in str(lost[0])
        assert [k for k, _ in got] == [P.RESULTS]
        back = got[0][1]
        np.testing.assert_array_equal(back[0], arr)
        np.testing.assert_array_equal(back[1], arr[::2])
        assert back[0].ctypes.data % P.RECV_ALIGN == 0
        for w in (bad, good):
            w.close()
    finally:
        server.close()
        await server.wait_closed()


def test_cloudpickle_takes_over_for_lambdas() -> None:
    offset = 5
    fn = P.loads(*P.FrameDecoder(P.DEFAULT_MAX_FRAME).feed(
        wire(P.encode(P.TASKS, lambda x: x + offset)))[0][1:])
    assert fn(1) == 6


# ------------------------------------------------------------ bad frames


def test_max_frame_enforced_before_allocation() -> None:
    dec = P.FrameDecoder(max_frame=1000)
    with pytest.raises(P.ProtocolError, match="exceeds the limit"):
        dec.feed(header(body_len=1001))
    # exactly at the limit is fine
    payload = b"x" * 1000
    frames = P.FrameDecoder(max_frame=1000).feed(header(P.HEARTBEAT, 0, 1000) + payload)
    assert bytes(frames[0][1]) == payload
    # the pre-authentication limit is small
    with pytest.raises(P.ProtocolError, match="exceeds the limit"):
        P.FrameDecoder().feed(header(body_len=P.PREAUTH_MAX_FRAME + 1))
    # a huge declared length is refused without allocating it
    tracemalloc.start()
    try:
        with pytest.raises(P.ProtocolError):
            P.FrameDecoder().feed(header(body_len=1 << 62))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_bad_magic() -> None:
    with pytest.raises(P.ProtocolError, match="bad magic"):
        P.FrameDecoder().feed(header(magic=b"GE") + b"T / HTTP/1.1\r\n")


@pytest.mark.parametrize("kind", [0, max(P.KIND_NAMES) + 1, 255])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(P.ProtocolError, match="unknown frame kind"):
        P.FrameDecoder().feed(header(kind=kind))


def test_buffer_table_larger_than_body() -> None:
    # the table itself does not fit in the body
    with pytest.raises(P.ProtocolError, match="buffers in"):
        P.FrameDecoder().feed(header(nbufs=3, body_len=P.TABLE_ENTRY.size * 2) + b"\0" * 18)
    # the table fits but declares more buffer bytes than the body holds
    body = P.TABLE_ENTRY.pack(1000, P.CODEC_RAW) + b"x" * 10
    with pytest.raises(P.ProtocolError, match="buffer table declares"):
        P.FrameDecoder().feed(header(nbufs=1, body_len=len(body)) + body)
    # more buffers than allowed
    with pytest.raises(P.ProtocolError, match="buffers in"):
        P.FrameDecoder(P.DEFAULT_MAX_FRAME).feed(
            header(nbufs=P.MAX_BUFFERS + 1, body_len=(P.MAX_BUFFERS + 1) * P.TABLE_ENTRY.size)
        )


def test_unknown_codec_and_corrupt_lz4() -> None:
    body = P.TABLE_ENTRY.pack(4, 7) + b"abcd"
    with pytest.raises(P.ProtocolError, match="unknown buffer codec"):
        P.FrameDecoder().feed(header(nbufs=1, body_len=len(body)) + body)
    body = P.TABLE_ENTRY.pack(8, P.CODEC_LZ4) + struct.pack("<I", 100) + b"\xff" * 4
    with pytest.raises(P.ProtocolError, match="corrupt lz4"):
        P.FrameDecoder().feed(header(nbufs=1, body_len=len(body)) + body)


def test_lz4_declared_size_is_not_trusted() -> None:
    """A tiny lz4 buffer claiming 2 GiB must not make the decoder allocate 2 GiB."""
    chunk = struct.pack("<I", 0x7FFF0000) + b"\0" * 10
    body = P.TABLE_ENTRY.pack(len(chunk), P.CODEC_LZ4) + chunk
    tracemalloc.start()
    try:
        with pytest.raises(P.ProtocolError):
            P.FrameDecoder().feed(header(nbufs=1, body_len=len(body)) + body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_undecodable_payload_is_a_protocol_error() -> None:
    with pytest.raises(P.ProtocolError, match="undecodable"):
        P.loads(b"not a pickle", [])


def test_frames_after_a_handshake_frame_get_the_new_limit() -> None:
    """WELCOME and a large TASKS frame arriving in one read: the TASKS frame is
    decoded after the caller raised the limit on seeing WELCOME, not rejected
    under the pre-authentication limit."""
    big = wire(P.encode(P.TASKS, b"x" * 20_000))
    welcome = wire(P.raw_frame(P.WELCOME, b"w" * 44))
    data = welcome + big
    dec = P.FrameDecoder()
    # before authentication the decoder reads at most a few kilobytes at a time
    assert len(dec.get_buffer()) <= 16 + P.PREAUTH_MAX_FRAME
    got: list[Any] = []
    at = 0
    while at < len(data):
        buf = dec.get_buffer()
        n = min(len(buf), len(data) - at)
        buf[:n] = data[at : at + n]
        at += n
        frames = dec.received(n)
        while frames:
            got += frames
            if frames[-1][0] == P.WELCOME:
                dec.max_frame = P.DEFAULT_MAX_FRAME  # as Challenge.welcome does
                frames = dec.received(0)
            else:
                frames = []
    assert [f[0] for f in got] == [P.WELCOME, P.TASKS]
    assert load(got[1]) == b"x" * 20_000
    # without raising the limit, that frame is refused
    dec = P.FrameDecoder()
    with pytest.raises(P.ProtocolError, match="exceeds the limit"):
        dec.feed(data)


# -------------------------------------------------------------- handshake


def test_handshake_round_trip_and_wrong_secrets() -> None:
    secret = P.new_secret()
    hello, nonce_s = P.hello_payload()
    auth, ns, nonce_w = P.answer_hello(hello, secret, 4, "w1")
    assert ns == nonce_s
    slots, pid, name, nw, _declared = P.check_auth(auth, secret, nonce_s)
    assert (slots, pid, name, nw) == (4, os.getpid(), "w1", nonce_w)
    welcome = P.welcome_payload(secret, nonce_s, nonce_w, 7, 0.5)
    assert P.check_welcome(welcome, secret, nonce_s, nonce_w) == (7, 0.5, 0)

    other = P.new_secret()
    bad_auth, _, _ = P.answer_hello(hello, other, 1, "intruder")
    with pytest.raises(P.AuthenticationError):
        P.check_auth(bad_auth, secret, nonce_s)
    # a replayed AUTH does not answer a fresh challenge
    _, fresh = P.hello_payload()
    with pytest.raises(P.AuthenticationError):
        P.check_auth(auth, secret, fresh)
    # a scheduler without the secret cannot produce a WELCOME
    with pytest.raises(P.AuthenticationError):
        P.check_welcome(P.welcome_payload(other, nonce_s, nonce_w, 1, 1.0), secret,
                        nonce_s, nonce_w)
    # the worker's MAC is not a valid scheduler MAC (roles differ)
    forged = P._WELCOME.pack(auth[2 + 32 : 2 + 64], 1, 1.0, 0)
    with pytest.raises(P.AuthenticationError):
        P.check_welcome(forged, secret, nonce_s, nonce_w)


def test_handshake_malformed_payloads() -> None:
    secret = P.new_secret()
    with pytest.raises(P.ProtocolError, match="HELLO must be"):
        P.answer_hello(b"short", secret, 1, "w")
    with pytest.raises(P.ProtocolError, match="version"):
        P.answer_hello(struct.pack("!H32s", 99, b"n" * 32), secret, 1, "w")
    hello, nonce_s = P.hello_payload()
    with pytest.raises(P.ProtocolError, match="AUTH must be"):
        P.check_auth(b"x" * 10, secret, nonce_s)
    with pytest.raises(P.ProtocolError, match="AUTH must be"):
        P.check_auth(b"x" * (P.PREAUTH_MAX_FRAME + 1), secret, nonce_s)
    _, _, nonce_w = P.answer_hello(hello, secret, 1, "w")
    mac = P._mac(secret, b"worker", nonce_s, nonce_w)
    v = P.PROTOCOL_VERSION
    zero_slots = P._AUTH.pack(v, nonce_w, mac, 0, 1, 0)
    with pytest.raises(P.ProtocolError, match="slots"):
        P.check_auth(zero_slots, secret, nonce_s)
    # a name longer than the frame, and resources that are not JSON
    with pytest.raises(P.ProtocolError, match="name length"):
        P.check_auth(P._AUTH.pack(v, nonce_w, mac, 1, 1, 200) + b"w", secret, nonce_s)
    with pytest.raises(P.ProtocolError, match="not valid JSON"):
        P.check_auth(P._AUTH.pack(v, nonce_w, mac, 1, 1, 1) + b"w{cores", secret, nonce_s)
    with pytest.raises(P.ProtocolError, match="WELCOME must be"):
        P.check_welcome(b"", secret, nonce_s, nonce_w)


def test_token_file(tmp_path: Any) -> None:
    path = tmp_path / "token"
    secret = P.new_secret()
    P.write_token_file(path, secret)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert P.read_token_file(path) == secret
    path.write_text("not hex\n")
    with pytest.raises(ValueError, match="hex token"):
        P.read_token_file(path)
    path.write_text("abcd\n")
    with pytest.raises(ValueError, match="need >= 16"):
        P.read_token_file(path)


# ------------------------------------------------------------------- fuzz

_LIMIT = 4096


def _frameish() -> st.SearchStrategy[bytes]:
    """Bytes that often get past the header checks, to reach the deeper ones."""
    kinds = st.sampled_from([*P.KIND_NAMES, 0, 200])
    head = st.builds(
        lambda k, nb, bl, flags: P.HEADER.pack(P.MAGIC, k, flags, nb, bl),
        kinds,
        st.integers(0, 6),
        st.one_of(st.integers(0, 300), st.integers(0, 1 << 64 - 1)),
        st.integers(0, 255),
    )
    entry = st.builds(
        lambda n, c: P.TABLE_ENTRY.pack(n, c),
        st.one_of(st.integers(0, 64), st.integers(0, 1 << 64 - 1)),
        st.sampled_from([P.CODEC_RAW, P.CODEC_LZ4, 2]),
    )
    lz4ish = st.builds(
        lambda n, rest: struct.pack("<I", n) + rest,
        st.one_of(st.integers(0, 100), st.integers(0, (1 << 32) - 1)),
        st.binary(max_size=40),
    )
    piece = st.one_of(head, entry, lz4ish, st.binary(max_size=64))
    return st.lists(piece, max_size=8).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(st.binary(max_size=600), _frameish()),
    cuts=st.lists(st.integers(1, 64), max_size=30),
)
def test_fuzz_decoder_only_raises_protocol_error(data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes in arbitrary chunks: ProtocolError or frames, nothing else,
    and no allocation anywhere near what a lying header declares."""
    dec = P.FrameDecoder(_LIMIT)
    tracemalloc.start()
    try:
        pos = 0
        i = 0
        try:
            while pos < len(data):
                step = cuts[i % len(cuts)] if cuts else len(data)
                i += 1
                buf = dec.get_buffer()
                k = min(step, buf.nbytes, len(data) - pos)
                assert k > 0
                buf[:k] = data[pos : pos + k]
                pos += k
                dec.received(k)
                dec.received(0)
        except P.ProtocolError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a body is at most _LIMIT bytes; an lz4 buffer in it may legitimately expand
    # about 255-fold; a lying header would show up as gigabytes
    assert peak < 300 * _LIMIT + 4 * P.FrameDecoder.STAGING


@settings(max_examples=150, deadline=None)
@given(
    msgs=st.lists(
        st.tuples(
            st.sampled_from([P.TASKS, P.RESULTS, P.HEARTBEAT, P.CANCEL, P.SHUTDOWN]),
            st.one_of(
                st.none(),
                st.integers(),
                st.text(max_size=50),
                st.binary(max_size=3000),
                st.lists(st.integers(), max_size=50),
                st.integers(0, 5000).map(lambda n: np.arange(n, dtype=np.int64)),
                st.integers(0, 5000).map(lambda n: np.zeros(n, dtype=np.uint8)),
            ),
        ),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(0, 40_000), max_size=10),
    compress_min=st.sampled_from([0, 1, 512]),
)
def test_fuzz_valid_frames_split_anywhere(
    msgs: list[tuple[int, Any]], cuts: list[int], compress_min: int
) -> None:
    data = b"".join(wire(P.encode(k, m, compress_min)) for k, m in msgs)
    bounds = sorted({c for c in cuts if 0 < c < len(data)} | {0, len(data)})
    dec = P.FrameDecoder(P.DEFAULT_MAX_FRAME)
    frames: list[Any] = []
    for a, b in itertools.pairwise(bounds):
        frames.extend(dec.feed(data[a:b]))
    assert [f[0] for f in frames] == [k for k, _ in msgs]
    for (_k, msg), frame in zip(msgs, frames, strict=True):
        back = load(frame)
        if isinstance(msg, np.ndarray):
            assert back.dtype == msg.dtype
            np.testing.assert_array_equal(back, msg)
        else:
            assert back == msg


# ------------------------------------------------------ the column test, compiled
class _Int(int):
    pass


class _Str(str):
    pass


_EDGE_SCALARS: list[Any] = [
    0, 1, -1, (1 << 62) - 1, -(1 << 62) + 1, 1 << 62, -(1 << 62), 1 << 63, -(1 << 63),
    1 << 64, -(1 << 200), 2.5, float("nan"), float("inf"), "", "a", "é" * 256, "é" * 257,
    "x" * 256, "x" * 257, b"", b"x" * 256, b"x" * 257, None, True, False, _Int(3),
    _Str("s"), bytearray(b"x"), (1,), [1], {}, 1j, object(),
]


def _compiled_costs() -> Any:
    from async_wf._extension import compiled

    ext = compiled()
    if ext is None:
        pytest.skip("the compiled extension is not in use")
    return ext


def test_the_compiled_column_test_answers_as_its_python_twin_on_the_edges() -> None:
    ext = _compiled_costs()
    for v in _EDGE_SCALARS:
        assert ext.scalar_cost(v) == P._py_scalar_cost(v), repr(v)[:40]
    for a, b in itertools.product(_EDGE_SCALARS, repeat=2):
        assert ext.column_cost((a, b)) == P._py_column_cost((a, b)), (repr(a)[:40], repr(b)[:40])
    assert ext.column_cost(()) == P._py_column_cost(()) == 8
    # the transports use the compiled one when it is there
    assert P.column_cost is ext.column_cost and P.scalar_cost is ext.scalar_cost


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=300),
                          st.binary(max_size=300), st.none(), st.booleans()), max_size=6))
def test_the_compiled_column_test_answers_as_its_python_twin(args: list[Any]) -> None:
    ext = _compiled_costs()
    assert ext.column_cost(tuple(args)) == P._py_column_cost(tuple(args))
    for v in args:
        assert ext.scalar_cost(v) == P._py_scalar_cost(v)
