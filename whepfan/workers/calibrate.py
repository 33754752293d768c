"""``whepfan calibrate``: this machine's CPU cost per sent packet, and the per-worker
packet budget that follows from it.

The measurement is ``_fastpath.measure_send_limit``: the compiled loop that SRTP-protects
one packet per destination and sends the batch with ``sendmmsg``, to UDP sockets on
loopback. That is the floor of what one viewer packet costs a worker (the fan-out adds
header rewriting and bookkeeping on top), so the budget is that rate times a headroom
(the issue's target is about 0.7 of the loopback limit). CPU time is the process's user +
system time, so the kernel's share of each send is counted.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from whepfan import _fastpath

DEFAULT_HEADROOM = 0.7
PROFILES = {
    "gcm": _fastpath.PROFILE_AEAD_AES_128_GCM,
    "cm": _fastpath.PROFILE_AES128_CM_SHA1_80,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    packets: int
    cpu_seconds: float
    wall_seconds: float
    packet_size: int
    headroom: float

    @property
    def cpu_seconds_per_packet(self) -> float:
        return self.cpu_seconds / self.packets

    @property
    def packets_per_cpu_second(self) -> float:
        return self.packets / self.cpu_seconds

    @property
    def worker_packet_budget(self) -> int:
        """Packets/s one worker (one core) should be allowed to carry."""
        return int(self.packets_per_cpu_second * self.headroom)

    def viewers_per_worker(self, packets_per_second_per_viewer: float) -> int:
        return int(self.worker_packet_budget // packets_per_second_per_viewer)


def calibrate(
    *,
    destinations: int = 200,
    packet_size: int = 1200,
    packets: int = 200_000,
    profile: str = "gcm",
    headroom: float = DEFAULT_HEADROOM,
) -> Calibration:
    """Send ``packets`` protected datagrams round-robin to ``destinations`` loopback
    sockets (which never read: the kernel drops what overflows, as a NIC queue would)."""
    if not 0 < headroom <= 1:
        raise ValueError("headroom is in (0, 1]")
    if destinations < 1 or packets < destinations:
        raise ValueError("at least one destination and one packet per destination")
    receivers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(destinations)]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for receiver in receivers:
            receiver.bind(("127.0.0.1", 0))
        sender.bind(("127.0.0.1", 0))
        sender.setblocking(False)
        addresses = [receiver.getsockname()[:2] for receiver in receivers]
        # measure_send_limit's ``packets`` counts rounds: one packet to every destination.
        rounds = packets // destinations
        # Warm caches and the cipher contexts before the measured run.
        _fastpath.measure_send_limit(
            sender.fileno(),
            addresses,
            profile=PROFILES[profile],
            packet_size=packet_size,
            packets=1,
        )
        # This thread's CPU time (user + system, the kernel's share of each send included):
        # `whepfan serve` calibrates at start-up, where other threads may be busy.
        cpu_start, wall_start = time.thread_time(), time.perf_counter()
        sent, _ = _fastpath.measure_send_limit(
            sender.fileno(),
            addresses,
            profile=PROFILES[profile],
            packet_size=packet_size,
            packets=rounds,
        )
        cpu, wall = time.thread_time() - cpu_start, time.perf_counter() - wall_start
    finally:
        sender.close()
        for receiver in receivers:
            receiver.close()
    if sent <= 0 or cpu <= 0:
        raise RuntimeError("the send loop sent nothing; is loopback UDP available?")
    return Calibration(
        packets=sent,
        cpu_seconds=cpu,
        wall_seconds=wall,
        packet_size=packet_size,
        headroom=headroom,
    )


def report(result: Calibration, *, viewer_packets_per_second: float = 190.0) -> str:
    return "\n".join(
        [
            f"sent {result.packets} packets of {result.packet_size} bytes in "
            f"{result.cpu_seconds:.3f} CPU s ({result.wall_seconds:.3f} s wall)",
            f"cost per packet: {result.cpu_seconds_per_packet * 1e6:.2f} CPU µs "
            f"({result.packets_per_cpu_second:,.0f} packets per CPU second)",
            f"worker packet budget at {result.headroom:.0%}: {result.worker_packet_budget}",
            f"  = about {result.viewers_per_worker(viewer_packets_per_second)} viewers per "
            f"worker at {viewer_packets_per_second:.0f} packets/s each",
            f"use: whepfan serve --worker-packet-budget {result.worker_packet_budget}",
        ]
    )
