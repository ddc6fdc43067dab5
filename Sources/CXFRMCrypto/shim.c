// OpenSSL libcrypto shim for swift-xfrm. See include/CXFRMCrypto.h.
#include "CXFRMCrypto.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>

/// One EVP context serves both directions: each call re-initialises it with its direction (the key schedule is the
/// same for sealing and opening, GCM and ChaCha20-Poly1305 only ever run the cipher forwards), which halves the
/// per-SA OpenSSL memory. Callers already serialise calls per SA (ESPTransform is one caller at a time).
struct xfrm_aead {
    EVP_CIPHER_CTX *evp;
    unsigned char salt[4];
    int icv_len;
    int gmac;  // AES-GMAC: every call must be integrity-only, and no other context's may be
};

static const EVP_CIPHER *aead_cipher(int kind, size_t key_len) {
    if (kind == XFRM_AEAD_AES_GCM || kind == XFRM_AEAD_AES_GMAC) {
        switch (key_len) {
        case 16: return EVP_aes_128_gcm();
        case 24: return EVP_aes_192_gcm();
        case 32: return EVP_aes_256_gcm();
        default: return NULL;
        }
    }
    if (kind == XFRM_AEAD_CHACHA20_POLY1305 && key_len == 32) return EVP_chacha20_poly1305();
    return NULL;
}

static EVP_CIPHER_CTX *aead_ctx(const EVP_CIPHER *cipher, const void *key, int enc) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return NULL;
    if (EVP_CipherInit_ex(ctx, cipher, NULL, NULL, NULL, enc) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) != 1 ||
        EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, enc) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

xfrm_aead *xfrm_aead_new(int kind, const void *key, size_t key_len, const void *salt4, int icv_len) {
    const EVP_CIPHER *cipher = aead_cipher(kind, key_len);
    if (!cipher || icv_len < 4 || icv_len > 16) return NULL;
    xfrm_aead *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->evp = aead_ctx(cipher, key, 1);
    if (!ctx->evp) {
        xfrm_aead_free(ctx);
        return NULL;
    }
    memcpy(ctx->salt, salt4, 4);
    ctx->icv_len = icv_len;
    ctx->gmac = kind == XFRM_AEAD_AES_GMAC;
    return ctx;
}

void xfrm_aead_free(xfrm_aead *ctx) {
    if (!ctx) return;
    EVP_CIPHER_CTX_free(ctx->evp);
    OPENSSL_cleanse(ctx, sizeof *ctx);
    free(ctx);
}

/// Runs the EVP context over the ESP packet at `esp` (the layout in the header): nonce = salt || IV, then the AAD,
/// then (GMAC) IV || payload as more AAD or (otherwise) the payload in place.
static int aead_esp(xfrm_aead *ctx, int enc, unsigned char *esp, size_t crypt_len, const void *aad, size_t aad_len,
                    int integrity_only) {
    unsigned char nonce[12];
    int outl = 0;
    // A flag that disagrees with the algorithm would send a GCM payload in clear; an ESP packet is at most 64 KiB,
    // which also keeps the int casts below exact.
    if (esp == NULL || aad == NULL || (ctx->gmac != 0) != (integrity_only != 0) || crypt_len > 65535) return 0;
    memcpy(nonce, ctx->salt, 4);
    memcpy(nonce + 4, esp + 8, 8);
    if (EVP_CipherInit_ex(ctx->evp, NULL, NULL, NULL, nonce, enc) != 1) return 0;
    if (aad_len && EVP_CipherUpdate(ctx->evp, NULL, &outl, aad, (int)aad_len) != 1) return 0;
    if (integrity_only) return EVP_CipherUpdate(ctx->evp, NULL, &outl, esp + 8, (int)(8 + crypt_len)) == 1;
    return crypt_len == 0 || EVP_CipherUpdate(ctx->evp, esp + 16, &outl, esp + 16, (int)crypt_len) == 1;
}

