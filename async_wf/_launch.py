"""Where a ``Runtime`` runs its tasks: the launch's defaults and the transport choice.

``async-wf run --workers/--threads/--checkpoint/...`` hands its options to
every ``Runtime()`` of the application through the environment
(``ASYNC_WF_DEFAULTS``, a JSON object), not through a module-level setting;
``fill_in_launch_defaults`` applies them to what a call leaves out, and
``choose_transport`` turns the options into the ``Transport`` instance.
"""

from __future__ import annotations

import json
import logging
import os
import ssl as _ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from async_wf._loop import mpi_launched
from async_wf.transport.local import LocalTransport

if TYPE_CHECKING:
    from async_wf._allocator import Allocator
    from async_wf.checkpoint._config import Checkpoint
    from async_wf.transport import Transport

log = logging.getLogger("async_wf")

#: set by ``async-wf run``: a JSON object of Runtime options that fill in
#: what an application's own ``Runtime(...)`` leaves out
DEFAULTS_ENV = "ASYNC_WF_DEFAULTS"
_DEFAULT_TYPES: dict[str, type] = {
    "workers": int, "threads": int, "checkpoint": str, "listen": str, "token_file": str,
    "progress": bool, "metrics": str, "trace": str, "report": str, "cluster": str,
}
_TRANSPORT_DEFAULTS = ("workers", "threads", "listen", "token_file", "cluster")
#: the options of ``Runtime(**tcp_options)`` that ``MpiTransport`` takes too
MPI_OPTIONS = ("keep_min", "prefetch", "async_limit", "compress_min")


def launch_defaults() -> dict[str, Any]:
    """The options ``async-wf run`` passes to every ``Runtime`` of the application.

    Read from the environment variable ``ASYNC_WF_DEFAULTS`` (a JSON object
    with any of ``workers``, ``threads``, ``checkpoint``, ``listen``,
    ``token_file``, ``progress``, ``metrics``, ``trace``, ``report``); empty
    when unset.

    Raises:
        ValueError: the variable is not such an object (the message gives
            the rule and the value).
    """
    text = os.environ.get(DEFAULTS_ENV)
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except ValueError:
        opts = None
    if not isinstance(opts, dict):
        raise ValueError(f"{DEFAULTS_ENV} must be a JSON object of Runtime options, got {text!r}")
    for k, v in opts.items():
        want = _DEFAULT_TYPES.get(k)
        if want is None or type(v) is not want:
            raise ValueError(
                f"{DEFAULTS_ENV}: option {k!r} must be one of "
                f"{', '.join(f'{n} ({t.__name__})' for n, t in _DEFAULT_TYPES.items())}, "
                f"got {v!r}"
            )
    return opts


@dataclass(slots=True)
class LaunchArgs:
    """The options of a ``Runtime(...)`` call that the launch fills in or that pick its transport.

    See ``Runtime`` for their meaning; None is "not given".
    """

    transport: Transport | Literal["local", "tcp", "mpi"] | None = None
    threads: int | None = None
    workers: int | None = None
    listen: str | None = None
    token_file: str | os.PathLike[str] | None = None
    ssl: _ssl.SSLContext | Literal["auto"] | None = None
    initializer: Callable[[], Any] | None = None
    tcp_options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | os.PathLike[str] | Checkpoint | None = None
    progress: bool | None = None
    metrics: str | None = None
    trace: str | os.PathLike[str] | None = None
    report: str | os.PathLike[str] | None = None
    cluster: Allocator | Literal["slurm"] | None = None

    def chose_transport(self) -> bool:
        """Whether the call itself says where tasks run (then the launch's say does not)."""
        return (self.transport is not None or self.workers is not None
                or self.threads is not None or self.listen is not None
                or self.token_file is not None or self.ssl is not None
                or self.cluster is not None or bool(self.tcp_options))

    def wants_tcp(self) -> bool:
        """Whether an option only the TCP transport has is given."""
        return (self.workers is not None or self.listen is not None
                or self.token_file is not None or self.ssl is not None
                or self.cluster is not None)


# listen= and metrics= take the same forms: 'host:port' or 'tcp://host:port',
# an IPv6 host in brackets. An empty host is refused rather than read as
# "every interface": listening beyond loopback must be asked for by name.
_ADDRESS_RULE = "must be 'host:port' or 'tcp://host:port' (port 0: any free one)"


def missing_host_hint(port: str) -> str:
    """What to write instead of ``:port``."""
    return (f"give the host: '127.0.0.1:{port}' (this machine only) or "
            f"'0.0.0.0:{port}' (every interface)")


