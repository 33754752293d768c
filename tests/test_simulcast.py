"""Simulcast: keyframe-aligned layer switches and VP8 temporal-layer dropping in the
compiled Fanout (loopback sockets, pylibsrtp as the decrypting oracle, virtual time), and
the router's per-layer ingest and automatic layer policy.
"""

from __future__ import annotations

import fractions
import itertools
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import _loopback
import av
import numpy as np
import pytest
from _paths import SDP_FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

from whepfan._fastpath import (
    PAYLOAD_VP8,
    SUBSCRIPTION_AWAITING_KEYFRAME,
    SUBSCRIPTION_FORWARDING,
    SUBSCRIPTION_NONE,
    Fanout,
    SrtpSession,
)
from whepfan.config import MediaConfig
from whepfan.errors import PeerError
from whepfan.media.layers import LayerPolicy, LayerRequest
from whepfan.media.router import Router
from whepfan.media.session import MediaSession
from whepfan.media.streams import StreamEvent
from whepfan.protocol import rtcp, rtp, sdp
from whepfan.protocol.codecs import Vp8PayloadDescriptor
from whepfan.protocol.dtls import DtlsCertificate, DtlsConnected, DtlsSession
from whepfan.protocol.ice import IceConnected, IceControllingChecker

VIDEO_CLOCK = 90000
RECEIVE_TIMEOUT = 5.0  # upper bound for loopback delivery; normally instant
VIEWER_SSRC = 0xCAFE0001
VIEWER_RTX_SSRC = 0xCAFE0002
RTX_PT = 101


# --- a VP8 simulcast source: descriptors per RFC 7741 §4.2 ------------------------------


@dataclass
class Vp8Layer:
    """One simulcast encoding as a publisher sends it: its own SSRC, sequence numbers,
    timestamp base and picture ids (libwebrtc numbers every encoding independently)."""

    ssrc: int
    seq: int
    timestamp: int
    picture_id: int
    tl0_pic_idx: int = 0
    long_picture_id: bool = True  # M bit (RFC 7741 §4.2): 15-bit picture ids, else 7

    def frame(
        self,
        *,
        keyframe: bool = False,
        temporal_layer: int = 0,
        layer_sync: bool = False,
        packets: int = 2,
        ticks: int = 3000,
    ) -> list[tuple[bytes, bool]]:
        """The RTP packets of one picture, each with its "first packet of a keyframe" flag."""
        if temporal_layer == 0:
            self.tl0_pic_idx = (self.tl0_pic_idx + 1) & 0xFF
        self.picture_id = (self.picture_id + 1) & (0x7FFF if self.long_picture_id else 0x7F)
        self.timestamp = (self.timestamp + ticks) & 0xFFFFFFFF
        out = []
        for index in range(packets):
            descriptor = Vp8PayloadDescriptor(
                start_of_partition=index == 0,
                picture_id=self.picture_id,
                long_picture_id=self.long_picture_id,
                tl0_pic_idx=self.tl0_pic_idx,
                temporal_layer=temporal_layer,
                layer_sync=layer_sync,
                non_reference=temporal_layer > 0,
            )
            # RFC 6386 §9.1 frame tag: P bit (bit 0) clear on keyframes.
            body = (b"\x10\x02\x00\x9d\x01\x2a" if keyframe else b"\x11\x02\x00") + bytes(60)
            header = struct.pack(
                "!BBHII",
                0x80,
                (0x80 if index == packets - 1 else 0) | 96,
                self.seq,
                self.timestamp,
                self.ssrc,
            )
            self.seq = (self.seq + 1) & 0xFFFF
            out.append((header + bytes(descriptor) + body, keyframe and index == 0))
        return out


Received = _loopback.Received


class Loopback(_loopback.DescriptorLoopback[Vp8PayloadDescriptor]):
    """The shared loopback harness on a VP8 track."""

    def __init__(self) -> None:
        super().__init__(payload_format=PAYLOAD_VP8, parse_descriptor=Vp8PayloadDescriptor.parse)


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    lb = Loopback()
    yield lb
    lb.close()


def subscribe(lb: Loopback, track: int, *, rtx: bool = False) -> None:
    """Subscribe the viewer; with ``rtx``, it has an RTX stream (RFC 4588) too."""
    if rtx:
        lb.fanout.subscribe(
            lb.slot,
            track,
            ssrc=VIEWER_SSRC,
            payload_type=100,
            rtx_ssrc=VIEWER_RTX_SSRC,
            rtx_payload_type=RTX_PT,
        )
        lb.rtx_payload_type = RTX_PT
    else:
        lb.fanout.subscribe(lb.slot, track, ssrc=VIEWER_SSRC, payload_type=100)


def retransmit(lb: Loopback, track: int, seqs: list[int]) -> list[Received]:
    """NACK the viewer's ``seqs`` (RFC 4585 §6.2.1) and collect what comes back."""
    lb.fanout.resend(lb.slot, track, seqs)
    return lb.receive()


def assert_retransmitted_as_first_sent(resent: list[Received], originals: list[Received]) -> None:
    """Each retransmission is the RTX packet (RFC 4588 §4) of its original as the viewer
    got it: OSN, timestamp, marker and the whole payload, so the VP8 descriptor's picture id
    (and its M-bit width), TL0PICIDX and TID (RFC 7741 §4.2)."""
    assert [r.seq for r in resent] == [o.seq for o in originals]
    for retransmission, original in zip(resent, originals, strict=True):
        assert retransmission.rtx and retransmission.ssrc == VIEWER_RTX_SSRC
        assert not original.rtx and original.ssrc == VIEWER_SSRC
        assert retransmission.descriptor == original.descriptor
        assert retransmission.payload == original.payload
        assert retransmission.timestamp == original.timestamp
        assert retransmission.marker == original.marker


