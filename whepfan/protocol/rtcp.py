"""RTCP packets (RFC 3550 §6) and the feedback messages a fan-out server exchanges.

Viewers send receiver reports, NACKs (RFC 4585 §6.2.1), PLIs (RFC 4585 §6.3.1), FIRs
(RFC 5104 §4.3.1), REMBs (draft-alvestrand-rmcat-remb-03) and transport-wide feedback;
the server builds sender reports, PLI/FIR towards the publisher and NACKs on ingest.
Every packet type here has parse() and serialize(); anything unknown is kept raw so a
compound packet always parses as a whole. This runs for every viewer RTCP packet (up to
~10k/s per worker), so parsing is struct.unpack_from over the original buffer.

Every RTCP packet starts with the same word (RFC 3550 §6.4.1)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |V=2|P| RC/FMT  |      PT       |  length (32-bit words - 1)    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

and the length field lets a receiver walk a compound packet (RFC 3550 §6.1).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from whepfan.errors import ParseError

RTCP_VERSION = 2

# Packet types, RFC 3550 §12.1 and RFC 4585 §6.1.
PT_SENDER_REPORT = 200
PT_RECEIVER_REPORT = 201
PT_SOURCE_DESCRIPTION = 202
PT_GOODBYE = 203
PT_APPLICATION = 204
PT_TRANSPORT_FEEDBACK = 205  # RTPFB
PT_PAYLOAD_FEEDBACK = 206  # PSFB

# Feedback message types (the FMT field).
FMT_GENERIC_NACK = 1  # RFC 4585 §6.2.1
FMT_TRANSPORT_WIDE_CC = 15  # draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1
FMT_PICTURE_LOSS = 1  # RFC 4585 §6.3.1
FMT_FULL_INTRA_REQUEST = 4  # RFC 5104 §4.3.1
FMT_APPLICATION_LAYER = 15  # RFC 4585 §6.4, which REMB uses

# SDES item types, RFC 3550 §6.5.
SDES_END = 0
SDES_CNAME = 1
SDES_NAME = 2
SDES_EMAIL = 3
SDES_PHONE = 4
SDES_LOCATION = 5
SDES_TOOL = 6
SDES_NOTE = 7
SDES_PRIVATE = 8

_HEADER = struct.Struct("!BBH")
_UINT32 = struct.Struct("!I")
_SSRC_PAIR = struct.Struct("!II")
_SENDER_INFO = struct.Struct("!IQIII")
_REPORT_BLOCK = struct.Struct("!IIIIII")
_NACK_ITEM = struct.Struct("!HH")
_FIR_ENTRY = struct.Struct("!IB3x")
_REMB_IDENTIFIER = b"REMB"

# RFC 5905 §6: seconds from the NTP prime epoch (1900-01-01) to the Unix epoch.
NTP_UNIX_EPOCH_OFFSET = 2_208_988_800
_TWO_32 = 1 << 32


def _packet(packet_type: int, count: int, body: bytes) -> bytes:
    """Frame ``body`` with the common header, padding it to a word if it is not one.

    RFC 3550 §6.4.1: the length counts 32-bit words minus one; when the body is not
    word-aligned (only raw packets can be) the P bit and a trailing count pad it.
    """
    if not 0 <= count <= 31:
        raise ValueError(f"RTCP count/FMT field is 5 bits, got {count}")
    padding = -len(body) % 4
    first = (RTCP_VERSION << 6) | count
    if padding:
        first |= 0x20
        body = body + bytes(padding - 1) + bytes((padding,))
    return _HEADER.pack(first, packet_type, len(body) // 4) + body


@dataclass(slots=True, kw_only=True)
class ReportBlock:
    """Reception statistics for one source (RFC 3550 §6.4.1)."""

    ssrc: int
    fraction_lost: int = 0
    # Signed 24-bit: duplicates can make it negative (RFC 3550 §6.4.1).
    cumulative_lost: int = 0
    highest_sequence: int = 0
    jitter: int = 0
    last_sender_report: int = 0
    delay_since_last_sender_report: int = 0

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> ReportBlock:
        if offset + 24 > len(data):
            raise ParseError("RTCP report block truncated")
        ssrc, lost, highest, jitter, lsr, dlsr = _REPORT_BLOCK.unpack_from(data, offset)
        cumulative = lost & 0xFFFFFF
        if cumulative & 0x800000:
            cumulative -= 0x1000000
        return cls(
            ssrc=ssrc,
            fraction_lost=lost >> 24,
            cumulative_lost=cumulative,
            highest_sequence=highest,
            jitter=jitter,
            last_sender_report=lsr,
            delay_since_last_sender_report=dlsr,
        )

    def serialize(self) -> bytes:
        if not -0x800000 <= self.cumulative_lost <= 0x7FFFFF:
            raise ValueError("cumulative_lost is a signed 24-bit field")
        return _REPORT_BLOCK.pack(
            self.ssrc,
            (self.fraction_lost << 24) | (self.cumulative_lost & 0xFFFFFF),
            self.highest_sequence,
            self.jitter,
            self.last_sender_report,
            self.delay_since_last_sender_report,
        )

    __bytes__ = serialize


def _parse_report_blocks(
    body: memoryview, offset: int, count: int
) -> tuple[list[ReportBlock], bytes]:
    reports = [ReportBlock.parse(body, offset + 24 * index) for index in range(count)]
    return reports, bytes(body[offset + 24 * count :])


def _check_report_count(reports: list[ReportBlock]) -> None:
    if len(reports) > 31:
        raise ValueError("an SR/RR carries at most 31 report blocks (RFC 3550 §6.4.1)")


@dataclass(slots=True, kw_only=True)
class SenderReport:
    """RFC 3550 §6.4.1; ``ntp_timestamp`` is the full 64-bit NTP time (see unix_to_ntp)."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: list[ReportBlock] = field(default_factory=list)
    profile_extension: bytes = b""

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> SenderReport:
        return _parse_single(data, cls)

    @classmethod
    def _from_body(cls, count: int, body: memoryview) -> SenderReport:
        if len(body) < 24 + 24 * count:
            raise ParseError("RTCP sender report truncated")
        ssrc, ntp, rtp, packets, octets = _SENDER_INFO.unpack_from(body)
        reports, extension = _parse_report_blocks(body, 24, count)
        return cls(
            ssrc=ssrc,
            ntp_timestamp=ntp,
            rtp_timestamp=rtp,
            packet_count=packets,
            octet_count=octets,
            reports=reports,
            profile_extension=extension,
        )

    def serialize(self) -> bytes:
        _check_report_count(self.reports)
        body = _SENDER_INFO.pack(
            self.ssrc, self.ntp_timestamp, self.rtp_timestamp, self.packet_count, self.octet_count
        )
        blocks = b"".join(block.serialize() for block in self.reports)
        return _packet(PT_SENDER_REPORT, len(self.reports), body + blocks + self.profile_extension)

    __bytes__ = serialize


