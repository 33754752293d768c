"""Transport-wide sequence numbers on what the Fanout sends to a viewer
(draft-holmer-rmcat-transport-wide-cc-extensions-01 §2), on real loopback sockets.

Every datagram is unprotected by libsrtp (pylibsrtp) with the viewer's keys, then read
with whepfan.protocol.rtp.transport_sequence and whepfan's RTP parser, so a wrong block
length, a misplaced element or a broken padding count fails here.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fanout import (
    PROFILES,
    Viewer,
    attach,
    ext_map,
    new_viewer,
    one_byte_extension,
    open_sender,
    open_viewer,
    parse_rtp,
    rtp_packet,
    sender,
    two_byte_extension,
    viewers,
)
from test_nack_generator import _vp8
from test_router import CLIENT, Harness, connect_viewer

from whepfan._fastpath import (
    PAYLOAD_VP8,
    PROFILE_AEAD_AES_128_GCM,
    PROFILE_AES128_CM_SHA1_80,
    Fanout,
    SrtpSession,
)
from whepfan.media import gso
from whepfan.media.session import ViewerSession
from whepfan.protocol import rtp
from whepfan.protocol.rtp import transport_sequence

__all__ = ["sender", "viewers"]  # fixtures shared with test_fanout

PUBLISHER_TCC = 3  # the publisher's transport-cc id in the test packets
VIEWER_TCC = 5
TRAILER = {PROFILE_AEAD_AES_128_GCM: 16, PROFILE_AES128_CM_SHA1_80: 10}

needs_gso = pytest.mark.skipif(
    not gso.kernel_supports_gso(), reason="this kernel has no UDP_SEGMENT (Linux < 4.18)"
)


def tcc_fanout(sock: socket.socket, *, gso: bool = False, transport_log_size: int = 1024) -> Fanout:
    return Fanout(
        sock.fileno(),
        max_viewers=64,
        batch_size=64,
        gso=gso,
        transport_log_size=transport_log_size,
    )


def with_publisher_tcc(
    seq: int, *, publisher_number: int = 0x7777, payload: bytes = b"\xab" * 100, padding: int = 0
) -> bytes:
    """A packet as Chromium sends it: audio level (id 1) and its own transport seq (id 3)."""
    extension = one_byte_extension(
        [(1, b"\x9a"), (PUBLISHER_TCC, struct.pack("!H", publisher_number))]
    )
    return rtp_packet(seq, 1000 + seq, extension=extension, payload=payload, padding=padding)


def numbers(packets: list[bytes], extension_id: int) -> list[int | None]:
    return [transport_sequence(packet, extension_id) for packet in packets]


def consecutive(first: int, count: int) -> list[int]:
    return [(first + offset) % 65536 for offset in range(count)]


# --- push: in place, added, forms ----------------------------------------------------------


def test_the_publishers_element_is_rewritten_in_place(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = tcc_fanout(sender)
    track = fanout.add_track(transport_cc_id=PUBLISHER_TCC)
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=9, payload_type=96, ext_map=ext_map({1: 2}))
    fanout.set_transport_cc(viewer.slot, VIEWER_TCC, sequence=100)
    packets = [with_publisher_tcc(seq, publisher_number=seq * 7) for seq in range(40, 45)]
    for index, packet in enumerate(packets):
        assert fanout.push(track, packet, keyframe=index == 0) == 1
    received = viewer.receive_rtp(5)
    assert numbers(received, VIEWER_TCC) == consecutive(100, 5)
    for number, out, packet in zip(consecutive(100, 5), received, packets, strict=True):
        assert len(out) == len(packet)  # the element was there: nothing grows
        view = parse_rtp(out)
        # The viewer's id carries the viewer's number; the publisher's id is gone.
        assert view.extensions == {2: b"\x9a", VIEWER_TCC: struct.pack("!H", number)}
        assert view.payload == parse_rtp(packet).payload
    media = [parse_rtp(out).seq for out in received]
    assert media == consecutive(media[0], 5)  # media numbering is untouched
    stats = fanout.viewer_stats(viewer.slot)
    assert (stats["transport_cc_stamped"], stats["transport_cc_added"]) == (5, 0)
    assert fanout.stats()["transport_cc_stamped"] == 5


@pytest.mark.parametrize(
    ("layout", "viewer_id", "growth", "profile"),
    [
        ("none", 5, 8, 0xBEDE),  # X = 0: a new one-byte block
        ("none", 20, 8, 0x1000),  # an id above 14 needs the two-byte form
        ("one-byte", 5, 4, 0xBEDE),  # one more word in the publisher's block
        ("two-byte", 5, 4, 0x1002),
        ("two-byte", 200, 4, 0x1002),
    ],
)
def test_a_packet_without_the_element_gets_one(
    sender: socket.socket,
    viewers: list[Viewer],
    layout: str,
    viewer_id: int,
    growth: int,
    profile: int,
) -> None:
    fanout = tcc_fanout(sender)
    track = fanout.add_track()  # the publisher did not negotiate transport-cc
    viewer = new_viewer(viewers, fanout, PROFILE_AES128_CM_SHA1_80)
    fanout.subscribe(viewer.slot, track, ssrc=9, payload_type=96, ext_map=ext_map({1: 1, 2: 9}))
    fanout.set_transport_cc(viewer.slot, viewer_id, sequence=65534)
    extension = {
        "none": None,
        "one-byte": one_byte_extension([(1, b"\x11"), (2, b"\x22\x22\x22")]),
        "two-byte": two_byte_extension([(1, b""), (2, b"\x22" * 5)], appbits=2),
    }[layout]
    packets = [
        rtp_packet(seq, seq * 3000, extension=extension, payload=bytes([seq]) * 60, padding=seq % 3)
        for seq in range(10, 14)
    ]
    for index, packet in enumerate(packets):
        fanout.push(track, packet, keyframe=index == 0)
    received = viewer.receive(4)
    plain = [viewer.inbound.unprotect(datagram) for datagram in received]
    assert numbers(plain, viewer_id) == consecutive(65534, 4)  # wraps like any 16-bit counter
    for datagram, out, packet in zip(received, plain, packets, strict=True):
        assert len(out) == len(packet) + growth
        assert len(datagram) == len(out) + TRAILER[PROFILE_AES128_CM_SHA1_80]
        parsed, source = rtp.RtpPacket.parse(out), rtp.RtpPacket.parse(packet)
        assert parsed.payload == source.payload
        assert parsed.padding_length == source.padding_length
        assert parsed.marker == source.marker
        view = parse_rtp(out)
        assert view.extension_profile == profile
        expected = {
            "none": {},
            "one-byte": {1: b"\x11", 9: b"\x22\x22\x22"},
            "two-byte": {1: b"", 9: b"\x22" * 5},
        }[layout]
        number = struct.pack("!H", transport_sequence(out, viewer_id) or 0)
        assert view.extensions == {**expected, viewer_id: number}
    assert fanout.viewer_stats(viewer.slot)["transport_cc_added"] == 4


def test_a_one_byte_block_cannot_carry_an_id_above_14(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = tcc_fanout(sender)
    track = fanout.add_track(transport_cc_id=PUBLISHER_TCC)
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=9, payload_type=96)
    fanout.set_transport_cc(viewer.slot, 30, sequence=7)
    fanout.push(track, with_publisher_tcc(1), keyframe=True)
    fanout.push(track, rtp_packet(2, 2))  # X = 0: a two-byte block is added
    first, second = viewer.receive_rtp(2)
    assert parse_rtp(first).extensions == {}  # sent without a number, none used
    assert transport_sequence(second, 30) == 7
    stats = fanout.viewer_stats(viewer.slot)
    assert (stats["transport_cc_unstamped"], stats["transport_cc_added"]) == (1, 1)
    assert fanout.stats()["transport_cc_unstamped"] == 1


def test_viewers_count_independently_and_others_see_no_element(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = tcc_fanout(sender)
    audio = fanout.add_track(transport_cc_id=PUBLISHER_TCC)
    video = fanout.add_track()
    first, second, plain_viewer = (new_viewer(viewers, fanout) for _ in range(3))
    for viewer in (first, second, plain_viewer):
        fanout.subscribe(viewer.slot, audio, ssrc=1, payload_type=111, wait_keyframe=False)
        fanout.subscribe(viewer.slot, video, ssrc=2, payload_type=96, wait_keyframe=False)
    fanout.set_transport_cc(first.slot, 4, sequence=0)
    fanout.set_transport_cc(second.slot, 11, sequence=60000)
    # BUNDLE: one counter per viewer across its audio and video subscriptions.
    for seq in range(6):
        if seq % 2:
            fanout.push(audio, with_publisher_tcc(seq))
        else:
            fanout.push(video, rtp_packet(seq, seq))
    assert numbers(first.receive_rtp(6), 4) == consecutive(0, 6)
    assert numbers(second.receive_rtp(6), 11) == consecutive(60000, 6)
    for out in plain_viewer.receive_rtp(6):
        # The publisher's own number never reaches a viewer: zeroed into padding.
        assert parse_rtp(out).extensions == {}
        assert transport_sequence(out, PUBLISHER_TCC) is None
    assert fanout.viewer_stats(plain_viewer.slot)["transport_cc_added"] == 0
    # Off again: no more numbers, the counter keeps its place.
    fanout.set_transport_cc(first.slot, 0)
    fanout.push(video, rtp_packet(10, 10))
    (out,) = first.receive_rtp(1)
    assert transport_sequence(out, 4) is None and len(out) == len(rtp_packet(10, 10))
    second.receive_rtp(1)
    plain_viewer.receive_rtp(1)
    fanout.set_transport_cc(first.slot, 4)
    fanout.push(video, rtp_packet(11, 11))
    assert numbers(first.receive_rtp(1), 4) == [6]


# --- push_batch, GSO ------------------------------------------------------------------------


def frame(lengths: list[int], *, first_seq: int = 100, extension_every: int = 0) -> list[bytes]:
    """One frame's packets of the given lengths without an extension block, except every
    ``extension_every``-th, which has a one-byte block of the same total length."""
    packets = []
    for index, length in enumerate(lengths):
        extension = None
        if extension_every and index % extension_every == 0:
            extension = one_byte_extension([(1, b"\x01\x02\x03")])
        payload_len = length - 12 - (len(extension) if extension else 0)
        packets.append(
            rtp_packet(
                first_seq + index,
                9000,
                payload=bytes([index + 1]) * payload_len,
                extension=extension,
                marker=index == len(lengths) - 1,
            )
        )
    return packets


@pytest.mark.parametrize("gso_on", [pytest.param(True, marks=needs_gso), False])
def test_push_batch_stamps_every_packet_and_keeps_gso_runs_equal(
    sender: socket.socket, viewers: list[Viewer], gso_on: bool
) -> None:
    fanout = tcc_fanout(sender, gso=gso_on)
    track = fanout.add_track()
    stamped, plain_viewer = new_viewer(viewers, fanout), new_viewer(viewers, fanout)
    for viewer in (stamped, plain_viewer):
        fanout.subscribe(
            viewer.slot,
            track,
            ssrc=0xA0,
            payload_type=96,
            wait_keyframe=False,
            ext_map=ext_map({1: 1}),
        )
    fanout.set_transport_cc(stamped.slot, VIEWER_TCC, sequence=1000)
    # Mixed layouts in one run: most grow by 8 octets (a new block), every third by 4
    # (a word in its block); near-equal lengths as Chromium's packetizer makes them.
    packets = frame([1100, 1100, 1101, 1100, 1101, 1100, 700], extension_every=3)
    assert fanout.push_batch(track, packets) == 14
    received = stamped.receive(7)
    plain = [stamped.inbound.unprotect(datagram) for datagram in received]
    assert numbers(plain, VIEWER_TCC) == consecutive(1000, 7)
    assert [rtp.RtpPacket.parse(p).payload for p in plain] == [
        rtp.RtpPacket.parse(p).payload for p in packets
    ]
    media = [parse_rtp(p).seq for p in plain]
    assert media == consecutive(media[0], 7)
    others = plain_viewer.receive(7)
    if gso_on:
        # One GSO entry per viewer: every segment but the last has the run's length.
        assert len({len(datagram) for datagram in received[:-1]}) == 1
        assert len({len(datagram) for datagram in others[:-1]}) == 1
        assert len(received[0]) == len(others[0]) + 8
        stats = fanout.stats()
        assert (stats["gso_messages"], stats["gso_segments"]) == (2, 14)
    else:
        assert [len(p) for p in plain] == [
            len(p) + (4 if index % 3 == 0 else 8) for index, p in enumerate(packets)
        ]
    assert [parse_rtp(p).extensions for p in plain] == [
        {1: b"\x01\x02\x03", VIEWER_TCC: struct.pack("!H", 1000 + index)}
        if index % 3 == 0
        else {VIEWER_TCC: struct.pack("!H", 1000 + index)}
        for index in range(7)
    ]
    assert fanout.viewer_stats(stamped.slot)["transport_cc_added"] == 7


@needs_gso
def test_gso_runs_with_the_publishers_element_stay_one_entry(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = tcc_fanout(sender, gso=True)
    track = fanout.add_track(transport_cc_id=PUBLISHER_TCC)
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    fanout.set_transport_cc(viewer.slot, VIEWER_TCC, sequence=5)
    packets = [with_publisher_tcc(seq, payload=b"v" * 1000) for seq in range(8)]
    assert fanout.push_batch(track, packets) == 8
    received = viewer.receive(8)
    assert {len(datagram) for datagram in received} == {len(packets[0]) + 16}
    plain = [viewer.inbound.unprotect(datagram) for datagram in received]
    assert numbers(plain, VIEWER_TCC) == consecutive(5, 8)
    assert fanout.stats()["gso_messages"] == 1


# --- resend, padding ------------------------------------------------------------------------


@pytest.mark.parametrize("with_rtx", [True, False])
def test_retransmissions_take_the_next_number(
    sender: socket.socket, viewers: list[Viewer], with_rtx: bool
) -> None:
    fanout = tcc_fanout(sender)
    track = fanout.add_track(transport_cc_id=PUBLISHER_TCC)
    viewer = new_viewer(viewers, fanout)
    rtx_ssrc, rtx_payload_type = (0xBB, 97) if with_rtx else (0, -1)
    fanout.subscribe(
        viewer.slot,
        track,
        ssrc=0xAA,
        payload_type=96,
        wait_keyframe=False,
        rtx_ssrc=rtx_ssrc,
        rtx_payload_type=rtx_payload_type,
    )
    fanout.set_transport_cc(viewer.slot, VIEWER_TCC, sequence=65535)
    originals = [with_publisher_tcc(seq, payload=bytes([seq]) * 30, padding=4) for seq in range(5)]
    extensionless = rtp_packet(5, 5, payload=b"x" * 30)
    for packet in [*originals, extensionless]:
        fanout.push(track, packet)
    sent = viewer.receive_rtp(6)
    assert numbers(sent, VIEWER_TCC) == consecutive(65535, 6)
    asked = [parse_rtp(sent[1]).seq, parse_rtp(sent[5]).seq]
    assert fanout.resend(viewer.slot, track, asked) == 2
    # Without RTX a repair repeats its SRTP index: a fresh receiver context reads it.
    oracle = viewer.inbound if with_rtx else viewer.fresh_inbound()
    repairs = [oracle.unprotect(datagram) for datagram in viewer.receive(2)]
    assert numbers(repairs, VIEWER_TCC) == consecutive(65535 + 6, 2)
    for repair, original in zip(repairs, [sent[1], sent[5]], strict=True):
        view, source = parse_rtp(repair), parse_rtp(original)
        if with_rtx:
            # RFC 4588 §4: OSN then the original payload; the RTX stream's own numbers.
            assert (view.ssrc, view.payload_type) == (0xBB, 97)
            assert struct.unpack("!H", view.payload[:2])[0] == source.seq
            assert view.payload[2:] == source.payload
        else:
            assert (view.ssrc, view.seq, view.payload) == (0xAA, source.seq, source.payload)
    stats = fanout.viewer_stats(viewer.slot)
    assert stats["transport_cc_stamped"] + stats["transport_cc_added"] == 8


@pytest.mark.parametrize("with_rtx", [True, False])
def test_a_retransmission_with_a_stamped_or_added_element_keeps_the_viewers_vp8_ids(
    sender: socket.socket, viewers: list[Viewer], with_rtx: bool
) -> None:
    """VP8 with a dropped TL2 picture (so the viewer's picture ids are shifted, RFC 7741
    §4.2): whether the repair's transport-cc element is the publisher's, rewritten, or
    a new block (the header grows), its payload is the one the viewer first got."""
    fanout = tcc_fanout(sender)
    track = fanout.add_track(transport_cc_id=PUBLISHER_TCC, payload_format=PAYLOAD_VP8)
    viewer = new_viewer(viewers, fanout)
    rtx_ssrc, rtx_payload_type = (0xBB, 97) if with_rtx else (0, -1)
    fanout.subscribe(
        viewer.slot,
        track,
        ssrc=0xAA,
        payload_type=96,
        wait_keyframe=False,
        rtx_ssrc=rtx_ssrc,
        rtx_payload_type=rtx_payload_type,
    )
    fanout.set_transport_cc(viewer.slot, VIEWER_TCC, sequence=0)
    fanout.set_temporal_layer(viewer.slot, track, 0)

    def vp8(seq: int, picture_id: int, temporal_layer: int, *, element: bool) -> bytes:
        # X, S; I, L, T; M + 15-bit picture id; TL0PICIDX; TID (RFC 7741 §4.2).
        descriptor = bytes([0x90, 0xE0, 0x80 | picture_id >> 8, picture_id & 0xFF, 9])
        descriptor += bytes([temporal_layer << 6])
        payload = descriptor + bytes([seq & 0xFF]) * 40
        if element:
            return with_publisher_tcc(seq, payload=payload)
        return rtp_packet(seq, 1000 + seq, payload=payload, marker=True)

    fanout.push(track, vp8(10, 300, 0, element=True))
    fanout.push(track, vp8(11, 301, 2, element=True))  # dropped: ids shift by one
    for seq, element in ((12, True), (13, False)):
        fanout.push(track, vp8(seq, 290 + seq, 0, element=element))
    sent = viewer.receive_rtp(3)
    views = [parse_rtp(packet) for packet in sent]
    assert [struct.unpack_from("!H", view.payload, 2)[0] & 0x7FFF for view in views] == [
        300,
        301,
        302,
    ]
    assert fanout.resend(viewer.slot, track, [views[1].seq, views[2].seq]) == 2
    oracle = viewer.inbound if with_rtx else viewer.fresh_inbound()
    repairs = [oracle.unprotect(datagram) for datagram in viewer.receive(2)]
    assert numbers(repairs, VIEWER_TCC) == [3, 4]
    for repair, original in zip(repairs, views[1:], strict=True):
        view = parse_rtp(repair)
        assert view.payload[2 if with_rtx else 0 :] == original.payload


def test_padding_probes_are_padding_only_rtx_with_the_next_numbers(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = tcc_fanout(sender)
    track = fanout.add_track(transport_cc_id=PUBLISHER_TCC)
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(
        viewer.slot, track, ssrc=0xAA, payload_type=96, rtx_ssrc=0xBB, rtx_payload_type=97
    )
    fanout.set_transport_cc(viewer.slot, VIEWER_TCC, sequence=10)
    assert fanout.send_padding(viewer.slot, track, 3, 200) == 0  # nothing sent yet
    for seq in range(3):
        fanout.push(track, with_publisher_tcc(seq), keyframe=seq == 0)
    media = viewer.receive_rtp(3)
    fanout.resend(viewer.slot, track, [parse_rtp(media[2]).seq])
    (repair,) = viewer.receive_rtp(1)
    assert fanout.send_padding(viewer.slot, track, 4, 200) == 4
    probes = viewer.receive(4)
    assert {len(datagram) for datagram in probes} == {12 + 8 + 200 + 16}
    plain = [viewer.inbound.unprotect(datagram) for datagram in probes]
    assert numbers(plain, VIEWER_TCC) == consecutive(14, 4)
    views = [parse_rtp(packet) for packet in plain]
    # The RTX stream continues after the retransmission; the media stream has no gap.
    assert [view.seq for view in views] == consecutive((parse_rtp(repair).seq + 1) % 65536, 4)
    for packet, view in zip(plain, views, strict=True):
        assert rtp.padding_only(packet)
        assert packet[-1] == 200 and view.payload == b""
        assert (view.ssrc, view.payload_type, view.marker) == (0xBB, 97, False)
        assert view.timestamp == parse_rtp(media[-1]).timestamp
    fanout.push(track, with_publisher_tcc(3))
    (after,) = viewer.receive_rtp(1)
    assert parse_rtp(after).seq == (parse_rtp(media[-1]).seq + 1) % 65536
    assert transport_sequence(after, VIEWER_TCC) == 18
    assert fanout.viewer_stats(viewer.slot)["padding_sent"] == 4
    assert fanout.stats()["padding_sent"] == 4
    logged = fanout.transport_sent(viewer.slot, 14, 4)
    assert [entry[1] if entry else None for entry in logged] == [len(probes[0])] * 4


def test_padding_needs_rtx_and_transport_cc(sender: socket.socket, viewers: list[Viewer]) -> None:
    fanout = tcc_fanout(sender)
    track = fanout.add_track()
    no_rtx, no_tcc = new_viewer(viewers, fanout), new_viewer(viewers, fanout)
    fanout.subscribe(no_rtx.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    fanout.subscribe(
        no_tcc.slot,
        track,
        ssrc=1,
        payload_type=96,
        rtx_ssrc=2,
        rtx_payload_type=97,
        wait_keyframe=False,
    )
    fanout.set_transport_cc(no_rtx.slot, 2)
    fanout.push(track, rtp_packet(1, 1))
    no_rtx.receive(1)
    no_tcc.receive(1)
    assert fanout.send_padding(no_rtx.slot, track, 5, 100) == 0
    assert fanout.send_padding(no_tcc.slot, track, 5, 100) == 0
    assert no_rtx.receive(0) == [] and no_tcc.receive(0) == []
    with pytest.raises(ValueError):
        fanout.send_padding(no_rtx.slot, track, 1, 256)
    with pytest.raises(ValueError):
        fanout.send_padding(no_rtx.slot, track, 1, 0)
    with pytest.raises(ValueError):
        fanout.send_padding(no_rtx.slot, track, 1025, 10)
    assert fanout.stats()["padding_sent"] == 0


# --- the send log ---------------------------------------------------------------------------


def test_transport_sent_has_each_datagrams_size_and_time(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = tcc_fanout(sender)
    track = fanout.add_track(transport_cc_id=PUBLISHER_TCC)
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    assert fanout.transport_sent(viewer.slot, 0, 3) == [None] * 3  # not turned on
    fanout.set_transport_cc(viewer.slot, VIEWER_TCC, sequence=65533)
    before = time.monotonic()
    for seq in range(6):
        fanout.push(track, with_publisher_tcc(seq, payload=b"p" * (100 + seq)))
    after = time.monotonic()
    received = viewer.receive(6)
    log = fanout.transport_sent(viewer.slot, 65532, 8)  # one before, one after
    assert log[0] is None and log[-1] is None
    entries = [entry for entry in log[1:-1] if entry is not None]
    assert [size for _, size in entries] == [len(datagram) for datagram in received]
    times = [sent_at for sent_at, _ in entries]
    # Kept to 2^-16 s (rounded down): the first may read up to one tick before ``before``.
    assert before - 2**-16 <= times[0] and times == sorted(times) and times[-1] <= after
    assert fanout.transport_sent(viewer.slot, 0, 0) == []
    for bad in ((-1, 1), (65536, 1), (0, 65536), (0, -1)):
        with pytest.raises(ValueError):
            fanout.transport_sent(viewer.slot, *bad)
    # A removed viewer's log goes with it; the reused slot starts without one.
    fanout.remove_viewer(viewer.slot)
    reused = new_viewer(viewers, fanout)
    assert reused.slot == viewer.slot
    assert fanout.transport_sent(reused.slot, 65533, 6) == [None] * 6


def test_the_send_log_is_a_ring(sender: socket.socket, viewers: list[Viewer]) -> None:
    fanout = tcc_fanout(sender, transport_log_size=64)
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    fanout.set_transport_cc(viewer.slot, VIEWER_TCC, sequence=65500)
    for start in range(0, 100, 20):
        fanout.push_batch(
            track, [rtp_packet(seq, seq, payload=b"r" * seq) for seq in range(start, start + 20)]
        )
        viewer.receive(20)
    log = fanout.transport_sent(viewer.slot, 65500, 100)
    # The last 64 numbers (across the 16-bit wrap) are kept, the 36 before overwritten.
    assert log[:36] == [None] * 36
    sizes = [entry[1] for entry in log[36:] if entry is not None]
    assert sizes == [12 + 8 + seq + 16 for seq in range(36, 100)]
    with pytest.raises(ValueError):
        Fanout(sender.fileno(), transport_log_size=100)
    with pytest.raises(ValueError):
        fanout.set_transport_cc(viewer.slot, 256)
    with pytest.raises(ValueError):
        fanout.set_transport_cc(viewer.slot, 5, sequence=65536)
    with pytest.raises(ValueError):
        fanout.set_track_transport_cc(track, 256)
    with pytest.raises(KeyError):
        fanout.set_transport_cc(63, 5)


def test_refused_datagrams_are_not_in_the_log(sender: socket.socket, viewers: list[Viewer]) -> None:
    fanout = tcc_fanout(sender)
    track = fanout.add_track()
    # 255.255.255.255 without SO_BROADCAST: sendmmsg fails with EACCES for it alone.
    refused = fanout.add_viewer(
        "255.255.255.255",
        9,
        profile=PROFILE_AEAD_AES_128_GCM,
        tx_key=b"k" * 16,
        tx_salt=b"s" * 12,
        rx_key=b"k" * 16,
        rx_salt=b"s" * 12,
    )
    fine = new_viewer(viewers, fanout)
    for slot in (refused, fine.slot):
        fanout.subscribe(slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
        fanout.set_transport_cc(slot, 1, sequence=0)
    assert fanout.push(track, rtp_packet(1, 1)) == 1
    fine.receive(1)
    # The number was used (the datagram existed), but the log says it never left.
    assert fanout.transport_sent(refused, 0, 2) == [None, None]
    assert fanout.transport_sent(fine.slot, 0, 1)[0] is not None
    assert fanout.viewer_stats(refused)["send_errors"] == 1
    assert fanout.viewer_stats(refused)["transport_cc_added"] == 1


# --- any header-extension layout survives -----------------------------------------------------


@st.composite
def extension_layouts(draw: st.DrawFn) -> tuple[bytes, dict[int, bytes], bool, bool]:
    """A valid RTP packet: CSRCs, no block / one-byte / two-byte elements, maybe the
    publisher's transport-cc element, RTP padding. Returns (packet, elements by id,
    two-byte form, has the publisher's element)."""
    form = draw(st.sampled_from(["none", "one-byte", "two-byte"]))
    elements: list[tuple[int, bytes]] = []
    has_publisher_element = False
    if form != "none":
        max_id = 255 if form == "two-byte" else 14
        ids = draw(st.lists(st.integers(1, max_id), unique=True, max_size=6))
        elements = [
            (ext_id, draw(st.binary(min_size=0 if form == "two-byte" else 1, max_size=12)))
            for ext_id in ids
            if ext_id != PUBLISHER_TCC
        ]
        if draw(st.booleans()):
            has_publisher_element = True
            elements.insert(
                draw(st.integers(0, len(elements))),
                (PUBLISHER_TCC, draw(st.binary(min_size=2, max_size=2))),
            )
    extension = None
    if form == "one-byte":
        extension = one_byte_extension(elements)
    elif form == "two-byte":
        extension = two_byte_extension(elements, appbits=draw(st.integers(0, 15)))
    csrcs = draw(st.lists(st.integers(0, 2**32 - 1), max_size=3))
    packet = bytearray(
        rtp_packet(
            draw(st.integers(0, 65535)),
            draw(st.integers(0, 2**32 - 1)),
            marker=draw(st.booleans()),
            extension=extension,
            payload=draw(st.binary(max_size=120)),
            padding=draw(st.integers(0, 12)),
        )
    )
    if csrcs:
        packet[0] |= len(csrcs)
        packet[12:12] = b"".join(struct.pack("!I", csrc) for csrc in csrcs)
    return bytes(packet), dict(elements), form == "two-byte", has_publisher_element


