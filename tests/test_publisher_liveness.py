"""Publisher liveness on virtual time (media/liveness.py): a publisher whose media stopped
is stalled after ``media_timeout`` (3 s by default), viewers hear "inactive" then and
"active" on its next packet, and a new WHIP POST replaces a stalled publisher while the
viewers stay subscribed with continuous sequence numbers (RFC 3550 §5.1).

First the unit alone (a Stream, the Timers heap and a listener), asserting exact
deadlines; then the Router with in-memory peers (test_router's harness: whepfan's own
ICE checker and DTLS client against the Router, no event loop)."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator

import pytest
from test_router import WHIP_OFFER, Harness, _with_fingerprint, connect_viewer

from whepfan import _fastpath
from whepfan.cli import build_parser
from whepfan.config import MediaConfig
from whepfan.errors import Conflict, PeerError
from whepfan.media.liveness import MediaLiveness
from whepfan.media.session import PublisherSession, ViewerSession
from whepfan.media.streams import Stream, StreamEvent, StreamListeners
from whepfan.media.timers import TimerKind, Timers
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.settings import Settings, SettingsError

KEY = (TimerKind.MEDIA_TIMEOUT, "live")
# The Chromium fixture offer's audio SSRC (a=ssrc:412631864) and Opus payload type.
AUDIO_SSRC = 412631864
OPUS_PT = 111


class Unit:
    def __init__(self, timeout: float = 3.0) -> None:
        self.timers = Timers()
        self.listeners = StreamListeners()
        self.events: list[str] = []
        self.listeners.add(lambda event: self.events.append(event.type))
        self.counters: Counter[str] = Counter()
        self.liveness = MediaLiveness(
            timeout=timeout, timers=self.timers, listeners=self.listeners, counters=self.counters
        )
        self.stream = Stream(name="live", active=True)

    def run_timers(self, now: float) -> None:
        for kind, name in self.timers.due(now):
            assert kind is TimerKind.MEDIA_TIMEOUT
            self.liveness.handle_timer(self.stream, name, now)


def test_the_default_media_timeout_is_three_seconds() -> None:
    assert MediaConfig().media_timeout == 3.0


def test_a_non_positive_timeout_is_refused() -> None:
    with pytest.raises(ValueError):
        MediaLiveness(timeout=0, timers=Timers(), listeners=StreamListeners(), counters=Counter())


def test_media_pushes_the_deadline_lazily_and_silence_stalls_at_last_packet_plus_timeout() -> None:
    unit = Unit()
    unit.liveness.watch(unit.stream, 10.0)
    assert unit.timers.deadline(KEY) == 13.0
    for now in (10.5, 11.0, 12.25):
        unit.liveness.packet(unit.stream, now)
    # One timer per stream, not one heap entry per packet: the deadline did not move...
    assert unit.timers.deadline(KEY) == 13.0
    unit.run_timers(13.0)
    # ...and when it fires it re-arms at the last packet + timeout.
    assert unit.timers.deadline(KEY) == 15.25
    assert unit.events == [] and not unit.liveness.stalled(unit.stream, 15.2)
    assert unit.liveness.replaceable_in(unit.stream, 13.0) == 3  # ceil(2.25)
    unit.run_timers(15.25)
    assert unit.events == ["inactive"]
    assert not unit.stream.active
    assert unit.liveness.stalled(unit.stream, 15.25)
    assert unit.timers.deadline(KEY) is None  # nothing to wait for until media returns
    assert unit.counters["publisher_media_stalled"] == 1


def test_the_next_packet_resumes_a_stalled_stream_once() -> None:
    unit = Unit()
    unit.liveness.watch(unit.stream, 0.0)
    unit.run_timers(3.0)
    assert unit.events == ["inactive"]
    unit.liveness.packet(unit.stream, 7.5)
    unit.liveness.packet(unit.stream, 7.52)
    assert unit.events == ["inactive", "active"]
    assert unit.stream.active
    assert unit.timers.deadline(KEY) == 10.5
    assert unit.counters["publisher_media_resumed"] == 1
    unit.run_timers(10.5)
    assert unit.timers.deadline(KEY) == 10.52
    unit.run_timers(10.52)
    assert unit.events == ["inactive", "active", "inactive"]


def test_a_publisher_that_never_sends_stalls_without_an_event_if_never_active() -> None:
    unit = Unit(timeout=2.0)
    unit.stream.active = False  # never keyed: "active" was never sent
    unit.liveness.watch(unit.stream, 5.0)
    assert not unit.liveness.stalled(unit.stream, 6.9)
    unit.run_timers(7.0)
    assert unit.liveness.stalled(unit.stream, 7.0)
    assert unit.events == []


def test_a_forgotten_stream_has_no_timer_and_its_packets_are_ignored() -> None:
    unit = Unit()
    unit.liveness.watch(unit.stream, 0.0)
    unit.liveness.forget("live")
    assert unit.timers.deadline(KEY) is None
    unit.liveness.packet(unit.stream, 1.0)
    unit.liveness.handle_timer(unit.stream, "live", 5.0)
    assert unit.events == []
    assert unit.liveness.stalled(unit.stream, 0.0)  # nothing vouches for it


# ---------------------------------------------------------------------- the Router


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(media_timeout=3.0)
    yield h
    h.close()


def _publisher(h: Harness, now: float) -> tuple[PublisherSession, _fastpath.SrtpSession, float]:
    """A keyed publisher, and the SRTP context it sends with (its keys as the router sees
    them: the remote key of the server's session is the publisher's sending key)."""
    session_id, _, now = connect_viewer(h, now, publisher=True, client=("127.0.0.1", 50002))
    session = h.router.get_session(session_id)
    assert isinstance(session, PublisherSession) and session.keys is not None
    keys = session.keys
    return session, _fastpath.SrtpSession(keys.profile, keys.remote_key, keys.remote_salt), now


def _audio(srtp: _fastpath.SrtpSession, seq: int) -> bytes:
    header = struct.pack("!BBHII", 0x80, OPUS_PT, seq & 0xFFFF, seq * 960, AUDIO_SSRC)
    return srtp.protect(header + bytes(40))


def _types(events: list[StreamEvent]) -> list[str]:
    return [e.type for e in events if e.type in ("active", "inactive")]


def test_silence_makes_the_stream_inactive_and_media_makes_it_active_again(
    harness: Harness,
) -> None:
    router = harness.router
    publisher, srtp, now = _publisher(harness, 0.0)
    viewer_id, _, now = connect_viewer(harness, now)
    assert _types(harness.events) == ["active"]
    for seq in range(50):
        now += 0.02
        router.datagram_received(_audio(srtp, seq), ("127.0.0.1", 50002), now)
    last = now
    router.handle_timer(last + 2.999)
    assert _types(harness.events) == ["active"]
    assert router.timers.deadline(KEY) == last + 3.0
    router.handle_timer(last + 3.0)
    assert _types(harness.events) == ["active", "inactive"]
    # The publisher's session and the viewer's subscription stay: a stall is not an end.
    assert publisher.id in router.sessions and router.streams["live"].publisher is publisher
    viewer = router.get_session(viewer_id)
    assert isinstance(viewer, ViewerSession) and viewer.fanout_slot is not None
    router.datagram_received(_audio(srtp, 50), ("127.0.0.1", 50002), last + 10.0)
    assert _types(harness.events) == ["active", "inactive", "active"]


def test_a_stalled_publisher_is_replaced_and_viewers_continue_its_sequence_line(
    harness: Harness,
) -> None:
    router = harness.router
    old, srtp, now = _publisher(harness, 0.0)
    viewer_id, _, now = connect_viewer(harness, now)
    for seq in range(1000, 1020):
        now += 0.02
        router.datagram_received(_audio(srtp, seq), ("127.0.0.1", 50002), now)
    last = now
    track = router.streams["live"].tracks["audio"][0]
    last_out = track.last_out_seq
    assert last_out is not None
    newcomer = _with_fingerprint(WHIP_OFFER, DtlsCertificate.generate())
    # Still sending a moment ago: 409, with the seconds until it would be replaceable.
    with pytest.raises(Conflict) as refused:
        router.publish("live", newcomer, last + 1.2)
    assert refused.value.retry_after == 2
    assert len(router.sessions) == 2  # nothing left behind
    router.handle_timer(last + 3.0)
    assert _types(harness.events) == ["active", "inactive"]
    # A new WHIP POST now replaces it; the newcomer connects and keys up ("active").
    new, srtp2, now = _publisher(harness, last + 4.0)
    assert old.id not in router.sessions
    assert router.counters["sessions_ended_publisher-replaced"] == 1
    assert router.streams["live"].publisher is new
    assert _types(harness.events) == ["active", "inactive", "active"]
    # The viewer never renegotiated: same session, same fan-out slot, same track...
    viewer = router.get_session(viewer_id)
    assert isinstance(viewer, ViewerSession) and viewer.fanout_slot is not None
    assert router.streams["live"].tracks["audio"][0] is track
    # ...and the newcomer's own sequence line is rebased onto the viewers' (RFC 3550 §5.1).
    router.datagram_received(_audio(srtp2, 7), ("127.0.0.1", 50002), now + 0.02)
    assert track.last_out_seq == (last_out + 1) % 65536


def test_a_replacement_with_a_bad_offer_keeps_the_stalled_publisher(harness: Harness) -> None:
    router = harness.router
    old, _, now = _publisher(harness, 0.0)
    router.handle_timer(now + 3.0)
    with pytest.raises(PeerError):
        router.publish("live", "v=0\r\nnot an offer\r\n", now + 3.5)
    assert router.streams["live"].publisher is old and old.id in router.sessions


# ---------------------------------------------------------------------- the setting


def test_media_timeout_reaches_the_media_config_from_every_source() -> None:
    assert Settings.resolve(cli={}, environ={}).media_config().media_timeout == 3.0
    from_env = Settings.resolve(cli={}, environ={"WHEPFAN_MEDIA_TIMEOUT": "5"})
    assert from_env.media_config().media_timeout == 5.0
    args = build_parser().parse_args(["serve", "--media-timeout", "1.5"])
    assert args.media_timeout == "1.5"
    from_cli = Settings.resolve(cli={"media_timeout": args.media_timeout}, environ={})
    assert from_cli.media_config().media_timeout == 1.5


def test_a_media_timeout_that_is_not_positive_is_refused() -> None:
    with pytest.raises(SettingsError, match="--media-timeout 0: must be positive"):
        Settings.resolve(cli={"media_timeout": "0"}, environ={})
