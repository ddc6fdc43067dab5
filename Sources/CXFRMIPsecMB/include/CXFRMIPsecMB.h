// C shim over Intel ipsec-mb (libIPSec_MB) for the ESP hot path: the library's direct AES-GCM, AES-GMAC and
// ChaCha20-Poly1305 APIs and its job API for AES-CBC with HMAC-SHA-1/2. Pointers are void* so Swift raw pointers
// pass without rebinding. Key schedules (GCM hash keys, AES round keys, HMAC inner/outer states) are expanded once
// per SA; the library's manager (IMB_MGR) is per thread, made on a thread's first packet and freed when it exits.
// No per-packet call allocates; every ICV is compared in constant time; key material is wiped when freed.
#ifndef CXFRM_IPSEC_MB_H
#define CXFRM_IPSEC_MB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// 1 when the library runs on this CPU with AES-NI (its SSE, AVX, AVX2 or AVX-512 code): the manager initialises
/// and a known-answer AES-128-GCM test passes. 0 otherwise (the backend is then unavailable).
int xfrm_mb_available(void);
/// The library's version and the architecture it chose, e.g. "ipsec-mb 1.3.0 avx2".
const char *xfrm_mb_description(void);

/// AEAD kinds (≈ the kernel's rfc4106 / rfc7539esp / rfc4543 templates).
enum {
    XFRM_MB_AES_GCM = 1,
    XFRM_MB_CHACHA20_POLY1305 = 2,
    XFRM_MB_AES_GMAC = 3,
};

typedef struct xfrm_mb_aead xfrm_mb_aead;
/// A pre-keyed AEAD: `key` excludes the 4-byte salt. NULL on an unsupported kind, key length or ICV length.
xfrm_mb_aead *xfrm_mb_aead_new(int kind, const void *key, size_t key_len, const void *salt4, int icv_len);
void xfrm_mb_aead_free(xfrm_mb_aead *ctx);
/// Seals the ESP packet at `esp` in place (RFC 4303 §2: SPI, sequence number, the 8-byte IV, then `crypt_len` bytes
/// of payload and trailer, then room for the ICV): nonce = salt || IV; AAD = `aad` (SPI || seq, or with ESN
/// SPI || seq-hi || seq-lo); the payload is encrypted in place and the ICV written behind it. `integrity_only` (GMAC,
/// RFC 4543 §3.3, and only GMAC): IV || payload is more AAD and nothing is encrypted. Returns 1 on success.
int xfrm_mb_aead_seal_esp(xfrm_mb_aead *ctx, void *esp, size_t crypt_len, const void *aad, size_t aad_len,
                          int integrity_only);
/// Opens the ESP packet at `esp` in place and compares the ICV behind the payload in constant time. Returns 1 when
/// it verifies (otherwise the payload holds unspecified bytes that must be discarded).
int xfrm_mb_aead_open_esp(xfrm_mb_aead *ctx, void *esp, size_t crypt_len, const void *aad, size_t aad_len,
                          int integrity_only);

/// HMAC digests for the CBC transforms (RFC 2404 / RFC 4868).
enum {
    XFRM_MB_HMAC_NONE = 0,
    XFRM_MB_HMAC_SHA1 = 1,
    XFRM_MB_HMAC_SHA256 = 2,
    XFRM_MB_HMAC_SHA384 = 3,
    XFRM_MB_HMAC_SHA512 = 4,
};

typedef struct xfrm_mb_cbc xfrm_mb_cbc;
/// AES-CBC (RFC 3602, 128/192/256-bit key) with an HMAC (or none), encrypt-then-MAC, ICV truncated to icv_len
/// bytes. NULL on an unsupported key length or an ICV longer than the digest.
xfrm_mb_cbc *xfrm_mb_cbc_new(const void *key, size_t key_len, int hmac, const void *auth_key, size_t auth_key_len,
                             int icv_len);
void xfrm_mb_cbc_free(xfrm_mb_cbc *ctx);
/// Writes a 16-byte IV AES_K(salt || counter) (NIST SP 800-38A Appendix C; salt drawn per context).
void xfrm_mb_cbc_make_iv(xfrm_mb_cbc *ctx, uint64_t counter, void *iv16);
/// ESP seal: `esp` points at the SPI; the IV (16 bytes) follows SPI and sequence number; `crypt_len` bytes after
/// the IV are encrypted in place; the ICV is written after them, over SPI .. end of ciphertext and then, with ESN,
/// the 4-byte high half `esn_hi_be` (big-endian, authenticated, not sent). Returns 1 on success.
int xfrm_mb_cbc_seal(xfrm_mb_cbc *ctx, void *esp, size_t crypt_len, int has_esn, uint32_t esn_hi_be);
/// ESP open: one job hashes and decrypts in place, then the ICV is compared in constant time. Returns 1 when it
/// verifies; otherwise the payload holds unspecified bytes that must be discarded.
int xfrm_mb_cbc_open(xfrm_mb_cbc *ctx, void *esp, size_t crypt_len, int has_esn, uint32_t esn_hi_be);

/// The benchmark reference: the library's AES-128-GCM direct API on a buffer, nothing around it.
typedef struct xfrm_mb_raw_gcm xfrm_mb_raw_gcm;
xfrm_mb_raw_gcm *xfrm_mb_raw_gcm_new(const void *key16);
void xfrm_mb_raw_gcm_free(xfrm_mb_raw_gcm *ctx);
void xfrm_mb_raw_gcm_seal(xfrm_mb_raw_gcm *ctx, const void *nonce12, const void *aad, size_t aad_len, void *data,
                          size_t len, void *tag16);
/// Returns 1 when the tag verifies.
int xfrm_mb_raw_gcm_open(xfrm_mb_raw_gcm *ctx, const void *nonce12, const void *aad, size_t aad_len, void *data,
                         size_t len, const void *tag16);

#ifdef __cplusplus
}
#endif
#endif
