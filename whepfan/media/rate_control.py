"""The delay-based rate controller: AIMD on the over-use signal (gcc-02 §5.5).

``AimdRateControl`` keeps the delay-based estimate A_hat. The detector's signal
(delay_trend.py ``BandwidthUsage``) moves it through the states of gcc-02 Figure 2,
``RATE_CONTROL_TRANSITIONS``: in Increase it grows multiplicatively far from the
capacity it learnt at past decreases and additively near it, never far above what the
path was shown to deliver (the acknowledged rate); in Decrease it becomes ``BETA`` x the
acknowledged rate, once per round trip; Hold keeps it. Sans-IO: the caller passes the
signal, the acknowledged rate, the round-trip time and ``now``.
"""

from __future__ import annotations

import enum
import math

from whepfan.media.delay_trend import BandwidthUsage

# --- gcc-02 §5.5 ------------------------------------------------------------------------------

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
