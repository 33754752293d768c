"""The loss-based rate controller (media/loss_control.py, gcc-02 §6) on virtual time.

Each call is one loss window's fraction, with the estimate, the acknowledged rate and
the round-trip time given by hand.
"""

from __future__ import annotations

import pytest

from whepfan.media.loss_control import LossBasedControl


def test_loss_based_control_follows_gcc_section_6() -> None:
    control = LossBasedControl(initial_bps=1_000_000, min_bps=30_000, max_bps=10_000_000)
    control.update(0.20, estimate_bps=1_000_000, acknowledged_bps=None, rtt=0.05, now=0.0)
    assert control.bps == pytest.approx(900_000)  # x (1 - 0.5 * 0.2)
    control.update(0.20, estimate_bps=900_000, acknowledged_bps=900_000, rtt=0.05, now=0.1)
    assert control.bps == pytest.approx(900_000)  # one cut per 300 ms + RTT
    control.update(0.05, estimate_bps=900_000, acknowledged_bps=900_000, rtt=0.05, now=1.0)
    assert control.bps == pytest.approx(900_000)  # between 2 % and 10 %: hold
    control.update(0.0, estimate_bps=900_000, acknowledged_bps=900_000, rtt=0.05, now=1.1)
    assert control.bps == pytest.approx(945_000)  # x 1.05
    # Far above what the path delivers while losing: the cut starts from that.
    control.update(0.40, estimate_bps=945_000, acknowledged_bps=500_000, rtt=0.05, now=2.0)
    assert control.bps == pytest.approx(500_000 * 0.8)


def test_the_cut_interval_grows_with_the_round_trip() -> None:
    control = LossBasedControl(initial_bps=1_000_000, min_bps=30_000, max_bps=10_000_000)
    control.update(0.20, estimate_bps=1_000_000, acknowledged_bps=None, rtt=0.5, now=0.0)
    assert control.bps == pytest.approx(900_000)
    control.update(0.20, estimate_bps=900_000, acknowledged_bps=None, rtt=0.5, now=0.7)
    assert control.bps == pytest.approx(900_000)  # 300 ms + a 500 ms RTT not yet over
    control.update(0.20, estimate_bps=900_000, acknowledged_bps=None, rtt=0.5, now=0.8)
    assert control.bps == pytest.approx(810_000)


def test_growth_needs_acknowledged_evidence_and_the_estimate_stays_in_bounds() -> None:
    control = LossBasedControl(initial_bps=100_000, min_bps=30_000, max_bps=10_000_000)
    control.update(0.0, estimate_bps=100_000, acknowledged_bps=None, rtt=0.05, now=0.0)
    assert control.bps == 100_000  # nothing acknowledged: no growth
    for window in range(40):
        control.update(
            0.0, estimate_bps=control.bps, acknowledged_bps=100_000, rtt=0.05, now=window
        )
    assert control.bps == pytest.approx(1.5 * 100_000 + 10_000)  # grown up to its cap
    ceiling = LossBasedControl(initial_bps=9_900_000, min_bps=30_000, max_bps=10_000_000)
    ceiling.update(0.0, estimate_bps=9_900_000, acknowledged_bps=10_000_000, rtt=0.05, now=0.0)
    assert ceiling.bps == 10_000_000
    floor = LossBasedControl(initial_bps=40_000, min_bps=30_000, max_bps=10_000_000)
    floor.update(0.90, estimate_bps=40_000, acknowledged_bps=40_000, rtt=0.05, now=0.0)
    assert floor.bps == 30_000
