"""A normal teardown: the peer connection closes (DTLS close_notify), then the DELETE.

The media plane ends a session on close_notify at once; the DELETE that follows must
still answer 200 (http/tombstones.py), for ``ended_session_grace`` seconds after the
end, and 404 after that. A DELETE answers 200 once: a second DELETE of the same URL
answers 404, like any DELETE after the one that ended a session.

The tombstones on virtual time, the HTTP resource on a fake clock and a minimal router
(a session "ends" when the test says so), then end to end: aiortc publishers and viewers
against a live server that close before they DELETE.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from _peers import only_loopback_candidates
from _server import TOKEN, LiveServer, live_server
from _signalling import AUTH, SDP, negotiate, placeholder_publisher, recvonly_peer, wait_connected
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from whepfan.errors import Conflict, NotFound
from whepfan.http import COUNTERS_KEY
from whepfan.http.app import error_middleware
from whepfan.http.routes import HttpOptions, WhipWhepResources
from whepfan.http.tombstones import IssuedSession, SessionTombstones

# --- the tombstones, on virtual time ------------------------------------------------------


def record(session_id: str, endpoint: str = "whep", stream: str = "live") -> IssuedSession:
    return IssuedSession(session_id=session_id, endpoint=endpoint, stream=stream)


def take(tombstones: SessionTombstones, session_id: str, now: float) -> IssuedSession | None:
    """A DELETE of the record's own URL (see :func:`record`)."""
    return tombstones.take(session_id, now, endpoint="whep", stream="live")


def test_an_ended_session_is_taken_within_the_grace_period_once() -> None:
    tombstones = SessionTombstones(grace=60.0)
    issued = record("a")
    tombstones.issue(issued)
    assert tombstones.sweep(10.0, is_alive=lambda session_id: True) == 0
    assert tombstones.sweep(11.0, is_alive=lambda session_id: False) == 1
    assert (tombstones.issued, tombstones.tombstones) == (0, 1)
    assert take(tombstones, "a", 70.9) is issued  # 59.9 s after the end
    assert take(tombstones, "a", 70.9) is None  # a DELETE answers 200 once
    assert tombstones.tombstones == 0


def test_the_grace_period_ends_exactly_grace_seconds_after_the_end() -> None:
    tombstones = SessionTombstones(grace=60.0)
    tombstones.issue(record("a"))
    tombstones.issue(record("b"))
    tombstones.sweep(5.0, is_alive=lambda session_id: session_id != "a")
    tombstones.end("b", 30.0)
    assert take(tombstones, "a", 65.0) is None  # expired at 5 + 60
    assert tombstones.tombstones == 1  # and dropped; b's runs to 90
    assert take(tombstones, "b", 89.5) is not None


def test_expiry_is_lazy_on_any_call_and_frees_the_entries() -> None:
    tombstones = SessionTombstones(grace=60.0)
    for index in range(100):
        tombstones.issue(record(f"s{index}"))
        tombstones.end(f"s{index}", float(index))
    # Each end also expires what ended 60 s before it: at 99, those of 0..39.
    assert tombstones.tombstones == 60
    tombstones.sweep(100.0, is_alive=lambda session_id: True)  # ...and at 100, that of 40
    assert tombstones.tombstones == 59
    assert take(tombstones, "s99", 200.0) is None
    assert tombstones.tombstones == 0


def test_a_session_gone_since_the_last_sweep_is_ended_by_its_delete() -> None:
    tombstones = SessionTombstones(grace=60.0)
    issued = record("a")
    tombstones.issue(issued)
    # The HTTP layer asks only once the router has no such session.
    assert take(tombstones, "a", 3.0) is issued
    assert (tombstones.issued, tombstones.tombstones) == (0, 0)


def test_a_delete_under_another_url_takes_nothing() -> None:
    tombstones = SessionTombstones(grace=60.0)
    issued = record("a")
    tombstones.issue(issued)
    tombstones.end("a", 1.0)
    assert tombstones.take("a", 2.0, endpoint="whip", stream="live") is None
    assert tombstones.take("a", 2.0, endpoint="whep", stream="other") is None
    assert take(tombstones, "a", 2.0) is issued


