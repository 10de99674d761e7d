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
import types as _types

cdef uint32_t _CRC_TABLE[8][256]
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


cdef void _init_crc() noexcept:
    # table 0: the CRC of each byte value; table k: of that byte followed by
    # k zero bytes, so that eight bytes are folded in with eight lookups
    # that do not depend on each other ("slicing by 8")
    cdef uint32_t c
    cdef int i, k
    for i in range(256):
        c = i
        for k in range(8):
            if c & 1:
                c = (c >> 1) ^ 0xEDB88320u
            else:
                c = c >> 1
        _CRC_TABLE[0][i] = c
    for i in range(256):
        for k in range(1, 8):
            _CRC_TABLE[k][i] = (_CRC_TABLE[k - 1][i] >> 8) ^ _CRC_TABLE[0][_CRC_TABLE[k - 1][i] & 0xFF]


_init_crc()


cdef extern from "crc32_clmul.h":
    uint32_t awf_crc32_clmul(uint32_t crc, const uint8_t* p, size_t n) noexcept nogil
    int awf_clmul_usable() noexcept nogil

# fold with carry-less multiplication where the CPU has it (crc32_clmul.h)
cdef bint _CLMUL = awf_clmul_usable()


cdef inline uint32_t _crc32_table(uint32_t c, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    # the raw CRC state c carried over n bytes, eight bytes a step
    cdef uint32_t hi
    cdef Py_ssize_t i = 0
    while n - i >= 8:
        c ^= <uint32_t>_rd(p + i, 4)
        hi = <uint32_t>_rd(p + i + 4, 4)
        c = (_CRC_TABLE[7][c & 0xFF] ^ _CRC_TABLE[6][(c >> 8) & 0xFF]
             ^ _CRC_TABLE[5][(c >> 16) & 0xFF] ^ _CRC_TABLE[4][c >> 24]
             ^ _CRC_TABLE[3][hi & 0xFF] ^ _CRC_TABLE[2][(hi >> 8) & 0xFF]
             ^ _CRC_TABLE[1][(hi >> 16) & 0xFF] ^ _CRC_TABLE[0][hi >> 24])
        i += 8
    while i < n:
        c = _CRC_TABLE[0][(c ^ p[i]) & 0xFF] ^ (c >> 8)
        i += 1
    return c


cdef inline uint32_t _crc32(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    # the CRC-32 of zlib (reflected polynomial 0xEDB88320): the multiples
    # of 16 bytes folded when the CPU can (64 bytes or more), the rest by table
    cdef uint32_t c = 0xFFFFFFFFu
    cdef Py_ssize_t m
    if _CLMUL and n >= 64:
        m = n & ~(<Py_ssize_t>15)
        c = awf_crc32_clmul(c, p, <size_t>m)
        p += m
        n -= m
    return _crc32_table(c, p, n) ^ 0xFFFFFFFFu


def crc32(const uint8_t[::1] data, bint table=False):
    """``zlib.crc32(data)``: the CRC of the log's records and blocks.

    ``table``: by the table alone, as on a CPU without carry-less
    multiplication (for the tests of both ways).
    """
    cdef const uint8_t* p = &data[0] if data.shape[0] else NULL
    if table:
        return _crc32_table(0xFFFFFFFFu, p, data.shape[0]) ^ 0xFFFFFFFFu
    return _crc32(p, data.shape[0])


# ------------------------------------------------------------------- keys
cdef struct Buf:
    uint8_t* p
    Py_ssize_t n
    Py_ssize_t cap
    bint heap  # p is malloc'ed (else a caller's stack buffer)


cdef int _grow(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = b.cap
    cdef uint8_t* q
    while cap < b.n + extra:
        cap *= 2
    if b.heap:
        q = <uint8_t*>realloc(b.p, cap)
    else:
        q = <uint8_t*>malloc(cap)
        if q != NULL:
            memcpy(q, b.p, b.n)
    if q == NULL:
        raise MemoryError()
    b.p = q
    b.cap = cap
    b.heap = True
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


# ------------------------------------------------------------------ BLAKE2b
# BLAKE2b as RFC 7693 defines it (no key, no salt; a digest length and a
# personalisation), so that a task key costs no hashlib object, copy or
# method call. hashlib.blake2b is the reference: the tests compare digests
# of every length class (empty, one block, block boundaries, many blocks).

cdef uint64_t _B2_IV[8]
_B2_IV[0] = 0x6a09e667f3bcc908ULL
_B2_IV[1] = 0xbb67ae8584caa73bULL
_B2_IV[2] = 0x3c6ef372fe94f82bULL
_B2_IV[3] = 0xa54ff53a5f1d36f1ULL
_B2_IV[4] = 0x510e527fade682d1ULL
_B2_IV[5] = 0x9b05688c2b3e6c1fULL
_B2_IV[6] = 0x1f83d9abfb41bd6bULL
_B2_IV[7] = 0x5be0cd19137e2179ULL

cdef inline uint64_t _rotr(uint64_t x, int n) noexcept nogil:
    return (x >> n) | (x << (64 - n))


cdef void _b2_compress(uint64_t* h, const uint8_t* block, uint64_t t, bint last) noexcept nogil:
    # RFC 7693's F: twelve rounds of eight G mixings, written out (generated
    # from its SIGMA table; rounds 10 and 11 repeat 0 and 1) on sixteen
    # local words, so that the compiler keeps the state in registers
    cdef uint64_t m0 = _rd(block + 0, 8), m1 = _rd(block + 8, 8), m2 = _rd(block + 16, 8), m3 = _rd(block + 24, 8), m4 = _rd(block + 32, 8), m5 = _rd(block + 40, 8), m6 = _rd(block + 48, 8), m7 = _rd(block + 56, 8), m8 = _rd(block + 64, 8), m9 = _rd(block + 72, 8), m10 = _rd(block + 80, 8), m11 = _rd(block + 88, 8), m12 = _rd(block + 96, 8), m13 = _rd(block + 104, 8), m14 = _rd(block + 112, 8), m15 = _rd(block + 120, 8)
    cdef uint64_t v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3], v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7]
    cdef uint64_t v8 = _B2_IV[0], v9 = _B2_IV[1], v10 = _B2_IV[2], v11 = _B2_IV[3], v12 = _B2_IV[4], v13 = _B2_IV[5], v14 = _B2_IV[6], v15 = _B2_IV[7]
    v12 ^= t  # the counter's high word stays 0: inputs are < 2**64 bytes
    if last:
        v14 = ~v14
    v0 = v0 + v4 + m0; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m1; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m2; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m3; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m4; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m5; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m6; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m7; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m8; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m9; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m10; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m11; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m12; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m13; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m14; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m15; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m14; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m10; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m4; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m8; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m9; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m15; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m13; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m6; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m1; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m12; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m0; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m2; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m11; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m7; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m5; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m3; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m11; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m8; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m12; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m0; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m5; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m2; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m15; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m13; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m10; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m14; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m3; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m6; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m7; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m1; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m9; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m4; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m7; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m9; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m3; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m1; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m13; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m12; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m11; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m14; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m2; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m6; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m5; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m10; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m4; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m0; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m15; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m8; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m9; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m0; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m5; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m7; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m2; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m4; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m10; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m15; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m14; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m1; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m11; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m12; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m6; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m8; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m3; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m13; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m2; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m12; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m6; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m10; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m0; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m11; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m8; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m3; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m4; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m13; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m7; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m5; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m15; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m14; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m1; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m9; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m12; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m5; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m1; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m15; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m14; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m13; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m4; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m10; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m0; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m7; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m6; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m3; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m9; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m2; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m8; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m11; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m13; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m11; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m7; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m14; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m12; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m1; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m3; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m9; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m5; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m0; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m15; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m4; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m8; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m6; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m2; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m10; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m6; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m15; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m14; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m9; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m11; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m3; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m0; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m8; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m12; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m2; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m13; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m7; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m1; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m4; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m10; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m5; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m10; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m2; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m8; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m4; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m7; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m6; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m1; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m5; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m15; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m11; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m9; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m14; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m3; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m12; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m13; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m0; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m0; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m1; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m2; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m3; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m4; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m5; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m6; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m7; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m8; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m9; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m10; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m11; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m12; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m13; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m14; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m15; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    v0 = v0 + v4 + m14; v12 = _rotr(v12 ^ v0, 32); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 24)
    v0 = v0 + v4 + m10; v12 = _rotr(v12 ^ v0, 16); v8 = v8 + v12; v4 = _rotr(v4 ^ v8, 63)
    v1 = v1 + v5 + m4; v13 = _rotr(v13 ^ v1, 32); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 24)
    v1 = v1 + v5 + m8; v13 = _rotr(v13 ^ v1, 16); v9 = v9 + v13; v5 = _rotr(v5 ^ v9, 63)
    v2 = v2 + v6 + m9; v14 = _rotr(v14 ^ v2, 32); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 24)
    v2 = v2 + v6 + m15; v14 = _rotr(v14 ^ v2, 16); v10 = v10 + v14; v6 = _rotr(v6 ^ v10, 63)
    v3 = v3 + v7 + m13; v15 = _rotr(v15 ^ v3, 32); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 24)
    v3 = v3 + v7 + m6; v15 = _rotr(v15 ^ v3, 16); v11 = v11 + v15; v7 = _rotr(v7 ^ v11, 63)
    v0 = v0 + v5 + m1; v15 = _rotr(v15 ^ v0, 32); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 24)
    v0 = v0 + v5 + m12; v15 = _rotr(v15 ^ v0, 16); v10 = v10 + v15; v5 = _rotr(v5 ^ v10, 63)
    v1 = v1 + v6 + m0; v12 = _rotr(v12 ^ v1, 32); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 24)
    v1 = v1 + v6 + m2; v12 = _rotr(v12 ^ v1, 16); v11 = v11 + v12; v6 = _rotr(v6 ^ v11, 63)
    v2 = v2 + v7 + m11; v13 = _rotr(v13 ^ v2, 32); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 24)
    v2 = v2 + v7 + m7; v13 = _rotr(v13 ^ v2, 16); v8 = v8 + v13; v7 = _rotr(v7 ^ v8, 63)
    v3 = v3 + v4 + m5; v14 = _rotr(v14 ^ v3, 32); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 24)
    v3 = v3 + v4 + m3; v14 = _rotr(v14 ^ v3, 16); v9 = v9 + v14; v4 = _rotr(v4 ^ v9, 63)
    h[0] ^= v0 ^ v8
    h[1] ^= v1 ^ v9
    h[2] ^= v2 ^ v10
    h[3] ^= v3 ^ v11
    h[4] ^= v4 ^ v12
    h[5] ^= v5 ^ v13
    h[6] ^= v6 ^ v14
    h[7] ^= v7 ^ v15


