"""An edge with ``--workers N``: upstream sessions whose transport runs in a worker process.

Where the pull runs
-------------------
The upstream session runs inside one worker process and is that stream's publisher
there; the main process keeps the cluster-level state. Split:

* **main process** (this module, ``UpstreamPuller``, ``ClusterNode``): the registry and
  placement, and the puller's bookkeeping (``ensure``, the grace release after the last
  viewer on *any* worker, re-pulls with backoff, counters, ``/api/cluster``). The puller
  reads the pool's streams, whose viewers are every worker's, and opens its sessions
  through ``PoolUpstreams``: the worker is the one a WHIP publisher of the stream would
  get (``WorkerPool.choose_origin``: the stream's previous origin if it lives, else the
  worker holding most of its viewers, else the least loaded).
* **the worker** (worker_upstreams.py): the ``UpstreamSession`` itself (its UDP
  socket, ICE, DTLS, the WHEP POST) and its ``UpstreamFeed`` into that worker's router.
  The stream is then originated there exactly as a WHIP publisher's: the relay
  (media/relay.py) carries its RTP to the other workers' viewers, and their keyframe
  requests come back over the relay through each worker's throttle, then the origin
  worker's, to the upstream as PLI. Nothing crosses the control channel per packet.

Why not pull in the main process and feed the relay from there: the main process has no
router (no ingest, no packet cache for the viewers' NACKs, no keyframe throttle, no
liveness); it would need a second ingest path and would put every packet through one
more process hop. In a worker, the upstream is one more publisher.

The control channel carries ``UPSTREAM_OPEN`` (answered once the upstream's answer is
attached: ``WorkerPool.request_async``, so the HTTP loop does not block for the origin's
round trip), ``UPSTREAM_CLOSE``, and from the worker ``UPSTREAM_LOST`` and
``UPSTREAM_REPORT``. The open's reply makes the session the stream's publisher in the
pool's registry (``WorkerPool.attach_feed``): viewers are admitted on every worker, the
other workers get relay copies of the upstream's answer, and a worker that (re)starts
gets one too. The WHEP resource is DELETEd from here, so that a killed worker's upstream
session is ended at the origin as well.

A simulcast stream is pulled as one session per layer (cluster/upstream.py "Layers"), as
on a one-worker edge, and the puller's decisions are the same (simulcast.py): every
session of a stream goes to the worker of its first one, so that they are the legs of
one feed there (feed.py) and that worker's router has one track per layer. The pool sees
one publisher for them all, the feed's stand-in (``_PoolFeed``), registered by the first
session and unregistered when the last one ends; its canonical offer is the feed's
description with one ``a=rid`` per layer, so the other workers' relay copies have the
layers as tracks, exactly as for a WHIP simulcast publisher there, and are made again
(``WorkerPool.update_feed``) when the layers change. A session's open reply carries its
Links, through which the puller's layer watch reads the origin's event stream from this
process; pinning a session is ``UPSTREAM_ARRANGE``, and ``UPSTREAM_MEASURED`` is the
puller's wait for the layers' picture sizes before a cold edge's first answer (they are
measured in that worker).

When the worker holding a pull exits, the pool unregisters the stand-in publisher (the
stream goes inactive, the other workers' viewers stay, waiting) and tells the sessions
(every layer's), which report the loss to the puller: it pulls again with backoff, into
another worker (the one holding the viewers still waiting), whose relay copy becomes the stream and
ingest's rebase continues its viewers' lines. The killed worker's own viewers were told
to reconnect (SSE ``reconnect``) and re-POST.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from whepfan.client.signalling import delete_session
from whepfan.cluster.upstream import (
    LAYER_WAIT,
    SIGNALLING_TIMEOUT,
    PullFailure,
    PullSession,
    UpstreamError,
    UpstreamTarget,
)
from whepfan.cluster.worker_upstreams import WorkerUpstreams
from whepfan.errors import Conflict, ServiceUnavailable, WhepfanError
from whepfan.workers import control
from whepfan.workers.node import ExtensionFactory
from whepfan.workers.pool import WorkerPool

# The worker's POST has SIGNALLING_TIMEOUT; its reply comes a little after.
OPEN_TIMEOUT = SIGNALLING_TIMEOUT + 5.0
DELETE_TIMEOUT = 5.0

# What a cluster node's worker pool runs in each worker (workers/node.py extensions).
WORKER_EXTENSIONS: tuple[ExtensionFactory, ...] = (WorkerUpstreams.install,)


class PoolUpstreams:
    """The puller's ``SessionOpener`` on a worker pool, and its sessions by id."""

    def __init__(self, pool: WorkerPool) -> None:
        if WorkerUpstreams.install not in pool.extensions:
            # Its workers would answer UPSTREAM_OPEN "unknown control operation".
            raise ValueError("the pool's workers need WORKER_EXTENSIONS for upstream pulls")
        self.pool = pool
        self.sessions: dict[str, PoolUpstreamSession] = {}
        self.feeds: dict[str, _PoolFeed] = {}  # stream -> its sessions' publisher in the pool
        self._ids = itertools.count(1)
        pool.event_handlers[control.UPSTREAM_LOST] = self._on_lost
        pool.event_handlers[control.UPSTREAM_REPORT] = self._on_report

    def __call__(
        self,
        *,
        stream_name: str,
        target: UpstreamTarget,
        http: aiohttp.ClientSession,
        clock: Callable[[], float],
        on_lost: Callable[[PullSession, str], None],
        rid: str | None = None,
        layers: Sequence[str] = (),
        audio: bool = True,
    ) -> PoolUpstreamSession:
        return PoolUpstreamSession(
            self,
            upstream_id=f"upstream-{next(self._ids)}",
            stream_name=stream_name,
            target=target,
            http=http,
            on_lost=on_lost,
            rid=rid,
            layers=layers,
            audio=audio,
        )

    async def layers_measured(self, stream_name: str) -> None:
        """``UPSTREAM_MEASURED`` in the worker holding the stream's sessions (the puller's
        ``MeasuringOpener``): a cold edge's first viewer is answered once that worker has
        measured every layer, so the policy starts it in the middle (upstream.py)."""
        feed = self.feeds.get(stream_name)
        if feed is None:
            return
        with contextlib.suppress(WhepfanError):
            await self.pool.request_async(
                feed.worker,
                control.UPSTREAM_MEASURED,
                {"stream": stream_name},
                timeout=LAYER_WAIT + 1.0,
            )

    def where(self, stream_name: str) -> dict[str, int | None] | None:
        """The worker holding ``stream_name``'s upstream sessions (index and pid)."""
        feed = self.feeds.get(stream_name)
        if feed is None or feed.publisher_id is None:
            return None
        handle = self.pool.handles.get(feed.worker)
        pid = handle.process.pid if handle is not None else None
        return {"worker": feed.worker, "worker_pid": pid}

    def _on_lost(self, worker: int, message: dict[str, Any]) -> None:
        session = self.sessions.get(str(message.get("upstream")))
        if session is not None and session.worker == worker:
            session.lost(str(message.get("reason") or "upstream lost"), worker_closed=True)

    def _on_report(self, worker: int, message: dict[str, Any]) -> None:
        for upstream_id, entry in (message.get("upstreams") or {}).items():
            session = self.sessions.get(str(upstream_id))
            if session is not None and session.worker == worker:
                session.reported(entry)


