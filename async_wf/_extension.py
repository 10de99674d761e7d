"""Choosing between the compiled extension and its pure-Python twins, once for all.

async_wf has one compiled extension, ``async_wf._core`` (src_cython/_core.pyx
with its .pxi files): the task core, the checkpoint log's hot paths, the
in-process runner's loop and the wire protocol's column test. Each part has
a pure-Python twin that is its specification (``_pycore``, and functions
of ``checkpoint/_keys.py``, ``checkpoint/_format.py``, ``_context.py`` and
``protocol.py``).
``compiled()`` is the one place that decides which runs: the extension,
unless ``ASYNC_WF_NO_EXTENSIONS`` is set to a non-empty value other than
``0`` (the twins, silently) or the extension cannot be imported (the twins,
with one ``RuntimeWarning`` per process, whoever asks first).

Imports nothing else of async_wf, so that the checkpoint package can ask
without pulling in the runtime.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

#: set to a non-empty value other than ``0`` to use the pure-Python twins
NO_EXTENSIONS_ENV = "ASYNC_WF_NO_EXTENSIONS"

_loaded: ModuleType | None = None
_tried = False


def extensions_disabled() -> bool:
    """Whether ``ASYNC_WF_NO_EXTENSIONS`` asks for the pure-Python twins of every extension."""
    return os.environ.get(NO_EXTENSIONS_ENV, "") not in ("", "0")


def compiled() -> ModuleType | None:
    """The compiled extension ``async_wf._core``, or None for the pure-Python twins.

    None when ``ASYNC_WF_NO_EXTENSIONS`` is set (no warning: it was asked
    for), or when the extension cannot be imported: the first such call
    warns with a ``RuntimeWarning``, later ones do not.
    """
    global _loaded, _tried
    if extensions_disabled():
        return None
    if not _tried:
        _tried = True
        try:
            import async_wf._core as ext
        except ImportError as exc:
            warnings.warn(
                f"async_wf: the compiled extension async_wf._core is not available ({exc}); "
                "using the pure-Python twins (the task core is about 10x slower). "
                "Reinstall with a C compiler to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            _loaded = ext
    return _loaded
