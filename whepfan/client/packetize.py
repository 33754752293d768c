"""RTP packetisation of encoded frames (the sending side of whepfan's client tools).

Each packetiser turns one encoded frame into RTP payloads no longer than ``max_payload``;
the caller puts them in packets with one timestamp and sets the marker bit on the last
one (RFC 3550 §5.1 "marker": the end of a video frame). Sans-IO and clock-free.

- VP8  (RFC 7741 §4.2): every payload starts with a descriptor carrying a 15-bit
  picture id; the first payload of a frame has the S bit set and partition index 0.
- H264 (RFC 6184 §5.6-§5.8, packetization-mode 1): an Annex B access unit is split at
  its start codes; runs of small NAL units share a STAP-A, a NAL unit too large for one
  packet is cut into FU-A fragments, any other goes alone.
- Opus (RFC 7587 §4.2): one Opus packet is one RTP payload, unchanged.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable

from whepfan.protocol.codecs import Vp8PayloadDescriptor
from whepfan.protocol.rtp import RtpPacket

#: Payload budget that keeps an SRTP packet (12-byte header, up to 16 bytes of header
#: extensions, 16-byte GCM tag) under the 1200-byte datagrams WebRTC stacks assume.
DEFAULT_MAX_PAYLOAD = 1100

_H264_STAP_A = 24  # RFC 6184 §5.7.1
_H264_FU_A = 28  # RFC 6184 §5.8
_NAL_FORBIDDEN_BIT = 0x80
_NAL_NRI_MASK = 0x60
_NAL_TYPE_MASK = 0x1F


class Vp8Packetizer:
    """RFC 7741 payloads for one VP8 stream; the picture id counts frames (mod 2**15)."""

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD, picture_id: int = 0) -> None:
        if max_payload < 8:
            raise ValueError("max_payload leaves no room for VP8 data")
        self.max_payload = max_payload
        self.picture_id = picture_id & 0x7FFF

    def packetize(self, frame: bytes) -> list[bytes]:
        if not frame:
            return []
        payloads = []
        first = True
        position = 0
        while position < len(frame):
            descriptor = bytes(
                Vp8PayloadDescriptor(start_of_partition=first, picture_id=self.picture_id)
            )
            room = self.max_payload - len(descriptor)
            payloads.append(descriptor + frame[position : position + room])
            position += room
            first = False
        self.picture_id = (self.picture_id + 1) & 0x7FFF
        return payloads


def split_annex_b(access_unit: bytes) -> list[bytes]:
    """NAL units of an H.264 Annex B byte stream (start codes ``00 00 01`` or
    ``00 00 00 01``, H.264 §B.1); empty units are skipped."""
    units = []
    starts = []
    index = access_unit.find(b"\x00\x00\x01")
    while index != -1:
        starts.append(index + 3)
        index = access_unit.find(b"\x00\x00\x01", index + 3)
    for number, start in enumerate(starts):
        end = starts[number + 1] - 3 if number + 1 < len(starts) else len(access_unit)
        # A four-byte start code leaves its leading zero at the end of the previous unit:
        # trailing_zero_8bits belong to the byte stream, not the NAL unit (H.264 §B.1.1),
        # and a NAL unit never ends in a zero byte (its RBSP stop bit, §7.3.2.11).
        unit = access_unit[start:end].rstrip(b"\x00")
        if unit:
            units.append(unit)
    return units


class H264Packetizer:
    """RFC 6184 packetization-mode 1 payloads (single NAL, STAP-A, FU-A)."""

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if max_payload < 8:
            raise ValueError("max_payload leaves no room for H264 data")
        self.max_payload = max_payload

    def packetize(self, access_unit: bytes) -> list[bytes]:
        return self.packetize_units(split_annex_b(access_unit))

    def packetize_units(self, units: Iterable[bytes]) -> list[bytes]:
        payloads: list[bytes] = []
        pending: list[bytes] = []  # small units waiting to share a STAP-A
        pending_size = 1  # the STAP-A NAL header

        def flush() -> None:
            nonlocal pending, pending_size
            if len(pending) == 1:
                payloads.append(pending[0])
            elif pending:
                payloads.append(_stap_a(pending))
            pending = []
            pending_size = 1

        for unit in units:
            if len(unit) > self.max_payload:
                flush()
                payloads.extend(self._fragment(unit))
                continue
            # RFC 6184 §5.7.1: each aggregated unit is preceded by its 16-bit size.
            if pending_size + 2 + len(unit) > self.max_payload:
                flush()
            pending.append(unit)
            pending_size += 2 + len(unit)
        flush()
        return payloads

    def _fragment(self, unit: bytes) -> list[bytes]:
        """RFC 6184 §5.8: FU indicator (F, NRI of the unit, type 28), FU header (S, E,
        type of the unit), then a slice of the unit without its own header byte."""
        header = unit[0]
        indicator = (header & (_NAL_FORBIDDEN_BIT | _NAL_NRI_MASK)) | _H264_FU_A
        nal_type = header & _NAL_TYPE_MASK
        body = unit[1:]
        room = self.max_payload - 2
        fragments = []
        for position in range(0, len(body), room):
            start = 0x80 if position == 0 else 0
            end = 0x40 if position + room >= len(body) else 0
            fragments.append(
                bytes((indicator, start | end | nal_type)) + body[position : position + room]
            )
        return fragments


def _stap_a(units: list[bytes]) -> bytes:
    # RFC 6184 §5.7.1: F is the OR of the units' F bits, NRI their maximum.
    forbidden = 0
    nri = 0
    for unit in units:
        forbidden |= unit[0] & _NAL_FORBIDDEN_BIT
        nri = max(nri, unit[0] & _NAL_NRI_MASK)
    parts = [bytes((forbidden | nri | _H264_STAP_A,))]
    for unit in units:
        parts.append(struct.pack("!H", len(unit)))
        parts.append(unit)
    return b"".join(parts)


class OpusPacketizer:
    """RFC 7587 §4.2: an Opus packet is carried whole in one RTP payload."""

    max_payload = DEFAULT_MAX_PAYLOAD

    def packetize(self, packet: bytes) -> list[bytes]:
        return [packet] if packet else []


class RtpSender:
    """Sequence numbers, timestamps and RTP headers for one outgoing SSRC.

    Sequence numbers start at a random value (RFC 3550 §5.1). ``extensions`` are RFC 8285
    elements put on every packet (for example the MID and RID, RFC 8843 §15 / RFC 8852).
    Counts what it built for Sender Reports (RFC 3550 §6.4.1).
    """

    def __init__(
        self,
        *,
        ssrc: int,
        payload_type: int,
        clock_rate: int,
        extensions: Iterable[tuple[int, bytes]] = (),
        first_sequence_number: int | None = None,
    ) -> None:
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self.extensions = list(extensions)
        self.sequence_number = (
            random.getrandbits(16) if first_sequence_number is None else first_sequence_number
        ) & 0xFFFF
        self.packets_sent = 0
        self.octets_sent = 0
        self.last_timestamp = 0

    def packets(self, payloads: list[bytes], timestamp: int, *, marker: bool = True) -> list[bytes]:
        """One RTP packet per payload, all at ``timestamp``; with ``marker`` the last one
        has the M bit (video: end of frame). Audio passes False (RFC 7587 §4.1: M only
        after a silence)."""
        packets = []
        timestamp &= 0xFFFFFFFF
        for index, payload in enumerate(payloads):
            packet = RtpPacket(
                payload_type=self.payload_type,
                sequence_number=self.sequence_number,
                timestamp=timestamp,
                ssrc=self.ssrc,
                marker=marker and index == len(payloads) - 1,
                extensions=self.extensions,
                payload=payload,
            )
            packets.append(packet.serialize())
            self.sequence_number = (self.sequence_number + 1) & 0xFFFF
            self.packets_sent += 1
            self.octets_sent += len(payload)
        self.last_timestamp = timestamp
        return packets
