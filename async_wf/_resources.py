"""What tasks need and what workers have: cores, memory, GPUs and named resources.

A task may ask for a ``Request``: whole cores, bytes of memory, whole GPUs and
any number of named, countable resources ("licence=1"). A worker states what
it has once, as a ``Declared`` (detected from the machine, narrowed by options).
The scheduler keeps one ``Ledger`` per worker, free amounts only, and sends a
task only where its request fits now; a request that fits no worker at all is
an error, not a wait. The worker keeps an ``Allocator`` that hands each attempt
a ``Grant`` with concrete GPU ids and CPU ids, and ``task_env``/``pin`` make a
task see only those (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS, CPU affinity).
Amounts are floats compared with a tiny tolerance; cores, GPUs and memory are
whole numbers. This module imports nothing of the package.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

CORES = "cores"
MEMORY = "memory"
GPUS = "gpus"
_BUILTIN = (CORES, MEMORY, GPUS)
_WHOLE = frozenset(_BUILTIN)  # amounts that are whole numbers

# sums such as 0.1 + 0.2 must never refuse a fit that is exact on paper
_TOL = 1e-9
_MAX_NAME = 64
_MAX_CUSTOM = 64
# caps on what a peer may send, so that a bad frame cannot make us build huge tuples
_MAX_GPU_IDS = 1024
_MAX_GPU_ID_LEN = 128
_MAX_CPU_IDS = 1 << 16

_Id = TypeVar("_Id", str, int)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*\Z")

OMP_FAMILY = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
)
GPU_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


# --------------------------------------------------------------------- memory

_MEM_RE = re.compile(r"\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([A-Za-z]*)\s*\Z")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_MEM_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_MEM_RULE = (
    "a memory size must be a whole number of bytes >= 0 or a string such as "
    "'512MiB', '16 GiB', '2G' (binary) or '1.5GB' (decimal)"
)


def _unit_factor(unit: str) -> int | None:
    """Bytes per unit; None for a unit this module does not know."""
    u = unit.lower()
    if u in ("", "b"):
        return 1
    if u[0] not in _POWERS:
        return None
    power = _POWERS[u[0]]
    rest = u[1:]
    # like Slurm, a bare letter is binary; "KiB"/"Ki" are binary, "KB" decimal
    if rest in ("", "i", "ib"):
        return 1 << (10 * power)
    if rest == "b":
        return int(Fraction(1000) ** power)
    return None


def parse_memory(value: int | str) -> int:
    """Bytes from an int (``1024``) or a size string (``"16GiB"``, ``"2G"``, ``"1.5GB"``).

    Single letters and ``KiB``-style units are binary (``"2G"`` is 2 GiB, as in
    Slurm); ``KB``-style units are decimal (``"1.5GB"`` is 1.5e9 bytes). A
    fractional byte count rounds up. Raises ValueError, naming the rule and
    the value, for negative sizes, bools, NaN, infinities and unknown units.
    """
    # typed for callers; checked for anything, as options come from users
    raw: object = value
    if isinstance(raw, bool):
        raise ValueError(f"{_MEM_RULE}; got the bool {raw!r}")
    if isinstance(raw, int):
        if raw < 0:
            raise ValueError(f"{_MEM_RULE}; got the negative {raw!r}")
        return raw
    if isinstance(raw, float):
        if not math.isfinite(raw) or raw < 0:
            raise ValueError(f"{_MEM_RULE}; got {raw!r}")
        return math.ceil(raw)
    if not isinstance(raw, str):
        raise ValueError(f"{_MEM_RULE}; got {raw!r} of type {type(raw).__name__}")
    m = _MEM_RE.match(raw)
    if m is None:
        raise ValueError(f"{_MEM_RULE}; got {raw!r}")
    sign, digits, exp, unit = m.groups()
    factor = _unit_factor(unit)
    if factor is None:
        raise ValueError(f"{_MEM_RULE}; got {raw!r} (unknown unit {unit!r})")
    if sign == "-" and Fraction(digits) != 0:
        raise ValueError(f"{_MEM_RULE}; got the negative {raw!r}")
    if exp is not None and abs(int(exp)) > 30:
        raise ValueError(f"{_MEM_RULE}; got {raw!r} (exponent out of range)")
    # exact arithmetic: "1.1GB" must be 1100000000 bytes, not a float's guess
    amount = Fraction(digits) * factor * Fraction(10) ** int(exp or 0)
    return math.ceil(amount)


def format_memory(n: float) -> str:
    """A byte count for messages: ``"16 GiB"``, ``"1.5 GiB"``, ``"512 MiB"``, ``"100 B"``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    index = 0
    while index + 1 < len(_MEM_UNITS) and n >= 1024 ** (index + 1):
        index += 1
    if index == 0:
        return f"{sign}{_fmt_number(n)} B"
    text = f"{n / 1024**index:.2f}".rstrip("0").rstrip(".")
    return f"{sign}{text} {_MEM_UNITS[index]}"


