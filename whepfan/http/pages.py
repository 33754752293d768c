"""The pages whepfan serves to people (plain HTML + JS in ``whepfan/static``, no build step)::

    /                   the live streams, with links to watch and publish them (it reads
                        GET /api/streams, see ``status.py``)
    /watch/{stream}     WHEP player (static/watch.js on static/whep.js)
    /publish/{stream}   camera/microphone WHIP publisher (static/publish.js on static/whip.js)
    /static/...         the pages' scripts, stylesheet and icon (favicon.svg)
    /favicon.ico        the same icon for clients that ask the conventional path

Each page is the same file for every stream: its script takes the stream name from the
path and the token from the URL fragment, so nothing is templated on the server and no
token ever reaches a server log. The scripts work against another origin as well (an
``#endpoint=`` fragment), through the CORS headers of the WHIP/WHEP resources.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from whepfan.http.routes import STREAM_PATTERN

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# The pages run only their own scripts; fetch() may reach any WHIP/WHEP endpoint (a page
# can drive another server, cross-origin); media comes from the peer connection.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src *; media-src 'self' blob: mediastream:; "
        "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Session URLs are capabilities (WHEP draft-03 §4.3): keep page URLs out of Referer.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


STATIC_PREFIX = "/static"
# The pages' scripts and stylesheet: never sniffed into another type (an uploaded or
# mis-typed file cannot run as script), and revalidated on each load (``no-cache``: the
# aiohttp file response answers If-None-Match / If-Modified-Since with a cheap 304), so an
# upgraded server never serves a page with last version's whep.js from a cache.
STATIC_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def add_page_routes(app: web.Application) -> None:
    stream = f"{{stream:{STREAM_PATTERN}}}"
    app.router.add_get("/", _page("index.html"))
    app.router.add_get(f"/watch/{stream}", _page("watch.html"))
    app.router.add_get(f"/publish/{stream}", _page("publish.html"))
    app.router.add_static(STATIC_PREFIX, STATIC_DIR)
    app.router.add_get("/favicon.ico", _favicon)
    app.on_response_prepare.append(_add_static_headers)


async def _add_static_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith(STATIC_PREFIX + "/"):
        response.headers.update(STATIC_HEADERS)


# The pages link /static/favicon.svg; browsers still ask /favicon.ico for anything else
# they show from this origin (a WHEP resource opened in a tab, a JSON status URL).
_FAVICON = (STATIC_DIR / "favicon.ico").read_bytes()


async def _favicon(request: web.Request) -> web.Response:
    return web.Response(
        body=_FAVICON,
        content_type="image/vnd.microsoft.icon",
        headers={"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


def _page(name: str) -> Handler:
    body = (STATIC_DIR / name).read_bytes()  # a few hundred bytes, read once at start-up

    async def page(request: web.Request) -> web.Response:
        response = web.Response(body=body, headers=PAGE_HEADERS)
        response.content_type = "text/html"
        response.charset = "utf-8"
        return response

    return page