def assert_continuous(received: list[Received]) -> None:
    """One gap-free RTP and VP8 stream: seq +1 per packet (RFC 3550 §5.1), picture id +1
    per picture, TL0PICIDX +1 per TID 0 picture (RFC 7741 §4.2), one SSRC."""
    assert {r.ssrc for r in received} == {VIEWER_SSRC}
    for before, after in itertools.pairwise(received):
        assert after.seq == (before.seq + 1) & 0xFFFF
        new_picture = after.descriptor.start_of_partition
        previous_id = before.descriptor.picture_id
        assert previous_id is not None and after.descriptor.picture_id is not None
        if new_picture:
            # A 7-bit picture id (M clear) shows the low bits of the viewer's 15-bit count.
            narrow = not (before.descriptor.long_picture_id and after.descriptor.long_picture_id)
            mask = 0x7F if narrow else 0x7FFF
            assert after.descriptor.picture_id == ((previous_id + 1) & mask)
            assert before.marker  # the previous picture was complete
            assert after.timestamp != before.timestamp
            assert 0 < (after.timestamp - before.timestamp) & 0xFFFFFFFF < 0x80000000
            expected_tl0 = before.descriptor.tl0_pic_idx
            assert expected_tl0 is not None
            if after.descriptor.temporal_layer == 0:
                expected_tl0 = (expected_tl0 + 1) & 0xFF
            assert after.descriptor.tl0_pic_idx == expected_tl0
        else:
            assert after.descriptor.picture_id == previous_id
            assert after.timestamp == before.timestamp


# --- keyframe-aligned switching ----------------------------------------------------------


def test_switch_waits_for_the_target_keyframe_and_continues_seq_ts_and_picture_ids(
    loopback: Loopback,
) -> None:
    low, high = loopback.add_layer(), loopback.add_layer()
    subscribe(loopback, low)
    low_source = Vp8Layer(ssrc=0x1000, seq=100, timestamp=5_000, picture_id=7000)
    high_source = Vp8Layer(ssrc=0x2000, seq=61_000, timestamp=4_000_000_000, picture_id=12)
    now = 10.0
    loopback.push(low, low_source.frame(keyframe=True), now)
    loopback.push(high, high_source.frame(keyframe=True), now)
    for _ in range(3):
        now += 1 / 30
        loopback.push(low, low_source.frame(), now)
        loopback.push(high, high_source.frame(), now)
    before = loopback.receive()
    assert len(before) == 8

    loopback.fanout.switch(loopback.slot, low, high)
    assert loopback.fanout.subscription_state(loopback.slot, high) == SUBSCRIPTION_AWAITING_KEYFRAME
    # Until the high layer's keyframe passes, the viewer stays on the low layer.
    now += 1 / 30
    loopback.push(high, high_source.frame(), now)
    loopback.push(low, low_source.frame(), now)
    middle = loopback.receive()
    assert len(middle) == 2
    assert loopback.fanout.take_switches() == []
    last_low_at = now

    now += 0.2  # the keyframe arrives 200 ms after the viewer's last packet
    loopback.push(high, high_source.frame(keyframe=True, packets=3), now)
    loopback.push(low, low_source.frame(), now)  # no longer forwarded
    now += 1 / 30
    loopback.push(high, high_source.frame(), now)
    after = loopback.receive()
    assert len(after) == 5
    assert loopback.fanout.take_switches() == [(loopback.slot, low, high)]
    assert loopback.fanout.subscription_state(loopback.slot, low) == SUBSCRIPTION_NONE
    assert loopback.fanout.subscription_state(loopback.slot, high) == SUBSCRIPTION_FORWARDING

    stream = before + middle + after
    switch_point = stream[10]
    last_low = stream[9]
    assert switch_point.descriptor.picture_id == (last_low.descriptor.picture_id or 0) + 1
    assert_continuous(stream)
    # The timestamp advanced by the real elapsed time (0.2 s of the 90 kHz clock).
    assert (switch_point.timestamp - last_low.timestamp) & 0xFFFFFFFF == round(
        (now - 1 / 30 - last_low_at) * VIDEO_CLOCK
    )
    stats = loopback.fanout.stats()
    assert stats["switches_completed"] == 1


def test_switch_can_be_cancelled_and_retargeted(loopback: Loopback) -> None:
    layers = [loopback.add_layer() for _ in range(3)]
    sources = [
        Vp8Layer(ssrc=0x100 * (i + 1), seq=1000 * i, timestamp=9000 * i, picture_id=300 * i)
        for i in range(3)
    ]
    subscribe(loopback, layers[1])
    now = 0.0
    for track, source in zip(layers, sources, strict=True):
        loopback.push(track, source.frame(keyframe=True), now)
    loopback.fanout.switch(loopback.slot, layers[1], layers[2])
    loopback.fanout.unsubscribe(loopback.slot, layers[2])  # changed our mind
    loopback.fanout.switch(loopback.slot, layers[1], layers[0])
    with pytest.raises(ValueError):
        loopback.fanout.switch(loopback.slot, layers[1], layers[0])  # already pending
    with pytest.raises(ValueError):
        loopback.fanout.switch(loopback.slot, layers[1], layers[1])
    with pytest.raises(KeyError):
        loopback.fanout.switch(loopback.slot, layers[2], layers[0])  # not subscribed there
    now += 0.5
    loopback.push(layers[2], sources[2].frame(keyframe=True), now)  # cancelled: ignored
    loopback.push(layers[0], sources[0].frame(keyframe=True), now)
    stream = loopback.receive()
    assert len(stream) == 4
    assert_continuous(stream)
    assert loopback.fanout.take_switches() == [(loopback.slot, layers[1], layers[0])]


def test_switch_before_any_packet_was_sent_starts_cleanly(loopback: Loopback) -> None:
    low, high = loopback.add_layer(), loopback.add_layer()
    subscribe(loopback, low)
    loopback.fanout.switch(loopback.slot, low, high)
    source = Vp8Layer(ssrc=1, seq=5, timestamp=5, picture_id=5)
    loopback.push(high, source.frame(keyframe=True), 1.0)
    loopback.push(high, source.frame(), 1.1)
    stream = loopback.receive()
    assert len(stream) == 4
    assert_continuous(stream)


