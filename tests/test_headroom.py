"""The viewer headroom-probe driver (media/headroom.py) on virtual time.

One simulcast stream (three VP8 layers, each measured by its ``LayerMeter``, and Opus),
one viewer with transport-wide cc and RTX, and everything between the viewer's RTCP and
the layer it is sent is the production code: ``Egress.keyed``/``rtcp_received``/``remove``
(SRTCP unprotected by a real ``Fanout`` slot), the ``LayerSelector`` and its
``LayerPolicy``, ``KeyframeRequests``, ``Timers``, ``ViewerBandwidth``, and the viewer's
own feedback (media/twcc.py ``ArrivalFeedback``, every 100 ms like Chromium).

The one stand-in is ``VirtualTransport``, for the two compiled-core calls the driver
makes: ``Fanout.transport_sent`` stamps CLOCK_MONOTONIC send times, so on virtual time
the send log has to be kept by the test. It numbers and logs what the viewer is sent
(media, and the padding ``send_padding`` asks for) on the test's clock and passes it
through tests/test_bandwidth.py's token-bucket link: a 10 Mbit/s path, or the browser
harness's ``tbf rate 700kbit``. No packet goes through the real Fanout: it holds the
viewer's slot, keys and subscriptions, so the selector's subscribe and switch calls and
the subscription states they leave are the compiled core's own.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
import socket
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import pytest
from test_bandwidth import (
    AUDIO_INTERVAL,
    AUDIO_SIZE,
    FRAME_RATE,
    HIGH_BPS,
    LOW_BPS,
    MID_BPS,
    MTU_PAYLOAD,
    TokenBucketLink,
    open_link,
    slow_link,
)

from whepfan import _fastpath
from whepfan.media.bandwidth import BandwidthConfig
from whepfan.media.egress import Egress
from whepfan.media.feedback import KeyframeRequests
from whepfan.media.headroom import (
    DEFAULT_INITIAL_BPS,
    FEEDBACK_BEFORE_USE,
    PROBE_MARGIN,
    HeadroomProbes,
)
from whepfan.media.layers import (
    PROBE_LOSS_GRACE,
    SUBSCRIPTION_AWAITING_KEYFRAME,
    SUBSCRIPTION_NONE,
    LayerChoice,
    LayerPolicy,
    LayerRequest,
    LayerSelector,
)
from whepfan.media.probe import PADDING_DATAGRAM_OVERHEAD, PaddingRequest
from whepfan.media.sender import Sender
from whepfan.media.session import SessionKind, SrtpKeys, ViewerSession
from whepfan.media.streams import Stream, Track
from whepfan.media.timers import TimerKind, Timers
from whepfan.media.twcc import ArrivalFeedback
from whepfan.protocol import rtcp
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.protocol.negotiation import EXT_TRANSPORT_CC, EgressMedia, IngestMedia, RtpCodec

# The stream: (rid, bit/s, width, height) low to high, the rates of tests/test_bandwidth.py.
Layer = tuple[str, float, int, int]
SIMULCAST: tuple[Layer, ...] = (
    ("q", LOW_BPS, 320, 180),
    ("h", MID_BPS, 640, 360),
    ("f", HIGH_BPS, 1280, 720),
)
VP8 = RtpCodec("VP8", 90000, None, 96, rtcp_feedback=("nack", "transport-cc"), rtx_payload_type=97)
OPUS = RtpCodec("opus", 48000, 2, 111, rtcp_feedback=("transport-cc",))
AUDIO_SSRC, VIDEO_SSRC, RTX_SSRC, VIEWER_RTCP_SSRC = 0x0A0A0A0A, 0x0B0B0B0B, 0x0C0C0C0C, 0x0D0D
TRANSPORT_CC_ID = 3
# Every datagram the viewer is sent beyond its payload (media) or padding octets: RTP
# header (12), the transport-wide sequence number's extension block (8, RFC 8285 §4.2),
# the AEAD_AES_128_GCM tag (16, RFC 7714 §8). The layer meters count payload only, so
# this is part of "what the viewer receives besides video".
DATAGRAM_OVERHEAD = 12 + 8 + 16
KEYFRAME_FACTOR = 3  # a layer's first picture to a new subscriber is a keyframe this large
RECEIVER_CLOCK = 1000.0  # the viewer's clock, this far ahead of ours
RETURN_DELAY = 0.020  # viewer -> server, for its RTCP
VIEWER_JOINS_AT = 1.5  # the publisher has sent for a while: every meter has a reading
LOSS_64_OF_256 = 64  # RFC 3550 §6.4.1 fraction lost 0.25, over LayerPolicy.loss_down

PROBE_CONFIG = BandwidthConfig()


@functools.cache
def certificate() -> DtlsCertificate:
    return DtlsCertificate.generate()


class VirtualTransport:
    """Stands in for the compiled core's ``Fanout.transport_sent`` and
    ``Fanout.send_padding`` (whepfan/_fastpath.pyi) on the test's clock: each datagram
    sent to the viewer gets its next transport-wide sequence number (16 bits, starting
    just below the wrap) and a send log entry (send time, size), and goes to ``deliver``
    (the link). ``refuse_padding`` answers as the core does before the subscription's
    first media packet or without RTX: nothing sent."""

    def __init__(self, deliver: Callable[[int, float, int], None]) -> None:
        self.now = 0.0
        self.slot: int | None = None  # the viewer's slot in the real Fanout
        self.refuse_padding = False
        self.padding_calls: list[tuple[float, int, int, int, int]] = []
        self.padding_packets = 0
        self._deliver = deliver
        self._sequence = 0xFFF0
        self._log: dict[int, tuple[float, int]] = {}

    def send(self, time: float, size: int) -> None:
        sequence = self._sequence
        self._sequence = (sequence + 1) & 0xFFFF
        self._log[sequence] = (time, size)
        self._deliver(sequence, time, size)

    # --- the two Fanout methods HeadroomProbes calls -------------------------------------

    def transport_sent(
        self, viewer: int, base_sequence: int, count: int
    ) -> list[tuple[float, int] | None]:
        assert viewer == self.slot
        assert 0 <= count <= 0xFFFF
        return [self._log.get((base_sequence + i) & 0xFFFF) for i in range(count)]

    def send_padding(self, viewer: int, track: int, count: int, size: int) -> int:
        assert viewer == self.slot
        assert 0 <= count <= 1024 and 1 <= size <= 255  # the core's bounds
        self.padding_calls.append((self.now, viewer, track, count, size))
        if self.refuse_padding:
            return 0
        for index in range(count):
            # One sendmmsg batch: back to back.
            self.send(self.now + index * 5e-6, size + DATAGRAM_OVERHEAD)
        self.padding_packets += count
        return count


class RtcpMessage(Protocol):
    def serialize(self) -> bytes: ...


@dataclass(frozen=True)
class Report:
    """What the policy was about to read when ``viewer_reported`` ran, and what it did."""

    time: float
    feedback_count: int
    estimate: float | None
    acknowledged_bps: float | None
    probe_succeeded: bool | None
    fraction_lost: float | None
    before: str | None  # rid of the viewer's target layer
    after: str | None


class RecordingSelector(LayerSelector):
    """The production selector, recording each ``viewer_reported``."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.reports: list[Report] = []

    def viewer_reported(self, stream: Stream, choice: LayerChoice, now: float) -> None:
        before = choice.target.rid if choice.target is not None else None
        bandwidth = choice.session.bandwidth
        fraction_lost, probe_succeeded = choice.fraction_lost, choice.probe_succeeded
        super().viewer_reported(stream, choice, now)
        self.reports.append(
            Report(
                time=now,
                feedback_count=bandwidth.feedback_count if bandwidth is not None else 0,
                estimate=choice.estimate,
                acknowledged_bps=bandwidth.acknowledged_bps if bandwidth is not None else None,
                probe_succeeded=probe_succeeded,
                fraction_lost=fraction_lost,
                before=before,
                after=choice.target.rid if choice.target is not None else None,
            )
        )


