"""A viewer's bandwidth from transport-wide feedback (media/bandwidth.py) on virtual time.

No sockets and no clock: a stream of the shape the Fanout sends a viewer (30 fps video
frames of 1-7 RTP packets of at most 1200 bytes at a simulcast layer's rate, a larger
keyframe first, 50 Opus packets a second) goes through a small link simulator (a Linux
``tbf`` token bucket with its burst and its latency-derived queue limit, tail drop, and a
fixed propagation delay); the viewer side is the production receive-side feedback
(media/twcc.py ``ArrivalFeedback``, every 100 ms like Chromium), serialized to RTCP
bytes and parsed back as ``egress.rtcp_received`` would; the estimator gets each
feedback with the send log entries ``Fanout.transport_sent`` would return.

The links are those of tests/browser/test_shaped_links.py: ``tbf rate 700kbit burst
32kbit latency 50ms`` for the slow viewer, and a 10 Mbit/s path for the open one. A
closed-loop section drives a small probing layer policy (the rules proposed for
media/layers.py) from the estimator, so the layer a viewer settles on is tested too.
Each stage the estimator composes has its own unit tests: test_packet_results.py,
test_delay_trend.py, test_rate_control.py, test_loss_control.py, test_probe.py.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whepfan.media.bandwidth import (
    MAX_WINDOW_SAMPLES,
    BandwidthConfig,
    RateWindow,
    ViewerBandwidth,
)
from whepfan.media.delay_trend import BandwidthUsage
from whepfan.media.probe import PADDING_DATAGRAM_OVERHEAD, ProbeOutcome
from whepfan.media.twcc import ArrivalFeedback
from whepfan.protocol.rtcp import TWCC_REFERENCE_MOD, TWCC_REFERENCE_TICK, TransportFeedback

CAPTURES = Path(__file__).parent / "data" / "bandwidth"

LOW_BPS, MID_BPS, HIGH_BPS = 150_000.0, 500_000.0, 1_500_000.0
SLOW_LINK_BPS = 700_000.0
OPEN_LINK_BPS = 10_000_000.0
MTU_PAYLOAD = 1200
FRAME_RATE = 30.0
AUDIO_INTERVAL, AUDIO_SIZE = 0.020, 120
REFERENCE_WRAP_SECONDS = TWCC_REFERENCE_MOD * TWCC_REFERENCE_TICK  # 2^24 * 64 ms


# --- the world: a stream, a link, a viewer -------------------------------------------------


def stream(layer_bps: float, *, start: float, end: float, seed: int) -> Iterator[tuple[float, int]]:
    """(send time, datagram size) of one viewer's media: video frames at ``layer_bps``
    (sizes +-20 %, a 3x keyframe first) sent back to back as the Fanout's sendmmsg batch
    does, and 50 audio packets a second, in send order."""
    rng = random.Random(seed)
    video: list[tuple[float, int]] = []
    frame_time = start
    first = True
    while frame_time < end:
        frame_bytes = layer_bps / FRAME_RATE / 8 * rng.uniform(0.8, 1.2) * (3 if first else 1)
        first = False
        packets = max(1, math.ceil(frame_bytes / MTU_PAYLOAD))
        size = math.ceil(frame_bytes / packets)
        for index in range(packets):
            video.append((frame_time + index * 20e-6, size))
        frame_time += 1 / FRAME_RATE
    audio_count = int((end - start) / AUDIO_INTERVAL)
    audio = [(start + 0.007 + i * AUDIO_INTERVAL, AUDIO_SIZE) for i in range(audio_count)]
    yield from heapq.merge(video, audio)


@dataclass
class TokenBucketLink:
    """Linux ``tbf`` (sch_tbf) without a peak rate: tokens at ``rate_bps`` fill a bucket
    of ``burst`` bytes; a packet leaves when the bucket holds its size, so up to a
    bucket's worth leaves at line rate; packets wait FIFO behind it while the queue
    holds at most ``limit`` bytes (tc's ``latency`` gives limit = rate * latency +
    burst), and one that does not fit is dropped. Then ``propagation`` seconds."""

    rate_bps: float
    burst: int
    latency: float
    propagation: float = 0.020
    limit: int = field(init=False)
    _tokens: float = field(init=False)
    _last_departure: float = field(init=False, default=-math.inf)
    _queue: deque[tuple[float, int]] = field(init=False, default_factory=deque)
    _backlog: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.limit = int(self.rate_bps / 8 * self.latency) + self.burst
        self._tokens = float(self.burst)

    def send(self, time: float, size: int) -> float | None:
        """The packet's arrival time at the viewer, or None if the queue dropped it."""
        queue = self._queue
        while queue and queue[0][0] <= time:
            self._backlog -= queue.popleft()[1]
        if self._backlog + size > self.limit:
            return None
        bytes_per_second = self.rate_bps / 8
        start = max(time, self._last_departure)
        if self._last_departure == -math.inf:
            tokens = float(self.burst)
        else:
            tokens = self._tokens + (start - self._last_departure) * bytes_per_second
        tokens = min(tokens, float(self.burst))
        departure = start + max(size - tokens, 0.0) / bytes_per_second
        self._tokens = max(tokens - size, 0.0) if departure == start else 0.0
        self._last_departure = departure
        queue.append((departure, size))
        self._backlog += size
        return departure + self.propagation


