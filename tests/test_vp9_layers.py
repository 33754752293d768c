"""VP9 in the compiled Fanout: picture-id / TL0PICIDX continuity across keyframe-aligned
simulcast switches, and temporal-layer dropping (RFC 9628 §4.2), on loopback sockets with
pylibsrtp as the decrypting oracle and virtual time; plus the Vp9PayloadDescriptor parser.

The viewer-side check models how a VP9 receiver (libwebrtc's reference finder) reads a
stream: in non-flexible mode each picture's references come from the group of frames in
the scalability structure, indexed by the picture-id distance to the keyframe; in
flexible mode from the P_DIFFs. A stream is valid when every reference names a picture
the viewer received, sequence numbers have no gap and TL0PICIDX counts TID 0 pictures.
Dropped pictures leave gaps in the picture ids on purpose (see _drop_temporal_vp9).

PyAV's libvpx-vp9 accepts ``ts-parameters`` but its output has no usable temporal
structure (decoding only the TL0 frames does not reproduce them), so the descriptors
here are built by hand with libwebrtc's L1T3 group of frames.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import _loopback
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whepfan._fastpath import (
    PAYLOAD_OPAQUE,
    PAYLOAD_VP8,
    PAYLOAD_VP9,
    SUBSCRIPTION_NONE,
)
from whepfan.errors import ParseError
from whepfan.protocol.codecs import (
    Vp9GroupPicture,
    Vp9PayloadDescriptor,
    Vp9ScalabilityStructure,
    is_keyframe_start,
)

VIDEO_CLOCK = 90000
VIEWER_SSRC = 0xCAFE0009
VIEWER_RTX_SSRC = 0xCAFE000A
RTX_PT = 101
FRAME = 1 / 30

# libwebrtc's three-layer group of frames (its kTemporalStructureMode3): TID, U and the
# references (picture-id distances) of each picture in a group of four.
L1T3_GROUP = (
    Vp9GroupPicture(temporal_layer=0, reference_diffs=(4,)),
    Vp9GroupPicture(temporal_layer=2, switching_up=True, reference_diffs=(1,)),
    Vp9GroupPicture(temporal_layer=1, switching_up=True, reference_diffs=(2,)),
    Vp9GroupPicture(temporal_layer=2, reference_diffs=(1, 2)),
)


# --- a VP9 source -------------------------------------------------------------------------


@dataclass
class Vp9Layer:
    """One VP9 encoding as a publisher sends it: its own SSRC, sequence numbers,
    timestamps, picture ids and TL0PICIDX; non-flexible (SS with the L1T3 group on each
    keyframe) or flexible (P_DIFFs in every packet)."""

    ssrc: int
    seq: int
    timestamp: int
    picture_id: int
    tl0_pic_idx: int = 0
    flexible: bool = False
    long_picture_id: bool = True
    group_index: int = 0

    def picture(
        self,
        *,
        keyframe: bool = False,
        temporal_layer: int | None = None,
        switching_up: bool | None = None,
        references: tuple[int, ...] | None = None,
        packets: int = 2,
    ) -> list[tuple[bytes, bool]]:
        """The RTP packets of one picture, each with its "first packet of a keyframe" flag.
        Unset layer fields follow L1T3_GROUP; a keyframe restarts the group."""
        if keyframe:
            self.group_index = 0
        pattern = L1T3_GROUP[self.group_index % len(L1T3_GROUP)]
        self.group_index += 1
        layer = pattern.temporal_layer if temporal_layer is None else temporal_layer
        if keyframe:
            layer, references = 0, ()
        if layer == 0:
            self.tl0_pic_idx = (self.tl0_pic_idx + 1) & 0xFF
        self.picture_id = (self.picture_id + 1) & (0x7FFF if self.long_picture_id else 0x7F)
        self.timestamp = (self.timestamp + VIDEO_CLOCK // 30) & 0xFFFFFFFF
        diffs = pattern.reference_diffs if references is None else references
        out = []
        for index in range(packets):
            descriptor = Vp9PayloadDescriptor(
                picture_id=self.picture_id,
                long_picture_id=self.long_picture_id,
                inter_picture_predicted=not keyframe,
                flexible=self.flexible,
                start_of_frame=index == 0,
                end_of_frame=index == packets - 1,
                temporal_layer=layer,
                switching_up=pattern.switching_up if switching_up is None else switching_up,
                tl0_pic_idx=None if self.flexible else self.tl0_pic_idx,
                reference_diffs=diffs if self.flexible and not keyframe else (),
                scalability_structure=(
                    Vp9ScalabilityStructure(resolutions=((320, 180),), pictures=L1T3_GROUP)
                    if keyframe and index == 0 and not self.flexible
                    else None
                ),
            )
            payload = bytes(descriptor) + bytes(40)
            assert is_keyframe_start("VP9", payload) == (keyframe and index == 0)
            header = struct.pack(
                "!BBHII",
                0x80,
                (0x80 if index == packets - 1 else 0) | 98,
                self.seq,
                self.timestamp,
                self.ssrc,
            )
            self.seq = (self.seq + 1) & 0xFFFF
            out.append((header + payload, keyframe and index == 0))
        return out


Received = _loopback.Received


class Loopback(_loopback.DescriptorLoopback[Vp9PayloadDescriptor]):
    """The shared loopback harness on a VP9 track, with helpers for one subscription."""

    def __init__(self) -> None:
        super().__init__(
            payload_format=PAYLOAD_VP9,
            parse_descriptor=Vp9PayloadDescriptor.parse,
            max_viewers=4,
            max_tracks=4,
        )

    def subscribe(self, track: int, *, rtx: bool = False) -> None:
        """Subscribe the viewer; with ``rtx``, it has an RTX stream (RFC 4588) too."""
        if rtx:
            self.rtx_payload_type = RTX_PT
        self.fanout.subscribe(
            self.slot,
            track,
            ssrc=VIEWER_SSRC,
            payload_type=100,
            rtx_ssrc=VIEWER_RTX_SSRC if rtx else 0,
            rtx_payload_type=RTX_PT if rtx else -1,
        )

    def limit(self, track: int, limit: int) -> None:
        self.fanout.set_temporal_layer(self.slot, track, limit)


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    lb = Loopback()
    yield lb
    lb.close()


# --- what a VP9 receiver checks -----------------------------------------------------------


@dataclass
class Picture:
    picture_id: int
    temporal_layer: int
    tl0_pic_idx: int | None
    references: list[int] = field(default_factory=list)
    switching_up: bool = False


def pictures_of(received: list[Received]) -> list[Picture]:
    """Validate one VP9 stream as a receiver reads it (module notes) and return its
    pictures. Sequence numbers must be gap-free (RFC 3550 §5.1) and every reference must
    name a picture received earlier."""
    assert received, "no packets"
    assert {r.ssrc for r in received} == {VIEWER_SSRC}
    first = received[0].descriptor
    assert first.start_of_frame and not first.inter_picture_predicted  # starts on a keyframe
    for before, after in itertools.pairwise(received):
        assert after.seq == (before.seq + 1) & 0xFFFF
        if after.descriptor.start_of_frame:
            assert before.marker and before.descriptor.end_of_frame  # previous one complete
            assert 0 < (after.timestamp - before.timestamp) & 0xFFFFFFFF < 0x80000000
        else:
            assert after.descriptor.picture_id == before.descriptor.picture_id
            assert after.timestamp == before.timestamp
    pictures: list[Picture] = []
    group: tuple[Vp9GroupPicture, ...] = ()
    group_start = 0
    for packet in received:
        descriptor = packet.descriptor
        if not descriptor.start_of_frame:
            continue
        picture_id, layer = descriptor.picture_id, descriptor.temporal_layer
        assert picture_id is not None and layer is not None
        modulus = 0x8000 if descriptor.long_picture_id else 0x80
        if pictures:
            # Increasing picture ids (serial arithmetic); gaps are dropped pictures.
            step = (picture_id - pictures[-1].picture_id) % modulus
            assert 0 < step < modulus // 2
        structure = descriptor.scalability_structure
        if structure is not None and structure.pictures:
            group, group_start = structure.pictures, picture_id
        if not descriptor.inter_picture_predicted:
            references: tuple[int, ...] = ()
        elif descriptor.flexible:
            references = descriptor.reference_diffs
        else:
            # RFC 9628 §4.2.1: the picture's place in the group of frames.
            assert group, "a non-flexible predicted picture needs a group of frames"
            pattern = group[((picture_id - group_start) % modulus) % len(group)]
            assert pattern.temporal_layer == layer, "picture id out of step with the group"
            references = pattern.reference_diffs
        targets = [(picture_id - diff) % modulus for diff in references]
        if not descriptor.flexible:
            # U (RFC 9628 §4.2): after a switching-up picture of TID t, pictures above t
            # do not depend on pictures before it above t; a receiver drops such group
            # references (libwebrtc: UpSwitchInIntervalVp9).
            targets = [
                target
                for target in targets
                if not any(
                    p.switching_up
                    and p.temporal_layer < layer
                    and 0 < (p.picture_id - target) % modulus < (picture_id - target) % modulus
                    for p in pictures
                )
            ]
        received_ids = {p.picture_id for p in pictures}
        assert all(target in received_ids for target in targets), (picture_id, targets)
        if not descriptor.flexible:
            assert descriptor.tl0_pic_idx is not None
            if pictures and pictures[-1].tl0_pic_idx is not None:
                expected = pictures[-1].tl0_pic_idx + (1 if layer == 0 else 0)
                assert descriptor.tl0_pic_idx == expected & 0xFF
        pictures.append(
            Picture(picture_id, layer, descriptor.tl0_pic_idx, targets, descriptor.switching_up)
        )
    assert received[-1].marker
    return pictures


# --- keyframe-aligned switching -----------------------------------------------------------


def test_switch_continues_seq_timestamp_picture_id_and_tl0picidx(loopback: Loopback) -> None:
    low, high = loopback.add_layer(), loopback.add_layer()
    loopback.subscribe(low)
    low_source = Vp9Layer(ssrc=0x10, seq=65_500, timestamp=1_000, picture_id=0x7FFD)
    high_source = Vp9Layer(ssrc=0x20, seq=200, timestamp=3_000_000_000, picture_id=77)
    high_source.tl0_pic_idx = 190
    now = 5.0
    loopback.push(low, low_source.picture(keyframe=True), now)
    loopback.push(high, high_source.picture(keyframe=True), now)
    for _ in range(5):
        now += FRAME
        loopback.push(low, low_source.picture(), now)
        loopback.push(high, high_source.picture(), now)
    loopback.fanout.switch(loopback.slot, low, high)
    now += FRAME
    loopback.push(high, high_source.picture(), now)  # not a keyframe: still on low
    loopback.push(low, low_source.picture(), now)
    before = loopback.receive()
    assert len(before) == 14
    last_sent_at = now

    now += 0.25
    loopback.push(high, high_source.picture(keyframe=True, packets=3), now)
    loopback.push(low, low_source.picture(), now)  # no longer forwarded
    for _ in range(6):
        now += FRAME
        loopback.push(high, high_source.picture(), now)
        loopback.push(low, low_source.picture(), now)
    after = loopback.receive()
    assert loopback.fanout.take_switches() == [(loopback.slot, low, high)]
    assert len(after) == 3 + 6 * 2

    stream = before + after
    pictures = pictures_of(stream)
    last, keyframe = before[-1], after[0]
    # RFC 9628 §4.2: the keyframe is the next picture (15-bit wrap) and the next TL0
    # picture of the viewer's one stream; the timestamp advances by the 0.25 s elapsed.
    assert last.descriptor.picture_id == 4  # low layer: 0x7FFE, 0x7FFF, 0 .. 4
    assert keyframe.descriptor.picture_id == 5
    assert last.descriptor.tl0_pic_idx is not None
    assert keyframe.descriptor.tl0_pic_idx == last.descriptor.tl0_pic_idx + 1
    assert (keyframe.timestamp - last.timestamp) & 0xFFFFFFFF == round(
        (now - 6 * FRAME - last_sent_at) * VIDEO_CLOCK
    )
    assert keyframe.seq == (last.seq + 1) & 0xFFFF
    assert [p.picture_id for p in pictures] == [(0x7FFE + i) % 0x8000 for i in range(len(pictures))]


def test_a_switch_to_a_7_bit_layer_continues_the_low_bits_of_the_count(
    loopback: Loopback,
) -> None:
    wide, narrow = loopback.add_layer(), loopback.add_layer()
    loopback.subscribe(wide)
    wide_source = Vp9Layer(ssrc=1, seq=0, timestamp=0, picture_id=0x1F7C)
    narrow_source = Vp9Layer(ssrc=2, seq=0, timestamp=0, picture_id=5, long_picture_id=False)
    now = 0.0
    loopback.push(wide, wide_source.picture(keyframe=True), now)
    loopback.fanout.switch(loopback.slot, wide, narrow)
    now += FRAME
    loopback.push(narrow, narrow_source.picture(keyframe=True), now)
    for _ in range(200):  # the 7-bit ids wrap at 128
        now += FRAME
        loopback.push(narrow, narrow_source.picture(packets=1), now)
    stream = loopback.receive()
    assert stream[0].descriptor.picture_id == 0x1F7D
    # Each subscription counts in 15 bits; a 7-bit field shows the count's low 7 bits.
    pictures = pictures_of(stream)
    assert [p.picture_id for p in pictures[1:]] == [(0x1F7E + i) & 0x7F for i in range(201)]


@pytest.mark.parametrize("flexible", [False, True], ids=["non-flexible", "flexible"])
def test_a_retransmission_after_a_switch_carries_the_viewers_picture_id_and_tl0picidx(
    loopback: Loopback, flexible: bool
) -> None:
    """wide (15-bit) -> narrow (7-bit): a NACKed packet of the new layer comes back as RTX
    (RFC 4588 §4) with the picture id and TL0PICIDX the viewer got it with (RFC 9628
    §4.2), in the layer's own width, also after temporal dropping set in."""
    wide, narrow = loopback.add_layer(), loopback.add_layer()
    loopback.subscribe(wide, rtx=True)
    wide_source = Vp9Layer(
        ssrc=1, seq=65_000, timestamp=0, picture_id=0x1F7C, tl0_pic_idx=3, flexible=flexible
    )
    narrow_source = Vp9Layer(
        ssrc=2,
        seq=70,
        timestamp=0,
        picture_id=120,
        tl0_pic_idx=200,
        flexible=flexible,
        long_picture_id=False,
    )
    now = 0.0
    loopback.push(wide, wide_source.picture(keyframe=True), now)
    loopback.push(narrow, narrow_source.picture(keyframe=True), now)
    for _ in range(3):
        now += FRAME
        loopback.push(wide, wide_source.picture(), now)
        loopback.push(narrow, narrow_source.picture(), now)
    loopback.fanout.switch(loopback.slot, wide, narrow)
    now += FRAME
    loopback.push(narrow, narrow_source.picture(keyframe=True, packets=3), now)
    for _ in range(7):
        now += FRAME
        loopback.push(narrow, narrow_source.picture(), now)
    stream = loopback.receive()
    assert loopback.fanout.take_switches() == [(loopback.slot, wide, narrow)]
    pictures_of(stream)
    after = stream[8:]
    assert after[0].descriptor.picture_id == (0x1F7C + 5) & 0x7F
    assert after[0].descriptor.picture_id != narrow_source.picture_id - 7

    loopback.fanout.resend(loopback.slot, narrow, [r.seq for r in after])
    assert_retransmitted_as_first_sent(loopback.receive(), after)

    loopback.limit(narrow, 0)
    for _ in range(9):  # TL0 TL2 TL1 TL2 (dropped) .. TL0
        now += FRAME
        loopback.push(narrow, narrow_source.picture(), now)
    limited = loopback.receive()
    pictures_of(stream + limited)
    last_picture = limited[-2:]  # after the last dropped packet: still resendable
    loopback.fanout.resend(loopback.slot, narrow, [r.seq for r in last_picture])
    assert_retransmitted_as_first_sent(loopback.receive(), last_picture)


