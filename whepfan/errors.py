"""Error types. Split as h11 does: the peer broke the rules (a 4xx answer or a drop
counter) versus we cannot serve right now (503). Anything else escaping is a bug.

Every error carries the HTTP status it maps to and a short human-readable ``detail``,
which the HTTP layer turns into an RFC 9457 ``application/problem+json`` body.
"""

from __future__ import annotations


class WhepfanError(Exception):
    """Base class; ``status`` is the HTTP status the signalling layer answers with."""

    status = 500
    title = "Internal Server Error"

    def __init__(self, detail: str = "", *, retry_after: int | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.retry_after = retry_after


class PeerError(WhepfanError):
    """The peer (HTTP client or media peer) sent something we cannot accept."""

    status = 400
    title = "Bad Request"


class ParseError(PeerError):
    """Bytes or text that do not parse as the protocol they claim to be.

    Parsers raise only this (or return a value) for any input; fuzz tests hold them to it.
    """


class Unauthorized(PeerError):
    status = 401
    title = "Unauthorized"


class Forbidden(PeerError):
    """Authenticated, but not allowed this (RFC 9110 §15.5.4; RFC 6750 §3.1
    ``insufficient_scope``): retrying with the same credentials cannot help."""

    status = 403
    title = "Forbidden"


class NotFound(PeerError):
    status = 404
    title = "Not Found"


class NotAcceptable(PeerError):
    """No codec in common (WHEP draft-03 §4.2.2 answers this with a counter-offer)."""

    status = 406
    title = "Not Acceptable"


class RequestTimeout(PeerError):
    """The request's body did not arrive in time (RFC 9110 §15.5.9); the server closes the
    connection after answering, since the rest of the body may still be on its way."""

    status = 408
    title = "Request Timeout"
    close_connection = True


class Conflict(PeerError):
    """Stream not live for a viewer (WHEP §4.2.8) or already published (WHIP)."""

    status = 409
    title = "Conflict"


class PreconditionFailed(PeerError):
    status = 412
    title = "Precondition Failed"


class UnsupportedMediaType(PeerError):
    status = 415
    title = "Unsupported Media Type"


class Unprocessable(PeerError):
    status = 422
    title = "Unprocessable Content"


class PreconditionRequired(PeerError):
    status = 428
    title = "Precondition Required"


class TooManyRequests(PeerError):
    """A client over its request rate (RFC 6585 §4), answered with Retry-After."""

    status = 429
    title = "Too Many Requests"


class ServiceUnavailable(WhepfanError):
    """No capacity left, or the server is draining (answered 503 + Retry-After)."""

    status = 503
    title = "Service Unavailable"
