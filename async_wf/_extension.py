"""Whether to use the compiled extension or its pure-Python twins.

Imports nothing else of async_wf, so that the checkpoint package can ask
without pulling in the runtime.
"""

from __future__ import annotations

import os

#: set to a non-empty value other than ``0`` to use the pure-Python twins
NO_EXTENSIONS_ENV = "ASYNC_WF_NO_EXTENSIONS"


def extensions_disabled() -> bool:
    """Whether ``ASYNC_WF_NO_EXTENSIONS`` asks for the pure-Python twins of every extension."""
    return os.environ.get(NO_EXTENSIONS_ENV, "") not in ("", "0")
