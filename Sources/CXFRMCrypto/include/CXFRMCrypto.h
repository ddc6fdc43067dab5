// C shim over OpenSSL libcrypto for the ESP hot path.
// Pointers are void* so Swift raw pointers pass without rebinding. Every context is pre-keyed once per SA
// and reused for every packet; none of the per-packet calls allocate.
#ifndef CXFRM_CRYPTO_H
#define CXFRM_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// AEAD kinds (≈ the kernel's rfc4106 / rfc7539esp / rfc4543 templates).
enum {
    XFRM_AEAD_AES_GCM = 1,
    XFRM_AEAD_CHACHA20_POLY1305 = 2,
    /// AES-GMAC (RFC 4543): GCM over AAD only; the ESP calls must say `integrity_only`.
    XFRM_AEAD_AES_GMAC = 3,
};

typedef struct xfrm_aead xfrm_aead;

/// Creates a pre-keyed AEAD context (one EVP context, used for both directions; calls on one context must not
/// overlap). `key` excludes the salt.
/// Returns NULL on an unsupported kind or key length.
xfrm_aead *xfrm_aead_new(int kind, const void *key, size_t key_len, const void *salt4, int icv_len);
/// Frees the context; OpenSSL cleanses the key schedules and we cleanse the salt.
void xfrm_aead_free(xfrm_aead *ctx);

/// Seals the ESP packet at `esp` in place (RFC 4303 §2: SPI, sequence number, the 8-byte IV, then `crypt_len` bytes
/// of payload and trailer, then room for `icv_len` bytes of ICV): nonce = salt || IV; AAD = `aad`; the payload is
/// encrypted in place and the ICV written behind it. `integrity_only` (GMAC, RFC 4543 §3.3): IV || payload is more
/// AAD and nothing is encrypted. Six arguments or fewer, all in registers. Returns 1 on success.
int xfrm_aead_seal_esp(xfrm_aead *ctx, void *esp, size_t crypt_len, const void *aad, size_t aad_len,
                       int integrity_only);
/// Opens the ESP packet at `esp` in place and verifies the ICV behind the payload (OpenSSL compares in constant
/// time). Returns 1 when it verifies.
int xfrm_aead_open_esp(xfrm_aead *ctx, void *esp, size_t crypt_len, const void *aad, size_t aad_len,
                       int integrity_only);

typedef struct xfrm_cbc xfrm_cbc;
/// AES-CBC (RFC 3602) with 128/192/256-bit keys, no padding (ESP pads itself).
xfrm_cbc *xfrm_cbc_new(const void *key, size_t key_len);
void xfrm_cbc_free(xfrm_cbc *ctx);
/// Encrypts `len` bytes (a multiple of 16) in place with the given 16-byte IV. Returns 1 on success.
int xfrm_cbc_encrypt(xfrm_cbc *ctx, const void *iv16, void *data, size_t len);
/// Decrypts `len` bytes (a multiple of 16) in place. Returns 1 on success.
int xfrm_cbc_decrypt(xfrm_cbc *ctx, const void *iv16, void *data, size_t len);
/// Writes a 16-byte IV derived from a unique 64-bit counter: AES_K(salt || counter) with a random 8-byte salt drawn
/// when the context is made (the NIST SP 800-38A Appendix C construction), so IVs are unpredictable and never
/// repeat under one key, even when the same key is installed again with the same starting sequence number.
int xfrm_cbc_make_iv(xfrm_cbc *ctx, uint64_t counter, void *iv16);

/// HMAC digests (RFC 2404 / RFC 4868).
enum {
    XFRM_HMAC_SHA1 = 1,
    XFRM_HMAC_SHA256 = 2,
    XFRM_HMAC_SHA384 = 3,
    XFRM_HMAC_SHA512 = 4,
};
typedef struct xfrm_hmac xfrm_hmac;
/// Precomputes the inner and outer hash states for `key` (ipad/opad), so a packet costs no key setup.
xfrm_hmac *xfrm_hmac_new(int kind, const void *key, size_t key_len);
void xfrm_hmac_free(xfrm_hmac *ctx);
/// Full digest length of the context's hash.
size_t xfrm_hmac_digest_len(const xfrm_hmac *ctx);
/// HMAC over d1 || d2 (d2 may be empty: it carries the ESN high half for ESP). Writes the full digest to out.
void xfrm_hmac_compute(const xfrm_hmac *ctx, const void *d1, size_t l1, const void *d2, size_t l2, void *out);

/// Constant-time comparison (CRYPTO_memcmp). Returns 0 when equal.
int xfrm_ct_memcmp(const void *a, const void *b, size_t len);
/// Wipes memory in a way the compiler cannot elide (OPENSSL_cleanse).
void xfrm_cleanse(void *p, size_t len);

/// Relaxed atomic counter increment (per-reason drop counters shared across threads).
static inline void xfrm_counter_add(uint64_t *counter, uint64_t n) {
    __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}
static inline uint64_t xfrm_counter_load(const uint64_t *counter) {
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

/// Raw EVP AES-GCM reference for benchmarks: exactly the EVP calls a minimal user makes per record.
typedef struct evp_cipher_ctx_st xfrm_evp_ctx;
xfrm_evp_ctx *xfrm_bench_gcm_new(const void *key16, int enc);
int xfrm_bench_gcm_seal(xfrm_evp_ctx *ctx, const void *nonce12, const void *aad, int aad_len, void *data, int len,
                        void *tag16);
int xfrm_bench_gcm_open(xfrm_evp_ctx *ctx, const void *nonce12, const void *aad, int aad_len, void *data, int len,
                        const void *tag16);
void xfrm_bench_gcm_free(xfrm_evp_ctx *ctx);

#ifdef __cplusplus
}
#endif
#endif
