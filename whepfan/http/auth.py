"""Bearer-token checks (WHEP draft-03 §4.8.1, RFC 9725 §4.7, RFC 6750), and sessions
bound to the credential that made them.

Real clients differ (reference/clients.md): some send the token without the ``Bearer``
prefix, some send ``Bearer undefined`` when none is set. A raw token is accepted; a token
in the query string never is (RFC 6750 §5.3: URLs end up in logs and Referer headers).

Credentials
-----------
A role (publish or view) takes its static token (``--publish-token``, ``--view-token``:
every stream), and, once a JWT key is configured, a JWT naming that role and the stream
(``whepfan.http.tokens``). A role needs a credential when its static token or any JWT
key is configured; otherwise it is open (viewing, by default) and tokens are ignored.
Answers (RFC 6750 §3.1):

- no credentials: 401, ``WWW-Authenticate: Bearer realm="whepfan"`` (no error code);
- a token that is not valid (unknown, malformed, expired, badly signed): 401
  ``error="invalid_token"`` with an ``error_description``;
- a valid credential that does not cover the request (the other role, another stream,
  another credential's session): 403 ``error="insufficient_scope"``.

Each is a problem+json body with the same description. Tokens are never logged.

Session binding
---------------
A session (WHIP or WHEP resource) made with a credential can be acted on (PATCH trickle
and ICE restart, DELETE, the layer API, event subscriptions) only with a credential that
covers its stream and role *and* is the same credential: the same static token, or a
JWT with the same ``iss``, ``sub`` and ``jti`` (the same token when it has no ``jti``).
Another credential gets 403, not 404: the session URL is a 192-bit capability that only
its owner and the server know, so a 404 would hide nothing, while a 403 tells a player
that refreshed its token without keeping ``jti`` what went wrong, instead of making it
think the session ended and open another. Publisher takeover (``--publisher-takeover``)
is unchanged: a new publisher for the stream ends the old one whatever it was made with.
"""

from __future__ import annotations

import hmac
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from whepfan.errors import Forbidden, Unauthorized
from whepfan.http.tokens import EVERY_STREAM, Grant, InvalidToken, JwtVerifier, Role

log = logging.getLogger("whepfan.http.auth")

# RFC 9110 §11.6.1: a 401 MUST carry WWW-Authenticate with a challenge.
REALM = "whepfan"
NOT_VALID = "the bearer token is not valid for this resource"


class BearerUnauthorized(Unauthorized):
    """A 401 carrying the RFC 6750 §3 challenge for the request it refuses."""

    def __init__(self, detail: str, *, challenge: str) -> None:
        super().__init__(detail)
        self.response_headers = {"WWW-Authenticate": challenge}


