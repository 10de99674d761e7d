"""The wire protocol between a scheduler and its worker processes.

Frames
    Every message is one frame: a fixed 16-byte header, a buffer table, a
    payload, then zero or more out-of-band buffers::

        header   magic b"aw" | kind u8 | flags u8 | nbufs u32 | body_len u64
        table    nbufs x (stored_len u64, codec u8)
        payload  body_len - table - buffers bytes (pickle, or raw for handshakes)
        buffers  each stored_len bytes, raw or lz4 block-compressed

    The decoder checks the magic, the kind, the body length against a
    maximum (small until the peer is authenticated), the buffer count, and
    that the table adds up, before it allocates the body. Any violation is a
    ``ProtocolError``: the connection it came from is closed, nothing else.

Authentication
    No byte from a peer is unpickled before the peer has proved that it
    holds the runtime's secret, and the worker does not unpickle anything
    from a scheduler that has not proved it either (a worker runs what it
    receives, so a fake scheduler is as dangerous as a fake worker):

        scheduler -> worker   HELLO   version, nonce_s
        worker -> scheduler   AUTH    version, nonce_w, HMAC(secret, "worker"|nonce_s|nonce_w), ...
                                      (slots, pid, name, and the resources it declares as JSON)
        scheduler -> worker   WELCOME HMAC(secret, "sched"|nonce_w|nonce_s), worker id, ...

    Both sides compare MACs with ``hmac.compare_digest``. The secret never
    travels. Handshake frames are fixed-layout structs, not pickles.

Serialisation
    Pickle protocol 5 with out-of-band buffers (``async_wf._codec`` holds
    the policy shared with the checkpoint log: plain pickle first,
    cloudpickle for what it refuses, lz4 for buffers of at least
    ``compress_min`` bytes when a trial shows it pays): a NumPy array's
    data goes into the frame as a buffer of its own, written with
    ``writelines`` straight from the array's memory. On the other side a
    large frame is received in parts (``FrameDecoder``): a buffer of at
    least ``OWN_MIN`` bytes goes from the socket straight into page-aligned
    memory of its own, reused from ``POOL`` once the arrays on it are gone,
    and becomes the array without another copy. Smaller buffers and those
    of small frames are slices of one bytearray; for them the payload is
    zero-padded so that the first buffer starts 16-byte aligned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import mmap
import os
import pickle
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from async_wf._codec import CODEC_LZ4, CODEC_RAW, CodecError, compress, decompress

# pack and unpack are the transports' (they pack arguments and results one by one)
from async_wf._codec import pack as pack
from async_wf._codec import unpack as unpack
from async_wf._extension import compiled
from async_wf._options import ASYNC, INLINE, THREAD

log = logging.getLogger("async_wf")

# 2: AUTH carries the worker's resources; resource tasks (K_RTHREAD, K_RASYNC);
# STEAL and R_RETURNED
# 3: columns of plain tasks in TASKS and of scalar results in RESULTS; QUICK
PROTOCOL_VERSION = 3
MAGIC = b"aw"

# frame kinds
HELLO = 1
AUTH = 2
WELCOME = 3
TASKS = 4
RESULTS = 5
HEARTBEAT = 6
SHUTDOWN = 7
CANCEL = 8
ABORT = 9  # MPI: stop the ranks of an MPI task (another of its ranks failed)
EXIT = 10  # MPI: the application is over, worker ranks leave
SAVE = 11  # a task saved a step's state: (rid, step, pickled state)
INSITU = 12  # in-situ bridge <-> hub: a pickled message tuple (async_wf.insitu)
LOG = 13  # worker log records: [(logger name, level, message, created), ...]
# scheduler -> worker: give back these rids if no slot has started them (work
# stealing); the worker answers R_RETURNED for each one it gave back
STEAL = 14
# results that stay on their worker (R_HELD): FETCH [keys] asks their holder for
# them (from the scheduler over the worker's connection, or from a peer over the
# holder's data port), DATA [(key, status, nbufs, blob)] answers in order, FREE
# [keys] drops them
FETCH = 15
DATA = 16
FREE = 17
# worker -> scheduler: [function ids learnt quick] once every blocking task it
# was sent ran on its loop, [] once one went to its threads again: a quick
# worker gets QUICK_CREDIT times the credit for those functions
# (async_wf.transport._remote)
QUICK = 18
QUICK_CREDIT = 8
KIND_NAMES = {
    HELLO: "HELLO",
    AUTH: "AUTH",
    WELCOME: "WELCOME",
    TASKS: "TASKS",
    RESULTS: "RESULTS",
    HEARTBEAT: "HEARTBEAT",
    SHUTDOWN: "SHUTDOWN",
    CANCEL: "CANCEL",
    ABORT: "ABORT",
    EXIT: "EXIT",
    SAVE: "SAVE",
    INSITU: "INSITU",
    LOG: "LOG",
    STEAL: "STEAL",
    FETCH: "FETCH",
    DATA: "DATA",
    FREE: "FREE",
    QUICK: "QUICK",
}

# task kinds in a TASKS item: how the worker runs the function. The first
# three are the scheduler's own kinds (async_wf._options), sent as they are;
# K_MPI is one rank's part of an MPI task, whose item carries the gang (see
# async_wf.mpi)
K_ASYNC, K_THREAD, K_INLINE = ASYNC, THREAD, INLINE
K_MPI = max(ASYNC, THREAD, INLINE) + 1
# a K_ASYNC or K_THREAD item's extra is None or (saved step or None, priority).
# A task that asks for resources (TaskOptions.request), blocking or async: its
# item's extra is (saved step or None, Request.to_wire(), pin); the worker
# starts it once its own resources are free (async_wf._worker)
K_RTHREAD = K_MPI + 1
K_RASYNC = K_MPI + 2
# A TASKS item is (rid, fid, kind, nbufs, args blob, extra), or a column:
# (first rid, fid, kind, [args, ...]), tasks with rids first, first + 1, ...
# of one function and kind (K_THREAD or K_ASYNC), no keyword arguments, no
# extra, and arguments of small exact scalar types only (scalar_cost), which
# travel in the frame's own pickle: they cannot fail to load, so no blob of
# their own is needed. A RESULTS item is (rid, status, nbufs, blob, traceback),
# or a column of R_OK results with scalar values: ([rid, ...], [value, ...]).
# result statuses in a RESULTS item; R_RETURNED: given back unstarted (STEAL)
R_OK, R_ERROR, R_CANCELLED, R_RETURNED = 0, 1, 2, 3
# R_HELD: the value stays on the worker, the item carries (size, type name);
# R_NOINPUT: an input held by another worker could not be fetched (it is lost):
# the value is the list of keys
R_HELD, R_NOINPUT = 4, 5
#: TASKS flags: bit 0, send each task's start and end with its result
WANT_TIMES = 1

# environment of a worker process the scheduler spawns
TOKEN_ENV = "ASYNC_WF_TOKEN"  # the secret, hex
SYS_PATH_ENV = "ASYNC_WF_SYS_PATH"  # the scheduler's sys.path, so functions import alike
#: a base64 cloudpickle of the callable a spawned worker runs once at start
INIT_ENV = "ASYNC_WF_WORKER_INIT"
LOG_LEVEL_ENV = "ASYNC_WF_LOG_LEVEL"
#: the scheduler's multiprocessing authkey, hex: its Manager proxies work in a spawned worker
MP_AUTHKEY_ENV = "ASYNC_WF_MP_AUTHKEY"


def parse_url(url: str) -> tuple[str, int]:
    """Split ``tcp://host:port`` into (host, port).

    Raises:
        ValueError: the URL is not of that form.
    """
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"address must look like tcp://host:port, got {url!r}")
    return parts.hostname, parts.port


HEADER = struct.Struct("!2sBBIQ")
TABLE_ENTRY = struct.Struct("!QB")

#: largest frame accepted before the peer is authenticated
PREAUTH_MAX_FRAME = 4096
MAX_FRAME_ENV = "ASYNC_WF_MAX_FRAME"


def _max_frame_from_env() -> int:
    raw = os.environ.get(MAX_FRAME_ENV)
    if raw is None:
        return 1 << 31
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1 << 16:
        raise ValueError(f"${MAX_FRAME_ENV} must be an integer >= 65536 (bytes), got {raw!r}")
    return value


#: default largest frame after authentication, on both ends of a connection
#: (set ASYNC_WF_MAX_FRAME in the environment of the scheduler and workers)
DEFAULT_MAX_FRAME = _max_frame_from_env()
#: room left in a frame for its header, table and the tuples around the blobs
FRAME_MARGIN = 1 << 15


# what goes in a column (TASKS, RESULTS): exact scalar types, small
_COLUMN_INT = 1 << 62
_COLUMN_STR = 256


def _py_scalar_cost(value: Any) -> int:
    """An upper bound of the bytes ``value`` takes in a column; 0 if it cannot go in one.

    Only exact scalar types go (a subclass could pickle into anything, and
    fail on the other side): one bad value in a column would fail the
    whole frame, where a blob of its own fails only its task.
    """
    t = type(value)
    if t is int:
        return 10 if -_COLUMN_INT < value < _COLUMN_INT else 0
    if t is float:
        return 9
    if t is str or t is bytes:
        return 10 + 4 * len(value) if len(value) <= _COLUMN_STR else 0
    if value is None or t is bool:
        return 1
    return 0


def _py_column_cost(args: tuple[Any, ...]) -> int:
    """An upper bound of the bytes the argument tuple ``args`` takes in a TASKS column;
    0 if one of them cannot go in one (see ``scalar_cost``)."""
    n = 8
    for a in args:
        c = _py_scalar_cost(a)
        if not c:
            return 0
        n += c
    return n


# asked for every task sent and every scalar result: compiled where it can be
# (src_cython/wire.pxi; the same answers, tests/unit/test_protocol.py)
_ext = compiled()
scalar_cost: Callable[[Any], int] = _py_scalar_cost if _ext is None else _ext.scalar_cost
column_cost: Callable[[tuple[Any, ...]], int] = (
    _py_column_cost if _ext is None else _ext.column_cost
)


def packed_size(blob: bytes, bufs: list[Any], start: int) -> int:
    """Bytes that ``blob`` and its out-of-band buffers ``bufs[start:]`` take in a frame."""
    n = len(blob)
    for b in bufs[start:]:
        n += b.raw().nbytes if isinstance(b, pickle.PickleBuffer) else len(b)
    return n


def too_large(what: str, name: str | None, size: int, limit: int) -> str:
    """The message for a value that cannot travel in one frame."""
    task = "the task" if name is None else f"task {name!r}"
    verb = "are" if what.endswith("s") else "is"
    return (f"the {what} of {task} {verb} {size} bytes, over the frame limit of {limit} "
            f"bytes ({MAX_FRAME_ENV})")
MAX_BUFFERS = 1 << 16
DEFAULT_COMPRESS_MIN = 1 << 20
_JOIN_MAX = 1 << 16
_ALIGN = 16

NONCE_LEN = 32
_HELLO = struct.Struct("!H32s")
# version, nonce, mac, slots, pid, name length (+ utf-8 name, + JSON resources)
_AUTH = struct.Struct("!H32s32sIIH")
_NAME_MAX = 256
# mac, worker id, heartbeat interval s, results at least this large stay on the worker
_WELCOME = struct.Struct("!32sIdQ")


class ProtocolError(Exception):
    """A peer broke the protocol (bad frame, bad handshake): drop that connection."""


class AuthenticationError(ProtocolError):
    """A peer failed the HMAC challenge: it does not hold the runtime's secret."""


