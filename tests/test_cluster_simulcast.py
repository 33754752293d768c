"""An edge pulls a simulcast stream as one upstream WHEP session per layer (issue 18).

Real parts, as in test_cluster_edge.py: two whepfan servers on loopback (a plain origin,
an edge with ``--upstream``), whepfan's own simulcast WHIP publisher (three encodings
of a 320x240 pattern: q 80x60, h 160x120, f 320x240) and aiortc viewers that decode.
The edge learns the layers from the origin's SSE ``layers`` event, pins one session to
each (``?rid=`` and the layer POST, EXT §5), and its viewers get the edge's own layer
API and layer policy over those tracks."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from _peers import DecodingViewer, only_loopback_candidates, wait_until
from _server import TOKEN, LiveServer, settings_for
from _signalling import SDP, layer_url_of
from yarl import URL

from whepfan.client.publisher import Publisher, PublisherOptions
from whepfan.cluster.feed import UpstreamFeed
from whepfan.cluster.layer_events import layer_updates
from whepfan.cluster.simulcast import link_targets

VIEW_TOKEN = "origin-view-token"
SIZES = {"q": (80, 60), "h": (160, 120), "f": (320, 240)}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture(scope="module")
def origin() -> Iterator[LiveServer]:
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


def publisher(origin: LiveServer, name: str, *, simulcast: bool = True) -> Publisher:
    # A keyframe every second: a layer switch never waits on a throttled request.
    return Publisher(
        PublisherOptions(
            url=f"{origin.url}/whip/{name}",
            token=TOKEN,
            simulcast=simulcast,
            width=320,
            height=240,
            keyframe_interval=1.0,
        )
    )


def upstream_sessions(origin: LiveServer, name: str) -> dict[str, tuple[str, ...]]:
    """The origin's viewer sessions of ``name`` (the edge's upstream sessions): id ->
    the kinds each receives."""
    assert origin.info is not None
    stream = origin.info.backend.streams.get(name)
    if stream is None:
        return {}
    return {
        session_id: tuple(media.kind for media in session.egress)
        for session_id, session in stream.viewers.items()
    }


def publishing(origin: LiveServer, name: str) -> bool:
    assert origin.info is not None
    stream = origin.info.backend.streams.get(name)
    return stream is not None and stream.active


def edge_layers(edge: LiveServer, name: str) -> list[tuple[str | None, int | None]]:
    """The edge stream's active video tracks, low to high: (rid, measured width)."""
    assert edge.info is not None
    stream = edge.info.backend.streams.get(name)
    if stream is None:
        return []
    return [(track.rid, track.width) for track in stream.layers()]


def three_layers_measured(edge: LiveServer, name: str) -> bool:
    return edge_layers(edge, name) == [("q", 80), ("h", 160), ("f", 320)]


def keyframe_requests(edge: LiveServer, name: str) -> dict[str | None, int]:
    """PLIs the edge sent upstream, by the layer of the session that carried them."""
    assert edge.info is not None
    feed = UpstreamFeed.find(edge.info.backend.router, name)
    assert feed is not None
    return {rid: leg.keyframe_requests_sent for rid, leg in feed.legs.items()}


