"""Cluster nodes with worker processes (``--workers 2``): the upstream pull runs in one
worker of the edge and reaches the other worker's viewers over the inter-worker relay
(whepfan/cluster/pool_backend.py).

Real parts, as tests/test_cluster.py: ``redis-server`` on a free port, an origin and an
edge as ``whepfan serve --cluster ... --workers 2`` processes and a static edge
(``--upstream``, ``--workers 2``), whepfan's WHIP publisher, aiortc viewers that decode.
The faults: the worker process that holds the upstream killed (SIGKILL), the origin's
publisher gone and back."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from _cluster import CLUSTER_TOKEN, REDIS_SERVER, Node, RedisServer, cluster_node, wait_for
from _peers import DecodingViewer, only_loopback_candidates, wait_until
from test_cluster import _recvonly_offer, carriers, post_status, publisher
from test_publish import start_viewer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason="needs Debian's redis-server"),
]

GRACE = 2.0


def any_udp_ports(node: Node) -> Node:
    """``--udp 127.0.0.1:0``: each worker binds a port of its own (with a fixed base port,
    worker i takes base+i, which _cluster.free_port does not check)."""
    at = node.args.index("--udp")
    node.args[at + 1] = "127.0.0.1:0"
    return node


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-workers")


@pytest.fixture(scope="module")
def redis(log_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(log_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodes(redis: RedisServer, log_dir: Path) -> Iterator[dict[str, Node]]:
    workers = ("--workers", "2", "--upstream-grace", str(GRACE))
    started = {
        name: any_udp_ports(cluster_node(name, log_dir, redis, *workers))
        for name in ("origin", "edge")
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


def get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=2) as response:
        document: dict[str, object] = orjson.loads(response.read())
        return document


def stream_viewers(node: Node, stream: str) -> int:
    """Viewer sessions of ``stream`` on ``node`` (every worker's), 0 when it has none."""
    try:
        summary = get_json(f"{node.url}/api/streams/{stream}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return 0
        raise
    viewers = summary["viewers"]
    assert isinstance(viewers, int)
    return viewers


def metrics(node: Node) -> list[str]:
    """The sample lines of ``node``'s /metrics."""
    with urllib.request.urlopen(f"{node.url}/metrics", timeout=2) as response:
        return [line for line in response.read().decode().splitlines() if line[:1] != "#"]


def viewers_per_worker(node: Node) -> dict[str, int]:
    """``whepfan_viewers{worker=...}`` of ``node``'s /metrics."""
    counts: dict[str, int] = {}
    for line in metrics(node):
        if line.startswith("whepfan_viewers{"):
            labels, value = line.rsplit(" ", 1)
            worker = labels.split('worker="', 1)[1].split('"', 1)[0]
            counts[worker] = int(float(value))
    return counts


def metric_total(node: Node, family: str) -> float:
    """The sum of ``family``'s samples (any labels) in ``node``'s /metrics."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics(node)
        if line.startswith((family + "{", family + " "))
    )


def pulls(node: Node) -> dict[str, dict[str, object]]:
    document = node.cluster()["pulls"]
    assert isinstance(document, dict)
    return document


def node_record(observer: Node, node: Node) -> dict[str, object]:
    listed = observer.cluster()["nodes"]
    assert isinstance(listed, list)
    (record,) = [n for n in listed if n["id"] == node.url]
    assert isinstance(record, dict)
    return record


async def start_viewers(url: str, count: int) -> list[DecodingViewer]:
    viewers = [DecodingViewer() for _ in range(count)]
    for viewer in viewers:
        await start_viewer(viewer, url)
    return viewers


async def frames_grow(viewers: list[DecodingViewer], by: int, timeout: float = 20.0) -> bool:
    before = [len(v.video_frames) for v in viewers]
    return await wait_until(
        lambda: all(len(v.video_frames) >= b + by for v, b in zip(viewers, before, strict=True)),
        timeout,
    )


async def test_edge_viewers_on_both_workers_share_one_upstream_released_after_the_grace(
    nodes: dict[str, Node],
) -> None:
    origin, edge = nodes["origin"], nodes["edge"]
    async with publisher(origin, "spread"):
        assert wait_for(lambda: origin.url in carriers(edge, "spread"))
        # ?placed=1: served by the edge, which pulls; least-loaded placement alternates.
        viewers = await start_viewers(f"{edge.url}/whep/spread?placed=1", 4)
        try:
            assert await frames_grow(viewers, 10), [len(v.video_frames) for v in viewers]
            assert viewers[-1].video_frames[-1].width == 320
            assert wait_for(lambda: viewers_per_worker(edge) == {"0": 2, "1": 2})
            (pulled,) = pulls(edge).items()
            name, pull = pulled
            assert name == "spread" and pull["node"] == origin.url
            assert pull["worker"] in (0, 1) and isinstance(pull["worker_pid"], int)
            assert wait_for(lambda: pulls(edge)["spread"]["connected"] is True)
            assert pulls(edge)["spread"]["packets"] > 0  # type: ignore[operator]
            # One upstream session on the origin for the edge's four viewers.
            assert stream_viewers(origin, "spread") == 1
            # The registry has the edge's viewers and its pull, summed over its workers.
            assert wait_for(lambda: node_record(origin, edge)["viewers"] == 4)
            streams = node_record(origin, edge)["streams"]
            assert isinstance(streams, dict)
            assert streams["spread"]["from"] == origin.url
            assert streams["spread"]["viewers"] == 4
            assert node_record(origin, edge)["upstream_sessions"] == 1
            assert metric_total(edge, "whepfan_cluster_upstream_sessions") == 1
        finally:
            for viewer in viewers:
                await viewer.close()
        # The last viewer (on either worker) left: the upstream goes after the grace.
        assert wait_for(lambda: "spread" not in pulls(edge), GRACE + 10)
        assert wait_for(lambda: stream_viewers(origin, "spread") == 0, 10)


async def test_killing_the_worker_holding_the_upstream_pulls_it_again(
    nodes: dict[str, Node],
) -> None:
    origin, edge = nodes["origin"], nodes["edge"]
    async with publisher(origin, "crash"):
        assert wait_for(lambda: origin.url in carriers(edge, "crash"))
        viewers = await start_viewers(f"{edge.url}/whep/crash?placed=1", 4)
        replacements: list[DecodingViewer] = []
        try:
            assert await frames_grow(viewers, 5)
            assert wait_for(lambda: pulls(edge)["crash"]["connected"] is True)
            pull = pulls(edge)["crash"]
            victim, pid = pull["worker"], pull["worker_pid"]
            assert isinstance(pid, int)
            os.kill(pid, signal.SIGKILL)
            # The pull is lost with its worker and made again (into the worker holding the
            # viewers still waiting); the killed session is DELETEd at the origin.
            assert wait_for(
                lambda: (
                    (p := pulls(edge).get("crash")) is not None
                    and p["connected"] is True
                    and p["worker_pid"] != pid
                ),
                20,
            )
            assert pulls(edge)["crash"]["last_error"] == f"media worker {victim} exited"
            assert wait_for(lambda: stream_viewers(origin, "crash") == 1, 10)
            # Viewers on the surviving worker resume on their own sessions; those of the
            # killed worker lost theirs (they were told to reconnect) and POST again.
            grew = await asyncio.gather(*(frames_grow([v], 10, timeout=10) for v in viewers))
            assert grew.count(True) == 2, [len(v.video_frames) for v in viewers]
            replacements = await start_viewers(f"{edge.url}/whep/crash?placed=1", 2)
            assert await frames_grow(replacements, 10)
            assert wait_for(lambda: sum(viewers_per_worker(edge).values()) == 4)
            assert list(pulls(edge)) == ["crash"]
        finally:
            for viewer in viewers + replacements:
                await viewer.close()


async def test_a_node_is_full_when_its_workers_together_hold_max_viewers(
    redis: RedisServer, log_dir: Path
) -> None:
    # A cluster of its own (Redis database 1): one node, two workers, room for two viewers.
    node = Node(
        "full",
        log_dir,
        *("--cluster", f"redis://127.0.0.1:{redis.port}/1", "--cluster-token", CLUSTER_TOKEN),
        *("--workers", "2", "--max-viewers", "2"),
    )
    node.args += ["--node-url", node.url]
    any_udp_ports(node).start()
    try:
        assert wait_for(lambda: node.node_ids() == {node.url})
        async with publisher(node, "full"):
            # Placed here (201, no redirect): the only node, with room.
            viewers = await start_viewers(f"{node.url}/whep/full", 2)
            try:
                assert await frames_grow(viewers, 3)
                assert wait_for(lambda: viewers_per_worker(node) == {"0": 1, "1": 1})
                # One viewer on each worker: the node's record counts both.
                assert wait_for(lambda: node_record(node, node)["viewers"] == 2)
                status, headers, body = await post_status(
                    f"{node.url}/whep/full", _recvonly_offer()
                )
                assert status == 503, body
                assert "every node of the cluster is full" in orjson.loads(body)["detail"]
                assert headers["Retry-After"] == "10"
            finally:
                for viewer in viewers:
                    await viewer.close()
    finally:
        node.stop()


@pytest.fixture(scope="module")
def static_edge(nodes: dict[str, Node], log_dir: Path) -> Iterator[Node]:
    origin = nodes["origin"]
    node = Node(
        "static-edge",
        log_dir,
        "--workers",
        "2",
        "--upstream",
        f"{origin.url}/whep/{{stream}}",
        "--upstream-grace",
        str(GRACE),
    )
    any_udp_ports(node).start()
    yield node
    node.stop()


async def test_a_static_edge_with_workers_follows_the_origin_publisher_away_and_back(
    nodes: dict[str, Node], static_edge: Node
) -> None:
    origin = nodes["origin"]
    viewers: list[DecodingViewer] = []
    try:
        async with publisher(origin, "returning"):
            viewers = await start_viewers(f"{static_edge.url}/whep/returning", 2)
            assert await frames_grow(viewers, 5)
            assert wait_for(lambda: viewers_per_worker(static_edge) == {"0": 1, "1": 1})
            assert pulls(static_edge)["returning"]["upstream"] == (f"{origin.url}/whep/returning")
        # The origin's publisher left: edge viewers stay, the stream turns inactive.
        assert wait_for(
            lambda: get_json(f"{static_edge.url}/api/streams/returning")["active"] is False, 10
        )
        async with publisher(origin, "returning"):
            # Its successor's media reaches the viewers of both edge workers, unrenegotiated.
            assert await frames_grow(viewers, 10)
            assert get_json(f"{static_edge.url}/api/streams/returning")["active"] is True
        assert stream_viewers(origin, "returning") == 1
    finally:
        for viewer in viewers:
            await viewer.close()
