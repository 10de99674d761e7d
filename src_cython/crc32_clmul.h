/* zlib's CRC-32 (reflected polynomial 0xEDB88320) by carry-less
 * multiplication, for ckfast.pxi's _crc32.
 *
 * Why: every small checkpoint record is checksummed as it is buffered, and
 * every flush checksums the whole buffer again for its BLOCK index. The
 * table-driven loop costs about a cycle per byte; folding sixteen bytes at
 * a time with PCLMULQDQ costs a fraction of that. The method is the one
 * Intel published ("Fast CRC Computation for Generic Polynomials Using
 * PCLMULQDQ Instruction", 2009): fold four 128-bit lanes 64 bytes a step,
 * fold the lanes into one, then reduce 128 -> 64 -> 32 bits with a Barrett
 * reduction. The constants are powers of x modulo the polynomial, bit
 * reflected (tests/unit/test_ckpt_bulk.py derives them and compares every
 * length and alignment with zlib.crc32).
 *
 * awf_crc32_clmul works on the raw CRC state (the caller inverts before
 * and after) over n bytes, n >= 64 and a multiple of 16. awf_clmul_usable
 * says whether this CPU has the instructions; where the compiler or the
 * architecture cannot build them it is always 0 and the table is used.
 */
#ifndef AWF_CRC32_CLMUL_H
#define AWF_CRC32_CLMUL_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

/* x^(4*128+32), x^(4*128-32): fold a lane 64 bytes forward */
#define AWF_K1 0x154442bd4ULL
#define AWF_K2 0x1c6e41596ULL
/* x^(128+32), x^(128-32): fold 16 bytes forward */
#define AWF_K3 0x1751997d0ULL
#define AWF_K4 0x0ccaa009eULL
/* x^64: the 64 -> 32 bit fold */
#define AWF_K5 0x163cd6124ULL
/* the polynomial (33 bits, reflected) and its Barrett constant */
#define AWF_POLY 0x1db710641ULL
#define AWF_MU 0x1f7011641ULL

__attribute__((target("pclmul,sse4.1")))
static inline __m128i awf_fold16(__m128i acc, __m128i k, __m128i next)
{
    __m128i lo = _mm_clmulepi64_si128(acc, k, 0x00);
    __m128i hi = _mm_clmulepi64_si128(acc, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

__attribute__((target("pclmul,sse4.1")))
static uint32_t awf_crc32_clmul(uint32_t crc, const uint8_t *p, size_t n)
{
    const __m128i mask32 = _mm_setr_epi32(-1, 0, 0, 0);
    __m128i k, t;
    __m128i x0 = _mm_loadu_si128((const __m128i *)(p + 0));
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));

    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)crc));
    p += 64;
    n -= 64;
    k = _mm_set_epi64x((long long)AWF_K2, (long long)AWF_K1);
    while (n >= 64) {
        x0 = awf_fold16(x0, k, _mm_loadu_si128((const __m128i *)(p + 0)));
        x1 = awf_fold16(x1, k, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = awf_fold16(x2, k, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = awf_fold16(x3, k, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    /* four lanes into one, then what is left 16 bytes at a time */
    k = _mm_set_epi64x((long long)AWF_K4, (long long)AWF_K3);
    x0 = awf_fold16(x0, k, x1);
    x0 = awf_fold16(x0, k, x2);
    x0 = awf_fold16(x0, k, x3);
    while (n >= 16) {
        x0 = awf_fold16(x0, k, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    /* 128 -> 64 bits (appending 32 zero bits), then 64 -> 32 */
    t = _mm_clmulepi64_si128(k, x0, 0x01);
    x0 = _mm_xor_si128(_mm_srli_si128(x0, 8), t);
    t = _mm_srli_si128(x0, 4);
    x0 = _mm_and_si128(x0, mask32);
    x0 = _mm_clmulepi64_si128(x0, _mm_set_epi64x(0, (long long)AWF_K5), 0x00);
    x0 = _mm_xor_si128(x0, t);
    /* Barrett reduction to the 32-bit remainder */
    k = _mm_set_epi64x((long long)AWF_MU, (long long)AWF_POLY);
    t = _mm_and_si128(x0, mask32);
    t = _mm_clmulepi64_si128(t, k, 0x10);
    t = _mm_and_si128(t, mask32);
    t = _mm_clmulepi64_si128(t, k, 0x00);
    x0 = _mm_xor_si128(x0, t);
    return (uint32_t)_mm_extract_epi32(x0, 1);
}

static int awf_clmul_usable(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}

#else

static uint32_t awf_crc32_clmul(uint32_t crc, const uint8_t *p, size_t n)
{
    (void)p;
    (void)n;
    return crc; /* never called: awf_clmul_usable() is 0 */
}

static int awf_clmul_usable(void)
{
    return 0;
}

#endif
#endif