def test_nack_after_a_switch_resends_only_what_the_new_layer_sent(loopback: Loopback) -> None:
    low, high = loopback.add_layer(), loopback.add_layer()
    subscribe(loopback, low)
    low_source = Vp8Layer(ssrc=1, seq=10, timestamp=0, picture_id=0)
    high_source = Vp8Layer(ssrc=2, seq=40_000, timestamp=0, picture_id=0)
    loopback.push(low, low_source.frame(keyframe=True), 0.0)
    loopback.push(high, high_source.frame(), 0.0)
    loopback.fanout.switch(loopback.slot, low, high)
    loopback.push(high, high_source.frame(keyframe=True), 0.1)
    stream = loopback.receive()
    assert len(stream) == 4
    # The viewer's seqs of the high layer map into its cache; the earlier ones belonged
    # to the low layer, whose numbers mean other packets in the high layer's cache.
    resent = loopback.fanout.resend(loopback.slot, high, [stream[2].seq, stream[3].seq])
    assert resent == 2
    assert loopback.fanout.resend(loopback.slot, high, [stream[0].seq]) == 0
    loopback.inbound = loopback.fresh_inbound()
    again = loopback.receive()
    assert [r.seq for r in again] == [stream[2].seq, stream[3].seq]


def test_a_retransmission_after_a_switch_carries_the_viewers_picture_ids(
    loopback: Loopback,
) -> None:
    """q -> h: the viewer's picture ids and TL0PICIDX continue from q's (RFC 7741 §4.2);
    a NACKed packet of h comes back with those, not h's own, and in h's 7-bit width."""
    low, high = loopback.add_layer(), loopback.add_layer()
    subscribe(loopback, low, rtx=True)
    low_source = Vp8Layer(ssrc=1, seq=10, timestamp=0, picture_id=0x7FF0, tl0_pic_idx=40)
    high_source = Vp8Layer(
        ssrc=2, seq=40_000, timestamp=0, picture_id=90, tl0_pic_idx=200, long_picture_id=False
    )
    now = 0.0
    loopback.push(low, low_source.frame(keyframe=True), now)
    loopback.push(high, high_source.frame(keyframe=True), now)
    for _ in range(3):
        now += 1 / 30
        loopback.push(low, low_source.frame(), now)
        loopback.push(high, high_source.frame(), now)
    loopback.fanout.switch(loopback.slot, low, high)
    now += 1 / 30
    loopback.push(high, high_source.frame(keyframe=True, packets=3), now)
    for temporal_layer in (2, 1, 2, 0):
        now += 1 / 30
        loopback.push(high, high_source.frame(temporal_layer=temporal_layer), now)
    stream = loopback.receive()
    assert loopback.fanout.take_switches() == [(loopback.slot, low, high)]
    assert_continuous(stream)
    before, after = stream[:8], stream[8:]
    assert after[0].descriptor.picture_id == ((before[-1].descriptor.picture_id or 0) + 1) & 0x7F
    assert after[0].descriptor.tl0_pic_idx == (before[-1].descriptor.tl0_pic_idx or 0) + 1
    assert not after[0].descriptor.long_picture_id

    resent = retransmit(loopback, high, [r.seq for r in after])
    assert_retransmitted_as_first_sent(resent, after)
    # From before the switch: other packets under the high layer's numbers, so misses.
    assert retransmit(loopback, high, [before[-1].seq]) == []
    assert loopback.fanout.viewer_stats(loopback.slot)["resend_misses"] == 1


