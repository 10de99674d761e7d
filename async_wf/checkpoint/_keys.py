"""Deterministic, content-addressed keys of tasks for the checkpoint log.

A task's key is a 32-byte BLAKE2b digest of what decides its result: the
identity of its function and the content of its arguments. The same call in
another process, another run, another submission order or under another
``PYTHONHASHSEED`` gets the same key; a changed function body or a changed
argument gets another one.

Encoding
    Every value is first turned into a byte string that is *self-delimiting*
    (a one-byte type tag, then either a fixed-size field or a length and the
    content, containers giving their item count before the items). No
    encoding is therefore a prefix of another, and concatenating encodings
    is injective, which is what lets a container simply concatenate its
    items. The digest is taken once, over the whole encoding of a key, with
    a BLAKE2b personalisation string per kind of digest (value, function,
    task) that carries the version of this scheme: changing the encoding
    makes old keys unreachable (their tasks rerun) instead of ambiguous.

    The tag keeps types apart (``1``, ``1.0``, ``True``, ``"1"``, ``b"1"``,
    ``np.int64(1)`` all differ). Unordered containers (dict, set, frozenset)
    sort the encodings of their items, so neither insertion order nor the
    string hash seed shows. Large byte strings and array data are hashed on
    their own and enter the encoding as a digest, which keeps the encoding
    small without copying the data.

What is never done
    No key is ever made from ``id()``, ``repr()`` or ``hash()`` of an object:
    those differ between runs, and a key that differs between runs silently
    disables the checkpoint. An argument of a type not listed in
    ``stable_hash`` is an error (``CheckpointKeyError``) that names where the
    argument is and the way out.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import os
import stat
import struct
import sys
import time
import types
from collections.abc import Callable
from pathlib import PurePath
from typing import Any, NoReturn

from async_wf._extension import compiled

#: bump when any encoding below changes: old keys then simply never match
KEY_SCHEME = 1
_PERSON_VALUE = b"awf-value-%d" % KEY_SCHEME
_PERSON_FUNCTION = b"awf-func-%d" % KEY_SCHEME
_PERSON_TASK = b"awf-task-%d" % KEY_SCHEME
DIGEST_SIZE = 32

#: byte strings and array data at least this large are hashed on their own
_BIG = 1 << 12
#: FileRef contents are read in chunks of this size
FILE_CHUNK = 1 << 20
#: deeper nesting than this is refused (it is far beyond any real argument,
#: and well inside Python's recursion limit)
MAX_DEPTH = 128

_WAY_OUT = "give the task a key function (key=...) or declare it with @task(checkpoint=False)"

_U64 = struct.Struct("<Q").pack
_TAG_U64 = struct.Struct("<cQ").pack
_TAG_I64 = struct.Struct("<cq").pack
_TAG_F64 = struct.Struct("<cd").pack
_I64 = struct.Struct("<q").pack
_F64 = struct.Struct("<d").pack
_I64_MIN = -(1 << 63)
_I64_END = 1 << 63
# one NaN for all NaNs: their sign and payload bits vary with how they were
# made (0/0, inf-inf, np.nan, struct), and no Python code can tell them apart
_NAN = _F64(float("nan"))


# personalised hashers to copy: copying one costs half of configuring a new one
_VALUE_HASH = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_PERSON_VALUE)
_FUNCTION_HASH = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_PERSON_FUNCTION)
_TASK_HASH = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_PERSON_TASK)


def _digest(template: Any, data: bytes | bytearray) -> bytes:
    h = template.copy()
    h.update(data)
    return h.digest()  # type: ignore[no-any-return]


class CheckpointError(Exception):
    """Base class of the checkpoint errors.

    It lives here rather than with the log's errors in ``_format`` because
    this module depends on nothing else of the checkpoint package.
    """


class CheckpointKeyError(CheckpointError):
    """A task's key cannot be computed: an argument has no stable hash.

    The message names the argument and the path inside it, e.g.
    ``argument 'cfg' -> ['opts'][2]``, the type found there, and the way out.
    """


class _KeyFailure(Exception):
    """Raised inside the encoder; each container on the way up adds its path segment."""

    def __init__(self, reason: str, way_out: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.way_out = way_out
        self.path: list[str] = []  # innermost segment first

    def error(self, where: str) -> CheckpointKeyError:
        """The user-facing error; ``where`` names the top-level argument."""
        path = "".join(reversed(self.path))
        at = f"{where} -> {path}" if path else where
        tail = f"; {_WAY_OUT}" if self.way_out else ""
        return CheckpointKeyError(f"{at}: {self.reason}{tail}")


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _short(obj: Any) -> str:
    # for error messages only, never for keys
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__qualname__}>"
    return text if len(text) <= 40 else text[:37] + "..."


def _unsupported(obj: Any) -> NoReturn:
    raise _KeyFailure(f"a value of type {_type_name(type(obj))} has no stable hash")


# --------------------------------------------------------------------- FileRef
#: set once a file argument has been made: until then submit skips looking
#: for them, so programs that never use files pay nothing
files_in_use = [False]


def _check_by(by: str) -> None:
    if by not in ("content", "mtime"):
        raise ValueError(f"FileRef by must be 'content' or 'mtime', got {by!r}")


def _path_text(path: str | os.PathLike[str]) -> str:
    fs = os.fspath(path)
    if not isinstance(fs, str):
        raise TypeError(f"FileRef path must be a str path, got {type(fs).__name__}")
    return fs


class FileArg(os.PathLike[str]):
    """The base of the file arguments (``FileRef`` and its kinds, ``FileOut``): a path and a ``by``.

    Args:
        path: the file or directory.
        by: ``"content"`` or ``"mtime"``.

    Raises:
        ValueError: ``by`` is neither.
        TypeError: ``path`` is not a str or a str path object.
    """

    __slots__ = ("by", "path")

    def __init__(self, path: str | os.PathLike[str], by: str = "content") -> None:
        _check_by(by)
        self.path: str = _path_text(path)
        self.by: str = by
        files_in_use[0] = True

    def __fspath__(self) -> str:
        """The path, so that the task can use the argument as any path."""
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, by={self.by!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileArg):
            return NotImplemented
        return (type(self), self.path, self.by) == (type(other), other.path, other.by)

    def __hash__(self) -> int:
        return hash((type(self), self.path, self.by))

    def __reduce__(self) -> tuple[type[FileArg], tuple[str, str]]:
        return (type(self), (self.path, self.by))


class FileRef(FileArg):
    """A path argument whose key is the file's content, or its size and mtime.

    Pass ``FileRef("data.csv")`` instead of ``"data.csv"`` to a task: the task
    receives it as a path (``open(ref)``, ``Path(ref)`` and NumPy readers all
    take it, through ``__fspath__``), and the task's key changes when the
    file does.

    ``by="content"`` (default) hashes the file's bytes, read in 1 MiB chunks;
    the digest is kept for the rest of the process under the file's (path,
    device, inode, size, mtime, ctime), so a large input is read once per
    run (a file modified in the last two seconds is not kept: its mtime may
    not have ticked yet). The path itself is not part of the key: a moved
    or renamed copy of the same data gives the same key.
    ``by="mtime"`` uses the path, the size and the modification time in
    nanoseconds: cheap on huge files, but a rewrite that keeps size and
    mtime (rare; some copy tools preserve mtime) goes unnoticed, and a
    ``touch`` invalidates.

    A directory (a Zarr store, a directory of NetCDF files) stands for its
    whole tree: the relative path of every file and subdirectory, sorted,
    with each file's content digest (or its size and mtime with
    ``by="mtime"``). Symbolic links are followed to their targets' content.

    Args:
        path: the file.
        by: ``"content"`` or ``"mtime"``.

    Raises:
        ValueError: ``by`` is neither.
        TypeError: ``path`` is not a str or a str path object.
    """

    __slots__ = ()

    def digest(self) -> bytes:
        """The part of a key that stands for the file (32 bytes).

        Raises:
            OSError: the file cannot be read (or, by mtime, stat'ed).
        """
        st = os.stat(self.path)
        if stat.S_ISDIR(st.st_mode):
            return tree_digest(self.path, self.by)
        if self.by == "mtime":
            h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_PERSON_VALUE)
            h.update(b"mtime")
            _text_into(h, self.path)
            h.update(_U64(st.st_size))
            h.update(_I64(st.st_mtime_ns))
            return h.digest()
        return _content_digest(self.path, st)


class FileIn(FileRef):
    """A file or directory the task reads (PyCOMPSs' ``FILE_IN``/``DIRECTORY_IN``).

    A ``FileRef`` that says so: if an earlier task of the same runtime
    writes the path (``FileOut``/``FileInOut``), this task waits for it and
    its key takes that task's key in place of the content (which does not
    exist yet at submit); otherwise it is keyed by content (or ``by="mtime"``).
    A plain ``FileRef`` behaves the same.
    """

    __slots__ = ()


class FileInOut(FileRef):
    """A file or directory the task reads and rewrites (PyCOMPSs' ``FILE_INOUT``).

    The task waits for the path's previous writer and its readers, and is
    then the path's producer: tasks submitted later that take the path wait
    for it. Tasks that take one path as ``FileInOut`` therefore run one at a
    time, in submission order. Its key is the input's (as ``FileIn``) plus
    the path; with a checkpoint log the path's content after the task is
    recorded and checked before the result is reused.
    """

    __slots__ = ()


class FileOut(FileArg):
    """A file or directory the task writes (PyCOMPSs' ``FILE_OUT``/``DIRECTORY_OUT``).

    The path need not exist at submit. The task waits for the path's
    previous writer and for the tasks that read that version, then is its
    producer: later ``FileIn``/``FileInOut``/``FileRef`` arguments with the
    path wait for it. Its key holds the path (as written), not content.
    With a checkpoint log the path's content digest (or size and mtime with
    ``by="mtime"``; a directory's whole tree) is recorded when the task
    finishes, and a later run reuses the result only if the path still
    matches; otherwise the task runs again and rewrites it.

    Args:
        path: where the task writes.
        by: how the recorded output is checked: ``"content"`` or ``"mtime"``.

    Raises:
        ValueError: ``by`` is neither.
        TypeError: ``path`` is not a str or a str path object.
    """

    __slots__ = ()

    def digest(self) -> bytes:
        """The digest of what is at the path now, as ``FileRef(path, by).digest()``.

        Raises:
            OSError: nothing readable is there.
        """
        return FileRef(self.path, self.by).digest()


#: content digests of files, by (path, device, inode, size, mtime, ctime)
_CONTENT_CACHE: dict[tuple[str, int, int, int, int, int], bytes] = {}
_CONTENT_CACHE_MAX = 100_000
#: a file modified this recently (ns) may change again within its mtime tick
_RACY_NS = 2_000_000_000


def _text_into(h: Any, text: str) -> None:
    b = text.encode("utf-8", "surrogateescape")
    h.update(_U64(len(b)))
    h.update(b)


def _content_digest(path: str, st: os.stat_result) -> bytes:
    """The digest of a regular file's bytes, from the cache when its stat is unchanged."""
    ck = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    got = _CONTENT_CACHE.get(ck)
    if got is not None:
        return got
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_PERSON_VALUE)
    h.update(b"content")
    chunk = bytearray(FILE_CHUNK)
    view = memoryview(chunk)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            h.update(view[:n])
    digest = h.digest()
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        if len(_CONTENT_CACHE) >= _CONTENT_CACHE_MAX:
            _CONTENT_CACHE.clear()
        _CONTENT_CACHE[ck] = digest
    return digest


def tree_digest(root: str | os.PathLike[str], by: str = "content") -> bytes:
    """The digest of a directory tree: relative paths, and each file's content or stat.

    With ``by="content"`` the root's own path is not in it (a copy of the
    tree elsewhere gives the same digest); with ``by="mtime"`` it is, as for
    a single file.

    Raises:
        OSError: the tree cannot be walked, or a file in it cannot be read.
        ValueError: ``by`` is neither ``"content"`` nor ``"mtime"``.
    """
    if by not in ("content", "mtime"):
        raise ValueError(f"by must be 'content' or 'mtime', got {by!r}")
    top = os.fspath(root)
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_PERSON_VALUE)
    h.update(b"tree-" + by.encode())
    if by == "mtime":
        _text_into(h, top)
    entries: list[tuple[str, bool]] = []

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(top, onerror=fail):
        rel = os.path.relpath(dirpath, top)
        for name in dirnames:
            entries.append((os.path.normpath(os.path.join(rel, name)), True))
        for name in filenames:
            entries.append((os.path.normpath(os.path.join(rel, name)), False))
    entries.sort()
    h.update(_U64(len(entries)))
    for rel, is_dir in entries:
        _text_into(h, rel)
        if is_dir:
            h.update(b"/")
            continue
        full = os.path.join(top, rel)
        st = os.stat(full)
        if by == "mtime":
            h.update(b"m" + _U64(st.st_size))
            h.update(_I64(st.st_mtime_ns))
        else:
            h.update(b"c" + _content_digest(full, st))
    return h.digest()


# --------------------------------------------------------------------- encoder
Leaf = Callable[[Any], "bytes | None"]


class _Encoder:
    """Writes the self-delimiting encoding of values and functions into ``buf``."""

    __slots__ = ("active", "buf", "depth", "funcs", "leaf", "seen", "strict")

    def __init__(self, leaf: Leaf | None = None, strict: bool = False,
                 seen: KeyReport | None = None) -> None:
        self.buf = bytearray()
        self.leaf = leaf
        self.active: set[int] = set()  # ids of the mutable containers being encoded
        self.funcs: set[int] = set()  # ids of the functions being encoded
        self.depth = 0
        self.strict = strict  # a global without a stable hash is an error
        self.seen = seen  # where to note the globals read (explain)

    # ---- values
    def value(self, obj: Any) -> None:
        """Append the encoding of ``obj``."""
        if self.leaf is not None and self._leaf(obj):
            return
        # the commonest types first, without a handler call
        t = type(obj)
        if t is int:
            if _I64_MIN <= obj < _I64_END:
                self.buf += _TAG_I64(b"i", obj)
            else:
                _big_int(self, obj)
        elif t is str:
            b = obj.encode("utf-8", "surrogatepass")
            self.buf += _TAG_U64(b"s", len(b))
            self.buf += b
        elif t is float:
            self.buf += _TAG_F64(b"f", obj) if obj == obj else b"f" + _NAN
        else:
            handler = _EXACT.get(t)
            if handler is not None:
                handler(self, obj)
            else:
                self._other(obj)

    def _leaf(self, obj: Any) -> bool:
        assert self.leaf is not None
        sub = self.leaf(obj)
        if sub is None:
            return False
        if not isinstance(sub, bytes):
            raise TypeError(f"leaf must return bytes or None, got {type(sub).__name__}")
        self.buf += _TAG_U64(b"L", len(sub))
        self.buf += sub
        return True

    def sub(self, obj: Any) -> bytes:
        """The encoding of ``obj`` alone (for sorting the items of unordered containers)."""
        saved = self.buf
        self.buf = bytearray()
        try:
            self.value(obj)
            return bytes(self.buf)
        finally:
            self.buf = saved

    def enter(self, obj: Any, tracked: bool) -> None:
        """Account for descending into container ``obj``.

        Raises:
            _KeyFailure: ``obj`` is already being encoded (a cycle), or the
                nesting is deeper than ``MAX_DEPTH``.
        """
        if self.depth >= MAX_DEPTH:
            raise _KeyFailure(f"the value nests deeper than {MAX_DEPTH} levels", way_out=False)
        if tracked:
            if id(obj) in self.active:
                raise _KeyFailure(
                    f"the value of type {_type_name(type(obj))} contains itself "
                    "(a reference cycle)"
                )
            self.active.add(id(obj))
        self.depth += 1

    def leave(self, obj: Any, tracked: bool) -> None:
        """Undo ``enter``."""
        self.depth -= 1
        if tracked:
            self.active.discard(id(obj))

    def items(self, seq: Any, fmt: str) -> None:
        """Append the encodings of ``seq``'s items; ``fmt`` formats the path segment."""
        for i, item in enumerate(seq):
            try:
                self.value(item)
            except _KeyFailure as exc:
                exc.path.append(fmt.format(i))
                raise

    def _other(self, obj: Any) -> None:
        # subclasses and the types that need an isinstance test
        if isinstance(obj, enum.Enum):
            self.buf += b"m"
            self.text(_type_name(type(obj)))
            self.text(obj.name or "")  # a combination of flags may have no name
            self.soft(obj.value)
        elif isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
            _namedtuple(self, obj)
        elif _ecosystem(self, obj):
            pass
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            _dataclass(self, obj)
        elif (np := sys.modules.get("numpy")) is not None and _numpy(self, obj, np):
            pass
        elif isinstance(obj, PurePath):
            self.buf += b"p"
            self.text(str(obj))
        elif callable(obj):
            self.buf += b"F"
            self.function(obj)
        else:
            _unsupported(obj)

    def text(self, s: str) -> None:
        """Append a length-prefixed UTF-8 string (lone surrogates kept)."""
        b = s.encode("utf-8", "surrogatepass")
        self.buf += _U64(len(b))
        self.buf += b

    def blob(self, data: Any) -> None:
        """Append a length-prefixed byte string, or its digest when it is large."""
        # through a memoryview: ``bytearray += ndarray`` would be NumPy's add
        mv = memoryview(data)
        n = mv.nbytes
        if n >= _BIG:
            self.buf += b"H" + _U64(n)
            self.buf += hashlib.blake2b(mv, digest_size=DIGEST_SIZE).digest()
        else:
            self.buf += b"=" + _U64(n)
            self.buf += mv

    def soft(self, obj: Any) -> None:
        """Append ``obj``'s encoding, or only its type name when it has none.

        For values that are part of a function (defaults, closure cells):
        a logger or a lock there must not make the function unusable, and
        its type name is as deterministic as a value's content.
        """
        mark = len(self.buf)
        try:
            self.value(obj)
        except _KeyFailure:
            # the containers on the way restored depth and cycle tracking
            # in their finally clauses; only the partial bytes are left
            del self.buf[mark:]
            self.buf += b"u"
            self.text(_type_name(type(obj)))

    # ---- functions
    def function(self, fn: Any) -> None:
        """Append the encoding of a function's identity (see ``function_identity``)."""
        if id(fn) in self.funcs:
            # recursion through a closure, a global or a default: name it
            self.buf += b"r"
            self.text(_callable_name(fn))
            return
        self.funcs.add(id(fn))
        try:
            self._function(fn)
        finally:
            self.funcs.discard(id(fn))

    def _function(self, fn: Any) -> None:
        if isinstance(fn, types.FunctionType):
            self.buf += b"f"
            self.text(fn.__module__ or "")
            self.text(fn.__qualname__)
            self.buf += _code_digest(fn.__code__)
            # each default and each cell on its own: one value without a
            # stable hash must not hide the others
            defaults = fn.__defaults__ or ()
            self.buf += _TAG_U64(b"d", len(defaults))
            for value in defaults:
                self.soft(value)
            kwdefaults = fn.__kwdefaults__ or {}
            self.buf += _U64(len(kwdefaults))
            for name in sorted(kwdefaults):
                self.text(name)
                self.soft(kwdefaults[name])
            cells = fn.__closure__ or ()
            self.buf += b"c" + _U64(len(cells))
            for cell in cells:
                try:
                    contents = cell.cell_contents
                except ValueError:  # an empty cell: a free variable not yet bound
                    self.buf += b"0"
                    continue
                self.soft(contents)
            self._globals(fn)
        elif isinstance(fn, types.MethodType):
            owner = fn.__self__
            self.buf += b"M"
            self.function(fn.__func__)
            # the class's other methods too: self.helper() is no global
            if isinstance(owner, type):  # a classmethod
                self.function(owner)
            else:
                self.function(type(owner))
                self._instance(owner, fn)
        elif isinstance(fn, functools.partial):
            self.buf += b"P"
            self.function(fn.func)
            try:
                self.value(fn.args)
                self.value(fn.keywords)
            except _KeyFailure as exc:
                exc.path.append(f"functools.partial of {_callable_name(fn.func)}")
                raise
        elif isinstance(fn, types.BuiltinFunctionType):
            self.buf += b"B"
            self.text(_callable_name(fn))
            owner = fn.__self__
            if owner is not None and not isinstance(owner, types.ModuleType):
                self._instance(owner, fn)
        elif isinstance(fn, type):
            self._class(fn)
        elif callable(getattr(fn, "__wrapped__", None)):
            # @task, lru_cache and other wrapper objects: the function they wrap
            self.function(fn.__wrapped__)
        elif isinstance(getattr(fn, "__qualname__", None), str):
            # named C callables: ufuncs, method descriptors
            self.buf += b"N"
            self.text(_callable_name(fn))
        elif callable(fn):
            self.buf += b"O"
            self.text(_type_name(type(fn)))
            call = next(
                (c.__dict__["__call__"] for c in type(fn).__mro__ if "__call__" in c.__dict__),
                None,
            )
            if isinstance(call, types.FunctionType):
                self.function(call)
            self._instance(fn, fn)
        else:
            raise _KeyFailure(f"a value of type {_type_name(type(fn))} is not a function")

    def _class(self, cls: type) -> None:
        # its name, and the functions defined in it and in the bases of the
        # same module (what __init__ and the methods do); library bases are
        # left out, as library functions are
        self.buf += b"T"
        self.text(_type_name(cls))
        members = []
        for c in cls.__mro__:
            if c.__module__ != cls.__module__:
                continue
            for name, member in sorted(vars(c).items()):
                func = getattr(member, "__func__", member)  # static and class methods
                if isinstance(func, types.FunctionType):
                    members.append((f"{c.__qualname__}.{name}", func))
        self.buf += _U64(len(members))
        for name, func in members:
            self.text(name)
            self.function(func)

    def _instance(self, owner: Any, fn: Any) -> None:
        try:
            self.value(owner)
        except _KeyFailure as exc:
            raise _KeyFailure(
                f"{_callable_name(fn)} is bound to an instance of "
                f"{_type_name(type(owner))}, which has no stable hash ({exc.reason})"
            ) from None

    def _globals(self, fn: types.FunctionType) -> None:
        # Helper functions of the same module that the function names: a
        # change in a helper's body changes the function's identity too.
        # Functions of other modules (libraries) are left out: they change
        # with upgrades, not with the workflow's code.
        names = _global_names(fn.__code__)
        env = fn.__globals__
        found: list[tuple[str, Any]] = []
        for name in names:
            obj = env.get(name)
            target = obj
            plain = isinstance(obj, types.FunctionType | types.ModuleType | type)
            if obj is not None and not plain:
                # a wrapper (@task, lru_cache): its function; modules and
                # classes are not asked, a module's __getattr__ may import
                target = getattr(obj, "__wrapped__", None)
            if (
                isinstance(target, types.FunctionType | type)
                and getattr(target, "__module__", None) == fn.__module__
            ):
                found.append((name, target))
        self.buf += b"g" + _U64(len(found))
        for name, target in found:
            self.text(name)
            self.function(target)
        data = _global_values(names, env)
        if data:
            # only when there are some: the identity of a function that
            # reads no module-level value is what it was before they counted
            self._global_values(fn, data)

    def _global_values(self, fn: types.FunctionType, data: list[tuple[str, Any]]) -> None:
        self.buf += b"G" + _U64(len(data))
        owner = _callable_name(fn)
        for label, value in data:
            self.text(label)
            mark = len(self.buf)
            try:
                self.value(value)
            except _KeyFailure as exc:
                del self.buf[mark:]
                if self.strict:
                    raise _KeyFailure(
                        f"global {label!r} of {owner} is a {_kind(value)}, which has no "
                        f"stable hash ({exc.reason}); with strict=False it is left out of "
                        "the key (a change of it then reruns nothing)", way_out=False
                    ) from None
                # left out: its type only, as a default value without a hash
                self.buf += b"u"
                self.text(_type_name(type(value)))
                if self.seen is not None:
                    self.seen.left_out.append((owner, label, _kind(value)))
            else:
                if self.seen is not None:
                    self.seen.included.append((owner, label, _kind(value)))


#: how deep ``a.b.c.VALUE`` is followed from a module the code names
_MODULE_HOPS = 3


def _is_value(obj: Any) -> bool:
    """A module-level name that holds data rather than code (which counts by its code)."""
    return not (callable(obj) or isinstance(obj, types.ModuleType))


def _global_values(names: tuple[str, ...], env: dict[str, Any]) -> list[tuple[str, Any]]:
    """The module-level values that code looking up ``names`` in ``env`` may read.

    ``names`` are every global and attribute name the code uses, so for a
    module it names (``helper``) the attributes of that module among them
    (``helper.OFFSET``) are taken, following modules a few hops. A name
    read as an attribute of something else but also present in the module
    is taken too: that can only make the key change more often, never less.
    Sorted by label, so the order is the same in every run.
    """
    out: list[tuple[str, Any]] = []
    modules: list[tuple[str, types.ModuleType, int]] = []
    for name in names:
        if name not in env or name.startswith("__"):
            continue  # a builtin, or the module's own dunders (__file__ moves with the tree)
        obj = env[name]
        if isinstance(obj, types.ModuleType):
            modules.append((name, obj, 1))
        elif _is_value(obj):
            out.append((name, obj))
    visited = {id(m) for _, m, _ in modules}
    while modules:
        label, mod, hops = modules.pop()
        attrs = getattr(mod, "__dict__", {})
        for name in names:
            if name.startswith("__") or name not in attrs:
                continue
            obj = attrs[name]
            if isinstance(obj, types.ModuleType):
                if hops < _MODULE_HOPS and id(obj) not in visited:
                    visited.add(id(obj))
                    modules.append((f"{label}.{name}", obj, hops + 1))
            elif _is_value(obj):
                out.append((f"{label}.{name}", obj))
    out.sort(key=lambda item: item[0])
    return out


def _kind(obj: Any) -> str:
    """A value's type as a user writes it: ``int``, ``logging.Logger``."""
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else \
        f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass
class KeyReport:
    """What a function's identity sees (``explain``).

    ``included`` and ``left_out`` list ``(function, global, type)`` for the
    module-level values read by the function and by the same-module helpers
    it calls: included ones change the key when they change; left-out ones
    have no stable hash and do not.
    """

    function: str
    included: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left_out: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"the key of {self.function} sees its code, the code of the same-module "
                 "functions and classes it names, and these module-level values:"]
        lines += [f"  {g}  ({t}, read by {f})" for f, g, t in self.included] or ["  (none)"]
        if self.left_out:
            lines.append("left out (no stable hash: a change of them reruns nothing; "
                         "Checkpoint(strict=True) refuses them):")
            lines += [f"  {g}  ({t}, read by {f})" for f, g, t in self.left_out]
        return "\n".join(lines)