async def session_gauges(edge: LiveServer) -> dict[str, float]:
    """whepfan_cluster_upstream_sessions by its layer label, from the edge's /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"{edge.url}/metrics") as r:
        text = await r.text()
    pattern = r'^whepfan_cluster_upstream_sessions\{layer="([^"]*)"\} (\S+)$'
    return {layer: float(value) for layer, value in re.findall(pattern, text, re.M)}


async def pulls(edge: LiveServer) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{edge.url}/api/cluster") as r:
        assert r.status == 200
        document: dict[str, dict[str, dict[str, Any]]] = await r.json()
        return document["pulls"]


class EdgeViewer:
    """A decoding WHEP viewer of the edge that keeps its layer URL (EXT §5)."""

    def __init__(self) -> None:
        self.peer = DecodingViewer()
        self.layer_url = ""
        self.links: dict[str, str] = {}

    async def start(self, url: str) -> None:
        offer = await self.peer.offer(["audio", "video"])
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=offer, headers=SDP) as response,
        ):
            assert response.status == 201, await response.text()
            answer = await response.text()
            self.layer_url = str(response.url.join(URL(layer_url_of(response))))
            self.links = link_targets(response.headers.getall("Link", []), url)
        await self.peer.accept(answer)

    async def layer(self, method: str, body: object | None = None) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method,
                self.layer_url,
                data=None if body is None else orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            document: dict[str, Any] = await response.json()
            return document

    def size(self) -> tuple[int, int] | None:
        frames = self.peer.video_frames
        return (frames[-1].width, frames[-1].height) if frames else None

    async def wait_size(self, size: tuple[int, int], timeout: float = 15.0) -> None:
        assert await wait_until(lambda: self.size() == size, timeout), (
            f"decoding {self.size()}, expected {size}"
        )

    async def close(self) -> None:
        await self.peer.close()


@pytest.fixture
async def viewers() -> AsyncIterator[list[EdgeViewer]]:
    made: list[EdgeViewer] = []
    yield made
    await asyncio.gather(*(viewer.close() for viewer in made))


async def test_a_cold_edge_pulls_each_layer_on_its_own_session(
    origin: LiveServer, edge: LiveServer, viewers: list[EdgeViewer]
) -> None:
    async with publisher(origin, "layered"):
        await asyncio.sleep(1.5)  # the origin has measured its layers
        started = time.monotonic()
        viewer = EdgeViewer()
        viewers.append(viewer)
        await viewer.start(f"{edge.url}/whep/layered")
        answered = time.monotonic() - started
        assert await wait_until(lambda: three_layers_measured(edge, "layered"), 15), edge_layers(
            edge, "layered"
        )
        elapsed = time.monotonic() - started
        await wait_until(lambda: bool(viewer.peer.video_frames), 10)
        decoded = time.monotonic() - started
        print(
            f"cold edge: 201 after {answered * 1000:.0f} ms, three layers measured after "
            f"{elapsed * 1000:.0f} ms, first frame decoded after {decoded * 1000:.0f} ms"
        )
        # The edge's policy starts its viewer in the middle (it moves up after 5 s of
        # clean reports: LayerPolicy.up_wait).
        await viewer.wait_size(SIZES["h"], timeout=4)
        sessions = upstream_sessions(origin, "layered")
        assert len(sessions) == 3
        # Audio on one session only; the others were offered video alone.
        assert sorted(sessions.values()) == [("audio", "video"), ("video",), ("video",)]
        pulled = (await pulls(edge))["layered"]
        layers = pulled["layers"]
        assert isinstance(layers, list)
        assert sorted(str(layer["rid"]) for layer in layers) == ["f", "h", "q"]
        assert all(layer["connected"] for layer in layers)
        assert sum(bool(layer["primary"]) for layer in layers) == 1
        assert await session_gauges(edge) == {"q": 1.0, "h": 1.0, "f": 1.0, "": 0.0}

        # Pinned through the edge's own layer API, each viewer gets its layer.
        for rid in ("q", "f"):
            pinned = EdgeViewer()
            viewers.append(pinned)
            await pinned.start(f"{edge.url}/whep/layered")
            status = await pinned.layer("POST", {"rid": rid})
            assert status["automatic"] is False
            await pinned.wait_size(SIZES[rid])
        # The first viewer is automatic: on a clean link the edge's policy moves it up
        # (one layer per 5 s of clean reports).
        status = await viewer.layer("GET")
        assert status["automatic"] is True
        assert [layer["rid"] for layer in status["layers"]] == ["q", "h", "f"]
        await viewer.wait_size(SIZES["f"], timeout=20)
        # The edge's own SSE "layers" event (EXT §4.3.3) lists them, as an origin does.
        async with aiohttp.ClientSession() as http, asyncio.timeout(10):
            async for rids in layer_updates(http, viewer.links, None):
                assert rids == ("q", "h", "f")
                break
        # Still three sessions upstream whatever the edge's viewers do.
        assert len(upstream_sessions(origin, "layered")) == 3
    for made in viewers:
        await made.close()
    viewers.clear()
    # The grace (1 s) after the last viewer: every layer's session goes.
    assert await wait_until(lambda: not upstream_sessions(origin, "layered"), 10)
    assert "layered" not in await pulls(edge)


async def test_a_lost_layer_session_is_pulled_again_alone(
    origin: LiveServer, edge: LiveServer, viewers: list[EdgeViewer]
) -> None:
    async with publisher(origin, "lossy-layer"):
        assert await wait_until(lambda: publishing(origin, "lossy-layer"), 10)
        pinned = EdgeViewer()
        viewers.append(pinned)
        await pinned.start(f"{edge.url}/whep/lossy-layer")
        assert await wait_until(lambda: three_layers_measured(edge, "lossy-layer"), 15)
        await pinned.layer("POST", {"rid": "h"})
        await pinned.wait_size(SIZES["h"])
        # The switch to f asks f's session for a keyframe, and no other.
        asked = keyframe_requests(edge, "lossy-layer")
        await pinned.layer("POST", {"rid": "f"})
        await pinned.wait_size(SIZES["f"])
        now_asked = keyframe_requests(edge, "lossy-layer")
        assert now_asked["f"] > asked["f"]
        assert now_asked["q"] == asked["q"]
        before = upstream_sessions(origin, "lossy-layer")
        assert origin.info is not None
        backend = origin.info.backend
        stream = backend.streams["lossy-layer"]
        (top,) = [
            session_id
            for session_id, choice in stream.choices.items()
            if choice.manual is not None and choice.manual.rid == "f"
        ]
        # The origin ends the session of layer f (DTLS close_notify): only that one is
        # pulled again; the other two flow on.
        origin.loop.call_soon_threadsafe(backend.end_session, top, origin.loop.time(), "deleted")
        assert await wait_until(
            lambda: (
                len(upstream_sessions(origin, "lossy-layer")) == 3
                and top not in upstream_sessions(origin, "lossy-layer")
            ),
            15,
        )
        after = upstream_sessions(origin, "lossy-layer")
        assert set(before) - {top} <= set(after)  # the other layers kept their sessions
        frames = len(pinned.peer.video_frames)
        assert await wait_until(lambda: len(pinned.peer.video_frames) > frames + 10, 15)
        assert pinned.size() == SIZES["f"]
        layers = {layer["rid"]: layer for layer in (await pulls(edge))["lossy-layer"]["layers"]}
        assert layers["f"]["last_error"] == "the server closed DTLS (close_notify)"
        assert layers["q"]["last_error"] is None and layers["h"]["last_error"] is None


async def test_the_edge_follows_the_origin_layers_when_its_publisher_changes(
    origin: LiveServer, edge: LiveServer, viewers: list[EdgeViewer]
) -> None:
    viewer = EdgeViewer()
    viewers.append(viewer)
    async with publisher(origin, "changing", simulcast=False):
        assert await wait_until(lambda: publishing(origin, "changing"), 10)
        await viewer.start(f"{edge.url}/whep/changing")
        await viewer.wait_size((320, 240))
        await asyncio.sleep(1.0)  # the layer watch heard the one layer
        assert len(upstream_sessions(origin, "changing")) == 1
        assert edge_layers(edge, "changing") == [(None, 320)]
    async with publisher(origin, "changing"):
        # Back with three layers: the edge opens the two it lacks.
        assert await wait_until(lambda: len(upstream_sessions(origin, "changing")) == 3, 15)
        assert await wait_until(lambda: three_layers_measured(edge, "changing"), 15)
        frames = len(viewer.peer.video_frames)
        assert await wait_until(lambda: len(viewer.peer.video_frames) > frames + 10, 15)
    async with publisher(origin, "changing", simulcast=False):
        # Back with one: the extra sessions go.
        assert await wait_until(lambda: len(upstream_sessions(origin, "changing")) == 1, 15)
        await viewer.wait_size((320, 240))
        assert [rid for rid, _ in edge_layers(edge, "changing")] == [None]