class Vp8Encoding:
    """A real VP8 encoding (PyAV/libvpx) of a moving picture, packetised per RFC 7741 into
    ``chunk``-byte pieces, each picture with its picture id and TL0PICIDX (all TID 0)."""

    def __init__(self, width: int, height: int, source: Vp8Layer, chunk: int = 48) -> None:
        self.width, self.height, self.source, self.chunk = width, height, source, chunk
        self.encoder: Any = av.CodecContext.create("libvpx", "w")
        self.encoder.width, self.encoder.height = width, height
        self.encoder.pix_fmt = "yuv420p"
        self.encoder.time_base = fractions.Fraction(1, FPS)
        self.encoder.gop_size = 100_000  # keyframes on request only
        self.encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        self.index = 0

    def frame(self, *, keyframe: bool = False) -> list[tuple[bytes, bool]]:
        image = np.full((self.height, self.width, 3), (self.index * 9) % 256, dtype=np.uint8)
        image[:, (self.index * 5) % self.width :][:, :6] = 255
        picture = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        picture.pts = self.index
        if keyframe or self.index == 0:
            picture.pict_type = av.video.frame.PictureType.I
        self.index += 1
        (packet,) = self.encoder.encode(picture)
        data = bytes(packet)
        source = self.source
        source.tl0_pic_idx = (source.tl0_pic_idx + 1) & 0xFF
        source.picture_id = (source.picture_id + 1) & 0x7FFF
        source.timestamp = (source.timestamp + VIDEO_CLOCK // FPS) & 0xFFFFFFFF
        chunks = [data[i : i + self.chunk] for i in range(0, len(data), self.chunk)]
        out = []
        for index, piece in enumerate(chunks):
            descriptor = Vp8PayloadDescriptor(
                start_of_partition=index == 0,
                picture_id=source.picture_id,
                tl0_pic_idx=source.tl0_pic_idx,
                temporal_layer=0,
            )
            header = struct.pack(
                "!BBHII",
                0x80,
                (0x80 if index == len(chunks) - 1 else 0) | 96,
                source.seq,
                source.timestamp,
                source.ssrc,
            )
            source.seq = (source.seq + 1) & 0xFFFF
            out.append((header + bytes(descriptor) + piece, packet.is_keyframe and index == 0))
        return out


def depacketize_and_decode(packets: list[Received]) -> list[Any]:
    """What a receiver makes of the viewer's packets (sequence order, RFC 7741 §4.5): a
    frame runs from a start of partition 0 to the marker, every packet of it under one
    picture id and timestamp (libwebrtc's packet buffer and VP8 reference finder key
    frames by them), picture ids +1 per frame; then libvpx decodes each frame."""
    decoder = av.CodecContext.create("vp8", "r")
    images: list[Any] = []
    frame: list[Received] = []
    previous_id: int | None = None
    for packet in packets:
        descriptor = packet.descriptor
        if descriptor.start_of_partition and descriptor.partition_index == 0:
            assert not frame, "a frame began before the last one ended"
        frame.append(packet)
        if not packet.marker:
            continue
        ids = {p.descriptor.picture_id for p in frame}
        assert len(ids) == 1, f"one frame under picture ids {ids}"
        assert len({p.timestamp for p in frame}) == 1
        (picture_id,) = ids
        assert picture_id is not None
        if previous_id is not None:
            assert picture_id == (previous_id + 1) & 0x7FFF
        previous_id = picture_id
        data = b"".join(Vp8PayloadDescriptor.split(p.payload)[1] for p in frame)
        images.extend(image.to_ndarray(format="rgb24") for image in decoder.decode(av.Packet(data)))
        frame = []
    return images


def test_a_retransmission_that_replaces_a_lost_packet_after_a_switch_decodes(
    loopback: Loopback,
) -> None:
    """Real VP8 (libvpx) on two layers, q -> h: the viewer loses the first packet of
    frames after the switch, NACKs them, and the RTX packets (RFC 4588 §4) put in their
    places give a stream that depacketises under the viewer's picture ids and decodes to
    exactly the pictures of the loss-free stream."""
    low, high = loopback.add_layer(), loopback.add_layer()
    subscribe(loopback, low, rtx=True)
    q = Vp8Encoding(160, 96, Vp8Layer(ssrc=1, seq=65_520, timestamp=0, picture_id=0x7FF8))
    h = Vp8Encoding(320, 192, Vp8Layer(ssrc=2, seq=500, timestamp=0, picture_id=40))
    now = 0.0
    for _ in range(4):
        loopback.push(low, q.frame(), now)
        loopback.push(high, h.frame(), now)
        now += 1 / FPS
    loopback.fanout.switch(loopback.slot, low, high)
    loopback.push(low, q.frame(), now)
    loopback.push(high, h.frame(keyframe=True), now)
    for _ in range(5):
        now += 1 / FPS
        loopback.push(low, q.frame(), now)
        loopback.push(high, h.frame(), now)
    stream = loopback.receive()
    assert loopback.fanout.take_switches() == [(loopback.slot, low, high)]
    assert_continuous(stream)
    expected = depacketize_and_decode(stream)
    assert [image.shape[:2] for image in expected] == [(96, 160)] * 5 + [(192, 320)] * 6

    starts = [
        i
        for i, r in enumerate(stream)
        if r.descriptor.start_of_partition and i > 0 and stream[i - 1].marker
    ]
    lost = starts[-6:]  # the first packet of the keyframe and of every frame after it
    resent = retransmit(loopback, high, [stream[i].seq for i in lost])
    assert [r.seq for r in resent] == [stream[i].seq for i in lost]
    repaired = list(stream)
    for index, retransmission in zip(lost, resent, strict=True):
        repaired[index] = retransmission
    decoded = depacketize_and_decode(repaired)
    assert len(decoded) == len(expected)
    assert all((got == want).all() for got, want in zip(decoded, expected, strict=True))
    assert_retransmitted_as_first_sent(resent, [stream[i] for i in lost])


# --- VP8 temporal layers ------------------------------------------------------------------

# The L1T3 pattern libwebrtc uses (TID per picture, repeating every four pictures).
L1T3 = (0, 2, 1, 2)


def test_temporal_limit_drops_upper_layers_and_keeps_the_vp8_stream_valid(
    loopback: Loopback,
) -> None:
    track = loopback.add_layer()
    subscribe(loopback, track)
    source = Vp8Layer(ssrc=9, seq=65_530, timestamp=0, picture_id=0x7FFA, tl0_pic_idx=254)
    now = 0.0
    loopback.push(track, source.frame(keyframe=True), now)
    loopback.fanout.set_temporal_layer(loopback.slot, track, 0)
    for index in range(1, 16):
        now += 1 / 30
        loopback.push(track, source.frame(temporal_layer=L1T3[index % 4]), now)
    stream = loopback.receive()
    # 4 TL0 pictures (the keyframe and every fourth) x 2 packets; seq and picture id wrap.
    assert len(stream) == 8
    assert all(r.descriptor.temporal_layer == 0 for r in stream)
    assert_continuous(stream)
    assert loopback.fanout.stats()["dropped_temporal_layer"] == 24

    # Back up to all layers: only from the next TID 0 picture (TL1/TL2 reference it).
    loopback.fanout.set_temporal_layer(loopback.slot, track, -1)
    for index in range(16, 28):
        now += 1 / 30
        loopback.push(track, source.frame(temporal_layer=L1T3[index % 4]), now)
    upper = loopback.receive()
    assert [r.descriptor.temporal_layer for r in upper[::2]] == [0, 2, 1, 2] * 3
    assert_continuous(stream + upper)


def test_a_layer_sync_picture_allows_an_early_upswitch(loopback: Loopback) -> None:
    track = loopback.add_layer()
    subscribe(loopback, track)
    source = Vp8Layer(ssrc=9, seq=0, timestamp=0, picture_id=0)
    loopback.push(track, source.frame(keyframe=True), 0.0)
    loopback.fanout.set_temporal_layer(loopback.slot, track, 0)
    loopback.push(track, source.frame(temporal_layer=2), 0.1)
    loopback.fanout.set_temporal_layer(loopback.slot, track, 1)
    loopback.push(track, source.frame(temporal_layer=2, layer_sync=True), 0.2)  # above 1
    loopback.push(track, source.frame(temporal_layer=1, layer_sync=True), 0.3)
    stream = loopback.receive()
    assert [r.descriptor.temporal_layer for r in stream[::2]] == [0, 1]
    assert_continuous(stream)


def test_nacks_for_packets_before_a_temporal_drop_are_misses(loopback: Loopback) -> None:
    track = loopback.add_layer()
    subscribe(loopback, track)
    source = Vp8Layer(ssrc=9, seq=0, timestamp=0, picture_id=0)
    loopback.fanout.set_temporal_layer(loopback.slot, track, 0)
    loopback.push(track, source.frame(keyframe=True), 0.0)
    loopback.push(track, source.frame(temporal_layer=1), 0.1)  # dropped: offsets shift
    loopback.push(track, source.frame(temporal_layer=0), 0.2)
    stream = loopback.receive()
    assert len(stream) == 4
    assert loopback.fanout.resend(loopback.slot, track, [stream[0].seq]) == 0
    assert loopback.fanout.resend(loopback.slot, track, [stream[3].seq]) == 1
    loopback.inbound = loopback.fresh_inbound()
    assert [r.seq for r in loopback.receive()] == [stream[3].seq]


def test_a_retransmission_after_temporal_dropping_carries_the_shrunk_picture_ids(
    loopback: Loopback,
) -> None:
    """Dropped TL1/TL2 pictures shrink the viewer's picture ids; a NACKed packet of a
    later picture comes back with the shrunk id, also once the limit is raised and the
    viewer gets TL2 again, and a TL2 packet it got stays resendable after the limit is
    lowered, until a dropped packet moves the offsets (then older ones are misses)."""
    track = loopback.add_layer()
    subscribe(loopback, track, rtx=True)
    source = Vp8Layer(ssrc=9, seq=65_500, timestamp=0, picture_id=0x7FF0, tl0_pic_idx=250)
    now = 0.0
    loopback.push(track, source.frame(keyframe=True), now)
    loopback.fanout.set_temporal_layer(loopback.slot, track, 0)
    for index in range(1, 13):
        now += 1 / 30
        loopback.push(track, source.frame(temporal_layer=L1T3[index % 4]), now)
    limited = loopback.receive()
    assert len(limited) == 8
    assert_continuous(limited)
    last_picture = limited[-2:]
    resent = retransmit(loopback, track, [r.seq for r in last_picture])
    assert_retransmitted_as_first_sent(resent, last_picture)

    loopback.fanout.set_temporal_layer(loopback.slot, track, -1)
    for index in range(16, 20):  # from the next TL0 picture on, all are sent
        now += 1 / 30
        loopback.push(track, source.frame(temporal_layer=L1T3[index % 4]), now)
    upper = loopback.receive()
    assert [r.descriptor.temporal_layer for r in upper[::2]] == [0, 2, 1, 2]
    assert_continuous(limited + upper)
    resent = retransmit(loopback, track, [r.seq for r in last_picture + upper])
    assert_retransmitted_as_first_sent(resent, last_picture + upper)

    # Lowered at the next picture: the TL2 packets the viewer got are still its packets.
    loopback.fanout.set_temporal_layer(loopback.slot, track, 0)
    now += 1 / 30
    loopback.push(track, source.frame(temporal_layer=0), now)
    tl0 = loopback.receive()
    resent = retransmit(loopback, track, [r.seq for r in upper[-2:] + tl0])
    assert_retransmitted_as_first_sent(resent, upper[-2:] + tl0)
    now += 1 / 30
    loopback.push(track, source.frame(temporal_layer=2), now)  # dropped: offsets move
    assert loopback.receive() == []
    assert retransmit(loopback, track, [r.seq for r in upper[-2:] + tl0]) == []
    assert loopback.fanout.viewer_stats(loopback.slot)["resend_misses"] == 4


def test_a_late_packet_dropped_for_its_temporal_layer_is_never_retransmitted(
    loopback: Loopback,
) -> None:
    """A TL2 packet that arrives after the next picture went out is dropped without
    renumbering, which leaves a gap in the viewer's sequence numbers. The viewer NACKs
    that gap: the cached packet there is one it never got, and sent now it would carry
    the picture id of the picture before it. So: a miss, and nothing sent."""
    track = loopback.add_layer()
    subscribe(loopback, track, rtx=True)
    source = Vp8Layer(ssrc=9, seq=100, timestamp=0, picture_id=50, tl0_pic_idx=5)
    loopback.fanout.set_temporal_layer(loopback.slot, track, 0)
    loopback.push(track, source.frame(keyframe=True), 0.0)
    upper = source.frame(temporal_layer=2)
    loopback.push(track, upper[:1], 0.1)  # dropped in order: the numbers close up
    later = source.frame(temporal_layer=0)
    loopback.push(track, later, 0.2)
    loopback.push(track, upper[1:], 0.2)  # reordered behind the TL0 picture: dropped late
    stream = loopback.receive()
    assert [r.descriptor.temporal_layer for r in stream] == [0, 0, 0, 0]
    gap = (stream[2].seq - 1) & 0xFFFF
    assert gap == (stream[1].seq + 1) & 0xFFFF
    assert retransmit(loopback, track, [gap]) == []
    assert loopback.fanout.viewer_stats(loopback.slot)["resend_misses"] == 1
    # The packets the viewer did get after it are still resent, as it got them.
    resent = retransmit(loopback, track, [r.seq for r in stream[2:]])
    assert_retransmitted_as_first_sent(resent, stream[2:])


def test_the_offset_floors_follow_the_stream_past_half_the_sequence_space(
    loopback: Loopback,
) -> None:
    """After one temporal drop and no more (limit raised again), the floor it set must not
    come to read as ahead of the stream: RFC 3550 §A.1 serial arithmetic orders numbers
    less than 2^15 apart, so 32,768 packets later a floor left where it was would turn
    every live packet "stale" and every NACK a miss. 40,000 packets go through whole."""
    track = loopback.add_layer()
    subscribe(loopback, track, rtx=True)
    source = Vp8Layer(ssrc=9, seq=100, timestamp=0, picture_id=0)
    loopback.fanout.set_temporal_layer(loopback.slot, track, 0)
    loopback.push(track, source.frame(keyframe=True), 0.0)
    upper = source.frame(temporal_layer=2)
    loopback.push(track, upper[:1], 0.01)  # dropped: the floor moves
    loopback.push(track, source.frame(temporal_layer=0), 0.02)
    loopback.push(track, upper[1:], 0.02)  # dropped late: the resend floor moves
    loopback.fanout.set_temporal_layer(loopback.slot, track, -1)
    assert len(loopback.receive()) == 4
    received = 0
    now = 0.03
    for _ in range(800):  # drained every 50 packets: well inside the socket's buffer
        for _ in range(25):
            now += 0.001
            loopback.push(track, source.frame(packets=2), now)
        received += len(loopback.receive())
    assert loopback.fanout.stats()["dropped_stale"] == 0
    assert received == 40_000
    recent = loopback.fanout.resend(loopback.slot, track, [(source.seq - 1 - 0x8000) & 0xFFFF])
    assert recent == 0  # long gone from the cache
    # The newest packets are resendable as sent.
    loopback.push(track, source.frame(packets=2), now + 0.001)
    last = loopback.receive()
    assert_retransmitted_as_first_sent(retransmit(loopback, track, [r.seq for r in last]), last)


# Per picture: TID, layer sync, packets, and which of the viewer's packets it NACKs
# afterwards (that many back from the newest it got).
pictures = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.booleans(),
        st.integers(1, 3),
        st.lists(st.integers(0, 8), max_size=3),
    ),
    min_size=1,
    max_size=40,
)
limit_changes = st.dictionaries(st.integers(0, 39), st.integers(-1, 2), max_size=6)