def _fmt_number(v: float) -> str:
    """``8`` for 8.0, ``0.5`` for 0.5: amounts in messages without float noise."""
    if isinstance(v, int) or (math.isfinite(v) and v == int(v)):
        return str(int(v))
    return repr(v)


def _fmt_amount(name: str, v: float) -> str:
    return format_memory(v) if name == MEMORY else _fmt_number(v)


# ------------------------------------------------------------------ validation


def _check_name(name: object, what: str) -> str:
    """A custom resource name, or ValueError naming the rule and the value."""
    if not isinstance(name, str):
        raise ValueError(f"{what}: a resource name must be a str, got {name!r}")
    if len(name) > _MAX_NAME:
        raise ValueError(
            f"{what}: a resource name must have at most {_MAX_NAME} characters, "
            f"got {len(name)} ({name[:20]!r}...)"
        )
    if not _NAME_RE.match(name):
        raise ValueError(
            f"{what}: a resource name must start with a letter or '_' and hold only "
            f"letters, digits and '_.:-', got {name!r}"
        )
    return name


def _check_custom_name(name: object, what: str) -> str:
    name = _check_name(name, what)
    if name in _BUILTIN:
        raise ValueError(
            f"{what}: {name!r} is not a custom resource; use the {name}= option instead"
        )
    return name


def _check_number(v: object, what: str, *, positive: bool) -> float:
    """A finite int/float amount (> 0 or >= 0), or ValueError/TypeError naming it."""
    rule = "> 0" if positive else ">= 0"
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"{what} must be a finite number {rule}, got {v!r}")
    if not math.isfinite(v) or v < 0 or (positive and v <= 0):
        raise ValueError(f"{what} must be a finite number {rule}, got {v!r}")
    return v


