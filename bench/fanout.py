"""Fan-out benchmark (issue 2): how many SRTP datagrams per CPU-second whepfan's compiled
``Fanout.push`` delivers to N viewers, against two contenders measured in the same run:

- the limit: ``measure_send_limit``, a bare C loop of the same crypto + ``sendmmsg`` to the
  same sockets with none of the fan-out's per-viewer work;
- the baseline: a plain Python loop calling pylibsrtp ``Session.protect`` + ``sendto`` per
  viewer: a generous stand-in for a server without a compiled core.

Viewers are real UDP sockets on 127.0.0.1 in a separate process (bench/_receivers.py);
rates count what arrived there, divided by the CPU seconds (user + system, so the kernel's
loopback delivery is included) of this, the sending process. Every figure is the median of
``--runs`` runs; ratios are taken within a run, then the median of the ratios is reported.

    python bench/fanout.py                 # full: 1/100/1,000/5,000 viewers, GCM and CM
    python bench/fanout.py --smoke         # 10 and 100 viewers, a few packets (< 20 s)
    python bench/fanout.py --json out.json # also write every run's figures as JSON
    python bench/fanout.py --transport-cc add --viewers 1000   # transport-cc on for all

See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from pylibsrtp import Policy, Session

from whepfan import _fastpath
from whepfan._fastpath import (
    PROFILE_AEAD_AES_128_GCM,
    PROFILE_AES128_CM_SHA1_80,
    Fanout,
    SrtpSession,
    measure_send_limit,
    profile_key_lengths,
)

# bench/ holds scripts, not a package: make the helper beside this file importable, at the
# end of the path so nothing in bench/ can shadow another module.
BENCH_DIRECTORY = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIRECTORY not in sys.path:
    sys.path.append(BENCH_DIRECTORY)
from _receivers import LOOPBACK, ReceiverPool, raise_open_file_limit  # noqa: E402

PROFILES = {"GCM": PROFILE_AEAD_AES_128_GCM, "CM": PROFILE_AES128_CM_SHA1_80}
LIBSRTP_PROFILES = {
    PROFILE_AEAD_AES_128_GCM: Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    PROFILE_AES128_CM_SHA1_80: Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
}
# Bytes SRTP appends to an RTP packet: the GCM tag (RFC 7714 §14.2) or the 80-bit
# HMAC-SHA1 tag (RFC 3711 §4.2); neither profile uses an MKI.
SRTP_TRAILER = {PROFILE_AEAD_AES_128_GCM: 16, PROFILE_AES128_CM_SHA1_80: 10}
PACKET_SIZE = 1200
VIDEO_PAYLOAD_TYPE = 96
AUDIO_PAYLOAD_TYPE = 111
PUBLISHER_SSRC = 0x1234_5678
VIDEO_CLOCK_STEP = 3000  # 90 kHz clock at 30 frames/s (RFC 3551 §5)
SEND_BUFFER = 4 << 20
SIMULCAST_LAYERS = 3  # the simulcast case: Chromium's usual q/h/f encodings
TRANSPORT_CC_MODES = ("off", "rewrite", "add")
TRANSPORT_CC_ID = 3  # Chromium's a=extmap id for transport-wide-cc-01, publisher and viewer
TRANSPORT_CC_ADDED = 8  # a new one-byte block: 4 octets of header, 3 of element, 1 pad
FIXED_DESCRIPTORS = 64  # stdio, pipes, the sender socket, epoll: kept free below the limit

# Targets from issue 2, reported against and never asserted.
TARGET_VIEWERS = 1000
TARGET_LIMIT_RATIO = 0.8
TARGET_BASELINE_RATIO = 20.0
TARGET_BYTES_PER_VIEWER = 16 * 1024


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How much to send. Each contender sends ``pushes`` packets to every viewer, where
    ``pushes = max(min_pushes, datagrams / viewers)``: enough work for a stable rate at
    few viewers and enough pushes for a p99 at many."""

    viewer_counts: tuple[int, ...]
    profiles: tuple[str, ...]
    runs: int
    datagrams: int
    min_pushes: int
    baseline_datagrams: int
    min_baseline_pushes: int
    # Fanout.set_transport_cc on every viewer of the compiled contenders: "off"; "rewrite"
    # (the publisher's packets carry their own transport-wide number, as Chromium's do:
    # rewritten in place); "add" (they carry none, as whepfan publish's and FFmpeg's: a
    # one-word block is added to every datagram).
    transport_cc: str = "off"

    def pushes(self, viewers: int) -> int:
        return max(self.min_pushes, math.ceil(self.datagrams / viewers))

    def baseline_pushes(self, viewers: int) -> int:
        return max(self.min_baseline_pushes, math.ceil(self.baseline_datagrams / viewers))


FULL_PLAN = Plan(
    viewer_counts=(1, 100, 1000, 5000),
    profiles=("GCM", "CM"),
    runs=3,
    datagrams=300_000,
    min_pushes=200,
    baseline_datagrams=60_000,
    min_baseline_pushes=10,
)
SMOKE_PLAN = Plan(
    viewer_counts=(10, 100),
    profiles=("GCM", "CM"),
    runs=1,
    datagrams=20_000,
    min_pushes=100,
    baseline_datagrams=5_000,
    min_baseline_pushes=5,
)


# --- one contender's measurement ----------------------------------------------------------


