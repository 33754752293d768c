# Fanout: the per-viewer send path (DESIGN.md §1, §4).
#
# Theory of operation
# -------------------
# One Fanout per worker, sending on the worker's bound, non-blocking UDP socket (asyncio
# receives on the same fd; this file only sends). Everything per viewer lives in C arrays
# allocated once:
#
#   viewers[max_viewers]     Viewer: tx/rx SrtpCtx by value, destination, source
#                            control message, counters
#   tracks[max_tracks]       Track: packet cache ring + its subscriptions, contiguous
#   track.subscriptions[]    Subscription: viewer index, out SSRC/PT, seq/ts offsets,
#                            extension id map, RTX, keyframe gate, SR counts
#   batch                    batch_size preallocated datagram slots + iovec/mmsghdr
#   switch_log               simulcast switches completed since the last take_switches()
#
# push() copies the publisher's packet once into the track's cache, then runs ONE nogil
# loop over the track's subscriptions: copy into the next batch slot, rewrite the header
# for that viewer, SRTP-protect in place, and sendmmsg(2) every full batch. The
# subscriptions array holds exactly what that loop reads, so it streams through memory;
# unsubscribe swap-removes to keep it dense.
#
# Simulcast (one track per layer). A viewer moves between layers with switch(): a second,
# *pending* subscription is made on the target track, waiting for a keyframe; when the
# target's keyframe passes through push(), that subscription takes over inside the same
# nogil loop: it keeps the viewer's SSRC, continues its sequence numbers (out seq = last
# out seq + 1), advances its timestamp by the real time elapsed since the last packet the
# viewer got (RFC 3550 §5.1: timestamps follow the sampling clock), continues VP8/VP9
# picture ids and TL0PICIDX (RFC 7741 §4.2, RFC 9628 §4.2), and the old subscription is
# removed. Python only hears of it afterwards, through take_switches(). VP8 temporal
# layers above a viewer's limit are dropped per packet, shrinking the viewer's sequence
# numbers and picture ids so that neither shows a gap (a gap would read as loss and
# trigger NACKs and PLIs). VP9 temporal dropping shrinks sequence numbers only: VP9
# receivers derive references from picture-id distances (see _drop_temporal_vp9).
#
# Retransmissions. resend() answers a viewer's NACK from the track's cache with the same
# rewrite as the live path: header and payload descriptor, so a repair carries the
# picture id and TL0PICIDX the viewer got the original with. Every change of a
# subscription's offsets (a switch, a dropped packet) moves its floor,
# offset_valid_from, past the packet that caused it, so the offsets in force now are
# those of every packet not before the floor; older numbers are misses. A packet
# dropped after later ones went out leaves a gap that resend must not fill
# (resend_valid_from). Both floors trail the stream by at most OFFSET_FLOOR_TRAIL.
#
# Transport-wide congestion control (draft-holmer-rmcat-transport-wide-cc-extensions-01).
# A viewer given set_transport_cc gets its own 16-bit transport-wide sequence number on
# every RTP packet sent to it (media, RTX, padding probes: one counter per viewer, since
# BUNDLE puts all its subscriptions on one transport), written during the per-viewer copy
# (see "Transport-wide sequence numbers" below), and each number's datagram size and send
# time (one CLOCK_MONOTONIC reading per sendmmsg batch) go into a per-viewer ring that
# transport_sent() reads when the viewer's transport feedback arrives. send_padding()
# sends padding-only RTX probes under the same numbering.
#
# Source addresses. On a host with several addresses, a socket bound to the wildcard
# address sends from whatever source the kernel's route picks, but a viewer accepts only
# datagrams from the transport address its ICE check reached (RFC 8445 §4: a candidate
# pair is two transport addresses; RFC 5764 §5.1.1: DTLS-SRTP runs on the selected pair).
# A viewer given a ``source`` carries a prebuilt IP_PKTINFO / IPV6_PKTINFO control message
# (RFC 3542 §6.1) that every datagram's mmsghdr points at, so the kernel sends from that
# address: no copy, no allocation per packet. Without a source, msg_control stays NULL
# and the kernel chooses, as before.
#
# Not thread-safe: call every method from the thread that owns the worker's event loop
# (the nogil sections release the GIL for other Python threads, not for re-entry).

from libc.stdint cimport int16_t, int32_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec

from whepfan.includes.system cimport (
    AF_INET,
    AF_INET6,
    CMSG_DATA,
    CMSG_LEN,
    CMSG_SPACE,
    EAGAIN,
    EINTR,
    EINVAL,
    EIO,
    EMSGSIZE,
    ENOBUFS,
    ENOPROTOOPT,
    EOPNOTSUPP,
    MSG_DONTWAIT,
    SOL_UDP,
    UDP_SEGMENT,
    SO_TYPE,
    SOCK_DGRAM,
    SOL_SOCKET,
    errno,
    getsockname,
    getsockopt,
    htons,
    in6_pktinfo,
    in_pktinfo,
    IP_PKTINFO,
    IPPROTO_IP,
    IPPROTO_IPV6,
    IPV6_PKTINFO,
    cmsghdr,
    mmsghdr,
    msghdr,
    sendmmsg,
    sockaddr,
    sockaddr_in,
    sockaddr_in6,
    sockaddr_storage,
    socklen_t,
)

# GCC/Clang: start fetching a cache line for writing (rw = 1) without waiting for it.
cdef extern from *:
    void __builtin_prefetch(const void* address, int rw, int locality) nogil

import ipaddress as _ipaddress
import os as _os
import socket as _socket


# How a track's payload is read in the fan-out loop (everything else is opaque bytes).
cpdef enum:
    PAYLOAD_OPAQUE = 0
    PAYLOAD_VP8 = 1              # RFC 7741 payload descriptor: temporal layers, picture ids
    PAYLOAD_VP9 = 2              # RFC 9628 payload descriptor: temporal layers, picture ids

cdef enum ExtensionForm:
    EXT_NONE = 0                 # no header extension (X = 0)
    EXT_ONE_BYTE = 1             # RFC 8285 §4.2, profile 0xBEDE
    EXT_TWO_BYTE = 2             # RFC 8285 §4.3, profile 0x100X
    EXT_OTHER = 3                # another profile (RFC 3550 §5.3.1): forwarded untouched


# ---------------------------------------------------------------------------------------
# Big-endian helpers (network byte order, RFC 3550 §4).

cdef inline uint16_t load16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint32_t load32(const uint8_t* p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]


cdef inline void store16(uint8_t* p, uint16_t value) noexcept nogil:
    p[0] = <uint8_t>(value >> 8)
    p[1] = <uint8_t>value


cdef inline void store32(uint8_t* p, uint32_t value) noexcept nogil:
    p[0] = <uint8_t>(value >> 24)
    p[1] = <uint8_t>(value >> 16)
    p[2] = <uint8_t>(value >> 8)
    p[3] = <uint8_t>value


# ---------------------------------------------------------------------------------------
# RTP header layout and per-viewer rewrite.
#
#  0                   1                   2                   3
#  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |V=2|P|X|  CC   |M|     PT      |       sequence number         |  <- PT, seq rewritten
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                           timestamp                           |  <- + ts_offset
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |           synchronization source (SSRC) identifier            |  <- viewer's SSRC
# +=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+
# |            contributing source (CSRC) identifiers             |  (CC x 4 bytes)
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |  0xBEDE or 0x100X (RFC 8285)  |     length in 32-bit words    |  (if X = 1)
# |  elements: ids remapped in place, unmapped ones zeroed ...    |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |  payload ...                                  | padding | cnt |  (if P = 1)
#                                         RFC 3550 §5.1, §5.3.1

cdef int rtp_parse_layout(const uint8_t* packet, int length, RtpLayout* layout) noexcept nogil:
    """Fill ``layout``; 0 on success, -1 if the bytes are not a well-formed RTP packet."""
    cdef int position, extension_end, element_size, profile
    cdef uint8_t first
    layout.ext_form = EXT_NONE
    layout.ext_count = 0
    layout.padding_len = 0
    if length < 12 or (packet[0] >> 6) != 2:
        return -1
    position = 12 + 4 * (packet[0] & 0x0F)
    if position > length:
        return -1
    layout.ext_data_start = position
    if packet[0] & 0x10:
        if position + 4 > length:
            return -1
        profile = load16(packet + position)
        extension_end = position + 4 + 4 * load16(packet + position + 2)
        if extension_end > length:
            return -1
        position += 4
        layout.ext_data_start = position
        if profile == 0xBEDE:
            # RFC 8285 §4.2: ID (4 bits) | L (4 bits) | L+1 data bytes. A zero byte is
            # padding; ID 15 ends processing of the whole extension block.
            layout.ext_form = EXT_ONE_BYTE
            while position < extension_end:
                first = packet[position]
                if first >> 4 == 0:
                    position += 1
                    continue
                if first >> 4 == 15:
                    break
                element_size = 2 + (first & 0x0F)
                if position + element_size > extension_end or layout.ext_count == MAX_EXT_ELEMENTS:
                    return -1
                layout.ext_offset[layout.ext_count] = <uint16_t>position
                layout.ext_size[layout.ext_count] = <uint16_t>element_size
                layout.ext_id[layout.ext_count] = first >> 4
                layout.ext_count += 1
                position += element_size
        elif (profile & 0xFFF0) == 0x1000:
            # RFC 8285 §4.3: ID (8 bits) | length (8 bits) | data; a zero ID byte is padding.
            layout.ext_form = EXT_TWO_BYTE
            while position < extension_end:
                first = packet[position]
                if first == 0:
                    position += 1
                    continue
                if position + 2 > extension_end:
                    return -1
                element_size = 2 + packet[position + 1]
                if position + element_size > extension_end or layout.ext_count == MAX_EXT_ELEMENTS:
                    return -1
                layout.ext_offset[layout.ext_count] = <uint16_t>position
                layout.ext_size[layout.ext_count] = <uint16_t>element_size
                layout.ext_id[layout.ext_count] = first
                layout.ext_count += 1
                position += element_size
        else:
            layout.ext_form = EXT_OTHER
        position = extension_end
    if packet[0] & 0x20:
        # RFC 3550 §5.1: the last octet counts the padding octets, itself included.
        layout.padding_len = packet[length - 1]
        if layout.padding_len == 0 or position + layout.padding_len > length:
            return -1
    layout.header_len = position
    layout.payload_len = length - position - layout.padding_len
    return 0


cdef inline void rtp_rewrite(uint8_t* packet, const RtpLayout* layout,
                             const Subscription* subscription,
                             uint16_t sequence, uint32_t timestamp, int shift) noexcept nogil:
    """Turn a copy of the publisher's packet into the viewer's (same length, but for
    ``shift``: the octets a transport-cc element inserted before the first element, see
    transport_cc_copy)."""
    cdef int index
    cdef uint8_t viewer_id
    cdef uint8_t* element
    packet[1] = (packet[1] & 0x80) | subscription.payload_type   # keep the marker bit
    store16(packet + 2, <uint16_t>(sequence + subscription.seq_offset))
    store32(packet + 4, timestamp + subscription.ts_offset)
    store32(packet + 8, subscription.ssrc)
    # RFC 8285 §4.1.2: ids are negotiated per session, so each viewer gets its own. An
    # element the viewer did not negotiate is overwritten with zero bytes, which both
    # forms read as padding (§4.2, §4.3), so the packet length never changes.
    for index in range(layout.ext_count):
        element = packet + layout.ext_offset[index] + shift
        viewer_id = 0
        if subscription.ext_map != NULL:
            viewer_id = subscription.ext_map[layout.ext_id[index]]
        if layout.ext_form == EXT_ONE_BYTE:
            if viewer_id == 0 or viewer_id > 14:   # not expressible in one-byte form
                memset(element, 0, layout.ext_size[index])
            else:
                element[0] = <uint8_t>((viewer_id << 4) | (element[0] & 0x0F))
        else:
            if viewer_id == 0:
                memset(element, 0, layout.ext_size[index])
            else:
                element[0] = viewer_id


# ---------------------------------------------------------------------------------------
# Transport-wide sequence numbers (draft-holmer-rmcat-transport-wide-cc-extensions-01 §2).
#
# A viewer with transport-cc on gets its own 16-bit counter on every RTP packet sent to it
# (media, RTX, padding probes), in the header extension it negotiated:
#
#   one-byte form (RFC 8285 §4.2)       two-byte form (RFC 8285 §4.3)
#   | ID | L=1 | seq (16 bits) |        | ID (8) | length=2 | seq (16 bits) |
#
# Where the publisher's packet has its own transport-cc element (the track's id, two data
# octets) that element is rewritten in place: the viewer's id, the viewer's number. A
# packet without one (publishers that did not negotiate it) grows: the element goes first
# in the existing block, whose length grows by one word (the one-byte element is padded
# by a zero octet, which §4.2 allows between elements), or, with X = 0, in a new one-word
# block after the CSRC list (0xBEDE, or 0x1000 when the viewer's id is above 14). Putting
# it first keeps it ahead of an ID 15 terminator and leaves the publisher's elements and
# the payload as they were, moved by whole words. A packet with another extension profile
# (RFC 3550 §5.3.1: one block per packet) or a one-byte block when the viewer's id needs
# the two-byte form cannot carry it: sent without, counted, no number used.

cdef inline void transport_cc_locate(const RtpLayout* layout, uint8_t track_id,
                                     int* index, int* growth) noexcept nogil:
    """Where the track's transport-cc element is in a packet of that layout (``index``,
    -1: absent) and how much a transport-cc viewer's copy grows (``growth``: 0, 4, 8;
    -1: it cannot carry one)."""
    cdef int position
    cdef int wanted = 3 if layout.ext_form == EXT_ONE_BYTE else 4   # header + 2 data octets
    index[0] = -1
    if track_id != 0 and (layout.ext_form == EXT_ONE_BYTE or layout.ext_form == EXT_TWO_BYTE):
        for position in range(layout.ext_count):
            if layout.ext_id[position] == track_id:
                if layout.ext_size[position] == wanted:
                    index[0] = position
                break
    if index[0] >= 0:
        growth[0] = 0
    elif layout.ext_form == EXT_NONE:
        growth[0] = TRANSPORT_CC_NEW_BLOCK
    elif layout.ext_form == EXT_OTHER:
        growth[0] = -1
    else:
        growth[0] = TRANSPORT_CC_IN_BLOCK


