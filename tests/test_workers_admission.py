"""Lower-layer admission (``--admit-lower-layer``) with ``--workers 2``: under a packet
budget the third and fourth viewers of a simulcast stream only fit on its lowest layer;
they are admitted there (one on each worker: the publisher's and the relay copy's), held
there against the layer API, counted in ``/metrics``, and the fifth, for which not even
the lowest layer fits, is refused with 503 + Retry-After (RFC 9110 §10.2.3).

The real server (``whepfan.server.run`` via tests/_server.py), a simulcast publisher
(whepfan.client) and aiortc WHEP viewers over HTTP. Plus ``capped_layer_request``, the
rule both the in-process and the pool path apply, on its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from _peers import DecodingViewer, only_loopback_candidates
from _server import LiveServer, settings_for
from _signalling import JSON, SDP, HttpViewer, simulcast_publisher, wait_for
from hypothesis import given
from hypothesis import strategies as st

from whepfan.client.publisher import Publisher
from whepfan.media.layers import LayerRequest, capped_layer_request
from whepfan.workers.capacity import CapacityLedger, CapacityPolicy, LayerCost
from whepfan.workers.in_process import InProcessWorkers
from whepfan.workers.pool import WorkerPool

# ---------------------------------------------------------------------- the capping rule


class _Layer:
    def __init__(self, rid: str) -> None:
        self.rid = rid


LAYERS = [_Layer("q"), _Layer("h"), _Layer("f")]  # low to high, as the router orders them


def test_a_manual_pick_above_the_ceiling_is_held_at_the_ceiling() -> None:
    assert capped_layer_request(LayerRequest(rid="f"), LAYERS, 1) == LayerRequest(
        spatial_layer=1, max_spatial_layer=1
    )
    assert capped_layer_request(LayerRequest(spatial_layer=2), LAYERS, 0) == LayerRequest(
        spatial_layer=0, max_spatial_layer=0
    )


def test_requests_within_the_ceiling_keep_their_choice() -> None:
    assert capped_layer_request(LayerRequest(rid="q"), LAYERS, 1) == LayerRequest(
        rid="q", max_spatial_layer=1
    )
    # Automatic choice (nothing set) stays automatic, under the ceiling.
    assert capped_layer_request(LayerRequest(), LAYERS, 1) == LayerRequest(max_spatial_layer=1)
    assert capped_layer_request(LayerRequest(max_spatial_layer=2), LAYERS, 1) == LayerRequest(
        max_spatial_layer=1
    )
    assert capped_layer_request(LayerRequest(max_spatial_layer=0), LAYERS, 1) == LayerRequest(
        max_spatial_layer=0
    )


def test_a_layer_the_stream_lacks_is_left_for_the_router_to_refuse() -> None:
    assert capped_layer_request(LayerRequest(rid="nope"), LAYERS, 0) == LayerRequest(
        rid="nope", max_spatial_layer=0
    )
    assert capped_layer_request(LayerRequest(spatial_layer=7), LAYERS, 0) == LayerRequest(
        spatial_layer=7, max_spatial_layer=0
    )


@given(
    named=st.none()
    | st.builds(lambda rid: LayerRequest(rid=rid), st.sampled_from(["q", "h", "f", "x"]))
    | st.builds(lambda index: LayerRequest(spatial_layer=index), st.integers(0, 4)),
    max_spatial=st.none() | st.integers(min_value=0, max_value=4),
    ceiling=st.integers(min_value=0, max_value=2),
)
def test_no_capped_request_reaches_above_the_ceiling(
    named: LayerRequest | None, max_spatial: int | None, ceiling: int
) -> None:
    request = replace(named or LayerRequest(), max_spatial_layer=max_spatial)
    capped = capped_layer_request(request, LAYERS, ceiling)
    assert capped.max_spatial_layer is not None and capped.max_spatial_layer <= ceiling
    rids = [layer.rid for layer in LAYERS]
    index = rids.index(capped.rid) if capped.rid in rids else capped.spatial_layer
    if index is not None and index < len(LAYERS):
        assert index <= ceiling  # a layer of the stream above the ceiling is never named


class _LayeredStream:
    live = True

    def layers(self) -> list[_Layer]:
        return LAYERS


class _Session:
    def __init__(self, session_id: str) -> None:
        self.id, self.stream = session_id, "s"


class _RecordingRouter:
    """What InProcessWorkers asks of the router on admission and on the layer API."""

    def __init__(self) -> None:
        self.streams = {"s": _LayeredStream()}
        self.requests: list[tuple[str, LayerRequest]] = []
        self._sessions: dict[str, _Session] = {}

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[_Session, str]:
        session = _Session(f"v{len(self._sessions) + 1}")
        self._sessions[session.id] = session
        return session, "answer"

    def get_session(self, session_id: str) -> _Session:
        return self._sessions[session_id]

    def select_layer(self, session_id: str, request: LayerRequest, now: float) -> dict[str, object]:
        self.requests.append((session_id, request))
        return {}

    def end_session(self, session_id: str, now: float, reason: str) -> bool:
        return self._sessions.pop(session_id, None) is not None


def test_in_process_layer_requests_stay_under_the_admitted_layer() -> None:
    """``--workers 1``: the second viewer fits only on the lowest layer; its later pick of
    the top layer reaches the router as the lowest, while the first viewer's does not."""
    router = _RecordingRouter()
    ledger = CapacityLedger(
        policy=CapacityPolicy(worker_packet_budget=WORKER_PACKET_BUDGET, admit_lower_layer=True)
    )
    ledger.set_stream_layers("s", [TOP, MIDDLE, LOWEST])
    workers = InProcessWorkers(router=router, ledger=ledger)  # type: ignore[arg-type]
    first, _ = workers.view("s", "offer", 0.0)
    second, _ = workers.view("s", "offer", 0.0)
    assert router.requests == [("v2", LayerRequest(max_spatial_layer=0))]
    router.requests.clear()
    workers.select_layer(first.id, LayerRequest(rid="f"), 0.0)
    workers.select_layer(second.id, LayerRequest(rid="f"), 0.0)
    workers.select_layer(second.id, LayerRequest(), 0.0)
    assert router.requests == [
        ("v1", LayerRequest(rid="f")),
        ("v2", LayerRequest(spatial_layer=0, max_spatial_layer=0)),
        ("v2", LayerRequest(max_spatial_layer=0)),
    ]
    # The ceiling leaves with the session.
    workers.end_session(second.id, 0.0)
    assert second.id not in workers.layer_ceilings


