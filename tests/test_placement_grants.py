"""Placement grants (whepfan/http/placement_grants.py): what a cluster node's 307 carries
for browsers, which drop Authorization on a cross-origin redirect (Fetch §4.4).

Issue and acceptance on virtual time (expiry, audience, stream, tampering, another
cluster's key, malformed values, replay, the cap at the credential's own expiry), then
the HTTP surface over the real router: a WHEP POST with a grant and no Authorization is
201, its session is bound to the credential the grant stands for (that credential's
PATCH and DELETE pass, another's get 403), and every refused grant is a 401 with a
problem body, never a 5xx.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest
from _paths import SDP_FIXTURES
from _server import media_worker, settings_for
from _signalling import SDP
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from whepfan.cli import build_parser
from whepfan.http import HttpOptions, create_app
from whepfan.http.auth import AccessControl, BearerUnauthorized
from whepfan.http.placement_grants import (
    DEFAULT_REPLAY_CAPACITY,
    GRANT_TYPE,
    PlacementGrants,
    Refusal,
    RefusedGrant,
    derive_key,
)
from whepfan.http.tokens import Grant, JwtPolicy, JwtVerifier, Role, secret_key
from whepfan.media.transport import MediaWorker
from whepfan.settings import SettingsError

WHEP_OFFER = (SDP_FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()
WHIP_OFFER = (SDP_FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
FRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}
NOW = 1_800_000_000.0
CLUSTER_TOKEN = "the-cluster-token-nodes-share-0123456789"
EDGE, ORIGIN = "https://edge-1.example.net", "https://origin.example.net"
SECRET = "an-hs256-secret-of-at-least-32-bytes!"
STATIC_VIEW = Grant.static(Role.VIEW)


def grants(node_url: str, **options: Any) -> PlacementGrants:
    return PlacementGrants(cluster_token=CLUSTER_TOKEN, node_url=node_url, **options)


def issued(credential: Grant = STATIC_VIEW, *, stream: str = "live", now: float = NOW) -> str:
    """A grant the edge issues for a viewer it sends to the origin."""
    return grants(EDGE).issue(credential, stream=stream, audience=ORIGIN, now=now)


def refusal(
    node: PlacementGrants, value: str, *, stream: str = "live", now: float = NOW
) -> Refusal:
    with pytest.raises(RefusedGrant) as refused:
        node.accept(value, stream=stream, now=now)
    return refused.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, object], claims: dict[str, object], key: bytes) -> str:
    """A JWS (RFC 7515 §7.1) signed with HMAC-SHA256 under ``key``, made by hand."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.digest(key, signing_input.encode(), hashlib.sha256)
    return f"{signing_input}.{b64(signature)}"


# RFC 7519 §6: an unsecured JWT ("alg": "none"), which no key accepts (RFC 8725 §3.1).
UNSIGNED = f"{b64(json.dumps({'alg': 'none', 'typ': GRANT_TYPE}).encode())}.{b64(b'{}')}."