@dataclass(eq=False)
class _PoolFeed:
    """A pulled stream's feed in one worker as the pool sees it: one publisher (the
    feed's stand-in) for all the stream's layer sessions there (module docstring)."""

    hosts: PoolUpstreams
    stream_name: str
    worker: int
    publisher_id: str | None = None
    sessions: set[PoolUpstreamSession] = field(default_factory=set)

    def describe(self, canonical_offer: str | None) -> None:
        """The feed's tracks are ``canonical_offer`` now: relay copies follow."""
        if canonical_offer is not None and self.publisher_id is not None:
            self.hosts.pool.update_feed(self.publisher_id, canonical_offer)

    def leave(self, session: PoolUpstreamSession) -> None:
        """``session`` ended; the last one takes the publisher away (viewers stay, waiting)."""
        self.sessions.discard(session)
        if not self.sessions:
            self.release()

    def release(self) -> None:
        if self.hosts.feeds.get(self.stream_name) is self:
            del self.hosts.feeds[self.stream_name]
        if self.publisher_id is not None:
            publisher_id, self.publisher_id = self.publisher_id, None
            self.hosts.pool.detach_feed(publisher_id)

    def lost(self, reason: str) -> None:
        """The pool unregistered the publisher (its worker exited): every session is lost."""
        self.publisher_id = None
        if self.hosts.feeds.get(self.stream_name) is self:
            del self.hosts.feeds[self.stream_name]
        for session in list(self.sessions):
            session.lost(reason, worker_closed=False)