def _check_count(v: object, what: str, *, least: int) -> int:
    """A whole count (int, not bool) >= least, or TypeError/ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an int >= {least}, got {v!r}")
    if v < least:
        raise ValueError(f"{what} must be an int >= {least}, got {v!r}")
    return v


def _wire_number(v: object, what: str, *, positive: bool, whole: bool) -> float:
    """An amount from a peer: like _check_number, but every failure is a ValueError."""
    try:
        x = _check_number(v, what, positive=positive)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    if whole:
        if x != int(x):
            raise ValueError(f"{what} must be a whole number, got {v!r}")
        return int(x)
    return x


def parse_resource_list(text: str) -> dict[str, float]:
    """Named amounts from the CLI form ``"licence=2,fpga=1"``.

    Empty items are skipped, so repeated flags may be joined with commas.
    Amounts must be finite numbers >= 0; a name may appear once. Raises
    ValueError quoting the offending item.
    """
    if not isinstance(text, str):
        raise ValueError(f"a resource list must be a str such as 'licence=2,fpga=1', got {text!r}")
    out: dict[str, float] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, eq, amount_text = item.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"a resource list item must be NAME=AMOUNT, got {item!r}")
        _check_name(name, f"resource list item {item!r}")
        try:
            amount = float(amount_text.strip())
        except ValueError:
            raise ValueError(
                f"resource list item {item!r}: the amount must be a number, got {amount_text!r}"
            ) from None
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(
                f"resource list item {item!r}: the amount must be a finite number >= 0, "
                f"got {amount_text.strip()!r}"
            )
        if name in out:
            raise ValueError(f"resource list item {item!r}: {name!r} is given twice")
        out[name] = amount
    return out


# --------------------------------------------------------------------- Request


@dataclass(frozen=True, slots=True)
class Request:
    """What one task asks for. amounts: sorted tuple of (name, amount) with amount > 0.

    ``cores``, ``gpus`` and ``memory`` (bytes) are stored as ints under those
    names, custom resources as given. Build one with ``Request.of``; a task
    that asks for nothing has no Request at all (None).
    """

    amounts: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        amounts = self.amounts
        if not isinstance(amounts, tuple) or not amounts:
            raise ValueError(f"a Request needs a non-empty tuple of amounts, got {amounts!r}")
        names = [pair[0] for pair in amounts]
        if names != sorted(set(names)):
            raise ValueError(f"a Request's amounts must be sorted by unique name, got {names!r}")
        custom = 0
        for name, v in amounts:
            if name in _WHOLE:
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"a Request's {name} must be an int >= 1, got {v!r}")
            else:
                _check_custom_name(name, "a Request")
                _check_number(v, f"a Request's {name!r}", positive=True)
                custom += 1
        if custom > _MAX_CUSTOM:
            raise ValueError(
                f"a Request may name at most {_MAX_CUSTOM} custom resources, got {custom}"
            )

    @classmethod
    def of(
        cls,
        cores: int | None,
        memory: int | str | None,
        gpus: int | None,
        resources: Mapping[str, float] | None,
    ) -> Request | None:
        """The request of a task's options; None when nothing is asked.

        ``cores`` and ``gpus`` are ints >= 1, ``memory`` anything
        ``parse_memory`` reads (> 0), ``resources`` maps custom names to
        finite amounts > 0. Raises TypeError/ValueError naming the option
        and the value.
        """
        found: dict[str, float] = {}
        if cores is not None:
            found[CORES] = _check_count(cores, "cores", least=1)
        if memory is not None:
            try:
                nbytes = parse_memory(memory)
            except ValueError as exc:
                raise ValueError(f"memory: {exc}") from None
            if nbytes <= 0:
                raise ValueError(f"memory must be > 0 bytes, got {memory!r}")
            found[MEMORY] = nbytes
        if gpus is not None:
            found[GPUS] = _check_count(gpus, "gpus", least=1)
        if resources is not None:
            if not isinstance(resources, Mapping):
                raise TypeError(
                    f"resources must be a mapping of name to amount, got {resources!r}"
                )
            for name, v in resources.items():
                _check_custom_name(name, "resources")
                found[name] = _check_number(v, f"resources[{name!r}]", positive=True)
        if not found:
            return None
        return cls(tuple(sorted(found.items())))

    def get(self, name: str) -> float:
        """The amount asked of ``name``; 0 when it is not asked."""
        for n, v in self.amounts:
            if n == name:
                return v
        return 0

    @property
    def cores(self) -> int:
        """Cores asked (0 if not asked)."""
        return int(self.get(CORES))

    @property
    def gpus(self) -> int:
        """GPUs asked (0 if not asked)."""
        return int(self.get(GPUS))

    @property
    def memory(self) -> int:
        """Bytes of memory asked (0 if not asked)."""
        return int(self.get(MEMORY))

    def describe(self) -> str:
        """For messages: ``"cores=8, memory=16 GiB, gpus=1, licence=1"``."""
        return _describe(dict(self.amounts), only_present=True)

    def to_wire(self) -> list[list[str | float]]:
        """JSON- and pickle-safe form: ``[[name, amount], ...]``."""
        return [[name, v] for name, v in self.amounts]

    @classmethod
    def from_wire(cls, obj: object) -> Request:
        """The Request of ``to_wire``'s form; ValueError naming anything malformed."""
        if not isinstance(obj, list | tuple):
            raise ValueError(f"a wire Request must be a list of [name, amount], got {obj!r}")
        if not obj:
            raise ValueError("a wire Request must not be empty")
        if len(obj) > _MAX_CUSTOM + len(_BUILTIN):
            raise ValueError(f"a wire Request has too many amounts: {len(obj)}")
        found: dict[str, float] = {}
        for pair in obj:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(f"a wire Request's item must be [name, amount], got {pair!r}")
            name, v = pair
            _check_name(name, "a wire Request")
            assert isinstance(name, str)
            if name in found:
                raise ValueError(f"a wire Request names {name!r} twice")
            found[name] = _wire_number(
                v, f"a wire Request's {name!r}", positive=True, whole=name in _WHOLE
            )
        return cls(tuple(sorted(found.items())))