def slow_link() -> TokenBucketLink:
    # tests/browser/_harness.py shape(): tbf rate 700kbit burst 32kbit latency 50ms.
    return TokenBucketLink(rate_bps=SLOW_LINK_BPS, burst=32_000 // 8, latency=0.050)


def open_link() -> TokenBucketLink:
    return TokenBucketLink(rate_bps=OPEN_LINK_BPS, burst=64_000, latency=0.100)


@dataclass(frozen=True)
class Sample:
    time: float
    estimate_bps: float
    state: BandwidthUsage
    loss_fraction: float | None
    acknowledged_bps: float | None


FeedbackFilter = Callable[[list[tuple[float, bytes]]], list[tuple[float, bytes]]]


class Simulation:
    """The sender (send log, transport-wide sequence numbers from ``first_sequence``,
    padding on the estimator's deadlines), the link, and the viewer (ArrivalFeedback on
    a clock ``receiver_clock`` seconds ahead of the sender's), on one virtual timeline.
    ``feedback_filter`` rewrites each feedback batch in flight (duplicate, reorder, lose
    it); it returns (delivery time, RTCP bytes) pairs."""

    def __init__(
        self,
        *,
        link: TokenBucketLink,
        estimator: ViewerBandwidth,
        first_sequence: int = 0,
        receiver_clock: float = 1000.0,
        return_delay: float = 0.020,
        feedback_filter: FeedbackFilter | None = None,
    ) -> None:
        self.link = link
        self.estimator = estimator
        self.sequence = first_sequence
        self.receiver_clock = receiver_clock
        self.return_delay = return_delay
        self.feedback_filter = feedback_filter
        self.send_log: dict[int, tuple[float, int]] = {}
        self.receiver = ArrivalFeedback(sender_ssrc=0x11111111, media_ssrc=0x22222222)
        self._arrivals: list[tuple[float, int]] = []
        self._feedback: list[tuple[float, int, bytes]] = []
        self._order = itertools.count()
        self.samples: list[Sample] = []
        self.captured: list[dict[str, Any]] = []  # what a capture file stores
        self.lost_media = 0
        self.lost_media_at: list[float] = []
        self.sent_media = 0
        self.padding_packets = 0
        self.now = 0.0
        self.on_sample: Callable[[Simulation], None] | None = None

    def transmit(self, time: float, size: int, *, media: bool = True) -> None:
        sequence = self.sequence & 0xFFFF
        self.sequence += 1
        self.send_log[sequence] = (time, size)
        arrival = self.link.send(time, size)
        if media:
            self.sent_media += 1
            if arrival is None:
                self.lost_media += 1
                self.lost_media_at.append(time)
        if arrival is not None:
            heapq.heappush(self._arrivals, (arrival, sequence))

    def transport_sent(self, base_sequence: int, count: int) -> list[tuple[float, int] | None]:
        """What ``Fanout.transport_sent(viewer, base_sequence, count)`` answers."""
        return [self.send_log.get((base_sequence + i) & 0xFFFF) for i in range(count)]

    def run(self, media: Iterable[tuple[float, int]], until: float) -> None:
        packets = iter(media)
        pending = next(packets, None)
        while True:
            receiver_due = self.receiver.deadline()
            estimator_due = self.estimator.deadline()
            candidates = [
                pending[0] if pending is not None else math.inf,
                self._arrivals[0][0] if self._arrivals else math.inf,
                receiver_due - self.receiver_clock if receiver_due is not None else math.inf,
                self._feedback[0][0] if self._feedback else math.inf,
                math.inf if estimator_due is None else estimator_due,
            ]
            time = min(candidates)
            if time > until:
                self.now = until
                return
            self.now = time
            kind = candidates.index(time)
            if kind == 0:
                assert pending is not None
                self.transmit(*pending)
                pending = next(packets, None)
            elif kind == 1:
                _, sequence = heapq.heappop(self._arrivals)
                self.receiver.record(sequence, self.receiver_clock + time)
            elif kind == 2:
                batch = [
                    (time + self.return_delay, packet.serialize())
                    for packet in self.receiver.poll(self.receiver_clock + time)
                ]
                if self.feedback_filter is not None:
                    batch = self.feedback_filter(batch)
                for delivery, data in batch:
                    heapq.heappush(self._feedback, (delivery, next(self._order), data))
            elif kind == 3:
                _, _, data = heapq.heappop(self._feedback)
                self.deliver(data, time)
            else:
                request = self.estimator.poll(time)
                if request is not None:
                    # What Fanout.send_padding sends: RTP header, extension, padding, tag.
                    datagram = request.size + PADDING_DATAGRAM_OVERHEAD
                    for index in range(request.count):
                        self.transmit(time + index * 5e-6, datagram, media=False)
                    self.padding_packets += request.count

    def deliver(self, data: bytes, time: float) -> None:
        """What egress.rtcp_received does with a transport feedback packet."""
        feedback = TransportFeedback.parse(data)
        sent = self.transport_sent(feedback.base_sequence, len(feedback.deltas))
        self.captured.append({"at": round(time, 6), "rtcp": data.hex(), "sent": sent})
        self.estimator.on_feedback(feedback, sent, time)
        estimator = self.estimator
        self.samples.append(
            Sample(
                time,
                estimator.estimate_bps,
                estimator.state,
                estimator.loss_fraction,
                estimator.acknowledged_bps,
            )
        )
        if self.on_sample is not None:
            self.on_sample(self)


def simulate(
    *,
    layer_bps: float,
    link: TokenBucketLink,
    seconds: float,
    initial_bps: float | None = None,
    seed: int = 1,
    **options: object,
) -> Simulation:
    estimator = ViewerBandwidth(initial_bps=initial_bps or layer_bps, now=0.0)
    simulation = Simulation(link=link, estimator=estimator, **options)  # type: ignore[arg-type]
    simulation.run(stream(layer_bps, start=0.0, end=seconds, seed=seed), until=seconds)
    return simulation


def first_time(samples: Iterable[Sample], condition: Callable[[Sample], bool]) -> float:
    return next((s.time for s in samples if condition(s)), math.inf)


# --- the link simulator itself ----------------------------------------------------------------


def test_token_bucket_link_passes_a_burst_at_line_rate_then_limits_and_drops() -> None:
    link = slow_link()
    assert link.limit == 4375 + 4000  # tc: rate * latency + burst
    # A bucket's worth (4000 bytes) leaves at once; then one 1000-byte packet per
    # 1000 / 87500 s; 8375 bytes of queue hold 8 more, and the rest are dropped.
    arrivals = [link.send(0.0, 1000) for _ in range(14)]
    assert arrivals[:4] == [0.020] * 4
    assert arrivals[4] == pytest.approx(0.020 + 1000 / 87_500)
    assert arrivals[11] == pytest.approx(0.020 + 8000 / 87_500)
    assert arrivals[12:] == [None, None]
    # Long after, the bucket is full again.
    assert link.send(10.0, 1200) == pytest.approx(10.020)


# --- end to end on the harness's links ---------------------------------------------------------


SWITCH_AT = 4.0


def switch_up(link: TokenBucketLink, *, seconds: float = 8.0) -> Simulation:
    """The middle layer for ``SWITCH_AT`` seconds, then the top one (from a keyframe, as
    a layer switch starts): what the layer policy moving up too far looks like."""
    estimator = ViewerBandwidth(initial_bps=MID_BPS, now=0.0)
    simulation = Simulation(link=link, estimator=estimator)
    media = itertools.chain(
        stream(MID_BPS, start=0.0, end=SWITCH_AT, seed=1),
        stream(HIGH_BPS, start=SWITCH_AT, end=seconds, seed=2),
    )
    simulation.run(media, until=seconds)
    return simulation


def test_switching_up_to_the_top_layer_on_700_kbits_is_overuse_within_a_second() -> None:
    simulation = switch_up(slow_link())
    after = [s for s in simulation.samples if s.time >= SWITCH_AT]
    before = [s for s in simulation.samples if 1.0 < s.time < SWITCH_AT]
    assert all(s.state is not BandwidthUsage.OVERUSING for s in before)
    assert min(s.estimate_bps for s in before) >= MID_BPS
    overuse_at = first_time(after, lambda s: s.state is BandwidthUsage.OVERUSING) - SWITCH_AT
    # Loss shows first here (the 50 ms queue overflows in ~80 ms); either way the
    # estimate falls well under the link and stays there.
    down_at = first_time(after, lambda s: s.estimate_bps < 0.8 * SLOW_LINK_BPS) - SWITCH_AT
    print(
        f"\nup to 1.5 Mbit/s on 700 kbit/s: over-use after {overuse_at:.2f} s, "
        f"estimate under 560 kbit/s after {down_at:.2f} s"
    )
    assert overuse_at <= 1.0
    assert down_at <= 1.0
    assert all(s.estimate_bps < SLOW_LINK_BPS for s in after)
    assert all(s.estimate_bps < 0.8 * SLOW_LINK_BPS for s in after if s.time >= SWITCH_AT + down_at)
    # The acknowledged rate is what the bucket lets through, not what was sent.
    late = [s.acknowledged_bps for s in after if s.time > SWITCH_AT + 1 and s.acknowledged_bps]
    assert max(late) < SLOW_LINK_BPS * 1.1


def test_starting_on_the_top_layer_on_700_kbits_falls_below_it_within_a_second() -> None:
    # From the first packet, the 50 ms queue overflows within ~0.1 s, before the delay
    # trend has its 20 groups (and a full queue has no trend): loss brings it down.
    simulation = simulate(layer_bps=HIGH_BPS, link=slow_link(), seconds=6.0)
    samples = simulation.samples
    below_at = first_time(samples, lambda s: s.estimate_bps < SLOW_LINK_BPS)
    print(f"\nstarting at 1.5 Mbit/s on 700 kbit/s: below the link at {below_at:.2f} s")
    assert below_at <= 1.0
    assert all(s.estimate_bps < SLOW_LINK_BPS for s in samples if s.time >= below_at)


def test_a_deep_queue_is_seen_from_delay_before_any_loss() -> None:
    # tbf with 400 ms of queue: after the switch the path loses nothing for a while,
    # the queue grows, and the trend shows it.
    simulation = switch_up(TokenBucketLink(rate_bps=SLOW_LINK_BPS, burst=4000, latency=0.400))
    after = [s for s in simulation.samples if s.time >= SWITCH_AT]
    overuse_at = first_time(after, lambda s: s.state is BandwidthUsage.OVERUSING)
    lossy_at = first_time(after, lambda s: (s.loss_fraction or 0) > 0)
    print(
        f"\ndeep queue: over-use at {overuse_at - SWITCH_AT:.2f} s, "
        f"first loss at {lossy_at - SWITCH_AT:.2f} s"
    )
    assert overuse_at < lossy_at
    assert overuse_at - SWITCH_AT <= 1.0
    # gcc-02 §5.5: the estimate became 0.85 x what the path delivered.
    (at_overuse,) = (s for s in after if s.time == overuse_at)
    assert at_overuse.acknowledged_bps is not None
    assert at_overuse.estimate_bps == pytest.approx(0.85 * at_overuse.acknowledged_bps)
    assert at_overuse.estimate_bps < SLOW_LINK_BPS


def test_the_middle_layer_on_700_kbits_stays_normal_without_loss() -> None:
    simulation = simulate(layer_bps=MID_BPS, link=slow_link(), seconds=20.0)
    samples = simulation.samples
    states = {s.state for s in samples}
    losses = [s.loss_fraction for s in samples if s.loss_fraction is not None]
    print(f"\n500 kbit/s on 700 kbit/s: states {states}, worst loss {max(losses):.3f}")
    assert BandwidthUsage.OVERUSING not in states
    assert simulation.lost_media == 0
    assert max(losses) == 0.0
    # It keeps the current layer's rate, and its growth is bounded by what was acknowledged.
    late = [s for s in samples if s.time > 2.0]
    assert min(s.estimate_bps for s in late) >= MID_BPS
    # Growth is bounded by what the path was seen to carry (the cap stops increases; it
    # does not pull the estimate down when a window dips).
    most = 0.0
    for sample in samples:
        most = max(most, sample.acknowledged_bps or 0.0)
        if sample.time > 2.0:
            assert sample.estimate_bps <= 1.5 * most + 10_000 + 1


def test_the_lowest_layer_on_an_open_link_stays_normal() -> None:
    simulation = simulate(layer_bps=LOW_BPS, link=open_link(), seconds=10.0)
    assert {s.state for s in simulation.samples} <= {
        BandwidthUsage.NORMAL,
        BandwidthUsage.UNDERUSING,
    }
    assert simulation.estimator.estimate_bps >= LOW_BPS


def probe_run(
    link: TokenBucketLink, *, target_bps: float, layer_bps: float = MID_BPS, seconds: float = 8.0
) -> Simulation:
    """A layer (the middle one) for 3 s, then a probe to ``target_bps``."""
    estimator = ViewerBandwidth(initial_bps=layer_bps, now=0.0)
    simulation = Simulation(link=link, estimator=estimator)
    media = stream(layer_bps, start=0.0, end=seconds, seed=7)
    started: list[float] = []

    def probe_after_three_seconds(simulation: Simulation) -> None:
        if not started and simulation.now >= 3.0:
            started.append(simulation.now)
            padding = estimator.start_probe(target_bps, simulation.now)
            assert padding == pytest.approx(target_bps - (estimator.sent_bps or 0.0))
            assert estimator.deadline() == simulation.now

    simulation.on_sample = probe_after_three_seconds
    simulation.run(media, until=seconds)
    assert started
    return simulation


def test_a_probe_to_the_top_layer_succeeds_on_an_open_link() -> None:
    simulation = probe_run(open_link(), target_bps=HIGH_BPS)
    result = simulation.estimator.probe_result
    assert result is not None
    print(f"\nprobe on 10 Mbit/s: {result}, {simulation.padding_packets} padding packets")
    assert result.succeeded, result
    assert result.measured_bps is not None
    assert HIGH_BPS * 0.9 <= result.measured_bps <= HIGH_BPS * 1.15
    assert result.loss_fraction == 0.0
    # The whole probe's padding: ~0.95 Mbit/s for 1.26 s (the ramp) in 285-byte datagrams.
    assert 490 <= simulation.padding_packets <= 550
    # The estimate now says the top layer fits.
    assert simulation.estimator.estimate_bps >= 0.9 * HIGH_BPS
    assert simulation.estimator.deadline() is None


def test_a_probe_to_the_top_layer_fails_quickly_on_700_kbits() -> None:
    simulation = probe_run(slow_link(), target_bps=HIGH_BPS)
    result = simulation.estimator.probe_result
    assert result is not None
    print(
        f"\nprobe on 700 kbit/s: {result}; media lost {simulation.lost_media} of "
        f"{simulation.sent_media}; {simulation.padding_packets} padding packets"
    )
    assert not result.succeeded
    assert result.outcome in (ProbeOutcome.OVERUSE, ProbeOutcome.LOSS)
    # Given up early: padding stopped well before the probe's 1.5 s.
    assert result.finished_at - 3.0 < 0.8
    assert simulation.padding_packets < 0.5 * 520
    # The ramp let the delay trend see the queue grow before it overflowed: no loss
    # among the probe's packets, a few media packets lost at most.
    assert result.loss_fraction is not None and result.loss_fraction < 0.05
    assert simulation.lost_media <= 5
    # What the path carried was learnt: 0.85 x the acknowledged rate, under the link.
    (at_result,) = (s for s in simulation.samples if s.time == result.finished_at)
    assert at_result.estimate_bps < SLOW_LINK_BPS
    # ...but never under the layer it was carrying: the cut came from the probe's own
    # queue, and the path delivered more than the layer meanwhile (a failed probe must
    # not move the viewer down).
    assert at_result.estimate_bps >= MID_BPS
    assert min(s.estimate_bps for s in simulation.samples if s.time >= 3.0) >= 0.85 * MID_BPS


def test_a_probe_to_a_rate_that_fits_succeeds_on_700_kbits() -> None:
    # From the lowest layer: would the middle one (plus audio and headroom) fit?
    simulation = probe_run(slow_link(), target_bps=600_000, layer_bps=LOW_BPS)
    result = simulation.estimator.probe_result
    assert result is not None and result.succeeded, result
    assert simulation.lost_media == 0
    assert simulation.estimator.estimate_bps >= 0.9 * 600_000


def test_a_probe_is_not_fooled_by_a_large_token_bucket() -> None:
    # A 50 kB bucket passes the probe's first ~0.5 s at line rate; what follows is
    # limited to 700 kbit/s, and the probe is judged on that part.
    big_bucket = TokenBucketLink(rate_bps=SLOW_LINK_BPS, burst=50_000, latency=0.050)
    simulation = probe_run(big_bucket, target_bps=HIGH_BPS)
    result = simulation.estimator.probe_result
    assert result is not None and not result.succeeded, result
    assert result.measured_bps is None or result.measured_bps < 0.9 * HIGH_BPS


def test_a_probe_whose_feedback_never_comes_fails_at_its_timeout() -> None:
    estimator = ViewerBandwidth(initial_bps=MID_BPS, now=0.0)
    losing = False

    def lose_everything_once_probing(batch: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
        return [] if losing else batch

    simulation = Simulation(
        link=open_link(), estimator=estimator, feedback_filter=lose_everything_once_probing
    )
    simulation.run(stream(MID_BPS, start=0.0, end=8.0, seed=3), until=3.0)
    estimator.start_probe(HIGH_BPS, 3.0)
    losing = True
    simulation.run(stream(MID_BPS, start=3.0, end=8.0, seed=3), until=8.0)
    result = estimator.probe_result
    assert result is not None
    assert result.outcome is ProbeOutcome.NO_FEEDBACK
    config = estimator.config
    assert result.finished_at == pytest.approx(
        3.0 + config.probe_duration + config.probe_feedback_timeout
    )
    assert estimator.deadline() is None


# --- closed loop: a layer policy reading the estimator -------------------------------------------

LAYERS = (LOW_BPS, MID_BPS, HIGH_BPS)
AUDIO_BPS = AUDIO_SIZE * 8 / AUDIO_INTERVAL


@dataclass
class ProbingLayerPolicy:
    """The rules proposed for media/layers.py on top of a ``ViewerBandwidth``, reduced
    to what this test needs: down (after ``hold`` on a layer) when the estimate falls
    under ``margin`` x what the layer needs, as far as the estimate requires; up one
    layer only after a probe to the next layer's need (+ ``probe_headroom``) succeeded,
    the probe started ``up_wait`` after the last move and never while over-using; each
    failed probe doubles the wait (to ``max_up_wait``)."""

    estimator: ViewerBandwidth
    layer: int = 1  # LayerPolicy.initial(3): the middle
    hold: float = 2.0
    up_wait: float = 3.0
    max_up_wait: float = 30.0
    margin: float = 0.85
    probe_headroom: float = 1.1
    moved_at: float = -math.inf  # as LayerPolicyState: a new viewer may move down at once
    started_at: float = 0.0
    changes: list[tuple[float, int]] = field(default_factory=list)
    probes_started: list[float] = field(default_factory=list)
    probes: list[tuple[float, bool]] = field(default_factory=list)

    @staticmethod
    def need(layer: int) -> float:
        return LAYERS[layer] + AUDIO_BPS

    def on_feedback(self, now: float) -> None:
        estimator = self.estimator
        estimate = estimator.estimate_bps
        result = estimator.probe_result
        if result is not None:
            estimator.probe_result = None  # each result is used once
            self.probes.append((now, result.succeeded))
            if result.succeeded and self.layer < len(LAYERS) - 1:
                self.move(self.layer + 1, now)
                return
            self.up_wait = min(self.up_wait * 2, self.max_up_wait)
        if estimate < self.margin * self.need(self.layer):
            if self.layer > 0 and now - self.moved_at >= self.hold:
                estimator.cancel_probe(now)
                target = self.layer - 1
                while target > 0 and self.need(target) > estimate:
                    target -= 1
                self.move(target, now)
            return
        if (
            not estimator.probing
            and self.layer < len(LAYERS) - 1
            and now - max(self.moved_at, self.started_at) >= self.up_wait
            and estimator.state is not BandwidthUsage.OVERUSING
        ):
            estimator.start_probe(self.probe_headroom * self.need(self.layer + 1), now)
            self.probes_started.append(now)

    def move(self, layer: int, now: float) -> None:
        self.layer, self.moved_at = layer, now
        self.changes.append((now, layer))


def adaptive_stream(
    policy: ProbingLayerPolicy, *, end: float, seed: int
) -> Iterator[tuple[float, int]]:
    """``stream``'s shape at whatever layer the policy chose when each frame starts (a
    new layer starts with a keyframe, as a switch does)."""
    rng = random.Random(seed)
    frame_time, audio_time = 0.0, 0.007
    previous_layer: int | None = None
    while frame_time < end:
        layer = policy.layer
        keyframe = layer != previous_layer
        previous_layer = layer
        frame_bytes = (
            LAYERS[layer] / FRAME_RATE / 8 * rng.uniform(0.8, 1.2) * (3 if keyframe else 1)
        )
        packets = max(1, math.ceil(frame_bytes / MTU_PAYLOAD))
        size = math.ceil(frame_bytes / packets)
        batch = [(frame_time + index * 20e-6, size) for index in range(packets)]
        next_frame = frame_time + 1 / FRAME_RATE
        while audio_time < next_frame:
            batch.append((audio_time, AUDIO_SIZE))
            audio_time += AUDIO_INTERVAL
        yield from sorted(batch)
        frame_time = next_frame


def closed_loop(
    link: TokenBucketLink, *, seconds: float = 30.0
) -> tuple[ProbingLayerPolicy, Simulation]:
    estimator = ViewerBandwidth(initial_bps=ProbingLayerPolicy.need(1), now=0.0)
    policy = ProbingLayerPolicy(estimator)
    simulation = Simulation(link=link, estimator=estimator)
    simulation.on_sample = lambda simulation: policy.on_feedback(simulation.now)
    simulation.run(adaptive_stream(policy, end=seconds, seed=11), until=seconds)
    print(
        f"\nlayer changes {[(round(t, 2), layer) for t, layer in policy.changes]}, probes "
        f"{[(round(t, 2), ok) for t, ok in policy.probes]}, media lost "
        f"{simulation.lost_media}/{simulation.sent_media}"
    )
    return policy, simulation


def test_closed_loop_on_700_kbits_stays_on_the_middle_layer() -> None:
    policy, simulation = closed_loop(slow_link())
    assert policy.layer == 1
    assert policy.changes == []
    # Probes for the top layer fail and back off (3, 6, 12 s ...).
    assert policy.probes and not any(ok for _, ok in policy.probes)
    assert len(policy.probes) <= 4
    # Each failed probe costs a few media packets (its first ~0.3 s overflows the 50 ms
    # queue before feedback can show it); outside them, nothing is lost.
    for lost_at in simulation.lost_media_at:
        assert any(start <= lost_at < start + 0.5 for start in policy.probes_started)
    assert simulation.lost_media <= 6 * len(policy.probes)


def test_closed_loop_on_400_kbits_settles_on_the_lowest_layer() -> None:
    link = TokenBucketLink(rate_bps=400_000, burst=4000, latency=0.050)
    policy, simulation = closed_loop(link)
    assert policy.layer == 0
    assert len(policy.changes) == 1
    assert policy.changes[0][0] <= 1.0
    assert not any(ok for _, ok in policy.probes)
    # The middle layer's loss until it moved down (and its queue drained, 50 ms); then
    # only the failed probes'.
    for lost_at in simulation.lost_media_at:
        assert lost_at < policy.changes[0][0] + 0.05 or any(
            start <= lost_at < start + 0.5 for start in policy.probes_started
        )


def test_closed_loop_on_an_open_link_climbs_to_the_top_layer_and_stays() -> None:
    policy, simulation = closed_loop(open_link())
    assert policy.layer == 2
    assert len(policy.changes) == 1
    moved_at, layer = policy.changes[0]
    assert layer == 2 and moved_at <= 6.0
    assert simulation.lost_media == 0
    # The estimate keeps room for the top layer: no over-use from its frame bursts.
    assert all(s.state is not BandwidthUsage.OVERUSING for s in simulation.samples)


# --- wrap-around, duplicates, reordering, gaps ----------------------------------------------------


def test_sequence_and_reference_time_wrap_change_nothing() -> None:
    plain = simulate(layer_bps=HIGH_BPS, link=slow_link(), seconds=4.0)
    # The 16-bit sequence number wraps after ~300 packets, the viewer's 24-bit reference
    # time after 1.5 s.
    wrapped = simulate(
        layer_bps=HIGH_BPS,
        link=slow_link(),
        seconds=4.0,
        first_sequence=0xFFFF - 300,
        receiver_clock=REFERENCE_WRAP_SECONDS - 1.5 * 1.024,
    )
    assert len(plain.samples) == len(wrapped.samples) > 30
    for ours, theirs in zip(plain.samples, wrapped.samples, strict=True):
        assert theirs.estimate_bps == pytest.approx(ours.estimate_bps, rel=1e-3)
        assert theirs.state is ours.state
        assert theirs.loss_fraction == ours.loss_fraction


def duplicate_and_swap(batch: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """Every feedback twice, the copy 150 ms late (after the next feedback)."""
    return [*batch, *((time + 0.150, data) for time, data in batch)]


def test_duplicated_and_reordered_feedback_counts_each_packet_once() -> None:
    plain = simulate(layer_bps=MID_BPS, link=slow_link(), seconds=10.0)
    doubled = simulate(
        layer_bps=MID_BPS, link=slow_link(), seconds=10.0, feedback_filter=duplicate_and_swap
    )
    assert doubled.estimator.matcher.duplicates > 1000
    final = plain.samples[-1]
    assert doubled.estimator.acknowledged_bps == pytest.approx(final.acknowledged_bps, rel=0.02)
    assert doubled.estimator.estimate_bps == pytest.approx(final.estimate_bps, rel=0.05)
    assert {s.state for s in doubled.samples} <= {BandwidthUsage.NORMAL, BandwidthUsage.UNDERUSING}
    assert all(s.loss_fraction in (None, 0.0) for s in doubled.samples)


def test_reordered_feedback_on_an_overloaded_link_still_finds_the_limit() -> None:
    def swap_pairs(batch: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
        # Each feedback overtaken by the next one: delivered 130 ms late.
        return [(time + 0.130, data) for time, data in batch]

    shuffled = simulate(
        layer_bps=HIGH_BPS, link=slow_link(), seconds=4.0, feedback_filter=swap_pairs
    )
    assert first_time(shuffled.samples, lambda s: s.estimate_bps < SLOW_LINK_BPS) <= 1.2


def test_feedback_that_never_arrives_is_not_loss() -> None:
    counter = itertools.count()

    def lose_every_third(batch: list[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
        return [item for item in batch if next(counter) % 3 != 2]

    gappy = simulate(
        layer_bps=MID_BPS, link=slow_link(), seconds=10.0, feedback_filter=lose_every_third
    )
    assert all(s.loss_fraction in (None, 0.0) for s in gappy.samples)
    assert gappy.estimator.estimate_bps >= MID_BPS
    assert BandwidthUsage.OVERUSING not in {s.state for s in gappy.samples}


# --- the rate windows, on hand-made inputs ---------------------------------------------------


def test_rate_window_measures_a_whole_window() -> None:
    window = RateWindow(0.5)
    for index in range(50):
        window.add(index * 0.010, 1000)  # 100 kB/s
        if index < 25:  # less than half a window
            assert window.bps is None
        else:  # part of one: bytes after the first over the span
            assert window.bps == pytest.approx(800_000)
    window.add(0.50, 1000)
    assert window.bps == pytest.approx(800_000)
    window.add(2.0, 1000)  # a gap longer than the window: measured again from there
    assert window.bps is None


def test_rate_window_memory_is_bounded_whatever_the_arrival_times() -> None:
    window = RateWindow(0.5)
    for _ in range(3 * MAX_WINDOW_SAMPLES):  # feedback claiming one instant for all
        window.add(7.0, 1200)
    assert len(window) == MAX_WINDOW_SAMPLES


# --- probing: the padding schedule ---------------------------------------------------------------


def test_probe_padding_ramps_up_then_holds_then_waits_for_feedback() -> None:
    estimator = ViewerBandwidth(initial_bps=MID_BPS, now=0.0)
    config = estimator.config
    assert estimator.deadline() is None
    padding_bps = estimator.start_probe(1_000_000, now=5.0)
    assert padding_bps == 1_000_000  # nothing measured as sent yet: all of it is padding
    chunks: list[int] = []
    deadlines = []
    while (deadline := estimator.deadline()) is not None and deadline < 5.0 + config.probe_duration:
        deadlines.append(deadline)
        request = estimator.poll(deadline)
        if request is not None:
            assert request.size == 255  # padding octets, the most one packet carries
            assert 1 <= request.count <= config.max_padding_packets
        chunks.append(0 if request is None else request.count)
    # A chunk every 20 ms for 1.5 s, on a grid from the start.
    assert deadlines == pytest.approx([5.0 + 0.020 * i for i in range(75)])
    # Rising over the 0.5 s warm-up (25 chunks), then ~1 Mbit/s: 2500 bytes a chunk.
    datagram = 255 + PADDING_DATAGRAM_OVERHEAD
    assert sum(chunks[:5]) <= 6 < sum(chunks[20:25])  # 1500 bytes, then ~11000
    assert all(8 <= count <= 9 for count in chunks[26:])
    # In all, 1 Mbit/s for 1.26 s (0.02 s x (1/25 + 2/25 + ... + 25/25 + 50)), to
    # within a packet.
    assert abs(sum(chunks) * datagram - 1_000_000 / 8 * 1.26) <= datagram
    give_up = 5.0 + config.probe_duration + config.probe_feedback_timeout
    assert estimator.deadline() == pytest.approx(give_up)
    assert estimator.poll(give_up - 0.001) is None and estimator.probing
    assert estimator.poll(give_up) is None
    assert not estimator.probing
    assert estimator.probe_result is not None
    assert estimator.probe_result.outcome is ProbeOutcome.NO_FEEDBACK


def test_probe_rejects_a_nonsense_target_and_can_be_cancelled() -> None:
    estimator = ViewerBandwidth(initial_bps=MID_BPS, now=0.0)
    for target in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            estimator.start_probe(target, now=1.0)
    estimator.start_probe(2_000_000, now=1.0)
    assert estimator.deadline() == 1.0
    estimator.cancel_probe(1.5)
    assert estimator.deadline() is None and estimator.probe_result is None


# --- anything the viewer sends -------------------------------------------------------------------

deltas = st.lists(st.one_of(st.none(), st.integers(-0x8000, 0x7FFF)), min_size=1, max_size=80)
entries = st.lists(
    st.one_of(
        st.none(),
        st.tuples(st.floats(-1e6, 1e6, allow_nan=False), st.integers(0, 100_000)),
    ),
    max_size=90,
)
steps = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF),  # base sequence
        st.integers(-(1 << 23), (1 << 24) - 1),  # reference time, either form
        deltas,
        entries,
        st.floats(0.0, 5.0),  # time to this feedback
        st.one_of(st.none(), st.floats(1.0, 1e8)),  # a probe to start, or not
    ),
    max_size=30,
)


Step = tuple[int, int, list[int | None], list[tuple[float, int] | None], float, float | None]


@settings(max_examples=300, deadline=None)
@given(steps=steps, initial=st.floats(1.0, 1e9))
def test_arbitrary_feedback_never_raises_and_keeps_the_estimate_in_bounds(
    steps: list[Step],
    initial: float,
) -> None:
    config = BandwidthConfig()
    estimator = ViewerBandwidth(initial_bps=initial, now=0.0)
    now = 0.0
    for base, reference, feedback_deltas, sent, elapsed, probe in steps:
        now += elapsed
        if probe is not None:
            estimator.start_probe(probe, now)
        while (deadline := estimator.deadline()) is not None and deadline <= now:
            request = estimator.poll(deadline)
            if request is not None:
                assert 0 < request.count <= config.max_padding_packets
                assert 1 <= request.size <= 255
        feedback = TransportFeedback(
            sender_ssrc=1,
            media_ssrc=2,
            base_sequence=base,
            reference_time=reference,
            feedback_count=0,
            deltas=feedback_deltas,
        )
        estimator.on_feedback(feedback, sent, now)
        assert config.min_bps <= estimator.estimate_bps <= config.max_bps
        loss = estimator.loss_fraction
        assert loss is None or 0.0 <= loss <= 1.0
        assert estimator.state in BandwidthUsage
    result = estimator.probe_result
    if result is not None and result.measured_bps is not None:
        assert result.measured_bps >= 0


# --- stored captures -----------------------------------------------------------------------------


def replay(capture: dict[str, Any]) -> ViewerBandwidth:
    """A capture file's feedback through a new estimator: ``initial_bps``, then for each
    transport feedback as the server received it (``at``, server clock seconds;
    ``rtcp``, the RTCP packet in hex; ``sent``, what ``Fanout.transport_sent`` answered
    for its sequence numbers: [send time, datagram size] or null)."""
    estimator = ViewerBandwidth(initial_bps=float(capture["initial_bps"]), now=0.0)
    for event in capture["feedback"]:
        sent = [
            None if entry is None else (float(entry[0]), int(entry[1])) for entry in event["sent"]
        ]
        feedback = TransportFeedback.parse(bytes.fromhex(event["rtcp"]))
        estimator.on_feedback(feedback, sent, float(event["at"]))
    return estimator


@pytest.mark.parametrize("path", sorted(CAPTURES.glob("*.json")), ids=lambda p: p.stem)
def test_stored_capture_replays_to_its_expected_estimate(path: Path) -> None:
    """Each capture says what its estimate must end in (``expect``: min_bps, max_bps,
    and optionally the detector's state), so real Chromium captures can join these."""
    capture = json.loads(path.read_text())
    estimator = replay(capture)
    expected = capture["expect"]
    assert expected["min_bps"] <= estimator.estimate_bps <= expected["max_bps"]
    if "state" in expected:
        assert estimator.state.value == expected["state"]


def write_simulated_capture() -> None:
    """Regenerate tests/data/bandwidth/simulated_tbf_700k_top_layer.json: the top layer
    into the harness's 700 kbit/s tbf from the start (``python tests/test_bandwidth.py``)."""
    simulation = simulate(layer_bps=HIGH_BPS, link=slow_link(), seconds=3.0)
    capture = {
        "description": (
            "Simulated (tests/test_bandwidth.py): 1.5 Mbit/s of 30 fps video + Opus into "
            "tbf rate 700kbit burst 32kbit latency 50ms, 20 ms each way, feedback every "
            "100 ms from media/twcc.py ArrivalFeedback."
        ),
        "initial_bps": HIGH_BPS,
        "expect": {"min_bps": 30_000, "max_bps": 0.8 * SLOW_LINK_BPS},
        "feedback": [
            {
                **event,
                "sent": [None if e is None else [round(e[0], 6), e[1]] for e in event["sent"]],
            }
            for event in simulation.captured
        ],
    }
    CAPTURES.mkdir(parents=True, exist_ok=True)
    path = CAPTURES / "simulated_tbf_700k_top_layer.json"
    path.write_text(json.dumps(capture, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    write_simulated_capture()
