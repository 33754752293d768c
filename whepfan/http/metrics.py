"""``GET /metrics``: the server's counters in the Prometheus text exposition format
(version 0.0.4), rendered by prometheus-client from one :class:`ServerStats` snapshot per
scrape.

Counters are per worker (label ``worker``): a replaced worker starts again from zero and
Prometheus' ``rate()`` reads that as a counter reset, which it is. Rates (packets/s and
bytes/s out) are ``rate(whepfan_sent_packets_total[1m])`` and friends; the capacity
gauges show what the admission ledger believes each worker carries against its budget.

With a metrics token configured, a scrape must present it as a bearer token (RFC 6750
§2.1; Prometheus' ``authorization: {credentials: ...}``), checked like the WHIP/WHEP
tokens by :func:`whepfan.http.auth.require_token`; without one the endpoint is open.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from whepfan.http.app import COUNTERS_KEY
from whepfan.http.auth import require_token
from whepfan.http.connections import CONNECTION_GUARD_KEY
from whepfan.workers.stats import ServerStats, WorkerStats

METRICS_PATH = "/metrics"

# Fanout.stats() counters that are packets dropped on the way out (reason = the name).
_FANOUT_DROPS = (
    "dropped_malformed",
    "dropped_too_large",
    "send_errors",
    "send_buffer_full",
    "protect_errors",
)


_LAYER_MOVE_REASONS = {
    "down": ("loss", "remb", "estimate", "ceiling"),
    "up": ("clean", "probe"),
}
_PROBE_OUTCOMES = (
    "started",
    "succeeded",
    "overuse",
    "loss",
    "too_slow",
    "no_feedback",
    "unsent",
    "cancelled",
)


class ServerCollector(Collector):
    """Builds every metric family from a fresh snapshot at each scrape."""

    def __init__(
        self,
        stats: Callable[[], ServerStats],
        http_refusals: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self._stats = stats
        # Refusals the HTTP layer makes before the backend is asked (client_pending_full).
        self._http_refusals = http_refusals

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        workers = [w for w in stats.workers if w.alive]
        yield _gauge("whepfan_workers", "Media workers running.", [((), len(workers))])
        yield _gauge(
            "whepfan_viewers",
            "Viewer sessions (any state) per worker.",
            [((_label(w),), w.viewers) for w in workers],
            labels=["worker"],
        )
        yield _gauge(
            "whepfan_publishers",
            "Publisher sessions (any state) per worker.",
            [((_label(w),), w.publishers) for w in workers],
            labels=["worker"],
        )
        yield _gauge(
            "whepfan_worker_receive_delay_seconds",
            "Longest a datagram waited in each worker's socket, last 2 s: above ~0.1 the "
            "worker is past its capacity and viewers' delay grows (see worker_packet_budget).",
            [((_label(w),), w.receive_delay) for w in workers],
            labels=["worker"],
        )
        yield _gauge(
            "whepfan_worker_send_path",
            "The fan-out's send path per worker, 1 for the one in use: gso (a viewer's run "
            "of packets per UDP GSO entry, media/gso.py) or sendmmsg (a datagram per entry).",
            [
                ((_label(w), path), float(bool(w.fanout.get("gso")) == (path == "gso")))
                for w in workers
                for path in ("gso", "sendmmsg")
            ],
            labels=["worker", "path"],
        )
        yield from _worker_counters(workers)
        yield _latency(workers)
        yield from _capacity(stats, self._http_refusals())


def _worker_counters(workers: list[WorkerStats]) -> Iterable[Metric]:
    def per_worker(name: str, doc: str, source: str, key: str) -> Metric:
        family = CounterMetricFamily(name, doc, labels=["worker"])
        for worker in workers:
            counters = worker.fanout if source == "fanout" else worker.router
            family.add_metric([_label(worker)], counters.get(key, 0))
        return family

    yield per_worker(
        "whepfan_sent_packets", "RTP packets sent to viewers.", "fanout", "packets_sent"
    )
    yield per_worker("whepfan_sent_bytes", "Bytes sent to viewers.", "fanout", "bytes_sent")
    yield per_worker(
        "whepfan_gso_sent_packets",
        "Of whepfan_sent_packets, those sent inside UDP GSO entries (udp(7) UDP_SEGMENT).",
        "fanout",
        "gso_segments",
    )
    yield per_worker(
        "whepfan_ingested_packets", "Publisher RTP packets fanned out.", "fanout", "pushed"
    )
    yield per_worker(
        "whepfan_nacked_packets",
        "Packets viewers asked for again (RFC 4585 §6.2.1 generic NACK).",
        "router",
        "nack_requested",
    )
    yield per_worker(
        "whepfan_retransmissions", "Packets re-sent from the cache.", "fanout", "resent"
    )
    yield per_worker(
        "whepfan_retransmission_misses",
        "NACKed packets no longer in the cache.",
        "fanout",
        "resend_misses",
    )
    nacks = CounterMetricFamily(
        "whepfan_upstream_nacks",
        "Publisher packets NACKed (RFC 4585 §6.2.1, each retry counted), repaired by the "
        "publisher's retransmission, or given up (a keyframe request follows).",
        labels=["worker", "outcome"],
    )
    for worker in workers:
        for outcome in ("sent_upstream", "recovered", "unrepairable"):
            nacks.add_metric(
                [_label(worker), outcome.removesuffix("_upstream")],
                worker.router.get(f"nack_{outcome}", 0),
            )
    yield nacks
    moves = CounterMetricFamily(
        "whepfan_layer_moves",
        "Automatic simulcast layer moves of viewers, by direction and why: down on loss (RTCP "
        "RR), remb, estimate (transport-wide cc) or ceiling; up after clean reports or a "
        "successful headroom probe (media/layers.py).",
        labels=["worker", "direction", "reason"],
    )
    probes = CounterMetricFamily(
        "whepfan_headroom_probes",
        "Headroom probes of viewers with transport-wide cc (media/headroom.py): started, "
        "then succeeded, overuse, loss, too_slow, no_feedback, unsent or cancelled.",
        labels=["worker", "outcome"],
    )
    for worker in workers:
        for direction, reasons in _LAYER_MOVE_REASONS.items():
            for reason in reasons:
                moves.add_metric(
                    [_label(worker), direction, reason],
                    worker.router.get(f"layer_auto_{direction}_{reason}", 0),
                )
        for outcome in _PROBE_OUTCOMES:
            probes.add_metric(
                [_label(worker), outcome], worker.router.get(f"headroom_probes_{outcome}", 0)
            )
    yield moves
    yield probes
    drops = CounterMetricFamily(
        "whepfan_dropped_packets",
        "Packets dropped, by reason (router input and fan-out output).",
        labels=["worker", "reason"],
    )
    keyframes = CounterMetricFamily(
        "whepfan_keyframe_requests",
        "Keyframe requests (PLI, RFC 4585 §6.3.1) towards publishers, sent or throttled.",
        labels=["worker", "outcome"],
    )
    for worker in workers:
        for name, value in sorted(worker.router.items()):
            if name.startswith("drop_"):
                drops.add_metric([_label(worker), name[5:]], value)
        for name in _FANOUT_DROPS:
            drops.add_metric(
                [_label(worker), name.removeprefix("dropped_")], worker.fanout.get(name, 0)
            )
        keyframes.add_metric(
            [_label(worker), "sent"], worker.router.get("keyframe_requests_sent", 0)
        )
        keyframes.add_metric(
            [_label(worker), "throttled"], worker.router.get("keyframe_requests_throttled", 0)
        )
    yield drops
    yield keyframes
    timeouts = CounterMetricFamily(
        "whepfan_connect_timeouts",
        "Sessions ended for not connecting (ICE + DTLS) within the connect timeout.",
        labels=["worker", "kind"],
    )
    for worker in workers:
        for kind in ("viewer", "publisher"):
            timeouts.add_metric(
                [_label(worker), kind], worker.router.get(f"connect_timeouts_{kind}", 0)
            )
    yield timeouts


def _latency(workers: list[WorkerStats]) -> Metric:
    family = HistogramMetricFamily(
        "whepfan_session_setup_seconds",
        "Time from the offer to SRTP keys (ICE + DTLS), per session that connected.",
        labels=["worker"],
    )
    for worker in workers:
        histogram = worker.setup_latency
        bounds = [*(_float(b) for b in histogram.buckets), "+Inf"]
        family.add_metric(
            [_label(worker)],
            list(zip(bounds, histogram.counts, strict=True)),
            histogram.total,
        )
    return family


def _capacity(stats: ServerStats, http_refusals: Mapping[str, int]) -> Iterable[Metric]:
    loads = stats.loads
    yield _gauge(
        "whepfan_worker_load_packets_per_second",
        "Packets/s the admission ledger counts on each worker.",
        [((str(load.worker),), load.packets_per_second) for load in loads],
        labels=["worker"],
    )
    yield _gauge(
        "whepfan_worker_packet_budget",
        "Packets/s each worker may carry (+Inf: no budget).",
        [((str(load.worker),), _budget(load.packet_budget)) for load in loads],
        labels=["worker"],
    )
    yield _gauge(
        "whepfan_worker_capacity_used_ratio",
        "Fraction of each worker's packet budget in use (0 without a budget).",
        [((str(load.worker),), load.used) for load in loads],
        labels=["worker"],
    )
    yield _gauge(
        "whepfan_egress_load_bits_per_second",
        "Bits/s the admission ledger counts for the whole server.",
        [((), sum(load.bits_per_second for load in loads))],
    )
    yield _gauge(
        "whepfan_egress_bit_budget",
        "Egress bits/s the server may send (+Inf: no budget).",
        [((), _budget(stats.egress_bit_budget))],
    )
    refusals = CounterMetricFamily(
        "whepfan_admission_refusals",
        "New sessions refused, by reason: 503, or 429 for client_pending_full (one client "
        "at max_pending_per_client sessions not connected yet).",
        labels=["reason"],
    )
    for reason in (
        "worker_budget",
        "egress_budget",
        "stream_cap",
        "draining",
        "no_worker",
        "worker_behind",
        "max_viewers",
        "pending_full",
    ):
        refusals.add_metric([reason], stats.refusals.get(reason, 0))
    refusals.add_metric(["client_pending_full"], http_refusals.get("client_pending_full", 0))
    yield refusals
    admissions = CounterMetricFamily(
        "whepfan_admissions", "Viewers admitted, by layer.", labels=["layer"]
    )
    for layer in ("top_layer", "lower_layer"):
        admissions.add_metric([layer.removesuffix("_layer")], stats.admissions.get(layer, 0))
    yield admissions
    restarts = CounterMetricFamily("whepfan_worker_restarts", "Workers replaced after they died.")
    restarts.add_metric([], stats.worker_restarts)
    yield restarts
    yield _gauge("whepfan_draining", "1 while the server drains.", [((), int(stats.draining))])
    yield _gauge(
        "whepfan_pending_viewers",
        "Viewers admitted (201) that have not connected (ICE + DTLS) yet.",
        [((), stats.pending_viewers)],
    )
    yield _gauge(
        "whepfan_pending_viewer_limit",
        "Pending viewers at most; beyond, WHEP answers 503 (pending_full; +Inf: no cap).",
        [((), _budget(stats.max_pending_viewers))],
    )


def _gauge(
    name: str,
    doc: str,
    samples: Iterable[tuple[tuple[str, ...], float]],
    *,
    labels: list[str] | None = None,
) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels or [])
    for label_values, value in samples:
        family.add_metric(list(label_values), value)
    return family


def _label(worker: WorkerStats) -> str:
    return str(worker.worker)


def _budget(value: float | None) -> float:
    return math.inf if value is None else value


def _float(bound: float) -> str:
    return repr(float(bound))


class HttpCollector(Collector):
    """The HTTP layer's own counters: refused and broken requests, and connections."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterable[Metric]:
        counters = self._app[COUNTERS_KEY]
        for name, key, doc in (
            (
                "whepfan_http_rate_limited",
                "http_rate_limited",
                "POSTs refused with 429 (a client over its POST rate, ratelimit.py).",
            ),
            (
                "whepfan_http_malformed_requests",
                "http_malformed",
                "Requests that did not parse as HTTP (answered 400 by the HTTP parser).",
            ),
            (
                "whepfan_http_aborted_requests",
                "http_client_aborted",
                "Requests whose body never arrived in full (the client went away mid-body).",
            ),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], counters.get(key, 0))
            yield family
        guard = self._app.get(CONNECTION_GUARD_KEY)
        if guard is None:
            return
        closed = CounterMetricFamily(
            "whepfan_http_connections_closed",
            "HTTP connections the server closed: header_timeout (no complete request head "
            "in time), idle_timeout (keep-alive), shed (idle, to make room under the "
            "connection cap), refused (at the cap with every connection busy).",
            labels=["reason"],
        )
        for reason in ("header_timeout", "idle_timeout", "shed", "refused"):
            closed.add_metric([reason], guard.closed_by_reason.get(reason, 0))
        yield closed
        yield _gauge("whepfan_http_connections", "Open HTTP connections.", [((), len(guard.table))])
        yield _gauge(
            "whepfan_http_connection_limit",
            "Most HTTP connections held open (below the process's file limit).",
            [((), guard.max_connections)],
        )