cdef void _b2_init(uint64_t* h, int digest_size, const uint8_t* person, Py_ssize_t plen) noexcept nogil:
    # the parameter block: digest length, key length 0, fanout 1, depth 1,
    # no salt, the personalisation (zero-padded to 16 bytes) in words 6 and 7
    cdef uint8_t p16[16]
    cdef int i
    memset(p16, 0, 16)
    memcpy(p16, person, plen)
    for i in range(8):
        h[i] = _B2_IV[i]
    h[0] ^= 0x01010000ULL ^ <uint64_t>digest_size
    h[6] ^= _rd(p16, 8)
    h[7] ^= _rd(p16 + 8, 8)


cdef void _b2_digest(const uint64_t* h0, const uint8_t* data, Py_ssize_t n, uint8_t* out,
                     int digest_size) noexcept nogil:
    cdef uint64_t h[8]
    cdef uint8_t last[128]
    cdef uint8_t full[64]
    cdef Py_ssize_t done = 0
    cdef int i
    memcpy(h, h0, sizeof(h))
    while n - done > 128:
        _b2_compress(h, data + done, <uint64_t>(done + 128), False)
        done += 128
    memset(last, 0, 128)
    memcpy(last, data + done, n - done)
    _b2_compress(h, last, <uint64_t>n, True)
    for i in range(8):
        _le(full + 8 * i, h[i], 8)
    memcpy(out, full, digest_size)