@dataclass
class Throughput:
    """Datagrams one contender handed to the kernel and the receivers counted, with the
    sending process's CPU and wall seconds spent in the send rounds only."""

    sent: int = 0
    delivered: int = 0
    delivered_octets: int = 0
    cpu_seconds: float = 0.0
    system_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def per_cpu_second(self) -> float:
        return self.delivered / self.cpu_seconds if self.cpu_seconds > 0 else 0.0

    @property
    def per_wall_second(self) -> float:
        return self.delivered / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def kernel_ns_per_datagram(self) -> float:
        """System CPU (the send syscalls and loopback delivery) per delivered datagram."""
        return 1e9 * self.system_seconds / self.delivered if self.delivered else 0.0

    @property
    def user_ns_per_datagram(self) -> float:
        """User-space CPU (rewrite, SRTP, the Python around it) per delivered datagram."""
        user_seconds = max(0.0, self.cpu_seconds - self.system_seconds)
        return 1e9 * user_seconds / self.delivered if self.delivered else 0.0

    @property
    def delivered_fraction(self) -> float:
        return self.delivered / self.sent if self.sent else 0.0


def run_rounds(
    pool: ReceiverPool,
    *,
    viewers: int,
    pushes: int,
    send_round: Callable[[int], int],
    expected_size: int,
) -> Throughput:
    """Send ``pushes`` packets per viewer in rounds that fit the receivers' buffers; after
    each round (outside the timed part) the receiver process drains and counts."""
    result = Throughput()
    capacity = pool.round_capacity(viewers)
    remaining = pushes
    while remaining:
        count = min(capacity, remaining)
        remaining -= count
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        wall_before = time.perf_counter()
        cpu_before = time.process_time()
        sent = send_round(count)
        cpu_after = time.process_time()
        wall_after = time.perf_counter()
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        result.cpu_seconds += cpu_after - cpu_before
        result.wall_seconds += wall_after - wall_before
        result.system_seconds += usage_after.ru_stime - usage_before.ru_stime
        result.sent += sent
        arrived = pool.drain(expected=sent)
        result.delivered += arrived.datagrams
        result.delivered_octets += arrived.octets
    if result.delivered_octets != result.delivered * expected_size:
        raise RuntimeError(
            f"receivers got {result.delivered_octets} bytes in {result.delivered} datagrams,"
            f" expected {expected_size} bytes each"
        )
    return result


def rtp_template(transport_cc: str = "off") -> bytearray:
    """A 1200-byte RTP packet (RFC 3550 §5.1): V=2, PT 96, the publisher's SSRC; for
    ``transport_cc`` "rewrite" with an RFC 8285 one-byte block holding the publisher's
    transport-wide sequence number (id TRANSPORT_CC_ID), as Chromium sends it."""
    first = 0x80
    extension = b""
    if transport_cc == "rewrite":
        first |= 0x10
        extension = struct.pack("!HHBHB", 0xBEDE, 1, (TRANSPORT_CC_ID << 4) | 1, 0, 0)
    header = struct.pack("!BBHII", first, VIDEO_PAYLOAD_TYPE, 0, 0, PUBLISHER_SSRC) + extension
    payload = os.urandom(PACKET_SIZE - len(header))
    return bytearray(header + payload)


def datagram_size(profile: int, transport_cc: str = "off") -> int:
    """What a viewer receives for one rtp_template() packet."""
    added = TRANSPORT_CC_ADDED if transport_cc == "add" else 0
    return PACKET_SIZE + added + SRTP_TRAILER[profile]


def fresh_keys(profile: int) -> dict[str, bytes]:
    key_len, salt_len = profile_key_lengths(profile)
    return {
        "tx_key": os.urandom(key_len),
        "tx_salt": os.urandom(salt_len),
        "rx_key": os.urandom(key_len),
        "rx_salt": os.urandom(salt_len),
    }


def add_viewers(
    fanout: Fanout,
    addresses: Sequence[tuple[str, int]],
    profile: int,
    transport_cc: str = "off",
) -> int:
    """One viewer per address, each with its own keys and an audio and a video
    subscription, as a WHEP session with both m-lines has, and transport-cc on unless
    ``transport_cc`` is "off". Returns the video track."""
    publisher_id = TRANSPORT_CC_ID if transport_cc == "rewrite" else 0
    audio = fanout.add_track(transport_cc_id=publisher_id)
    video = fanout.add_track(transport_cc_id=publisher_id)
    for index, (host, port) in enumerate(addresses):
        slot = fanout.add_viewer(host, port, profile=profile, **fresh_keys(profile))
        if transport_cc != "off":
            fanout.set_transport_cc(slot, TRANSPORT_CC_ID)
        fanout.subscribe(
            slot,
            audio,
            ssrc=0x10000 + 2 * index,
            payload_type=AUDIO_PAYLOAD_TYPE,
            wait_keyframe=False,
        )
        fanout.subscribe(
            slot,
            video,
            ssrc=0x10001 + 2 * index,
            payload_type=VIDEO_PAYLOAD_TYPE,
            wait_keyframe=False,
        )
    return video


def measure_fanout(
    sender: socket.socket,
    pool: ReceiverPool,
    addresses: Sequence[tuple[str, int]],
    profile: int,
    pushes: int,
    transport_cc: str = "off",
) -> tuple[Throughput, list[int]]:
    """``Fanout.push`` of the video track to every viewer. Returns the throughput and the
    duration of every push in ns: push() returns after its last sendmmsg, so that is the
    latency from packet in to the last viewer's datagram handed to the kernel."""
    fanout = Fanout(sender.fileno())
    video = add_viewers(fanout, addresses, profile, transport_cc)
    packet = rtp_template(transport_cc)
    latencies: list[int] = []
    sequence = 0

    def send_round(count: int) -> int:
        nonlocal sequence
        push, clock, record, pack = (
            fanout.push,
            time.perf_counter_ns,
            latencies.append,
            struct.pack_into,
        )
        sent = 0
        for _ in range(count):
            # A fresh bytes object per packet, as the publisher's unprotect step yields.
            pack("!HI", packet, 2, sequence & 0xFFFF, (sequence * VIDEO_CLOCK_STEP) & 0xFFFFFFFF)
            sequence += 1
            ingested = bytes(packet)
            started = clock()
            sent += push(video, ingested)
            record(clock() - started)
        return sent

    warm_up(pool, send_round)
    latencies.clear()
    throughput = run_rounds(
        pool,
        viewers=len(addresses),
        pushes=pushes,
        send_round=send_round,
        expected_size=datagram_size(profile, transport_cc),
    )
    return throughput, latencies


