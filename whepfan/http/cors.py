"""CORS for browser players and publishers on other origins (WHEP draft-03 §4.3 and WHATWG
Fetch §3.2). Bearer tokens travel in ``Authorization``, not cookies, so ``*`` is a safe
allowed origin: no credentialed (cookie) request is ever allowed."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import MatchInfoError

# Fetch §3.2.3: a preflight is an OPTIONS request with Access-Control-Request-Method.
PREFLIGHT_REQUEST_HEADER = "Access-Control-Request-Method"
ALLOW_HEADERS = "Authorization, Content-Type, If-Match, ETag"
# Browsers let scripts read only exposed headers: the session URL, its ETag, the
# ice-server Links, and what PATCH accepts (spec notes §1.11), plus Retry-After for 409/503.
EXPOSE_HEADERS = "Location, ETag, Link, Accept-Patch, Accept-Post, Retry-After, WWW-Authenticate"
PREFLIGHT_MAX_AGE = "86400"


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and PREFLIGHT_REQUEST_HEADER in request.headers


def add_cors_headers(response: web.StreamResponse) -> None:
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS


def add_preflight_headers(response: web.StreamResponse, allowed_methods: str) -> None:
    response.headers["Access-Control-Allow-Methods"] = allowed_methods
    response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE


def _methods_of_resource(request: web.Request) -> set[str] | None:
    """The methods of the resource the request's path names, when it names one but has
    no route for the request's method (aiohttp's 405 match), else None."""
    match_info = request.match_info
    if not isinstance(match_info, MatchInfoError):
        return None
    error = match_info.http_exception
    if not isinstance(error, web.HTTPMethodNotAllowed):
        return None
    return set(error.allowed_methods)


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every response, errors included, carries the CORS headers: a browser hides a 4xx
    body from the page unless the response is CORS-readable.

    Resources without an OPTIONS handler of their own (``/api/streams``, ``/metrics``, the
    pages) still answer a preflight (Fetch §4.8, CORS-preflight fetch: without a 2xx a
    page on another origin cannot send the ``Authorization`` its GET needs): 204 listing
    the methods the resource has. Never authenticated, as WHEP §4.8.1 asks of preflights.
    """
    if is_preflight(request):
        methods = _methods_of_resource(request)
        if methods is not None:
            preflight = web.Response(status=204)
            add_preflight_headers(preflight, ", ".join(sorted(methods | {"OPTIONS"})))
            add_cors_headers(preflight)
            return preflight
    response = await handler(request)
    add_cors_headers(response)
    return response