def assert_retransmitted_as_first_sent(resent: list[Received], originals: list[Received]) -> None:
    """Each retransmission carries its original's OSN, timestamp, marker and the whole
    payload as the viewer got it (so its VP9 descriptor, picture id width included)."""
    assert [r.seq for r in resent] == [o.seq for o in originals]
    for retransmission, original in zip(resent, originals, strict=True):
        assert retransmission.rtx and retransmission.ssrc == VIEWER_RTX_SSRC
        assert retransmission.descriptor == original.descriptor
        assert retransmission.payload == original.payload
        assert (retransmission.timestamp, retransmission.marker) == (
            original.timestamp,
            original.marker,
        )


# --- temporal layers ----------------------------------------------------------------------


@pytest.mark.parametrize("flexible", [False, True], ids=["non-flexible", "flexible"])
def test_temporal_dropping_across_the_picture_id_wrap_stays_a_valid_stream(
    loopback: Loopback, flexible: bool
) -> None:
    track = loopback.add_layer()
    loopback.subscribe(track)
    source = Vp9Layer(
        ssrc=7, seq=65_520, timestamp=0, picture_id=0x7FF0, tl0_pic_idx=250, flexible=flexible
    )
    now = 0.0
    loopback.push(track, source.picture(keyframe=True), now)
    loopback.limit(track, 0)
    for _ in range(15):
        now += FRAME
        loopback.push(track, source.picture(), now)
    base = loopback.receive()
    pictures = pictures_of(base)
    # TL0 only: the keyframe and every fourth picture, ids 4 apart across 0x7FFF -> 0.
    assert [p.temporal_layer for p in pictures] == [0] * 4
    assert [p.picture_id for p in pictures] == [0x7FF1, 0x7FF5, 0x7FF9, 0x7FFD]
    assert loopback.fanout.stats()["dropped_temporal_layer"] == 12 * 2

    loopback.limit(track, 1)  # up to TL1: the next TL1 picture carries U
    for _ in range(16):
        now += FRAME
        loopback.push(track, source.picture(), now)
    middle = loopback.receive()
    assert {p.temporal_layer for p in pictures_of(base + middle)[4:]} == {0, 1}

    loopback.limit(track, -1)
    for _ in range(16):
        now += FRAME
        loopback.push(track, source.picture(), now)
    everything = loopback.receive()
    pictures = pictures_of(base + middle + everything)
    assert [p.temporal_layer for p in pictures[-16:]] == [0, 2, 1, 2] * 4
    assert loopback.fanout.stats()["dropped_temporal_layer"] == (12 + 8) * 2