def _describe(amounts: Mapping[str, float], *, only_present: bool) -> str:
    """``"cores=8, memory=16 GiB, gpus=1, licence=1"``: built-ins first, then by name."""
    parts = []
    for name in _BUILTIN:
        if name in amounts and (amounts[name] or not only_present):
            parts.append(f"{name}={_fmt_amount(name, amounts[name])}")
    for name in sorted(n for n in amounts if n not in _WHOLE):
        parts.append(f"{name}={_fmt_number(amounts[name])}")
    return ", ".join(parts)


# -------------------------------------------------------------------- detection


def _detect_cpus() -> tuple[int, tuple[int, ...]]:
    """(usable cores, CPU ids of this process's affinity mask, empty if unknown)."""
    try:
        ids = tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1), ()
    return max(1, len(ids)), ids


def _mem_total() -> int:
    """MemTotal of /proc/meminfo in bytes (or the page count times the page size)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    fields = line.split()
                    scale = 1024 if len(fields) > 2 and fields[2].lower() == "kb" else 1
                    return int(fields[1]) * scale
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def _read_limit(path: Path) -> int | None:
    """A cgroup memory limit file's number; None for 'max', absent or unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # "max": no limit at this level


def _cgroup_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors, if any."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    candidates: list[Path] = []
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        rel = rel.lstrip("/")
        if hier == "0" and controllers == "":
            base, leaf = root, "memory.max"  # cgroup v2
        elif "memory" in controllers.split(","):
            base, leaf = root / "memory", "memory.limit_in_bytes"  # cgroup v1
        else:
            continue
        # the limit may sit on any ancestor; in a container the path inside
        # /proc/self/cgroup may not exist under the mount, so the mount's own
        # root file counts too
        here = base / rel if rel else base
        while True:
            candidates.append(here / leaf)
            if here == base or base not in here.parents:
                break
            here = here.parent
        candidates.append(base / leaf)
    limits = [x for x in (_read_limit(p) for p in dict.fromkeys(candidates)) if x is not None]
    return min(limits) if limits else None


def _detect_memory() -> int:
    """Bytes this process may use: a real cgroup limit if below MemTotal, else MemTotal."""
    total = _mem_total()
    limit = _cgroup_limit()
    # cgroup v1 writes "no limit" as a huge number, so any limit >= MemTotal is none
    if limit is not None and limit > 0 and (total == 0 or limit < total):
        return limit
    return total


def _id_list(text: str) -> tuple[str, ...]:
    """GPU ids of a CUDA_VISIBLE_DEVICES-style list: CUDA stops at the first '-1'."""
    text = text.strip()
    if text in ("", "-1", "NoDevFiles"):
        return ()
    ids: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item or item == "-1":
            break
        ids.append(item)
    return tuple(dict.fromkeys(ids))


def _detect_gpu_ids() -> tuple[str, ...]:
    """ASYNC_WF_GPUS, else CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``, else none."""
    for var in ("ASYNC_WF_GPUS", "CUDA_VISIBLE_DEVICES"):
        text = os.environ.get(var)
        if text is not None:
            return _id_list(text)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "-L"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return ()
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return tuple(str(i) for i in range(n))


def _check_gpu_ids(ids: Sequence[object], what: str) -> tuple[str, ...]:
    if len(ids) > _MAX_GPU_IDS:
        raise ValueError(f"{what}: at most {_MAX_GPU_IDS} GPU ids, got {len(ids)}")
    for i in ids:
        if not isinstance(i, str) or not i or "," in i or len(i) > _MAX_GPU_ID_LEN:
            raise ValueError(
                f"{what}: a GPU id must be a non-empty str of at most {_MAX_GPU_ID_LEN} "
                f"characters without ',', got {i!r}"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what}: GPU ids must be unique, got {list(ids)!r}")
    return tuple(i for i in ids if isinstance(i, str))


def _check_cpu_ids(ids: Sequence[object], what: str) -> tuple[int, ...]:
    if len(ids) > _MAX_CPU_IDS:
        raise ValueError(f"{what}: at most {_MAX_CPU_IDS} CPU ids, got {len(ids)}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{what}: a CPU id must be an int >= 0, got {i!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what}: CPU ids must be unique, got {list(ids)!r}")
    return tuple(i for i in ids if isinstance(i, int))


