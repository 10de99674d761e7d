"""Pure-Python twin of the compiled core (``async_wf._core``).

The core is a dependency tracker plus a ready queue over integer task
handles. It knows nothing of functions, futures, asyncio or sockets: ints go
in, ints come out. The runtime keeps the Python objects of a task in its own
table, keyed by the handle.

Handles
    A handle is ``generation << 32 | slot``. Slots are reused once a task is
    forgotten; the generation makes a stale handle (one whose slot has been
    reused) distinguishable from the live one, so a forgotten input is known
    to be finished rather than confused with the new occupant of its slot.
    Generations start at 1, so no handle is ever a small integer by accident.
    Forgetting a task and reusing its slot each add one to the generation, so
    a slot's generation is odd while a task lives in it and even while it is
    free: a handle with an even generation was never issued.

States
    WAITING (inputs unmet) -> READY (in the ready queue) -> RUNNING (popped)
    -> FINISHED | FAILED | CANCELLED. ``requeue`` takes a RUNNING task back
    to READY (a retry, or a lost worker). Only terminal tasks may be
    forgotten; ``state`` of a forgotten handle is FORGOTTEN.

Ready-queue policy
    ``pop`` hands out the highest priority first and, among equal
    priorities, the task that became ready first (FIFO). Almost every task
    has priority 0, so priority-0 tasks live in a plain FIFO and only the
    others pay for a heap; ``pop`` compares the heap's top with 0 to choose.
    Tasks that leave the READY state while queued (failed, cancelled) are
    left in the queue and skipped when reached, which keeps cancel O(1).

Every method of this class exists, with the same behaviour and the same
error messages, on ``async_wf._core.Core``; the test suite runs one set of
tests against both.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Sequence

WAITING = 0
READY = 1
RUNNING = 2
FINISHED = 3
FAILED = 4
CANCELLED = 5
FORGOTTEN = -1

STATE_NAMES = ("waiting", "ready", "running", "finished", "failed", "cancelled")

_SLOT_BITS = 32
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_TERMINAL_MIN = FINISHED
_PRIO_MIN = -(1 << 31)
_PRIO_MAX = (1 << 31) - 1


_INT64_FORMATS = frozenset(("q", "l", "=q", "=l", "@q", "@l"))


def _int64_buffer(name: str, obj: object) -> memoryview:
    """Return ``obj`` as a memoryview if it is a 1-D C-contiguous int64 buffer."""
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a 1-D C-contiguous int64 buffer") from None
    if (
        view.ndim != 1
        or view.itemsize != 8
        or view.format not in _INT64_FORMATS
        or not view.c_contiguous
    ):
        raise TypeError(f"{name} must be a 1-D C-contiguous int64 buffer")
    return view


class Core:
    """Dependency tracker and ready queue over integer task handles.

    Pure-Python implementation; see the module docstring for the model.
    """

    __slots__ = (
        "_counts",
        "_fifo",
        "_free",
        "_gen",
        "_heap",
        "_prio",
        "_seq",
        "_state",
        "_succ",
        "_unmet",
    )

    def __init__(self) -> None:
        self._gen: list[int] = []
        self._state: list[int] = []
        self._unmet: list[int] = []
        self._prio: list[int] = []
        self._succ: list[list[int] | None] = []
        self._free: list[int] = []
        self._fifo: deque[int] = deque()
        self._heap: list[tuple[int, int, int]] = []
        self._seq = 0
        self._counts = [0, 0, 0, 0, 0, 0]

    # ------------------------------------------------------------------ helpers
    def _slot(self, handle: int) -> int:
        """Return the slot of a live handle, or raise ValueError."""
        slot = handle & _SLOT_MASK
        gen = handle >> _SLOT_BITS
        if handle < 0 or slot >= len(self._gen) or self._gen[slot] != gen or not gen & 1:
            raise ValueError(f"unknown task handle {handle}")
        return slot

    def _live_slot(self, handle: int) -> int:
        """Return the slot of a handle, -1 if it was forgotten; raise if never issued."""
        if handle < 0:
            raise ValueError(f"unknown task handle {handle}")
        slot = handle & _SLOT_MASK
        gen = handle >> _SLOT_BITS
        if slot >= len(self._gen) or not gen & 1 or gen > self._gen[slot]:
            raise ValueError(f"unknown task handle {handle}")
        if gen != self._gen[slot]:
            return -1
        return slot

    def _push_ready(self, slot: int) -> None:
        prio = self._prio[slot]
        handle = self._gen[slot] << _SLOT_BITS | slot
        if prio == 0:
            self._fifo.append(handle)
        else:
            self._seq += 1
            heapq.heappush(self._heap, (-prio, self._seq, handle))

    def _set_state(self, slot: int, state: int) -> None:
        counts = self._counts
        counts[self._state[slot]] -= 1
        counts[state] += 1
        self._state[slot] = state

    # ------------------------------------------------------------------ adding
    def add(self, inputs: Iterable[int] = (), priority: int = 0) -> int:
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
        if not _PRIO_MIN <= priority <= _PRIO_MAX:
            raise ValueError(f"priority must be a signed 32-bit integer, got {priority}")
        live: list[int] = []
        for inp in inputs:
            slot = self._live_slot(inp)
            if slot < 0:
                continue
            st = self._state[slot]
            if st == FINISHED:
                continue
            if st > FINISHED:
                raise ValueError(
                    f"input task {inp} is {STATE_NAMES[st]}; a task cannot wait on it"
                )
            live.append(slot)
        if self._free:
            slot = self._free.pop()
            self._gen[slot] += 1
            self._unmet[slot] = len(live)
            self._prio[slot] = priority
            self._succ[slot] = None
        else:
            slot = len(self._gen)
            self._gen.append(1)
            self._state.append(WAITING)
            self._unmet.append(len(live))
            self._prio.append(priority)
            self._succ.append(None)
        handle = self._gen[slot] << _SLOT_BITS | slot
        succ = self._succ
        for inp_slot in live:
            lst = succ[inp_slot]
            if lst is None:
                succ[inp_slot] = [handle]
            else:
                lst.append(handle)
        if live:
            self._state[slot] = WAITING
            self._counts[WAITING] += 1
        else:
            self._state[slot] = READY
            self._counts[READY] += 1
            self._push_ready(slot)
        return handle

    def add_many(
        self, inputs: Sequence[Iterable[int]], priorities: Sequence[int] | None = None
    ) -> list[int]:
        """Add ``len(inputs)`` tasks; return their handles in order.

        ``inputs[i]`` lists the inputs of task i and may name handles
        returned earlier in the same call's result only if they were issued
        before the call; ``priorities`` defaults to all 0.

        Raises:
            ValueError: as for ``add``, or if the two sequences differ in length.
                Tasks before the offending one stay added.
        """
        if priorities is not None and len(priorities) != len(inputs):
            raise ValueError(
                f"priorities must match inputs in length, got {len(priorities)} != {len(inputs)}"
            )
        add = self.add
        if priorities is None:
            return [add(inp, 0) for inp in inputs]
        return [add(inp, p) for inp, p in zip(inputs, priorities, strict=True)]

    def add_csr(
        self, indptr: object, indices: object, priorities: object | None = None
    ) -> list[int]:
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
        ptr = _int64_buffer("indptr", indptr).tolist()
        idx = _int64_buffer("indices", indices).tolist()
        prios = None if priorities is None else _int64_buffer("priorities", priorities).tolist()
        if not ptr:
            raise ValueError("indptr must hold at least one offset")
        n = len(ptr) - 1
        if ptr[0] < 0 or ptr[n] > len(idx) or any(ptr[i + 1] < ptr[i] for i in range(n)):
            raise ValueError("indptr must be non-decreasing offsets into indices")
        if prios is not None and len(prios) != n:
            raise ValueError(f"priorities must match tasks in length, got {len(prios)} != {n}")
        out: list[int] = []
        for i in range(n):
            inputs = idx[ptr[i] : ptr[i + 1]]
            for k, v in enumerate(inputs):
                if 0 <= v <= _SLOT_MASK:
                    if v >= i:
                        raise ValueError(
                            f"batch task {i} names batch task {v}, which does not come before it"
                        )
                    inputs[k] = out[v]
            out.append(self.add(inputs, 0 if prios is None else prios[i]))
        return out

    # ------------------------------------------------------------- ready queue
    def pop(self, n: int) -> list[int]:
        """Take up to ``n`` ready tasks, mark them RUNNING, return their handles.

        Highest priority first; FIFO among equal priorities.

        Raises:
            ValueError: ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out: list[int] = []
        fifo = self._fifo
        heap = self._heap
        gen = self._gen
        state = self._state
        while len(out) < n:
            if heap and (heap[0][0] < 0 or not fifo):
                handle = heapq.heappop(heap)[2]
            elif fifo:
                handle = fifo.popleft()
            else:
                break
            slot = handle & _SLOT_MASK
            if gen[slot] != handle >> _SLOT_BITS or state[slot] != READY:
                continue  # left the READY state while queued
            state[slot] = RUNNING
            out.append(handle)
        got = len(out)
        self._counts[READY] -= got
        self._counts[RUNNING] += got
        return out

    def requeue(self, handle: int) -> None:
        """Put a RUNNING task back into the ready queue (retry, lost worker).

        It joins the back of its priority level.

        Raises:
            ValueError: the handle is unknown or the task is not running.
        """
        slot = self._slot(handle)
        st = self._state[slot]
        if st != RUNNING:
            raise ValueError(
                f"task {handle} is {STATE_NAMES[st]}; only a running task can be requeued"
            )
        self._set_state(slot, READY)
        self._push_ready(slot)

    # -------------------------------------------------------------- finishing
    def finish(self, handle: int) -> list[int]:
        """Mark one RUNNING task FINISHED; return the handles that became ready."""
        return self.finish_many((handle,))

    def finish_many(self, handles: Iterable[int]) -> list[int]:
        """Mark RUNNING tasks FINISHED; return the handles that became ready.

        The newly ready tasks are also in the ready queue for ``pop``.

        Raises:
            ValueError: a handle is unknown or its task is not running; the
                handles before it stay finished.
        """
        ready: list[int] = []
        gen = self._gen
        state = self._state
        unmet = self._unmet
        succ = self._succ
        counts = self._counts
        for handle in handles:
            slot = self._slot(handle)
            st = state[slot]
            if st != RUNNING:
                raise ValueError(
                    f"task {handle} is {STATE_NAMES[st]}; only a running task can finish"
                )
            state[slot] = FINISHED
            counts[RUNNING] -= 1
            counts[FINISHED] += 1
            lst = succ[slot]
            if lst is None:
                continue
            succ[slot] = None
            for s in lst:
                ss = s & _SLOT_MASK
                if gen[ss] != s >> _SLOT_BITS or state[ss] != WAITING:
                    continue
                unmet[ss] -= 1
                if unmet[ss] == 0:
                    state[ss] = READY
                    counts[WAITING] -= 1
                    counts[READY] += 1
                    self._push_ready(ss)
                    ready.append(s)
        return ready

    def _cascade(self, slot: int, mark: int) -> list[int]:
        """Mark every live successor of ``slot``, transitively, as ``mark``."""
        out: list[int] = []
        gen = self._gen
        state = self._state
        succ = self._succ
        stack = [slot]
        while stack:
            cur = stack.pop()
            lst = succ[cur]
            if lst is None:
                continue
            succ[cur] = None
            for s in lst:
                ss = s & _SLOT_MASK
                if gen[ss] != s >> _SLOT_BITS or state[ss] >= _TERMINAL_MIN:
                    continue
                self._set_state(ss, mark)
                out.append(s)
                stack.append(ss)
        return out

    def fail(self, handle: int, cancel_successors: bool = False) -> list[int]:
        """Mark a task FAILED and its successors, transitively, FAILED or CANCELLED.

        Args:
            handle: a task in any non-terminal state.
            cancel_successors: mark the successors CANCELLED instead of FAILED.

        Returns:
            The successors that were marked, in traversal order.

        Raises:
            ValueError: the handle is unknown or the task is already terminal.
        """
        slot = self._slot(handle)
        st = self._state[slot]
        if st >= _TERMINAL_MIN:
            raise ValueError(f"task {handle} is {STATE_NAMES[st]}; it cannot fail")
        self._set_state(slot, FAILED)
        return self._cascade(slot, CANCELLED if cancel_successors else FAILED)

    def cancel(self, handle: int) -> list[int]:
        """Cancel a task that has not started, and its successors transitively.

        Returns:
            The successors that were cancelled.

        Raises:
            ValueError: the handle is unknown, or the task is running or terminal.
        """
        slot = self._slot(handle)
        st = self._state[slot]
        if st > READY:
            raise ValueError(
                f"task {handle} is {STATE_NAMES[st]}; only a waiting or ready task can be cancelled"
            )
        self._set_state(slot, CANCELLED)
        return self._cascade(slot, CANCELLED)

    # ---------------------------------------------------------------- memory
    def forget(self, handles: Iterable[int]) -> None:
        """Release the slots of terminal tasks so that memory stays bounded.

        A forgotten handle used later as an input counts as finished, so
        forget failed or cancelled tasks only once nothing will name them.

        Raises:
            ValueError: a handle is unknown or its task is not terminal; the
                handles before it stay forgotten.
        """
        for handle in handles:
            slot = self._slot(handle)
            st = self._state[slot]
            if st < _TERMINAL_MIN:
                raise ValueError(
                    f"task {handle} is {STATE_NAMES[st]}; only a terminal task can be forgotten"
                )
            self._counts[st] -= 1
            self._succ[slot] = None
            self._gen[slot] += 1
            self._free.append(slot)

    # ----------------------------------------------------------------- queries
    def state(self, handle: int) -> int:
        """Return the state of a task, or FORGOTTEN for a forgotten handle.

        Raises:
            ValueError: the handle was never issued.
        """
        slot = self._live_slot(handle)
        return FORGOTTEN if slot < 0 else self._state[slot]

    def counts(self) -> tuple[int, int, int, int, int, int]:
        """Return the number of held tasks in each state, in state order.

        (waiting, ready, running, finished, failed, cancelled); forgotten
        tasks are not counted.
        """
        c = self._counts
        return (c[0], c[1], c[2], c[3], c[4], c[5])

    @property
    def capacity(self) -> int:
        """Number of task slots allocated (held plus free); bounds memory use."""
        return len(self._gen)

    def __len__(self) -> int:
        """Number of tasks held (not forgotten)."""
        return len(self._gen) - len(self._free)
