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
* per stream, viewers: an optional cap an operator sets;
* per server, viewers (``max_viewers``), pending and connected alike: each one holds
  a slot of the Fanout from its POST on.

Pending viewers: admitted (201) but not connected yet (ICE + DTLS keyed). They are
counted apart and capped (``max_pending``): a POST costs a client one request, while
the session it makes costs the server an answer, ICE and DTLS state and a slot until it
connects or its connect deadline passes (media/session.py). The cap bounds what clients
that never connect can hold; refusals beyond it are ``pending_full``. A viewer moves
from pending to connected when its worker reports it keyed (:meth:`CapacityLedger.
connected`). Retry-After on ``max_viewers`` and ``pending_full`` refusals is when the
oldest pending viewer reaches its connect deadline, the latest a pending slot frees.

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

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from whepfan.errors import PeerError, ServiceUnavailable
from whepfan.media.layers import LayerRequest, capped_layer_request

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
    # Viewers on the server, any state (None: unbounded); of them, not connected yet.
    max_viewers: int | None = None
    max_pending: int | None = None
    # The media plane's connect timeout (MediaConfig.connect_timeout): when a pending
    # viewer is connected or gone at the latest, for Retry-After (None: unknown).
    connect_timeout: float | None = None

    def __post_init__(self) -> None:
        for budget in (self.worker_packet_budget, self.egress_bit_budget):
            if budget is not None and budget <= 0:
                raise ValueError("budgets are positive")
        if self.stream_viewer_cap is not None and self.stream_viewer_cap < 0:
            raise ValueError("the stream viewer cap is not negative")
        if self.max_viewers is not None and self.max_viewers < 0:
            raise ValueError("max_viewers is not negative")
        if self.max_pending is not None and self.max_pending < 1:
            raise ValueError("max_pending is at least 1")
        if self.connect_timeout is not None and not self.connect_timeout > 0:
            raise ValueError("the connect timeout is positive")


