# C-level layout of the compiled core (uvloop's .pxd-beside-.pyx): every struct and
# the constants their sizes use, and the SRTP functions the fan-out half calls.
# Python-visible API: _fastpath.pyi.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from posix.uio cimport iovec

from whepfan.includes.libcrypto cimport SHA_CTX
from whepfan.includes.system cimport mmsghdr, sockaddr_in6, socklen_t

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
    # GCM profiles with intel-ipsec-mb active (includes/gcm_mb.h): the same session keys
    # expanded for its one-shot seal/open, or NULL (then the EVP contexts do it all).
    void* rtp_gcm_mb
    void* rtcp_gcm_mb
    int gcm_key_len              # 16 or 32 (AEAD_AES_128_GCM / AEAD_AES_256_GCM)
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

# ------------------------------------------------------------------ SRTP (_srtp.pxi)

cdef enum:
    RTP_HEADER_MIN = 12           # RFC 3550 §5.1 fixed header
    RTCP_HEADER_MIN = 8           # RFC 3550 §6.4.1: V/P/RC, PT, length, sender SSRC
    SRTCP_INDEX_LEN = 4           # E flag + 31-bit SRTCP index (RFC 3711 §3.4)
    SRTCP_E_FLAG = 0x80000000
    SRTCP_INDEX_MASK = 0x7FFFFFFF
    GCM_TAG_LEN = 16              # RFC 7714 §14.2: 16-octet authentication tag
    GCM_IV_LEN = 12               # RFC 7714 §8.1
    CM_SALT_LEN = 14              # RFC 3711 §4.3.3: 112-bit session salt
    GCM_SALT_LEN = 12             # RFC 7714 §11: 96-bit salt
    HMAC_SHA1_KEY_LEN = 20        # RFC 3711 §4.2.1: n_a = 160
    SHA1_BLOCK = 64
    SHA1_DIGEST = 20
    REPLAY_WINDOW = 64            # RFC 3711 §3.3.2 requires at least 64
    MAX_SESSION_KEY = 32


cdef struct SessionKeys:
    # The six session values of RFC 3711 §4.3.1 for one master key/salt.
    int key_len
    int auth_key_len
    int salt_len
    uint8_t rtp_key[MAX_SESSION_KEY]
    uint8_t rtp_auth_key[HMAC_SHA1_KEY_LEN]
    uint8_t rtp_salt[CM_SALT_LEN]
    uint8_t rtcp_key[MAX_SESSION_KEY]
    uint8_t rtcp_auth_key[HMAC_SHA1_KEY_LEN]
    uint8_t rtcp_salt[CM_SALT_LEN]


# ------------------------------------------------------------------ fan-out (_fanout.pxi)