@dataclass(slots=True, kw_only=True)
class ReceiverReport:
    """RFC 3550 §6.4.2."""

    ssrc: int
    reports: list[ReportBlock] = field(default_factory=list)
    profile_extension: bytes = b""

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> ReceiverReport:
        return _parse_single(data, cls)

    @classmethod
    def _from_body(cls, count: int, body: memoryview) -> ReceiverReport:
        if len(body) < 4 + 24 * count:
            raise ParseError("RTCP receiver report truncated")
        reports, extension = _parse_report_blocks(body, 4, count)
        return cls(ssrc=_UINT32.unpack_from(body)[0], reports=reports, profile_extension=extension)

    def serialize(self) -> bytes:
        _check_report_count(self.reports)
        blocks = b"".join(block.serialize() for block in self.reports)
        return _packet(
            PT_RECEIVER_REPORT,
            len(self.reports),
            _UINT32.pack(self.ssrc) + blocks + self.profile_extension,
        )

    __bytes__ = serialize


@dataclass(slots=True, kw_only=True)
class SdesChunk:
    """One source's SDES items as ``(item type, value)`` pairs (RFC 3550 §6.5)."""

    ssrc: int
    items: list[tuple[int, bytes]] = field(default_factory=list)

    def item(self, item_type: int) -> bytes | None:
        for candidate, value in self.items:
            if candidate == item_type:
                return value
        return None


