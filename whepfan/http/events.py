"""The server-sent events extension of WHEP: players hear when the broadcast starts and
stops, how many people watch, which layers exist, and when to reconnect elsewhere.

Texts: "WebRTC-HTTP Egress Protocol Core Extensions" (EXT) §4, formerly
draft-ietf-wish-whep-02 §4.9.1 (spec notes §4.2); wire format WHATWG HTML §9.2.6.

::

    /whep/{stream}/{session}/events          the Link target (201 of WHEP POST)
        POST application/json ["active", ...]  -> 201 + Location of a new event stream
        GET                                    -> text/event-stream of every event type
    /whep/{stream}/{session}/events/{id}     an event stream
        GET                                    -> text/event-stream (EventSource reconnects here)
        DELETE                                 -> 200; later GETs -> 404

Theory of operation
-------------------
The router calls :meth:`EventHub.on_stream_event` on the media worker's loop for every
"active", "inactive" and "viewercount" event; the simulcast code calls
:meth:`EventHub.publish` for "layers", and the scale-out code :meth:`EventHub.drain` for
"reconnect". Each event is encoded once, then appended to the bounded queue of every
event stream of that media stream that asked for it: an append and a flag per reader,
nothing awaited. Readers (the GET handlers) drain their own queue at their own pace,
so a stuck TCP reader fills only its own queue (oldest frames dropped, counted) and can
block neither media nor other readers.

"viewercount" arrives on every viewer join and leave; at 10,000 viewers that is far
too often to forward, so it is coalesced per stream: the first change goes out at once,
later ones at most once per ``viewercount_interval`` with the latest value.

The router has no "session ended" hook. A viewer session never ends without leaving
its stream's ``viewers`` (which emits "viewercount"), so every coalesced viewercount
flush also sweeps that stream's event streams and destroys those whose session is gone
(EXT §4: "all event streams are destroyed when the session ends"). The cost is one dict
lookup per subscribed session per flush, at most once a second per stream.

The event-stream URLs are capabilities like the session URL they hang off (192 random
bits each, WHEP draft-03 §5): EventSource cannot send an Authorization header, so the
GETs carry no token. The POST that makes a subscription is an act on the session, so it
takes the credential the session is bound to (auth.py), when viewing needs one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import orjson
from aiohttp import web

from whepfan.errors import NotFound, ParseError, UnsupportedMediaType
from whepfan.http.auth import AccessControl
from whepfan.http.body import body_media_type, read_body
from whepfan.http.cors import add_cors_headers, add_preflight_headers
from whepfan.http.tokens import Role

log = logging.getLogger("whepfan.http.events")

EVENTS_REL = "urn:ietf:params:whep:ext:core:server-sent-events"
# EXT §4.3: the event types this server can send, advertised in the Link's events=.
EVENT_TYPES: tuple[str, ...] = ("active", "inactive", "layers", "viewercount", "reconnect")
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
LINK_METHODS = "OPTIONS, GET, POST"
STREAM_METHODS = "OPTIONS, GET, DELETE"
# WHATWG HTML §9.2.6: lines starting with a colon are comments; EventSource ignores
# them, idle proxies see traffic.
KEEPALIVE_FRAME = b": keep-alive\n\n"
# WHATWG HTML §9.2.6 "retry": how long EventSource waits before reconnecting (ms).
RETRY_FRAME = b"retry: 2000\n\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class EventOptions:
    """Event-stream policy; the defaults suit production, tests shorten the intervals."""

    keepalive_interval: float = 15.0  # below the 30-60 s idle timeouts of common proxies
    viewercount_interval: float = 1.0  # issue 6: at most once a second per stream
    queue_limit: int = 64  # frames kept per reader before the oldest are dropped
    max_subscriptions_per_session: int = 8

    def __post_init__(self) -> None:
        if self.keepalive_interval <= 0 or self.viewercount_interval < 0:
            raise ValueError("event intervals must be positive")
        if self.queue_limit < 1 or self.max_subscriptions_per_session < 1:
            raise ValueError("event queue and subscription limits must be at least 1")


# --------------------------------------------------------------------------- router view


class ObservedSession(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def stream(self) -> str: ...
    @property
    def kind(self) -> object: ...  # SessionKind; compared through its value


class ObservedStream(Protocol):
    @property
    def active(self) -> bool: ...
    @property
    def viewers(self) -> Mapping[str, object]: ...


class StreamEventLike(Protocol):
    @property
    def stream(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def data(self) -> dict[str, object]: ...


@runtime_checkable
class ObservableRouter(Protocol):
    """What the hub needs from ``whepfan.media.router.Router``: its streams and its event hook.
    Routers without the hook (signalling test doubles) get no SSE extension at all."""

    @property
    def streams(self) -> Mapping[str, ObservedStream]: ...

    def add_listener(self, listener: _Listener) -> None: ...

    def remove_listener(self, listener: _Listener) -> None: ...

    def get_session(self, session_id: str) -> ObservedSession: ...


class _Listener(Protocol):
    def __call__(self, event: StreamEventLike, /) -> None: ...


# --------------------------------------------------------------------------- wire format


def parse_subscription(body: bytes, advertised: tuple[str, ...] = EVENT_TYPES) -> frozenset[str]:
    """The POSTed JSON array of event names (EXT §4.2). Unknown or unadvertised names are
    a 400 and create no stream (EXT §4.2 MUST); so is anything that is not a non-empty
    array of strings."""
    try:
        names = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ParseError("the subscription is not JSON") from None
    if not isinstance(names, list) or not names:
        raise ParseError("the subscription is a non-empty JSON array of event names")
    unknown = [name for name in names if not isinstance(name, str) or name not in advertised]
    if unknown:
        shown = ", ".join(repr(name)[:40] for name in unknown[:5])
        raise ParseError(f"unknown event names: {shown}; known: {', '.join(advertised)}")
    return frozenset(names)


def encode_event(event_type: str, data: object) -> bytes:
    """One event-stream frame: ``event:`` is the type and ``data:`` the JSON payload on a
    single line (EXT §4.3; orjson never emits a newline without OPT_INDENT_2)."""
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def link_value(url: str, events: tuple[str, ...] = EVENT_TYPES) -> str:
    """The ``Link`` advertising the extension (EXT §4.1). No spaces after the commas:
    medooze's client splits Link fields on ``,\\s+<``."""
    return f'<{url}>; rel="{EVENTS_REL}"; events="{",".join(events)}"'


