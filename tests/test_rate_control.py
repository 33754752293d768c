"""The delay-based rate controller (media/rate_control.py, gcc-02 §5.5) on virtual time.

The detector's signal, the acknowledged rate and the round-trip time are given by hand.
"""

from __future__ import annotations

import pytest

from whepfan.media.delay_trend import BandwidthUsage
from whepfan.media.rate_control import RATE_CONTROL_TRANSITIONS, AimdRateControl, RateControlState


def test_rate_control_transitions_are_gcc_figure_2() -> None:
    table = {
        (usage, state): RATE_CONTROL_TRANSITIONS.get((usage, state), state)
        for usage in BandwidthUsage
        for state in RateControlState
    }
    hold, increase, decrease = RateControlState
    assert table == {
        (BandwidthUsage.OVERUSING, hold): decrease,
        (BandwidthUsage.OVERUSING, increase): decrease,
        (BandwidthUsage.OVERUSING, decrease): decrease,
        (BandwidthUsage.NORMAL, hold): increase,
        (BandwidthUsage.NORMAL, increase): increase,
        (BandwidthUsage.NORMAL, decrease): hold,
        (BandwidthUsage.UNDERUSING, hold): hold,
        (BandwidthUsage.UNDERUSING, increase): hold,
        (BandwidthUsage.UNDERUSING, decrease): hold,
    }


def test_aimd_decreases_to_085_of_acknowledged_and_increases_8_percent_a_second() -> None:
    control = AimdRateControl(initial_bps=1_000_000, min_bps=30_000, max_bps=10_000_000, now=0.0)
    control.update(BandwidthUsage.NORMAL, 1_000_000, 0.05, 0.0)  # hold -> increase
    control.update(BandwidthUsage.NORMAL, 1_000_000, 0.05, 1.0)
    assert control.bps == pytest.approx(1_080_000)
    control.update(BandwidthUsage.OVERUSING, 700_000, 0.05, 1.1)
    assert control.state is RateControlState.DECREASE
    assert control.bps == pytest.approx(0.85 * 700_000)
    control.update(BandwidthUsage.OVERUSING, 600_000, 0.05, 1.2)  # within a round trip
    assert control.bps == pytest.approx(0.85 * 700_000)
    control.update(BandwidthUsage.NORMAL, 700_000, 0.05, 1.4)
    assert control.state is RateControlState.HOLD
    control.update(BandwidthUsage.NORMAL, 700_000, 0.05, 1.5)
    before = control.bps
    control.update(BandwidthUsage.NORMAL, 700_000, 0.05, 1.6)
    # Near the capacity learnt at the decrease: additive, half a packet per response
    # time (100 ms + RTT): 0.5 * 100/150 * (595 kbit/s / 30 fps / 3 packets) ~ 2.2 kbit.
    assert 1_000 <= control.bps - before <= 5_000


def test_aimd_increase_needs_acknowledged_evidence() -> None:
    control = AimdRateControl(initial_bps=300_000, min_bps=30_000, max_bps=10_000_000, now=0.0)
    now = 0.0
    for _ in range(100):
        now += 0.1
        control.update(BandwidthUsage.NORMAL, 200_000, 0.05, now)
    assert control.bps == pytest.approx(1.5 * 200_000 + 10_000)
    control.update(BandwidthUsage.NORMAL, None, 0.05, now + 1)
    assert control.bps == pytest.approx(1.5 * 200_000 + 10_000)


def test_a_second_cut_waits_for_the_round_trip() -> None:
    """One decrease per round trip (at least MIN_DECREASE_INTERVAL): the feedback right
    after a cut still describes the queue before it."""
    control = AimdRateControl(initial_bps=1_000_000, min_bps=30_000, max_bps=10_000_000, now=0.0)
    control.update(BandwidthUsage.OVERUSING, 800_000, 0.5, 0.0)
    assert control.bps == pytest.approx(0.85 * 800_000)
    control.update(BandwidthUsage.OVERUSING, 500_000, 0.5, 0.3)  # within the 500 ms RTT
    assert control.bps == pytest.approx(0.85 * 800_000)
    control.update(BandwidthUsage.OVERUSING, 500_000, 0.5, 0.6)
    assert control.bps == pytest.approx(0.85 * 500_000)


def test_a_cut_without_an_acknowledged_rate_starts_from_the_estimate_and_stays_in_bounds() -> None:
    control = AimdRateControl(initial_bps=1_000_000, min_bps=30_000, max_bps=10_000_000, now=0.0)
    control.update(BandwidthUsage.OVERUSING, None, 0.05, 0.0)
    assert control.bps == pytest.approx(850_000)
    floor = AimdRateControl(initial_bps=40_000, min_bps=30_000, max_bps=10_000_000, now=0.0)
    floor.update(BandwidthUsage.OVERUSING, 10_000, 0.05, 0.0)
    assert floor.bps == 30_000


def test_raise_to_forgets_the_capacity_learnt_at_decreases() -> None:
    """After a probe's evidence (``raise_to``) the old capacity no longer applies: the
    increase is multiplicative again, not the additive one near a learnt capacity."""

    def after_a_decrease(*, raised: bool) -> float:
        control = AimdRateControl(
            initial_bps=1_000_000, min_bps=30_000, max_bps=10_000_000, now=0.0
        )
        control.update(BandwidthUsage.NORMAL, 1_000_000, 0.05, 0.0)  # hold -> increase
        control.update(BandwidthUsage.OVERUSING, 700_000, 0.05, 0.1)  # to 595 kbit/s
        if raised:
            control.raise_to(600_000)
        control.update(BandwidthUsage.NORMAL, 700_000, 0.05, 0.3)  # decrease -> hold
        control.update(BandwidthUsage.NORMAL, 700_000, 0.05, 1.3)  # hold -> increase, 1 s
        return control.bps

    assert after_a_decrease(raised=True) == pytest.approx(600_000 * 1.08)
    # Near the capacity learnt at 700 kbit/s: half a packet (595k / 30 fps / 3 packets).
    assert after_a_decrease(raised=False) == pytest.approx(595_000 + 0.5 * 595_000 / 30 / 3)
    capped = AimdRateControl(initial_bps=500_000, min_bps=30_000, max_bps=2_000_000, now=0.0)
    capped.raise_to(300_000)
    assert capped.bps == 500_000  # at least, never lower
    capped.raise_to(5_000_000)
    assert capped.bps == 2_000_000