def test_raising_the_limit_waits_for_tid_0_or_a_switching_up_point(loopback: Loopback) -> None:
    track = loopback.add_layer()
    loopback.subscribe(track)
    source = Vp9Layer(ssrc=7, seq=0, timestamp=0, picture_id=100)
    now = 0.0
    loopback.push(track, source.picture(keyframe=True), now)
    loopback.limit(track, 0)
    script = [
        # (TID, U, limit set before this picture, forwarded?)
        (2, True, None, False),
        (1, False, 1, False),  # raised to 1, but this TL1 picture is no switching-up point
        (2, True, None, False),  # U, but above the limit asked for
        (1, True, None, True),  # U at TID 1: the limit becomes 1 here
        (2, False, None, False),
        (1, False, 2, True),  # asked for 2: no U, not TID 0, so 1 stays in force
        (2, False, None, False),
        (0, False, None, True),  # TID 0: the limit becomes 2
        (2, False, None, True),
        (0, False, 0, True),  # lowering applies at once
        (1, True, None, False),
    ]
    expected_ids = [101]
    for layer, switching_up, limit, forwarded in script:
        if limit is not None:
            loopback.limit(track, limit)
        now += FRAME
        loopback.push(track, source.picture(temporal_layer=layer, switching_up=switching_up), now)
        if forwarded:
            expected_ids.append(source.picture_id)
    stream = loopback.receive()
    assert [r.descriptor.picture_id for r in stream[::2]] == expected_ids
    assert all(a.seq == (b.seq + 1) & 0xFFFF for b, a in itertools.pairwise(stream))


