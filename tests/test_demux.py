"""First-byte demultiplexing (RFC 7983 §7, RFC 9443 §3) and RTP/RTCP split (RFC 5761 §4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whepfan.protocol.demux import PacketKind, classify, classify_datagram, is_rtcp
from whepfan.protocol.rtcp import PictureLossIndication, ReceiverReport
from whepfan.protocol.rtp import RtpPacket

# RFC 7983 §7 decision table, written out range by range.
RFC_7983_TABLE = [
    (range(0, 4), PacketKind.STUN),
    (range(4, 16), PacketKind.UNKNOWN),
    (range(16, 20), PacketKind.ZRTP),
    (range(20, 64), PacketKind.DTLS),
    (range(64, 80), PacketKind.TURN_CHANNEL),
    (range(80, 128), PacketKind.UNKNOWN),  # QUIC short header under RFC 9443: not ours
    (range(128, 192), PacketKind.RTP_OR_RTCP),
    (range(192, 256), PacketKind.UNKNOWN),  # QUIC long header under RFC 9443: not ours
]


@pytest.mark.parametrize(("values", "kind"), RFC_7983_TABLE)
def test_every_first_byte_in_range_maps_to_its_protocol(values: range, kind: PacketKind) -> None:
    for value in values:
        assert classify(value) is kind
        assert classify_datagram(bytes((value, 0, 0, 0))) is kind


def test_boundaries_of_each_range() -> None:
    assert classify(3) is PacketKind.STUN
    assert classify(4) is PacketKind.UNKNOWN
    assert classify(19) is PacketKind.ZRTP
    assert classify(20) is PacketKind.DTLS
    assert classify(63) is PacketKind.DTLS
    assert classify(64) is PacketKind.TURN_CHANNEL
    assert classify(79) is PacketKind.TURN_CHANNEL
    assert classify(127) is PacketKind.UNKNOWN
    assert classify(128) is PacketKind.RTP_OR_RTCP
    assert classify(191) is PacketKind.RTP_OR_RTCP


def test_real_first_bytes() -> None:
    # A STUN Binding Request (RFC 8489 §5: type 0x0001) and a DTLS 1.2 ClientHello
    # record (content type 22, RFC 6347 §4.1).
    assert classify_datagram(bytes.fromhex("000100002112a442")) is PacketKind.STUN
    assert classify_datagram(bytes.fromhex("16fefd0000")) is PacketKind.DTLS
    # TURN ChannelData for channel 0x4000 (RFC 8656 §12.4).
    assert classify_datagram(bytes.fromhex("40000004deadbeef")) is PacketKind.TURN_CHANNEL


def test_empty_datagram_is_unknown() -> None:
    assert classify_datagram(b"") is PacketKind.UNKNOWN


def test_classify_rejects_values_outside_a_byte() -> None:
    with pytest.raises(ValueError):
        classify(256)
    with pytest.raises(ValueError):
        classify(-1)


def test_rtcp_and_rtp_are_told_apart() -> None:
    pli = PictureLossIndication(sender_ssrc=1, media_ssrc=2).serialize()
    rr = ReceiverReport(ssrc=1).serialize()
    video = RtpPacket(payload_type=96, sequence_number=1, timestamp=0, ssrc=5, marker=True)
    audio = RtpPacket(payload_type=111, sequence_number=1, timestamp=0, ssrc=5)
    assert is_rtcp(pli)
    assert is_rtcp(rr)
    assert not is_rtcp(video.serialize())
    assert not is_rtcp(audio.serialize())
    assert not is_rtcp(b"\x80")


@given(packet_type=st.integers(192, 223), first=st.integers(128, 191))
def test_every_rtcp_packet_type_is_rtcp(packet_type: int, first: int) -> None:
    assert is_rtcp(bytes((first, packet_type, 0, 1)))


@given(
    payload_type=st.integers(0, 127).filter(lambda pt: not 64 <= pt <= 95),
    marker=st.booleans(),
)
def test_rtp_payload_types_allowed_by_rfc_5761_are_rtp(payload_type: int, marker: bool) -> None:
    packet = RtpPacket(
        payload_type=payload_type, sequence_number=0, timestamp=0, ssrc=0, marker=marker
    )
    assert not is_rtcp(packet.serialize())


@given(st.binary(max_size=8))
def test_classify_datagram_never_raises(data: bytes) -> None:
    assert isinstance(classify_datagram(data), PacketKind)
    assert isinstance(is_rtcp(data), bool)