cdef enum:
    # Largest RTP packet accepted from the publisher: one Ethernet MTU. Larger ones
    # would be IP-fragmented towards every viewer; they are counted and dropped.
    MAX_RTP_PACKET = 1500
    RTX_OSN_SIZE = 2             # RFC 4588 §4: original sequence number before the payload
    # A viewer's transport-wide sequence number (draft-holmer-rmcat-transport-wide-cc-
    # extensions-01 §2) added to a packet that has no element for it: one word inside an
    # existing RFC 8285 block (TRANSPORT_CC_IN_BLOCK), or a new one-word block
    # (TRANSPORT_CC_NEW_BLOCK: 4 octets of block header + 4 of element and padding).
    TRANSPORT_CC_IN_BLOCK = 4
    TRANSPORT_CC_NEW_BLOCK = 8
    # One batch slot: the largest packet, plus a transport-cc block, plus the RTX OSN,
    # plus the SRTP trailer, rounded up to a multiple of 64 so slots start on cache lines.
    BATCH_SLOT_SIZE = ((MAX_RTP_PACKET + TRANSPORT_CC_NEW_BLOCK + RTX_OSN_SIZE
                        + SRTP_MAX_OVERHEAD + 63) // 64) * 64
    # Per-viewer log of what was sent under each transport-wide sequence number (for the
    # delay-based estimate from transport feedback): entries by default, a power of two.
    # 1024 (8 KiB) cover over a second at 1,000 packets/s to one viewer (8 Mbit/s of
    # 1,200-octet packets): a feedback interval (libwebrtc: 50..250 ms) plus its round
    # trip. Larger rings cost per packet: with 1,000 viewers, 4096 entries of 16 octets
    # made every datagram ~6 % dearer than 1024 in bench/fanout.py, the log entries of a
    # push falling out of cache (and TLB) between pushes.
    TRANSPORT_LOG_DEFAULT = 1024
    # RFC 3550 §5.1: the padding count is one octet, so a padding-only packet carries at
    # most 255 octets of padding; Fanout.send_padding sends at most this many per call.
    PADDING_MAX = 255
    # How far a subscription's offset floors (offset_valid_from, resend_valid_from) may
    # trail the newest packet sent to it: RFC 3550 §A.1 serial arithmetic orders only
    # numbers less than 2^15 apart, so a floor must follow the stream or it comes to read
    # as ahead of it. Packets 2^14 behind the newest are no loss to refuse.
    OFFSET_FLOOR_TRAIL = 0x4000
    PADDING_MAX_PACKETS = 1024
    # Header-extension elements rewritten per packet. RFC 8285 one-byte ids are 1..14 and
    # a sender uses each id once; 32 leaves room for two-byte packets. More is malformed.
    MAX_EXT_ELEMENTS = 32
    RTCP_SR_SIZE = 28            # RFC 3550 §6.4.1, no report blocks
    SWITCH_LOG_SIZE = 1024       # completed switches kept until take_switches()
    ALL_TEMPORAL_LAYERS = 255    # no temporal-layer limit
    # VP9 flexible mode (RFC 9628 §4.2): a P_DIFF reaches at most 127 pictures back, so
    # the fate of the last 128 pictures (by picture id mod 128) is all a check needs.
    VP9_PICTURE_HISTORY = 128
    VP9_PICTURE_DROPPED = 0x8000   # history entry flag: not sent to this viewer
    VP9_MAX_REFERENCES = 3         # RFC 9628 §4.2: up to three P_DIFF octets
    # One IPV6_PKTINFO control message: CMSG_SPACE(sizeof(in6_pktinfo)) = 16 + 24 on
    # LP64 Linux (checked at import); an IP_PKTINFO one (16 + 16) fits as well.
    SOURCE_CONTROL_WORDS = 5
    # UDP GSO (udp(7) UDP_SEGMENT). One GSO entry carries at most this many segments
    # (the kernel's UDP_MAX_SEGMENTS is 64 before Linux 5.5, 128 after) and this many
    # payload bytes (a UDP datagram's length field is 16 bits).
    GSO_MAX_SEGMENTS = 64
    GSO_MAX_BYTES = 65000
    # A GSO entry's control messages: the viewer's source control message, then
    # CMSG_SPACE(sizeof(uint16_t)) = 24 bytes of UDP_SEGMENT (checked at import).
    GSO_CONTROL_WORDS = SOURCE_CONTROL_WORDS + 3
    # Packets of one track handed to Fanout.push_batch in one go; more are taken in
    # chunks of this many (transport.py reads at most RECEIVE_BURST = 64 per wake-up).
    BURST_CAPACITY = 64


# Where the parts of one RTP packet are, found once per push and reused for every viewer.
cdef struct RtpLayout:
    int header_len               # fixed header + CSRC list + extension block
    int payload_len              # excluding RTP padding
    int padding_len
    int ext_form                 # ExtensionForm
    # Offset of the first element octet (after the 0xBEDE/0x100X word and the length);
    # with X = 0, where a block would begin (after the CSRC list).
    int ext_data_start
    int ext_count
    uint16_t ext_offset[MAX_EXT_ELEMENTS]   # offset of each element's ID byte
    uint16_t ext_size[MAX_EXT_ELEMENTS]     # element header + data, in bytes
    uint8_t ext_id[MAX_EXT_ELEMENTS]


# The fields of a VP8 (RFC 7741 §4.2) or VP9 (RFC 9628 §4.2) payload descriptor the fan-out
# acts on. The picture id (M bit: 15 bits) and TL0PICIDX have the same wire form in both.
cdef struct DescriptorFields:
    int present                  # 1 if the payload carried a parseable descriptor
    int frame_start              # first packet of a picture: VP8 S and partition 0, VP9 B, SID 0
    int picture_id               # -1: absent
    int picture_id_offset        # offset of the picture id in the payload
    int long_picture_id          # M bit: 15-bit picture id
    int tl0_pic_idx              # -1: absent
    int tl0_offset
    int temporal_layer           # TID; -1: absent
    int layer_sync               # VP8 Y bit, VP9 U bit (switching-up point)
    # VP9 only.
    int flexible                 # F bit: references as P_DIFFs, no TL0PICIDX
    int reference_count          # P_DIFF octets (P and F set)
    int reference_diff[VP9_MAX_REFERENCES]


# One viewer's copy of one track.
cdef struct Subscription:
    int32_t viewer
    uint32_t ssrc
    uint32_t ts_offset           # out timestamp = in + ts_offset (mod 2^32)
    uint32_t rtx_ssrc
    uint32_t packets_sent        # RFC 3550 §6.4.1 sender's packet count (wraps mod 2^32)
    uint32_t octets_sent         # ... sender's octet count: payload octets only
    uint16_t seq_offset          # out seq = in + seq_offset (mod 2^16)
    uint16_t rtx_seq             # next RTX sequence number (RFC 4588 §4: own space)
    uint8_t payload_type
    uint8_t rtx_payload_type
    uint8_t has_rtx
    uint8_t wait_keyframe
    uint8_t* ext_map             # 256 entries: publisher id -> viewer id; NULL strips all
    # What the viewer last received: where a layer switch continues from.
    uint8_t has_sent
    uint16_t last_seq            # viewer's highest sequence number sent
    uint32_t last_ts             # ... and its timestamp
    double last_sent_at          # push time of that packet
    # seq_offset holds for publisher sequence numbers from here on (it changes at a
    # switch and with every temporally dropped packet); NACKs for older ones are misses.
    # picture_id_offset and tl0_offset change only where this floor moves too (a switch,
    # a dropped VP8 picture), so a packet not before it was sent with the offsets in
    # force now: resend() rewrites its descriptor with them.
    uint16_t offset_valid_from
    uint8_t offset_floor_set     # offset_valid_from is set
    # resend() only: also a miss before resend_valid_from, the packet after the last one
    # dropped without renumbering (a late temporal-layer drop: the viewer's numbers show a
    # gap there, and what fills it now would carry another picture's id). Placed in what
    # was padding, so the struct the push loop streams through does not grow.
    uint8_t resend_floor_set
    int32_t switch_from          # pending switch: the track it replaces; -1: none
    # VP8 (RFC 7741 §4.2) / VP9 (RFC 9628 §4.2) picture ids and TL0PICIDX, rewritten so
    # the viewer sees one stream across switches (and, VP8 only, temporal drops).
    uint8_t has_picture_state
    uint8_t temporal_limit       # highest TID forwarded (ALL_TEMPORAL_LAYERS: all)
    uint8_t temporal_target      # the limit asked for; applied at a picture boundary
    uint8_t tl0_offset
    uint8_t last_tl0
    uint16_t picture_id_offset   # mod 2^15
    uint16_t last_picture_id
    uint16_t resend_valid_from   # see resend_floor_set
    int32_t last_dropped_picture  # picture id of the last dropped picture; -1: none
    # VP9 tracks: VP9_PICTURE_HISTORY entries, index picture id mod 128, each the id of
    # the last picture seen there | VP9_PICTURE_DROPPED, or -1; NULL for other formats.
    int32_t* vp9_picture_history


# One entry of a viewer's transport-wide send log: what went out under ``sequence``.
# Eight octets, so that a cache line holds eight packets' entries.
cdef struct TransportSendRecord:
    # CLOCK_MONOTONIC (= time.monotonic()) in units of 2^-16 s (~15 µs; transport
    # feedback counts in 250 µs), modulo 2^32 (18.2 hours): transport_sent rebuilds the
    # full time from the current one.
    uint32_t sent_at
    uint16_t sequence            # transport-wide sequence number the entry is for
    uint16_t size                # UDP payload octets (SRTP packet, tag included); 0: not sent


cdef struct Viewer:
    SrtpCtx tx                   # protects RTP and RTCP towards the viewer
    SrtpCtx rx                   # unprotects the viewer's SRTCP
    sockaddr_in6 address         # large enough for sockaddr_in too
    socklen_t address_len
    size_t source_control_len    # 0: the kernel picks the source address
    # cmsghdr + in_pktinfo/in6_pktinfo naming the source (see "Source addresses");
    # uint64_t words keep it aligned as CMSG_* require.
    uint64_t source_control[SOURCE_CONTROL_WORDS]
    uint8_t in_use
    # Transport-wide congestion control (draft-holmer-rmcat-transport-wide-cc-extensions-01):
    # one counter for the viewer's transport (BUNDLE: all its subscriptions), stamped on
    # every RTP packet sent to it. Beside the address and packets_sent, which every packet
    # reads too, so that it adds no cache line per packet.
    uint8_t transport_cc_id      # the viewer's extension id (RFC 8285: 1..14 one-byte, ..255); 0: off
    uint16_t transport_seq       # next transport-wide sequence number
    uint32_t send_log_mask
    TransportSendRecord* send_log    # send_log_mask + 1 entries, index = seq & mask
    uint64_t transport_cc_stamped    # the publisher's element rewritten in place
    uint64_t transport_cc_added      # an element added (the datagram grew)
    uint64_t transport_cc_unstamped  # could not carry one (see transport_cc_growth)
    uint64_t padding_sent            # padding-only RTX probes the kernel accepted
    uint64_t packets_sent
    uint64_t bytes_sent
    uint64_t send_errors
    uint64_t protect_errors
    uint64_t dropped_waiting_keyframe
    uint64_t resent
    uint64_t rtx_sent
    uint64_t resend_misses
    uint64_t sender_reports_sent
    uint64_t rtcp_sent
    uint64_t rtcp_received
    uint64_t rtcp_errors


cdef struct Track:
    uint8_t in_use
    int cache_packets
    uint8_t* cache               # cache_packets slots of MAX_RTP_PACKET bytes
    uint16_t* cache_seq          # publisher sequence number stored in each slot
    uint16_t* cache_len          # 0: slot empty
    Subscription* subscriptions
    int subscription_count
    int subscription_capacity
    int32_t* subscription_of_viewer   # [max_viewers] index into subscriptions, -1: none
    uint64_t pushed
    uint32_t clock_rate          # RTP clock (RFC 3550 §5.1), for timestamps across a switch
    int payload_format           # PAYLOAD_*
    uint8_t transport_cc_id      # the publisher's transport-wide cc extension id; 0: none


cdef struct FanoutCounters:
    uint64_t pushed
    uint64_t dropped_malformed
    uint64_t dropped_too_large
    uint64_t dropped_waiting_keyframe
    uint64_t packets_sent
    uint64_t bytes_sent
    uint64_t send_errors
    uint64_t send_buffer_full    # the part of send_errors due to EAGAIN/ENOBUFS
    uint64_t protect_errors
    uint64_t sendmmsg_calls
    uint64_t resent
    uint64_t rtx_sent
    uint64_t resend_misses
    uint64_t sender_reports_sent
    uint64_t rtcp_sent
    uint64_t switches_completed
    uint64_t switch_log_overflows
    uint64_t dropped_temporal_layer
    uint64_t dropped_stale          # pushed packets older than a subscription's offsets
    uint64_t gso_messages           # sendmmsg entries that carried >= 2 segments (UDP GSO)
    uint64_t gso_segments           # datagrams those entries carried
    uint64_t gso_refused            # GSO entries the kernel refused, re-sent one per entry
    uint64_t padded_packets         # packets given RTP padding to equal their run's size
    uint64_t padding_bytes          # padding octets that added
    uint64_t transport_cc_stamped   # Viewer counters of the same names, summed
    uint64_t transport_cc_added
    uint64_t transport_cc_unstamped
    uint64_t padding_sent


# Preallocated datagrams for one sendmmsg(2) call. A slot is one datagram; an entry
# (mmsghdr) is one slot, or, with UDP GSO, a run of consecutive slots for one viewer
# (msg_iov spans their iovecs) with a UDP_SEGMENT control message.
cdef struct SendBatch:
    int fd
    int capacity
    int count                    # slots in use
    int message_count            # entries in use
    int open_message             # the entry the next segment of this run may join; -1
    uint8_t* buffers             # capacity slots of BATCH_SLOT_SIZE bytes
    iovec* iov                   # per slot
    mmsghdr* messages            # per entry
    int32_t* message_first       # per entry: its first slot
    int32_t* message_segments    # per entry: slots it carries
    int32_t* message_bytes       # per entry: payload bytes of those slots
    uint16_t* message_gso_size   # per entry: length of its first segment
    void** message_plain_control     # per entry: the viewer's own control message ...
    size_t* message_plain_controllen # ... which a plain re-send of its segments uses
    uint64_t* gso_control        # per entry: GSO_CONTROL_WORDS words of control messages
    uint8_t* accepted            # per slot, after flush: 1 if the kernel took it
    int32_t* slot_viewer         # per slot: viewer index (Fanout bookkeeping)
    Subscription** slot_subscription   # per slot: RTP data counted for SRs, or NULL
    uint32_t* slot_payload_len
    int32_t* slot_transport_seq  # per slot: transport-wide sequence number logged; -1: none
    # CLOCK_MONOTONIC when the first transport-cc slot of this batch was queued (the
    # send time logged for all of them, TransportSendRecord units); transport_clock_set
    # is 0 until then.
    uint32_t transport_clock
    int transport_clock_set


# One publisher packet of a push_batch burst: where it is and what push() reads from it,
# found once and reused for every viewer.
cdef struct BurstPacket:
    const uint8_t* data          # the caller's bytes (alive for the whole call)
    int length
    int padded_length            # with RTP padding to its run's segment size (GSO only)
    uint16_t sequence
    uint32_t timestamp
    uint8_t keyframe
    # The track's transport-cc element: its index in layout (-1: none), the octets a
    # transport-cc viewer's copy grows by (0, TRANSPORT_CC_IN_BLOCK, TRANSPORT_CC_NEW_BLOCK;
    # -1: cannot carry one), and the largest growth in its GSO run (padded up to it).
    int transport_cc_index
    int transport_cc_growth
    int run_growth
    RtpLayout layout
    DescriptorFields descriptor


# ------------------------------------------------------------------ receiver (_receiver.pxi)

cdef enum:
    RX_SLOT_SIZE = 2048              # one datagram; WebRTC media stays under ~1300 bytes
    RX_MAX_STREAMS = 4               # SSRCs counted per viewer (audio, video, RTX, spare)
    RX_CONTROL_SLOTS = 256           # STUN/DTLS datagrams returned by one drain()
    # CMSG_SPACE(timespec) + CMSG_SPACE(uint32) + CMSG_SPACE(int) (UDP_GRO) = 80
    RX_ANCILLARY_SIZE = 96
    # With UDP_GRO a read may return a run of datagrams coalesced (udp(7)): up to 64 KiB.
    RX_GRO_SLOT_SIZE = 65536
    RX_MAX_EVENTS = 256              # ready sockets taken from one epoll_wait
    RX_BATCHES_PER_SOCKET = 8        # recvmmsg calls per ready socket per drain (fairness)
    RX_DUPLICATE_WINDOW = 64         # sequence numbers remembered for duplicate detection


cdef struct RxStream:
    uint32_t ssrc
    int in_use
    int kind
    uint32_t clock_rate
    int64_t base_seq                 # extended sequence number of the first packet
    int64_t highest_seq              # highest extended sequence number (RFC 3550 §A.1)
    uint64_t window                  # bit i: highest_seq - i was received
    uint64_t packets                 # unique packets (duplicates excluded)
    uint64_t duplicates
    uint64_t late                    # older than the window: counted, not checked
    double jitter                    # RFC 3550 §6.4.1, in timestamp units
    uint32_t last_transit
    int has_transit


cdef struct RxViewer:
    int fd
    int in_use
    int polled                       # out of the epoll set, read by poll()
    int keyed
    int has_video
    SrtpCtx srtp
    uint8_t pt_kind[128]
    uint32_t pt_clock[128]
    RxStream streams[RX_MAX_STREAMS]
    uint64_t packets                 # RTP datagrams, duplicates included
    uint64_t bytes                   # their UDP payload bytes
    uint64_t rtcp_packets
    uint64_t control_packets
    uint64_t control_dropped         # STUN/DTLS beyond RX_CONTROL_SLOTS in one drain
    uint64_t decrypted
    uint64_t decrypt_failures        # authentication or format failures (not replays)
    uint64_t replayed
    uint64_t unkeyed                 # RTP before the DTLS keys were set
    uint64_t malformed
    uint64_t other_streams           # packets of SSRCs beyond RX_MAX_STREAMS
    uint64_t coalesced_reads         # reads that returned >= 2 datagrams (UDP_GRO)
    uint32_t socket_drops            # SO_RXQ_OVFL: dropped by this socket's full buffer
    uint64_t sample_counter
    double first_rtp_at
    double first_keyframe_at
    double last_rtp_at