cdef inline int transport_cc_growth(const RtpLayout* layout, int growth,
                                    uint8_t viewer_id) noexcept nogil:
    """``growth`` for a viewer whose id is ``viewer_id``: -1 where a one-byte block would
    have to carry an id above 14."""
    if viewer_id > 14 and layout.ext_form == EXT_ONE_BYTE:
        return -1
    return growth


cdef inline int transport_cc_copy(uint8_t* slot, const uint8_t* data, int length,
                                  const RtpLayout* layout, int index, int growth,
                                  uint8_t viewer_id) noexcept nogil:
    """Copy ``length`` octets of the publisher's packet (its header at least) into
    ``slot`` with room for the viewer's element (``growth`` >= 0, see above); returns the
    element's offset in ``slot``, for transport_cc_stamp once rtp_rewrite has run."""
    cdef int at, element
    if growth == 0:
        memcpy(slot, data, length)
        return layout.ext_offset[index]
    at = layout.ext_data_start
    memcpy(slot, data, at)
    memcpy(slot + at + growth, data + at, length - at)
    if growth == TRANSPORT_CC_NEW_BLOCK:
        slot[0] |= 0x10
        store16(slot + at, 0xBEDE if viewer_id <= 14 else 0x1000)
        store16(slot + at + 2, 1)
        element = at + 4
    else:
        store16(slot + at - 2, <uint16_t>(load16(slot + at - 2) + 1))
        element = at
    slot[element + 3] = 0   # the one-byte element's padding octet (two-byte: rewritten)
    return element


cdef inline void transport_cc_stamp(uint8_t* element, bint one_byte, uint8_t viewer_id,
                                    uint16_t sequence) noexcept nogil:
    if one_byte:
        element[0] = <uint8_t>((viewer_id << 4) | 1)   # L = 1: two data octets
        store16(element + 1, sequence)
    else:
        element[0] = viewer_id
        element[1] = 2
        store16(element + 2, sequence)


cdef inline bint transport_cc_one_byte(const RtpLayout* layout, int growth,
                                       uint8_t viewer_id) noexcept nogil:
    """The stamped element's form: the packet's own, or for a new block the smallest
    that carries the viewer's id."""
    if growth == TRANSPORT_CC_NEW_BLOCK:
        return viewer_id <= 14
    return layout.ext_form == EXT_ONE_BYTE


# ---------------------------------------------------------------------------------------
# VP8 payload descriptor (RFC 7741 §4.2), read once per push and patched per viewer.
#
#        0 1 2 3 4 5 6 7
#       +-+-+-+-+-+-+-+-+
#       |X|R|N|S|R| PID |  S: start of a partition, PID: partition index
#       +-+-+-+-+-+-+-+-+
#  X:   |I|L|T|K| RSV   |
#       +-+-+-+-+-+-+-+-+
#  I:   |M| PictureID   |  <- + picture_id_offset (7 or, with M, 15 bits)
#       +-+-+-+-+-+-+-+-+
#  M:   |   PictureID   |
#       +-+-+-+-+-+-+-+-+
#  L:   |   TL0PICIDX   |  <- + tl0_offset
#       +-+-+-+-+-+-+-+-+
#  T/K: |TID|Y| KEYIDX  |  TID decides temporal dropping, Y allows an upswitch
#       +-+-+-+-+-+-+-+-+

cdef void vp8_parse_fields(const uint8_t* payload, int length,
                           DescriptorFields* fields) noexcept nogil:
    """Fill ``fields``; ``present`` stays 0 if the descriptor is truncated."""
    cdef int position = 1
    cdef uint8_t first, extension
    memset(fields, 0, sizeof(DescriptorFields))
    fields.picture_id = -1
    fields.tl0_pic_idx = -1
    fields.temporal_layer = -1
    if length < 1:
        return
    first = payload[0]
    if first & 0x80:
        if length < 2:
            return
        extension = payload[1]
        position = 2
        if extension & 0x80:
            if position >= length:
                return
            fields.picture_id_offset = position
            if payload[position] & 0x80:
                if position + 2 > length:
                    return
                fields.long_picture_id = 1
                fields.picture_id = ((payload[position] & 0x7F) << 8) | payload[position + 1]
                position += 2
            else:
                fields.picture_id = payload[position]
                position += 1
        if extension & 0x40:
            if position >= length:
                return
            fields.tl0_offset = position
            fields.tl0_pic_idx = payload[position]
            position += 1
        if extension & 0x30:
            if position >= length:
                return
            if extension & 0x20:
                fields.temporal_layer = payload[position] >> 6
                fields.layer_sync = (payload[position] >> 5) & 1
            position += 1
    fields.frame_start = (first & 0x10) != 0 and (first & 0x07) == 0
    fields.present = 1


cdef inline void descriptor_rewrite(uint8_t* payload, const DescriptorFields* fields,
                                    const Subscription* subscription) noexcept nogil:
    """Shift picture id and TL0PICIDX into the viewer's continuous numbering (same length).
    VP8 and VP9 share this: both put |M| id | [id] | and a one-octet TL0PICIDX in place.
    A 7-bit id gets the low 7 bits of the viewer's 15-bit count, so both widths stay
    continuous modulo their own size for one subscription."""
    cdef uint16_t picture_id
    if fields.picture_id >= 0 and subscription.picture_id_offset:
        picture_id = <uint16_t>((fields.picture_id + subscription.picture_id_offset) & 0x7FFF)
        if fields.long_picture_id:
            payload[fields.picture_id_offset] = <uint8_t>(0x80 | (picture_id >> 8))
            payload[fields.picture_id_offset + 1] = <uint8_t>picture_id
        else:
            payload[fields.picture_id_offset] = <uint8_t>(picture_id & 0x7F)
    if fields.tl0_pic_idx >= 0 and subscription.tl0_offset:
        payload[fields.tl0_offset] = <uint8_t>(fields.tl0_pic_idx + subscription.tl0_offset)


# ---------------------------------------------------------------------------------------
# VP9 payload descriptor (RFC 9628 §4.2), read once per push and patched per viewer.
#
#        0 1 2 3 4 5 6 7
#       +-+-+-+-+-+-+-+-+
#       |I|P|L|F|B|E|V|Z|  P: inter-picture predicted, F: flexible, B/E: frame start/end
#       +-+-+-+-+-+-+-+-+
#  I:   |M| PICTURE ID  |  <- + picture_id_offset (7 or, with M, 15 bits)
#       +-+-+-+-+-+-+-+-+
#  M:   | EXTENDED PID  |
#       +-+-+-+-+-+-+-+-+
#  L:   | TID |U| SID |D|  TID decides temporal dropping, U allows an upswitch
#       +-+-+-+-+-+-+-+-+
#       |   TL0PICIDX   |  <- + tl0_offset (L set, non-flexible mode only)
#       +-+-+-+-+-+-+-+-+
#  P,F: | P_DIFF      |N|  flexible mode: up to 3 references, picture id distances
#       +-+-+-+-+-+-+-+-+
#  V:   | SS ...        |  scalability structure (§4.2.1): not needed here

cdef void vp9_parse_fields(const uint8_t* payload, int length,
                           DescriptorFields* fields) noexcept nogil:
    """Fill ``fields``; ``present`` stays 0 if the descriptor is truncated or malformed."""
    cdef int position = 1, spatial_layer = 0
    cdef uint8_t first, octet
    memset(fields, 0, sizeof(DescriptorFields))
    fields.picture_id = -1
    fields.tl0_pic_idx = -1
    fields.temporal_layer = -1
    if length < 1:
        return
    first = payload[0]
    if first & 0x80:
        if position >= length:
            return
        fields.picture_id_offset = position
        if payload[position] & 0x80:
            if position + 2 > length:
                return
            fields.long_picture_id = 1
            fields.picture_id = ((payload[position] & 0x7F) << 8) | payload[position + 1]
            position += 2
        else:
            fields.picture_id = payload[position]
            position += 1
    fields.flexible = (first & 0x10) != 0
    if first & 0x20:
        if position >= length:
            return
        octet = payload[position]
        fields.temporal_layer = octet >> 5
        fields.layer_sync = (octet >> 4) & 1
        spatial_layer = (octet >> 1) & 0x07
        position += 1
        if not fields.flexible:
            if position >= length:
                return
            fields.tl0_offset = position
            fields.tl0_pic_idx = payload[position]
            position += 1
    if fields.flexible and first & 0x40:
        while True:
            if position >= length or fields.reference_count == VP9_MAX_REFERENCES:
                return
            octet = payload[position]
            position += 1
            if octet >> 1 == 0:
                return   # a zero distance would be the picture itself
            fields.reference_diff[fields.reference_count] = octet >> 1
            fields.reference_count += 1
            if not octet & 0x01:
                break
    # A picture is every spatial layer frame at one instant: it starts at layer 0's B.
    fields.frame_start = (first & 0x08) != 0 and spatial_layer == 0
    fields.present = 1


cdef inline bint seq_before(uint16_t a, uint16_t b) noexcept nogil:
    """RFC 3550 §A.1 serial arithmetic: ``a`` comes before ``b`` (within half the space)."""
    return <int16_t>(<uint16_t>(a - b)) < 0


cdef inline void floors_follow(Subscription* subscription, uint16_t sequence) noexcept nogil:
    """``sequence`` (publisher's) is the newest packet sent to this viewer: drag any floor
    more than OFFSET_FLOOR_TRAIL behind it up to that distance (see OFFSET_FLOOR_TRAIL).
    Without this, 32,768 packets after the last switch or drop every live packet would
    be taken for a stale one and every NACK for a miss, for the next 32,768."""
    cdef uint16_t trail = <uint16_t>(sequence - OFFSET_FLOOR_TRAIL)
    if subscription.offset_floor_set and seq_before(subscription.offset_valid_from, trail):
        subscription.offset_valid_from = trail
    if subscription.resend_floor_set and seq_before(subscription.resend_valid_from, trail):
        subscription.resend_valid_from = trail


cdef inline void resend_floor_after(Subscription* subscription, uint16_t dropped) noexcept nogil:
    """``dropped`` was not sent to this viewer but its numbers were not closed up around it
    (it came after later packets): the viewer's sequence number for it is a gap, and
    what the cache holds there must not fill it (with the VP8 offsets of now, it would
    carry the picture id of the picture before). Retransmissions up to it are misses."""
    if not subscription.resend_floor_set or seq_before(subscription.resend_valid_from,
                                                        <uint16_t>(dropped + 1)):
        subscription.resend_valid_from = <uint16_t>(dropped + 1)
        subscription.resend_floor_set = 1


# ---------------------------------------------------------------------------------------
# Batches of datagrams for sendmmsg(2).

cdef int batch_init(SendBatch* batch, int fd, int capacity) noexcept:
    """Allocate; 0 on success, -1 if out of memory (``batch_free`` is safe either way)."""
    cdef int index
    memset(batch, 0, sizeof(SendBatch))
    batch.fd = fd
    batch.capacity = capacity
    batch.buffers = <uint8_t*>malloc(<size_t>capacity * BATCH_SLOT_SIZE)
    batch.iov = <iovec*>calloc(capacity, sizeof(iovec))
    batch.messages = <mmsghdr*>calloc(capacity, sizeof(mmsghdr))
    batch.message_first = <int32_t*>calloc(capacity, sizeof(int32_t))
    batch.message_segments = <int32_t*>calloc(capacity, sizeof(int32_t))
    batch.message_bytes = <int32_t*>calloc(capacity, sizeof(int32_t))
    batch.message_gso_size = <uint16_t*>calloc(capacity, sizeof(uint16_t))
    batch.message_plain_control = <void**>calloc(capacity, sizeof(void*))
    batch.message_plain_controllen = <size_t*>calloc(capacity, sizeof(size_t))
    batch.gso_control = <uint64_t*>calloc(<size_t>capacity * GSO_CONTROL_WORDS, sizeof(uint64_t))
    batch.accepted = <uint8_t*>calloc(capacity, sizeof(uint8_t))
    batch.slot_viewer = <int32_t*>calloc(capacity, sizeof(int32_t))
    batch.slot_subscription = <Subscription**>calloc(capacity, sizeof(Subscription*))
    batch.slot_payload_len = <uint32_t*>calloc(capacity, sizeof(uint32_t))
    batch.slot_transport_seq = <int32_t*>calloc(capacity, sizeof(int32_t))
    batch.open_message = -1
    if (batch.buffers == NULL or batch.iov == NULL or batch.messages == NULL
            or batch.message_first == NULL or batch.message_segments == NULL
            or batch.message_bytes == NULL or batch.message_gso_size == NULL
            or batch.message_plain_control == NULL or batch.message_plain_controllen == NULL
            or batch.gso_control == NULL
            or batch.accepted == NULL or batch.slot_viewer == NULL
            or batch.slot_subscription == NULL or batch.slot_payload_len == NULL
            or batch.slot_transport_seq == NULL):
        return -1
    for index in range(capacity):
        batch.iov[index].iov_base = batch.buffers + <size_t>index * BATCH_SLOT_SIZE
    return 0


cdef void batch_free(SendBatch* batch) noexcept:
    free(batch.buffers)
    free(batch.iov)
    free(batch.messages)
    free(batch.message_first)
    free(batch.message_segments)
    free(batch.message_bytes)
    free(batch.message_gso_size)
    free(batch.message_plain_control)
    free(batch.message_plain_controllen)
    free(batch.gso_control)
    free(batch.accepted)
    free(batch.slot_viewer)
    free(batch.slot_subscription)
    free(batch.slot_payload_len)
    free(batch.slot_transport_seq)
    memset(batch, 0, sizeof(SendBatch))


