"""Capacity accounting: what each viewer costs, what each worker and the server can carry,
and which worker takes the next viewer (DESIGN.md §2).

Theory of operation
-------------------
A viewer costs what its current layer sends per second: packets (each one is an SRTP
protection and a slot in a ``sendmmsg`` batch, the CPU cost) and bits (the NIC cost).
Three budgets bound the sum:

* per worker, packets/s: the worker's core saturates at a packet rate, measured on this
  machine by ``whepfan calibrate`` (or configured);
* per server, bits/s: the egress link (configured, e.g. NIC rate x 0.8);
* per stream, viewers: an optional cap an operator sets.

A stream's cost per layer is measured from its ingest counters (:class:`RateMeter`) or,
until a measurement exists, a configured default. Loads are recomputed from the current
cost whenever asked, so a stream whose bitrate climbs makes its viewers heavier at once.

Admission is two steps so that a refused negotiation (406, 409) commits nothing:
:meth:`CapacityLedger.reserve` picks the least-loaded worker with room (or raises
``ServiceUnavailable`` and counts the reason); :meth:`CapacityLedger.commit` records the
viewer once its session exists. With ``admit_lower_layer`` a viewer that fits on no worker
at the top layer is offered the next lower layer before it is refused.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from whepfan.errors import ServiceUnavailable

log = logging.getLogger("whepfan.capacity")

# Bytes a viewer's datagram carries beyond the RTP payload: RTP header (RFC 3550 §5.1),
# the SRTP tag (16 for AEAD GCM, RFC 7714 §7; 10 for CM-80, RFC 3711 §4.2), UDP and IPv4.
PACKET_OVERHEAD_BYTES = 12 + 16 + 8 + 20
# Relative slack in budget comparisons, so that N viewers of cost B/N fit budget B exactly
# despite float rounding (one viewer is never smaller than this).
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerCost:
    """What one viewer of one layer (its audio plus one video layer) sends per second."""

    packets_per_second: float
    bits_per_second: float

    def __post_init__(self) -> None:
        if self.packets_per_second < 0 or self.bits_per_second < 0:
            raise ValueError("a layer cost is not negative")


# A 1.5 Mbit/s 720p VP8 stream (~140 packets/s of ~1,150 bytes) plus Opus at 50 packets/s.
DEFAULT_VIEWER_COST = LayerCost(packets_per_second=190.0, bits_per_second=1_650_000.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class CapacityPolicy:
    """Budgets (None: unbounded) and the admission rules."""

    worker_packet_budget: float | None = None
    egress_bit_budget: float | None = None
    stream_viewer_cap: int | None = None
    admit_lower_layer: bool = False
    # RFC 9110 §10.2.3: when a refused viewer should try again.
    retry_after: int = 10
    default_cost: LayerCost = DEFAULT_VIEWER_COST
    # A configured per-viewer cost replaces measurement (operators who know their bitrate).
    fixed_cost: LayerCost | None = None

    def __post_init__(self) -> None:
        for budget in (self.worker_packet_budget, self.egress_bit_budget):
            if budget is not None and budget <= 0:
                raise ValueError("budgets are positive")
        if self.stream_viewer_cap is not None and self.stream_viewer_cap < 0:
            raise ValueError("the stream viewer cap is not negative")


@dataclass(frozen=True, slots=True)
class Admission:
    """Where a new viewer goes: ``layer`` indexes the stream's layers, 0 the highest."""

    worker: int
    layer: int
    cost: LayerCost


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerLoad:
    worker: int
    viewers: int
    packets_per_second: float
    bits_per_second: float
    packet_budget: float | None

    @property
    def used(self) -> float:
        """Fraction of the packet budget in use (0 without a budget)."""
        if self.packet_budget is None:
            return 0.0
        return self.packets_per_second / self.packet_budget


@dataclass(slots=True)
class _Viewer:
    stream: str
    worker: int
    layer: int


@dataclass(slots=True)
class RateMeter:
    """Packets/s and bits/s of one source from its cumulative counters, smoothed with an
    exponential moving average (time constant ``tau`` seconds)."""

    tau: float = 5.0
    packets_per_second: float | None = None
    bits_per_second: float | None = None
    _last: tuple[float, int, int] | None = field(default=None, repr=False)

    def update(self, now: float, packets: int, payload_octets: int) -> None:
        if self._last is None or packets < self._last[1]:  # first sample or a reset
            self._last = (now, packets, payload_octets)
            return
        then, last_packets, last_octets = self._last
        elapsed = now - then
        if elapsed <= 0:
            return
        self._last = (now, packets, payload_octets)
        delta_packets = packets - last_packets
        wire_bytes = payload_octets - last_octets + delta_packets * PACKET_OVERHEAD_BYTES
        packet_rate = delta_packets / elapsed
        bit_rate = wire_bytes * 8 / elapsed
        if self.packets_per_second is None or self.bits_per_second is None:
            self.packets_per_second, self.bits_per_second = packet_rate, bit_rate
            return
        weight = 1.0 - math.exp(-elapsed / self.tau)
        self.packets_per_second += weight * (packet_rate - self.packets_per_second)
        self.bits_per_second += weight * (bit_rate - self.bits_per_second)

    def cost(self) -> LayerCost | None:
        if self.packets_per_second is None or self.bits_per_second is None:
            return None
        return LayerCost(
            packets_per_second=self.packets_per_second, bits_per_second=self.bits_per_second
        )


