"""Reading a request body: its media type, its content coding, its size and its time.

Every handler that takes a body reads it through :func:`read_text_body`, before it touches
any session state (``routes.py``), so the checks are the same everywhere:

- ``Content-Type`` must be one of the resource's types (415 + ``Accept-Post`` or
  ``Accept-Patch`` otherwise, RFC 9110 §15.5.16, RFC 5789 §2.2), parsed linearly
  (``headers.py``).
- ``Content-Encoding`` other than ``identity`` is refused with 415 + ``Accept-Encoding:
  identity`` (RFC 9110 §8.4.1, §12.5.3). No WHIP/WHEP client compresses an SDP of a few
  kilobytes, and decoding one would put a decompressor (and its bombs: a 128 KB deflate
  body inflates to gigabytes) in front of every unauthenticated POST for nothing; the
  server is also run with aiohttp's ``auto_decompress`` off, so no decoder ever sees it.
- The size is capped by the application's ``client_max_size`` (413 from aiohttp).
- The whole body must arrive within the application's ``body_timeout`` of the handler
  asking for it
  (408, and the connection is closed): a client that trickles a body would otherwise
  hold its connection, and a handler, for as long as it likes.
- It must be UTF-8 (400).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from whepfan.errors import ParseError, RequestTimeout, UnsupportedMediaType
from whepfan.http.connections import CONNECTION_GUARD_KEY, ConnectionLimits
from whepfan.http.headers import media_type_essence

IDENTITY = "identity"


class UnsupportedBodyType(UnsupportedMediaType):
    """415 naming the accepted types (RFC 9110 §15.5.16; RFC 5789 §2.2 for PATCH)."""

    def __init__(self, method: str, accepted: tuple[str, ...], received: str) -> None:
        super().__init__(f"Content-Type must be {' or '.join(accepted)}, not {received}")
        field_name = "Accept-Post" if method == "POST" else "Accept-Patch"
        self.response_headers = {field_name: ", ".join(accepted)}


class UnsupportedContentEncoding(UnsupportedMediaType):
    """415 for a content coding we do not decode, with ``Accept-Encoding: identity``
    (RFC 9110 §15.5.16: the field says which codings would have been accepted)."""

    def __init__(self, coding: str) -> None:
        super().__init__(
            f"Content-Encoding {coding[:40]!r} is not accepted: send the body uncompressed"
        )
        self.response_headers = {"Accept-Encoding": IDENTITY}


def body_media_type(request: web.Request) -> str:
    """The request's ``type/subtype`` (lower case), "" when absent or malformed."""
    return media_type_essence(request.headers.get("Content-Type")) or ""


def check_content_encoding(request: web.Request) -> None:
    """Raise :class:`UnsupportedContentEncoding` unless the body is unencoded."""
    for value in request.headers.getall("Content-Encoding", ()):
        for coding in value.split(","):
            coding = coding.strip(" \t").lower()
            if coding and coding != IDENTITY:
                raise UnsupportedContentEncoding(coding)


def body_timeout(request: web.Request) -> float:
    """The application's body deadline (``ConnectionLimits.body_timeout``)."""
    guard = request.app.get(CONNECTION_GUARD_KEY)
    return guard.limits.body_timeout if guard is not None else ConnectionLimits().body_timeout


async def read_body(request: web.Request, *, accepted: tuple[str, ...]) -> bytes:
    """The body after the type, coding and time checks in the module docstring."""
    media_type = body_media_type(request)
    if media_type not in accepted:
        received = media_type or request.headers.get("Content-Type", "no Content-Type")[:60]
        raise UnsupportedBodyType(request.method, accepted, received)
    check_content_encoding(request)
    timeout = body_timeout(request)
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None


async def read_text_body(request: web.Request, *, accepted: tuple[str, ...]) -> str:
    """:func:`read_body`, which must be UTF-8 text (400 otherwise)."""
    raw = await read_body(request, accepted=accepted)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("the body is not UTF-8 text") from None
