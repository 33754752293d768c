"""Upstream repair (media/nack.py) on virtual time: the ``NackGenerator`` of one SSRC, and
``UpstreamRepair`` wired to real timers, a recording sender and the keyframe throttle.

Like mediasoup's TestNackGenerator: no sockets, no clock, exact deadlines. The rules
(RFC 4585 §6.2.1 generic NACK; the module docstring says why): a gap is NACKed once the
reorder delay has passed, a late packet just leaves the list, each sequence number is
NACKed at most max_retries times a retry interval apart and then given up (PLI, through
the throttle), the interval follows the measured NACK-to-repair round trip (RFC 6298,
Karn's rule), sequence numbers wrap (RFC 3550 A.1), too many missing or a jump past
MAX_DROPOUT clears the list and asks for a keyframe, and an RTX packet that repairs
nothing is dropped.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from test_router import CLIENT, Harness, connect_viewer

from whepfan import _fastpath
from whepfan.media.feedback import KeyframeRequests, PublisherFeedback
from whepfan.media.nack import (
    Arrival,
    NackGenerator,
    NackPolicy,
    RepairRtt,
    UpstreamRepair,
)
from whepfan.media.session import PublisherSession, ViewerSession
from whepfan.media.streams import Stream, Track
from whepfan.media.timers import TimerKind, Timers
from whepfan.protocol import rtcp, rtp
from whepfan.protocol.negotiation import IngestMedia, RtpCodec

POLICY = NackPolicy(
    max_retries=3,
    reorder_delay=0.01,
    initial_rtt=0.1,
    min_retry_interval=0.02,
    max_retry_interval=0.5,
    max_missing=20,
    max_dropout=3000,
)


def generator(policy: NackPolicy = POLICY) -> NackGenerator:
    return NackGenerator(policy=policy)


# ----------------------------------------------------------------------- the generator


def test_a_gap_is_nacked_after_the_reorder_delay() -> None:
    nacks = generator()
    assert nacks.received(100, 0.0) is Arrival.IN_ORDER
    assert nacks.received(101, 0.001) is Arrival.IN_ORDER
    assert nacks.next_deadline() is None
    assert nacks.received(104, 0.002) is Arrival.GAP
    assert nacks.missing == [102, 103]
    assert nacks.next_deadline() == pytest.approx(0.012)
    assert nacks.due(0.011) == []
    assert nacks.due(0.012) == [102, 103]
    # Next retry one interval later: no round trip measured yet, so initial_rtt.
    assert nacks.next_deadline() == pytest.approx(0.112)
    assert nacks.nacked == 2


def test_a_reordered_packet_leaves_the_list_before_any_nack() -> None:
    nacks = generator()
    nacks.received(10, 0.0)
    assert nacks.received(12, 0.001) is Arrival.GAP
    assert nacks.received(11, 0.004) is Arrival.REORDERED
    assert nacks.missing == []
    assert nacks.next_deadline() is None
    assert nacks.due(1.0) == []
    assert nacks.recovered == 0


def test_a_repair_removes_it_and_measures_the_round_trip() -> None:
    nacks = generator()
    nacks.received(10, 0.0)
    nacks.received(13, 0.0)  # 11 and 12 missing
    assert nacks.due(0.01) == [11, 12]
    assert nacks.received(11, 0.04, retransmission=True) is Arrival.RECOVERED
    assert nacks.rtt.srtt == pytest.approx(0.03)
    assert nacks.rtt.rttvar == pytest.approx(0.015)
    assert nacks.missing == [12]
    assert nacks.recovered == 1
    # 12 was NACKed at 0.01 with the initial interval: its retry is at 0.11, and is
    # then spaced by SRTT + 4 RTTVAR = 0.09.
    assert nacks.next_deadline() == pytest.approx(0.11)
    assert nacks.due(0.11) == [12]
    assert nacks.next_deadline() == pytest.approx(0.11 + 0.09)
    # Karn's rule: 12 was NACKed twice, its repair says nothing about the round trip.
    assert nacks.received(12, 0.115) is Arrival.RECOVERED
    assert nacks.rtt.samples == 1


def test_each_sequence_number_is_nacked_max_retries_times_then_given_up() -> None:
    nacks = generator()
    nacks.received(1, 0.0)
    nacks.received(3, 0.0)
    sent = []
    now = 0.0
    while (deadline := nacks.next_deadline()) is not None:
        now = deadline
        if nacks.due(now):
            sent.append(round(now, 6))
    # First NACK after the reorder delay, then every initial_rtt; given up one interval
    # after the last NACK, so that its answer could still have come.
    assert sent == [0.01, 0.11, 0.21]
    assert now == pytest.approx(0.31)
    assert nacks.take_unrepairable() == [2]
    assert nacks.take_unrepairable() == []
    assert nacks.unrepairable == 1
    # An answer after giving up repairs nothing: it is a duplicate.
    assert nacks.received(2, 0.4, retransmission=True) is Arrival.DUPLICATE


def test_the_retry_interval_is_clamped() -> None:
    rtt = RepairRtt(initial=0.1)
    assert rtt.retry_interval(POLICY) == pytest.approx(0.1)
    rtt.sample(0.001)
    assert rtt.retry_interval(POLICY) == POLICY.min_retry_interval
    slow = RepairRtt(initial=0.1)
    slow.sample(2.0)
    assert slow.retry_interval(POLICY) == POLICY.max_retry_interval


def test_a_stream_of_generators_shares_one_round_trip() -> None:
    shared = RepairRtt(initial=0.1)
    video, audio = (
        NackGenerator(policy=POLICY, rtt=shared),
        NackGenerator(policy=POLICY, rtt=shared),
    )
    video.received(1, 0.0)
    video.received(3, 0.0)
    video.due(0.01)
    video.received(2, 0.05)
    audio.received(7, 0.0)
    audio.received(9, 0.1)
    audio.due(0.11)
    assert audio.next_deadline() == pytest.approx(0.11 + 0.04 + 4 * 0.02)


def test_sequence_numbers_wrap() -> None:
    nacks = generator()
    nacks.received(65534, 0.0)
    assert nacks.received(1, 0.0) is Arrival.GAP
    assert nacks.missing == [65535, 0]
    assert nacks.due(0.01) == [65535, 0]
    assert nacks.received(0, 0.02, retransmission=True) is Arrival.RECOVERED
    assert nacks.received(65535, 0.03, retransmission=True) is Arrival.RECOVERED
    assert nacks.received(2, 0.04) is Arrival.IN_ORDER
    assert nacks.received(65535, 0.05) is Arrival.DUPLICATE


def test_old_and_repeated_packets_are_duplicates() -> None:
    nacks = generator()
    nacks.received(500, 0.0)
    assert nacks.received(500, 0.0) is Arrival.DUPLICATE
    assert nacks.received(499, 0.0) is Arrival.DUPLICATE  # before the first: never missing
    nacks.received(502, 0.0)
    assert nacks.received(501, 0.0, retransmission=True) is Arrival.REORDERED
    assert nacks.received(501, 0.0, retransmission=True) is Arrival.DUPLICATE


def test_too_many_missing_clears_the_list() -> None:
    nacks = generator()
    nacks.received(0, 0.0)
    nacks.received(11, 0.0)  # 10 missing
    assert nacks.received(22, 0.0) is Arrival.GAP  # 10 more: max_missing (20) reached
    assert nacks.missing == [*range(1, 11), *range(12, 22)]
    assert nacks.received(24, 0.0) is Arrival.OVERFLOW  # 21 > 20: everything is given up
    assert nacks.missing == []
    assert nacks.take_unrepairable() == [*range(1, 11), *range(12, 22), 23]
    assert nacks.next_deadline() is None


def test_a_jump_past_max_dropout_is_a_restart() -> None:
    nacks = generator(NackPolicy(max_dropout=3000, max_missing=5000))
    nacks.received(0, 0.0)
    nacks.received(3, 0.0)
    assert nacks.received(3 + 3002, 0.0, retransmission=True) is Arrival.DUPLICATE
    assert nacks.missing == [1, 2]
    assert nacks.received(3 + 3002, 0.0) is Arrival.RESTART
    assert nacks.missing == []
    assert nacks.take_unrepairable() == [1, 2]
    assert nacks.received(3 + 3003, 0.0) is Arrival.IN_ORDER
    # A gap of exactly max_dropout is still a gap.
    assert nacks.received(3 + 3003 + 3000, 0.0) is Arrival.GAP


# ----------------------------------------------------------------- wired up: UpstreamRepair


@dataclass
class RecordingSender:
    datagrams: list[bytes] = field(default_factory=list)

    def transmit(self, data: bytes, addr: tuple[str, int], local: str | None = None) -> None:
        self.datagrams.append(data)


class ClearSrtcp:
    """SRTCP "protection" that keeps the compound readable for the test."""

    def protect_rtcp(self, data: bytes) -> bytes:
        return data


WORKER_POLICY = replace(POLICY, max_missing=500)
RTCP_SSRC = 0x5EEDF00D
VIDEO_SSRC, RTX_SSRC, AUDIO_SSRC = 0x1111, 0x2222, 0x3333


def _media(kind: str, feedback: tuple[str, ...]) -> IngestMedia:
    codec = RtpCodec("VP8" if kind == "video" else "opus", 90000, None, 96, (), feedback, 97)
    return IngestMedia(mid="0", kind=kind, codec=codec)


class Worker:
    """UpstreamRepair with real timers and keyframe throttle; ``run_until`` fires timers."""

    def __init__(self, *, audio_nack: bool = False) -> None:
        self.timers = Timers()
        self.counters: Counter[str] = Counter()
        self.sender = RecordingSender()
        self.feedback = PublisherFeedback(
            sender=self.sender,  # type: ignore[arg-type]
            counters=self.counters,
            rtcp_ssrc=RTCP_SSRC,
            max_bitrate=1_000_000,
        )
        self.plis: list[tuple[list[int], float]] = []
        self.keyframes = KeyframeRequests(
            interval=0.5, timers=self.timers, counters=self.counters, upstream=self._pli
        )
        self.repair = UpstreamRepair(
            policy=WORKER_POLICY,
            timers=self.timers,
            feedback=self.feedback,
            keyframes=self.keyframes,
            counters=self.counters,
        )
        self.stream = Stream(name="live")
        video = _media("video", ("nack", "nack pli"))
        audio = _media("audio", ("nack",) if audio_nack else ())
        self.video = Track(
            fanout_id=1, kind="video", ingest=video, codec_name="VP8", clock_rate=90000
        )
        self.audio = Track(
            fanout_id=2, kind="audio", ingest=audio, codec_name="opus", clock_rate=48000
        )
        self.stream.tracks = {"video": [self.video], "audio": [self.audio]}
        publisher = PublisherSession.__new__(PublisherSession)
        publisher.ingest = [video, audio]
        publisher.address = ("192.0.2.7", 5000)
        publisher.local_address = None
        self.stream.publisher = publisher
        self.stream.publisher_srtcp_out = ClearSrtcp()  # type: ignore[assignment]

    def _pli(self, stream: Stream, tracks: object, now: float) -> bool:
        self.plis.append(([t.fanout_id for t in tracks], now))  # type: ignore[attr-defined]
        return True

    def video_packet(self, seq: int, now: float, *, rtx: bool = False) -> bool:
        ssrc = RTX_SSRC if rtx else VIDEO_SSRC
        return self.repair.received(self.stream, self.video, ssrc, seq, now, retransmission=rtx)

    def run_until(self, end: float) -> None:
        while (deadline := self.timers.next_deadline()) is not None and deadline <= end:
            for kind, name in self.timers.due(deadline):
                if kind is TimerKind.NACK:
                    self.repair.handle_timer(self.stream, name, deadline)
                elif kind is TimerKind.KEYFRAME_RETRY:
                    self.keyframes.handle_timer(self.stream, name, deadline)

    def nacks(self) -> list[tuple[int, list[int]]]:
        """(media SSRC, lost sequence numbers) of every NACK sent, in order."""
        found = []
        for datagram in self.sender.datagrams:
            packets = rtcp.parse_compound(datagram)
            # RFC 4585 §3.1: the compound starts with a report (ours, with no blocks).
            assert isinstance(packets[0], rtcp.ReceiverReport) and not packets[0].reports
            assert packets[0].ssrc == RTCP_SSRC
            for packet in packets[1:]:
                assert isinstance(packet, rtcp.GenericNack)
                assert packet.sender_ssrc == RTCP_SSRC
                found.append((packet.media_ssrc, packet.lost_sequence_numbers()))
        return found


def test_due_nacks_go_to_the_publisher_as_one_compound() -> None:
    worker = Worker()
    for seq in (1, 2, 3, 7, 8, 30):
        worker.video_packet(seq, 0.0)
    assert worker.timers.deadline((TimerKind.NACK, "live")) == pytest.approx(0.01)
    worker.run_until(0.01)
    assert len(worker.sender.datagrams) == 1
    assert worker.nacks() == [(VIDEO_SSRC, [4, 5, 6, *range(9, 30)])]
    assert worker.counters["nack_sent_upstream"] == 24
    # 4-6 and 9-29 pack into PID+BLP items (RFC 4585 §6.2.1): 4 (+5..6, 9..20), 21 (+22..29).
    nack = rtcp.parse_compound(worker.sender.datagrams[0])[1]
    assert isinstance(nack, rtcp.GenericNack)
    assert [pid for pid, _ in nack.items] == [4, 21]


def test_every_encodings_nacks_share_one_compound() -> None:
    """Simulcast: a generator per encoding (its own SSRC and sequence numbers), one
    datagram for all that is due."""
    worker = Worker()
    low = Track(
        fanout_id=3,
        kind="video",
        ingest=worker.video.ingest,
        codec_name="VP8",
        clock_rate=90000,
        rid="q",
        encoding_index=1,
    )
    worker.stream.tracks["video"].append(low)
    for seq in (10, 12):
        worker.video_packet(seq, 0.0)
    for seq in (500, 503):
        worker.repair.received(worker.stream, low, 0x4444, seq, 0.0, retransmission=False)
    worker.run_until(0.02)
    assert len(worker.sender.datagrams) == 1
    assert worker.nacks() == [(VIDEO_SSRC, [11]), (0x4444, [501, 502])]


def test_rtx_repairs_and_duplicates_are_told_apart() -> None:
    worker = Worker()
    worker.video_packet(1, 0.0)
    worker.video_packet(3, 0.0)
    worker.run_until(0.01)
    assert worker.video_packet(2, 0.03, rtx=True) is True  # the repair: forwarded
    assert worker.counters["nack_recovered"] == 1
    assert worker.video_packet(2, 0.04, rtx=True) is False  # a second answer: dropped
    assert worker.video_packet(1, 0.05, rtx=True) is False  # RTX padding of an old one
    assert worker.video_packet(2, 0.05) is True  # a plain packet is never dropped here
    assert worker.repair.rtt("live") == pytest.approx(0.02)
    worker.run_until(10.0)
    assert worker.nacks() == [(VIDEO_SSRC, [2])]
    assert worker.plis == []


def test_an_unrepairable_gap_asks_for_a_keyframe_through_the_throttle() -> None:
    worker = Worker()
    worker.video_packet(1, 0.0)
    worker.video_packet(3, 0.0)
    worker.run_until(1.0)
    assert [lost for _, lost in worker.nacks()] == [[2], [2], [2]]
    assert worker.counters["nack_unrepairable"] == 1
    assert worker.plis == [([1], pytest.approx(0.31))]
    # Another loss, given up a throttle interval (0.5 s) later: a PLI straight away.
    worker.video_packet(5, 1.0)
    worker.run_until(1.315)
    assert worker.counters["nack_unrepairable"] == 2
    assert worker.plis[-1] == ([1], pytest.approx(1.31))
    # One given up 0.4 s after that: deferred to the end of the interval, not dropped.
    worker.video_packet(7, 1.4)
    worker.run_until(1.715)
    assert worker.counters["nack_unrepairable"] == 3
    assert worker.counters["keyframe_requests_throttled"] == 1
    assert len(worker.plis) == 2
    worker.run_until(2.0)
    assert worker.plis[-1] == ([1], pytest.approx(1.81))


def test_an_overflowing_gap_asks_for_a_keyframe_at_once() -> None:
    worker = Worker()
    worker.video_packet(1, 0.0)
    assert worker.video_packet(600, 0.5) is True  # 598 missing, over max_missing (500)
    assert worker.counters["nack_unrepairable"] == 598
    assert worker.plis == [([1], 0.5)]
    worker.run_until(10.0)
    assert worker.sender.datagrams == []


def test_media_without_negotiated_nack_is_never_nacked() -> None:
    worker = Worker(audio_nack=False)
    for seq in (1, 5):
        worker.repair.received(
            worker.stream, worker.audio, AUDIO_SSRC, seq, 0.0, retransmission=False
        )
    worker.run_until(10.0)
    assert worker.sender.datagrams == []
    nacking = Worker(audio_nack=True)
    for seq in (1, 5):
        nacking.repair.received(
            nacking.stream, nacking.audio, AUDIO_SSRC, seq, 0.0, retransmission=False
        )
    nacking.run_until(0.01)
    assert nacking.nacks() == [(AUDIO_SSRC, [2, 3, 4])]


def test_a_new_publisher_starts_from_nothing() -> None:
    worker = Worker()
    worker.video_packet(1, 0.0)
    worker.video_packet(3, 0.0)
    worker.repair.forget("live")
    assert worker.timers.deadline((TimerKind.NACK, "live")) is None
    worker.video_packet(40_000, 0.1)  # the next publisher's numbering: not a gap
    worker.video_packet(40_001, 0.1)
    worker.run_until(10.0)
    assert worker.sender.datagrams == [] and worker.plis == []
    # A publisher replaced without forget() (another session object) is not mixed up.
    other = PublisherSession.__new__(PublisherSession)
    other.ingest = worker.stream.publisher.ingest  # type: ignore[union-attr]
    other.address = ("192.0.2.8", 5000)
    other.local_address = None
    worker.stream.publisher = other
    worker.video_packet(7, 10.0)
    worker.video_packet(8, 10.0)
    worker.run_until(20.0)
    assert worker.sender.datagrams == []


# --------------------------------------------- through the router, SRTP and the Fanout


VP8_KEYFRAME = b"\x10" + bytes([0x50, 0x02, 0x00, 0x9D, 0x01, 0x2A, 0x40, 0x01, 0xF0, 0x00])
CHROMIUM_VIDEO_SSRC, CHROMIUM_RTX_SSRC = 1750141743, 2201050024  # the fixture's FID group


def _vp8(seq: int, *, ssrc: int = CHROMIUM_VIDEO_SSRC, keyframe: bool = False) -> bytes:
    # RTP header (RFC 3550 §5.1, PT 96) + a VP8 descriptor (RFC 7741 §4.2): a keyframe
    # start, or a middle packet (S = 0) of the same picture.
    header = bytes([0x80, 96]) + seq.to_bytes(2, "big") + (90000).to_bytes(4, "big")
    body = VP8_KEYFRAME if keyframe else b"\x00"
    return header + ssrc.to_bytes(4, "big") + body + bytes([seq % 256]) * 40


def test_a_publisher_gap_is_nacked_repaired_by_rtx_and_served_to_viewers() -> None:
    """The whole path in memory: the publisher's SRTP with a gap, our SRTCP NACK naming
    its media SSRC, its RTX (RFC 4588 §4) unwrapped and fanned out, and a viewer's own
    NACK for that packet answered from the fan-out cache."""
    harness = Harness()
    viewer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    viewer_sock.bind(("127.0.0.1", 0))
    viewer_sock.settimeout(5.0)
    try:
        router = harness.router
        publisher_address = ("127.0.0.1", CLIENT[1] + 1)
        viewer_address = viewer_sock.getsockname()
        publisher_id, _, now = connect_viewer(
            harness, 0.0, publisher=True, client=publisher_address
        )
        viewer_id, _, now = connect_viewer(harness, now, client=viewer_address)
        keys = router.sessions[publisher_id].keys
        viewer = router.sessions[viewer_id]
        assert keys is not None and viewer.keys is not None
        assert isinstance(viewer, ViewerSession)
        rtp_out = _fastpath.SrtpSession(keys.profile, keys.remote_key, keys.remote_salt)
        rtcp_in = _fastpath.SrtpSession(keys.profile, keys.local_key, keys.local_salt)
        harness.take_sent()

        for seq in (1000, 1001, 1003):
            packet = _vp8(seq, keyframe=seq == 1000)
            router.datagram_received(rtp_out.protect(packet), publisher_address, now)
        deadline = router.get_timer()
        assert deadline is not None and deadline <= now + 0.005
        router.handle_timer(now + 0.005)
        to_publisher = [data for data, addr in harness.sent if addr == publisher_address]
        (compound,) = (rtcp.parse_compound(rtcp_in.unprotect_rtcp(d)) for d in to_publisher)
        nack = compound[1]
        assert isinstance(nack, rtcp.GenericNack)
        assert nack.media_ssrc == CHROMIUM_VIDEO_SSRC  # the media source that lost it, not RTX
        assert nack.lost_sequence_numbers() == [1002]

        # RFC 4588 §4: RTX PT 97 on the FID SSRC, payload = OSN + the original payload.
        original = _vp8(1002)
        rtx = bytearray(original[:12]) + original[2:4] + original[12:]
        rtx[1] = 97
        rtx[8:12] = CHROMIUM_RTX_SSRC.to_bytes(4, "big")
        rtx[2:4] = (7).to_bytes(2, "big")
        router.datagram_received(rtp_out.protect(bytes(rtx)), publisher_address, now + 0.02)
        assert router.counters["nack_recovered"] == 1
        # A second answer repairs nothing and is not fanned out again.
        rtx[2:4] = (8).to_bytes(2, "big")
        router.datagram_received(rtp_out.protect(bytes(rtx)), publisher_address, now + 0.03)
        assert router.counters["drop_ingest_rtx_duplicate"] == 1
        # A padding-only RTX probe (RFC 3550 §5.1 padding, no OSN) is neither unwrapped
        # into a bogus original nor taken for a gap.
        probe = bytearray(rtx[:12]) + bytes(223) + bytes([224])
        probe[0] |= 0x20
        probe[2:4] = (9).to_bytes(2, "big")
        router.datagram_received(rtp_out.protect(bytes(probe)), publisher_address, now + 0.04)
        assert router.counters["drop_ingest_rtx_padding"] == 1
        assert router.repair.rtt("live") == pytest.approx(0.015)  # the one repair's
        router.handle_timer(now + 1.0)
        assert router.counters["nack_sent_upstream"] == 1
        assert router.counters["nack_unrepairable"] == 0

        # The viewer got 1000, 1001, 1003 and then the repaired 1002, renumbered.
        viewer_in = _fastpath.SrtpSession(
            viewer.keys.profile, viewer.keys.local_key, viewer.keys.local_salt
        )
        received: list[bytes] = []
        while len(received) < 4:
            data = viewer_sock.recv(2048)
            if data[0] >= 128 and not 192 <= data[1] <= 223:  # RTP, not RTCP (RFC 5761 §4)
                received.append(viewer_in.unprotect(data))
        repaired = received[3]
        # The payload as sent; the header gained the viewer's transport-wide sequence
        # number (its Chromium offer negotiated transport-cc).
        assert rtp.RtpPacket.parse(repaired).payload == original[12:]
        repaired_seq = int.from_bytes(repaired[2:4], "big")

        # Its NACK for the repaired packet hits the cache (it missed before issue 15).
        video = next(m for m in viewer.egress if m.kind == "video")
        viewer_nack = rtcp.GenericNack.from_sequence_numbers(
            sender_ssrc=1, media_ssrc=video.ssrc, sequence_numbers=[repaired_seq]
        )
        viewer_out = _fastpath.SrtpSession(
            viewer.keys.profile, viewer.keys.remote_key, viewer.keys.remote_salt
        )
        before = router.fanout.stats()
        router.datagram_received(
            viewer_out.protect_rtcp(bytes(viewer_nack)), viewer_address, now + 0.05
        )
        after = router.fanout.stats()
        assert after["resent"] == before["resent"] + 1
        assert after["resend_misses"] == before["resend_misses"]
    finally:
        viewer_sock.close()
        harness.close()


def test_padding_only_packets_are_told_apart() -> None:
    header = _vp8(5)[:12]
    padded = bytearray(header) + b"\x07\x00" + bytes(3) + b"\x04"
    padded[0] |= 0x20  # P: the last 4 bytes are padding, the OSN 0x0700 is not
    assert not rtp.padding_only(bytes(padded))
    probe = bytearray(header) + bytes(255) + b"\xff"
    assert not rtp.padding_only(bytes(probe))  # P unset: all of it is payload
    probe[0] |= 0x20
    assert rtp.padding_only(bytes(probe[:12] + probe[-255:]))
    assert not rtp.padding_only(header)


def test_a_scattered_loss_list_is_split_below_1200_bytes() -> None:
    worker = Worker()
    # One loss in 18: no two share a PID+BLP item (RFC 4585 §6.2.1 covers PID + 16), so
    # 300 losses are 300 items, 1,224 bytes of FCI: more than one datagram holds.
    for seq in range(1, 18 * 300 + 1):
        if seq % 18:
            worker.video_packet(seq, 0.0)
    worker.run_until(0.01)
    lost = [seq for _, numbers in worker.nacks() for seq in numbers]
    assert lost == list(range(18, 18 * 300, 18))
    assert len(worker.sender.datagrams) == 2
    assert all(len(datagram) <= 1200 for datagram in worker.sender.datagrams)
    assert worker.counters["nack_packets_upstream"] == 2
