"""The aiohttp application: routes, CORS, and the mapping of errors to responses.

Errors split as in ``whepfan.errors``: a ``PeerError`` is the client's fault and becomes
a 4xx problem+json (RFC 9457); ``ServiceUnavailable`` is the only 5xx we mean to send
(503 + Retry-After). Anything else escaping a handler is a bug: it is logged, counted,
and answered 500 without details. A client that goes away mid-body, or sends a body whose
framing is broken, is neither: it is counted (``http_client_aborted``), logged at DEBUG,
and its connection closed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestPayloadError

from whepfan.errors import PeerError, ServiceUnavailable
from whepfan.http.backend import SessionRouter
from whepfan.http.connections import CONNECTION_GUARD_KEY, ConnectionGuard, connection_middleware
from whepfan.http.cors import cors_middleware
from whepfan.http.events import EventHub, EventOptions, ObservableRouter
from whepfan.http.layers import LayerRouter, LayerSelection
from whepfan.http.names import stream_name_middleware
from whepfan.http.pages import add_page_routes
from whepfan.http.problem import problem_response
from whepfan.http.ratelimit import rate_limit_middleware
from whepfan.http.routes import SESSION_PATTERN, STREAM_PATTERN, HttpOptions, WhipWhepResources
from whepfan.http.status import StatusRouter, StreamStatus

log = logging.getLogger("whepfan.http")

COUNTERS_KEY = web.AppKey("counters", Counter)
# Headers aiohttp's own HTTP errors carry that must survive the problem+json rewrite:
# Allow on 405 (RFC 9110 §15.5.6), Accept-* on 415 (RFC 9110 §15.5.16, RFC 5789 §2.2).
_KEPT_HEADERS = ("Allow", "Accept-Post", "Accept-Patch", "Retry-After", "WWW-Authenticate")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    counters = request.app[COUNTERS_KEY]
    try:
        return await handler(request)
    except (PeerError, ServiceUnavailable) as exc:
        counters[f"http_{exc.status}"] += 1
        # Some errors name a header their status needs (WWW-Authenticate on 401).
        headers: dict[str, str] | None = getattr(exc, "response_headers", None)
        response = problem_response(
            exc.status, exc.detail, retry_after=exc.retry_after, headers=headers
        )
        if getattr(exc, "close_connection", False):
            response.force_close()  # e.g. 408: the rest of the body may still be coming
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        counters[f"http_{exc.status}"] += 1
        kept = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return problem_response(exc.status, exc.reason, headers=kept)
    except (ConnectionError, RequestPayloadError) as exc:
        # The client went away (mid-body, aiohttp fails the read with ConnectionResetError;
        # mid-response, the write fails) or broke the body's framing (RequestPayloadError):
        # its doing, not a bug. The answer reaches it only in the framing case.
        counters["http_client_aborted"] += 1
        log.debug("%s %s: the client went away: %r", request.method, request.path, exc)
        response = problem_response(400, "the request was not received in full")
        response.force_close()
        return response
    except Exception:
        # A bug, never a client's fault: log it with the request line, answer 500.
        counters["http_500"] += 1
        log.exception("%s %s failed", request.method, request.path)
        return problem_response(500, "internal error; see the server log")


def create_app(
    *,
    router: SessionRouter,
    clock: Callable[[], float],
    options: HttpOptions,
    wall_clock: Callable[[], float] = time.time,
    event_options: EventOptions | None = None,
    viewer_placement: Callable[[web.Request, str], Awaitable[web.Response | None]] | None = None,
) -> web.Application:
    """The WHIP/WHEP application for one router; ``clock`` is the router's ``now``."""
    counters: Counter[str] = Counter()
    middlewares: list[Middleware] = [connection_middleware, cors_middleware, error_middleware]
    if options.post_rate_limit is not None:
        proxies = options.trusted_proxies

        def client_key(request: web.Request, exempt_loopback: bool) -> str | None:
            return proxies.of(request).key(exempt_loopback=exempt_loopback)

        middlewares.append(
            rate_limit_middleware(
                options.post_rate_limit, clock=clock, counters=counters, key_of=client_key
            )
        )
    middlewares.append(stream_name_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=options.max_body_bytes)
    app[COUNTERS_KEY] = counters
    # Deadlines and the connection cap; in force where a connections.GuardedSite serves app.
    app[CONNECTION_GUARD_KEY] = ConnectionGuard(options.limits)
    resources = WhipWhepResources(
        router=router,
        clock=clock,
        options=options,
        wall_clock=wall_clock,
        viewer_placement=viewer_placement,
        counters=counters,
    )
    # One for every resource: a session's binding is checked wherever it is acted on.
    access = resources.access
    hub: EventHub | None = None
    if isinstance(router, ObservableRouter):
        # Only a router that emits stream events can back the SSE extension.
        hub = EventHub(router=router, options=event_options, access=access)
        hub.add_routes(app, stream_pattern=STREAM_PATTERN, session_pattern=SESSION_PATTERN)
        resources.viewer_links = hub.links_for
    if isinstance(router, LayerRouter):
        # EXT §5: the layer extension (its "layers" data reaches players through SSE).
        layer_api = LayerSelection(router=router, clock=clock, access=access)
        layer_api.add_routes(app, stream_pattern=STREAM_PATTERN, session_pattern=SESSION_PATTERN)
        resources.viewer_links = layer_api.links_with(resources.viewer_links)
        resources.viewer_created = layer_api.viewer_created
    resources.add_routes(app)
    if isinstance(router, StatusRouter):
        StreamStatus(router=router, clock=clock, hub=hub, access=access).add_routes(
            app, stream_pattern=STREAM_PATTERN
        )
    add_page_routes(app)
    return app