# -------------------------------------------------------------------- Declared


@dataclass(frozen=True, slots=True)
class Declared:
    """What a worker (or the application's process) has.

    ``amounts`` always holds cores (>= 1), memory (bytes) and gpus, plus any
    custom names; ``gpu_ids`` are as CUDA_VISIBLE_DEVICES would list them
    (one per GPU); ``cpu_ids`` are the CPUs tasks may be pinned to (at least
    ``cores`` of them, or empty when unknown: then nothing is pinned).
    """

    amounts: dict[str, float]
    gpu_ids: tuple[str, ...]
    cpu_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        a = self.amounts
        if not isinstance(a, dict):
            raise ValueError(f"Declared amounts must be a dict, got {a!r}")
        for name in _BUILTIN:
            if name not in a:
                raise ValueError(f"Declared amounts lack {name!r}: {a!r}")
        custom = 0
        for name, v in a.items():
            if name in _WHOLE:
                least = 1 if name == CORES else 0
                if isinstance(v, bool) or not isinstance(v, int) or v < least:
                    raise ValueError(f"Declared {name} must be an int >= {least}, got {v!r}")
            else:
                _check_custom_name(name, "Declared")
                _check_number(v, f"Declared {name!r}", positive=False)
                custom += 1
        if custom > _MAX_CUSTOM:
            raise ValueError(f"Declared may name at most {_MAX_CUSTOM} custom resources")
        if not isinstance(self.gpu_ids, tuple) or not isinstance(self.cpu_ids, tuple):
            raise ValueError("Declared gpu_ids and cpu_ids must be tuples")
        _check_gpu_ids(self.gpu_ids, "Declared")
        _check_cpu_ids(self.cpu_ids, "Declared")
        if len(self.gpu_ids) != a[GPUS]:
            raise ValueError(
                f"Declared gpus={_fmt_number(a[GPUS])} but {len(self.gpu_ids)} gpu_ids "
                f"{list(self.gpu_ids)!r}"
            )
        if self.cpu_ids and len(self.cpu_ids) < a[CORES]:
            raise ValueError(
                f"Declared cores={_fmt_number(a[CORES])} but only {len(self.cpu_ids)} "
                f"cpu_ids {list(self.cpu_ids)!r} (give at least that many, or none)"
            )

    @classmethod
    def detect(cls) -> Declared:
        """This machine, as this process sees it (affinity, cgroup limit, visible GPUs).

        GPUs: ASYNC_WF_GPUS if set (a comma list of ids, for tests with fake
        devices), else CUDA_VISIBLE_DEVICES if set, else ``nvidia-smi -L``
        (ids "0", "1", ...; any failure means none), else none.
        """
        return cls.build()

    @classmethod
    def build(
        cls,
        cores: int | None = None,
        memory: int | str | None = None,
        gpus: int | Sequence[str] | None = None,
        resources: Mapping[str, float] | str | None = None,
    ) -> Declared:
        """What a worker declares: the given parts, the others detected.

        ``gpus`` as an int takes the first n detected ids (or "0".."n-1" when
        fewer are detected); as a list (or a comma string) it gives the ids.
        ``resources`` is a mapping or the CLI form ``"licence=2,fpga=1"``.
        Raises TypeError/ValueError naming the rule and the value.
        """
        ncores, affinity = _detect_cpus()
        if cores is not None:
            ncores = _check_count(cores, "cores", least=1)
        # pinning needs one CPU per declared core; declaring more cores than
        # the mask holds means the ids cannot be honoured, so none are given
        cpu_ids = affinity if len(affinity) >= ncores else ()
        nbytes = _detect_memory() if memory is None else parse_memory(memory)
        gpu_ids: tuple[str, ...]
        if gpus is None:
            gpu_ids = _detect_gpu_ids()
        elif isinstance(gpus, str):
            gpu_ids = _check_gpu_ids(_id_list(gpus), "gpus")
        elif isinstance(gpus, int) and not isinstance(gpus, bool):
            n = _check_count(gpus, "gpus", least=0)
            found = _detect_gpu_ids() if n else ()
            gpu_ids = found[:n] if len(found) >= n else tuple(str(i) for i in range(n))
        elif isinstance(gpus, Sequence):
            gpu_ids = _check_gpu_ids(list(gpus), "gpus")
        else:
            raise TypeError(f"gpus must be an int >= 0 or a list of GPU ids, got {gpus!r}")
        amounts: dict[str, float] = {CORES: ncores, MEMORY: nbytes, GPUS: len(gpu_ids)}
        if isinstance(resources, str):
            resources = parse_resource_list(resources)
        if resources is not None:
            if not isinstance(resources, Mapping):
                raise TypeError(
                    f"resources must be a mapping or 'name=amount,...', got {resources!r}"
                )
            for name, v in resources.items():
                _check_custom_name(name, "resources")
                amounts[name] = _check_number(v, f"resources[{name!r}]", positive=False)
        return cls(amounts, gpu_ids, cpu_ids)

    def fits(self, req: Request) -> bool:
        """Whether ``req`` could ever run here (against the total amounts)."""
        a = self.amounts
        return all(a.get(name, 0) + _TOL >= v for name, v in req.amounts)

    def shortfall(self, req: Request) -> str:
        """What of ``req`` exceeds the totals, e.g. ``"gpus=2 > 1"``; "" when it fits."""
        parts = []
        for name, v in req.amounts:
            have = self.amounts.get(name, 0)
            if have + _TOL < v:
                parts.append(f"{name}={_fmt_amount(name, v)} > {_fmt_amount(name, have)}")
        return ", ".join(parts)

    def describe(self) -> str:
        """For messages: ``"cores=32, memory=120 GiB, gpus=4, licence=2"``."""
        return _describe(self.amounts, only_present=False)

    def to_wire(self) -> dict[str, object]:
        """JSON-safe form: ``{"amounts": {...}, "gpu_ids": [...], "cpu_ids": [...]}``."""
        return {
            "amounts": dict(self.amounts),
            "gpu_ids": list(self.gpu_ids),
            "cpu_ids": list(self.cpu_ids),
        }

    @classmethod
    def from_wire(cls, obj: object) -> Declared:
        """The Declared of ``to_wire``'s form, checked strictly: it comes from a peer.

        Raises ValueError naming what is wrong.
        """
        if not isinstance(obj, dict):
            raise ValueError(f"a wire Declared must be a dict, got {type(obj).__name__}")
        keys = {"amounts", "gpu_ids", "cpu_ids"}
        unknown = sorted(repr(k) for k in obj if k not in keys)
        if unknown:
            raise ValueError(f"a wire Declared has unknown keys: {', '.join(unknown)}")
        missing = sorted(k for k in keys if k not in obj)
        if missing:
            raise ValueError(f"a wire Declared lacks keys: {', '.join(missing)}")
        raw = obj["amounts"]
        if not isinstance(raw, dict):
            raise ValueError(f"a wire Declared's amounts must be a dict, got {raw!r}")
        if len(raw) > _MAX_CUSTOM + len(_BUILTIN):
            raise ValueError(
                f"a wire Declared may name at most {_MAX_CUSTOM} custom resources, "
                f"got {len(raw)} names"
            )
        amounts: dict[str, float] = {}
        for name, v in raw.items():
            _check_name(name, "a wire Declared")
            assert isinstance(name, str)
            amounts[name] = _wire_number(
                v, f"a wire Declared's {name!r}", positive=False, whole=name in _WHOLE
            )
        gpu_ids, cpu_ids = obj["gpu_ids"], obj["cpu_ids"]
        if not isinstance(gpu_ids, list):
            raise ValueError(f"a wire Declared's gpu_ids must be a list of str, got {gpu_ids!r}")
        if not isinstance(cpu_ids, list):
            raise ValueError(f"a wire Declared's cpu_ids must be a list of int, got {cpu_ids!r}")
        return cls(
            amounts,
            _check_gpu_ids(gpu_ids, "a wire Declared"),
            _check_cpu_ids(cpu_ids, "a wire Declared"),
        )


