"""WHIP (RFC 9725) and WHEP (draft-ietf-wish-whep-03) resources.

::

    /whip/{stream}             endpoint: POST offer, OPTIONS, GET/HEAD
    /whip/{stream}/{session}   session:  PATCH (trickle, ICE restart), DELETE, OPTIONS, GET/HEAD
    /whep/{stream}             endpoint: POST offer (201, or 406 + counter-offer), OPTIONS, GET/HEAD
    /whep/{stream}/{session}   session:  PATCH (trickle, ICE restart, counter-offer answer), DELETE

Every handler reads the whole request body first and then calls the router without
awaiting anything, so a client that disconnects mid-request can never leave half a
session behind. Errors are raised as ``whepfan.errors`` types; ``app.py`` turns them into
problem+json responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import logging
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from whepfan.errors import (
    Conflict,
    NotAcceptable,
    NotFound,
    ParseError,
    TooManyRequests,
)
from whepfan.http.auth import AccessControl
from whepfan.http.backend import PendingRouter, SessionRouter, SessionView
from whepfan.http.body import body_media_type, read_text_body
from whepfan.http.clientaddr import TrustedProxies
from whepfan.http.connections import ConnectionLimits
from whepfan.http.cors import add_preflight_headers, is_preflight
from whepfan.http.etag import check_if_match
from whepfan.http.links import IceServer
from whepfan.http.names import ROUTE_PATTERN
from whepfan.http.pending import PendingLimit, PendingSessions
from whepfan.http.ratelimit import RateLimit
from whepfan.http.tokens import Grant, JwtVerifier, Role
from whepfan.http.tombstones import DEFAULT_ENDED_SESSION_GRACE, IssuedSession, SessionTombstones
from whepfan.protocol import sdp

log = logging.getLogger("whepfan.http")

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
# RFC 8840 §9 / RFC 5789 §3.1: what PATCH on a session accepts.
ACCEPT_PATCH = SDPFRAG
# The router's session ids are 192-bit token_urlsafe strings. Routes take any path
# segment as a stream name and names.stream_name_middleware answers 400 to one outside
# the documented alphabet (RFC 3986 §2.3 unreserved characters, so Locations never need
# escaping), rather than a 404 that would read as "no such stream".
STREAM_PATTERN = ROUTE_PATTERN
SESSION_PATTERN = r"[A-Za-z0-9_-]{16,128}"
# PATCH and DELETE are listed on the endpoint too: some players (Eyevinn) only trickle
# when the endpoint's OPTIONS permits PATCH (spec notes §1.1).
ENDPOINT_METHODS = "OPTIONS, GET, HEAD, POST, PATCH, DELETE"
SESSION_METHODS = "OPTIONS, GET, HEAD, PATCH, DELETE"
# WHEP draft-03 §4.2.2: without valid-until a counter-offer is valid for 30 s.
DEFAULT_COUNTER_OFFER_TTL = 30.0


class Protocol(enum.Enum):
    """Which of the two specifications a resource follows."""

    WHIP = "whip"
    WHEP = "whep"

    @property
    def session_kind(self) -> str:
        return "publisher" if self is Protocol.WHIP else "viewer"

    @property
    def role(self) -> Role:
        return Role.PUBLISH if self is Protocol.WHIP else Role.VIEW


ProtocolHandler = Callable[[web.Request, Protocol], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpOptions:
    """Signalling policy (built by ``whepfan.settings``)."""

    publish_token: str | None = None
    view_token: str | None = None
    # Scoped JWTs besides the static tokens (whepfan.http.tokens); None: static only.
    jwt: JwtVerifier | None = None
    ice_servers: tuple[IceServer, ...] = ()
    # RFC 6585 §3 428 for PATCH without If-Match; off by default (reference/clients.md).
    strict_etag: bool = False
    # A second WHIP publisher replaces the live one instead of getting 409.
    publisher_takeover: bool = False
    counter_offer_ttl: float = DEFAULT_COUNTER_OFFER_TTL
    # How long the URL of a session that ended without its DELETE (close_notify, consent
    # lost, taken over) still answers that DELETE with 200 (tombstones.py); then 404.
    ended_session_grace: float = DEFAULT_ENDED_SESSION_GRACE
    # Each client's sessions answered and not connected yet at most (pending.py); None:
    # no cap. Clients are told apart through trusted proxies' headers (clientaddr.py).
    pending_limit: PendingLimit | None = None
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    max_body_bytes: int = 128 * 1024
    # Header, body and keep-alive deadlines and the connection cap (connections.py).
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    # Another node of the cluster pulling a stream (whepfan/cluster/): a view credential.
    cluster_token: str | None = None
    # Per-client POST token buckets (ratelimit.py); None: no limit.
    post_rate_limit: RateLimit | None = None
    # This node's URL as clients reach it (``node_url`` in a cluster). When set, session
    # Locations and extension Links are absolute URLs under it: a viewer an edge placed
    # here with a 307 reached this node at that URL, and browser players resolve a
    # relative Location against the URL they first POSTed to (medooze, Eyevinn, fetch's
    # redirect hidden from them), which would send PATCH and DELETE to the edge.
    public_url: str | None = None


@dataclass(eq=False, kw_only=True)
class WhipWhepResources:
    """The handlers, bound to one router and its clock."""

    router: SessionRouter
    clock: Callable[[], float]  # the media worker's loop time: the router's ``now``
    options: HttpOptions
    wall_clock: Callable[[], float] = time.time  # for HTTP-dates and TURN credentials
    # Client ufrags adopted by ICE restarts this layer asked for, per session object, so a
    # trickle that follows a restart (new ufrag, before the new pair verifies) is not
    # taken for a second restart. Weak keys: the entry goes when the router drops the
    # session, whatever ends it (DELETE, consent expiry, DTLS failure).
    _restart_ufrags: weakref.WeakKeyDictionary[SessionView, set[str]] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    # Extension Links for a WHEP 201, from the session's URL (its Location): WHEP
    # draft-03 §4.9 [M]; the extensions' resources are under it.
    viewer_links: Callable[[str], list[str]] | None = None
    # Called with each new WHEP session before its 201 (layers.py: ``?rid=``); may raise.
    viewer_created: Callable[[web.Request, SessionView, float], None] | None = None
    # Called with a WHEP POST before its body is read (whepfan/cluster/placement.py): a
    # response to send instead (307 to another node), or None once the stream is here
    # (pulled from upstream if need be); may raise whepfan.errors. Nothing awaits
    # between the body read and the router call, so no half-made session either way.
    viewer_placement: Callable[[web.Request, str], Awaitable[web.Response | None]] | None = None
    # Credentials and session binding (auth.py); create_app shares it with the extensions.
    access: AccessControl = field(init=False)
    # Issued session URLs and the recently ended ones, for the DELETE that follows an end.
    tombstones: SessionTombstones = field(init=False)
    # The application's counters (app.COUNTERS_KEY): refusals by the per-client cap.
    counters: Counter[str] = field(default_factory=Counter)
    # Each client's pending sessions (options.pending_limit), and how to ask the backend
    # whether one still is.
    pending: PendingSessions | None = field(default=None, init=False)
    _still_pending: Callable[[str], bool] = field(init=False)
    _sweeper: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        options = self.options
        self.access = AccessControl(
            publish_token=options.publish_token,
            view_token=options.view_token,
            cluster_token=options.cluster_token,
            verifier=options.jwt,
            wall_clock=self.wall_clock,
        )
        self.tombstones = SessionTombstones(grace=options.ended_session_grace)
        if options.pending_limit is not None:
            self.pending = PendingSessions(options.pending_limit)
        router = self.router
        if isinstance(router, PendingRouter):
            self._still_pending = router.session_pending
        else:
            self._still_pending = self._is_alive  # counted until it ends or its deadline

    def add_routes(self, app: web.Application) -> None:
        for protocol in Protocol:
            endpoint = f"/{protocol.value}/{{stream:{STREAM_PATTERN}}}"
            session = f"{endpoint}/{{session:{SESSION_PATTERN}}}"
            app.router.add_route("POST", endpoint, self._bind(self.post_offer, protocol))
            app.router.add_route("OPTIONS", endpoint, self._bind(self.options_endpoint, protocol))
            app.router.add_route("GET", endpoint, self.get_endpoint)
            app.router.add_route("HEAD", endpoint, self.head_endpoint)
            app.router.add_route("PATCH", session, self._bind(self.patch_session, protocol))
            app.router.add_route("DELETE", session, self._bind(self.delete_session, protocol))
            app.router.add_route("OPTIONS", session, self._bind(self.options_session, protocol))
            app.router.add_route("GET", session, self._bind(self.get_session, protocol))
            app.router.add_route("HEAD", session, self._bind(self.get_session, protocol))
        app.on_startup.append(self._start_sweeping)
        app.on_cleanup.append(self._stop_sweeping)

    # Ends are dated to within this (seconds): against the 60 s grace, close enough.
    SWEEP_INTERVAL = 1.0

    def sweep_ended_sessions(self) -> int:
        """Tombstone the issued sessions the media plane ended since the last sweep."""
        return self.tombstones.sweep(self.clock(), self._is_alive)

    def settle_pending(self) -> int:
        """Forget pending sessions that connected, ended or passed their deadline."""
        if self.pending is None:
            return 0
        return self.pending.settle(self.clock(), self._still_pending)

    def _is_alive(self, session_id: str) -> bool:
        try:
            self.router.get_session(session_id)
        except NotFound:
            return False
        return True

    async def _start_sweeping(self, app: web.Application) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def _stop_sweeping(self, app: web.Application) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.SWEEP_INTERVAL)
            try:
                self.sweep_ended_sessions()
                self.settle_pending()
            except Exception:
                log.exception("sweeping ended sessions failed")

    @staticmethod
    def _bind(handler: ProtocolHandler, protocol: Protocol) -> Handler:
        async def bound(request: web.Request) -> web.StreamResponse:
            return await handler(request, protocol)

        return bound

    # ------------------------------------------------------------------ endpoints

    async def post_offer(self, request: web.Request, protocol: Protocol) -> web.Response:
        """WHIP RFC 9725 §4.2 / WHEP draft-03 §4.2: offer in, 201 + answer out."""
        grant = self._authorize(request, protocol)
        stream = request.match_info["stream"]
        if protocol is Protocol.WHEP and self.viewer_placement is not None:
            placed = await self.viewer_placement(request, stream)
            if placed is not None:
                return placed
        if protocol is Protocol.WHEP and not request.body_exists:
            now = self.clock()
            return self._server_offer(stream, now, grant, self._pending_client(request, now))
        offer = await self._read_body(request, accepted=(SDP,))
        now = self.clock()
        # After the body: nothing awaits from here to the session's creation, so a
        # client's concurrent POSTs cannot all pass the check before any is counted.
        client = self._pending_client(request, now)
        if protocol is Protocol.WHIP:
            session, answer = self._publish(stream, offer, now)
            self._add_pending(client, session, now)
            self.access.bind(session, grant)
        else:
            try:
                session, answer = self.router.view(stream, offer, now)
            except NotAcceptable:
                return self._counter_offer(stream, now, grant, client)
            self._add_pending(client, session, now)
            self.access.bind(session, grant)
            if self.viewer_created is not None:
                self.viewer_created(request, session, now)
        self._issue(protocol, session, grant)
        location = self._location(protocol, session)
        headers = {
            "Location": location,
            "ETag": session.etag,
            # Only M01/M02 required it, but live777, Meetecho and MediaMTX send it and the
            # wish-wg WHIP test checks it (spec notes §1.2).
            "Accept-Patch": ACCEPT_PATCH,
        }
        response = web.Response(status=201, body=answer.encode(), headers=headers)
        response.headers["Content-Type"] = SDP
        self._add_ice_server_links(response)
        if protocol is Protocol.WHEP and self.viewer_links is not None:
            for link in self.viewer_links(location):
                response.headers.add("Link", link)
        return response

    def _publish(self, stream: str, offer: str, now: float) -> tuple[SessionView, str]:
        try:
            return self.router.publish(stream, offer, now)
        except Conflict:
            current = self.router.streams.get(stream)
            publisher = current.publisher if current is not None else None
            if not self.options.publisher_takeover or publisher is None:
                raise
            # Check the newcomer's offer reads before dropping the live publisher for it.
            sdp.SessionDescription.parse(offer)
            log.info("publisher on %r taken over by a new WHIP session", stream)
            self.router.end_session(publisher.id, now, "taken-over")
            self.tombstones.end(publisher.id, now)
            self._release_pending(publisher.id)
            return self.router.publish(stream, offer, now)

    def _counter_offer(
        self, stream: str, now: float, grant: Grant | None, client: str | None
    ) -> web.Response:
        """WHEP draft-03 §4.2.2: 406 with our own offer and the future session's Location;
        the player PATCHes its answer there. The router drops the session if no answer
        comes within ``counter_offer_ttl``."""
        offer, headers, valid_until = self._server_offered_session(stream, now, grant, client)
        response = web.Response(status=406, body=offer.encode(), headers=headers)
        # The parameter value is an HTTP-date (RFC 9110 §5.6.7), which needs quoting.
        response.headers["Content-Type"] = f'{SDP}; valid-until="{valid_until}"'
        return response

    def _server_offered_session(
        self, stream: str, now: float, grant: Grant | None, client: str | None
    ) -> tuple[str, dict[str, str], str]:
        """A viewer session that starts with our offer (406 counter-offer or the legacy
        server-offer mode): the offer, the session's headers, and the HTTP-date after
        which an unanswered offer is gone (``counter_offer_ttl``). Pending for ``client``
        until answered and connected, like any other session."""
        session, offer = self.router.counter_offer(stream, now)
        self._add_pending(client, session, now)
        self.access.bind(session, grant)
        self._issue(Protocol.WHEP, session, grant)
        deadline = email.utils.formatdate(
            self.wall_clock() + self.options.counter_offer_ttl, usegmt=True
        )
        headers = {
            "Location": self._location(Protocol.WHEP, session),
            "ETag": session.etag,
            "Accept-Patch": f"{SDP}, {SDPFRAG}",
        }
        return offer, headers, deadline

    def _server_offer(
        self, stream: str, now: float, grant: Grant | None, client: str | None
    ) -> web.Response:
        """The legacy server-offer mode (draft-murillo-whep-00/01 §4, removed in -02): a
        POST with no body gets 201 with our offer, a Location and Expires; the player
        PATCHes its answer there (204), exactly as after a 406 counter-offer, and the
        session goes if no answer comes within ``counter_offer_ttl``. Eyevinn's
        webrtc-player falls back to it when its own offer is refused with 400, and
        players written against Cloudflare's "server offer" WHEP use it first."""
        offer, headers, expires = self._server_offered_session(stream, now, grant, client)
        headers["Expires"] = expires  # draft-murillo-whep-01 §4: when an unanswered offer goes
        response = web.Response(status=201, body=offer.encode(), headers=headers)
        response.headers["Content-Type"] = SDP
        self._add_ice_server_links(response)
        return response

    async def options_endpoint(self, request: web.Request, protocol: Protocol) -> web.Response:
        """WHEP draft-03 §4.3: OPTIONS for CORS, 200 with Accept-Post. A preflight is
        never authenticated (§4.8.1: players send no token on it)."""
        response = web.Response(status=200, headers={"Accept-Post": SDP})
        add_preflight_headers(response, ENDPOINT_METHODS)
        if not is_preflight(request) and self._is_authorized(request, protocol):
            # RFC 9725 §4.6 allows ice-server Links on OPTIONS (not on preflights) for
            # clients that need them before createOffer; only to a caller with the token,
            # since TURN credentials are handed out.
            self._add_ice_server_links(response)
        return response

    async def get_endpoint(self, request: web.Request) -> web.Response:
        # RFC 9725 §4.1 / WHEP draft-03 §4.1: no representation, 2xx without content.
        return web.Response(status=204)

    async def head_endpoint(self, request: web.Request) -> web.Response:
        # WHEP editor's copy after -03 (discoverability): 200 with Content-Type
        # application/sdp and no body, so players can tell a WHEP endpoint apart.
        response = web.Response(status=200)
        response.headers["Content-Type"] = SDP
        return response

    # ------------------------------------------------------------------ sessions

    async def patch_session(self, request: web.Request, protocol: Protocol) -> web.Response:
        grant = self._authorize(request, protocol)
        session = self._session(request, protocol)
        self.access.check_bound(session, grant, stream=session.stream)
        accepted = (SDPFRAG, SDP) if protocol is Protocol.WHEP else (SDPFRAG,)
        body = await self._read_body(request, accepted=accepted)
        check_if_match(
            if_match=request.headers.get("If-Match"),
            etag_header=request.headers.get("ETag"),
            current=session.etag,
            strict=self.options.strict_etag,
        )
        now = self.clock()
        if body_media_type(request) == SDP:
            # WHEP draft-03 §4.2.2: the player's answer to our counter-offer -> 204.
            self.router.accept_counter_answer(session.id, body, now)
            return web.Response(status=204)
        if _is_json(body):
            # react-native-whip-whep PATCHes JSON under the sdpfrag type: nothing usable.
            return web.Response(status=204)
        fragment = sdp.parse_sdpfrag(body)
        if self._is_ice_restart(session, fragment):
            return self._restart_ice(session, fragment, now)
        # WHEP draft-03 §4.4.2: 204, no body, and no ETag on a trickle.
        self.router.trickle(session.id, fragment, now)
        return web.Response(status=204)

    def _is_ice_restart(self, session: SessionView, fragment: sdp.SdpFragment) -> bool:
        """WHEP draft-03 §4.4.3 / RFC 9725 §4.3.3: a new ufrag/pwd is a restart. Not
        ``If-Match: *`` alone: MediaMTX sends that on every plain trickle."""
        ufrag = fragment.ufrag
        if ufrag is None:
            return False
        known = {session.ice.remote_ufrag, *self._restart_ufrags.get(session, ())}
        return ufrag not in known

    def _restart_ice(
        self, session: SessionView, fragment: sdp.SdpFragment, now: float
    ) -> web.Response:
        if fragment.pwd is None:
            raise ParseError("an ICE restart carries a new ice-pwd along with the ice-ufrag")
        ufrag = fragment.ufrag
        assert ufrag is not None
        answer = self.router.restart_ice(session.id, fragment, now)
        self._restart_ufrags.setdefault(session, set()).add(ufrag)
        # 200 + our new ICE attributes and candidates + a new ETag (WHEP draft-03 §4.4.3).
        response = web.Response(status=200, body=answer.encode(), headers={"ETag": session.etag})
        response.headers["Content-Type"] = SDPFRAG
        return response

    async def delete_session(self, request: web.Request, protocol: Protocol) -> web.Response:
        """WHEP draft-03 §4.3: end the session; any If-Match/ETag is ignored (§4.4.1).

        A session that ended a moment ago without it (tombstones.py) answers 200 too,
        once; a DELETE after the one that answered 200 gets 404.
        """
        grant = self._authorize(request, protocol)
        try:
            self.router.get_session(request.match_info["session"])
        except NotFound:
            return self._delete_ended(request, protocol, grant)
        session = self._session(request, protocol)
        self.access.check_bound(session, grant, stream=session.stream)
        self.router.end_session(session.id, self.clock(), "deleted")
        self.tombstones.forget(session.id)
        self._release_pending(session.id)
        self._restart_ufrags.pop(session, None)
        # 200, as the spec's diagram shows; OBS warns on anything else (spec notes §1.8).
        return web.Response(status=200)

    def _delete_ended(
        self, request: web.Request, protocol: Protocol, grant: Grant | None
    ) -> web.Response:
        record = self.tombstones.take(
            request.match_info["session"],
            self.clock(),
            endpoint=protocol.value,
            stream=request.match_info["stream"],
        )
        if record is None:
            raise NotFound("no such session")
        # The credential that made the session still decides who may DELETE its URL.
        self.access.check_bound(record, grant, stream=record.stream)
        return web.Response(status=200)

    async def options_session(self, request: web.Request, protocol: Protocol) -> web.Response:
        accept_patch = f"{SDPFRAG}, {SDP}" if protocol is Protocol.WHEP else SDPFRAG
        response = web.Response(status=200, headers={"Accept-Patch": accept_patch})
        add_preflight_headers(response, SESSION_METHODS)
        return response

    async def get_session(self, request: web.Request, protocol: Protocol) -> web.Response:
        # RFC 9725 §4.1: a session has no representation either; 2xx without content.
        self._session(request, protocol)
        return web.Response(status=204)

    # ------------------------------------------------------------------ helpers

    def _authorize(self, request: web.Request, protocol: Protocol) -> Grant | None:
        # Only the Authorization header counts: a ?token= query is never authentication.
        return self.access.authorize(
            request.headers.get("Authorization"), protocol.role, request.match_info["stream"]
        )

    def _is_authorized(self, request: web.Request, protocol: Protocol) -> bool:
        return self.access.is_authorized(
            request.headers.get("Authorization"), protocol.role, request.match_info["stream"]
        )

    def _pending_client(self, request: web.Request, now: float) -> str | None:
        """The client a new session will count against (pending.py), or None when it is
        not counted; TooManyRequests (429) when that client is at its cap. Another node
        of the cluster is not counted: an edge pulls each of its streams at once from
        one address, and the cluster token is a credential only nodes hold."""
        pending = self.pending
        if pending is None or self.access.is_cluster_node(request.headers.get("Authorization")):
            return None
        client = self.options.trusted_proxies.of(request).key(
            exempt_loopback=pending.limit.exempt_loopback
        )
        if client is None:
            return None
        wait = pending.check(client, now, self._still_pending)
        if wait is not None:
            self.counters["client_pending_full"] += 1
            raise TooManyRequests(
                f"this address already has {pending.limit.max_per_client} sessions answered "
                "and not connected (ICE + DTLS) yet, the most one client may have; try "
                "again once one has connected or gone",
                retry_after=wait,
            )
        return client

    def _add_pending(self, client: str | None, session: SessionView, now: float) -> None:
        if client is not None and self.pending is not None:
            self.pending.add(client, session.id, now)

    def _release_pending(self, session_id: str) -> None:
        if self.pending is not None:
            self.pending.release(session_id)

    def _session(self, request: web.Request, protocol: Protocol) -> SessionView:
        """The session named by the URL; 404 unless it exists under this very endpoint."""
        session = self.router.get_session(request.match_info["session"])
        if (
            session.stream != request.match_info["stream"]
            or session.kind.value != protocol.session_kind
        ):
            raise NotFound("no such session")
        return session

    async def _read_body(self, request: web.Request, *, accepted: tuple[str, ...]) -> str:
        return await read_text_body(request, accepted=accepted)

    def _issue(self, protocol: Protocol, session: SessionView, grant: Grant | None) -> None:
        record = IssuedSession(
            session_id=session.id, endpoint=protocol.value, stream=session.stream
        )
        self.tombstones.issue(record)
        self.access.bind(record, grant)

    def _location(self, protocol: Protocol, session: SessionView) -> str:
        # An absolute URL under public_url, else an absolute path: Eyevinn's player
        # resolves no other relative form (spec notes §1.2).
        path = f"/{protocol.value}/{session.stream}/{session.id}"
        base = self.options.public_url
        return f"{base.rstrip('/')}{path}" if base else path

    def _add_ice_server_links(self, response: web.StreamResponse) -> None:
        unix_now = self.wall_clock()
        for server in self.options.ice_servers:
            # One Link field per server (spec notes §1.10: not a comma-joined list).
            response.headers.add("Link", server.link_value(unix_now))


def _is_json(body: str) -> bool:
    if body.lstrip()[:1] not in ("{", "["):
        return False
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True
