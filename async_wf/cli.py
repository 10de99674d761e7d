"""The ``async-wf`` command line.

    async-wf worker --connect tcp://host:7450 --slots 2 --token-file token
"""

from __future__ import annotations

import argparse
import sys

from async_wf import __version__, worker


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``async-wf`` command."""
    p = argparse.ArgumentParser(prog="async-wf", description="async_wf task runtime.")
    p.add_argument("--version", action="version", version=f"async_wf {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    w = sub.add_parser(
        "worker",
        help="run a worker process that connects to a runtime",
        description="Run a worker process that connects to a runtime's scheduler over TCP.",
    )
    worker.build_parser(w)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``async-wf`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return worker.run_from_args(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