# ------------------------------------------------------------ Grant, Allocator


@dataclass(frozen=True, slots=True)
class Grant:
    """What one attempt got: the request and the concrete devices.

    ``cpu_ids`` holds ``request.cores`` CPUs to pin to, or is empty when the
    worker does not know its CPU ids (or the request asks no cores).
    """

    request: Request
    gpu_ids: tuple[str, ...]
    cpu_ids: tuple[int, ...]


class Allocator:
    """Thread-safe bookkeeping of a worker's free resources (a lock inside).

    Amounts are taken all or nothing; GPU and CPU ids go out lowest first (in
    the declared order) and are never handed to two live grants at once.
    """

    __slots__ = ("_cpu_index", "_declared", "_free", "_free_cpus", "_free_gpus", "_gpu_index",
                 "_lock")

    def __init__(self, declared: Declared) -> None:
        self._declared = declared
        self._lock = threading.Lock()
        self._gpu_index = {g: i for i, g in enumerate(declared.gpu_ids)}
        self._cpu_index = {c: i for i, c in enumerate(declared.cpu_ids)}
        self._free: dict[str, float] = dict(declared.amounts)
        # one flag per declared id, in declared order: "lowest" is the first free
        self._free_gpus = [True] * len(declared.gpu_ids)
        self._free_cpus = [True] * len(declared.cpu_ids)

    def try_take(self, req: Request) -> Grant | None:
        """A Grant for ``req`` if all of it is free now, else None (nothing taken)."""
        d = self._declared
        with self._lock:
            free = self._free
            for name, v in req.amounts:
                if free.get(name, 0) + _TOL < v:
                    return None
            for name, v in req.amounts:
                left = free[name] - v
                free[name] = 0 if left < _TOL else left
            gpu_ids = _pick(self._free_gpus, d.gpu_ids, req.gpus)
            cpu_ids = _pick(self._free_cpus, d.cpu_ids, req.cores) if d.cpu_ids else ()
        return Grant(req, gpu_ids, cpu_ids)

    def give(self, grant: Grant) -> None:
        """Return a Grant's resources; ValueError (nothing changed) if that exceeds the totals."""
        d = self._declared
        req = grant.request
        # ids and amounts must agree, or the free ids would drift from the free counts
        want_cpus = req.cores if d.cpu_ids else 0
        if len(grant.gpu_ids) != req.gpus or len(grant.cpu_ids) != want_cpus:
            raise ValueError(
                f"giving back a grant whose ids do not match its request: {req.describe()} "
                f"with gpu_ids {list(grant.gpu_ids)!r}, cpu_ids {list(grant.cpu_ids)!r}"
            )
        with self._lock:
            free = self._free
            back: dict[str, float] = {}
            for name, v in grant.request.amounts:
                total = d.amounts.get(name, 0)
                now = free.get(name, 0) + v
                if now > total + _TOL:
                    raise ValueError(
                        f"giving back {grant.request.describe()} would make {name} "
                        f"{_fmt_amount(name, now)} free of {_fmt_amount(name, total)} declared"
                    )
                # snap to the total so that float sums do not drift over many returns
                back[name] = total if now > total - _TOL else now
            gi = _indices(grant.gpu_ids, self._gpu_index, self._free_gpus, "GPU")
            ci = _indices(grant.cpu_ids, self._cpu_index, self._free_cpus, "CPU")
            free.update(back)
            for i in gi:
                self._free_gpus[i] = True
            for i in ci:
                self._free_cpus[i] = True

    def free(self) -> dict[str, float]:
        """A snapshot of the free amounts."""
        with self._lock:
            return dict(self._free)

    def used_cores(self) -> int:
        """Cores held by live grants."""
        with self._lock:
            return round(self._declared.amounts[CORES] - self._free[CORES])


