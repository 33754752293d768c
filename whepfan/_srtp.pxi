# SRTP and SRTCP (RFC 3711) with the AES-CM/HMAC-SHA1 profiles (RFC 5764 §4.1.2) and
# the AEAD AES-GCM profiles (RFC 7714), on OpenSSL libcrypto EVP; AES-GCM goes through
# intel-ipsec-mb instead when the core is built with it (includes/gcm_mb.h: its one-shot
# seal costs a quarter of EVP's per packet), with EVP kept as the fallback.
#
# Theory of operation
# -------------------
# srtp_ctx_init derives the six session keys/salts once (RFC 3711 §4.3, key derivation
# rate 0), keys one EVP_CIPHER_CTX for RTP and one for RTCP, and precomputes the
# HMAC-SHA1 inner/outer states. Per packet only a fresh IV goes into the cipher context
# and the HMAC states are copied by value: nothing is allocated and nothing needs the GIL.
#
# Every SSRC seen by a context gets an SrtpStream: rollover counter and highest sequence
# number (RFC 3711 §3.3.1), the 64-packet replay window (§3.3.2), and the SRTCP index
# (§3.4). The sender runs the same index estimate as the receiver, so a retransmission
# of an older sequence number is protected with the ROC it was first sent with and leaves
# the stream state alone.
#
# Packet layout (RFC 3711 §3.1; RFC 7714 §14.2 for AEAD, where the tag is 16 bytes):
#
#     0                   1                   2                   3
#     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+<+
#    |V=2|P|X|  CC   |M|     PT      |       sequence number         | |
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ |
#    |                           timestamp                           | |
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ |
#    |           synchronization source (SSRC) identifier            | |
#    +=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+ |
#    |            contributing source (CSRC) identifiers             | |
#    |                               ....                            | |
#    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ |
#    |                   RTP extension (OPTIONAL)                    | |
#  +>+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ |
#  | |                          payload  ...                         | |
#  | |                               +-------------------------------+ |
#  | |                               | RTP padding   | RTP pad count | |
#  +>+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+<+
#  | |                    authentication tag                         | |
#  | +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ |
#  +- Encrypted Portion                       Authenticated Portion ---+
#
# For CM the tag is HMAC-SHA1(header || encrypted payload || ROC) truncated (§4.2);
# for GCM the header is the AAD and the tag comes out of the cipher (RFC 7714 §8.2).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from whepfan.includes.gcm_mb cimport (
    gcm_mb_arch_name,
    gcm_mb_compiled,
    gcm_mb_is_active,
    gcm_mb_key_free,
    gcm_mb_key_new,
    gcm_mb_open,
    gcm_mb_seal,
    gcm_mb_set_active,
    gcm_mb_start,
    gcm_mb_version,
)
from whepfan.includes.libcrypto cimport (
    CRYPTO_memcmp,
    EVP_aes_128_ctr,
    EVP_aes_128_gcm,
    EVP_aes_256_ctr,
    EVP_aes_256_gcm,
    EVP_CIPHER,
    EVP_CIPHER_CTX,
    EVP_CIPHER_CTX_ctrl,
    EVP_CIPHER_CTX_free,
    EVP_CIPHER_CTX_new,
    EVP_CipherFinal_ex,
    EVP_CipherInit_ex,
    EVP_CipherUpdate,
    EVP_CTRL_GCM_GET_TAG,
    EVP_CTRL_GCM_SET_TAG,
    OPENSSL_cleanse,
    SHA1_Final,
    SHA1_Init,
    SHA1_Update,
    SHA_CTX,
)


# RFC 3711 §4.3.1 key derivation labels.
cdef enum:
    LABEL_RTP_ENCRYPTION = 0
    LABEL_RTP_AUTH = 1
    LABEL_RTP_SALT = 2
    LABEL_RTCP_ENCRYPTION = 3
    LABEL_RTCP_AUTH = 4
    LABEL_RTCP_SALT = 5


# --- small helpers -----------------------------------------------------------------

cdef inline uint16_t load_be16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef inline uint32_t load_be32(const uint8_t* p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
            | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline void store_be32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef inline void xor_be32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] ^= <uint8_t>(v >> 24)
    p[1] ^= <uint8_t>(v >> 16)
    p[2] ^= <uint8_t>(v >> 8)
    p[3] ^= <uint8_t>v


cdef int profile_lengths(int profile, int* key_len, int* salt_len) noexcept nogil:
    # Master key/salt lengths: RFC 5764 §4.1.2 (CM), RFC 7714 §14.2 (GCM).
    if profile == PROFILE_AES128_CM_SHA1_80 or profile == PROFILE_AES128_CM_SHA1_32:
        key_len[0] = 16
        salt_len[0] = CM_SALT_LEN
    elif profile == PROFILE_AEAD_AES_128_GCM:
        key_len[0] = 16
        salt_len[0] = GCM_SALT_LEN
    elif profile == PROFILE_AEAD_AES_256_GCM:
        key_len[0] = 32
        salt_len[0] = GCM_SALT_LEN
    else:
        return -1
    return 0


cdef int rtp_header_length(const uint8_t* buf, int length) noexcept nogil:
    # Length of the RTP header including CSRCs and the header extension (RFC 3550 §5.1,
    # §5.3.1), or SRTP_ERR_MALFORMED when it is not RTP version 2 or does not fit.
    cdef int header_len
    if length < RTP_HEADER_MIN or (buf[0] >> 6) != 2:
        return SRTP_ERR_MALFORMED
    header_len = RTP_HEADER_MIN + 4 * (buf[0] & 0x0F)
    if buf[0] & 0x10:
        if header_len + 4 > length:
            return SRTP_ERR_MALFORMED
        header_len += 4 + 4 * <int>load_be16(buf + header_len + 2)
    if header_len > length:
        return SRTP_ERR_MALFORMED
    return header_len