def _callable_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    if not isinstance(module, str):
        owner = getattr(fn, "__objclass__", None) or getattr(fn, "__self__", None)
        module = getattr(owner if isinstance(owner, type) else type(owner), "__module__", "")
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(qual, str):
        qual = type(fn).__qualname__
    return f"{module}:{qual}"


# ---- handlers of exact types
def _none(enc: _Encoder, obj: None) -> None:
    enc.buf += b"N"


def _bool(enc: _Encoder, obj: bool) -> None:
    enc.buf += b"T" if obj else b"F"


def _big_int(enc: _Encoder, obj: int) -> None:
    n = (obj.bit_length() + 8) // 8
    enc.buf += _TAG_U64(b"I", n)
    enc.buf += obj.to_bytes(n, "little", signed=True)


def _float_bits(x: float) -> bytes:
    # -0.0 keeps its own bits (copysign tells it from 0.0); every NaN is one
    return _NAN if x != x else _F64(x)


def _complex(enc: _Encoder, obj: complex) -> None:
    enc.buf += b"c" + _float_bits(obj.real) + _float_bits(obj.imag)


def _bytes(enc: _Encoder, obj: bytes) -> None:
    enc.buf += b"y"
    enc.blob(obj)


def _bytearray(enc: _Encoder, obj: bytearray) -> None:
    enc.buf += b"Y"
    enc.blob(obj)


