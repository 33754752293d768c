"""The server-sent events extension (EXT §4, spec notes §4.2): wire format, coalescing on
virtual time, the hub's queues, the HTTP resources over the real router, an aiohttp SSE
client against ``whepfan.server.run`` with aiortc peers, and the cost of idle readers."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from _paths import SDP_FIXTURES
from _peers import only_loopback_candidates
from _server import LiveServer, media_worker, settings_for
from _signalling import (
    JSON,
    SDP,
    bearer,
    negotiate,
    placeholder_publisher,
    recvonly_peer,
    wait_connected,
)
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from whepfan import _fastpath
from whepfan.errors import ParseError
from whepfan.http import HttpOptions, create_app
from whepfan.http.events import (
    EVENT_HUB_KEY,
    EVENT_TYPES,
    EVENTS_REL,
    Coalescer,
    EventHub,
    EventOptions,
    encode_event,
    link_value,
    parse_subscription,
)
from whepfan.http.status import stream_tracks
from whepfan.media.streams import StreamEvent
from whepfan.media.transport import MediaWorker

WHEP_OFFER = (SDP_FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()
WHIP_OFFER = (SDP_FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
TOKEN = "events-token"
AUTH = bearer(TOKEN)
LINK = re.compile(r'<([^>]+)>; rel="([^"]+)"(?:; events="([^"]*)")?')


# ---------------------------------------------------------------------------- SSE client


def parse_event_stream(text: str) -> tuple[list[tuple[str, str]], int]:
    """A WHATWG HTML §9.2.6 event-stream reader (the subset EventSource uses): events as
    (type, data) and the number of comment lines."""
    events: list[tuple[str, str]] = []
    comments = 0
    event_type = "message"
    data: list[str] = []
    for line in re.split(r"\r\n|\r|\n", text):
        if not line:
            if data:
                events.append((event_type, "\n".join(data)))
            event_type, data = "message", []
        elif line.startswith(":"):
            comments += 1
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event_type = value
            elif name == "data":
                data.append(value)
    return events, comments


@dataclass(eq=False)
class SseClient:
    """Reads an event stream in the background into a queue of (type, JSON data)."""

    response: aiohttp.ClientResponse
    events: asyncio.Queue[tuple[str, object]] = field(default_factory=asyncio.Queue)
    comments: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> SseClient:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        buffer = ""
        try:
            async for chunk in self.response.content.iter_any():
                buffer += chunk.decode()
                complete, _, buffer = buffer.rpartition("\n\n")
                if complete:
                    events, comments = parse_event_stream(complete + "\n\n")
                    self.comments += comments
                    for event_type, data in events:
                        self.events.put_nowait((event_type, orjson.loads(data)))
        except (aiohttp.ClientError, asyncio.CancelledError):
            pass
        finally:
            self.ended.set()

    async def next(self, timeout: float = 10.0) -> tuple[str, object]:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.response.close()


def sse_links(response: aiohttp.ClientResponse) -> dict[str, tuple[str, str | None]]:
    links = {}
    for value in response.headers.getall("Link", []):
        match = LINK.fullmatch(value)
        if match:
            links[match.group(2)] = (match.group(1), match.group(3))
    return links


# ---------------------------------------------------------------------------- wire format


def test_subscription_accepts_advertised_names() -> None:
    assert parse_subscription(b'["active","viewercount"]') == {"active", "viewercount"}
    assert parse_subscription(b'["layers","layers"]') == {"layers"}
    assert parse_subscription(orjson.dumps(list(EVENT_TYPES))) == set(EVENT_TYPES)


@pytest.mark.parametrize(
    "body",
    [
        b'["active","scte35"]',  # a real EXT event this server does not advertise
        b'["bogus"]',
        b"[]",
        b'"active"',
        b'{"events":["active"]}',
        b"[1]",
        b"[null]",
        b"not json",
        b"",
    ],
)
def test_subscription_rejects_anything_else(body: bytes) -> None:
    with pytest.raises(ParseError):
        parse_subscription(body)


def test_subscription_checks_against_the_advertised_list() -> None:
    with pytest.raises(ParseError, match="reconnect"):
        parse_subscription(b'["reconnect"]', advertised=("active", "inactive"))


@given(st.binary(max_size=200))
def test_subscription_parser_fuzz(body: bytes) -> None:
    try:
        names = parse_subscription(body)
    except ParseError:
        return
    assert names and names <= set(EVENT_TYPES)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(st.sampled_from(EVENT_TYPES), st.dictionaries(st.text(max_size=8), JSON_VALUES))
def test_encoded_events_read_back_with_data_on_one_line(
    event_type: str, data: dict[str, object]
) -> None:
    frame = encode_event(event_type, data)
    text = frame.decode()
    # EXT §4.3: data is JSON on a single line, whatever newlines the strings carry.
    assert text.count("\n") == 3 and "\r" not in text
    events, comments = parse_event_stream(text)
    assert comments == 0
    assert [(t, orjson.loads(d)) for t, d in events] == [(event_type, data)]


def test_link_value_is_what_medooze_parses() -> None:
    value = link_value("/whep/live/abc/events")
    assert value == (
        '</whep/live/abc/events>; rel="urn:ietf:params:whep:ext:core:server-sent-events"; '
        'events="active,inactive,layers,viewercount,reconnect"'
    )
    # medooze whep.js splits Link fields on /,\s+(?=<)/ and the events= value on ",".
    assert not re.search(r",\s+<", value)


# ---------------------------------------------------------------------------- coalescing


def test_coalescer_is_leading_edge_then_once_per_interval() -> None:
    coalescer = Coalescer(1.0)
    now = 100.0
    assert coalescer.mark(now)  # first change: at once
    coalescer.flushed(now)
    assert coalescer.deadline() is None
    now += 0.2
    assert not coalescer.mark(now)
    now += 0.3
    assert not coalescer.mark(now)  # folded into the same pending flush
    assert coalescer.deadline() == 101.0
    now = 101.0
    coalescer.flushed(now)
    assert coalescer.deadline() is None
    now += 5.0
    assert coalescer.mark(now)  # quiet for longer than the interval: at once again


@given(st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=200))
def test_coalescer_never_flushes_twice_within_an_interval(gaps: list[float]) -> None:
    coalescer = Coalescer(1.0)
    now = 0.0
    flushes: list[float] = []
    for gap in gaps:
        deadline = coalescer.deadline()
        if deadline is not None and deadline <= now + gap:
            flushes.append(deadline)  # the timer fires before the next change
            coalescer.flushed(deadline)
        now += gap
        if coalescer.mark(now):
            flushes.append(now)
            coalescer.flushed(now)
    # (a + 1.0) - a may round below 1.0: allow for the float subtraction.
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(flushes))


# ---------------------------------------------------------------------------- the hub


@dataclass
class FakeSession:
    id: str
    stream: str
    kind: str = "viewer"


@dataclass
class FakeStream:
    active: bool = False
    viewers: dict[str, object] = field(default_factory=dict)


@dataclass
class FakeRouter:
    streams: dict[str, FakeStream] = field(default_factory=dict)
    listeners: list[object] = field(default_factory=list)

    def add_listener(self, listener: object) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: object) -> None:
        self.listeners.remove(listener)

    def get_session(self, session_id: str) -> FakeSession:
        raise AssertionError("the hub's unit tests do not go through HTTP")


def drain_frames(hub: EventHub, reader_id: str) -> list[tuple[str, object]]:
    reader = hub.get(reader_id)
    assert reader is not None
    events, _ = parse_event_stream(reader.take().decode())
    return [(t, orjson.loads(d)) for t, d in events]


async def test_subscribe_is_primed_with_the_current_state_and_filters_types() -> None:
    router = FakeRouter({"live": FakeStream(active=True, viewers={"a": 1, "b": 2})})
    hub = EventHub(router=router, options=EventOptions(viewercount_interval=0.0))
    everything = hub.subscribe("live", "a", frozenset(EVENT_TYPES))
    only_active = hub.subscribe("live", "b", frozenset({"active", "inactive"}))
    assert drain_frames(hub, everything.id) == [("active", {}), ("viewercount", {"viewercount": 2})]
    assert drain_frames(hub, only_active.id) == [("active", {})]
    hub.on_stream_event(StreamEvent("live", "viewercount", {"viewercount": 3}))
    hub.on_stream_event(StreamEvent("live", "inactive", {}))
    hub.on_stream_event(StreamEvent("other", "active", {}))  # another stream: nobody hears
    assert drain_frames(hub, everything.id) == [
        ("viewercount", {"viewercount": 3}),
        ("inactive", {}),
    ]
    assert drain_frames(hub, only_active.id) == [("inactive", {})]


async def test_no_initial_inactive_when_nothing_is_live() -> None:
    hub = EventHub(router=FakeRouter({"live": FakeStream(active=False)}))
    reader = hub.subscribe("live", "a", frozenset({"active", "inactive"}))
    assert drain_frames(hub, reader.id) == []


async def test_layers_are_sent_on_change_and_to_later_subscribers() -> None:
    router = FakeRouter({"live": FakeStream(active=True)})
    hub = EventHub(router=router)
    early = hub.subscribe("live", "a", frozenset({"layers"}))
    layers: dict[str, object] = {
        "1": [
            {"rid": "h", "bitrate": 900_000, "targetBitrate": 1_000_000, "width": 640},
            {"rid": "q", "bitrate": 150_000, "targetBitrate": 200_000, "width": 320},
        ]
    }
    assert hub.publish("live", "layers", layers) == 1
    assert hub.publish("live", "layers", dict(layers)) == 0  # unchanged: not resent
    assert drain_frames(hub, early.id) == [("layers", layers)]
    late = hub.subscribe("live", "b", frozenset({"layers"}))
    assert drain_frames(hub, late.id) == [("layers", layers)]
    assert hub.layers("live") == layers
    hub.on_stream_event(StreamEvent("live", "inactive", {}))
    assert hub.layers("live") is None  # the layers left with the publisher


async def test_unknown_event_types_are_a_caller_error() -> None:
    hub = EventHub(router=FakeRouter())
    with pytest.raises(ValueError):
        hub.publish("live", "scte35", {})


async def test_a_stuck_reader_loses_its_oldest_frames_and_nobody_else_waits() -> None:
    router = FakeRouter({"live": FakeStream(active=True)})
    hub = EventHub(router=router, options=EventOptions(queue_limit=4))
    stuck = hub.subscribe("live", "a", frozenset({"layers"}))
    for index in range(10):
        hub.publish("live", "layers", {"0": [{"rid": "f", "bitrate": index}]})
    assert stuck.dropped == 6 and hub.frames_dropped == 6
    frames = drain_frames(hub, stuck.id)
    assert [data["0"][0]["bitrate"] for _, data in frames] == [6, 7, 8, 9]  # type: ignore[index]


async def test_drain_tells_every_reconnect_subscriber() -> None:
    router = FakeRouter({"a": FakeStream(), "b": FakeStream()})
    hub = EventHub(router=router)
    first = hub.subscribe("a", "s1", frozenset({"reconnect"}))
    second = hub.subscribe("b", "s2", frozenset(EVENT_TYPES))
    deaf = hub.subscribe("b", "s3", frozenset({"active"}))
    assert hub.drain("https://edge.example/whep/a") == 2
    assert drain_frames(hub, first.id) == [("reconnect", {"url": "https://edge.example/whep/a"})]
    assert ("reconnect", {"url": "https://edge.example/whep/a"}) in drain_frames(hub, second.id)
    assert drain_frames(hub, deaf.id) == []
    assert hub.drain() == 2
    assert drain_frames(hub, first.id) == [("reconnect", {})]


async def test_viewercount_flush_destroys_streams_of_ended_sessions() -> None:
    stream = FakeStream(active=True, viewers={"s1": 1, "s2": 2})
    hub = EventHub(router=FakeRouter({"live": stream}))
    gone = hub.subscribe("live", "s1", frozenset(EVENT_TYPES))
    kept = hub.subscribe("live", "s2", frozenset(EVENT_TYPES))
    del stream.viewers["s1"]
    hub.on_stream_event(StreamEvent("live", "viewercount", {"viewercount": 1}))
    assert gone.closed and hub.get(gone.id) is None
    assert not kept.closed
    assert ("viewercount", {"viewercount": 1}) in drain_frames(hub, kept.id)


async def test_a_session_keeps_only_its_newest_subscriptions() -> None:
    hub = EventHub(router=FakeRouter({"live": FakeStream()}), options=EventOptions())
    limit = hub.options.max_subscriptions_per_session
    readers = [hub.subscribe("live", "s1", frozenset({"active"})) for _ in range(limit + 2)]
    assert [r.closed for r in readers] == [True, True] + [False] * limit
    assert hub.reader_count == limit


async def test_listener_never_raises_into_the_router() -> None:
    class Broken(FakeRouter):
        @property
        def streams(self) -> dict[str, FakeStream]:
            raise RuntimeError("router bug")

        @streams.setter
        def streams(self, value: dict[str, FakeStream]) -> None:
            pass

    hub = EventHub(router=Broken())
    hub._channels["live"] = hub._new_channel()
    hub.on_stream_event(StreamEvent("live", "viewercount", {"viewercount": 1}))


# ---------------------------------------------------------------------------- HTTP, in process


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture
async def worker() -> AsyncIterator[MediaWorker]:
    async with media_worker() as media:
        yield media


def make_app(worker: MediaWorker, **options: float) -> web.Application:
    return create_app(
        router=worker.router,
        clock=worker.now,
        options=HttpOptions(publish_token=TOKEN),
        event_options=EventOptions(**options),  # type: ignore[arg-type]
    )


@pytest.fixture
async def client(worker: MediaWorker) -> AsyncIterator[TestClient]:
    app = make_app(worker, keepalive_interval=0.05, viewercount_interval=0.0)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def publish_and_view(client: TestClient, stream: str = "live") -> tuple[str, str]:
    """A publisher (not connected: the stream is live, not active) and one viewer; returns
    the viewer's session URL and its SSE Link URL."""
    response = await client.post(f"/whip/{stream}", data=WHIP_OFFER, headers={**AUTH, **SDP})
    assert response.status == 201
    response = await client.post(f"/whep/{stream}", data=WHEP_OFFER, headers=SDP)
    assert response.status == 201
    url, events = sse_links(response)[EVENTS_REL]
    assert events == ",".join(EVENT_TYPES)
    return response.headers["Location"], url