# --- key derivation (RFC 3711 §4.3, RFC 7714 §11) ------------------------------------

cdef int aes_cm_prf(const EVP_CIPHER* cipher, const uint8_t* master_key,
                    const uint8_t* master_salt, int label,
                    uint8_t* out, int out_len) noexcept nogil:
    # RFC 3711 §4.3.1/§4.3.3: x = (label || r) XOR master_salt with r = 0 (KDR 0), and
    # the session value is the AES-CM keystream under the master key with IV x * 2^16.
    # The label sits in the 8th octet of the 112-bit salt (key_id is 56 bits wide).
    cdef uint8_t iv[16]
    cdef uint8_t zeros[MAX_SESSION_KEY]
    cdef int written = 0
    cdef int ok = 0
    cdef EVP_CIPHER_CTX* cipher_ctx = EVP_CIPHER_CTX_new()
    if cipher_ctx == NULL:
        return SRTP_ERR_CRYPTO
    memcpy(iv, master_salt, CM_SALT_LEN)
    iv[7] ^= <uint8_t>label
    iv[14] = 0
    iv[15] = 0
    memset(zeros, 0, sizeof(zeros))
    if (EVP_CipherInit_ex(cipher_ctx, cipher, NULL, master_key, iv, 1) == 1
            and EVP_CipherUpdate(cipher_ctx, out, &written, zeros, out_len) == 1
            and written == out_len):
        ok = 1
    EVP_CIPHER_CTX_free(cipher_ctx)
    OPENSSL_cleanse(iv, sizeof(iv))
    return 0 if ok else SRTP_ERR_CRYPTO


cdef int derive_session_keys(int profile, const uint8_t* master_key, int master_key_len,
                             const uint8_t* master_salt, int master_salt_len,
                             SessionKeys* keys) noexcept nogil:
    cdef int expected_key_len, expected_salt_len, rc
    cdef const EVP_CIPHER* prf
    cdef uint8_t padded_salt[CM_SALT_LEN]
    if profile_lengths(profile, &expected_key_len, &expected_salt_len) != 0:
        return SRTP_ERR_CRYPTO
    if master_key_len != expected_key_len or master_salt_len != expected_salt_len:
        return SRTP_ERR_CRYPTO
    memset(keys, 0, sizeof(SessionKeys))
    keys.key_len = master_key_len
    keys.salt_len = master_salt_len
    keys.auth_key_len = 0 if master_salt_len == GCM_SALT_LEN else HMAC_SHA1_KEY_LEN
    # The PRF is AES-CM with the master key's size: AES-256 for AEAD_AES_256_GCM
    # (RFC 7714 §11, via RFC 6188 §7); the 96-bit GCM master salt is the left part of
    # the 112-bit PRF salt, zero padded on the right (as libsrtp does).
    prf = EVP_aes_256_ctr() if master_key_len == 32 else EVP_aes_128_ctr()
    memset(padded_salt, 0, sizeof(padded_salt))
    memcpy(padded_salt, master_salt, master_salt_len)
    rc = aes_cm_prf(prf, master_key, padded_salt, LABEL_RTP_ENCRYPTION,
                    keys.rtp_key, keys.key_len)
    if rc == 0:
        rc = aes_cm_prf(prf, master_key, padded_salt, LABEL_RTP_SALT,
                        keys.rtp_salt, keys.salt_len)
    if rc == 0:
        rc = aes_cm_prf(prf, master_key, padded_salt, LABEL_RTCP_ENCRYPTION,
                        keys.rtcp_key, keys.key_len)
    if rc == 0:
        rc = aes_cm_prf(prf, master_key, padded_salt, LABEL_RTCP_SALT,
                        keys.rtcp_salt, keys.salt_len)
    if rc == 0 and keys.auth_key_len:
        rc = aes_cm_prf(prf, master_key, padded_salt, LABEL_RTP_AUTH,
                        keys.rtp_auth_key, keys.auth_key_len)
        if rc == 0:
            rc = aes_cm_prf(prf, master_key, padded_salt, LABEL_RTCP_AUTH,
                            keys.rtcp_auth_key, keys.auth_key_len)
    OPENSSL_cleanse(padded_salt, sizeof(padded_salt))
    if rc != 0:
        OPENSSL_cleanse(keys, sizeof(SessionKeys))
    return rc


# --- context set-up -----------------------------------------------------------------

cdef void hmac_sha1_precompute(const uint8_t* key, int key_len,
                               SHA_CTX* inner, SHA_CTX* outer) noexcept nogil:
    # RFC 2104 §2: HMAC = H(K ^ opad || H(K ^ ipad || text)). Hashing the two padded
    # key blocks once leaves states that each packet continues from.
    cdef uint8_t block[SHA1_BLOCK]
    cdef int i
    memset(block, 0x36, SHA1_BLOCK)
    for i in range(key_len):
        block[i] ^= key[i]
    SHA1_Init(inner)
    SHA1_Update(inner, block, SHA1_BLOCK)
    memset(block, 0x5C, SHA1_BLOCK)
    for i in range(key_len):
        block[i] ^= key[i]
    SHA1_Init(outer)
    SHA1_Update(outer, block, SHA1_BLOCK)
    OPENSSL_cleanse(block, SHA1_BLOCK)


