# The local transport's runner, its per-task loop (see
# async_wf/transport/local.py, LocalTransport._drive). The specification is
# the pure-Python twin async_wf._context.run_firsts: same arguments, same
# answers, same order of effects. Compiled, a coroutine that ends in its
# first step returns through PyIter_Send, without a StopIteration made and
# caught per task; that, and the loop itself, is what in-process no-op
# tasks cost beyond raw asyncio's own.

from cpython.contextvars cimport (
    PyContext_CopyCurrent,
    PyContext_Enter,
    PyContext_Exit,
    PyContextVar_Set,
)
from cpython.ref cimport PyObject, Py_XDECREF


cdef extern from "Python.h":
    ctypedef enum PySendResult:
        PYGEN_RETURN
        PYGEN_ERROR
        PYGEN_NEXT
    PySendResult PyIter_Send(object iter, object arg, PyObject** presult)


def run_firsts(object q, object owner, object var, list done, object queued,
               object started, Py_ssize_t limit):
    """First steps of the coroutine tasks queued in ``q``, in order, while each ends there.

    See ``async_wf._context.run_firsts`` (the twin, and the specification).
    """
    cdef Py_ssize_t n = 0
    cdef PyObject* res = NULL
    cdef PySendResult how
    cdef object fut, ctx, coro, args, value
    popleft = q.popleft
    while n < limit and q:
        fut = popleft()
        if fut._att is not queued or fut._kwargs:
            return (3, fut, None, None)
        fut._att = started
        n += 1
        ctx = PyContext_CopyCurrent()
        PyContext_Enter(ctx)
        try:
            PyContextVar_Set(var, [owner, fut, None])
            args = fut._args
            coro = fut._fn(*args)
            how = PyIter_Send(coro, None, &res)
        except BaseException as exc:
            return (2, fut, exc, None)
        finally:
            PyContext_Exit(ctx)
        if how == PYGEN_ERROR:
            try:
                raise_pending()
            except BaseException as exc:
                return (2, fut, exc, None)
        value = <object>res
        Py_XDECREF(res)
        if how == PYGEN_NEXT:
            return (1, fut, ctx, (coro, value))
        if fut._next is not None:
            return (0, fut, value, None)
        done.append((fut, value))
    return None


cdef int raise_pending() except -1:
    # PyIter_Send left an exception set: let Cython raise it
    return -1