class World:
    """A publisher's stream, one viewer and its link, on one virtual timeline."""

    egress: Egress  # the selector subscribes through it, so it is built after

    def __init__(
        self,
        *,
        link: TokenBucketLink,
        layers: Sequence[Layer] = SIMULCAST,
        join_at: float = VIEWER_JOINS_AT,
        seed: int = 1,
    ) -> None:
        self.link = link
        self.join_at = join_at
        self.rng = random.Random(seed)
        self.now = 0.0
        self.counters: Counter[str] = Counter()
        self.timers = Timers()
        self.keyframe_requests: list[tuple[float, list[str | None]]] = []
        self._fanout_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._fanout_socket.bind(("127.0.0.1", 0))
        self._fanout_socket.setblocking(False)
        self._viewer_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._viewer_socket.bind(("127.0.0.1", 0))
        self.fanout = _fastpath.Fanout(self._fanout_socket.fileno(), max_viewers=4, max_tracks=8)

        video_ingest = IngestMedia(mid="1", kind="video", codec=VP8)
        audio_ingest = IngestMedia(mid="0", kind="audio", codec=OPUS)
        self.audio = Track(
            fanout_id=self.fanout.add_track(clock_rate=48000),
            kind="audio",
            ingest=audio_ingest,
            codec_name="opus",
            clock_rate=48000,
        )
        self.rates: dict[str, float] = {}
        video: list[Track] = []
        for index, (rid, bps, width, height) in enumerate(layers):
            track = Track(
                fanout_id=self.fanout.add_track(
                    clock_rate=90000, payload_format=_fastpath.PAYLOAD_VP8
                ),
                kind="video",
                ingest=video_ingest,
                codec_name="VP8",
                clock_rate=90000,
                rid=rid,
                encoding_index=index,
                width=width,
                height=height,
            )
            self.rates[rid] = bps
            video.append(track)
        self.stream = Stream(name="live", tracks={"audio": [self.audio], "video": video})

        self.keyframes = KeyframeRequests(
            interval=1.0, timers=self.timers, counters=self.counters, upstream=self._upstream
        )
        self.selector = RecordingSelector(
            fanout=self.fanout,
            policy=LayerPolicy(),
            keyframes=self.keyframes,
            subscribe=lambda session, media, track: self.egress.subscribe(session, media, track),
            emit=lambda stream, kind, data: None,
            counters=self.counters,
        )
        self.egress = Egress(
            fanout=self.fanout,
            streams={self.stream.name: self.stream},
            sender=Sender(send=lambda datagram, address: None),
            keyframes=self.keyframes,
            layers=self.selector,
            end_viewer=self._viewer_ended,
            timers=self.timers,
            counters=self.counters,
        )
        self.core = VirtualTransport(self._on_link)
        self.egress.headroom = HeadroomProbes(
            fanout=cast(_fastpath.Fanout, self.core),  # the two calls it makes, on virtual time
            layers=self.selector,
            timers=self.timers,
            counters=self.counters,
        )

        session = ViewerSession.create(
            kind=SessionKind.VIEWER,
            stream=self.stream.name,
            certificate=certificate(),
            dtls_role="server",
            remote_fingerprints=[],
            remote_ufrag=None,
            remote_pwd=None,
            consent_timeout=30.0,
            now=0.0,
        )
        assert isinstance(session, ViewerSession)
        transport_cc = {EXT_TRANSPORT_CC: TRANSPORT_CC_ID}
        session.egress = [
            EgressMedia("0", "audio", "0", OPUS, AUDIO_SSRC, extension_ids=transport_cc),
            EgressMedia("1", "video", "1", VP8, VIDEO_SSRC, RTX_SSRC, extension_ids=transport_cc),
        ]
        # The viewer's keys as DTLS exported them (RFC 5764 §4.2); its SRTCP to us is
        # protected with what is our receive key.
        keys = SrtpKeys(
            profile=_fastpath.PROFILE_AEAD_AES_128_GCM,
            local_key=bytes(range(16)),
            local_salt=bytes(range(12)),
            remote_key=bytes(range(100, 116)),
            remote_salt=bytes(range(100, 112)),
        )
        session.keys = keys
        session.address = self._viewer_socket.getsockname()
        self.session = session
        self.stream.viewers[session.id] = session
        self._viewer_srtcp = _fastpath.SrtpSession(keys.profile, keys.remote_key, keys.remote_salt)

        self.receiver = ArrivalFeedback(sender_ssrc=VIEWER_RTCP_SSRC, media_ssrc=VIDEO_SSRC)
        self._arrivals: list[tuple[float, int]] = []
        self._rtcp: list[tuple[float, int, list[RtcpMessage]]] = []
        self._order = itertools.count()
        self._next_frame_at = 0.0
        self._next_audio_at = 0.007
        self._frame_index = 0
        self._audio_index = 0
        self._keyframe_sent = False
        self.joined = False
        self.ended: list[str] = []
        # Set to drop the viewer's transport feedback on its way to us.
        self.feedback_lost: Callable[[float], bool] | None = None
        self.feedback_delivered = 0
        self.rtcp_delivered: list[tuple[float, list[RtcpMessage]]] = []
        # HEADROOM_PROBE timer runs: (time, its deadline after, ViewerBandwidth.deadline()).
        self.probe_timer_runs: list[tuple[float, float | None, float | None]] = []

    def close(self) -> None:
        self._fanout_socket.close()
        self._viewer_socket.close()

    # --- what the tests read -------------------------------------------------------------

    @property
    def choice(self) -> LayerChoice:
        return self.stream.choices[self.session.id]

    @property
    def probe_key(self) -> tuple[TimerKind, str]:
        return (TimerKind.HEADROOM_PROBE, self.session.id)

    @property
    def reports(self) -> list[Report]:
        return self.selector.reports

    def layer(self, rid: str) -> Track:
        return next(track for track in self.stream.tracks["video"] if track.rid == rid)

    def rate(self, rid: str) -> float:
        """The layer's measured rate now (what the policy and the driver read)."""
        return self.layer(rid).meter.rates(self.now)[0]

    # --- the viewer's RTCP besides its transport feedback --------------------------------

    def inject(self, at: float, packets: list[RtcpMessage]) -> None:
        """A compound RTCP packet of the viewer's, arriving at ``at``."""
        heapq.heappush(self._rtcp, (at, next(self._order), packets))

    def receiver_report(self, fraction_lost: int) -> rtcp.ReceiverReport:
        return rtcp.ReceiverReport(
            ssrc=VIEWER_RTCP_SSRC,
            reports=[rtcp.ReportBlock(ssrc=VIDEO_SSRC, fraction_lost=fraction_lost)],
        )

    # --- the timeline --------------------------------------------------------------------

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Advance to ``until``, or to the first event after which ``stop()`` holds."""
        while True:
            receiver_due = self.receiver.deadline()
            timer_due = self.timers.next_deadline()
            candidates = (
                math.inf if self.joined else self.join_at,
                self._next_frame_at,
                self._next_audio_at,
                self._arrivals[0][0] if self._arrivals else math.inf,
                math.inf if receiver_due is None else receiver_due - RECEIVER_CLOCK,
                self._rtcp[0][0] if self._rtcp else math.inf,
                math.inf if timer_due is None else timer_due,
            )
            time = min(candidates)
            if time > until:
                self.now = until
                return
            self.now = self.core.now = time
            event = candidates.index(time)
            if event == 0:
                self.joined = True
                self.egress.keyed(self.session, time)
                self.core.slot = self.session.fanout_slot
            elif event == 1:
                self._frame(time)
            elif event == 2:
                self._audio_packet(time)
            elif event == 3:
                _, sequence = heapq.heappop(self._arrivals)
                self.receiver.record(sequence, RECEIVER_CLOCK + time)
            elif event == 4:
                for packet in self.receiver.poll(RECEIVER_CLOCK + time):
                    if self.feedback_lost is None or not self.feedback_lost(time):
                        self.inject(time + RETURN_DELAY, [packet])
            elif event == 5:
                _, _, packets = heapq.heappop(self._rtcp)
                self._deliver_rtcp(time, packets)
            else:
                self._timers_due(time)
            if stop is not None and stop():
                return

    def _forwarded(self) -> Track | None:
        """The video layer the Fanout sends the viewer: its current subscription (a
        pending switch completes on a keyframe, which nothing here pushes)."""
        if self.session.fanout_slot is None:
            return None
        choice = self.stream.choices.get(self.session.id)
        return choice.current if choice is not None else None

    def _frame(self, time: float) -> None:
        """One picture of every layer: metered as the ingest path does, and the viewer's
        layer packetized and sent back to back."""
        timestamp = self._frame_index * 3000
        self._frame_index += 1
        self._next_frame_at = self._frame_index / FRAME_RATE
        forwarded = self._forwarded()
        for track in self.stream.tracks["video"]:
            assert track.rid is not None
            frame_bytes = self.rates[track.rid] / FRAME_RATE / 8 * self.rng.uniform(0.8, 1.2)
            track.meter.add(int(frame_bytes), timestamp, time)
            if track is not forwarded:
                continue
            if not self._keyframe_sent:
                self._keyframe_sent = True
                frame_bytes *= KEYFRAME_FACTOR
            packets = max(1, math.ceil(frame_bytes / MTU_PAYLOAD))
            payload = math.ceil(frame_bytes / packets)
            for index in range(packets):
                self.core.send(time + index * 20e-6, payload + DATAGRAM_OVERHEAD)

    def _audio_packet(self, time: float) -> None:
        self.audio.meter.add(AUDIO_SIZE, self._audio_index * 960, time)
        self._audio_index += 1
        self._next_audio_at = 0.007 + self._audio_index * AUDIO_INTERVAL
        if self.session.fanout_slot is not None:
            self.core.send(time, AUDIO_SIZE + DATAGRAM_OVERHEAD)

    def _on_link(self, sequence: int, time: float, size: int) -> None:
        arrival = self.link.send(time, size)
        if arrival is not None:
            heapq.heappush(self._arrivals, (arrival, sequence))

    def _deliver_rtcp(self, time: float, packets: list[RtcpMessage]) -> None:
        compound = b"".join(packet.serialize() for packet in packets)
        self.rtcp_delivered.append((time, packets))
        self.feedback_delivered += sum(
            isinstance(packet, rtcp.TransportFeedback) for packet in packets
        )
        self.egress.rtcp_received(self.session, self._viewer_srtcp.protect_rtcp(compound), time)

    def _timers_due(self, time: float) -> None:
        for kind, name in self.timers.due(time):
            if kind is TimerKind.HEADROOM_PROBE:
                # As Router.handle_timer does.
                assert name == self.session.id
                self.egress.headroom.handle_timer(self.session, self.stream, time)
                bandwidth = self.session.bandwidth
                self.probe_timer_runs.append(
                    (
                        time,
                        self.timers.deadline(self.probe_key),
                        bandwidth.deadline() if bandwidth is not None else None,
                    )
                )
            elif kind is TimerKind.KEYFRAME_RETRY:
                self.keyframes.handle_timer(self.stream, name, time)
            else:
                raise AssertionError(f"unexpected timer {kind}")

    def _upstream(self, stream: Stream, tracks: Sequence[Track], now: float) -> bool:
        self.keyframe_requests.append((now, [track.rid for track in tracks]))
        return True

    def _viewer_ended(self, session_id: str, now: float, reason: str) -> None:
        self.ended.append(reason)


@pytest.fixture
def make_world() -> Iterator[Callable[..., World]]:
    worlds: list[World] = []

    def make(**options: object) -> World:
        world = World(**options)  # type: ignore[arg-type]
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        world.close()


def run_until_probe_starts(world: World, *, within: float = 12.0) -> float:
    started = world.counters["headroom_probes_started"]
    world.run(
        until=world.now + within,
        stop=lambda: world.counters["headroom_probes_started"] > started,
    )
    assert world.counters["headroom_probes_started"] == started + 1, "no probe started"
    return world.now


def run_until_probe_ends(world: World, *, within: float = 4.0) -> float:
    world.run(until=world.now + within, stop=lambda: not world.choice.probe_started)
    assert not world.choice.probe_started, "the probe never ended"
    return world.now


PROBE_OUTCOMES = ("succeeded", "overuse", "loss", "too_slow", "no_feedback", "unsent")


def outcomes(world: World) -> dict[str, int]:
    return {
        outcome: world.counters[f"headroom_probes_{outcome}"]
        for outcome in (*PROBE_OUTCOMES, "cancelled")
        if world.counters[f"headroom_probes_{outcome}"]
    }


def headroom_counters(world: World) -> dict[str, int]:
    return {
        name: value
        for name, value in world.counters.items()
        if name.startswith(("headroom_", "viewer_transport_feedback"))
    }


# --- 1. feedback nothing depends on -----------------------------------------------------


def test_feedback_for_a_single_layer_stream_is_counted_unused_and_never_decoded(
    make_world: Callable[..., World],
) -> None:
    world = make_world(link=open_link(), layers=SIMULCAST[1:2])
    world.run(until=9.0)  # past the up_wait after which a simulcast viewer probes
    bandwidth = world.session.bandwidth
    assert bandwidth is not None  # the viewer negotiated transport-cc: it has an estimator
    assert world.feedback_delivered >= 70
    assert world.counters["viewer_transport_feedback_unused"] == world.feedback_delivered
    assert world.counters["viewer_transport_feedback"] == 0
    assert bandwidth.feedback_count == 0 and bandwidth.acknowledged_bps is None
    assert world.choice.estimate is None
    assert world.reports == []  # nothing new for the policy: it was never asked
    assert outcomes(world) == {} and world.counters["headroom_probes_started"] == 0
    assert world.core.padding_calls == []


def test_feedback_on_a_manual_layer_choice_is_counted_unused_and_never_decoded(
    make_world: Callable[..., World],
) -> None:
    world = make_world(link=open_link())
    world.run(until=2.0)
    decoded = world.session.bandwidth.feedback_count if world.session.bandwidth else 0
    assert 0 < decoded < FEEDBACK_BEFORE_USE  # automatic so far: decoded, not yet used
    assert world.counters["viewer_transport_feedback"] == decoded
    world.selector.select(world.stream, world.session, LayerRequest(rid="f"), world.now)
    assert world.choice.manual is world.layer("f")
    delivered, reports = world.feedback_delivered, len(world.reports)
    world.run(until=9.0)
    bandwidth = world.session.bandwidth
    assert bandwidth is not None and bandwidth.feedback_count == decoded
    assert world.feedback_delivered - delivered >= 60
    assert (
        world.counters["viewer_transport_feedback_unused"] == world.feedback_delivered - delivered
    )
    assert world.counters["viewer_transport_feedback"] == decoded
    assert world.choice.estimate is None
    assert len(world.reports) == reports
    assert world.counters["headroom_probes_started"] == 0 and world.core.padding_calls == []


# --- 2. the estimate reaches the policy -------------------------------------------------


def test_the_estimate_reaches_the_policy_after_enough_feedback_from_the_acknowledged_rate(
    make_world: Callable[..., World],
) -> None:
    # Joined as the publisher starts: no meter reading yet, so the estimator starts from a
    # guess below what the viewer's layer sends. That guess must never reach the policy
    # (regression: an open viewer moved down at ~3 s).
    world = make_world(link=open_link(), join_at=0.0)
    world.run(until=0.0)
    bandwidth = world.session.bandwidth
    assert bandwidth is not None and bandwidth.estimate_bps == DEFAULT_INITIAL_BPS
    # That guess, read by the policy, would be congestion on the middle layer.
    assert LayerPolicy().remb_margin * MID_BPS > DEFAULT_INITIAL_BPS
    world.run(until=4.5)
    early = [r for r in world.reports if r.feedback_count < FEEDBACK_BEFORE_USE]
    later = [r for r in world.reports if r.feedback_count >= FEEDBACK_BEFORE_USE]
    assert len(early) >= FEEDBACK_BEFORE_USE - 2 and later
    assert all(r.estimate is None for r in early)
    first = later[0]
    assert first.feedback_count <= FEEDBACK_BEFORE_USE + 1  # one or two per datagram
    assert first.time == pytest.approx(FEEDBACK_BEFORE_USE * 0.1, abs=0.25)
    assert first.estimate is not None and first.acknowledged_bps is not None
    # From what the path was shown to deliver, not from the guess grown by 8 %/s.
    assert first.estimate >= first.acknowledged_bps
    assert first.acknowledged_bps > MID_BPS  # the layer, audio and headers
    assert all(r.estimate is not None for r in later)
    assert world.choice.estimate == bandwidth.estimate_bps
    # ... so the viewer stays on the layer it can carry.
    assert world.counters["layer_auto_down"] == 0
    assert {r.after for r in world.reports} == {"h"}


# --- 3. a probe, and what its outcome does ----------------------------------------------


def test_a_probe_on_an_open_link_pads_up_to_the_next_layer_and_moves_the_viewer_up(
    make_world: Callable[..., World], monkeypatch: pytest.MonkeyPatch
) -> None:
    world = make_world(link=open_link())
    started_at = run_until_probe_starts(world)
    choice, bandwidth = world.choice, world.session.bandwidth
    assert bandwidth is not None and bandwidth.probing
    # Asked for by the policy after up_wait of clean reports (one per feedback).
    assert choice.policy.probe_for == 2 and choice.probe_started
    assert started_at - world.reports[0].time == pytest.approx(LayerPolicy().up_wait, abs=0.15)
    assert world.reports[-1].estimate is not None
    # The target: PROBE_MARGIN x (the next layer + what the viewer receives besides its
    # video); the padding tops what is sent up to it.
    sent = bandwidth.sent_bps
    assert sent is not None
    besides_video = sent - world.rate("h")
    audio_bps = AUDIO_SIZE * 8 / AUDIO_INTERVAL
    # Audio, and every datagram's headers (~110 a second here, 36 bytes each: ~32 kbit/s).
    assert audio_bps + 20_000 < besides_video < audio_bps + 80_000
    target = PROBE_MARGIN * (world.rate("f") + besides_video)
    padding_bps = target - sent
    # Its first chunk is due at once.
    assert world.timers.deadline(world.probe_key) == bandwidth.deadline() == started_at

    requests: list[PaddingRequest] = []
    poll = bandwidth.poll

    def recording_poll(now: float) -> PaddingRequest | None:
        request = poll(now)
        if request is not None:
            requests.append(request)
        return request

    monkeypatch.setattr(bandwidth, "poll", recording_poll)
    finished_at = run_until_probe_ends(world)

    # The padding is what ViewerBandwidth asked for, on the viewer's current layer ...
    slot, track = world.session.fanout_slot, world.layer("h").fanout_id
    assert slot is not None and requests
    assert [call[1:] for call in world.core.padding_calls] == [
        (slot, track, request.count, request.size) for request in requests
    ]
    assert world.counters["headroom_padding_sent"] == world.core.padding_packets > 0
    # ... on the 20 ms grid from the start, re-armed after each chunk at the next one,
    # for the probe's duration ...
    interval, duration = PROBE_CONFIG.probe_padding_interval, PROBE_CONFIG.probe_duration
    padding_runs = [run for run in world.probe_timer_runs if run[0] < started_at + duration]
    assert len(padding_runs) == round(duration / interval)
    for step, (time, rearmed, deadline) in enumerate(padding_runs):
        assert time == pytest.approx(started_at + step * interval)
        assert rearmed == deadline and rearmed is not None and rearmed > time
    assert all(call[0] < started_at + duration for call in world.core.padding_calls)
    # ... at the rate that tops the viewer up to the target once the ramp is over.
    warm = started_at + PROBE_CONFIG.probe_warmup - interval / 2
    steady = [call for call in world.core.padding_calls if call[0] >= warm]
    steady_bytes = sum(count * (size + PADDING_DATAGRAM_OVERHEAD) for *_, count, size in steady)
    steady_seconds = duration - PROBE_CONFIG.probe_warmup
    assert steady_bytes * 8 / steady_seconds == pytest.approx(padding_bps, rel=0.02)

    # The feedback covering the probe's packets handed its outcome to the policy, which
    # moved the viewer up in the same RTCP packet's decision.
    assert outcomes(world) == {"succeeded": 1}
    (outcome,) = [r for r in world.reports if r.probe_succeeded is not None]
    assert outcome.probe_succeeded is True and outcome.time == finished_at
    assert (outcome.before, outcome.after) == ("h", "f")
    assert choice.probe_finished_at == finished_at and choice.probe_succeeded is None
    assert finished_at - started_at == pytest.approx(duration + 0.15, abs=0.15)
    assert outcome.estimate is not None and outcome.estimate >= 0.9 * target
    assert world.counters["layer_auto_up"] == 1 and world.counters["layer_switches_started"] == 1
    assert choice.pending is world.layer("f")
    assert world.fanout.subscription_state(slot, world.layer("f").fanout_id) == (
        SUBSCRIPTION_AWAITING_KEYFRAME
    )
    # The switch completes on the layer's next keyframe: asked for now.
    requested_at, requested = world.keyframe_requests[-1]
    assert requested_at == finished_at and "f" in requested
    # Nothing runs any more: the timer is off and no probe is wanted.
    assert choice.policy.probe_for is None and not bandwidth.probing
    assert world.timers.deadline(world.probe_key) is None
    calls = len(world.core.padding_calls)
    world.run(until=finished_at + 3.0)
    assert len(world.core.padding_calls) == calls
    assert world.counters["headroom_probes_started"] == 1


def test_a_probe_on_700_kbits_fails_leaves_the_viewer_and_doubles_the_wait(
    make_world: Callable[..., World],
) -> None:
    world = make_world(link=slow_link())
    started_at = run_until_probe_starts(world)
    choice, bandwidth = world.choice, world.session.bandwidth
    assert bandwidth is not None
    failed_at = run_until_probe_ends(world)
    # Given up as soon as the queue showed: well before the padding's 1.5 s.
    assert failed_at - started_at < 0.8
    assert all(call[0] < failed_at for call in world.core.padding_calls)
    assert world.timers.deadline(world.probe_key) is None and not bandwidth.probing
    counted = outcomes(world)
    assert sum(counted.values()) == 1 and set(counted) <= {"overuse", "loss", "too_slow"}
    (outcome,) = [r for r in world.reports if r.probe_succeeded is not None]
    assert outcome.probe_succeeded is False and outcome.time == failed_at
    assert (outcome.before, outcome.after) == ("h", "h")
    assert choice.policy.up_wait == 2 * LayerPolicy().up_wait
    # The viewer never saw the layer it could not carry.
    assert world.counters["layer_auto_up"] == world.counters["layer_switches_started"] == 0
    slot = world.session.fanout_slot
    assert slot is not None
    assert world.fanout.subscription_state(slot, world.layer("f").fanout_id) == SUBSCRIPTION_NONE
    # The next probe comes after the doubled wait of clean reports, and meanwhile the
    # viewer keeps the layer that fits.
    again_at = run_until_probe_starts(world)
    assert again_at - failed_at == pytest.approx(2 * LayerPolicy().up_wait, abs=0.15)
    assert world.counters["layer_auto_down"] == 0
    assert {r.after for r in world.reports} == {"h"}


# --- 4. padding the core cannot send ----------------------------------------------------


def test_padding_that_cannot_be_sent_fails_the_probe_without_a_busy_loop(
    make_world: Callable[..., World],
) -> None:
    world = make_world(link=open_link())
    world.core.refuse_padding = True
    started_at = run_until_probe_starts(world)
    choice, bandwidth = world.choice, world.session.bandwidth
    assert bandwidth is not None
    unsent_at = run_until_probe_ends(world, within=0.5)
    # The first chunk with a whole datagram in it (the ramp starts small): refused, so
    # the probe ends there.
    assert started_at < unsent_at <= started_at + 2 * PROBE_CONFIG.probe_padding_interval
    assert len(world.core.padding_calls) == 1 and world.core.padding_packets == 0
    assert outcomes(world) == {"unsent": 1}
    assert world.counters["headroom_padding_sent"] == 0
    assert choice.probe_succeeded is False  # for the policy's next decision
    assert choice.probe_finished_at == unsent_at
    assert not bandwidth.probing and world.timers.deadline(world.probe_key) is None
    # The next report reads it as a failed probe: the viewer stays, the wait doubles ...
    reports = len(world.reports)
    world.run(until=unsent_at + 0.5, stop=lambda: len(world.reports) > reports)
    report = world.reports[-1]
    assert report.probe_succeeded is False and (report.before, report.after) == ("h", "h")
    assert choice.policy.up_wait == 2 * LayerPolicy().up_wait
    # ... and nothing is tried again until that wait is over.
    again_at = run_until_probe_starts(world)
    assert again_at - report.time == pytest.approx(2 * LayerPolicy().up_wait, abs=0.15)
    assert len(world.core.padding_calls) == 1
    assert [run for run in world.probe_timer_runs if unsent_at < run[0] < again_at] == []


# --- 5. congestion while a probe runs ---------------------------------------------------


def test_congestion_during_a_probe_cancels_it_and_its_timer(
    make_world: Callable[..., World],
) -> None:
    world = make_world(link=open_link())
    run_until_probe_starts(world)
    choice, bandwidth = world.choice, world.session.bandwidth
    assert bandwidth is not None
    world.run(until=world.now + 1.0, stop=lambda: len(world.core.padding_calls) >= 5)
    assert world.timers.deadline(world.probe_key) is not None
    # A REMB (draft-alvestrand-rmcat-remb §2) below what the viewer's layer sends: the
    # policy moves it down and wants no probe any more.
    congested_at = world.now + 0.001
    remb = rtcp.ReceiverEstimatedMaxBitrate(
        sender_ssrc=VIEWER_RTCP_SSRC, bitrate=300_000, ssrcs=[VIDEO_SSRC]
    )
    world.inject(congested_at, [world.receiver_report(0), remb])
    world.run(until=congested_at)
    assert world.reports[-1].time == congested_at
    assert (world.reports[-1].before, world.reports[-1].after) == ("h", "q")
    assert choice.policy.probe_for is None
    assert outcomes(world) == {"cancelled": 1}
    assert not choice.probe_started and choice.probe_finished_at == congested_at
    assert not bandwidth.probing
    assert world.timers.deadline(world.probe_key) is None
    calls, runs = len(world.core.padding_calls), len(world.probe_timer_runs)
    world.run(until=congested_at + 3.0)
    assert len(world.core.padding_calls) == calls and len(world.probe_timer_runs) == runs
    assert outcomes(world) == {"cancelled": 1}
    assert world.counters["headroom_probes_started"] == 1


# --- 6. receiver reports that cover a probe ---------------------------------------------


def test_receiver_report_loss_covering_a_probe_does_not_move_the_viewer_down(
    make_world: Callable[..., World],
) -> None:
    world = make_world(link=slow_link())
    started_at = run_until_probe_starts(world)
    choice = world.choice
    # An RR while the probe runs: the loss its padding caused.
    world.inject(started_at + 0.05, [world.receiver_report(LOSS_64_OF_256)])
    failed_at = run_until_probe_ends(world)
    assert failed_at > started_at + 0.05
    assert [r.fraction_lost for r in world.reports if r.time == started_at + 0.05] == [0.25]
    assert world.counters["layer_auto_down"] == 0
    # Within PROBE_LOSS_GRACE after it: the RR may still count the probe's losses.
    within = failed_at + PROBE_LOSS_GRACE - 0.2
    world.inject(within, [world.receiver_report(LOSS_64_OF_256)])
    world.run(until=within)
    assert world.reports[-1].time == within and world.reports[-1].fraction_lost == 0.25
    assert world.counters["layer_auto_down"] == 0 and choice.target is world.layer("h")
    # The same loss once the probe is behind it: with fresh transport feedback the
    # estimate decides (its loss-based part sees every packet), so an RR's loss alone --
    # a keyframe burst's tail drops on this shallow queue -- does not move the viewer.
    after = failed_at + PROBE_LOSS_GRACE + 0.2
    world.inject(after, [world.receiver_report(LOSS_64_OF_256)])
    world.run(until=after)
    assert world.reports[-1].time == after
    assert (world.reports[-1].before, world.reports[-1].after) == ("h", "h")
    assert world.counters["layer_auto_down"] == 0 and choice.target is world.layer("h")


def test_a_probe_whose_feedback_never_comes_fails_at_its_timeout_and_frees_the_loss(
    make_world: Callable[..., World],
) -> None:
    world = make_world(link=open_link())
    started_at = run_until_probe_starts(world)
    choice = world.choice
    # The viewer's transport feedback stops reaching us; its RRs still do.
    world.feedback_lost = lambda time: True
    give_up_at = started_at + PROBE_CONFIG.probe_duration + PROBE_CONFIG.probe_feedback_timeout
    world.run(until=give_up_at + 0.01)
    assert outcomes(world) == {"no_feedback": 1}
    assert not choice.probe_started and choice.probe_finished_at == pytest.approx(give_up_at)
    assert world.timers.deadline(world.probe_key) is None
    # The next report reads the failure: the viewer stays and the wait doubles.
    clean_at = give_up_at + 0.5
    world.inject(clean_at, [world.receiver_report(0)])
    world.run(until=clean_at)
    report = world.reports[-1]
    assert report.time == clean_at and report.probe_succeeded is False
    assert (report.before, report.after) == ("h", "h")
    assert choice.policy.up_wait == 2 * LayerPolicy().up_wait
    # RR loss within the grace may be the probe's; after it, it moves the viewer down.
    for at, moved in (
        (give_up_at + 1.0, ("h", "h")),
        (give_up_at + PROBE_LOSS_GRACE + 0.2, ("h", "q")),
    ):
        world.inject(at, [world.receiver_report(LOSS_64_OF_256)])
        world.run(until=at)
        report = world.reports[-1]
        assert report.time == at and report.fraction_lost == 0.25
        assert (report.before, report.after) == moved


# --- 7. the viewer leaves ---------------------------------------------------------------


def test_release_cancels_the_probe_timer_and_drops_the_estimator(
    make_world: Callable[..., World],
) -> None:
    world = make_world(link=open_link())
    run_until_probe_starts(world)
    world.run(until=world.now + 1.0, stop=lambda: len(world.core.padding_calls) >= 3)
    assert world.timers.deadline(world.probe_key) is not None
    world.egress.remove(world.session, world.stream)
    assert world.session.bandwidth is None and world.session.fanout_slot is None
    assert world.session.id not in world.stream.choices
    assert world.timers.deadline(world.probe_key) is None
    calls, runs = len(world.core.padding_calls), len(world.probe_timer_runs)
    counted = headroom_counters(world)
    world.run(until=world.now + 3.0)  # feedback still in flight arrives and is dropped
    assert len(world.core.padding_calls) == calls and len(world.probe_timer_runs) == runs
    assert headroom_counters(world) == counted