def claims_of(value: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(value, options={"verify_signature": False})
    return decoded


# ---------------------------------------------------------------------------- issue, accept


def test_a_grant_stands_for_the_credential_on_one_stream_of_one_node() -> None:
    value = issued()
    assert jwt.get_unverified_header(value) == {"alg": "HS256", "typ": GRANT_TYPE}
    claims = claims_of(value)
    assert claims["iss"] == EDGE and claims["aud"] == ORIGIN
    assert claims["stream"] == "live" and claims["role"] == "view"
    assert claims["exp"] == NOW + 30
    # The token itself is never in it: only the digest sessions are bound to.
    assert CLUSTER_TOKEN not in value and "static" not in json.dumps(claims)
    accepted = grants(ORIGIN).accept(value, stream="live", now=NOW + 1)
    assert accepted.role is Role.VIEW and accepted.binding == STATIC_VIEW.binding
    assert accepted.streams.covers("live") and not accepted.streams.covers("live2")


def test_a_jwt_keeps_its_binding_across_the_redirect() -> None:
    verifier = JwtVerifier(keys=[secret_key(SECRET)])
    token = jwt.encode(
        {"role": "view", "stream_prefix": "", "exp": NOW + 600, "sub": "alice", "jti": "a1"},
        SECRET,
        algorithm="HS256",
    )
    credential = verifier.verify(token, NOW)
    accepted = grants(ORIGIN).accept(issued(credential), stream="live", now=NOW)
    assert accepted.binding == credential.binding


def test_a_grant_is_refused_from_its_expiry_on() -> None:
    origin = grants(ORIGIN)
    assert refusal(origin, issued(), now=NOW + 30) is Refusal.EXPIRED
    assert refusal(origin, issued(), now=NOW + 3600) is Refusal.EXPIRED
    origin.accept(issued(), stream="live", now=NOW + 29.9)


def test_the_ttl_is_configurable_and_bounded() -> None:
    value = grants(EDGE, ttl=5).issue(STATIC_VIEW, stream="live", audience=ORIGIN, now=NOW)
    assert claims_of(value)["exp"] == NOW + 5
    for ttl in (0, -1, 301, float("nan")):
        with pytest.raises(ValueError):
            grants(EDGE, ttl=ttl)


def test_a_grant_never_outlives_the_credential_it_stands_for() -> None:
    expiring = Grant(
        role=Role.VIEW, streams=STATIC_VIEW.streams, binding=b"x" * 32, expires_at=NOW + 4
    )
    edge = grants(EDGE, credential_leeway=10)
    value = edge.issue(expiring, stream="live", audience=ORIGIN, now=NOW)
    assert claims_of(value)["exp"] == NOW + 14  # exp + the leeway the node accepts it in
    assert refusal(grants(ORIGIN), value, now=NOW + 14) is Refusal.EXPIRED


def test_a_grant_for_another_node_or_stream_is_refused() -> None:
    assert refusal(grants(EDGE), issued()) is Refusal.AUDIENCE
    assert refusal(grants("https://origin.example.net:8443"), issued()) is Refusal.AUDIENCE
    assert refusal(grants(ORIGIN), issued(), stream="other") is Refusal.STREAM
    # The node's URL is compared without a trailing slash on either side.
    grants(ORIGIN + "/").accept(issued(), stream="live", now=NOW)


def test_a_tampered_grant_or_one_of_another_cluster_is_refused() -> None:
    value = issued()
    header, payload, signature = value.split(".")
    claims = claims_of(value) | {"stream": "premium"}
    forged = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    assert refusal(grants(ORIGIN), forged, stream="premium") is Refusal.SIGNATURE
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert refusal(grants(ORIGIN), f"{header}.{payload}.{flipped}") is Refusal.SIGNATURE
    other = PlacementGrants(cluster_token="another-cluster-token-0123456789", node_url=ORIGIN)
    assert refusal(other, value) is Refusal.SIGNATURE
    # The key is derived from the cluster token, not the token itself: a grant signed
    # with the raw cluster token (someone who guessed the format) does not verify.
    raw = handmade({"alg": "HS256", "typ": GRANT_TYPE}, claims_of(value), CLUSTER_TOKEN.encode())
    assert refusal(grants(ORIGIN), raw) is Refusal.SIGNATURE
    derived = handmade({"alg": "HS256", "typ": GRANT_TYPE}, claims, derive_key(CLUSTER_TOKEN))
    grants(ORIGIN).accept(derived, stream="premium", now=NOW)  # the test's forgery is sound


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not-a-jwt",
        "a.b.c",
        "é" * 10,
        "x" * 5000,
        # The right key, but not a grant: another type, no type, "none", a missing claim.
        handmade({"alg": "HS256", "typ": "JWT"}, {"stream": "live"}, derive_key(CLUSTER_TOKEN)),
        handmade({"alg": "HS256"}, {"stream": "live"}, derive_key(CLUSTER_TOKEN)),
        UNSIGNED,
    ],
)
def test_what_is_not_a_grant_is_malformed(value: str) -> None:
    assert refusal(grants(ORIGIN), value) is Refusal.MALFORMED


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"role": "publish"}, Refusal.MALFORMED),
        ({"stream": 7}, Refusal.MALFORMED),
        ({"jti": None}, Refusal.MALFORMED),
        ({"jti": "j" * 65}, Refusal.MALFORMED),
        ({"bnd": ""}, Refusal.MALFORMED),
        ({"bnd": 12}, Refusal.MALFORMED),
        ({"exp": "soon"}, Refusal.MALFORMED),
        ({"exp": True}, Refusal.MALFORMED),
        ({"aud": None}, Refusal.MALFORMED),
        # One audience, exactly this node (strict_aud): not a list that names it.
        ({"aud": [ORIGIN, EDGE]}, Refusal.AUDIENCE),
        ({"aud": 5}, Refusal.AUDIENCE),
    ],
)
def test_a_signed_grant_with_bad_claims_is_refused(
    change: dict[str, object], reason: Refusal
) -> None:
    changed = claims_of(issued()) | change
    claims = {name: value for name, value in changed.items() if value is not None}
    value = handmade({"alg": "HS256", "typ": GRANT_TYPE}, claims, derive_key(CLUSTER_TOKEN))
    assert refusal(grants(ORIGIN), value) is reason