def add_metrics_route(
    app: web.Application,
    stats: Callable[[], ServerStats],
    *,
    token: str | None = None,
    collectors: Iterable[Collector] = (),
) -> None:
    """Serve ``GET /metrics`` from ``stats`` (called once per scrape); with ``token``, only
    to requests that present it (others get 401 + ``WWW-Authenticate: Bearer``, as
    problem+json from the application's error middleware)."""
    registry = CollectorRegistry(auto_describe=False)
    counters = app[COUNTERS_KEY]
    registry.register(ServerCollector(stats, lambda: counters))
    registry.register(HttpCollector(app))
    for collector in collectors:  # e.g. the cluster's (whepfan/cluster/node.py)
        registry.register(collector)
    # The standard process_* metrics of the serving process (process_cpu_seconds_total
    # is what `whepfan loadtest --server-metrics` plots against viewers). With worker
    # processes it covers the control plane only: each worker is a process of its own.
    ProcessCollector(registry=registry)

    async def metrics(request: web.Request) -> web.Response:
        # Checked before the snapshot: a refused scrape costs no stats collection.
        require_token(token, request.headers.get("Authorization"))
        body = generate_latest(registry)
        response = web.Response(body=body)
        # prometheus-client's content type carries version= and charset= parameters.
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        response.headers["Cache-Control"] = "no-store"
        return response

    app.router.add_get(METRICS_PATH, metrics)
