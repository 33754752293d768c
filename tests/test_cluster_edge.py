"""A static edge (``--upstream``): a whepfan with no cluster pulls a stream over standard
WHEP from a plain whepfan origin and fans it out as if it had the WHIP publisher.

Real parts: two ``whepfan.server.run`` servers on loopback (origin with ``--cluster`` off,
edge with ``--upstream``), whepfan's own WHIP publisher, aiortc viewers that decode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest
from _peers import DecodingViewer, only_loopback_candidates, wait_until
from _server import TOKEN, LiveServer, settings_for
from test_publish import start_viewer

from whepfan.client.publisher import Publisher, PublisherOptions
from whepfan.errors import Conflict
from whepfan.workers.pool import WorkerPool

VIEW_TOKEN = "origin-view-token"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture(scope="module")
def origin() -> Iterator[LiveServer]:
    # A plain WHEP origin: viewing needs a token, which the edge is given.
    live = LiveServer(settings_for(view_token=VIEW_TOKEN))
    yield live
    live.close()


@pytest.fixture(scope="module")
def edge(origin: LiveServer) -> Iterator[LiveServer]:
    live = LiveServer(
        settings_for(
            upstream=f"{origin.url}/whep/{{stream}}",
            upstream_token=VIEW_TOKEN,
            upstream_grace="1",
        )
    )
    yield live
    live.close()


@pytest.fixture(scope="module")
def edge_with_workers(origin: LiveServer) -> Iterator[LiveServer]:
    # Two worker processes: the upstream session runs in one (cluster/pool_backend.py).
    live = LiveServer(
        settings_for(
            upstream=f"{origin.url}/whep/{{stream}}",
            upstream_token=VIEW_TOKEN,
            upstream_grace="1",
            workers="2",
        )
    )
    yield live
    live.close()


def publisher(origin: LiveServer, name: str) -> Publisher:
    return Publisher(
        PublisherOptions(
            url=f"{origin.url}/whip/{name}",
            token=TOKEN,
            width=320,
            height=240,
            keyframe_interval=2.0,
        )
    )


async def cluster_state(server: LiveServer) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/api/cluster") as r:
        assert r.status == 200
        document: dict[str, object] = await r.json()
        return document


def origin_viewers(origin: LiveServer, name: str) -> int:
    assert origin.info is not None
    stream = origin.info.backend.streams.get(name)
    return 0 if stream is None else len(stream.viewers)


async def decode_frames(viewer: DecodingViewer, count: int, timeout: float = 15.0) -> None:
    assert await wait_until(
        lambda: len(viewer.video_frames) >= count and viewer.audio_frames > 0, timeout
    ), f"{len(viewer.video_frames)} frames, {viewer.audio_frames} audio frames decoded"


async def test_edge_viewer_decodes_a_stream_pulled_from_a_plain_whep_origin(
    origin: LiveServer, edge: LiveServer
) -> None:
    async with publisher(origin, "pulled"):
        viewer = DecodingViewer()
        try:
            await start_viewer(viewer, f"{edge.url}/whep/pulled")
            await decode_frames(viewer, 10)
            frame = viewer.video_frames[-1]
            assert (frame.width, frame.height) == (320, 240)
            # One upstream session on the origin, whatever the edge's viewer count.
            assert origin_viewers(origin, "pulled") == 1
            second = DecodingViewer()
            try:
                await start_viewer(second, f"{edge.url}/whep/pulled")
                await decode_frames(second, 5)
                assert origin_viewers(origin, "pulled") == 1
            finally:
                await second.close()
            state = await cluster_state(edge)
            pulls = state["pulls"]
            assert isinstance(pulls, dict)
            assert pulls["pulled"]["upstream"] == f"{origin.url}/whep/pulled"
            assert pulls["pulled"]["connected"] is True
            assert pulls["pulled"]["packets"] > 0
        finally:
            await viewer.close()
        # The upstream goes a grace period (1 s here) after the edge's last viewer.
        assert await wait_until(lambda: origin_viewers(origin, "pulled") == 0, 10)
        assert "pulled" not in (await cluster_state(edge))["pulls"]  # type: ignore[operator]


async def test_a_stream_not_live_upstream_is_409_on_the_edge(edge: LiveServer) -> None:
    viewer = DecodingViewer()
    try:
        offer = await viewer.offer(["audio", "video"])
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{edge.url}/whep/nobody-here",
                data=offer,
                headers={"Content-Type": "application/sdp"},
            ) as response,
        ):
            assert response.status == Conflict.status
            assert response.headers["Retry-After"] == "5"
            assert "not live" in (await response.json())["detail"]
    finally:
        await viewer.close()


async def test_edge_viewers_resume_when_the_origin_publisher_returns(
    origin: LiveServer, edge: LiveServer
) -> None:
    viewer = DecodingViewer()
    try:
        async with publisher(origin, "returning"):
            await start_viewer(viewer, f"{edge.url}/whep/returning")
            await decode_frames(viewer, 5)
        # The publisher is gone; the edge viewer stays, as on a single node, and the
        # edge's stream turns inactive (SSE "inactive") once its media stops.
        assert edge.info is not None
        edge_streams = edge.info.backend.streams
        assert await wait_until(lambda: not edge_streams["returning"].active, 10)
        before = len(viewer.video_frames)
        started = time.monotonic()
        async with publisher(origin, "returning"):
            await decode_frames(viewer, before + 10)
            assert edge_streams["returning"].active
        assert time.monotonic() - started < 15
        assert origin_viewers(origin, "returning") == 1
    finally:
        await viewer.close()


async def test_a_lost_upstream_is_pulled_again_and_edge_viewers_resume(
    origin: LiveServer, edge: LiveServer
) -> None:
    async with publisher(origin, "lost"):
        viewer = DecodingViewer()
        try:
            await start_viewer(viewer, f"{edge.url}/whep/lost")
            await decode_frames(viewer, 5)
            assert origin.info is not None and edge.info is not None
            backend = origin.info.backend
            (upstream_id,) = backend.streams["lost"].viewers
            # The origin ends the edge's session (DTLS close_notify): the edge notices,
            # backs off, pulls again; its viewer stays on the same session throughout.
            origin.loop.call_soon_threadsafe(
                backend.end_session, upstream_id, origin.loop.time(), "deleted"
            )
            assert await wait_until(
                lambda: set(backend.streams["lost"].viewers) - {upstream_id}, 10
            )
            before = len(viewer.video_frames)
            await decode_frames(viewer, before + 10)
            pulls = (await cluster_state(edge))["pulls"]
            assert isinstance(pulls, dict)
            assert pulls["lost"]["connected"] is True
            assert pulls["lost"]["last_error"] == "the server closed DTLS (close_notify)"
        finally:
            await viewer.close()


async def test_a_lost_upstream_in_a_worker_is_pulled_again_and_both_workers_viewers_resume(
    origin: LiveServer, edge_with_workers: LiveServer
) -> None:
    edge = edge_with_workers
    async with publisher(origin, "lost-in-worker"):
        viewers = [DecodingViewer(), DecodingViewer()]
        try:
            for viewer in viewers:
                await start_viewer(viewer, f"{edge.url}/whep/lost-in-worker")
            for viewer in viewers:
                await decode_frames(viewer, 5)
            assert origin.info is not None and edge.info is not None
            pool = edge.info.backend
            assert isinstance(pool, WorkerPool)
            # One viewer per worker: the upstream's worker and the one fed by the relay.
            placed = {pool.worker_of(v) for v in pool.streams["lost-in-worker"].viewers}
            assert placed == {0, 1}
            backend = origin.info.backend
            (upstream_id,) = backend.streams["lost-in-worker"].viewers
            origin.loop.call_soon_threadsafe(
                backend.end_session, upstream_id, origin.loop.time(), "deleted"
            )
            # The edge's worker sees the transport end, the main process pulls again.
            assert await wait_until(
                lambda: bool(set(backend.streams["lost-in-worker"].viewers) - {upstream_id}), 10
            )
            for viewer in viewers:
                await decode_frames(viewer, len(viewer.video_frames) + 10)

            async def pull() -> dict[str, object]:
                pulls = (await cluster_state(edge))["pulls"]
                assert isinstance(pulls, dict)
                entry: dict[str, object] = pulls["lost-in-worker"]
                return entry

            for _ in range(50):  # "connected" comes with the worker's next report
                if (await pull())["connected"] is True:
                    break
                await asyncio.sleep(0.1)
            entry = await pull()
            assert entry["connected"] is True and entry["worker"] in (0, 1)
            assert entry["last_error"] == "the server closed DTLS (close_notify)"
        finally:
            for viewer in viewers:
                await viewer.close()


async def test_a_worker_pool_edge_pulls_a_simulcast_stream_as_one_session_per_layer(
    origin: LiveServer, edge_with_workers: LiveServer
) -> None:
    """With --workers N an edge pulls a simulcast stream as one session per layer, as with
    one worker (cluster/pool_backend.py), all in one worker; both workers' viewers decode,
    one over the relay (tests/test_cluster_workers_simulcast.py pins each layer)."""
    options = PublisherOptions(
        url=f"{origin.url}/whip/simulcast-pool",
        token=TOKEN,
        simulcast=True,
        width=320,
        height=240,
        keyframe_interval=1.0,
    )
    async with Publisher(options):
        viewers = [DecodingViewer(), DecodingViewer()]
        try:
            for viewer in viewers:
                await start_viewer(viewer, f"{edge_with_workers.url}/whep/simulcast-pool")
            for viewer in viewers:
                await decode_frames(viewer, 5)
            assert await wait_until(lambda: origin_viewers(origin, "simulcast-pool") == 3, 10)
            for viewer in viewers:
                await decode_frames(viewer, len(viewer.video_frames) + 5)
        finally:
            for viewer in viewers:
                await viewer.close()