def blake2b(data, bytes person=b"", int digest_size=64):
    """``hashlib.blake2b(data, digest_size=..., person=...).digest()``, for the tests."""
    cdef const uint8_t[::1] mv = data
    cdef uint64_t h[8]
    cdef uint8_t out[64]
    if not 1 <= digest_size <= 64:
        raise ValueError(f"digest_size must be 1 to 64, got {digest_size}")
    if PyBytes_GET_SIZE(person) > 16:
        raise ValueError(f"person must be at most 16 bytes, got {PyBytes_GET_SIZE(person)}")
    _b2_init(h, digest_size, <const uint8_t*>PyBytes_AS_STRING(person), PyBytes_GET_SIZE(person))
    _b2_digest(h, &mv[0] if mv.shape[0] else <const uint8_t*>out, mv.shape[0], out, digest_size)
    return PyBytes_FromStringAndSize(<char*>out, digest_size)


# the task keys' hash (_keys._TASK_HASH): its personalisation and length,
# exported as KEY_LAYOUT for _keys.py's import-time check, like RECORD_LAYOUT
cdef bytes _TASK_PERSON = b"awf-task-1"
cdef enum:
    KEY_DIGEST = 32
cdef uint64_t _TASK_H0[8]
_b2_init(_TASK_H0, KEY_DIGEST, <const uint8_t*>PyBytes_AS_STRING(_TASK_PERSON),
         PyBytes_GET_SIZE(_TASK_PERSON))

