"""Stream names: which strings name a stream, checked once for every route that takes one.

A stream name appears in URLs (``/whep/{stream}``, the Location of every session), in logs,
in metrics and status bodies, and in cluster registry keys (``stream:{name}``, DESIGN.md
§7), so it is kept to a small, documented alphabet::

    stream-name = name-start *63name-char
    name-start  = ALPHA / DIGIT / "_" / "-"
    name-char   = name-start / "." / "~"

That is RFC 3986 §2.3 unreserved characters (a Location never needs escaping), at most 64
of them, never starting with ``.`` or ``~`` (so never ``.``, ``..`` or a dot-file, which
path normalisation and file-based tools treat specially) and never containing ``/``.

The routes match any path segment (:data:`ROUTE_PATTERN`) and :func:`stream_name_middleware`
answers a name outside this set with a 400 problem, not a 404 that reads as "no such
stream".
"""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.typedefs import Handler

from whepfan.errors import ParseError

MAX_STREAM_NAME = 64
# Anchored with fullmatch and free of nested quantifiers: linear in the segment's length.
STREAM_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._~-]{0,63}")
# What a route captures: one whole path segment (aiohttp's default for a placeholder).
ROUTE_PATTERN = r"[^{}/]+"


class InvalidStreamName(ParseError):
    def __init__(self, name: str) -> None:
        shown = name if len(name) <= MAX_STREAM_NAME else name[:MAX_STREAM_NAME] + "..."
        super().__init__(
            f"{shown!r} is not a stream name: 1 to {MAX_STREAM_NAME} of A-Z a-z 0-9 _ - . ~, "
            "not starting with . or ~"
        )


def is_stream_name(name: str) -> bool:
    return len(name) <= MAX_STREAM_NAME and STREAM_NAME.fullmatch(name) is not None


def check_stream_name(name: str) -> str:
    """``name`` if it is a stream name, else :class:`InvalidStreamName` (400)."""
    if not is_stream_name(name):
        raise InvalidStreamName(name)
    return name


@web.middleware
async def stream_name_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route with a ``{stream}`` placeholder gets a valid name or a 400."""
    name = request.match_info.get("stream")
    if name is not None:
        check_stream_name(name)
    return await handler(request)
