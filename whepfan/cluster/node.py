"""This node's part in a cluster: upstream pulls, the registry, placement, /api/cluster.

``ClusterNode`` composes the pieces a ``whepfan serve`` with ``--upstream`` or
``--cluster`` adds to a single box, and is hooked into the HTTP layer by one seam:
``place(request, stream, grant)`` runs before a WHEP POST's body is read, once its
credential is checked (``WhipWhepResources.viewer_placement``). It answers 307 to a
better node (placement.py), or makes sure the stream is here (pulling it, upstream.py)
and lets the POST go on to the local router.

A WHEP POST carrying the cluster token is another node pulling: it is never redirected
(the puller chose this node), and it is refused with 503 beyond ``max_upstream_pulls``.
A viewer's POST redirected here carries ``?placed=1`` and is served here, whatever
this node's (possibly one refresh older) view says, so a redirect never loops. When the
redirected POST presented a valid view credential, the Location also carries a placement
grant for the target (``?placement=``, whepfan/http/placement_grants.py): browsers drop
``Authorization`` on a redirect to another origin, and the target takes the grant instead.

The backend is the in-process router (``--workers 1``) or the worker pool: what the node
reports (viewers, budget used and free, the streams it carries) is summed over its
workers, and with a pool the upstream sessions run in worker processes
(pool_backend.py explains the split).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from whepfan import __version__
from whepfan.cluster.placement import choose_upstream, place_viewer
from whepfan.cluster.pool_backend import PoolUpstreams
from whepfan.cluster.registry import CarriedStream, ClusterRegistry, NodeRecord
from whepfan.cluster.upstream import (
    PulledStreams,
    PullFailure,
    SessionOpener,
    StaticUpstream,
    UpstreamError,
    UpstreamPuller,
    UpstreamResolver,
    UpstreamTarget,
)
from whepfan.errors import ServiceUnavailable
from whepfan.http.auth import presented_token, require_token
from whepfan.http.placement_grants import QUERY_PARAMETER as PLACEMENT_GRANT_PARAMETER
from whepfan.http.placement_grants import PlacementGrants, Refusal
from whepfan.http.tokens import Grant
from whepfan.workers.in_process import InProcessWorkers
from whepfan.workers.pool import WorkerPool

log = logging.getLogger("whepfan.cluster")

CLUSTER_PATH = "/api/cluster"
PLACED_PARAMETER = "placed"
FULL_RETRY_AFTER = 10


class ClusterUpstream:
    """The ``UpstreamResolver`` of a cluster node: the registry says who publishes the
    stream; placement.choose_upstream picks that node or, when its pull limit is
    reached, an edge that carries the stream (a tree)."""

    def __init__(self, registry: ClusterRegistry, token: str) -> None:
        self.registry = registry
        self.token = token

    async def __call__(self, stream_name: str) -> UpstreamTarget | None:
        if not self.registry.available:
            raise _registry_down(self.registry, stream_name)
        try:
            owner = await self.registry.stream_owner(stream_name)
        except (RedisError, OSError):
            raise _registry_down(self.registry, stream_name) from None
        if owner is None or owner == self.registry.node_id:
            return None
        nodes = list(self.registry.nodes.values())
        source = choose_upstream(nodes, stream_name, owner, self.registry.node_id)
        if source is None:
            raise UpstreamError(
                PullFailure.REFUSED,
                ServiceUnavailable(
                    f"stream {stream_name!r} is on {owner}, and it and every node carrying "
                    "the stream serve their maximum of upstream pulls",
                    retry_after=5,
                ),
            )
        url = f"{source.url.rstrip('/')}/whep/{urllib.parse.quote(stream_name, safe='')}"
        return UpstreamTarget(url=url, token=self.token, node=source.id)


def _registry_down(registry: ClusterRegistry, stream_name: str) -> UpstreamError:
    return UpstreamError(
        PullFailure.NO_UPSTREAM,
        ServiceUnavailable(
            f"stream {stream_name!r} is not on this node and the cluster registry "
            f"({registry.shown_url}) is unreachable ({registry.last_error or 'not answering'}), "
            "so the node carrying it cannot be found; local streams are still served",
            retry_after=5,
        ),
    )


class ClusterNode:
    """See the module docstring. ``start`` before serving, ``close`` after."""

    def __init__(
        self,
        *,
        backend: InProcessWorkers | WorkerPool,
        puller: UpstreamPuller,
        registry: ClusterRegistry | None = None,
        cluster_token: str | None = None,
        max_upstream_pulls: int | None = None,
        api_token: str | None = None,
        upstream_hosts: PoolUpstreams | None = None,
        placement_grants: PlacementGrants | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.puller = puller
        self.upstream_hosts = upstream_hosts  # with a worker pool: where pulls run
        self.registry = registry
        self.cluster_token = cluster_token
        self.max_upstream_pulls = max_upstream_pulls
        self.api_token = api_token
        self.counters: Counter[str] = Counter()
        self.redirects: Counter[str] = Counter()  # target node -> 307s sent there
        # The grants this node's 307s carry and it accepts (shared with its HTTP layer).
        self.placement_grants = placement_grants
        self.wall_clock = wall_clock  # grants' iat/exp are Unix times (RFC 7519 §2)

    @classmethod
    def create(
        cls,
        *,
        backend: InProcessWorkers | WorkerPool,
        clock: Callable[[], float],
        upstream: str | None,
        upstream_token: str | None,
        cluster: str | None,
        node_url: str | None,
        cluster_token: str | None,
        max_upstream_pulls: int | None,
        grace: float,
        api_token: str | None = None,
        placement_grants: PlacementGrants | None = None,
    ) -> ClusterNode:
        """``--upstream`` (an edge of one fixed WHEP origin, no registry) or ``--cluster``."""
        hosts = PoolUpstreams(backend) if isinstance(backend, WorkerPool) else None
        streams: PulledStreams = backend if isinstance(backend, WorkerPool) else backend.router

        def puller_of(resolve: UpstreamResolver) -> UpstreamPuller:
            opener: SessionOpener | None = hosts
            return UpstreamPuller(
                router=streams, resolve=resolve, clock=clock, grace=grace, open_session=opener
            )

        if cluster is None:
            assert upstream is not None
            puller = puller_of(StaticUpstream(upstream, upstream_token))
            return cls(backend=backend, puller=puller, api_token=api_token, upstream_hosts=hosts)
        assert node_url is not None and cluster_token is not None
        node: ClusterNode
        registry = ClusterRegistry(
            url=cluster,
            node_id=node_url.rstrip("/"),
            describe_self=lambda: node.record(),
            published=lambda: node.published(),
        )
        puller = puller_of(ClusterUpstream(registry, cluster_token))
        node = cls(
            backend=backend,
            puller=puller,
            registry=registry,
            cluster_token=cluster_token,
            max_upstream_pulls=max_upstream_pulls,
            api_token=api_token,
            upstream_hosts=hosts,
            placement_grants=placement_grants,
        )
        return node

    async def start(self) -> None:
        await self.puller.start()
        if self.registry is not None:
            await self.registry.start()

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.close()
        await self.puller.close()

    # what the registry publishes about us -------------------------------------------------

    def published(self) -> set[str]:
        """Streams with a live WHIP publisher here (not pulled)."""
        return {
            name
            for name, stream in self.backend.streams.items()
            if stream.live and not self.puller.pulls(name)
        }

    def record(self) -> NodeRecord:
        assert self.registry is not None
        ledger = self.backend.ledger
        # The node's load is its workers' (the ledger knows the live ones): placement
        # weighs nodes, and a viewer placed here goes to the least loaded worker.
        workers = ledger.workers
        per_worker = ledger.policy.worker_packet_budget
        pulls = self.puller.describe()
        streams: dict[str, CarriedStream] = {}
        for name, stream in self.backend.streams.items():
            pull = pulls.get(name)
            if pull is None and not stream.live:
                continue
            if pull is not None and not pull["connected"]:
                continue  # not carried until media can flow
            layers = ledger.layers(name)
            streams[name] = CarriedStream(
                viewers=len(stream.viewers),
                source=pull["node"] if pull is not None else None,
                viewer_packets_per_second=layers[0].packets_per_second if layers else None,
            )
        return NodeRecord(
            id=self.registry.node_id,
            url=self.registry.node_id,
            viewers=self.backend.viewer_count,
            max_viewers=self.backend.config.max_viewers,
            packets_per_second=sum(ledger.load(w).packets_per_second for w in workers),
            packet_budget=None if per_worker is None else per_worker * len(workers),
            draining=ledger.draining,
            upstream_sessions=self.puller.sessions(),
            max_upstream_pulls=self.max_upstream_pulls,
            version=__version__,
            streams=streams,
        )

    # the viewer_placement seam ------------------------------------------------------------

    def _is_cluster_pull(self, request: web.Request) -> bool:
        token = presented_token(request.headers.get("Authorization"))
        return self.cluster_token is not None and token == self.cluster_token

    async def place(
        self, request: web.Request, stream: str, grant: Grant | None
    ) -> web.Response | None:
        """None once ``stream`` can be viewed here; a 307 to another node; or raises.
        ``grant``: what the POST's credential allows (None: viewing is open)."""
        registry = self.registry
        if self._is_cluster_pull(request):
            self._check_pull_limit(stream, layer=request.query.get("rid"))
        elif (
            registry is not None
            and registry.available
            and request.query.get(PLACED_PARAMETER) is None
        ):
            nodes = list(registry.nodes.values())
            if all(node.id != registry.node_id for node in nodes):
                nodes.append(self.record())  # registered a moment ago: not read back yet
            else:
                # Our own load as it is now, not as of the last refresh.
                nodes = [self.record() if n.id == registry.node_id else n for n in nodes]
            placement = place_viewer(nodes, stream, registry.node_id)
            if placement.node is None:
                self.counters["placement_full"] += 1
                raise ServiceUnavailable(
                    "every node of the cluster is full", retry_after=FULL_RETRY_AFTER
                )
            if not placement.local:
                return self._redirect(request, stream, placement.node, grant)
        try:
            await self.puller.ensure(stream)
        except UpstreamError as exc:
            raise exc.error from None
        return None

    def _check_pull_limit(self, stream: str, *, layer: str | None = None) -> None:
        limit = self.max_upstream_pulls
        if limit is None or self.registry is None:
            return
        served = [
            name
            for node in self.registry.nodes.values()
            for name, carried in node.streams.items()
            if carried.source == self.registry.node_id
        ]
        if layer is not None and stream in served:
            # One more layer (``?rid=``) of a pull already counted: an edge pulls a
            # simulcast stream as one session per layer (upstream.py), and the limit
            # counts streams served, not sessions.
            return
        if len(served) >= limit:
            self.counters["upstream_pulls_refused"] += 1
            raise ServiceUnavailable(
                f"this node serves its maximum of {limit} upstream pulls", retry_after=5
            )

    def _redirect(
        self, request: web.Request, stream: str, node: NodeRecord, grant: Grant | None
    ) -> web.Response:
        """307 (RFC 9110 §15.4.8: method and body kept) to the same endpoint on ``node``;
        the body is not read, so the client sends it again there. A POST that presented
        a credential gets a placement grant for ``node`` standing for it: a browser
        following the 307 to another origin drops Authorization (Fetch §4.4)."""
        query = dict(request.query)
        query.pop(PLACEMENT_GRANT_PARAMETER, None)  # never passed on: it was for this node
        query[PLACED_PARAMETER] = "1"
        if grant is not None and self.placement_grants is not None:
            query[PLACEMENT_GRANT_PARAMETER] = self.placement_grants.issue(
                grant, stream=stream, audience=node.url, now=self.wall_clock()
            )
        location = f"{node.url.rstrip('/')}{request.path}?{urllib.parse.urlencode(query)}"
        self.redirects[node.id] += 1
        response = web.Response(status=307, headers={"Location": location})
        # aiohttp would otherwise drain the unread body; the client resends it anyway.
        response.force_close()
        return response

    # observability -----------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(CLUSTER_PATH, self.get_cluster)

    async def get_cluster(self, request: web.Request) -> web.Response:
        require_token(self.api_token, request.headers.get("Authorization"))
        return web.json_response(self.describe())

    def describe(self) -> dict[str, Any]:
        """``GET /api/cluster``: the registry's view (nodes, load, streams and where each
        node has them from) and this node's pulls."""
        document: dict[str, Any] = {"pulls": self.puller.describe()}
        if self.upstream_hosts is not None:
            for name, pull in document["pulls"].items():
                # Which worker process holds the session (null while it has none).
                pull.update(self.upstream_hosts.where(name) or {"worker": None})
        if self.registry is not None:
            document.update(self.registry.describe())
            document["nodes"] = [
                {
                    "id": node.id,
                    "url": node.url,
                    "viewers": node.viewers,
                    "max_viewers": node.max_viewers,
                    "packets_per_second": node.packets_per_second,
                    "packet_budget": node.packet_budget,
                    "draining": node.draining,
                    "upstream_sessions": node.upstream_sessions,
                    "streams": {
                        name: {
                            "viewers": carried.viewers,
                            "from": carried.source,
                            "viewer_packets_per_second": carried.viewer_packets_per_second,
                        }
                        for name, carried in node.streams.items()
                    },
                }
                for node in sorted(self.registry.nodes.values(), key=lambda n: n.id)
            ]
        document["redirects"] = dict(self.redirects)
        return document

    def collector(self) -> Collector:
        """This node's families for ``/metrics``."""
        return ClusterCollector(self)