def test_a_grant_is_accepted_once() -> None:
    origin, value = grants(ORIGIN), issued()
    origin.accept(value, stream="live", now=NOW)
    assert refusal(origin, value, now=NOW + 1) is Refusal.REPLAYED
    # A refusal for another reason spends nothing: the right POST still goes through.
    second = issued()
    assert refusal(origin, second, stream="other") is Refusal.STREAM
    origin.accept(second, stream="live", now=NOW)
    assert origin.counters == {"accepted": 2, "refused_replayed": 1, "refused_stream": 1}


def test_the_replay_cache_forgets_expired_grants_and_is_bounded() -> None:
    assert DEFAULT_REPLAY_CAPACITY >= 10_000  # 30 s of a busy node's placements
    origin = grants(ORIGIN, replay_capacity=3)
    for second in range(3):
        origin.accept(issued(now=NOW + second), stream="live", now=NOW + second)
    assert origin.spent == 3
    # Full: the oldest is forgotten for the newest.
    oldest_kept = issued(now=NOW + 3)
    origin.accept(oldest_kept, stream="live", now=NOW + 3)
    assert origin.spent == 3
    # Once the first ones expire (exp = issue + 30 s) they are forgotten.
    origin.accept(issued(now=NOW + 32), stream="live", now=NOW + 32.5)
    assert origin.spent == 2
    assert refusal(origin, oldest_kept, now=NOW + 32.5) is Refusal.REPLAYED


# ---------------------------------------------------------------------------- AccessControl


def access(**overrides: Any) -> AccessControl:
    values: dict[str, Any] = {
        "view_token": "view-static",
        "verifier": JwtVerifier(keys=[secret_key(SECRET)], policy=JwtPolicy()),
        "cluster_token": CLUSTER_TOKEN,
        "placement_grants": grants(ORIGIN),
        "wall_clock": lambda: NOW,
    }
    values.update(overrides)
    return AccessControl(**values)


def test_a_post_without_authorization_is_authorized_by_its_grant() -> None:
    grant = access().authorize_viewer_offer(None, [issued()], "live")
    assert grant is not None and grant.binding == STATIC_VIEW.binding


def test_a_token_in_authorization_is_judged_by_itself_not_by_a_grant() -> None:
    checked = access()
    grant = checked.authorize_viewer_offer("Bearer view-static", [issued()], "live")
    assert grant == STATIC_VIEW
    assert checked.placement_grants is not None and not checked.placement_grants.counters
    with pytest.raises(BearerUnauthorized):
        checked.authorize_viewer_offer("Bearer wrong", [issued()], "live")


def test_a_grant_counts_only_where_viewing_needs_a_credential_and_grants_are_known() -> None:
    assert (
        access(view_token=None, verifier=None).authorize_viewer_offer(None, [issued()], "s") is None
    )
    with pytest.raises(BearerUnauthorized) as missing:
        access(placement_grants=None).authorize_viewer_offer(None, [issued()], "live")
    assert "error=" not in missing.value.response_headers["WWW-Authenticate"]


def test_two_grants_in_one_query_are_none() -> None:
    checked = access()
    with pytest.raises(BearerUnauthorized):
        checked.authorize_viewer_offer(None, [issued(), issued()], "live")
    assert checked.placement_grants is not None
    assert checked.placement_grants.counters == {"refused_malformed": 1}


@given(st.text(max_size=600) | st.from_regex(r"[A-Za-z0-9_.-]{0,400}", fullmatch=True))
def test_any_query_value_is_a_401_invalid_token(value: str) -> None:
    with pytest.raises(BearerUnauthorized) as refused:
        access().authorize_viewer_offer(None, [value], "live")
    assert 'error="invalid_token"' in refused.value.response_headers["WWW-Authenticate"]