@settings(max_examples=60, deadline=None)
@given(
    pictures=pictures,
    limits=limit_changes,
    switch_at=st.integers(0, 40),
    narrow_b=st.booleans(),
)
def test_any_mix_of_limits_and_a_switch_yields_one_valid_vp8_stream(
    pictures: list[tuple[int, bool, int, list[int]]],
    limits: dict[int, int],
    switch_at: int,
    narrow_b: bool,
) -> None:
    """Hypothesis: whatever the temporal pattern, limit changes and layer switch, the viewer
    gets a gap-free stream of complete pictures, none above the limit in force; and any
    NACKed packet that is resent comes back exactly as the viewer first got it."""
    lb = Loopback()
    stream: list[Received] = []
    first_sent: dict[int, Received] = {}

    def collect(expected_rtx: int = 0) -> None:
        rtx = 0
        for received in lb.receive():
            if received.rtx:
                assert_retransmitted_as_first_sent([received], [first_sent[received.seq]])
                rtx += 1
            else:
                stream.append(received)
                first_sent[received.seq] = received
        assert rtx == expected_rtx

    try:
        a, b = lb.add_layer(), lb.add_layer()
        subscribe(lb, a, rtx=True)
        sources = {
            a: Vp8Layer(ssrc=1, seq=65_000, timestamp=1, picture_id=0x7F00, tl0_pic_idx=250),
            b: Vp8Layer(
                ssrc=2,
                seq=3,
                timestamp=2**32 - 10,
                picture_id=3,
                tl0_pic_idx=7,
                long_picture_id=not narrow_b,
            ),
        }
        current, now = a, 0.0
        lb.push(a, sources[a].frame(keyframe=True), now)
        lb.push(b, sources[b].frame(keyframe=True), now)
        limit = -1
        for index, (temporal_layer, sync, packets, nacks) in enumerate(pictures):
            now += 1 / 30
            if index in limits:
                limit = limits[index]
                for track in (a, b):
                    if lb.fanout.subscription_state(lb.slot, track) != SUBSCRIPTION_NONE:
                        lb.fanout.set_temporal_layer(lb.slot, track, limit)
            if index == switch_at:
                lb.fanout.switch(lb.slot, current, b if current == a else a)
            keyframe = index % 10 == 9
            for track, source in sources.items():
                lb.push(
                    track,
                    source.frame(
                        keyframe=keyframe,
                        temporal_layer=0 if keyframe else temporal_layer,
                        layer_sync=sync,
                        packets=packets,
                    ),
                    now,
                )
            for _, _, to_track in lb.fanout.take_switches():
                current = to_track
            if nacks:
                collect()
                seqs = [stream[-1 - back].seq for back in nacks if back < len(stream)]
                collect(expected_rtx=lb.fanout.resend(lb.slot, current, seqs))
        collect()
        assert stream, "the first keyframe always reaches the viewer"
        assert_continuous(stream)
        assert stream[-1].marker
    finally:
        lb.close()