# --------------------------------------------------------------------------- coalescing


@dataclass(eq=False, slots=True)
class Coalescer:
    """Leading-edge rate limit, sans-IO: the first mark after a quiet interval is due at
    once, later ones wait for ``deadline()`` (one flush carries all of them)."""

    interval: float
    last_flush: float = -math.inf
    pending: bool = False

    def mark(self, now: float) -> bool:
        """Note a change; True when it should be flushed right now."""
        self.pending = True
        return now - self.last_flush >= self.interval

    def deadline(self) -> float | None:
        return self.last_flush + self.interval if self.pending else None

    def flushed(self, now: float) -> None:
        self.pending = False
        self.last_flush = now


# --------------------------------------------------------------------------- event streams


@dataclass(eq=False, kw_only=True)
class EventStream:
    """One subscription: which types it wants and the frames not yet read."""

    id: str
    serial: int  # creation order, to evict a session's oldest subscription
    stream: str
    session_id: str
    types: frozenset[str]
    addressable: bool  # False for the implicit one of a plain GET on the Link URL
    queue: deque[bytes]
    dropped: int = 0
    closed: bool = False
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: object | None = None  # the GET currently attached
    _transport: asyncio.Transport | None = None
    _writing: bool = False

    def deliver(self, frame: bytes) -> None:
        """Queue a frame: never blocks; a full queue loses its oldest frame."""
        queue = self.queue
        if len(queue) == queue.maxlen:
            self.dropped += 1
        queue.append(frame)
        self._wakeup.set()

    def close(self) -> None:
        """DELETE or session end: drop what is queued (EXT §4.2) and end the GET."""
        self.closed = True
        self.queue.clear()
        self._wakeup.set()
        if self._writing and self._transport is not None:
            # The reader is stuck in a write to a full socket: no flag reaches it there.
            self._transport.abort()

    def take(self) -> bytes:
        frames = b"".join(self.queue)
        self.queue.clear()
        self._wakeup.clear()
        return frames