int xfrm_aead_seal_esp(xfrm_aead *ctx, void *esp, size_t crypt_len, const void *aad, size_t aad_len,
                       int integrity_only) {
    unsigned char tmp[16];
    int outl = 0;
    if (!aead_esp(ctx, 1, esp, crypt_len, aad, aad_len, integrity_only)) return 0;
    if (EVP_CipherFinal_ex(ctx->evp, tmp, &outl) != 1) return 0;
    return EVP_CIPHER_CTX_ctrl(ctx->evp, EVP_CTRL_AEAD_GET_TAG, ctx->icv_len, (unsigned char *)esp + 16 + crypt_len) == 1;
}

int xfrm_aead_open_esp(xfrm_aead *ctx, void *esp, size_t crypt_len, const void *aad, size_t aad_len,
                       int integrity_only) {
    unsigned char tmp[16];
    int outl = 0;
    if (!aead_esp(ctx, 0, esp, crypt_len, aad, aad_len, integrity_only)) return 0;
    if (EVP_CIPHER_CTX_ctrl(ctx->evp, EVP_CTRL_AEAD_SET_TAG, ctx->icv_len, (unsigned char *)esp + 16 + crypt_len) != 1)
        return 0;
    return EVP_CipherFinal_ex(ctx->evp, tmp, &outl) == 1;
}

struct xfrm_cbc {
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
    EVP_CIPHER_CTX *ivgen;
    /// Random per context (per SA): re-installing the same key with the same starting sequence number still
    /// gives new IVs (the role of the kernel's echainiv/seqiv salt).
    unsigned char salt[8];
};

static const EVP_CIPHER *cbc_cipher(size_t key_len) {
    switch (key_len) {
    case 16: return EVP_aes_128_cbc();
    case 24: return EVP_aes_192_cbc();
    case 32: return EVP_aes_256_cbc();
    default: return NULL;
    }
}

static const EVP_CIPHER *ecb_cipher(size_t key_len) {
    switch (key_len) {
    case 16: return EVP_aes_128_ecb();
    case 24: return EVP_aes_192_ecb();
    case 32: return EVP_aes_256_ecb();
    default: return NULL;
    }
}

static EVP_CIPHER_CTX *block_ctx(const EVP_CIPHER *cipher, const void *key, int enc) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return NULL;
    if (EVP_CipherInit_ex(ctx, cipher, NULL, key, NULL, enc) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    return ctx;
}

xfrm_cbc *xfrm_cbc_new(const void *key, size_t key_len) {
    const EVP_CIPHER *cbc = cbc_cipher(key_len);
    if (!cbc) return NULL;
    xfrm_cbc *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->enc = block_ctx(cbc, key, 1);
    ctx->dec = block_ctx(cbc, key, 0);
    ctx->ivgen = block_ctx(ecb_cipher(key_len), key, 1);
    if (!ctx->enc || !ctx->dec || !ctx->ivgen || RAND_bytes(ctx->salt, sizeof ctx->salt) != 1) {
        xfrm_cbc_free(ctx);
        return NULL;
    }
    return ctx;
}

void xfrm_cbc_free(xfrm_cbc *ctx) {
    if (!ctx) return;
    EVP_CIPHER_CTX_free(ctx->enc);
    EVP_CIPHER_CTX_free(ctx->dec);
    EVP_CIPHER_CTX_free(ctx->ivgen);
    OPENSSL_cleanse(ctx->salt, sizeof ctx->salt);
    free(ctx);
}

static int cbc_run(EVP_CIPHER_CTX *c, const void *iv16, void *data, size_t len) {
    int outl = 0;
    if (len % 16) return 0;
    if (EVP_CipherInit_ex(c, NULL, NULL, NULL, iv16, -1) != 1) return 0;
    if (len && EVP_CipherUpdate(c, data, &outl, data, (int)len) != 1) return 0;
    return 1;
}

