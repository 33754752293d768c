"""Tell apart the protocols sharing one UDP port by the first byte of each datagram.

WebRTC puts STUN (ICE), DTLS and SRTP/SRTCP on a single 5-tuple; RFC 7983 §7 assigns
each a disjoint range of first-byte values, and RFC 9443 §3 keeps that table while
making room for QUIC (80..127 and 192..255), which whepfan does not speak:

    +----------------+
    |        [0..3] -+--> STUN           (RFC 8489: the two top bits of a STUN message are 0)
    |      [16..19] -+--> ZRTP
    |      [20..63] -+--> DTLS           (the TLS ContentType: 20..63)
    |      [64..79] -+--> TURN channel   (RFC 8656 §12: channel numbers 0x4000..0x4FFF)
    |    [128..191] -+--> RTP / RTCP     (the RTP version field is 2: 0b10xxxxxx)
    |         other -+--> unknown: count and drop
    +----------------+

RTP and RTCP then share the RTP range; RFC 5761 §4 tells them apart by the second byte.
"""

from __future__ import annotations

import enum


class PacketKind(enum.Enum):
    STUN = "stun"
    ZRTP = "zrtp"
    DTLS = "dtls"
    TURN_CHANNEL = "turn-channel"
    RTP_OR_RTCP = "rtp-or-rtcp"
    UNKNOWN = "unknown"


# RFC 7983 §7 / RFC 9443 §3, as data: (first, last) inclusive ranges of the first byte.
_FIRST_BYTE_RANGES: tuple[tuple[int, int, PacketKind], ...] = (
    (0, 3, PacketKind.STUN),
    (16, 19, PacketKind.ZRTP),
    (20, 63, PacketKind.DTLS),
    (64, 79, PacketKind.TURN_CHANNEL),
    (128, 191, PacketKind.RTP_OR_RTCP),
)


def _build_table() -> tuple[PacketKind, ...]:
    table = [PacketKind.UNKNOWN] * 256
    for first, last, kind in _FIRST_BYTE_RANGES:
        for value in range(first, last + 1):
            table[value] = kind
    return tuple(table)


# One tuple index per datagram: this runs for every packet a worker receives.
_KIND_BY_FIRST_BYTE = _build_table()


def classify(first_byte: int) -> PacketKind:
    """The protocol a datagram starting with ``first_byte`` belongs to (RFC 7983 §7)."""
    if not 0 <= first_byte <= 255:
        raise ValueError(f"first_byte must be 0..255, got {first_byte}")
    return _KIND_BY_FIRST_BYTE[first_byte]


def classify_datagram(data: bytes | bytearray | memoryview) -> PacketKind:
    """Like :func:`classify` for a whole datagram; an empty one is ``UNKNOWN``."""
    if not data:
        return PacketKind.UNKNOWN
    return _KIND_BY_FIRST_BYTE[data[0]]


def is_rtcp(data: bytes | bytearray | memoryview) -> bool:
    """Whether a datagram in the RTP range is RTCP rather than RTP (RFC 5761 §4).

    RTCP packet types 192..223 occupy the second byte where RTP keeps the marker bit and
    the payload type; with the marker bit masked off they read as 64..95, the payload
    types RFC 5761 §4 forbids RTP to use when the two are multiplexed.
    """
    return len(data) >= 2 and 64 <= (data[1] & 0x7F) <= 95