def test_flexible_mode_drops_pictures_that_reference_dropped_ones(loopback: Loopback) -> None:
    track = loopback.add_layer()
    loopback.subscribe(track)
    source = Vp9Layer(ssrc=7, seq=0, timestamp=0, picture_id=40, flexible=True)
    loopback.push(track, source.picture(keyframe=True), 0.0)  # picture 41
    loopback.limit(track, 1)
    script = [  # (TID, P_DIFFs) of pictures 42 ..
        (2, (1,)),  # 42: above the limit
        (1, (1,)),  # 43: TID 1, but predicts from 42, which the viewer lacks
        (1, (1,)),  # 44: predicts from 43, dropped in turn
        (1, (3,)),  # 45: from 42 again
        (0, (5,)),  # 46: from 41
        (1, (1,)),  # 47: from 46
        (1, (2, 1)),  # 48: from 46 and 47
        (1, (1, 6)),  # 49: from 48 and 43: one missing reference is enough to drop it
    ]
    now = 0.0
    for layer, references in script:
        now += FRAME
        loopback.push(track, source.picture(temporal_layer=layer, references=references), now)
    pictures = pictures_of(loopback.receive())
    assert [(p.picture_id, p.references) for p in pictures] == [
        (41, []),
        (46, [41]),
        (47, [46]),
        (48, [46, 47]),
    ]
    # Every packet of a dropped picture goes: 42 43 44 45 49, 2 packets each.
    assert loopback.fanout.stats()["dropped_temporal_layer"] == 10