@settings(max_examples=150, deadline=None)
@given(
    case=extension_layouts(),
    viewer_id=st.integers(1, 255),
    mapping=st.dictionaries(st.integers(1, 255), st.integers(1, 255), max_size=6),
    with_rtx=st.booleans(),
)
def test_any_extension_layout_survives_the_stamping(
    case: tuple[bytes, dict[int, bytes], bool, bool],
    viewer_id: int,
    mapping: dict[int, int],
    with_rtx: bool,
) -> None:
    packet, elements, two_byte, has_publisher_element = case
    mapping = {k: v for k, v in mapping.items() if v != viewer_id and k != PUBLISHER_TCC}
    mapping = {k: v for k, v in mapping.items() if list(mapping.values()).count(v) == 1}
    source = rtp.RtpPacket.parse(packet)
    one_byte_block = packet[0] & 0x10 and not two_byte
    with open_sender() as sock:
        viewer = open_viewer(PROFILES[viewer_id % len(PROFILES)])
        with viewer.sock:
            fanout = Fanout(sock.fileno(), max_viewers=4)
            track = fanout.add_track(transport_cc_id=PUBLISHER_TCC)
            attach(fanout, viewer)
            rtx_ssrc, rtx_payload_type = (0xBB, 97) if with_rtx else (0, -1)
            fanout.subscribe(
                viewer.slot,
                track,
                ssrc=0xCAFE,
                payload_type=111,
                ext_map=ext_map(mapping) if mapping else b"",
                wait_keyframe=False,
                rtx_ssrc=rtx_ssrc,
                rtx_payload_type=rtx_payload_type,
            )
            fanout.set_transport_cc(viewer.slot, viewer_id, sequence=65535)
            assert fanout.push(track, packet) == 1
            (out,) = viewer.receive_rtp(1)
            assert fanout.resend(viewer.slot, track, [parse_rtp(out).seq]) == 1
            oracle = viewer.inbound if with_rtx else viewer.fresh_inbound()
            repair = oracle.unprotect(viewer.receive(1)[0])
    stampable = not (one_byte_block and viewer_id > 14)
    growth = 0 if has_publisher_element else (8 if not packet[0] & 0x10 else 4)
    expected = {}
    for publisher_id, data in elements.items():
        mapped = mapping.get(publisher_id, 0)
        if publisher_id != PUBLISHER_TCC and mapped and (two_byte or mapped <= 14):
            expected[mapped] = data
    for sent, number in ((out, 65535), (repair, 0)):
        parsed = rtp.RtpPacket.parse(sent)
        assert parsed.csrcs == source.csrcs
        assert parsed.marker == source.marker
        view = parse_rtp(sent)
        if stampable:
            assert transport_sequence(sent, viewer_id) == number
            assert parsed.extension(viewer_id) == struct.pack("!H", number)
            assert view.extensions == {**expected, viewer_id: struct.pack("!H", number)}
        else:
            assert transport_sequence(sent, viewer_id) is None
            assert view.extensions == expected
    parsed = rtp.RtpPacket.parse(out)
    assert parsed.payload == source.payload
    assert parsed.padding_length == source.padding_length
    assert (parsed.ssrc, parsed.payload_type) == (0xCAFE, 111)
    assert len(out) == len(packet) + (growth if stampable else 0)
    repaired = rtp.RtpPacket.parse(repair)
    if with_rtx:
        # RFC 4588 §4: OSN, then the payload without the publisher's padding.
        assert (repaired.ssrc, repaired.payload_type) == (0xBB, 97)
        assert repaired.payload == struct.pack("!H", parsed.sequence_number) + source.payload
        assert repaired.padding_length == 0
    else:
        assert len(repair) == len(out)
        assert (repaired.ssrc, repaired.sequence_number, repaired.payload) == (
            0xCAFE,
            parsed.sequence_number,
            source.payload,
        )