cdef int srtp_ctx_init_session(SrtpCtx* ctx, int profile,
                               const SessionKeys* keys) noexcept nogil:
    # Key the context from already-derived session keys (srtp_ctx_init, and the RFC 7714
    # §16 test vectors, which are given as session keys).
    cdef const EVP_CIPHER* cipher
    cdef EVP_CIPHER_CTX* rtp_cipher
    cdef EVP_CIPHER_CTX* rtcp_cipher
    memset(ctx, 0, sizeof(SrtpCtx))
    if profile == PROFILE_AES128_CM_SHA1_80:
        cipher = EVP_aes_128_ctr()
        ctx.tag_len = 10
    elif profile == PROFILE_AES128_CM_SHA1_32:
        cipher = EVP_aes_128_ctr()
        ctx.tag_len = 4
    elif profile == PROFILE_AEAD_AES_128_GCM:
        cipher = EVP_aes_128_gcm()
        ctx.tag_len = GCM_TAG_LEN
        ctx.aead = 1
        ctx.gcm_key_len = 16
    elif profile == PROFILE_AEAD_AES_256_GCM:
        cipher = EVP_aes_256_gcm()
        ctx.tag_len = GCM_TAG_LEN
        ctx.aead = 1
        ctx.gcm_key_len = 32
    else:
        return SRTP_ERR_CRYPTO
    # SRTCP keeps the 80-bit tag under AES128_CM_SHA1_32 (RFC 5764 §4.1.2).
    ctx.rtcp_tag_len = GCM_TAG_LEN if ctx.aead else 10
    ctx.profile = profile
    rtp_cipher = EVP_CIPHER_CTX_new()
    rtcp_cipher = EVP_CIPHER_CTX_new()
    if (rtp_cipher == NULL or rtcp_cipher == NULL
            or EVP_CipherInit_ex(rtp_cipher, cipher, NULL, keys.rtp_key, NULL, 1) != 1
            or EVP_CipherInit_ex(rtcp_cipher, cipher, NULL, keys.rtcp_key, NULL, 1) != 1):
        EVP_CIPHER_CTX_free(rtp_cipher)
        EVP_CIPHER_CTX_free(rtcp_cipher)
        memset(ctx, 0, sizeof(SrtpCtx))
        return SRTP_ERR_CRYPTO
    ctx.rtp_cipher = rtp_cipher
    ctx.rtcp_cipher = rtcp_cipher
    if ctx.aead:
        # NULL when intel-ipsec-mb is not in use: gcm_seal/gcm_open then use EVP.
        ctx.rtp_gcm_mb = gcm_mb_key_new(keys.rtp_key, ctx.gcm_key_len)
        ctx.rtcp_gcm_mb = gcm_mb_key_new(keys.rtcp_key, ctx.gcm_key_len)
    memcpy(ctx.rtp_salt, keys.rtp_salt, sizeof(ctx.rtp_salt))
    memcpy(ctx.rtcp_salt, keys.rtcp_salt, sizeof(ctx.rtcp_salt))
    if not ctx.aead:
        hmac_sha1_precompute(keys.rtp_auth_key, HMAC_SHA1_KEY_LEN,
                             &ctx.rtp_hmac_inner, &ctx.rtp_hmac_outer)
        hmac_sha1_precompute(keys.rtcp_auth_key, HMAC_SHA1_KEY_LEN,
                             &ctx.rtcp_hmac_inner, &ctx.rtcp_hmac_outer)
    return 0


cdef int srtp_ctx_init(SrtpCtx* ctx, int profile, const uint8_t* key, int key_len,
                       const uint8_t* salt, int salt_len) noexcept nogil:
    # Overwrites *ctx without freeing what it held: call srtp_ctx_clear first to re-key.
    # On failure *ctx is left cleared (all zero).
    cdef SessionKeys keys
    cdef int rc = derive_session_keys(profile, key, key_len, salt, salt_len, &keys)
    if rc != 0:
        memset(ctx, 0, sizeof(SrtpCtx))
        return rc
    rc = srtp_ctx_init_session(ctx, profile, &keys)
    OPENSSL_cleanse(&keys, sizeof(SessionKeys))
    return rc


cdef void srtp_ctx_clear(SrtpCtx* ctx) noexcept nogil:
    # Safe on a zero-filled or already cleared context.
    if ctx.rtp_cipher != NULL:
        EVP_CIPHER_CTX_free(<EVP_CIPHER_CTX*>ctx.rtp_cipher)
    if ctx.rtcp_cipher != NULL:
        EVP_CIPHER_CTX_free(<EVP_CIPHER_CTX*>ctx.rtcp_cipher)
    gcm_mb_key_free(ctx.rtp_gcm_mb)
    gcm_mb_key_free(ctx.rtcp_gcm_mb)
    OPENSSL_cleanse(ctx, sizeof(SrtpCtx))


# --- per-SSRC state (RFC 3711 §3.3.1, §3.3.2) ------------------------------------------

cdef inline SrtpStream* find_stream(SrtpCtx* ctx, uint32_t ssrc) noexcept nogil:
    cdef int i
    for i in range(SRTP_MAX_STREAMS):
        if ctx.streams[i].in_use and ctx.streams[i].ssrc == ssrc:
            return &ctx.streams[i]
    return NULL


cdef inline SrtpStream* add_stream(SrtpCtx* ctx, uint32_t ssrc) noexcept nogil:
    cdef int i
    for i in range(SRTP_MAX_STREAMS):
        if not ctx.streams[i].in_use:
            memset(&ctx.streams[i], 0, sizeof(SrtpStream))
            ctx.streams[i].in_use = 1
            ctx.streams[i].ssrc = ssrc
            return &ctx.streams[i]
    return NULL


cdef inline int64_t estimate_index(const SrtpStream* stream, uint16_t seq,
                                   uint32_t* roc_out) noexcept nogil:
    # RFC 3711 §3.3.1 / Appendix A: guess the ROC v of a packet from its 16-bit SEQ and
    # the highest SEQ s_l seen so far; returns the packet index minus the highest index
    # (positive: newer). A stream that has seen nothing starts at ROC 0 with this SEQ.
    cdef uint32_t roc
    cdef int64_t delta
    if stream == NULL or not stream.seq_known:
        roc_out[0] = 0
        return 1
    roc = stream.roc
    delta = <int64_t>seq - <int64_t>stream.highest_seq
    if stream.highest_seq < 32768:
        if delta > 32768:
            roc -= 1            # wraps like libsrtp: ROC 0 - 1 is an old (dead) index
            delta -= 65536
    elif delta < -32768:
        roc += 1
        delta += 65536
    roc_out[0] = roc
    return delta


