"""This node's part in a cluster: upstream pulls, the registry, placement, /api/cluster.

``ClusterNode`` composes the pieces a ``whepfan serve`` with ``--upstream`` or
``--cluster`` adds to a single box, and is hooked into the HTTP layer by one seam:
``place(request, stream)`` runs before a WHEP POST's body is read
(``WhipWhepResources.viewer_placement``). It answers with a redirect to a better node
(placement.py), or makes sure the stream is here (pulling it, upstream.py) and lets the
POST go on to the local router.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from whepfan.cluster.upstream import StaticUpstream, UpstreamError, UpstreamPuller
from whepfan.media.router import Router

log = logging.getLogger("whepfan.cluster")

CLUSTER_PATH = "/api/cluster"


class ClusterNode:
    """See the module docstring. ``start`` before serving, ``close`` after."""

    def __init__(self, *, router: Router, puller: UpstreamPuller) -> None:
        self.router = router
        self.puller = puller

    @classmethod
    def static_edge(
        cls,
        *,
        router: Router,
        clock: Callable[[], float],
        template: str,
        token: str | None,
        grace: float,
    ) -> ClusterNode:
        """``--upstream``: an edge of one fixed WHEP origin, no registry."""
        puller = UpstreamPuller(
            router=router, resolve=StaticUpstream(template, token), clock=clock, grace=grace
        )
        return cls(router=router, puller=puller)

    async def start(self) -> None:
        await self.puller.start()

    async def close(self) -> None:
        await self.puller.close()

    async def place(self, request: web.Request, stream: str) -> web.Response | None:
        """The ``viewer_placement`` seam: None once ``stream`` can be viewed here."""
        try:
            await self.puller.ensure(stream)
        except UpstreamError as exc:
            raise exc.error from None
        return None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(CLUSTER_PATH, self.get_cluster)

    async def get_cluster(self, request: web.Request) -> web.Response:
        return web.json_response(self.describe())

    def describe(self) -> dict[str, Any]:
        return {"pulls": self.puller.describe()}

    def metrics(self) -> dict[str, float]:
        """Counters for /metrics (http/metrics.py renders them)."""
        values: dict[str, float] = {"upstream_sessions": float(self.puller.sessions())}
        values.update({key: float(value) for key, value in self.puller.counters.items()})
        return values