def test_flexible_upswitch_at_a_tl1_switching_up_point_skips_stale_tl2_references(
    loopback: Loopback,
) -> None:
    """L1T3 references sent as P_DIFFs: raised to TL2 at the TL1 picture with U, the
    next TL2 picture still names the TL2 picture before it, which the viewer never got:
    it is dropped, and TL2 resumes with the next group's first TL2 picture."""
    track = loopback.add_layer()
    loopback.subscribe(track)
    source = Vp9Layer(ssrc=7, seq=0, timestamp=0, picture_id=0, flexible=True)
    loopback.push(track, source.picture(keyframe=True), 0.0)  # 1: group index 0
    loopback.limit(track, 0)
    loopback.push(track, source.picture(), 0.1)  # 2: TL2 (U), dropped
    loopback.limit(track, 2)
    loopback.push(track, source.picture(), 0.2)  # 3: TL1 (U): TL2 allowed from here
    loopback.push(track, source.picture(), 0.3)  # 4: TL2 from 3 and 2: dropped
    for index in range(4):
        loopback.push(track, source.picture(), 0.4 + index / 10)  # 5 .. 8: all four
    pictures = pictures_of(loopback.receive())
    assert [p.picture_id for p in pictures] == [1, 3, 5, 6, 7, 8]
    assert [p.temporal_layer for p in pictures] == [0, 1, 0, 2, 1, 2]