cdef inline int replay_check(uint64_t mask, int seen, int64_t delta) noexcept nogil:
    # RFC 3711 §3.3.2: reject an index already received or left of the window.
    if not seen or delta > 0:
        return 0
    if -delta >= REPLAY_WINDOW:
        return SRTP_ERR_REPLAY
    if (mask >> (-delta)) & 1:
        return SRTP_ERR_REPLAY
    return 0


cdef inline uint64_t replay_update(uint64_t mask, int seen, int64_t delta) noexcept nogil:
    if not seen:
        return 1
    if delta > 0:
        if delta >= REPLAY_WINDOW:
            return 1
        return (mask << delta) | 1
    return mask | (<uint64_t>1 << (-delta))


cdef inline void advance_rtp(SrtpStream* stream, uint16_t seq, uint32_t roc,
                             int64_t delta) noexcept nogil:
    if not stream.seq_known or delta > 0:
        stream.highest_seq = seq
        stream.roc = roc
        stream.seq_known = 1


# --- IVs ------------------------------------------------------------------------------

cdef inline void cm_iv(uint8_t* iv, const uint8_t* salt, uint32_t ssrc,
                       uint64_t index) noexcept nogil:
    # RFC 3711 §4.1.1: IV = (k_s * 2^16) XOR (SSRC * 2^64) XOR (i * 2^16), 128 bits,
    # where i is the 48-bit SRTP index (ROC * 2^16 + SEQ) or the 31-bit SRTCP index.
    cdef int i
    memcpy(iv, salt, CM_SALT_LEN)
    iv[14] = 0
    iv[15] = 0
    xor_be32(iv + 4, ssrc)
    for i in range(6):
        iv[13 - i] ^= <uint8_t>(index >> (8 * i))


cdef inline void gcm_iv(uint8_t* iv, const uint8_t* salt, uint32_t ssrc,
                        uint64_t index) noexcept nogil:
    # RFC 7714 §8.1 (SRTP):  00 00 || SSRC || ROC || SEQ        XOR the 96-bit salt.
    # RFC 7714 §9.1 (SRTCP): 00 00 || SSRC || 00 00 || 0+index  XOR the 96-bit salt.
    # Both are SSRC then the 48-bit index, like the CM IV shifted left by 16 bits.
    cdef int i
    memcpy(iv, salt, GCM_IV_LEN)
    xor_be32(iv + 2, ssrc)
    for i in range(6):
        iv[11 - i] ^= <uint8_t>(index >> (8 * i))


# --- the two transforms -------------------------------------------------------------

cdef inline void hmac_sha1(const SHA_CTX* inner, const SHA_CTX* outer,
                           const uint8_t* data, int length,
                           const uint8_t* trailer, int trailer_len,
                           uint8_t* digest) noexcept nogil:
    # HMAC-SHA1 over data || trailer (the ROC for SRTP, RFC 3711 §4.2).
    cdef SHA_CTX state = inner[0]
    cdef uint8_t inner_digest[SHA1_DIGEST]
    SHA1_Update(&state, data, length)
    if trailer_len:
        SHA1_Update(&state, trailer, trailer_len)
    SHA1_Final(inner_digest, &state)
    state = outer[0]
    SHA1_Update(&state, inner_digest, SHA1_DIGEST)
    SHA1_Final(digest, &state)


cdef inline int ctr_crypt(void* cipher_ctx, const uint8_t* iv,
                          uint8_t* data, int length) noexcept nogil:
    # AES-CTR is its own inverse; re-IV the pre-keyed context (RFC 3711 §4.1.1).
    cdef int written = 0
    if EVP_CipherInit_ex(<EVP_CIPHER_CTX*>cipher_ctx, NULL, NULL, NULL, iv, 1) != 1:
        return SRTP_ERR_CRYPTO
    if length and EVP_CipherUpdate(<EVP_CIPHER_CTX*>cipher_ctx, data, &written,
                                   data, length) != 1:
        return SRTP_ERR_CRYPTO
    return 0


cdef inline int gcm_seal(void* cipher_ctx, const void* mb_key, int key_len,
                         const uint8_t* iv,
                         const uint8_t* aad, int aad_len,
                         const uint8_t* aad_tail, int aad_tail_len,
                         uint8_t* data, int length, uint8_t* tag) noexcept nogil:
    # RFC 7714 §8.2/§9.2: encrypt `data` in place, authenticating aad || aad_tail;
    # through intel-ipsec-mb when the context has its key (mb_key), else EVP.
    cdef EVP_CIPHER_CTX* c = <EVP_CIPHER_CTX*>cipher_ctx
    cdef int written = 0
    if mb_key != NULL and gcm_mb_seal(mb_key, key_len, iv, aad, aad_len, aad_tail,
                                      aad_tail_len, data, length, tag) == 0:
        return 0
    if EVP_CipherInit_ex(c, NULL, NULL, NULL, iv, 1) != 1:
        return SRTP_ERR_CRYPTO
    if aad_len and EVP_CipherUpdate(c, NULL, &written, aad, aad_len) != 1:
        return SRTP_ERR_CRYPTO
    if aad_tail_len and EVP_CipherUpdate(c, NULL, &written, aad_tail, aad_tail_len) != 1:
        return SRTP_ERR_CRYPTO
    if length and EVP_CipherUpdate(c, data, &written, data, length) != 1:
        return SRTP_ERR_CRYPTO
    if EVP_CipherFinal_ex(c, data + length, &written) != 1:
        return SRTP_ERR_CRYPTO
    if EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, GCM_TAG_LEN, tag) != 1:
        return SRTP_ERR_CRYPTO
    return 0


