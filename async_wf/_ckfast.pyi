"""Types of the compiled checkpoint hot paths (src_cython/_ckfast.pyx)."""

from collections.abc import Callable
from typing import Any

def crc32(data: bytes | bytearray | memoryview) -> int: ...
def quick_key(
    fn_identity: bytes,
    args: tuple[Any, ...],
    leaf: Callable[[Any], bytes | None] | None,
    hasher: Any,
) -> bytes | None: ...
def result_record(
    key: bytes, when: float, name: bytes, parents: tuple[bytes, ...], payload: bytes
) -> bytes: ...
def mapped_payload(mm: Any, off: int, key: bytes) -> bytes | None: ...
