"""Upstream pulls: an edge's WHEP client sessions toward the node that carries a stream.

Theory of operation
-------------------
A viewer's WHEP POST for a stream this node does not have asks the ``UpstreamPuller``
to ``ensure`` it first. The puller asks its ``UpstreamResolver`` where the stream comes
from (a fixed URL template with ``--upstream``, the Redis registry with ``--cluster``),
and opens one ``UpstreamSession`` there: a standard WHEP client (draft-ietf-wish-whep-03
§4.2) made of whepfan's own client stack, the same as ``whepfan loadtest`` uses::

    origin --SRTP--> [own UDP socket] ClientTransport (full ICE, controlling; DTLS)
                                   |  SRTP/SRTCP datagrams
                                   v
                     UpstreamFeed (feed.py): the router's Ingest, as for a publisher
                                   |
                                   v  Fanout.push -> edge viewers

``ensure`` returns once the origin's answer is attached (the stream's tracks exist, so
the viewer's offer negotiates against them); media follows when the upstream's ICE and
DTLS complete, usually before the viewer's own. The session runs on its own UDP socket,
so the worker's ICE-lite demux never sees the origin.

Layers
------
A WHEP session receives one layer of a simulcast stream, so an edge pulls a simulcast
stream as **one session per layer**, each pinned to its layer, and its stream gets one
track per layer as with a WHIP simulcast publisher (feed.py): its own viewers have the
edge's layer policy, layer API and ``layers`` event::

    origin --(audio + layer h)--> first session  --+
           --(layer q)----------> session q      --+--> UpstreamFeed: tracks q, h, f
           --(layer f)----------> session f      --+

How the edge learns the layers: from the first session's SSE ``layers`` event (EXT
§4.3.3; layer_events.py). That is the standard way that works against any WHEP server
with the layer extension: EXT §5 requires such a server to support the SSE extension
with ``layers``, it needs nothing but the session the edge already has, and the event
stream keeps telling the edge when the layers change (the origin's publisher returns
with others). The alternatives are worse: the layer API GET is not in EXT §5 (whepfan
and live777 answer it; it is only the fallback where no event stream is linked), and
the registry knows only whepfan origins, and nothing of a tree's edges. A server whose
201 links no layer resource gets one session, as any single-layer stream does.

What happens then (simulcast.py decides, sans-IO): the first session, which carries the
audio and the event stream, is pinned to the middle layer (where the edge's viewers
start), by the layer POST (EXT §5: ``{"mediaId", "rid"}``); every other layer gets a
video-only session of its own, pinned at creation by ``?rid=`` where the origin
understands it (whepfan does, and answers 400 for a rid it does not have) and by the
layer POST on any server. Only the first session is awaited by ``ensure``; the others
follow within a round trip of the event. Keyframe requests from the edge's viewers and
layer switches go, after the edge's throttle, to the session of the layer asked for.

Each pull is watched, each layer's session on its own:

* **lost** (ICE consent expired, DTLS closed or failed, the origin refused): the layer
  gets nothing (edge viewers stay, waiting, as for a departed publisher; with other
  layers flowing the stream stays live) and its session is tried again with
  exponential backoff (``RETRY_INITIAL`` doubling to ``RETRY_MAX``) while viewers
  remain; the new session's track is rebased onto the old one, so viewers resume
  without renegotiating. The first session comes back pinned to its layer; when every
  session was lost at once (the origin restarted, or with ``--workers N`` the worker
  holding them exited), it comes back before the others, as it carries the audio.
* **layers changed** (the origin's event): sessions of layers that went are ended,
  layers that came get one; each continuing session keeps its track.
* **idle** (no viewers for ``grace`` seconds): every session of the stream is ended
  (DELETE, RFC 9725 §4.3 as WHEP reuses it) and the pull forgotten.

The puller is the same with ``--workers N``: it reads the pool's streams (viewers on every
worker) and its ``open_session`` runs each session in a worker process
(cluster/pool_backend.py, cluster/worker_upstreams.py), every layer's session of a stream
in the same one, so that worker's router has one track per layer as here; the other
workers' relay copies get them all (the feed's description, re-sent when the layers
change), as for a WHIP simulcast publisher in that worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import aiohttp
import orjson

from whepfan.client.peer import (
    ClientTransport,
    LocalParameters,
    TransportConnected,
    TransportFailed,
    host_candidate,
    new_ice_credentials,
    viewer_offer,
)
from whepfan.client.signalling import delete_session, local_address_towards, post_offer
from whepfan.cluster.feed import FeedLeg, UpstreamFeed
from whepfan.cluster.layer_events import layer_updates
from whepfan.cluster.simulcast import LAYER_REL, link_targets, pinned_url, plan_layers
from whepfan.errors import Conflict, ParseError, ServiceUnavailable, WhepfanError
from whepfan.media.router import Router
from whepfan.protocol.negotiation import remote_transport
from whepfan.protocol.sdp import SessionDescription

log = logging.getLogger("whepfan.cluster.upstream")

DEFAULT_GRACE = 30.0
RETRY_INITIAL = 0.5
RETRY_MAX = 10.0
# How long ensure() waits for the origin's answer before the viewer gets a 503.
SIGNALLING_TIMEOUT = 10.0
WATCH_INTERVAL = 0.5
# How soon the layer watch subscribes again after the origin's event stream ended.
LAYER_EVENTS_RETRY = 2.0
# How long ensure() waits for the origin's layers after the first session's answer (a
# server with the layer extension that never sends "layers" costs a viewer this once).
LAYER_WAIT = 2.0
MEASURE_POLL = 0.01
_RECEIVE_BURST = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamTarget:
    """Where to pull a stream from: its WHEP endpoint and the bearer token it needs."""

    url: str
    token: str | None = None
    node: str | None = None  # the registry's node id, when the cluster chose it


# Finds the upstream of a stream, or None when nobody carries it (the viewer gets 409).
UpstreamResolver = Callable[[str], Awaitable[UpstreamTarget | None]]


class PulledStream(Protocol):
    """What the puller reads of a stream: a Router's Stream, or a worker pool's
    ProxyStream (its viewers on every worker)."""

    @property
    def live(self) -> bool: ...
    @property
    def viewers(self) -> Mapping[str, object]: ...


class PulledStreams(Protocol):
    """The node's streams: a Router, or the worker pool (workers/pool.py)."""

    @property
    def streams(self) -> Mapping[str, PulledStream]: ...