cdef inline int gcm_open(void* cipher_ctx, const void* mb_key, int key_len,
                         const uint8_t* iv,
                         const uint8_t* aad, int aad_len,
                         const uint8_t* aad_tail, int aad_tail_len,
                         uint8_t* data, int length, uint8_t* tag) noexcept nogil:
    # GCM checks the tag after the in-place decryption (EVP_CipherFinal_ex, or
    # gcm_mb_open's constant-time compare); on a mismatch the unauthenticated plaintext
    # is wiped so it can never be used.
    cdef EVP_CIPHER_CTX* c = <EVP_CIPHER_CTX*>cipher_ctx
    cdef int written = 0
    cdef int mb_rc
    if mb_key != NULL:
        mb_rc = gcm_mb_open(mb_key, key_len, iv, aad, aad_len, aad_tail, aad_tail_len,
                            data, length, tag)
        if mb_rc == 0:
            return 0
        if mb_rc == 1:
            return SRTP_ERR_AUTH
        # -1: an AAD too long to join on the stack; EVP takes it below.
    if EVP_CipherInit_ex(c, NULL, NULL, NULL, iv, 0) != 1:
        return SRTP_ERR_CRYPTO
    if EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, GCM_TAG_LEN, tag) != 1:
        return SRTP_ERR_CRYPTO
    if aad_len and EVP_CipherUpdate(c, NULL, &written, aad, aad_len) != 1:
        return SRTP_ERR_CRYPTO
    if aad_tail_len and EVP_CipherUpdate(c, NULL, &written, aad_tail, aad_tail_len) != 1:
        return SRTP_ERR_CRYPTO
    if length and EVP_CipherUpdate(c, data, &written, data, length) != 1:
        return SRTP_ERR_CRYPTO
    if EVP_CipherFinal_ex(c, data + length, &written) != 1:
        if length:
            memset(data, 0, length)
        return SRTP_ERR_AUTH
    return 0


# --- SRTP (RFC 3711 §3.3, RFC 7714 §8) -------------------------------------------------

cdef int srtp_protect_rtp(SrtpCtx* ctx, uint8_t* buf, int length, int capacity) noexcept nogil:
    cdef int header_len, rc
    cdef uint32_t ssrc, roc
    cdef uint16_t seq
    cdef int64_t delta
    cdef SrtpStream* stream
    cdef uint8_t iv[16]
    cdef uint8_t roc_bytes[4]
    cdef uint8_t digest[SHA1_DIGEST]
    if ctx.rtp_cipher == NULL:
        return SRTP_ERR_CRYPTO
    header_len = rtp_header_length(buf, length)
    if header_len < 0:
        return header_len
    if length + ctx.tag_len > capacity:
        return SRTP_ERR_NO_ROOM
    seq = load_be16(buf + 2)
    ssrc = load_be32(buf + 8)
    stream = find_stream(ctx, ssrc)
    if stream == NULL:
        stream = add_stream(ctx, ssrc)
        if stream == NULL:
            return SRTP_ERR_STREAMS
    # The sender estimates the index like a receiver would, so an older SEQ (a
    # retransmission) gets the ROC it had, and only a newer one advances the state.
    delta = estimate_index(stream, seq, &roc)
    if ctx.aead:
        gcm_iv(iv, ctx.rtp_salt, ssrc, (<uint64_t>roc << 16) | seq)
        rc = gcm_seal(ctx.rtp_cipher, ctx.rtp_gcm_mb, ctx.gcm_key_len, iv,
                      buf, header_len, NULL, 0,
                      buf + header_len, length - header_len, buf + length)
    else:
        cm_iv(iv, ctx.rtp_salt, ssrc, (<uint64_t>roc << 16) | seq)
        rc = ctr_crypt(ctx.rtp_cipher, iv, buf + header_len, length - header_len)
        if rc == 0:
            store_be32(roc_bytes, roc)
            hmac_sha1(&ctx.rtp_hmac_inner, &ctx.rtp_hmac_outer, buf, length,
                      roc_bytes, 4, digest)
            memcpy(buf + length, digest, ctx.tag_len)
    if rc != 0:
        return rc
    advance_rtp(stream, seq, roc, delta)
    return length + ctx.tag_len


cdef int srtp_unprotect_rtp(SrtpCtx* ctx, uint8_t* buf, int length) noexcept nogil:
    cdef int header_len, rc, body_len
    cdef uint32_t ssrc, roc
    cdef uint16_t seq
    cdef int64_t delta
    cdef SrtpStream* stream
    cdef uint8_t iv[16]
    cdef uint8_t roc_bytes[4]
    cdef uint8_t digest[SHA1_DIGEST]
    if ctx.rtp_cipher == NULL:
        return SRTP_ERR_CRYPTO
    header_len = rtp_header_length(buf, length)
    if header_len < 0:
        return header_len
    body_len = length - ctx.tag_len
    if body_len < header_len:
        return SRTP_ERR_MALFORMED
    seq = load_be16(buf + 2)
    ssrc = load_be32(buf + 8)
    # An unknown SSRC gets a stream only once its packet authenticates: forged
    # packets must not use up the SRTP_MAX_STREAMS slots.
    stream = find_stream(ctx, ssrc)
    delta = estimate_index(stream, seq, &roc)
    if stream != NULL:
        rc = replay_check(stream.replay_mask, stream.seq_known, delta)
        if rc != 0:
            return rc
    if ctx.aead:
        gcm_iv(iv, ctx.rtp_salt, ssrc, (<uint64_t>roc << 16) | seq)
        rc = gcm_open(ctx.rtp_cipher, ctx.rtp_gcm_mb, ctx.gcm_key_len, iv,
                      buf, header_len, NULL, 0,
                      buf + header_len, body_len - header_len, buf + body_len)
    else:
        # Authenticate before decrypting (RFC 3711 §3.3 steps 5-6).
        store_be32(roc_bytes, roc)
        hmac_sha1(&ctx.rtp_hmac_inner, &ctx.rtp_hmac_outer, buf, body_len,
                  roc_bytes, 4, digest)
        if CRYPTO_memcmp(digest, buf + body_len, ctx.tag_len) != 0:
            return SRTP_ERR_AUTH
        cm_iv(iv, ctx.rtp_salt, ssrc, (<uint64_t>roc << 16) | seq)
        rc = ctr_crypt(ctx.rtp_cipher, iv, buf + header_len, body_len - header_len)
    if rc != 0:
        return rc
    if stream == NULL:
        stream = add_stream(ctx, ssrc)
        if stream == NULL:
            return SRTP_ERR_STREAMS
    stream.replay_mask = replay_update(stream.replay_mask, stream.seq_known, delta)
    advance_rtp(stream, seq, roc, delta)
    return body_len