async def subscribe(client: TestClient, link: str, names: list[str]) -> str:
    response = await client.post(link, data=orjson.dumps(names), headers=JSON)
    assert response.status == 201, await response.text()
    return response.headers["Location"]


async def test_whep_201_links_the_extension_under_the_session(client: TestClient) -> None:
    session_url, link = await publish_and_view(client)
    assert link == f"{session_url}/events"
    # WHIP carries no SSE Link: the extension is WHEP's.
    response = await client.post("/whip/other", data=WHIP_OFFER, headers={**AUTH, **SDP})
    assert EVENTS_REL not in sse_links(response)


async def test_subscription_stream_delivers_then_delete_ends_it(client: TestClient) -> None:
    _, link = await publish_and_view(client)
    location = await subscribe(client, link, ["viewercount", "inactive"])
    assert location.startswith(f"{link}/")
    response = await client.get(location)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Access-Control-Allow-Origin"] == "*"  # EventSource from a page
    sse = SseClient(response).start()
    assert await sse.next() == ("viewercount", {"viewercount": 1})
    # Another viewer joins: coalescing is off here, so the change is immediate.
    assert (await client.post("/whep/live", data=WHEP_OFFER, headers=SDP)).status == 201
    assert await sse.next() == ("viewercount", {"viewercount": 2})
    # Keep-alive comments flow while nothing happens (interval 50 ms here).
    while sse.comments < 2:
        await asyncio.sleep(0.02)
    assert (await client.delete(location)).status == 200
    await asyncio.wait_for(sse.ended.wait(), 10)
    assert (await client.get(location)).status == 404  # EXT §4.2
    assert (await client.delete(location)).status == 404
    await sse.close()


