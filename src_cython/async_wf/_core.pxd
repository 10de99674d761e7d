# Declarations for async_wf._core (src_cython/_core.pyx). Cython pairs a .pyx
# with the .pxd at its module path under the source root, hence async_wf/ here.
#
# Declarations of the compiled core. All per-task state lives in C arrays
# indexed by slot, so a task costs ~30 bytes and no Python object; the only
# Python objects the core creates are the handle ints it returns.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef struct HeapEntry:
    # Ready-queue entry for a non-zero priority; seq breaks ties FIFO.
    int32_t prio
    uint64_t seq
    uint64_t handle


cdef class Core:
    # Per-slot arrays (structure of arrays), all of capacity _slot_cap.
    cdef uint8_t* _state
    cdef int32_t* _unmet
    cdef int32_t* _prio
    cdef uint32_t* _gen
    cdef int64_t* _succ_head
    cdef int64_t* _succ_tail
    cdef Py_ssize_t _nslots
    cdef Py_ssize_t _slot_cap

    # Free slots (LIFO); shares _slot_cap since it never holds more than
    # _nslots entries. Retired slots (generation exhausted) are never reused.
    cdef uint32_t* _free
    cdef Py_ssize_t _nfree
    cdef Py_ssize_t _nretired

    # Edge pool: singly linked successor lists plus a freelist threaded
    # through _edge_next.
    cdef uint64_t* _edge_target
    cdef int64_t* _edge_next
    cdef int64_t _edge_free
    cdef int64_t _nedges
    cdef int64_t _edge_cap

    # Priority-0 FIFO: ring buffer, capacity a power of two.
    cdef uint64_t* _fifo
    cdef Py_ssize_t _fifo_head
    cdef Py_ssize_t _fifo_len
    cdef Py_ssize_t _fifo_cap

    # Binary heap for the other priorities.
    cdef HeapEntry* _heap
    cdef Py_ssize_t _heap_len
    cdef Py_ssize_t _heap_cap
    cdef uint64_t _seq

    # Scratch slots: live inputs of the task being added, or the DFS stack
    # of a cascade (never both at once).
    cdef uint32_t* _scratch
    cdef Py_ssize_t _scratch_len
    cdef Py_ssize_t _scratch_cap

    cdef Py_ssize_t _counts[6]
