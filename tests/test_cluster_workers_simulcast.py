"""An edge with worker processes (``--workers 2``) pulls a simulcast stream as one upstream
session per layer, as a one-worker edge does (issue 18; cluster/pool_backend.py).

Real parts, as tests/test_cluster_workers.py: ``redis-server``, an origin and an edge as
``whepfan serve --cluster`` processes (the edge with ``--workers 2``), whepfan's
simulcast WHIP publisher (q 80x60, h 160x120, f 320x240), aiortc viewers that decode.
Every layer's session is in the worker of the first one; the other worker's relay copy
has the three layers as tracks, so its viewers get the edge's layer API and policy over
them as well. The faults: the origin ends one layer's session; the last viewer leaves."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from _cluster import CLUSTER_TOKEN, PUBLISH_TOKEN, REDIS_SERVER, Node, RedisServer, cluster_node
from _cluster import wait_for as wait_for_sync
from _peers import only_loopback_candidates, wait_until
from test_cluster import carriers
from test_cluster_simulcast import SIZES, EdgeViewer
from test_cluster_workers import (
    GRACE,
    any_udp_ports,
    frames_grow,
    pulls,
    stream_viewers,
    viewers_per_worker,
)

from whepfan.client.publisher import Publisher, PublisherOptions
from whepfan.cluster.layer_events import layer_updates

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason="needs Debian's redis-server"),
]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    log_dir = tmp_path_factory.mktemp("cluster-workers-simulcast")
    redis = RedisServer(log_dir)
    redis.start()
    grace = ("--upstream-grace", str(GRACE))
    started = {
        "origin": cluster_node("origin", log_dir, redis, *grace),
        "edge": any_udp_ports(cluster_node("edge", log_dir, redis, "--workers", "2", *grace)),
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


def layer_sessions(edge: Node, stream: str) -> dict[str, dict[str, object]]:
    """The edge's upstream sessions of ``stream`` by layer (its /api/cluster pull)."""
    pull = pulls(edge).get(stream)
    if pull is None:
        return {}
    layers = pull["layers"]
    assert isinstance(layers, list)
    return {str(layer["rid"]): layer for layer in layers}


def session_urls(edge: Node, stream: str) -> dict[str, object]:
    """Layer -> the origin's resource of the edge's upstream session for it."""
    return {rid: layer["session"] for rid, layer in layer_sessions(edge, stream).items()}


def all_connected(edge: Node, stream: str) -> bool:
    layers = layer_sessions(edge, stream)
    return sorted(layers) == ["f", "h", "q"] and all(
        layer["connected"] and layer["session"] for layer in layers.values()
    )


