"""The sans-IO decisions of a simulcast pull (whepfan/cluster/simulcast.py), and the
puller acting on them on virtual time with sessions that only record what they are
asked (whepfan/cluster/upstream.py: one session per layer, the first carrying audio; a
lost layer pulled again alone; layers that come and go; the grace ending them all)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace

import pytest

from whepfan.cluster.simulcast import (
    EVENTS_REL,
    LAYER_REL,
    LayerPlan,
    SseEvent,
    SseParser,
    layer_rids,
    link_targets,
    pinned_url,
    plan_layers,
    track_order,
)
from whepfan.cluster.upstream import (
    RETRY_INITIAL,
    PullSession,
    UpstreamPuller,
    UpstreamTarget,
)

# -- Link headers (RFC 8288 §3) ------------------------------------------------------------


def test_link_targets_by_rel_resolved_against_the_endpoint() -> None:
    # whepfan's 201: an events= parameter whose quoted value holds commas.
    values = [
        '</whep/s/x/events>; rel="urn:ietf:params:whep:ext:core:server-sent-events"; '
        'events="active,inactive,layers"',
        '</whep/s/x/layer>; rel="urn:ietf:params:whep:ext:core:layer"',
        '<stun:stun.example.net>; rel="ice-server", <https://other/l>;rel="a b"',
    ]
    targets = link_targets(values, "http://origin:8080/whep/s?token=t")
    assert targets[EVENTS_REL] == "http://origin:8080/whep/s/x/events"
    assert targets[LAYER_REL] == "http://origin:8080/whep/s/x/layer"
    assert targets["ice-server"] == "stun:stun.example.net"
    assert targets["a"] == targets["b"] == "https://other/l"  # several rels (§3.3)


def test_link_targets_ignore_what_is_not_a_link() -> None:
    assert link_targets(["nonsense", "<x>; title=y"], "http://h/") == {}


# -- the layers event (EXT §4.3.3; spec notes §4.2, §4.4) ----------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        # EXT/W02 (whepfan): keyed by m-line index, a list of layers low to high
        {"1": [{"rid": "q", "bitrate": 1}, {"rid": "h"}, {"rid": "f", "bitrate": 0}]},
        # M02: active/inactive/layers objects with encodingId / id
        {
            "1": {
                "active": [{"id": "q"}, {"id": "h"}],
                "inactive": [{"id": "f"}],
                "layers": [{"encodingId": "q"}, {"encodingId": "h"}, {"encodingId": "f"}],
            }
        },
        # Millicast's medias wrapper
        {"medias": {"1": {"layers": [{"encodingId": "q"}, {"encodingId": "h"}]}}},
    ],
)
def test_layer_rids_in_every_deployed_shape(payload: object) -> None:
    rids = layer_rids(payload)
    assert rids[:2] == ("q", "h")
    assert len(rids) == len(set(rids))


def test_layer_rids_single_layer_and_nonsense_are_empty() -> None:
    assert layer_rids({"1": [{"rid": None, "bitrate": 300000}]}) == ()
    assert layer_rids({"1": [{"rid": "only"}]}) == ()  # one layer: nothing to pin
    assert layer_rids({"0": [{"rid": "q"}, {"rid": "q"}]}) == ()  # the same, twice
    assert layer_rids([1, 2]) == ()
    assert layer_rids({"1": "x", "2": [{"rid": 3}]}) == ()


def test_layer_rids_take_the_first_media_with_layers() -> None:
    payload = {"10": [{"rid": "z"}, {"rid": "y"}], "2": [{"rid": "a"}, {"rid": "b"}]}
    assert layer_rids(payload) == ("a", "b")  # m-line 2 before m-line 10


# -- text/event-stream (WHATWG HTML §9.2.6) -------------------------------------------------


def test_sse_parser_across_chunks_and_line_endings() -> None:
    parser = SseParser()
    assert parser.feed(b": keep-alive\n\nretry: 2000\n\nevent: lay") == []
    assert parser.feed(b'ers\r\ndata: {"1":\r\ndata: []}\r') == []
    events = parser.feed(b"\n\r\ndata: plain\n\n")
    assert events == [SseEvent("layers", '{"1":\n[]}'), SseEvent("message", "plain")]


# -- which session carries which layer -------------------------------------------------------


def test_plan_a_cold_pull_pins_the_first_session_to_the_middle_layer() -> None:
    assert plan_layers(None, (), ("q", "h", "f")) == LayerPlan(
        primary="h", open=("q", "f"), close=()
    )
    assert plan_layers(None, (), ("lo", "hi")).primary == "lo"


def test_plan_keeps_a_layer_that_remains_and_ends_those_that_went() -> None:
    assert plan_layers("h", ("q", "f"), ("q", "h")) == LayerPlan(primary="h", open=(), close=("f",))
    assert plan_layers("h", ("q", "f"), ("q", "h", "f")) == LayerPlan(
        primary="h", open=(), close=()
    )


def test_plan_moves_the_first_session_to_a_layer_no_session_carries() -> None:
    # h went: the middle of (q, f, x) is f, which its own session carries; the nearest
    # free layer is x, so no session has to end to make room.
    assert plan_layers("h", ("q", "f"), ("q", "f", "x")) == LayerPlan(
        primary="x", open=(), close=()
    )
    # Every layer has a session: the middle one's session gives way.
    assert plan_layers("h", ("q", "f"), ("q", "f")) == LayerPlan(primary="q", open=(), close=("q",))


def test_plan_a_single_layer_ends_every_other_session() -> None:
    assert plan_layers("h", ("q", "f"), ()) == LayerPlan(primary=None, open=(), close=("q", "f"))


def test_track_order_keeps_each_session_on_its_track() -> None:
    # Cold: track 0 was fed by the first session, now pinned to h.
    assert track_order(["h"], ["q", "h", "f"]) == ["h", "q", "f"]
    # f went: its track's position is closed up (attach cannot skip one)...
    assert track_order(["h", "q", "f"], ["q", "h"]) == ["h", "q"]
    # ...or given to a new layer when there is one.
    assert track_order(["h", "q", None], ["q", "h", "x"]) == ["h", "q", "x"]
    assert track_order(["h", None, "f"], ["h", "f"]) == ["h", "f"]
    # A new feed of tracks that remain: each layer back at its old position.
    assert track_order(["h", "q", "f"], ["q", "h", "f"]) == ["h", "q", "f"]
    assert track_order([], ["q", "h"]) == ["q", "h"]


def test_pinned_url_sets_rid_and_keeps_other_parameters() -> None:
    assert pinned_url("http://o/whep/s", "h") == "http://o/whep/s?rid=h"
    assert pinned_url("http://o/whep/s?token=a&rid=q", "f") == "http://o/whep/s?token=a&rid=f"
    assert pinned_url("http://o/whep/a%20b?encodingId=q", "h m") == "http://o/whep/a%20b?rid=h+m"


# -- the puller on virtual time ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordedSession:
    """A PullSession that connects at once and records what the puller asks of it."""

    def __init__(
        self,
        *,
        stream_name: str,
        target: UpstreamTarget,
        on_lost: Callable[[PullSession, str], None],
        rid: str | None,
        layers: Sequence[str],
        audio: bool,
        refuse_pins: bool,
    ) -> None:
        self.stream_name = stream_name
        self.target = target
        self.on_lost = on_lost
        self.rid = rid
        self.layers = tuple(layers)
        self.audio = audio
        self.refuse_pins = refuse_pins
        self.location: str | None = None
        self.packets_received = 0
        self.bytes_received = 0
        self.closed = False
        self.deleted = False
        self.arranged: list[tuple[str | None, tuple[str, ...]]] = []

    @property
    def connected(self) -> bool:
        return not self.closed

    @property
    def links(self) -> Mapping[str, str]:
        return {}  # the test says what the layers are (UpstreamPuller.layers_changed)

    async def start(self) -> None:
        self.location = f"{self.target.url}/session-{self.rid}"

    async def delete(self) -> None:
        self.closed = self.deleted = True

    async def arrange(self, rid: str | None, layers: Sequence[str]) -> bool:
        if self.refuse_pins and rid != self.rid:
            return False
        self.arranged.append((rid, tuple(layers)))
        self.rid, self.layers = rid, tuple(layers)
        return True


class Origin:
    """The ``open_session`` seam: every session it made, in order."""

    def __init__(self) -> None:
        self.sessions: list[RecordedSession] = []
        self.refuse_pins = False

    def __call__(self, **kwargs: object) -> PullSession:
        session = RecordedSession(
            stream_name=str(kwargs["stream_name"]),
            target=kwargs["target"],  # type: ignore[arg-type]
            on_lost=kwargs["on_lost"],  # type: ignore[arg-type]
            rid=kwargs["rid"],  # type: ignore[arg-type]
            layers=kwargs["layers"],  # type: ignore[arg-type]
            audio=bool(kwargs["audio"]),
            refuse_pins=self.refuse_pins,
        )
        self.sessions.append(session)
        return session

    def live(self) -> list[RecordedSession]:
        return [session for session in self.sessions if not session.closed]


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def resolve(stream: str) -> UpstreamTarget | None:
    return UpstreamTarget(url=f"http://origin/whep/{stream}", token="t", node="origin")


def new_puller(origin: Origin, clock: Clock, streams: dict[str, object]) -> UpstreamPuller:
    return UpstreamPuller(
        router=SimpleNamespace(streams=streams),
        resolve=resolve,
        clock=clock,
        grace=30,
        open_session=origin,
    )


def waiting_viewers() -> SimpleNamespace:
    return SimpleNamespace(live=True, viewers={"v": object()})


async def test_one_session_per_layer_and_audio_on_the_first_only() -> None:
    origin, clock = Origin(), Clock()
    streams: dict[str, object] = {}
    puller = new_puller(origin, clock, streams)
    await puller.start()
    try:
        await puller.ensure("s")
        (first,) = origin.sessions
        assert (first.rid, first.audio, first.layers) == (None, True, ())
        streams["s"] = waiting_viewers()
        await puller.layers_changed("s", ("q", "h", "f"))
        await _settle()
        assert first.arranged == [("h", ("q", "h", "f"))]
        others = origin.sessions[1:]
        assert sorted((s.rid, s.audio, s.layers) for s in others) == [
            ("f", False, ("q", "h", "f")),
            ("q", False, ("q", "h", "f")),
        ]
        assert puller.sessions() == 3
        assert puller.sessions_by_layer() == {"q": 1, "h": 1, "f": 1}
        described = puller.describe()["s"]
        assert described["connected"] is True
        assert [(layer["rid"], layer["primary"]) for layer in described["layers"]] == [
            ("h", True),
            ("q", False),
            ("f", False),
        ]
        # The same layers again (the event's periodic repeat): nothing happens.
        await puller.layers_changed("s", ("q", "h", "f"))
        await _settle()
        assert len(origin.sessions) == 3 and len(first.arranged) == 1
    finally:
        await puller.close()
    assert all(session.deleted for session in origin.sessions)


async def test_a_lost_layer_is_pulled_again_alone_on_the_backoff() -> None:
    origin, clock = Origin(), Clock()
    streams: dict[str, object] = {}
    puller = new_puller(origin, clock, streams)
    await puller.start()
    try:
        await puller.ensure("s")
        streams["s"] = waiting_viewers()
        await puller.layers_changed("s", ("q", "h", "f"))
        await _settle()
        (top,) = [session for session in origin.sessions if session.rid == "f"]
        top.closed = True
        top.on_lost(top, "consent expired")
        assert puller.sessions_by_layer() == {"q": 1, "h": 1}
        layers = {layer["rid"]: layer for layer in puller.describe()["s"]["layers"]}
        assert layers["f"]["last_error"] == "consent expired" and layers["f"]["failures"] == 1
        await puller.watch(clock.now + RETRY_INITIAL - 0.01)
        await _settle()
        assert len(origin.sessions) == 3  # not before its retry time
        clock.now += RETRY_INITIAL
        await puller.watch(clock.now)
        await _settle()
        assert len(origin.sessions) == 4
        again = origin.sessions[-1]
        assert (again.rid, again.audio) == ("f", False)
        assert puller.sessions_by_layer() == {"q": 1, "h": 1, "f": 1}
        assert {layer["rid"]: layer["failures"] for layer in puller.describe()["s"]["layers"]} == {
            "h": 0,
            "q": 0,
            "f": 0,
        }
    finally:
        await puller.close()


async def test_layers_that_go_end_their_sessions_and_one_layer_ends_all_but_the_first() -> None:
    origin, clock = Origin(), Clock()
    streams: dict[str, object] = {}
    puller = new_puller(origin, clock, streams)
    await puller.start()
    try:
        await puller.ensure("s")
        first = origin.sessions[0]
        streams["s"] = waiting_viewers()
        await puller.layers_changed("s", ("q", "h", "f"))
        await _settle()
        await puller.layers_changed("s", ("q", "h"))
        await _settle()
        assert sorted(str(s.rid) for s in origin.live()) == ["h", "q"]
        assert first.arranged[-1] == ("h", ("q", "h"))
        # The publisher came back with one layer: the first session alone, unpinned.
        await puller.layers_changed("s", ())
        await _settle()
        assert origin.live() == [first]
        assert first.arranged[-1] == (None, ())
        # Back with new layers: new sessions for all but the first one's.
        await puller.layers_changed("s", ("lo", "hi"))
        await _settle()
        assert first.rid == "lo"
        assert sorted(str(s.rid) for s in origin.live()) == ["hi", "lo"]
    finally:
        await puller.close()


async def test_a_refused_pin_is_tried_again_by_the_watch() -> None:
    origin, clock = Origin(), Clock()
    streams: dict[str, object] = {}
    puller = new_puller(origin, clock, streams)
    await puller.start()
    try:
        origin.refuse_pins = True
        await puller.ensure("s")
        first = origin.sessions[0]
        streams["s"] = waiting_viewers()
        await puller.layers_changed("s", ("q", "h", "f"))
        await _settle()
        assert first.arranged == [] and len(origin.sessions) == 1
        first.refuse_pins = False
        clock.now += 60
        await puller.watch(clock.now)
        await _settle()
        assert first.arranged == [("h", ("q", "h", "f"))]
        assert puller.sessions() == 3
    finally:
        await puller.close()


async def test_the_grace_ends_every_layer_session() -> None:
    origin, clock = Origin(), Clock()
    streams: dict[str, object] = {}
    puller = new_puller(origin, clock, streams)
    await puller.start()
    try:
        await puller.ensure("s")
        stream = streams["s"] = waiting_viewers()
        await puller.layers_changed("s", ("q", "h", "f"))
        await _settle()
        await puller.watch(clock.now)
        stream.viewers = {}
        await puller.watch(clock.now)  # the last viewer left: the grace starts
        clock.now += 29.9
        await puller.watch(clock.now)
        assert puller.sessions() == 3
        clock.now += 0.1
        await puller.watch(clock.now)
        assert puller.sessions() == 0 and puller.describe() == {}
        assert all(session.deleted for session in origin.sessions)
    finally:
        await puller.close()


async def test_every_session_lost_at_once_the_first_comes_back_before_the_others() -> None:
    # The worker holding them all exited (--workers N), or the origin restarted: the first
    # session (audio) is pulled again first, since the feed takes the stream's negotiation
    # from the first answer it gets; the video-only layers follow on the next watch.
    origin, clock = Origin(), Clock()
    streams: dict[str, object] = {}
    puller = new_puller(origin, clock, streams)
    await puller.start()
    try:
        await puller.ensure("s")
        streams["s"] = waiting_viewers()
        await puller.layers_changed("s", ("q", "h", "f"))
        await _settle()
        for session in list(origin.sessions):
            session.closed = True
            session.on_lost(session, "media worker 0 exited")
        assert puller.sessions() == 0
        clock.now += RETRY_INITIAL
        await puller.watch(clock.now)
        await _settle()
        (first,) = origin.sessions[3:]
        assert (first.rid, first.audio) == ("h", True)
        assert puller.sessions_by_layer() == {"h": 1}
        await puller.watch(clock.now + 0.01)
        await _settle()
        assert sorted((s.rid, s.audio) for s in origin.sessions[4:]) == [
            ("f", False),
            ("q", False),
        ]
        assert puller.sessions_by_layer() == {"q": 1, "h": 1, "f": 1}
    finally:
        await puller.close()


class MeasuringOrigin(Origin):
    """An opener whose tracks are measured elsewhere (a worker pool's): ``ensure`` waits
    for its ``layers_measured`` once the layers are known."""

    def __init__(self) -> None:
        super().__init__()
        self.measured = asyncio.Event()
        self.asked: list[str] = []

    async def layers_measured(self, stream_name: str) -> None:
        self.asked.append(stream_name)
        await self.measured.wait()


async def test_ensure_waits_for_the_layers_measured_where_the_sessions_are() -> None:
    origin, clock = MeasuringOrigin(), Clock()
    streams: dict[str, object] = {}
    puller = new_puller(origin, clock, streams)
    await puller.start()
    try:
        ensuring = asyncio.ensure_future(puller.ensure("s"))
        await _settle()
        await puller.layers_changed("s", ("q", "h", "f"))
        await _settle()
        assert origin.asked == ["s"] and not ensuring.done()
        origin.measured.set()
        await _settle()
        assert ensuring.done() and ensuring.exception() is None
    finally:
        await puller.close()