# --- the router with a simulcast publisher, on virtual time ---------------------------------
#
# The publisher and the viewer are whepfan's own client-side protocol objects (ICE
# controlling checker, DTLS client) talking to the Router in memory; the publisher sends
# three real VP8 encodings (PyAV/libvpx at three sizes) with RID header extensions, as
# Chromium does. Only the Fanout's output is real UDP, to the viewer's loopback socket,
# where it is decrypted and decoded.

SIMULCAST_OFFER = (SDP_FIXTURES / "chromium-156-whip-simulcast-offer.sdp").read_text()
WHEP_OFFER = (SDP_FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()
SERVER = ("127.0.0.1", 40000)  # what the clients believe; the router never binds it
PUBLISHER = ("127.0.0.1", 50002)
# The fixture's a=extmap ids (RFC 8285 §5) and payload type.
EXT_MID, EXT_RID = 4, 10
VP8_PT = 96
LAYER_SIZES = {"q": (160, 96), "h": (320, 192), "f": (640, 384)}
FPS = 30


class RouterHarness:
    def __init__(self, policy: LayerPolicy | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.events: list[StreamEvent] = []
        self.router = Router(
            config=MediaConfig(udp_host="127.0.0.1", udp_port=0, keyframe_request_interval=0.1),
            certificate=DtlsCertificate.generate(),
            fanout=Fanout(self.sock.fileno(), max_viewers=8),
            send=lambda data, addr: self.sent.append((data, addr)),
            candidates=[sdp.Candidate.parse("1 1 udp 2130706431 127.0.0.1 40000 typ host")],
            layer_policy=policy or LayerPolicy(),
        )
        self.router.add_listener(self.events.append)

    def take_sent(self, addr: tuple[str, int]) -> list[bytes]:
        mine = [data for data, to in self.sent if to == addr]
        self.sent = [(data, to) for data, to in self.sent if to != addr]
        return mine

    def close(self) -> None:
        self.sock.close()


@dataclass
class Peer:
    """A connected client: its address and SRTP keys."""

    session_id: str
    address: tuple[str, int]
    protect: SrtpSession  # what it sends (RTP from a publisher, SRTCP from a viewer)
    unprotect: SrtpSession  # what it receives


def connect(h: RouterHarness, offer: str, address: tuple[str, int], *, publish: bool) -> Peer:
    """ICE (controlling, RFC 8445) and DTLS (client, RFC 6347) against the router."""
    certificate = DtlsCertificate.generate()
    algorithm, value = certificate.fingerprints[0]
    offer = re.sub(r"a=fingerprint:\S+ \S+", f"a=fingerprint:{algorithm} {value}", offer)
    session: MediaSession
    if publish:
        session, answer = h.router.publish("live", offer, 0.0)
    else:
        session, answer = h.router.view("live", offer, 0.0)
    ufrag = re.search(r"a=ice-ufrag:(\S+)", offer)
    pwd = re.search(r"a=ice-pwd:(\S+)", offer)
    assert ufrag and pwd
    checker = IceControllingChecker(
        local_ufrag=ufrag.group(1),
        local_pwd=pwd.group(1),
        remote_ufrag=session.local_ufrag,
        remote_pwd=session.local_pwd,
        remote_candidates=[SERVER],
    )
    fingerprints = re.findall(r"a=fingerprint:(\S+) (\S+)", answer)
    dtls = DtlsSession(certificate=certificate, role="client", remote_fingerprints=fingerprints)
    now = 0.0
    for _ in range(200):
        request = checker.next_request(now)
        if request is not None:
            h.router.datagram_received(request[0], address, now)
            for response in h.take_sent(address):
                checker.receive_stun(response, SERVER, now)
        while (ice_event := checker.next_event()) is not None:
            if isinstance(ice_event, IceConnected):
                dtls.start(now)
        for datagram in dtls.datagrams_to_send():
            h.router.datagram_received(datagram, address, now)
        for datagram in h.take_sent(address):
            dtls.receive(datagram, now)
        while (event := dtls.next_event()) is not None:
            if isinstance(event, DtlsConnected):
                for datagram in dtls.datagrams_to_send():
                    h.router.datagram_received(datagram, address, now)
                return Peer(
                    session_id=session.id,
                    address=address,
                    protect=SrtpSession(event.profile, event.local_key, event.local_salt),
                    unprotect=SrtpSession(event.profile, event.remote_key, event.remote_salt),
                )
        now += 0.05
    raise AssertionError("no connection")


@dataclass
class Encoding:
    """One simulcast encoding of the test publisher (its own SSRC and numbering)."""

    rid: str
    width: int
    height: int
    encoder: Any  # av VideoCodecContext (libvpx)
    ssrc: int
    seq: int
    timestamp: int
    picture_id: int
    force_keyframe: bool = True


class SimulcastPublisher:
    """Three VP8 encodings of one moving picture, packetised per RFC 7741 with the MID and
    RID header extensions (RFC 8285 one-byte form; RFC 8852 §3.1) on every packet."""

    def __init__(self, h: RouterHarness, peer: Peer) -> None:
        self.h, self.peer = h, peer
        self.frame_index = 0
        self.keyframe_requests: list[str] = []
        self.encodings: list[Encoding] = []
        for number, (rid, (width, height)) in enumerate(LAYER_SIZES.items()):
            encoder: Any = av.CodecContext.create("libvpx", "w")
            encoder.width, encoder.height = width, height
            encoder.pix_fmt = "yuv420p"
            encoder.time_base = fractions.Fraction(1, FPS)
            encoder.gop_size = 100_000  # keyframes on request only (PLI), like a browser
            encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
            self.encodings.append(
                Encoding(
                    rid=rid,
                    width=width,
                    height=height,
                    encoder=encoder,
                    ssrc=0x5100 + number,
                    seq=1000 * (number + 1),
                    timestamp=77_777 * (number + 1),
                    picture_id=100 * number,
                )
            )

    def _rtp(self, encoding: Encoding, payload: bytes, marker: bool) -> bytes:
        elements = [(EXT_MID, b"1"), (EXT_RID, encoding.rid.encode())]
        body = b"".join(bytes([(i << 4) | (len(v) - 1)]) + v for i, v in elements)
        body += bytes(-len(body) % 4)
        header = struct.pack(
            "!BBHII",
            0x90,  # V=2, X=1
            (0x80 if marker else 0) | VP8_PT,
            encoding.seq,
            encoding.timestamp,
            encoding.ssrc,
        )
        encoding.seq = (encoding.seq + 1) & 0xFFFF
        return header + struct.pack("!HH", 0xBEDE, len(body) // 4) + body + payload

    def send_frame(self, now: float) -> None:
        self.handle_feedback()
        for encoding in self.encodings:
            width, height = encoding.width, encoding.height
            image = np.full((height, width, 3), (self.frame_index * 7) % 256, dtype=np.uint8)
            image[:, (self.frame_index * 4) % width :][:, :8] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts = self.frame_index
            if encoding.force_keyframe:
                frame.pict_type = av.video.frame.PictureType.I
                encoding.force_keyframe = False
            for packet in encoding.encoder.encode(frame):
                data = bytes(packet)
                encoding.picture_id = (encoding.picture_id + 1) & 0x7FFF
                chunks = [data[i : i + 900] for i in range(0, len(data), 900)]
                for index, chunk in enumerate(chunks):
                    descriptor = Vp8PayloadDescriptor(
                        start_of_partition=index == 0, picture_id=encoding.picture_id
                    )
                    rtp_packet = self._rtp(
                        encoding, bytes(descriptor) + chunk, index == len(chunks) - 1
                    )
                    srtp = self.peer.protect.protect(rtp_packet)
                    self.h.router.datagram_received(srtp, self.peer.address, now)
            encoding.timestamp = (encoding.timestamp + 90000 // FPS) & 0xFFFFFFFF
        self.frame_index += 1

    def handle_feedback(self) -> None:
        """PLIs from the router (RFC 4585 §6.3.1) make that encoding send a keyframe."""
        by_ssrc = {encoding.ssrc: encoding for encoding in self.encodings}
        for datagram in self.h.take_sent(self.peer.address):
            for packet in rtcp.parse_compound(self.peer.unprotect.unprotect_rtcp(datagram)):
                if isinstance(packet, rtcp.PictureLossIndication):
                    encoding = by_ssrc.get(packet.media_ssrc)
                    if encoding is not None:
                        encoding.force_keyframe = True
                        self.keyframe_requests.append(encoding.rid)


class DecodingViewer:
    """A viewer socket: SRTP off, RFC 7741 depacketisation, libvpx decoding."""

    def __init__(self, h: RouterHarness) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.peer = connect(h, WHEP_OFFER, self.sock.getsockname(), publish=False)
        self.decoder = av.CodecContext.create("vp8", "r")
        self.packets: list[rtp.RtpPacket] = []
        self.frame_data = b""
        self.widths: list[int] = []

    def drain(self) -> None:
        while True:
            try:
                datagram = self.sock.recv(4096)
            except BlockingIOError:
                return
            if datagram[1] in (200, 201):  # an SR relayed from the publisher: not media
                continue
            packet = rtp.RtpPacket.parse(self.peer.unprotect.unprotect(datagram))
            if packet.payload_type != VP8_PT:
                continue
            self.packets.append(packet)
            descriptor, data = Vp8PayloadDescriptor.split(packet.payload)
            if descriptor.start_of_partition and descriptor.partition_index == 0:
                self.frame_data = b""
            self.frame_data += data
            if packet.marker:
                for frame in self.decoder.decode(av.Packet(self.frame_data)):
                    self.widths.append(frame.width)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def simulcast() -> Iterator[tuple[RouterHarness, SimulcastPublisher, DecodingViewer]]:
    h = RouterHarness()
    publisher = SimulcastPublisher(h, connect(h, SIMULCAST_OFFER, PUBLISHER, publish=True))
    now = 0.0
    for _ in range(3):  # every layer bound (by RID) and measured before the viewer comes
        publisher.send_frame(now)
        now += 1 / FPS
    viewer = DecodingViewer(h)
    yield h, publisher, viewer
    viewer.close()
    h.close()


def run(
    h: RouterHarness,
    publisher: SimulcastPublisher,
    viewer: DecodingViewer,
    start: float,
    frames: int,
) -> float:
    now = start
    for _ in range(frames):
        publisher.send_frame(now)
        h.router.handle_timer(now)
        viewer.drain()
        now += 1 / FPS
    return now


def test_simulcast_layers_are_bound_by_rid_and_measured(
    simulcast: tuple[RouterHarness, SimulcastPublisher, DecodingViewer],
) -> None:
    h, publisher, viewer = simulcast
    run(h, publisher, viewer, 0.1, 40)
    stream = h.router.streams["live"]
    layers = stream.layers()
    assert [t.rid for t in layers] == ["q", "h", "f"]  # ordered by measured size
    assert [(t.width, t.height) for t in layers] == list(LAYER_SIZES.values())
    assert h.router.counters["drop_ingest_unknown_ssrc"] == 0
    video = h.router.stream_layers("live", 1.4)["1"]
    assert isinstance(video, list)
    assert [(layer["rid"], layer["width"]) for layer in video] == [
        ("q", 160),
        ("h", 320),
        ("f", 640),
    ]
    assert all(layer["bitrate"] > 0 for layer in video)
    assert any(e.type == "layers" for e in h.events)
    # New viewers start on the middle layer.
    assert viewer.widths and set(viewer.widths) == {320}


def test_a_viewer_switches_low_high_low_without_gaps_or_decode_errors(
    simulcast: tuple[RouterHarness, SimulcastPublisher, DecodingViewer],
) -> None:
    h, publisher, viewer = simulcast
    now = run(h, publisher, viewer, 0.1, 10)
    status = h.router.select_layer(viewer.peer.session_id, LayerRequest(rid="q"), now)
    assert status["pendingRid"] == "q" and status["automatic"] is False
    now = run(h, publisher, viewer, now, 10)
    assert publisher.keyframe_requests.count("q") >= 1  # PLI on the target layer
    h.router.select_layer(viewer.peer.session_id, LayerRequest(rid="f"), now)
    now = run(h, publisher, viewer, now, 10)
    h.router.select_layer(viewer.peer.session_id, LayerRequest(spatial_layer=0), now)
    now = run(h, publisher, viewer, now, 10)
    assert h.router.layer_status(viewer.peer.session_id, now)["rid"] == "q"

    # Widths follow the choice: h (start) -> q -> f -> q, each change once.
    changes = [w for i, w in enumerate(viewer.widths) if i == 0 or viewer.widths[i - 1] != w]
    assert changes == [320, 160, 640, 160]
    # One SSRC, sequence numbers +1 throughout (RFC 3550 §5.1), timestamps increasing.
    packets = viewer.packets
    assert len({p.ssrc for p in packets}) == 1
    for before, after in itertools.pairwise(packets):
        assert after.sequence_number == (before.sequence_number + 1) & 0xFFFF
        assert 0 <= (after.timestamp - before.timestamp) & 0xFFFFFFFF < 90000
    assert h.router.counters["layer_switches_completed"] == 3


def test_unknown_layers_are_refused_and_an_empty_request_means_automatic(
    simulcast: tuple[RouterHarness, SimulcastPublisher, DecodingViewer],
) -> None:
    h, publisher, viewer = simulcast
    now = run(h, publisher, viewer, 0.1, 5)
    session = viewer.peer.session_id
    for bad in (
        LayerRequest(rid="x"),
        LayerRequest(spatial_layer=3),
        LayerRequest(media_id="0"),  # the audio m-line
        LayerRequest(temporal_layer=4),
    ):
        with pytest.raises(PeerError):
            h.router.select_layer(session, bad, now)
    h.router.select_layer(session, LayerRequest(rid="f"), now)
    assert h.router.select_layer(session, LayerRequest(media_id="1"), now)["automatic"] is True
    # Automatic with a ceiling: maxWidth 200 allows the 160-pixel layer only.
    h.router.select_layer(session, LayerRequest(max_width=200), now)
    run(h, publisher, viewer, now, 10)
    assert viewer.widths[-1] == 160


def send_receiver_report(h: RouterHarness, viewer: DecodingViewer, lost: int, now: float) -> None:
    """The viewer's RR on its video SSRC (RFC 3550 §6.4.2), ``lost``/256 of packets lost."""
    ssrc = viewer.packets[-1].ssrc
    report = rtcp.ReceiverReport(
        ssrc=0x77,
        reports=[
            rtcp.ReportBlock(
                ssrc=ssrc,
                fraction_lost=lost,
                cumulative_lost=0,
                highest_sequence=viewer.packets[-1].sequence_number,
                jitter=0,
                last_sender_report=0,
                delay_since_last_sender_report=0,
            )
        ],
    )
    h.router.datagram_received(
        viewer.peer.protect.protect_rtcp(bytes(report)), viewer.peer.address, now
    )


def test_automatic_choice_moves_down_under_loss_and_back_up_when_clean(
    simulcast: tuple[RouterHarness, SimulcastPublisher, DecodingViewer],
) -> None:
    h, publisher, viewer = simulcast
    now = run(h, publisher, viewer, 0.1, 10)
    assert viewer.widths[-1] == 320
    for _ in range(3):  # 25 % loss in each of three reports, a second apart
        send_receiver_report(h, viewer, 64, now)
        now = run(h, publisher, viewer, now, FPS)
    assert viewer.widths[-1] == 160
    assert h.router.counters["layer_auto_down"] == 1
    for _ in range(16):  # clean: up one layer per clean period (5 s), with hysteresis
        send_receiver_report(h, viewer, 0, now)
        now = run(h, publisher, viewer, now, FPS)
    assert h.router.counters["layer_auto_up"] == 2
    assert viewer.widths[-1] == 640
