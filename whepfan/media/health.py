"""Receive delay, latency histograms, "falling behind" warnings.

A worker past its capacity does not lose packets at first: its socket queues them, and
the media its viewers get grows late while its event loop's timers still run on time.
``ReceiveDelay`` measures what matters, how long datagrams waited in the socket (kernel
receive timestamps), and ``warn_when_behind`` says so when it lasts; capacity stops
admitting viewers to such a worker. ``LatencyHistogram`` is the session setup latency.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("whepfan.health")

# Session setup (offer to SRTP keys: ICE + DTLS) is a few round trips; the buckets span a
# LAN join (tens of ms) to a lossy mobile one (seconds).
SETUP_LATENCY_BUCKETS: tuple[float, ...] = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class LatencyHistogram:
    """Cumulative histogram (Prometheus semantics: ``counts[i]`` observations <=
    ``buckets[i]``, the last entry is +Inf); plain lists so it crosses processes as JSON."""

    buckets: tuple[float, ...] = SETUP_LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(SETUP_LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for index, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[index] += 1
        self.counts[-1] += 1
        self.total += seconds
        self.count += 1

    def merge(self, other: LatencyHistogram) -> None:
        if other.buckets != self.buckets:
            raise ValueError("histograms with different buckets")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.count += other.count

    def to_json(self) -> dict[str, object]:
        return {"counts": list(self.counts), "total": self.total, "count": self.count}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LatencyHistogram:
        counts = data.get("counts")
        total, count = data.get("total"), data.get("count")
        if (
            not isinstance(counts, list)
            or len(counts) != len(SETUP_LATENCY_BUCKETS) + 1
            or not all(isinstance(c, int) for c in counts)
            or not isinstance(total, int | float)
            or not isinstance(count, int)
        ):
            raise ValueError("not a latency histogram")
        return cls(counts=list(counts), total=float(total), count=count)


class ReceiveDelay:
    """How long datagrams waited in a worker's socket before it read them: the sign that
    a worker is past its capacity. A saturated worker loses nothing at first: the kernel
    queues the publisher's packets and every viewer's delay grows instead (bench/capacity.py
    measured 11 % behind with zero loss, and an event loop whose timers still ran on time),
    so neither loss counters nor loop lateness show it; the age of what it reads does.

    The driver records the age of the first datagram of each read burst (the oldest one
    queued) with ``record(age)``; ``seconds()`` is the worst age over the last ``window``
    seconds of ``clock``, kept as one maximum per ``bucket`` seconds (bounded memory,
    however many records)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        window: float = 2.0,
        bucket: float = 0.25,
    ) -> None:
        if not 0 < bucket <= window:
            raise ValueError("0 < bucket <= window")
        self.clock = clock
        self.window = window
        self.bucket = bucket
        self._buckets: deque[tuple[int, float]] = deque()  # (bucket index, max age)
        self.worst = 0.0  # since start

    def record(self, age: float) -> None:
        now = self.clock()
        age = max(0.0, age)
        index = math.floor(now / self.bucket)
        if self._buckets and self._buckets[-1][0] == index:
            if age > self._buckets[-1][1]:
                self._buckets[-1] = (index, age)
        else:
            self._buckets.append((index, age))
        self._expire(now)
        self.worst = max(self.worst, age)

    def _expire(self, now: float) -> None:
        oldest = math.floor((now - self.window) / self.bucket) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()

    def seconds(self) -> float:
        self._expire(self.clock())
        return max((age for _, age in self._buckets), default=0.0)

    def sustained(self, threshold: float) -> float | None:
        """The least of the per-bucket maxima when every bucket of the whole window saw
        a datagram older than ``threshold`` (a lasting backlog, not one slow moment);
        None otherwise."""
        self._expire(self.clock())
        needed = round(self.window / self.bucket)
        if len(self._buckets) < needed:
            return None
        least = min(age for _, age in self._buckets)
        return least if least > threshold else None


RECEIVE_DELAY_WARNING = 0.1  # seconds queued, for a whole window: past capacity
RECEIVE_DELAY_CHECK = 0.5  # seconds between checks for the warning


async def warn_when_behind(
    delay: ReceiveDelay, *, worker: int, interval: float = RECEIVE_DELAY_CHECK
) -> None:
    """Until cancelled: log (at most once a minute) while ``delay`` shows a lasting
    backlog, so an operator without metrics still hears of it."""
    loop = asyncio.get_running_loop()
    warned_at = -math.inf
    while True:
        await asyncio.sleep(interval)
        now = loop.time()
        backlog = delay.sustained(RECEIVE_DELAY_WARNING)
        if backlog is not None and now - warned_at > 60:
            warned_at = now
            log.warning(
                "worker %d is falling behind: datagrams have waited %.0f ms or more in its "
                "socket for %.0f s; it carries more than its core can send (lower "
                "--worker-packet-budget, or add workers)",
                worker,
                backlog * 1000,
                delay.window,
            )
