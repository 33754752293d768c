"""Placement grants: a viewer's credential, carried across a cluster's cross-origin 307.

A cluster node may answer a WHEP POST with ``307 Temporary Redirect`` to the node that
should serve the viewer (whepfan/cluster/placement.py, RFC 9725 §4.5). Browsers follow it,
but the Fetch standard's HTTP-redirect fetch (§4.4: "if request's current URL's origin is
not same origin with locationURL's origin, then for each headerName of CORS non-wildcard
request-header name, delete headerName from request's header list"; that name is
``Authorization``) drops the token when the target is another origin, which every other
node of a cluster is (another host or port). fetch() hides the redirect from the page, so
no player can resend its token either: on a node whose viewing needs a credential, every
browser player got 401 from the node it was sent to.

So a node that redirects a POST which presented a valid view credential adds a
*placement grant* to the Location's query (``?placement=<grant>``), and the node it
names takes the grant in place of ``Authorization``. A grant is a JWT (RFC 7519)::

    header  {"alg": "HS256", "typ": "whepfan-placement+jwt"}
    claims  {"iss": "https://edge-1.example.net",   the node that issued it
             "aud": "https://origin.example.net",   the one node it is good for
             "stream": "concert", "role": "view",   a WHEP POST for this stream only
             "iat": ..., "exp": ...,                placement_grant_ttl (30 s) at most
             "jti": "...",                          single use
             "bnd": "..."}                          the credential's session binding

- **Signed under a key derived from the cluster token** (HKDF-SHA256, RFC 5869, with a
  label of its own): every node can issue and check grants, a viewer cannot make one,
  and the derived key signs nothing else. No other key whepfan knows verifies a grant,
  and a grant is no bearer token (``Authorization`` never takes one). The header's
  ``typ`` is checked too (explicit typing, RFC 8725 §3.11).
- **Narrow and short-lived**: a WHEP POST to exactly that stream on the node named by
  ``aud`` (its ``--node-url``), before ``exp``: now + ``placement_grant_ttl``, and never
  after the credential it stands for stops being accepted (a JWT's ``exp`` plus the
  leeway). Nodes' clocks must agree to well within the TTL (NTP).
- **Single use**: the node remembers each accepted ``jti`` until the grant expires, in a
  bounded cache (the oldest is forgotten first when it is full: replaying a view grant
  gains nothing its holder did not have anyway). A grant that shows up in an access log
  has already been spent.
- **No token in the URL**: only ``bnd``, the digest sessions are bound to
  (whepfan.http.auth: a static token's role, or a SHA-256 over a JWT's identity). The
  session the grant makes is bound to the original credential, so the PATCH, DELETE,
  SSE and layer requests that follow pass as they would on the node that checked the
  token: players send those straight to the session URL with their ``Authorization``
  (a request, not a redirect: the header is kept; medooze, Eyevinn and whepfan's
  player all do), and another credential still gets 403.

RFC 6750 §5.3 keeps bearer tokens out of URLs because URLs end up in logs and Referer
headers. A grant is worth one view of one stream on one node, for seconds, once; it is
the only thing a browser carries across the redirect (a cookie cannot be: CORS here
answers ``*``, which credentialed requests may not use).

A refused grant is a 401 ``invalid_token`` with a problem body saying why (the reasons
are ``Refusal``); each outcome is counted for ``whepfan_cluster_placement_grants``.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
from collections import Counter
from collections.abc import Mapping
from enum import Enum
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from whepfan.http.tokens import Grant, InvalidToken, Role, StreamScope

# The query parameter a 307's Location carries the grant in.
QUERY_PARAMETER = "placement"
GRANT_TYPE = "whepfan-placement+jwt"
ALGORITHM = "HS256"
# RFC 5869 §3.2: "info" binds the derived key to its one purpose; a new grant format
# gets a new label (and so a new key) rather than a version claim.
KEY_INFO = b"whepfan placement grant v1"
KEY_BYTES = 32  # RFC 7518 §3.2: an HS256 key as long as the hash output
DEFAULT_TTL = 30.0
MAX_TTL = 300.0
# A grant is ~400 characters; anything much longer is not one, and is not decoded.
MAX_GRANT_CHARS = 2048
MAX_JTI_CHARS = 64
MAX_BINDING_BYTES = 128
DEFAULT_REPLAY_CAPACITY = 65_536
_REQUIRED_CLAIMS = ["iss", "aud", "exp", "jti", "stream", "role", "bnd"]


class Refusal(Enum):
    """Why a node refused a grant (the ``reason`` label of the metric)."""

    MALFORMED = "malformed"  # not a grant: not a JWT, wrong type or algorithm, bad claims
    SIGNATURE = "signature"  # tampered with, or signed under another cluster token
    AUDIENCE = "audience"  # issued for another node
    STREAM = "stream"  # issued for another stream
    EXPIRED = "expired"
    REPLAYED = "replayed"  # already used once


_DESCRIPTIONS = {
    Refusal.MALFORMED: "the placement grant is not valid",
    Refusal.SIGNATURE: "the placement grant's signature does not verify",
    Refusal.AUDIENCE: "the placement grant is for another node",
    Refusal.STREAM: "the placement grant is for another stream",
    Refusal.EXPIRED: "the placement grant has expired; POST to the cluster again",
    Refusal.REPLAYED: "the placement grant was already used; POST to the cluster again",
}


class RefusedGrant(InvalidToken):
    """A placement grant that is not valid here: 401 ``invalid_token`` (RFC 6750 §3.1)."""

    def __init__(self, reason: Refusal) -> None:
        super().__init__(_DESCRIPTIONS[reason])
        self.reason = reason


def derive_key(cluster_token: str) -> bytes:
    """The grants' HS256 key: HKDF-SHA256 (RFC 5869) of the cluster token, no salt (the
    token is the cluster's shared secret; §3.1 allows no salt), info ``KEY_INFO``."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=KEY_INFO)
    return hkdf.derive(cluster_token.encode("utf-8"))


