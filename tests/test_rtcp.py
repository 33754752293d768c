"""RTCP packets: RFC 3550 §6 reports, RFC 4585 / RFC 5104 feedback, REMB, NTP time."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from aiortc import rtp as aiortc_rtp
from hypothesis import given
from hypothesis import strategies as st

from whepfan.errors import ParseError
from whepfan.protocol.rtcp import (
    NTP_UNIX_EPOCH_OFFSET,
    SDES_CNAME,
    FirEntry,
    FullIntraRequest,
    GenericNack,
    Goodbye,
    PictureLossIndication,
    RawRtcpPacket,
    ReceiverEstimatedMaxBitrate,
    ReceiverReport,
    ReportBlock,
    RtcpPacket,
    SdesChunk,
    SenderReport,
    SourceDescription,
    TransportWideFeedback,
    ntp_middle_32,
    ntp_to_unix,
    parse_compound,
    round_trip_time,
    serialize_compound,
    unix_to_ntp,
)

# RFC 3550 §6.4.1 layout: SR with one report block, 13 words.
SENDER_REPORT = bytes.fromhex(
    "81c8000c"  # V=2 P=0 RC=1, PT=200, length 12
    "12345678"  # SSRC of sender
    "e1a2b3c480000000"  # NTP timestamp: 0xe1a2b3c4.5 seconds
    "00015f90"  # RTP timestamp 90000
    "00000064"  # sender's packet count 100
    "0000fa00"  # sender's octet count 64000
    "9abcdef0"  # SSRC_1
    "40fffffe"  # fraction lost 64/256, cumulative lost -2 (signed 24 bits)
    "00010010"  # extended highest sequence: cycle 1, seq 16
    "00000020"  # interarrival jitter 32
    "b3c48000"  # LSR: middle 32 bits of an NTP time
    "00010000"  # DLSR: 1 s in 1/65536 s units
)
# RFC 3550 §6.4.2: an RR without report blocks (what a receive-only peer sends first).
EMPTY_RECEIVER_REPORT = bytes.fromhex("80c9000112345678")
# RFC 3550 §6.5: one chunk, CNAME of 16 bytes, then two nulls to reach the word.
SDES_CNAME_PACKET = bytes.fromhex("81ca0006123456780110") + b"abcdefghijklmnop" + b"\0\0"
# RFC 3550 §6.6: BYE for one source with reason "done", reason padded to the word.
GOODBYE_PACKET = bytes.fromhex("81cb00031234567804") + b"done" + b"\0\0\0"
# RFC 4585 §6.2.1: PID 1000 and BLP 0b101 report 1000, 1001 and 1003 lost.
NACK_PACKET = bytes.fromhex("81cd0003000000011234567803e80005")
# RFC 4585 §6.3.1: a PLI is the common feedback header only.
PLI_PACKET = bytes.fromhex("81ce00020000000112345678")
# RFC 5104 §4.3.1: FIR, media SSRC 0, one entry (SSRC, seq nr 7, 24 reserved bits).
FIR_PACKET = bytes.fromhex("84ce000400000001000000001234567807000000")
# draft-alvestrand-rmcat-remb-03 §2.2: 'REMB', 1 SSRC, exp 2 mantissa 250000 = 1 Mbit/s.
REMB_PACKET = bytes.fromhex("8fce0005000000010000000052454d42010bd09012345678")
TRANSPORT_WIDE_PACKET = bytes.fromhex("8fcd00050000000112345678000100020000010020020000")


def test_sender_report_layout() -> None:
    report = SenderReport.parse(SENDER_REPORT)
    assert report.ssrc == 0x12345678
    assert report.ntp_timestamp == 0xE1A2B3C480000000
    assert report.rtp_timestamp == 90000
    assert report.packet_count == 100
    assert report.octet_count == 64000
    assert report.reports == [
        ReportBlock(
            ssrc=0x9ABCDEF0,
            fraction_lost=64,
            cumulative_lost=-2,
            highest_sequence=0x10010,
            jitter=32,
            last_sender_report=0xB3C48000,
            delay_since_last_sender_report=0x10000,
        )
    ]
    assert report.serialize() == SENDER_REPORT


def test_receiver_report_without_blocks() -> None:
    report = ReceiverReport.parse(EMPTY_RECEIVER_REPORT)
    assert report == ReceiverReport(ssrc=0x12345678)
    assert bytes(report) == EMPTY_RECEIVER_REPORT


def test_source_description_cname() -> None:
    sdes = SourceDescription.parse(SDES_CNAME_PACKET)
    assert sdes.chunks == [SdesChunk(ssrc=0x12345678, items=[(SDES_CNAME, b"abcdefghijklmnop")])]
    assert sdes.chunks[0].item(SDES_CNAME) == b"abcdefghijklmnop"
    assert sdes.chunks[0].item(2) is None
    assert sdes.serialize() == SDES_CNAME_PACKET


def test_source_description_pads_every_chunk_to_a_word() -> None:
    # RFC 3550 §6.5: each chunk starts on a word; a chunk already word-aligned after its
    # items still needs a whole word of nulls to terminate it.
    sdes = SourceDescription(
        chunks=[
            SdesChunk(ssrc=1, items=[(SDES_CNAME, b"ab")]),  # 4 + 4: one null word follows
            SdesChunk(ssrc=2, items=[(SDES_CNAME, b"abc")]),  # 4 + 5: three nulls
        ]
    )
    data = sdes.serialize()
    assert data == bytes.fromhex("82ca0006000000010102616200000000000000020103616263000000")
    assert SourceDescription.parse(data) == sdes


def test_goodbye_with_reason() -> None:
    bye = Goodbye.parse(GOODBYE_PACKET)
    assert bye == Goodbye(ssrcs=[0x12345678], reason=b"done")
    assert bye.serialize() == GOODBYE_PACKET
    assert Goodbye.parse(bytes.fromhex("81cb000100000009")) == Goodbye(ssrcs=[9])


def test_generic_nack_rfc_4585_example() -> None:
    nack = GenericNack.parse(NACK_PACKET)
    assert nack.sender_ssrc == 1
    assert nack.media_ssrc == 0x12345678
    assert nack.items == [(1000, 0b101)]
    assert nack.lost_sequence_numbers() == [1000, 1001, 1003]
    assert nack.serialize() == NACK_PACKET
    built = GenericNack.from_sequence_numbers(
        sender_ssrc=1, media_ssrc=0x12345678, sequence_numbers=[1003, 1000, 1001]
    )
    assert built.serialize() == NACK_PACKET


def test_nack_compact_form_across_the_wrap_and_gaps() -> None:
    nack = GenericNack.from_sequence_numbers(
        sender_ssrc=1, media_ssrc=2, sequence_numbers=[0, 65534, 1, 65535, 65535]
    )
    assert nack.items == [(65534, 0b111)]
    assert nack.lost_sequence_numbers() == [65534, 65535, 0, 1]
    spread = GenericNack.from_sequence_numbers(
        sender_ssrc=1, media_ssrc=2, sequence_numbers=[10, 26, 27, 500]
    )
    # 26 is PID+16, the last bit of BLP; 27 needs a new item.
    assert spread.items == [(10, 1 << 15), (27, 0), (500, 0)]
    assert (
        GenericNack.from_sequence_numbers(sender_ssrc=1, media_ssrc=2, sequence_numbers=[]).items
        == []
    )


def test_picture_loss_indication() -> None:
    pli = PictureLossIndication.parse(PLI_PACKET)
    assert pli == PictureLossIndication(sender_ssrc=1, media_ssrc=0x12345678)
    assert pli.serialize() == PLI_PACKET


def test_full_intra_request() -> None:
    fir = FullIntraRequest.parse(FIR_PACKET)
    assert fir == FullIntraRequest(
        sender_ssrc=1, entries=[FirEntry(ssrc=0x12345678, sequence_number=7)]
    )
    assert fir.serialize() == FIR_PACKET


def test_remb_example() -> None:
    remb = ReceiverEstimatedMaxBitrate.parse(REMB_PACKET)
    assert remb == ReceiverEstimatedMaxBitrate(sender_ssrc=1, bitrate=1_000_000, ssrcs=[0x12345678])
    assert remb.serialize() == REMB_PACKET
    assert aiortc_rtp.unpack_remb_fci(REMB_PACKET[12:]) == (1_000_000, [0x12345678])


def test_remb_rounds_down_to_an_18_bit_mantissa() -> None:
    bitrate = (1 << 18) + 3  # needs 19 bits: exponent 1, the low bit is lost
    remb = ReceiverEstimatedMaxBitrate(sender_ssrc=1, bitrate=bitrate)
    assert ReceiverEstimatedMaxBitrate.parse(remb.serialize()).bitrate == bitrate - 1
    with pytest.raises(ValueError):
        ReceiverEstimatedMaxBitrate(sender_ssrc=1, bitrate=1 << 90).serialize()


def test_transport_wide_feedback_is_kept_raw() -> None:
    packet = TransportWideFeedback.parse(TRANSPORT_WIDE_PACKET)
    assert packet.sender_ssrc == 1
    assert packet.media_ssrc == 0x12345678
    assert packet.feedback == TRANSPORT_WIDE_PACKET[12:]
    assert packet.serialize() == TRANSPORT_WIDE_PACKET


def test_unknown_packets_are_kept_raw() -> None:
    app = bytes.fromhex("80cc000212345678") + b"name"
    xr = bytes.fromhex("80cf000112345678")
    not_remb = bytes.fromhex("8fce0003000000010000000041424344")
    sli = bytes.fromhex("82ce0003000000010000000200000000")
    for data in (app, xr, not_remb, sli):
        (packet,) = parse_compound(data)
        assert isinstance(packet, RawRtcpPacket)
        assert packet.serialize() == data
    assert RawRtcpPacket.parse(app) == RawRtcpPacket(
        packet_type=204, count=0, body=bytes.fromhex("12345678") + b"name"
    )


def test_compound_packet_walk() -> None:
    compound = SENDER_REPORT + SDES_CNAME_PACKET + PLI_PACKET + NACK_PACKET + REMB_PACKET
    packets = parse_compound(compound)
    assert [type(packet) for packet in packets] == [
        SenderReport,
        SourceDescription,
        PictureLossIndication,
        GenericNack,
        ReceiverEstimatedMaxBitrate,
    ]
    assert serialize_compound(packets) == compound


def test_padding_on_the_last_packet() -> None:
    # RFC 3550 §6.4.1: P set, 4 bytes of padding counted by the last octet, in the length.
    padded_pli = bytes.fromhex("a1ce0003000000011234567800000004")
    packets = parse_compound(EMPTY_RECEIVER_REPORT + padded_pli)
    assert packets == [
        ReceiverReport(ssrc=0x12345678),
        PictureLossIndication(sender_ssrc=1, media_ssrc=0x12345678),
    ]


def test_unaligned_raw_body_is_padded() -> None:
    packet = RawRtcpPacket(packet_type=204, count=1, body=b"12345")
    data = packet.serialize()
    assert len(data) == 12 and data[0] & 0x20 and data[-1] == 3
    assert RawRtcpPacket.parse(data) == packet


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80\xc9\x00",
        bytes.fromhex("40c9000112345678"),  # version 1
        bytes.fromhex("80c9000212345678"),  # length past the end
        EMPTY_RECEIVER_REPORT + b"\x80\xc9",  # trailing bytes
        bytes.fromhex("a0c9000112345600"),  # padding count 0
        bytes.fromhex("a0c9000112345609"),  # padding larger than the packet
        bytes.fromhex("81c8000112345678"),  # SR shorter than its sender info
        bytes.fromhex("81c9000112345678"),  # RR promises a block it lacks
        bytes.fromhex("81ca000112345678"),  # SDES chunk without its null item
        bytes.fromhex("81ca00021234567801090000"),  # SDES item past the end
        bytes.fromhex("82cb000112345678"),  # BYE lists two SSRCs, carries one
        bytes.fromhex("81cb00021234567809000000"),  # BYE reason past the end
        bytes.fromhex("81cd000100000001"),  # NACK without media SSRC
        bytes.fromhex("a1cd0003000000010000000200000002"),  # NACK FCI not a word
        bytes.fromhex("84ce0003000000010000000012345678"),  # FIR entry cut short
        bytes.fromhex("8fce0004000000010000000052454d4202000001"),  # REMB SSRCs
    ],
)
def test_malformed_packets_raise_parse_error(data: bytes) -> None:
    with pytest.raises(ParseError):
        parse_compound(data)


def test_single_packet_parse_refuses_another_type() -> None:
    with pytest.raises(ParseError):
        SenderReport.parse(EMPTY_RECEIVER_REPORT)
    with pytest.raises(ParseError):
        PictureLossIndication.parse(PLI_PACKET + PLI_PACKET)


def test_ntp_conversions() -> None:
    # RFC 5905 §6: the Unix epoch is NTP second 2208988800; 2000-01-01 is 3155673600.
    assert unix_to_ntp(0.0) == NTP_UNIX_EPOCH_OFFSET << 32
    assert unix_to_ntp(946684800.5) == (3155673600 << 32) | 0x80000000
    assert ntp_to_unix((3155673600 << 32) | 0x40000000) == 946684800.25
    # Era 1 starts 2036-02-07T06:28:16Z, where the 32-bit seconds field wraps to 0.
    era_1_start = (1 << 32) - NTP_UNIX_EPOCH_OFFSET
    assert unix_to_ntp(era_1_start) == 0
    assert ntp_to_unix(0) == era_1_start
    assert ntp_middle_32(0x0123456789ABCDEF) == 0x456789AB


def test_round_trip_time_rfc_3550_example() -> None:
    # RFC 3550 §6.4.1 worked example: A = 0xb710:8000, LSR = 0xb705:2000,
    # DLSR = 0x0005:4000, so the delay is 0x0006:2000 = 6.125 seconds.
    assert (
        round_trip_time(
            arrival_ntp=0xB7108000 << 16,
            last_sender_report=0xB7052000,
            delay_since_last_sender_report=0x00054000,
        )
        == 6.125
    )
    assert (
        round_trip_time(arrival_ntp=1 << 48, last_sender_report=0, delay_since_last_sender_report=0)
        is None
    )
    # A report answering faster than physics allows (clock skew) is clamped to 0.
    assert (
        round_trip_time(
            arrival_ntp=0x10 << 16, last_sender_report=0x20, delay_since_last_sender_report=0
        )
        == 0.0
    )


uint32 = st.integers(0, 0xFFFFFFFF)
words = st.binary(max_size=16).map(lambda data: data + bytes(-len(data) % 4))
report_blocks = st.builds(
    ReportBlock,
    ssrc=uint32,
    fraction_lost=st.integers(0, 255),
    cumulative_lost=st.integers(-0x800000, 0x7FFFFF),
    highest_sequence=uint32,
    jitter=uint32,
    last_sender_report=uint32,
    delay_since_last_sender_report=uint32,
)
sender_reports = st.builds(
    SenderReport,
    ssrc=uint32,
    ntp_timestamp=st.integers(0, (1 << 64) - 1),
    rtp_timestamp=uint32,
    packet_count=uint32,
    octet_count=uint32,
    reports=st.lists(report_blocks, max_size=4),
    profile_extension=words,
)
receiver_reports = st.builds(
    ReceiverReport,
    ssrc=uint32,
    reports=st.lists(report_blocks, max_size=4),
    profile_extension=words,
)
sdes_chunks = st.builds(
    SdesChunk,
    ssrc=uint32,
    items=st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=40)), max_size=4),
)
source_descriptions = st.builds(SourceDescription, chunks=st.lists(sdes_chunks, max_size=4))
goodbyes = st.builds(Goodbye, ssrcs=st.lists(uint32, max_size=5), reason=st.binary(max_size=255))
nacks = st.builds(
    GenericNack,
    sender_ssrc=uint32,
    media_ssrc=uint32,
    items=st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), max_size=6),
)
twccs = st.builds(TransportWideFeedback, sender_ssrc=uint32, media_ssrc=uint32, feedback=words)
plis = st.builds(PictureLossIndication, sender_ssrc=uint32, media_ssrc=uint32)
firs = st.builds(
    FullIntraRequest,
    sender_ssrc=uint32,
    media_ssrc=uint32,
    entries=st.lists(
        st.builds(FirEntry, ssrc=uint32, sequence_number=st.integers(0, 255)), max_size=4
    ),
)
rembs = st.builds(
    ReceiverEstimatedMaxBitrate,
    sender_ssrc=uint32,
    bitrate=st.builds(lambda m, e: m << e, st.integers(0, (1 << 18) - 1), st.integers(0, 63)),
    ssrcs=st.lists(uint32, max_size=5),
)
raws = st.builds(
    RawRtcpPacket,
    packet_type=st.sampled_from([204, 207, 195]),
    count=st.integers(0, 31),
    body=st.binary(max_size=30),
)
any_packet = st.one_of(
    sender_reports,
    receiver_reports,
    source_descriptions,
    goodbyes,
    nacks,
    twccs,
    plis,
    firs,
    rembs,
    raws,
)


@given(any_packet)
def test_round_trip_every_type(packet: RtcpPacket) -> None:
    data = packet.serialize()
    assert len(data) % 4 == 0
    assert parse_compound(data) == [packet]
    assert type(packet).parse(data) == packet


@given(st.lists(any_packet, min_size=1, max_size=5))
def test_round_trip_compound(packets: list[RtcpPacket]) -> None:
    assert parse_compound(serialize_compound(packets)) == packets


@given(st.sets(st.integers(0, 0xFFFF), max_size=60), uint32, uint32)
def test_nack_compact_form_keeps_exactly_the_lost_set(
    lost: set[int], sender_ssrc: int, media_ssrc: int
) -> None:
    nack = GenericNack.from_sequence_numbers(
        sender_ssrc=sender_ssrc, media_ssrc=media_ssrc, sequence_numbers=lost
    )
    assert set(nack.lost_sequence_numbers()) == lost
    assert len(nack.lost_sequence_numbers()) == len(lost)
    assert len(nack.items) <= len(lost)
    assert GenericNack.parse(nack.serialize()) == nack


@given(st.one_of(sender_reports, receiver_reports))
def test_aiortc_reads_our_reports(report: SenderReport | ReceiverReport) -> None:
    # aiortc refuses profile-specific extensions (RFC 3550 §6.4.1), so none here.
    report = dataclasses.replace(report, profile_extension=b"")
    (theirs,) = aiortc_rtp.RtcpPacket.parse(report.serialize())
    assert isinstance(theirs, aiortc_rtp.RtcpSrPacket | aiortc_rtp.RtcpRrPacket)
    assert theirs.ssrc == report.ssrc
    if isinstance(report, SenderReport):
        assert isinstance(theirs, aiortc_rtp.RtcpSrPacket)
        assert theirs.sender_info.ntp_timestamp == report.ntp_timestamp
        assert theirs.sender_info.rtp_timestamp == report.rtp_timestamp
        assert theirs.sender_info.packet_count == report.packet_count
        assert theirs.sender_info.octet_count == report.octet_count
    assert [
        (r.ssrc, r.fraction_lost, r.packets_lost, r.highest_sequence, r.jitter, r.lsr, r.dlsr)
        for r in theirs.reports
    ] == [dataclasses.astuple(block) for block in report.reports]


@given(nacks)
def test_aiortc_reads_our_nacks(nack: GenericNack) -> None:
    (theirs,) = aiortc_rtp.RtcpPacket.parse(nack.serialize())
    assert isinstance(theirs, aiortc_rtp.RtcpRtpfbPacket)
    assert (theirs.ssrc, theirs.media_ssrc) == (nack.sender_ssrc, nack.media_ssrc)
    # aiortc does not wrap PID + offset at 65536.
    assert [number & 0xFFFF for number in theirs.lost] == nack.lost_sequence_numbers()


@given(rembs)
def test_aiortc_reads_our_rembs(remb: ReceiverEstimatedMaxBitrate) -> None:
    (theirs,) = aiortc_rtp.RtcpPacket.parse(remb.serialize())
    assert isinstance(theirs, aiortc_rtp.RtcpPsfbPacket)
    assert theirs.ssrc == remb.sender_ssrc
    assert aiortc_rtp.unpack_remb_fci(theirs.fci) == (remb.bitrate, remb.ssrcs)


@given(uint32, st.integers(0, 0xFFFFFFFF), st.lists(uint32, max_size=4))
def test_we_read_aiortc_remb(sender_ssrc: int, bitrate: int, ssrcs: list[int]) -> None:
    fci = aiortc_rtp.pack_remb_fci(bitrate, ssrcs)
    data = bytes(aiortc_rtp.RtcpPsfbPacket(fmt=15, ssrc=sender_ssrc, media_ssrc=0, fci=fci))
    ours = ReceiverEstimatedMaxBitrate.parse(data)
    assert ours.ssrcs == ssrcs
    assert ours.bitrate == aiortc_rtp.unpack_remb_fci(fci)[0]


@given(uint32, st.lists(st.tuples(st.just(SDES_CNAME), st.binary(max_size=30)), max_size=3))
def test_sdes_single_chunk_matches_aiortc(ssrc: int, items: list[tuple[int, bytes]]) -> None:
    # Single chunk only: aiortc pads the whole packet, not each chunk (RFC 3550 §6.5).
    ours = SourceDescription(chunks=[SdesChunk(ssrc=ssrc, items=items)])
    (theirs,) = aiortc_rtp.RtcpPacket.parse(ours.serialize())
    assert isinstance(theirs, aiortc_rtp.RtcpSdesPacket)
    assert [(chunk.ssrc, chunk.items) for chunk in theirs.chunks] == [(ssrc, items)]
    aiortc_bytes = bytes(
        aiortc_rtp.RtcpSdesPacket(chunks=[aiortc_rtp.RtcpSourceInfo(ssrc=ssrc, items=items)])
    )
    assert SourceDescription.parse(aiortc_bytes) == ours


@given(st.binary(max_size=120))
def test_fuzz_parse_compound(data: bytes) -> None:
    try:
        packets = parse_compound(data)
    except ParseError:
        return
    assert packets


@given(
    first=st.integers(0x80, 0xBF),
    packet_type=st.integers(200, 207),
    body=st.binary(max_size=60),
)
def test_fuzz_behind_a_valid_header(first: int, packet_type: int, body: bytes) -> None:
    # A consistent length field lets random bodies reach every per-type decoder.
    body = body + bytes(-len(body) % 4)
    data = bytes((first, packet_type)) + (len(body) // 4).to_bytes(2, "big") + body
    for parse in (parse_compound, SenderReport.parse, GenericNack.parse, RawRtcpPacket.parse):
        with contextlib.suppress(ParseError):
            parse(data)
