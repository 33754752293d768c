"""Per-client POST token buckets (whepfan/http/ratelimit.py): sans-IO on virtual time, and
the middleware in a real aiohttp application (429 + Retry-After, counted in /metrics)."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from whepfan.errors import TooManyRequests
from whepfan.http.app import COUNTERS_KEY, error_middleware
from whepfan.http.ratelimit import RateLimit, TokenBuckets, client_key, rate_limit_middleware


def test_burst_then_the_rate_with_exact_waits() -> None:
    buckets = TokenBuckets(RateLimit(rate=2.0, burst=3))
    now = 100.0
    assert [buckets.take("a", now) for _ in range(3)] == [None, None, None]
    assert buckets.take("a", now) == pytest.approx(0.5)  # one token every 1/rate s
    # A refused request spends nothing: the wait only shrinks with time.
    assert buckets.take("a", now + 0.25) == pytest.approx(0.25)
    assert buckets.take("a", now + 0.5) is None
    assert buckets.take("a", now + 0.5) == pytest.approx(0.5)
    # Another client has its own bucket.
    assert buckets.take("b", now) is None
    # Idle time refills up to the burst, never beyond it.
    later = now + 1000.0
    assert [buckets.take("a", later) for _ in range(3)] == [None, None, None]
    assert buckets.take("a", later) is not None


def test_time_going_backwards_refills_nothing() -> None:
    buckets = TokenBuckets(RateLimit(rate=1.0, burst=1))
    assert buckets.take("a", 10.0) is None
    assert buckets.take("a", 5.0) == pytest.approx(1.0)


def test_table_keeps_at_most_max_clients_dropping_the_least_recent() -> None:
    buckets = TokenBuckets(RateLimit(rate=1.0, burst=1, max_clients=3))
    for client in ("a", "b", "c"):
        assert buckets.take(client, 0.0) is None
    assert buckets.take("a", 0.0) is not None  # "a" is now the most recent
    assert buckets.take("d", 0.0) is None  # evicts "b", the least recently seen
    assert len(buckets) == 3
    assert buckets.take("b", 0.0) is None  # forgotten: a fresh bucket (and "c" goes)
    assert buckets.take("a", 0.0) is not None  # still remembered as empty


def test_client_keys() -> None:
    assert client_key("192.0.2.7", exempt_loopback=True) == "192.0.2.7"
    # One host owns its /64 (RFC 4291 §2.5.4): every address in it shares a bucket.
    assert client_key("2001:db8:1:2:aaaa::1", exempt_loopback=True) == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:ffff::9", exempt_loopback=True) == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7", exempt_loopback=True) == "192.0.2.7"
    assert client_key("127.0.0.1", exempt_loopback=True) is None
    assert client_key("::1", exempt_loopback=True) is None
    assert client_key("127.0.0.1", exempt_loopback=False) == "127.0.0.1"
    assert client_key(None, exempt_loopback=False) is None


def test_limits_are_validated() -> None:
    for bad in ({"rate": 0.0}, {"burst": 0}, {"max_clients": 0}):
        with pytest.raises(ValueError):
            RateLimit(**bad)  # type: ignore[arg-type]


async def test_middleware_answers_429_with_retry_after_and_counts() -> None:
    now = [0.0]
    counters: Counter[str] = Counter()
    limiter = rate_limit_middleware(
        RateLimit(rate=0.5, burst=2, exempt_loopback=False),
        clock=lambda: now[0],
        counters=counters,
    )
    app = web.Application(middlewares=[error_middleware, limiter])
    app[COUNTERS_KEY] = counters

    async def created(request: web.Request) -> web.Response:
        return web.Response(status=201)

    app.router.add_post("/whep/x", created)
    app.router.add_get("/whep/x", created)
    async with TestClient(TestServer(app)) as client:
        assert [(await client.post("/whep/x")).status for _ in range(2)] == [201, 201]
        refused = await client.post("/whep/x")
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "2"  # 1 / 0.5 s, rounded up
        body = orjson.loads(await refused.read())
        assert body["status"] == 429 and "POST" in body["detail"]
        assert counters["http_rate_limited"] == 1
        assert (await client.get("/whep/x")).status == 201  # only POSTs are limited
        now[0] = 2.0
        assert (await client.post("/whep/x")).status == 201


def test_too_many_requests_is_a_peer_error_with_retry_after() -> None:
    error = TooManyRequests("slow down", retry_after=3)
    assert (error.status, error.retry_after) == (429, 3)
