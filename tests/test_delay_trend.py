"""The delay-based over-use detector (media/delay_trend.py) on hand-made arrivals.

Virtual time only: packet groups (``InterArrival``, gcc-02 §5.1-§5.2) and the trendline
detector (``TrendlineDetector``, gcc-02 §5.3-§5.4) are fed send and arrival times
directly.
"""

from __future__ import annotations

import random

import pytest

from whepfan.media.delay_trend import ARRIVAL_JUMP, BandwidthUsage, InterArrival, TrendlineDetector


def test_packets_sent_within_5_ms_are_one_group() -> None:
    groups = InterArrival()
    # Three groups 20 ms apart, each three packets sent 2 ms apart; the third group
    # arrives 4 ms later than its send spacing.
    deltas = []
    for group, extra in enumerate((0.0, 0.0, 0.004, 0.0)):
        for packet in range(3):
            send = group * 0.020 + packet * 0.002
            delta = groups.add(send, 100.0 + send + extra)
            if delta is not None:
                deltas.append(delta)
    # A delta is reported when the group after the pair starts.
    assert [(round(a, 4), round(s, 4), round(d, 4)) for a, s, d in deltas] == [
        (100.024, 0.020, 0.0),
        (100.048, 0.020, 0.004),
    ]


def test_a_queue_flush_is_one_burst() -> None:
    groups = InterArrival()
    assert groups.add(0.000, 1.000) is None
    assert groups.add(0.020, 1.020) is None  # second group
    # Sent 20 ms later but arrived 1 ms after the group's last: the queue flushed them.
    assert groups.add(0.040, 1.021) is None
    # The next group completes the second, which spans the flushed packet too.
    assert groups.add(0.060, 1.060) == pytest.approx((1.021, 0.040, -0.019))


def feed_detector(detector: TrendlineDetector, slope: float, groups: int, start: float) -> float:
    """``groups`` groups 20 ms apart whose delay grows by ``slope`` per second."""
    time = start
    for _ in range(groups):
        time += 0.020
        detector.update(time, 0.020, slope * 0.020)
    return time


def test_trendline_overuse_normal_and_underuse() -> None:
    detector = TrendlineDetector()
    time = feed_detector(detector, 0.0, 40, 0.0)
    assert detector.state is BandwidthUsage.NORMAL
    time = feed_detector(detector, 0.2, 25, time)  # the queue grows 200 ms per second
    assert detector.state is BandwidthUsage.OVERUSING
    time = feed_detector(detector, -0.2, 40, time)  # and drains
    assert detector.state is BandwidthUsage.UNDERUSING
    feed_detector(detector, 0.0, 60, time)
    assert detector.state is BandwidthUsage.NORMAL


def test_trendline_threshold_adapts_within_its_bounds() -> None:
    detector = TrendlineDetector()
    rng = random.Random(5)
    time = 0.0
    for _ in range(500):  # jitter without a trend: the threshold follows it down
        time += 0.020
        detector.update(time, 0.020, rng.uniform(-0.002, 0.002))
    assert 6.0 <= detector.threshold_ms < 12.5
    assert detector.state is not BandwidthUsage.OVERUSING


def test_a_packet_sent_before_the_current_group_does_not_join_it() -> None:
    """Reordered feedback: a packet sent before the group's first counts towards the
    rates (bandwidth.py) but not towards the group, whose arrival it would stretch."""
    groups = InterArrival()
    assert groups.add(0.000, 1.000) is None
    assert groups.add(0.020, 1.020) is None
    assert groups.add(0.010, 1.030) is None  # sent before the current group's first
    assert groups.add(0.040, 1.040) == pytest.approx((1.020, 0.020, 0.0))


def test_a_jump_in_the_viewers_clock_starts_grouping_again() -> None:
    """A variation above ARRIVAL_JUMP is the viewer's clock stepping (or garbage
    feedback), not a queue: no delta, and the next one is measured between two groups
    after the step."""
    step = ARRIVAL_JUMP + 6.0
    groups = InterArrival()
    deltas = []
    for index in range(7):
        send = index * 0.020
        deltas.append(groups.add(send, 1.0 + send + (step if index >= 3 else 0.0)))
    # Group i completes when group i + 1 starts: (g0, g1) at index 2, (g1, g2) at 3;
    # (g2, g3) straddles the step at 4 and is dropped, g3 with it; g4 completes at 5 with
    # no predecessor; (g4, g5) at 6.
    assert deltas[:2] == [None, None]
    assert deltas[2] == pytest.approx((1.020, 0.020, 0.0))
    assert deltas[3] == pytest.approx((1.040, 0.020, 0.0))
    assert deltas[4] is None and deltas[5] is None
    assert deltas[6] == pytest.approx((1.100 + step, 0.020, 0.0))