# --- SRTCP (RFC 3711 §3.4, RFC 7714 §9) ------------------------------------------------
#
#   CM:  header(8) | encrypted rest | E+index(4) | tag(10)   tag over all before it
#   GCM: header(8) | encrypted rest | tag(16) | E+index(4)   AAD = header || E+index

cdef int srtp_protect_rtcp(SrtpCtx* ctx, uint8_t* buf, int length, int capacity) noexcept nogil:
    cdef int rc
    cdef uint32_t ssrc, index
    cdef SrtpStream* stream
    cdef uint8_t iv[16]
    cdef uint8_t e_index[SRTCP_INDEX_LEN]
    cdef uint8_t digest[SHA1_DIGEST]
    if ctx.rtcp_cipher == NULL:
        return SRTP_ERR_CRYPTO
    if length < RTCP_HEADER_MIN or (buf[0] >> 6) != 2:
        return SRTP_ERR_MALFORMED
    if length + SRTCP_INDEX_LEN + ctx.rtcp_tag_len > capacity:
        return SRTP_ERR_NO_ROOM
    ssrc = load_be32(buf + 4)
    stream = find_stream(ctx, ssrc)
    if stream == NULL:
        stream = add_stream(ctx, ssrc)
        if stream == NULL:
            return SRTP_ERR_STREAMS
    index = stream.srtcp_index & SRTCP_INDEX_MASK
    store_be32(e_index, SRTCP_E_FLAG | index)
    if ctx.aead:
        gcm_iv(iv, ctx.rtcp_salt, ssrc, index)
        rc = gcm_seal(ctx.rtcp_cipher, ctx.rtcp_gcm_mb, ctx.gcm_key_len, iv,
                      buf, RTCP_HEADER_MIN, e_index, SRTCP_INDEX_LEN,
                      buf + RTCP_HEADER_MIN, length - RTCP_HEADER_MIN, buf + length)
        if rc != 0:
            return rc
        memcpy(buf + length + GCM_TAG_LEN, e_index, SRTCP_INDEX_LEN)
    else:
        cm_iv(iv, ctx.rtcp_salt, ssrc, index)
        rc = ctr_crypt(ctx.rtcp_cipher, iv, buf + RTCP_HEADER_MIN, length - RTCP_HEADER_MIN)
        if rc != 0:
            return rc
        memcpy(buf + length, e_index, SRTCP_INDEX_LEN)
        hmac_sha1(&ctx.rtcp_hmac_inner, &ctx.rtcp_hmac_outer, buf,
                  length + SRTCP_INDEX_LEN, NULL, 0, digest)
        memcpy(buf + length + SRTCP_INDEX_LEN, digest, ctx.rtcp_tag_len)
    stream.srtcp_index = (index + 1) & SRTCP_INDEX_MASK
    return length + SRTCP_INDEX_LEN + ctx.rtcp_tag_len


cdef int srtp_unprotect_rtcp(SrtpCtx* ctx, uint8_t* buf, int length) noexcept nogil:
    cdef int rc, body_len, encrypted
    cdef uint32_t ssrc, index, e_index_word
    cdef int64_t delta = 1
    cdef SrtpStream* stream
    cdef uint8_t iv[16]
    cdef uint8_t* e_index
    cdef uint8_t* tag
    cdef uint8_t digest[SHA1_DIGEST]
    if ctx.rtcp_cipher == NULL:
        return SRTP_ERR_CRYPTO
    body_len = length - SRTCP_INDEX_LEN - ctx.rtcp_tag_len
    if body_len < RTCP_HEADER_MIN or (buf[0] >> 6) != 2:
        return SRTP_ERR_MALFORMED
    if ctx.aead:
        tag = buf + body_len
        e_index = tag + GCM_TAG_LEN
    else:
        e_index = buf + body_len
        tag = e_index + SRTCP_INDEX_LEN
    e_index_word = load_be32(e_index)
    index = e_index_word & SRTCP_INDEX_MASK
    encrypted = (e_index_word & SRTCP_E_FLAG) != 0
    ssrc = load_be32(buf + 4)
    stream = find_stream(ctx, ssrc)
    if stream != NULL and stream.srtcp_known:
        delta = <int64_t>index - <int64_t>stream.srtcp_highest
        rc = replay_check(stream.srtcp_replay_mask, 1, delta)
        if rc != 0:
            return rc
    if ctx.aead:
        gcm_iv(iv, ctx.rtcp_salt, ssrc, index)
        if encrypted:
            rc = gcm_open(ctx.rtcp_cipher, ctx.rtcp_gcm_mb, ctx.gcm_key_len, iv,
                          buf, RTCP_HEADER_MIN, e_index, SRTCP_INDEX_LEN,
                          buf + RTCP_HEADER_MIN, body_len - RTCP_HEADER_MIN, tag)
        else:
            # E = 0: the whole packet is AAD and nothing is encrypted (RFC 7714 §9.3).
            rc = gcm_open(ctx.rtcp_cipher, ctx.rtcp_gcm_mb, ctx.gcm_key_len, iv,
                          buf, body_len, e_index, SRTCP_INDEX_LEN, NULL, 0, tag)
    else:
        hmac_sha1(&ctx.rtcp_hmac_inner, &ctx.rtcp_hmac_outer, buf,
                  body_len + SRTCP_INDEX_LEN, NULL, 0, digest)
        if CRYPTO_memcmp(digest, tag, ctx.rtcp_tag_len) != 0:
            return SRTP_ERR_AUTH
        rc = 0
        if encrypted:
            cm_iv(iv, ctx.rtcp_salt, ssrc, index)
            rc = ctr_crypt(ctx.rtcp_cipher, iv, buf + RTCP_HEADER_MIN,
                           body_len - RTCP_HEADER_MIN)
    if rc != 0:
        return rc
    if stream == NULL:
        stream = add_stream(ctx, ssrc)
        if stream == NULL:
            return SRTP_ERR_STREAMS
    stream.srtcp_replay_mask = replay_update(stream.srtcp_replay_mask,
                                             stream.srtcp_known, delta)
    if not stream.srtcp_known or delta > 0:
        stream.srtcp_highest = index
        stream.srtcp_known = 1
    return body_len