def split_address(addr: object, option: str) -> tuple[str, int]:
    """``(host, port)`` of a ``listen=`` or ``metrics=`` address (``option`` names it).

    Raises:
        ValueError: not ``host:port`` or ``tcp://host:port``, naming the
            option and the value.
    """
    if not isinstance(addr, str):
        raise ValueError(f"{option} {_ADDRESS_RULE}, got {type(addr).__name__}: {addr!r}")
    rest = addr.removeprefix("tcp://")
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets: where it ends is unclear
        sep = ""
    if not sep or not port.isdigit() or int(port) > 65535 or "/" in rest or "@" in rest:
        raise ValueError(f"{option} {_ADDRESS_RULE}, got {addr!r}")
    if not host:
        raise ValueError(f"{option} {_ADDRESS_RULE}, got {addr!r}; {missing_host_hint(port)}")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fill_in_launch_defaults(args: LaunchArgs) -> None:
    """Fill in what ``args`` leaves out from ``launch_defaults()``, in place.

    An option the application gives itself wins; a transport it chooses
    itself keeps the command line's transport options out (with a warning
    when the command line gave some).

    Raises:
        ValueError: ``ASYNC_WF_DEFAULTS`` is malformed.
    """
    defaults = launch_defaults()
    if not defaults:
        return
    if args.progress is None:
        args.progress = defaults.get("progress")
    if args.metrics is None:
        args.metrics = defaults.get("metrics")
    if args.trace is None:
        args.trace = defaults.get("trace")
    if args.report is None:
        args.report = defaults.get("report")
    if not args.chose_transport():
        args.workers = defaults.get("workers")
        args.threads = defaults.get("threads")
        args.listen = defaults.get("listen")
        args.token_file = defaults.get("token_file")
        args.cluster = defaults.get("cluster")
    elif any(k in defaults for k in _TRANSPORT_DEFAULTS):
        log.warning("the application chooses its own transport: the --workers, "
                    "--threads, --listen, --token-file or --slurm of async-wf run do not "
                    "apply to this Runtime")
    if args.checkpoint is None:
        args.checkpoint = defaults.get("checkpoint")


def choose_transport(args: LaunchArgs, runtime: Callable[..., Any]) -> Transport:
    """The transport ``args`` ask for: the one given, or a built-in one made from the options.

    Default: ``"tcp"`` when a TCP option is given, else ``"mpi"`` on the
    root rank of an MPI launch, else ``"local"``. ``runtime`` is the
    signature whose parameters an unknown option is compared with.

    Raises:
        ValueError: options that do not fit together or do not fit the transport.
        TypeError: an unknown option, or an ``initializer`` that is not callable.
    """
    tcp_options = args.tcp_options
    if tcp_options:
        check_tcp_options(tcp_options, runtime)
    transport = args.transport
    threads, initializer = args.threads, args.initializer
    tcp = args.wants_tcp()
    name = transport if isinstance(transport, str) else None
    if transport is not None and name is None and (
            tcp or tcp_options or threads is not None or initializer is not None):
        raise ValueError("give transport= alone, or the options of a built-in transport")
    if name is not None and name not in ("local", "tcp", "mpi"):
        raise ValueError(f"transport must be 'local', 'tcp', 'mpi' or a Transport, "
                         f"got {name!r}")
    tcp_only = [k for k in tcp_options if k not in MPI_OPTIONS]
    if name is None and transport is None:
        # the default: the options say which, else the launch does; an
        # option the MPI transport has too leaves an MPI launch's choice be
        name = "tcp" if tcp or tcp_only else (
            "mpi" if threads is None and mpi_launched() else "tcp" if tcp_options else "local")
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable, got "
                        f"{type(initializer).__name__}: {initializer!r}")
    if name == "mpi":
        if initializer is not None:
            raise ValueError("initializer= is not supported with transport='mpi' yet")
        refused = [k for k, v in (("threads", threads), ("workers", args.workers),
                                  ("listen", args.listen), ("token_file", args.token_file),
                                  ("ssl", args.ssl), ("cluster", args.cluster))
                   if v is not None] + tcp_only
        if refused:
            raise ValueError(f"transport='mpi' takes, of the other transports' options, "
                             f"only {', '.join(MPI_OPTIONS)} (worker slots are set at "
                             f"launch: --slots), got {', '.join(refused)}")
        from async_wf.transport.mpi import MpiTransport

        return MpiTransport(**tcp_options)
    if name == "tcp":
        if threads is not None:
            raise ValueError(
                "threads= applies to in-process execution; with workers use slots="
            )
        from async_wf.transport.tcp import TcpTransport

        return TcpTransport(
            workers=0 if args.workers is None else args.workers,
            listen=args.listen,
            token_file=args.token_file,
            ssl=args.ssl,
            initializer=initializer,
            allocator=_allocator(args.cluster),
            **tcp_options,
        )
    if name == "local":
        if tcp or tcp_options:
            raise ValueError("transport='local' takes no options of the TCP transport")
        return LocalTransport(threads, initializer)
    assert transport is not None and not isinstance(transport, str)
    return transport


def _allocator(cluster: object) -> Allocator | None:
    """The ``Allocator`` of ``cluster=``: ``"slurm"`` is ``SlurmJob()``.

    Raises:
        ValueError: neither ``"slurm"`` nor an ``Allocator``.
    """
    from async_wf._allocator import Allocator

    if cluster is None or isinstance(cluster, Allocator):
        return cluster
    if cluster == "slurm":
        from async_wf._slurm import SlurmJob

        return SlurmJob()
    raise ValueError(f"cluster must be 'slurm' (the workers of this Slurm job) or an "
                     f"Allocator such as async_wf.SlurmAllocator(...), got {cluster!r}")


def check_tcp_options(given: Iterable[str], runtime: Callable[..., Any]) -> None:
    """Refuse an option neither ``runtime`` nor ``TcpTransport`` has, with the closest name.

    Raises:
        TypeError: such an option, naming it and the closest known one.
    """
    import difflib
    import inspect

    from async_wf.transport.tcp import TcpTransport

    tcp = set(inspect.signature(TcpTransport.__init__).parameters) - {"self"}
    for name in given:
        if name in tcp:
            continue
        known = sorted(tcp | set(inspect.signature(runtime).parameters)
                       - {"self", "tcp_options"})
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {known}"
        raise TypeError(f"Runtime() got an unknown option {name!r}{hint}")
