"""A viewer's available bandwidth from transport-wide feedback (delay- and loss-based).

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
        │  FeedbackMatcher: unwrap 16-bit sequence numbers and the 24-bit reference time,
        │  count each packet once (duplicates, reordered feedback), a received report
        ▼  overriding an earlier "lost" one
    PacketResult(sequence, send_time, size, arrival | None)  ── sorted by arrival
        ├─▶ acknowledged bitrate: bytes received per arrival window (gcc-02 §5.5 R_hat)
        ├─▶ loss fraction per window of >= 20 reported packets (gcc-02 §6)
        └─▶ InterArrival: groups of packets sent within 5 ms (gcc-02 §5.1, §5.2)
              └─▶ TrendlineDetector: inter-group delay variation, accumulated and
                  smoothed, least-squares slope over 20 groups; over-use when the slope
                  (scaled) stays above an adaptive threshold (gcc-02 §5.4)
                    └─▶ AimdRateControl (gcc-02 §5.5): Hold / Increase / Decrease
    estimate = clamp(min(delay-based, loss-based), min_bps, max_bps)

gcc-02 filters the delay variation with a Kalman filter (§5.3); like libwebrtc today this
uses a trendline (a least-squares slope of the smoothed accumulated delay), which reacts
to a queue that grows steadily and ignores jitter that does not. The threshold logic of
§5.4 is kept, with constants tuned for the trendline's scale (see ``TREND_K_UP``).

An SFU forwards discrete simulcast layers: it cannot nudge an encoder up a few percent to
see whether the path takes it, so a receive-side estimate (REMB) never shows room for the
next layer. ``start_probe`` does: padding (RTX padding packets from
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

import enum
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from whepfan.protocol.rtcp import TWCC_DELTA_TICK, TWCC_REFERENCE_MOD, TransportFeedback

# --- feedback matching (draft-holmer-rmcat-transport-wide-cc-extensions-01) ---------------

_SEQ_MOD = 1 << 16
# §3.1: the reference time is a 24-bit count of 64 ms; deltas are 250 µs ticks, so one
# reference unit is 256 ticks and all arrival arithmetic stays in exact integers.
_TICKS_PER_REFERENCE = 256
# How many recent sequence numbers remember whether they were reported: enough for
# several seconds at any rate one viewer receives (2^14 packets ~ 20 s at 8 Mbit/s), and
# well inside the 2^15 a 16-bit number can be unwrapped over.
_HISTORY = 1 << 14
_UNKNOWN, _REPORTED_LOST, _REPORTED_RECEIVED = 0, 1, 2

# --- inter-arrival grouping (gcc-02 §5.1, §5.2) -------------------------------------------

# §5.1 burst_time: packets sent within 5 ms of a group's first are one group (a frame's
# packets leave back to back; their spread says nothing about the path).
BURST_TIME = 0.005
# §5.2 pre-filtering: a packet arriving within burst_time of the group's last one, and
# sooner than its send spacing (a queue flushing), joins the group; a group spans at most
# this long, so a long flush still yields groups.
MAX_BURST_DURATION = 0.100
# A gap or jump in the viewer's clock this large is not congestion: start grouping again.
ARRIVAL_JUMP = 3.0

# --- trendline over-use detector (gcc-02 §5.3-§5.4, trendline in place of Kalman) ----------

TRENDLINE_WINDOW = 20  # groups in the least-squares fit
TRENDLINE_SMOOTHING = 0.9  # exponential smoothing of the accumulated delay
TRENDLINE_GAIN = 4.0  # the slope is scaled by this and by min(deltas seen, 60)
TRENDLINE_MAX_DELTAS = 60
# §5.4 adaptive threshold, in ms of modified trend: starts at 12.5, moves towards |m| at
# k_up when |m| is above it and k_down below (per ms, at most 100 ms per step), and stays
# in [6, 600]. The draft's K_u = 0.01, K_d = 0.00018 are tuned for the Kalman estimate
# m(i); the trendline's modified trend swings wider, and these are the values its
# implementation in Chromium runs with (threshold follows a quiet trend down quickly).
INITIAL_THRESHOLD_MS = 12.5
TREND_K_UP = 0.0087
TREND_K_DOWN = 0.039
MIN_THRESHOLD_MS = 6.0
MAX_THRESHOLD_MS = 600.0
# §5.4: a sample this far above the threshold is a spike; it must not drag the threshold up.
MAX_THRESHOLD_ADAPT_MS = 15.0
MAX_THRESHOLD_STEP_MS = 100.0
# §5.4 overuse_time_th: the trend must stay above the threshold this long (and over more
# than one group, and not be falling) before over-use is signalled.
OVERUSE_TIME = 0.010

# --- rates (gcc-02 §5.5, §6) --------------------------------------------------------------

ACKNOWLEDGED_WINDOW = 0.5  # §5.5: R_hat over T in [0.5, 1] s
SEND_RATE_WINDOW = 1.0
# A rate window holds at most this many samples (a second of max_bps in 1200-byte
# packets), so feedback claiming every packet arrived at one instant cannot grow it.
MAX_WINDOW_SAMPLES = 8192
BETA = 0.85  # §5.5: on over-use, A_hat = beta * R_hat
ETA_PER_SECOND = 1.08  # §5.5: multiplicative increase far from convergence
# §5.5: A_hat < 1.5 * R_hat: without evidence from the acknowledged rate, no runaway.
MAX_INCREASE_OVER_ACKNOWLEDGED = 1.5
INCREASE_HEADROOM_BPS = 10_000.0
MIN_ADDITIVE_INCREASE_BPS = 1_000.0  # §5.5: max(1000, alpha * expected packet size)
RESPONSE_TIME_BASE = 0.100  # §5.5: response_time = 100 ms + RTT
CAPACITY_SMOOTHING = 0.05  # §5.5: the "average max bitrate" at decreases, and its variance
CAPACITY_MIN_RELATIVE_DEVIATION = 0.025
MIN_DECREASE_INTERVAL = 0.200  # one cut per round trip (at least this): see _decrease
ASSUMED_FRAME_RATE = 30.0  # §5.5 expected packet size: bits per frame at 30 fps
MAX_PACKET_BITS = 1200 * 8

# A padding packet's datagram beyond its padding octets: RTP header (12), the
# transport-wide sequence number's extension block (8), the SRTP tag of
# AES_CM_128_HMAC_SHA1_80 (10; GCM's 16 makes a probe ~2 % heavier than planned). Only
# the plan uses it: rates are measured from the send log's real sizes.
PADDING_DATAGRAM_OVERHEAD = 12 + 8 + 10

LOSS_MIN_PACKETS = 20  # a loss fraction from fewer packets is noise
LOSS_HIGH = 0.10  # §6: above 10 % the loss-based estimate decreases ...
LOSS_LOW = 0.02  # ... below 2 % it increases, in between it holds
LOSS_INCREASE = 1.05
LOSS_DECREASE_INTERVAL = 0.300  # plus RTT: one cut per loss episode, not per report


class BandwidthUsage(enum.Enum):
    """The over-use detector's signal (gcc-02 §5.4)."""

    NORMAL = "normal"
    OVERUSING = "overusing"
    UNDERUSING = "underusing"


