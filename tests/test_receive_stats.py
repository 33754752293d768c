"""Our receiver statistics of a publisher SSRC (media/meters.py ``IngestReceiveStats``,
RFC 3550 §6.4.1, A.3, A.8) on virtual time: the report block always fits its fields."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from whepfan.media.meters import IngestReceiveStats
from whepfan.protocol import rtcp


def _report(stats: IngestReceiveStats, now: float) -> bytes:
    block = stats.report_block(now)
    return bytes(rtcp.ReceiverReport(ssrc=1, reports=[block]))


def test_a_sender_report_stamped_after_the_timer_gives_a_zero_delay() -> None:
    """The SR's arrival is the kernel's receive stamp, the report's ``now`` the timer's:
    the SR may look newer than the report; DLSR is then 0, never a negative field."""
    stats = IngestReceiveStats(ssrc=7, clock_rate=90000)
    stats.update(1, 0, 10.0)
    stats.last_sr_ntp_middle, stats.last_sr_arrival = 0x12345678, 10.002
    block = stats.report_block(10.001)
    assert block.delay_since_last_sender_report == 0
    assert rtcp.parse_compound(_report(stats, 10.001))


def test_the_delay_since_the_last_sender_report_counts_in_65536ths() -> None:
    stats = IngestReceiveStats(ssrc=7, clock_rate=90000)
    stats.update(1, 0, 10.0)
    stats.last_sr_arrival = 10.0
    assert stats.report_block(10.5).delay_since_last_sender_report == 32768


@given(
    arrivals=st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFFFFFF),
            st.floats(0, 1e6, allow_nan=False),
        ),
        min_size=1,
        max_size=50,
    ),
    sr_arrival=st.one_of(st.none(), st.floats(0, 2e6, allow_nan=False)),
    now=st.floats(0, 2e6, allow_nan=False),
)
def test_any_history_gives_a_report_that_serializes(
    arrivals: list[tuple[int, int, float]], sr_arrival: float | None, now: float
) -> None:
    stats = IngestReceiveStats(ssrc=7, clock_rate=90000)
    for seq, timestamp, at in arrivals:
        stats.update(seq, timestamp, at)
    stats.last_sr_arrival = sr_arrival
    assert rtcp.parse_compound(_report(stats, now))
