"""Deadlines heap; keys are (kind, name) tuples.

One media worker arms one asyncio timer (transport.py); everything with a deadline on
the worker (each session's ICE/DTLS timer, each stream's publisher feedback, deferred
keyframe request and due upstream NACKs) is an entry here. Rescheduling a key replaces its deadline:
the superseded heap entry stays until it surfaces and is skipped as stale, so scheduling
costs O(log n) and nothing is searched.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable, Iterator


class TimerKind(enum.Enum):
    SESSION = "session"  # MediaSession.get_timer(): ICE consent, DTLS retransmission
    PUBLISHER_FEEDBACK = "publisher-feedback"  # the stream's periodic RR + REMB
    TRANSPORT_FEEDBACK = "transport-feedback"  # transport-wide cc feedback (media/twcc.py)
    KEYFRAME_RETRY = "keyframe-retry"  # a throttled keyframe request that is still owed
    MEDIA_TIMEOUT = "media-timeout"  # a publisher's media stopped? (liveness.py)
    NACK = "nack"  # NACKs due to the stream's publisher (nack.py)
    HEADROOM_PROBE = "headroom-probe"  # a viewer's probe padding (headroom.py)


TimerKey = tuple[TimerKind, str]


class Timers:
    """Deadlines by key, earliest first. ``wake`` is called when a deadline earlier than
    every other is scheduled, so the I/O driver re-arms its single timer (signalling
    calls create sessions outside datagram input)."""

    def __init__(self, wake: Callable[[], None] = lambda: None) -> None:
        self._wake = wake
        self._heap: list[tuple[float, int, TimerKey]] = []
        self._deadlines: dict[TimerKey, float] = {}
        self._sequence = 0

    def schedule(self, key: TimerKey, deadline: float | None) -> None:
        """Set (or, with None, cancel) the deadline of ``key``."""
        if deadline is None:
            self._deadlines.pop(key, None)
            return
        if self._deadlines.get(key) == deadline:
            return
        self._deadlines[key] = deadline
        self._sequence += 1
        earliest = not self._heap or deadline < self._heap[0][0]
        heapq.heappush(self._heap, (deadline, self._sequence, key))
        if earliest:
            self._wake()

    def cancel(self, key: TimerKey) -> None:
        self._deadlines.pop(key, None)

    def deadline(self, key: TimerKey) -> float | None:
        return self._deadlines.get(key)

    def next_deadline(self) -> float | None:
        """The earliest live deadline (stale heap entries are dropped on the way)."""
        heap = self._heap
        while heap:
            deadline, _, key = heap[0]
            if self._deadlines.get(key) == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def due(self, now: float) -> Iterator[TimerKey]:
        """Each key whose deadline is at or before ``now``, earliest first; a key is
        unscheduled as it is yielded (its handler may schedule it again)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            if self._deadlines.get(key) != deadline:
                continue
            del self._deadlines[key]
            yield key
