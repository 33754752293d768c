"""Transport feedback matched to the send log (media/packet_results.py), on hand-made feedback.

Each feedback packet goes through the wire format and back (``TransportFeedback``
serialize/parse), as the viewer's would; the send log is a list like the one
``Fanout.transport_sent`` returns.
"""

from __future__ import annotations

import pytest

from whepfan.media.packet_results import FeedbackMatcher
from whepfan.protocol.rtcp import TWCC_REFERENCE_MOD, TWCC_REFERENCE_TICK, TransportFeedback

REFERENCE_WRAP_SECONDS = TWCC_REFERENCE_MOD * TWCC_REFERENCE_TICK  # 2^24 * 64 ms


def feedback_for(
    base: int, arrivals: list[float | None], *, reference_offset: float = 0.0
) -> TransportFeedback:
    """Feedback as the viewer sends it, through the wire format and back."""
    packet = TransportFeedback.from_arrivals(
        sender_ssrc=1,
        media_ssrc=2,
        base_sequence=base,
        feedback_count=0,
        arrivals=[None if a is None else a + reference_offset for a in arrivals],
    )
    return TransportFeedback.parse(packet.serialize())


def sent_log(count: int, *, start: float = 10.0) -> list[tuple[float, int] | None]:
    return [(start + i * 0.001, 1000 + i) for i in range(count)]


def test_matcher_unwraps_sequence_numbers_across_the_16_bit_wrap() -> None:
    matcher = FeedbackMatcher()
    first = matcher.match(feedback_for(0xFFFE, [1.0, 1.001, 1.002, 1.003]), sent_log(4))
    assert [p.sequence for p in first] == [0xFFFE, 0xFFFF, 0x10000, 0x10001]
    assert [p.size for p in first] == [1000, 1001, 1002, 1003]
    assert [p.arrival for p in first] == pytest.approx([1.0, 1.001, 1.002, 1.003])
    later = matcher.match(feedback_for(2, [1.004]), sent_log(1))
    assert [p.sequence for p in later] == [0x10002]


def test_matcher_counts_a_packet_reported_twice_once() -> None:
    matcher = FeedbackMatcher()
    feedback = feedback_for(100, [1.0, None, 1.002])
    assert len(matcher.match(feedback, sent_log(3))) == 3
    assert matcher.match(feedback, sent_log(3)) == []
    assert matcher.duplicates == 3
    # Overlapping feedback: 101 was reported lost and now arrived; 102 is old news.
    overlapping = matcher.match(feedback_for(101, [1.003, 1.002, 1.004]), sent_log(3))
    assert [(p.sequence, p.recovered) for p in overlapping] == [(101, True), (103, False)]


def test_matcher_takes_feedback_out_of_order() -> None:
    matcher = FeedbackMatcher()
    newer = matcher.match(feedback_for(120, [1.020, 1.021]), sent_log(2))
    older = matcher.match(feedback_for(110, [1.010, 1.011]), sent_log(2))
    assert [p.sequence for p in newer + older] == [120, 121, 110, 111]
    assert older[0].arrival == pytest.approx(1.010)


def test_matcher_unwraps_the_24_bit_reference_time() -> None:
    matcher = FeedbackMatcher()
    # 50 ms before the wrap, then 14 ms after it: the arrivals stay 64 ms apart.
    before = matcher.match(feedback_for(0, [REFERENCE_WRAP_SECONDS - 0.050]), sent_log(1))
    after = matcher.match(feedback_for(1, [0.014]), sent_log(1))
    assert before[0].arrival is not None and after[0].arrival is not None
    assert after[0].arrival - before[0].arrival == pytest.approx(0.064)
    # parse() reads the reference as signed 24 bits: a negative one is the same time.
    signed = TransportFeedback(
        sender_ssrc=1,
        media_ssrc=2,
        base_sequence=2,
        reference_time=-1,
        feedback_count=0,
        deltas=[4],
    )
    (third,) = matcher.match(signed, sent_log(1))
    assert third.arrival is not None
    assert third.arrival - before[0].arrival == pytest.approx(
        (TWCC_REFERENCE_MOD - 1) * TWCC_REFERENCE_TICK + 0.001 - (REFERENCE_WRAP_SECONDS - 0.050)
    )


def test_matcher_skips_packets_the_send_log_no_longer_has() -> None:
    matcher = FeedbackMatcher()
    results = matcher.match(feedback_for(7, [1.0, 1.001, 1.002]), [None, (5.0, 800)])
    assert [(p.sequence, p.send_time, p.size) for p in results] == [(8, 5.0, 800)]
    assert matcher.unknown == 2


def test_matcher_skips_numbers_older_than_its_history() -> None:
    """A report of a number more than 2^14 behind the newest is not matched (its ring
    slot may hold a newer number's state): neither a result nor an unknown entry."""
    matcher = FeedbackMatcher()
    matcher.match(feedback_for(0, [1.0]), sent_log(1))
    assert [p.sequence for p in matcher.match(feedback_for(20_000, [2.0]), sent_log(1))] == [20_000]
    assert matcher.match(feedback_for(3_000, [1.5]), sent_log(1)) == []  # 17,000 behind
    assert [p.sequence for p in matcher.match(feedback_for(4_000, [1.6]), sent_log(1))] == [4_000]
    assert matcher.unknown == 0
