"""``async-wf checkpoint``: look into, check, shrink and invalidate a checkpoint log.

    async-wf checkpoint inspect FILE
    async-wf checkpoint verify FILE [--unpickle]
    async-wf checkpoint compact FILE
    async-wf checkpoint forget FILE --function NAME
    async-wf checkpoint explain APP.py:FUNCTION [ARG...]

Exit status: 0 when all is well; 1 when ``verify`` finds a problem or
``forget`` finds nothing to forget; 2 when the command cannot do its work
(no such file, not a log, locked by a running writer), with one line on
stderr saying why.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_ERROR = 2


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``async-wf checkpoint`` (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(
        prog="async-wf checkpoint", description="Work with an async_wf checkpoint log."
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser(
        "inspect",
        help="counts per function, sizes, first and last time, problems",
        description="Show what a checkpoint log holds. Reads only; a running writer is "
        "not disturbed.",
    )
    s.add_argument("file", metavar="FILE")
    s = sub.add_parser(
        "verify",
        help="check every record; exit status 1 when anything is wrong",
        description="Check every record's checksum and structure. Nothing is unpickled "
        "unless --unpickle is given.",
    )
    s.add_argument("file", metavar="FILE")
    s.add_argument(
        "--unpickle", action="store_true",
        help="also unpickle every live result and committed state (imports the "
        "program's modules and runs their code: only for logs you trust)",
    )
    s = sub.add_parser(
        "compact",
        help="rewrite the log without superseded, forgotten, damaged and orphaned records",
        description="Rewrite the log with only what a run can use, then swap it in "
        "atomically. Refused while a run writes the log.",
    )
    s.add_argument("file", metavar="FILE")
    s = sub.add_parser(
        "forget",
        help="invalidate a function's results and those of everything computed from them",
        description="Append tombstones for every result of a function and, transitively, "
        "of the tasks that received them; the next run recomputes them.",
    )
    s.add_argument("file", metavar="FILE")
    s.add_argument(
        "--function", required=True, metavar="NAME",
        help="module:qualname, or a qualname that only one module in the log has",
    )
    s = sub.add_parser(
        "explain",
        help="what a function's key sees: the module-level values in it and those left out",
        description="Load a program's module (its `if __name__ == \"__main__\"` part does "
        "not run) and list the module-level values that the key of one of its functions "
        "includes, and those it leaves out because they have no stable hash.",
    )
    s.add_argument("target", metavar="APP.py:FUNCTION",
                   help="a program file (or an importable module) and a function in it")
    s.add_argument("argv", nargs="*", metavar="ARG",
                   help="the program's arguments (sys.argv[1:] while its module loads)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m async_wf.checkpoint._cli``."""
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the action in ``args``; return the exit status."""
    from async_wf.checkpoint import CheckpointError

    out = out or sys.stdout
    actions = {"inspect": _inspect, "verify": _verify, "compact": _compact, "forget": _forget,
               "explain": _explain}
    try:
        return actions[args.action](args, out)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"async-wf checkpoint {args.action}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _when(t: float) -> str:
    if t != t or t in (float("inf"), float("-inf")):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    from async_wf.checkpoint import inspect

    st = inspect(args.file)
    types = ", ".join(f"{name} {n:,}" for name, n in st.by_type.items() if n)
    print(f"{st.path}: {_size(st.bytes)}", file=out)
    print(f"  records   {st.records:,}" + (f" ({types})" if types else ""), file=out)
    print(
        f"  live      {st.results:,} results, {_size(st.live_bytes)}; {st.states:,} states",
        file=out,
    )
    damage = []
    if st.corrupt:
        damage.append(f"{st.corrupt} damaged region(s) skipped")
    if st.truncated_tail_bytes:
        damage.append(f"torn tail of {st.truncated_tail_bytes:,} bytes")
    print(f"  damage    {'; '.join(damage) or 'none found'}", file=out)
    if st.functions:
        width = max(24, *(len(name) for name in st.functions))
        print(
            f"\n  {'function':<{width}}  {'results':>9}  {'size':>10}  {'first':<19}  last",
            file=out,
        )
        for name, fs in st.functions.items():
            print(
                f"  {name:<{width}}  {fs.results:>9,}  {_size(fs.bytes):>10}  "
                f"{_when(fs.first):<19}  {_when(fs.last)}",
                file=out,
            )
    if st.problems:
        print("\n  problems", file=out)
        for p in st.problems:
            print(f"    offset {p.offset}: {p.reason}", file=out)
    return EXIT_OK


def _verify(args: argparse.Namespace, out: TextIO) -> int:
    from async_wf.checkpoint import verify

    v = verify(args.file, unpickle=args.unpickle)
    checked = f"{v.records:,} records, {_size(v.bytes)}"
    if args.unpickle:
        checked += f", {v.unpickled:,} values unpickled"
    if v.ok:
        print(f"{v.path}: OK ({checked})", file=out)
        return EXIT_OK
    print(f"{v.path}: {len(v.problems)} problem(s) ({checked})", file=out)
    for p in v.problems:
        print(f"  offset {p.offset}: {p.reason}", file=out)
    return EXIT_FOUND


def _compact(args: argparse.Namespace, out: TextIO) -> int:
    from async_wf.checkpoint import compact

    c = compact(args.file)
    print(
        f"{c.path}: {c.records_before:,} records ({_size(c.bytes_before)}) -> "
        f"{c.records_after:,} records ({_size(c.bytes_after)})",
        file=out,
    )
    return EXIT_OK


def _forget(args: argparse.Namespace, out: TextIO) -> int:
    from async_wf.checkpoint import forget_function, inspect

    n = forget_function(args.file, args.function)
    if n:
        print(
            f"{args.file}: forgot {n:,} result(s): those of {args.function} and of the "
            "tasks computed from them",
            file=out,
        )
        return EXIT_OK
    names = list(inspect(args.file).functions)
    known = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    print(
        f"{args.file}: no live results of function {args.function!r}"
        + (f"; functions in the log: {known}" if names else "; the log has no live results"),
        file=out,
    )
    return EXIT_FOUND


def _explain(args: argparse.Namespace, out: TextIO) -> int:
    import importlib
    import importlib.util
    import os

    from async_wf.checkpoint import explain

    where, sep, qualname = args.target.rpartition(":")
    if not sep or not where or not qualname:
        raise ValueError(f"the target must be APP.py:FUNCTION or module:FUNCTION, "
                         f"got {args.target!r}")
    saved_argv, saved_path = sys.argv, list(sys.path)
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ValueError(f"no such program file: {where!r}")
            sys.argv = [where, *args.argv]
            sys.path.insert(0, os.path.dirname(os.path.abspath(where)))
            spec = importlib.util.spec_from_file_location("__async_wf_explain__", where)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            sys.argv = [where, *args.argv]
            module = importlib.import_module(where)
        obj: Any = module
        for part in qualname.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ValueError(f"{where} has no {qualname!r}") from None
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    if not callable(obj):
        raise ValueError(f"{qualname!r} in {where} is a {type(obj).__name__}, not a function")
    print(explain(obj), file=out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