class PoolUpstreamSession:
    """One pull's session (cluster/upstream.py ``PullSession``, and a
    ``LayeredPullSession``) held by a worker process: see the module docstring.
    ``start`` raises ``UpstreamError`` as ``UpstreamSession`` does; the counts and
    ``connected`` are the worker's last report."""

    def __init__(
        self,
        hosts: PoolUpstreams,
        *,
        upstream_id: str,
        stream_name: str,
        target: UpstreamTarget,
        http: aiohttp.ClientSession,
        on_lost: Callable[[PullSession, str], None],
        rid: str | None = None,
        layers: Sequence[str] = (),
        audio: bool = True,
    ) -> None:
        self._hosts = hosts
        self.id = upstream_id
        self.stream_name = stream_name
        self.target = target
        self.rid = rid
        self.layers = tuple(layers)
        self.audio = audio
        self._http = http
        self._on_lost = on_lost
        self.worker: int | None = None
        self.location: str | None = None
        self._links: dict[str, str] = {}
        self._feed: _PoolFeed | None = None
        self.packets_received = 0
        self.bytes_received = 0
        self.closed = False
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected and not self.closed

    @property
    def attached(self) -> bool:
        """One of the sessions of its stream's publisher in the pool's registry."""
        return self._feed is not None and self._feed.publisher_id is not None and not self.closed

    @property
    def links(self) -> Mapping[str, str]:
        """rel -> URL of the upstream 201's Links, as the worker received them."""
        return self._links

    def _choose_worker(self) -> int:
        # The layers of a stream are legs of one feed: where its other sessions are.
        feed = self._hosts.feeds.get(self.stream_name)
        pool = self._hosts.pool
        if feed is not None and feed.sessions:
            handle = pool.handles.get(feed.worker)
            if handle is not None and handle.serving:
                return feed.worker
        return pool.choose_origin(self.stream_name)

    async def start(self) -> None:
        pool = self._hosts.pool
        try:
            self.worker = self._choose_worker()
        except ServiceUnavailable as exc:
            raise UpstreamError(PullFailure.WORKER, exc) from None
        self._hosts.sessions[self.id] = self
        target = {"url": self.target.url, "token": self.target.token, "node": self.target.node}
        args = {
            "upstream": self.id,
            "stream": self.stream_name,
            "target": target,
            "rid": self.rid,
            "layers": list(self.layers),
            "audio": self.audio,
        }
        try:
            reply = await pool.request_async(
                self.worker, control.UPSTREAM_OPEN, args, timeout=OPEN_TIMEOUT
            )
        except ServiceUnavailable as exc:
            self.close()
            raise UpstreamError(PullFailure.WORKER, exc) from None
        except WhepfanError as exc:
            self.close()
            raise UpstreamError(PullFailure.TRANSPORT, exc) from None
        except asyncio.CancelledError:
            self.close()  # released while signalling: the worker ends it
            raise
        failure = reply.get("failure")
        if failure is not None:
            self._forget()
            self.closed = True
            raise UpstreamError(
                PullFailure(failure["reason"]), control.error_from_json(failure["error"])
            )
        self.location = reply.get("location")
        self._links = {str(rel): str(url) for rel, url in (reply.get("links") or {}).items()}
        if self.closed:
            raise UpstreamError(PullFailure.TRANSPORT, ServiceUnavailable("pull cancelled"))
        if not reply.get("attached"):
            # A WHIP publisher is on that worker (cluster/feed.py: it wins). The session
            # stays closed; the puller DELETEs the resource when it lets the pull go.
            self.close()
            return
        self._join(reply)

    def _join(self, reply: dict[str, Any]) -> None:
        """Become one of the sessions of the stream's feed in the pool: the first one
        registers its publisher, the others re-describe its tracks when they changed."""
        assert self.worker is not None
        pool = self._hosts.pool
        stand_in = reply["session"]
        offer = str(reply["canonical_offer"])
        feed = self._hosts.feeds.get(self.stream_name)
        if feed is not None and (feed.worker, feed.publisher_id) == (self.worker, stand_in["id"]):
            feed.sessions.add(self)
            self._feed = feed
            feed.describe(offer)
            return
        if feed is not None:
            # Its sessions ended in the worker (their losses are on the way): the feed
            # there started afresh with this session.
            feed.release()
        feed = _PoolFeed(self._hosts, self.stream_name, self.worker)
        try:
            publisher = pool.attach_feed(self.worker, stand_in, offer, feed.lost)
        except Conflict:
            self.close()  # a WHIP publisher reached the pool meanwhile: it wins
            return
        feed.publisher_id = publisher.id
        feed.sessions.add(self)
        self._feed = self._hosts.feeds[self.stream_name] = feed

    async def arrange(self, rid: str | None, layers: Sequence[str]) -> bool:
        """``UpstreamSession.arrange`` in the worker (``UPSTREAM_ARRANGE``): pin it to
        ``rid`` of ``layers`` and lay the stream's tracks out for them; the other workers'
        relay copies follow the feed's new description."""
        if self.closed or self.worker is None:
            return False
        args = {"upstream": self.id, "rid": rid, "layers": list(layers)}
        try:
            reply = await self._hosts.pool.request_async(
                self.worker, control.UPSTREAM_ARRANGE, args, timeout=OPEN_TIMEOUT
            )
        except WhepfanError:
            return False
        if not reply.get("arranged") or self.closed:
            return False
        self.rid, self.layers = rid, tuple(layers)
        if self._feed is not None:
            self._feed.describe(reply.get("canonical_offer"))
        return True

    def reported(self, entry: dict[str, Any]) -> None:
        self._connected = bool(entry.get("connected"))
        self.packets_received = int(entry.get("packets", 0))
        self.bytes_received = int(entry.get("bytes", 0))

    def close(self) -> None:
        """End it in the worker; the stream's last session also ends its publisher in the
        pool's registry (viewers stay, waiting)."""
        if self.closed:
            return
        self.closed = True
        self._forget()
        if self.worker is not None:
            self._hosts.pool.notify(self.worker, control.UPSTREAM_CLOSE, {"upstream": self.id})
        if self._feed is not None:
            feed, self._feed = self._feed, None
            feed.leave(self)

    async def delete(self) -> None:
        """Close, and DELETE the session resource upstream (best effort), from here:
        the worker may be gone."""
        self.close()
        if self.location is not None:
            location, self.location = self.location, None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DELETE_TIMEOUT):
                    await delete_session(self._http, location, token=self.target.token)

    def lost(self, reason: str, *, worker_closed: bool) -> None:
        """The worker's transport failed (``worker_closed``: it ended the session itself),
        or the worker exited: the puller hears it and pulls again."""
        if self.closed:
            return
        if worker_closed:
            self.worker = None  # nothing to close there
        self.close()
        self._on_lost(self, reason)

    def _forget(self) -> None:
        if self._hosts.sessions.get(self.id) is self:
            del self._hosts.sessions[self.id]
