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
interval, each session's state and counts (``UPSTREAM_REPORT``).

A simulcast stream is pulled as one session per layer (cluster/upstream.py "Layers"),
all of them here, in the worker of the stream's first session: they are legs of one
``UpstreamFeed`` (feed.py), so this router has one track per layer exactly as a
one-worker edge has. The open takes the layer (``rid``), the origin's ``layers`` and
whether the session carries the audio, and its reply carries the session's Links (the
main process's layer watch reads the origin's event stream through them) and the feed's
``description()``: one track per layer, which the other workers' relay copies are made
from, as from a WHIP simulcast publisher's offer. ``UPSTREAM_ARRANGE`` pins a session
to its layer and lays the tracks out again (``UpstreamSession.arrange``); its reply
carries the description too, which the main process re-sends to the other workers when
the layers changed. The WHEP resource is
DELETEd by the main process, which has its Location from the open's reply, so the
DELETE goes out even when this process was killed.

It is a worker extension (workers/node.py): ``workers/`` never imports the cluster; the
pool is given ``WorkerUpstreams.install`` (cluster/pool_backend.py ``WORKER_EXTENSIONS``),
and every worker process runs it at start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

from whepfan.cluster.feed import UpstreamFeed
from whepfan.cluster.upstream import (
    LAYER_WAIT,
    UpstreamError,
    UpstreamSession,
    UpstreamTarget,
    layers_measured,
)
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
        self._described: dict[str, str] = {}  # stream -> the description set as its offer
        self._http: aiohttp.ClientSession | None = None

    # the extension ---------------------------------------------------------------------------

    def handlers(self) -> dict[str, control.Handler]:
        return {
            control.UPSTREAM_OPEN: self.open,
            control.UPSTREAM_CLOSE: self.close,
            control.UPSTREAM_ARRANGE: self.arrange,
            control.UPSTREAM_MEASURED: self.measured,
        }

    def report(self) -> dict[str, Any] | None:
        """``UPSTREAM_REPORT``: per session, connected or not and what it received. Also,
        once per stats interval like it, each pulled stream's SSE ``layers`` event (EXT
        §4.3.3) from here, its origin worker: the stand-in publisher has no address, so
        the publisher feedback timer that reports it for a WHIP publisher never runs
        (cluster/upstream.py ``_report_layers`` does this on a one-worker edge)."""
        if not self._sessions:
            return None
        self._report_layers()
        upstreams = {
            upstream_id: {
                "connected": session.connected,
                "packets": session.packets_received,
                "bytes": session.bytes_received,
            }
            for upstream_id, session in self._sessions.items()
        }
        return {"event": control.UPSTREAM_REPORT, "upstreams": upstreams}

    def _report_layers(self) -> None:
        now = self._clock()
        for name in {session.stream_name for session in self._sessions.values()}:
            stream = self.router.streams.get(name)
            feed = UpstreamFeed.find(self.router, name)
            if stream is not None and stream.active and feed is not None and feed.stream is stream:
                self.router.layers.report(stream, now)

    # control operations ------------------------------------------------------------------

    def open(self, args: dict[str, Any], now: float) -> Coroutine[Any, Any, dict[str, Any]]:
        """``UPSTREAM_OPEN {upstream, stream, target[, rid, layers, audio]}``: answered
        once the upstream's answer is attached (``{"attached": true, "session",
        "canonical_offer", "location", "links"}``: the stand-in publisher of the stream's
        feed, its ``description()``, the session resource and its Links), or with
        ``{"failure": {"reason", "error"}}`` (a PullFailure and the error the viewer
        should get). ``rid``: the layer the session is pinned to, of the origin's
        ``layers`` (low to high); ``audio`` false for a layer's video-only session."""
        target = args["target"]
        rid = args.get("rid")
        return self._open(
            str(args["upstream"]),
            str(args["stream"]),
            UpstreamTarget(
                url=str(target["url"]), token=target.get("token"), node=target.get("node")
            ),
            rid=None if rid is None else str(rid),
            layers=tuple(str(layer) for layer in args.get("layers") or ()),
            audio=bool(args.get("audio", True)),
        )

    def arrange(self, args: dict[str, Any], now: float) -> Coroutine[Any, Any, dict[str, Any]]:
        """``UPSTREAM_ARRANGE {upstream, rid, layers}``: pin the session to layer ``rid``
        of the origin's ``layers`` and lay out the stream's tracks for them; answered
        ``{"arranged": bool, "canonical_offer"}`` once the upstream answered the layer
        POST (False: refused, or the session is gone; nothing changed then)."""
        rid = args.get("rid")
        return self._arrange(
            str(args["upstream"]),
            None if rid is None else str(rid),
            tuple(str(layer) for layer in args.get("layers") or ()),
        )

    def close(self, args: dict[str, Any], now: float) -> None:
        """``UPSTREAM_CLOSE {upstream}``: end the session here (DTLS close_notify, the feed
        detached: viewers stay, waiting). Unknown ids are ended already."""
        session = self._sessions.pop(str(args["upstream"]), None)
        if session is not None:
            session.close()
            self._forget_offer(session)

    def measured(self, args: dict[str, Any], now: float) -> Coroutine[Any, Any, dict[str, Any]]:
        """``UPSTREAM_MEASURED {stream}``: answered ``{"measured": bool}`` once every video
        layer of the stream here has its picture size (upstream.layers_measured), or after
        ``LAYER_WAIT`` (the main process waits no longer either)."""
        return self._measured(str(args["stream"]))

    async def _measured(self, stream_name: str) -> dict[str, Any]:
        try:
            async with asyncio.timeout(LAYER_WAIT):
                await layers_measured(self.router, stream_name)
        except TimeoutError:
            return {"measured": False}
        return {"measured": True}

    # the sessions ---------------------------------------------------------------------------

    async def _open(
        self,
        upstream_id: str,
        stream_name: str,
        target: UpstreamTarget,
        *,
        rid: str | None,
        layers: tuple[str, ...],
        audio: bool,
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
            rid=rid,
            layers=layers,
            audio=audio,
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
        description = self._describe(session)
        log.info(
            "upstream %s of %r%s attached here",
            upstream_id,
            stream_name,
            "" if rid is None else f" layer {rid}",
        )
        return {
            "attached": True,
            "session": control.session_json(stand_in),
            "canonical_offer": description,
            "location": session.location,
            "links": session.links,
        }

    async def _arrange(
        self, upstream_id: str, rid: str | None, layers: tuple[str, ...]
    ) -> dict[str, Any]:
        session = self._sessions.get(upstream_id)
        if session is None or not await session.arrange(rid, layers):
            return {"arranged": False, "canonical_offer": None}
        return {"arranged": True, "canonical_offer": self._describe(session)}

    def _describe(self, session: UpstreamSession) -> str:
        """The feed's description, which relay copies mirror (RelayCopies.canonical_offers
        is what a worker restarting elsewhere would be sent: the pool keeps its own)."""
        feed = session.feed
        description = feed.description() if feed is not None else None
        if description is None:
            assert session.answer is not None
            description = session.answer
        self.relays.canonical_offers[session.stream_name] = description
        self._described[session.stream_name] = description
        return description

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
        # Only when the stream's last session ended (the other layers' sessions go on
        # feeding it otherwise), and only if the tracks are still the upstream's (a WHIP
        # publisher may have replaced a stalled feed, RelayCopies.publish then keeps its
        # own offer).
        name = session.stream_name
        if any(other.stream_name == name for other in self._sessions.values()):
            return
        ours = self._described.pop(name, None)
        if ours is not None and self.relays.canonical_offers.get(name) == ours:
            del self.relays.canonical_offers[name]

    async def aclose(self) -> None:
        """The worker stops: every session ends here (the main process DELETEs them)."""
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            session.close()
        if self._http is not None:
            await self._http.close()
