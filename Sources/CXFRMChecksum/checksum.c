// The Internet checksum's bulk sum (RFC 1071). The one's-complement sum of 16-bit words does not depend on byte order
// (RFC 1071 §2(B)): the words are summed in the machine's order and the folded result byte-swapped at the end.

#include "CXFRMChecksum.h"
#include <string.h>

/// Folds a sum of 16-bit words to 16 bits (2^16 ≡ 1 modulo 0xffff: each carry goes around).
static inline uint32_t fold(uint64_t s) {
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffu) + (s >> 16);
    s = (s & 0xffffu) + (s >> 16);
    s = (s & 0xffffu) + (s >> 16);
    return (uint32_t)s;
}

/// Native-order 16-bit words of `n` bytes, as 32-bit words into a 64-bit sum; a last odd byte is the low half of its
/// word on a little-endian machine, the high half on a big-endian one.
static uint64_t sum_words(const uint8_t *p, size_t n) {
    uint64_t a = 0, b = 0;
    while (n >= 8) {
        uint32_t x, y;
        memcpy(&x, p, 4);
        memcpy(&y, p + 4, 4);
        a += x;
        b += y;
        p += 8;
        n -= 8;
    }
    if (n >= 4) {
        uint32_t x;
        memcpy(&x, p, 4);
        a += x;
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        uint16_t x;
        memcpy(&x, p, 2);
        b += x;
        p += 2;
        n -= 2;
    }
    if (n) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        a += p[0];
#else
        a += (uint32_t)p[0] << 8;
#endif
    }
    return a + b;
}

#if defined(__x86_64__)
#include <immintrin.h>

/// The bytes below a multiple of 64 summed as 16-bit words in the 32-bit lanes of two AVX2 registers (a lane takes
/// at most two words per step: 2^15 steps, 2 MB, before it could overflow; the caller passes at most 1 MB at a time).
__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint8_t *p, size_t n) {
    const __m256i low = _mm256_set1_epi32(0xffff);
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (size_t i = 0; i + 64 <= n; i += 64) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i y = _mm256_loadu_si256((const __m256i *)(p + i + 32));
        s0 = _mm256_add_epi32(s0, _mm256_and_si256(x, low));
        s1 = _mm256_add_epi32(s1, _mm256_srli_epi32(x, 16));
        s0 = _mm256_add_epi32(s0, _mm256_and_si256(y, low));
        s1 = _mm256_add_epi32(s1, _mm256_srli_epi32(y, 16));
    }
    uint32_t lanes[16];
    _mm256_storeu_si256((__m256i *)lanes, s0);
    _mm256_storeu_si256((__m256i *)(lanes + 8), s1);
    uint64_t s = 0;
    for (int k = 0; k < 16; k++) s += lanes[k];
    return s;
}

static int have_avx2(void) {
    static int known = -1;  // any thread may ask first: each finds the same answer
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (k < 0) {
        __builtin_cpu_init();
        k = __builtin_cpu_supports("avx2") ? 1 : 0;
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k;
}
#endif

uint32_t xfrm_checksum_sum(const void *data, size_t n) {
    const uint8_t *p = data;
    uint64_t s = 0;
#if defined(__x86_64__)
    if (n >= 64 && have_avx2()) {
        while (n >= 64) {
            size_t chunk = n < (1u << 20) ? n : (1u << 20);
            chunk &= ~(size_t)63;
            s += fold(sum_avx2(p, chunk));
            p += chunk;
            n -= chunk;
        }
    }
#endif
    s += sum_words(p, n);
    uint32_t f = fold(s);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    f = __builtin_bswap16((uint16_t)f);
#endif
    return f;
}
