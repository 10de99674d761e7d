"""Build script: the one compiled extension, async_wf._core, from src_cython/_core.pyx
(the task core, readyq.pxi and deptrack.pxi, and the checkpoint log's hot paths,
ckfast.pxi, and the in-process runner's loop, runner.pxi, in one compilation unit).

Set ASYNC_WF_DEBUG_BUILD=1 to compile with line tracing and assertions on.

The extension is optional: where no C compiler works (none installed,
``CC=false``, a platform without wheels), the build prints one line saying
so and the package is installed without it; at import, async_wf then runs
on the pure-Python twins and warns once (async_wf/_extension.py). Set
ASYNC_WF_REQUIRE_EXTENSION=1 to make a failed compilation fail the build
(for developers and CI, who want the error itself).
"""

import os
import sys
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

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
            depends=sorted(glob("src_cython/**/*.p*", recursive=True) + glob("src_cython/*.h")),
            define_macros=macros,
            extra_compile_args=["-O0", "-g"] if debug else ["-O3"],
        ),
    ],
    compiler_directives=directives,
    annotate=os.environ.get("ASYNC_WF_ANNOTATE") == "1",
)

# what a missing or broken compiler raises: compile/link errors (CCompilerError),
# a compiler that cannot be run (ExecError, OSError), no compiler known for
# the platform (PlatformError, raised when build_ext sets its compiler up)
_NO_COMPILER = (CCompilerError, ExecError, PlatformError, OSError)


class optional_build_ext(build_ext):
    """build_ext that leaves the extension out, with one line, when compiling fails."""

    skipped: tuple[str, ...] = ()

    def _skip(self, exc: BaseException, ext: Extension | None = None) -> None:
        if os.environ.get("ASYNC_WF_REQUIRE_EXTENSION") == "1":
            raise exc
        self.skipped = (*self.skipped, ext.name) if ext else tuple(
            e.name for e in self.extensions)
        cc = getattr(self.compiler, "compiler_so", None) or [
            getattr(self.compiler, "compiler_type", None) or os.environ.get("CC", "cc")]
        # "command '[...the whole command line...]' returned non-zero exit status 1":
        # the compiler's name is said already, keep what went wrong
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = text.rsplit("' ", 1)[-1].strip(" .") or text
        print(f"async_wf: building the C extension async_wf._core failed with the compiler "
              f"{cc[0]!r} ({reason[:200]}); installing without it: the pure-Python twin "
              f"will be used (task core about 10x slower). Install a C compiler and "
              f"reinstall to build it.", file=sys.stderr, flush=True)

    def run(self) -> None:
        try:
            super().run()
        except _NO_COMPILER as exc:
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except _NO_COMPILER as exc:
            self._skip(exc, ext)

    def copy_extensions_to_source(self) -> None:
        # --inplace and editable installs: there is nothing to copy for a skipped one
        built = self.extensions
        self.extensions = [e for e in built if e.name not in self.skipped]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = built


setup(ext_modules=extensions, cmdclass={"build_ext": optional_build_ext})