def default_max_pending(max_viewers: int) -> int:
    """Pending viewers allowed by default: a quarter of ``max_viewers``, at least 64.

    Honest viewers are pending for one connection setup (the setup latency histogram:
    well under a second on a LAN, a few seconds through TURN), so the pending count of a
    flash crowd is its join rate times that, and the join rate is bounded by how fast
    the server answers offers. A quarter of the server joining within one setup time is
    past any crowd that rate allows; 64 lets a small server take a page of embedded
    players at once."""
    return max(64, max_viewers // 4)


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
    # Pending (admitted, not connected yet) since then (None: when is unknown).
    admitted_at: float | None = None
    connected: bool = False


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

    @property
    def viewers(self) -> int:
        """Viewers on the books, pending and connected."""
        return len(self._viewers)

    @property
    def pending(self) -> int:
        """Viewers admitted that have not connected yet."""
        return sum(1 for viewer in self._viewers.values() if not viewer.connected)

    # ------------------------------------------------------------------ admission

    def reserve(
        self, stream: str, *, count_refusal: bool = True, now: float | None = None
    ) -> Admission:
        """The least-loaded worker with room for one more viewer of ``stream`` (at a lower
        layer if the policy allows and the top one fits nowhere), or ServiceUnavailable
        (counted in ``refusals`` unless ``count_refusal`` is False: a first try). ``now``
        (the clock ``commit`` was given) times Retry-After by the pending viewers."""
        self._count_refusal = count_refusal
        if self.draining:
            return self._refuse("draining", "the server is draining; try another")
        policy = self.policy
        if policy.max_viewers is not None and len(self._viewers) >= policy.max_viewers:
            return self._refuse(
                "max_viewers",
                "no viewer capacity left on this server",
                self._pending_retry_after(now),
            )
        cap = policy.stream_viewer_cap
        if cap is not None and self.stream_viewers(stream) >= cap:
            return self._refuse("stream_cap", f"stream {stream!r} has its maximum of viewers")
        if policy.max_pending is not None and self.pending >= policy.max_pending:
            return self._refuse(
                "pending_full",
                "too many viewers are still connecting; try again shortly",
                self._pending_retry_after(now),
            )
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

    def commit(
        self, viewer_id: str, stream: str, admission: Admission, now: float | None = None
    ) -> None:
        """Record the viewer ``reserve`` admitted, pending until :meth:`connected`."""
        self._viewers[viewer_id] = _Viewer(
            stream, admission.worker, admission.layer, admitted_at=now
        )
        self.admissions["lower_layer" if admission.layer else "top_layer"] += 1

    def connected(self, viewer_id: str) -> bool:
        """The viewer is keyed (ICE + DTLS): no longer pending. False if unknown or
        already connected."""
        viewer = self._viewers.get(viewer_id)
        if viewer is None or viewer.connected:
            return False
        viewer.connected = True
        return True

    def _pending_retry_after(self, now: float | None) -> int:
        """Seconds until the oldest pending viewer is connected or gone at the latest
        (its connect deadline), within the policy's Retry-After; the policy's without a
        clock, a connect timeout or any pending viewer."""
        timeout = self.policy.connect_timeout
        times = [
            viewer.admitted_at
            for viewer in self._viewers.values()
            if not viewer.connected and viewer.admitted_at is not None
        ]
        if now is None or timeout is None or not times:
            return self.policy.retry_after
        wait = min(times) + timeout - now
        return max(1, min(self.policy.retry_after, math.ceil(wait)))

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

    def _refuse(self, reason: str, detail: str, retry_after: int | None = None) -> Admission:
        if self._count_refusal:
            self.refusals[reason] += 1
        raise ServiceUnavailable(
            detail, retry_after=self.policy.retry_after if retry_after is None else retry_after
        )


def _fits(used: float, cost: float, budget: float) -> bool:
    return used + cost <= budget * (1 + _EPSILON)


def stream_layers(
    meters: dict[tuple[str, str], RateMeter],
    stream: str,
    counters: list[tuple[str, str, int, int]],
    now: float,
) -> list[LayerCost]:
    """A viewer of ``stream`` gets every audio track and one video track: one layer per
    video track (highest bitrate first), each with the audio added."""
    audio_packets = audio_bits = 0.0
    video: list[LayerCost] = []
    for key, kind, packets, octets in counters:
        meter = meters.setdefault((stream, key), RateMeter())
        meter.update(now, packets, octets)
        cost = meter.cost()
        if cost is None or cost.packets_per_second <= 0:
            continue  # not flowing (yet): the ledger keeps the last cost or the default
        if kind == "video":
            video.append(cost)
        else:
            audio_packets += cost.packets_per_second
            audio_bits += cost.bits_per_second
    if not video:
        if not audio_packets:
            return []
        return [LayerCost(packets_per_second=audio_packets, bits_per_second=audio_bits)]
    video.sort(key=lambda cost: cost.bits_per_second, reverse=True)
    return [
        LayerCost(
            packets_per_second=layer.packets_per_second + audio_packets,
            bits_per_second=layer.bits_per_second + audio_bits,
        )
        for layer in video
    ]


class LayerRouter(Protocol):
    """What a ceiling needs of a router (media.router.Router)."""

    def select_layer(
        self, session_id: str, request: LayerRequest, now: float
    ) -> dict[str, object]: ...


class LayeredStream(Protocol):
    def layers(self) -> Sequence[Any]: ...


class LayerCeilings:
    """Viewers admitted below the top layer (``admit_lower_layer``), and the highest
    layer index each may have. The one rule both worker backends apply: the in-process
    one, and each worker process for its own viewers (only it knows the layers), so
    both count a stream's layers the same way (``Stream.layers()``: the active ones)."""

    def __init__(self) -> None:
        self._ceilings: dict[str, int] = {}
        self.capped = 0  # viewers held under a ceiling so far

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._ceilings

    def get(self, session_id: str) -> int | None:
        return self._ceilings.get(session_id)

    def cap(
        self,
        router: LayerRouter,
        session_id: str,
        stream: LayeredStream,
        from_top: int,
        now: float,
    ) -> int | None:
        """The viewer was admitted ``from_top`` layers below the top: it may not climb
        above that layer, or the budget it was admitted under would not hold. The ledger
        counts layers from the top, the router from the bottom. Returns the ceiling, or
        None when there is nothing to cap (one layer, or an audio-only viewer)."""
        layers = stream.layers()
        if len(layers) < 2:
            return None
        ceiling = max(0, len(layers) - 1 - from_top)
        try:
            router.select_layer(session_id, LayerRequest(max_spatial_layer=ceiling), now)
        except PeerError:
            return None  # an audio-only viewer: nothing to cap
        # Kept, not just applied once: every later layer request is held under it.
        self._ceilings[session_id] = ceiling
        self.capped += 1
        return ceiling

    def held(
        self, session_id: str, request: LayerRequest, stream: LayeredStream | None
    ) -> LayerRequest:
        """``request`` as the viewer's ceiling allows it (unchanged without one)."""
        ceiling = self._ceilings.get(session_id)
        if ceiling is None:
            return request
        layers = stream.layers() if stream is not None else []
        return capped_layer_request(request, layers, ceiling)

    def forget(self, session_id: str) -> None:
        self._ceilings.pop(session_id, None)
