# C-level API of the compiled core: what the fan-out half calls in the SRTP half.
# Python-visible API: _fastpath.pyi.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from whepfan.includes.libcrypto cimport SHA_CTX

# SRTP protection profiles, numbered as in the IANA "DTLS-SRTP Protection
# Profiles" registry (RFC 5764 §4.1.2, RFC 7714 §14.2). cpdef: also module constants.
cpdef enum:
    PROFILE_AES128_CM_SHA1_80 = 0x0001
    PROFILE_AES128_CM_SHA1_32 = 0x0002
    PROFILE_AEAD_AES_128_GCM = 0x0007
    PROFILE_AEAD_AES_256_GCM = 0x0008

# Fanout.subscription_state() values. cpdef: also module constants (media/layers.py).
cpdef enum:
    SUBSCRIPTION_NONE = 0                # the viewer does not receive the track
    SUBSCRIPTION_AWAITING_KEYFRAME = 1   # subscribed, waiting for a keyframe to start/switch
    SUBSCRIPTION_FORWARDING = 2          # packets of the track go to the viewer

# Return codes of the srtp_* functions (>= 0 is a packet length).
cdef enum:
    SRTP_ERR_MALFORMED = -1      # too short / not RTP or RTCP / bad header
    SRTP_ERR_AUTH = -2           # authentication tag mismatch
    SRTP_ERR_REPLAY = -3         # replayed or too old for the replay window
    SRTP_ERR_NO_ROOM = -4        # output would not fit in `capacity`
    SRTP_ERR_STREAMS = -5        # more SSRCs than SRTP_MAX_STREAMS in one context
    SRTP_ERR_CRYPTO = -6         # libcrypto reported an error

cdef enum:
    SRTP_MAX_STREAMS = 8         # SSRCs tracked per context (ROC, replay window)
    SRTP_MAX_OVERHEAD = 30       # most bytes protect adds (SRTCP: 4 index + 16 tag, + slack)

# Per-SSRC state inside one SRTP context (RFC 3711 §3.2.3 "cryptographic context").
cdef struct SrtpStream:
    uint32_t ssrc
    uint8_t in_use
    uint8_t seq_known            # highest_seq/roc hold a received/sent value
    uint16_t highest_seq         # s_l of RFC 3711 §3.3.1
    uint32_t roc                 # rollover counter
    uint64_t replay_mask         # bit i: index (highest - i) was seen (RFC 3711 §3.3.2)
    uint32_t srtcp_index         # next SRTCP index to send (31 bits)
    uint32_t srtcp_highest       # highest SRTCP index received
    uint64_t srtcp_replay_mask
    uint8_t srtcp_known

# One direction's keys for one DTLS-SRTP association: session keys derived once
# (RFC 3711 §4.3, key derivation rate 0), cipher contexts keyed once and re-IV'd
# per packet, HMAC-SHA1 inner/outer states precomputed once and copied per packet,
# so protect/unprotect allocate nothing. Zero-filled memory is a valid "cleared"
# context (every srtp_* call on it returns SRTP_ERR_CRYPTO).
cdef struct SrtpCtx:
    int profile
    int tag_len                  # RTP auth tag length (10, 4 or 16)
    int rtcp_tag_len             # SRTCP auth tag length (10 for both CM profiles, 16 GCM)
    int aead                     # 1 for the AEAD_AES_*_GCM profiles (RFC 7714)
    void* rtp_cipher             # EVP_CIPHER_CTX*, keyed with the RTP session key
    void* rtcp_cipher            # EVP_CIPHER_CTX*, keyed with the RTCP session key
    SHA_CTX rtp_hmac_inner       # SHA1 state after (auth key ^ ipad), CM profiles only
    SHA_CTX rtp_hmac_outer       # SHA1 state after (auth key ^ opad)
    SHA_CTX rtcp_hmac_inner
    SHA_CTX rtcp_hmac_outer
    uint8_t rtp_salt[14]         # session salts (14 bytes CM, 12 bytes GCM)
    uint8_t rtcp_salt[14]
    SrtpStream streams[SRTP_MAX_STREAMS]

# All return a new length (>= 0) or a SRTP_ERR_* code; none raises, none takes the GIL.
cdef int srtp_ctx_init(SrtpCtx* ctx, int profile, const uint8_t* key, int key_len,
                       const uint8_t* salt, int salt_len) noexcept nogil
cdef void srtp_ctx_clear(SrtpCtx* ctx) noexcept nogil
cdef int srtp_protect_rtp(SrtpCtx* ctx, uint8_t* buf, int length, int capacity) noexcept nogil
cdef int srtp_unprotect_rtp(SrtpCtx* ctx, uint8_t* buf, int length) noexcept nogil
cdef int srtp_protect_rtcp(SrtpCtx* ctx, uint8_t* buf, int length, int capacity) noexcept nogil
cdef int srtp_unprotect_rtcp(SrtpCtx* ctx, uint8_t* buf, int length) noexcept nogil