cdef inline uint8_t* batch_next_slot(SendBatch* batch) noexcept nogil:
    return batch.buffers + <size_t>batch.count * BATCH_SLOT_SIZE


cdef inline void batch_commit(SendBatch* batch, int length, const sockaddr_in6* address,
                              socklen_t address_len, void* control,
                              size_t control_len) noexcept nogil:
    """The next slot holds ``length`` bytes for ``address``: add it to the batch as an
    entry of its own, sent with ``control`` (NULL: none)."""
    cdef int slot = batch.count
    cdef int entry = batch.message_count
    cdef msghdr* header = &batch.messages[entry].msg_hdr
    batch.iov[slot].iov_len = length
    header.msg_name = <void*>address
    header.msg_namelen = address_len
    header.msg_iov = &batch.iov[slot]
    header.msg_iovlen = 1
    header.msg_control = control
    header.msg_controllen = control_len
    batch.message_first[entry] = slot
    batch.message_segments[entry] = 1
    batch.message_bytes[entry] = length
    batch.message_gso_size[entry] = <uint16_t>length
    batch.message_plain_control[entry] = control
    batch.message_plain_controllen[entry] = control_len
    batch.count += 1
    batch.message_count += 1


if CMSG_SPACE(sizeof(uint16_t)) > (GSO_CONTROL_WORDS - SOURCE_CONTROL_WORDS) * sizeof(uint64_t):
    raise ImportError("UDP_SEGMENT control message larger than its room in gso_control")


cdef inline void batch_join(SendBatch* batch, int length) noexcept nogil:
    """The next slot holds ``length`` bytes for the last entry's destination: make it
    that entry's next GSO segment (udp(7) UDP_SEGMENT). The caller checked that all of
    the entry's segments so far are ``message_gso_size`` long and ``length`` is at most
    that: the kernel cuts the entry's bytes into segments of that size, so only the
    last may be shorter."""
    cdef int slot = batch.count
    cdef int entry = batch.message_count - 1
    cdef msghdr* header = &batch.messages[entry].msg_hdr
    cdef uint64_t* control
    cdef cmsghdr* segment
    batch.iov[slot].iov_len = length
    header.msg_iovlen += 1       # msg_iov spans consecutive slots' iovecs
    batch.message_segments[entry] += 1
    batch.message_bytes[entry] += length
    batch.count += 1
    if batch.message_segments[entry] == 2:
        # Now a GSO entry: the viewer's source control message (if any), then UDP_SEGMENT
        # at the CMSG_SPACE-aligned offset after it, in the same msghdr.
        control = batch.gso_control + <size_t>entry * GSO_CONTROL_WORDS
        if batch.message_plain_controllen[entry]:
            memcpy(control, batch.message_plain_control[entry],
                   batch.message_plain_controllen[entry])
        segment = <cmsghdr*>((<uint8_t*>control) + batch.message_plain_controllen[entry])
        segment.cmsg_level = SOL_UDP
        segment.cmsg_type = UDP_SEGMENT
        segment.cmsg_len = CMSG_LEN(sizeof(uint16_t))
        (<uint16_t*>CMSG_DATA(segment))[0] = batch.message_gso_size[entry]
        header.msg_control = control
        header.msg_controllen = batch.message_plain_controllen[entry] + CMSG_SPACE(sizeof(uint16_t))


cdef inline bint gso_refusal(int error) noexcept nogil:
    """An error the kernel gives a GSO entry for the segmentation itself, not for its
    destination: EIO (no checksum offload or an IPsec route on the way), EINVAL (segment
    larger than the route's MTU allows, or too many segments), EMSGSIZE, EOPNOTSUPP and
    ENOPROTOOPT (no UDP_SEGMENT). Its segments can still go out one per entry."""
    return (error == EIO or error == EINVAL or error == EMSGSIZE or error == EOPNOTSUPP
            or error == ENOPROTOOPT)


cdef inline bint gso_unavailable(int error) noexcept nogil:
    """A refusal that says this socket's path cannot do UDP GSO at all (checksum offload
    missing, xfrm, no kernel support), rather than this one entry being too large."""
    return error == EIO or error == EOPNOTSUPP or error == ENOPROTOOPT


cdef int batch_send_plain(SendBatch* batch, int entry, FanoutCounters* counters) noexcept nogil:
    """Send the segments of GSO entry ``entry`` as one entry each (the kernel refused the
    GSO entry); marks ``accepted`` per slot, returns datagrams accepted. Same error rules
    as batch_send."""
    cdef mmsghdr plain[GSO_MAX_SEGMENTS]
    cdef int first = batch.message_first[entry]
    cdef int count = batch.message_segments[entry]
    cdef int index, position = 0, result, error, retried = 0, accepted = 0
    cdef bint buffer_full
    memset(plain, 0, count * sizeof(mmsghdr))
    for index in range(count):
        plain[index].msg_hdr.msg_name = batch.messages[entry].msg_hdr.msg_name
        plain[index].msg_hdr.msg_namelen = batch.messages[entry].msg_hdr.msg_namelen
        plain[index].msg_hdr.msg_iov = &batch.iov[first + index]
        plain[index].msg_hdr.msg_iovlen = 1
        plain[index].msg_hdr.msg_control = batch.message_plain_control[entry]
        plain[index].msg_hdr.msg_controllen = batch.message_plain_controllen[entry]
    while position < count:
        result = sendmmsg(batch.fd, plain + position, count - position, MSG_DONTWAIT)
        counters.sendmmsg_calls += 1
        if result > 0:
            for index in range(position, position + result):
                batch.accepted[first + index] = 1
            position += result
            accepted += result
            continue
        error = errno if result < 0 else EAGAIN
        buffer_full = error == EAGAIN or error == ENOBUFS
        if error == EINTR or (buffer_full and not retried):
            retried = 1
            continue
        if buffer_full:
            counters.send_buffer_full += count - position
            counters.send_errors += count - position
            break
        counters.send_errors += 1
        position += 1
    return accepted


cdef int batch_send(SendBatch* batch, FanoutCounters* counters, int* gso_error) noexcept nogil:
    """sendmmsg the batch; fills ``accepted`` per slot, returns datagrams accepted.

    sendmmsg stops at the first entry that fails; if some went out it returns their
    number and the error is lost (sendmmsg(2)), so the unsent tail is sent again, which
    either makes progress or reports the error of its first entry. A full socket
    buffer (EAGAIN/ENOBUFS) gets one immediate retry, then the rest of the batch is
    dropped: waiting would stall every other viewer. Any other error belongs to that
    entry's destination: drop it alone and go on with the next. A GSO entry the kernel
    refuses as such (gso_refusal) is re-sent one segment per entry; if the refusal says
    the path cannot do GSO, ``gso_error`` is set to it so the Fanout stops using it.
    """
    cdef int position = 0, result, error, retried = 0, accepted = 0, entry, index, segments
    cdef bint buffer_full
    memset(batch.accepted, 0, batch.count)
    while position < batch.message_count:
        # MSG_DONTWAIT: never block in here, even if the fd was left in blocking mode.
        result = sendmmsg(batch.fd, batch.messages + position, batch.message_count - position,
                          MSG_DONTWAIT)
        counters.sendmmsg_calls += 1
        if result > 0:
            for entry in range(position, position + result):
                segments = batch.message_segments[entry]
                for index in range(batch.message_first[entry],
                                   batch.message_first[entry] + segments):
                    batch.accepted[index] = 1
                accepted += segments
                if segments > 1:
                    counters.gso_messages += 1
                    counters.gso_segments += segments
            position += result
            continue
        error = errno if result < 0 else EAGAIN
        # Linux: EWOULDBLOCK == EAGAIN. ENOBUFS: the device queue is full.
        buffer_full = error == EAGAIN or error == ENOBUFS
        if error == EINTR or (buffer_full and not retried):
            retried = 1
            continue
        if buffer_full:
            segments = 0
            for entry in range(position, batch.message_count):
                segments += batch.message_segments[entry]
            counters.send_buffer_full += segments
            counters.send_errors += segments
            break
        segments = batch.message_segments[position]
        if segments > 1 and gso_refusal(error):
            counters.gso_refused += 1
            if gso_unavailable(error):
                gso_error[0] = error
            accepted += batch_send_plain(batch, position, counters)
        else:
            counters.send_errors += segments
        position += 1
    return accepted


# ---------------------------------------------------------------------------------------
# Addresses (Python level: once per viewer, never per packet).

cdef int socket_family(int fd) except -1:
    """AF_INET or AF_INET6 of a bound UDP socket; ValueError for anything else."""
    cdef sockaddr_storage bound
    cdef socklen_t bound_len = sizeof(bound)
    cdef int socket_type = 0
    cdef socklen_t type_len = sizeof(socket_type)
    if getsockname(fd, <sockaddr*>&bound, &bound_len) != 0:
        raise ValueError(f"fd {fd} is not a socket: {_os.strerror(errno)}")
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &socket_type, &type_len) != 0
            or socket_type != SOCK_DGRAM):
        raise ValueError(f"fd {fd} is not a UDP socket")
    if bound.ss_family != AF_INET and bound.ss_family != AF_INET6:
        raise ValueError(f"fd {fd} is neither IPv4 nor IPv6")
    return bound.ss_family


cdef int fill_address(sockaddr_in6* out, socklen_t* out_len, int family, host, port) except -1:
    """Destination ``host``:``port`` (an IP literal) as a sockaddr for a ``family`` socket."""
    cdef sockaddr_in* out4 = <sockaddr_in*>out
    cdef bytes packed
    cdef unsigned int scope_id = 0
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"invalid UDP port {port!r}")
    ip = _ipaddress.ip_address(host)   # names are refused: no DNS on the media path
    if ip.version == 6 and ip.ipv4_mapped is not None and family == AF_INET:
        ip = ip.ipv4_mapped
    memset(out, 0, sizeof(sockaddr_in6))
    if family == AF_INET:
        if ip.version != 4:
            raise ValueError(f"IPv6 destination {host} on an IPv4 socket")
        packed = ip.packed
        out4.sin_family = AF_INET
        out4.sin_port = htons(port)
        memcpy(&out4.sin_addr, <const char*>packed, 4)
        out_len[0] = sizeof(sockaddr_in)
        return 0
    if ip.version == 4:
        # RFC 4291 §2.5.5.2: IPv4-mapped IPv6 address, ::ffff:a.b.c.d.
        packed = b"\x00" * 10 + b"\xff\xff" + ip.packed
    else:
        packed = ip.packed
        if ip.scope_id:
            # A link-local destination needs its interface (RFC 4007 §11).
            if ip.scope_id.isdigit():
                scope_id = int(ip.scope_id)
            else:
                scope_id = _socket.if_nametoindex(ip.scope_id)
    out.sin6_family = AF_INET6
    out.sin6_port = htons(port)
    out.sin6_scope_id = scope_id
    memcpy(out.sin6_addr.s6_addr, <const char*>packed, 16)
    out_len[0] = sizeof(sockaddr_in6)
    return 0


if CMSG_SPACE(sizeof(in6_pktinfo)) > SOURCE_CONTROL_WORDS * sizeof(uint64_t):
    raise ImportError("IPV6_PKTINFO control message larger than Viewer.source_control")


cdef int fill_source(uint64_t* control, size_t* control_len, int family, source) except -1:
    """The control message that makes the kernel send from ``source`` (an IP literal of
    this host; None: no control message). ip(7) IP_PKTINFO: ipi_spec_dst is the source,
    ipi_ifindex 0 lets the route choose the interface. ipv6(7) IPV6_PKTINFO: ipi6_addr is
    the source (RFC 3542 §6.1); Linux accepts an IPv4-mapped one for an IPv4 destination
    on a dual-stack socket, and a link-local one needs its interface (RFC 4007 §11)."""
    cdef cmsghdr* header = <cmsghdr*>control
    cdef in_pktinfo* info4
    cdef in6_pktinfo* info6
    cdef bytes packed
    memset(control, 0, SOURCE_CONTROL_WORDS * sizeof(uint64_t))
    control_len[0] = 0
    if source is None:
        return 0
    ip = _ipaddress.ip_address(source)   # names are refused, as for destinations
    if ip.version == 6 and ip.ipv4_mapped is not None and family == AF_INET:
        ip = ip.ipv4_mapped
    if family == AF_INET:
        if ip.version != 4:
            raise ValueError(f"IPv6 source {source} on an IPv4 socket")
        header.cmsg_level = IPPROTO_IP
        header.cmsg_type = IP_PKTINFO
        header.cmsg_len = CMSG_LEN(sizeof(in_pktinfo))
        info4 = <in_pktinfo*>CMSG_DATA(header)
        packed = ip.packed
        memcpy(&info4.ipi_spec_dst, <const char*>packed, 4)
        control_len[0] = CMSG_SPACE(sizeof(in_pktinfo))
        return 0
    header.cmsg_level = IPPROTO_IPV6
    header.cmsg_type = IPV6_PKTINFO
    header.cmsg_len = CMSG_LEN(sizeof(in6_pktinfo))
    info6 = <in6_pktinfo*>CMSG_DATA(header)
    if ip.version == 4:
        packed = b"\x00" * 10 + b"\xff\xff" + ip.packed   # RFC 4291 §2.5.5.2
    else:
        packed = ip.packed
        if ip.scope_id:
            info6.ipi6_ifindex = (int(ip.scope_id) if ip.scope_id.isdigit()
                                  else _socket.if_nametoindex(ip.scope_id))
    memcpy(info6.ipi6_addr.s6_addr, <const char*>packed, 16)
    control_len[0] = CMSG_SPACE(sizeof(in6_pktinfo))
    return 0


cdef inline double monotonic_seconds() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


# TransportSendRecord.sent_at: CLOCK_MONOTONIC in 2^-16 s, modulo 2^32.
cdef double LOG_CLOCK_RATE = 65536.0


cdef inline uint32_t log_clock(double seconds) noexcept nogil:
    return <uint32_t><uint64_t>(seconds * LOG_CLOCK_RATE)   # mod 2^32


# ---------------------------------------------------------------------------------------

