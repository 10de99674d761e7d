"""Build script: the one compiled extension, async_wf._core, from src_cython/_core.pyx
(the task core, readyq.pxi and deptrack.pxi, and the checkpoint log's hot paths,
ckfast.pxi, in one compilation unit).

Set ASYNC_WF_DEBUG_BUILD=1 to compile with line tracing and assertions on.
"""

import os
from glob import glob

from setuptools import Extension, setup

debug = os.environ.get("ASYNC_WF_DEBUG_BUILD") == "1"
macros = [("CYTHON_TRACE_NOGIL", "1")] if debug else []
directives = {
    "language_level": "3",
    "boundscheck": debug,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": debug,
    "linetrace": debug,
}

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - build-system requires Cython
    raise SystemExit("building async_wf needs Cython>=3.0 (pip install cython)") from exc

extensions = cythonize(
    [
        Extension(
            "async_wf._core",
            ["src_cython/_core.pyx"],
            depends=sorted(glob("src_cython/**/*.p*", recursive=True)),
            define_macros=macros,
            extra_compile_args=["-O0", "-g"] if debug else ["-O3"],
        ),
    ],
    compiler_directives=directives,
    annotate=os.environ.get("ASYNC_WF_ANNOTATE") == "1",
)

setup(ext_modules=extensions)