async def test_unknown_event_names_are_400_and_create_no_stream(client: TestClient) -> None:
    _, link = await publish_and_view(client)
    hub = client.app[EVENT_HUB_KEY]
    for body in (b'["active","bogus"]', b"[]", b'{"active":true}', b"\xff"):
        response = await client.post(link, data=body, headers=JSON)
        assert response.status == 400
        assert response.headers["Content-Type"] == "application/problem+json"
        assert "Location" not in response.headers
    response = await client.post(link, data=b'["active"]', headers=SDP)
    assert response.status == 415 and response.headers["Accept-Post"] == "application/json"
    assert hub.reader_count == 0


async def test_events_of_unknown_sessions_are_404(client: TestClient) -> None:
    _, link = await publish_and_view(client)
    whip = (await client.post("/whip/x", data=WHIP_OFFER, headers={**AUTH, **SDP})).headers
    fake = "A" * 32
    for url in (
        f"/whep/live/{fake}/events",  # no such session
        link.replace("/whep/live/", "/whep/other/"),  # a real session under another stream
        f"{whip['Location'].replace('/whip/', '/whep/')}/events",  # a publisher session
    ):
        assert (await client.post(url, data=b'["active"]', headers=JSON)).status == 404
        assert (await client.get(url)).status == 404
    assert (await client.get(f"{link}/{fake}")).status == 404