def _seq(enc: _Encoder, obj: list[Any] | tuple[Any, ...], tag: bytes, tracked: bool) -> None:
    # enter() and leave() inlined: this is the hot path of argument tuples
    if enc.depth >= MAX_DEPTH or (tracked and id(obj) in enc.active):
        enc.enter(obj, tracked)  # raises the right error
    if tracked:
        enc.active.add(id(obj))
    enc.depth += 1
    enc.buf += _TAG_U64(tag, len(obj))
    value = enc.value
    i = 0
    try:
        for i, item in enumerate(obj):  # noqa: B007 - i names the failing item
            value(item)
    except _KeyFailure as exc:
        exc.path.append(f"[{i}]")
        raise
    finally:
        enc.depth -= 1
        if tracked:
            enc.active.discard(id(obj))


def _tuple(enc: _Encoder, obj: tuple[Any, ...]) -> None:
    # a tuple cannot be part of a cycle unless a list or dict inside it is,
    # and those are tracked
    _seq(enc, obj, b"t", False)


def _list(enc: _Encoder, obj: list[Any]) -> None:
    _seq(enc, obj, b"l", True)


def _dict(enc: _Encoder, obj: dict[Any, Any]) -> None:
    enc.enter(obj, True)
    try:
        pairs = []
        for k, v in obj.items():
            try:
                kb = enc.sub(k)
            except _KeyFailure as exc:
                exc.path.append(f"<key {_short(k)}>")
                raise
            try:
                vb = enc.sub(v)
            except _KeyFailure as exc:
                exc.path.append(f"[{_short(k)}]")
                raise
            pairs.append(kb + vb)
        # key encodings are prefix-free, so sorting key+value sorts by key
        pairs.sort()
        enc.buf += b"D" + _U64(len(pairs))
        enc.buf += b"".join(pairs)
    finally:
        enc.leave(obj, True)