int xfrm_cbc_encrypt(xfrm_cbc *ctx, const void *iv16, void *data, size_t len) {
    return cbc_run(ctx->enc, iv16, data, len);
}

int xfrm_cbc_decrypt(xfrm_cbc *ctx, const void *iv16, void *data, size_t len) {
    return cbc_run(ctx->dec, iv16, data, len);
}

int xfrm_cbc_make_iv(xfrm_cbc *ctx, uint64_t counter, void *iv16) {
    unsigned char block[16] = {0};
    int outl = 0;
    // The context's random salt, then the counter, big-endian: unique per (key, salt, counter), unpredictable.
    memcpy(block, ctx->salt, 8);
    for (int i = 0; i < 8; i++) block[15 - i] = (unsigned char)(counter >> (8 * i));
    return EVP_CipherUpdate(ctx->ivgen, iv16, &outl, block, 16) == 1 && outl == 16;
}

// HMAC by precomputed inner/outer states of the low-level hash API: copying a plain struct per packet is
// allocation-free, unlike EVP_MD_CTX_copy or EVP_MAC in OpenSSL 3.0.
struct xfrm_hmac {
    int kind;
    size_t digest_len;
    union {
        SHA_CTX sha1[2];
        SHA256_CTX sha256[2];
        SHA512_CTX sha512[2];
    } st;
};

static size_t hmac_block_len(int kind) { return (kind == XFRM_HMAC_SHA384 || kind == XFRM_HMAC_SHA512) ? 128 : 64; }

static void hash_once(int kind, const void *d, size_t l, unsigned char *out) {
    switch (kind) {
    case XFRM_HMAC_SHA1: SHA1(d, l, out); break;
    case XFRM_HMAC_SHA256: SHA256(d, l, out); break;
    case XFRM_HMAC_SHA384: SHA384(d, l, out); break;
    case XFRM_HMAC_SHA512: SHA512(d, l, out); break;
    }
}

xfrm_hmac *xfrm_hmac_new(int kind, const void *key, size_t key_len) {
    size_t dlen;
    switch (kind) {
    case XFRM_HMAC_SHA1: dlen = 20; break;
    case XFRM_HMAC_SHA256: dlen = 32; break;
    case XFRM_HMAC_SHA384: dlen = 48; break;
    case XFRM_HMAC_SHA512: dlen = 64; break;
    default: return NULL;
    }
    xfrm_hmac *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->kind = kind;
    ctx->digest_len = dlen;
    size_t blen = hmac_block_len(kind);
    unsigned char k[128] = {0}, pad[128];
    if (key_len > blen) hash_once(kind, key, key_len, k);
    else if (key_len) memcpy(k, key, key_len);
    for (int which = 0; which < 2; which++) {
        unsigned char x = which == 0 ? 0x36 : 0x5c;
        for (size_t i = 0; i < blen; i++) pad[i] = k[i] ^ x;
        switch (kind) {
        case XFRM_HMAC_SHA1: SHA1_Init(&ctx->st.sha1[which]); SHA1_Update(&ctx->st.sha1[which], pad, blen); break;
        case XFRM_HMAC_SHA256:
            SHA256_Init(&ctx->st.sha256[which]);
            SHA256_Update(&ctx->st.sha256[which], pad, blen);
            break;
        case XFRM_HMAC_SHA384:
            SHA384_Init(&ctx->st.sha512[which]);
            SHA384_Update(&ctx->st.sha512[which], pad, blen);
            break;
        case XFRM_HMAC_SHA512:
            SHA512_Init(&ctx->st.sha512[which]);
            SHA512_Update(&ctx->st.sha512[which], pad, blen);
            break;
        }
    }
    OPENSSL_cleanse(k, sizeof k);
    OPENSSL_cleanse(pad, sizeof pad);
    return ctx;
}

