# Dependency tracking: slot table, successor edges, and the state changes
# (add, finish, fail/cancel cascade, forget). Included by _core.pyx.
#
# Invariant shared with _pycore: a slot's generation is odd while a task
# lives in it and even while it sits on the free list (forget and reuse each
# add one), so a handle with an even generation was never issued.


cdef inline int _grow_slots(Core self, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = self._slot_cap
    cdef void* p
    if need <= cap:
        return 0
    if need > _MAX_SLOTS:
        raise MemoryError("async_wf core is full: 2**32 task slots are held")
    cap = cap * 2 if cap else 256
    while cap < need:
        cap *= 2
    if cap > _MAX_SLOTS:
        cap = _MAX_SLOTS
    # Each array is swapped in as soon as it grows, so a failure part-way
    # leaves every array at least _slot_cap long and the core usable.
    p = realloc(self._state, cap * sizeof(uint8_t))
    if p == NULL:
        raise MemoryError()
    self._state = <uint8_t*>p
    p = realloc(self._unmet, cap * sizeof(int32_t))
    if p == NULL:
        raise MemoryError()
    self._unmet = <int32_t*>p
    p = realloc(self._prio, cap * sizeof(int32_t))
    if p == NULL:
        raise MemoryError()
    self._prio = <int32_t*>p
    p = realloc(self._gen, cap * sizeof(uint32_t))
    if p == NULL:
        raise MemoryError()
    self._gen = <uint32_t*>p
    p = realloc(self._succ_head, cap * sizeof(int64_t))
    if p == NULL:
        raise MemoryError()
    self._succ_head = <int64_t*>p
    p = realloc(self._succ_tail, cap * sizeof(int64_t))
    if p == NULL:
        raise MemoryError()
    self._succ_tail = <int64_t*>p
    p = realloc(self._free, cap * sizeof(uint32_t))
    if p == NULL:
        raise MemoryError()
    self._free = <uint32_t*>p
    self._slot_cap = cap
    return 0


cdef inline int _scratch_push(Core self, uint32_t slot) except -1:
    cdef Py_ssize_t cap
    cdef void* p
    if self._scratch_len == self._scratch_cap:
        cap = self._scratch_cap * 2 if self._scratch_cap else 64
        p = realloc(self._scratch, cap * sizeof(uint32_t))
        if p == NULL:
            raise MemoryError()
        self._scratch = <uint32_t*>p
        self._scratch_cap = cap
    self._scratch[self._scratch_len] = slot
    self._scratch_len += 1
    return 0


cdef inline int _edge_append(Core self, uint32_t src, uint64_t target) except -1:
    # Appending at the tail keeps successors in insertion order, which fixes
    # the order finish_many and the cascades report them in (as _pycore).
    cdef int64_t e = self._edge_free
    cdef int64_t cap
    cdef void* p
    if e >= 0:
        self._edge_free = self._edge_next[e]
    else:
        if self._nedges == self._edge_cap:
            cap = self._edge_cap * 2 if self._edge_cap else 1024
            p = realloc(self._edge_target, cap * sizeof(uint64_t))
            if p == NULL:
                raise MemoryError()
            self._edge_target = <uint64_t*>p
            p = realloc(self._edge_next, cap * sizeof(int64_t))
            if p == NULL:
                raise MemoryError()
            self._edge_next = <int64_t*>p
            self._edge_cap = cap
        e = self._nedges
        self._nedges += 1
    self._edge_target[e] = target
    self._edge_next[e] = -1
    cdef int64_t tail = self._succ_tail[src]
    if tail < 0:
        self._succ_head[src] = e
    else:
        self._edge_next[tail] = e
    self._succ_tail[src] = e
    return 0


cdef inline void _edges_release(Core self, int64_t head, int64_t tail) noexcept:
    # O(1): the whole list is spliced onto the edge freelist.
    if head >= 0:
        self._edge_next[tail] = self._edge_free
        self._edge_free = head


cdef inline void _set_state(Core self, uint32_t slot, uint8_t state) noexcept:
    self._counts[self._state[slot]] -= 1
    self._counts[state] += 1
    self._state[slot] = state


# ------------------------------------------------------------ handle checks
cdef inline uint64_t _as_handle(object obj) except? 0:
    # Maps every int that cannot be a live handle (negative, or wider than
    # 64 bits) to 0, whose generation 0 is never issued, so one check in
    # _slot/_live_slot rejects them all with _pycore's message.
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(obj):
        obj = PyNumber_Index(obj)
    v = PyLong_AsLongLongAndOverflow(obj, &overflow)
    if overflow == 0:
        return <uint64_t>v if v > 0 else 0
    if overflow < 0:
        return 0
    return _as_wide_handle(obj)


cdef uint64_t _as_wide_handle(object obj) except? 0:
    # Generations >= 2**31 give handles beyond int64; rare, so off the fast path.
    try:
        return PyLong_AsUnsignedLongLong(obj)
    except OverflowError:
        return 0


cdef inline object _unknown(object obj, uint64_t handle):
    if obj is None:
        obj = PyLong_FromUnsignedLongLong(handle)
    return ValueError(f"unknown task handle {obj}")


cdef inline Py_ssize_t _slot(Core self, uint64_t handle, object obj) except -1:
    # Slot of a live handle; `obj` is only used for the error message.
    cdef uint64_t slot = handle & _SLOT_MASK
    cdef uint64_t gen = handle >> _SLOT_BITS
    if (slot >= <uint64_t>self._nslots or self._gen[slot] != gen or not (gen & 1)
            or self._state[slot] == _RETIRED):
        raise _unknown(obj, handle)
    return <Py_ssize_t>slot


cdef inline Py_ssize_t _live_slot(Core self, uint64_t handle, object obj) except -2:
    # Slot of a handle, -1 if forgotten; raises if it was never issued.
    cdef uint64_t slot = handle & _SLOT_MASK
    cdef uint64_t gen = handle >> _SLOT_BITS
    if slot >= <uint64_t>self._nslots or not (gen & 1) or gen > self._gen[slot]:
        raise _unknown(obj, handle)
    if gen != self._gen[slot] or self._state[slot] == _RETIRED:
        return -1
    return <Py_ssize_t>slot


# ------------------------------------------------------------------ adding
cdef inline int _collect(Core self, uint64_t handle, object obj) except -1:
    # Validates one input of the task being added; unmet ones go to scratch.
    cdef Py_ssize_t slot = _live_slot(self, handle, obj)
    cdef uint8_t st
    if slot < 0:
        return 0
    st = self._state[slot]
    if st == _FINISHED:
        return 0
    if st > _FINISHED:
        if obj is None:
            obj = PyLong_FromUnsignedLongLong(handle)
        raise ValueError(
            f"input task {obj} is {STATE_NAMES[st]}; a task cannot wait on it"
        )
    if self._scratch_len >= _INT32_MAX:
        raise ValueError("a task cannot have more than 2**31 - 1 unmet inputs")
    return _scratch_push(self, <uint32_t>slot)


cdef inline int _collect_obj(Core self, object inp) except -1:
    return _collect(self, _as_handle(inp), inp)


cdef inline uint64_t _commit(Core self, int32_t prio) except 0:
    # Allocates the slot of a task whose inputs _collect has left in scratch.
    cdef uint32_t slot
    cdef Py_ssize_t k
    cdef Py_ssize_t nlive = self._scratch_len
    if self._nfree:
        self._nfree -= 1
        slot = self._free[self._nfree]
        self._gen[slot] += 1
    else:
        _grow_slots(self, self._nslots + 1)
        slot = <uint32_t>self._nslots
        self._nslots += 1
        self._gen[slot] = 1
    cdef uint64_t handle = (<uint64_t>self._gen[slot]) << _SLOT_BITS | slot
    self._unmet[slot] = <int32_t>nlive
    self._prio[slot] = prio
    self._succ_head[slot] = -1
    self._succ_tail[slot] = -1
    # Counted and stated before the edges so that a MemoryError while linking
    # still leaves counts() consistent with the slot table.
    if nlive:
        self._state[slot] = _WAITING
        self._counts[_WAITING] += 1
        for k in range(nlive):
            _edge_append(self, self._scratch[k], handle)
    else:
        self._state[slot] = _READY
        self._counts[_READY] += 1
        _push_ready(self, slot)
    return handle


cdef inline int32_t _as_prio(object priority) except? -1:
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(priority):
        priority = PyNumber_Index(priority)
    v = PyLong_AsLongLongAndOverflow(priority, &overflow)
    if overflow or v < _INT32_MIN or v > _INT32_MAX:
        raise ValueError(f"priority must be a signed 32-bit integer, got {priority}")
    return <int32_t>v


cdef inline uint64_t _add_obj(Core self, object inputs, object priority) except 0:
    cdef int32_t prio = _as_prio(priority)
    self._scratch_len = 0
    if type(inputs) is list:
        for inp in <list>inputs:
            _collect_obj(self, inp)
    elif type(inputs) is tuple:
        for inp in <tuple>inputs:
            _collect_obj(self, inp)
    else:
        for inp in inputs:
            _collect_obj(self, inp)
    return _commit(self, prio)


# --------------------------------------------------------------- finishing
cdef inline int _finish_one(Core self, object obj, list ready) except -1:
    cdef Py_ssize_t slot = _slot(self, _as_handle(obj), obj)
    cdef uint8_t st = self._state[slot]
    cdef int64_t e, head
    cdef uint64_t s, ss
    if st != _RUNNING:
        raise ValueError(f"task {obj} is {STATE_NAMES[st]}; only a running task can finish")
    self._state[slot] = _FINISHED
    self._counts[_RUNNING] -= 1
    self._counts[_FINISHED] += 1
    head = self._succ_head[slot]
    if head < 0:
        return 0
    e = head
    while e >= 0:
        s = self._edge_target[e]
        ss = s & _SLOT_MASK
        # Skips successors that were cancelled, failed or forgotten since.
        if self._gen[ss] == (s >> _SLOT_BITS) and self._state[ss] == _WAITING:
            self._unmet[ss] -= 1
            if self._unmet[ss] == 0:
                self._state[ss] = _READY
                self._counts[_WAITING] -= 1
                self._counts[_READY] += 1
                _push_ready(self, <uint32_t>ss)
                ready.append(PyLong_FromUnsignedLongLong(s))
        e = self._edge_next[e]
    _edges_release(self, head, self._succ_tail[slot])
    self._succ_head[slot] = -1
    self._succ_tail[slot] = -1
    return 0


cdef list _cascade(Core self, uint32_t root, uint8_t mark):
    # Iterative DFS (scratch is the stack) so that a long chain cannot
    # overflow the C stack; marking order matches _pycore's list-based DFS.
    cdef list out = []
    cdef uint32_t cur
    cdef int64_t e, head
    cdef uint64_t s, ss
    self._scratch_len = 0
    _scratch_push(self, root)
    while self._scratch_len:
        self._scratch_len -= 1
        cur = self._scratch[self._scratch_len]
        head = self._succ_head[cur]
        if head < 0:
            continue
        e = head
        while e >= 0:
            s = self._edge_target[e]
            ss = s & _SLOT_MASK
            if self._gen[ss] == (s >> _SLOT_BITS) and self._state[ss] < _TERMINAL_MIN:
                _set_state(self, <uint32_t>ss, mark)
                out.append(PyLong_FromUnsignedLongLong(s))
                _scratch_push(self, <uint32_t>ss)
            e = self._edge_next[e]
        _edges_release(self, head, self._succ_tail[cur])
        self._succ_head[cur] = -1
        self._succ_tail[cur] = -1
    return out


cdef inline int _forget_one(Core self, object obj) except -1:
    cdef Py_ssize_t slot = _slot(self, _as_handle(obj), obj)
    cdef uint8_t st = self._state[slot]
    if st < _TERMINAL_MIN:
        raise ValueError(
            f"task {obj} is {STATE_NAMES[st]}; only a terminal task can be forgotten"
        )
    self._counts[st] -= 1
    _edges_release(self, self._succ_head[slot], self._succ_tail[slot])
    self._succ_head[slot] = -1
    self._succ_tail[slot] = -1
    if self._gen[slot] == _GEN_LAST:
        # The generation cannot advance without wrapping, which would let
        # stale handles alias new tasks: the slot is retired instead (one
        # slot per 2**31 reuses). _pycore's unbounded ints never get here.
        self._state[slot] = _RETIRED
        self._nretired += 1
        return 0
    self._gen[slot] += 1
    self._free[self._nfree] = <uint32_t>slot
    self._nfree += 1
    return 0
