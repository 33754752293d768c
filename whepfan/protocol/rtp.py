"""RTP packets (RFC 3550 §5.1) with RFC 8285 header extensions, and RTX (RFC 4588).

Used on the ingest side, once per packet the publisher sends (a few hundred a second):
parse, read the mid / rid to route simulcast layers, unwrap RTX. The per-viewer rewrite
of SSRC / sequence number / timestamp lives in the compiled core; the helpers at the end
of this module do the same job for the few packets Python itself builds.

RFC 3550 §5.1 fixed header::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |V=2|P|X|  CC   |M|     PT      |       sequence number         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                           timestamp                           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |           synchronization source (SSRC) identifier            |
    +=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+
    |            contributing source (CSRC) identifiers             |
    |                             ....                              |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |      defined by profile       |           length              |  (if X)
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                  header extension (length words)              |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  payload ...                  |  padding ...  | padding count |  (count if P)
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from whepfan.errors import ParseError

RTP_VERSION = 2
FIXED_HEADER_LENGTH = 12

# RFC 8285 §4.2: "defined by profile" value announcing one-byte extension elements.
ONE_BYTE_PROFILE = 0xBEDE
# RFC 8285 §4.3: 0x100 followed by 4 "appbits" announces two-byte elements.
TWO_BYTE_PROFILE = 0x1000
_TWO_BYTE_PROFILE_MASK = 0xFFF0

_FIXED_HEADER = struct.Struct("!BBHII")
_EXTENSION_HEADER = struct.Struct("!HH")
_UINT16 = struct.Struct("!H")
_CSRC_LISTS = tuple(struct.Struct(f"!{count}I") for count in range(16))

# Header extension URIs (the a=extmap names, RFC 8285 §5) that a WebRTC fan-out meets.
URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"  # RFC 8843 §15
URI_RTP_STREAM_ID = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"  # RFC 8852 §4.3
URI_REPAIRED_RTP_STREAM_ID = (
    "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"  # RFC 8852 §4.4
)
URI_ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
URI_TRANSPORT_WIDE_CC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
URI_TRANSPORT_WIDE_CC_02 = "http://www.webrtc.org/experiments/rtp-hdrext/transport-wide-cc-02"
URI_SSRC_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"  # RFC 6464
URI_TOFFSET = "urn:ietf:params:rtp-hdrext:toffset"  # RFC 5450
URI_VIDEO_ORIENTATION = "urn:3gpp:video-orientation"  # 3GPP TS 26.114 §7.4.5
URI_PLAYOUT_DELAY = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay"
URI_DEPENDENCY_DESCRIPTOR = (
    "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension"
)
URI_COLOR_SPACE = "http://www.webrtc.org/experiments/rtp-hdrext/color-space"
URI_VIDEO_CONTENT_TYPE = "http://www.webrtc.org/experiments/rtp-hdrext/video-content-type"
URI_VIDEO_TIMING = "http://www.webrtc.org/experiments/rtp-hdrext/video-timing"


@dataclass(slots=True, kw_only=True)
class RtpPacket:
    """One RTP packet.

    RFC 8285 header extensions (one-byte ``0xBEDE`` or two-byte ``0x100X`` form) are
    decoded into ``extensions`` as ``(id, value)`` pairs in wire order; serialize() picks
    the form again from the content. A header extension under any other profile is kept
    raw in ``extension_profile`` / ``extension_data`` (whole 32-bit words).
    """

    version: ClassVar[int] = RTP_VERSION

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    marker: bool = False
    csrcs: list[int] = field(default_factory=list)
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    extension_profile: int | None = None
    extension_data: bytes = b""
    payload: bytes = b""
    padding_length: int = 0

    @property
    def padding(self) -> bool:
        return self.padding_length > 0

    def extension(self, extension_id: int) -> bytes | None:
        """The value of the first header extension element with this local id."""
        for element_id, value in self.extensions:
            if element_id == extension_id:
                return value
        return None

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> RtpPacket:
        length = len(data)
        if length < FIXED_HEADER_LENGTH:
            raise ParseError(f"RTP packet of {length} bytes is shorter than its fixed header")
        first, second, sequence_number, timestamp, ssrc = _FIXED_HEADER.unpack_from(data)
        if first >> 6 != RTP_VERSION:
            raise ParseError(f"RTP version {first >> 6}, expected 2")
        csrc_count = first & 0x0F
        offset = FIXED_HEADER_LENGTH + 4 * csrc_count
        if offset > length:
            raise ParseError("RTP packet truncated inside its CSRC list")
        csrcs = list(_CSRC_LISTS[csrc_count].unpack_from(data, FIXED_HEADER_LENGTH))

        extensions: list[tuple[int, bytes]] = []
        extension_profile: int | None = None
        extension_data = b""
        if first & 0x10:
            if offset + 4 > length:
                raise ParseError("RTP packet truncated inside its header extension header")
            profile, words = _EXTENSION_HEADER.unpack_from(data, offset)
            start = offset + 4
            offset = start + 4 * words
            if offset > length:
                raise ParseError("RTP header extension runs past the end of the packet")
            block = memoryview(data)[start:offset]
            if profile == ONE_BYTE_PROFILE:
                extensions = _parse_one_byte_elements(block)
            elif profile & _TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE:
                extensions = _parse_two_byte_elements(block)
            else:
                extension_profile = profile
                extension_data = bytes(block)

        end = length
        padding_length = 0
        if first & 0x20:
            # RFC 3550 §5.1: the last octet counts the padding, itself included.
            if end == offset:
                raise ParseError("RTP padding bit set but no room for the padding count")
            padding_length = data[end - 1]
            if padding_length == 0 or offset + padding_length > end:
                raise ParseError(f"RTP padding count {padding_length} is invalid")
            end -= padding_length

        return cls(
            payload_type=second & 0x7F,
            sequence_number=sequence_number,
            timestamp=timestamp,
            ssrc=ssrc,
            marker=bool(second & 0x80),
            csrcs=csrcs,
            extensions=extensions,
            extension_profile=extension_profile,
            extension_data=extension_data,
            payload=bytes(data[offset:end]),
            padding_length=padding_length,
        )

    def serialize(self) -> bytes:
        if len(self.csrcs) > 15:
            raise ValueError("RTP carries at most 15 CSRCs")
        if not 0 <= self.padding_length <= 255:
            raise ValueError("padding_length must be 0..255")
        if self.extensions and self.extension_profile is not None:
            raise ValueError("set either RFC 8285 extensions or a raw extension, not both")

        extension_block = b""
        if self.extensions:
            profile, body = _serialize_elements(self.extensions)
            extension_block = _EXTENSION_HEADER.pack(profile, len(body) // 4) + body
        elif self.extension_profile is not None:
            if len(self.extension_data) % 4:
                raise ValueError("a raw header extension is a whole number of 32-bit words")
            extension_block = (
                _EXTENSION_HEADER.pack(self.extension_profile, len(self.extension_data) // 4)
                + self.extension_data
            )

        first = (
            (RTP_VERSION << 6)
            | (0x20 if self.padding_length else 0)
            | (0x10 if extension_block else 0)
            | len(self.csrcs)
        )
        second = (0x80 if self.marker else 0) | self.payload_type
        header = _FIXED_HEADER.pack(first, second, self.sequence_number, self.timestamp, self.ssrc)
        parts = [header]
        if self.csrcs:
            parts.append(_CSRC_LISTS[len(self.csrcs)].pack(*self.csrcs))
        parts.append(extension_block)
        parts.append(self.payload)
        if self.padding_length:
            parts.append(bytes(self.padding_length - 1) + bytes((self.padding_length,)))
        return b"".join(parts)

    __bytes__ = serialize


def _parse_one_byte_elements(block: memoryview) -> list[tuple[int, bytes]]:
    """RFC 8285 §4.2: ``ID(4) | L(4)`` then L+1 bytes; zero bytes are padding."""
    elements: list[tuple[int, bytes]] = []
    size = len(block)
    index = 0
    while index < size:
        byte = block[index]
        element_id = byte >> 4
        if element_id == 0:
            # Padding between or after elements (ID 0 is reserved for it).
            index += 1
            continue
        if element_id == 15:
            # ID 15 is reserved: "processing of the entire extension should terminate".
            break
        value_length = (byte & 0x0F) + 1
        index += 1
        if index + value_length > size:
            raise ParseError(f"one-byte header extension {element_id} runs past its block")
        elements.append((element_id, bytes(block[index : index + value_length])))
        index += value_length
    return elements


def _parse_two_byte_elements(block: memoryview) -> list[tuple[int, bytes]]:
    """RFC 8285 §4.3: ``ID(8) | length(8)`` then ``length`` bytes; zero bytes pad."""
    elements: list[tuple[int, bytes]] = []
    size = len(block)
    index = 0
    while index < size:
        element_id = block[index]
        if element_id == 0:
            index += 1
            continue
        if index + 2 > size:
            raise ParseError(f"two-byte header extension {element_id} lacks its length")
        value_length = block[index + 1]
        index += 2
        if index + value_length > size:
            raise ParseError(f"two-byte header extension {element_id} runs past its block")
        elements.append((element_id, bytes(block[index : index + value_length])))
        index += value_length
    return elements


def _serialize_elements(elements: list[tuple[int, bytes]]) -> tuple[int, bytes]:
    """Encode in the one-byte form when every element fits it, else the two-byte form.

    RFC 8285 §4.2 one-byte elements take ids 1..14 and 1..16 byte values; §4.3 two-byte
    elements take ids 1..255 and 0..255 byte values. The block is zero-padded to a word.
    """
    if all(1 <= element_id <= 14 and 1 <= len(value) <= 16 for element_id, value in elements):
        profile = ONE_BYTE_PROFILE
        body = b"".join(
            bytes((element_id << 4 | (len(value) - 1),)) + value for element_id, value in elements
        )
    else:
        for element_id, value in elements:
            if not 1 <= element_id <= 255 or len(value) > 255:
                raise ValueError(f"header extension {element_id} fits neither RFC 8285 form")
        profile = TWO_BYTE_PROFILE
        body = b"".join(bytes((element_id, len(value))) + value for element_id, value in elements)
    return profile, body + bytes(-len(body) % 4)


def rtp_header_length(data: bytes | bytearray | memoryview) -> int:
    """Bytes before the payload: fixed header, CSRCs and header extension (RFC 3550 §5.1)."""
    length = len(data)
    if length < FIXED_HEADER_LENGTH:
        raise ParseError(f"RTP packet of {length} bytes is shorter than its fixed header")
    first = data[0]
    offset = FIXED_HEADER_LENGTH + 4 * (first & 0x0F)
    if first & 0x10:
        if offset + 4 > length:
            raise ParseError("RTP packet truncated inside its header extension header")
        offset += 4 + 4 * _UINT16.unpack_from(data, offset + 2)[0]
    if offset > length:
        raise ParseError("RTP header runs past the end of the packet")
    return offset


def rewrite_header_fields(
    data: bytes | bytearray | memoryview,
    *,
    payload_type: int | None = None,
    sequence_number: int | None = None,
    timestamp: int | None = None,
    ssrc: int | None = None,
    marker: bool | None = None,
) -> bytes:
    """A copy of an RTP packet with some fixed-header fields replaced, the rest untouched.

    The same rewrite the compiled core does per viewer, for packets Python sends itself
    (an RTX retransmission, a probe): no parse, extensions and payload are copied as-is.
    """
    if len(data) < FIXED_HEADER_LENGTH:
        raise ParseError(f"RTP packet of {len(data)} bytes is shorter than its fixed header")
    packet = bytearray(data)
    if payload_type is not None or marker is not None:
        second = packet[1]
        if payload_type is not None:
            second = (second & 0x80) | payload_type
        if marker is not None:
            second = (second & 0x7F) | (0x80 if marker else 0)
        packet[1] = second
    if sequence_number is not None:
        struct.pack_into("!H", packet, 2, sequence_number)
    if timestamp is not None:
        struct.pack_into("!I", packet, 4, timestamp)
    if ssrc is not None:
        struct.pack_into("!I", packet, 8, ssrc)
    return bytes(packet)


def sequence_distance(newer: int, older: int) -> int:
    """Signed distance from ``older`` to ``newer`` on the 16-bit sequence circle.

    RFC 3550 §A.1 treats sequence numbers modulo 2**16; a distance in -32768..32767
    says which of two numbers came later across a wrap.
    """
    return ((newer - older + 0x8000) & 0xFFFF) - 0x8000


def read_sdes_string(packet: RtpPacket, extension_id: int | None) -> str | None:
    """The text of an SDES header extension (mid, rid, repaired rid) if the packet has it.

    RFC 8843 §15 and RFC 8852 §4 carry the identifier as bare UTF-8 bytes; ``None`` when
    the id was not negotiated or the packet does not carry it.
    """
    if extension_id is None:
        return None
    value = packet.extension(extension_id)
    if value is None:
        return None
    # Senders may pad the value with trailing NULs to fit a one-byte element length.
    value = value.rstrip(b"\x00")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(f"SDES header extension {extension_id} is not UTF-8") from exc


@dataclass(slots=True)
class HeaderExtensionMap:
    """Local ids negotiated for header extension URIs by ``a=extmap`` (RFC 8285 §5)."""

    ids_by_uri: dict[str, int] = field(default_factory=dict)

    def id_of(self, uri: str) -> int | None:
        return self.ids_by_uri.get(uri)

    def uri_of(self, extension_id: int) -> str | None:
        for uri, candidate in self.ids_by_uri.items():
            if candidate == extension_id:
                return uri
        return None

    def read_mid(self, packet: RtpPacket) -> str | None:
        return read_sdes_string(packet, self.ids_by_uri.get(URI_MID))

    def read_rid(self, packet: RtpPacket) -> str | None:
        return read_sdes_string(packet, self.ids_by_uri.get(URI_RTP_STREAM_ID))

    def read_repaired_rid(self, packet: RtpPacket) -> str | None:
        return read_sdes_string(packet, self.ids_by_uri.get(URI_REPAIRED_RTP_STREAM_ID))


def padding_only(data: bytes | bytearray | memoryview) -> bool:
    """Whether the packet carries nothing but padding (RFC 3550 §5.1: P set and the padding
    count covers the whole payload), as the RTX packets libwebrtc probes bandwidth with.
    Raises ParseError if the header does not fit."""
    header_length = rtp_header_length(data)
    if not data[0] & 0x20 or len(data) <= header_length:
        return False
    return header_length + data[-1] >= len(data)


def unwrap_rtx(payload: bytes | bytearray | memoryview) -> tuple[int, bytes]:
    """Split an RTX payload into (original sequence number, original payload).

    RFC 4588 §4: the retransmission payload starts with the 2-byte OSN. An RTX packet
    with an empty payload is a padding-only bandwidth probe: check for it before calling.
    """
    if len(payload) < 2:
        raise ParseError(f"RTX payload of {len(payload)} bytes has no original sequence number")
    return _UINT16.unpack_from(payload)[0], bytes(payload[2:])


def wrap_rtx(original_sequence_number: int, payload: bytes) -> bytes:
    """The RTX payload for retransmitting ``payload`` (RFC 4588 §4)."""
    return _UINT16.pack(original_sequence_number) + payload


def unwrap_rtx_packet(packet: bytes | bytearray, original_payload_type: int) -> bytearray:
    """RFC 4588 §4: the original packet rebuilt from an RTX packet: the header with the
    original payload type and, as sequence number, the OSN that leads the RTX payload."""
    offset = rtp_header_length(packet)
    if len(packet) < offset + 2:
        raise ParseError("RTX packet has no original sequence number")
    out = bytearray(packet[:offset]) + packet[offset + 2 :]
    out[1] = (out[1] & 0x80) | original_payload_type
    out[2:4] = packet[offset : offset + 2]
    return out


def extension_id_table(ids: dict[str, int], canonical: dict[str, int]) -> bytes | None:
    """A 256-entry table renumbering header-extension ids (RFC 8285 §5 a=extmap) from
    ``ids`` to ``canonical`` for ``remap_extension_ids``; None when they agree. An id
    with no canonical counterpart maps to 0 (becomes padding)."""
    if ids == canonical:
        return None
    table = bytearray(256)
    for uri, ext_id in ids.items():
        table[ext_id] = canonical.get(uri, 0)
    return bytes(table)


def remap_extension_ids(packet: bytearray, table: bytes) -> None:
    """Renumber header extensions in place (RFC 8285 §4.2 one-byte, §4.3 two-byte);
    ids with no canonical counterpart become padding (id 0), lengths never change."""
    if not packet[0] & 0x10:
        return
    start = FIXED_HEADER_LENGTH + 4 * (packet[0] & 0x0F)
    profile = int.from_bytes(packet[start : start + 2], "big")
    end = start + 4 + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
    i = start + 4
    if profile == ONE_BYTE_PROFILE:
        while i < end:
            ext_id, length = packet[i] >> 4, (packet[i] & 0x0F) + 1
            if ext_id == 0:
                i += 1
                continue
            if ext_id == 15:
                return  # RFC 8285 §4.2: id 15 stops parsing
            new_id = table[ext_id]
            if new_id:
                packet[i] = (new_id << 4) | (length - 1)
            else:
                packet[i : i + 1 + length] = bytes(1 + length)
            i += 1 + length
    elif profile & _TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE:
        while i + 1 < end:
            ext_id = packet[i]
            if ext_id == 0:
                i += 1
                continue
            length = packet[i + 1]
            new_id = table[ext_id]
            if new_id:
                packet[i] = new_id
            else:
                packet[i : i + 2 + length] = bytes(2 + length)
            i += 2 + length


def transport_sequence(packet: bytes | bytearray | memoryview, extension_id: int) -> int | None:
    """The transport-wide sequence number (draft-holmer-rmcat-transport-wide-cc-
    extensions-01 §2: 16 bits, network order) in an RTP packet's header extension
    ``extension_id`` (RFC 8285 one- or two-byte form), or None when the packet does not
    carry it. Read in place, once per ingested packet: no parse, no allocation."""
    length = len(packet)
    if length < FIXED_HEADER_LENGTH or not packet[0] & 0x10:
        return None
    position = FIXED_HEADER_LENGTH + 4 * (packet[0] & 0x0F)
    if position + 4 > length:
        return None
    profile = packet[position] << 8 | packet[position + 1]
    end = position + 4 + 4 * (packet[position + 2] << 8 | packet[position + 3])
    if end > length:
        return None
    position += 4
    if profile == ONE_BYTE_PROFILE:  # RFC 8285 §4.2
        while position < end:
            first = packet[position]
            if first == 0:  # padding
                position += 1
                continue
            element_id, size = first >> 4, (first & 0x0F) + 1
            if element_id == 15:  # §4.2: stop processing the block
                return None
            if element_id == extension_id:
                if size < 2 or position + 3 > end:
                    return None
                return int(packet[position + 1] << 8 | packet[position + 2])
            position += 1 + size
    elif profile & _TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE:  # RFC 8285 §4.3
        while position + 1 < end:
            element_id, size = packet[position], packet[position + 1]
            if element_id == 0:
                position += 1
                continue
            if element_id == extension_id:
                if size < 2 or position + 4 > end:
                    return None
                return int(packet[position + 2] << 8 | packet[position + 3])
            position += 2 + size
    return None