def _set(enc: _Encoder, obj: set[Any] | frozenset[Any], tag: bytes) -> None:
    enc.enter(obj, False)
    try:
        parts = []
        for item in obj:
            try:
                parts.append(enc.sub(item))
            except _KeyFailure as exc:
                exc.path.append(f"{{{_short(item)}}}")
                raise
        parts.sort()
        enc.buf += tag + _U64(len(parts))
        enc.buf += b"".join(parts)
    finally:
        enc.leave(obj, False)


def _plain_set(enc: _Encoder, obj: set[Any]) -> None:
    _set(enc, obj, b"e")


def _frozenset(enc: _Encoder, obj: frozenset[Any]) -> None:
    _set(enc, obj, b"E")


def _namedtuple(enc: _Encoder, obj: Any) -> None:
    enc.enter(obj, False)
    try:
        fields = type(obj)._fields
        enc.buf += b"n"
        enc.text(_type_name(type(obj)))
        enc.buf += _U64(len(fields))
        for name, item in zip(fields, obj, strict=True):
            enc.text(name)
            try:
                enc.value(item)
            except _KeyFailure as exc:
                exc.path.append(f".{name}")
                raise
    finally:
        enc.leave(obj, False)


def _dataclass(enc: _Encoder, obj: Any) -> None:
    enc.enter(obj, True)
    try:
        fields = dataclasses.fields(obj)
        enc.buf += b"C"
        enc.text(_type_name(type(obj)))
        enc.buf += _U64(len(fields))
        for f in fields:
            enc.text(f.name)
            try:
                enc.value(getattr(obj, f.name))
            except _KeyFailure as exc:
                exc.path.append(f".{f.name}")
                raise
    finally:
        enc.leave(obj, True)