def _pick(flags: list[bool], ids: tuple[_Id, ...], n: int) -> tuple[_Id, ...]:
    """Mark the first ``n`` free ids taken and return them (the caller holds the lock)."""
    out: list[_Id] = []
    for i, is_free in enumerate(flags):
        if len(out) == n:
            break
        if is_free:
            flags[i] = False
            out.append(ids[i])
    return tuple(out)


def _indices(
    ids: Sequence[_Id], index: Mapping[_Id, int], flags: list[bool], what: str
) -> list[int]:
    """Positions of ids being given back; ValueError for unknown or already free ones."""
    out: list[int] = []
    for x in ids:
        i = index.get(x)
        if i is None:
            raise ValueError(f"giving back the {what} id {x!r}, which was never declared")
        if flags[i] or i in out:
            raise ValueError(f"giving back the {what} id {x!r}, which is not taken")
        out.append(i)
    return out


# ---------------------------------------------------------------------- Ledger


class Ledger:
    """Scheduler-side accounting of one worker: free amounts only, no ids.

    Single-threaded (the scheduler's loop), so no lock; ``free`` may be read
    directly. Ids are the worker's business: its Allocator picks them.
    """

    __slots__ = ("_total", "free")

    def __init__(self, declared: Declared) -> None:
        self._total = dict(declared.amounts)
        self.free: dict[str, float] = dict(declared.amounts)

    def fits_now(self, req: Request, extra_cores: int = 0) -> bool:
        """Whether ``req`` fits the free amounts, ``extra_cores`` more cores counted busy.

        ``extra_cores`` only matters to a request that asks for cores.
        """
        free = self.free
        for name, v in req.amounts:
            have = free.get(name, 0)
            if name == CORES:
                have -= extra_cores
            if have + _TOL < v:
                return False
        return True

    def take(self, req: Request) -> None:
        """Count ``req`` as running; ValueError (nothing changed) if it does not fit now."""
        free = self.free
        for name, v in req.amounts:
            if free.get(name, 0) + _TOL < v:
                raise ValueError(
                    f"taking {req.describe()}: only {_fmt_amount(name, free.get(name, 0))} "
                    f"of {name} free"
                )
        for name, v in req.amounts:
            left = free[name] - v
            free[name] = 0 if left < _TOL else left

    def give(self, req: Request) -> None:
        """Count ``req`` as finished; ValueError (nothing changed) beyond the totals."""
        free, total = self.free, self._total
        back: dict[str, float] = {}
        for name, v in req.amounts:
            cap = total.get(name, 0)
            now = free.get(name, 0) + v
            if now > cap + _TOL:
                raise ValueError(
                    f"giving back {req.describe()} would make {name} "
                    f"{_fmt_amount(name, now)} free of {_fmt_amount(name, cap)} declared"
                )
            back[name] = cap if now > cap - _TOL else now
        free.update(back)


