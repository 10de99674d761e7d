# The wire protocol's per-task test: whether a task's arguments go in a
# TASKS column, and how many bytes they may take there. The scheduler asks
# it for every task it sends (about 5 % of its time over TCP in Python);
# the pure-Python twin, and the specification, is async_wf.protocol's
# _py_scalar_cost and _py_column_cost.

from cpython.unicode cimport PyUnicode_GET_LENGTH

cdef long long _COLUMN_INT = 1LL << 62
cdef Py_ssize_t _COLUMN_STR = 256


cdef inline Py_ssize_t _scalar_cost(object v) except -1:
    cdef type t = type(v)
    cdef int overflow = 0
    cdef long long x
    cdef Py_ssize_t n
    if t is int:
        x = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow or not (-_COLUMN_INT < x < _COLUMN_INT):
            return 0
        return 10
    if t is float:
        return 9
    if t is str:
        n = PyUnicode_GET_LENGTH(v)
        return 10 + 4 * n if n <= _COLUMN_STR else 0
    if t is bytes:
        n = PyBytes_GET_SIZE(v)
        return 10 + 4 * n if n <= _COLUMN_STR else 0
    if v is None or t is bool:
        return 1
    return 0


def scalar_cost(value):
    """``async_wf.protocol._py_scalar_cost``: a column's bytes for ``value``, 0 if it cannot go."""
    return _scalar_cost(value)


def column_cost(args):
    """``async_wf.protocol._py_column_cost``: a column's bytes for the tuple ``args``, or 0."""
    cdef Py_ssize_t n = 8, c
    for a in args:
        c = _scalar_cost(a)
        if not c:
            return 0
        n += c
    return n
