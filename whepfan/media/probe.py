"""A headroom probe: padding up to a target rate, and whether the path carried it.

An SFU forwards discrete simulcast layers: it cannot nudge an encoder up a few percent
to see whether the path takes it, so a receive-side estimate never shows room for the
next layer. A probe does: padding (RTX padding packets from ``Fanout.send_padding``)
tops the viewer's send rate up to a target for ``probe_duration`` seconds, in chunks on
a fixed grid, rising over a warm-up; the transport feedback on the probe's packets
(``PacketResult``) then says whether the path carried it: no over-use, little loss, and
packets sent after the warm-up arrived at >= ``probe_success_ratio`` of the target.

``Probe`` is one probe's state: its schedule (``next_padding``, ``padding_due``), what
feedback said about its packets (``observe``) and its ``verdict``. The viewer's
estimator (bandwidth.py ``ViewerBandwidth``) starts it, feeds it and acts on the
verdict; media/headroom.py decides when to probe. Sans-IO: times are seconds on the
sender's clock, arrival times on the viewer's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from whepfan.media.loss_control import LOSS_HIGH, LOSS_MIN_PACKETS
from whepfan.media.packet_results import PacketResult

# A padding packet's datagram beyond its padding octets: RTP header (12), the
# transport-wide sequence number's extension block (8), the SRTP tag of
# AES_CM_128_HMAC_SHA1_80 (10; GCM's 16 makes a probe ~2 % heavier than planned). Only
# the plan uses it: rates are measured from the send log's real sizes.
PADDING_DATAGRAM_OVERHEAD = 12 + 8 + 10


@dataclass(frozen=True, slots=True)
class PaddingRequest:
    """Padding for the driver to send now: ``Fanout.send_padding(viewer, track, count,
    size)`` with these (``size``: padding octets per packet, 1..255; each datagram is
    about ``size + PADDING_DATAGRAM_OVERHEAD`` bytes)."""

    count: int
    size: int


class ProbeOutcome(enum.Enum):
    """How a probe ended; every outcome but SUCCEEDED means "the target does not fit"."""

    SUCCEEDED = "succeeded"
    OVERUSE = "overuse"  # the delay-based detector saw a queue build
    LOSS = "loss"  # more than probe_max_loss of the probe's packets were lost
    TOO_SLOW = "too-slow"  # received at less than probe_success_ratio of the target
    NO_FEEDBACK = "no-feedback"  # too few of the probe's packets were reported


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """A finished probe: its target, how it ended, and what was measured."""

    target_bps: float
    outcome: ProbeOutcome
    measured_bps: float | None  # receive rate of the packets sent after the warm-up
    loss_fraction: float | None  # of the probe's reported packets
    finished_at: float

    @property
    def succeeded(self) -> bool:
        return self.outcome is ProbeOutcome.SUCCEEDED


class ProbeSettings(Protocol):
    """The tunables a probe reads (bandwidth.py ``BandwidthConfig`` has them, documented)."""

    @property
    def probe_duration(self) -> float: ...
    @property
    def probe_warmup(self) -> float: ...
    @property
    def probe_padding_interval(self) -> float: ...
    @property
    def probe_success_ratio(self) -> float: ...
    @property
    def probe_max_loss(self) -> float: ...
    @property
    def probe_feedback_timeout(self) -> float: ...
    @property
    def max_padding_packets(self) -> int: ...
    @property
    def max_padding_octets(self) -> int: ...
    @property
    def min_padding_octets(self) -> int: ...


class Probe:
    """One running probe: its padding schedule, what the feedback said about its packets,
    and its verdict."""

    def __init__(
        self, *, target_bps: float, padding_bps: float, now: float, config: ProbeSettings
    ) -> None:
        self.target_bps = target_bps
        self.padding_bps = padding_bps
        self.started_at = now
        self.warmup = config.probe_warmup
        self.measure_from = now + config.probe_warmup
        self.padding_ends = now + config.probe_duration
        self.give_up_at = self.padding_ends + config.probe_feedback_timeout
        # Padding chunks on a fixed grid from the start, each carrying one interval's
        # bytes; a late timer catches up in the next chunk (up to one burst).
        self.interval = config.probe_padding_interval
        self.chunk_count = max(round(config.probe_duration / self.interval), 1)
        self.chunks_due = 0 if padding_bps > 0 else self.chunk_count
        self.budget = 0.0  # bytes owed
        per_interval = padding_bps / 8 * config.probe_padding_interval
        self.padding_octets = int(
            min(
                max(per_interval - PADDING_DATAGRAM_OVERHEAD, config.min_padding_octets),
                config.max_padding_octets,
            )
        )
        self.datagram_size = self.padding_octets + PADDING_DATAGRAM_OVERHEAD
        self.max_packets = config.max_padding_packets
        self.success_ratio = config.probe_success_ratio
        self.max_loss = config.probe_max_loss
        self.reported = 0
        self.lost = 0
        self.overused = False
        self.covered = False  # feedback reported a packet sent after the padding ended
        # Receive rate of the measured packets: their bytes after the first to arrive,
        # over the spread of their arrivals (n packets, n - 1 gaps).
        self.measured_bytes = 0
        self.first_arrival: tuple[float, int] | None = None
        self.last_arrival: float | None = None

    def ramp(self, chunk: int) -> float:
        """The share of the padding rate chunk ``chunk`` carries: rising linearly over
        the warm-up, then all of it."""
        elapsed = (chunk + 1) * self.interval
        return min(elapsed / self.warmup, 1.0) if self.warmup > 0 else 1.0

    @property
    def next_padding(self) -> float | None:
        if self.chunks_due >= self.chunk_count:
            return None
        return self.started_at + self.chunks_due * self.interval

    def padding_due(self, now: float) -> PaddingRequest | None:
        """The padding of the chunks whose time has come by ``now`` (the one at
        ``next_padding``, and any a late timer missed); None before ``next_padding``,
        after the last chunk, or when the bytes owed do not make a packet yet."""
        next_padding = self.next_padding
        if next_padding is None or now < next_padding:
            return None
        due = min(int((now - self.started_at) / self.interval) + 1, self.chunk_count)
        due = max(due, self.chunks_due + 1)
        for chunk in range(self.chunks_due, due):
            self.budget += self.padding_bps / 8 * self.interval * self.ramp(chunk)
        self.chunks_due = due
        datagram = self.datagram_size
        count = min(int(self.budget // datagram), self.max_packets)
        self.budget -= count * datagram
        # A chunk that could not carry the whole budget leaves the rest for the next;
        # the debt never grows past one burst, so a late timer does not cause a flood.
        self.budget = min(self.budget, float(datagram * self.max_packets))
        return PaddingRequest(count, self.padding_octets) if count > 0 else None

    def observe(self, packet: PacketResult) -> None:
        if packet.send_time >= self.padding_ends:
            self.covered = True
            return
        if packet.send_time < self.started_at:
            return
        if packet.recovered:
            self.lost = max(self.lost - 1, 0)
        else:
            self.reported += 1
        if packet.arrival is None:
            self.lost += 1
            return
        if packet.send_time < self.measure_from:
            return
        arrival = packet.arrival
        self.measured_bytes += packet.size
        if self.first_arrival is None or arrival < self.first_arrival[0]:
            self.first_arrival = (arrival, packet.size)
        if self.last_arrival is None or arrival > self.last_arrival:
            self.last_arrival = arrival

    @property
    def loss_fraction(self) -> float | None:
        return self.lost / self.reported if self.reported else None

    @property
    def measured_bps(self) -> float | None:
        if self.first_arrival is None or self.last_arrival is None:
            return None
        spread = self.last_arrival - self.first_arrival[0]
        if spread <= 0:
            return None
        return (self.measured_bytes - self.first_arrival[1]) * 8 / spread

    def verdict(self, *, final: bool) -> ProbeOutcome | None:
        """How the probe ends now, or None while it goes on. Over-use or heavy loss
        fail it as soon as they show (stop loading the path); once feedback has covered
        all its packets, or at ``give_up_at`` (``final``), it passes or fails on what
        was reported."""
        loss = self.loss_fraction
        if self.overused:
            return ProbeOutcome.OVERUSE
        if loss is not None and self.reported >= LOSS_MIN_PACKETS and loss > LOSS_HIGH:
            return ProbeOutcome.LOSS
        if not (self.covered or final):
            return None
        measured = self.measured_bps
        if measured is None or self.reported < LOSS_MIN_PACKETS:
            return ProbeOutcome.NO_FEEDBACK
        if loss is not None and loss > self.max_loss:
            return ProbeOutcome.LOSS
        if measured < self.success_ratio * self.target_bps:
            return ProbeOutcome.TOO_SLOW
        return ProbeOutcome.SUCCEEDED
