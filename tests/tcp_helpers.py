"""Helpers of the TCP transport tests: task functions that worker processes
import by name, a raw-socket client, and process utilities.

The task functions live here rather than in the test module so that a
worker imports this small module, not pytest and the whole test file.
Workers started by a runtime get the test process's ``sys.path``; workers
started by hand get it through ``worker_env()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from async_wf import protocol as P
from async_wf.protocol import SYS_PATH_ENV

#: generous bound for anything that should take well under a second
HANG = 20.0

# ------------------------------------------------------------ task functions


def pid() -> int:
    return os.getpid()


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def ident(x: Any) -> Any:
    return x


def pid_of(x: Any) -> tuple[Any, int]:
    return x, os.getpid()


def mutate(arr: Any) -> Any:
    """Change an array argument in place (received arrays must be writable)."""
    arr += 1
    return arr


def make_lock() -> Any:
    return threading.Lock()


class LockedError(Exception):
    """An exception holding a lock: it cannot be pickled."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


class TwoArgError(Exception):
    """Pickles, but does not unpickle: ``__init__`` wants two arguments."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


def raise_locked() -> None:
    raise LockedError("holds a lock")


def raise_two_arg() -> None:
    raise TwoArgError("a", "b")


def die() -> None:
    """Kill the worker process running this task, every time."""
    os._exit(3)


def wait_for_file(go: str, started_dir: str, i: int) -> tuple[int, int]:
    """Mark this task as started on this pid, then block until ``go`` exists."""
    me = os.getpid()
    Path(started_dir, f"{me}-{i}").touch()
    deadline = time.monotonic() + HANG
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.01)
    return i * i, me


async def async_wait_for_file(go: str, started_dir: str, i: int) -> tuple[int, int]:
    """``wait_for_file`` as a coroutine: cancellable on the worker."""
    me = os.getpid()
    Path(started_dir, f"{me}-{i}").touch()
    deadline = time.monotonic() + HANG
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        await asyncio.sleep(0.01)
    return i * i, me


def sleep_then(x: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return x


class _Rendezvous:
    """All coroutines of one test on one worker wait here until the test says go.

    The first coroutine opens one connection to the test; the coroutine that
    makes ``n`` arrive tells the test how many are waiting, and the test's
    answer releases them all. No coroutine can finish before all ``n`` are
    in flight at once, so their overlap is a fact, not a timing.
    """

    def __init__(self, port: int, n: int) -> None:
        self.n = n
        self.arrived = 0
        self.all_in = asyncio.Event()
        self.go = asyncio.Event()
        self.talker = asyncio.get_running_loop().create_task(self._talk(port))

    async def _talk(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await self.all_in.wait()
        writer.write(b"%d\n" % self.arrived)
        await writer.drain()
        await reader.readline()
        self.go.set()
        writer.close()


_rendezvous: dict[int, _Rendezvous] = {}


async def rendezvous(port: int, n: int, i: int) -> tuple[int, int]:
    r = _rendezvous.get(port)
    if r is None:
        r = _rendezvous[port] = _Rendezvous(port, n)
    r.arrived += 1
    if r.arrived == n:
        r.all_in.set()
    await asyncio.wait_for(r.go.wait(), HANG)
    return i, os.getpid()


# ----------------------------------------------------------------- processes


def worker_env() -> dict[str, str]:
    """Environment for a worker started by hand: it can import what the tests import."""
    env = dict(os.environ)
    env[SYS_PATH_ENV] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    env.pop("ASYNC_WF_TOKEN", None)
    return env


def start_worker(address: str, *args: str, cli: bool = False) -> subprocess.Popen[bytes]:
    """Start ``python -m async_wf.worker --connect address args...`` (or via the CLI)."""
    entry = ["async_wf.cli", "worker"] if cli else ["async_wf.worker"]
    return subprocess.Popen(
        [sys.executable, "-m", *entry, "--connect", address, *args],
        env=worker_env(),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a process started by a test if it still runs (stopped or not), and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait(HANG)
    if proc.stderr is not None:
        proc.stderr.close()


def alive(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def child_pids() -> set[int]:
    """Live child processes of the test process (workers a runtime started)."""
    out = set()
    for c in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if c.status() != psutil.STATUS_ZOMBIE:
                out.add(c.pid)
    return out


async def until(cond: Callable[[], Any], what: str, timeout: float = HANG) -> None:
    """Poll ``cond`` until it is true; fail the test rather than hang."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = HANG) -> int:
    """Wait for a process to exit without blocking the loop; return its exit code."""
    await until(lambda: proc.poll() is not None, f"process {proc.pid} to exit", timeout)
    assert proc.returncode is not None
    return proc.returncode


# ------------------------------------------------------------ raw-socket peer


