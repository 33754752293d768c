"""Transport-wide congestion control feedback to publishers.

draft-holmer-rmcat-transport-wide-cc-extensions-01: a WHIP publisher that negotiated the
transport-wide sequence number extension (§2) puts one 16-bit counter on every RTP
packet of its transport (media, RTX, probing padding), and expects RTCP transport
feedback (§3.1) saying when each arrived. From those times its delay-based estimator
(GoogCC in Chromium) sees queues build before loss, and its probes (padding bursts at
3x and 6x its start rate) are measured at once. Behind a 4 Mbit/s link (tests/browser/
test_shaped_links.py) Chromium encoded all three simulcast layers 1.2 s after
connecting with this feedback, against about 7 s on RR loss and REMB alone.

``ArrivalFeedback`` is sans-IO, one per publisher transport: ``record`` each arrival
with ``now``, ``poll`` at ``deadline()`` for the feedback packets to send. Like
libwebrtc's receive-side proxy it reports every ``interval`` (100 ms), covers each
sequence number once, in order, and starts a new packet where one would grow past
``max_packets`` entries or a receive delta would not fit 16 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from whepfan.protocol.rtcp import TWCC_DELTA_TICK, TransportFeedback

# libwebrtc's default feedback interval (RemoteEstimatorProxy, 100 ms; it adapts it to
# 5 % of the bitrate between 50 and 250 ms, which at these rates stays near 100 ms).
FEEDBACK_INTERVAL = 0.100
# Entries per feedback packet: at most ~2 bytes each plus chunks, so a packet stays well
# inside one datagram (about 1 kB) even when every delta is a large one.
MAX_PACKETS_PER_FEEDBACK = 400
# A sequence number further than this from the newest is a new epoch (a restarted
# sender), not a late packet: recording starts again from it.
_RESTART_DISTANCE = 0x4000
_SEQ_MOD = 1 << 16
_LARGEST_DELTA = 0x7FFF * TWCC_DELTA_TICK


@dataclass(frozen=True, slots=True)
class FeedbackStats:
    recorded: int
    late: int  # arrived after the feedback covering it (reported lost) went out
    duplicates: int
    feedback_sent: int


class ArrivalFeedback:
    """Arrival times by transport-wide sequence number, and the feedback packets that
    report them (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1)."""

    def __init__(
        self,
        *,
        sender_ssrc: int,
        media_ssrc: int = 0,
        interval: float = FEEDBACK_INTERVAL,
        max_packets: int = MAX_PACKETS_PER_FEEDBACK,
    ) -> None:
        self.sender_ssrc = sender_ssrc
        # Must be one of the sender's media SSRCs: libwebrtc ignores feedback naming
        # another (the caller sets it as media packets arrive).
        self.media_ssrc = media_ssrc
        self.interval = interval
        self.max_packets = max_packets
        self._arrivals: dict[int, float] = {}  # unwrapped sequence -> arrival, unreported
        self._next: int | None = None  # first unwrapped sequence not yet reported
        self._highest: int | None = None
        self._due: float | None = None
        self._feedback_count = 0
        self._recorded = self._late = self._duplicates = self._sent = 0

    @property
    def stats(self) -> FeedbackStats:
        return FeedbackStats(self._recorded, self._late, self._duplicates, self._sent)

    def record(self, sequence: int, now: float) -> None:
        """A packet with transport-wide sequence number ``sequence`` arrived at ``now``."""
        highest = self._highest
        if highest is None:
            unwrapped = sequence & 0xFFFF
        else:
            # The unwrapped number nearest the newest one (RFC 3550 A.1 style).
            distance = (sequence - highest) % _SEQ_MOD
            if distance >= _SEQ_MOD // 2:
                distance -= _SEQ_MOD
            unwrapped = highest + distance
            if abs(distance) > _RESTART_DISTANCE:
                self._arrivals.clear()
                self._next = highest = None
        if self._next is None:
            self._next = unwrapped
        elif unwrapped < self._next:
            self._late += 1
            return
        if unwrapped in self._arrivals:
            self._duplicates += 1
            return
        self._arrivals[unwrapped] = now
        self._recorded += 1
        if highest is None or unwrapped > highest:
            self._highest = unwrapped
        if self._due is None:
            self._due = now + self.interval

    def deadline(self) -> float | None:
        """When ``poll`` has feedback to send (None: nothing recorded since the last)."""
        return self._due if self._arrivals else None

    def poll(self, now: float) -> list[TransportFeedback]:
        """The feedback packets due at ``now``: every sequence number from the first
        unreported to the newest, in order, received or not."""
        if self._due is None or now < self._due or not self._arrivals:
            return []
        assert self._next is not None and self._highest is not None
        # Keep the cadence when the timer fires late, but never send two at once.
        self._due = max(self._due + self.interval, now + self.interval / 2)
        packets: list[TransportFeedback] = []
        base = self._next
        while base <= self._highest:
            arrivals = self._piece(base)
            packets.append(
                TransportFeedback.from_arrivals(
                    sender_ssrc=self.sender_ssrc,
                    media_ssrc=self.media_ssrc,
                    base_sequence=base,
                    feedback_count=self._feedback_count,
                    arrivals=arrivals,
                )
            )
            self._feedback_count = (self._feedback_count + 1) & 0xFF
            base += len(arrivals)
        self._arrivals.clear()
        self._next = self._highest + 1
        self._sent += len(packets)
        return packets

    def _piece(self, base: int) -> Sequence[float | None]:
        """Arrivals from ``base`` for one packet: up to ``max_packets`` entries, ending
        at a received packet (the newest is one) and before a receive delta too large
        for 16 bits. A run of losses longer than a packet is reported as lost in pieces
        that each end at the first arrival after it."""
        assert self._highest is not None
        arrivals: list[float | None] = []
        previous: float | None = None
        last_received = -1
        sequence = base
        while sequence <= self._highest:
            arrival = self._arrivals.get(sequence)
            if arrival is not None:
                # One tick of margin for the rounding of each end.
                if (
                    previous is not None
                    and abs(arrival - previous) > _LARGEST_DELTA - TWCC_DELTA_TICK
                ):
                    break
                previous = arrival
                last_received = len(arrivals)
            arrivals.append(arrival)
            sequence += 1
            if len(arrivals) >= self.max_packets and last_received >= 0:
                break
        return arrivals[: last_received + 1]