def _numpy(enc: _Encoder, obj: Any, np: Any) -> bool:
    """Encode NumPy arrays and scalars; False for anything else.

    NumPy is not imported here: an array argument means that it already
    is, and the checkpoint package then stays cheap to import (the
    ``async-wf`` command registers it, worker processes included).
    """
    if type(obj) is np.ndarray or type(obj) is np.memmap:
        _EXACT[np.ndarray] = _ndarray  # dispatched directly from now on
        _ndarray(enc, obj)
    elif isinstance(obj, np.generic):
        enc.buf += b"a"
        enc.text(_descr(obj.dtype))
        enc.blob(obj.tobytes())
    else:
        return False
    return True


def _descr(dtype: Any) -> str:
    # the .npy header's description: '<f8', or a list of fields for records
    from numpy.lib.format import dtype_to_descr

    return str(dtype_to_descr(dtype))


def _ndarray(enc: _Encoder, obj: Any) -> None:
    import numpy as np

    enc.buf += b"A"
    enc.text(_descr(obj.dtype))
    enc.buf += _U64(obj.ndim)
    for n in obj.shape:
        enc.buf += _U64(n)
    if obj.dtype.hasobject:
        # the memory of an object array holds pointers: hash the elements
        enc.enter(obj, True)
        try:
            enc.items(obj.ravel(order="C"), "[flat {}]")
        finally:
            enc.leave(obj, True)
        return
    # a C-contiguous array is hashed from its own memory; others are copied
    # once into C order, which is what makes two layouts of equal arrays agree
    data = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
    enc.blob(data.reshape(-1).view(np.uint8))


