"""The cluster token (whepfan/cluster/): another node pulling a stream presents it as a
view credential on a node whose viewing needs a token; it cannot publish. And the
placement grants a cluster's 307 carries for viewers whose Authorization a browser drops
on the redirect (whepfan/http/placement_grants.py), between real nodes."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yarl
from _cluster import PUBLISH_TOKEN, REDIS_SERVER, Node, RedisServer, cluster_node, wait_for
from _peers import only_loopback_candidates

from whepfan.client.peer import LocalParameters, host_candidate, new_ice_credentials, viewer_offer
from whepfan.client.publisher import Publisher, PublisherOptions
from whepfan.http.auth import AccessControl, BearerForbidden, BearerUnauthorized
from whepfan.http.tokens import Role
from whepfan.protocol.dtls import DtlsCertificate


def access() -> AccessControl:
    return AccessControl(publish_token="pub", view_token="view", cluster_token="nodes")


def test_the_cluster_token_views_every_stream() -> None:
    grant = access().authorize("Bearer nodes", Role.VIEW, "any-stream")
    assert grant is not None and grant.role is Role.VIEW
    # A session it made is bound to it, not to the shared view token.
    view = access().authorize("Bearer view", Role.VIEW, "any-stream")
    assert view is not None and grant.binding != view.binding


def test_the_cluster_token_cannot_publish() -> None:
    with pytest.raises(BearerForbidden):
        access().authorize("Bearer nodes", Role.PUBLISH, "s")


def test_without_a_cluster_token_it_is_just_a_wrong_token() -> None:
    plain = AccessControl(publish_token="pub", view_token="view")
    with pytest.raises(BearerUnauthorized):
        plain.authorize("Bearer nodes", Role.VIEW, "s")


# ---------------------------------------------------------------------------- placement grants
# A guarded cluster of real processes (redis-server, an origin with a publisher, an edge;
# every node with the same --view-token and --jwt-secret): what a browser sends through a
# 307, since it drops Authorization on the redirect to the other node (Fetch §4.4).

VIEW_TOKEN = "cluster-view-token"
JWT_SECRET = "cluster-jwt-secret-of-at-least-32-bytes"
requires_redis = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="needs Debian's redis-server"
)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    log_dir = tmp_path_factory.mktemp("guarded-cluster")
    redis = RedisServer(log_dir)
    redis.start()
    credentials = ("--view-token", VIEW_TOKEN, "--jwt-secret", JWT_SECRET)
    nodes = {name: cluster_node(name, log_dir, redis, *credentials) for name in ("origin", "edge")}
    try:
        for node in nodes.values():
            node.start()
        ids = {node.url for node in nodes.values()}
        assert wait_for(lambda: all(n.node_ids() == ids for n in nodes.values()), 15)
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()
        redis.stop()
    for node in nodes.values():
        assert "Traceback" not in node.log.read_text(), node.log.read_text()[-4000:]


def viewer_jwt(subject: str) -> str:
    claims = {
        "role": "view",
        "stream_prefix": "",
        "exp": int(time.time()) + 600,
        "sub": subject,
        "jti": f"{subject}-1",
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def recvonly_offer() -> str:
    """A WHEP offer (its ICE never connects: the tests stop at signalling)."""
    ufrag, pwd = new_ice_credentials()
    return viewer_offer(
        LocalParameters(
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            fingerprints=DtlsCertificate.generate().fingerprints,
            candidate=host_candidate("127.0.0.1", 9),
        )
    )


async def request(method: str, url: str, body: str = "", **headers: str) -> tuple[int, Any]:
    content = {"Content-Type": "application/sdp"} if body else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, url, data=body or None, headers={**content, **headers}, allow_redirects=False
        ) as response,
    ):
        await response.read()
        return response.status, response.headers.copy()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def grant_counts(node: Node) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"{node.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(
        r'^whepfan_cluster_placement_grants_total\{outcome="(\w+)",reason="(\w*)"\} (\S+)$', re.M
    )
    return {(outcome, reason): float(value) for outcome, reason, value in pattern.findall(text)}


@requires_redis
async def test_a_307_carries_a_grant_the_origin_takes_in_place_of_authorization(
    guarded: dict[str, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    only_loopback_candidates(monkeypatch)  # the publisher's
    origin, edge = guarded["origin"], guarded["edge"]
    options = PublisherOptions(
        url=f"{origin.url}/whip/guarded", token=PUBLISH_TOKEN, width=320, height=240
    )
    async with Publisher(options):

        def edge_sends_viewers_to_origin() -> bool:
            listed = edge.cluster()["nodes"]
            assert isinstance(listed, list)
            return any(n["id"] == origin.url and "guarded" in n["streams"] for n in listed)

        assert wait_for(edge_sends_viewers_to_origin, 15)
        endpoint = f"{edge.url}/whep/guarded"
        offer = recvonly_offer()
        # No credential: the edge's 401, never a 307 (so never a grant).
        assert (await request("POST", endpoint, offer))[0] == 401
        alice, bob = viewer_jwt("alice"), viewer_jwt("bob")
        status, headers = await request("POST", endpoint, offer, **bearer(alice))
        assert status == 307
        location = yarl.URL(headers["Location"])
        assert str(location.with_query(None)) == f"{origin.url}/whep/guarded"
        assert location.query["placed"] == "1"
        grant = location.query["placement"]
        claims = jwt.decode(grant, options={"verify_signature": False})
        assert (claims["iss"], claims["aud"], claims["stream"]) == (
            edge.url,
            origin.url,
            "guarded",
        )
        assert alice not in str(location) and VIEW_TOKEN not in str(location)
        # What a browser sends next: the same offer to the Location, without Authorization.
        status, headers = await request("POST", str(location), offer)
        assert status == 201
        session = headers["Location"]
        assert session.startswith(f"{origin.url}/whep/guarded/")
        # Used once: the same URL again is refused.
        assert (await request("POST", str(location), recvonly_offer()))[0] == 401
        # The session is Alice's, though its POST carried no token: the player's later
        # requests go straight to the session URL with its own Authorization.
        assert (await request("DELETE", session, **bearer(bob)))[0] == 403
        assert (await request("DELETE", session, **bearer(VIEW_TOKEN)))[0] == 403
        assert (await request("DELETE", session, **bearer(alice)))[0] == 200
        # A client that keeps its Authorization (aiortc, whepfan loadtest) is judged by it.
        status, headers = await request("POST", endpoint, offer, **bearer(VIEW_TOKEN))
        assert status == 307
        status, headers = await request("POST", headers["Location"], offer, **bearer(VIEW_TOKEN))
        assert status == 201
        assert (await request("DELETE", headers["Location"], **bearer(VIEW_TOKEN)))[0] == 200
    assert grant_counts(edge)[("issued", "")] == 2
    counts = grant_counts(origin)
    assert counts[("accepted", "")] == 1 and counts[("refused", "replayed")] == 1
    assert counts[("refused", "expired")] == 0