class PullSession(Protocol):
    """One pull's session as the puller drives it: ``UpstreamSession`` here, or
    cluster/pool_backend.py's, whose transport runs in a worker process."""

    stream_name: str
    target: UpstreamTarget
    location: str | None
    packets_received: int
    bytes_received: int
    closed: bool

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...

    async def delete(self) -> None: ...


@runtime_checkable
class LayeredPullSession(PullSession, Protocol):
    """A session that can pull one layer of a simulcast stream (``UpstreamSession``, and
    cluster/pool_backend.py's with --workers N): the puller watches the origin's layers
    through its Links and pins it. A session that is not one pulls the stream as one
    session, whose layer the origin's policy chooses."""

    @property
    def links(self) -> Mapping[str, str]:
        """rel -> URL of the 201's Links: the layer watch reads the layer and SSE
        extensions' (simulcast.LAYER_REL, EVENTS_REL)."""
        ...

    async def arrange(self, rid: str | None, layers: Sequence[str]) -> bool:
        """Pin the session to layer ``rid`` of the origin's ``layers`` (low to high) and
        lay out the stream's tracks for them (UpstreamSession.arrange)."""
        ...


class SessionOpener(Protocol):
    """Makes (not starts) the session of one pull; ``on_lost`` when its transport fails."""

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
    ) -> PullSession: ...


@runtime_checkable
class MeasuringOpener(Protocol):
    """An opener whose sessions' tracks are in another process (cluster/pool_backend.py):
    the puller asks it to wait there for ``layers_measured``."""

    async def layers_measured(self, stream_name: str) -> None: ...


async def layers_measured(router: Router, stream_name: str) -> None:
    """Until every video layer of ``stream_name`` on ``router`` has its picture size
    measured (its first keyframe, which each session asks for when it connects): layers
    are ordered by it (Stream.layers), and the first session's layer, flowing a moment
    before the others, would otherwise sort above them and be taken for the top one, so
    a cold edge's first viewer would not start in the middle. Callers bound the wait."""
    while True:
        stream = router.streams.get(stream_name)
        layers = stream.layers() if stream is not None else []
        if len(layers) < 2 or all(track.width is not None for track in layers):
            return
        await asyncio.sleep(MEASURE_POLL)


class StaticUpstream:
    """``--upstream URL-template``: every stream from one fixed WHEP origin."""

    def __init__(self, template: str, token: str | None = None) -> None:
        if "{stream}" not in template:
            raise ValueError("the upstream URL template needs {stream}")
        self.template = template
        self.token = token

    async def __call__(self, stream_name: str) -> UpstreamTarget | None:
        return UpstreamTarget(url=self.template.format(stream=stream_name), token=self.token)


