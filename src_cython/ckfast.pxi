# Included by _core.pyx: the checkpoint log's compiled hot paths.
#
# Three per-task operations dominate what the log costs a workflow of small
# tasks: the key of a call with scalar arguments, the bytes of a small RESULT
# record, and the read of a small record from the map made at open. Each is a
# twin of pure-Python code in async_wf.checkpoint (_keys._quick_key_py,
# _format._py_result_record, _format._py_mapped_payload) that produces the
# same bytes (tests compare them); async_wf._extension.compiled() picks the
# Python ones when this extension is missing or ASYNC_WF_NO_EXTENSIONS is set.
#
# The byte layouts are specified in async_wf/checkpoint/_format.py and
# _keys.py. The constants below are C compile-time constants (the code
# indexes with them); RECORD_LAYOUT exports them, and _format.py compares it
# with its own at import, refusing an extension built for another layout.
# Every integer is written little-endian by hand, so nothing depends on the
# host's byte order.

import struct as _struct

cdef uint32_t _CRC_TABLE[256]
cdef uint64_t _NAN_BITS = _struct.unpack("<Q", _struct.pack("<d", float("nan")))[0]

# the record layout of _format.py (see the head of this file)
cdef enum:
    HEADER_SIZE = 20
    CRC_FROM = 8
    RESULT_META_SIZE = 16
    VALUE_HEAD_SIZE = 16
    ALIGN = 16
    T_RESULT = 1
    CODEC_RAW = 0
    MAX_KEY = 0xFFFF
    MAX_SMALL = 1 << 16

cdef bytes _RECORD_MAGIC = b"\xa7CK\x01"

#: the constants above by their names in _format.py, for its import-time check
RECORD_LAYOUT = {
    "HEADER_SIZE": HEADER_SIZE,
    "CRC_FROM": CRC_FROM,
    "RESULT_META_SIZE": RESULT_META_SIZE,
    "VALUE_HEAD_SIZE": VALUE_HEAD_SIZE,
    "ALIGN": ALIGN,
    "RESULT": T_RESULT,
    "CODEC_RAW": CODEC_RAW,
    "MAX_KEY": MAX_KEY,
    "DIRECT_MIN": MAX_SMALL,
    "RECORD_MAGIC": _RECORD_MAGIC,
}


cdef void _init_crc() noexcept:
    cdef uint32_t c
    cdef int i, k
    for i in range(256):
        c = i
        for k in range(8):
            if c & 1:
                c = (c >> 1) ^ 0xEDB88320u
            else:
                c = c >> 1
        _CRC_TABLE[i] = c


_init_crc()