#: the task-key hash this build computes, for _keys.py's import-time check
KEY_LAYOUT = {"PERSON_TASK": _TASK_PERSON, "DIGEST_SIZE": KEY_DIGEST}


cdef object _quick_key(bytes fn_identity, tuple args, object leaf):
    # the body of quick_key; None: the general encoder takes the call
    cdef uint8_t stack[512]
    cdef Buf b
    cdef int overflow
    cdef long long iv
    cdef double dv
    cdef uint64_t bits
    cdef uint8_t out[KEY_DIGEST]
    cdef object sub, enc
    # a stack buffer for the common call; _grow moves it to the heap
    b.p = stack
    b.n = 0
    b.cap = 512
    b.heap = False
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
        _b2_digest(_TASK_H0, b.p, b.n, out, KEY_DIGEST)
        return PyBytes_FromStringAndSize(<char*>out, KEY_DIGEST)
    finally:
        if b.heap:
            free(b.p)


def quick_key(bytes fn_identity, tuple args, leaf):
    """The task key ``_keys._quick_key_py`` makes, or None.

    The same bytes hashed with the same BLAKE2b (``_keys._TASK_HASH``:
    32 bytes, person ``KEY_LAYOUT["PERSON_TASK"]``), computed here.
    None when an argument is not an int (64-bit), str, float, None or a leaf
    (the general encoder takes those), or when ``leaf`` returns something
    other than bytes or None (the general path raises the error).
    """
    return _quick_key(fn_identity, args, leaf)


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


# ------------------------------------------------------------ bulk appends
# CheckpointLog.put_results and put_done (the scheduler's finished tasks, via
# Recorder.record) per batch: what their Python loops do per item, for the
# common items, in one call per batch. An item
# this code does not take (a large or unpicklable value, a name not yet
# cached, anything to report) stops the loop at that item; the Python code
# handles it the general way and calls again after it, so records are
# appended in the order of the items whichever code made them.

cdef extern from "Python.h":
    Py_ssize_t PyTuple_GET_SIZE(object t)
    int PyByteArray_Resize(object ba, Py_ssize_t size) except -1
    char* PyByteArray_AS_STRING(object ba)
    Py_ssize_t PyByteArray_GET_SIZE(object ba)
    PyObject* PyDict_SetDefault(object d, object key, object default) except NULL

cdef enum:
    COMPRESS_MIN = 1 << 16
    # why append_small_results returned
    STOP_DONE = 0
    STOP_FULL = 1
    STOP_ITEM = 2

RECORD_LAYOUT["COMPRESS_MIN"] = COMPRESS_MIN


cdef Py_ssize_t _scalar_pickle(object v, uint8_t* out) noexcept:
    # pickle.dumps(v, protocol=5) of None, a bool, an int in [-2**31, 2**31)
    # or a float, written into out (>= 32 bytes); -1 for anything else. The
    # pickler frames what it writes after the protocol header once that is
    # 4 bytes or more (PROTO 5 | FRAME u64 | body | STOP); shorter bodies
    # go unframed. The tests compare these bytes with pickle.dumps.
    cdef uint8_t body[16]
    cdef Py_ssize_t n = 0
    cdef long long iv
    cdef int overflow
    cdef double dv
    cdef uint64_t bits
    cdef int i
    t = type(v)
    if v is None:
        body[0] = b"N"
        n = 1
    elif t is bool:
        body[0] = 0x88 if v is True else 0x89
        n = 1
    elif t is int:
        iv = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow or iv < -2147483648LL or iv > 2147483647LL:
            return -1
        if 0 <= iv < 256:
            body[0] = b"K"
            body[1] = <uint8_t>iv
            n = 2
        elif 0 <= iv < 65536:
            body[0] = b"M"
            _le(body + 1, <uint64_t>iv, 2)
            n = 3
        else:
            body[0] = b"J"
            _le(body + 1, <uint64_t>(<uint32_t>(<int32_t>iv)), 4)
            n = 5
    elif t is float:
        dv = v
        memcpy(&bits, &dv, 8)
        body[0] = b"G"
        for i in range(8):  # big-endian, as pickle writes a BINFLOAT
            body[1 + i] = <uint8_t>(bits >> (8 * (7 - i)))
        n = 9
    else:
        return -1
    body[n] = b"."
    n += 1
    out[0] = 0x80
    out[1] = 5
    if n < 4:
        memcpy(out + 2, body, n)
        return 2 + n
    out[2] = 0x95
    _le(out + 3, <uint64_t>n, 8)
    memcpy(out + 11, body, n)
    return 11 + n