class RateControlState(enum.Enum):
    """The delay-based rate controller's state (gcc-02 §5.5)."""

    HOLD = "hold"
    INCREASE = "increase"
    DECREASE = "decrease"


# gcc-02 §5.5, Figure 2, as data: (signal, state) -> next state; absent pairs stay put.
RATE_CONTROL_TRANSITIONS: dict[tuple[BandwidthUsage, RateControlState], RateControlState] = {
    (BandwidthUsage.OVERUSING, RateControlState.HOLD): RateControlState.DECREASE,
    (BandwidthUsage.OVERUSING, RateControlState.INCREASE): RateControlState.DECREASE,
    (BandwidthUsage.NORMAL, RateControlState.HOLD): RateControlState.INCREASE,
    (BandwidthUsage.NORMAL, RateControlState.DECREASE): RateControlState.HOLD,
    (BandwidthUsage.UNDERUSING, RateControlState.INCREASE): RateControlState.HOLD,
    (BandwidthUsage.UNDERUSING, RateControlState.DECREASE): RateControlState.HOLD,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class BandwidthConfig:
    """The tunables of ``ViewerBandwidth`` (the algorithm's constants are module-level,
    each with its draft section).

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


@dataclass(frozen=True, slots=True)
class PacketResult:
    """One sent packet as the feedback reported it. ``sequence`` is the transport-wide
    sequence number unwrapped past 16 bits; ``arrival`` is on the viewer's clock (None:
    reported not received)."""

    sequence: int
    send_time: float
    size: int
    arrival: float | None
    recovered: bool = False  # reported lost by earlier feedback: that was not a loss


@dataclass(frozen=True, slots=True)
class PaddingRequest:
    """Padding for the driver to send now: ``Fanout.send_padding(viewer, track, count,
    size)`` with these (``size``: padding octets per packet, 1..255; each datagram is
    about ``size + PADDING_DATAGRAM_OVERHEAD`` bytes)."""

    count: int
    size: int


class ProbeOutcome(enum.Enum):
    """How a probe ended; every outcome but SUCCEEDED means "the target does not fit"."""

    SUCCEEDED = "succeeded"
    OVERUSE = "overuse"  # the delay-based detector saw a queue build
    LOSS = "loss"  # more than probe_max_loss of the probe's packets were lost
    TOO_SLOW = "too-slow"  # received at less than probe_success_ratio of the target
    NO_FEEDBACK = "no-feedback"  # too few of the probe's packets were reported


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """A finished probe: its target, how it ended, and what was measured."""

    target_bps: float
    outcome: ProbeOutcome
    measured_bps: float | None  # receive rate of the packets sent after the warm-up
    loss_fraction: float | None  # of the probe's reported packets
    finished_at: float

    @property
    def succeeded(self) -> bool:
        return self.outcome is ProbeOutcome.SUCCEEDED


# --- matching ------------------------------------------------------------------------------


class FeedbackMatcher:
    """Feedback packets plus send log entries -> ``PacketResult`` per packet, once each.

    Sequence numbers are unwrapped to the one nearest the newest seen (RFC 3550 A.1
    style), the reference time likewise modulo 2^24 (it wraps every 2^24 * 64 ms, about
    12.4 days, and an arbitrary receiver clock may start anywhere). A packet reported
    received twice (duplicated or overlapping feedback) is yielded once; one reported
    lost and later received is yielded again as received, marked ``recovered``; one
    reported lost twice is yielded once. Packets older than ``_HISTORY`` behind the
    newest, or with no send log entry (None), are skipped.
    """

    def __init__(self) -> None:
        self._highest: int | None = None
        self._reference: int | None = None  # unwrapped, in 64 ms units
        self._ring_sequence = [-1] * _HISTORY
        self._ring_state = [_UNKNOWN] * _HISTORY
        self.duplicates = 0
        self.unknown = 0  # no send log entry

    def match(
        self, feedback: TransportFeedback, sent: Sequence[tuple[float, int] | None]
    ) -> list[PacketResult]:
        """``sent[i]`` is the send log entry of sequence number ``base_sequence + i``
        (``Fanout.transport_sent(viewer, base_sequence, len(deltas))``); missing
        entries count as unknown. Results are in sequence order."""
        base = self._unwrap_sequence(feedback.base_sequence)
        reference_ticks = self._unwrap_reference(feedback.reference_time) * _TICKS_PER_REFERENCE
        results: list[PacketResult] = []
        ticks = reference_ticks
        oldest = (self._highest if self._highest is not None else base) - _HISTORY
        ring_sequence, ring_state = self._ring_sequence, self._ring_state
        for index, delta in enumerate(feedback.deltas):
            if delta is not None:
                ticks += delta
            sequence = base + index
            if sequence <= oldest:
                continue
            entry = sent[index] if index < len(sent) else None
            if entry is None:
                self.unknown += 1
                continue
            slot = sequence % _HISTORY
            previous = ring_state[slot] if ring_sequence[slot] == sequence else _UNKNOWN
            if delta is None:
                if previous != _UNKNOWN:
                    self.duplicates += 1
                    continue
                ring_sequence[slot], ring_state[slot] = sequence, _REPORTED_LOST
                arrival = None
            else:
                if previous == _REPORTED_RECEIVED:
                    self.duplicates += 1
                    continue
                ring_sequence[slot], ring_state[slot] = sequence, _REPORTED_RECEIVED
                arrival = ticks * TWCC_DELTA_TICK
            send_time, size = entry
            results.append(
                PacketResult(
                    sequence,
                    float(send_time),
                    max(int(size), 0),
                    arrival,
                    recovered=previous == _REPORTED_LOST,
                )
            )
        # The newest number the viewer has seen, known to us or not, anchors the unwrap.
        last = base + len(feedback.deltas) - 1
        if self._highest is None or last > self._highest:
            self._highest = last
        return results

    def _unwrap_sequence(self, sequence: int) -> int:
        sequence &= 0xFFFF
        if self._highest is None:
            return sequence
        distance = (sequence - self._highest) % _SEQ_MOD
        if distance >= _SEQ_MOD // 2:
            distance -= _SEQ_MOD
        return self._highest + distance

    def _unwrap_reference(self, reference: int) -> int:
        # TransportFeedback.parse gives it signed (bit 23 as sign), from_arrivals modulo
        # 2^24: either way only its value modulo 2^24 is the wire's.
        reference %= TWCC_REFERENCE_MOD
        if self._reference is None:
            self._reference = reference
            return reference
        distance = (reference - self._reference) % TWCC_REFERENCE_MOD
        if distance >= TWCC_REFERENCE_MOD // 2:
            distance -= TWCC_REFERENCE_MOD
        unwrapped = self._reference + distance
        self._reference = max(self._reference, unwrapped)
        return unwrapped


# --- delay-based detection ------------------------------------------------------------------


@dataclass(slots=True)
class _Group:
    first_send: float
    last_send: float
    first_arrival: float
    last_arrival: float


class InterArrival:
    """Packet groups (gcc-02 §5.1, §5.2) and the delay variation between them.

    Fed received packets in arrival order; ``add`` returns (arrival time, send delta,
    delay variation d(i) = arrival delta - send delta), all seconds, when a group
    completes and has a predecessor, else None. Packets sent before the current group's
    first (reordered, or from late feedback) are ignored here: they still count towards
    the rates."""

    def __init__(self) -> None:
        self._current: _Group | None = None
        self._previous: _Group | None = None

    def reset(self) -> None:
        self._current = self._previous = None

    def add(self, send_time: float, arrival: float) -> tuple[float, float, float] | None:
        current = self._current
        if current is None:
            self._current = _Group(send_time, send_time, arrival, arrival)
            return None
        if send_time < current.first_send:
            return None
        if send_time - current.first_send <= BURST_TIME or self._belongs_to_burst(
            current, send_time, arrival
        ):
            current.last_send = max(current.last_send, send_time)
            current.last_arrival = max(current.last_arrival, arrival)
            return None
        # ``current`` is complete; a new group starts with this packet.
        previous = self._previous
        self._previous = current
        self._current = _Group(send_time, send_time, arrival, arrival)
        if previous is None:
            return None
        send_delta = current.last_send - previous.last_send
        arrival_delta = current.last_arrival - previous.last_arrival
        variation = arrival_delta - send_delta
        if arrival_delta < 0 or abs(variation) > ARRIVAL_JUMP:
            # The viewer's clock stepped (or feedback is garbage): not a queue.
            self._previous = None
            return None
        return current.last_arrival, send_delta, variation

    @staticmethod
    def _belongs_to_burst(group: _Group, send_time: float, arrival: float) -> bool:
        """§5.2: arrived within burst_time of the group's last packet and sooner after
        it than it was sent after it: the queue was flushing, one burst."""
        arrival_delta = arrival - group.last_arrival
        send_delta = send_time - group.last_send
        return (
            arrival_delta - send_delta < 0
            and arrival_delta <= BURST_TIME
            and arrival - group.first_arrival < MAX_BURST_DURATION
        )


class TrendlineDetector:
    """Over-use from the trend of the delay variation (gcc-02 §5.3, §5.4).

    Each inter-group variation d(i) is accumulated (the queuing delay, up to a constant)
    and exponentially smoothed; the least-squares slope of the last ``TRENDLINE_WINDOW``
    smoothed values against arrival time is how fast the queue grows (ms per ms). Scaled
    by ``TRENDLINE_GAIN`` and by the number of deltas seen (capped at 60, so the first
    few groups cannot trip it), it is compared with the adaptive threshold of §5.4:
    above it for ``OVERUSE_TIME`` over more than one group while not falling ->
    OVERUSING; below minus the threshold -> UNDERUSING; otherwise NORMAL. Over-use is
    kept while the trend stays above the threshold.
    """

    def __init__(self) -> None:
        self.state = BandwidthUsage.NORMAL
        self.threshold_ms = INITIAL_THRESHOLD_MS
        self.modified_trend_ms = 0.0
        self._window: deque[tuple[float, float]] = deque(maxlen=TRENDLINE_WINDOW)
        self._first_arrival: float | None = None
        self._accumulated_ms = 0.0
        self._smoothed_ms = 0.0
        self._deltas = 0
        self._trend = 0.0
        self._previous_trend = 0.0
        self._time_over = -1.0
        self._overuse_count = 0
        self._last_threshold_update: float | None = None

    def update(self, arrival: float, send_delta: float, variation: float) -> BandwidthUsage:
        if self._first_arrival is None:
            self._first_arrival = arrival
        self._deltas = min(self._deltas + 1, 1000)
        self._accumulated_ms += variation * 1000.0
        self._smoothed_ms = (
            TRENDLINE_SMOOTHING * self._smoothed_ms
            + (1.0 - TRENDLINE_SMOOTHING) * self._accumulated_ms
        )
        self._window.append(((arrival - self._first_arrival) * 1000.0, self._smoothed_ms))
        if len(self._window) == TRENDLINE_WINDOW:
            slope = _least_squares_slope(self._window)
            if slope is not None:
                self._trend = slope
        self._detect(arrival, send_delta)
        return self.state

    def _detect(self, arrival: float, send_delta: float) -> None:
        modified = min(self._deltas, TRENDLINE_MAX_DELTAS) * self._trend * TRENDLINE_GAIN
        self.modified_trend_ms = modified
        if modified > self.threshold_ms:
            if self._time_over < 0:
                # First sample above: assume it crossed half-way through the interval.
                self._time_over = send_delta / 2
            else:
                self._time_over += send_delta
            self._overuse_count += 1
            if (
                self._time_over > OVERUSE_TIME
                and self._overuse_count > 1
                and self._trend >= self._previous_trend
            ):
                self._time_over = 0.0
                self._overuse_count = 0
                self.state = BandwidthUsage.OVERUSING
        elif modified < -self.threshold_ms:
            self._time_over, self._overuse_count = -1.0, 0
            self.state = BandwidthUsage.UNDERUSING
        else:
            self._time_over, self._overuse_count = -1.0, 0
            self.state = BandwidthUsage.NORMAL
        self._previous_trend = self._trend
        self._adapt_threshold(modified, arrival)

    def _adapt_threshold(self, modified: float, arrival: float) -> None:
        """§5.4: del_var_th(i) = del_var_th(i-1) + dt * K * (|m(i)| - del_var_th(i-1))."""
        now_ms = arrival * 1000.0
        if self._last_threshold_update is None:
            self._last_threshold_update = now_ms
        magnitude = abs(modified)
        if magnitude > self.threshold_ms + MAX_THRESHOLD_ADAPT_MS:
            self._last_threshold_update = now_ms
            return
        k = TREND_K_DOWN if magnitude < self.threshold_ms else TREND_K_UP
        step = min(max(now_ms - self._last_threshold_update, 0.0), MAX_THRESHOLD_STEP_MS)
        self.threshold_ms += k * (magnitude - self.threshold_ms) * step
        self.threshold_ms = min(max(self.threshold_ms, MIN_THRESHOLD_MS), MAX_THRESHOLD_MS)
        self._last_threshold_update = now_ms


def _least_squares_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """The slope of the least-squares line through ``points`` (two passes over 20
    points per group: this runs for every packet group of every viewer)."""
    count = len(points)
    sum_x = sum_y = 0.0
    for x, y in points:
        sum_x += x
        sum_y += y
    mean_x, mean_y = sum_x / count, sum_y / count
    numerator = denominator = 0.0
    for x, y in points:
        dx = x - mean_x
        numerator += dx * (y - mean_y)
        denominator += dx * dx
    if denominator <= 0.0:
        return None
    slope = numerator / denominator
    return slope if math.isfinite(slope) else None


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


class AimdRateControl:
    """The delay-based estimate A_hat (gcc-02 §5.5).

    The detector's signal moves the state through ``RATE_CONTROL_TRANSITIONS``. In
    Increase, far from convergence the estimate grows by ``ETA_PER_SECOND`` per second;
    near it (the acknowledged rate within three standard deviations of the average
    acknowledged rate at past decreases, "the average max bitrate") by about half a
    packet per response time. Either way it never rises above 1.5 x acknowledged + 10
    kbit/s: growth needs evidence that the path carries it (it is not lowered to that cap
    either; only over-use lowers it). In Decrease the estimate becomes ``BETA`` x the
    acknowledged rate, once per round trip. Hold keeps it.
    """

    def __init__(self, *, initial_bps: float, min_bps: float, max_bps: float, now: float) -> None:
        self.min_bps, self.max_bps = min_bps, max_bps
        self.bps = min(max(initial_bps, min_bps), max_bps)
        self.state = RateControlState.HOLD
        self._last_update = now
        self._last_decrease: float | None = None
        self._capacity_mean: float | None = None
        self._capacity_variance = 0.0

    def update(
        self, usage: BandwidthUsage, acknowledged_bps: float | None, rtt: float, now: float
    ) -> float:
        elapsed = max(now - self._last_update, 0.0)
        self._last_update = now
        self.state = RATE_CONTROL_TRANSITIONS.get((usage, self.state), self.state)
        if self.state is RateControlState.DECREASE:
            self._decrease(acknowledged_bps, rtt, now)
        elif self.state is RateControlState.INCREASE and acknowledged_bps is not None:
            self._increase(acknowledged_bps, rtt, elapsed)
        self.bps = min(max(self.bps, self.min_bps), self.max_bps)
        return self.bps

    def raise_to(self, bps: float) -> None:
        """A probe showed the path carries ``bps``: the estimate is at least that, and
        what was learnt about the old capacity no longer applies."""
        self.bps = min(max(self.bps, bps), self.max_bps)
        self._capacity_mean = None

    def _decrease(self, acknowledged_bps: float | None, rtt: float, now: float) -> None:
        # A second cut before the first one's effect can show in feedback (a round trip)
        # would punish the same queue twice.
        if self._last_decrease is not None and now - self._last_decrease < max(
            MIN_DECREASE_INTERVAL, rtt
        ):
            return
        self._last_decrease = now
        basis = acknowledged_bps if acknowledged_bps is not None else self.bps
        self.bps = min(self.bps, BETA * basis)
        if acknowledged_bps is not None:
            self._learn_capacity(acknowledged_bps)

    def _learn_capacity(self, acknowledged_bps: float) -> None:
        mean = self._capacity_mean
        if mean is not None and acknowledged_bps < mean - 3 * self._deviation(mean):
            mean = None  # far below what the link used to carry: it changed
        if mean is None:
            self._capacity_mean = acknowledged_bps
            self._capacity_variance = (0.1 * acknowledged_bps) ** 2
            return
        error = acknowledged_bps - mean
        self._capacity_mean = mean + CAPACITY_SMOOTHING * error
        self._capacity_variance = (1 - CAPACITY_SMOOTHING) * (
            self._capacity_variance + CAPACITY_SMOOTHING * error * error
        )

    def _deviation(self, mean: float) -> float:
        return max(math.sqrt(self._capacity_variance), CAPACITY_MIN_RELATIVE_DEVIATION * mean)

    def _increase(self, acknowledged_bps: float, rtt: float, elapsed: float) -> None:
        mean = self._capacity_mean
        if mean is not None and acknowledged_bps > mean + 3 * self._deviation(mean):
            # §5.5: above three standard deviations the congestion level changed: reset.
            self._capacity_mean = mean = None
        if mean is not None and abs(acknowledged_bps - mean) <= 3 * self._deviation(mean):
            # §5.5 additive: alpha = 0.5 * min(elapsed / response_time, 1) packets.
            response_time = RESPONSE_TIME_BASE + rtt
            bits_per_frame = self.bps / ASSUMED_FRAME_RATE
            packets_per_frame = math.ceil(bits_per_frame / MAX_PACKET_BITS)
            packet_bits = bits_per_frame / max(packets_per_frame, 1)
            alpha = 0.5 * min(elapsed / response_time, 1.0)
            increased = self.bps + max(MIN_ADDITIVE_INCREASE_BPS, alpha * packet_bits)
        else:
            increased = self.bps * ETA_PER_SECOND ** min(elapsed, 1.0)
        cap = MAX_INCREASE_OVER_ACKNOWLEDGED * acknowledged_bps + INCREASE_HEADROOM_BPS
        self.bps = min(increased, max(self.bps, cap))


class LossBasedControl:
    """The loss-based estimate A_s (gcc-02 §6), a cap on the delay-based one.

    Per loss window (at least ``LOSS_MIN_PACKETS`` reported packets): above 10 % lost it
    becomes (1 - 0.5 p) x the current estimate or the acknowledged rate, whichever is
    lower, at most once per 300 ms + RTT (the reports that follow a cut still describe
    the queue before it); below 2 % it grows 5 % per window, never above 1.5 x
    acknowledged + 10 kbit/s; in between it holds.

    §6 cuts A_s(i-1). Starting from the acknowledged rate when it is lower is this
    module's choice, for the same reason §5.5 cuts from R_hat rather than A_hat: a
    sender far above the path (a layer of 1.5 Mbit/s into a 700 kbit/s bucket whose
    50 ms queue overflows before the delay trend has its 20 groups) would otherwise need
    four cuts, two seconds, to fall under what the path just showed it delivers."""

    def __init__(self, *, initial_bps: float, min_bps: float, max_bps: float) -> None:
        self.min_bps, self.max_bps = min_bps, max_bps
        self.bps = min(max(initial_bps, min_bps), max_bps)
        self._last_decrease: float | None = None

    def update(
        self,
        loss: float,
        *,
        estimate_bps: float,
        acknowledged_bps: float | None,
        rtt: float,
        now: float,
    ) -> float:
        if loss > LOSS_HIGH:
            if (
                self._last_decrease is None
                or now - self._last_decrease >= LOSS_DECREASE_INTERVAL + rtt
            ):
                self._last_decrease = now
                basis = min(self.bps, estimate_bps)
                if acknowledged_bps is not None:
                    basis = min(basis, acknowledged_bps)
                self.bps = basis * (1.0 - 0.5 * loss)
        elif loss < LOSS_LOW and acknowledged_bps is not None:
            cap = MAX_INCREASE_OVER_ACKNOWLEDGED * acknowledged_bps + INCREASE_HEADROOM_BPS
            self.bps = min(self.bps * LOSS_INCREASE, max(self.bps, cap))
        self.bps = min(max(self.bps, self.min_bps), self.max_bps)
        return self.bps

    def raise_to(self, bps: float) -> None:
        self.bps = min(max(self.bps, bps), self.max_bps)


# --- probing ----------------------------------------------------------------------------------


class _Probe:
    """One running probe: its schedule, and what the feedback said about its packets."""

    def __init__(
        self, *, target_bps: float, padding_bps: float, now: float, config: BandwidthConfig
    ) -> None:
        self.target_bps = target_bps
        self.padding_bps = padding_bps
        self.started_at = now
        self.warmup = config.probe_warmup
        self.measure_from = now + config.probe_warmup
        self.padding_ends = now + config.probe_duration
        self.give_up_at = self.padding_ends + config.probe_feedback_timeout
        # Padding chunks on a fixed grid from the start, each carrying one interval's
        # bytes; a late timer catches up in the next chunk (up to one burst).
        self.interval = config.probe_padding_interval
        self.chunk_count = max(round(config.probe_duration / self.interval), 1)
        self.chunks_due = 0 if padding_bps > 0 else self.chunk_count
        self.budget = 0.0  # bytes owed
        per_interval = padding_bps / 8 * config.probe_padding_interval
        self.padding_octets = int(
            min(
                max(per_interval - PADDING_DATAGRAM_OVERHEAD, config.min_padding_octets),
                config.max_padding_octets,
            )
        )
        self.datagram_size = self.padding_octets + PADDING_DATAGRAM_OVERHEAD
        self.reported = 0
        self.lost = 0
        self.overused = False
        self.covered = False  # feedback reported a packet sent after the padding ended
        # Receive rate of the measured packets: their bytes after the first to arrive,
        # over the spread of their arrivals (n packets, n - 1 gaps).
        self.measured_bytes = 0
        self.first_arrival: tuple[float, int] | None = None
        self.last_arrival: float | None = None

    def ramp(self, chunk: int) -> float:
        """The share of the padding rate chunk ``chunk`` carries: rising linearly over
        the warm-up, then all of it."""
        elapsed = (chunk + 1) * self.interval
        return min(elapsed / self.warmup, 1.0) if self.warmup > 0 else 1.0

    @property
    def next_padding(self) -> float | None:
        if self.chunks_due >= self.chunk_count:
            return None
        return self.started_at + self.chunks_due * self.interval

    def observe(self, packet: PacketResult) -> None:
        if packet.send_time >= self.padding_ends:
            self.covered = True
            return
        if packet.send_time < self.started_at:
            return
        if packet.recovered:
            self.lost = max(self.lost - 1, 0)
        else:
            self.reported += 1
        if packet.arrival is None:
            self.lost += 1
            return
        if packet.send_time < self.measure_from:
            return
        arrival = packet.arrival
        self.measured_bytes += packet.size
        if self.first_arrival is None or arrival < self.first_arrival[0]:
            self.first_arrival = (arrival, packet.size)
        if self.last_arrival is None or arrival > self.last_arrival:
            self.last_arrival = arrival

    @property
    def loss_fraction(self) -> float | None:
        return self.lost / self.reported if self.reported else None

    @property
    def measured_bps(self) -> float | None:
        if self.first_arrival is None or self.last_arrival is None:
            return None
        spread = self.last_arrival - self.first_arrival[0]
        if spread <= 0:
            return None
        return (self.measured_bytes - self.first_arrival[1]) * 8 / spread


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
        self._probe: _Probe | None = None
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
        self._probe = _Probe(
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
        next_padding = probe.next_padding
        if next_padding is None:
            if now >= probe.give_up_at:
                self._judge_probe(now, final=True)
            return None
        if now < next_padding:
            return None
        config = self.config
        # Chunks whose time has come (the one at next_padding, and any a late timer missed).
        due = min(int((now - probe.started_at) / probe.interval) + 1, probe.chunk_count)
        due = max(due, probe.chunks_due + 1)
        for chunk in range(probe.chunks_due, due):
            probe.budget += probe.padding_bps / 8 * probe.interval * probe.ramp(chunk)
        probe.chunks_due = due
        datagram = probe.datagram_size
        count = min(int(probe.budget // datagram), config.max_padding_packets)
        probe.budget -= count * datagram
        # A chunk that could not carry the whole budget leaves the rest for the next;
        # the debt never grows past one burst, so a late timer does not cause a flood.
        probe.budget = min(probe.budget, float(datagram * config.max_padding_packets))
        return PaddingRequest(count, probe.padding_octets) if count > 0 else None

    def _judge_probe(self, now: float, *, final: bool) -> None:
        """Fail a probe as soon as over-use or loss shows (stop loading the path); pass
        or fail it once feedback has covered all its packets; at ``give_up_at`` decide
        from what was reported."""
        probe = self._probe
        assert probe is not None
        config = self.config
        loss = probe.loss_fraction
        outcome: ProbeOutcome | None = None
        if probe.overused:
            outcome = ProbeOutcome.OVERUSE
        elif loss is not None and probe.reported >= LOSS_MIN_PACKETS and loss > LOSS_HIGH:
            outcome = ProbeOutcome.LOSS
        elif probe.covered or final:
            measured = probe.measured_bps
            if measured is None or probe.reported < LOSS_MIN_PACKETS:
                outcome = ProbeOutcome.NO_FEEDBACK
            elif loss is not None and loss > config.probe_max_loss:
                outcome = ProbeOutcome.LOSS
            elif measured < config.probe_success_ratio * probe.target_bps:
                outcome = ProbeOutcome.TOO_SLOW
            else:
                outcome = ProbeOutcome.SUCCEEDED
        if outcome is None:
            return
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
