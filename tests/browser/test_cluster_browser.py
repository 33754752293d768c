"""Headless Chromium follows a cluster's placement: a WHEP POST to an edge that does not
carry the stream is answered 307 to the origin that does (another origin: another port),
and the medooze whip-whep client, Eyevinn's webrtc-player and whepfan's own WhepPlayer
play from there. fetch() follows the 307 without telling the page, and the third-party
clients resolve the 201's Location against the URL they POSTed to (the edge), so the
origin's Location is an absolute URL under its node URL: their PATCH and DELETE reach it.

Each test runs on an open cluster and on one whose viewing needs a credential (a static
``--view-token`` and ``--jwt-secret`` JWTs). There Chromium drops ``Authorization`` on
the redirect to the other origin (Fetch §4.4), so the players reach the origin with only
the placement grant the edge's 307 put in the Location (whepfan/http/placement_grants.py),
after a CORS preflight for the redirected POST; their session is bound to their own
credential, which they send straight to the session URL on PATCH and DELETE.

Real parts in one network namespace: redis-server, two ``whepfan serve --cluster``
nodes, ``whepfan publish`` on the origin, Chromium."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from _harness import (
    EYEVINN_VIEW,
    MEDOOZE_VIEW,
    NAMESPACE_ADDRESS,
    PUBLISH_TOKEN,
    VIEW_TOKEN,
    NetworkNamespace,
    WhepfanProcess,
    wait_until,
)
from test_chromium import _assert_playing

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_PORT = 6390
ORIGIN_PORT, EDGE_PORT = 8091, 8092
STREAM = "placed"
# Publisher connected, then a registry refresh on each node (1 s), on a loaded machine.
PLACEMENT_TIMEOUT = 30.0
JWT_SECRET = "browser-cluster-jwt-secret-of-32-bytes-or-more"

WHEPFAN_PLAYER = """async ({endpoint, token}) => {
  const { WhepPlayer } = await import("/static/whep.js");
  const player = new WhepPlayer({ endpoint, token });
  const video = document.createElement("video");
  video.autoplay = true;
  video.muted = true;
  document.body.append(video);
  video.srcObject = await player.start();
  window.player = player;
}"""

pytestmark = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="needs Debian's redis-server"
)


@dataclass(frozen=True)
class Cluster:
    origin: str
    edge: str
    # The players' credential: "" on an open cluster; else the static view token, or a
    # JWT with a jti (its session binding is by iss, sub and jti, tokens.py).
    token: str = ""
    jwt: str = ""

    @property
    def guarded(self) -> bool:
        return bool(self.token)


def _viewer_jwt(subject: str) -> str:
    claims = {
        "role": "view",
        "stream": STREAM,
        "exp": int(time.time()) + 3600,
        "sub": subject,
        "jti": f"{subject}-1",
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def _node(
    namespace: NetworkNamespace, port: int, udp: int, log: Path, *, guarded: bool
) -> WhepfanProcess:
    url = f"http://127.0.0.1:{port}"
    # The same credentials on every node: a token accepted by one is accepted cluster-wide.
    credentials = ["--view-token", VIEW_TOKEN, "--jwt-secret", JWT_SECRET] if guarded else []
    process = WhepfanProcess(
        namespace,
        [
            "serve",
            "--http",
            f"127.0.0.1:{port}",
            "--udp",
            f"0.0.0.0:{udp}",
            "--public-ip",
            NAMESPACE_ADDRESS,
            "--publish-token",
            PUBLISH_TOKEN,
            "--cluster",
            f"redis://127.0.0.1:{REDIS_PORT}/0",
            "--node-url",
            url,
            "--cluster-token",
            "browser-cluster-token",
            "--worker-packet-budget",
            "none",
            *credentials,
        ],
        log,
    )
    process.wait_for_output(r"registered in the cluster registry")
    return process


@pytest.fixture(scope="module", params=["open", "view-token"])
def cluster(
    request: pytest.FixtureRequest,
    namespace: NetworkNamespace,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Redis, an origin with the publisher and an edge: open, or every node with the same
    ``--view-token`` and ``--jwt-secret`` (one after the other: the ports are fixed)."""
    guarded = request.param == "view-token"
    logs = tmp_path_factory.mktemp(f"cluster-{request.param}")
    redis = subprocess.Popen(
        namespace.command(
            REDIS_SERVER, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no"
        ),
        stdout=(logs / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    processes: list[WhepfanProcess] = []
    try:
        processes.append(_node(namespace, ORIGIN_PORT, 8193, logs / "origin.log", guarded=guarded))
        processes.append(_node(namespace, EDGE_PORT, 8194, logs / "edge.log", guarded=guarded))
        origin = f"http://127.0.0.1:{ORIGIN_PORT}"
        publisher = WhepfanProcess(
            namespace,
            [
                "publish",
                f"{origin}/whip/{STREAM}",
                "--token",
                PUBLISH_TOKEN,
                "--size",
                "320x240",
                "--duration",
                "120",
            ],
            logs / "publish.log",
        )
        processes.append(publisher)
        # The origin registers the stream within a refresh (1 s) of its publisher.
        processes[1].wait_for_output(r"WHEP on http://")
        yield Cluster(
            origin=origin,
            edge=f"http://127.0.0.1:{EDGE_PORT}",
            token=VIEW_TOKEN if guarded else "",
            jwt=_viewer_jwt("medooze") if guarded else "",
        )
    finally:
        for process in reversed(processes):
            process.stop()
        redis.terminate()
        redis.wait(10)
    for process in processes[:2]:
        assert "Traceback" not in process.log(), process.log()[-4000:]


def _edge_page(context: Any, cluster: Cluster, page_origin: str | None = None) -> Any:
    """A page on the edge (or on ``page_origin``), once the origin takes viewers of the
    stream (it has the publisher's tracks, GET /api/streams/{stream}; until then a viewer
    gets 409, WHEP draft-03 §4.2.8) and the edge's view of the cluster (GET /api/cluster,
    a registry refresh of 1 s on each node) has the origin carrying it, so the edge sends
    the viewer there. The origin registers the stream as soon as its publisher's POST is
    answered."""
    page = context.new_page()
    page.goto(f"{page_origin or cluster.edge}/")
    wait_until(
        page,
        """async ([origin, edge, stream, token]) => {
          const headers = token ? { Authorization: `Bearer ${token}` } : {};
          const status = await fetch(`${origin}/api/streams/${stream}`, { headers });
          const summary = status.ok ? await status.json() : null;
          if (!summary || !summary.live || !summary.tracks.length) return false;
          const view = await (await fetch(`${edge}/api/cluster`)).json();
          return (view.nodes || []).some((node) => node.url === origin && stream in node.streams);
        }""",
        [cluster.origin, cluster.edge, STREAM, cluster.token],
        timeout=PLACEMENT_TIMEOUT,
    )
    return page


# What the page's fetch() saw of each WHEP POST (Fetch §5.6: ``response.url`` is the
# last URL of the redirect chain, ``response.redirected`` whether it had more than one).
# Recorded in the page rather than from Playwright's network events: when Chromium
# follows a redirect that needs a new CORS preflight it sometimes restarts the request
# internally, and DevTools then reports one POST to the edge answered 201, with no 307.
RECORD_POSTS = """() => {
  window.posts = [];
  const original = window.fetch.bind(window);
  window.fetch = async (input, init = {}) => {
    const response = await original(input, init);
    const method = (init.method || (input instanceof Request ? input.method : "GET"));
    if (method.toUpperCase() === "POST") {
      window.posts.push({
        url: String(input instanceof Request ? input.url : input),
        final: response.url,
        redirected: response.redirected,
        status: response.status,
      });
    }
    return response;
  };
}"""


def _edge_redirects(page: Any, cluster: Cluster) -> int:
    """The 307s the edge sent to the origin (GET /api/cluster, ``redirects``)."""
    count: int = page.evaluate(
        "async ([edge, origin]) => (await (await fetch(`${edge}/api/cluster`)).json())"
        ".redirects[origin] || 0",
        [cluster.edge, cluster.origin],
    )
    return count


def _check_redirect(page: Any, cluster: Cluster, redirects_before: int) -> None:
    """The page's one WHEP offer went to the edge, which answered 307 (its count rose by
    one); fetch followed it to the origin's endpoint, with a placement grant in the URL
    when viewing needs a credential (and none on an open cluster), and got a 2xx there."""
    posts: list[dict[str, Any]] = page.evaluate("() => window.posts")
    # Offers only (medooze also POSTs its event subscription, to the session's URL).
    offers = [post for post in posts if post["url"] == f"{cluster.edge}/whep/{STREAM}"]
    assert len(offers) == 1, posts
    post = offers[0]
    assert post["redirected"], post
    assert 200 <= post["status"] < 300, post
    final = post["final"]
    assert final.startswith(f"{cluster.origin}/whep/{STREAM}?placed=1"), final
    assert ("placement=" in final) is cluster.guarded, final
    # The grant is not the player's token, nor does it carry it.
    assert (not cluster.token or cluster.token not in final) and (
        not cluster.jwt or cluster.jwt not in final
    )
    assert _edge_redirects(page, cluster) == redirects_before + 1


def _origin_viewers(page: Any, cluster: Cluster) -> int:
    """The origin's count of viewer sessions on the stream (GET /api/streams/{stream})."""
    viewers: int = page.evaluate(
        """async ([url, token]) => (await (await fetch(url,
             { headers: token ? { Authorization: `Bearer ${token}` } : {} })).json()).viewers""",
        [f"{cluster.origin}/api/streams/{STREAM}", cluster.token],
    )
    return viewers


def _grants_accepted(page: Any, cluster: Cluster) -> float:
    """whepfan_cluster_placement_grants_total{outcome="accepted"} on the origin."""
    text: str = page.evaluate(
        "async (url) => (await fetch(url)).text()", f"{cluster.origin}/metrics"
    )
    prefix = 'whepfan_cluster_placement_grants_total{outcome="accepted",reason=""} '
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    assert len(values) == 1, text[-2000:]
    return values[0]


def test_medooze_client_follows_the_307_to_the_node_carrying_the_stream(
    cluster: Cluster, context: Any
) -> None:
    page = _edge_page(context, cluster)
    patches: list[tuple[str, int]] = []
    page.on(
        "response",
        lambda r: patches.append((r.url, r.status)) if r.request.method == "PATCH" else None,
    )
    # A JWT where viewing is guarded: the session is bound to its (iss, sub, jti).
    redirects = _edge_redirects(page, cluster)
    page.evaluate(RECORD_POSTS)
    page.evaluate(MEDOOZE_VIEW, {"endpoint": f"{cluster.edge}/whep/{STREAM}", "token": cluster.jwt})
    _check_redirect(page, cluster, redirects)
    _assert_playing(page, "window.viewer.pc", "VP8")
    # whep.js resolves the Location against the endpoint it was given (the edge's): the
    # session URL it trickles to and DELETEs is the origin's only because it is absolute.
    session_url = page.evaluate("() => window.viewer.client.resourceURL.href")
    assert session_url.startswith(f"{cluster.origin}/whep/{STREAM}/")
    # It trickles its candidates after the 201, with its token: every PATCH went to the
    # origin and took (the session is its credential's, though the POST carried a grant).
    assert patches and all(patch == (session_url, 204) for patch in patches), patches


def test_eyevinn_player_follows_the_307_and_deletes_on_the_node_carrying_the_stream(
    cluster: Cluster, context: Any
) -> None:
    page = _edge_page(context, cluster)
    accepted = _grants_accepted(page, cluster) if cluster.guarded else 0.0
    redirects = _edge_redirects(page, cluster)
    page.evaluate(RECORD_POSTS)
    page.evaluate(
        EYEVINN_VIEW, {"endpoint": f"{cluster.edge}/whep/{STREAM}", "token": cluster.token}
    )
    _assert_playing(page, "window.eyevinn.player.peer", "VP8")
    # Eyevinn POSTs once ICE gathering completes, after load() resolved.
    _check_redirect(page, cluster, redirects)
    if cluster.guarded:
        # The origin took the grant: the POST reached it without Authorization (one
        # that presents a token is judged by the token, and the grant goes unused).
        assert _grants_accepted(page, cluster) == accepted + 1
    # WHEPAdapter.getResouceUrlFromHeaders (0.13.0) resolves a Location starting with "/"
    # against the origin of the URL it POSTed to, the edge's; an absolute URL it keeps.
    session_url = page.evaluate("() => window.eyevinn.player.adapter.resource")
    assert session_url.startswith(f"{cluster.origin}/whep/{STREAM}/")
    viewers = _origin_viewers(page, cluster)
    # unload() DELETEs the session with its "Authorization" (the raw authKey, "Bearer
    # <token>" here) straight to the session URL, after a preflight, and only then closes
    # the peer connection, so the DELETE finds it live: 200 from the origin, not the
    # edge's 404, nor a 403 for a session bound to another credential.
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.evaluate("() => window.eyevinn.player.unload()")
    assert (deleted.value.url, deleted.value.status) == (session_url, 200)
    assert _origin_viewers(page, cluster) == viewers - 1


def test_whepfan_player_follows_the_307_to_the_node_carrying_the_stream(
    cluster: Cluster, context: Any
) -> None:
    page = _edge_page(context, cluster)
    redirects = _edge_redirects(page, cluster)
    page.evaluate(RECORD_POSTS)
    page.evaluate(
        WHEPFAN_PLAYER, {"endpoint": f"{cluster.edge}/whep/{STREAM}", "token": cluster.token}
    )
    _check_redirect(page, cluster, redirects)
    _assert_playing(page, "window.player.pc", "VP8")
    assert page.evaluate("() => window.player.sessionUrl").startswith(
        f"{cluster.origin}/whep/{STREAM}/"
    )


def test_a_player_on_a_third_origin_follows_the_307(cluster: Cluster, context: Any) -> None:
    """The usual deployment: the page is on neither node (here ``localhost`` is another
    origin than ``127.0.0.1``). The POST to the edge is cross-origin from the start (its
    ``Content-Type`` and ``Authorization`` need a preflight there); after the 307
    Chromium drops ``Authorization`` and sends the redirected POST, after a preflight to
    the origin, with ``Origin: null`` (Fetch §4.4: a cross-origin redirect of a
    cross-origin request taints its origin). ``*`` answers both, since no cookie is ever
    involved."""
    page = _edge_page(context, cluster, page_origin=f"http://localhost:{EDGE_PORT}")
    accepted = _grants_accepted(page, cluster) if cluster.guarded else 0.0
    redirects = _edge_redirects(page, cluster)
    page.evaluate(RECORD_POSTS)
    page.evaluate(
        WHEPFAN_PLAYER, {"endpoint": f"{cluster.edge}/whep/{STREAM}", "token": cluster.token}
    )
    _check_redirect(page, cluster, redirects)
    if cluster.guarded:
        assert _grants_accepted(page, cluster) == accepted + 1
    _assert_playing(page, "window.player.pc", "VP8")
    session_url = page.evaluate("() => window.player.sessionUrl")
    assert session_url.startswith(f"{cluster.origin}/whep/{STREAM}/")
    assert page.evaluate("async () => await window.player.stop()") == 200
