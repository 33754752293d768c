"""Simulcast through a cluster of real processes (issue 18): ``redis-server``, an origin
serving one upstream pull at most, and two edges, all ``whepfan serve --cluster``;
whepfan's simulcast WHIP publisher (q 80x60, h 160x120, f 320x240); aiortc viewers
that decode.

Edge A pulls the three layers from the origin on three sessions: they count as the one
pull the origin serves, so a layer session lost and pulled again (``?rid=``) is not
refused by the limit. Edge B, finding the origin at its limit, pulls from edge A (a
tree), again one session per layer: edge A's copy has the layers as tracks of its own
and says so in its own ``layers`` event. A viewer naming a layer on its first POST to a
cold edge (``?rid=f``) gets it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from _cluster import CLUSTER_TOKEN, PUBLISH_TOKEN, REDIS_SERVER, Node, RedisServer, cluster_node
from _cluster import wait_for as wait_for_sync
from _peers import DecodingViewer, only_loopback_candidates, wait_until
from test_publish import start_viewer

from whepfan.client.publisher import Publisher, PublisherOptions

pytestmark = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="needs Debian's redis-server"
)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    log_dir = tmp_path_factory.mktemp("cluster-simulcast")
    redis = RedisServer(log_dir)
    redis.start()
    limits = {"origin": ["--max-upstream-pulls", "1"]}
    started = {
        name: cluster_node(name, log_dir, redis, "--upstream-grace", "2", *limits.get(name, []))
        for name in ("origin", "edge-a", "edge-b")
    }
    try:
        for node in started.values():
            node.start()
        ids = {node.url for node in started.values()}
        assert wait_for_sync(lambda: all(n.node_ids() == ids for n in started.values()), 15)
        yield started
    finally:
        for node in started.values():
            node.stop()
        redis.stop()


def layer_sessions(node: Node, stream: str) -> dict[str, dict[str, object]]:
    """``node``'s upstream sessions of ``stream`` by layer (its /api/cluster pulls)."""
    pulls = node.cluster()["pulls"]
    assert isinstance(pulls, dict)
    pull = pulls.get(stream)
    if pull is None:
        return {}
    return {str(layer["rid"]): layer for layer in pull["layers"]}


def all_connected(node: Node, stream: str) -> bool:
    layers = layer_sessions(node, stream)
    return sorted(layers) == ["f", "h", "q"] and all(
        layer["connected"] for layer in layers.values()
    )


def carried_from(node: Node, stream: str) -> dict[str, object]:
    listed = node.cluster()["nodes"]
    assert isinstance(listed, list)
    return {n["id"]: n["streams"][stream]["from"] for n in listed if stream in n["streams"]}


async def test_layers_through_a_two_level_tree(nodes: dict[str, Node]) -> None:
    origin, edge_a, edge_b = nodes["origin"], nodes["edge-a"], nodes["edge-b"]
    options = PublisherOptions(
        url=f"{origin.url}/whip/tree",
        token=PUBLISH_TOKEN,
        simulcast=True,
        width=320,
        height=240,
        keyframe_interval=1.0,
    )
    async with Publisher(options):
        assert wait_for_sync(lambda: origin.url in carried_from(edge_b, "tree"))
        first, second = DecodingViewer(), DecodingViewer()
        try:
            await start_viewer(first, f"{edge_a.url}/whep/tree?placed=1")
            assert await wait_until(lambda: len(first.video_frames) >= 5, 15)
            assert wait_for_sync(lambda: all_connected(edge_a, "tree"), 15)
            # Three sessions, one pull: everyone sees the origin serving its limit.
            assert wait_for_sync(
                lambda: carried_from(edge_b, "tree").get(edge_a.url) == origin.url, 15
            )

            # The origin ends edge A's session of layer f; edge A pulls f again and the
            # origin, at its limit, admits it as a layer of the pull it already serves.
            lost = layer_sessions(edge_a, "tree")["f"]["session"]
            assert isinstance(lost, str)
            async with (
                aiohttp.ClientSession() as http,
                http.delete(lost, headers={"Authorization": f"Bearer {CLUSTER_TOKEN}"}) as r,
            ):
                assert r.status == 200
            assert wait_for_sync(
                lambda: (
                    layer_sessions(edge_a, "tree")["f"]["session"] not in (None, lost)
                    and all_connected(edge_a, "tree")
                ),
                15,
            )

            # Edge B pulls from edge A, one session per layer; its viewer asked for f on
            # its first POST, before edge B had the stream.
            await start_viewer(second, f"{edge_b.url}/whep/tree?placed=1&rid=f")
            assert await wait_until(
                lambda: (
                    len(second.video_frames) >= 10
                    and (second.video_frames[-1].width, second.video_frames[-1].height)
                    == (320, 240)
                ),
                15,
            )
            pulls = edge_b.cluster()["pulls"]
            assert pulls["tree"]["node"] == edge_a.url  # type: ignore[index]
            assert wait_for_sync(lambda: all_connected(edge_b, "tree"), 15)
        finally:
            await first.close()
            await second.close()
