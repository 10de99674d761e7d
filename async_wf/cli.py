"""The ``async-wf`` command line.

    async-wf run [--workers N | --threads N | --mpi N | --slurm] [--listen tcp://HOST:PORT]
                 [--token-file FILE] [--checkpoint FILE]
                 [--progress] [--metrics HOST:PORT] [--trace FILE] [--report FILE]
                 app.py [args...]
    async-wf worker --connect tcp://host:7450 --slots 2 --token-file token
    async-wf checkpoint inspect|verify|compact|forget|explain ...

``python -m async_wf`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys

from async_wf import __version__, worker
from async_wf.checkpoint import _cli as checkpoint_cli


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``async-wf`` command."""
    p = argparse.ArgumentParser(
        prog="async-wf", description="async_wf task runtime.",
        epilog="'async-wf COMMAND --help' gives the options of each command.")
    p.add_argument("--version", action="version", version=f"async_wf {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "run",
        help="run an application with runtime options, without editing it",
        description="Run a Python application whose Runtime() then takes these options "
        "(an option the application passes itself wins). With --mpi N the application "
        "runs under mpiexec -n N: rank 0 runs it, the other ranks serve its tasks.",
    )
    how = r.add_mutually_exclusive_group()
    how.add_argument("--workers", type=_positive, metavar="N",
                     help="run tasks on N local worker processes over TCP")
    how.add_argument("--threads", type=_positive, metavar="N",
                     help="run tasks in-process, on N threads")
    how.add_argument("--mpi", type=_at_least_2, metavar="N",
                     help="run under mpiexec -n N (1 scheduler rank, N-1 worker ranks)")
    how.add_argument("--slurm", action="store_true",
                     help="inside a Slurm allocation: one worker per node, started with srun "
                     "(Runtime(cluster='slurm'))")
    r.add_argument("--listen", metavar="tcp://HOST:PORT", type=_address,
                   help="accept external workers ('async-wf worker --connect') here")
    r.add_argument("--token-file", metavar="FILE",
                   help="the workers' token (created, mode 0600, if missing)")
    r.add_argument("--checkpoint", metavar="FILE",
                   help="record finished tasks in this checkpoint log; a re-run skips them")
    obs = r.add_argument_group("observability (see async_wf.observe)")
    obs.add_argument("--progress", action="store_true",
                     help="show a live progress line on the terminal (quiet off a terminal)")
    obs.add_argument("--metrics", metavar="HOST:PORT", type=_address,
                     help="serve Prometheus metrics on this address while the runtime runs")
    obs.add_argument("--trace", metavar="FILE",
                     help="write a Chrome trace-event timeline (Perfetto, chrome://tracing)")
    obs.add_argument("--report", metavar="FILE",
                     help="write a self-contained HTML report of the run")
    r.set_defaults(run_options=frozenset(
        o for a in r._actions for o in a.option_strings if o.startswith("--") and o != "--help"))
    r.add_argument("app", help="the application script")
    r.add_argument("args", nargs=argparse.REMAINDER, help="the application's arguments")
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


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def _address(text: str) -> str:
    # the same forms as Runtime(listen=, metrics=); the host is resolved here
    # so that a typo is one line of usage, not a traceback from the application
    import socket

    from async_wf._launch import missing_host_hint, split_address

    try:
        host, port = split_address(text, "address")
    except ValueError:
        _, _, tail = text.rpartition(":")
        hint = f"; {missing_host_hint(tail)}" if text.removeprefix("tcp://").startswith(":") \
            and tail.isdigit() else ""
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT (port 0: any free one), got {text!r}{hint}") from None
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise argparse.ArgumentTypeError(
            f"cannot resolve the host {host!r} ({exc.strerror}), got {text!r}") from None
    return text


def _at_least_2(text: str) -> int:
    n = _positive(text)
    if n < 2:
        raise argparse.ArgumentTypeError(
            f"must be >= 2 (a scheduler rank and at least one worker rank), got {text!r}")
    return n


def run_app(args: argparse.Namespace) -> int:
    """``async-wf run``: the application in this process, or under mpiexec."""
    from async_wf._launch import DEFAULTS_ENV

    if not os.path.isfile(args.app):
        print(f"async-wf run: no such application file: {args.app!r}", file=sys.stderr)
        return 2
    for arg in args.args:
        if arg.split("=", 1)[0] in args.run_options:
            print(f"async-wf run: {arg.split('=', 1)[0]} after {args.app} goes to the "
                  f"application, not to async-wf run: put it before {args.app} to set the "
                  "runtime's option", file=sys.stderr)
    from async_wf.observe._events import library_message, missing_library

    mod = missing_library(bool(args.progress), args.metrics is not None)
    if mod is not None:
        flag = "--progress" if mod == "rich" else "--metrics"
        print(f"async-wf run: {library_message(mod, flag)}", file=sys.stderr)
        return 2
    opts: dict[str, object] = {}
    if args.workers is not None:
        opts["workers"] = args.workers
    if args.threads is not None:
        opts["threads"] = args.threads
    if args.slurm:
        opts["cluster"] = "slurm"
    if args.listen is not None:
        opts["listen"] = args.listen if args.listen.startswith("tcp://") else \
            f"tcp://{args.listen}"
    if args.token_file is not None:
        opts["token_file"] = os.path.abspath(args.token_file)
    if args.checkpoint is not None:
        opts["checkpoint"] = os.path.abspath(args.checkpoint)
    if args.progress:
        opts["progress"] = True
    if args.metrics is not None:
        opts["metrics"] = args.metrics
    for name in ("trace", "report"):
        if getattr(args, name) is not None:
            opts[name] = os.path.abspath(getattr(args, name))
    if opts:
        os.environ[DEFAULTS_ENV] = json.dumps(opts)
    if args.mpi is not None:
        from async_wf._program import find_mpiexec

        cmd = [find_mpiexec(), "-n", str(args.mpi), sys.executable, "-m", "async_wf.mpi",
               args.app, *args.args]
        return subprocess.call(cmd)
    sys.argv = [args.app, *args.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.app)))
    try:
        runpy.run_path(args.app, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``async-wf`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_app(args)
    if args.command == "worker":
        return worker.run_from_args(args)
    if args.command == "checkpoint":
        return checkpoint_cli.run_from_args(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
