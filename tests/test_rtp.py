"""RTP packets (RFC 3550 §5.1), RFC 8285 header extensions, RTX (RFC 4588 §4)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from aiortc import rtp as aiortc_rtp
from hypothesis import given
from hypothesis import strategies as st

from whepfan.errors import ParseError
from whepfan.protocol.rtp import (
    URI_ABS_SEND_TIME,
    URI_MID,
    URI_REPAIRED_RTP_STREAM_ID,
    URI_RTP_STREAM_ID,
    URI_TRANSPORT_WIDE_CC,
    HeaderExtensionMap,
    RtpPacket,
    read_sdes_string,
    rewrite_header_fields,
    rtp_header_length,
    sequence_distance,
    unwrap_rtx,
    wrap_rtx,
)

# RFC 8285 §4.2 figure: one-byte elements ID=1 L=0 (1 byte), ID=2 L=1 (2 bytes), two
# padding bytes, ID=3 L=3 (4 bytes); the block is 3 words long.
RFC_8285_ONE_BYTE_BLOCK = bytes.fromhex("bede000310aa21bbbb000033cccccccc")
# RFC 8285 §4.3 figure: two-byte elements ID=1 L=0, ID=2 L=1, one padding byte, ID=3 L=4.
RFC_8285_TWO_BYTE_BLOCK = bytes.fromhex("1000000301000201dd000304eeeeeeee")

FIXED_HEADER_WITH_X = bytes.fromhex("906012340000d4315e1f2a3b")

# A Chromium-like VP8 packet: X set, one-byte extensions abs-send-time (id 2),
# transport-wide-cc (id 3), mid "0" (id 4) and rid "h" (id 10), one padding byte.
CHROMIUM_LIKE_VP8 = bytes.fromhex(
    "90601234"  # V=2 X=1 CC=0, M=0 PT=96, seq 0x1234
    "0000d431"  # timestamp
    "5e1f2a3b"  # SSRC
    "bede0003"  # RFC 8285 one-byte profile, 3 words
    "221a2b3c"  # id 2, 3 bytes: abs-send-time
    "310001"  # id 3, 2 bytes: transport-wide sequence number 1
    "4030"  # id 4, "0": mid
    "a068"  # id 10, "h": rid
    "00"  # padding to the word
    "9080800110"  # VP8 descriptor: X, I (15-bit picture id 1), then the VP8 data
    "9d012a"
)
CHROMIUM_EXTMAP = HeaderExtensionMap(
    {
        URI_ABS_SEND_TIME: 2,
        URI_TRANSPORT_WIDE_CC: 3,
        URI_MID: 4,
        URI_RTP_STREAM_ID: 10,
        URI_REPAIRED_RTP_STREAM_ID: 11,
    }
)


def test_rfc_8285_one_byte_example() -> None:
    packet = RtpPacket.parse(FIXED_HEADER_WITH_X + RFC_8285_ONE_BYTE_BLOCK + b"payload")
    assert packet.extensions == [(1, b"\xaa"), (2, b"\xbb\xbb"), (3, b"\xcc" * 4)]
    assert packet.extension_profile is None
    assert packet.payload == b"payload"
    # Re-encoded without the interior padding: the padding moves to the end of the block.
    assert packet.serialize() == (
        FIXED_HEADER_WITH_X + bytes.fromhex("bede000310aa21bbbb33cccccccc0000") + b"payload"
    )


def test_rfc_8285_two_byte_example() -> None:
    packet = RtpPacket.parse(FIXED_HEADER_WITH_X + RFC_8285_TWO_BYTE_BLOCK + b"payload")
    assert packet.extensions == [(1, b""), (2, b"\xdd"), (3, b"\xee" * 4)]
    # The empty value only fits the two-byte form, so serialize() chooses it again.
    assert packet.serialize() == (
        FIXED_HEADER_WITH_X + bytes.fromhex("1000000301000201dd0304eeeeeeee00") + b"payload"
    )


def test_one_byte_id_15_stops_processing() -> None:
    # RFC 8285 §4.2: on ID 15 "processing of the entire extension should terminate".
    block = bytes.fromhex("bede000210aaf020bb000000")
    packet = RtpPacket.parse(FIXED_HEADER_WITH_X + block)
    assert packet.extensions == [(1, b"\xaa")]


def test_two_byte_form_is_chosen_for_large_ids_and_values() -> None:
    for extensions in ([(15, b"x")], [(1, b"y" * 17)], [(200, b"z")], [(1, b"")]):
        packet = RtpPacket(
            payload_type=96, sequence_number=0, timestamp=0, ssrc=0, extensions=extensions
        )
        data = packet.serialize()
        assert data[12:14] == b"\x10\x00"
        assert RtpPacket.parse(data).extensions == extensions


def test_extensions_that_fit_no_form_are_refused() -> None:
    for extensions in ([(256, b"x")], [(1, b"x" * 256)], [(0, b"x" * 20)]):
        packet = RtpPacket(
            payload_type=96, sequence_number=0, timestamp=0, ssrc=0, extensions=extensions
        )
        with pytest.raises(ValueError):
            packet.serialize()


def test_chromium_like_packet() -> None:
    packet = RtpPacket.parse(CHROMIUM_LIKE_VP8)
    assert packet.payload_type == 96
    assert packet.sequence_number == 0x1234
    assert packet.timestamp == 0xD431
    assert packet.ssrc == 0x5E1F2A3B
    assert not packet.marker
    assert packet.csrcs == []
    assert packet.extension(2) == bytes.fromhex("1a2b3c")
    assert packet.extension(3) == b"\x00\x01"
    assert packet.extension(5) is None
    assert CHROMIUM_EXTMAP.read_mid(packet) == "0"
    assert CHROMIUM_EXTMAP.read_rid(packet) == "h"
    assert CHROMIUM_EXTMAP.read_repaired_rid(packet) is None
    assert packet.payload == bytes.fromhex("90808001109d012a")
    assert packet.serialize() == CHROMIUM_LIKE_VP8
    assert bytes(packet) == CHROMIUM_LIKE_VP8
    assert rtp_header_length(CHROMIUM_LIKE_VP8) == 28


def test_extension_map_lookups() -> None:
    assert CHROMIUM_EXTMAP.id_of(URI_MID) == 4
    assert CHROMIUM_EXTMAP.uri_of(10) == URI_RTP_STREAM_ID
    assert CHROMIUM_EXTMAP.uri_of(14) is None
    assert HeaderExtensionMap().read_mid(RtpPacket.parse(CHROMIUM_LIKE_VP8)) is None


def test_sdes_string_trailing_nuls_and_bad_utf8() -> None:
    packet = RtpPacket(
        payload_type=96,
        sequence_number=0,
        timestamp=0,
        ssrc=0,
        extensions=[(1, b"lo\x00\x00"), (2, b"\xff\xfe")],
    )
    assert read_sdes_string(packet, 1) == "lo"
    assert read_sdes_string(packet, None) is None
    with pytest.raises(ParseError):
        read_sdes_string(packet, 2)


def test_csrcs_marker_and_padding() -> None:
    data = bytes.fromhex(
        "a2e1ffff"  # V=2 P=1 CC=2, M=1 PT=97, seq 65535
        "ffffffff"
        "00000001"
        "00000002"
        "00000003"  # CSRCs
        "abcd"  # payload
        "00000004"  # RFC 3550 §5.1 padding: last octet counts itself
    )
    packet = RtpPacket.parse(data)
    assert packet.marker
    assert packet.payload_type == 97
    assert packet.sequence_number == 0xFFFF
    assert packet.timestamp == 0xFFFFFFFF
    assert packet.csrcs == [2, 3]
    assert packet.payload == b"\xab\xcd"
    assert packet.padding and packet.padding_length == 4
    assert packet.serialize() == data
    assert rtp_header_length(data) == 20


def test_other_extension_profile_is_kept_raw() -> None:
    data = FIXED_HEADER_WITH_X + bytes.fromhex("abcd000101020304") + b"x"
    packet = RtpPacket.parse(data)
    assert packet.extensions == []
    assert packet.extension_profile == 0xABCD
    assert packet.extension_data == bytes.fromhex("01020304")
    assert packet.serialize() == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes.fromhex("80600001000000000000"),  # shorter than the fixed header
        bytes.fromhex("406000010000000000000000"),  # version 1
        bytes.fromhex("816000010000000000000000"),  # CC=1 but no CSRC
        bytes.fromhex("906000010000000000000000bede"),  # cut extension header
        bytes.fromhex("906000010000000000000000bede000210aa0000"),  # block too long
        bytes.fromhex("906000010000000000000000bede000133aa0000"),  # element too long
        bytes.fromhex("906000010000000000000000100000010105aa00"),  # 2-byte too long
        bytes.fromhex("9060000100000000000000001000000100000007"),  # lacks length
        bytes.fromhex("a06000010000000000000000"),  # P set, nothing to count
        bytes.fromhex("a06000010000000000000000aa00"),  # padding count 0
        bytes.fromhex("a06000010000000000000000aa05"),  # padding past header
    ],
)
def test_malformed_packets_raise_parse_error(data: bytes) -> None:
    with pytest.raises(ParseError):
        RtpPacket.parse(data)


def test_header_length_errors() -> None:
    with pytest.raises(ParseError):
        rtp_header_length(b"\x80" * 11)
    with pytest.raises(ParseError):
        rtp_header_length(bytes.fromhex("906000010000000000000000bede0004"))


def test_rewrite_header_fields() -> None:
    rewritten = rewrite_header_fields(
        CHROMIUM_LIKE_VP8,
        payload_type=100,
        sequence_number=7,
        timestamp=0xFFFFFFFE,
        ssrc=0x01020304,
        marker=True,
    )
    packet = RtpPacket.parse(rewritten)
    original = RtpPacket.parse(CHROMIUM_LIKE_VP8)
    assert (packet.payload_type, packet.sequence_number, packet.timestamp, packet.ssrc) == (
        100,
        7,
        0xFFFFFFFE,
        0x01020304,
    )
    assert packet.marker
    assert packet.extensions == original.extensions
    assert packet.payload == original.payload
    # Untouched fields stay as they were, marker included.
    only_seq = RtpPacket.parse(rewrite_header_fields(rewritten, sequence_number=8))
    assert only_seq.marker and only_seq.payload_type == 100 and only_seq.sequence_number == 8
    unmarked = RtpPacket.parse(rewrite_header_fields(rewritten, marker=False))
    assert not unmarked.marker and unmarked.payload_type == 100
    with pytest.raises(ParseError):
        rewrite_header_fields(b"\x80\x60", ssrc=1)


def test_sequence_distance_across_the_wrap() -> None:
    assert sequence_distance(1, 65535) == 2
    assert sequence_distance(65535, 1) == -2
    assert sequence_distance(100, 100) == 0
    assert sequence_distance(0x8000 + 5, 5) == -0x8000


def test_rtx_unwrap() -> None:
    # RFC 4588 §4: OSN first, then the original payload.
    assert unwrap_rtx(bytes.fromhex("1234") + b"media") == (0x1234, b"media")
    assert unwrap_rtx(wrap_rtx(65535, b"")) == (65535, b"")
    with pytest.raises(ParseError):
        unwrap_rtx(b"\x01")


def test_aiortc_rtx_interoperates() -> None:
    original = RtpPacket(
        payload_type=96, sequence_number=4242, timestamp=9, ssrc=1, payload=b"frame"
    )
    aiortc_packet = aiortc_rtp.RtpPacket.parse(original.serialize())
    rtx = aiortc_rtp.wrap_rtx(aiortc_packet, payload_type=97, sequence_number=1, ssrc=2)
    parsed_rtx = RtpPacket.parse(rtx.serialize())
    assert unwrap_rtx(parsed_rtx.payload) == (4242, b"frame")


extension_elements = st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=40)), max_size=6)
rtp_packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127),
    sequence_number=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    marker=st.booleans(),
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
    extensions=extension_elements,
    payload=st.binary(max_size=200),
    padding_length=st.integers(0, 255),
)


raw_extension_packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127),
    sequence_number=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    extension_profile=st.integers(0, 0xFFFF).filter(
        lambda profile: profile != 0xBEDE and profile & 0xFFF0 != 0x1000
    ),
    extension_data=st.binary(max_size=24).map(lambda data: data + bytes(-len(data) % 4)),
    payload=st.binary(max_size=50),
    padding_length=st.integers(0, 255),
)


@given(rtp_packets | raw_extension_packets)
def test_round_trip(packet: RtpPacket) -> None:
    data = packet.serialize()
    assert RtpPacket.parse(data) == packet
    assert rtp_header_length(data) == len(data) - len(packet.payload) - packet.padding_length


@given(rtp_packets)
def test_aiortc_reads_what_we_write(packet: RtpPacket) -> None:
    data = packet.serialize()
    theirs = aiortc_rtp.RtpPacket.parse(data)
    assert theirs.payload_type == packet.payload_type
    assert theirs.sequence_number == packet.sequence_number
    assert theirs.timestamp == packet.timestamp
    assert theirs.ssrc == packet.ssrc
    assert bool(theirs.marker) == packet.marker
    assert theirs.csrc == packet.csrcs
    assert theirs.payload == packet.payload
    assert theirs.padding_size == packet.padding_length
    if packet.extensions:
        offset = 12 + 4 * len(packet.csrcs)
        profile, words = struct.unpack_from("!HH", data, offset)
        block = data[offset + 4 : offset + 4 + 4 * words]
        assert aiortc_rtp.unpack_header_extensions(profile, block) == packet.extensions


@given(st.binary(max_size=120))
def test_fuzz_parse_returns_packet_or_parse_error(data: bytes) -> None:
    try:
        packet = RtpPacket.parse(data)
    except ParseError:
        return
    assert len(packet.payload) <= len(data)


@given(st.binary(max_size=80))
def test_fuzz_with_a_valid_first_byte(tail: bytes) -> None:
    # Random data behind a plausible V=2 first byte reaches the extension and padding code.
    for first in (0x80, 0x90, 0xA0, 0xB3):
        data = bytes((first,)) + tail
        with contextlib.suppress(ParseError):
            RtpPacket.parse(data)
        with contextlib.suppress(ParseError):
            rtp_header_length(data)


@given(st.binary(max_size=20))
def test_fuzz_sdes_string(value: bytes) -> None:
    packet = RtpPacket(
        payload_type=96, sequence_number=0, timestamp=0, ssrc=0, extensions=[(1, value)]
    )
    try:
        text = read_sdes_string(packet, 1)
    except ParseError:
        return
    assert text is not None and text.encode() == value.rstrip(b"\x00")


@given(st.binary(max_size=8))
def test_fuzz_unwrap_rtx(data: bytes) -> None:
    try:
        sequence_number, payload = unwrap_rtx(data)
    except ParseError:
        return
    assert wrap_rtx(sequence_number, payload) == data