# --- Python surface (see _fastpath.pyi) ----------------------------------------------

class SrtpError(ValueError):
    """A packet failed to protect/unprotect; ``reason`` is one of
    "malformed", "auth", "replay", "no-room", "streams", "crypto"."""

    def __init__(self, reason):
        super().__init__(f"SRTP error: {reason}")
        self.reason = reason


cdef object srtp_error(int code):
    if code == SRTP_ERR_MALFORMED:
        return SrtpError("malformed")
    if code == SRTP_ERR_AUTH:
        return SrtpError("auth")
    if code == SRTP_ERR_REPLAY:
        return SrtpError("replay")
    if code == SRTP_ERR_NO_ROOM:
        return SrtpError("no-room")
    if code == SRTP_ERR_STREAMS:
        return SrtpError("streams")
    return SrtpError("crypto")


# intel-ipsec-mb's manager, once per process (includes/gcm_mb.h). WHEPFAN_GCM=openssl in
# the environment keeps every context on EVP (an operator's way around a library fault,
# and the benchmarks' way to measure both in one run).
import os as _os

gcm_mb_start()
if _os.environ.get("WHEPFAN_GCM", "").lower() in ("openssl", "evp"):
    gcm_mb_set_active(0)


def gcm_backend():
    """Which AES-GCM code SRTP contexts keyed from now on use: "intel-ipsec-mb <version>
    (<sse|avx|avx2|avx512>)" or "openssl"."""
    if gcm_mb_is_active():
        version = gcm_mb_version().decode()
        arch = gcm_mb_arch_name().decode()
        return f"intel-ipsec-mb {version} ({arch})"
    return "openssl"


def use_gcm_backend(str name):
    """Key new SRTP contexts with "intel-ipsec-mb" (if built with it and the CPU has
    AES-NI) or "openssl"; contexts keyed before keep theirs. Returns gcm_backend()."""
    if name == "openssl":
        gcm_mb_set_active(0)
    elif name == "intel-ipsec-mb":
        if not gcm_mb_compiled():
            raise ValueError("the compiled core was built without intel-ipsec-mb")
        if not gcm_mb_start() or not gcm_mb_set_active(1):
            raise ValueError("intel-ipsec-mb cannot run on this CPU (no AES-NI)")
    else:
        raise ValueError(f"unknown AES-GCM backend {name!r}: intel-ipsec-mb or openssl")
    return gcm_backend()


def profile_key_lengths(int profile):
    """(master key length, master salt length) in bytes for a profile."""
    cdef int key_len, salt_len
    if profile_lengths(profile, &key_len, &salt_len) != 0:
        raise ValueError(f"unknown SRTP protection profile {profile:#06x}")
    return key_len, salt_len


cdef SessionKeys derive_checked(int profile, bytes key, bytes salt) except *:
    cdef SessionKeys keys
    cdef int key_len, salt_len
    key_len, salt_len = profile_key_lengths(profile)
    if len(key) != key_len or len(salt) != salt_len:
        raise ValueError(
            f"profile {profile:#06x} needs a {key_len}-byte master key and a "
            f"{salt_len}-byte master salt, got {len(key)} and {len(salt)}"
        )
    if derive_session_keys(profile, <const uint8_t*>PyBytes_AS_STRING(key), key_len,
                           <const uint8_t*>PyBytes_AS_STRING(salt), salt_len, &keys) != 0:
        raise SrtpError("crypto")
    return keys


def _derive_session_keys(int profile, bytes key, bytes salt):
    """The RFC 3711 §4.3 session values for a master key/salt, for tests:
    (rtp_key, rtp_auth_key, rtp_salt, rtcp_key, rtcp_auth_key, rtcp_salt); the auth
    keys are empty for the AEAD profiles."""
    cdef SessionKeys keys = derive_checked(profile, key, salt)
    result = (
        PyBytes_FromStringAndSize(<char*>keys.rtp_key, keys.key_len),
        PyBytes_FromStringAndSize(<char*>keys.rtp_auth_key, keys.auth_key_len),
        PyBytes_FromStringAndSize(<char*>keys.rtp_salt, keys.salt_len),
        PyBytes_FromStringAndSize(<char*>keys.rtcp_key, keys.key_len),
        PyBytes_FromStringAndSize(<char*>keys.rtcp_auth_key, keys.auth_key_len),
        PyBytes_FromStringAndSize(<char*>keys.rtcp_salt, keys.salt_len),
    )
    OPENSSL_cleanse(&keys, sizeof(SessionKeys))
    return result