#: libraries whose objects dask.base.tokenize keys by content
_TOKENIZED = frozenset({"xarray", "pandas", "dask"})


def _ecosystem(enc: _Encoder, obj: Any) -> bool:
    """Encode a Zarr, xarray, pandas or dask object, or anything with ``__dask_tokenize__``.

    Returns False for other objects. Zarr arrays and groups are keyed by the
    content of their directory in a local store, not by dask's token, which
    names the store and would not change when chunks are rewritten in place.
    """
    cls = type(obj)
    root = getattr(cls, "__module__", "").partition(".")[0]
    if root == "zarr":
        _zarr(enc, obj)
        return True
    if root not in _TOKENIZED and not hasattr(cls, "__dask_tokenize__"):
        return False
    try:
        import dask
        from dask.base import tokenize
    except ImportError:
        raise _KeyFailure(
            f"a value of type {_type_name(cls)} is keyed by dask.base.tokenize, and dask "
            "is not installed (pip install dask)"
        ) from None
    try:
        # without this, dask falls back to a random token for what it cannot
        # hash, which would be a new key in every run
        with dask.config.set({"tokenize.ensure-deterministic": True}):
            token = tokenize(obj)
    except Exception as exc:
        raise _KeyFailure(
            f"dask cannot give a value of type {_type_name(cls)} a deterministic token "
            f"({type(exc).__name__}: {exc})"
        ) from None
    enc.buf += b"D"
    enc.text(_type_name(cls))
    enc.text(str(token))
    return True


def _zarr(enc: _Encoder, obj: Any) -> None:
    store = getattr(obj, "store", None)
    top = getattr(store, "root", None) or getattr(store, "path", None)  # zarr 3, zarr 2
    node = getattr(obj, "path", "") or ""
    if top is None or not os.path.isdir(os.path.join(os.fspath(top), node)):
        raise _KeyFailure(
            f"a {_type_name(type(obj))} that is not in a local directory store has no "
            "stable hash (its content cannot be read cheaply)"
        )
    try:
        digest = tree_digest(os.path.join(os.fspath(top), node))
    except OSError as exc:
        raise _KeyFailure(f"the zarr store {os.fspath(top)!r} cannot be read: {exc}",
                          way_out=False) from None
    enc.buf += b"Z"
    enc.text(_type_name(type(obj)))
    enc.text(node)
    enc.buf += digest