@dataclass(eq=False, kw_only=True)
class _Channel:
    """Per media stream: its event streams and the state coalescing feeds on."""

    readers: dict[str, EventStream] = field(default_factory=dict)
    by_session: dict[str, set[str]] = field(default_factory=dict)
    viewercount: int | None = None
    viewercount_sent: int | None = None
    coalescer: Coalescer = field(default_factory=lambda: Coalescer(1.0))
    timer: asyncio.TimerHandle | None = None
    layers: dict[str, object] | None = None


EVENT_HUB_KEY: web.AppKey[EventHub] = web.AppKey("event_hub")


class EventHub:
    """Every event stream of one router, and the HTTP resources that serve them."""

    def __init__(
        self,
        *,
        router: ObservableRouter,
        options: EventOptions | None = None,
        access: AccessControl | None = None,
    ) -> None:
        self.router = router
        self.options = options or EventOptions()
        self.access = access or AccessControl()
        self._channels: dict[str, _Channel] = {}
        self._by_id: dict[str, EventStream] = {}
        self.frames_dropped = 0
        self._attached = False
        self._serial = 0
        # Sessions told to reconnect: their streams outlive the session for a grace period.
        self._reconnecting: set[str] = set()

    # ------------------------------------------------------------------ wiring

    def add_routes(
        self, app: web.Application, *, stream_pattern: str, session_pattern: str
    ) -> None:
        link = f"/whep/{{stream:{stream_pattern}}}/{{session:{session_pattern}}}/events"
        resource = f"{link}/{{events:[A-Za-z0-9_-]{{16,64}}}}"
        app.router.add_route("POST", link, self.post_subscription)
        app.router.add_route("GET", link, self.get_all_events)
        app.router.add_route("OPTIONS", link, self._options(LINK_METHODS))
        app.router.add_route("GET", resource, self.get_event_stream)
        app.router.add_route("DELETE", resource, self.delete_event_stream)
        app.router.add_route("OPTIONS", resource, self._options(STREAM_METHODS))
        app[EVENT_HUB_KEY] = self
        app.on_startup.append(self._on_startup)
        # on_shutdown runs before aiohttp waits for open requests: without it every
        # open event stream would hold shutdown for the full grace period.
        app.on_shutdown.append(self._on_shutdown)

    async def _on_startup(self, app: web.Application) -> None:
        self.attach()

    async def _on_shutdown(self, app: web.Application) -> None:
        self.detach()
        self.close_all()

    def attach(self) -> None:
        if not self._attached:
            self.router.add_listener(self.on_stream_event)
            self._attached = True

    def detach(self) -> None:
        if self._attached:
            self.router.remove_listener(self.on_stream_event)
            self._attached = False

    def links_for(self, session_url: str) -> list[str]:
        """The Link values for the WHEP 201 of the session at ``session_url`` (EXT §4.1:
        one Link per extension)."""
        return [link_value(f"{session_url}/events")]

    # ------------------------------------------------------------------ event input

    def on_stream_event(self, event: StreamEventLike) -> None:
        """The router's listener: cheap, never raises (it runs inside media handling)."""
        try:
            if event.type == "viewercount":
                self._viewercount(event.stream, event.data)
            else:
                self.publish(event.stream, event.type, event.data)
        except Exception:
            log.exception("stream event %s on %r not delivered", event.type, event.stream)

    def publish(self, stream: str, event_type: str, data: dict[str, object]) -> int:
        """Send an event to every event stream of ``stream`` that asked for its type;
        returns how many got it. "layers" (keyed by m-line index, EXT §4.3.3) is also
        remembered, sent to later subscribers, and sent only when it changed."""
        if event_type not in EVENT_TYPES:
            raise ValueError(f"{event_type!r} is not an advertised event type")
        channel = self._channels.get(stream)
        if event_type == "layers":
            if channel is None:
                channel = self._channels[stream] = self._new_channel()
            if channel.layers == data:
                return 0
            channel.layers = data
        if channel is None:
            return 0
        sent = self._fan_out(channel, event_type, encode_event(event_type, data))
        if event_type == "inactive":
            channel.layers = None  # the layers left with the publisher
        return sent

    def drain(self, url: str | None = None) -> int:
        """Tell every player to reconnect (EXT §4.3.5): ``{"url": url}``, or ``{}`` for the
        endpoint it came from. Returns the number of event streams told."""
        frame = encode_event("reconnect", {} if url is None else {"url": url})
        return sum(
            self._fan_out(channel, "reconnect", frame) for channel in self._channels.values()
        )

    def reconnect_sessions(self, session_ids: Iterable[str], *, grace: float = 2.0) -> int:
        """Sessions that ended without a DELETE (their media worker died): tell their
        players to reconnect (EXT §4.3.5; ``{}`` means "to the endpoint you came from"),
        then end those event streams once the frame has had ``grace`` seconds to leave
        (ending a stream drops what is queued). Returns the number of streams told."""
        wanted = set(session_ids)
        frame = encode_event("reconnect", {})
        told = 0
        loop = asyncio.get_running_loop()
        for stream, channel in list(self._channels.items()):
            for session_id in wanted.intersection(channel.by_session):
                for reader_id in channel.by_session[session_id]:
                    reader = channel.readers[reader_id]
                    if "reconnect" in reader.types:
                        reader.deliver(frame)
                        told += 1
                self._reconnecting.add(session_id)
                loop.call_later(grace, self._end_reconnected, session_id, stream)
        return told

    def _end_reconnected(self, session_id: str, stream: str) -> None:
        self._reconnecting.discard(session_id)
        self.close_session(session_id, stream)

    def layers(self, stream: str) -> dict[str, object] | None:
        channel = self._channels.get(stream)
        return None if channel is None else channel.layers

    def _fan_out(self, channel: _Channel, event_type: str, frame: bytes) -> int:
        sent = 0
        for reader in channel.readers.values():
            if event_type in reader.types:
                before = reader.dropped
                reader.deliver(frame)
                self.frames_dropped += reader.dropped - before
                sent += 1
        return sent

    def _viewercount(self, stream: str, data: dict[str, object]) -> None:
        channel = self._channels.get(stream)
        if channel is None:
            return  # nobody listens: nothing to coalesce, nothing to sweep
        count = data.get("viewercount")
        if isinstance(count, int):
            channel.viewercount = count
        now = asyncio.get_running_loop().time()
        if channel.coalescer.mark(now):
            self._flush(stream, channel, now)
        elif channel.timer is None:
            deadline = channel.coalescer.deadline()
            assert deadline is not None
            loop = asyncio.get_running_loop()
            channel.timer = loop.call_at(deadline, self._on_timer, stream, channel)

    def _on_timer(self, stream: str, channel: _Channel) -> None:
        channel.timer = None
        try:
            self._flush(stream, channel, asyncio.get_running_loop().time())
        except Exception:
            log.exception("viewercount flush on %r failed", stream)

    def _flush(self, stream: str, channel: _Channel, now: float) -> None:
        channel.coalescer.flushed(now)
        self._sweep(stream, channel)
        count = channel.viewercount
        if count is not None and count != channel.viewercount_sent:
            channel.viewercount_sent = count
            self._fan_out(
                channel, "viewercount", encode_event("viewercount", {"viewercount": count})
            )

    def _sweep(self, stream: str, channel: _Channel) -> None:
        """Destroy the event streams of sessions that are no longer viewers of ``stream``."""
        state = self.router.streams.get(stream)
        viewers: Mapping[str, object] = {} if state is None else state.viewers
        for session_id in [s for s in channel.by_session if s not in viewers]:
            if session_id not in self._reconnecting:  # those end after their grace period
                self.close_session(session_id, stream)

    # ------------------------------------------------------------------ event streams

    def _new_channel(self) -> _Channel:
        return _Channel(coalescer=Coalescer(self.options.viewercount_interval))

    def subscribe(
        self, stream: str, session_id: str, types: frozenset[str], *, addressable: bool = True
    ) -> EventStream:
        """A new event stream for a viewer session, primed with the current state."""
        channel = self._channels.get(stream)
        if channel is None:
            channel = self._channels[stream] = self._new_channel()
        owned = channel.by_session.setdefault(session_id, set())
        if addressable and len(owned) >= self.options.max_subscriptions_per_session:
            # The oldest goes: a player that re-subscribes on every reload must not pile up.
            self._remove(min((channel.readers[i] for i in owned), key=lambda r: r.serial))
        self._serial += 1
        reader = EventStream(
            id=secrets.token_urlsafe(24),
            serial=self._serial,
            stream=stream,
            session_id=session_id,
            types=types,
            addressable=addressable,
            queue=deque(maxlen=self.options.queue_limit),
        )
        channel.readers[reader.id] = reader
        owned.add(reader.id)
        self._by_id[reader.id] = reader
        state = self.router.streams.get(stream)
        # EXT §4.3.1: "active" when a publisher is live; no initial "inactive" (MUST NOT).
        if "active" in types and state is not None and state.active:
            reader.deliver(encode_event("active", {}))
        if "layers" in types and channel.layers is not None:
            reader.deliver(encode_event("layers", channel.layers))
        if "viewercount" in types and state is not None:
            reader.deliver(encode_event("viewercount", {"viewercount": len(state.viewers)}))
        return reader

    def _remove(self, reader: EventStream) -> None:
        reader.close()
        self._by_id.pop(reader.id, None)
        channel = self._channels.get(reader.stream)
        if channel is None:
            return
        channel.readers.pop(reader.id, None)
        owned = channel.by_session.get(reader.session_id)
        if owned is not None:
            owned.discard(reader.id)
            if not owned:
                del channel.by_session[reader.session_id]
        if not channel.readers and channel.layers is None:
            if channel.timer is not None:
                channel.timer.cancel()
            del self._channels[reader.stream]

    def close_session(self, session_id: str, stream: str) -> int:
        """Destroy every event stream of a session (EXT §4.2); returns how many."""
        channel = self._channels.get(stream)
        if channel is None:
            return 0
        owned = list(channel.by_session.get(session_id, ()))
        for reader_id in owned:
            self._remove(channel.readers[reader_id])
        return len(owned)

    def close_all(self) -> None:
        for reader in list(self._by_id.values()):
            self._remove(reader)

    def get(self, reader_id: str) -> EventStream | None:
        return self._by_id.get(reader_id)

    @property
    def reader_count(self) -> int:
        return len(self._by_id)

    # ------------------------------------------------------------------ HTTP resources

    async def post_subscription(self, request: web.Request) -> web.Response:
        """EXT §4.2: a JSON array of event names in, 201 + the event stream's Location out."""
        stream = request.match_info["stream"]
        grant = self.access.authorize(request.headers.get("Authorization"), Role.VIEW, stream)
        session = self._viewer_session(request)
        self.access.check_bound(session, grant, stream=stream)
        if body_media_type(request) != JSON:
            raise UnsupportedJson(body_media_type(request))
        types = parse_subscription(await read_body(request, accepted=(JSON,)))
        reader = self.subscribe(session.stream, session.id, types)
        location = f"{request.path}/{reader.id}"
        return web.Response(status=201, headers={"Location": location})

    async def get_all_events(self, request: web.Request) -> web.StreamResponse:
        """A plain GET on the Link URL: every event type, for players that only do that.
        The stream lives as long as this one response (it has no URL to come back to)."""
        session = self._viewer_session(request)
        reader = self.subscribe(
            session.stream, session.id, frozenset(EVENT_TYPES), addressable=False
        )
        try:
            return await self._serve(request, reader)
        finally:
            self._remove(reader)

    async def get_event_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._event_stream(request))

    async def delete_event_stream(self, request: web.Request) -> web.Response:
        """EXT §4.2: the player is done; queued events go and later GETs get 404."""
        self._remove(self._event_stream(request))
        return web.Response(status=200)

    def _options(self, methods: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def options(request: web.Request) -> web.Response:
            response = web.Response(status=200, headers={"Accept-Post": JSON})
            add_preflight_headers(response, methods)
            return response

        return options

    def _viewer_session(self, request: web.Request) -> ObservedSession:
        """The WHEP session the Link hangs off; 404 unless it is a viewer of that stream."""
        session = self.router.get_session(request.match_info["session"])
        kind = getattr(session.kind, "value", session.kind)
        if session.stream != request.match_info["stream"] or kind != "viewer":
            raise NotFound("no such session")
        return session

    def _event_stream(self, request: web.Request) -> EventStream:
        reader = self._by_id.get(request.match_info["events"])
        if (
            reader is None
            or not reader.addressable
            or reader.session_id != request.match_info["session"]
            or reader.stream != request.match_info["stream"]
        ):
            raise NotFound("no such event stream")
        return reader

    async def _serve(self, request: web.Request, reader: EventStream) -> web.StreamResponse:
        """Write the reader's frames as they come, a keep-alive comment when idle, until
        the stream is closed, another GET takes it over, or the client goes away."""
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": EVENT_STREAM,
                "Cache-Control": "no-cache",
                # nginx buffers responses unless told not to; events must flow at once.
                "X-Accel-Buffering": "no",
            },
        )
        # The CORS middleware adds its headers after the handler returns: too late for a
        # response whose headers went out with the first byte.
        add_cors_headers(response)
        token = object()
        # One reader per event stream: an EventSource that reconnects replaces its
        # previous (probably dead) connection.
        reader._reader = token
        reader._wakeup.set()
        await response.prepare(request)
        reader._transport = request.transport
        try:
            await self._write(reader, response, RETRY_FRAME)
            while not reader.closed and reader._reader is token:
                frames = reader.take()
                if frames:
                    await self._write(reader, response, frames)
                    continue
                try:
                    async with asyncio.timeout(self.options.keepalive_interval):
                        await reader._wakeup.wait()
                except TimeoutError:
                    await self._write(reader, response, KEEPALIVE_FRAME)
        except ConnectionError:
            pass  # the player left; the event stream stays for its reconnect
        finally:
            if reader._reader is token:
                reader._reader = None
                reader._transport = None
        return response

    @staticmethod
    async def _write(reader: EventStream, response: web.StreamResponse, data: bytes) -> None:
        reader._writing = True
        try:
            await response.write(data)
        finally:
            reader._writing = False


class UnsupportedJson(UnsupportedMediaType):
    """415 naming the accepted type (RFC 9110 §15.5.16)."""

    def __init__(self, received: str) -> None:
        super().__init__(f"Content-Type must be {JSON}, not {received or 'absent'}")
        self.response_headers = {"Accept-Post": JSON}
