"""A cluster of real parts: ``redis-server`` on a free port, an origin and two edges as
``whepfan serve --cluster`` processes on loopback, whepfan's WHIP publisher, aiortc
viewers that decode, ``whepfan loadtest``; and the faults: Redis stopped and back, an
edge killed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from _cluster import (
    CLUSTER_TOKEN,
    PUBLISH_TOKEN,
    REDIS_SERVER,
    Node,
    RedisServer,
    cluster_node,
    wait_for,
)
from _peers import DecodingViewer, only_loopback_candidates, wait_until
from test_publish import start_viewer

from whepfan.client.peer import LocalParameters, host_candidate, new_ice_credentials, viewer_offer
from whepfan.client.publisher import Publisher, PublisherOptions
from whepfan.protocol.dtls import DtlsCertificate

pytestmark = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(), reason="needs Debian's redis-server"
)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def redis(log_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(log_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodes(redis: RedisServer, log_dir: Path) -> Iterator[dict[str, Node]]:
    # The origin serves one upstream pull at most: a second edge pulls from the first.
    limits = {"origin": ["--max-upstream-pulls", "1"]}
    started = {
        name: cluster_node(name, log_dir, redis, "--upstream-grace", "2", *limits.get(name, []))
        for name in ("origin", "edge-a", "edge-b")
    }
    try:
        for node in started.values():
            node.start()
        ids = {node.url for node in started.values()}
        assert wait_for(lambda: all(n.node_ids() == ids for n in started.values()), 15)
        yield started
    finally:
        for node in started.values():
            node.stop()


def publisher(node: Node, name: str) -> Publisher:
    return Publisher(
        PublisherOptions(
            url=f"{node.url}/whip/{name}",
            token=PUBLISH_TOKEN,
            width=320,
            height=240,
            keyframe_interval=2.0,
        )
    )


def carriers(node: Node, stream: str) -> dict[str, object]:
    """Node id -> where it has ``stream`` from (None: its publisher), in ``node``'s view."""
    listed = node.cluster()["nodes"]
    assert isinstance(listed, list)
    return {n["id"]: n["streams"][stream]["from"] for n in listed if stream in n["streams"]}


def pulls_served_by(node: Node, source: str) -> int:
    listed = node.cluster()["nodes"]
    assert isinstance(listed, list)
    return sum(1 for n in listed for s in n["streams"].values() if s["from"] == source)


async def post_status(url: str, offer: str, **headers: str) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url,
            data=offer,
            headers={"Content-Type": "application/sdp", **headers},
            allow_redirects=False,
        ) as response,
    ):
        return response.status, dict(response.headers), await response.text()


def test_every_node_registers_and_sees_the_others(nodes: dict[str, Node]) -> None:
    for node in nodes.values():
        document = node.cluster()
        assert document["available"] is True
        assert document["node"] == node.url
        assert {n["id"] for n in document["nodes"]} == {n.url for n in nodes.values()}  # type: ignore[union-attr]


async def test_an_edge_pulls_a_stream_of_the_origin_and_placement_sends_viewers_to_it(
    nodes: dict[str, Node],
) -> None:
    origin, edge_a, edge_b = nodes["origin"], nodes["edge-a"], nodes["edge-b"]
    async with publisher(origin, "live"):
        assert wait_for(lambda: carriers(edge_b, "live") == {origin.url: None})
        viewer = DecodingViewer()
        try:
            # ?placed=1: served where it is posted (as after a redirect), so edge A pulls.
            await start_viewer(viewer, f"{edge_a.url}/whep/live?placed=1")
            assert await wait_until(lambda: len(viewer.video_frames) >= 10, 15)
            assert viewer.video_frames[-1].width == 320
            pulls = edge_a.cluster()["pulls"]
            assert pulls["live"]["node"] == origin.url  # type: ignore[index]
            assert pulls["live"]["connected"] is True  # type: ignore[index]
            # Edge A now carries it, from the origin, in everyone's view.
            assert wait_for(
                lambda: carriers(edge_b, "live") == {origin.url: None, edge_a.url: origin.url}
            )
            # A viewer posting to edge B is sent to a node carrying it (the body unread).
            status, headers, _ = await post_status(f"{edge_b.url}/whep/live", _recvonly_offer())
            assert status == 307
            assert headers["Location"].split("/whep/")[0] in (origin.url, edge_a.url)
            assert headers["Location"].endswith("/whep/live?placed=1")
        finally:
            await viewer.close()