@dataclass(slots=True, kw_only=True)
class SourceDescription:
    """RFC 3550 §6.5: chunks of items, each chunk ended by a null item and word-padded."""

    chunks: list[SdesChunk] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> SourceDescription:
        return _parse_single(data, cls)

    @classmethod
    def _from_body(cls, count: int, body: memoryview) -> SourceDescription:
        chunks = []
        size = len(body)
        offset = 0
        for _ in range(count):
            if offset + 4 > size:
                raise ParseError("RTCP SDES chunk truncated")
            chunk = SdesChunk(ssrc=_UINT32.unpack_from(body, offset)[0])
            offset += 4
            while True:
                if offset >= size:
                    raise ParseError("RTCP SDES chunk lacks its terminating null item")
                item_type = body[offset]
                if item_type == SDES_END:
                    # The null item and the padding after it run to the next word.
                    offset += 4 - offset % 4
                    break
                if offset + 2 > size:
                    raise ParseError("RTCP SDES item truncated")
                value_length = body[offset + 1]
                start = offset + 2
                offset = start + value_length
                if offset > size:
                    raise ParseError("RTCP SDES item value runs past the packet")
                chunk.items.append((item_type, bytes(body[start:offset])))
            chunks.append(chunk)
        return cls(chunks=chunks)

    def serialize(self) -> bytes:
        parts = []
        for chunk in self.chunks:
            encoded = bytearray(_UINT32.pack(chunk.ssrc))
            for item_type, value in chunk.items:
                if not 1 <= item_type <= 255 or len(value) > 255:
                    raise ValueError(f"SDES item {item_type} of {len(value)} bytes is invalid")
                encoded += bytes((item_type, len(value))) + value
            # At least one null octet, then up to the next word (RFC 3550 §6.5).
            encoded += bytes(4 - len(encoded) % 4)
            parts.append(bytes(encoded))
        return _packet(PT_SOURCE_DESCRIPTION, len(self.chunks), b"".join(parts))

    __bytes__ = serialize


@dataclass(slots=True, kw_only=True)
class Goodbye:
    """BYE, RFC 3550 §6.6: the sources leaving and an optional reason."""

    ssrcs: list[int] = field(default_factory=list)
    reason: bytes = b""

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Goodbye:
        return _parse_single(data, cls)

    @classmethod
    def _from_body(cls, count: int, body: memoryview) -> Goodbye:
        offset = 4 * count
        if offset > len(body):
            raise ParseError("RTCP BYE truncated inside its SSRC list")
        ssrcs = list(struct.unpack_from(f"!{count}I", body))
        reason = b""
        if offset < len(body):
            reason_length = body[offset]
            if offset + 1 + reason_length > len(body):
                raise ParseError("RTCP BYE reason runs past the packet")
            reason = bytes(body[offset + 1 : offset + 1 + reason_length])
        return cls(ssrcs=ssrcs, reason=reason)

    def serialize(self) -> bytes:
        if len(self.reason) > 255:
            raise ValueError("a BYE reason is at most 255 bytes")
        body = struct.pack(f"!{len(self.ssrcs)}I", *self.ssrcs)
        if self.reason:
            reason = bytes((len(self.reason),)) + self.reason
            body += reason + bytes(-len(reason) % 4)
        return _packet(PT_GOODBYE, len(self.ssrcs), body)

    __bytes__ = serialize


def _feedback_ssrcs(body: memoryview, name: str) -> tuple[int, int]:
    # RFC 4585 §6.1: every feedback message starts with sender and media source SSRC.
    if len(body) < 8:
        raise ParseError(f"RTCP {name} truncated before its SSRCs")
    sender_ssrc, media_ssrc = _SSRC_PAIR.unpack_from(body)
    return sender_ssrc, media_ssrc


