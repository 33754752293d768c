"""Bearer-token checks (WHEP draft-03 §4.8.1, RFC 9725 §4.7, RFC 6750 §2.1).

Real clients differ (reference/clients.md): some send the token without the ``Bearer``
prefix, some send ``Bearer undefined`` when none is set. A raw token is accepted; a token
in the query string never is (RFC 6750 §5.3: URLs end up in logs and Referer headers).
"""

from __future__ import annotations

import hmac

from whepfan.errors import Unauthorized

# RFC 9110 §11.6.1: a 401 MUST carry WWW-Authenticate with a challenge.
REALM = "whepfan"


class BearerUnauthorized(Unauthorized):
    """A 401 carrying the RFC 6750 §3 challenge for the request it refuses."""

    def __init__(self, detail: str, *, challenge: str) -> None:
        super().__init__(detail)
        self.response_headers = {"WWW-Authenticate": challenge}


def presented_token(authorization: str | None) -> str | None:
    """The token a request presents in ``Authorization``, or None if it presents none.

    ``Bearer <token>`` (scheme case-insensitive, RFC 9110 §11.1) or a bare token; any
    other scheme with a space (``Basic ...``) is not a bearer token.
    """
    if authorization is None:
        return None
    value = authorization.strip()
    if not value:
        return None
    scheme, _, rest = value.partition(" ")
    if not rest:
        return value  # a raw token without the "Bearer " prefix
    if scheme.lower() != "bearer":
        return None
    token = rest.strip()
    return token or None


def require_token(expected: str | None, authorization: str | None) -> None:
    """Raise BearerUnauthorized unless the request presents ``expected``; no token
    configured means the resource is open."""
    if expected is None:
        return
    token = presented_token(authorization)
    if token is None:
        # RFC 6750 §3.1: no error code when the request carried no credentials.
        raise BearerUnauthorized(
            "this resource needs 'Authorization: Bearer <token>'",
            challenge=f'Bearer realm="{REALM}"',
        )
    # Constant-time comparison so the token cannot be guessed byte by byte.
    if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), expected.encode("utf-8")):
        raise BearerUnauthorized(
            "the bearer token is not valid for this resource",
            challenge=f'Bearer realm="{REALM}", error="invalid_token"',
        )