class RawPeer:
    """A hand-made peer on a real socket that speaks (or breaks) the protocol."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = P.FrameDecoder(P.DEFAULT_MAX_FRAME)

    @classmethod
    async def connect(cls, address: str) -> RawPeer:
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes, list[Any]]:
        """The next frame from the other side."""
        while True:
            frames = self.decoder.feed(await asyncio.wait_for(self.reader.read(65536), HANG))
            if frames:
                kind, payload, bufs = frames[0]
                return kind, bytes(payload), bufs

    def send(self, data: bytes | list[Any]) -> None:
        if isinstance(data, list):
            data = b"".join(bytes(p) for p in data)
        self.writer.write(data)

    async def handshake(self, secret: bytes, slots: int = 1) -> int:
        """Answer HELLO as a worker holding ``secret``; return the worker id."""
        kind, payload, _ = await self.frame()
        assert kind == P.HELLO
        auth, nonce_s, nonce_w = P.answer_hello(payload, secret, slots, "raw-peer")
        self.send(P.raw_frame(P.AUTH, auth))
        kind, payload, _ = await self.frame()
        assert kind == P.WELCOME
        wid, _beat, _keep = P.check_welcome(payload, secret, nonce_s, nonce_w)
        return wid

    async def closed_by_peer(self) -> bool:
        """True once the other side has closed the connection (within HANG s)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), HANG):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        return True

    def close(self) -> None:
        self.writer.close()


class PoisonPill:
    """Creates ``path`` when unpickled: proof that a peer unpickled our bytes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def poison_frame(kind: int, path: str) -> list[Any]:
    """A well-formed frame whose payload, if unpickled, creates ``path``."""
    return P.frame(kind, [b"", pickle.dumps(PoisonPill(path), protocol=5)])


def explode(x: int) -> None:
    """Rebuilds an ``Unloadable``: always fails, as a missing module would."""
    raise ValueError(f"cannot rebuild this object ({x}) on this side")


class Unloadable:
    """Pickles fine; raises when unpickled."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return (explode, (7,))


def make_unloadable() -> Unloadable:
    """A task whose result the scheduler cannot unpickle."""
    return Unloadable()


def echo(x: Any) -> Any:
    """Return the argument."""
    return x


async def exits_async() -> None:
    """An async task that calls sys.exit(): a failure of the task, not of the worker."""
    import sys

    sys.exit(3)


def log_warning(msg: str) -> str:
    """Log ``msg`` as a warning from a logger of the task's own (forwarded by its worker)."""
    import logging

    logging.getLogger("app.tasks").warning("task says %s", msg)
    return msg


def sleep_ms(ms: int) -> int:
    time.sleep(ms / 1000)
    return ms


def die_after(seconds: float) -> None:
    """Kill the worker process running this task once it has run ``seconds``."""
    time.sleep(seconds)
    os._exit(3)


def slow_pid(seconds: float) -> int:
    """The worker's pid, after ``seconds``: concurrent calls spread over the workers."""
    time.sleep(seconds)
    return os.getpid()


def parse_address(address: str) -> tuple[str, int]:
    """``("host", port)`` of a ``tcp://host:port`` address."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


class CuttableProxy:
    """A TCP relay on loopback whose link can be cut (every connection reset) and restored.

    While cut it also refuses new connections, as a network that is down does.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._up = True
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self._srv.accept()
            except OSError:
                return
            with self._lock:
                if not self._up:
                    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    a.close()  # a reset, as a refused connection
                    continue
                try:
                    b = socket.create_connection(self.target)
                except OSError:
                    a.close()
                    continue
                self.connections += 1
                self._socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Reset every relayed connection and refuse new ones."""
        with self._lock:
            self._up = False
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

    def restore(self) -> None:
        """Accept and relay connections again."""
        with self._lock:
            self._up = True

    def close(self) -> None:
        """Stop listening and reset what is relayed."""
        self.cut()
        self._srv.close()


def exit_when_loaded() -> None:
    """Rebuilds an ``ExitsWhenUnpickled``: raises SystemExit in whoever unpickles it."""
    raise SystemExit("raised while unpickling")


class ExitsWhenUnpickled:
    """Pickles fine; unpickling it raises SystemExit (a BaseException, not an Exception)."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (exit_when_loaded, ())

    def __call__(self) -> int:
        return 1


def make_exiting() -> ExitsWhenUnpickled:
    """A task whose result the scheduler cannot unpickle without SystemExit."""
    return ExitsWhenUnpickled()


class ExitingError(Exception):
    """An exception that pickles, but whose unpickling raises SystemExit."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (exit_when_loaded, ())


def raise_exiting() -> None:
    raise ExitingError("cannot come back")


class Holder:
    """An object whose release in a worker process leaves a file behind."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.owner = os.getpid()
        self.payload = bytes(1 << 20)

    def value(self) -> int:
        """A method to submit: ``rt.submit(holder.value)``."""
        return 7

    def __del__(self) -> None:
        if os.getpid() != self.owner:  # a copy in a worker, not the test's own
            with open(self.marker, "w"):
                pass


def set_env_flag(value: str) -> None:
    """An Executor initializer: mark this process."""
    os.environ["AWF_TEST_INIT"] = value


def env_flag() -> str | None:
    """What ``set_env_flag`` left in this process."""
    return os.environ.get("AWF_TEST_INIT")


def rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