class PullFailure(enum.Enum):
    """Why a pull failed (the ``reason`` label of the pull-failure metric)."""

    REFUSED = "refused"  # the upstream answered 4xx/5xx other than 409
    NOT_LIVE = "not_live"  # 409: the upstream has no publisher for it
    UNREACHABLE = "unreachable"  # HTTP failed (connection refused, timeout)
    BAD_ANSWER = "bad_answer"  # an answer we cannot use
    TRANSPORT = "transport"  # ICE or DTLS did not complete, or was lost later
    NO_UPSTREAM = "no_upstream"  # the resolver could not be asked (Redis down)
    WORKER = "worker"  # the worker process holding the session exited (--workers N)


class UpstreamError(WhepfanError):
    """A pull that could not be made; carries the HTTP error the viewer should get."""

    def __init__(self, reason: PullFailure, error: WhepfanError) -> None:
        super().__init__(error.detail, retry_after=error.retry_after)
        self.reason = reason
        self.error = error


class UpstreamSession:
    """One WHEP client session toward ``target``, feeding ``router``'s stream.

    ``start`` POSTs the offer and attaches the answer (raises ``UpstreamError``); media
    then flows until ``close``, or until the transport fails, which calls ``on_lost``."""

    def __init__(
        self,
        *,
        router: Router,
        stream_name: str,
        target: UpstreamTarget,
        http: aiohttp.ClientSession,
        clock: Callable[[], float],
        on_lost: Callable[[UpstreamSession, str], None],
        rid: str | None = None,
        layers: Sequence[str] = (),
        audio: bool = True,
    ) -> None:
        self.router = router
        self.stream_name = stream_name
        self.target = target
        # The layer this session is pinned to (None: the only one, or not known yet), of
        # the origin's ``layers``; ``audio``: it also carries the stream's audio.
        self.rid = rid
        self.layers = tuple(layers)
        self.audio = audio
        # rel -> URL of the 201's Links (simulcast.LAYER_REL, EVENTS_REL, ...)
        self.links: dict[str, str] = {}
        self.leg: FeedLeg | None = None
        self._http = http
        self._clock = clock
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._socket: socket.socket | None = None
        self._transport: ClientTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.feed: UpstreamFeed | None = None
        self.location: str | None = None
        self.answer: str | None = None  # the upstream's SDP answer (relay copies mirror it)
        self.started_at = time.monotonic()
        self.connected_at: float | None = None
        self.closed = False
        self.packets_received = 0
        self.bytes_received = 0

    async def start(self) -> None:
        try:
            host = local_address_towards(self.target.url)
        except OSError as exc:
            raise UpstreamError(
                PullFailure.UNREACHABLE,
                ServiceUnavailable(f"upstream {self.target.url} unreachable: {exc}", retry_after=5),
            ) from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.setblocking(False)
        self._socket = sock
        ufrag, pwd = new_ice_credentials()
        local = LocalParameters(
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            fingerprints=self.router.certificate.fingerprints,
            candidate=host_candidate(host, sock.getsockname()[1]),
        )
        # Sessions after the first carry video only: audio once, not once per layer.
        offer = viewer_offer(local, audio=self.audio)
        # ?rid= pins the layer at creation where the origin understands it (whepfan
        # does); the layer POST after the answer pins it on any EXT §5 server.
        endpoint = self.target.url if self.rid is None else pinned_url(self.target.url, self.rid)
        try:
            async with asyncio.timeout(SIGNALLING_TIMEOUT):
                result = await post_offer(self._http, endpoint, offer, token=self.target.token)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.close()
            raise UpstreamError(
                PullFailure.UNREACHABLE,
                ServiceUnavailable(
                    f"upstream {self.target.url} unreachable: {exc or type(exc).__name__}",
                    retry_after=5,
                ),
            ) from None
        if self.closed:
            raise UpstreamError(PullFailure.TRANSPORT, ServiceUnavailable("pull cancelled"))
        if result.status != 201 or result.answer is None:
            self.close()
            detail = f"upstream {self.target.url} answered {result.status}"
            if result.status == 409:
                # The stream is not live upstream: the viewer hears what the origin said
                # (WHEP draft-03 §4.2.8: 409 + Retry-After).
                raise UpstreamError(
                    PullFailure.NOT_LIVE,
                    Conflict(f"stream {self.stream_name!r} is not live", retry_after=5),
                )
            raise UpstreamError(
                PullFailure.REFUSED,
                ServiceUnavailable(f"{detail}: {result.detail[:200]}", retry_after=5),
            )
        self.location = result.location
        self.answer = result.answer
        self.links = link_targets(result.links, result.endpoint or endpoint)
        now = self._clock()
        try:
            remote = remote_transport(SessionDescription.parse(result.answer))
            self.feed = UpstreamFeed.of(self.router, self.stream_name)
            self.leg = self.feed.add_leg(
                self.rid, result.answer, now, self._send_rtcp, layers=self.layers
            )
        except (ParseError, WhepfanError, ValueError) as exc:
            self.close()
            raise UpstreamError(
                PullFailure.BAD_ANSWER,
                ServiceUnavailable(f"upstream {self.target.url} sent an unusable answer: {exc}"),
            ) from None
        self._transport = ClientTransport(
            certificate=self.router.certificate,
            local_ufrag=ufrag,
            local_pwd=pwd,
            remote=remote,
            # RFC 8842 §5.5 / RFC 4145 §4: an answer without a=setup is active.
            dtls_role="client" if remote.setup == "passive" else "server",
            local_address=(host, sock.getsockname()[1]),
        )
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._transport.start(now)
        self._after_io()
        if self.rid is not None and not await self.pin(self.rid):
            self.close()
            raise UpstreamError(
                PullFailure.REFUSED,
                ServiceUnavailable(
                    f"upstream {self.target.url} did not pin layer {self.rid!r}", retry_after=5
                ),
            )

    @property
    def video_media_id(self) -> str:
        """The m-line index of our offer's video (EXT §5 ``mediaId``): after the audio."""
        return "1" if self.audio else "0"

    async def pin(self, rid: str) -> bool:
        """POST the layer extension (EXT §5): this session receives layer ``rid`` only.
        True when the origin said 200; also True when it has no layer extension (nothing
        to pin: the only layer). Connection failures are False, not raised."""
        layer_url = self.links.get(LAYER_REL)
        if layer_url is None:
            return True
        body = orjson.dumps({"mediaId": self.video_media_id, "rid": rid})
        headers = {"Content-Type": "application/json"}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        try:
            async with (
                asyncio.timeout(SIGNALLING_TIMEOUT),
                self._http.post(layer_url, data=body, headers=headers) as response,
            ):
                detail = await response.text(errors="replace")
                if response.status == 200:
                    return True
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
        log.warning("upstream of %r: layer %r not pinned: %s", self.stream_name, rid, detail[:200])
        return False

    async def arrange(self, rid: str | None, layers: Sequence[str]) -> bool:
        """The origin's layers are now ``layers`` and this session is to carry ``rid``:
        pin it (when it changes) and lay out the stream's tracks again. False when the
        origin refused the pin (nothing changed then)."""
        if self.closed or self.feed is None or self.leg is None:
            return False
        if rid != self.rid:
            if rid is not None and not await self.pin(rid):
                return False
            self.rid = rid
            self.feed.rename_leg(self.leg, rid)
        self.layers = tuple(layers)
        self.feed.set_layers(layers, self._clock())
        return True

    @property
    def connected(self) -> bool:
        return self.connected_at is not None and not self.closed

    def close(self) -> None:
        """End the session here (close_notify out) and detach its feed; the DELETE to the
        upstream is ``delete()``, which awaits."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._send_pending()
        if self._socket is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
        if self.leg is not None:
            self.leg.detach(self._clock())

    async def delete(self) -> None:
        """Close, and DELETE the session resource upstream (best effort)."""
        self.close()
        if self.location is not None:
            location, self.location = self.location, None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await delete_session(self._http, location, token=self.target.token)

    # -- I/O ------------------------------------------------------------------------------

    def _send_rtcp(self, packet: bytes) -> None:
        transport, sock = self._transport, self._socket
        if transport is None or sock is None or transport.selected_address is None:
            return
        with contextlib.suppress(OSError):
            sock.sendto(packet, transport.selected_address[:2])

    def _on_readable(self) -> None:
        sock, transport = self._socket, self._transport
        if sock is None or transport is None:
            return
        now = self._clock()
        for _ in range(_RECEIVE_BURST):
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP port unreachable from an earlier send
                log.debug("upstream %s: receive failed: %s", self.stream_name, exc)
                break
            media = transport.receive(data, (addr[0], addr[1]), now)
            if media is not None and self.leg is not None:
                self.packets_received += 1
                self.bytes_received += len(media)
                self.leg.srtp(media, now)
        self._after_io()

    def _send_pending(self) -> None:
        if self._transport is None or self._socket is None:
            return
        for datagram, address in self._transport.datagrams_to_send():
            with contextlib.suppress(OSError):
                self._socket.sendto(datagram, address[:2])

    def _after_io(self) -> None:
        transport = self._transport
        if transport is None or self.closed:
            return
        self._send_pending()
        while (event := transport.next_event()) is not None:
            if isinstance(event, TransportConnected):
                self.connected_at = time.monotonic()
                log.info(
                    "upstream of %r connected to %s in %.0f ms",
                    self.stream_name,
                    self.target.url,
                    (self.connected_at - self.started_at) * 1000,
                )
                if self.leg is not None:
                    self.leg.keyed(event.keys, self._clock())
            elif isinstance(event, TransportFailed):
                log.warning("upstream of %r lost: %s", self.stream_name, event.reason)
                self.close()
                self._on_lost(self, event.reason)
                return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = transport.get_timer()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is not None and not self.closed:
            self._transport.handle_timer(self._clock())
            self._after_io()


@dataclass(eq=False, kw_only=True)
class _Leg:
    """One layer's session of a pull (the only one for a single-layer stream)."""

    rid: str | None  # the layer it is pinned to; None: the only layer, or not known yet
    primary: bool = False  # the first session: it carries the audio and hears the events
    session: PullSession | None = None
    starting: asyncio.Task[PullSession] | None = None
    failures: int = 0
    retry_at: float | None = None
    last_error: str | None = None