class CapacityLedger:
    """Viewers per worker and per stream, their cost, and the admission decision."""

    def __init__(self, *, policy: CapacityPolicy, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("at least one worker")
        self.policy = policy
        self._viewers: dict[str, _Viewer] = {}
        self._layers: dict[str, tuple[LayerCost, ...]] = {}
        self._workers: set[int] = set(range(workers))
        # Workers whose socket has queued media for a while (ReceiveDelay.sustained): past
        # their capacity whatever the budget says (a budget measured on a quieter machine,
        # or none), so they take no new viewers until they catch up.
        self._behind: set[int] = set()
        self.draining = False
        self._count_refusal = True
        self.refusals: Counter[str] = Counter()
        self.admissions: Counter[str] = Counter()

    # ------------------------------------------------------------------ costs

    def set_stream_layers(self, stream: str, layers: Sequence[LayerCost]) -> None:
        """The measured cost of each layer of ``stream``, highest first."""
        if layers:
            self._layers[stream] = tuple(layers)
        else:
            self._layers.pop(stream, None)

    def layers(self, stream: str) -> tuple[LayerCost, ...]:
        if self.policy.fixed_cost is not None:
            count = len(self._layers.get(stream, ())) or 1
            return (self.policy.fixed_cost,) * count
        return self._layers.get(stream) or (self.policy.default_cost,)

    def viewer_cost(self, viewer_id: str) -> LayerCost | None:
        viewer = self._viewers.get(viewer_id)
        if viewer is None:
            return None
        return self._cost(viewer.stream, viewer.layer)

    def _cost(self, stream: str, layer: int) -> LayerCost:
        layers = self.layers(stream)
        return layers[min(layer, len(layers) - 1)]

    # ------------------------------------------------------------------ workers

    def add_worker(self, worker: int) -> None:
        self._workers.add(worker)

    def set_behind(self, worker: int, behind: bool) -> None:
        if behind:
            self._behind.add(worker)
        else:
            self._behind.discard(worker)

    def behind(self, worker: int) -> bool:
        return worker in self._behind

    def remove_worker(self, worker: int) -> list[str]:
        """A worker died: forget it and its viewers; returns their ids."""
        self._workers.discard(worker)
        self._behind.discard(worker)
        gone = [vid for vid, viewer in self._viewers.items() if viewer.worker == worker]
        for viewer_id in gone:
            del self._viewers[viewer_id]
        return gone

    @property
    def workers(self) -> list[int]:
        return sorted(self._workers)

    def load(self, worker: int) -> WorkerLoad:
        viewers = packets = bits = 0.0
        for viewer in self._viewers.values():
            if viewer.worker == worker:
                cost = self._cost(viewer.stream, viewer.layer)
                viewers += 1
                packets += cost.packets_per_second
                bits += cost.bits_per_second
        return WorkerLoad(
            worker=worker,
            viewers=int(viewers),
            packets_per_second=packets,
            bits_per_second=bits,
            packet_budget=self.policy.worker_packet_budget,
        )

    def egress_bits_per_second(self) -> float:
        return sum(self._cost(v.stream, v.layer).bits_per_second for v in self._viewers.values())

    def stream_viewers(self, stream: str) -> int:
        return sum(1 for viewer in self._viewers.values() if viewer.stream == stream)

    def viewer_ids(self, worker: int | None = None) -> list[str]:
        return [vid for vid, v in self._viewers.items() if worker is None or v.worker == worker]

    # ------------------------------------------------------------------ admission

    def reserve(self, stream: str, *, count_refusal: bool = True) -> Admission:
        """The least-loaded worker with room for one more viewer of ``stream`` (at a lower
        layer if the policy allows and the top one fits nowhere), or ServiceUnavailable
        (counted in ``refusals`` unless ``count_refusal`` is False: a first try)."""
        self._count_refusal = count_refusal
        if self.draining:
            return self._refuse("draining", "the server is draining; try another")
        cap = self.policy.stream_viewer_cap
        if cap is not None and self.stream_viewers(stream) >= cap:
            return self._refuse("stream_cap", f"stream {stream!r} has its maximum of viewers")
        if not self._workers:
            return self._refuse("no_worker", "no media worker is running")
        keeping_up = self._workers - self._behind
        if not keeping_up:
            return self._refuse(
                "worker_behind", "every media worker is falling behind; try again shortly"
            )
        layers = self.layers(stream)
        candidates = range(len(layers)) if self.policy.admit_lower_layer else range(1)
        loads = sorted(
            (self.load(worker) for worker in keeping_up),
            key=lambda load: (load.packets_per_second, load.viewers, load.worker),
        )
        egress = self.egress_bits_per_second()
        reason = "worker_budget"
        for layer in candidates:
            cost = layers[layer]
            budget = self.policy.egress_bit_budget
            if budget is not None and not _fits(egress, cost.bits_per_second, budget):
                reason = "egress_budget"
                continue
            packet_budget = self.policy.worker_packet_budget
            for load in loads:
                if packet_budget is None or _fits(
                    load.packets_per_second, cost.packets_per_second, packet_budget
                ):
                    return Admission(worker=load.worker, layer=layer, cost=cost)
        return self._refuse(reason, "no viewer capacity left on this server")

    def commit(self, viewer_id: str, stream: str, admission: Admission) -> None:
        self._viewers[viewer_id] = _Viewer(stream, admission.worker, admission.layer)
        self.admissions["lower_layer" if admission.layer else "top_layer"] += 1

    def release(self, viewer_id: str) -> bool:
        return self._viewers.pop(viewer_id, None) is not None

    def retain(self, live_ids: Iterable[str], *, worker: int | None = None) -> list[str]:
        """Forget viewers (of ``worker``, or all) not in ``live_ids``: sessions that ended
        without a DELETE (consent loss, DTLS failure). Returns the forgotten ids."""
        live = set(live_ids)
        gone = [
            vid
            for vid, v in self._viewers.items()
            if vid not in live and (worker is None or v.worker == worker)
        ]
        for viewer_id in gone:
            del self._viewers[viewer_id]
        return gone

    def set_layer(self, viewer_id: str, layer: int) -> None:
        viewer = self._viewers.get(viewer_id)
        if viewer is not None:
            viewer.layer = layer

    def _refuse(self, reason: str, detail: str) -> Admission:
        if self._count_refusal:
            self.refusals[reason] += 1
        raise ServiceUnavailable(detail, retry_after=self.policy.retry_after)


def _fits(used: float, cost: float, budget: float) -> bool:
    return used + cost <= budget * (1 + _EPSILON)


# ---------------------------------------------------------------------- load reporting

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


@dataclass(slots=True, kw_only=True)
class WorkerStats:
    """One worker's cumulative counters, as the metrics endpoint reads them."""

    worker: int
    pid: int
    alive: bool = True
    viewers: int = 0
    publishers: int = 0
    router: dict[str, int] = field(default_factory=dict)  # Router.counters
    fanout: dict[str, int] = field(default_factory=dict)  # Fanout.stats()
    setup_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    receive_delay: float = 0.0  # seconds: ReceiveDelay.seconds of the worker's socket
    behind: bool = False  # ReceiveDelay.sustained over RECEIVE_DELAY_WARNING

    def to_json(self) -> dict[str, object]:
        return {
            "receive_delay": self.receive_delay,
            "behind": self.behind,
            "worker": self.worker,
            "pid": self.pid,
            "viewers": self.viewers,
            "publishers": self.publishers,
            "router": self.router,
            "fanout": self.fanout,
            "setup_latency": self.setup_latency.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> WorkerStats:
        def counters(name: str) -> dict[str, int]:
            value = data.get(name)
            if not isinstance(value, dict):
                raise ValueError(f"{name} is not a mapping")
            return {str(k): int(v) for k, v in value.items() if isinstance(v, int)}

        def integer(name: str) -> int:
            value = data.get(name)
            if not isinstance(value, int):
                raise ValueError(f"{name} is not an integer")
            return value

        latency = data.get("setup_latency")
        if not isinstance(latency, dict):
            raise ValueError("worker stats without a latency histogram")
        delay = data.get("receive_delay", 0.0)
        if not isinstance(delay, int | float) or isinstance(delay, bool):
            raise ValueError("receive_delay is not a number")
        behind = data.get("behind", False)
        if not isinstance(behind, bool):
            raise ValueError("behind is not a boolean")
        return cls(
            receive_delay=float(delay),
            behind=behind,
            worker=integer("worker"),
            pid=integer("pid"),
            viewers=integer("viewers"),
            publishers=integer("publishers"),
            router=counters("router"),
            fanout=counters("fanout"),
            setup_latency=LatencyHistogram.from_json(latency),
        )


@dataclass(slots=True, kw_only=True)
class ServerStats:
    """Everything ``GET /metrics`` shows: each live worker's counters (a replaced worker
    starts from zero; Prometheus' rate() treats that as the counter reset it is) and the
    admission ledger."""

    workers: list[WorkerStats]
    loads: list[WorkerLoad]
    egress_bit_budget: float | None
    refusals: dict[str, int]
    admissions: dict[str, int]
    worker_restarts: int = 0
    draining: bool = False
