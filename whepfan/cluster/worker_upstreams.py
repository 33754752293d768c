"""Upstream pulls whose transport runs in a worker process (``--workers N``).

With worker processes the main process keeps every pull's bookkeeping (the cluster's
``UpstreamPuller``: ensure, the grace release, re-pulls with backoff; the registry and
placement; cluster/pool_backend.py) and asks one worker, chosen as a WHIP publisher's
worker is (``WorkerPool.choose_origin``), to hold the session: ``UPSTREAM_OPEN`` runs an
``UpstreamSession`` (cluster/upstream.py) on this worker's router, so the upstream is the
stream's publisher here, exactly as a WHIP publisher would be::

    origin node --SRTP--> worker W: UpstreamSession (own UDP socket) -> UpstreamFeed -> Ingest
                                       | IngestTap: plain RTP once per other worker (relay.py)
                                       v
                          other workers: relay copies -> their viewers
                          keyframe requests: their throttle -> relay -> W's throttle -> PLI

Nothing crosses the control channel per packet: media and keyframe requests take the
relay, as for any stream originated on W. The control channel carries the open (its
reply waits for the upstream's WHEP answer, so the handler returns an awaitable:
control.py), the close, a transport's loss (``UPSTREAM_LOST``) and, once per stats
interval, each session's state and counts (``UPSTREAM_REPORT``). The WHEP resource is
DELETEd by the main process, which has its Location from the open's reply, so the
DELETE goes out even when this process was killed.

It is a worker extension (workers/node.py): ``workers/`` never imports the cluster; the
pool is given ``WorkerUpstreams.install`` (cluster/pool_backend.py ``WORKER_EXTENSIONS``),
and every worker process runs it at start.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

from whepfan.cluster.upstream import UpstreamError, UpstreamSession, UpstreamTarget
from whepfan.media.relay import RelayCopies
from whepfan.media.router import Router
from whepfan.workers import control
from whepfan.workers.node import WorkerNode

log = logging.getLogger("whepfan.cluster.worker")

SendEvent = Callable[[dict[str, Any]], None]


class WorkerUpstreams:
    """The upstream sessions of one worker process, keyed by the main process's id (a
    ``workers.node.WorkerExtension``)."""

    @classmethod
    def install(cls, node: WorkerNode) -> WorkerUpstreams:
        """The extension factory the pool's workers run at start."""
        return cls(
            router=node.router,
            relays=node.relays,
            send_event=node.send_event,
            clock=node.media.now,
        )

    def __init__(
        self,
        *,
        router: Router,
        relays: RelayCopies,
        send_event: SendEvent,
        clock: Callable[[], float],
    ) -> None:
        self.router = router
        self.relays = relays
        self._send_event = send_event
        self._clock = clock
        self._sessions: dict[str, UpstreamSession] = {}
        self._http: aiohttp.ClientSession | None = None

    # the extension ---------------------------------------------------------------------------

    def handlers(self) -> dict[str, control.Handler]:
        return {control.UPSTREAM_OPEN: self.open, control.UPSTREAM_CLOSE: self.close}

    def report(self) -> dict[str, Any] | None:
        """``UPSTREAM_REPORT``: per session, connected or not and what it received."""
        if not self._sessions:
            return None
        upstreams = {
            upstream_id: {
                "connected": session.connected,
                "packets": session.packets_received,
                "bytes": session.bytes_received,
            }
            for upstream_id, session in self._sessions.items()
        }
        return {"event": control.UPSTREAM_REPORT, "upstreams": upstreams}

    # control operations ------------------------------------------------------------------

    def open(self, args: dict[str, Any], now: float) -> Coroutine[Any, Any, dict[str, Any]]:
        """``UPSTREAM_OPEN {upstream, stream, target}``: answered once the upstream's
        answer is attached (``{"attached": true, "session", "canonical_offer",
        "location"}``), or with ``{"failure": {"reason", "error"}}`` (a PullFailure and the
        error the viewer should get)."""
        target = args["target"]
        return self._open(
            str(args["upstream"]),
            str(args["stream"]),
            UpstreamTarget(
                url=str(target["url"]), token=target.get("token"), node=target.get("node")
            ),
        )

    def close(self, args: dict[str, Any], now: float) -> None:
        """``UPSTREAM_CLOSE {upstream}``: end the session here (DTLS close_notify, the feed
        detached: viewers stay, waiting). Unknown ids are ended already."""
        session = self._sessions.pop(str(args["upstream"]), None)
        if session is not None:
            session.close()
            self._forget_offer(session)

    # the sessions ---------------------------------------------------------------------------

    async def _open(
        self, upstream_id: str, stream_name: str, target: UpstreamTarget
    ) -> dict[str, Any]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        if stream_name in self.relays.relayed:
            # The main process made this worker the stream's origin: a relay copy left
            # here steps aside, as for a WHIP publisher (RelayCopies.publish).
            self.relays.detach_relay(stream_name, self._clock())
        session = UpstreamSession(
            router=self.router,
            stream_name=stream_name,
            target=target,
            http=self._http,
            clock=self._clock,
            on_lost=functools.partial(self._lost, upstream_id),
        )
        self._sessions[upstream_id] = session
        try:
            await session.start()
        except UpstreamError as exc:
            if self._sessions.get(upstream_id) is session:
                del self._sessions[upstream_id]
            return {"failure": {"reason": exc.reason.value, "error": control.error_json(exc.error)}}
        feed = session.feed
        assert feed is not None and session.answer is not None
        stand_in = feed.session
        if self._sessions.get(upstream_id) is not session or not feed.attached or not stand_in:
            # Closed while signalling, or a WHIP publisher is here: it wins (feed.py).
            self._sessions.pop(upstream_id, None)
            session.close()
            return {"attached": False, "location": session.location}
        self.relays.canonical_offers[stream_name] = session.answer
        log.info("upstream %s of %r attached here", upstream_id, stream_name)
        return {
            "attached": True,
            "session": control.session_json(stand_in),
            "canonical_offer": session.answer,
            "location": session.location,
        }

    def _lost(self, upstream_id: str, session: UpstreamSession, reason: str) -> None:
        """The transport failed (the session closed itself): the main process re-pulls."""
        if self._sessions.get(upstream_id) is not session:
            return
        del self._sessions[upstream_id]
        self._forget_offer(session)
        self._send_event(
            {"event": control.UPSTREAM_LOST, "upstream": upstream_id, "reason": reason}
        )

    def _forget_offer(self, session: UpstreamSession) -> None:
        # Only if the tracks are still the upstream's (a WHIP publisher may have replaced a
        # stalled feed, RelayCopies.publish then keeps its own offer).
        if self.relays.canonical_offers.get(session.stream_name) == session.answer:
            del self.relays.canonical_offers[session.stream_name]

    async def aclose(self) -> None:
        """The worker stops: every session ends here (the main process DELETEs them)."""
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            session.close()
        if self._http is not None:
            await self._http.close()