async def test_ending_the_session_destroys_its_event_streams(client: TestClient) -> None:
    session_url, link = await publish_and_view(client)
    location = await subscribe(client, link, ["active"])
    sse = SseClient(await client.get(location)).start()
    plain = SseClient(await client.get(link)).start()  # the subscribe-to-all form
    hub = client.app[EVENT_HUB_KEY]
    assert (await client.delete(session_url)).status == 200
    await asyncio.wait_for(sse.ended.wait(), 10)
    await asyncio.wait_for(plain.ended.wait(), 10)
    assert (await client.get(location)).status == 404
    assert hub.reader_count == 0
    await sse.close()
    await plain.close()


async def test_plain_get_on_the_link_subscribes_to_everything(client: TestClient) -> None:
    _, link = await publish_and_view(client)
    hub = client.app[EVENT_HUB_KEY]
    response = await client.get(link)
    assert response.headers["Content-Type"] == "text/event-stream"
    sse = SseClient(response).start()
    assert await sse.next() == ("viewercount", {"viewercount": 1})
    hub.drain("http://elsewhere.example/whep/live")
    assert await sse.next() == ("reconnect", {"url": "http://elsewhere.example/whep/live"})
    assert hub.reader_count == 1
    await sse.close()
    # The implicit stream has no URL to come back to: it goes with its connection (seen at
    # the next keep-alive write).
    for _ in range(500):
        if hub.reader_count == 0:
            break
        await asyncio.sleep(0.01)
    assert hub.reader_count == 0