# ------------------------------------------------------------------ secrets
def new_secret() -> bytes:
    """Return a fresh random 32-byte secret."""
    return os.urandom(32)


def read_token_file(path: str | os.PathLike[str]) -> bytes:
    """Read a secret written by ``write_token_file`` (hex text).

    Raises:
        ValueError: the file does not hold a hex token of at least 16 bytes.
    """
    with open(path, encoding="ascii") as f:
        text = f.read().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"token file {os.fspath(path)!r} must hold a hex token") from None
    if len(secret) < 16:
        raise ValueError(
            f"token file {os.fspath(path)!r} holds a {len(secret)}-byte token; need >= 16"
        )
    return secret


def write_token_file(path: str | os.PathLike[str], secret: bytes) -> None:
    """Write ``secret`` as hex to a new file readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret.hex() + "\n")


def _mac(secret: bytes, role: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(secret, role + a + b, hashlib.sha256).digest()


# ---------------------------------------------------------------- handshake
def hello_payload() -> tuple[bytes, bytes]:
    """Scheduler side: return (HELLO payload, its nonce)."""
    nonce = os.urandom(NONCE_LEN)
    return _HELLO.pack(PROTOCOL_VERSION, nonce), nonce


def answer_hello(
    payload: bytes, secret: bytes, slots: int, name: str, declared: Any = None
) -> tuple[bytes, bytes, bytes]:
    """Worker side: check HELLO; return (AUTH payload, scheduler nonce, worker nonce).

    ``declared`` is the worker's resources (``Declared.to_wire()``), or None.

    Raises:
        ProtocolError: malformed HELLO or another protocol version.
    """
    if len(payload) != _HELLO.size:
        raise ProtocolError(f"HELLO must be {_HELLO.size} bytes, got {len(payload)}")
    version, nonce_s = _HELLO.unpack(payload)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"scheduler speaks protocol version {version}, this worker {PROTOCOL_VERSION}"
        )
    nonce_w = os.urandom(NONCE_LEN)
    mac = _mac(secret, b"worker", nonce_s, nonce_w)
    raw_name = name.encode("utf-8")[:_NAME_MAX]
    body = _AUTH.pack(PROTOCOL_VERSION, nonce_w, mac, slots, os.getpid(), len(raw_name))
    res = b"" if declared is None else json.dumps(declared, separators=(",", ":")).encode()
    if _AUTH.size + len(raw_name) + len(res) > PREAUTH_MAX_FRAME - 64:
        raise ValueError(f"the declared resources take {len(res)} bytes as JSON; the "
                         f"handshake allows {PREAUTH_MAX_FRAME - 64 - _AUTH.size - _NAME_MAX}")
    return body + raw_name + res, nonce_s, nonce_w


def check_auth(payload: bytes, secret: bytes,
               nonce_s: bytes) -> tuple[int, int, str, bytes, Any]:
    """Scheduler side: verify AUTH; return (slots, pid, name, worker nonce, resources).

    The resources are the decoded JSON the worker declared (None if it
    declared none), to be checked by ``Declared.from_wire``.

    Raises:
        ProtocolError: malformed AUTH or another protocol version.
        AuthenticationError: the MAC is wrong.
    """
    if not _AUTH.size <= len(payload) <= PREAUTH_MAX_FRAME:
        raise ProtocolError(f"AUTH must be {_AUTH.size} to {PREAUTH_MAX_FRAME} bytes, "
                            f"got {len(payload)}")
    version, nonce_w, mac, slots, pid, name_len = _AUTH.unpack_from(payload)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"worker speaks protocol version {version}, this scheduler {PROTOCOL_VERSION}"
        )
    if not hmac.compare_digest(mac, _mac(secret, b"worker", nonce_s, nonce_w)):
        raise AuthenticationError("worker failed the HMAC challenge (wrong token)")
    if slots < 1:
        raise ProtocolError(f"worker slots must be >= 1, got {slots}")
    end = _AUTH.size + name_len
    if name_len > _NAME_MAX or end > len(payload):
        raise ProtocolError(f"AUTH name length {name_len} exceeds the frame or {_NAME_MAX}")
    name = bytes(payload[_AUTH.size : end]).decode("utf-8", "replace")
    declared = None
    if end < len(payload):
        try:
            declared = json.loads(bytes(payload[end:]))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
            raise ProtocolError(f"AUTH resources are not valid JSON: {exc}") from None
    return slots, pid, name, nonce_w, declared


def welcome_payload(
    secret: bytes, nonce_s: bytes, nonce_w: bytes, worker_id: int, heartbeat: float,
    keep_min: int = 0,
) -> bytes:
    """Scheduler side: the WELCOME payload proving the scheduler holds the secret.

    ``keep_min``: results of at least this many bytes stay on the worker
    (R_HELD); 0: every result comes back.
    """
    return _WELCOME.pack(_mac(secret, b"sched", nonce_w, nonce_s), worker_id, heartbeat,
                         keep_min)


def check_welcome(
    payload: bytes, secret: bytes, nonce_s: bytes, nonce_w: bytes
) -> tuple[int, float, int]:
    """Worker side: verify WELCOME; return (worker id, heartbeat interval, keep_min).

    Raises:
        ProtocolError: malformed WELCOME.
        AuthenticationError: the scheduler's MAC is wrong.
    """
    if len(payload) != _WELCOME.size:
        raise ProtocolError(f"WELCOME must be {_WELCOME.size} bytes, got {len(payload)}")
    mac, worker_id, heartbeat, keep_min = _WELCOME.unpack(payload)
    if not hmac.compare_digest(mac, _mac(secret, b"sched", nonce_w, nonce_s)):
        raise AuthenticationError("scheduler failed the HMAC challenge (wrong token)")
    return worker_id, heartbeat, keep_min


class Challenge:
    """The accepting side of the handshake on one connection (scheduler, in-situ hub).

    Created when the connection opens: sends HELLO and arms a timer that
    drops a peer which has not authenticated within ``timeout`` seconds.
    ``check`` verifies the AUTH frame, ``welcome`` proves our side and
    raises the frame limit, ``cancel`` disarms the timer when the
    connection is lost first.
    """

    def __init__(self, stream: FrameStream, secret: bytes, loop: asyncio.AbstractEventLoop,
                 timeout: float) -> None:
        self.stream = stream
        self.secret = secret
        self.passed = False
        #: the resources the peer declared in AUTH (decoded JSON, unchecked), or None
        self.declared: Any = None
        payload, self._nonce = hello_payload()
        self._nonce_w = b""
        stream.send(raw_frame(HELLO, payload))
        self._timer = loop.call_later(timeout, self._expire, timeout)

    def _expire(self, timeout: float) -> None:
        if not self.passed:
            self.stream.abort(ProtocolError(f"no handshake in {timeout:g} s"))

    def check(self, kind: int, payload: memoryview) -> tuple[int, int, str]:
        """Verify the peer's AUTH frame; return its (slots, pid, name).

        Raises:
            ProtocolError: not an AUTH frame, or a malformed one.
            AuthenticationError: the peer does not hold the secret.
        """
        if kind != AUTH:
            raise ProtocolError(f"expected AUTH, got {KIND_NAMES[kind]}")
        slots, pid, name, self._nonce_w, self.declared = check_auth(
            bytes(payload), self.secret, self._nonce)
        self.passed = True
        self._timer.cancel()
        return slots, pid, name

    def welcome(self, peer_id: int, heartbeat: float, max_frame: int,
                keep_min: int = 0) -> None:
        """Send WELCOME (our proof) and accept frames up to ``max_frame`` from now on."""
        self.stream.send(raw_frame(WELCOME, welcome_payload(
            self.secret, self._nonce, self._nonce_w, peer_id, heartbeat, keep_min)))
        self.stream.decoder.max_frame = max_frame

    def cancel(self) -> None:
        """Disarm the timer (the connection is gone)."""
        self._timer.cancel()


class Joining:
    """The connecting side of the handshake (worker, in-situ bridge), whatever its I/O.

    Feed it the peer's frames in order: ``hello`` returns the AUTH frame
    to send, ``welcome`` checks the scheduler's proof and returns
    (peer id, heartbeat interval).
    """

    def __init__(self, secret: bytes, slots: int, name: str, declared: Any = None) -> None:
        self.secret = secret
        self.slots = slots
        self.name = name
        self.declared = declared
        #: from WELCOME: results of at least this many bytes stay here (0: none)
        self.keep_min = 0
        self._nonces = (b"", b"")

    def hello(self, kind: int, payload: memoryview | bytes) -> list[Any]:
        """Check HELLO; return the AUTH frame to send.

        Raises:
            ProtocolError: not a HELLO frame, a malformed one, or another version.
        """
        if kind != HELLO:
            raise ProtocolError(f"expected HELLO, got {KIND_NAMES[kind]}")
        auth, nonce_s, nonce_w = answer_hello(bytes(payload), self.secret, self.slots,
                                                self.name, self.declared)
        self._nonces = (nonce_s, nonce_w)
        return raw_frame(AUTH, auth)

    def welcome(self, kind: int, payload: memoryview | bytes) -> tuple[int, float]:
        """Check WELCOME; return (peer id, heartbeat interval in seconds).

        Raises:
            ProtocolError: not a WELCOME frame, or a malformed one.
            AuthenticationError: the scheduler does not hold the secret.
        """
        if kind != WELCOME:
            raise ProtocolError(f"expected WELCOME, got {KIND_NAMES[kind]}")
        peer, heartbeat, self.keep_min = check_welcome(bytes(payload), self.secret,
                                                       *self._nonces)
        return peer, heartbeat


#: what an accepting side does with an authenticated peer: given the stream,
#: its Challenge (to send WELCOME) and (slots, pid, name) from AUTH, return
#: the handler of its later frames and of its loss, or None to close it
OnJoin = Callable[["FrameStream", Challenge, int, int, str],
                  "tuple[FrameHandler, Callable[[BaseException | None], None]] | None"]


def accepting_stream(
    secret: bytes,
    timeout: Callable[[], float],
    on_join: OnJoin,
    on_rejected: Callable[[FrameStream, BaseException | None], None],
    admit: Callable[[FrameStream], bool] | None = None,
) -> FrameStream:
    """A new connection's stream on the accepting side (scheduler, in-situ hub).

    On open: ``admit`` may drop it at once (it returns False then), else
    HELLO is sent and ``timeout()`` seconds are given to authenticate. The AUTH
    frame goes to ``on_join``, which sends WELCOME through the challenge and
    returns the handlers of the peer's later frames and of its loss. A
    connection lost before it joined is reported to ``on_rejected`` (with a
    ``ProtocolError`` when it failed the handshake rather than hung up).
    """
    challenge: Challenge | None = None
    joined: tuple[FrameHandler, Callable[[BaseException | None], None]] | None = None

    def on_open(stream: FrameStream) -> None:
        nonlocal challenge
        if admit is not None and not admit(stream):
            return
        challenge = Challenge(stream, secret, asyncio.get_running_loop(), timeout())

    def on_frame(kind: int, payload: memoryview, buffers: list[Any]) -> None:
        nonlocal joined
        if joined is not None:
            joined[0](kind, payload, buffers)
            return
        assert challenge is not None
        slots, pid, name = challenge.check(kind, payload)
        joined = on_join(stream, challenge, slots, pid, name)
        if joined is None:
            stream.close()

    def on_lost(stream: FrameStream, exc: BaseException | None) -> None:
        if challenge is not None:
            challenge.cancel()
        if joined is not None:
            joined[1](exc)
        else:
            on_rejected(stream, exc)

    stream = FrameStream(on_frame, on_lost)
    stream.on_open = on_open
    return stream


# ----------------------------------------------------------------- encoding
def dumps(
    obj: Any, compress_min: int = DEFAULT_COMPRESS_MIN,
    bufs: list[pickle.PickleBuffer] | None = None,
) -> list[Any]:
    """Serialise ``obj``; return the frame's parts after the header: table, payload, buffers.

    ``bufs``: buffers already collected by ``pack`` for blobs inside ``obj``;
    they go first in the frame, before ``obj``'s own.

    Raises:
        pickle.PicklingError (or what cloudpickle raises): ``obj`` cannot be pickled.
    """
    bufs = [] if bufs is None else bufs
    payload = pack(obj, bufs)
    if not bufs:
        return [b"", payload]
    table = bytearray()
    out: list[Any] = [table, payload]
    for pb in bufs:
        mv = pb.raw()
        codec, data = compress(mv, compress_min)
        table += TABLE_ENTRY.pack(len(data) if codec else mv.nbytes, codec)
        out.append(data)
    # Zero bytes after the pickle's STOP opcode are ignored by pickle.loads;
    # they make the first buffer start 16-byte aligned in the received body
    # (whose own memory is 16-byte aligned), so NumPy arrays built on it are
    # aligned rather than flagged unaligned and slow.
    pad = -(len(table) + len(payload)) % _ALIGN
    if pad:
        out[1] = payload + bytes(pad)
    return out


def frame(kind: int, parts: list[Any], nbufs: int | None = None) -> list[Any]:
    """Prepend the header to ``parts`` (table, payload, buffers) for ``writelines``."""
    if nbufs is None:
        nbufs = len(parts) - 2
    body_len = 0
    for p in parts:
        body_len += p.nbytes if isinstance(p, memoryview) else len(p)
    return [HEADER.pack(MAGIC, kind, 0, nbufs, body_len), *parts]


def raw_frame(kind: int, payload: bytes = b"") -> list[Any]:
    """A frame with a raw payload and no buffers (handshakes, heartbeats)."""
    return frame(kind, [b"", payload], 0)


def encode(
    kind: int, obj: Any, compress_min: int = DEFAULT_COMPRESS_MIN,
    bufs: list[pickle.PickleBuffer] | None = None,
) -> list[Any]:
    """Serialise ``obj`` into a complete frame, as a list of parts for ``writelines``.

    ``bufs``: out-of-band buffers of blobs made by ``pack`` inside ``obj``.
    """
    return frame(kind, dumps(obj, compress_min, bufs))


def loads(payload: memoryview | bytes, buffers: list[Any]) -> Any:
    """Unpickle a payload with its out-of-band buffers.

    Raises:
        ProtocolError: the payload is not a valid pickle.
    """
    try:
        return pickle.loads(payload, buffers=buffers)
    except Exception as exc:
        raise ProtocolError(f"undecodable payload: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------- decoding
def check_header(mv: memoryview | bytearray | bytes, at: int,
                 max_frame: int) -> tuple[int, int, int]:
    """Validate the header at ``mv[at:]``; return (kind, nbufs, body_len).

    Raises:
        ProtocolError: bad magic, unknown kind, body over ``max_frame``, too many buffers.
    """
    magic, kind, _flags, nbufs, body_len = HEADER.unpack_from(mv, at)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}; expected {MAGIC!r}")
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown frame kind {kind}")
    if body_len > max_frame:
        raise ProtocolError(f"frame of {body_len} bytes exceeds the limit of {max_frame}")
    if nbufs > MAX_BUFFERS or nbufs * TABLE_ENTRY.size > body_len:
        raise ProtocolError(f"frame declares {nbufs} buffers in {body_len} bytes")
    return kind, nbufs, body_len


def parse_head(head: memoryview, max_frame: int) -> tuple[int, memoryview, list[tuple[int, int]]]:
    """Split a frame received in parts: header, table and payload in ``head``, buffers apart.

    Returns ``(kind, payload, [(stored_len, codec), ...])``; the buffers
    then arrive one by one and go through ``decode_buffer``.

    Raises:
        ProtocolError: the header or the table is invalid, or they disagree.
    """
    if len(head) < HEADER.size:
        raise ProtocolError(f"frame head of {len(head)} bytes is shorter than a header")
    kind, nbufs, body_len = check_header(head, 0, max_frame)
    tlen = nbufs * TABLE_ENTRY.size
    end = HEADER.size + tlen
    if end > len(head):
        raise ProtocolError(f"frame head of {len(head)} bytes cannot hold {nbufs} table entries")
    entries = [TABLE_ENTRY.unpack_from(head, HEADER.size + i * TABLE_ENTRY.size)
               for i in range(nbufs)]
    total = sum(e[0] for e in entries)
    if len(head) - HEADER.size + total != body_len:
        raise ProtocolError(
            f"frame declares {body_len} bytes but its parts hold {len(head) - HEADER.size + total}"
        )
    return kind, head[end:], entries


def decode_buffer(chunk: memoryview, codec: int) -> Any:
    """A buffer as stored in a frame, decompressed if it was.

    Raises:
        ProtocolError: unknown codec, or a corrupt or implausible lz4 block.
    """
    if codec == CODEC_RAW:
        return chunk
    if codec == CODEC_LZ4:
        # the size check in decompress runs before any allocation: a
        # 20-byte buffer claiming 2 GiB is refused, even before authentication
        try:
            return decompress(chunk)
        except CodecError as exc:
            raise ProtocolError(f"corrupt lz4 buffer: {exc}") from exc
    raise ProtocolError(f"unknown buffer codec {codec}")


#: a buffer at least this large is received into memory of its own (from the
#: pool), straight from the socket; smaller ones share one bytearray with the
#: payload and their neighbours (a receive call each would cost more than the copy)
OWN_MIN = 1 << 16
#: alignment of the buffers received into memory of their own (a cache line;
#: the pool's memory is page-aligned, so this always holds)
RECV_ALIGN = 64


def _capacity(n: int) -> int:
    """Size of the pool buffer for ``n`` bytes: rounded up by at most 1/16, to whole pages.

    Close sizes share a class, so that a stream of arrays of about the same
    size reuses the same buffers.
    """
    step = max(mmap.PAGESIZE, 1 << max(n.bit_length() - 4, 0))
    return -(-n // step) * step


def _anonymous(n: int) -> mmap.mmap:
    """``n`` bytes of private anonymous memory, page-aligned, zero until written."""
    if hasattr(mmap, "MAP_PRIVATE"):
        # private: mmap(-1, n) alone is MAP_SHARED, whose pages a forked child
        # (a task that forks) would share with this process, writes included
        return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, n)


def _refs(bufs: list[mmap.mmap], i: int) -> int:
    return sys.getrefcount(bufs[i])


# what _refs gives for a pooled buffer that nothing else refers to: measured
# for one list (its reference and the call's), plus one for the pool's second
# list (the age order)
_FREE_REFS = _refs([_anonymous(mmap.PAGESIZE)], 0) + 1


class BufferPool:
    """Page-aligned receive buffers, reused once nothing refers to them any more.

    A large out-of-band buffer is received into one of these straight from
    the socket, and the arrays unpickled on it use that memory as it is.
    Fresh memory costs a page fault per page (the kernel zeroes each page
    before the copy into it); a buffer whose arrays are all gone is taken
    again instead, which costs neither. Whether a buffer is still in use is
    read from its reference count: every view of it (a memoryview, the
    arrays on it) holds a reference through the buffer protocol.

    At most ``max_bytes`` of buffers are tracked; beyond that the oldest
    are forgotten (freed when their last array goes, like any memory).
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._by_cap: dict[int, list[mmap.mmap]] = {}
        self._order: list[mmap.mmap] = []  # oldest first, for forgetting
        self._bytes = 0
        self._lock = threading.Lock()  # fetch_sync may receive in another thread
        #: buffers taken again, and buffers mapped fresh (for benchmarks and tests)
        self.reused = 0
        self.mapped = 0

    def take(self, n: int) -> memoryview:
        """A writable, page-aligned memoryview of exactly ``n`` bytes (n >= 1)."""
        cap = _capacity(n)
        with self._lock:
            bufs = self._by_cap.get(cap)
            if bufs is not None:
                for i in range(len(bufs) - 1, -1, -1):
                    if _refs(bufs, i) == _FREE_REFS:
                        self.reused += 1
                        return memoryview(bufs[i])[:n]
            buf = _anonymous(cap)
            self.mapped += 1
            if cap <= self.max_bytes:
                self._by_cap.setdefault(cap, []).append(buf)
                self._order.append(buf)
                self._bytes += cap
                while self._bytes > self.max_bytes:
                    old = self._order.pop(0)
                    self._bytes -= len(old)
                    same = self._by_cap[len(old)]
                    same.remove(old)
                    if not same:
                        del self._by_cap[len(old)]
            return memoryview(buf)[:n]

    def clear(self) -> None:
        """Forget every buffer (those still in use live on with their arrays)."""
        with self._lock:
            self._by_cap.clear()
            self._order.clear()
            self._bytes = 0


