"""The stream status API: the rate meter on virtual time, the summary arithmetic over a
router double, the resources over the real router, and measured bitrates end to end
(aiortc publisher and viewer through ``whepfan.server.run``)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from _paths import SDP_FIXTURES
from _peers import only_loopback_candidates
from _server import LiveServer, media_worker, settings_for
from _signalling import SDP, bearer, negotiate, placeholder_publisher, recvonly_peer
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from whepfan.http import HttpOptions, create_app
from whepfan.http.events import EventHub, ObservedSession
from whepfan.http.status import STREAM_STATUS_KEY, RateMeter, StreamStatus
from whepfan.media.transport import MediaWorker

WHIP_OFFER = (SDP_FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
WHEP_OFFER = (SDP_FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()
TOKEN = "status-token"
AUTH = bearer(TOKEN)


# ---------------------------------------------------------------------------- rate meter


def test_rate_is_unknown_until_two_samples() -> None:
    meter = RateMeter()
    assert meter.rate("a") is None
    meter.sample("a", 1000, 10.0)
    assert meter.rate("a") is None
    meter.sample("a", 126_000, 11.0)
    assert meter.rate("a") == 1_000_000.0  # 125,000 bytes in one second


def test_a_counter_that_goes_back_is_a_new_source() -> None:
    meter = RateMeter()
    meter.sample("a", 50_000, 0.0)
    meter.sample("a", 100_000, 1.0)
    meter.sample("a", 10, 2.0)  # the track was replaced: no negative rate
    assert meter.rate("a") is None
    meter.sample("a", 1010, 3.0)
    assert meter.rate("a") == 8000.0


def test_retain_forgets_vanished_sources() -> None:
    meter = RateMeter()
    for now in (0.0, 1.0):
        meter.sample("kept", int(now * 100), now)
        meter.sample("gone", int(now * 100), now)
    meter.retain({"kept"})
    assert meter.rate("kept") == 800.0 and meter.rate("gone") is None
    meter.sample("gone", 500, 2.0)
    assert meter.rate("gone") is None  # starts over


@given(
    st.lists(
        st.tuples(st.floats(min_value=0.001, max_value=10.0), st.integers(0, 10**7)),
        min_size=2,
        max_size=30,
    )
)
def test_rate_is_the_last_interval(steps: list[tuple[float, int]]) -> None:
    meter = RateMeter()
    now, total = 0.0, 0
    history = [(now, total)]
    meter.sample("k", total, now)
    for gap, grown in steps:
        now += gap
        total += grown
        meter.sample("k", total, now)
        history.append((now, total))
    (then, before), (last, after) = history[-2], history[-1]
    rate = meter.rate("k")
    assert rate is not None
    assert rate == pytest.approx((after - before) * 8 / (last - then))


# ---------------------------------------------------------------------------- summaries


class State(enum.Enum):
    CONNECTED = "connected"


@dataclass
class FakeTrack:
    fanout_id: int
    kind: str
    codec_name: str
    clock_rate: int
    packets: int = 0
    octets: int = 0


@dataclass
class FakePublisher:
    state: State = State.CONNECTED
    connected_at: float | None = 90.0


@dataclass
class FakeViewer:
    fanout_slot: int | None
    track_by_ssrc: dict[int, int]


@dataclass
class FakeStream:
    tracks: dict[str, FakeTrack] | dict[str, list[FakeTrack]]
    viewers: dict[str, FakeViewer] = field(default_factory=dict)
    publisher: FakePublisher | None = field(default_factory=FakePublisher)
    active: bool = True

    @property
    def live(self) -> bool:
        return self.publisher is not None


@dataclass
class FakeFanout:
    bytes_sent: int = 0

    def stats(self) -> dict[str, int]:
        return {"bytes_sent": self.bytes_sent}


@dataclass
class FakeRouter:
    streams: dict[str, FakeStream]
    fanout: FakeFanout = field(default_factory=FakeFanout)
    listeners: list[object] = field(default_factory=list)

    def add_listener(self, listener: object) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: object) -> None:
        self.listeners.remove(listener)

    def get_session(self, session_id: str) -> ObservedSession:
        raise AssertionError("not used")


def test_egress_is_each_tracks_rate_times_its_connected_subscribers() -> None:
    audio = FakeTrack(1, "audio", "opus", 48000)
    video = FakeTrack(2, "video", "VP8", 90000)
    stream = FakeStream(
        tracks={"audio": audio, "video": video},
        viewers={
            "a": FakeViewer(0, {11: 1, 12: 2}),
            "b": FakeViewer(1, {21: 1, 22: 2, 23: 2}),  # video + its RTX ssrc: one track
            "c": FakeViewer(2, {31: 1}),  # audio only
            "d": FakeViewer(None, {}),  # not connected yet
        },
    )
    router = FakeRouter({"show": stream})
    hub = EventHub(router=router)
    layers: dict[str, object] = {"1": [{"rid": "f", "bitrate": 1_000_000}]}
    hub.publish("show", "layers", layers)
    status = StreamStatus(router=router, clock=lambda: 100.0, hub=hub)
    status.sample(10.0)
    audio.octets, video.octets, router.fanout.bytes_sent = 4_000, 125_000, 1_000_000
    audio.packets, video.packets = 50, 120
    status.sample(11.0)
    summary = status.summary("show", stream, 100.0)
    assert summary == {
        "name": "show",
        "live": True,
        "active": True,
        "publisher": {"state": "connected", "connected_for": 10.0},
        "codecs": ["audio/opus", "video/VP8"],
        "tracks": [
            {
                "kind": "audio",
                "codec": "opus",
                "clock_rate": 48000,
                "packets": 50,
                "octets": 4000,
                "bitrate": 32_000,
                "viewers": 3,
            },
            {
                "kind": "video",
                "codec": "VP8",
                "clock_rate": 90000,
                "packets": 120,
                "octets": 125_000,
                "bitrate": 1_000_000,
                "viewers": 2,
            },
        ],
        "layers": layers,
        "viewers": 4,
        "connected_viewers": 3,
        "ingress_bitrate": 1_032_000,
        "egress_bitrate": 3 * 32_000 + 2 * 1_000_000,
    }
    assert status.meter.rate("fanout") == 8_000_000.0


def test_a_stream_without_publisher_or_samples_reports_nulls() -> None:
    stream = FakeStream(tracks={"video": FakeTrack(1, "video", "H264", 90000)}, publisher=None)
    stream.active = False
    status = StreamStatus(router=FakeRouter({"s": stream}), clock=lambda: 0.0)
    summary = status.summary("s", stream, 0.0)
    assert summary["publisher"] is None and summary["live"] is False
    assert summary["tracks"][0]["bitrate"] is None  # type: ignore[index]
    assert summary["layers"] == {} and summary["egress_bitrate"] == 0


def test_simulcast_tracks_are_listed_one_per_encoding() -> None:
    low, high = FakeTrack(3, "video", "VP8", 90000), FakeTrack(4, "video", "VP8", 90000)
    stream = FakeStream(
        tracks={"video": [low, high]},
        viewers={
            "a": FakeViewer(0, {1: 3}),
            "b": FakeViewer(1, {2: 4}),
            "c": FakeViewer(2, {3: 4}),
        },
    )
    router = FakeRouter({"s": stream})
    status = StreamStatus(router=router, clock=lambda: 0.0)
    status.sample(0.0)
    low.octets, high.octets = 20_000, 100_000
    status.sample(2.0)
    summary = status.summary("s", stream, 2.0)
    assert summary["codecs"] == ["video/VP8"]
    assert [(t["bitrate"], t["viewers"]) for t in summary["tracks"]] == [  # type: ignore[attr-defined]
        (80_000, 1),
        (400_000, 2),
    ]
    assert summary["egress_bitrate"] == 80_000 + 2 * 400_000


# ---------------------------------------------------------------------------- resources


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture
async def worker() -> AsyncIterator[MediaWorker]:
    async with media_worker() as media:
        yield media


async def _client(worker: MediaWorker, **options: str) -> TestClient:
    app = create_app(
        router=worker.router,
        clock=worker.now,
        options=HttpOptions(publish_token=TOKEN, **options),  # type: ignore[arg-type]
    )
    return TestClient(TestServer(app))


async def test_listing_and_detail_over_the_real_router(worker: MediaWorker) -> None:
    async with await _client(worker) as client:
        listing = await (await client.get("/api/streams")).json()
        assert listing["streams"] == [] and listing["viewers"] == 0
        assert (
            await client.post("/whip/b", data=WHIP_OFFER, headers={**AUTH, **SDP})
        ).status == 201
        assert (
            await client.post("/whip/a", data=WHIP_OFFER, headers={**AUTH, **SDP})
        ).status == 201
        assert (await client.post("/whep/a", data=WHEP_OFFER, headers=SDP)).status == 201
        response = await client.get("/api/streams")
        assert response.headers["Cache-Control"] == "no-store"
        listing = await response.json()
        # The index page reads name/live per stream and the total viewers.
        assert [s["name"] for s in listing["streams"]] == ["a", "b"]
        assert listing["viewers"] == 1
        detail = await (await client.get("/api/streams/a")).json()
        assert detail == listing["streams"][0]
        assert detail["live"] is True and detail["active"] is False  # not connected yet
        assert detail["publisher"] == {"state": "new", "connected_for": None}
        # The codecs the router picked from the Chromium fixture offer.
        assert detail["codecs"] == ["audio/opus", "video/VP8"]
        assert detail["viewers"] == 1 and detail["connected_viewers"] == 0
        # No session id anywhere: a session URL is the capability to end it.
        for session_id in worker.router.sessions:
            assert session_id not in await (await client.get("/api/streams")).text()
        response = await client.get("/api/streams/nothing-here")
        assert response.status == 404
        assert response.headers["Content-Type"] == "application/problem+json"
        assert client.app[STREAM_STATUS_KEY].router is worker.router


async def test_the_view_token_guards_the_listing(worker: MediaWorker) -> None:
    async with await _client(worker, view_token="watch") as client:
        assert (await client.get("/api/streams")).status == 401
        assert (await client.get("/api/streams/a")).status == 401
        ok = await client.get("/api/streams", headers={"Authorization": "Bearer watch"})
        assert ok.status == 200


# ---------------------------------------------------------------------------- end to end


@pytest.fixture
def server() -> Iterator[LiveServer]:
    live = LiveServer(settings_for(token=TOKEN, log_level="info"))
    yield live
    live.close()


async def test_bitrates_are_measured_from_real_media(server: LiveServer) -> None:
    publisher = placeholder_publisher()
    viewer = recvonly_peer()
    try:
        async with aiohttp.ClientSession(base_url=server.url) as http:
            await negotiate(http, publisher, "/whip/cam", AUTH)
            await negotiate(http, viewer, "/whep/cam")
            detail: dict[str, Any] = {}
            for _ in range(200):  # the sampler runs once a second
                detail = await (await http.get("/api/streams/cam")).json()
                tracks = detail["tracks"]
                assert isinstance(tracks, list)
                if (
                    detail["connected_viewers"] == 1
                    and all(t["bitrate"] and t["viewers"] == 1 for t in tracks)
                    and detail["egress_bitrate"]
                ):
                    break
                await asyncio.sleep(0.05)
            print("measured status:", detail)
            assert detail["active"] is True
            assert detail["publisher"]["state"] == "connected"
            assert detail["connected_viewers"] == 1
            # One viewer: egress is the ingested payload rate, once.
            assert detail["egress_bitrate"] == detail["ingress_bitrate"] > 0
            listing = await (await http.get("/api/streams")).json()
            assert listing["egress_bitrate"] > 0  # the Fanout's own byte counter
    finally:
        await viewer.close()
        await publisher.close()