def with_descriptor(packet: bytes, descriptor: Vp9PayloadDescriptor) -> bytes:
    """``packet`` (a 12-byte RTP header) with its VP9 descriptor replaced."""
    frame = Vp9PayloadDescriptor.split(packet[12:])[1]
    return packet[:12] + bytes(descriptor) + frame


def test_a_picture_is_decided_once_for_all_its_packets(loopback: Loopback) -> None:
    """Flexible mode: the first packet decides; later packets of the same picture follow
    even where their own reference list would pass."""
    track = loopback.add_layer()
    loopback.subscribe(track)
    source = Vp9Layer(ssrc=7, seq=0, timestamp=0, picture_id=0, flexible=True)
    loopback.push(track, source.picture(keyframe=True), 0.0)  # 1
    loopback.limit(track, 0)
    loopback.push(track, source.picture(temporal_layer=1, references=(1,)), 0.1)  # 2: dropped
    first, *rest = source.picture(temporal_layer=0, references=(1,), packets=3)  # 3, from 2
    loopback.push(track, [first], 0.2)
    for packet, keyframe in rest:
        descriptor = Vp9PayloadDescriptor.parse(packet[12:])
        descriptor.reference_diffs = (2,)  # from 1, which the viewer has
        loopback.push(track, [(with_descriptor(packet, descriptor), keyframe)], 0.2)
    assert len(loopback.receive()) == 2  # the keyframe only
    assert loopback.fanout.stats()["dropped_temporal_layer"] == 2 + 3


def test_limits_are_checked_against_the_vp9_tid_range(loopback: Loopback) -> None:
    vp9 = loopback.add_layer()
    vp8 = loopback.fanout.add_track(payload_format=PAYLOAD_VP8)
    opaque = loopback.fanout.add_track(payload_format=PAYLOAD_OPAQUE)
    for track in (vp9, vp8, opaque):
        loopback.subscribe(track)
    loopback.limit(vp9, 7)  # TID is 3 bits in VP9 (RFC 9628 §4.2), 2 in VP8
    with pytest.raises(ValueError):
        loopback.limit(vp9, 8)
    with pytest.raises(ValueError):
        loopback.limit(vp8, 4)
    with pytest.raises(ValueError):
        loopback.fanout.add_track(payload_format=3)


def test_malformed_vp9_descriptors_pass_through_untouched(loopback: Loopback) -> None:
    """A payload the fan-out cannot read (truncated descriptor) is forwarded as is: no
    dropping, no rewriting (the router's keyframe gate decided whether it flows)."""
    track = loopback.add_layer()
    loopback.subscribe(track)
    source = Vp9Layer(ssrc=7, seq=0, timestamp=0, picture_id=0)
    loopback.push(track, source.picture(keyframe=True), 0.0)
    loopback.limit(track, 0)
    truncated = struct.pack("!BBHII", 0x80, 0x80 | 98, source.seq, 99_000, 7) + b"\xa0\x81"
    loopback.fanout.push(track, truncated, False, 0.1)
    stream = loopback.fanout.stats()
    assert stream["dropped_temporal_layer"] == 0
    assert stream["packets_sent"] == 3


