# Ready queue. Almost every task has priority 0, so those go through a ring
# buffer FIFO (O(1), no comparisons) and only the others pay for the binary
# heap. Entries whose task left READY while queued (failed, cancelled,
# forgotten and reused) stay put and are dropped when pop reaches them, so
# cancel stays O(1). Included by _core.pyx.


cdef inline bint _heap_before(HeapEntry* a, HeapEntry* b) noexcept:
    return a.prio > b.prio or (a.prio == b.prio and a.seq < b.seq)


cdef int _fifo_grow(Core self) except -1:
    cdef Py_ssize_t cap = self._fifo_cap * 2 if self._fifo_cap else 1024
    cdef uint64_t* buf = <uint64_t*>malloc(cap * sizeof(uint64_t))
    cdef Py_ssize_t first
    if buf == NULL:
        raise MemoryError()
    if self._fifo_len:
        # Unwrap the ring so the entries start at 0 in the new buffer.
        first = self._fifo_cap - self._fifo_head
        if first > self._fifo_len:
            first = self._fifo_len
        memcpy(buf, self._fifo + self._fifo_head, first * sizeof(uint64_t))
        memcpy(buf + first, self._fifo, (self._fifo_len - first) * sizeof(uint64_t))
    free(self._fifo)
    self._fifo = buf
    self._fifo_cap = cap
    self._fifo_head = 0
    return 0


cdef int _heap_push(Core self, int32_t prio, uint64_t handle) except -1:
    cdef Py_ssize_t cap, i, parent
    cdef void* p
    cdef HeapEntry item
    if self._heap_len == self._heap_cap:
        cap = self._heap_cap * 2 if self._heap_cap else 256
        p = realloc(self._heap, cap * sizeof(HeapEntry))
        if p == NULL:
            raise MemoryError()
        self._heap = <HeapEntry*>p
        self._heap_cap = cap
    self._seq += 1
    item.prio = prio
    item.seq = self._seq
    item.handle = handle
    i = self._heap_len
    self._heap_len += 1
    while i > 0:
        parent = (i - 1) >> 1
        if not _heap_before(&item, &self._heap[parent]):
            break
        self._heap[i] = self._heap[parent]
        i = parent
    self._heap[i] = item
    return 0


cdef inline uint64_t _heap_pop(Core self) noexcept:
    # Caller guarantees the heap is not empty.
    cdef HeapEntry* h = self._heap
    cdef uint64_t top = h[0].handle
    cdef Py_ssize_t n, i, child
    cdef HeapEntry last
    self._heap_len -= 1
    n = self._heap_len
    if n == 0:
        return top
    last = h[n]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _heap_before(&h[child + 1], &h[child]):
            child += 1
        if not _heap_before(&h[child], &last):
            break
        h[i] = h[child]
        i = child
    h[i] = last
    return top


cdef inline int _push_ready(Core self, uint32_t slot) except -1:
    cdef int32_t prio = self._prio[slot]
    cdef uint64_t handle = (<uint64_t>self._gen[slot]) << _SLOT_BITS | slot
    if prio == 0:
        if self._fifo_len == self._fifo_cap:
            _fifo_grow(self)
        self._fifo[(self._fifo_head + self._fifo_len) & (self._fifo_cap - 1)] = handle
        self._fifo_len += 1
        return 0
    return _heap_push(self, prio, handle)


cdef list _pop(Core self, Py_ssize_t n):
    cdef list out = []
    cdef Py_ssize_t got = 0
    cdef uint64_t handle, slot
    while got < n:
        # A positive priority beats the FIFO; a negative one waits for it.
        if self._heap_len and (self._heap[0].prio > 0 or not self._fifo_len):
            handle = _heap_pop(self)
        elif self._fifo_len:
            handle = self._fifo[self._fifo_head]
            self._fifo_head = (self._fifo_head + 1) & (self._fifo_cap - 1)
            self._fifo_len -= 1
        else:
            break
        slot = handle & _SLOT_MASK
        if self._gen[slot] != (handle >> _SLOT_BITS) or self._state[slot] != _READY:
            continue
        self._state[slot] = _RUNNING
        out.append(PyLong_FromUnsignedLongLong(handle))
        got += 1
    self._counts[_READY] -= got
    self._counts[_RUNNING] += got
    return out