@dataclass(slots=True, kw_only=True)
class GenericNack:
    """RFC 4585 §6.2.1: lost packets as (PID, BLP) pairs.

    PID is a lost sequence number; bit i of the bitmask BLP (least significant first)
    marks PID + i + 1 lost as well.
    """

    sender_ssrc: int
    media_ssrc: int
    items: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> GenericNack:
        return _parse_single(data, cls)

    @classmethod
    def _from_body(cls, count: int, body: memoryview) -> GenericNack:
        sender_ssrc, media_ssrc = _feedback_ssrcs(body, "NACK")
        if len(body) % 4:
            raise ParseError("RTCP NACK FCI is not a whole number of words")
        items = [_NACK_ITEM.unpack_from(body, offset) for offset in range(8, len(body), 4)]
        return cls(sender_ssrc=sender_ssrc, media_ssrc=media_ssrc, items=items)

    def lost_sequence_numbers(self) -> list[int]:
        """Every sequence number the NACK reports lost, in FCI order."""
        lost = []
        for pid, bitmask in self.items:
            lost.append(pid)
            for bit in range(16):
                if bitmask >> bit & 1:
                    lost.append((pid + bit + 1) & 0xFFFF)
        return lost

    @classmethod
    def from_sequence_numbers(
        cls, *, sender_ssrc: int, media_ssrc: int, sequence_numbers: Iterable[int]
    ) -> GenericNack:
        """The compact (PID, BLP) form of a set of lost sequence numbers.

        Numbers are ordered around the 16-bit circle starting after the widest gap, so a
        loss burst across 65535 -> 0 still packs into one item.
        """
        ordered = sorted({number & 0xFFFF for number in sequence_numbers})
        if len(ordered) > 1:
            gaps = [
                ((ordered[(index + 1) % len(ordered)] - ordered[index]) & 0xFFFF, index)
                for index in range(len(ordered))
            ]
            _, widest = max(gaps)
            start = (widest + 1) % len(ordered)
            ordered = ordered[start:] + ordered[:start]
        items: list[tuple[int, int]] = []
        for number in ordered:
            if items:
                pid, bitmask = items[-1]
                offset = (number - pid) & 0xFFFF
                if 1 <= offset <= 16:
                    items[-1] = (pid, bitmask | 1 << (offset - 1))
                    continue
            items.append((number, 0))
        return cls(sender_ssrc=sender_ssrc, media_ssrc=media_ssrc, items=items)

    def serialize(self) -> bytes:
        body = _SSRC_PAIR.pack(self.sender_ssrc, self.media_ssrc) + b"".join(
            _NACK_ITEM.pack(pid, bitmask) for pid, bitmask in self.items
        )
        return _packet(PT_TRANSPORT_FEEDBACK, FMT_GENERIC_NACK, body)

    __bytes__ = serialize


@dataclass(slots=True, kw_only=True)
class TransportWideFeedback:
    """Transport-wide congestion control feedback, recognised but kept undecoded."""

    sender_ssrc: int
    media_ssrc: int
    feedback: bytes = b""

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> TransportWideFeedback:
        return _parse_single(data, cls)

    @classmethod
    def _from_body(cls, count: int, body: memoryview) -> TransportWideFeedback:
        sender_ssrc, media_ssrc = _feedback_ssrcs(body, "transport-wide feedback")
        return cls(sender_ssrc=sender_ssrc, media_ssrc=media_ssrc, feedback=bytes(body[8:]))

    def serialize(self) -> bytes:
        body = _SSRC_PAIR.pack(self.sender_ssrc, self.media_ssrc) + self.feedback
        return _packet(PT_TRANSPORT_FEEDBACK, FMT_TRANSPORT_WIDE_CC, body)

    __bytes__ = serialize


# draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1.1-§3.1.5.
TWCC_NOT_RECEIVED = 0
TWCC_SMALL_DELTA = 1  # received, 1-byte unsigned delta (0 .. 63.75 ms)
TWCC_LARGE_DELTA = 2  # received, 2-byte signed delta (-8192 .. 8191.75 ms)
TWCC_DELTA_TICK = 0.000250  # seconds per receive-delta unit (§3.1.5)
TWCC_REFERENCE_TICK = 0.064  # seconds per reference-time unit (§3.1)
TWCC_REFERENCE_MOD = 1 << 24
_TWCC_MAX_RUN = (1 << 13) - 1
_TWCC_HEADER = struct.Struct("!HHI")  # base sequence, status count, reference time + fb count
_INT16 = struct.Struct("!h")