def scalar_pickle(v):
    """``pickle.dumps(v, protocol=5)`` when the bulk append writes it itself, else None."""
    cdef uint8_t out[32]
    cdef Py_ssize_t n = _scalar_pickle(v, out)
    if n < 0:
        return None
    return PyBytes_FromStringAndSize(<char*>out, n)


cdef inline Py_ssize_t _parents_len(tuple parents) noexcept:
    # the bytes of a RESULT record's parents section; -1: a parent is not a
    # bytes key of 1 to MAX_KEY bytes, or there are too many (the caller's
    # general path reports it)
    cdef Py_ssize_t pblen = 0
    if PyTuple_GET_SIZE(parents) > 0xFFFF:
        return -1
    for p in parents:
        if type(p) is not bytes or not 0 < PyBytes_GET_SIZE(p) <= MAX_KEY:
            return -1
        pblen += 2 + PyBytes_GET_SIZE(p)
    return pblen


cdef Py_ssize_t _small_size(Py_ssize_t klen, Py_ssize_t nlen, Py_ssize_t pblen,
                            Py_ssize_t plen) noexcept:
    # the size of the small RESULT record _emit_small writes
    cdef Py_ssize_t used = HEADER_SIZE + klen + RESULT_META_SIZE + nlen + pblen
    cdef Py_ssize_t pad = (ALIGN - used % ALIGN) % ALIGN
    return used + pad + VALUE_HEAD_SIZE + plen


cdef int _emit_small(bytearray pending, bytearray sizes, bytes key, double now, bytes name,
                     tuple parents, Py_ssize_t pblen, const char* pay,
                     Py_ssize_t plen) except -1:
    # append the record _format._py_result_record makes to pending, its
    # size (u32) to sizes
    cdef Py_ssize_t klen = PyBytes_GET_SIZE(key), nlen = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t used = HEADER_SIZE + klen + RESULT_META_SIZE + nlen + pblen
    cdef Py_ssize_t pad = (ALIGN - used % ALIGN) % ALIGN
    cdef Py_ssize_t blen = (used + pad - HEADER_SIZE - klen) + VALUE_HEAD_SIZE + plen
    cdef Py_ssize_t size = HEADER_SIZE + klen + blen
    cdef Py_ssize_t at = PyByteArray_GET_SIZE(pending), pos
    cdef uint64_t bits
    cdef uint8_t* r
    PyByteArray_Resize(pending, at + size)
    r = <uint8_t*>PyByteArray_AS_STRING(pending) + at
    memcpy(r, PyBytes_AS_STRING(_RECORD_MAGIC), 4)
    r[8] = T_RESULT
    r[9] = 0
    _le(r + 10, klen, 2)
    _le(r + 12, blen, 8)
    pos = HEADER_SIZE
    memcpy(r + pos, PyBytes_AS_STRING(key), klen)
    pos += klen
    memcpy(&bits, &now, 8)
    _le(r + pos, bits, 8)
    _le(r + pos + 8, used + pad, 4)
    _le(r + pos + 12, nlen, 2)
    _le(r + pos + 14, PyTuple_GET_SIZE(parents), 2)
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
    memcpy(r + pos, pay, plen)
    _le(r + 4, _crc32(r + CRC_FROM, size - CRC_FROM), 4)
    at = PyByteArray_GET_SIZE(sizes)
    PyByteArray_Resize(sizes, at + 4)
    _le(<uint8_t*>PyByteArray_AS_STRING(sizes) + at, size, 4)
    return 0


