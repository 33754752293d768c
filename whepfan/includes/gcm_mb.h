/* AES-GCM for SRTP (RFC 7714) through Intel's Multi-Buffer Crypto for IPsec library
 * (intel-ipsec-mb, Debian's libipsec-mb-dev), when the core is built with it.
 *
 * Why: OpenSSL 3.0's EVP interface spends about as long per packet on its provider
 * dispatch (re-IV through EVP_CIPHER_CTX_get_iv_length, the tag through OSSL_PARAM
 * lookups) as on the AES-GCM of a 1,200-byte packet itself: ~560 ns against ~130 ns for
 * intel-ipsec-mb's one-shot gcm128_enc on the same key schedule (AVX-512/VAES, AVX2 or
 * SSE code chosen at start-up by init_mb_mgr_auto). Fan-out pays it once per packet and
 * viewer, so it is the largest user-space cost after the kernel's.
 *
 * Built without the library (WHEPFAN_IPSEC_MB undefined: another architecture, or
 * WHEPFAN_IPSEC_MB=0 at build time) every function here reports "unavailable" and the
 * caller keeps using its EVP contexts. The EVP path also stays in use for AAD that is
 * not contiguous and longer than GCM_MB_JOINED_AAD (unencrypted SRTCP, RFC 7714 §9.3).
 *
 * Nothing here allocates per packet or raises; keys are precomputed once per session
 * key (AES round keys and the GHASH key powers) into 64-byte aligned memory.
 */
#ifndef WHEPFAN_GCM_MB_H
#define WHEPFAN_GCM_MB_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>

#define GCM_MB_JOINED_AAD 64 /* the SRTCP AAD is 12 bytes: header(8) || E+index(4) */

#ifdef WHEPFAN_IPSEC_MB
#include <intel-ipsec-mb.h>

static IMB_MGR *whepfan_gcm_mb_mgr = NULL;
static IMB_ARCH whepfan_gcm_mb_arch = IMB_ARCH_NONE;
static int whepfan_gcm_mb_active = 0;

/* Once at module import. Returns 1 if the library can be used on this CPU. The
 * no-AES-NI code path is slower than OpenSSL's, so it counts as unavailable. */
static int gcm_mb_start(void)
{
    if (whepfan_gcm_mb_mgr != NULL)
        return whepfan_gcm_mb_arch >= IMB_ARCH_SSE;
    whepfan_gcm_mb_mgr = alloc_mb_mgr(0);
    if (whepfan_gcm_mb_mgr == NULL)
        return 0;
    init_mb_mgr_auto(whepfan_gcm_mb_mgr, &whepfan_gcm_mb_arch);
    if (imb_get_errno(whepfan_gcm_mb_mgr) != 0 || whepfan_gcm_mb_arch < IMB_ARCH_SSE) {
        free_mb_mgr(whepfan_gcm_mb_mgr);
        whepfan_gcm_mb_mgr = NULL;
        whepfan_gcm_mb_arch = IMB_ARCH_NONE;
        return 0;
    }
    whepfan_gcm_mb_active = 1;
    return 1;
}

static int gcm_mb_compiled(void) { return 1; }
static const char *gcm_mb_version(void) { return imb_get_version_str(); }

/* "sse", "avx", "avx2", "avx512", or "" when not started. */
static const char *gcm_mb_arch_name(void)
{
    switch (whepfan_gcm_mb_arch) {
    case IMB_ARCH_SSE: return "sse";
    case IMB_ARCH_AVX: return "avx";
    case IMB_ARCH_AVX2: return "avx2";
    case IMB_ARCH_AVX512: return "avx512";
    default: return "";
    }
}

/* New contexts use the library while active; contexts keyed before keep their keys. */
static int gcm_mb_set_active(int active)
{
    whepfan_gcm_mb_active = active && whepfan_gcm_mb_mgr != NULL;
    return whepfan_gcm_mb_active;
}

static int gcm_mb_is_active(void) { return whepfan_gcm_mb_active; }

/* Expanded key for a 16- or 32-byte AES key, or NULL (inactive, other length, no
 * memory): the caller then keeps its EVP context for this key. */
static void *gcm_mb_key_new(const uint8_t *key, int key_len)
{
    struct gcm_key_data *expanded = NULL;
    if (!whepfan_gcm_mb_active || (key_len != 16 && key_len != 32))
        return NULL;
    if (posix_memalign((void **)&expanded, 64, sizeof(struct gcm_key_data)) != 0)
        return NULL;
    if (key_len == 16)
        IMB_AES128_GCM_PRE(whepfan_gcm_mb_mgr, key, expanded);
    else
        IMB_AES256_GCM_PRE(whepfan_gcm_mb_mgr, key, expanded);
    return expanded;
}

static void gcm_mb_key_free(void *expanded)
{
    if (expanded != NULL) {
        OPENSSL_cleanse(expanded, sizeof(struct gcm_key_data));
        free(expanded);
    }
}

/* AAD = aad || aad_tail; the library takes one contiguous AAD, so a tail is joined into
 * the caller's GCM_MB_JOINED_AAD bytes. Returns -1 when it would not fit (use EVP). */