cdef class SrtpSession:
    """One direction of an SRTP/SRTCP association (RFC 3711).

    Use one session to protect (sender side) or to unprotect (receiver side), as with
    libsrtp's outbound/inbound policies. Tracks up to 8 SSRCs, each with its own
    rollover counter and 64-packet replay window.
    """

    cdef SrtpCtx ctx
    cdef uint8_t* scratch
    cdef Py_ssize_t scratch_size

    def __cinit__(self):
        memset(&self.ctx, 0, sizeof(SrtpCtx))
        self.scratch = NULL
        self.scratch_size = 0

    def __init__(self, int profile, bytes key not None, bytes salt not None):
        cdef SessionKeys keys = derive_checked(profile, key, salt)
        cdef int rc
        srtp_ctx_clear(&self.ctx)
        rc = srtp_ctx_init_session(&self.ctx, profile, &keys)
        OPENSSL_cleanse(&keys, sizeof(SessionKeys))
        if rc != 0:
            raise srtp_error(rc)

    @staticmethod
    def _from_session_keys(int profile, bytes rtp_key not None, bytes rtp_auth_key not None,
                           bytes rtp_salt not None, bytes rtcp_key not None,
                           bytes rtcp_auth_key not None, bytes rtcp_salt not None):
        """A session keyed with given session keys, skipping key derivation: for the
        test vectors of RFC 3711 Appendix B.2 and RFC 7714 §16, given that way."""
        cdef SessionKeys keys
        cdef int key_len, salt_len, auth_key_len, rc
        cdef SrtpSession session
        key_len, salt_len = profile_key_lengths(profile)
        auth_key_len = 0 if salt_len == GCM_SALT_LEN else HMAC_SHA1_KEY_LEN
        for value, expected in ((rtp_key, key_len), (rtcp_key, key_len),
                                (rtp_salt, salt_len), (rtcp_salt, salt_len),
                                (rtp_auth_key, auth_key_len), (rtcp_auth_key, auth_key_len)):
            if len(value) != expected:
                raise ValueError(f"session key/salt of {len(value)} bytes, need {expected}")
        memset(&keys, 0, sizeof(SessionKeys))
        keys.key_len = key_len
        keys.salt_len = salt_len
        keys.auth_key_len = auth_key_len
        memcpy(keys.rtp_key, PyBytes_AS_STRING(rtp_key), key_len)
        memcpy(keys.rtcp_key, PyBytes_AS_STRING(rtcp_key), key_len)
        memcpy(keys.rtp_salt, PyBytes_AS_STRING(rtp_salt), salt_len)
        memcpy(keys.rtcp_salt, PyBytes_AS_STRING(rtcp_salt), salt_len)
        memcpy(keys.rtp_auth_key, PyBytes_AS_STRING(rtp_auth_key), auth_key_len)
        memcpy(keys.rtcp_auth_key, PyBytes_AS_STRING(rtcp_auth_key), auth_key_len)
        session = SrtpSession.__new__(SrtpSession)
        rc = srtp_ctx_init_session(&session.ctx, profile, &keys)
        OPENSSL_cleanse(&keys, sizeof(SessionKeys))
        if rc != 0:
            raise srtp_error(rc)
        return session

    def __dealloc__(self):
        srtp_ctx_clear(&self.ctx)
        free(self.scratch)

    cdef uint8_t* buffer_for(self, bytes packet) except NULL:
        # Room for the packet plus the largest trailer protect can add.
        cdef Py_ssize_t needed = PyBytes_GET_SIZE(packet) + SRTP_MAX_OVERHEAD
        cdef uint8_t* grown
        if needed > self.scratch_size:
            grown = <uint8_t*>malloc(needed)
            if grown == NULL:
                raise MemoryError()
            free(self.scratch)
            self.scratch = grown
            self.scratch_size = needed
        memcpy(self.scratch, PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet))
        return self.scratch

    cdef int checked_length(self, bytes packet) except -1:
        if PyBytes_GET_SIZE(packet) > 0xFFFF:
            raise SrtpError("malformed")
        return <int>PyBytes_GET_SIZE(packet)

    def protect(self, bytes packet not None):
        """Plain RTP -> SRTP."""
        cdef int length = self.checked_length(packet)
        cdef uint8_t* buf = self.buffer_for(packet)
        cdef int rc = srtp_protect_rtp(&self.ctx, buf, length, <int>self.scratch_size)
        if rc < 0:
            raise srtp_error(rc)
        return PyBytes_FromStringAndSize(<char*>buf, rc)

    def unprotect(self, bytes packet not None):
        """SRTP -> plain RTP."""
        cdef int length = self.checked_length(packet)
        cdef uint8_t* buf = self.buffer_for(packet)
        cdef int rc = srtp_unprotect_rtp(&self.ctx, buf, length)
        if rc < 0:
            raise srtp_error(rc)
        return PyBytes_FromStringAndSize(<char*>buf, rc)

    def protect_rtcp(self, bytes packet not None):
        """Plain (compound) RTCP -> SRTCP."""
        cdef int length = self.checked_length(packet)
        cdef uint8_t* buf = self.buffer_for(packet)
        cdef int rc = srtp_protect_rtcp(&self.ctx, buf, length, <int>self.scratch_size)
        if rc < 0:
            raise srtp_error(rc)
        return PyBytes_FromStringAndSize(<char*>buf, rc)

    def unprotect_rtcp(self, bytes packet not None):
        """SRTCP -> plain (compound) RTCP."""
        cdef int length = self.checked_length(packet)
        cdef uint8_t* buf = self.buffer_for(packet)
        cdef int rc = srtp_unprotect_rtcp(&self.ctx, buf, length)
        if rc < 0:
            raise srtp_error(rc)
        return PyBytes_FromStringAndSize(<char*>buf, rc)
