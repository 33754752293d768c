"""Headless Chromium follows a cluster's placement: a WHEP POST to an edge that does not
carry the stream is answered 307 to the origin that does (another origin: another port),
and the medooze whip-whep client and whepfan's own WhepPlayer play from there.

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
    MEDOOZE_VIEW,
    NAMESPACE_ADDRESS,
    PUBLISH_TOKEN,
    NetworkNamespace,
    WhepfanProcess,
)
from test_chromium import _assert_playing

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_PORT = 6390
ORIGIN_PORT, EDGE_PORT = 8091, 8092
STREAM = "placed"

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


def _redirected_post(page: Any, cluster: Cluster) -> Any:
    """The page's WHEP POST to the edge, and the 307 it got."""
    return page.expect_response(
        lambda r: r.request.method == "POST" and r.url.startswith(cluster.edge) and r.status == 307
    )


def test_medooze_client_follows_the_307_to_the_node_carrying_the_stream(
    cluster: Cluster, context: Any
) -> None:
    page = context.new_page()
    page.goto(f"{cluster.edge}/")
    page.wait_for_timeout(1500)  # the edge's view has the origin's stream (1 s refresh)
    with _redirected_post(page, cluster) as redirect:
        page.evaluate(MEDOOZE_VIEW, {"endpoint": f"{cluster.edge}/whep/{STREAM}", "token": ""})
    assert redirect.value.headers["location"].startswith(f"{cluster.origin}/whep/{STREAM}")
    _assert_playing(page, "window.viewer.pc", "VP8")


def test_whepfan_player_follows_the_307_to_the_node_carrying_the_stream(
    cluster: Cluster, context: Any
) -> None:
    page = context.new_page()
    page.goto(f"{cluster.edge}/")
    page.wait_for_timeout(1500)
    with _redirected_post(page, cluster) as redirect:
        page.evaluate(WHEPFAN_PLAYER, {"endpoint": f"{cluster.edge}/whep/{STREAM}"})
    assert redirect.value.headers["location"].startswith(f"{cluster.origin}/whep/{STREAM}")
    _assert_playing(page, "window.player.pc", "VP8")