async def test_a_worker_pool_edge_pulls_each_layer_and_both_workers_viewers_pin_them(
    nodes: dict[str, Node],
) -> None:
    origin, edge = nodes["origin"], nodes["edge"]
    options = PublisherOptions(
        url=f"{origin.url}/whip/layers",
        token=PUBLISH_TOKEN,
        simulcast=True,
        width=320,
        height=240,
        keyframe_interval=1.0,
    )
    async with Publisher(options):
        assert wait_for_sync(lambda: origin.url in carriers(edge, "layers"))
        viewers: list[EdgeViewer] = []
        worker_of: dict[int, str] = {}  # viewer index -> the edge worker serving it
        try:
            # ?placed=1: served by the edge; least-loaded placement alternates workers.
            for index in range(2):
                before = viewers_per_worker(edge)
                viewer = EdgeViewer()
                await viewer.start(f"{edge.url}/whep/layers?placed=1")
                viewers.append(viewer)

                def grew(before: dict[str, int] = before) -> bool:
                    now = viewers_per_worker(edge)
                    return sum(now.values()) == sum(before.values()) + 1

                assert wait_for_sync(grew, 10)
                now = viewers_per_worker(edge)
                (worker_of[index],) = [w for w in now if now[w] > before.get(w, 0)]
            assert sorted(worker_of.values()) == ["0", "1"]

            # Three upstream sessions, one per layer, all in one worker of the edge.
            assert wait_for_sync(lambda: all_connected(edge, "layers"), 20)
            assert wait_for_sync(lambda: stream_viewers(origin, "layers") == 3, 10)
            pull = pulls(edge)["layers"]
            holder = str(pull["worker"])
            other = next(i for i, w in worker_of.items() if w != holder)

            # Automatic viewers on both workers (one without the pull) decode, and start
            # in the middle (the edge's policy moves them up after 5 s of clean reports).
            for viewer in viewers:
                await viewer.wait_size(SIZES["h"], timeout=4)
            assert await wait_until(
                lambda: all(len(v.peer.video_frames) >= 10 for v in viewers), 20
            )

            # Each layer, pinned through the layer API, on both workers.
            for rid in ("q", "f", "h"):
                for viewer in viewers:
                    await viewer.layer("POST", {"rid": rid})
                for viewer in viewers:
                    await viewer.wait_size(SIZES[rid])
            # The worker without the pull has the layers as tracks of its own, in order.
            status = await viewers[other].layer("GET")
            assert [layer["rid"] for layer in status["layers"]] == ["q", "h", "f"], status
            # The edge's own SSE "layers" event (EXT §4.3.3), from the pull's worker.
            async with aiohttp.ClientSession() as http, asyncio.timeout(10):
                async for rids in layer_updates(http, viewers[other].links, None):
                    assert rids == ("q", "h", "f")
                    break

            # The origin ends the session of layer f: it alone is pulled again (into the
            # same worker), the other layers' sessions go on, and f's viewers resume.
            for viewer in viewers:
                await viewer.layer("POST", {"rid": "f"})
            held = session_urls(edge, "layers")
            lost = held["f"]
            assert isinstance(lost, str)
            async with (
                aiohttp.ClientSession() as http,
                http.delete(lost, headers={"Authorization": f"Bearer {CLUSTER_TOKEN}"}) as r,
            ):
                assert r.status == 200
            assert wait_for_sync(
                lambda: (
                    layer_sessions(edge, "layers")["f"]["session"] not in (None, lost)
                    and all_connected(edge, "layers")
                ),
                20,
            )
            again = session_urls(edge, "layers")
            assert (again["q"], again["h"]) == (held["q"], held["h"])
            assert str(pulls(edge)["layers"]["worker"]) == holder
            for viewer in viewers:
                await viewer.wait_size(SIZES["f"])
            counts = [len(v.peer.video_frames) for v in viewers]
            assert await wait_until(
                lambda: all(
                    len(v.peer.video_frames) >= c + 10 for v, c in zip(viewers, counts, strict=True)
                ),
                15,
            )
        finally:
            for viewer in viewers:
                await viewer.peer.close()
        # The last viewer left: every layer's session ends after the grace.
        assert wait_for_sync(lambda: "layers" not in pulls(edge), GRACE + 10)
        assert wait_for_sync(lambda: stream_viewers(origin, "layers") == 0, 10)


async def test_killing_the_worker_holding_the_layers_pulls_them_all_into_the_other(
    nodes: dict[str, Node],
) -> None:
    origin, edge = nodes["origin"], nodes["edge"]
    options = PublisherOptions(
        url=f"{origin.url}/whip/crash-layers",
        token=PUBLISH_TOKEN,
        simulcast=True,
        width=320,
        height=240,
        keyframe_interval=1.0,
    )
    async with Publisher(options):
        assert wait_for_sync(lambda: origin.url in carriers(edge, "crash-layers"))
        viewers: list[EdgeViewer] = []
        try:
            for _ in range(2):
                viewer = EdgeViewer()
                await viewer.start(f"{edge.url}/whep/crash-layers?placed=1")
                viewers.append(viewer)
            assert wait_for_sync(lambda: all_connected(edge, "crash-layers"), 20)
            for viewer in viewers:
                await viewer.layer("POST", {"rid": "q"})
            for viewer in viewers:
                await viewer.wait_size(SIZES["q"])
            pull = pulls(edge)["crash-layers"]
            pid = pull["worker_pid"]
            assert isinstance(pid, int)
            os.kill(pid, signal.SIGKILL)
            # Every layer's session is lost with its worker and pulled again into the
            # other one, which now has the layers as tracks fed by its own sessions; the
            # killed sessions are DELETEd at the origin.
            assert wait_for_sync(
                lambda: (
                    (p := pulls(edge).get("crash-layers")) is not None
                    and p["worker_pid"] not in (None, pid)
                    and all_connected(edge, "crash-layers")
                ),
                20,
            )
            assert wait_for_sync(lambda: stream_viewers(origin, "crash-layers") == 3, 10)
            # The viewer of the surviving worker resumes on its own session, still
            # pinned, and can move to another layer; the other one was told to reconnect.
            grew = await asyncio.gather(
                *(frames_grow([viewer.peer], 10, timeout=10) for viewer in viewers)
            )
            assert grew.count(True) == 1, [len(v.peer.video_frames) for v in viewers]
            survivor = viewers[grew.index(True)]
            await survivor.wait_size(SIZES["q"])
            await survivor.layer("POST", {"rid": "f"})
            await survivor.wait_size(SIZES["f"])
        finally:
            for viewer in viewers:
                await viewer.peer.close()