def _plain_function(enc: _Encoder, obj: types.FunctionType) -> None:
    enc.buf += b"F"
    enc.function(obj)


def _fileref(enc: _Encoder, obj: FileRef) -> None:
    try:
        digest = obj.digest()
    except OSError as exc:
        raise _KeyFailure(
            f"{obj!r} cannot be read: {exc.strerror or exc}", way_out=False
        ) from None
    enc.buf += b"R"
    enc.text(obj.by)
    enc.buf += digest


def _fileinout(enc: _Encoder, obj: FileInOut) -> None:
    _fileref(enc, obj)  # FileIn encodes as FileRef: the same input, the same key
    enc.buf += b"X"
    enc.text(obj.path)


def _fileout(enc: _Encoder, obj: FileOut) -> None:
    enc.buf += b"O"
    enc.text(obj.by)
    enc.text(obj.path)


_EXACT: dict[type, Callable[[_Encoder, Any], None]] = {
    type(None): _none,
    bool: _bool,
    complex: _complex,
    bytes: _bytes,
    bytearray: _bytearray,
    tuple: _tuple,
    list: _list,
    dict: _dict,
    set: _plain_set,
    frozenset: _frozenset,
    FileRef: _fileref,
    FileIn: _fileref,
    FileInOut: _fileinout,
    FileOut: _fileout,
    types.FunctionType: _plain_function,
}


# ------------------------------------------------------------------ code hash
@functools.lru_cache(maxsize=4096)
def _code_digest(code: types.CodeType) -> bytes:
    """A digest of what a code object does, not of where it sits in its file.

    Line numbers, column positions and the file name are left out, so moving
    a function (or editing a comment above it) keeps its identity; the
    bytecode, the constants (nested code objects included), the names, the
    argument counts, the flags and the exception table are in.
    """
    enc = _Encoder()
    buf = enc.buf
    buf += _U64(len(code.co_code))
    buf += code.co_code
    exc_table = getattr(code, "co_exceptiontable", b"")
    buf += _U64(len(exc_table))
    buf += exc_table
    for n in (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags):
        buf += _U64(n)
    for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        enc.value(names)
    buf += _U64(len(code.co_consts))
    for const in code.co_consts:
        _const(enc, const)
    return _digest(_FUNCTION_HASH, buf)


def _const(enc: _Encoder, const: Any) -> None:
    if isinstance(const, types.CodeType):
        enc.buf += b"K" + _code_digest(const)
    elif const is Ellipsis:
        enc.buf += b"."
    elif isinstance(const, tuple):
        enc.buf += b"t" + _U64(len(const))
        for item in const:
            _const(enc, item)
    else:
        # None, numbers, str, bytes, frozensets: the order of a frozenset
        # constant varies with the string hash seed, its encoding does not
        enc.value(const)


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The names a code object and the code nested in it look up, sorted."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


# ------------------------------------------------------------------ public API
def explain(fn: Callable[..., Any], version: str | None = None) -> KeyReport:
    """What the identity of ``fn`` sees: the module-level values in it and those left out.

    ``str()`` of the report is a readable listing (``async-wf checkpoint
    explain`` prints it).

    Raises:
        CheckpointKeyError: as ``function_identity``.
    """
    report = KeyReport(_callable_name(fn))
    _identity(fn, version, False, report)
    return report


def function_identity(fn: Callable[..., Any], version: str | None = None,
                      strict: bool = False) -> bytes:
    """The 32-byte identity of a task's function: what its results depend on.

    It combines the module and qualified name with a digest of the code
    object that is the same in every process and run (bytecode, constants
    including nested code objects, names, flags; not line numbers), the
    default values, the values of closure cells, the functions and classes
    of the same module that the code names (recursively, so a changed
    helper invalidates its callers; a class stands for the functions
    defined in it and in its same-module bases), and ``version``.

    - ``functools.partial``: the wrapped function plus the bound arguments
      (which must have a stable hash, like any argument).
    - Bound methods: the function, the class (as above, so the other
      methods it calls through ``self`` count) and the instance's stable
      hash; an instance without one is an error. Class methods: the class.
    - Classes: as above.
    - Wrappers with ``__wrapped__`` (``@task``, ``functools.lru_cache``): the
      wrapped function, so the identity does not depend on how it is reached.
    - Builtins, ufuncs and other C callables: their module and name.
    - Other callable objects: their class's name, its ``__call__`` and the
      instance's stable hash.

    Module-level values that the code reads (``SCALE``, ``TABLE["a"]``,
    ``helper.OFFSET`` in an imported module, ``sys.argv``) are in, by
    content, as arguments are: a change of them changes the identity. They
    are read when the identity is computed (once per function per run).

    Default, closure and global values without a stable hash (a logger, a
    lock, a client) contribute their type's name only; a change of such a
    value does not change the identity (``explain`` lists them; ``strict``
    makes them an error). Nor does code of other modules (libraries), what
    C extensions keep, files read by name or environment variables: use
    ``version``, ``FileRef`` arguments or ``key=`` for those.

    Args:
        fn: the task's function.
        version: the task's ``version`` option; changing it invalidates by hand.
        strict: a module-level value without a stable hash is an error
            rather than left out.

    Raises:
        CheckpointKeyError: ``fn`` is bound to an instance, or a partial holds
            arguments, that have no stable hash; ``fn`` is not callable; or,
            with ``strict``, a global it reads has no stable hash.
    """
    return _identity(fn, version, strict, None)


def _identity(fn: Callable[..., Any], version: str | None, strict: bool,
              seen: KeyReport | None) -> bytes:
    enc = _Encoder(strict=strict, seen=seen)
    try:
        enc.function(fn)
    except _KeyFailure as exc:
        raise exc.error(f"function {_callable_name(fn)}") from None
    except RecursionError:
        raise CheckpointKeyError(
            f"function {_callable_name(fn)}: its helpers and closures nest too deeply"
        ) from None
    if version is None:
        enc.buf += b"v0"
    else:
        enc.buf += b"v1"
        enc.text(version)
    return _digest(_FUNCTION_HASH, enc.buf)


