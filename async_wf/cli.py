"""The ``async-wf`` command line.

    async-wf worker --connect tcp://host:7450 --slots 2 --token-file token
"""

from __future__ import annotations

import argparse
import sys

from async_wf import __version__, worker
from async_wf.checkpoint import _cli as checkpoint_cli


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
    c = sub.add_parser(
        "checkpoint",
        help="inspect, verify, compact or forget in a checkpoint log",
        description="Work with an async_wf checkpoint log.",
    )
    checkpoint_cli.build_parser(c)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``async-wf`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return worker.run_from_args(args)
    if args.command == "checkpoint":
        return checkpoint_cli.run_from_args(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