def append_small_results(list items, Py_ssize_t start, double now, dict names, pack,
                         bytearray pending, bytearray sizes, list pkeys, dict results,
                         Py_ssize_t end, Py_ssize_t pending_max):
    """Append the small RESULT records of ``items[start:]`` to a log's write buffer.

    ``items``: ``(key, value, function, parents)`` as ``put_results`` takes
    them. Each record is the one ``_format._py_result_record`` makes with
    ``now``, appended to ``pending`` (its size to ``sizes``, a u32 each,
    little-endian; its key to ``pkeys``) and indexed in ``results`` at its
    offset (``end`` is the offset of the end of ``pending``). ``names``:
    the log's cache of encoded function names; ``pack``: ``_codec.pack``.

    Returns ``(i, end, appended, why, packed)``: the loop stopped before
    item ``i`` (``why`` is STOP_ITEM: the item is the caller's, ``packed``
    its ``(payload, bufs)`` when it was pickled), after item ``i - 1``
    (STOP_FULL: ``pending`` reached ``pending_max``, a flush is due), or
    at the end (STOP_DONE).
    """
    cdef Py_ssize_t i = start, n = len(items), appended = 0
    cdef Py_ssize_t klen, plen, pblen, size
    cdef uint8_t sbuf[32]
    cdef const char* pay
    cdef object item, key, value, function, parents, name, payload, bufs
    while i < n:
        item = items[i]
        if type(item) is not tuple or len(<tuple>item) != 4:
            return i, end, appended, STOP_ITEM, None
        key, value, function, parents = <tuple>item
        if type(key) is not bytes or type(parents) is not tuple:
            return i, end, appended, STOP_ITEM, None
        klen = PyBytes_GET_SIZE(key)
        if not 0 < klen <= MAX_KEY:
            return i, end, appended, STOP_ITEM, None
        name = names.get(function)
        if name is None:
            return i, end, appended, STOP_ITEM, None
        pblen = _parents_len(<tuple>parents)
        if pblen < 0:
            return i, end, appended, STOP_ITEM, None
        plen = _scalar_pickle(value, sbuf)
        if plen >= 0:
            pay = <const char*>sbuf
        else:
            bufs = []
            try:
                payload = pack(value, bufs)
            except Exception:
                return i, end, appended, STOP_ITEM, None  # the caller reports it
            if bufs or type(payload) is not bytes or PyBytes_GET_SIZE(payload) >= COMPRESS_MIN:
                return i, end, appended, STOP_ITEM, (payload, bufs)
            pay = PyBytes_AS_STRING(payload)
            plen = PyBytes_GET_SIZE(payload)
        size = _small_size(klen, PyBytes_GET_SIZE(name), pblen, plen)
        if size >= MAX_SMALL:  # DIRECT_MIN: written at once by the caller
            if pay == <const char*>sbuf:
                payload = PyBytes_FromStringAndSize(pay, plen)
                bufs = []
            return i, end, appended, STOP_ITEM, (payload, bufs)
        _emit_small(pending, sizes, <bytes>key, now, <bytes>name, <tuple>parents, pblen, pay,
                    plen)
        pkeys.append(key)
        results[key] = end
        end += size
        appended += 1
        i += 1
        if PyByteArray_GET_SIZE(pending) >= pending_max:
            return i, end, appended, STOP_FULL, None
    return i, end, appended, STOP_DONE, None


def fix_results(dict results, list pkeys, bytearray data, bytearray sizes,
                Py_ssize_t base, Py_ssize_t shift):
    """Move the index entries of the buffered RESULT records by ``shift`` bytes.

    ``data``: the buffered records, the first at offset ``base``; ``sizes``:
    their sizes (u32 little-endian each); ``pkeys``: the keys of the RESULT
    records among them, in order. An entry is moved only if it still points
    at its record (a later record of the same key has replaced it otherwise).
    """
    cdef const uint8_t* d = <const uint8_t*>PyByteArray_AS_STRING(data)
    cdef const uint8_t* s = <const uint8_t*>PyByteArray_AS_STRING(sizes)
    cdef Py_ssize_t count = PyByteArray_GET_SIZE(sizes) // 4
    cdef Py_ssize_t k, j = 0, pos = 0, nkeys = len(pkeys)
    cdef object key, cur
    for k in range(count):
        if d[pos + 8] == T_RESULT and j < nkeys:
            key = pkeys[j]
            j += 1
            cur = results.get(key)
            if cur is not None and <Py_ssize_t>cur == base + pos:
                results[key] = base + pos + shift
        pos += <Py_ssize_t>_rd(s + 4 * k, 4)


# The runtime's futures and options keep their fields in __slots__. Read
# through getattr, each field costs a type lookup and a descriptor call
# (about 15 ns); append_done and RecorderFast.key read six per task. Once
# bind_task_types has found where the slots lie in the two classes, they
# are read at their offsets, for instances of those classes only; any
# other object (the tests' stand-ins) still goes through getattr.
cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    enum:
        T_OBJECT_EX

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    ctypedef struct PyTypeObject:
        pass
    bint PyObject_TypeCheck(object o, PyTypeObject* t)