static int gcm_mb_join_aad(const uint8_t *aad, int aad_len,
                           const uint8_t *aad_tail, int aad_tail_len,
                           uint8_t *joined, const uint8_t **all_aad, uint64_t *all_len)
{
    *all_aad = aad;
    *all_len = (uint64_t)aad_len;
    if (aad_tail_len <= 0)
        return 0;
    if (aad_len + aad_tail_len > GCM_MB_JOINED_AAD)
        return -1;
    memcpy(joined, aad, (size_t)aad_len);
    memcpy(joined + aad_len, aad_tail, (size_t)aad_tail_len);
    *all_aad = joined;
    *all_len = (uint64_t)(aad_len + aad_tail_len);
    return 0;
}

/* Encrypts in place; the tag goes to ``tag``. Returns 0, or -1 when the AAD would not
 * join (use EVP instead). */
static int gcm_mb_seal(const void *expanded, int key_len, const uint8_t *iv,
                       const uint8_t *aad, int aad_len,
                       const uint8_t *aad_tail, int aad_tail_len,
                       uint8_t *data, int length, uint8_t *tag)
{
    struct gcm_context_data state;
    uint8_t joined[GCM_MB_JOINED_AAD];
    const uint8_t *all_aad;
    uint64_t all_len;
    if (gcm_mb_join_aad(aad, aad_len, aad_tail, aad_tail_len, joined, &all_aad, &all_len) != 0)
        return -1;
    if (key_len == 16)
        IMB_AES128_GCM_ENC(whepfan_gcm_mb_mgr, expanded, &state, data, data,
                           (uint64_t)length, iv, all_aad, all_len, tag, 16);
    else
        IMB_AES256_GCM_ENC(whepfan_gcm_mb_mgr, expanded, &state, data, data,
                           (uint64_t)length, iv, all_aad, all_len, tag, 16);
    return 0;
}

/* Decrypts in place and checks the tag in constant time (CRYPTO_memcmp). Returns 0,
 * 1 on a tag mismatch (the plaintext is wiped), or -1 as for gcm_mb_seal. */
static int gcm_mb_open(const void *expanded, int key_len, const uint8_t *iv,
                       const uint8_t *aad, int aad_len,
                       const uint8_t *aad_tail, int aad_tail_len,
                       uint8_t *data, int length, const uint8_t *tag)
{
    struct gcm_context_data state;
    uint8_t joined[GCM_MB_JOINED_AAD];
    uint8_t computed[16];
    const uint8_t *all_aad;
    uint64_t all_len;
    int mismatch;
    if (gcm_mb_join_aad(aad, aad_len, aad_tail, aad_tail_len, joined, &all_aad, &all_len) != 0)
        return -1;
    if (key_len == 16)
        IMB_AES128_GCM_DEC(whepfan_gcm_mb_mgr, expanded, &state, data, data,
                           (uint64_t)length, iv, all_aad, all_len, computed, 16);
    else
        IMB_AES256_GCM_DEC(whepfan_gcm_mb_mgr, expanded, &state, data, data,
                           (uint64_t)length, iv, all_aad, all_len, computed, 16);
    mismatch = CRYPTO_memcmp(computed, tag, 16) != 0;
    if (mismatch && length > 0)
        OPENSSL_cleanse(data, (size_t)length);
    return mismatch;
}

#else /* built without intel-ipsec-mb: the EVP path does all of it */

static int gcm_mb_start(void) { return 0; }
static int gcm_mb_compiled(void) { return 0; }
static const char *gcm_mb_version(void) { return ""; }
static const char *gcm_mb_arch_name(void) { return ""; }
static int gcm_mb_set_active(int active) { (void)active; return 0; }
static int gcm_mb_is_active(void) { return 0; }
static void *gcm_mb_key_new(const uint8_t *key, int key_len)
{
    (void)key; (void)key_len;
    return NULL;
}
static void gcm_mb_key_free(void *expanded) { (void)expanded; }
static int gcm_mb_seal(const void *expanded, int key_len, const uint8_t *iv,
                       const uint8_t *aad, int aad_len,
                       const uint8_t *aad_tail, int aad_tail_len,
                       uint8_t *data, int length, uint8_t *tag)
{
    (void)expanded; (void)key_len; (void)iv; (void)aad; (void)aad_len;
    (void)aad_tail; (void)aad_tail_len; (void)data; (void)length; (void)tag;
    return -1;
}
static int gcm_mb_open(const void *expanded, int key_len, const uint8_t *iv,
                       const uint8_t *aad, int aad_len,
                       const uint8_t *aad_tail, int aad_tail_len,
                       uint8_t *data, int length, const uint8_t *tag)
{
    (void)expanded; (void)key_len; (void)iv; (void)aad; (void)aad_len;
    (void)aad_tail; (void)aad_tail_len; (void)data; (void)length; (void)tag;
    return -1;
}

#endif /* WHEPFAN_IPSEC_MB */
#endif /* WHEPFAN_GCM_MB_H */