@dataclass(slots=True, kw_only=True)
class TransportFeedback:
    """A decoded transport-wide congestion control feedback packet (RTPFB FMT 15,
    draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1).

    ``deltas[i]`` is for transport-wide sequence number ``base_sequence + i`` (mod
    2^16): None if not received, else its arrival time minus the previous received
    packet's, in 250 µs ticks (the first one's relative to ``reference_time``, a signed
    24-bit count of 64 ms). Packet status chunks are derived on ``serialize``: run
    length chunks for runs (§3.1.3), status vectors otherwise (§3.1.4).
    """

    sender_ssrc: int
    media_ssrc: int
    base_sequence: int
    reference_time: int
    feedback_count: int
    deltas: list[int | None] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> TransportFeedback:
        """Decode a single transport-wide feedback packet (e.g. ``bytes`` of a
        ``TransportWideFeedback`` from ``parse_compound``)."""
        return cls.from_packet(TransportWideFeedback.parse(data))

    @classmethod
    def from_packet(cls, packet: TransportWideFeedback) -> TransportFeedback:
        fci = memoryview(packet.feedback)
        if len(fci) < _TWCC_HEADER.size:
            raise ParseError("transport-wide feedback truncated before its packet chunks")
        base, count, word = _TWCC_HEADER.unpack_from(fci)
        symbols: list[int] = []
        offset = _TWCC_HEADER.size
        while len(symbols) < count:
            if offset + 2 > len(fci):
                raise ParseError("transport-wide feedback has fewer chunks than its status count")
            chunk = fci[offset] << 8 | fci[offset + 1]
            offset += 2
            if not chunk & 0x8000:  # run length chunk: T=0, S (2 bits), length (13 bits)
                symbols.extend([chunk >> 13 & 0x3] * (chunk & _TWCC_MAX_RUN))
            elif chunk & 0x4000:  # status vector, seven 2-bit symbols
                symbols.extend(chunk >> shift & 0x3 for shift in range(12, -1, -2))
            else:  # status vector, fourteen 1-bit symbols
                symbols.extend(chunk >> shift & 0x1 for shift in range(13, -1, -1))
        del symbols[count:]  # a last vector's symbols past the count are padding
        deltas: list[int | None] = []
        for symbol in symbols:
            if symbol == TWCC_NOT_RECEIVED:
                deltas.append(None)
            elif symbol == TWCC_SMALL_DELTA:
                if offset + 1 > len(fci):
                    raise ParseError("transport-wide feedback truncated in its deltas")
                deltas.append(fci[offset])
                offset += 1
            elif symbol == TWCC_LARGE_DELTA:
                if offset + 2 > len(fci):
                    raise ParseError("transport-wide feedback truncated in its deltas")
                deltas.append(_INT16.unpack_from(fci, offset)[0])
                offset += 2
            else:
                raise ParseError("transport-wide feedback uses the reserved status symbol 11")
        reference = word >> 8
        if reference & 0x800000:
            reference -= TWCC_REFERENCE_MOD
        return cls(
            sender_ssrc=packet.sender_ssrc,
            media_ssrc=packet.media_ssrc,
            base_sequence=base,
            reference_time=reference,
            feedback_count=word & 0xFF,
            deltas=deltas,
        )

    @classmethod
    def from_arrivals(
        cls,
        *,
        sender_ssrc: int,
        media_ssrc: int,
        base_sequence: int,
        feedback_count: int,
        arrivals: Sequence[float | None],
    ) -> TransportFeedback:
        """Feedback for packets ``base_sequence``, ``base_sequence + 1``, ... that
        arrived at ``arrivals`` (seconds on the receiver's clock; None: lost). Each delta
        is taken from the previous *encoded* time, so rounding never accumulates.
        Raises ValueError when a gap between arrivals exceeds a large delta (the caller
        starts a new packet there)."""
        first = next((t for t in arrivals if t is not None), None)
        if first is None:
            raise ValueError("transport-wide feedback needs at least one received packet")
        reference = math.floor(first / TWCC_REFERENCE_TICK)
        previous = round(reference * TWCC_REFERENCE_TICK / TWCC_DELTA_TICK)
        deltas: list[int | None] = []
        for arrival in arrivals:
            if arrival is None:
                deltas.append(None)
                continue
            ticks = round(arrival / TWCC_DELTA_TICK)
            delta = ticks - previous
            if not -0x8000 <= delta <= 0x7FFF:
                raise ValueError(f"receive delta of {delta} ticks does not fit 16 bits")
            deltas.append(delta)
            previous = ticks
        return cls(
            sender_ssrc=sender_ssrc,
            media_ssrc=media_ssrc,
            base_sequence=base_sequence & 0xFFFF,
            reference_time=reference % TWCC_REFERENCE_MOD,
            feedback_count=feedback_count & 0xFF,
            deltas=deltas,
        )

    def arrivals(self) -> list[tuple[int, float | None]]:
        """(sequence number, arrival time in seconds from the reference clock's zero)
        for every packet the feedback covers; None for those not received."""
        ticks = round(self.reference_time * TWCC_REFERENCE_TICK / TWCC_DELTA_TICK)
        out: list[tuple[int, float | None]] = []
        for index, delta in enumerate(self.deltas):
            sequence = (self.base_sequence + index) & 0xFFFF
            if delta is None:
                out.append((sequence, None))
            else:
                ticks += delta
                out.append((sequence, ticks * TWCC_DELTA_TICK))
        return out

    def symbols(self) -> list[int]:
        return [
            TWCC_NOT_RECEIVED
            if delta is None
            else TWCC_SMALL_DELTA
            if 0 <= delta <= 0xFF
            else TWCC_LARGE_DELTA
            for delta in self.deltas
        ]

    def serialize(self) -> bytes:
        if not 1 <= len(self.deltas) <= 0xFFFF:
            raise ValueError("transport-wide feedback covers 1 to 65535 packets")
        symbols = self.symbols()
        chunks = bytearray()
        index = 0
        while index < len(symbols):
            symbol = symbols[index]
            run = 1
            while (
                index + run < len(symbols)
                and symbols[index + run] == symbol
                and run < _TWCC_MAX_RUN
            ):
                run += 1
            ahead = symbols[index : index + 14]
            # As libwebrtc does: a run to the end is one run chunk, a mixed tail of up to
            # seven symbols one 2-bit vector.
            if run >= 14 or index + run == len(symbols) or (run >= 7 and TWCC_LARGE_DELTA in ahead):
                chunks += (symbol << 13 | run).to_bytes(2, "big")
                index += run
            elif TWCC_LARGE_DELTA not in ahead and len(ahead) > 7:
                bits = 0
                for position, each in enumerate(ahead):
                    bits |= each << (13 - position)
                chunks += (0x8000 | bits).to_bytes(2, "big")
                index += 14
            else:
                bits = 0
                for position, each in enumerate(symbols[index : index + 7]):
                    bits |= each << (12 - 2 * position)
                chunks += (0xC000 | bits).to_bytes(2, "big")
                index += 7
        deltas = bytearray()
        for delta in self.deltas:
            if delta is None:
                continue
            if 0 <= delta <= 0xFF:
                deltas.append(delta)
            else:
                deltas += _INT16.pack(delta)
        fci = (
            _TWCC_HEADER.pack(
                self.base_sequence & 0xFFFF,
                len(self.deltas),
                (self.reference_time % TWCC_REFERENCE_MOD) << 8 | self.feedback_count & 0xFF,
            )
            + bytes(chunks)
            + bytes(deltas)
        )
        # Padded to a word with the RTCP P bit and a count (RFC 3550 §6.4.1), as Chromium
        # sends it; parsers of the draft's zero padding read it the same.
        return TransportWideFeedback(
            sender_ssrc=self.sender_ssrc, media_ssrc=self.media_ssrc, feedback=fci
        ).serialize()

    __bytes__ = serialize