def stable_hash(value: Any) -> bytes:
    """The 32-byte content hash of a plain value, the same in every process and run.

    Supported: None, bool, int, float (``-0.0`` differs from ``0.0``; all
    NaNs are equal), complex, str, bytes, bytearray; tuple, list, dict (key
    order does not matter), set and frozenset (element order does not
    matter); dataclass instances and named tuples (type name and fields);
    enum members (type name and member name); NumPy arrays (dtype, shape and
    data in C order; object arrays element by element) and NumPy scalars;
    ``pathlib`` paths (as their text, not the file); ``FileRef`` (the file's
    content, or its size and mtime); functions (their ``function_identity``).
    Values of different types differ: ``1``, ``1.0``, ``True`` and ``"1"``
    all hash differently, and so do ``[1]`` and ``(1,)``.

    Args:
        value: the value.

    Raises:
        CheckpointKeyError: something inside ``value`` has no stable hash
            (the message gives its path and type), ``value`` contains
            itself, or a ``FileRef`` in it cannot be read.
    """
    enc = _Encoder()
    _encode_top(enc, value, "value")
    return _digest(_VALUE_HASH, enc.buf)


def task_key(
    fn_identity: bytes,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaf: Leaf | None = None,
) -> bytes:
    """The 32-byte key of one call: function identity plus arguments.

    Keyword arguments are taken in name order, so their order in the call
    does not matter; an argument passed by keyword gives another key than
    the same argument passed by position.

    Args:
        fn_identity: ``function_identity`` of the task's function.
        args: positional arguments.
        kwargs: keyword arguments.
        leaf: called on every object before it is encoded, at any depth; if
            it returns bytes, those stand for the object and it is not
            looked into (the scheduler passes the key of an upstream
            future's task this way). ``None`` is the same as a function
            that always returns ``None``.

    Raises:
        CheckpointKeyError: an argument has no stable hash (the message names
            the argument, the path inside it, and the way out).
        TypeError: ``leaf`` returned something other than bytes or None.
    """
    if not kwargs and type(args) is tuple and type(fn_identity) is bytes:
        # (the compiled quick path takes exactly these types)
        key = _quick_key(fn_identity, args, leaf)
        if key is not None:
            return key
    enc = _Encoder(leaf)
    buf = enc.buf
    buf += _U64(len(fn_identity))
    buf += fn_identity
    buf += _U64(len(args))
    value = enc.value
    where: Any = 0
    try:
        for where, arg in enumerate(args):  # noqa: B007 - where names the failing argument
            value(arg)
        buf += _U64(len(kwargs))
        for where in sorted(kwargs):
            enc.text(where)
            value(kwargs[where])
    except _KeyFailure as exc:
        raise exc.error(f"argument {where!r}") from None
    except RecursionError:
        raise CheckpointKeyError(f"argument {where!r}: the value nests too deeply") from None
    return _digest(_TASK_HASH, buf)


_NO_KWARGS = _U64(0)


def _quick_key_py(fn_identity: bytes, args: tuple[Any, ...], leaf: Leaf | None) -> bytes | None:
    """``task_key`` of a call whose arguments are all plain scalars or leaves, or None.

    The commonest calls of fine-grained tasks (indices, names, upstream
    futures) skip the general encoder; the bytes hashed are the same as the
    encoder's, so the key does not depend on which path made it.
    """
    parts = [_U64(len(fn_identity)), fn_identity, _U64(len(args))]
    add = parts.append
    for a in args:
        if leaf is not None:
            sub = leaf(a)
            if sub is not None:
                if type(sub) is not bytes:
                    return None  # the general path raises the error
                add(_TAG_U64(b"L", len(sub)))
                add(sub)
                continue
        t = type(a)
        if t is int:
            if not _I64_MIN <= a < _I64_END:
                return None
            add(_TAG_I64(b"i", a))
        elif t is str:
            b = a.encode("utf-8", "surrogatepass")
            add(_TAG_U64(b"s", len(b)))
            add(b)
        elif t is float:
            add(_TAG_F64(b"f", a) if a == a else b"f" + _NAN)
        elif a is None:
            add(b"N")
        else:
            return None  # anything else takes the general path
    add(_NO_KWARGS)
    return _digest(_TASK_HASH, b"".join(parts))


def _check_compiled_key_hash(layout: dict[str, Any]) -> None:
    """Refuse a compiled extension that hashes task keys otherwise than this module.

    The compiled ``quick_key`` computes BLAKE2b itself, with its own copy of
    the personalisation and digest size of ``_TASK_HASH``; an extension built
    before a change of ``KEY_SCHEME`` would make keys no run of this code
    finds (every task would run again, silently).

    Raises:
        ImportError: a parameter differs or is missing; the message names each one.
    """
    ours = {"PERSON_TASK": _PERSON_TASK, "DIGEST_SIZE": DIGEST_SIZE}
    wrong = [f"{name}: compiled {layout.get(name)!r}, _keys.py {value!r}"
             for name, value in ours.items() if layout.get(name) != value]
    if wrong:
        raise ImportError(
            "async_wf._core was built for another task-key hash (" + "; ".join(wrong)
            + "); rebuild it (python setup.py build_ext --inplace, or reinstall async_wf)"
        )


_ext = compiled()
if _ext is not None:
    # an extension built before the hash was exported has none: it is refused too
    _check_compiled_key_hash(getattr(_ext, "KEY_LAYOUT", {}))
#: the compiled twin hashes the same bytes with its own BLAKE2b (same parameters)
_quick_key: Callable[[bytes, tuple[Any, ...], Leaf | None], bytes | None] = (
    _quick_key_py if _ext is None else _ext.quick_key
)


def _encode_top(enc: _Encoder, value: Any, where: str) -> None:
    try:
        enc.value(value)
    except _KeyFailure as exc:
        raise exc.error(where) from None
    except RecursionError:
        # only reachable through very deep function/closure chains: values
        # stop at MAX_DEPTH first
        raise CheckpointKeyError(f"{where}: the value nests too deeply") from None