async def test_a_reconnecting_event_source_takes_the_stream_over(client: TestClient) -> None:
    _, link = await publish_and_view(client)
    location = await subscribe(client, link, ["layers"])
    first = SseClient(await client.get(location)).start()
    second = SseClient(await client.get(location)).start()
    await asyncio.wait_for(first.ended.wait(), 10)
    client.app[EVENT_HUB_KEY].publish("live", "layers", {"0": [{"rid": "f", "bitrate": 1}]})
    assert await second.next() == ("layers", {"0": [{"rid": "f", "bitrate": 1}]})
    assert first.events.empty()
    await first.close()
    await second.close()


async def test_preflight_on_the_event_resources(client: TestClient) -> None:
    _, link = await publish_and_view(client)
    preflight = {"Origin": "https://player.example", "Access-Control-Request-Method": "POST"}
    response = await client.options(link, headers=preflight)
    assert response.status == 200
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]


# ---------------------------------------------------------------------------- end to end


@pytest.fixture
def server() -> Iterator[LiveServer]:
    live = LiveServer(settings_for(token=TOKEN, log_level="info"))
    yield live
    live.close()


async def test_sse_client_sees_active_viewercount_and_inactive_in_order(
    server: LiveServer,
) -> None:
    async with aiohttp.ClientSession(base_url=server.url) as http:
        publisher = placeholder_publisher()
        whip = await negotiate(http, publisher, "/whip/show", AUTH)
        await wait_connected(publisher)
        for _ in range(200):  # "active" is the publisher's keyed moment, seen in the status
            status = await (await http.get("/api/streams/show")).json()
            if status["active"]:
                break
            await asyncio.sleep(0.05)
        viewers = [recvonly_peer(), recvonly_peer()]
        first = await negotiate(http, viewers[0], "/whep/show")
        link, advertised = sse_links(first)[EVENTS_REL]
        assert advertised == "active,inactive,layers,viewercount,reconnect"
        response = await http.post(
            link, data=orjson.dumps(["active", "inactive", "viewercount"]), headers=JSON
        )
        assert response.status == 201
        sse = SseClient(await http.get(response.headers["Location"])).start()
        seen = [await sse.next(), await sse.next()]
        second = await negotiate(http, viewers[1], "/whep/show")
        await wait_connected(viewers[1])
        seen.append(await sse.next())
        assert (await http.delete(second.headers["Location"])).status == 200
        seen.append(await sse.next())  # coalesced: up to a second after the join
        assert (await http.delete(whip.headers["Location"], headers=AUTH)).status == 200
        seen.append(await sse.next())
        assert seen == [
            ("active", {}),
            ("viewercount", {"viewercount": 1}),
            ("viewercount", {"viewercount": 2}),
            ("viewercount", {"viewercount": 1}),
            ("inactive", {}),
        ]
        await sse.close()
        for pc in (publisher, *viewers):
            await pc.close()