@dataclass(slots=True, kw_only=True)
class PictureLossIndication:
    """PLI, RFC 4585 §6.3.1: no FCI, the media SSRC names the stream to refresh."""

    sender_ssrc: int
    media_ssrc: int

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> PictureLossIndication:
        return _parse_single(data, cls)

    @classmethod
    def _from_body(cls, count: int, body: memoryview) -> PictureLossIndication:
        sender_ssrc, media_ssrc = _feedback_ssrcs(body, "PLI")
        return cls(sender_ssrc=sender_ssrc, media_ssrc=media_ssrc)

    def serialize(self) -> bytes:
        return _packet(
            PT_PAYLOAD_FEEDBACK,
            FMT_PICTURE_LOSS,
            _SSRC_PAIR.pack(self.sender_ssrc, self.media_ssrc),
        )

    __bytes__ = serialize


@dataclass(slots=True, kw_only=True)
class FirEntry:
    """One FIR FCI entry: the stream to refresh and a command sequence number."""

    ssrc: int
    sequence_number: int


@dataclass(slots=True, kw_only=True)
class FullIntraRequest:
    """FIR, RFC 5104 §4.3.1; the media SSRC field is 0, targets are in the entries."""

    sender_ssrc: int
    media_ssrc: int = 0
    entries: list[FirEntry] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> FullIntraRequest:
        return _parse_single(data, cls)

    @classmethod
    def _from_body(cls, count: int, body: memoryview) -> FullIntraRequest:
        sender_ssrc, media_ssrc = _feedback_ssrcs(body, "FIR")
        if (len(body) - 8) % 8:
            raise ParseError("RTCP FIR FCI is not a whole number of 8-byte entries")
        entries = [
            FirEntry(ssrc=ssrc, sequence_number=sequence_number)
            for ssrc, sequence_number in (
                _FIR_ENTRY.unpack_from(body, offset) for offset in range(8, len(body), 8)
            )
        ]
        return cls(sender_ssrc=sender_ssrc, media_ssrc=media_ssrc, entries=entries)

    def serialize(self) -> bytes:
        body = _SSRC_PAIR.pack(self.sender_ssrc, self.media_ssrc) + b"".join(
            _FIR_ENTRY.pack(entry.ssrc, entry.sequence_number) for entry in self.entries
        )
        return _packet(PT_PAYLOAD_FEEDBACK, FMT_FULL_INTRA_REQUEST, body)

    __bytes__ = serialize