cdef class Fanout:
    """Per-worker send path: re-encrypts each pushed RTP packet once per subscribed viewer
    and sends with batched ``sendmmsg`` on ``fd``. See the theory of operation above.

    ``fd`` stays the caller's (asyncio's) socket: the Fanout never closes it and never
    blocks on it (every send is MSG_DONTWAIT).
    """

    cdef int fd
    cdef int family
    cdef int max_viewers
    cdef int max_tracks
    cdef Viewer* viewers
    cdef int32_t* free_viewers      # stack of free viewer slots
    cdef int free_viewer_count
    cdef Track* tracks
    cdef SendBatch batch
    cdef FanoutCounters counters
    cdef int32_t* switch_log        # (viewer, from track, to track) per completed switch
    cdef int switch_log_count
    cdef BurstPacket* burst         # BURST_CAPACITY packets of the push_batch in progress
    cdef bint gso_on                # push_batch sends each viewer's run as GSO entries
    cdef int gso_error              # errno that turned GSO off at send time; 0: none
    cdef int gso_max_segment        # largest datagram put in a GSO entry
    cdef int pad_limit              # most RTP padding octets added to equal a run
    cdef int transport_log_size     # entries of a transport-cc viewer's send log

    def __cinit__(self, int fd, *, int max_viewers=16384, int max_tracks=64, int batch_size=32,
                  bint gso=False, int gso_max_segment=1452, int pad_limit=32,
                  int transport_log_size=TRANSPORT_LOG_DEFAULT):
        cdef int index
        if max_viewers < 1 or max_tracks < 1:
            raise ValueError("max_viewers and max_tracks must be positive")
        if (not 64 <= transport_log_size <= 65536
                or transport_log_size & (transport_log_size - 1)):
            # A power of two, so a sequence number's entry is seq & mask; at most one
            # entry per 16-bit number.
            raise ValueError("transport_log_size must be a power of two in 64..65536")
        self.transport_log_size = transport_log_size
        if not 1 <= batch_size <= 1024:   # UIO_MAXIOV bounds one sendmmsg call
            raise ValueError("batch_size must be in 1..1024")
        if not 64 <= gso_max_segment <= MAX_RTP_PACKET + SRTP_MAX_OVERHEAD:
            raise ValueError("gso_max_segment must be in 64..1530")
        if not 0 <= pad_limit <= 255:    # RFC 3550 §5.1: the padding count is one octet
            raise ValueError("pad_limit must be in 0..255")
        self.gso_on = gso
        self.gso_max_segment = gso_max_segment
        self.pad_limit = pad_limit
        self.burst = <BurstPacket*>malloc(BURST_CAPACITY * sizeof(BurstPacket))
        if self.burst == NULL:
            raise MemoryError()
        self.family = socket_family(fd)
        self.fd = fd
        self.max_viewers = max_viewers
        self.max_tracks = max_tracks
        self.viewers = <Viewer*>calloc(max_viewers, sizeof(Viewer))
        self.free_viewers = <int32_t*>malloc(max_viewers * sizeof(int32_t))
        self.tracks = <Track*>calloc(max_tracks, sizeof(Track))
        self.switch_log = <int32_t*>malloc(3 * SWITCH_LOG_SIZE * sizeof(int32_t))
        if (batch_init(&self.batch, fd, batch_size) != 0 or self.viewers == NULL
                or self.free_viewers == NULL or self.tracks == NULL or self.switch_log == NULL):
            raise MemoryError()
        # Pop order hands out slot 0 first, and a freed slot is the next one reused.
        for index in range(max_viewers):
            self.free_viewers[index] = max_viewers - 1 - index
        self.free_viewer_count = max_viewers

    def __dealloc__(self):
        cdef int index
        if self.tracks != NULL:
            for index in range(self.max_tracks):
                if self.tracks[index].in_use:
                    self._free_track(&self.tracks[index])
            free(self.tracks)
        if self.viewers != NULL:
            for index in range(self.max_viewers):
                if self.viewers[index].in_use:
                    srtp_ctx_clear(&self.viewers[index].tx)
                    srtp_ctx_clear(&self.viewers[index].rx)
                    free(self.viewers[index].send_log)
            free(self.viewers)
        free(self.free_viewers)
        free(self.switch_log)
        free(self.burst)
        batch_free(&self.batch)

    # -- lookups: unknown ids are the caller's bug, not the peer's -----------------------

    cdef Viewer* _viewer(self, int viewer) except NULL:
        if not 0 <= viewer < self.max_viewers or not self.viewers[viewer].in_use:
            raise KeyError(f"no viewer {viewer}")
        return &self.viewers[viewer]

    cdef Track* _track(self, int track) except NULL:
        if not 0 <= track < self.max_tracks or not self.tracks[track].in_use:
            raise KeyError(f"no track {track}")
        return &self.tracks[track]

    cdef Subscription* _subscription(self, Track* track, int viewer) except NULL:
        cdef int32_t index = track.subscription_of_viewer[viewer]
        if index < 0:
            raise KeyError(f"viewer {viewer} is not subscribed to that track")
        return &track.subscriptions[index]

    # -- tracks --------------------------------------------------------------------------

    def add_track(self, *, int cache_packets=1024, int clock_rate=90000,
                  int payload_format=PAYLOAD_OPAQUE, int transport_cc_id=0) -> int:
        """A new ingest stream with a NACK cache of ``cache_packets`` packets, its RTP
        ``clock_rate``, how its payload may be read (``PAYLOAD_VP8``/``PAYLOAD_VP9``:
        temporal layers, picture ids), and the publisher's transport-wide cc extension
        id (see set_track_transport_cc)."""
        cdef int index
        cdef Track* track
        if not 1 <= cache_packets <= 65536:   # one slot per 16-bit sequence number at most
            raise ValueError("cache_packets must be in 1..65536")
        if not 0 <= transport_cc_id <= 255:
            raise ValueError("transport_cc_id must be 0..255 (RFC 8285 ids are 8-bit)")
        if clock_rate <= 0:
            raise ValueError("clock_rate must be positive")
        if payload_format not in (PAYLOAD_OPAQUE, PAYLOAD_VP8, PAYLOAD_VP9):
            raise ValueError(f"unknown payload format {payload_format}")
        for index in range(self.max_tracks):
            if not self.tracks[index].in_use:
                break
        else:
            raise ValueError(f"all {self.max_tracks} tracks in use")
        track = &self.tracks[index]
        memset(track, 0, sizeof(Track))
        track.cache_packets = cache_packets
        track.cache = <uint8_t*>malloc(<size_t>cache_packets * MAX_RTP_PACKET)
        track.cache_seq = <uint16_t*>calloc(cache_packets, sizeof(uint16_t))
        track.cache_len = <uint16_t*>calloc(cache_packets, sizeof(uint16_t))
        track.subscription_of_viewer = <int32_t*>malloc(self.max_viewers * sizeof(int32_t))
        if (track.cache == NULL or track.cache_seq == NULL or track.cache_len == NULL
                or track.subscription_of_viewer == NULL):
            self._free_track(track)
            raise MemoryError()
        memset(track.subscription_of_viewer, 0xFF, self.max_viewers * sizeof(int32_t))  # -1
        track.clock_rate = clock_rate
        track.payload_format = payload_format
        track.transport_cc_id = transport_cc_id
        track.in_use = 1
        return index

    def set_track_transport_cc(self, int track, int extension_id) -> None:
        """The id under which the publisher's packets of ``track`` carry its own
        transport-wide sequence number (draft-holmer-rmcat-transport-wide-cc-extensions-01
        §2; 0: they do not). Transport-cc viewers get that element rewritten in place with
        their own number; packets without it get one added."""
        cdef Track* source = self._track(track)
        if not 0 <= extension_id <= 255:
            raise ValueError("extension_id must be 0..255 (RFC 8285 ids are 8-bit)")
        source.transport_cc_id = extension_id

    cdef void _free_track(self, Track* track) noexcept:
        cdef int index
        for index in range(track.subscription_count):
            free(track.subscriptions[index].ext_map)
            free(track.subscriptions[index].vp9_picture_history)
        free(track.subscriptions)
        free(track.cache)
        free(track.cache_seq)
        free(track.cache_len)
        free(track.subscription_of_viewer)
        memset(track, 0, sizeof(Track))

    def remove_track(self, int track) -> None:
        self._free_track(self._track(track))

    # -- viewers -------------------------------------------------------------------------

    def add_viewer(self, host: str, int port, *, int profile, const uint8_t[::1] tx_key,
                   const uint8_t[::1] tx_salt, const uint8_t[::1] rx_key,
                   const uint8_t[::1] rx_salt, source=None) -> int:
        """A viewer at ``host``:``port`` with its DTLS-SRTP keys (RFC 5764 §4.2);
        returns its slot. ``source``: this host's address the viewer's ICE check reached,
        which everything sent to the viewer leaves from (None: the kernel's choice)."""
        cdef sockaddr_in6 address
        cdef socklen_t address_len = 0
        cdef uint64_t source_control[SOURCE_CONTROL_WORDS]
        cdef size_t source_control_len = 0
        cdef Viewer* viewer
        cdef int slot, result
        fill_address(&address, &address_len, self.family, host, port)
        fill_source(source_control, &source_control_len, self.family, source)
        if self.free_viewer_count == 0:
            raise ValueError(f"all {self.max_viewers} viewer slots in use")
        key_len, salt_len = profile_key_lengths(profile)
        if (tx_key.shape[0] != key_len or rx_key.shape[0] != key_len
                or tx_salt.shape[0] != salt_len or rx_salt.shape[0] != salt_len):
            raise ValueError(
                f"profile {profile:#06x} takes {key_len}-byte keys and {salt_len}-byte salts"
            )
        slot = self.free_viewers[self.free_viewer_count - 1]
        viewer = &self.viewers[slot]
        memset(viewer, 0, sizeof(Viewer))
        result = srtp_ctx_init(&viewer.tx, profile, &tx_key[0], key_len, &tx_salt[0], salt_len)
        if result >= 0:
            result = srtp_ctx_init(&viewer.rx, profile, &rx_key[0], key_len, &rx_salt[0], salt_len)
        if result < 0:
            srtp_ctx_clear(&viewer.tx)
            srtp_ctx_clear(&viewer.rx)
            raise srtp_error(result)
        viewer.address = address
        viewer.address_len = address_len
        memcpy(viewer.source_control, source_control, sizeof(source_control))
        viewer.source_control_len = source_control_len
        viewer.in_use = 1
        self.free_viewer_count -= 1
        return slot

    def remove_viewer(self, int viewer) -> None:
        """Forget the viewer: unsubscribe everything, wipe its keys; the slot is reused."""
        cdef Viewer* state = self._viewer(viewer)
        cdef int index
        for index in range(self.max_tracks):
            if self.tracks[index].in_use and self.tracks[index].subscription_of_viewer[viewer] >= 0:
                self._unsubscribe(&self.tracks[index], viewer)
        srtp_ctx_clear(&state.tx)
        srtp_ctx_clear(&state.rx)
        free(state.send_log)
        memset(state, 0, sizeof(Viewer))
        self.free_viewers[self.free_viewer_count] = viewer
        self.free_viewer_count += 1

    def set_viewer_address(self, int viewer, host: str, int port, source=None) -> None:
        """The viewer's ICE-selected pair changed (RFC 8445 §7.3.1.5 nomination): its
        address, and the local ``source`` address that pair uses (None: kernel's choice)."""
        cdef Viewer* state = self._viewer(viewer)
        cdef sockaddr_in6 address
        cdef socklen_t address_len = 0
        cdef uint64_t source_control[SOURCE_CONTROL_WORDS]
        cdef size_t source_control_len = 0
        # Both are checked before either changes: a bad argument leaves the viewer as it was.
        fill_address(&address, &address_len, self.family, host, port)
        fill_source(source_control, &source_control_len, self.family, source)
        state.address = address
        state.address_len = address_len
        memcpy(state.source_control, source_control, sizeof(source_control))
        state.source_control_len = source_control_len

    def set_transport_cc(self, int viewer, int extension_id, sequence=None) -> None:
        """Stamp a transport-wide sequence number (draft-holmer-rmcat-transport-wide-cc-
        extensions-01 §2) under the viewer's ``extension_id`` (its a=extmap id, RFC 8285:
        1..14 fit the one-byte form, up to 255 need the two-byte form) on every RTP packet
        sent to the viewer, media, RTX and padding alike; 0 turns it off. One counter per
        viewer: all its subscriptions share its transport (BUNDLE). ``sequence``: the next
        number (None: keep the current one; random the first time). The send log
        (transport_sent) is allocated here, once, and freed with the viewer."""
        cdef Viewer* state = self._viewer(viewer)
        cdef bytes start
        cdef bint fresh = state.send_log == NULL
        if not 0 <= extension_id <= 255:
            raise ValueError("extension_id must be 0..255 (RFC 8285 ids are 8-bit)")
        if sequence is not None and not 0 <= sequence <= 0xFFFF:
            raise ValueError(f"sequence {sequence} is not 16-bit")
        if extension_id and fresh:
            state.send_log = <TransportSendRecord*>calloc(self.transport_log_size,
                                                          sizeof(TransportSendRecord))
            if state.send_log == NULL:
                raise MemoryError()
            state.send_log_mask = self.transport_log_size - 1
            start = _os.urandom(2)
            state.transport_seq = load16(<const uint8_t*><const char*>start)
        if sequence is not None:
            state.transport_seq = sequence
        state.transport_cc_id = extension_id

    def transport_sent(self, int viewer, int base_sequence, int count) -> list:
        """What went out under the viewer's transport-wide sequence numbers
        ``base_sequence`` .. ``base_sequence + count - 1`` (mod 2^16), as in a transport
        feedback packet (§3.1: base sequence number, packet status count): per number
        ``(sent_at, size)``, with ``sent_at`` the CLOCK_MONOTONIC (= time.monotonic())
        seconds at which the sendmmsg batch that sent it began to fill (one reading per
        batch, so at most ``batch_size`` datagrams' work early; kept to 2^-16 s) and ``size``
        the datagram's UDP payload octets (the SRTP packet, tag included); None when the
        log has no such packet (never sent or refused by the kernel, or overwritten by
        one ``transport_log_size`` numbers later)."""
        cdef Viewer* state = self._viewer(viewer)
        cdef TransportSendRecord* record
        cdef uint16_t sequence
        cdef int index
        cdef uint64_t now_ticks = <uint64_t>(monotonic_seconds() * LOG_CLOCK_RATE)
        cdef uint32_t now_clock = <uint32_t>now_ticks
        if not 0 <= base_sequence <= 0xFFFF:
            raise ValueError(f"base_sequence {base_sequence} is not 16-bit")
        if not 0 <= count <= 0xFFFF:   # the feedback's packet status count is 16 bits
            raise ValueError(f"count {count} is not in 0..65535")
        result = [None] * count
        if state.send_log == NULL:
            return result
        for index in range(count):
            sequence = <uint16_t>(base_sequence + index)
            record = &state.send_log[sequence & state.send_log_mask]
            if record.size and record.sequence == sequence:
                # The entry is younger than the clock's 18-hour wrap: its age is exact.
                result[index] = (
                    (now_ticks - <uint32_t>(now_clock - record.sent_at)) / LOG_CLOCK_RATE,
                    record.size,
                )
        return result

    @property
    def viewer_count(self) -> int:
        return self.max_viewers - self.free_viewer_count

    @property
    def gso(self) -> bool:
        """push_batch sends each viewer's run of equal-length packets as one UDP GSO
        entry. Turns False by itself when the kernel refuses GSO for this socket's path
        (see ``gso_error``)."""
        return self.gso_on

    @gso.setter
    def gso(self, bint enabled) -> None:
        self.gso_on = enabled
        if enabled:
            self.gso_error = 0

    @property
    def gso_error(self) -> int:
        """The errno with which the kernel refused a GSO entry and so turned ``gso``
        off (EIO, EOPNOTSUPP, ENOPROTOOPT); 0 if that has not happened."""
        return self.gso_error

    # -- subscriptions -------------------------------------------------------------------

    cdef Subscription* _new_subscription(self, Track* target, int viewer) except NULL:
        """Append a zeroed subscription of ``viewer`` to ``target`` (growing the array)."""
        cdef Subscription* grown
        cdef Subscription* subscription
        cdef int32_t* history = NULL
        cdef int capacity
        if target.payload_format == PAYLOAD_VP9:
            history = <int32_t*>malloc(VP9_PICTURE_HISTORY * sizeof(int32_t))
            if history == NULL:
                raise MemoryError()
            memset(history, 0xFF, VP9_PICTURE_HISTORY * sizeof(int32_t))   # -1: unknown
        if target.subscription_count == target.subscription_capacity:
            capacity = max(16, 2 * target.subscription_capacity)
            grown = <Subscription*>realloc(target.subscriptions, capacity * sizeof(Subscription))
            if grown == NULL:
                free(history)
                raise MemoryError()
            target.subscriptions = grown
            target.subscription_capacity = capacity
        subscription = &target.subscriptions[target.subscription_count]
        memset(subscription, 0, sizeof(Subscription))
        subscription.viewer = viewer
        subscription.switch_from = -1
        subscription.last_dropped_picture = -1
        subscription.temporal_limit = ALL_TEMPORAL_LAYERS
        subscription.temporal_target = ALL_TEMPORAL_LAYERS
        subscription.vp9_picture_history = history
        target.subscription_of_viewer[viewer] = target.subscription_count
        target.subscription_count += 1
        return subscription

    def subscribe(self, int viewer, int track, *, ssrc: int, payload_type: int,
                  ext_map: bytes = b"", rtx_ssrc: int = 0, rtx_payload_type: int = -1,
                  bint wait_keyframe=True) -> None:
        """Send ``track`` to ``viewer`` as ``ssrc``/``payload_type``; ``ext_map[i]`` is the
        viewer's id for the publisher's header extension id ``i`` (0 or missing: strip)."""
        cdef Track* target = self._track(track)
        cdef Subscription* subscription
        cdef uint8_t* table = NULL
        cdef bytes offsets
        cdef const uint8_t* random_bytes
        self._viewer(viewer)
        if target.subscription_of_viewer[viewer] >= 0:
            raise ValueError(f"viewer {viewer} already subscribed to track {track}")
        if not 0 <= ssrc <= 0xFFFFFFFF or not 0 <= payload_type <= 127:
            raise ValueError("ssrc must be 32-bit and payload_type 0..127")
        has_rtx = rtx_payload_type >= 0
        if has_rtx and (not 0 <= rtx_payload_type <= 127 or not 0 <= rtx_ssrc <= 0xFFFFFFFF):
            raise ValueError("rtx_ssrc must be 32-bit and rtx_payload_type 0..127")
        if len(ext_map) > 256:
            raise ValueError("ext_map has at most 256 entries (RFC 8285 ids are 8-bit)")
        if ext_map:
            table = <uint8_t*>calloc(256, 1)
            if table == NULL:
                raise MemoryError()
            memcpy(table, <const char*>ext_map, len(ext_map))
            table[0] = 0   # id 0 is padding, never an element
        try:
            subscription = self._new_subscription(target, viewer)
        except MemoryError:
            free(table)
            raise
        subscription.ext_map = table
        # RFC 3550 §5.1: the first sequence number and timestamp a receiver sees are
        # random (unpredictable for known-plaintext attacks on the encryption), and
        # each viewer gets its own.
        offsets = _os.urandom(8)
        subscription.ssrc = ssrc
        subscription.payload_type = payload_type
        random_bytes = <const uint8_t*><const char*>offsets
        subscription.seq_offset = load16(random_bytes)
        subscription.rtx_seq = load16(random_bytes + 2)
        subscription.ts_offset = load32(random_bytes + 4)
        subscription.has_rtx = has_rtx
        if has_rtx:
            subscription.rtx_ssrc = rtx_ssrc
            subscription.rtx_payload_type = rtx_payload_type
        subscription.wait_keyframe = wait_keyframe

    def switch(self, int viewer, int from_track, int to_track) -> None:
        """Move ``viewer`` from ``from_track`` to ``to_track`` (another simulcast layer of
        the same media) at the next keyframe pushed on ``to_track``. Until then the viewer
        keeps receiving ``from_track``; at that keyframe it continues with the same SSRC
        and payload type, sequence numbers and timestamps (see the theory of operation).
        Cancel a pending switch with ``unsubscribe(viewer, to_track)``."""
        cdef Track* source = self._track(from_track)
        cdef Track* target = self._track(to_track)
        cdef Subscription* current
        cdef Subscription* pending
        cdef uint8_t* table = NULL
        self._viewer(viewer)
        if from_track == to_track:
            raise ValueError("a switch needs two different tracks")
        current = self._subscription(source, viewer)
        if target.subscription_of_viewer[viewer] >= 0:
            raise ValueError(f"viewer {viewer} already subscribed to track {to_track}")
        if current.ext_map != NULL:
            table = <uint8_t*>malloc(256)
            if table == NULL:
                raise MemoryError()
            memcpy(table, current.ext_map, 256)
        try:
            pending = self._new_subscription(target, viewer)
        except MemoryError:
            free(table)
            raise
        # ``current`` lives in another track's array, which the append did not move.
        pending.ext_map = table
        pending.ssrc = current.ssrc
        pending.payload_type = current.payload_type
        pending.has_rtx = current.has_rtx
        pending.rtx_ssrc = current.rtx_ssrc
        pending.rtx_payload_type = current.rtx_payload_type
        pending.seq_offset = current.seq_offset
        pending.ts_offset = current.ts_offset
        pending.rtx_seq = current.rtx_seq
        pending.temporal_target = current.temporal_target
        pending.wait_keyframe = 1
        pending.switch_from = from_track

    def set_temporal_layer(self, int viewer, int track, int limit) -> None:
        """Forward only VP8/VP9 temporal layers 0..``limit`` of ``track`` to ``viewer``
        (-1: all). A lower limit applies at the next picture; a higher one at the next
        picture that decodes from what the viewer has (TID 0, or a layer sync picture:
        RFC 7741 §4.2 Y, RFC 9628 §4.2 U)."""
        cdef Track* source = self._track(track)
        cdef Subscription* subscription
        self._viewer(viewer)
        subscription = self._subscription(source, viewer)
        if limit < 0:
            limit = ALL_TEMPORAL_LAYERS
        if source.payload_format == PAYLOAD_VP9:
            if limit > 7 and limit != ALL_TEMPORAL_LAYERS:
                raise ValueError("a VP9 temporal layer id is 0..7 (TID is 3 bits)")
        elif limit > 3 and limit != ALL_TEMPORAL_LAYERS:
            raise ValueError("a VP8 temporal layer id is 0..3 (TID is 2 bits)")
        subscription.temporal_target = limit

    def subscription_state(self, int viewer, int track) -> int:
        """SUBSCRIPTION_NONE: not subscribed; SUBSCRIPTION_AWAITING_KEYFRAME: waiting for
        a keyframe (to start, or to complete a switch); SUBSCRIPTION_FORWARDING."""
        cdef Track* source = self._track(track)
        cdef int32_t index
        self._viewer(viewer)
        index = source.subscription_of_viewer[viewer]
        if index < 0:
            return SUBSCRIPTION_NONE
        if source.subscriptions[index].wait_keyframe:
            return SUBSCRIPTION_AWAITING_KEYFRAME
        return SUBSCRIPTION_FORWARDING

    def take_switches(self) -> list:
        """Switches completed since the last call, oldest first: (viewer, from, to)."""
        cdef int index
        completed = [
            (self.switch_log[3 * index], self.switch_log[3 * index + 1],
             self.switch_log[3 * index + 2])
            for index in range(self.switch_log_count)
        ]
        self.switch_log_count = 0
        return completed

    def unsubscribe(self, int viewer, int track) -> None:
        cdef Track* target = self._track(track)
        self._viewer(viewer)
        self._subscription(target, viewer)
        self._unsubscribe(target, viewer)

    cdef void _unsubscribe(self, Track* track, int viewer) noexcept nogil:
        # Swap-remove: the last subscription fills the hole, so push() still walks a
        # dense array.
        cdef int32_t index = track.subscription_of_viewer[viewer]
        cdef int32_t last = track.subscription_count - 1
        free(track.subscriptions[index].ext_map)
        free(track.subscriptions[index].vp9_picture_history)
        if index != last:
            track.subscriptions[index] = track.subscriptions[last]
            track.subscription_of_viewer[track.subscriptions[index].viewer] = index
        track.subscription_count = last
        track.subscription_of_viewer[viewer] = -1

    # -- media ---------------------------------------------------------------------------

    cdef int _flush(self) noexcept nogil:
        """Send the batch and credit what the kernel accepted to viewers and SR counts;
        a transport-wide sequence number the kernel refused is logged as not sent."""
        cdef int index, accepted
        cdef int32_t transport_seq
        cdef Viewer* viewer
        cdef Subscription* subscription
        if self.batch.count == 0:
            return 0
        self.batch.open_message = -1
        accepted = batch_send(&self.batch, &self.counters, &self.gso_error)
        if self.gso_error:
            self.gso_on = 0   # the path refuses UDP GSO: one entry per datagram from now
        for index in range(self.batch.count):
            viewer = &self.viewers[self.batch.slot_viewer[index]]
            if self.batch.accepted[index]:
                viewer.packets_sent += 1
                viewer.bytes_sent += self.batch.iov[index].iov_len
                self.counters.bytes_sent += self.batch.iov[index].iov_len
                subscription = self.batch.slot_subscription[index]
                if subscription != NULL:
                    subscription.packets_sent += 1
                    subscription.octets_sent += self.batch.slot_payload_len[index]
            else:
                viewer.send_errors += 1
                transport_seq = self.batch.slot_transport_seq[index]
                if transport_seq >= 0:
                    # So that transport_sent says None: the number went nowhere.
                    viewer.send_log[transport_seq & viewer.send_log_mask].size = 0
        self.counters.packets_sent += accepted
        self.batch.count = 0
        self.batch.message_count = 0
        self.batch.transport_clock_set = 0
        return accepted

    cdef inline void _log_transport(self, Viewer* viewer, int32_t transport_seq,
                                    int length) noexcept nogil:
        """Log the datagram of ``length`` octets queued under ``transport_seq``: sent
        (until the flush says otherwise) at the time this batch's first transport-cc
        datagram was queued. One clock reading per batch, and the entry is written while
        the viewer's state is in cache rather than after sendmmsg has run through the
        kernel's (with 1,000 viewers, writing it in _flush cost ~5 % per datagram)."""
        cdef TransportSendRecord* record
        if not self.batch.transport_clock_set:
            self.batch.transport_clock = log_clock(monotonic_seconds())
            self.batch.transport_clock_set = 1
        record = &viewer.send_log[transport_seq & viewer.send_log_mask]
        record.sent_at = self.batch.transport_clock
        record.sequence = <uint16_t>transport_seq
        record.size = <uint16_t>length

    cdef int _queue(self, int32_t viewer_index, Viewer* viewer, int length,
                    Subscription* subscription, uint32_t payload_len,
                    int32_t transport_seq) noexcept nogil:
        """Commit the next slot for ``viewer`` (``transport_seq``: the transport-wide
        sequence number it carries, -1: none); flush when the batch is full."""
        self.batch.slot_viewer[self.batch.count] = viewer_index
        self.batch.slot_subscription[self.batch.count] = subscription
        self.batch.slot_payload_len[self.batch.count] = payload_len
        self.batch.slot_transport_seq[self.batch.count] = transport_seq
        if transport_seq >= 0:
            self._log_transport(viewer, transport_seq, length)
        # Every entry is rewritten: one batch serves viewers with and without a source.
        batch_commit(&self.batch, length, &viewer.address, viewer.address_len,
                     viewer.source_control if viewer.source_control_len else NULL,
                     viewer.source_control_len)
        self.batch.open_message = -1
        if self.batch.count == self.batch.capacity:
            return self._flush()
        return 0

    cdef int _queue_segment(self, int32_t viewer_index, Viewer* viewer, int length,
                            Subscription* subscription, uint32_t payload_len,
                            int32_t transport_seq) noexcept nogil:
        """As _queue, for a packet of a viewer's run in push_batch: with GSO on, it joins
        the viewer's open GSO entry if all that entry's segments so far have its first
        one's length and this one is no longer (udp(7): only the last segment may be
        shorter; a shorter one closes the entry)."""
        cdef SendBatch* batch = &self.batch
        cdef int entry = batch.open_message
        if not self.gso_on:
            return self._queue(viewer_index, viewer, length, subscription, payload_len,
                               transport_seq)
        batch.slot_viewer[batch.count] = viewer_index
        batch.slot_subscription[batch.count] = subscription
        batch.slot_payload_len[batch.count] = payload_len
        batch.slot_transport_seq[batch.count] = transport_seq
        if transport_seq >= 0:
            self._log_transport(viewer, transport_seq, length)
        if (entry >= 0 and entry == batch.message_count - 1
                and batch.slot_viewer[batch.message_first[entry]] == viewer_index
                and length <= batch.message_gso_size[entry]
                and batch.message_segments[entry] < GSO_MAX_SEGMENTS
                and batch.message_bytes[entry] + length <= GSO_MAX_BYTES):
            batch_join(batch, length)
            if length < batch.message_gso_size[entry]:
                batch.open_message = -1
        else:
            batch_commit(batch, length, &viewer.address, viewer.address_len,
                         viewer.source_control if viewer.source_control_len else NULL,
                         viewer.source_control_len)
            batch.open_message = (batch.message_count - 1 if length <= self.gso_max_segment
                                  else -1)
        if batch.count == batch.capacity:
            return self._flush()
        return 0

    cdef void _complete_switch(self, Track* target, Subscription* subscription,
                               uint16_t sequence, uint32_t timestamp, double now,
                               const DescriptorFields* descriptor) noexcept nogil:
        """The target layer's keyframe is here: continue the viewer's numbering from its
        old subscription, which is then removed (see the theory of operation)."""
        cdef Track* previous = NULL
        cdef Subscription* old
        cdef int32_t index, from_track = subscription.switch_from
        cdef double elapsed
        cdef uint32_t ticks
        if 0 <= from_track < self.max_tracks and self.tracks[from_track].in_use:
            previous = &self.tracks[from_track]
            index = previous.subscription_of_viewer[subscription.viewer]
            if index >= 0:
                old = &previous.subscriptions[index]
                if old.has_sent:
                    # RFC 3550 §5.1: seq +1 per packet, so the receiver sees no loss;
                    # the timestamp advances with the sampling clock by the real time
                    # since the last packet (at least one tick: a new picture).
                    subscription.seq_offset = <uint16_t>(old.last_seq + 1 - sequence)
                    elapsed = now - old.last_sent_at
                    if elapsed > 3600.0:
                        elapsed = 3600.0
                    ticks = 1
                    if elapsed > 0:
                        ticks = <uint32_t>(elapsed * target.clock_rate + 0.5)
                        if ticks == 0:
                            ticks = 1
                    subscription.ts_offset = old.last_ts + ticks - timestamp
                    subscription.rtx_seq = old.rtx_seq
                    # Same SSRC, so RFC 3550 §6.4.1 sender counts carry on.
                    subscription.packets_sent = old.packets_sent
                    subscription.octets_sent = old.octets_sent
                    if old.has_picture_state and descriptor.present:
                        # RFC 7741 §4.2: the keyframe is the next picture, and (TID 0) the
                        # next TL0 picture, of the viewer's one VP8 stream.
                        if descriptor.picture_id >= 0:
                            subscription.picture_id_offset = <uint16_t>(
                                (old.last_picture_id + 1 - descriptor.picture_id) & 0x7FFF)
                        if descriptor.tl0_pic_idx >= 0:
                            subscription.tl0_offset = <uint8_t>(
                                old.last_tl0 + 1 - descriptor.tl0_pic_idx)
                self._unsubscribe(previous, subscription.viewer)
        subscription.offset_valid_from = sequence
        subscription.offset_floor_set = 1
        subscription.switch_from = -1
        subscription.temporal_limit = subscription.temporal_target   # a picture boundary
        self.counters.switches_completed += 1
        if self.switch_log_count < SWITCH_LOG_SIZE:
            self.switch_log[3 * self.switch_log_count] = subscription.viewer
            self.switch_log[3 * self.switch_log_count + 1] = from_track
            self.switch_log[3 * self.switch_log_count + 2] = <int32_t>(target - self.tracks)
            self.switch_log_count += 1
        else:
            self.counters.switch_log_overflows += 1

    cdef bint _drop_temporal(self, Subscription* subscription, const DescriptorFields* vp8,
                             uint16_t sequence) noexcept nogil:
        """Apply the viewer's VP8 temporal-layer limit; 1 if this packet is not sent."""
        cdef uint8_t layer
        if not vp8.present or vp8.temporal_layer < 0:
            return 0
        layer = <uint8_t>vp8.temporal_layer
        if subscription.temporal_target != subscription.temporal_limit and vp8.frame_start:
            # Lower: at any picture boundary. Higher: only where the higher layer can be
            # decoded from what the viewer has (TID 0, or Y: RFC 7741 §4.2 layer sync).
            if (subscription.temporal_target < subscription.temporal_limit or layer == 0
                    or (vp8.layer_sync and layer <= subscription.temporal_target)):
                subscription.temporal_limit = subscription.temporal_target
        if layer <= subscription.temporal_limit:
            return 0
        if subscription.has_sent and not seq_before(
                subscription.last_seq, <uint16_t>(sequence + subscription.seq_offset)):
            # A late copy of a packet from before the last drop: no renumbering.
            resend_floor_after(subscription, sequence)
            return 1
        # Close the gap the dropped packet leaves in the viewer's sequence numbers, and
        # (once per picture) in its picture ids.
        subscription.seq_offset -= 1
        subscription.offset_valid_from = <uint16_t>(sequence + 1)
        subscription.offset_floor_set = 1
        if vp8.picture_id >= 0 and vp8.picture_id != subscription.last_dropped_picture:
            subscription.last_dropped_picture = vp8.picture_id
            subscription.picture_id_offset = <uint16_t>((subscription.picture_id_offset - 1)
                                                        & 0x7FFF)
        return 1

    cdef bint _drop_temporal_vp9(self, Subscription* subscription,
                                 const DescriptorFields* descriptor,
                                 uint16_t sequence) noexcept nogil:
        """Apply the viewer's temporal-layer limit to a VP9 packet; 1 if it is not sent.

        Unlike VP8, the viewer's picture ids keep the gaps dropped pictures leave; only
        its sequence numbers close up. A VP9 receiver finds each picture's references
        from picture-id distances: in non-flexible mode from the distance to the start of
        the group of frames in the scalability structure (RFC 9628 §4.2.1, N_G pattern),
        in flexible mode from the P_DIFFs (§4.2). Renumbering would point both at the
        wrong pictures (libwebrtc's VP9 reference finder reads them exactly so), while a
        gap reads as a dropped higher-layer picture, which lower layers never need.

        In flexible mode the references are explicit, so they are checked as well: a
        picture whose P_DIFF points at a picture this viewer did not get is dropped too,
        whatever its TID, and the decision holds for every packet of that picture.
        """
        cdef uint8_t layer
        cdef bint drop
        cdef int32_t* history = subscription.vp9_picture_history
        cdef int32_t entry, reference, mask
        cdef int index
        if not descriptor.present or descriptor.temporal_layer < 0:
            return 0   # no layer indices: a single layer, nothing to drop
        layer = <uint8_t>descriptor.temporal_layer
        if (subscription.temporal_target != subscription.temporal_limit
                and descriptor.frame_start):
            # Lower: at any picture boundary. Higher: only where the higher layer decodes
            # from what the viewer has (TID 0, or U: RFC 9628 §4.2 switching-up point).
            if (subscription.temporal_target < subscription.temporal_limit or layer == 0
                    or (descriptor.layer_sync and layer <= subscription.temporal_target)):
                subscription.temporal_limit = subscription.temporal_target
        drop = layer > subscription.temporal_limit
        if descriptor.flexible and history != NULL and descriptor.picture_id >= 0:
            entry = history[descriptor.picture_id % VP9_PICTURE_HISTORY]
            if entry >= 0 and (entry & 0x7FFF) == descriptor.picture_id:
                drop = (entry & VP9_PICTURE_DROPPED) != 0   # decided at its first packet
            else:
                mask = 0x7FFF if descriptor.long_picture_id else 0x7F
                for index in range(descriptor.reference_count):
                    reference = (descriptor.picture_id - descriptor.reference_diff[index]) & mask
                    entry = history[reference % VP9_PICTURE_HISTORY]
                    if (entry >= 0 and (entry & 0x7FFF) == reference
                            and entry & VP9_PICTURE_DROPPED):
                        drop = 1   # it would predict from a picture the viewer lacks
                history[descriptor.picture_id % VP9_PICTURE_HISTORY] = (
                    descriptor.picture_id | (VP9_PICTURE_DROPPED if drop else 0))
        if not drop:
            return 0
        if subscription.has_sent and not seq_before(
                subscription.last_seq, <uint16_t>(sequence + subscription.seq_offset)):
            # A late copy of a packet from before the last drop: no renumbering.
            resend_floor_after(subscription, sequence)
            return 1
        # Close the gap the dropped packet leaves in the viewer's sequence numbers (a gap
        # would read as loss: RFC 4585 NACKs, then PLIs).
        subscription.seq_offset -= 1
        subscription.offset_valid_from = <uint16_t>(sequence + 1)
        subscription.offset_floor_set = 1
        return 1

    cdef int _prepare(self, Track* source, const uint8_t* data, int length, bint keyframe,
                      BurstPacket* packet) noexcept nogil:
        """Validate and read one pushed packet into ``packet`` and cache it; 0 if it is to
        be sent, -1 if it was counted and dropped (malformed or oversized)."""
        cdef int cache_index
        cdef uint8_t* cached
        if length > MAX_RTP_PACKET:
            self.counters.dropped_too_large += 1
            return -1
        if length == 0 or rtp_parse_layout(data, length, &packet.layout) != 0:
            self.counters.dropped_malformed += 1
            return -1
        self.counters.pushed += 1
        source.pushed += 1
        packet.data = data
        packet.length = length
        packet.padded_length = length
        packet.keyframe = keyframe
        packet.sequence = load16(data + 2)
        packet.timestamp = load32(data + 4)
        transport_cc_locate(&packet.layout, source.transport_cc_id, &packet.transport_cc_index,
                            &packet.transport_cc_growth)
        packet.run_growth = packet.transport_cc_growth
        if source.payload_format == PAYLOAD_VP8:
            vp8_parse_fields(data + packet.layout.header_len, packet.layout.payload_len,
                             &packet.descriptor)
        elif source.payload_format == PAYLOAD_VP9:
            vp9_parse_fields(data + packet.layout.header_len, packet.layout.payload_len,
                             &packet.descriptor)
        else:
            packet.descriptor.present = 0
        # The one copy that outlives this call: NACKs are answered from it.
        cache_index = packet.sequence % source.cache_packets
        cached = source.cache + <size_t>cache_index * MAX_RTP_PACKET
        memcpy(cached, data, length)
        source.cache_seq[cache_index] = packet.sequence
        source.cache_len[cache_index] = <uint16_t>length
        return 0

    cdef int _deliver(self, Track* source, Subscription* subscription,
                      const BurstPacket* packet, double arrival, bint segment) noexcept nogil:
        """One pushed packet to one subscription: the keyframe gate, stale and temporal-layer
        drops, the viewer's header and descriptor, SRTP, and the batch (``segment``: as
        part of the viewer's run, see _queue_segment). Returns what flushes accepted."""
        cdef Viewer* viewer = &self.viewers[subscription.viewer]
        cdef const DescriptorFields* descriptor = &packet.descriptor
        cdef uint16_t sequence = packet.sequence, out_seq
        cdef uint32_t timestamp = packet.timestamp
        cdef int length = packet.length, protected_len, padding, growth = -1, element = 0
        cdef int32_t transport_seq = -1
        cdef bint dropped
        cdef uint8_t* slot
        if subscription.wait_keyframe:
            # A decoder cannot start mid-GOP: hold the viewer until a keyframe.
            if not packet.keyframe:
                viewer.dropped_waiting_keyframe += 1
                self.counters.dropped_waiting_keyframe += 1
                return 0
            subscription.wait_keyframe = 0
            if subscription.switch_from >= 0:
                self._complete_switch(source, subscription, sequence, timestamp, arrival,
                                      descriptor)
        elif subscription.offset_floor_set and seq_before(
                sequence, subscription.offset_valid_from):
            # A late packet (a retransmission) from before this viewer's offsets
            # last changed: renumbered now it would collide with packets sent.
            self.counters.dropped_stale += 1
            return 0
        if source.payload_format == PAYLOAD_VP9:
            dropped = self._drop_temporal_vp9(subscription, descriptor, sequence)
        else:
            dropped = self._drop_temporal(subscription, descriptor, sequence)
        if dropped:
            self.counters.dropped_temporal_layer += 1
            return 0
        slot = batch_next_slot(&self.batch)
        if viewer.transport_cc_id:
            # The log entry _queue writes is, with many viewers, a cache line that is not
            # in cache: fetch it now, while the copy and the encryption run.
            __builtin_prefetch(&viewer.send_log[viewer.transport_seq & viewer.send_log_mask],
                               1, 3)
            growth = transport_cc_growth(&packet.layout, packet.transport_cc_growth,
                                         viewer.transport_cc_id)
        if growth >= 0:
            element = transport_cc_copy(slot, packet.data, length, &packet.layout,
                                        packet.transport_cc_index, growth,
                                        viewer.transport_cc_id)
            rtp_rewrite(slot, &packet.layout, subscription, sequence, timestamp, growth)
            transport_seq = viewer.transport_seq
            viewer.transport_seq += 1
            transport_cc_stamp(slot + element,
                               transport_cc_one_byte(&packet.layout, growth,
                                                     viewer.transport_cc_id),
                               viewer.transport_cc_id, <uint16_t>transport_seq)
            length += growth
            if descriptor.present:
                descriptor_rewrite(slot + packet.layout.header_len + growth, descriptor,
                                   subscription)
        else:
            if viewer.transport_cc_id:
                viewer.transport_cc_unstamped += 1
                self.counters.transport_cc_unstamped += 1
            memcpy(slot, packet.data, length)
            rtp_rewrite(slot, &packet.layout, subscription, sequence, timestamp, 0)
            if descriptor.present:
                descriptor_rewrite(slot + packet.layout.header_len, descriptor, subscription)
        out_seq = <uint16_t>(sequence + subscription.seq_offset)
        if not subscription.has_sent or seq_before(subscription.last_seq, out_seq):
            subscription.has_sent = 1
            subscription.last_seq = out_seq
            floors_follow(subscription, sequence)
            subscription.last_ts = timestamp + subscription.ts_offset
            subscription.last_sent_at = arrival
            if descriptor.present and descriptor.picture_id >= 0:
                subscription.has_picture_state = 1
                subscription.last_picture_id = <uint16_t>(
                    (descriptor.picture_id + subscription.picture_id_offset) & 0x7FFF)
                if descriptor.tl0_pic_idx >= 0:
                    subscription.last_tl0 = <uint8_t>(
                        descriptor.tl0_pic_idx + subscription.tl0_offset)
        padding = packet.padded_length - packet.length
        if growth >= 0 and packet.run_growth > growth:
            # Others in this packet's GSO run grow more (they lacked an extension block):
            # pad up to them so the run stays equal. _equalize checked the count octet.
            padding += packet.run_growth - growth
        if segment and padding > 0 and self.gso_on:
            # RFC 3550 §5.1: P set, padding octets after the payload, the last one counting
            # them all (itself and any padding the publisher sent). The viewer strips it;
            # SRTP encrypts and authenticates it with the payload (RFC 3711 §3.1).
            memset(slot + length, 0, padding)
            slot[0] |= 0x20
            length += padding
            slot[length - 1] = <uint8_t>(packet.layout.padding_len + padding)
            if packet.layout.padding_len:
                slot[length - padding - 1] = 0
            self.counters.padded_packets += 1
            self.counters.padding_bytes += padding
        protected_len = srtp_protect_rtp(&viewer.tx, slot, length, BATCH_SLOT_SIZE)
        if protected_len < 0:
            viewer.protect_errors += 1
            self.counters.protect_errors += 1
            if transport_seq >= 0:
                viewer.transport_seq -= 1   # never sent: the number goes to the next packet
            return 0
        if transport_seq >= 0:
            if growth == 0:
                viewer.transport_cc_stamped += 1
                self.counters.transport_cc_stamped += 1
            else:
                viewer.transport_cc_added += 1
                self.counters.transport_cc_added += 1
        if segment:
            return self._queue_segment(subscription.viewer, viewer, protected_len, subscription,
                                       packet.layout.payload_len, transport_seq)
        return self._queue(subscription.viewer, viewer, protected_len, subscription,
                           packet.layout.payload_len, transport_seq)

    def push(self, int track, const uint8_t[::1] packet not None, bint keyframe=False,
             now=None) -> int:
        """Cache ``packet`` (plain RTP) and send it to every subscriber of ``track``;
        returns datagrams the kernel accepted. Malformed or oversized packets are counted
        and dropped. ``now`` (seconds, the caller's monotonic clock; default the Fanout's
        CLOCK_MONOTONIC) times layer switches."""
        cdef Track* source = self._track(track)
        cdef int length = packet.shape[0]
        cdef int index, sent = 0
        cdef double arrival = monotonic_seconds() if now is None else <double>now
        cdef BurstPacket* prepared = &self.burst[0]
        if length == 0:
            self.counters.dropped_malformed += 1
            return 0
        with nogil:
            if self._prepare(source, &packet[0], length, keyframe, prepared) == 0:
                index = 0
                while index < source.subscription_count:
                    sent += self._deliver(source, &source.subscriptions[index], prepared,
                                          arrival, 0)
                    index += 1
                sent += self._flush()
        return sent

    cdef void _equalize(self, int count) noexcept nogil:
        """Give the burst's packets RTP padding so that runs of them have one length:
        consecutive packets whose lengths differ by at most ``pad_limit`` octets are padded
        to the longest of them, except the last of each run, which a GSO entry allows to be
        shorter. Chromium's packetizer splits a frame into near-equal packets (libwebrtc
        SplitAboutEqually: sizes differ by one octet), so runs are usually a frame long."""
        cdef int start = 0, end, index, longest, shortest, length, limit = self.pad_limit
        cdef int room = self.gso_max_segment - SRTP_MAX_OVERHEAD, most_growth
        cdef BurstPacket* packet
        while start < count:
            longest = shortest = self.burst[start].length
            end = start + 1
            while end < count and end - start < GSO_MAX_SEGMENTS:
                length = self.burst[end].length
                if length > longest:
                    if length - shortest > limit or length > room:
                        break
                    longest = length
                elif longest - length > limit:
                    end += 1    # much shorter: it can end the run as it is
                    break
                elif length < shortest:
                    shortest = length
                end += 1
            if longest <= room:
                # A transport-cc viewer's copies grow by 0, 4 or 8 octets (the packet's
                # transport_cc_growth): those that grow less are padded by the difference
                # too, so the run stays equal for those viewers as well (see _deliver).
                most_growth = 0
                for index in range(start, end):
                    if self.burst[index].transport_cc_growth > most_growth:
                        most_growth = self.burst[index].transport_cc_growth
                for index in range(start, end - 1):
                    packet = &self.burst[index]
                    # The padding count octet covers all padding (RFC 3550 §5.1).
                    if (packet.length < longest
                            and packet.layout.padding_len + longest - packet.length <= 255):
                        packet.padded_length = longest
                    if (packet.padded_length == longest and packet.transport_cc_growth >= 0
                            and packet.layout.padding_len + longest - packet.length
                            + most_growth - packet.transport_cc_growth <= 255):
                        packet.run_growth = most_growth
            start = end

    def push_batch(self, int track, packets, keyframes=None, now=None) -> int:
        """Push the packets of ``track`` that arrived together (one read burst of the
        publisher's socket, or one relay delivery), in order; ``keyframes[i]`` is push()'s
        ``keyframe`` for ``packets[i]`` (None: none is). Each viewer gets the same packets
        and the same per-packet rules as from push() one by one, but back to back: with
        ``gso`` on, its run goes out as UDP GSO entries (udp(7) UDP_SEGMENT), one walk of
        the kernel's UDP/IP stack per entry, and packets whose lengths differ by a few
        octets get RTP padding to make the run equal (see _equalize). Returns datagrams
        the kernel accepted."""
        cdef Track* source = self._track(track)
        cdef list held = [bytes(packet) if not isinstance(packet, bytes) else packet
                          for packet in packets]
        cdef list flags
        cdef int total = len(held), chunk, offset = 0, count, index, sent = 0, subscription
        cdef int capacity = min(BURST_CAPACITY, self.batch.capacity)
        cdef double arrival = monotonic_seconds() if now is None else <double>now
        cdef bytes data
        if keyframes is None:
            flags = [False] * total
        else:
            flags = [bool(flag) for flag in keyframes]
            if len(flags) != total:
                raise ValueError("keyframes must have one flag per packet")
        while offset < total:
            chunk = min(capacity, total - offset)
            count = 0
            for index in range(offset, offset + chunk):
                data = held[index]
                if len(data) == 0:
                    self.counters.dropped_malformed += 1
                    continue
                if self._prepare(source, <const uint8_t*><const char*>data, len(data),
                                 flags[index], &self.burst[count]) == 0:
                    count += 1
            offset += chunk
            if count == 0:
                continue
            with nogil:
                if self.gso_on and count > 1:
                    self._equalize(count)
                subscription = 0
                while subscription < source.subscription_count:
                    # A viewer's run stays in one batch, so it is never split by a flush.
                    if self.batch.count + count > self.batch.capacity:
                        sent += self._flush()
                    self.batch.open_message = -1
                    for index in range(count):
                        sent += self._deliver(source, &source.subscriptions[subscription],
                                              &self.burst[index], arrival, 1)
                    subscription += 1
                sent += self._flush()
        return sent

    def resend(self, int viewer, int track, seqs) -> int:
        """Answer a Generic NACK (RFC 4585 §6.2.1): re-send the viewer's sequence numbers
        ``seqs`` from the cache, as RTX (RFC 4588 §4) when the subscription has it.
        Returns packets the kernel accepted; sequence numbers no longer cached are counted
        as ``resend_misses``."""
        cdef Viewer* state = self._viewer(viewer)
        cdef Track* source = self._track(track)
        cdef Subscription* subscription = self._subscription(source, viewer)
        cdef RtpLayout layout
        cdef DescriptorFields descriptor
        cdef int cache_index, length, sent = 0, protected_len, resent_count = 0
        cdef int element_index, growth, element = 0, payload_at
        cdef int32_t transport_seq
        cdef uint16_t viewer_seq, publisher_seq
        cdef const uint8_t* cached
        cdef uint8_t* slot
        requested_seqs = list(seqs)
        for requested in requested_seqs:
            if not 0 <= requested <= 0xFFFF:
                raise ValueError(f"sequence number {requested} is not 16-bit")
        for requested in requested_seqs:
            viewer_seq = requested
            publisher_seq = <uint16_t>(viewer_seq - subscription.seq_offset)
            cache_index = publisher_seq % source.cache_packets
            length = source.cache_len[cache_index]
            cached = source.cache + <size_t>cache_index * MAX_RTP_PACKET
            # The slot may hold a newer packet with the same index: check the stored seq.
            # Before offset_valid_from the viewer's numbers meant other packets; before
            # resend_valid_from they may name a packet it never got (resend_floor_after).
            if (length == 0 or source.cache_seq[cache_index] != publisher_seq
                    or (subscription.offset_floor_set
                        and seq_before(publisher_seq, subscription.offset_valid_from))
                    or (subscription.resend_floor_set
                        and seq_before(publisher_seq, subscription.resend_valid_from))):
                state.resend_misses += 1
                self.counters.resend_misses += 1
                continue
            rtp_parse_layout(cached, length, &layout)   # validated when it was pushed
            # The viewer got this packet with its own picture id and TL0PICIDX (RFC 7741
            # §4.2, RFC 9628 §4.2), continued across switches and VP8 temporal drops; the
            # retransmission must carry the same ones, or the receiver, which keys
            # pictures by picture id, files it under another picture. The offsets in
            # force now are those it was sent with (see offset_valid_from).
            if source.payload_format == PAYLOAD_VP8:
                vp8_parse_fields(cached + layout.header_len, layout.payload_len, &descriptor)
            elif source.payload_format == PAYLOAD_VP9:
                vp9_parse_fields(cached + layout.header_len, layout.payload_len, &descriptor)
            else:
                descriptor.present = 0
            slot = batch_next_slot(&self.batch)
            # A retransmission is a packet of the transport like any other (§2): it gets
            # the viewer's next transport-wide number, as push() does.
            growth = -1
            transport_seq = -1
            if state.transport_cc_id:
                transport_cc_locate(&layout, source.transport_cc_id, &element_index, &growth)
                growth = transport_cc_growth(&layout, growth, state.transport_cc_id)
                if growth < 0:
                    state.transport_cc_unstamped += 1
                    self.counters.transport_cc_unstamped += 1
            if subscription.has_rtx:
                # RFC 4588 §4: RTX header (same timestamp and marker, RTX SSRC/PT, own
                # sequence space), then the original sequence number (the one the viewer
                # knows), then the original payload without its padding.
                if growth >= 0:
                    element = transport_cc_copy(slot, cached, layout.header_len, &layout,
                                                element_index, growth, state.transport_cc_id)
                else:
                    memcpy(slot, cached, layout.header_len)
                slot[0] &= ~0x20
                rtp_rewrite(slot, &layout, subscription, publisher_seq, load32(cached + 4),
                            growth if growth > 0 else 0)
                slot[1] = (slot[1] & 0x80) | subscription.rtx_payload_type
                store16(slot + 2, subscription.rtx_seq)
                store32(slot + 8, subscription.rtx_ssrc)
                subscription.rtx_seq += 1
                length = layout.header_len + (growth if growth > 0 else 0)
                store16(slot + length, viewer_seq)
                payload_at = length + RTX_OSN_SIZE
                memcpy(slot + payload_at, cached + layout.header_len, layout.payload_len)
                length = payload_at + layout.payload_len
            elif growth >= 0:
                element = transport_cc_copy(slot, cached, length, &layout, element_index,
                                            growth, state.transport_cc_id)
                rtp_rewrite(slot, &layout, subscription, publisher_seq, load32(cached + 4),
                            growth)
                length += growth
                payload_at = layout.header_len + growth
            else:
                memcpy(slot, cached, length)
                rtp_rewrite(slot, &layout, subscription, publisher_seq, load32(cached + 4), 0)
                payload_at = layout.header_len
            if descriptor.present:
                descriptor_rewrite(slot + payload_at, &descriptor, subscription)
            if growth >= 0:
                transport_seq = state.transport_seq
                state.transport_seq += 1
                transport_cc_stamp(slot + element,
                                   transport_cc_one_byte(&layout, growth, state.transport_cc_id),
                                   state.transport_cc_id, <uint16_t>transport_seq)
            protected_len = srtp_protect_rtp(&state.tx, slot, length, BATCH_SLOT_SIZE)
            if protected_len < 0:
                state.protect_errors += 1
                self.counters.protect_errors += 1
                if transport_seq >= 0:
                    state.transport_seq -= 1
                continue
            if transport_seq >= 0:
                if growth == 0:
                    state.transport_cc_stamped += 1
                    self.counters.transport_cc_stamped += 1
                else:
                    state.transport_cc_added += 1
                    self.counters.transport_cc_added += 1
            sent += self._queue(viewer, state, protected_len, NULL, 0, transport_seq)
        sent += self._flush()
        state.resent += sent
        self.counters.resent += sent
        if subscription.has_rtx:
            state.rtx_sent += sent
            self.counters.rtx_sent += sent
        return sent

    def send_padding(self, int viewer, int track, int count, int size) -> int:
        """Send ``count`` padding-only RTP packets (RFC 3550 §5.1: P set, no payload,
        ``size`` octets of padding whose last octet counts them; the receiver discards
        them) to ``viewer`` on its subscription to ``track``'s RTX stream (RFC 4588: the
        RTX SSRC and payload type, the next RTX sequence numbers, the timestamp of the
        last media packet), as libwebrtc probes, so that the media sequence numbers show
        no gap. Each carries the viewer's next transport-wide sequence number and is
        logged (transport_sent), which is what makes it a probe: how its feedback comes
        back shows the path's headroom. Each datagram is 12 + 8 (extension block) +
        ``size`` octets plus the SRTP tag. Returns packets the kernel accepted; 0 when
        the subscription has no RTX, the viewer no transport-cc, or nothing was sent to
        it on this subscription yet (no timestamp to give them)."""
        cdef Viewer* state = self._viewer(viewer)
        cdef Track* source = self._track(track)
        cdef Subscription* subscription = self._subscription(source, viewer)
        cdef int index, length, protected_len, sent = 0
        cdef int32_t transport_seq
        cdef uint8_t viewer_id = state.transport_cc_id
        cdef uint8_t* slot
        if not 0 <= count <= PADDING_MAX_PACKETS:
            raise ValueError(f"count must be in 0..{PADDING_MAX_PACKETS}")
        if not 1 <= size <= PADDING_MAX:   # the padding count is one octet
            raise ValueError(f"size must be in 1..{PADDING_MAX}")
        if not subscription.has_rtx or viewer_id == 0 or not subscription.has_sent:
            return 0
        length = RTP_HEADER_MIN + TRANSPORT_CC_NEW_BLOCK + size
        with nogil:
            for index in range(count):
                slot = batch_next_slot(&self.batch)
                slot[0] = 0x80 | 0x20 | 0x10            # V=2, P, X, CC=0
                slot[1] = subscription.rtx_payload_type  # M=0
                store16(slot + 2, subscription.rtx_seq)
                store32(slot + 4, subscription.last_ts)
                store32(slot + 8, subscription.rtx_ssrc)
                store16(slot + 12, 0xBEDE if viewer_id <= 14 else 0x1000)
                store16(slot + 14, 1)
                slot[19] = 0
                transport_seq = state.transport_seq
                transport_cc_stamp(slot + 16, viewer_id <= 14, viewer_id,
                                   <uint16_t>transport_seq)
                memset(slot + 20, 0, size - 1)
                slot[length - 1] = <uint8_t>size
                protected_len = srtp_protect_rtp(&state.tx, slot, length, BATCH_SLOT_SIZE)
                if protected_len < 0:
                    state.protect_errors += 1
                    self.counters.protect_errors += 1
                    continue
                subscription.rtx_seq += 1
                state.transport_seq += 1
                sent += self._queue(viewer, state, protected_len, NULL, 0, transport_seq)
            sent += self._flush()
        state.padding_sent += sent
        self.counters.padding_sent += sent
        return sent

    def send_sender_reports(self, int track, ntp_time: int, rtp_time: int) -> int:
        """An RTCP SR (RFC 3550 §6.4.1) to every subscriber of ``track`` that is receiving
        media (not waiting for a keyframe): the viewer's SSRC, ``ntp_time`` (64-bit NTP
        format), ``rtp_time`` in the viewer's timestamp space, and its packet/octet counts.
        Returns datagrams the kernel accepted."""
        cdef Track* source = self._track(track)
        cdef uint64_t ntp = ntp_time
        cdef uint32_t rtp = <uint32_t>(rtp_time & 0xFFFFFFFF)
        cdef int index, protected_len, sent = 0
        cdef Subscription* subscription
        cdef Viewer* viewer
        cdef uint8_t* slot
        with nogil:
            for index in range(source.subscription_count):
                subscription = &source.subscriptions[index]
                if subscription.wait_keyframe:
                    continue   # not yet a sender to this viewer (RFC 3550 §6.4)
                viewer = &self.viewers[subscription.viewer]
                slot = batch_next_slot(&self.batch)
                # V=2, P=0, RC=0 | PT=200 (SR) | length = 6 (32-bit words minus one)
                slot[0] = 0x80
                slot[1] = 200
                store16(slot + 2, 6)
                store32(slot + 4, subscription.ssrc)
                store32(slot + 8, <uint32_t>(ntp >> 32))
                store32(slot + 12, <uint32_t>ntp)
                store32(slot + 16, rtp + subscription.ts_offset)
                store32(slot + 20, subscription.packets_sent)
                store32(slot + 24, subscription.octets_sent)
                protected_len = srtp_protect_rtcp(&viewer.tx, slot, RTCP_SR_SIZE, BATCH_SLOT_SIZE)
                if protected_len < 0:
                    viewer.protect_errors += 1
                    self.counters.protect_errors += 1
                    continue
                viewer.sender_reports_sent += 1
                sent += self._queue(subscription.viewer, viewer, protected_len, NULL, 0, -1)
            sent += self._flush()
        self.counters.sender_reports_sent += sent
        return sent

    def send_rtcp(self, int viewer, const uint8_t[::1] packet not None) -> int:
        """Protect plain RTCP ``packet`` (e.g. an answer to the viewer's feedback) with the
        viewer's keys and send it; returns 1 if the kernel accepted it, else 0."""
        cdef Viewer* state = self._viewer(viewer)
        cdef int length = packet.shape[0]
        cdef int protected_len
        cdef uint8_t* slot
        if not 8 <= length <= MAX_RTP_PACKET:
            raise ValueError(f"RTCP packet of {length} bytes")
        slot = batch_next_slot(&self.batch)
        memcpy(slot, &packet[0], length)
        protected_len = srtp_protect_rtcp(&state.tx, slot, length, BATCH_SLOT_SIZE)
        if protected_len < 0:
            state.protect_errors += 1
            self.counters.protect_errors += 1
            raise srtp_error(protected_len)
        self._queue(viewer, state, protected_len, NULL, 0, -1)
        if self._flush() != 1:
            return 0
        state.rtcp_sent += 1
        self.counters.rtcp_sent += 1
        return 1

    def unprotect_rtcp(self, int viewer, const uint8_t[::1] packet not None) -> bytes:
        """The plain RTCP inside the viewer's SRTCP ``packet``; SrtpError if it fails."""
        cdef Viewer* state = self._viewer(viewer)
        cdef bytearray plain = bytearray(packet)
        cdef int length = len(plain)
        cdef uint8_t* buffer = <uint8_t*>(<char*>plain) if length else NULL
        if length:
            length = srtp_unprotect_rtcp(&state.rx, buffer, length)
        else:
            length = SRTP_ERR_MALFORMED
        if length < 0:
            state.rtcp_errors += 1
            raise srtp_error(length)
        state.rtcp_received += 1
        return bytes(plain[:length])

    # -- counters ------------------------------------------------------------------------

    def viewer_stats(self, int viewer) -> dict:
        cdef Viewer* state = self._viewer(viewer)
        return {
            "packets_sent": state.packets_sent,
            "bytes_sent": state.bytes_sent,
            "send_errors": state.send_errors,
            "protect_errors": state.protect_errors,
            "dropped_waiting_keyframe": state.dropped_waiting_keyframe,
            "resent": state.resent,
            "rtx_sent": state.rtx_sent,
            "resend_misses": state.resend_misses,
            "sender_reports_sent": state.sender_reports_sent,
            "rtcp_sent": state.rtcp_sent,
            "rtcp_received": state.rtcp_received,
            "rtcp_errors": state.rtcp_errors,
            "transport_cc_stamped": state.transport_cc_stamped,
            "transport_cc_added": state.transport_cc_added,
            "transport_cc_unstamped": state.transport_cc_unstamped,
            "padding_sent": state.padding_sent,
        }

    def stats(self) -> dict:
        cdef int index, tracks = 0, subscriptions = 0
        for index in range(self.max_tracks):
            if self.tracks[index].in_use:
                tracks += 1
                subscriptions += self.tracks[index].subscription_count
        return {
            "viewers": self.max_viewers - self.free_viewer_count,
            "tracks": tracks,
            "subscriptions": subscriptions,
            "pushed": self.counters.pushed,
            "dropped_malformed": self.counters.dropped_malformed,
            "dropped_too_large": self.counters.dropped_too_large,
            "dropped_waiting_keyframe": self.counters.dropped_waiting_keyframe,
            "packets_sent": self.counters.packets_sent,
            "bytes_sent": self.counters.bytes_sent,
            "send_errors": self.counters.send_errors,
            "send_buffer_full": self.counters.send_buffer_full,
            "protect_errors": self.counters.protect_errors,
            "sendmmsg_calls": self.counters.sendmmsg_calls,
            "resent": self.counters.resent,
            "rtx_sent": self.counters.rtx_sent,
            "resend_misses": self.counters.resend_misses,
            "sender_reports_sent": self.counters.sender_reports_sent,
            "rtcp_sent": self.counters.rtcp_sent,
            "switches_completed": self.counters.switches_completed,
            "switch_log_overflows": self.counters.switch_log_overflows,
            "dropped_temporal_layer": self.counters.dropped_temporal_layer,
            "dropped_stale": self.counters.dropped_stale,
            "gso": bool(self.gso_on),
            "gso_error": self.gso_error,
            "gso_messages": self.counters.gso_messages,
            "gso_segments": self.counters.gso_segments,
            "gso_refused": self.counters.gso_refused,
            "padded_packets": self.counters.padded_packets,
            "padding_bytes": self.counters.padding_bytes,
            "transport_cc_stamped": self.counters.transport_cc_stamped,
            "transport_cc_added": self.counters.transport_cc_added,
            "transport_cc_unstamped": self.counters.transport_cc_unstamped,
            "padding_sent": self.counters.padding_sent,
        }


