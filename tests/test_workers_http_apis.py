"""The layer API (EXT §5) and the status API with ``--workers 2``: the real server
(``whepfan.server.run`` via tests/_server.py), a simulcast publisher (whepfan.client), and
aiortc WHEP viewers placed on both workers. Plus the main process's pieces on their own:
the layer request's control-channel form, the added-up Fanout counters, and a stream's
viewer counts from the workers' reports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from _peers import only_loopback_candidates
from _server import LiveServer, settings_for
from _signalling import (
    JSON,
    SDP,
    HttpViewer,
    local_offer,
    recvonly_peer,
    simulcast_publisher,
    wait_for,
)
from hypothesis import given
from hypothesis import strategies as st

from whepfan.client.publisher import Publisher
from whepfan.errors import ParseError
from whepfan.media.layers import LayerRequest
from whepfan.media.session import SessionKind, SessionState
from whepfan.workers.control import layer_request_from_json as _layer_request_from_json
from whepfan.workers.control import layer_request_json as _layer_request_json
from whepfan.workers.pool import PoolFanoutStats, ProxyIce, ProxySession, ProxyStream

# ---------------------------------------------------------------------- main-process pieces

optional_int = st.none() | st.integers(min_value=0, max_value=2**31)
optional_text = st.none() | st.text(min_size=1, max_size=8)


@given(
    request=st.builds(
        LayerRequest,
        media_id=optional_text,
        rid=optional_text,
        spatial_layer=optional_int,
        temporal_layer=optional_int,
        max_spatial_layer=optional_int,
        max_temporal_layer=optional_int,
        max_width=optional_int,
        max_height=optional_int,
    )
)
def test_layer_request_round_trips_over_the_control_channel(request: LayerRequest) -> None:
    import orjson

    wire = orjson.loads(orjson.dumps(_layer_request_json(request)))
    assert _layer_request_from_json(wire) == request


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists))
def test_layer_request_from_json_fuzz(value: object) -> None:
    try:
        request = _layer_request_from_json(value)
    except ParseError:
        assert not isinstance(value, dict)
        return
    assert isinstance(request, LayerRequest)


def test_pool_fanout_totals_survive_a_replaced_worker() -> None:
    totals = PoolFanoutStats()
    totals.update(0, pid=10, counters={"bytes_sent": 1000})
    totals.update(1, pid=11, counters={"bytes_sent": 500})
    totals.update(0, pid=10, counters={"bytes_sent": 1600})
    assert totals.stats()["bytes_sent"] == 2100
    # Worker 1 was replaced (new pid): its counters start again from zero.
    totals.update(1, pid=12, counters={"bytes_sent": 40})
    assert totals.stats()["bytes_sent"] == 2140
    totals.update(1, pid=12, counters={"bytes_sent": 100})
    assert totals.stats()["bytes_sent"] == 2200


def test_proxy_stream_adds_up_the_workers_viewer_reports() -> None:
    publisher = ProxySession(
        id="p",
        kind=SessionKind.PUBLISHER,
        stream="s",
        etag='"e"',
        ice=ProxyIce(None),
        worker=1,
    )
    stream = ProxyStream(name="s", origin=1, publisher=publisher)
    tracks = [
        ["audio/0", "audio", "opus", 48000, 10, 1000],
        ["video/0", "video", "VP8", 90000, 5, 900],
    ]
    stream.report(
        1,
        {
            "connected": 2,
            "subscribers": {"audio/0": 2, "video/0": 1},
            "publisher": {"state": "connected", "connected_for": 3.0},
            "tracks": tracks,
        },
        now=100.0,
    )
    # A relay copy's worker reports its viewers only; its publisher is a stand-in.
    stream.report(0, {"connected": 3, "subscribers": {"audio/0": 3, "video/0": 3}}, now=100.0)
    assert publisher.state is SessionState.CONNECTED and publisher.connected_at == 97.0
    assert [t.codec_name for t in stream.tracks.values()] == ["opus", "VP8"]
    connected, subscribers = stream.subscriptions()
    assert connected == 5
    assert dict(subscribers) == {0: 5, 1: 4}


# ---------------------------------------------------------------------- two worker processes

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(settings_for(workers="2"))
    yield live
    live.close()


@pytest.fixture
async def publisher(server: LiveServer) -> AsyncIterator[Publisher]:
    async with simulcast_publisher(f"{server.url}/whip/layers") as running:
        yield running


async def _viewers_on_both_workers(
    server: LiveServer, http: aiohttp.ClientSession, url: str
) -> list[HttpViewer]:
    """Least-loaded placement alternates workers; add viewers until both have some."""
    assert server.info is not None
    pool = server.info.backend
    viewers: list[HttpViewer] = []
    while len(viewers) < 4:
        viewer = HttpViewer()
        viewers.append(viewer)
        await viewer.start(http, url)
        if len(viewers) >= 2 and {pool.worker_of(v.session_id) for v in viewers} == {0, 1}:
            return viewers
    raise AssertionError("viewers were not placed on both workers")


async def test_layer_api_on_both_workers(server: LiveServer, publisher: Publisher) -> None:
    url = f"{server.url}/whep/layers"
    async with aiohttp.ClientSession(base_url=server.url) as http:
        viewers = await _viewers_on_both_workers(server, http, url)
        try:
            for viewer in viewers:
                # Every layer known on the viewer's worker (origin or relay copy).
                async def layers_known(v: HttpViewer = viewer) -> bool:
                    async with http.get(v.layer_url) as response:
                        assert response.status == 200
                        state = await response.json()
                    return [layer["rid"] for layer in state["layers"]] == ["q", "h", "f"]

                await wait_for(layers_known)

                async with http.post(viewer.layer_url, data=b'{"rid":"nope"}', headers=JSON) as r:
                    assert r.status == 400
                    assert r.content_type == "application/problem+json"
                    problem = await r.json()
                    assert problem["status"] == 400 and "nope" in problem["detail"]

                async with http.post(viewer.layer_url, data=b'{"rid":"f"}', headers=JSON) as r:
                    assert r.status == 200
                    state = await r.json()
                assert state["automatic"] is False
                assert "f" in (state["rid"], state["pendingRid"])

                # The switch completes on the layer's next keyframe (asked for at once).
                async def switched(v: HttpViewer = viewer) -> bool:
                    async with http.get(v.layer_url) as response:
                        state = await response.json()
                    return state["rid"] == "f" and state["automatic"] is False

                await wait_for(switched)

                async with http.delete(viewer.layer_url) as r:
                    assert r.status == 200
                    assert (await r.json())["automatic"] is True
                async with http.get(viewer.layer_url) as r:
                    assert (await r.json())["automatic"] is True
        finally:
            for viewer in viewers:
                await viewer.close(http)


async def test_an_unknown_initial_rid_is_a_400_that_leaves_no_session(
    server: LiveServer, publisher: Publisher
) -> None:
    assert server.info is not None
    pool = server.info.backend
    before = pool.viewer_count
    pc = recvonly_peer(["video"])
    try:
        offer = await local_offer(pc)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{server.url}/whep/layers?rid=nope", data=offer, headers=SDP) as response,
        ):
            assert response.status == 400
            assert response.content_type == "application/problem+json"
        assert pool.viewer_count == before
    finally:
        await pc.close()


async def test_status_api_adds_up_both_workers(server: LiveServer, publisher: Publisher) -> None:
    url = f"{server.url}/whep/layers"
    async with aiohttp.ClientSession(base_url=server.url) as http:
        viewers = await _viewers_on_both_workers(server, http, url)
        try:
            total = len(viewers)

            async def listing() -> dict[str, Any]:
                async with http.get("/api/streams") as response:
                    assert response.status == 200
                    body: dict[str, Any] = await response.json()
                return body

            async def settled() -> bool:
                body = await listing()
                streams = {s["name"]: s for s in body["streams"]}
                summary = streams.get("layers")
                return (
                    summary is not None
                    and summary["connected_viewers"] == total
                    and summary["egress_bitrate"] > 0
                    # Measured: the origin re-sends "layers" every 5 s (EXT §4.3.3).
                    and all(
                        layer["bitrate"] > 0
                        for layers in summary["layers"].values()
                        for layer in layers
                    )
                    and bool(summary["layers"])
                    and body["egress_bitrate"] is not None
                    and body["egress_bitrate"] > 0
                )

            await wait_for(settled, timeout=20.0)
            body = await listing()
            assert body["viewers"] == total
            summary = next(s for s in body["streams"] if s["name"] == "layers")
            assert summary["live"] is True and summary["active"] is True
            assert summary["viewers"] == total
            assert summary["publisher"]["state"] == "connected"
            assert summary["publisher"]["connected_for"] > 0
            assert summary["codecs"] == ["audio/opus", "video/VP8"]
            video = [t for t in summary["tracks"] if t["kind"] == "video"]
            assert len(video) == 3  # one track per simulcast encoding
            assert sum(t["viewers"] for t in video) >= total
            assert all(t["packets"] > 0 for t in summary["tracks"])
            # The layers event of the publisher's worker, keyed by m-line index (EXT §4.3.3).
            [layers] = summary["layers"].values()
            assert [layer["rid"] for layer in layers] == ["q", "h", "f"]
            assert all(layer["bitrate"] > 0 for layer in layers)
            assert [(layer["width"], layer["height"]) for layer in layers] == [
                (80, 60),
                (160, 120),
                (320, 240),
            ]
            async with http.get("/api/streams/layers") as response:
                assert response.status == 200
                detail = await response.json()
            assert detail["name"] == "layers" and detail["viewers"] == total
            async with http.get("/api/streams/none-such") as response:
                assert response.status == 404
        finally:
            for viewer in viewers:
                await viewer.close(http)