def test_a_deleted_session_leaves_no_tombstone_and_no_record() -> None:
    tombstones = SessionTombstones(grace=60.0)
    tombstones.issue(record("a"))
    tombstones.forget("a")
    assert tombstones.sweep(1.0, is_alive=lambda session_id: False) == 0
    assert take(tombstones, "a", 1.0) is None
    assert (tombstones.issued, tombstones.tombstones) == (0, 0)


def test_capacity_bounds_the_tombstones_oldest_first() -> None:
    tombstones = SessionTombstones(grace=60.0, capacity=3)
    for index in range(5):
        tombstones.issue(record(f"s{index}"))
    tombstones.sweep(1.0, is_alive=lambda session_id: False)
    assert tombstones.tombstones == 3
    assert take(tombstones, "s0", 2.0) is None and take(tombstones, "s1", 2.0) is None
    assert [take(tombstones, f"s{index}", 2.0) is not None for index in (2, 3, 4)] == [True] * 3


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        SessionTombstones(grace=-1.0)
    with pytest.raises(ValueError):
        SessionTombstones(capacity=0)


# --- the HTTP resource, on a fake clock ---------------------------------------------------


class Kind(enum.Enum):
    PUBLISHER = "publisher"
    VIEWER = "viewer"


@dataclass
class Ice:
    remote_ufrag: str | None = "remote"


@dataclass(eq=False)
class Session:
    id: str
    kind: Kind
    stream: str
    etag: str = '"1"'
    ice: Ice = field(default_factory=Ice)


@dataclass
class Stream:
    publisher: Session | None = None

    @property
    def live(self) -> bool:
        return self.publisher is not None


