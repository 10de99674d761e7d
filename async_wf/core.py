"""The task core: the compiled ``async_wf._core`` or its pure-Python twin.

``Core`` is the compiled class unless the extension is missing or the
environment variable ``ASYNC_WF_NO_EXTENSIONS`` is set to a non-empty value
other than ``0``; ``CORE_IMPL`` says which one was picked ("cython" or
"python"). Falling back because the extension is missing warns once, at
import; forcing the fallback on purpose does not warn.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from async_wf._extension import extensions_disabled
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
if extensions_disabled():
    Core = PyCore
    CORE_IMPL = "python"
else:
    try:
        from async_wf._core import Core as _CCore
    except ImportError as exc:
        warnings.warn(
            f"async_wf: compiled core not available ({exc}); using the pure-Python core, "
            "which is about 10x slower. Reinstall with a C compiler to build it.",
            RuntimeWarning,
            stacklevel=2,
        )
        Core = PyCore
        CORE_IMPL = "python"
    else:
        Core = _CCore
        CORE_IMPL = "cython"