class BearerForbidden(Forbidden):
    """A 403 ``insufficient_scope`` (RFC 6750 §3.1) for a valid credential."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.response_headers = {"WWW-Authenticate": challenge("insufficient_scope", detail)}


def challenge(error: str | None = None, description: str | None = None) -> str:
    """A ``Bearer`` challenge (RFC 6750 §3): the realm, then the error code if the request
    carried credentials (§3.1: none when it carried none), then its description."""
    value = f'Bearer realm="{REALM}"'
    if error is not None:
        value += f', error="{error}"'
        if description:
            value += f', error_description="{_description(description)}"'
    return value


def _description(text: str) -> str:
    # RFC 6750 §3: error_description is %x20-21 / %x23-5B / %x5D-7E, no quote or backslash.
    return "".join(
        c if " " <= c <= "~" and c not in '"\\' else ("'" if c == '"' else "?") for c in text
    )


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


def _missing() -> BearerUnauthorized:
    return BearerUnauthorized(
        "this resource needs 'Authorization: Bearer <token>'", challenge=challenge()
    )


def _same(token: str, expected: str) -> bool:
    # Constant-time comparison so the token cannot be guessed byte by byte.
    return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def require_token(expected: str | None, authorization: str | None) -> None:
    """Raise BearerUnauthorized unless the request presents ``expected``; no token
    configured means the resource is open (``/metrics``)."""
    if expected is None:
        return
    token = presented_token(authorization)
    if token is None:
        raise _missing()
    if not _same(token, expected):
        raise BearerUnauthorized(NOT_VALID, challenge=challenge("invalid_token", NOT_VALID))


class AccessControl:
    """Who may publish and view what, and which credential each session belongs to
    (see the module docstring). One per application, shared by every resource."""

    def __init__(
        self,
        *,
        publish_token: str | None = None,
        view_token: str | None = None,
        verifier: JwtVerifier | None = None,
        wall_clock: Callable[[], float] = time.time,
        cluster_token: str | None = None,
    ) -> None:
        self._static = {Role.PUBLISH: publish_token, Role.VIEW: view_token}
        # The token nodes of a cluster pull streams from each other with (whepfan/cluster/):
        # a view credential besides the others; a session it made is bound to it alone.
        self._cluster_token = cluster_token
        self.verifier = verifier
        self.wall_clock = wall_clock  # JWT exp/nbf are Unix times (RFC 7519 §2)
        # Weak keys, as routes.py's restart ufrags: the binding goes with the session.
        self._bindings: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()

    def requires_credentials(self, role: Role) -> bool:
        return self._static[role] is not None or self.verifier is not None

    def authorize(self, authorization: str | None, role: Role, stream: str | None) -> Grant | None:
        """The Grant of the request's credential for ``role`` on ``stream`` (None: any
        stream the credential covers; the caller filters), or None when the role is open.
        Raises BearerUnauthorized (401) or BearerForbidden (403)."""
        if not self.requires_credentials(role):
            return None
        token = presented_token(authorization)
        if token is None:
            raise _missing()
        grant = self._grant(token, role)
        if grant.role is not role:
            raise BearerForbidden(f"a {grant.role.value} token cannot {role.value}")
        if stream is not None and not grant.streams.covers(stream):
            raise BearerForbidden(f"this token covers {grant.streams}, not stream {stream}")
        return grant

    def is_authorized(self, authorization: str | None, role: Role, stream: str) -> bool:
        try:
            self.authorize(authorization, role, stream)
        except (Unauthorized, Forbidden):
            return False
        return True

    def is_cluster_node(self, authorization: str | None) -> bool:
        """The request presents the cluster token (checked whether or not its role needs
        a credential: on an open WHEP endpoint it is what tells a node's pull apart)."""
        token = presented_token(authorization)
        return (
            token is not None
            and self._cluster_token is not None
            and _same(token, self._cluster_token)
        )

    def bind(self, session: object, grant: Grant | None) -> None:
        """Bind a new session to the credential that made it (nothing when open)."""
        if grant is not None:
            self._bindings[session] = grant.binding

    def check_bound(self, session: object, grant: Grant | None, *, stream: str) -> None:
        """BearerForbidden unless ``grant`` is the credential ``session`` is bound to."""
        bound = self._bindings.get(session)
        if bound is None:
            return  # made while its role was open: the session URL is the capability
        if grant is None or not hmac.compare_digest(bound, grant.binding):
            subject = grant.subject if grant is not None else None
            log.info(
                "a session of %r refused a request with another credential (sub %r)",
                stream,
                subject,
            )
            raise BearerForbidden("this session was created with another credential")

    def _grant(self, token: str, role: Role) -> Grant:
        # Every static token is compared (the wanted role's first), so the time taken
        # does not say which one a guess came close to.
        other = Role.VIEW if role is Role.PUBLISH else Role.PUBLISH
        matches = [
            candidate
            for candidate in (role, other)
            if (expected := self._static[candidate]) is not None and _same(token, expected)
        ]
        if matches:
            return Grant.static(matches[0])
        if self._cluster_token is not None and _same(token, self._cluster_token):
            return Grant(role=Role.VIEW, streams=EVERY_STREAM, binding=b"cluster")
        if self.verifier is None:
            raise BearerUnauthorized(NOT_VALID, challenge=challenge("invalid_token", NOT_VALID))
        try:
            return self.verifier.verify(token, self.wall_clock())
        except InvalidToken as exc:
            raise BearerUnauthorized(
                exc.description, challenge=challenge("invalid_token", exc.description)
            ) from None