def measure_simulcast(
    sender: socket.socket,
    pool: ReceiverPool,
    addresses: Sequence[tuple[str, int]],
    profile: int,
    pushes: int,
) -> Throughput:
    """The simulcast case: one Fanout track per layer (three), the viewers spread over
    them round robin as the router places them. Each round pushes one packet on every
    layer, so every viewer still gets one datagram per round and the rate compares with
    the same limit as the single-layer case."""
    fanout = Fanout(sender.fileno())
    layers = [fanout.add_track() for _ in range(SIMULCAST_LAYERS)]
    for index, (host, port) in enumerate(addresses):
        slot = fanout.add_viewer(host, port, profile=profile, **fresh_keys(profile))
        fanout.subscribe(
            slot,
            layers[index % SIMULCAST_LAYERS],
            ssrc=0x10001 + 2 * index,
            payload_type=VIDEO_PAYLOAD_TYPE,
            wait_keyframe=False,
        )
    packet = rtp_template()
    sequence = 0

    def send_round(count: int) -> int:
        nonlocal sequence
        push, pack = fanout.push, struct.pack_into
        sent = 0
        for _ in range(count):
            pack("!HI", packet, 2, sequence & 0xFFFF, (sequence * VIDEO_CLOCK_STEP) & 0xFFFFFFFF)
            sequence += 1
            ingested = bytes(packet)
            for layer in layers:
                sent += push(layer, ingested)
        return sent

    warm_up(pool, send_round)
    return run_rounds(
        pool,
        viewers=len(addresses),
        pushes=pushes,
        send_round=send_round,
        expected_size=PACKET_SIZE + SRTP_TRAILER[profile],
    )


def measure_limit(
    sender: socket.socket,
    pool: ReceiverPool,
    addresses: Sequence[tuple[str, int]],
    profile: int,
    pushes: int,
) -> Throughput:
    """The same-run limit: one C loop of protect + sendmmsg to the same sockets."""
    destinations = list(addresses)

    def send_round(count: int) -> int:
        sent, _seconds = measure_send_limit(
            sender.fileno(), destinations, profile=profile, packet_size=PACKET_SIZE, packets=count
        )
        return sent

    warm_up(pool, send_round)
    return run_rounds(
        pool,
        viewers=len(addresses),
        pushes=pushes,
        send_round=send_round,
        expected_size=PACKET_SIZE + SRTP_TRAILER[profile],
    )


def measure_baseline(
    sender: socket.socket,
    pool: ReceiverPool,
    addresses: Sequence[tuple[str, int]],
    profile: int,
    pushes: int,
) -> Throughput:
    """The Python baseline: per viewer, pylibsrtp ``protect`` then ``sendto``. It does not
    even rewrite SSRC/PT/seq per viewer, so it is a generous baseline."""
    key_len, salt_len = profile_key_lengths(profile)
    sessions = [
        Session(
            Policy(
                key=os.urandom(key_len + salt_len),
                ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                srtp_profile=LIBSRTP_PROFILES[profile],
            )
        )
        for _ in addresses
    ]
    pairs = list(zip(sessions, addresses, strict=True))
    packet = rtp_template()
    sequence = 0

    def send_round(count: int) -> int:
        nonlocal sequence
        sendto, sent = sender.sendto, 0
        for _ in range(count):
            struct.pack_into(
                "!HI", packet, 2, sequence & 0xFFFF, (sequence * VIDEO_CLOCK_STEP) & 0xFFFFFFFF
            )
            sequence += 1
            plain = bytes(packet)
            for session, address in pairs:
                try:
                    sendto(session.protect(plain), address)
                except BlockingIOError:
                    continue
                sent += 1
        return sent

    return run_rounds(
        pool,
        viewers=len(addresses),
        pushes=pushes,
        send_round=send_round,
        expected_size=PACKET_SIZE + SRTP_TRAILER[profile],
    )


# --- UDP GSO (issue 17): runs of a burst per viewer in one sendmmsg entry -----------------

GSO_BURSTS = (1, 4, 6, 8)  # packets per frame that arrive together (720p: ~6-8)
GSO_VIEWERS = (100, 1000, 5000)
GSO_TARGET_VIEWERS, GSO_TARGET_BURST = 1000, 6
GSO_TARGET_LIMIT_MULTIPLE = 1.6  # x the same-run sendmmsg limit (GCM)
GSO_TARGET_GSO_RATIO = 0.85  # of the same-run GSO limit


@dataclass
class GsoFigures:
    """One run of the four GSO contenders for one (viewers, burst, profile)."""

    sendmmsg_limit: float  # datagrams per CPU-second: C crypto + sendmmsg, one per entry
    gso_limit: float  # the same crypto, each destination's run of ``burst`` as one entry
    fanout_off: float  # Fanout.push per packet (today's path)
    fanout_on: float  # Fanout.push_batch of the burst with GSO
    off_p99_us: float  # per burst: from its first packet in to its last datagram out
    on_p99_us: float
    delivered: float

    @property
    def limit_multiple(self) -> float:
        return self.fanout_on / self.sendmmsg_limit if self.sendmmsg_limit else 0.0

    @property
    def gso_ratio(self) -> float:
        return self.fanout_on / self.gso_limit if self.gso_limit else 0.0