# ------------------------------------------------------------- process set-up


def task_env(grant: Grant, base: Mapping[str, str], *, declared_gpus: int = 0) -> dict[str, str]:
    """The variables to add to ``base`` for a process running this attempt.

    A request with GPUs sees exactly its GPUs (GPU_VARS); one without sees
    none when the worker has GPUs (``declared_gpus`` > 0), so it cannot grab
    one it did not ask for. A request with cores sets the OMP_FAMILY thread
    counts to its cores, except those already set in ``base``: the user's
    choice wins. Threads share one environment, so this is for subprocesses.
    """
    env: dict[str, str] = {}
    req = grant.request
    if req.gpus > 0:
        env.update(dict.fromkeys(GPU_VARS, ",".join(grant.gpu_ids)))
    elif declared_gpus > 0:
        env.update(dict.fromkeys(GPU_VARS, ""))
    if req.cores > 0:
        env.update({v: str(req.cores) for v in OMP_FAMILY if v not in base})
    return env


def pin(cpu_ids: Sequence[int]) -> None:
    """Restrict the calling thread to ``cpu_ids``; a no-op if empty or unsupported here."""
    if not cpu_ids or not hasattr(os, "sched_setaffinity"):
        return
    os.sched_setaffinity(threading.get_native_id(), cpu_ids)


#: the most resource tasks that run at once in one process (each in a thread of
#: the pool that runs them, kept for the next ones)
RESOURCE_THREADS = 256


def pinned(fn: Callable[..., Any], cpus: Sequence[int]) -> Callable[..., Any]:
    """``fn`` made to run on ``cpus`` only: the calling thread is pinned for the call.

    The thread's own affinity comes back afterwards: the threads that run
    resource tasks are kept for the next ones, which may not ask to be pinned.
    """
    def call(*args: Any, **kwargs: Any) -> Any:
        before = os.sched_getaffinity(0)
        pin(cpus)
        try:
            return fn(*args, **kwargs)
        finally:
            os.sched_setaffinity(0, before)

    return call


def rank_resources(slots: int) -> Declared:
    """What an MPI worker rank declares: its slots as cores, no GPU, the machine's memory.

    Ranks do not tell the root what they have (they join without a
    handshake), so both sides derive it from the job's ``--slots``: a rank
    shares its node with others, and claiming the node's cores or GPUs
    would count them once per rank.
    """
    return Declared.build(cores=slots, gpus=0)
