"""RFC 9457 problem details: every error the HTTP surface answers is a short
``application/problem+json`` body saying what was wrong (WHEP draft-03 §4.1 suggests it)."""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A problem+json response (RFC 9457 §3.1 members ``type``, ``title``, ``status``,
    ``detail``). ``type`` is omitted: RFC 9457 §4.2.1 reads a missing type as
    ``about:blank``, meaning the title is just the HTTP status phrase."""
    if title is None:
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
    body = {"title": title, "status": status, "detail": detail}
    response = web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )
    if retry_after is not None:
        # RFC 9110 §10.2.3: delay-seconds form; WHEP draft-03 §4.2.8 asks for it on 409.
        response.headers["Retry-After"] = str(max(0, int(retry_after)))
    return response
