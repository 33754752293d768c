"""A viewer's available bandwidth from transport-wide feedback (delay- and loss-based).

``ViewerBandwidth`` composes the stages, each a module with its own state and tests:
packet_results.py (feedback matched to the send log), delay_trend.py (over-use from the
delay trend), rate_control.py (the delay-based AIMD estimate), loss_control.py (the
loss-based cap) and probe.py (a headroom probe's padding and verdict); the rate windows
that measure what was acknowledged and sent are here.

Theory of operation
-------------------
Every packet the Fanout sends a viewer carries a transport-wide sequence number and is
written to a send log (send time, datagram size). A viewer that negotiated transport-wide
cc answers about every 100 ms with RTCP transport feedback
(draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1): for a run of sequence numbers,
which arrived and when, on the viewer's clock. ``ViewerBandwidth`` turns feedback plus
the send log into an estimate of what the viewer's path carries, in the shape of
draft-ietf-rmcat-gcc-02 ("GCC", the algorithm in Chromium's sender)::

    TransportFeedback + send log entries
        │  FeedbackMatcher (packet_results.py): unwrap 16-bit sequence numbers and the
        │  24-bit reference time, count each packet once (duplicates, reordered
        ▼  feedback), a received report overriding an earlier "lost" one
    PacketResult(sequence, send_time, size, arrival | None)  ── sorted by arrival
        ├─▶ acknowledged bitrate: bytes received per arrival window (gcc-02 §5.5 R_hat)
        ├─▶ loss fraction per window of >= 20 reported packets (gcc-02 §6)
        └─▶ InterArrival (delay_trend.py): groups of packets sent within 5 ms (gcc-02 §5.1, §5.2)
              └─▶ TrendlineDetector: inter-group delay variation, accumulated and
                  smoothed, least-squares slope over 20 groups; over-use when the slope
                  (scaled) stays above an adaptive threshold (gcc-02 §5.4)
                    └─▶ AimdRateControl (rate_control.py, gcc-02 §5.5): Hold / Increase /
                        Decrease; LossBasedControl (loss_control.py, gcc-02 §6) caps it
    estimate = clamp(min(delay-based, loss-based), min_bps, max_bps)

gcc-02 filters the delay variation with a Kalman filter (§5.3); like libwebrtc today this
uses a trendline (a least-squares slope of the smoothed accumulated delay), which reacts
to a queue that grows steadily and ignores jitter that does not. The threshold logic of
§5.4 is kept, with constants tuned for the trendline's scale (delay_trend.py ``TREND_K_UP``).

An SFU forwards discrete simulcast layers: it cannot nudge an encoder up a few percent to
see whether the path takes it, so a receive-side estimate (REMB) never shows room for the
next layer. ``start_probe`` does (probe.py): padding (RTX padding packets from
``Fanout.send_padding``) tops the viewer's send rate up to a target for ``probe_duration``
seconds, and ``probe_result`` says whether the path carried it: no over-use, little
loss, and packets sent in the probe's second part arrived at >= 90 % of the target.

Sans-IO: nothing here reads a clock or touches a socket. The driver feeds
``on_feedback(feedback, sent, now)``, asks ``deadline()`` when to call ``poll(now)``, and
sends the padding ``poll`` returns. All times are seconds: ``now`` and send times on the
sender's monotonic clock, arrival times on the viewer's (only their differences matter).
Memory is bounded (fixed-size rings and windows), and work per feedback is linear in the
packets it reports (a sort of nearly sorted arrivals, which Timsort does in linear time).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from whepfan.media.delay_trend import BandwidthUsage, InterArrival, TrendlineDetector
from whepfan.media.loss_control import LOSS_MIN_PACKETS, LossBasedControl
from whepfan.media.packet_results import FeedbackMatcher, PacketResult
from whepfan.media.probe import PaddingRequest, Probe, ProbeOutcome, ProbeResult
from whepfan.media.rate_control import AimdRateControl, RateControlState
from whepfan.protocol.rtcp import TransportFeedback

# --- rates (gcc-02 §5.5) ----------------------------------------------------------------------

ACKNOWLEDGED_WINDOW = 0.5  # §5.5: R_hat over T in [0.5, 1] s
SEND_RATE_WINDOW = 1.0
# A rate window holds at most this many samples (a second of max_bps in 1200-byte
# packets), so feedback claiming every packet arrived at one instant cannot grow it.
MAX_WINDOW_SAMPLES = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class BandwidthConfig:
    """The tunables of ``ViewerBandwidth`` (the algorithm's constants are module-level
    in each stage's module, each with its draft section).

    A probe pads the viewer's send rate up to its target for ``probe_duration`` seconds,
    in chunks every ``probe_padding_interval``, the padding rising linearly over the
    first ``probe_warmup``: on a path that cannot take the target the queue then grows
    for a while before it overflows, long enough for the delay trend to see it, so a
    failed probe loses a few media packets rather than a burst (to 1.5 Mbit/s over the
    harness's 700 kbit/s tbf: ~3 instead of ~12). The rate is judged only on packets
    sent after ``probe_warmup``: a token-bucket bottleneck (Linux ``tbf``, most access-link
    shapers) lets up to its bucket (``burst``) through at line rate before it limits, so
    a short train, or a train's first part, shows the line rate instead of the limit. At
    a 1.5 Mbit/s target over a 700 kbit/s bucket, the bucket loses 100 kB/s; after 0.5 s
    any bucket up to 50 kB is empty (the harness's is 4 kB), and the last second shows
    the rate the path sustains. ``probe_feedback_timeout`` after the padding ends, a probe
    whose packets were never reported fails.
    """

    min_bps: float = 30_000.0
    max_bps: float = 50_000_000.0
    probe_duration: float = 1.5
    probe_warmup: float = 0.5
    probe_padding_interval: float = 0.020
    probe_success_ratio: float = 0.90
    # A probe is one sample of ~200 packets; at gcc-02 §6's 2 % ("increase only below")
    # a path with 1.5 % random loss would fail about one probe in five. 5 % stays well
    # under the 10 % at which the loss-based estimate cuts.
    probe_max_loss: float = 0.05
    probe_feedback_timeout: float = 1.0
    # Fanout.send_padding sends padding-only RTX packets of 1..255 padding octets (the
    # RFC 3550 §5.1 padding count is one octet), so a probe is many small packets: 1
    # Mbit/s of padding is ~440 packets a second, ~9 per 20 ms chunk.
    max_padding_packets: int = 64
    max_padding_octets: int = 255
    min_padding_octets: int = 32


# --- rates ------------------------------------------------------------------------------------


class RateWindow:
    """Bytes per ``window`` seconds of a stream of (time, size) samples, on one clock
    (arrival times for the acknowledged rate, send times for the send rate). Samples
    older than the window behind the newest are dropped from the left; a slightly
    out-of-order sample (reordered feedback) just leaves a little later. ``bps`` is None
    until the samples span half a window; until they span a whole one it is their bytes
    after the first over their span (n samples, n - 1 gaps), so a start-up overload has
    a measured rate to fall back to within a few feedback intervals."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()
        self._bytes = 0
        self._first: float | None = None
        self._newest: float | None = None

    def add(self, time: float, size: int) -> None:
        if self._newest is None or time > self._newest:
            if self._newest is not None and time - self._newest > self.window:
                self._first = time  # a gap: the rate is measured again from here
            self._newest = time
        horizon = self._newest - self.window
        if time <= horizon:
            return
        if self._first is None or time < self._first:
            self._first = time
        samples = self._samples
        samples.append((time, size))
        self._bytes += size
        while samples and (samples[0][0] <= horizon or len(samples) > MAX_WINDOW_SAMPLES):
            self._bytes -= samples.popleft()[1]

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def bps(self) -> float | None:
        if self._newest is None or self._first is None:
            return None
        span = self._newest - self._first
        if span < self.window / 2 or not self._samples:
            return None
        if span < self.window:
            return (self._bytes - self._samples[0][1]) * 8 / span
        return self._bytes * 8 / self.window


# --- the viewer's estimator -------------------------------------------------------------------


class ViewerBandwidth:
    """One viewer transport's bandwidth estimate from transport-wide feedback.

    Driver contract (sans-IO):

    - ``on_feedback(feedback, sent, now)`` for every ``TransportFeedback`` the viewer
      sends, with ``sent = fanout.transport_sent(viewer, feedback.base_sequence,
      len(feedback.deltas))``;
    - ``start_probe(target_bps, now)`` when the layer policy wants to know whether a
      higher rate fits; then ``poll(now)`` at ``deadline()`` and, for each
      ``PaddingRequest``, ``fanout.send_padding(viewer, track, request.count,
      request.size)``; when it sends nothing (no RTX negotiated), ``cancel_probe(now)``;
    - read ``estimate_bps``, ``state``, ``loss_fraction``, ``probe_result``.

    The estimate is min(delay-based, loss-based), clamped to the config's bounds. It may
    sit above what the path carries (up to 1.5 x acknowledged + 10 kbit/s, gcc-02 §5.5)
    when nothing pushes against the path, so it says when to move down, never that the
    next layer fits: only a succeeded probe says that. On tests/test_bandwidth.py's
    simulated 700 kbit/s tbf, a probe to 1.5 Mbit/s fails 0.44 s after it starts and
    costs ~3-5 media packets (repairable by NACK/RTX); on an open path it succeeds
    ~1.6 s after it starts.
    """

    def __init__(
        self, *, initial_bps: float, now: float, config: BandwidthConfig | None = None
    ) -> None:
        self.config = config = config or BandwidthConfig()
        self.matcher = FeedbackMatcher()
        self._inter_arrival = InterArrival()
        self._detector = TrendlineDetector()
        self._delay_based = AimdRateControl(
            initial_bps=initial_bps, min_bps=config.min_bps, max_bps=config.max_bps, now=now
        )
        self._loss_based = LossBasedControl(
            initial_bps=initial_bps, min_bps=config.min_bps, max_bps=config.max_bps
        )
        self._acknowledged = RateWindow(ACKNOWLEDGED_WINDOW)
        self._sent = RateWindow(SEND_RATE_WINDOW)
        self._loss_reported = 0
        self._loss_lost = 0
        self._rtt: float | None = None
        self._probe: Probe | None = None
        # Send times during which the latest probe padded: see _counts_for_loss.
        self._padded: tuple[float, float] | None = None
        self.loss_fraction: float | None = None
        """Lost / reported over the latest window of >= LOSS_MIN_PACKETS packets."""
        self.probe_result: ProbeResult | None = None
        """The latest finished probe's result (None before any, and while one runs)."""
        self.feedback_count = 0
        self._started_from_acknowledged = False
        self._estimate_before_probe: float | None = None

    # --- what the policy reads ----------------------------------------------------------------

    @property
    def estimate_bps(self) -> float:
        config = self.config
        estimate = min(self._delay_based.bps, self._loss_based.bps)
        return min(max(estimate, config.min_bps), config.max_bps)

    @property
    def delay_based_bps(self) -> float:
        return self._delay_based.bps

    @property
    def loss_based_bps(self) -> float:
        return self._loss_based.bps

    @property
    def state(self) -> BandwidthUsage:
        return self._detector.state

    @property
    def rate_control_state(self) -> RateControlState:
        return self._delay_based.state

    @property
    def acknowledged_bps(self) -> float | None:
        """Bytes reported received per ``ACKNOWLEDGED_WINDOW`` of arrival time."""
        return self._acknowledged.bps

    @property
    def sent_bps(self) -> float | None:
        """What was sent (media, RTX and padding), by send time, as feedback covered it."""
        return self._sent.bps

    @property
    def rtt(self) -> float | None:
        """Smoothed time from sending the newest reported packet to its feedback (a
        round trip plus the viewer's feedback interval)."""
        return self._rtt

    @property
    def probing(self) -> bool:
        return self._probe is not None

    # --- feedback -----------------------------------------------------------------------------

    def on_feedback(
        self,
        feedback: TransportFeedback,
        sent: Sequence[tuple[float, int] | None],
        now: float,
    ) -> None:
        """One transport feedback packet from the viewer, with the send log entries of
        the sequence numbers it covers."""
        self.feedback_count += 1
        results = self.matcher.match(feedback, sent)
        if not results:
            return
        newest_send: float | None = None
        probe = self._probe
        for packet in results:
            self._sent.add(packet.send_time, packet.size)
            if probe is not None:
                probe.observe(packet)
            if self._counts_for_loss(packet.send_time):
                if packet.recovered:
                    # Counted lost by an earlier feedback: taken back here, from this
                    # window if that one has closed, so over windows the loss adds up.
                    self._loss_lost = max(self._loss_lost - 1, 0)
                else:
                    self._loss_reported += 1
                if packet.arrival is None:
                    self._loss_lost += 1
            if packet.arrival is None:
                continue
            if newest_send is None or packet.send_time > newest_send:
                newest_send = packet.send_time
        if newest_send is not None:
            sample = min(max(now - newest_send, 0.0), 10.0)
            self._rtt = sample if self._rtt is None else 0.875 * self._rtt + 0.125 * sample
        rtt = self._rtt if self._rtt is not None else 0.0

        received = [packet for packet in results if packet.arrival is not None]
        received.sort(key=_arrival_key)
        for packet in received:
            assert packet.arrival is not None
            self._acknowledged.add(packet.arrival, packet.size)
            delta = self._inter_arrival.add(packet.send_time, packet.arrival)
            if delta is not None:
                self._detector.update(*delta)

        acknowledged = self._acknowledged.bps
        self._delay_based.update(self._detector.state, acknowledged, rtt, now)
        if self._loss_reported >= LOSS_MIN_PACKETS:
            self.loss_fraction = self._loss_lost / self._loss_reported
            self._loss_reported = self._loss_lost = 0
            self._loss_based.update(
                self.loss_fraction,
                estimate_bps=self.estimate_bps,
                acknowledged_bps=acknowledged,
                rtt=rtt,
                now=now,
            )
        if probe is not None:
            if self._detector.state is BandwidthUsage.OVERUSING:
                probe.overused = True
            self._judge_probe(now, final=False)

    def _counts_for_loss(self, send_time: float) -> bool:
        """A packet sent while a probe padded tests the probe's rate, not the one the
        viewer's layer needs: its loss fails the probe (``ProbeResult``) but does not cut
        the loss-based estimate, or a failed probe would push a viewer off a layer that
        fits. (Its delay still counts: a probe that builds a queue is over-use, and the
        decrease is to 0.85 x what the path delivered, padding included.)"""
        padded = self._padded
        return padded is None or not padded[0] <= send_time < padded[1]

    # --- probing -------------------------------------------------------------------------------

    def start_probe(self, target_bps: float, now: float) -> float:
        """Pad the send rate up to ``target_bps`` (everything the viewer would receive:
        the next layer, audio, RTX, headers) for ``config.probe_duration`` and judge
        whether the path carries it (``probe_result``). Replaces a running probe. Start
        none while ``state`` is OVERUSING: that fails it at the next feedback.
        Returns the padding rate (bit/s) that tops the measured send rate up to the
        target; without a send rate measured yet, the whole target is padding."""
        if not math.isfinite(target_bps) or target_bps <= 0:
            raise ValueError(f"a probe's target is a positive rate, not {target_bps!r}")
        sending = self._sent.bps or 0.0
        padding_bps = max(target_bps - sending, 0.0)
        self._probe = Probe(
            target_bps=target_bps, padding_bps=padding_bps, now=now, config=self.config
        )
        self._padded = (now, self._probe.padding_ends)
        self._estimate_before_probe = self.estimate_bps
        self.probe_result = None
        return padding_bps

    def cancel_probe(self, now: float) -> None:
        """Stop a running probe without a result (e.g. the padding could not be sent)."""
        self._end_probe(now)

    def _end_probe(self, now: float) -> None:
        probe = self._probe
        if probe is not None:
            self._padded = (probe.started_at, min(max(now, probe.started_at), probe.padding_ends))
        self._probe = None

    def start_from_acknowledged(self) -> bool:
        """Raise the estimate to the acknowledged rate, once: what the path was just shown
        to deliver. The initial estimate is a guess that only over-use lowers and only
        slow growth (gcc-02 §5.5, at most 8 %/s) raises, so a guess below the real rate
        would read as congestion for seconds; libwebrtc's AimdRateControl likewise takes
        its first throughput measurement as its bitrate. False when nothing has been
        acknowledged yet or it was done before."""
        acknowledged = self._acknowledged.bps
        if self._started_from_acknowledged or acknowledged is None:
            return False
        self._started_from_acknowledged = True
        if self._detector.state is not BandwidthUsage.OVERUSING:
            self._delay_based.raise_to(acknowledged)
            self._loss_based.raise_to(acknowledged)
        return True

    def deadline(self) -> float | None:
        """When ``poll`` has padding to send or a probe to give up on (None: nothing)."""
        probe = self._probe
        if probe is None:
            return None
        if probe.next_padding is not None:
            return probe.next_padding
        return probe.give_up_at

    def poll(self, now: float) -> PaddingRequest | None:
        """The padding due at ``now``, if any; past the probe's feedback timeout, its
        result (``probe_result``) from what was reported."""
        probe = self._probe
        if probe is None:
            return None
        if probe.next_padding is None:
            if now >= probe.give_up_at:
                self._judge_probe(now, final=True)
            return None
        return probe.padding_due(now)

    def _judge_probe(self, now: float, *, final: bool) -> None:
        """End the probe once it has a verdict (``Probe.verdict``: over-use or loss as
        soon as they show, the rest once feedback has covered all its packets or at
        ``give_up_at``), and move the estimate by what it showed."""
        probe = self._probe
        assert probe is not None
        outcome = probe.verdict(final=final)
        if outcome is None:
            return
        loss = probe.loss_fraction
        measured = probe.measured_bps
        self._end_probe(now)
        self.probe_result = ProbeResult(
            target_bps=probe.target_bps,
            outcome=outcome,
            measured_bps=measured,
            loss_fraction=loss,
            finished_at=now,
        )
        if outcome is ProbeOutcome.SUCCEEDED and measured is not None:
            carried = min(measured, probe.target_bps)
            self._delay_based.raise_to(carried)
            self._loss_based.raise_to(carried)
        elif self._estimate_before_probe is not None and (
            delivered := measured if measured is not None else self._acknowledged.bps
        ):
            # The queue the probe's own padding built cut the estimate (gcc-02 §5.5
            # decrease); what the path delivered meanwhile is evidence of at least that
            # much, up to where the estimate stood before: a failed probe must not push
            # the viewer below the layer it was carrying (measured: down 2.5 s after a
            # failed probe on a 700 kbit/s link, back up 12 s later).
            # Failed before its warm-up ended, it has no measured rate of its own: the
            # acknowledged rate is the same evidence.
            self._delay_based.raise_to(min(delivered, self._estimate_before_probe))


def _arrival_key(packet: PacketResult) -> float:
    return packet.arrival if packet.arrival is not None else -math.inf
