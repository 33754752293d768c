"""Per-client rate limit on POSTs: a token bucket for each client address.

Every new session, event subscription and layer selection starts with a POST, and each one
costs the server an SDP parse, an answer, ICE/DTLS state or a worker round trip. A client
gets ``burst`` POSTs at once and ``rate`` per second after that; past it the answer is
429 Too Many Requests with Retry-After, the seconds until its next token (RFC 6585 §4,
RFC 9110 §10.2.3), counted in ``whepfan_http_rate_limited_total``.

Clients are keyed by address, IPv6 by its /64: one host usually owns a whole /64
(RFC 4291 §2.5.4), so per-address buckets would let it mint fresh ones. Behind a trusted
reverse proxy the address is the one the proxy forwarded for (clientaddr.py). Loopback
clients are exempt by default: on the host itself are load generators (``whepfan
loadtest``) and a local reverse proxy not listed in ``trusted_proxies`` (every client
would share one bucket; list it, or have it limit per client itself). The table keeps at
most ``max_clients`` buckets, dropping the one used longest ago: such a bucket has
refilled anyway, unless it is under a flood of addresses, where forgetting one only
returns that address its burst.

:class:`TokenBuckets` is sans-IO (``now`` is a parameter) and tested on virtual time.
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from whepfan.errors import TooManyRequests


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    rate: float = 10.0  # POSTs per second per client, sustained
    burst: int = 50  # POSTs a client may send at once
    exempt_loopback: bool = True
    max_clients: int = 100_000

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError("the POST rate must be positive")
        if self.burst < 1:
            raise ValueError("the POST burst is at least 1")
        if self.max_clients < 1:
            raise ValueError("max_clients is at least 1")


@dataclass(eq=False)
class TokenBuckets:
    limit: RateLimit
    # client -> (tokens, when last updated); ordered by last use, oldest first.
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, now: float) -> float | None:
        """Spend one of ``client``'s tokens: None if it had one, else the seconds until
        it will (the request is refused and spends nothing)."""
        limit = self.limit
        tokens, then = self._buckets.pop(client, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + max(0.0, now - then) * limit.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            self._evict()
            return None
        self._buckets[client] = (tokens, now)
        self._evict()
        return (1.0 - tokens) / limit.rate

    def _evict(self) -> None:
        while len(self._buckets) > self.limit.max_clients:
            del self._buckets[next(iter(self._buckets))]


def client_key(remote: str | None, *, exempt_loopback: bool) -> str | None:
    """The bucket a remote address draws from, or None when it is not limited."""
    if remote is None:
        return None  # a Unix socket or a transport without a peer address
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if exempt_loopback and address.is_loopback:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def rate_limit_middleware(
    limit: RateLimit,
    *,
    clock: Callable[[], float],
    counters: Counter[str],
    key_of: Callable[[web.Request, bool], str | None] | None = None,
) -> Middleware:
    """A middleware refusing POSTs over ``limit`` (429 + Retry-After), counting each in
    ``counters["http_rate_limited"]``. ``key_of(request, exempt_loopback)`` names the
    request's client (clientaddr.py behind trusted proxies); by default its TCP peer."""
    buckets = TokenBuckets(limit)

    def peer_key(request: web.Request, exempt_loopback: bool) -> str | None:
        return client_key(request.remote, exempt_loopback=exempt_loopback)

    client_of = key_of or peer_key

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST":
            client = client_of(request, limit.exempt_loopback)
            if client is not None:
                wait = buckets.take(client, clock())
                if wait is not None:
                    counters["http_rate_limited"] += 1
                    raise TooManyRequests(
                        f"too many POSTs from this address: at most {limit.burst} at once "
                        f"and {limit.rate:g} per second",
                        retry_after=max(1, math.ceil(wait)),
                    )
        return await handler(request)

    return middleware