#: the process's receive pool, shared by its connections
POOL = BufferPool()


class FrameDecoder:
    """Incremental frame decoder: give it bytes, get complete frames back.

    Small frames are read through a staging buffer, many per ``recv``. A
    frame too large for it is received in parts, each straight into the
    memory it ends in: the buffer table, then the payload together with the
    small buffers, then each buffer of at least ``OWN_MIN`` bytes into a
    page-aligned buffer of its own from ``POOL`` (so the arrays unpickled on
    it are aligned, whatever the sizes of the buffers before it). Only what
    a read brought in beyond a frame's header is copied out of the staging
    buffer; after a large frame the next read stops at the size of that
    frame's head, so that the next large frame's buffers are not read
    through staging either. A frame is returned as ``(kind, payload,
    buffers)``: a memoryview and a list of memoryviews (or bytearrays, for
    decompressed buffers).
    """

    STAGING = 1 << 16

    def __init__(self, max_frame: int = PREAUTH_MAX_FRAME, pool: BufferPool | None = None) -> None:
        self._max_frame = max_frame
        self._pool = POOL if pool is None else pool
        # before authentication a frame is at most PREAUTH_MAX_FRAME: a
        # stranger's connection costs a few kilobytes, not the full staging
        self._stage = bytearray(min(self.STAGING, HEADER.size + max_frame))
        self._start = 0
        self._end = 0
        # a large frame being received in parts: the parts to fill, in order
        # (the table first, then the rest as the table lays it out)
        self._parts: list[memoryview] = []
        self._part = 0  # index of the part being filled
        self._got = 0  # bytes of it filled
        self._kind = 0
        self._nbufs = 0
        self._body_len = 0
        # where payload and buffers lie in the parts: (part, offset, length, codec),
        # codec -1 for the payload
        self._layout: list[tuple[int, int, int, int]] = []
        self._hint = 0  # bytes to read when idle after a large frame (0: all staging)

    @property
    def max_frame(self) -> int:
        """The largest frame body accepted; raising it grows the staging buffer."""
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max_frame = value
        want = min(self.STAGING, HEADER.size + value)
        if want > len(self._stage):
            stage = bytearray(want)
            n = self._end - self._start
            stage[:n] = self._stage[self._start : self._end]
            self._stage, self._start, self._end = stage, 0, n

    def get_buffer(self) -> memoryview:
        """Where the next received bytes must be written."""
        if self._parts:
            return self._parts[self._part][self._got :]
        if self._start and self._end == len(self._stage):
            n = self._end - self._start
            self._stage[:n] = self._stage[self._start : self._end]
            self._start, self._end = 0, n
        if self._hint and self._start == self._end:
            # the last frame was large: the next one probably is too, and
            # its buffers should land in their own memory, not here
            return memoryview(self._stage)[self._end : self._end + self._hint]
        return memoryview(self._stage)[self._end :]

    def _header(self, mv: memoryview | bytearray, at: int) -> tuple[int, int, int]:
        return check_header(mv, at, self._max_frame)

    def received(self, n: int) -> list[tuple[int, memoryview, list[Any]]]:
        """Account for ``n`` bytes written into ``get_buffer()``; return completed frames.

        Raises:
            ProtocolError: the bytes do not form valid frames. The decoder
                is then unusable, as is the connection.
        """
        out: list[tuple[int, memoryview, list[Any]]] = []
        if self._parts:
            self._got += n
            if self._fill_done():
                out.append(self._finish())
            return out
        self._end += n
        stage = self._stage
        hsize = HEADER.size
        while self._end - self._start >= hsize:
            kind, nbufs, body_len = self._header(stage, self._start)
            avail = self._end - self._start - hsize
            begin = self._start + hsize
            if avail >= body_len:
                body = stage[begin : begin + body_len]
                self._start = begin + body_len
                self._hint = 0
                out.append(self._split(kind, nbufs, body))
                if kind <= WELCOME:
                    # a handshake frame changes the limits (max_frame) that
                    # the frames after it must be decoded under: stop here,
                    # the caller handles it and calls received(0) for the rest
                    break
                continue
            if hsize + body_len > len(stage):
                # too large for staging: receive the rest in parts
                self._start = self._end = 0
                self._begin_large(kind, nbufs, body_len)
                done = self._feed_parts(memoryview(stage)[begin : begin + avail])
                if done:
                    out.append(self._finish())
                return out
            break
        if self._start == self._end:
            self._start = self._end = 0
        return out

    def _begin_large(self, kind: int, nbufs: int, body_len: int) -> None:
        self._kind, self._nbufs, self._body_len = kind, nbufs, body_len
        tlen = nbufs * TABLE_ENTRY.size
        self._parts = [memoryview(bytearray(tlen))]
        self._part = self._got = 0
        self._layout = []
        if not tlen:
            self._plan(memoryview(b""))

    def _plan(self, table: memoryview) -> None:
        """Lay out the rest of a large frame after its table (in ``table``)."""
        tlen = len(table)
        entries = [TABLE_ENTRY.unpack_from(table, i * TABLE_ENTRY.size)
                   for i in range(self._nbufs)]
        total = sum(e[0] for e in entries)
        plen = self._body_len - tlen - total
        if plen < 0:
            raise ProtocolError(
                f"buffer table declares {total} bytes but the body holds {self._body_len - tlen}"
            )
        parts = self._parts
        layout = self._layout
        # runs of small pieces share one bytearray; each large buffer has its own
        run: list[tuple[int, int]] = [(plen, -1)]
        run_len = plen

        def close_run() -> None:
            shared = memoryview(bytearray(run_len))
            at = 0
            for length, codec in run:
                layout.append((len(parts), at, length, codec))
                at += length
            parts.append(shared)

        for stored, codec in entries:
            if stored < OWN_MIN:
                run.append((stored, codec))
                run_len += stored
                continue
            close_run()
            run, run_len = [], 0
            layout.append((len(parts), 0, stored, codec))
            parts.append(self._pool.take(stored))
        if run:
            close_run()

    def _fill_done(self) -> bool:
        """Move past filled parts; True when the frame is complete."""
        parts = self._parts
        while self._got >= len(parts[self._part]):
            if self._part == 0 and not self._layout:
                self._plan(parts[0])
            self._part += 1
            self._got = 0
            if self._part == len(parts):
                return True
        return False

    def _feed_parts(self, data: memoryview) -> bool:
        """Copy bytes a read brought in with a large frame's header into its parts."""
        while True:
            if self._fill_done():
                return True
            if not data:
                return False
            dst = self._parts[self._part][self._got :]
            k = min(len(dst), len(data))
            dst[:k] = data[:k]
            data = data[k:]
            self._got += k

    def _finish(self) -> tuple[int, memoryview, list[Any]]:
        parts, layout = self._parts, self._layout
        self._parts, self._layout = [], []
        # header, table, and the payload's run (what precedes the first large buffer)
        self._hint = HEADER.size + len(parts[0]) + len(parts[1])
        p, at, plen, _ = layout[0]
        payload = parts[p][at : at + plen]
        buffers = [decode_buffer(parts[p][at : at + length], codec)
                   for p, at, length, codec in layout[1:]]
        return self._kind, payload, buffers

    @staticmethod
    def _split(kind: int, nbufs: int, body: bytearray) -> tuple[int, memoryview, list[Any]]:
        mv = memoryview(body)
        tlen = nbufs * TABLE_ENTRY.size
        entries = [TABLE_ENTRY.unpack_from(mv, i * TABLE_ENTRY.size) for i in range(nbufs)]
        total = sum(e[0] for e in entries)
        plen = len(body) - tlen - total
        if plen < 0:
            raise ProtocolError(
                f"buffer table declares {total} bytes but the body holds {len(body) - tlen}"
            )
        payload = mv[tlen : tlen + plen]
        buffers: list[Any] = []
        pos = tlen + plen
        for stored, codec in entries:
            buffers.append(decode_buffer(mv[pos : pos + stored], codec))
            pos += stored
        return kind, payload, buffers

    def feed(self, data: bytes) -> list[tuple[int, memoryview, list[Any]]]:
        """Decode all complete frames in ``data`` (for tests and simple readers).

        Raises:
            ProtocolError: the bytes do not form valid frames.
        """
        out = []
        view = memoryview(data)
        while view.nbytes:
            buf = self.get_buffer()
            k = min(buf.nbytes, view.nbytes)
            buf[:k] = view[:k]
            view = view[k:]
            frames = self.received(k)
            while frames:
                out.extend(frames)
                frames = self.received(0) if frames[-1][0] <= WELCOME else []
        return out