def measure_burst_fanout(
    sender: socket.socket,
    pool: ReceiverPool,
    addresses: Sequence[tuple[str, int]],
    profile: int,
    pushes: int,
    burst: int,
    *,
    gso: bool,
    transport_cc: str = "off",
) -> tuple[Throughput, list[int]]:
    """The fan-out fed ``burst`` packets at a time, as one read of the publisher's socket
    returns them: GSO off pushes them one by one (push, today's path), GSO on pushes them
    together (push_batch). Returns the throughput and each burst's duration in ns."""
    fanout = Fanout(sender.fileno(), gso=gso)
    video = add_viewers(fanout, addresses, profile, transport_cc)
    packet = rtp_template(transport_cc)
    latencies: list[int] = []
    sequence = 0

    def send_round(count: int) -> int:
        nonlocal sequence
        clock, record, pack = time.perf_counter_ns, latencies.append, struct.pack_into
        sent = 0
        remaining = count
        while remaining:
            size = min(burst, remaining)
            remaining -= size
            packets = []
            for _ in range(size):
                pack("!HI", packet, 2, sequence & 0xFFFF, (sequence // burst) * VIDEO_CLOCK_STEP)
                sequence += 1
                packets.append(bytes(packet))
            started = clock()
            if gso:
                sent += fanout.push_batch(video, packets)
            else:
                for ingested in packets:
                    sent += fanout.push(video, ingested)
            record(clock() - started)
        return sent

    warm_up(pool, send_round)
    latencies.clear()
    throughput = run_rounds(
        pool,
        viewers=len(addresses),
        pushes=pushes,
        send_round=send_round,
        expected_size=datagram_size(profile, transport_cc),
    )
    if gso and burst > 1 and fanout.stats()["gso_messages"] == 0:
        raise RuntimeError("GSO was on but no GSO entry went out (kernel refused it?)")
    return throughput, latencies


def measure_segment_limit(
    sender: socket.socket,
    pool: ReceiverPool,
    addresses: Sequence[tuple[str, int]],
    profile: int,
    pushes: int,
    segments: int,
) -> Throughput:
    """The same-run limit in C: ``segments`` 1 is the sendmmsg limit (one datagram per
    entry), more is the GSO limit (each destination's run of that many in one entry)."""
    destinations = list(addresses)

    def send_round(count: int) -> int:
        sent, _seconds = measure_send_limit(
            sender.fileno(),
            destinations,
            profile=profile,
            packet_size=PACKET_SIZE,
            packets=count,
            segments=segments,
        )
        return sent

    warm_up(pool, send_round)
    return run_rounds(
        pool,
        viewers=len(addresses),
        pushes=pushes,
        send_round=send_round,
        expected_size=PACKET_SIZE + SRTP_TRAILER[profile],
    )


def gso_run_once(
    sender: socket.socket,
    pool: ReceiverPool,
    addresses: Sequence[tuple[str, int]],
    profile: int,
    pushes: int,
    burst: int,
    run_index: int,
    transport_cc: str = "off",
) -> GsoFigures:
    # The bursts' packet count per round must keep whole bursts: round up to one.
    pushes = max(burst, pushes - pushes % burst)
    contenders: list[Callable[[], object]] = [
        lambda: measure_segment_limit(sender, pool, addresses, profile, pushes, 1),
        lambda: measure_segment_limit(sender, pool, addresses, profile, pushes, burst),
        lambda: measure_burst_fanout(
            sender, pool, addresses, profile, pushes, burst, gso=False, transport_cc=transport_cc
        ),
        lambda: measure_burst_fanout(
            sender, pool, addresses, profile, pushes, burst, gso=True, transport_cc=transport_cc
        ),
    ]
    # Rotate the order per run so that a drift in machine load favours none of them.
    order = [(run_index + index) % len(contenders) for index in range(len(contenders))]
    results: dict[int, object] = {index: contenders[index]() for index in order}
    plain_limit, gso_limit = results[0], results[1]
    off, off_latencies = results[2]  # type: ignore[misc]
    on, on_latencies = results[3]  # type: ignore[misc]
    assert isinstance(plain_limit, Throughput) and isinstance(gso_limit, Throughput)
    off_latencies.sort()
    on_latencies.sort()
    return GsoFigures(
        sendmmsg_limit=plain_limit.per_cpu_second,
        gso_limit=gso_limit.per_cpu_second,
        fanout_off=off.per_cpu_second,
        fanout_on=on.per_cpu_second,
        off_p99_us=percentile(off_latencies, 0.99) / 1000,
        on_p99_us=percentile(on_latencies, 0.99) / 1000,
        delivered=min(t.delivered_fraction for t in (plain_limit, gso_limit, off, on)),
    )


@dataclass
class GsoRow:
    viewers: int
    burst: int
    profile: str
    sendmmsg_limit: float
    gso_limit: float
    fanout_off: float
    fanout_on: float
    limit_multiple: float  # medians of the per-run ratios
    gso_ratio: float
    off_ratio: float  # GSO off / the sendmmsg limit
    off_p99_us: float
    on_p99_us: float
    delivered: float
    runs: list[dict[str, float]] = field(default_factory=list)


def run_gso(
    plan: Plan,
    viewer_counts: Sequence[int],
    bursts: Sequence[int],
    progress: Callable[[str], None],
) -> list[GsoRow]:
    descriptors = raise_open_file_limit()
    rows: list[GsoRow] = []
    with ReceiverPool() as pool, open_sender() as sender:
        for viewers in viewer_counts:
            addresses = viewer_addresses(pool, viewers, descriptors)
            prime_sockets(sender, pool, addresses)
            for burst in bursts:
                for name in plan.profiles:
                    figures = []
                    for run_index in range(plan.runs):
                        progress(
                            f"gso: {viewers} viewers, burst {burst}, {name}, run {run_index + 1}"
                        )
                        figures.append(
                            gso_run_once(
                                sender,
                                pool,
                                addresses,
                                PROFILES[name],
                                plan.pushes(viewers),
                                burst,
                                run_index,
                                plan.transport_cc,
                            )
                        )
                    rows.append(gso_summarise(viewers, burst, name, figures))
    return rows


def gso_summarise(viewers: int, burst: int, profile: str, figures: list[GsoFigures]) -> GsoRow:
    def median(select: Callable[[GsoFigures], float]) -> float:
        return statistics.median(select(figure) for figure in figures)

    return GsoRow(
        viewers=viewers,
        burst=burst,
        profile=profile,
        sendmmsg_limit=median(lambda f: f.sendmmsg_limit),
        gso_limit=median(lambda f: f.gso_limit),
        fanout_off=median(lambda f: f.fanout_off),
        fanout_on=median(lambda f: f.fanout_on),
        limit_multiple=median(lambda f: f.limit_multiple),
        gso_ratio=median(lambda f: f.gso_ratio),
        off_ratio=median(lambda f: f.fanout_off / f.sendmmsg_limit if f.sendmmsg_limit else 0.0),
        off_p99_us=median(lambda f: f.off_p99_us),
        on_p99_us=median(lambda f: f.on_p99_us),
        delivered=min(f.delivered for f in figures),
        runs=[
            {**asdict(f), "limit_multiple": f.limit_multiple, "gso_ratio": f.gso_ratio}
            for f in figures
        ],
    )


def format_gso(rows: Sequence[GsoRow]) -> str:
    lines = [
        "UDP GSO: a burst of equal packets per viewer as one sendmmsg entry (whepfan on/off,"
        " against the same run's sendmmsg and GSO limits; k datagrams per CPU-second):",
        f"{'viewers':>7}  {'burst':>5}  {'prof':<4}  {'sendmmsg lim':>12}  {'gso lim':>8}"
        f"  {'off':>7}  {'on':>7}  {'off÷lim':>7}  {'p99 off µs':>10}  {'p99 on µs':>9}"
        f"  {'deliv%':>6}",
    ]
    for row in rows:
        lines.append(
            f"{row.viewers:>7}  {row.burst:>5}  {row.profile:<4}"
            f"  {row.sendmmsg_limit / 1000:>12.1f}"
            f"  {row.gso_limit / 1000:>8.1f}  {row.fanout_off / 1000:>7.1f}"
            f"  {row.fanout_on / 1000:>7.1f}  {row.off_ratio:>7.2f}  {row.off_p99_us:>10.1f}"
            f"  {row.on_p99_us:>9.1f}  {100 * row.delivered:>6.1f}"
        )
    for row in rows:
        lines.append(
            f"gso @ {row.viewers} viewers, burst {row.burst}, {row.profile}: "
            f"{row.limit_multiple:.2f}x the sendmmsg limit, {row.gso_ratio:.2f} of the gso limit"
        )
    for row in rows:
        if (row.viewers, row.burst, row.profile) == (GSO_TARGET_VIEWERS, GSO_TARGET_BURST, "GCM"):
            met = (
                row.limit_multiple >= GSO_TARGET_LIMIT_MULTIPLE
                and row.gso_ratio >= GSO_TARGET_GSO_RATIO
            )
            lines.append(
                f"target @ {row.viewers} viewers, burst {row.burst}, GCM: >= "
                f"{GSO_TARGET_LIMIT_MULTIPLE}x the sendmmsg limit and >= {GSO_TARGET_GSO_RATIO}"
                f" of the gso limit: {'met' if met else 'MISSED'}"
            )
    return "\n".join(lines)


def warm_up(pool: ReceiverPool, send_round: Callable[[int], int]) -> None:
    """A few untimed packets first, so first-touch page faults and cold caches are not
    billed to the measured rounds."""
    pool.drain(expected=send_round(2))


# --- server memory per viewer ---------------------------------------------------------------


def resident_bytes() -> int:
    """This process's resident set size, from /proc/self/statm (field 2, in pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemoryProbe:
    openssl_setup_bytes: int  # process-wide, once: libcrypto loading its provider and tables
    fanout_fixed_bytes: int  # a Fanout with its two tracks, before any viewer
    viewers_bytes: int  # the RSS growth from adding the viewers and their subscriptions

    def per_viewer(self, viewers: int) -> float:
        return self.viewers_bytes / viewers


def probe_memory(viewers: int, profile: int) -> MemoryProbe:
    """Runs in a fresh interpreter (see ``memory_probes``): memory a previous Fanout freed
    stays in the allocator and would hide the growth. libcrypto's one-time set-up (about
    2 MiB on first use of a cipher) is done and reported apart, since no viewer causes it.
    The Fanout has the server's default capacity; its preallocated arrays count only where
    adding viewers touches them."""
    gc.collect()
    before_setup = resident_bytes()
    key_len, salt_len = profile_key_lengths(profile)
    SrtpSession(profile, os.urandom(key_len), os.urandom(salt_len)).protect(bytes(rtp_template()))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        gc.collect()
        before_fanout = resident_bytes()
        fanout = Fanout(sock.fileno())
        gc.collect()
        before_viewers = resident_bytes()
        add_viewers(fanout, [(LOOPBACK, 9)] * viewers, profile)
        gc.collect()
        after_viewers = resident_bytes()
        if fanout.viewer_count != viewers:
            raise RuntimeError(f"{fanout.viewer_count} viewers added, expected {viewers}")
    return MemoryProbe(
        openssl_setup_bytes=before_fanout - before_setup,
        fanout_fixed_bytes=before_viewers - before_fanout,
        viewers_bytes=after_viewers - before_viewers,
    )


def memory_probes(
    viewer_counts: Sequence[int], profiles: Sequence[int]
) -> dict[tuple[int, int], MemoryProbe]:
    context = multiprocessing.get_context("spawn")
    probes: dict[tuple[int, int], MemoryProbe] = {}
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=context, max_tasks_per_child=1
    ) as executor:
        for viewers in viewer_counts:
            for profile in profiles:
                probes[viewers, profile] = executor.submit(probe_memory, viewers, profile).result()
    return probes


# --- runs, medians, report --------------------------------------------------------------------


def percentile(sorted_values: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclass
class RunFigures:
    """One run of the three contenders for one (viewers, profile)."""

    fanout_rate: float
    fanout_wall_rate: float
    fanout_delivered: float
    fanout_user_ns: float
    fanout_kernel_ns: float
    limit_rate: float
    limit_delivered: float
    baseline_rate: float
    baseline_delivered: float
    baseline_user_ns: float
    baseline_kernel_ns: float
    latency_p50_us: float
    latency_p99_us: float
    pushes: int
    baseline_pushes: int
    simulcast_rate: float = 0.0

    @property
    def limit_ratio(self) -> float:
        return self.fanout_rate / self.limit_rate if self.limit_rate else 0.0

    @property
    def simulcast_ratio(self) -> float:
        return self.simulcast_rate / self.limit_rate if self.limit_rate else 0.0

    @property
    def baseline_ratio(self) -> float:
        return self.fanout_rate / self.baseline_rate if self.baseline_rate else 0.0


@dataclass
class Row:
    """Medians over the runs for one (viewers, profile)."""

    viewers: int
    profile: str
    sockets: int
    fanout_rate: float
    limit_rate: float
    limit_ratio: float
    baseline_rate: float
    baseline_ratio: float
    delivered: float
    fanout_wall_rate: float
    bytes_per_viewer: float
    latency_p50_us: float
    latency_p99_us: float
    fanout_user_ns: float
    fanout_kernel_ns: float
    baseline_user_ns: float
    baseline_kernel_ns: float
    runs: list[dict[str, float]] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    simulcast_rate: float = 0.0
    simulcast_ratio: float = 0.0


def run_once(
    sender: socket.socket,
    pool: ReceiverPool,
    addresses: Sequence[tuple[str, int]],
    profile: int,
    plan: Plan,
    run_index: int,
) -> RunFigures:
    viewers = len(addresses)
    pushes = plan.pushes(viewers)
    # Alternate which of the two compiled contenders goes first, so a drift in machine
    # load during a run does not always favour the same one.
    if run_index % 2 == 0:
        limit = measure_limit(sender, pool, addresses, profile, pushes)
        fanout, latencies = measure_fanout(
            sender, pool, addresses, profile, pushes, plan.transport_cc
        )
    else:
        fanout, latencies = measure_fanout(
            sender, pool, addresses, profile, pushes, plan.transport_cc
        )
        limit = measure_limit(sender, pool, addresses, profile, pushes)
    simulcast = measure_simulcast(sender, pool, addresses, profile, pushes)
    baseline_pushes = plan.baseline_pushes(viewers)
    baseline = measure_baseline(sender, pool, addresses, profile, baseline_pushes)
    latencies.sort()
    return RunFigures(
        fanout_rate=fanout.per_cpu_second,
        fanout_wall_rate=fanout.per_wall_second,
        fanout_delivered=fanout.delivered_fraction,
        fanout_user_ns=fanout.user_ns_per_datagram,
        fanout_kernel_ns=fanout.kernel_ns_per_datagram,
        limit_rate=limit.per_cpu_second,
        limit_delivered=limit.delivered_fraction,
        baseline_rate=baseline.per_cpu_second,
        baseline_delivered=baseline.delivered_fraction,
        baseline_user_ns=baseline.user_ns_per_datagram,
        baseline_kernel_ns=baseline.kernel_ns_per_datagram,
        latency_p50_us=percentile(latencies, 0.50) / 1000,
        latency_p99_us=percentile(latencies, 0.99) / 1000,
        pushes=pushes,
        baseline_pushes=baseline_pushes,
        simulcast_rate=simulcast.per_cpu_second,
    )


def prime_sockets(
    sender: socket.socket, pool: ReceiverPool, addresses: Sequence[tuple[str, int]]
) -> None:
    """Fill and drain every fresh socket once, untimed: the first round into new sockets
    pays for the kernel growing their memory accounting, and whichever contender went
    first would be billed for it."""
    packets = pool.round_capacity(len(addresses))
    sent, _seconds = measure_send_limit(
        sender.fileno(),
        list(addresses),
        profile=PROFILE_AEAD_AES_128_GCM,
        packet_size=PACKET_SIZE,
        packets=packets,
    )
    pool.drain(expected=sent)


def viewer_addresses(pool: ReceiverPool, viewers: int, descriptors: int) -> list[tuple[str, int]]:
    """One socket per viewer, unless the descriptor limit is too low: then viewers share
    sockets round-robin (the table's ``sockets`` column says so)."""
    sockets = max(1, min(viewers, descriptors - FIXED_DESCRIPTORS))
    shared = pool.open(sockets)
    return [shared[index % sockets] for index in range(viewers)]


def open_sender() -> socket.socket:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    sender.bind((LOOPBACK, 0))
    sender.setblocking(False)
    return sender


def run(plan: Plan, progress: Callable[[str], None]) -> list[Row]:
    descriptors = raise_open_file_limit()
    profiles = [PROFILES[name] for name in plan.profiles]
    progress("measuring memory per viewer (fresh process per figure)")
    memory = memory_probes(plan.viewer_counts, profiles)
    rows: list[Row] = []
    with ReceiverPool() as pool, open_sender() as sender:
        for viewers in plan.viewer_counts:
            addresses = viewer_addresses(pool, viewers, descriptors)
            prime_sockets(sender, pool, addresses)
            for name, profile in zip(plan.profiles, profiles, strict=True):
                figures: list[RunFigures] = []
                for run_index in range(plan.runs):
                    progress(f"{viewers} viewers, {name}, run {run_index + 1}/{plan.runs}")
                    figures.append(run_once(sender, pool, addresses, profile, plan, run_index))
                rows.append(
                    summarise(viewers, name, len(set(addresses)), figures, memory[viewers, profile])
                )
    return rows


def summarise(
    viewers: int, profile: str, sockets: int, figures: list[RunFigures], memory: MemoryProbe
) -> Row:
    def median(select: Callable[[RunFigures], float]) -> float:
        return statistics.median(select(figure) for figure in figures)

    return Row(
        viewers=viewers,
        profile=profile,
        sockets=sockets,
        fanout_rate=median(lambda f: f.fanout_rate),
        limit_rate=median(lambda f: f.limit_rate),
        limit_ratio=median(lambda f: f.limit_ratio),
        baseline_rate=median(lambda f: f.baseline_rate),
        baseline_ratio=median(lambda f: f.baseline_ratio),
        delivered=min(
            min(f.fanout_delivered, f.limit_delivered, f.baseline_delivered) for f in figures
        ),
        fanout_wall_rate=median(lambda f: f.fanout_wall_rate),
        bytes_per_viewer=memory.per_viewer(viewers),
        latency_p50_us=median(lambda f: f.latency_p50_us),
        latency_p99_us=median(lambda f: f.latency_p99_us),
        fanout_user_ns=median(lambda f: f.fanout_user_ns),
        fanout_kernel_ns=median(lambda f: f.fanout_kernel_ns),
        baseline_user_ns=median(lambda f: f.baseline_user_ns),
        baseline_kernel_ns=median(lambda f: f.baseline_kernel_ns),
        runs=[
            {
                **asdict(f),
                "limit_ratio": f.limit_ratio,
                "baseline_ratio": f.baseline_ratio,
                "simulcast_ratio": f.simulcast_ratio,
            }
            for f in figures
        ],
        memory=asdict(memory),
        simulcast_rate=median(lambda f: f.simulcast_rate),
        simulcast_ratio=median(lambda f: f.simulcast_ratio),
    )


COLUMNS = (
    ("viewers", 7, "{:>7}"),
    ("prof", 4, "{:<4}"),
    ("fan-out k/CPU-s", 15, "{:>15.1f}"),
    ("limit k/CPU-s", 13, "{:>13.1f}"),
    ("÷limit", 6, "{:>6.2f}"),
    ("py k/CPU-s", 10, "{:>10.1f}"),
    ("÷py", 5, "{:>5.1f}"),
    ("deliv%", 6, "{:>6.1f}"),
    ("wall k/s", 8, "{:>8.1f}"),
    ("KiB/viewer", 10, "{:>10.2f}"),
    ("p50 µs", 8, "{:>8.1f}"),
    ("p99 µs", 8, "{:>8.1f}"),
)


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    python = platform.python_version()
    return (
        f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {python};"
        f" AES-GCM: {_fastpath.gcm_backend()}"
    )


def format_table(rows: Sequence[Row], plan: Plan) -> str:
    lines = [
        f"whepfan fan-out benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {machine_description()}",
        f"{PACKET_SIZE}-byte RTP, loopback receivers in a separate process, median of {plan.runs}"
        " run(s); rates are datagrams delivered per CPU-second of the sending process (k = 1000)",
        "  ".join(
            title.rjust(width) if "{:>" in fmt else title.ljust(width)
            for title, width, fmt in COLUMNS
        ),
    ]
    for row in rows:
        values = (
            row.viewers,
            row.profile,
            row.fanout_rate / 1000,
            row.limit_rate / 1000,
            row.limit_ratio,
            row.baseline_rate / 1000,
            row.baseline_ratio,
            100 * row.delivered,
            row.fanout_wall_rate / 1000,
            row.bytes_per_viewer / 1024,
            row.latency_p50_us,
            row.latency_p99_us,
        )
        lines.append(
            "  ".join(
                fmt.format(value) for (_t, _w, fmt), value in zip(COLUMNS, values, strict=True)
            )
        )
    lines.append(
        "where the CPU goes, ns per delivered datagram (user = rewrite + SRTP + Python around"
        " it; kernel = send syscalls + loopback delivery):"
    )
    lines.append(
        f"{'viewers':>7}  {'prof':<4}  {'fan-out user':>12}  {'fan-out kernel':>14}"
        f"  {'py user':>8}  {'py kernel':>9}"
    )
    for row in rows:
        lines.append(
            f"{row.viewers:>7}  {row.profile:<4}  {row.fanout_user_ns:>12.0f}"
            f"  {row.fanout_kernel_ns:>14.0f}  {row.baseline_user_ns:>8.0f}"
            f"  {row.baseline_kernel_ns:>9.0f}"
        )
    lines.append(
        f"simulcast: viewers spread over {SIMULCAST_LAYERS} layers (one Fanout track each),"
        " against the same limit:"
    )
    lines.append(f"{'viewers':>7}  {'prof':<4}  {'fan-out k/CPU-s':>15}  {'÷limit':>6}")
    for row in rows:
        lines.append(
            f"{row.viewers:>7}  {row.profile:<4}  {row.simulcast_rate / 1000:>15.1f}"
            f"  {row.simulcast_ratio:>6.2f}"
        )
    shared = [row for row in rows if row.sockets < row.viewers]
    for row in shared:
        lines.append(
            f"note: {row.viewers} viewers shared {row.sockets} receiver sockets"
            " (too few file descriptors for one each)"
        )
    lines.extend(target_lines(rows))
    return "\n".join(lines)


def target_lines(rows: Sequence[Row]) -> list[str]:
    """Issue 2's targets at 1,000 viewers, reported (not asserted)."""
    lines = []
    for row in rows:
        if row.viewers != TARGET_VIEWERS:
            continue
        checks = [
            (
                f"{row.limit_ratio:.2f} of the limit",
                row.limit_ratio >= TARGET_LIMIT_RATIO,
                f">= {TARGET_LIMIT_RATIO}",
            ),
            (
                f"{row.baseline_ratio:.1f}x the Python baseline",
                row.baseline_ratio >= TARGET_BASELINE_RATIO,
                f">= {TARGET_BASELINE_RATIO:.0f}x",
            ),
            (
                f"{row.bytes_per_viewer / 1024:.2f} KiB per viewer",
                row.bytes_per_viewer <= TARGET_BYTES_PER_VIEWER,
                f"<= {TARGET_BYTES_PER_VIEWER // 1024} KiB",
            ),
        ]
        parts = [
            f"{text} (target {target}: {'met' if met else 'MISSED'})"
            for text, met, target in checks
        ]
        lines.append(f"target @ {row.viewers} viewers, {row.profile}: " + "; ".join(parts))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--smoke", action="store_true", help="10 and 100 viewers, few packets (< 20 s)"
    )
    parser.add_argument(
        "--runs", type=int, help="runs per figure; the median is reported (default 3, smoke 1)"
    )
    parser.add_argument(
        "--viewers", type=int, nargs="+", help="viewer counts instead of the plan's"
    )
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), action="append", help="only these profiles"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows and every run as JSON")
    parser.add_argument(
        "--gso-only",
        action="store_true",
        help="only the UDP GSO comparison (bursts 1/4/6/8 at 100/1,000/5,000 viewers)",
    )
    parser.add_argument("--bursts", type=int, nargs="+", help="GSO burst sizes instead of 1 4 6 8")
    parser.add_argument(
        "--transport-cc",
        choices=TRANSPORT_CC_MODES,
        default="off",
        help="transport-wide sequence numbers for every viewer of the fan-out contenders:"
        " rewrite the publisher's (Chromium-like packets) or add one (no extension block)",
    )
    parser.add_argument(
        "--gcm",
        choices=("auto", "openssl", "intel-ipsec-mb"),
        default="auto",
        help="AES-GCM code for every contender (the limits use the same): the core's default"
        " (intel-ipsec-mb where it was built with it), or one of them",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    arguments = parser.parse_args(argv)
    if arguments.gcm != "auto":
        try:
            _fastpath.use_gcm_backend(arguments.gcm)
        except ValueError as refused:
            parser.error(f"--gcm {arguments.gcm}: {refused}")
    plan = SMOKE_PLAN if arguments.smoke else FULL_PLAN
    overrides: dict[str, object] = {}
    if arguments.runs is not None:
        if arguments.runs < 1:
            parser.error("--runs must be at least 1")
        overrides["runs"] = arguments.runs
    if arguments.viewers:
        if min(arguments.viewers) < 1:
            parser.error("--viewers must be positive")
        overrides["viewer_counts"] = tuple(arguments.viewers)
    if arguments.profile:
        overrides["profiles"] = tuple(dict.fromkeys(arguments.profile))
    overrides["transport_cc"] = arguments.transport_cc
    plan = Plan(**{**asdict(plan), **overrides})

    def progress(message: str) -> None:
        if not arguments.quiet:
            print(f"... {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    if plan.transport_cc != "off":
        print(f"transport-cc: {plan.transport_cc} (every viewer of the fan-out contenders)")
    rows: list[Row] = []
    if not arguments.gso_only:
        rows = run(plan, progress)
        print(format_table(rows, plan))
    gso_viewers = arguments.viewers or (plan.viewer_counts if arguments.smoke else GSO_VIEWERS)
    bursts = tuple(arguments.bursts or ((1, 6) if arguments.smoke else GSO_BURSTS))
    if arguments.bursts and not all(1 <= burst <= 32 for burst in bursts):
        parser.error("--bursts must be in 1..32 (a viewer's run stays within one batch)")
    gso_rows = run_gso(plan, gso_viewers, bursts, progress)
    if arguments.gso_only:
        print(f"machine: {machine_description()}")
    print(format_gso(gso_rows))
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")
    if arguments.json:
        with open(arguments.json, "w") as output:
            json.dump(
                {
                    "machine": machine_description(),
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "plan": asdict(plan),
                    "packet_size": PACKET_SIZE,
                    "rows": [asdict(row) for row in rows],
                    "gso_rows": [asdict(row) for row in gso_rows],
                },
                output,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