# --- any pattern, limits and a switch ------------------------------------------------------

group_pictures = st.lists(
    st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=48
)  # (packets, keyframe request)
limit_changes = st.dictionaries(st.integers(0, 47), st.integers(-1, 2), max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    pictures=group_pictures,
    limits=limit_changes,
    switch_at=st.integers(0, 48),
    flexible=st.booleans(),
)
def test_any_limits_and_a_switch_yield_one_valid_vp9_stream(
    pictures: list[tuple[int, bool]], limits: dict[int, int], switch_at: int, flexible: bool
) -> None:
    """Hypothesis: whatever the limit changes, keyframes and switch, the viewer gets one
    valid VP9 stream (pictures_of) with no picture above the limit once it applies."""
    lb = Loopback()
    try:
        a, b = lb.add_layer(), lb.add_layer()
        lb.subscribe(a)
        sources = {
            a: Vp9Layer(
                ssrc=1,
                seq=65_400,
                timestamp=5,
                picture_id=0x7FE0,
                tl0_pic_idx=250,
                flexible=flexible,
            ),
            b: Vp9Layer(ssrc=2, seq=9, timestamp=2**32 - 50_000, picture_id=3, flexible=flexible),
        }
        current, now, limit = a, 0.0, -1
        for track, source in sources.items():
            lb.push(track, source.picture(keyframe=True), now)
        for index, (packets, keyframe) in enumerate(pictures):
            now += FRAME
            if index in limits:
                limit = limits[index]
                for track in (a, b):
                    if lb.fanout.subscription_state(lb.slot, track) != SUBSCRIPTION_NONE:
                        lb.limit(track, limit)
            if index == switch_at:
                lb.fanout.switch(lb.slot, current, b if current == a else a)
            for track, source in sources.items():
                lb.push(track, source.picture(keyframe=keyframe, packets=packets), now)
            for _, _, to_track in lb.fanout.take_switches():
                current = to_track
        received = lb.receive()
        pictures_of(received)
    finally:
        lb.close()


# --- the descriptor parser ----------------------------------------------------------------


def test_descriptor_bits_follow_rfc_9628_section_4_2() -> None:
    # Assembled from the RFC 9628 §4.2 diagram, non-flexible mode:
    #   0xAE = I P L F B E V Z = 1 0 1 0 1 1 1 0 (picture id, layers, B, E, SS)
    #   0x92 0x34 = M=1, picture id 0x1234
    #   0x56 = TID 2 | U 1 | SID 3 | D 0;  0x07 = TL0PICIDX 7
    #   SS 0x38 = N_S 1 (two layers) | Y | G; 0x0140 0x00B4, 0x0280 0x0168 = 320x180, 640x360
    #   N_G 0x02; 0x04 0x04 = T 0 U 0 R 1, P_DIFF 4; 0x54 0x01 = T 2 U 1 R 1, P_DIFF 1
    data = bytes.fromhex("ae9234560738014000b40280016802040454 01".replace(" ", "")) + b"vp9"
    descriptor, frame = Vp9PayloadDescriptor.split(data)
    assert frame == b"vp9"
    assert descriptor == Vp9PayloadDescriptor(
        picture_id=0x1234,
        start_of_frame=True,
        end_of_frame=True,
        temporal_layer=2,
        switching_up=True,
        spatial_layer=3,
        tl0_pic_idx=7,
        scalability_structure=Vp9ScalabilityStructure(
            spatial_layers=2,
            resolutions=((320, 180), (640, 360)),
            pictures=(
                Vp9GroupPicture(temporal_layer=0, reference_diffs=(4,)),
                Vp9GroupPicture(temporal_layer=2, switching_up=True, reference_diffs=(1,)),
            ),
        ),
    )
    assert bytes(descriptor) + frame == data
    # Flexible mode: 0xD8 = I P . F B; 7-bit picture id 0x05; P_DIFFs 1 (N) then 3.
    flexible = Vp9PayloadDescriptor.parse(bytes.fromhex("d8050306"))
    assert flexible.flexible and flexible.inter_picture_predicted
    assert not flexible.long_picture_id and flexible.picture_id == 5
    assert flexible.reference_diffs == (1, 3)