cdef struct _TaskSlots:
    Py_ssize_t ckey, fn, opts, cparents  # a future's
    Py_ssize_t name, key, version        # its options'

cdef _TaskSlots _SLOTS
cdef object _FUT_TYPE = None
cdef object _OPTS_TYPE = None


cdef Py_ssize_t _slot_offset(type cls, str name) except -1:
    d = getattr(cls, name)
    if type(d) is not _types.MemberDescriptorType:
        raise TypeError(f"{cls.__name__}.{name} is not a slot: {type(d).__name__}")
    cdef PyMemberDef* m = (<PyMemberDescrObject*><PyObject*>d).d_member
    if m.type != T_OBJECT_EX:
        raise TypeError(f"{cls.__name__}.{name} is not an object slot (type {m.type})")
    return m.offset


def bind_task_types(type fut_type, type opts_type):
    """Read the slots of ``fut_type`` and ``opts_type`` instances at their offsets from now on.

    ``fut_type``: the runtime's future class, with object slots ``_ckey``,
    ``_fn``, ``_opts`` and ``_cparents``; ``opts_type``: its options class,
    with ``name``, ``key`` and ``version``. Raises TypeError, binding
    nothing, if one of them is not such a slot.
    """
    global _SLOTS, _FUT_TYPE, _OPTS_TYPE
    cdef _TaskSlots s
    s.ckey = _slot_offset(fut_type, "_ckey")
    s.fn = _slot_offset(fut_type, "_fn")
    s.opts = _slot_offset(fut_type, "_opts")
    s.cparents = _slot_offset(fut_type, "_cparents")
    s.name = _slot_offset(opts_type, "name")
    s.key = _slot_offset(opts_type, "key")
    s.version = _slot_offset(opts_type, "version")
    _SLOTS = s
    _FUT_TYPE = fut_type
    _OPTS_TYPE = opts_type


cdef inline PyObject* _field(object o, Py_ssize_t off) noexcept:
    # borrowed; NULL while the slot is unset
    return (<PyObject**>((<char*><PyObject*>o) + off))[0]


