"""The task core: the compiled ``async_wf._core`` or its pure-Python twin.

``Core`` is the compiled class unless the extension is missing or the
environment variable ``ASYNC_WF_NO_EXTENSIONS`` is set to a non-empty value
other than ``0``; ``CORE_IMPL`` says which one was picked ("cython" or
"python"). ``async_wf._extension.compiled()`` decides, for the checkpoint
log's twins too: falling back because the extension is missing warns once;
forcing the fallback on purpose does not warn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from async_wf._extension import compiled, extensions_disabled
from async_wf._pycore import (
    CANCELLED,
    FAILED,
    FINISHED,
    FORGOTTEN,
    READY,
    RUNNING,
    STATE_NAMES,
    WAITING,
)
from async_wf._pycore import Core as PyCore

__all__ = [
    "CANCELLED",
    "CORE_IMPL",
    "FAILED",
    "FINISHED",
    "FORGOTTEN",
    "READY",
    "RUNNING",
    "STATE_NAMES",
    "WAITING",
    "Core",
    "PyCore",
    "extensions_disabled",
]

if TYPE_CHECKING:
    from async_wf._core import Core as _CCoreType



Core: type[PyCore] | type[_CCoreType]
_ext = compiled()
if _ext is None:
    Core = PyCore
    CORE_IMPL = "python"
else:
    Core = _ext.Core
    CORE_IMPL = "cython"
