"""Headless Chromium follows a cluster's placement: a WHEP POST to an edge that does not
carry the stream is answered 307 to the origin that does (another origin: another port),
and the medooze whip-whep client, Eyevinn's webrtc-player and whepfan's own WhepPlayer
play from there. fetch() follows the 307 without telling the page, and the third-party
clients resolve the 201's Location against the URL they POSTed to (the edge), so the
origin's Location is an absolute URL under its node URL: their PATCH and DELETE reach it.

Real parts in one network namespace: redis-server, two ``whepfan serve --cluster``
nodes, ``whepfan publish`` on the origin, Chromium."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _harness import (
    EYEVINN_VIEW,
    MEDOOZE_VIEW,
    NAMESPACE_ADDRESS,
    PUBLISH_TOKEN,
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

WHEPFAN_PLAYER = """async ({endpoint}) => {
  const { WhepPlayer } = await import("/static/whep.js");
  const player = new WhepPlayer({ endpoint });
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


def _node(namespace: NetworkNamespace, port: int, udp: int, log: Path) -> WhepfanProcess:
    url = f"http://127.0.0.1:{port}"
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
        ],
        log,
    )
    process.wait_for_output(r"registered in the cluster registry")
    return process


@pytest.fixture(scope="module")
def cluster(
    namespace: NetworkNamespace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster")
    redis = subprocess.Popen(
        namespace.command(
            REDIS_SERVER, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no"
        ),
        stdout=(logs / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    processes: list[WhepfanProcess] = []
    try:
        processes.append(_node(namespace, ORIGIN_PORT, 8193, logs / "origin.log"))
        processes.append(_node(namespace, EDGE_PORT, 8194, logs / "edge.log"))
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
        yield Cluster(origin=origin, edge=f"http://127.0.0.1:{EDGE_PORT}")
    finally:
        for process in reversed(processes):
            process.stop()
        redis.terminate()
        redis.wait(10)
    for process in processes[:2]:
        assert "Traceback" not in process.log(), process.log()[-4000:]


def _edge_page(context: Any, cluster: Cluster) -> Any:
    """A page on the edge, once the origin takes viewers of the stream (it has the
    publisher's tracks, GET /api/streams/{stream}; until then a viewer gets 409, WHEP
    draft-03 §4.2.8) and the edge's view of the cluster (GET /api/cluster, a registry
    refresh of 1 s on each node) has the origin carrying it, so the edge sends the viewer
    there. The origin registers the stream as soon as its publisher's POST is answered."""
    page = context.new_page()
    page.goto(f"{cluster.edge}/")
    wait_until(
        page,
        """async ([origin, stream]) => {
          const status = await fetch(`${origin}/api/streams/${stream}`);
          const summary = status.ok ? await status.json() : null;
          if (!summary || !summary.live || !summary.tracks.length) return false;
          const view = await (await fetch("/api/cluster")).json();
          return (view.nodes || []).some((node) => node.url === origin && stream in node.streams);
        }""",
        [cluster.origin, STREAM],
        timeout=PLACEMENT_TIMEOUT,
    )
    return page


def _redirected_post(page: Any, cluster: Cluster) -> Any:
    """The page's WHEP POST to the edge, and the 307 it got."""
    return page.expect_response(
        lambda r: r.request.method == "POST" and r.url.startswith(cluster.edge) and r.status == 307
    )


def _origin_viewers(page: Any, cluster: Cluster) -> int:
    """The origin's count of viewer sessions on the stream (GET /api/streams/{stream})."""
    viewers: int = page.evaluate(
        "async (url) => (await (await fetch(url)).json()).viewers",
        f"{cluster.origin}/api/streams/{STREAM}",
    )
    return viewers


def test_medooze_client_follows_the_307_to_the_node_carrying_the_stream(
    cluster: Cluster, context: Any
) -> None:
    page = _edge_page(context, cluster)
    patches: list[tuple[str, int]] = []
    page.on(
        "response",
        lambda r: patches.append((r.url, r.status)) if r.request.method == "PATCH" else None,
    )
    with _redirected_post(page, cluster) as redirect:
        page.evaluate(MEDOOZE_VIEW, {"endpoint": f"{cluster.edge}/whep/{STREAM}", "token": ""})
    assert redirect.value.headers["location"].startswith(f"{cluster.origin}/whep/{STREAM}")
    _assert_playing(page, "window.viewer.pc", "VP8")
    # whep.js resolves the Location against the endpoint it was given (the edge's): the
    # session URL it trickles to and DELETEs is the origin's only because it is absolute.
    session_url = page.evaluate("() => window.viewer.client.resourceURL.href")
    assert session_url.startswith(f"{cluster.origin}/whep/{STREAM}/")
    # It trickles its candidates after the 201: every PATCH went to the origin and took.
    assert patches and all(patch == (session_url, 204) for patch in patches), patches


def test_eyevinn_player_follows_the_307_and_deletes_on_the_node_carrying_the_stream(
    cluster: Cluster, context: Any
) -> None:
    page = _edge_page(context, cluster)
    with _redirected_post(page, cluster) as redirect:
        page.evaluate(EYEVINN_VIEW, {"endpoint": f"{cluster.edge}/whep/{STREAM}", "token": ""})
    assert redirect.value.headers["location"].startswith(f"{cluster.origin}/whep/{STREAM}")
    _assert_playing(page, "window.eyevinn.player.peer", "VP8")
    # WHEPAdapter.getResouceUrlFromHeaders (0.13.0) resolves a Location starting with "/"
    # against the origin of the URL it POSTed to, the edge's; an absolute URL it keeps.
    session_url = page.evaluate("() => window.eyevinn.player.adapter.resource")
    assert session_url.startswith(f"{cluster.origin}/whep/{STREAM}/")
    viewers = _origin_viewers(page, cluster)
    # unload() DELETEs the session (its "Authorization" would be the raw authKey; this
    # cluster has no view token) and only then closes the peer connection, so the DELETE
    # finds it live: 200 from the origin, not the edge's 404.
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.evaluate("() => window.eyevinn.player.unload()")
    assert (deleted.value.url, deleted.value.status) == (session_url, 200)
    assert _origin_viewers(page, cluster) == viewers - 1


def test_whepfan_player_follows_the_307_to_the_node_carrying_the_stream(
    cluster: Cluster, context: Any
) -> None:
    page = _edge_page(context, cluster)
    with _redirected_post(page, cluster) as redirect:
        page.evaluate(WHEPFAN_PLAYER, {"endpoint": f"{cluster.edge}/whep/{STREAM}"})
    assert redirect.value.headers["location"].startswith(f"{cluster.origin}/whep/{STREAM}")
    _assert_playing(page, "window.player.pc", "VP8")
    assert page.evaluate("() => window.player.sessionUrl").startswith(
        f"{cluster.origin}/whep/{STREAM}/"
    )