# ---------------------------------------------------------------------- two worker processes

STREAM = "cam"
# Pinned layer costs, highest first (what the ledger would measure of a 720p simulcast):
# with 360 packets/s per worker, one top-layer viewer fills most of a worker, a second
# viewer there fits on the lowest layer only, and a third fits nowhere.
TOP = LayerCost(packets_per_second=300.0, bits_per_second=2_000_000.0)
MIDDLE = LayerCost(packets_per_second=200.0, bits_per_second=600_000.0)
LOWEST = LayerCost(packets_per_second=50.0, bits_per_second=150_000.0)
WORKER_PACKET_BUDGET = 360.0


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(
        settings_for(workers="2", worker_packet_budget=WORKER_PACKET_BUDGET, admit_lower_layer=True)
    )
    yield live
    live.close()


@pytest.fixture
async def publisher(server: LiveServer) -> AsyncIterator[Publisher]:
    async with simulcast_publisher(f"{server.url}/whip/{STREAM}") as running:
        yield running


def _pool(server: LiveServer) -> WorkerPool:
    assert server.info is not None
    pool = server.info.backend
    assert isinstance(pool, WorkerPool)
    return pool


def _pin_layer_costs(pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger's layer costs, fixed: measured rates of a 320x240 test pattern drift
    with its content, and this test is about the admission path, not the measurement
    (tests/test_capacity.py covers that)."""
    pool.ledger.set_stream_layers(STREAM, [TOP, MIDDLE, LOWEST])
    ignore: Callable[..., None] = lambda stream, layers: None  # noqa: E731
    monkeypatch.setattr(pool.ledger, "set_stream_layers", ignore)


def _metric(text: str, name: str, labels: str) -> float:
    prefix = f"{name}{{{labels}}} "
    [line] = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line[len(prefix) :])


async def test_lower_layer_admission_caps_viewers_on_both_workers(
    server: LiveServer, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool(server)
    url = f"{server.url}/whep/{STREAM}"

    # Admission caps by the number of video layers the publisher's worker reported.
    async def three_video_layers() -> bool:
        stream = pool.streams.get(STREAM)
        return stream is not None and (
            sum(1 for track in stream.tracks.values() if track.kind == "video") == 3
        )

    await wait_for(three_video_layers)
    _pin_layer_costs(pool, monkeypatch)

    viewers: list[HttpViewer] = []
    async with aiohttp.ClientSession(base_url=server.url) as http:
        try:
            for _ in range(4):
                viewer = HttpViewer()
                viewers.append(viewer)
                await viewer.start(http, url)  # asserts 201
            top, lower = viewers[:2], viewers[2:]
            # Least loaded first: one top-layer viewer per worker, then one lower each.
            assert [pool.worker_of(v.session_id) for v in viewers] == [0, 1, 0, 1]
            assert pool.lower_layer_admissions == 2
            assert dict(pool.ledger.admissions) == {"top_layer": 2, "lower_layer": 2}

            async def layer_state(viewer: HttpViewer) -> dict[str, Any]:
                async with http.get(viewer.layer_url) as response:
                    assert response.status == 200
                    state: dict[str, Any] = await response.json()
                return state

            async def select(viewer: HttpViewer, body: bytes) -> dict[str, Any]:
                async with http.post(viewer.layer_url, data=body, headers=JSON) as response:
                    assert response.status == 200, await response.text()
                    state: dict[str, Any] = await response.json()
                return state

            for viewer in lower:
                # Subscribed (once its DTLS completed) to the lowest layer, "q".
                async def on_lowest(v: HttpViewer = viewer) -> bool:
                    return (await layer_state(v))["rid"] == "q"

                await wait_for(on_lowest)
                # A pick of the top layer, by rid or by index, is held at the cap: no
                # switch is even pending.
                for body in (b'{"rid":"f"}', b'{"spatialLayerId":2}', b'{"maxSpatialLayerId":2}'):
                    state = await select(viewer, body)
                    assert (state["rid"], state["pendingRid"]) == ("q", None), body
                # Back to automatic choice: still under the cap.
                async with http.delete(viewer.layer_url) as response:
                    assert response.status == 200
                    state = await response.json()
                assert state["automatic"] is True
                assert (state["rid"], state["pendingRid"]) == ("q", None)

            # A viewer admitted at the top is not capped: the same request moves it.
            async def keyed() -> bool:
                return (await layer_state(top[1]))["rid"] is not None

            await wait_for(keyed)
            state = await select(top[1], b'{"rid":"f"}')
            assert "f" in (state["rid"], state["pendingRid"])

            # Not even the lowest layer fits on either worker now.
            refused = DecodingViewer()
            try:
                offer = await refused.offer(["video"])
                async with http.post(url, data=offer, headers=SDP) as response:
                    assert response.status == 503
                    assert int(response.headers["Retry-After"]) == pool.ledger.policy.retry_after
                    assert response.content_type == "application/problem+json"
            finally:
                await refused.close()
            assert pool.viewer_count == 4

            async with http.get("/metrics") as response:
                assert response.status == 200
                metrics = await response.text()
            assert _metric(metrics, "whepfan_admissions_total", 'layer="lower"') == 2
            assert _metric(metrics, "whepfan_admissions_total", 'layer="top"') == 2
            assert (
                _metric(metrics, "whepfan_admission_refusals_total", 'reason="worker_budget"') == 1
            )
        finally:
            for viewer in viewers:
                await viewer.close(http)

    # DELETE unregisters at once (WHEP §4.3); the ledger forgets the capped viewers too.
    assert pool.viewer_count == 0 and not pool.ledger.viewer_ids()
