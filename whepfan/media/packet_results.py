"""Which sent packets a viewer's transport feedback reports, once each (transport-wide cc).

A viewer that negotiated transport-wide cc answers about every 100 ms with RTCP
transport feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1): for a run
of 16-bit transport-wide sequence numbers, which arrived and when, on the viewer's
clock. ``FeedbackMatcher`` joins each report with the Fanout's send log entry of that
number (send time, datagram size) into one ``PacketResult`` per packet: numbers and the
24-bit reference time unwrapped, duplicates and overlapping feedback counted once, a
packet reported lost and later received marked ``recovered``. Memory is a fixed ring of
``_HISTORY`` entries; work per feedback is linear in the packets it reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from whepfan.protocol.rtcp import TWCC_DELTA_TICK, TWCC_REFERENCE_MOD, TransportFeedback

_SEQ_MOD = 1 << 16
# §3.1: the reference time is a 24-bit count of 64 ms; deltas are 250 µs ticks, so one
# reference unit is 256 ticks and all arrival arithmetic stays in exact integers.
_TICKS_PER_REFERENCE = 256
# How many recent sequence numbers remember whether they were reported: enough for
# several seconds at any rate one viewer receives (2^14 packets ~ 20 s at 8 Mbit/s), and
# well inside the 2^15 a 16-bit number can be unwrapped over.
_HISTORY = 1 << 14
_UNKNOWN, _REPORTED_LOST, _REPORTED_RECEIVED = 0, 1, 2


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