class PlacementGrants:
    """Issues grants for the nodes this one redirects viewers to, and accepts those
    addressed to it (see the module docstring). One per node; sans-IO: time is ``now``
    (Unix seconds, as JWT NumericDates are), randomness is ``secrets``."""

    def __init__(
        self,
        *,
        cluster_token: str,
        node_url: str,
        ttl: float = DEFAULT_TTL,
        credential_leeway: float = 0.0,
        replay_capacity: int = DEFAULT_REPLAY_CAPACITY,
    ) -> None:
        if not 0 < ttl <= MAX_TTL:  # also refuses NaN
            raise ValueError(f"a placement grant lives more than 0 and at most {MAX_TTL} s")
        if replay_capacity < 1:
            raise ValueError("the replay cache holds at least one grant")
        self._key = derive_key(cluster_token)
        self.node_url = node_url.rstrip("/")
        self.ttl = ttl
        # How long after its exp this node still takes a JWT (--jwt-leeway): a grant
        # never outlives the credential it stands for.
        self.credential_leeway = credential_leeway
        self.replay_capacity = replay_capacity
        # jti -> exp of the grants accepted and not expired yet, oldest first.
        self._spent: dict[str, float] = {}
        # "issued", "accepted", "refused_<reason>".
        self.counters: Counter[str] = Counter()

    def issue(self, credential: Grant, *, stream: str, audience: str, now: float) -> str:
        """A grant for a WHEP POST of ``stream`` to the node at ``audience``, standing
        for ``credential`` (the one that made the redirected POST)."""
        expires = now + self.ttl
        if credential.expires_at is not None:
            expires = min(expires, credential.expires_at + self.credential_leeway)
        claims = {
            "iss": self.node_url,
            "aud": audience.rstrip("/"),
            "stream": stream,
            "role": Role.VIEW.value,
            "iat": round(now, 3),
            "exp": round(expires, 3),
            "jti": secrets.token_urlsafe(12),
            "bnd": base64.urlsafe_b64encode(credential.binding).rstrip(b"=").decode("ascii"),
        }
        self.counters["issued"] += 1
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"typ": GRANT_TYPE})

    def accept(self, value: str, *, stream: str, now: float) -> Grant:
        """The Grant ``value`` stands for on a WHEP POST of ``stream`` here, or
        RefusedGrant. Counts the outcome; an accepted grant is spent."""
        try:
            claims = self._verified_claims(value)
            expires = _expiry(claims)
            if now >= expires:
                raise RefusedGrant(Refusal.EXPIRED)
            if claims["stream"] != stream:
                raise RefusedGrant(Refusal.STREAM)
            binding = _binding(claims["bnd"])
            jti = claims["jti"]
            self._forget_expired(now)
            if jti in self._spent:
                raise RefusedGrant(Refusal.REPLAYED)
        except RefusedGrant as refused:
            self.counters[f"refused_{refused.reason.value}"] += 1
            raise
        self._spend(jti, expires)
        self.counters["accepted"] += 1
        return Grant(
            role=Role.VIEW, streams=StreamScope(name=stream), binding=binding, expires_at=expires
        )

    def _verified_claims(self, value: str) -> Mapping[str, Any]:
        if len(value) > MAX_GRANT_CHARS or not value.isascii():
            raise RefusedGrant(Refusal.MALFORMED)
        try:
            header = jwt.get_unverified_header(value)
        except jwt.PyJWTError:
            raise RefusedGrant(Refusal.MALFORMED) from None
        if header.get("typ") != GRANT_TYPE or header.get("alg") != ALGORITHM:
            raise RefusedGrant(Refusal.MALFORMED)
        try:
            # The signature is checked before any claim (PyJWT verifies the JWS first),
            # so a tampered grant is "signature" whatever it claims. Times are checked
            # against ``now`` by accept, not against PyJWT's wall clock.
            claims: dict[str, Any] = jwt.decode(
                value,
                self._key,
                algorithms=[ALGORITHM],
                audience=self.node_url,
                options={
                    "require": _REQUIRED_CLAIMS,
                    "strict_aud": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise RefusedGrant(Refusal.SIGNATURE) from None
        except jwt.InvalidAudienceError:
            raise RefusedGrant(Refusal.AUDIENCE) from None
        except jwt.PyJWTError:
            raise RefusedGrant(Refusal.MALFORMED) from None
        jti = claims["jti"]
        if (
            claims["role"] != Role.VIEW.value
            or not isinstance(claims["stream"], str)
            or not isinstance(jti, str)
            or not 0 < len(jti) <= MAX_JTI_CHARS
            or not isinstance(claims["bnd"], str)
        ):
            raise RefusedGrant(Refusal.MALFORMED)
        return claims

    def _forget_expired(self, now: float) -> None:
        # Oldest first; grants capped by a JWT's exp may expire before older ones, and
        # wait behind them: the capacity bounds the cache either way.
        spent = self._spent
        while spent:
            jti, expires = next(iter(spent.items()))
            if expires > now:
                return
            del spent[jti]

    def _spend(self, jti: str, expires: float) -> None:
        spent = self._spent
        while len(spent) >= self.replay_capacity:
            del spent[next(iter(spent))]
        spent[jti] = expires

    @property
    def spent(self) -> int:
        """Grants remembered as used (the replay cache's size)."""
        return len(self._spent)


def _expiry(claims: Mapping[str, Any]) -> float:
    value = claims["exp"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RefusedGrant(Refusal.MALFORMED)
    return float(value)


def _binding(value: str) -> bytes:
    if len(value) > 2 * MAX_BINDING_BYTES:
        raise RefusedGrant(Refusal.MALFORMED)
    try:
        binding = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise RefusedGrant(Refusal.MALFORMED) from None
    if not binding:
        raise RefusedGrant(Refusal.MALFORMED)
    return binding