void xfrm_hmac_free(xfrm_hmac *ctx) {
    if (!ctx) return;
    OPENSSL_cleanse(ctx, sizeof *ctx);
    free(ctx);
}

size_t xfrm_hmac_digest_len(const xfrm_hmac *ctx) { return ctx->digest_len; }

void xfrm_hmac_compute(const xfrm_hmac *ctx, const void *d1, size_t l1, const void *d2, size_t l2, void *out) {
    unsigned char inner[64];
    switch (ctx->kind) {
    case XFRM_HMAC_SHA1: {
        SHA_CTX c = ctx->st.sha1[0];
        SHA1_Update(&c, d1, l1);
        if (l2) SHA1_Update(&c, d2, l2);
        SHA1_Final(inner, &c);
        c = ctx->st.sha1[1];
        SHA1_Update(&c, inner, 20);
        SHA1_Final(out, &c);
        OPENSSL_cleanse(&c, sizeof c);
        break;
    }
    case XFRM_HMAC_SHA256: {
        SHA256_CTX c = ctx->st.sha256[0];
        SHA256_Update(&c, d1, l1);
        if (l2) SHA256_Update(&c, d2, l2);
        SHA256_Final(inner, &c);
        c = ctx->st.sha256[1];
        SHA256_Update(&c, inner, 32);
        SHA256_Final(out, &c);
        OPENSSL_cleanse(&c, sizeof c);
        break;
    }
    case XFRM_HMAC_SHA384:
    case XFRM_HMAC_SHA512: {
        SHA512_CTX c = ctx->st.sha512[0];
        SHA512_Update(&c, d1, l1);
        if (l2) SHA512_Update(&c, d2, l2);
        if (ctx->kind == XFRM_HMAC_SHA384) SHA384_Final(inner, &c); else SHA512_Final(inner, &c);
        c = ctx->st.sha512[1];
        SHA512_Update(&c, inner, ctx->digest_len);
        if (ctx->kind == XFRM_HMAC_SHA384) SHA384_Final(out, &c); else SHA512_Final(out, &c);
        OPENSSL_cleanse(&c, sizeof c);
        break;
    }
    }
}

int xfrm_ct_memcmp(const void *a, const void *b, size_t len) { return CRYPTO_memcmp(a, b, len); }

void xfrm_cleanse(void *p, size_t len) { OPENSSL_cleanse(p, len); }

xfrm_evp_ctx *xfrm_bench_gcm_new(const void *key16, int enc) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return NULL;
    if (EVP_CipherInit_ex(ctx, EVP_aes_128_gcm(), NULL, key16, NULL, enc) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

int xfrm_bench_gcm_seal(xfrm_evp_ctx *ctx, const void *nonce12, const void *aad, int aad_len, void *data, int len,
                        void *tag16) {
    int outl = 0;
    unsigned char tmp[16];
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce12) != 1) return 0;
    if (EVP_EncryptUpdate(ctx, NULL, &outl, aad, aad_len) != 1) return 0;
    if (EVP_EncryptUpdate(ctx, data, &outl, data, len) != 1) return 0;
    if (EVP_EncryptFinal_ex(ctx, tmp, &outl) != 1) return 0;
    return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, tag16) == 1;
}

int xfrm_bench_gcm_open(xfrm_evp_ctx *ctx, const void *nonce12, const void *aad, int aad_len, void *data, int len,
                        const void *tag16) {
    int outl = 0;
    unsigned char tmp[16];
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce12) != 1) return 0;
    if (EVP_DecryptUpdate(ctx, NULL, &outl, aad, aad_len) != 1) return 0;
    if (EVP_DecryptUpdate(ctx, data, &outl, data, len) != 1) return 0;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16, (void *)tag16) != 1) return 0;
    return EVP_DecryptFinal_ex(ctx, tmp, &outl) == 1;
}

void xfrm_bench_gcm_free(xfrm_evp_ctx *ctx) { EVP_CIPHER_CTX_free(ctx); }
