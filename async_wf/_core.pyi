"""Types of the compiled extension: the core (twin of ``async_wf._pycore``) and the
checkpoint log's hot paths (src_cython/ckfast.pxi)."""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

WAITING: Final = 0
READY: Final = 1
RUNNING: Final = 2
FINISHED: Final = 3
FAILED: Final = 4
CANCELLED: Final = 5
FORGOTTEN: Final = -1
STATE_NAMES: Final[tuple[str, str, str, str, str, str]]

class Core:
    """Dependency tracker and ready queue over integer task handles."""

    def __init__(self) -> None: ...
    def add(self, inputs: Iterable[int] = (), priority: int = 0) -> int: ...
    def add_many(
        self, inputs: Sequence[Iterable[int]], priorities: Sequence[int] | None = None
    ) -> list[int]: ...
    def add_csr(
        self, indptr: object, indices: object, priorities: object | None = None
    ) -> list[int]: ...
    def pop(self, n: int) -> list[int]: ...
    def requeue(self, handle: int) -> None: ...
    def finish(self, handle: int) -> list[int]: ...
    def finish_many(self, handles: Iterable[int]) -> list[int]: ...
    def fail(self, handle: int, cancel_successors: bool = False) -> list[int]: ...
    def cancel(self, handle: int) -> list[int]: ...
    def forget(self, handles: Iterable[int]) -> None: ...
    def state(self, handle: int) -> int: ...
    def counts(self) -> tuple[int, int, int, int, int, int]: ...
    @property
    def capacity(self) -> int: ...
    def __len__(self) -> int: ...

# ckfast.pxi: twins of checkpoint/_keys.py and checkpoint/_format.py
RECORD_LAYOUT: Final[dict[str, int | bytes]]
KEY_LAYOUT: Final[dict[str, int | bytes]]

def crc32(data: bytes | bytearray | memoryview) -> int: ...
def blake2b(
    data: bytes | bytearray | memoryview, person: bytes = ..., digest_size: int = ...
) -> bytes: ...
def quick_key(
    fn_identity: bytes,
    args: tuple[Any, ...],
    leaf: Callable[[Any], bytes | None] | None,
) -> bytes | None: ...
def result_record(
    key: bytes, when: float, name: bytes, parents: tuple[bytes, ...], payload: bytes
) -> bytes: ...
def mapped_payload(mm: Any, off: int, key: bytes) -> bytes | None: ...
def scalar_pickle(v: Any) -> bytes | None: ...
def append_small_results(
    items: list[tuple[bytes, Any, str, tuple[bytes, ...]]],
    start: int,
    now: float,
    names: dict[str, bytes],
    pack: Callable[[Any, list[Any]], bytes],
    pending: bytearray,
    sizes: bytearray,
    pkeys: list[bytes],
    results: dict[bytes, int],
    end: int,
    pending_max: int,
) -> tuple[int, int, int, int, tuple[bytes, list[Any]] | None]: ...
def fix_results(
    results: dict[bytes, int], pkeys: list[bytes], data: bytearray, sizes: bytearray,
    base: int, shift: int,
) -> None: ...
def append_done(
    done: list[tuple[Any, Any]],
    start: int,
    fn_names: dict[Any, str],
    big: int,
    now: float,
    names: dict[str, bytes],
    pack: Callable[[Any, list[Any]], bytes],
    pending: bytearray,
    sizes: bytearray,
    pkeys: list[bytes],
    results: dict[bytes, int],
    end: int,
    pending_max: int,
) -> tuple[int, int, int, int, tuple[bytes, list[Any]] | None]: ...

class RecorderFast:
    _fids: dict[Any, bytes]
    _live: dict[bytes, int]
    def key(
        self,
        fn: Callable[..., Any],
        opts: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        found: list[Any],
        plan: Any = ...,
    ) -> bytes | None: ...
    def __contains__(self, key: object) -> bool: ...

def run_firsts(
    q: Any,
    owner: Any,
    var: Any,
    done: list[tuple[Any, Any]],
    queued: Any,
    started: Any,
    limit: int,
) -> tuple[int, Any, Any, Any] | None: ...
def scalar_cost(value: Any) -> int: ...
def column_cost(args: tuple[Any, ...]) -> int: ...
