"""A headroom probe's padding schedule and verdict (media/probe.py), on virtual time.

``Probe`` is driven directly: ``padding_due`` at chosen instants, and ``observe`` with
hand-made ``PacketResult``s as the feedback matcher would produce them. The probe's
life inside the estimator (start, poll, cancel, the estimate afterwards) is
tests/test_bandwidth.py's.
"""

from __future__ import annotations

import pytest

from whepfan.media.bandwidth import BandwidthConfig
from whepfan.media.packet_results import PacketResult
from whepfan.media.probe import PADDING_DATAGRAM_OVERHEAD, PaddingRequest, Probe, ProbeOutcome

CONFIG = BandwidthConfig()
START = 5.0
TARGET_BPS = 1_000_000.0
PACKET_BYTES = 1250  # 10,000 bits: 100 packets a second at the target


def probe(padding_bps: float = TARGET_BPS) -> Probe:
    return Probe(target_bps=TARGET_BPS, padding_bps=padding_bps, now=START, config=CONFIG)


def test_a_late_timer_catches_up_by_at_most_one_burst() -> None:
    running = probe()
    assert running.next_padding == START
    assert running.padding_due(START - 0.001) is None  # not yet
    # One second late: 51 chunks are due (39 chunks' worth with the warm-up's ramp,
    # ~97 kB), but one request carries at most max_padding_packets, and the debt left
    # is at most one more burst.
    datagram = 255 + PADDING_DATAGRAM_OVERHEAD
    burst = CONFIG.max_padding_packets
    assert running.padding_due(START + 1.0) == PaddingRequest(burst, 255)
    assert running.budget == burst * datagram
    assert running.next_padding == pytest.approx(START + 51 * CONFIG.probe_padding_interval)
    assert running.padding_due(START + 1.02) == PaddingRequest(burst, 255)
    assert running.budget <= burst * datagram


def test_the_schedule_ends_with_the_padding_and_small_rates_use_small_packets() -> None:
    running = probe()
    end = START + CONFIG.probe_duration
    chunks = 0
    while (deadline := running.next_padding) is not None:
        assert deadline < end
        running.padding_due(deadline)
        chunks += 1
    assert chunks == round(CONFIG.probe_duration / CONFIG.probe_padding_interval)
    assert running.padding_due(end) is None
    assert running.give_up_at == end + CONFIG.probe_feedback_timeout
    # Nothing to pad (the send rate already reaches the target): no schedule at all.
    assert probe(padding_bps=0.0).next_padding is None
    # 100 kbit/s is 250 bytes per 20 ms chunk: one datagram of 220 padding octets;
    # 10 kbit/s would be 25 bytes, below the smallest padding packet worth sending.
    assert probe(padding_bps=100_000).padding_octets == 250 - PADDING_DATAGRAM_OVERHEAD
    assert probe(padding_bps=10_000).padding_octets == CONFIG.min_padding_octets


def report(
    running: Probe,
    *,
    spacing: float = 0.010,
    arrival_spacing: float | None = None,
    lost_every: int = 0,
    until: float | None = None,
) -> None:
    """The probe's packets as feedback reports them: one every ``spacing`` from the
    start until ``until`` (default: the padding's end), arriving 50 ms later at
    ``arrival_spacing`` apart; every ``lost_every``-th reported lost."""
    end = until if until is not None else running.padding_ends
    arrival_spacing = spacing if arrival_spacing is None else arrival_spacing
    index = 0
    while (send := START + index * spacing) < end - 1e-9:
        lost = lost_every > 0 and index % lost_every == lost_every - 1
        arrival = None if lost else START + 0.050 + index * arrival_spacing
        running.observe(PacketResult(index, send, PACKET_BYTES, arrival))
        index += 1


def cover(running: Probe) -> None:
    """A packet sent after the padding ended is reported: feedback covered the probe."""
    running.observe(PacketResult(10_000, running.padding_ends, PACKET_BYTES, 99.0))


def test_a_probe_the_path_carries_succeeds_once_feedback_covers_it() -> None:
    running = probe()
    report(running)
    assert running.verdict(final=False) is None  # the padding's end not reported yet
    cover(running)
    assert running.verdict(final=False) is ProbeOutcome.SUCCEEDED
    # Measured on the packets sent after the warm-up only: 100 of them, 1 Mbit/s.
    assert running.measured_bps == pytest.approx(TARGET_BPS)
    assert running.reported == 150 and running.lost == 0


def test_a_probe_received_too_slowly_or_with_some_loss_fails() -> None:
    slow = probe()
    report(slow, arrival_spacing=0.0125)  # 800 kbit/s: under 90 % of the target
    cover(slow)
    assert slow.verdict(final=False) is ProbeOutcome.TOO_SLOW
    lossy = probe()
    report(lossy, lost_every=14)  # ~7 %: over probe_max_loss, under LOSS_HIGH
    assert lossy.verdict(final=False) is None  # not enough to fail it early
    cover(lossy)
    assert lossy.verdict(final=False) is ProbeOutcome.LOSS


def test_over_use_or_heavy_loss_fails_a_probe_before_it_is_covered() -> None:
    overused = probe()
    overused.overused = True
    assert overused.verdict(final=False) is ProbeOutcome.OVERUSE
    heavy = probe()
    report(heavy, lost_every=5, until=START + 0.19)  # 19 reported, 3 lost: too few to judge
    assert (heavy.reported, heavy.lost) == (19, 3)
    assert heavy.verdict(final=False) is None
    heavy.observe(PacketResult(19, START + 0.19, PACKET_BYTES, START + 0.24))  # 3 of 20
    assert heavy.verdict(final=False) is ProbeOutcome.LOSS


def test_a_loss_reported_again_as_received_is_taken_back() -> None:
    running = probe()
    running.observe(PacketResult(1, START + 0.6, PACKET_BYTES, None))
    assert (running.reported, running.lost) == (1, 1)
    running.observe(PacketResult(1, START + 0.6, PACKET_BYTES, START + 0.65, recovered=True))
    assert (running.reported, running.lost) == (1, 0)
    assert running.measured_bytes == PACKET_BYTES


def test_at_its_timeout_a_probe_is_judged_on_what_was_reported() -> None:
    silent = probe()
    assert silent.verdict(final=False) is None
    assert silent.verdict(final=True) is ProbeOutcome.NO_FEEDBACK
    warm_up_only = probe()
    report(warm_up_only, until=START + CONFIG.probe_warmup)  # 50 reported, none measured
    assert warm_up_only.verdict(final=True) is ProbeOutcome.NO_FEEDBACK
    partly = probe()
    report(partly, until=START + 0.6)  # 60 reported, 10 of them after the warm-up
    assert partly.verdict(final=False) is None
    assert partly.verdict(final=True) is ProbeOutcome.SUCCEEDED