def _grant_family(grants: PlacementGrants) -> Metric:
    family = CounterMetricFamily(
        "whepfan_cluster_placement_grants",
        "Placement grants (the credential a 307 carries for browsers, which drop "
        "Authorization on a cross-origin redirect): issued by this node's 307s, and "
        "accepted or refused (by reason) on POSTs to this node.",
        labels=["outcome", "reason"],
    )
    family.add_metric(["issued", ""], grants.counters.get("issued", 0))
    family.add_metric(["accepted", ""], grants.counters.get("accepted", 0))
    for reason in Refusal:
        family.add_metric(
            ["refused", reason.value], grants.counters.get(f"refused_{reason.value}", 0)
        )
    return family


class ClusterCollector(Collector):
    """The cluster's families in ``/metrics``: upstream sessions, pull failures by
    reason, redirects by target node, registry reachability."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    def collect(self) -> Iterable[Metric]:
        node = self._node
        puller = node.puller
        sessions = GaugeMetricFamily(
            "whepfan_cluster_upstream_sessions",
            "Upstream WHEP sessions this node pulls streams over, by the simulcast layer "
            'each carries (its rid; "" for a single-layer stream).',
            labels=["layer"],
        )
        by_layer = puller.sessions_by_layer()
        by_layer.setdefault("", 0)  # an idle node reports 0, not nothing
        for layer, count in sorted(by_layer.items()):
            sessions.add_metric([layer], count)
        yield sessions
        started = CounterMetricFamily(
            "whepfan_cluster_pulls", "Upstream pulls started (first pulls and re-pulls)."
        )
        started.add_metric([], puller.counters.get("pulls_started", 0))
        yield started
        failures = CounterMetricFamily(
            "whepfan_cluster_pull_failures",
            "Upstream pulls that failed or were lost, by reason (upstream.PullFailure).",
            labels=["reason"],
        )
        for reason in PullFailure:
            failures.add_metric(
                [reason.value], puller.counters.get(f"pull_failures_{reason.value}", 0)
            )
        yield failures
        redirects = CounterMetricFamily(
            "whepfan_cluster_redirects",
            "WHEP POSTs answered 307 to another node, by target node.",
            labels=["node"],
        )
        for target, count in sorted(node.redirects.items()):
            redirects.add_metric([target], count)
        yield redirects
        refused = CounterMetricFamily(
            "whepfan_cluster_refusals",
            "WHEP POSTs refused by the cluster: full (every node), pull_limit (this "
            "node serves its --max-upstream-pulls).",
            labels=["reason"],
        )
        refused.add_metric(["full"], node.counters.get("placement_full", 0))
        refused.add_metric(["pull_limit"], node.counters.get("upstream_pulls_refused", 0))
        yield refused
        if node.placement_grants is not None:
            yield _grant_family(node.placement_grants)
        if node.registry is not None:
            available = GaugeMetricFamily(
                "whepfan_cluster_registry_up", "1 while the Redis registry answers, else 0."
            )
            available.add_metric([], float(node.registry.available))
            yield available
            nodes = GaugeMetricFamily(
                "whepfan_cluster_nodes", "Nodes in this node's view of the registry."
            )
            nodes.add_metric([], len(node.registry.nodes))
            yield nodes
