"""The worker process's command line: connects to a scheduler over TCP and runs the tasks it sends.

    python -m async_wf.worker --connect tcp://host:7450 --slots 2 --token-file token
    async-wf worker --connect tcp://host:7450 --slots 2 --token-file token

The execution itself is ``async_wf._worker.Worker``, shared with MPI worker
ranks. A lost connection is retried for ``--reconnect`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import ssl
import sys
import time
from typing import NoReturn

from async_wf import protocol as P
from async_wf._resources import Declared
from async_wf._worker import Worker

log = logging.getLogger("async_wf.worker")

# --------------------------------------------------------------------- main
#: the first pause before reconnecting, and the longest (doubling between)
_RECONNECT_FIRST = 0.1
_RECONNECT_MAX = 5.0


def _die(message: str) -> NoReturn:
    """One line on stderr and exit status 2: a usage problem, no traceback."""
    print(f"async-wf worker: {message}", file=sys.stderr)
    raise SystemExit(2)


def _secret_from(args: argparse.Namespace) -> bytes:
    if args.token_file:
        try:
            return P.read_token_file(args.token_file)
        except OSError as exc:
            _die(f"cannot read the token file {args.token_file!r}: {exc.strerror or exc}")
        except ValueError:
            _die(f"the token file {args.token_file!r} must hold a hex token (as the "
                 "runtime's token_file= writes it)")
    env = os.environ.get(P.TOKEN_ENV)
    if env:
        try:
            return bytes.fromhex(env.strip())
        except ValueError:
            # the value is a secret: not repeated here
            _die(f"{P.TOKEN_ENV} must hold a hex token ({len(env)} characters given)")
    _die(f"give --token-file or set {P.TOKEN_ENV}")


def _ssl_from(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls_ca or args.tls_cert):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tls_ca)
    if args.tls_cert:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    return ctx


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The worker's command-line options (shared with ``async-wf worker``)."""
    p = parser or argparse.ArgumentParser(
        prog="async-wf worker", description="Run an async_wf worker process."
    )
    p.add_argument("--connect", required=True, metavar="tcp://HOST:PORT",
                   help="the scheduler's address")
    p.add_argument("--slots", type=int,
                   help="threads for blocking tasks (async tasks are not limited by it; "
                   "default 1, with --slurm the cores)")
    p.add_argument("--token-file", help=f"file holding the runtime's token (else ${P.TOKEN_ENV})")
    p.add_argument("--name", help="name shown in logs (default host:pid)")
    p.add_argument("--tls-ca", help="CA file to verify the scheduler's TLS certificate")
    p.add_argument("--tls-cert", help="client certificate for TLS")
    p.add_argument("--tls-key", help="key of the client certificate")
    p.add_argument("--tls-auto", action="store_true",
                   help="TLS with the certificate derived from the token (the runtime has "
                   "ssl='auto'); a server without it is refused")
    p.add_argument("--reconnect", type=float, default=60.0, metavar="SECONDS",
                   help="after a lost connection (a network cut, a restarted switch), try "
                   "again for this long, with backoff (default 60; 0: exit at once)")
    p.add_argument("--cores", type=int, metavar="N",
                   help="cores this worker offers to tasks that ask for cores (default: the "
                   "CPUs of its affinity mask)")
    p.add_argument("--memory", metavar="BYTES",
                   help="memory it offers, e.g. 120GiB (default: the cgroup limit, else the "
                   "machine's RAM)")
    p.add_argument("--gpus", metavar="N|ID,ID",
                   help="GPUs it offers: a count, or the device ids (default: "
                   "CUDA_VISIBLE_DEVICES, else nvidia-smi -L)")
    p.add_argument("--resources", action="append", metavar="NAME=AMOUNT,...",
                   help="named resources it offers, e.g. licence=2 (repeatable)")
    p.add_argument("--slurm", nargs="?", const="node", choices=("node", "task"),
                   help="started by srun: declare what Slurm gave this job step (cores, "
                   "memory, GPUs: per node, or per task) unless given above, and take the "
                   "name slurm-JOBID-NODE")
    p.add_argument("--end-time", type=float, metavar="EPOCH",
                   help="when this worker will be stopped (seconds since the epoch; with "
                   "--slurm: its job's end): tasks declared with a longer time= go elsewhere")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                   help="exit after this long without a task (a batch job's worker gives "
                   "its nodes back)")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def declared_from_args(args: argparse.Namespace) -> Declared:
    """The resources a worker declares, from ``--cores/--memory/--gpus/--resources``.

    Raises:
        ValueError: a value breaks its rule (the message names the option).
    """
    gpus: int | list[str] | None = None
    if args.gpus is not None:
        text = args.gpus.strip()
        if text.isdigit():
            gpus = int(text)
        else:
            gpus = [g.strip() for g in text.split(",") if g.strip()]
            if not gpus:
                raise ValueError(f"--gpus takes a count or device ids, got {args.gpus!r}")
    resources = ",".join(args.resources) if args.resources else None
    return Declared.build(cores=args.cores, memory=args.memory, gpus=gpus,
                          resources=resources)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m async_wf.worker``."""
    args = build_parser().parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    """Run a worker from parsed options; return the exit code."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if args.parent_pid is not None:
        # a worker the runtime started shares its terminal: what it forwards
        # is shown there once, by the scheduler, not twice
        for h in logging.getLogger().handlers:
            h.addFilter(lambda r: not getattr(r, "async_wf_forwarded", False))
    extra = os.environ.get(P.SYS_PATH_ENV)
    if extra:
        for p in reversed(extra.split(os.pathsep)):
            if p and p not in sys.path:
                sys.path.insert(0, p)
    try:
        host, port = P.parse_url(args.connect)
    except ValueError as exc:
        raise SystemExit(f"async-wf worker: {exc}") from None
    if args.slurm:
        from async_wf._slurm import slurm_worker_args

        try:
            given = slurm_worker_args(os.environ, args.slurm)
        except ValueError as exc:
            raise SystemExit(f"async-wf worker: {exc}") from None
        args.name = args.name or given["name"]
        args.cores = args.cores if args.cores is not None else given["cores"]
        if args.memory is None and given["memory"] is not None:
            args.memory = str(given["memory"])
        if args.gpus is None:
            g = given["gpus"]
            args.gpus = ",".join(g) if isinstance(g, list) else str(g)
        if args.slots is None:
            args.slots = args.cores
        if args.end_time is None:
            args.end_time = given.get("end_time")
    if args.slots is None:
        args.slots = 1
    if args.slots < 1:
        raise SystemExit(f"async-wf worker: --slots must be >= 1, got {args.slots}")
    try:
        declared = declared_from_args(args)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"async-wf worker: {exc}") from None
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        raise SystemExit(f"async-wf worker: --idle-timeout must be > 0 seconds, "
                         f"got {args.idle_timeout:g}")
    if args.reconnect < 0:
        raise SystemExit(f"async-wf worker: --reconnect must be >= 0 seconds, "
                         f"got {args.reconnect:g}")
    secret = _secret_from(args)
    authkey = os.environ.pop(P.MP_AUTHKEY_ENV, None)
    if authkey:
        import multiprocessing

        with contextlib.suppress(ValueError):  # not hex: proxies just fail to connect
            multiprocessing.current_process().authkey = bytes.fromhex(authkey)
    init = os.environ.pop(P.INIT_ENV, None)
    if init:
        import base64

        try:
            pickle.loads(base64.b64decode(init))()
        except Exception as exc:
            # the runtime sees a worker that exited at start-up and says so
            print(f"async-wf worker: the initializer failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 3
    from async_wf._loop import run

    # spawned workers are replaced by their runtime instead of reconnecting
    grace = 0.0 if args.parent_pid is not None else args.reconnect
    lost_at: float | None = None
    delay = _RECONNECT_FIRST
    while True:
        worker = Worker(secret, args.slots, args.name, args.parent_pid, declared=declared,
                        idle_timeout=args.idle_timeout, end_time=args.end_time)
        try:
            code = run(worker.run(host, port, _ssl_from(args), tls_auto=args.tls_auto))
        except KeyboardInterrupt:
            return 130
        except OSError as exc:
            if lost_at is None:
                print(f"async-wf worker: cannot connect to {args.connect}: {exc}",
                      file=sys.stderr)
                return 2
            code = 2
        else:
            if worker.lost and grace > 0:
                if worker.joined:
                    lost_at, delay = time.monotonic(), _RECONNECT_FIRST
                    log.warning("worker %s: connection to %s lost; reconnecting for up to "
                                "%g s", worker.name, args.connect, grace)
            elif lost_at is None or worker.joined:
                return code  # told to stop, refused, or no reconnecting
        assert lost_at is not None
        if time.monotonic() - lost_at > grace:
            print(f"async-wf worker: gave up reconnecting after {grace:g} s: "
                  f"{args.connect} did not take the connection back", file=sys.stderr)
            return code or 1
        time.sleep(delay)
        delay = min(delay * 2, _RECONNECT_MAX)


if __name__ == "__main__":
    # run the imported module, not this __main__ copy of it: the exceptions
    # sent back (RemoteError) must pickle as async_wf.worker.RemoteError, a
    # name the scheduler can load, not as __main__.RemoteError
    from async_wf.worker import main as _main

    sys.exit(_main())