class EndingRouter:
    """Just what WhipWhepResources calls for POST and DELETE; ``media_end`` plays the media
    plane ending a session on its own (close_notify, consent lost)."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.streams: dict[str, Stream] = {}
        self.ended: list[tuple[str, str]] = []
        self._next = 0

    @property
    def viewer_count(self) -> int:
        return sum(session.kind is Kind.VIEWER for session in self.sessions.values())

    def _new(self, kind: Kind, stream: str) -> Session:
        self._next += 1
        session = Session(id=f"session-{self._next:016d}", kind=kind, stream=stream)
        self.sessions[session.id] = session
        return session

    def publish(self, stream_name: str, offer_text: str, now: float) -> tuple[Session, str]:
        current = self.streams.get(stream_name)
        publisher = current.publisher if current is not None else None
        if publisher is not None and publisher.id in self.sessions:
            raise Conflict("the stream already has a publisher")
        session = self._new(Kind.PUBLISHER, stream_name)
        self.streams[stream_name] = Stream(publisher=session)
        return session, "v=0\r\n"

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[Session, str]:
        return self._new(Kind.VIEWER, stream_name), "v=0\r\n"

    def get_session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound("no such session")
        return session

    def end_session(self, session_id: str, now: float, reason: str = "deleted") -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self.ended.append((session_id, reason))
        return True

    def media_end(self, session_id: str) -> None:
        self.end_session(session_id, 0.0, "dtls-closed")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    client: TestClient
    router: EndingRouter
    clock: FakeClock
    resources: WhipWhepResources

    async def post(self, endpoint: str, stream: str = "live") -> str:
        response = await self.client.post(
            f"/{endpoint}/{stream}", data="v=0\r\n", headers={**AUTH, **SDP}
        )
        assert response.status == 201, await response.text()
        return response.headers["Location"]

    async def delete(self, location: str) -> int:
        async with self.client.delete(location, headers=AUTH) as response:
            return response.status


def resource_app(resources: WhipWhepResources) -> web.Application:
    """The WHIP/WHEP resources alone, with create_app's error middleware (and the error
    counters it keeps): the test holds ``resources`` to run its sweep."""
    app = web.Application(middlewares=[error_middleware])
    app[COUNTERS_KEY] = Counter()
    resources.add_routes(app)
    return app


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    router = EndingRouter()
    clock = FakeClock()
    resources = WhipWhepResources(
        router=router,  # type: ignore[arg-type]
        clock=clock,
        options=HttpOptions(publish_token=TOKEN, ended_session_grace=60.0),
    )
    app = resource_app(resources)
    async with TestClient(TestServer(app)) as client:
        yield Harness(client, router, clock, resources)


def session_id_of(location: str) -> str:
    return location.rsplit("/", 1)[1]


@pytest.mark.parametrize("endpoint", ["whip", "whep"])
async def test_delete_after_a_media_end_is_200_for_the_grace_period_then_404(
    harness: Harness, endpoint: str
) -> None:
    early = await harness.post(endpoint, stream="one")
    late = await harness.post(endpoint, stream="two")
    harness.router.media_end(session_id_of(early))
    harness.router.media_end(session_id_of(late))
    assert harness.resources.sweep_ended_sessions() == 2  # both ended at 1000.0
    harness.clock.now += 59.9
    assert await harness.delete(early) == 200
    assert await harness.delete(early) == 404  # the second DELETE
    harness.clock.now += 0.1  # 60 s after the end
    assert await harness.delete(late) == 404
    # The resource's own DELETE never reached the router for sessions already gone.
    assert [reason for _, reason in harness.router.ended] == ["dtls-closed", "dtls-closed"]


async def test_delete_right_after_the_end_needs_no_sweep(harness: Harness) -> None:
    location = await harness.post("whep")
    harness.router.media_end(session_id_of(location))
    assert await harness.delete(location) == 200
    assert await harness.delete(location) == 404


async def test_a_live_session_deleted_twice_is_200_then_404(harness: Harness) -> None:
    location = await harness.post("whep")
    assert await harness.delete(location) == 200
    assert harness.router.ended == [(session_id_of(location), "deleted")]
    assert harness.resources.sweep_ended_sessions() == 0
    assert await harness.delete(location) == 404
    assert (harness.resources.tombstones.issued, harness.resources.tombstones.tombstones) == (0, 0)


async def test_a_tombstone_answers_only_under_its_own_endpoint_and_stream(
    harness: Harness,
) -> None:
    location = await harness.post("whep", stream="one")
    harness.router.media_end(session_id_of(location))
    for other in (location.replace("/whep/", "/whip/"), location.replace("/one/", "/two/")):
        assert await harness.delete(other) == 404
    assert await harness.delete(location) == 200


async def test_a_tombstoned_delete_still_needs_the_credential(harness: Harness) -> None:
    location = await harness.post("whip")
    harness.router.media_end(session_id_of(location))
    async with harness.client.delete(location) as response:
        assert response.status == 401
    assert await harness.delete(location) == 200


async def test_a_replaced_publisher_answers_its_delete_with_200() -> None:
    router = EndingRouter()
    resources = WhipWhepResources(
        router=router,  # type: ignore[arg-type]
        clock=FakeClock(),
        options=HttpOptions(publish_token=TOKEN, publisher_takeover=True),
    )
    app = resource_app(resources)
    async with TestClient(TestServer(app)) as client:
        harness = Harness(client, router, FakeClock(), resources)
        first, second = await harness.post("whip"), await harness.post("whip")
        assert router.ended == [(session_id_of(first), "taken-over")]
        assert await harness.delete(first) == 200
        assert await harness.delete(second) == 200


# --- end to end: aiortc peers that close before they DELETE --------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = live_server()
    yield live
    live.close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


async def wait_gone(http: aiohttp.ClientSession, location: str) -> None:
    """Until the session URL answers 404 to GET: the media plane ended the session."""
    for _ in range(100):
        async with http.get(location) as response:
            if response.status == 404:
                return
            assert response.status == 204
        await asyncio.sleep(0.1)
    raise AssertionError(f"{location} still exists")


async def test_aiortc_publisher_and_viewer_close_first_then_delete_200(
    server: LiveServer,
) -> None:
    async with aiohttp.ClientSession(base_url=server.url) as http:
        publisher = placeholder_publisher()
        published = await negotiate(http, publisher, "/whip/teardown", AUTH)
        viewer = recvonly_peer()
        viewed = await negotiate(http, viewer, "/whep/teardown")
        await wait_connected(publisher)
        await wait_connected(viewer)
        for pc, response, headers in ((viewer, viewed, {}), (publisher, published, AUTH)):
            location = response.headers["Location"]
            await pc.close()  # close_notify (RFC 5246 §7.2.1) ends the session first
            await wait_gone(http, location)
            async with http.delete(location, headers=headers) as deleted:
                assert deleted.status == 200, await deleted.text()
            async with http.delete(location, headers=headers) as again:
                assert again.status == 404