FrameHandler = Callable[[int, memoryview, list[Any]], None]


class FrameStream(asyncio.BufferedProtocol):
    """One framed connection (either end): decodes into ``on_frame``, sends frames.

    A ``ProtocolError`` raised while decoding, or by ``on_frame``, closes
    this connection (and only it) and is logged with the peer's address.
    """

    def __init__(
        self,
        on_frame: FrameHandler,
        on_lost: Callable[[FrameStream, BaseException | None], None],
        max_frame: int = PREAUTH_MAX_FRAME,
    ) -> None:
        self.decoder = FrameDecoder(max_frame)
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.on_open: Callable[[FrameStream], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.closed = False
        self.write_paused = False
        self.error: BaseException | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        #: when bytes last arrived: a peer busy sending one huge frame is alive
        self.last_activity = time.monotonic()
        self._lost_told = False  # on_lost is called once, by abort or connection_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # not a TCP socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.on_open is not None:
            self.on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_in += nbytes
        self.last_activity = time.monotonic()
        try:
            frames = self.decoder.received(nbytes)
            while frames:
                for kind, payload, buffers in frames:
                    if self.closed:
                        return
                    self.on_frame(kind, payload, buffers)
                # the decoder stops after a handshake frame, so that what
                # follows it (WELCOME then TASKS, in one read) is decoded
                # under the limit that on_frame has just raised
                frames = self.decoder.received(0) if frames[-1][0] <= WELCOME else []
        except ProtocolError as exc:
            self.abort(exc)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if not self._lost_told:
            self._lost_told = True
            self.on_lost(self, self.error or exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def send(self, parts: list[Any]) -> None:
        """Write one frame (a list of parts, as ``encode`` returns)."""
        if self.closed or self.transport is None:
            return
        total = 0
        for p in parts:
            total += p.nbytes if isinstance(p, memoryview) else len(p)
        self.bytes_out += total
        if total <= _JOIN_MAX:
            # one small write beats a scatter list: the transport's writelines
            # costs more per part than copying a few kilobytes once
            self.transport.write(b"".join(parts))
        else:
            self.transport.writelines(parts)

    def abort(self, reason: BaseException) -> None:
        """Drop the connection at once because of ``reason`` (logged)."""
        if self.closed:
            return
        self.error = reason
        log.warning("closing connection from %s: %s", self.peer, reason)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if not self._lost_told and self.transport is not None:
            # tell the owner now, not when the loop gets to connection_lost:
            # meanwhile it would hand work to a connection that drops it
            self._lost_told = True
            self.on_lost(self, reason)

    def close(self) -> None:
        """Close after pending writes are flushed."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