async def test_open_event_streams_do_not_hold_up_shutdown(server: LiveServer) -> None:
    async with aiohttp.ClientSession(base_url=server.url) as http:
        await http.post("/whip/s", data=WHIP_OFFER, headers={**AUTH, **SDP})
        view = await http.post("/whep/s", data=WHEP_OFFER, headers=SDP)
        link, _ = sse_links(view)[EVENTS_REL]
        sse = SseClient(await http.get(link)).start()
        await asyncio.get_running_loop().run_in_executor(None, server.close)
        await asyncio.wait_for(sse.ended.wait(), 10)
        server.close = lambda: None  # type: ignore[method-assign]
        await sse.close()


# ---------------------------------------------------------------------------- cost


READERS_SCRIPT = """
import asyncio, sys, aiohttp
async def main(url, count):
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        responses = await asyncio.gather(*(http.get(url) for _ in range(count)))
        assert all(r.status == 200 for r in responses), {r.status for r in responses}
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def _pushes_per_second(fanout: _fastpath.Fanout, track: int, seconds: float) -> float:
    """Packets pushed per CPU second of the event-loop thread, by a loop that yields to the
    loop between batches as the media worker does between datagrams. CPU time rather than
    wall time: the loop thread's CPU includes whatever the readers cost it, and other
    processes on the machine do not count."""
    header = bytearray(12)
    header[0], header[1] = 0x80, 96
    payload = bytes(1188)
    pushed = seq = 0
    wall_start, cpu_start = time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall_start < seconds:
        for _ in range(50):
            seq = (seq + 1) & 0xFFFF
            header[2:4] = seq.to_bytes(2, "big")
            fanout.push(track, bytes(header) + payload)
            pushed += 1
        await asyncio.sleep(0)  # let the HTTP side (the readers) run
    return pushed / (time.thread_time() - cpu_start)


@pytest.mark.slow
async def test_a_thousand_idle_readers_leave_fanout_throughput_alone(
    worker: MediaWorker,
) -> None:
    app = make_app(worker)  # production keep-alive: 15 s
    async with TestClient(TestServer(app)) as http:
        _, link = await publish_and_view(http)
        # 20 viewers on loopback sockets nobody reads (sends still go through the kernel).
        sinks = []
        track = next(stream_tracks(worker.router.streams["live"])).fanout_id
        for _ in range(20):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink.bind(("127.0.0.1", 0))
            sinks.append(sink)
            slot = worker.fanout.add_viewer(
                "127.0.0.1",
                sink.getsockname()[1],
                profile=_fastpath.PROFILE_AEAD_AES_128_GCM,
                tx_key=bytes(16),
                tx_salt=bytes(12),
                rx_key=bytes(16),
                rx_salt=bytes(12),
            )
            worker.fanout.subscribe(slot, track, ssrc=1234, payload_type=96, wait_keyframe=False)
        url = f"{http.make_url(link)}"
        rates: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(5):
            rates["without"].append(await _pushes_per_second(worker.fanout, track, 0.3))
        readers = subprocess.Popen(
            [sys.executable, "-c", READERS_SCRIPT, url, "1000"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            loop = asyncio.get_running_loop()
            assert readers.stdout is not None
            line = await asyncio.wait_for(loop.run_in_executor(None, readers.stdout.readline), 60)
            assert line.strip() == "ready"
            hub = app[EVENT_HUB_KEY]
            assert hub.reader_count == 1000
            for _ in range(5):
                rates["with"].append(await _pushes_per_second(worker.fanout, track, 0.3))
        finally:
            assert readers.stdin is not None
            readers.stdin.close()
            readers.wait(30)
        try:
            # ...and without again, so a drift of the machine shows on both sides.
            for _ in range(5):
                rates["without"].append(await _pushes_per_second(worker.fanout, track, 0.3))
        finally:
            for sink in sinks:
                sink.close()
        without = sorted(rates["without"])[len(rates["without"]) // 2]
        with_readers = sorted(rates["with"])[len(rates["with"]) // 2]
        print(
            f"fan-out pushes per loop-thread CPU second, 20 viewers: {without:,.0f} "
            f"without readers, "
            f"{with_readers:,.0f} with 1,000 idle event readers "
            f"(ratio {with_readers / without:.2f})"
        )
        # A generous noise band (two cores shared with the readers' process).
        assert with_readers > 0.5 * without


async def test_reconnect_sessions_tells_only_those_sessions_then_ends_their_streams() -> None:
    """A crashed worker's sessions (issue 8): their readers get `reconnect`, others do not,
    and the streams end after the grace period (so the frame can leave first)."""
    hub = EventHub(router=FakeRouter({"cam": FakeStream(active=True, viewers={})}))
    lost = hub.subscribe("cam", "lost-session", frozenset(EVENT_TYPES))
    kept = hub.subscribe("cam", "kept-session", frozenset(EVENT_TYPES))
    assert hub.reconnect_sessions(["lost-session", "unknown"], grace=0.05) == 1
    assert b"event: reconnect" in lost.take()
    assert b"reconnect" not in kept.take()
    await asyncio.sleep(0.1)
    assert lost.closed and not kept.closed
    assert hub.reader_count == 1