@pytest.mark.parametrize(
    "data",
    [
        "",  # empty
        "80",  # I without a picture id
        "8080",  # M without its second octet
        "a0",  # L without layer indices
        "a001",  # non-flexible L without TL0PICIDX
        "50",  # flexible, P, no P_DIFF
        "5003030303",  # four P_DIFFs (N on the third)
        "5000",  # P_DIFF 0
        "02",  # V without SS
        "0210",  # SS with Y but no resolution
        "0208",  # SS with G but no N_G
        "02080104",  # a group picture with one P_DIFF missing
    ],
)
def test_truncated_or_invalid_descriptors_raise_parse_error(data: str) -> None:
    with pytest.raises(ParseError):
        Vp9PayloadDescriptor.parse(bytes.fromhex(data))


group_picture = st.builds(
    Vp9GroupPicture,
    temporal_layer=st.integers(0, 7),
    switching_up=st.booleans(),
    reference_diffs=st.lists(st.integers(0, 255), max_size=3).map(tuple),
)


@st.composite
def structures(draw: st.DrawFn) -> Vp9ScalabilityStructure:
    layers = draw(st.integers(1, 8))
    sizes = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
    return Vp9ScalabilityStructure(
        spatial_layers=layers,
        resolutions=draw(st.none() | st.lists(sizes, min_size=layers, max_size=layers).map(tuple)),
        pictures=draw(st.none() | st.lists(group_picture, max_size=8).map(tuple)),
    )


@st.composite
def descriptors(draw: st.DrawFn) -> Vp9PayloadDescriptor:
    flexible = draw(st.booleans())
    predicted = draw(st.booleans())
    long_id = draw(st.booleans())
    layered = draw(st.booleans())
    picture_id = draw(st.none() | st.integers(0, 0x7FFF if long_id else 0x7F))
    return Vp9PayloadDescriptor(
        picture_id=picture_id,
        long_picture_id=long_id or picture_id is None,  # M means nothing without an id
        inter_picture_predicted=predicted,
        flexible=flexible,
        start_of_frame=draw(st.booleans()),
        end_of_frame=draw(st.booleans()),
        not_upper_layer_reference=draw(st.booleans()),
        temporal_layer=draw(st.integers(0, 7)) if layered else None,
        switching_up=layered and draw(st.booleans()),
        spatial_layer=draw(st.integers(0, 7)) if layered else 0,
        inter_layer_dependency=layered and draw(st.booleans()),
        tl0_pic_idx=draw(st.integers(0, 255)) if layered and not flexible else None,
        reference_diffs=tuple(
            draw(st.lists(st.integers(1, 127), min_size=1, max_size=3))
            if flexible and predicted
            else ()
        ),
        scalability_structure=draw(st.none() | structures()),
    )


@given(descriptor=descriptors(), frame=st.binary(max_size=20))
def test_descriptor_round_trips(descriptor: Vp9PayloadDescriptor, frame: bytes) -> None:
    assert Vp9PayloadDescriptor.split(bytes(descriptor) + frame) == (descriptor, frame)


@given(data=st.binary(max_size=64))
def test_parser_fuzz_returns_a_descriptor_or_parse_error(data: bytes) -> None:
    try:
        descriptor, frame = Vp9PayloadDescriptor.split(data)
    except ParseError:
        return
    # Whatever parses re-encodes to the same length (only reserved bits, written as 0,
    # may differ) and parses back to the same value.
    encoded = bytes(descriptor)
    assert len(encoded) + len(frame) == len(data)
    assert Vp9PayloadDescriptor.parse(encoded) == descriptor


def test_vp9_keyframe_size_comes_from_the_scalability_structure() -> None:
    """RFC 9628 §4.2.1: a keyframe's SS carries each spatial layer's size; the layer
    measurements (SSE `layers`, status API) report the highest one."""
    from whepfan.protocol.codecs import keyframe_size

    keyframe = Vp9PayloadDescriptor(
        picture_id=1,
        start_of_frame=True,
        end_of_frame=True,
        scalability_structure=Vp9ScalabilityStructure(
            spatial_layers=2, resolutions=((320, 180), (640, 360))
        ),
    )
    assert keyframe_size("VP9", bytes(keyframe) + b"\x82\x49\x83\x42") == (640, 360)
    no_structure = Vp9PayloadDescriptor(picture_id=2, start_of_frame=True, end_of_frame=True)
    assert keyframe_size("VP9", bytes(no_structure) + b"\x00") is None
    assert keyframe_size("VP9", b"") is None