@dataclass(eq=False, kw_only=True)
class _Pull:
    """The puller's memory of one stream."""

    stream: str
    primary: _Leg = field(default_factory=lambda: _Leg(rid=None, primary=True))
    others: dict[str, _Leg] = field(default_factory=dict)  # rid -> its session's leg
    layers: tuple[str, ...] = ()  # the origin's layers, low to high (empty: one)
    # Where the first session came from: the other layers come from the same node, so
    # they are layers of one encoder (a tree's edge picked by placement included).
    target: UpstreamTarget | None = None
    events: asyncio.Task[None] | None = None  # the layer watch on the first session
    arrange_at: float | None = None  # when to try an arrangement the origin refused again
    arranging: asyncio.Lock = field(default_factory=asyncio.Lock)  # one at a time
    # Set once the layers are known (or known to be unknowable: no layer extension).
    layers_known: asyncio.Event = field(default_factory=asyncio.Event)
    idle_since: float | None = None
    ensuring: int = 0  # viewers' POSTs waiting in ensure: not idle while they wait
    last_error: str | None = None

    @property
    def legs(self) -> list[_Leg]:
        return [self.primary, *self.others.values()]

    @property
    def failures(self) -> int:
        return self.primary.failures

    def any_session(self) -> PullSession | None:
        return next((leg.session for leg in self.legs if leg.session is not None), None)