_REMB_MANTISSA_BITS = 18
_REMB_MAX_MANTISSA = (1 << _REMB_MANTISSA_BITS) - 1
_REMB_MAX_EXPONENT = 63


@dataclass(slots=True, kw_only=True)
class ReceiverEstimatedMaxBitrate:
    """REMB, draft-alvestrand-rmcat-remb-03 §2.2: an application-layer PSFB message.

    ::

        |  Unique identifier 'R' 'E' 'M' 'B'                            |
        |  Num SSRC     | BR Exp    |  BR Mantissa                      |
        |   SSRC feedback ...                                           |

    The bitrate (bits/s) is mantissa * 2**exp; serialize() rounds it down to the
    nearest value with an 18-bit mantissa. The media SSRC field is always 0.
    """

    sender_ssrc: int
    bitrate: int
    ssrcs: list[int] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> ReceiverEstimatedMaxBitrate:
        return _parse_single(data, cls)

    @classmethod
    def _from_body(cls, count: int, body: memoryview) -> ReceiverEstimatedMaxBitrate:
        sender_ssrc, _ = _feedback_ssrcs(body, "REMB")
        if len(body) < 16 or body[8:12] != _REMB_IDENTIFIER:
            raise ParseError("RTCP application-layer feedback is not a REMB")
        word = _UINT32.unpack_from(body, 12)[0]
        ssrc_count = word >> 24
        if len(body) < 16 + 4 * ssrc_count:
            raise ParseError("RTCP REMB truncated inside its SSRC list")
        exponent = (word >> _REMB_MANTISSA_BITS) & 0x3F
        mantissa = word & _REMB_MAX_MANTISSA
        return cls(
            sender_ssrc=sender_ssrc,
            bitrate=mantissa << exponent,
            ssrcs=list(struct.unpack_from(f"!{ssrc_count}I", body, 16)),
        )

    def serialize(self) -> bytes:
        if self.bitrate < 0:
            raise ValueError("a REMB bitrate is not negative")
        if len(self.ssrcs) > 255:
            raise ValueError("a REMB lists at most 255 SSRCs")
        exponent = max(0, self.bitrate.bit_length() - _REMB_MANTISSA_BITS)
        if exponent > _REMB_MAX_EXPONENT:
            raise ValueError(f"bitrate {self.bitrate} exceeds what REMB can express")
        mantissa = self.bitrate >> exponent
        body = (
            _SSRC_PAIR.pack(self.sender_ssrc, 0)
            + _REMB_IDENTIFIER
            + _UINT32.pack(len(self.ssrcs) << 24 | exponent << _REMB_MANTISSA_BITS | mantissa)
            + struct.pack(f"!{len(self.ssrcs)}I", *self.ssrcs)
        )
        return _packet(PT_PAYLOAD_FEEDBACK, FMT_APPLICATION_LAYER, body)

    __bytes__ = serialize


@dataclass(slots=True, kw_only=True)
class RawRtcpPacket:
    """Any RTCP packet not decoded here (APP, XR, SLI, other feedback), body as-is."""

    packet_type: int
    count: int
    body: bytes = b""

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> RawRtcpPacket:
        return _parse_single(data, cls)

    def serialize(self) -> bytes:
        return _packet(self.packet_type, self.count, self.body)

    __bytes__ = serialize


RtcpPacket = (
    SenderReport
    | ReceiverReport
    | SourceDescription
    | Goodbye
    | GenericNack
    | TransportWideFeedback
    | PictureLossIndication
    | FullIntraRequest
    | ReceiverEstimatedMaxBitrate
    | RawRtcpPacket
)


def _decode(packet_type: int, count: int, body: memoryview) -> RtcpPacket:
    if packet_type == PT_SENDER_REPORT:
        return SenderReport._from_body(count, body)
    if packet_type == PT_RECEIVER_REPORT:
        return ReceiverReport._from_body(count, body)
    if packet_type == PT_TRANSPORT_FEEDBACK:
        if count == FMT_GENERIC_NACK:
            return GenericNack._from_body(count, body)
        if count == FMT_TRANSPORT_WIDE_CC:
            return TransportWideFeedback._from_body(count, body)
    elif packet_type == PT_PAYLOAD_FEEDBACK:
        if count == FMT_PICTURE_LOSS:
            return PictureLossIndication._from_body(count, body)
        if count == FMT_FULL_INTRA_REQUEST:
            return FullIntraRequest._from_body(count, body)
        if count == FMT_APPLICATION_LAYER and body[8:12] == _REMB_IDENTIFIER:
            return ReceiverEstimatedMaxBitrate._from_body(count, body)
    elif packet_type == PT_SOURCE_DESCRIPTION:
        return SourceDescription._from_body(count, body)
    elif packet_type == PT_GOODBYE:
        return Goodbye._from_body(count, body)
    return RawRtcpPacket(packet_type=packet_type, count=count, body=bytes(body))


