"""The compiled extension: the task core, and the checkpoint log's hot paths.

The one compilation unit of async_wf: this file includes readyq.pxi and
deptrack.pxi (the core), ckfast.pxi (the checkpoint log's per-task hot
paths, see its head; its CRC folds with crc32_clmul.h where the CPU can),
runner.pxi (the in-process runner's per-task loop) and wire.pxi (the wire
protocol's column test, per task sent).
``async_wf._extension.compiled()`` loads it for all four.

The core is a dependency tracker and ready queue over integer task handles.

The specification is the pure-Python twin ``async_wf._pycore``: same class,
same methods, same handle encoding (``generation << 32 | slot``), same
ready-queue policy and the same error messages; the test suite runs one set
of tests against both. This one keeps every task in C arrays indexed by slot
and every dependency edge in a pooled linked list, so the only Python objects
it makes are the handle ints it hands back.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_RECORDS_RO,
    PyBUF_SIMPLE,
    PyBuffer_IsContiguous,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport (
    PyLong_AsLongLongAndOverflow,
    PyLong_AsUnsignedLongLong,
    PyLong_Check,
    PyLong_FromUnsignedLongLong,
)
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset, strcmp

WAITING = 0
READY = 1
RUNNING = 2
FINISHED = 3
FAILED = 4
CANCELLED = 5
FORGOTTEN = -1

STATE_NAMES = ("waiting", "ready", "running", "finished", "failed", "cancelled")

cdef enum:
    _WAITING = 0
    _READY = 1
    _RUNNING = 2
    _FINISHED = 3
    _FAILED = 4
    _CANCELLED = 5
    _TERMINAL_MIN = 3
    # Internal only: a slot whose generation ran out; never reported.
    _RETIRED = 6

DEF _SLOT_BITS = 32
cdef uint64_t _SLOT_MASK = 0xFFFFFFFF
cdef Py_ssize_t _MAX_SLOTS = <Py_ssize_t>1 << 32
cdef uint32_t _GEN_LAST = 0xFFFFFFFF
cdef long long _INT32_MIN = -2147483648
cdef long long _INT32_MAX = 2147483647

include "readyq.pxi"
include "deptrack.pxi"
include "ckfast.pxi"
include "runner.pxi"
include "wire.pxi"


cdef int _get_int64_buffer(str name, object obj, Py_buffer* view) except -1:
    # Same acceptance rule and message as _pycore._int64_buffer.
    cdef bytes fmt
    try:
        PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO)
    except (TypeError, BufferError):
        raise TypeError(f"{name} must be a 1-D C-contiguous int64 buffer") from None
    fmt = view.format if view.format != NULL else b"B"
    if (view.ndim != 1 or view.itemsize != 8 or fmt not in _INT64_FORMATS
            or not PyBuffer_IsContiguous(view, b'C')):
        PyBuffer_Release(view)
        raise TypeError(f"{name} must be a 1-D C-contiguous int64 buffer")
    return 0


_INT64_FORMATS = frozenset((b"q", b"l", b"=q", b"=l", b"@q", b"@l"))


cdef class Core:
    """Dependency tracker and ready queue over integer task handles.

    Compiled implementation; see ``async_wf._pycore`` for the model.
    """

    def __cinit__(self):
        self._edge_free = -1
        # Everything else starts zeroed/NULL; arrays are allocated on demand.

    def __dealloc__(self):
        free(self._state)
        free(self._unmet)
        free(self._prio)
        free(self._gen)
        free(self._succ_head)
        free(self._succ_tail)
        free(self._free)
        free(self._edge_target)
        free(self._edge_next)
        free(self._fifo)
        free(self._heap)
        free(self._scratch)

    # ------------------------------------------------------------------ adding
    def add(self, inputs=(), priority=0):
        """Add one task and return its handle.

        Args:
            inputs: handles of the tasks whose results this task needs. An
                input that is finished, or finished and forgotten, counts as
                met. A repeated input counts once per occurrence.
            priority: higher runs first; a signed 32-bit integer.

        Raises:
            ValueError: an input handle was never issued, or has failed or
                been cancelled (the caller resolves such a task itself), or
                the priority is out of range.
        """
        return PyLong_FromUnsignedLongLong(_add_obj(self, inputs, priority))

    def add_many(self, inputs, priorities=None):
        """Add ``len(inputs)`` tasks; return their handles in order.

        ``inputs[i]`` lists the inputs of task i and may name handles
        returned earlier in the same call's result only if they were issued
        before the call; ``priorities`` defaults to all 0.

        Raises:
            ValueError: as for ``add``, or if the two sequences differ in length.
                Tasks before the offending one stay added.
        """
        cdef list out = []
        cdef Py_ssize_t i, n
        if priorities is not None and len(priorities) != len(inputs):
            raise ValueError(
                f"priorities must match inputs in length, got {len(priorities)} != {len(inputs)}"
            )
        if priorities is None:
            if type(inputs) is list:
                for inp in <list>inputs:
                    out.append(PyLong_FromUnsignedLongLong(_add_obj(self, inp, 0)))
            elif type(inputs) is tuple:
                for inp in <tuple>inputs:
                    out.append(PyLong_FromUnsignedLongLong(_add_obj(self, inp, 0)))
            else:
                for inp in inputs:
                    out.append(PyLong_FromUnsignedLongLong(_add_obj(self, inp, 0)))
        elif type(inputs) is list and type(priorities) is list:
            n = len(<list>inputs)
            for i in range(n):
                # Re-checked each round: an input iterable could mutate either list.
                if i >= len(<list>inputs) or i >= len(<list>priorities):
                    break
                out.append(PyLong_FromUnsignedLongLong(
                    _add_obj(self, (<list>inputs)[i], (<list>priorities)[i])))
        else:
            for inp, p in zip(inputs, priorities, strict=True):
                out.append(PyLong_FromUnsignedLongLong(_add_obj(self, inp, p)))
        return out

    def add_csr(self, indptr, indices, priorities=None):
        """Add tasks given in compressed sparse row form; return their handles.

        Task ``i`` of the batch has the inputs
        ``indices[indptr[i]:indptr[i + 1]]``. A value below ``2**32`` is a
        position in this batch and must be less than ``i``; any other value
        is a handle (handles are never below ``2**32``). So a whole DAG can
        be submitted in one call, linked to tasks added before it.

        Args:
            indptr: 1-D C-contiguous int64 buffer (e.g. a NumPy array) of
                ``n + 1`` non-decreasing offsets into ``indices``.
            indices: 1-D C-contiguous int64 buffer of batch positions and handles.
            priorities: optional int64 buffer of ``n`` priorities, default all 0.

        Raises:
            TypeError: an argument is not a 1-D C-contiguous int64 buffer.
            ValueError: as for ``add``; ``indptr`` is not valid offsets;
                ``priorities`` does not have ``n`` items; a batch position is
                not before the task naming it. Tasks before the offending one
                stay added.
        """
        cdef Py_buffer ptr_view, idx_view, prio_view
        cdef bint have_prio = priorities is not None
        _get_int64_buffer("indptr", indptr, &ptr_view)
        try:
            _get_int64_buffer("indices", indices, &idx_view)
            try:
                if have_prio:
                    _get_int64_buffer("priorities", priorities, &prio_view)
                try:
                    return _add_csr(
                        self,
                        <int64_t*>ptr_view.buf, ptr_view.shape[0],
                        <int64_t*>idx_view.buf, idx_view.shape[0],
                        <int64_t*>prio_view.buf if have_prio else NULL,
                        prio_view.shape[0] if have_prio else 0,
                    )
                finally:
                    if have_prio:
                        PyBuffer_Release(&prio_view)
            finally:
                PyBuffer_Release(&idx_view)
        finally:
            PyBuffer_Release(&ptr_view)

    # ------------------------------------------------------------- ready queue
    def pop(self, n):
        """Take up to ``n`` ready tasks, mark them RUNNING, return their handles.

        Highest priority first; FIFO among equal priorities.

        Raises:
            ValueError: ``n`` is negative.
        """
        cdef int overflow = 0
        cdef long long k
        if not PyLong_Check(n):
            n = PyNumber_Index(n)
        k = PyLong_AsLongLongAndOverflow(n, &overflow)
        if overflow < 0 or (overflow == 0 and k < 0):
            raise ValueError(f"n must be >= 0, got {n}")
        if overflow > 0 or k > self._nslots:
            # More than all held tasks: the same as asking for every one.
            k = self._nslots
        return _pop(self, <Py_ssize_t>k)

    def requeue(self, handle):
        """Put a RUNNING task back into the ready queue (retry, lost worker).

        It joins the back of its priority level.

        Raises:
            ValueError: the handle is unknown or the task is not running.
        """
        cdef Py_ssize_t slot = _slot(self, _as_handle(handle), handle)
        cdef uint8_t st = self._state[slot]
        if st != _RUNNING:
            raise ValueError(
                f"task {handle} is {STATE_NAMES[st]}; only a running task can be requeued"
            )
        _set_state(self, <uint32_t>slot, _READY)
        _push_ready(self, <uint32_t>slot)

    # -------------------------------------------------------------- finishing
    def finish(self, handle):
        """Mark one RUNNING task FINISHED; return the handles that became ready."""
        cdef list ready = []
        _finish_one(self, handle, ready)
        return ready

    def finish_many(self, handles):
        """Mark RUNNING tasks FINISHED; return the handles that became ready.

        The newly ready tasks are also in the ready queue for ``pop``.

        Raises:
            ValueError: a handle is unknown or its task is not running; the
                handles before it stay finished.
        """
        cdef list ready = []
        if type(handles) is list:
            for h in <list>handles:
                _finish_one(self, h, ready)
        elif type(handles) is tuple:
            for h in <tuple>handles:
                _finish_one(self, h, ready)
        else:
            for h in handles:
                _finish_one(self, h, ready)
        return ready

    def fail(self, handle, cancel_successors=False):
        """Mark a task FAILED and its successors, transitively, FAILED or CANCELLED.

        Args:
            handle: a task in any non-terminal state.
            cancel_successors: mark the successors CANCELLED instead of FAILED.

        Returns:
            The successors that were marked, in traversal order.

        Raises:
            ValueError: the handle is unknown or the task is already terminal.
        """
        cdef Py_ssize_t slot = _slot(self, _as_handle(handle), handle)
        cdef uint8_t st = self._state[slot]
        if st >= _TERMINAL_MIN:
            raise ValueError(f"task {handle} is {STATE_NAMES[st]}; it cannot fail")
        _set_state(self, <uint32_t>slot, _FAILED)
        return _cascade(self, <uint32_t>slot, _CANCELLED if cancel_successors else _FAILED)

    def cancel(self, handle):
        """Cancel a task that has not started, and its successors transitively.

        Returns:
            The successors that were cancelled.

        Raises:
            ValueError: the handle is unknown, or the task is running or terminal.
        """
        cdef Py_ssize_t slot = _slot(self, _as_handle(handle), handle)
        cdef uint8_t st = self._state[slot]
        if st > _READY:
            raise ValueError(
                f"task {handle} is {STATE_NAMES[st]}; only a waiting or ready task can be cancelled"
            )
        _set_state(self, <uint32_t>slot, _CANCELLED)
        return _cascade(self, <uint32_t>slot, _CANCELLED)

    # ---------------------------------------------------------------- memory
    def forget(self, handles):
        """Release the slots of terminal tasks so that memory stays bounded.

        A forgotten handle used later as an input counts as finished, so
        forget failed or cancelled tasks only once nothing will name them.

        Raises:
            ValueError: a handle is unknown or its task is not terminal; the
                handles before it stay forgotten.
        """
        if type(handles) is list:
            for h in <list>handles:
                _forget_one(self, h)
        elif type(handles) is tuple:
            for h in <tuple>handles:
                _forget_one(self, h)
        else:
            for h in handles:
                _forget_one(self, h)

    # ----------------------------------------------------------------- queries
    def state(self, handle):
        """Return the state of a task, or FORGOTTEN for a forgotten handle.

        Raises:
            ValueError: the handle was never issued.
        """
        cdef Py_ssize_t slot = _live_slot(self, _as_handle(handle), handle)
        return FORGOTTEN if slot < 0 else self._state[slot]

    def counts(self):
        """Return the number of held tasks in each state, in state order.

        (waiting, ready, running, finished, failed, cancelled); forgotten
        tasks are not counted.
        """
        c = self._counts
        return (c[0], c[1], c[2], c[3], c[4], c[5])

    @property
    def capacity(self):
        """Number of task slots allocated (held plus free); bounds memory use."""
        return self._nslots

    def __len__(self):
        """Number of tasks held (not forgotten)."""
        return self._nslots - self._nfree - self._nretired


cdef list _add_csr(Core self, int64_t* ptr, Py_ssize_t nptr, int64_t* idx, Py_ssize_t nidx,
                   int64_t* prios, Py_ssize_t nprio):
    # Validates the whole offset array first so a malformed batch adds nothing.
    cdef Py_ssize_t n, i, j, lo, hi
    cdef int64_t v
    cdef list out
    cdef uint64_t* handles
    if nptr < 1:
        raise ValueError("indptr must hold at least one offset")
    n = nptr - 1
    if ptr[0] < 0 or ptr[n] > nidx:
        raise ValueError("indptr must be non-decreasing offsets into indices")
    for i in range(n):
        if ptr[i + 1] < ptr[i]:
            raise ValueError("indptr must be non-decreasing offsets into indices")
    if prios != NULL and nprio != n:
        raise ValueError(f"priorities must match tasks in length, got {nprio} != {n}")
    out = []
    handles = <uint64_t*>malloc((n if n else 1) * sizeof(uint64_t))
    if handles == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            lo = <Py_ssize_t>ptr[i]
            hi = <Py_ssize_t>ptr[i + 1]
            for j in range(lo, hi):
                v = idx[j]
                if 0 <= v <= <int64_t>_SLOT_MASK and v >= i:
                    raise ValueError(
                        f"batch task {i} names batch task {v}, which does not come before it"
                    )
            if prios != NULL:
                v = prios[i]
                if v < _INT32_MIN or v > _INT32_MAX:
                    raise ValueError(f"priority must be a signed 32-bit integer, got {v}")
            self._scratch_len = 0
            for j in range(lo, hi):
                v = idx[j]
                if v < 0:
                    raise ValueError(f"unknown task handle {v}")
                if v <= <int64_t>_SLOT_MASK:
                    _collect(self, handles[v], None)
                else:
                    _collect(self, <uint64_t>v, None)
            handles[i] = _commit(self, <int32_t>prios[i] if prios != NULL else 0)
            out.append(PyLong_FromUnsignedLongLong(handles[i]))
    finally:
        free(handles)
    return out