# --- the whole path: negotiation, ingest and egress wiring ------------------------------------


def test_a_chromium_viewer_gets_its_own_numbers_from_a_chromium_publisher() -> None:
    """In memory but for the viewer's socket: a Chromium publisher (transport-cc id 3,
    its own numbers from 500) and a Chromium viewer (offered transport-cc as id 3 too):
    the viewer's packets carry the viewer's consecutive numbers, in place of the
    publisher's, and the send log has each of them."""
    harness = Harness()
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(5.0)
    try:
        router = harness.router
        publisher_address = ("127.0.0.1", CLIENT[1] + 1)
        publisher_id, _, now = connect_viewer(
            harness, 0.0, publisher=True, client=publisher_address
        )
        viewer_id, _, now = connect_viewer(harness, now, client=listener.getsockname())
        viewer = router.sessions[viewer_id]
        assert isinstance(viewer, ViewerSession) and viewer.keys is not None
        assert [media.transport_cc_id for media in viewer.egress] == [3, 3]
        slot = viewer.fanout_slot
        assert slot is not None
        # Egress turned it on with a random start; pin it to tell it from the publisher's.
        router.fanout.set_transport_cc(slot, 3, sequence=40000)
        keys = router.sessions[publisher_id].keys
        assert keys is not None
        rtp_out = SrtpSession(keys.profile, keys.remote_key, keys.remote_salt)
        sent: list[bytes] = []
        for index in range(6):
            packet = _vp8(1000 + index, keyframe=index == 0)
            chromium = bytearray(packet[:12]) + bytes.fromhex("bede0001")
            chromium[0] |= 0x10
            chromium += bytes([0x31]) + (500 + index).to_bytes(2, "big") + b"\x00" + packet[12:]
            sent.append(bytes(chromium))
            router.datagram_received(rtp_out.protect(bytes(chromium)), publisher_address, now)
        viewer_in = SrtpSession(viewer.keys.profile, viewer.keys.local_key, viewer.keys.local_salt)
        received: list[bytes] = []
        while len(received) < 6:
            data = listener.recv(2048)
            if not 192 <= data[1] <= 223:  # RTP, not RTCP (RFC 5761 §4)
                received.append(viewer_in.unprotect(data))
    finally:
        listener.close()
        harness.close()
    assert numbers(received, 3) == consecutive(40000, 6)
    # In place: the publisher's element (the same id 3) now holds the viewer's number.
    assert [len(packet) for packet in received] == [len(packet) for packet in sent]
    assert [rtp.RtpPacket.parse(p).payload for p in received] == [p[20:] for p in sent]
    assert all(entry is not None for entry in router.fanout.transport_sent(slot, 40000, 6))
    assert router.fanout.viewer_stats(slot)["transport_cc_stamped"] == 6
