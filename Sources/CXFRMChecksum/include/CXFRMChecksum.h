#pragma once
#include <stddef.h>
#include <stdint.h>

/// The Internet checksum's sum (RFC 1071) of `n` bytes at `p`, as big-endian 16-bit words, folded to 16 bits with
/// end-around carries and not complemented (0 … 0xffff). With AVX2 (checked once at run time) 64 bytes are summed per
/// step in 32-bit lanes; otherwise 32-bit words into a 64-bit sum.
uint32_t xfrm_checksum_sum(const void *p, size_t n);