def append_done(list done, Py_ssize_t start, dict fn_names, Py_ssize_t big, double now,
                dict names, pack, bytearray pending, bytearray sizes, list pkeys,
                dict results, Py_ssize_t end, Py_ssize_t pending_max):
    """``CheckpointLog.put_done``'s loop: records of finished tasks straight from ``done``.

    ``done``: ``(future, value)`` pairs, as the scheduler hands them to its
    recorder. A future whose key (``_ckey``) is in ``results`` (the log's
    index, with the records this call appended) is skipped: an identical
    task finished earlier (a skipped pair that this loop would not take is
    left to the caller as below, whose general way skips it too). For the
    others, the record ``append_small_results``
    makes of ``(_ckey, value, fn_names[_fn], _cparents)`` is appended the
    same way (the same arguments and result).

    Stops before the first pair it does not take (``why`` STOP_ITEM, with
    ``packed`` as there): a task with ``name=``, a function not in
    ``fn_names`` or whose name is not in ``names``, a value whose size
    counts toward ``warn_bytes`` (anything but a few built-in types, or
    bytes of ``big`` bytes or more), a value that is not small once pickled,
    or anything odd about the key or the parents.
    """
    cdef Py_ssize_t i = start, n = len(done), appended = 0
    cdef Py_ssize_t klen, plen, pblen, size
    cdef uint8_t sbuf[32]
    cdef const char* pay
    cdef object pair, fut, value, key, fn, name, bname, parents, payload, bufs, t, at
    cdef PyObject *pk
    cdef PyObject *pf
    cdef PyObject *po
    cdef PyObject *pp
    while i < n:
        pair = done[i]
        if type(pair) is not tuple or len(<tuple>pair) != 2:
            return i, end, appended, STOP_ITEM, None
        fut, value = <tuple>pair
        t = type(value)
        if not (value is None or t is int or t is float or t is bool or t is str
                or t is tuple or t is list or t is dict or t is complex):
            if t is not bytes or PyBytes_GET_SIZE(value) >= big:
                return i, end, appended, STOP_ITEM, None
        if _FUT_TYPE is not None and PyObject_TypeCheck(fut, <PyTypeObject*>_FUT_TYPE):
            pk = _field(fut, _SLOTS.ckey)
            pf = _field(fut, _SLOTS.fn)
            po = _field(fut, _SLOTS.opts)
            pp = _field(fut, _SLOTS.cparents)
            if pk == NULL or pf == NULL or po == NULL or pp == NULL:
                return i, end, appended, STOP_ITEM, None
            if type(<object>po) is not _OPTS_TYPE or _field(<object>po, _SLOTS.name) != <PyObject*>None:
                return i, end, appended, STOP_ITEM, None
            key = <object>pk
            fn = <object>pf
            parents = <object>pp
        else:
            key = fut._ckey
            if fut._opts.name is not None:
                return i, end, appended, STOP_ITEM, None
            fn = fut._fn
            parents = fut._cparents
        try:
            name = fn_names.get(fn)
        except TypeError:  # an unhashable callable object
            return i, end, appended, STOP_ITEM, None
        if name is None:
            return i, end, appended, STOP_ITEM, None
        bname = names.get(name)
        if (bname is None or type(bname) is not bytes or type(key) is not bytes
                or type(parents) is not tuple):
            return i, end, appended, STOP_ITEM, None
        klen = PyBytes_GET_SIZE(key)
        if not 0 < klen <= MAX_KEY:
            return i, end, appended, STOP_ITEM, None
        pblen = _parents_len(<tuple>parents)
        if pblen < 0:
            return i, end, appended, STOP_ITEM, None
        plen = _scalar_pickle(value, sbuf)
        if plen >= 0:
            pay = <const char*>sbuf
        else:
            bufs = []
            try:
                payload = pack(value, bufs)
            except Exception:
                return i, end, appended, STOP_ITEM, None  # the caller reports it
            if bufs or type(payload) is not bytes or PyBytes_GET_SIZE(payload) >= COMPRESS_MIN:
                return i, end, appended, STOP_ITEM, (payload, bufs)
            pay = PyBytes_AS_STRING(payload)
            plen = PyBytes_GET_SIZE(payload)
        size = _small_size(klen, PyBytes_GET_SIZE(bname), pblen, plen)
        if size >= MAX_SMALL:  # DIRECT_MIN: written at once by the caller
            if pay == <const char*>sbuf:
                payload = PyBytes_FromStringAndSize(pay, plen)
                bufs = []
            return i, end, appended, STOP_ITEM, (payload, bufs)
        # the index entry and the test for an identical task that finished
        # earlier (its key indexed already: nothing to append) in one probe
        at = end
        if <object>PyDict_SetDefault(results, key, at) is not at:
            i += 1
            continue
        _emit_small(pending, sizes, <bytes>key, now, <bytes>bname, <tuple>parents, pblen, pay,
                    plen)
        pkeys.append(key)
        end += size
        appended += 1
        i += 1
        if PyByteArray_GET_SIZE(pending) >= pending_max:
            return i, end, appended, STOP_FULL, None
    return i, end, appended, STOP_DONE, None


# ------------------------------------------------------- the recorder's calls
cdef class RecorderFast:
    """What the scheduler calls on its checkpoint recorder per task, without a Python frame.

    ``async_wf._recorder.Recorder`` derives from this class (from its twin
    ``_recorder._RecorderFastPy`` without the extension). ``key`` takes the
    commonest call here: no futures, no keyword arguments, no ``key=`` or
    ``version=`` option, a function whose identity is cached in ``_fids``,
    and arguments ``quick_key`` encodes; anything else is the subclass's
    ``_key``. ``in`` looks a key up in ``_live``, the log's index.
    """

    cdef public dict _fids
    cdef public dict _live

    def key(self, fn, opts, args, kwargs, found, plan=None):
        """The task's key, or None when it cannot have one (``Recorder._key`` says when)."""
        cdef object fid, key
        cdef bint plain
        if type(opts) is _OPTS_TYPE:
            plain = (_field(opts, _SLOTS.key) == <PyObject*>None
                     and _field(opts, _SLOTS.version) == <PyObject*>None)
        else:
            plain = opts.key is None and opts.version is None
        if plain and not found and not kwargs and type(args) is tuple:
            try:
                fid = self._fids.get(fn)
            except TypeError:  # an unhashable callable object
                fid = None
            if type(fid) is bytes:
                key = _quick_key(<bytes>fid, <tuple>args, None)
                if key is not None:
                    return key
        return self._key(fn, opts, args, kwargs, found, plan)

    def __contains__(self, key):
        return key in self._live