def measure_send_limit(int fd, destinations, *, int profile, int packet_size, int packets,
                       int batch_size=32, int segments=1):
    """The same-run limit for benchmarks: protect one packet per destination with ONE
    SRTP context and sendmmsg the batches, with none of the fan-out's per-viewer work.
    ``packets`` packets each go to every destination. ``segments`` > 1: the packets go in
    runs of that many per destination, protected back to back and sent as one UDP GSO
    entry each (udp(7) UDP_SEGMENT), the limit of the GSO fan-out. Returns (datagrams
    sent, seconds)."""
    cdef int family = socket_family(fd)
    cdef int count = len(destinations)
    cdef sockaddr_in6* addresses
    cdef socklen_t* address_lens
    cdef SendBatch batch
    cdef FanoutCounters counters
    cdef SrtpCtx context
    cdef uint8_t template[MAX_RTP_PACKET]
    cdef int index, destination, packet_index, result, run, segment, gso_error = 0
    cdef bint opened
    cdef uint16_t sequence = 0
    cdef uint8_t* slot
    cdef long long sent = 0
    cdef double started, elapsed
    if not 12 <= packet_size <= MAX_RTP_PACKET or packets < 0 or count == 0:
        raise ValueError("packet_size must be 12..1500, packets >= 0, destinations non-empty")
    if not 1 <= batch_size <= 1024:
        raise ValueError("batch_size must be in 1..1024")
    if not 1 <= segments <= min(GSO_MAX_SEGMENTS, batch_size):
        raise ValueError("segments must be in 1..min(64, batch_size)")
    key_len, salt_len = profile_key_lengths(profile)
    key = _os.urandom(key_len)
    salt = _os.urandom(salt_len)
    memset(&counters, 0, sizeof(counters))
    memset(&batch, 0, sizeof(batch))
    memset(&context, 0, sizeof(context))
    addresses = <sockaddr_in6*>calloc(count, sizeof(sockaddr_in6))
    address_lens = <socklen_t*>calloc(count, sizeof(socklen_t))
    try:
        if addresses == NULL or address_lens == NULL or batch_init(&batch, fd, batch_size) != 0:
            raise MemoryError()
        for index, (host, port) in enumerate(destinations):
            fill_address(&addresses[index], &address_lens[index], family, host, port)
        result = srtp_ctx_init(&context, profile, <const uint8_t*><const char*>key, key_len,
                               <const uint8_t*><const char*>salt, salt_len)
        if result < 0:
            raise srtp_error(result)
        memset(template, 0, packet_size)
        template[0] = 0x80           # V=2
        template[1] = 96             # a dynamic payload type (RFC 3551 §6)
        store32(template + 8, 0x5EED5EED)
        with nogil:
            started = monotonic_seconds()
            packet_index = 0
            while packet_index < packets:
                run = min(segments, packets - packet_index)
                for destination in range(count):
                    if batch.count + run > batch.capacity:
                        sent += batch_send(&batch, &counters, &gso_error)
                        batch.count = 0
                        batch.message_count = 0
                    opened = 0
                    for segment in range(run):
                        slot = batch_next_slot(&batch)
                        memcpy(slot, template, packet_size)
                        store16(slot + 2, sequence)
                        sequence += 1
                        result = srtp_protect_rtp(&context, slot, packet_size, BATCH_SLOT_SIZE)
                        if result < 0:
                            continue
                        if not opened:
                            batch_commit(&batch, result, &addresses[destination],
                                         address_lens[destination], NULL, 0)
                            opened = 1
                        else:
                            batch_join(&batch, result)
                packet_index += run
            if batch.count:
                sent += batch_send(&batch, &counters, &gso_error)
                batch.count = 0
                batch.message_count = 0
            elapsed = monotonic_seconds() - started
    finally:
        srtp_ctx_clear(&context)
        batch_free(&batch)
        free(addresses)
        free(address_lens)
    return sent, elapsed