cdef inline uint32_t _crc32(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    # the CRC-32 of zlib (reflected polynomial 0xEDB88320), a byte at a time:
    # records on this path are a few hundred bytes at most
    cdef uint32_t c = 0xFFFFFFFFu
    cdef Py_ssize_t i
    for i in range(n):
        c = _CRC_TABLE[(c ^ p[i]) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFFu


def crc32(const uint8_t[::1] data):
    """``zlib.crc32(data)``, for the tests of this module's CRC."""
    return _crc32(&data[0] if data.shape[0] else NULL, data.shape[0])


cdef inline void _le(uint8_t* p, uint64_t v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        p[i] = <uint8_t>(v >> (8 * i))


cdef inline uint64_t _rd(const uint8_t* p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


# ------------------------------------------------------------------- keys
cdef struct Buf:
    uint8_t* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int _grow(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = b.cap
    cdef uint8_t* q
    while cap < b.n + extra:
        cap *= 2
    q = <uint8_t*>realloc(b.p, cap)
    if q == NULL:
        raise MemoryError()
    b.p = q
    b.cap = cap
    return 0


cdef inline int _put(Buf* b, const void* src, Py_ssize_t n) except -1:
    if b.n + n > b.cap:
        _grow(b, n)
    memcpy(b.p + b.n, src, n)
    b.n += n
    return 0


cdef inline int _put_tag_u64(Buf* b, char tag, uint64_t v) except -1:
    if b.n + 9 > b.cap:
        _grow(b, 9)
    b.p[b.n] = <uint8_t>tag
    _le(b.p + b.n + 1, v, 8)
    b.n += 9
    return 0


cdef inline int _put_u64(Buf* b, uint64_t v) except -1:
    if b.n + 8 > b.cap:
        _grow(b, 8)
    _le(b.p + b.n, v, 8)
    b.n += 8
    return 0


def quick_key(bytes fn_identity, tuple args, leaf, hasher):
    """The bytes ``_keys._quick_key`` hashes, hashed with a copy of ``hasher``; or None.

    None when an argument is not an int (64-bit), str, float, None or a leaf
    (the general encoder takes those), or when ``leaf`` returns something
    other than bytes or None (the general path raises the error).
    """
    cdef Buf b
    cdef Py_ssize_t size
    cdef const char* s
    cdef int overflow
    cdef long long iv
    cdef double dv
    cdef uint64_t bits
    b.cap = 256
    b.n = 0
    b.p = <uint8_t*>malloc(b.cap)
    if b.p == NULL:
        raise MemoryError()
    try:
        _put_u64(&b, PyBytes_GET_SIZE(fn_identity))
        _put(&b, PyBytes_AS_STRING(fn_identity), PyBytes_GET_SIZE(fn_identity))
        _put_u64(&b, len(args))
        for a in args:
            if leaf is not None:
                sub = leaf(a)
                if sub is not None:
                    if type(sub) is not bytes:
                        return None
                    _put_tag_u64(&b, b"L", PyBytes_GET_SIZE(sub))
                    _put(&b, PyBytes_AS_STRING(sub), PyBytes_GET_SIZE(sub))
                    continue
            t = type(a)
            if t is int:
                iv = PyLong_AsLongLongAndOverflow(a, &overflow)
                if overflow:
                    return None
                _put_tag_u64(&b, b"i", <uint64_t>iv)
            elif t is str:
                try:
                    enc = (<str>a).encode("utf-8")
                except UnicodeEncodeError:
                    enc = (<str>a).encode("utf-8", "surrogatepass")
                _put_tag_u64(&b, b"s", PyBytes_GET_SIZE(enc))
                _put(&b, PyBytes_AS_STRING(enc), PyBytes_GET_SIZE(enc))
            elif t is float:
                dv = a
                if dv != dv:
                    bits = _NAN_BITS
                else:
                    memcpy(&bits, &dv, 8)
                _put_tag_u64(&b, b"f", bits)
            elif a is None:
                _put(&b, b"N", 1)
            else:
                return None
        _put_u64(&b, 0)  # no keyword arguments
        h = hasher.copy()
        h.update(PyBytes_FromStringAndSize(<char*>b.p, b.n))
        return h.digest()
    finally:
        free(b.p)


# ----------------------------------------------------------------- records
def result_record(bytes key, double when, bytes name, tuple parents, bytes payload):
    """One complete small RESULT record: header (with CRC), key, metadata, value.

    The same bytes as ``_format._py_result_record``: metadata padded so that the
    value section starts on a 16-byte boundary, then a plain pickle with no
    out-of-band buffers.

    Raises:
        TypeError, ValueError: the key, a parent key, or the name breaks its rule.
    """
    cdef Py_ssize_t klen = PyBytes_GET_SIZE(key)
    cdef Py_ssize_t nlen = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t npar = len(parents)
    cdef Py_ssize_t pblen = 0
    cdef Py_ssize_t used, pad, blen, size, pos
    cdef uint64_t bits
    cdef uint8_t* r
    if not 0 < klen <= MAX_KEY:
        raise ValueError(f"key must be 1 to {MAX_KEY} bytes long, got {klen}")
    if nlen > 0xFFFF:
        raise ValueError(f"function name must be < 64 KiB in UTF-8, got {nlen} bytes")
    if npar > 0xFFFF:
        raise ValueError(f"parents must be fewer than 65536 keys, got {npar}")
    for p in parents:
        # the messages of _format._check_key
        if not isinstance(p, bytes):
            raise TypeError(f"parent key must be bytes, got {type(p).__name__}")
        if not 0 < PyBytes_GET_SIZE(p) <= MAX_KEY:
            raise ValueError(
                f"parent key must be 1 to {MAX_KEY} bytes long, got {PyBytes_GET_SIZE(p)}")
        pblen += 2 + PyBytes_GET_SIZE(p)
    used = HEADER_SIZE + klen + RESULT_META_SIZE + nlen + pblen
    pad = (ALIGN - used % ALIGN) % ALIGN
    blen = (used + pad - HEADER_SIZE - klen) + VALUE_HEAD_SIZE + plen
    size = HEADER_SIZE + klen + blen
    rec = PyBytes_FromStringAndSize(NULL, size)
    r = <uint8_t*>PyBytes_AS_STRING(rec)
    memcpy(r, PyBytes_AS_STRING(_RECORD_MAGIC), 4)
    r[8] = T_RESULT
    r[9] = 0
    _le(r + 10, klen, 2)
    _le(r + 12, blen, 8)
    pos = HEADER_SIZE
    memcpy(r + pos, PyBytes_AS_STRING(key), klen)
    pos += klen
    memcpy(&bits, &when, 8)
    _le(r + pos, bits, 8)
    _le(r + pos + 8, used + pad, 4)
    _le(r + pos + 12, nlen, 2)
    _le(r + pos + 14, npar, 2)
    pos += RESULT_META_SIZE
    memcpy(r + pos, PyBytes_AS_STRING(name), nlen)
    pos += nlen
    for p in parents:
        _le(r + pos, PyBytes_GET_SIZE(p), 2)
        memcpy(r + pos + 2, PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p))
        pos += 2 + PyBytes_GET_SIZE(p)
    memset(r + pos, 0, pad)
    pos += pad
    memset(r + pos, 0, VALUE_HEAD_SIZE)  # no buffers, raw codec, padding
    _le(r + pos + 8, plen, 8)
    pos += VALUE_HEAD_SIZE
    memcpy(r + pos, PyBytes_AS_STRING(payload), plen)
    _le(r + 4, _crc32(r + CRC_FROM, size - CRC_FROM), 4)
    return rec


def mapped_payload(mm, Py_ssize_t off, bytes key):
    """The pickle of the small plain RESULT record of ``key`` at ``off`` in ``mm``, or None.

    None unless the record is whole inside ``mm``, is a RESULT of ``key``
    smaller than 64 KiB, passes its checksum, and holds one plain pickle
    (no out-of-band buffers, not compressed): the caller then takes the
    checked general path, which reports what is wrong. The pickle is copied
    out, so nothing refers to the map afterwards.
    """
    cdef Py_buffer view
    cdef const uint8_t* p
    cdef Py_ssize_t end, klen, size, meta_at, value_at, start
    cdef uint64_t blen, plen
    PyObject_GetBuffer(mm, &view, PyBUF_SIMPLE)
    try:
        end = view.len
        if off < 0 or off + HEADER_SIZE > end:
            return None
        p = <const uint8_t*>view.buf + off
        if memcmp(p, PyBytes_AS_STRING(_RECORD_MAGIC), 4) != 0 or p[8] != T_RESULT:
            return None
        klen = <Py_ssize_t>_rd(p + 10, 2)
        blen = _rd(p + 12, 8)
        if blen > MAX_SMALL:
            return None
        size = HEADER_SIZE + klen + <Py_ssize_t>blen
        if size > MAX_SMALL or off + size > end:
            return None
        if klen != PyBytes_GET_SIZE(key) or memcmp(p + HEADER_SIZE, PyBytes_AS_STRING(key), klen):
            return None
        if _crc32(p + CRC_FROM, size - CRC_FROM) != <uint32_t>_rd(p + 4, 4):
            return None
        meta_at = HEADER_SIZE + klen
        if size - meta_at < RESULT_META_SIZE:
            return None
        value_at = <Py_ssize_t>_rd(p + meta_at + 8, 4)
        if not (meta_at < value_at <= size - VALUE_HEAD_SIZE):
            return None
        plen = _rd(p + value_at + 8, 8)
        start = value_at + VALUE_HEAD_SIZE
        if _rd(p + value_at, 4) != 0 or p[value_at + 4] != CODEC_RAW or <uint64_t>(size - start) != plen:
            return None
        return PyBytes_FromStringAndSize(<const char*>p + start, size - start)
    finally:
        PyBuffer_Release(&view)
