"""Simulcast: keyframe-aligned layer switches and VP8 temporal-layer dropping in the
compiled Fanout (loopback sockets, pylibsrtp as the decrypting oracle, virtual time), and
the router's per-layer ingest and automatic layer policy.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pylibsrtp import Policy, Session

from whepfan._fastpath import PAYLOAD_VP8, PROFILE_AEAD_AES_128_GCM, Fanout
from whepfan.protocol.codecs import Vp8PayloadDescriptor

VIDEO_CLOCK = 90000
RECEIVE_TIMEOUT = 5.0  # upper bound for loopback delivery; normally instant
VIEWER_SSRC = 0xCAFE0001


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
        self.picture_id = (self.picture_id + 1) & 0x7FFF
        self.timestamp = (self.timestamp + ticks) & 0xFFFFFFFF
        out = []
        for index in range(packets):
            descriptor = Vp8PayloadDescriptor(
                start_of_partition=index == 0,
                picture_id=self.picture_id,
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


@dataclass
class Received:
    seq: int
    timestamp: int
    ssrc: int
    marker: bool
    descriptor: Vp8PayloadDescriptor


class Loopback:
    """A Fanout on one UDP socket and one viewer socket with libsrtp keys."""

    def __init__(self) -> None:
        self.send_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.send_sock.bind(("127.0.0.1", 0))
        self.send_sock.setblocking(False)
        self.viewer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.viewer_sock.bind(("127.0.0.1", 0))
        self.viewer_sock.setblocking(False)
        self.fanout = Fanout(self.send_sock.fileno(), max_viewers=8, max_tracks=8)
        key, salt = os.urandom(16), os.urandom(12)
        self.slot = self.fanout.add_viewer(
            "127.0.0.1",
            self.viewer_sock.getsockname()[1],
            profile=PROFILE_AEAD_AES_128_GCM,
            tx_key=key,
            tx_salt=salt,
            rx_key=os.urandom(16),
            rx_salt=os.urandom(12),
        )
        self.key_and_salt = key + salt
        self.inbound = self.fresh_inbound()

    def fresh_inbound(self) -> Session:
        """A new libsrtp receiver: resends reuse sequence numbers, which the first one's
        replay window (RFC 3711 §3.3.2) rightly refuses."""
        return Session(
            Policy(
                key=self.key_and_salt,
                ssrc_type=Policy.SSRC_ANY_INBOUND,
                srtp_profile=Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
            )
        )

    def add_layer(self) -> int:
        return self.fanout.add_track(clock_rate=VIDEO_CLOCK, payload_format=PAYLOAD_VP8)

    def push(self, track: int, packets: list[tuple[bytes, bool]], now: float) -> None:
        for packet, keyframe in packets:
            self.fanout.push(track, packet, keyframe, now)

    def receive(self) -> list[Received]:
        """Every datagram delivered so far, decrypted by libsrtp and parsed."""
        out: list[Received] = []
        poller = select.poll()
        poller.register(self.viewer_sock, select.POLLIN)
        # Loopback delivery completes within sendmmsg; poll only guards against a race.
        while poller.poll(0 if out else 50):
            try:
                datagram = self.viewer_sock.recv(4096)
            except BlockingIOError:
                break
            plain = self.inbound.unprotect(datagram)
            second, seq, timestamp, ssrc = struct.unpack_from("!xBHII", plain)
            out.append(
                Received(
                    seq=seq,
                    timestamp=timestamp,
                    ssrc=ssrc,
                    marker=bool(second & 0x80),
                    descriptor=Vp8PayloadDescriptor.parse(plain[12:]),
                )
            )
        return out

    def close(self) -> None:
        self.send_sock.close()
        self.viewer_sock.close()


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    lb = Loopback()
    yield lb
    lb.close()


def subscribe(lb: Loopback, track: int) -> None:
    lb.fanout.subscribe(lb.slot, track, ssrc=VIEWER_SSRC, payload_type=100)


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
            assert after.descriptor.picture_id == (previous_id + 1) & 0x7FFF
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
    assert loopback.fanout.subscription_state(loopback.slot, high) == 1
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
    assert loopback.fanout.subscription_state(loopback.slot, low) == 0
    assert loopback.fanout.subscription_state(loopback.slot, high) == 2

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


pictures = st.lists(
    st.tuples(st.integers(0, 2), st.booleans(), st.integers(1, 3)), min_size=1, max_size=40
)
limit_changes = st.dictionaries(st.integers(0, 39), st.integers(-1, 2), max_size=6)


@settings(max_examples=60, deadline=None)
@given(pictures=pictures, limits=limit_changes, switch_at=st.integers(0, 40))
def test_any_mix_of_limits_and_a_switch_yields_one_valid_vp8_stream(
    pictures: list[tuple[int, bool, int]], limits: dict[int, int], switch_at: int
) -> None:
    """Hypothesis: whatever the temporal pattern, limit changes and layer switch, the viewer
    gets a gap-free stream of complete pictures, none above the limit in force."""
    lb = Loopback()
    try:
        a, b = lb.add_layer(), lb.add_layer()
        subscribe(lb, a)
        sources = {
            a: Vp8Layer(ssrc=1, seq=65_000, timestamp=1, picture_id=0x7F00, tl0_pic_idx=250),
            b: Vp8Layer(ssrc=2, seq=3, timestamp=2**32 - 10, picture_id=3, tl0_pic_idx=7),
        }
        current, now = a, 0.0
        lb.push(a, sources[a].frame(keyframe=True), now)
        lb.push(b, sources[b].frame(keyframe=True), now)
        limit = -1
        for index, (temporal_layer, sync, packets) in enumerate(pictures):
            now += 1 / 30
            if index in limits:
                limit = limits[index]
                for track in (a, b):
                    if lb.fanout.subscription_state(lb.slot, track):
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
        stream = lb.receive()
        assert stream, "the first keyframe always reaches the viewer"
        assert_continuous(stream)
        assert stream[-1].marker
    finally:
        lb.close()
