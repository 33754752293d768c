"""The delay-based over-use detector: packet groups and the trend of their delay (gcc-02 §5.1-§5.4).

A viewer's received packets, in arrival order, are grouped as they were sent (a frame's
packets leave back to back: one group, gcc-02 §5.1; a queue flushing arrives as one burst,
§5.2). ``InterArrival`` yields the delay variation between consecutive groups, d(i) =
arrival delta - send delta; ``TrendlineDetector`` accumulates and smooths it and fits a
least-squares slope over the last ``TRENDLINE_WINDOW`` groups: a queue that grows
steadily is a positive slope, jitter is not. Compared with an adaptive threshold (§5.4)
the slope becomes the detector's signal, ``BandwidthUsage``, which the delay-based rate
controller (rate_control.py) acts on.

gcc-02 filters d(i) with a Kalman filter (§5.3); like libwebrtc today this uses a
trendline, with the threshold logic of §5.4 kept and its constants tuned for the
trendline's scale (see ``TREND_K_UP``). Sans-IO: times are seconds, send times on the
sender's clock and arrival times on the viewer's (only their differences matter).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

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


class BandwidthUsage(enum.Enum):
    """The over-use detector's signal (gcc-02 §5.4)."""

    NORMAL = "normal"
    OVERUSING = "overusing"
    UNDERUSING = "underusing"


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
