"""Receive statistics of what a worker ingests: per-SSRC RTCP receiver statistics
(RFC 3550 §6.4.1, A.3, A.8) for our RRs, and per-track layer meters (bits, packets and
pictures per second) for layer ordering, the layers event and capacity accounting."""

from __future__ import annotations

import math
from dataclasses import dataclass

from whepfan.protocol import rtcp

RTP_SEQ_MOD = 1 << 16


@dataclass(eq=False, kw_only=True)
class IngestReceiveStats:
    """Receiver-side statistics of one publisher SSRC, for our RRs (RFC 3550 §6.4.1, A.3, A.8)."""

    ssrc: int
    clock_rate: int
    base_seq: int | None = None
    max_seq: int = 0
    cycles: int = 0
    received: int = 0
    expected_prior: int = 0
    received_prior: int = 0
    jitter: float = 0.0
    last_transit: float | None = None
    last_sr_ntp_middle: int = 0
    last_sr_arrival: float | None = None

    def update(self, seq: int, rtp_timestamp: int, now: float) -> None:
        if self.base_seq is None:
            self.base_seq = self.max_seq = seq
        else:
            delta = (seq - self.max_seq) % RTP_SEQ_MOD
            if 0 < delta < RTP_SEQ_MOD // 2:
                if seq < self.max_seq:
                    self.cycles += RTP_SEQ_MOD  # RFC 3550 A.1: sequence number wrapped
                self.max_seq = seq
        self.received += 1
        # Interarrival jitter, RFC 3550 §6.4.1 / A.8, in timestamp units.
        transit = now * self.clock_rate - rtp_timestamp
        if self.last_transit is not None:
            d = abs(transit - self.last_transit)
            if d < self.clock_rate * 10:  # ignore jumps across a timestamp rebase
                self.jitter += (d - self.jitter) / 16
        self.last_transit = transit

    def report_block(self, now: float) -> rtcp.ReportBlock:
        assert self.base_seq is not None
        extended_max = self.cycles + self.max_seq
        expected = extended_max - self.base_seq + 1
        lost = max(0, expected - self.received)
        expected_interval = expected - self.expected_prior
        received_interval = self.received - self.received_prior
        self.expected_prior, self.received_prior = expected, self.received
        lost_interval = expected_interval - received_interval
        fraction = (
            0
            if expected_interval <= 0 or lost_interval <= 0
            else ((lost_interval << 8) // expected_interval)
        )
        dlsr = 0
        if self.last_sr_arrival is not None:
            # Units of 1/65536 s, a 32-bit field (RFC 3550 §6.4.1). The SR's arrival time is
            # the kernel's receive stamp and ``now`` the timer's: never let the difference
            # go negative (or past the field) and break the whole report.
            dlsr = min(max(int((now - self.last_sr_arrival) * 65536), 0), 0xFFFFFFFF)
        return rtcp.ReportBlock(
            ssrc=self.ssrc,
            fraction_lost=min(fraction, 255),
            cumulative_lost=min(lost, 0x7FFFFF),
            highest_sequence=extended_max & 0xFFFFFFFF,
            jitter=min(int(self.jitter), 0xFFFFFFFF),  # 32-bit field (§6.4.1)
            last_sender_report=self.last_sr_ntp_middle,
            delay_since_last_sender_report=dlsr,
        )


@dataclass(eq=False, kw_only=True)
class LayerMeter:
    """Measured rates of one ingest track over fixed windows (RFC 3550 §6.4.1 counts the
    same octets: payload only). A track that went quiet reads as zero."""

    window: float = 1.0
    window_start: float | None = None
    octets: int = 0
    packets: int = 0
    frames: int = 0
    last_timestamp: int | None = None
    last_packet_at: float = -math.inf
    bitrate: float = 0.0  # bits/s
    packet_rate: float = 0.0  # packets/s
    frame_rate: float = 0.0  # pictures/s: distinct RTP timestamps (RFC 3550 §5.1)

    def add(self, payload_octets: int, timestamp: int, now: float) -> None:
        if self.window_start is None:
            self.window_start = now
        elapsed = now - self.window_start
        if elapsed >= self.window:
            self.bitrate = self.octets * 8 / elapsed
            self.packet_rate = self.packets / elapsed
            self.frame_rate = self.frames / elapsed
            self.window_start = now
            self.octets = self.packets = self.frames = 0
        self.octets += payload_octets
        self.packets += 1
        if timestamp != self.last_timestamp:
            self.frames += 1
            self.last_timestamp = timestamp
        self.last_packet_at = now

    def flowing(self, now: float) -> bool:
        return now - self.last_packet_at <= 2 * self.window

    def rates(self, now: float) -> tuple[float, float, float]:
        """(bits/s, packets/s, frames/s), zero once the track has been silent a while."""
        if not self.flowing(now):
            return 0.0, 0.0, 0.0
        return self.bitrate, self.packet_rate, self.frame_rate