async def test_a_second_edge_pulls_from_the_first_when_the_origin_serves_its_limit(
    nodes: dict[str, Node],
) -> None:
    origin, edge_a, edge_b = nodes["origin"], nodes["edge-a"], nodes["edge-b"]
    # Earlier tests' pulls are released (a 2 s grace) before the origin's one is taken.
    assert wait_for(lambda: pulls_served_by(edge_a, origin.url) == 0, 15)
    async with publisher(origin, "tree"):
        assert wait_for(lambda: origin.url in carriers(edge_b, "tree"))
        first, second = DecodingViewer(), DecodingViewer()
        try:
            await start_viewer(first, f"{edge_a.url}/whep/tree?placed=1")
            assert await wait_until(lambda: len(first.video_frames) >= 5, 15)
            # Every node sees that the origin now serves its one pull (edge A's).
            assert wait_for(lambda: carriers(edge_b, "tree").get(edge_a.url) == origin.url)
            await start_viewer(second, f"{edge_b.url}/whep/tree?placed=1")
            assert await wait_until(lambda: len(second.video_frames) >= 10, 15)
            assert second.video_frames[-1].width == 320
            pulls = edge_b.cluster()["pulls"]
            # origin -> edge A -> edge B: a two-level tree.
            assert pulls["tree"]["node"] == edge_a.url  # type: ignore[index]
            assert wait_for(
                lambda: (
                    carriers(origin, "tree")
                    == {origin.url: None, edge_a.url: origin.url, edge_b.url: edge_a.url}
                )
            )
        finally:
            await first.close()
            await second.close()


def _recvonly_offer() -> str:
    """A WHEP offer for the answers that come before any media (307, 503)."""
    ufrag, pwd = new_ice_credentials()
    return viewer_offer(
        LocalParameters(
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            fingerprints=DtlsCertificate.generate().fingerprints,
            candidate=host_candidate("127.0.0.1", 9),
        )
    )


async def test_redis_stopped_local_viewers_keep_watching_new_pulls_get_503_and_nodes_return(
    nodes: dict[str, Node], redis: RedisServer
) -> None:
    origin, edge_a, edge_b = nodes["origin"], nodes["edge-a"], nodes["edge-b"]
    assert wait_for(lambda: pulls_served_by(edge_a, origin.url) == 0, 15)
    async with publisher(origin, "steady"):
        assert wait_for(lambda: origin.url in carriers(edge_a, "steady"))
        viewer = DecodingViewer()
        try:
            await start_viewer(viewer, f"{edge_a.url}/whep/steady?placed=1")
            assert await wait_until(lambda: len(viewer.video_frames) >= 5, 15)
            redis.stop()
            try:
                assert wait_for(lambda: edge_b.cluster()["available"] is False, 10)
                # Edge A keeps its viewer: the upstream does not depend on Redis.
                before = len(viewer.video_frames)
                assert await wait_until(lambda: len(viewer.video_frames) >= before + 30, 10)
                # Edge B cannot find the stream's node: a 503 that says why.
                status, headers, body = await post_status(
                    f"{edge_b.url}/whep/steady", _recvonly_offer()
                )
                assert status == 503
                assert headers["Retry-After"] == "5"
                detail = orjson.loads(body)["detail"]
                assert "registry" in detail and "unreachable" in detail
            finally:
                redis.start()
            ids = {node.url for node in nodes.values()}
            assert wait_for(lambda: all(n.node_ids() == ids for n in nodes.values()), 10)
            assert wait_for(lambda: origin.url in carriers(edge_b, "steady"), 10)
        finally:
            await viewer.close()


def test_a_killed_edge_drops_out_and_its_viewers_are_placed_elsewhere(
    redis: RedisServer, nodes: dict[str, Node], log_dir: Path
) -> None:
    doomed = cluster_node("edge-killed", log_dir, redis)
    doomed.start()
    everyone = {node.url for node in nodes.values()} | {doomed.url}
    assert wait_for(lambda: nodes["origin"].node_ids() == everyone, 10)
    doomed.kill()
    # Its key expires (NODE_TTL 5 s) and the others drop it from their view.
    assert wait_for(lambda: doomed.url not in nodes["origin"].node_ids(), 10)
    result = asyncio.run(post_status(f"{nodes['edge-b'].url}/whep/anything", _recvonly_offer()))
    status, headers, _ = result
    assert status != 307 or doomed.url not in headers["Location"]


def test_loadtest_follows_redirects_and_reports_where_viewers_went(
    nodes: dict[str, Node], tmp_path: Path
) -> None:
    origin, edge_b = nodes["origin"], nodes["edge-b"]
    report_path = tmp_path / "report.json"

    async def run() -> subprocess.CompletedProcess[str]:
        async with publisher(origin, "crowd"):
            assert wait_for(lambda: origin.url in carriers(edge_b, "crowd"))
            return await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "whepfan.cli",
                    "loadtest",
                    f"{edge_b.url}/whep/crowd",
                    "--viewers",
                    "4",
                    "--duration",
                    "2",
                    "--json",
                    str(report_path),
                ],
                capture_output=True,
                text=True,
                timeout=90,
            )

    result = asyncio.run(run())
    assert result.returncode == 0, result.stderr[-3000:]
    summary = orjson.loads(report_path.read_bytes())["summary"]
    assert summary["connected"] == 4 and summary["received_media"] == 4
    placed = summary["endpoints"]
    assert sum(placed.values()) == 4
    assert all(url.split("/whep/")[0] in {n.url for n in nodes.values()} for url in placed)
    # Edge B does not carry the stream: each of its viewers was sent to a node that does.
    assert summary["redirected"] == 4
    assert "redirected 4 of 4" in result.stdout + result.stderr


def test_the_cluster_token_is_required_alongside_cluster() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "whepfan.cli", "serve", "--cluster", "redis://127.0.0.1:1/0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--cluster needs --cluster-token" in result.stderr
    assert CLUSTER_TOKEN not in result.stderr
