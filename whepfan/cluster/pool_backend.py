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

When the worker holding a pull exits, the pool unregisters the stand-in publisher (the
stream goes inactive, the other workers' viewers stay, waiting) and tells the session,
which reports the loss to the puller: it pulls again with backoff, into another worker
(the one holding the viewers still waiting), whose relay copy becomes the stream and
ingest's rebase continues its viewers' lines. The killed worker's own viewers were told
to reconnect (SSE ``reconnect``) and re-POST.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from whepfan.client.signalling import delete_session
from whepfan.cluster.upstream import (
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
        # A pool session is no LayeredPullSession (upstream.py): the puller pulls its
        # stream as one session and never asks it for a layer of its own.
        assert rid is None and not layers and audio, "a pool session pulls every layer"
        return PoolUpstreamSession(
            self,
            upstream_id=f"upstream-{next(self._ids)}",
            stream_name=stream_name,
            target=target,
            http=http,
            on_lost=on_lost,
        )

    def where(self, stream_name: str) -> dict[str, int | None] | None:
        """The worker holding ``stream_name``'s upstream session (index and pid)."""
        for session in self.sessions.values():
            if session.stream_name == stream_name and session.attached:
                assert session.worker is not None
                handle = self.pool.handles.get(session.worker)
                pid = handle.process.pid if handle is not None else None
                return {"worker": session.worker, "worker_pid": pid}
        return None

    def _on_lost(self, worker: int, message: dict[str, Any]) -> None:
        session = self.sessions.get(str(message.get("upstream")))
        if session is not None and session.worker == worker:
            session.lost(str(message.get("reason") or "upstream lost"), worker_closed=True)

    def _on_report(self, worker: int, message: dict[str, Any]) -> None:
        for upstream_id, entry in (message.get("upstreams") or {}).items():
            session = self.sessions.get(str(upstream_id))
            if session is not None and session.worker == worker:
                session.reported(entry)


class PoolUpstreamSession:
    """One pull's session (cluster/upstream.py ``PullSession``) held by a worker process:
    see the module docstring. ``start`` raises ``UpstreamError`` as ``UpstreamSession``
    does; the counts and ``connected`` are the worker's last report."""

    def __init__(
        self,
        hosts: PoolUpstreams,
        *,
        upstream_id: str,
        stream_name: str,
        target: UpstreamTarget,
        http: aiohttp.ClientSession,
        on_lost: Callable[[PullSession, str], None],
    ) -> None:
        self._hosts = hosts
        self.id = upstream_id
        self.stream_name = stream_name
        self.target = target
        self._http = http
        self._on_lost = on_lost
        self.worker: int | None = None
        self.publisher_id: str | None = None  # the stand-in publisher in the pool's registry
        self.location: str | None = None
        self.packets_received = 0
        self.bytes_received = 0
        self.closed = False
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected and not self.closed

    @property
    def attached(self) -> bool:
        """The stream's publisher in the pool's registry."""
        return self.publisher_id is not None and not self.closed

    async def start(self) -> None:
        pool = self._hosts.pool
        try:
            self.worker = pool.choose_origin(self.stream_name)
        except ServiceUnavailable as exc:
            raise UpstreamError(PullFailure.WORKER, exc) from None
        self._hosts.sessions[self.id] = self
        target = {"url": self.target.url, "token": self.target.token, "node": self.target.node}
        args = {"upstream": self.id, "stream": self.stream_name, "target": target}
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
        if self.closed:
            raise UpstreamError(PullFailure.TRANSPORT, ServiceUnavailable("pull cancelled"))
        if not reply.get("attached"):
            # A WHIP publisher is on that worker (cluster/feed.py: it wins). The session
            # stays closed; the puller DELETEs the resource when it lets the pull go.
            self.close()
            return
        try:
            publisher = pool.attach_feed(
                self.worker, reply["session"], str(reply["canonical_offer"]), self._feed_lost
            )
        except Conflict:
            self.close()  # a WHIP publisher reached the pool meanwhile: it wins
            return
        self.publisher_id = publisher.id

    def reported(self, entry: dict[str, Any]) -> None:
        self._connected = bool(entry.get("connected"))
        self.packets_received = int(entry.get("packets", 0))
        self.bytes_received = int(entry.get("bytes", 0))

    def close(self) -> None:
        """End it in the worker and in the pool's registry (viewers stay, waiting)."""
        if self.closed:
            return
        self.closed = True
        self._forget()
        if self.worker is not None:
            self._hosts.pool.notify(self.worker, control.UPSTREAM_CLOSE, {"upstream": self.id})
        if self.publisher_id is not None:
            publisher_id, self.publisher_id = self.publisher_id, None
            self._hosts.pool.detach_feed(publisher_id)

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

    def _feed_lost(self, reason: str) -> None:
        # The pool unregistered our publisher (its worker exited).
        self.publisher_id = None
        self.lost(reason, worker_closed=False)

    def _forget(self) -> None:
        if self._hosts.sessions.get(self.id) is self:
            del self._hosts.sessions[self.id]