# ---------------------------------------------------------------------------- over HTTP


@pytest.fixture
async def worker() -> AsyncIterator[MediaWorker]:
    async with media_worker() as media:
        yield media


Serve = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def serve(worker: MediaWorker) -> AsyncIterator[Serve]:
    """The real application over the real router, as the origin: static tokens, JWTs and
    the cluster's grants, its wall clock frozen at NOW; a publisher on ``live``."""
    clients: list[TestClient] = []

    async def start(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            "publish_token": "pub-static",
            "view_token": "view-static",
            "jwt": JwtVerifier(keys=[secret_key(SECRET)]),
            "cluster_token": CLUSTER_TOKEN,
            "public_url": ORIGIN,
            "placement_grants": grants(ORIGIN),
        }
        values.update(overrides)
        app = create_app(
            router=worker.router,
            clock=worker.now,
            options=HttpOptions(**values),
            wall_clock=lambda: NOW,
        )
        test_client = TestClient(TestServer(app))
        await test_client.start_server()
        clients.append(test_client)
        response = await test_client.post(
            "/whip/live", data=WHIP_OFFER, headers={"Authorization": "Bearer pub-static", **SDP}
        )
        assert response.status == 201, await response.text()
        return test_client

    yield start
    for test_client in clients:
        await test_client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def viewer_jwt(sub: str, jti: str) -> str:
    return jwt.encode(
        {"role": "view", "stream": "live", "exp": NOW + 600, "sub": sub, "jti": jti},
        SECRET,
        algorithm="HS256",
    )


ALICE, BOB = viewer_jwt("alice", "a1"), viewer_jwt("bob", "b1")
TRICKLE = (
    "a=group:BUNDLE 0 1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
    "a=ice-ufrag:hF/U\r\na=ice-pwd:unused-for-trickle-000000\r\n"
    "a=candidate:1 1 udp 2122260223 192.0.2.1 61764 typ host\r\na=end-of-candidates\r\n"
)


async def post_placed(client: TestClient, query: str, **headers: str) -> ClientResponse:
    """The POST a browser sends after the edge's 307: the Location's query, and no
    Authorization unless given."""
    return await client.post(
        f"/whep/live?placed=1&{query}", data=WHEP_OFFER, headers={**SDP, **headers}
    )


async def assert_refused(response: ClientResponse, detail: str) -> None:
    assert response.status == 401, await response.text()
    assert response.headers["Content-Type"] == "application/problem+json"
    body = await response.json()
    assert body["status"] == 401 and detail in body["detail"]
    assert response.headers["WWW-Authenticate"].startswith(
        'Bearer realm="whepfan", error="invalid_token"'
    )
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_a_placed_post_is_201_and_its_session_belongs_to_the_original_jwt(
    serve: Serve,
) -> None:
    client = await serve()
    alice = JwtVerifier(keys=[secret_key(SECRET)]).verify(ALICE, NOW)
    response = await post_placed(client, f"placement={issued(alice)}")
    assert response.status == 201, await response.text()
    session = response.headers["Location"]
    assert session.startswith(f"{ORIGIN}/whep/live/")
    path = session.removeprefix(ORIGIN)
    # The player sends its token to the session URL itself (not a redirect: kept).
    response = await client.patch(path, data=TRICKLE, headers={**bearer(BOB), **FRAG})
    assert response.status == 403, await response.text()
    assert (await client.patch(path, data=TRICKLE, headers={**FRAG})).status == 401
    response = await client.patch(path, data=TRICKLE, headers={**bearer(ALICE), **FRAG})
    assert response.status == 204, await response.text()
    assert (await client.delete(path, headers=bearer("view-static"))).status == 403
    assert (await client.delete(path, headers=bearer(ALICE))).status == 200


async def test_a_placed_post_with_the_static_token_binds_to_the_static_token(serve: Serve) -> None:
    client = await serve()
    response = await post_placed(client, f"placement={issued()}")
    assert response.status == 201, await response.text()
    path = response.headers["Location"].removeprefix(ORIGIN)
    assert (await client.delete(path, headers=bearer(ALICE))).status == 403
    assert (await client.delete(path, headers=bearer("view-static"))).status == 200