def parse_compound(data: bytes | bytearray | memoryview) -> list[RtcpPacket]:
    """Every packet of a compound RTCP packet, walking the length fields (RFC 3550 §6.1).

    Padding (P bit, RFC 3550 §6.4.1) is honoured on any packet, not only the last, and
    reduced-size RTCP (RFC 5506: a lone feedback message) is accepted.
    """
    view = memoryview(data)
    size = len(view)
    if size < 4:
        raise ParseError(f"RTCP packet of {size} bytes is shorter than its header")
    packets: list[RtcpPacket] = []
    offset = 0
    while offset < size:
        if offset + 4 > size:
            raise ParseError("RTCP compound packet has trailing bytes")
        first, packet_type, words = _HEADER.unpack_from(view, offset)
        if first >> 6 != RTCP_VERSION:
            raise ParseError(f"RTCP version {first >> 6}, expected 2")
        end = offset + 4 * (words + 1)
        if end > size:
            raise ParseError("RTCP length field runs past the end of the datagram")
        body_end = end
        if first & 0x20:
            padding = view[end - 1]
            if padding == 0 or offset + 4 + padding > end:
                raise ParseError(f"RTCP padding count {padding} is invalid")
            body_end -= padding
        packets.append(_decode(packet_type, first & 0x1F, view[offset + 4 : body_end]))
        offset = end
    return packets


_Packet = TypeVar("_Packet")


def _parse_single(data: bytes | bytearray | memoryview, kind: type[_Packet]) -> _Packet:
    packets = parse_compound(data)
    if len(packets) != 1 or not isinstance(packets[0], kind):
        raise ParseError(f"not a single RTCP {kind.__name__}")
    return packets[0]


def serialize_compound(packets: Iterable[RtcpPacket]) -> bytes:
    """Concatenate packets into one compound RTCP packet (RFC 3550 §6.1)."""
    return b"".join(packet.serialize() for packet in packets)


def unix_to_ntp(unix_seconds: float) -> int:
    """64-bit NTP timestamp (RFC 5905 §6) for a Unix time; wraps into era 1 after 2036."""
    seconds = math.floor(unix_seconds)
    fraction = int((unix_seconds - seconds) * _TWO_32)
    return (((seconds + NTP_UNIX_EPOCH_OFFSET) % _TWO_32) << 32) | fraction


def ntp_to_unix(ntp_timestamp: int) -> float:
    """Unix time of a 64-bit NTP timestamp.

    RFC 4330 §3: a seconds field with its top bit clear is read as era 1 (from 2036-02-07),
    which keeps the conversion right for 1968..2104.
    """
    seconds = ntp_timestamp >> 32
    if not seconds & 0x80000000:
        seconds += _TWO_32
    return seconds - NTP_UNIX_EPOCH_OFFSET + (ntp_timestamp & 0xFFFFFFFF) / _TWO_32


def ntp_middle_32(ntp_timestamp: int) -> int:
    """The middle 32 bits of an NTP time, as echoed in LSR (RFC 3550 §6.4.1)."""
    return (ntp_timestamp >> 16) & 0xFFFFFFFF


def round_trip_time(
    *, arrival_ntp: int, last_sender_report: int, delay_since_last_sender_report: int
) -> float | None:
    """Round-trip time in seconds from a report block (RFC 3550 §6.4.1: A - LSR - DLSR).

    ``arrival_ntp`` is the 64-bit NTP time the report arrived; None when the peer has
    not received a sender report yet (LSR 0).
    """
    if last_sender_report == 0:
        return None
    units = (
        ntp_middle_32(arrival_ntp) - last_sender_report - delay_since_last_sender_report
    ) & 0xFFFFFFFF
    # A negative result (clock skew, reordering) wraps to a huge value: report 0.
    if units & 0x80000000:
        return 0.0
    return units / 65536