class UpstreamPuller:
    """The upstream sessions of one node (see the module docstring)."""

    def __init__(
        self,
        *,
        router: PulledStreams,
        resolve: UpstreamResolver,
        clock: Callable[[], float],
        grace: float = DEFAULT_GRACE,
        max_pulls: int | None = None,
        open_session: SessionOpener | None = None,
    ) -> None:
        if open_session is None:
            if not isinstance(router, Router):
                raise TypeError("sessions open on a Router unless open_session is given")
            open_session = _opener_on(router)
        self.open_session = open_session
        self.router = router
        self.resolve = resolve
        self._clock = clock
        self.grace = grace
        self.max_pulls = max_pulls
        self._pulls: dict[str, _Pull] = {}
        self._http: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self.counters: Counter[str] = Counter()  # pulls_started, pull_failures_<reason>...

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        self._watch = asyncio.ensure_future(self._watch_forever())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for pull in list(self._pulls.values()):
            await self._release(pull)
        if self._http is not None:
            await self._http.close()

    # what the HTTP layer asks -----------------------------------------------------------

    def pulls(self, stream_name: str) -> bool:
        """Whether this node's copy of ``stream_name`` comes from upstream."""
        return stream_name in self._pulls

    async def ensure(self, stream_name: str) -> None:
        """Make ``stream_name`` available here before a viewer's offer is negotiated:
        nothing to do when it is published (or already pulled) here; otherwise pull it.
        Raises ``UpstreamError`` (its ``error`` is the viewer's answer) when that fails;
        returns without pulling when no node carries it (the router then answers 409).

        Only the first session is awaited, and the origin's layers for at most
        ``LAYER_WAIT``: the tracks then exist; the other layers' sessions follow at once,
        and viewers get their media as soon as they connect."""
        stream = self.router.streams.get(stream_name)
        pull = self._pulls.get(stream_name)
        if stream is not None and stream.live and (pull is None or pull.any_session() is not None):
            return
        if pull is None:
            pull = self._pulls[stream_name] = _Pull(stream=stream_name)
        pull.ensuring += 1
        try:
            await self._ensure(pull)
        finally:
            pull.ensuring -= 1
            pull.idle_since = None  # the grace counts from the viewer's arrival

    async def _ensure(self, pull: _Pull) -> None:
        leg = pull.primary
        if leg.starting is None:
            leg.starting = asyncio.ensure_future(self._open(pull, leg))
        try:
            await asyncio.shield(leg.starting)
        except UpstreamError:
            if pull.any_session() is None and not self._has_viewers(pull.stream):
                self._forget(pull)
            raise
        # A moment for the origin's layers (one round trip when it knows them), so that
        # the viewer negotiates against every layer's track: its ?rid= names one, and
        # the edge's policy starts it in the middle, as with a WHIP simulcast publisher.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LAYER_WAIT):
                await pull.layers_known.wait()
                await self._layers_measured(pull.stream)

    async def _layers_measured(self, stream_name: str) -> None:
        """``layers_measured`` where the stream's tracks are: this router, or the worker
        holding the pull (its opener asks it, ``MeasuringOpener``)."""
        router = self.router
        if isinstance(router, Router):
            await layers_measured(router, stream_name)
        elif isinstance(self.open_session, MeasuringOpener):
            await self.open_session.layers_measured(stream_name)

    async def _open(self, pull: _Pull, leg: _Leg) -> PullSession:
        """Open ``leg``'s session. The first session asks the resolver where the stream
        is; the others follow it (``pull.target``)."""
        try:
            target = pull.target if not leg.primary else None
            if target is None:
                target = await self.resolve(pull.stream)
            if target is None:
                raise UpstreamError(
                    PullFailure.NOT_LIVE,
                    Conflict(f"stream {pull.stream!r} is not live", retry_after=5),
                )
            assert self._http is not None, "UpstreamPuller.start() first"
            session = self.open_session(
                stream_name=pull.stream,
                target=target,
                http=self._http,
                clock=self._clock,
                on_lost=self._lost,
                rid=leg.rid,
                layers=pull.layers,
                audio=leg.primary,
            )
            self.counters["pulls_started"] += 1
            await session.start()
        except UpstreamError as exc:
            self.counters[f"pull_failures_{exc.reason.value}"] += 1
            self._failed(pull, leg, exc.detail)
            if leg.primary and exc.reason is PullFailure.REFUSED and leg.rid is not None:
                # Perhaps the layer is gone upstream: the next try is unpinned, and the
                # layer watch pins it again to a layer that exists.
                leg.rid = None
            raise
        finally:
            leg.starting = None
        if self._pulls.get(pull.stream) is not pull or leg not in pull.legs:
            await session.delete()  # released while signalling
            raise UpstreamError(PullFailure.TRANSPORT, ServiceUnavailable("pull released"))
        leg.session = session
        leg.failures = 0
        leg.retry_at = None
        if leg.primary:
            pull.target = target
            if pull.idle_since is None:
                pull.idle_since = self._clock()
            self._watch_layers(pull, session)
        log.info(
            "pulling %r%s from %s",
            pull.stream,
            f" layer {leg.rid}" if leg.rid is not None else "",
            session.target.url,
        )
        return session

    def _failed(self, pull: _Pull, leg: _Leg, error: str) -> None:
        leg.failures += 1
        leg.last_error = pull.last_error = error
        leg.retry_at = self._clock() + self._backoff(leg.failures)

    @staticmethod
    def _backoff(failures: int) -> float:
        return min(RETRY_INITIAL * (2 ** max(failures - 1, 0)), RETRY_MAX)

    def _lost(self, session: PullSession, reason: str) -> None:
        pull = self._pulls.get(session.stream_name)
        leg = (
            None
            if pull is None
            else next((leg for leg in pull.legs if leg.session is session), None)
        )
        if pull is None or leg is None:
            return
        self.counters[f"pull_failures_{PullFailure.TRANSPORT.value}"] += 1
        leg.session = None
        self._failed(pull, leg, reason)
        if leg.primary and pull.events is not None:
            pull.events.cancel()  # the next first session watches the layers again
            pull.events = None
        if session.location is not None:
            self._in_background(session.delete())

    def _in_background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # the origin's layers: one session each ---------------------------------------------

    def _watch_layers(self, pull: _Pull, session: PullSession) -> None:
        """Learn the origin's layers from the first session's event stream (module
        docstring: "Layers"), when its 201 linked the layer extension."""
        if pull.events is not None:
            pull.events.cancel()
            pull.events = None
        if not isinstance(session, LayeredPullSession) or LAYER_REL not in session.links:
            pull.layers_known.set()
            return  # no layer extension: one session, as for any single-layer stream
        pull.events = asyncio.ensure_future(self._layer_events(pull, session))

    async def _layer_events(self, pull: _Pull, session: LayeredPullSession) -> None:
        assert self._http is not None
        token = session.target.token
        while not session.closed:
            try:
                async for layers in layer_updates(self._http, session.links, token):
                    await self._arrange(pull, layers)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.debug("layer events of %r: %s", pull.stream, exc)
            await asyncio.sleep(LAYER_EVENTS_RETRY)

    async def layers_changed(self, stream_name: str, layers: Sequence[str]) -> None:
        """The origin's layers of ``stream_name`` are ``layers`` (low to high; empty: a
        single layer), as its event stream said: pin the first session, open a session
        for each other layer, end the sessions of layers that are gone."""
        pull = self._pulls.get(stream_name)
        if pull is not None:
            await self._arrange(pull, layers)

    async def _arrange(self, pull: _Pull, layers: Sequence[str]) -> None:
        """See ``layers_changed`` (the decisions are simulcast.plan_layers'); one at a
        time per stream, as each pins the first session and reads what the last did."""
        async with pull.arranging:
            try:
                await self._arrange_now(pull, layers)
            finally:
                pull.layers_known.set()

    async def _arrange_now(self, pull: _Pull, layers: Sequence[str]) -> None:
        if self._pulls.get(pull.stream) is not pull:
            return
        layers = tuple(layers)
        primary = pull.primary
        plan = plan_layers(primary.rid, pull.others.keys(), layers)
        unchanged = layers == pull.layers and plan.primary == primary.rid
        if unchanged and not plan.open and not plan.close and pull.arrange_at is None:
            return  # the event's periodic repeat
        if not unchanged:
            log.info(
                "stream %r upstream has layers %s: %d sessions",
                pull.stream,
                ", ".join(layers) or "(one)",
                max(len(layers), 1),
            )
        pull.layers = layers
        for rid in plan.close:
            leg = pull.others.pop(rid)
            self._end_leg(leg)
        session = primary.session
        if isinstance(session, LayeredPullSession):
            if not await session.arrange(plan.primary, layers):
                # Refused (a layer that went meanwhile): the next event, or the watch
                # after a backoff, arranges again.
                pull.arrange_at = self._clock() + RETRY_MAX
                return
            primary.rid = plan.primary
        elif plan.primary != primary.rid:
            primary.rid = plan.primary  # the re-pull of the first session asks for it
        pull.arrange_at = None
        for rid in plan.open:
            if rid in pull.others:
                continue
            leg = pull.others[rid] = _Leg(rid=rid)
            self._start(pull, leg)

    def _start(self, pull: _Pull, leg: _Leg) -> None:
        leg.starting = asyncio.ensure_future(self._open(pull, leg))
        leg.starting.add_done_callback(_ignore_failure)

    def _end_leg(self, leg: _Leg) -> None:
        if leg.starting is not None:
            leg.starting.cancel()
            leg.starting = None
        if leg.session is not None:
            session, leg.session = leg.session, None
            self._in_background(session.delete())

    # the watch: re-pull lost upstreams, release idle ones --------------------------------

    def _has_viewers(self, stream_name: str) -> bool:
        stream = self.router.streams.get(stream_name)
        return stream is not None and bool(stream.viewers)

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self.watch(self._clock())
            except Exception:
                log.exception("upstream watch failed")

    async def watch(self, now: float) -> None:
        for pull in list(self._pulls.values()):
            if pull.primary.starting is not None:
                continue
            if self._has_viewers(pull.stream) or pull.ensuring:
                pull.idle_since = None
            elif pull.idle_since is None:
                pull.idle_since = now
            if pull.idle_since is not None and now - pull.idle_since >= self.grace:
                log.info(
                    "releasing the upstream of %r: no viewers for %.0f s", pull.stream, self.grace
                )
                await self._release(pull)
                continue
            due = [
                leg
                for leg in pull.legs
                if leg.session is None
                and leg.starting is None
                and leg.retry_at is not None
                and now >= leg.retry_at
            ]
            if due and not self._has_viewers(pull.stream) and pull.any_session() is None:
                await self._release(pull)
                continue
            held = pull.any_session() is not None
            for leg in due:
                if not held and not leg.primary:
                    # With no session left, the first one comes back first: it carries the
                    # audio, and a feed takes the stream's negotiation from the first answer
                    # it gets (feed.py), so a video-only layer first would leave the stream
                    # without audio and end its viewers. The others follow on the next watch.
                    continue
                self._start(pull, leg)
            if pull.arrange_at is not None and now >= pull.arrange_at:
                pull.arrange_at = None
                self._in_background(self._arrange(pull, pull.layers))
            self._report_layers(pull, now)

    def _report_layers(self, pull: _Pull, now: float) -> None:
        """The edge's own SSE ``layers`` event (EXT §4.3.3) for its viewers: the stand-in
        publisher has no address, so the publisher feedback timer that reports it on an
        origin never runs for a pulled stream."""
        router = self.router
        if not isinstance(router, Router):
            return  # with worker processes, each worker reports its own streams
        stream = router.streams.get(pull.stream)
        if stream is not None and stream.active and pull.any_session() is not None:
            router.layers.report(stream, now)

    def _forget(self, pull: _Pull) -> None:
        if self._pulls.get(pull.stream) is pull:
            del self._pulls[pull.stream]
        if pull.events is not None:
            pull.events.cancel()
            pull.events = None

    async def _release(self, pull: _Pull) -> None:
        """End every session of the stream (grace over, or the node closing)."""
        self._forget(pull)
        sessions = []
        for leg in pull.legs:
            if leg.starting is not None:
                leg.starting.cancel()
                leg.starting = None
            if leg.session is not None:
                sessions.append(leg.session)
                leg.session = None
        await asyncio.gather(*(session.delete() for session in sessions))

    # what status and metrics read --------------------------------------------------------

    def sessions(self) -> int:
        """Upstream sessions held (one per layer of each pulled stream)."""
        return sum(self.sessions_by_layer().values())

    def sessions_by_layer(self) -> Counter[str]:
        """Upstream sessions by the layer they carry (rid; "" for a single layer)."""
        held: Counter[str] = Counter()
        for pull in self._pulls.values():
            for leg in pull.legs:
                if leg.session is not None:
                    held[leg.rid or ""] += 1
        return held

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per pulled stream: from where, connected or not, received counts, failures,
        and the same per layer session."""
        report: dict[str, dict[str, Any]] = {}
        for name, pull in self._pulls.items():
            held = [leg for leg in pull.legs if leg.session is not None]
            first = pull.any_session()
            report[name] = {
                "upstream": first.target.url if first is not None else None,
                "node": first.target.node if first is not None else None,
                "connected": any(leg.session.connected for leg in held if leg.session),
                "packets": sum(leg.session.packets_received for leg in held if leg.session),
                "bytes": sum(leg.session.bytes_received for leg in held if leg.session),
                "failures": pull.failures,
                "last_error": pull.last_error,
                "layers": [
                    {
                        "rid": leg.rid,
                        "primary": leg.primary,
                        "session": leg.session.location if leg.session is not None else None,
                        "connected": leg.session is not None and leg.session.connected,
                        "packets": leg.session.packets_received if leg.session else 0,
                        "bytes": leg.session.bytes_received if leg.session else 0,
                        "failures": leg.failures,
                        "last_error": leg.last_error,
                    }
                    for leg in pull.legs
                ],
            }
        return report


def _opener_on(router: Router) -> SessionOpener:
    """The default ``open_session``: the session's transport in this process, on ``router``."""

    def open_session(
        *,
        stream_name: str,
        target: UpstreamTarget,
        http: aiohttp.ClientSession,
        clock: Callable[[], float],
        on_lost: Callable[[PullSession, str], None],
        rid: str | None = None,
        layers: Sequence[str] = (),
        audio: bool = True,
    ) -> PullSession:
        return UpstreamSession(
            router=router,
            stream_name=stream_name,
            target=target,
            http=http,
            clock=clock,
            on_lost=on_lost,
            rid=rid,
            layers=layers,
            audio=audio,
        )

    return open_session


def _ignore_failure(task: asyncio.Task[PullSession]) -> None:
    # A background re-pull's failure is counted and retried by the watch.
    if not task.cancelled():
        task.exception()