async def test_a_placed_post_that_keeps_its_authorization_is_judged_by_it(serve: Serve) -> None:
    # aiortc, whepfan loadtest and curl --location-trusted resend the header.
    client = await serve()
    response = await post_placed(client, f"placement={issued()}", **bearer(BOB))
    assert response.status == 201, await response.text()
    path = response.headers["Location"].removeprefix(ORIGIN)
    assert (await client.delete(path, headers=bearer(BOB))).status == 200


async def test_refused_grants_are_401_problems(serve: Serve) -> None:
    client = await serve()
    spent = issued()
    assert (await post_placed(client, f"placement={spent}")).status == 201
    for query, detail in (
        (f"placement={spent}", "already used"),
        (f"placement={issued(now=NOW - 31)}", "expired"),
        (f"placement={issued(stream='other')}", "another stream"),
        (
            f"placement={grants(EDGE).issue(STATIC_VIEW, stream='live', audience=EDGE, now=NOW)}",
            "another node",
        ),
        (f"placement={issued()}x", "signature"),
        ("placement=%00%ff", "not valid"),
        (f"placement={issued()}&placement={issued()}", "not valid"),
    ):
        await assert_refused(await post_placed(client, query), detail)
    # No grant and no token: the plain challenge, as without a cluster.
    response = await post_placed(client, "")
    assert response.status == 401 and "error=" not in response.headers["WWW-Authenticate"]


async def test_a_grant_is_no_credential_anywhere_else(serve: Serve) -> None:
    client = await serve()
    value = issued()
    # Not as a bearer token, not on a PATCH, not on the status API, not to publish.
    assert (
        await client.post("/whep/live", data=WHEP_OFFER, headers={**SDP, **bearer(value)})
    ).status == 401
    assert (await client.get(f"/api/streams/live?placement={value}")).status == 401
    response = await client.post(f"/whip/live?placement={value}", data=WHIP_OFFER, headers=SDP)
    assert response.status == 401
    response = await post_placed(client, f"placement={value}")
    path = response.headers["Location"].removeprefix(ORIGIN)
    response = await client.patch(f"{path}?placement={issued()}", data=TRICKLE, headers=FRAG)
    assert response.status == 401


async def test_the_redirected_post_passes_cors_from_any_origin(serve: Serve) -> None:
    """What Chromium asks the target before the redirected POST (Fetch §4.8: its
    Content-Type is not CORS-safelisted; ``Origin: null`` once a cross-origin request was
    redirected to yet another origin), and what the page may read of the answer."""
    client = await serve()
    url = f"/whep/live?placed=1&placement={issued()}"
    preflight = await client.options(
        url,
        headers={
            "Origin": "null",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "content-type" in allowed and "authorization" in allowed
    response = await client.post(url, data=WHEP_OFFER, headers={**SDP, "Origin": "null"})
    assert response.status == 201, await response.text()
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    exposed = {
        name.strip().lower()
        for name in response.headers["Access-Control-Expose-Headers"].split(",")
    }
    assert {"location", "link", "etag"} <= exposed


async def test_an_open_node_ignores_a_grant(serve: Serve) -> None:
    client = await serve(view_token=None, jwt=None)
    response = await post_placed(client, "placement=anything")
    assert response.status == 201, await response.text()
    path = response.headers["Location"].removeprefix(ORIGIN)
    assert (await client.delete(path)).status == 200


# ---------------------------------------------------------------------------- settings


def test_a_cluster_node_has_grants_for_its_url_and_a_single_box_none() -> None:
    cluster = {
        "cluster": "redis://127.0.0.1:6379/0",
        "cluster_token": CLUSTER_TOKEN,
        "node_url": ORIGIN + "/",
    }
    made = settings_for(**cluster, placement_grant_ttl="12").http_options().placement_grants
    assert made is not None and made.node_url == ORIGIN and made.ttl == 12
    assert settings_for(**cluster).placement_grant_ttl == 30
    assert settings_for().http_options().placement_grants is None
    for ttl in ("0", "-5", "301", "nan"):
        with pytest.raises(SettingsError, match="--placement-grant-ttl"):
            settings_for(**cluster, placement_grant_ttl=ttl)
    parsed = build_parser().parse_args(["serve", "--placement-grant-ttl", "12"])
    assert parsed.placement_grant_ttl == "12"
