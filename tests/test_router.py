"""The session layer on virtual time: whepfan's own client-side protocol objects (ICE
controlling checker, DTLS client) talk to the Router in memory; only the Fanout holds a
real (idle) UDP socket. No event loop, no sleeping: ``now`` is a number we advance."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from _paths import SDP_FIXTURES

from whepfan import _fastpath
from whepfan.config import MediaConfig
from whepfan.errors import Conflict, NotFound, ServiceUnavailable
from whepfan.media.router import Router
from whepfan.media.session import MediaSession, SessionState
from whepfan.media.streams import StreamEvent
from whepfan.protocol import sdp
from whepfan.protocol.dtls import DtlsCertificate, DtlsConnected, DtlsSession
from whepfan.protocol.ice import IceConnected, IceControllingChecker

if TYPE_CHECKING:
    from _peers import InProcessSignalling

FIXTURES = SDP_FIXTURES
WHIP_OFFER = (FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
WHEP_OFFER = (FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()

SERVER = ("127.0.0.1", 40000)  # what the client believes; datagrams never leave memory
CLIENT = ("127.0.0.1", 50001)


class Harness:
    def __init__(self, **config: object) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.events: list[StreamEvent] = []
        self.certificate = DtlsCertificate.generate()
        self.router = Router(
            config=MediaConfig(udp_host="127.0.0.1", udp_port=0, **config),  # type: ignore[arg-type]
            certificate=self.certificate,
            fanout=_fastpath.Fanout(self.sock.fileno(), max_viewers=64),
            send=lambda data, addr: self.sent.append((data, addr)),
            candidates=[sdp.Candidate.parse("1 1 udp 2130706431 127.0.0.1 40000 typ host")],
        )
        self.router.add_listener(self.events.append)

    def take_sent(self) -> list[bytes]:
        out = [data for data, _ in self.sent]
        self.sent.clear()
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def _with_fingerprint(offer: str, certificate: DtlsCertificate) -> str:
    algorithm, value = certificate.fingerprints[0]
    return re.sub(r"a=fingerprint:\S+ \S+", f"a=fingerprint:{algorithm} {value}", offer)


def _ice_credentials(offer: str) -> tuple[str, str]:
    ufrag = re.search(r"a=ice-ufrag:(\S+)", offer)
    pwd = re.search(r"a=ice-pwd:(\S+)", offer)
    assert ufrag and pwd
    return ufrag.group(1), pwd.group(1)


def connect_viewer(
    h: Harness,
    now: float,
    *,
    publisher: bool = False,
    client: tuple[str, int] = CLIENT,
    signalling: InProcessSignalling | None = None,
) -> tuple[str, IceControllingChecker, float]:
    """A viewer (or publisher) that completes ICE and DTLS against the router, in memory;
    its POST goes to ``signalling`` (e.g. InProcessWorkers, with admission) if given."""
    client_cert = DtlsCertificate.generate()
    offer = _with_fingerprint(WHIP_OFFER if publisher else WHEP_OFFER, client_cert)
    session: MediaSession
    post = signalling or h.router
    if publisher:
        session, answer = post.publish("live", offer, now)
    else:
        session, answer = post.view("live", offer, now)
    done = handshake(h, session, offer, answer, client_cert, now, client=client)
    if done is None:
        raise AssertionError("viewer did not connect")
    checker, now = done
    return session.id, checker, now


def handshake(
    h: Harness,
    session: MediaSession,
    offer: str,
    answer: str,
    client_cert: DtlsCertificate,
    now: float,
    *,
    client: tuple[str, int] = CLIENT,
) -> tuple[IceControllingChecker, float] | None:
    """The client side of ICE and DTLS for ``session`` (made from ``offer``, answered by
    ``answer``), in memory, 50 ms of virtual time a round: the checker and the time when
    DTLS connected, or None once the session is gone or after 10 s without connecting
    (a DTLS certificate the offer does not pin fails)."""
    ufrag, pwd = _ice_credentials(offer)
    checker = IceControllingChecker(
        local_ufrag=ufrag,
        local_pwd=pwd,
        remote_ufrag=session.local_ufrag,
        remote_pwd=session.local_pwd,
        remote_candidates=[SERVER],
    )
    fingerprints = [tuple(m.split(" ", 1)) for m in re.findall(r"a=fingerprint:(\S+ \S+)", answer)]
    dtls = DtlsSession(
        certificate=client_cert,
        role="client",
        remote_fingerprints=[(a, v) for a, v in fingerprints],
    )
    connected = False
    for _ in range(200):
        if session.id not in h.router.sessions:
            return None
        request = checker.next_request(now)
        if request is not None:
            h.router.datagram_received(request[0], client, now)
            for response in h.take_sent():
                checker.receive_stun(response, SERVER, now)
        while (event := checker.next_event()) is not None:
            if isinstance(event, IceConnected):
                dtls.start(now)
        for datagram in dtls.datagrams_to_send():
            h.router.datagram_received(datagram, client, now)
        for datagram in h.take_sent():
            dtls.receive(datagram, now)
        while (dtls_event := dtls.next_event()) is not None:
            connected = connected or isinstance(dtls_event, DtlsConnected)
        if connected:
            for datagram in dtls.datagrams_to_send():  # the client's last flight, if any
                h.router.datagram_received(datagram, client, now)
            return checker, now
        now += 0.05
    return None


def test_viewer_connects_over_ice_lite_and_dtls_and_gets_a_fanout_slot(harness: Harness) -> None:
    harness.router.publish("live", WHIP_OFFER, 0.0)
    session_id, _, _ = connect_viewer(harness, 0.0)
    session = harness.router.get_session(session_id)
    assert session.state is SessionState.CONNECTED
    assert harness.router.fanout.viewer_count == 1


def test_consent_expiry_frees_a_silent_viewer_at_exactly_30_seconds(harness: Harness) -> None:
    """RFC 7675 §5.1: no verified check for 30 s -> session gone, fan-out slot freed."""
    harness.router.publish("live", WHIP_OFFER, 0.0)
    session_id, _, connected_at = connect_viewer(harness, 0.0)
    deadline = harness.router.get_timer()
    assert deadline is not None
    viewer_deadline = harness.router.get_session(session_id).get_timer()
    assert viewer_deadline is not None
    assert viewer_deadline == pytest.approx(connected_at + 30.0, abs=0.06)
    harness.router.handle_timer(viewer_deadline - 0.001)
    assert session_id in harness.router.sessions
    harness.router.handle_timer(viewer_deadline)
    assert session_id not in harness.router.sessions
    assert harness.router.fanout.viewer_count == 0
    assert harness.router.counters["sessions_ended_ice-consent-expired"] == 1
    # The in-memory publisher never connected: it went at its connect deadline (10.0).
    assert harness.router.counters["connect_timeouts_publisher"] == 1


def test_consent_checks_keep_a_viewer_alive(harness: Harness) -> None:
    harness.router.publish("live", WHIP_OFFER, 0.0)
    session_id, checker, now = connect_viewer(harness, 0.0)
    end = now + 120.0
    while now < end:
        now += 0.25
        harness.router.handle_timer(now)
        checker_deadline = checker.get_timer()
        if checker_deadline is not None and now >= checker_deadline:
            checker.handle_timer(now)
        request = checker.next_request(now)
        if request is not None:
            harness.router.datagram_received(request[0], CLIENT, now)
            for response in harness.take_sent():
                checker.receive_stun(response, SERVER, now)
    assert session_id in harness.router.sessions


def test_a_viewer_that_never_checks_is_freed_after_the_consent_timeout() -> None:
    # With a connect timeout longer than consent (test_admission_squatting.py has the
    # default one), consent expiry still frees a session that never checked.
    harness = Harness(connect_timeout=60.0)
    try:
        harness.router.publish("live", WHIP_OFFER, 0.0)
        session, _ = harness.router.view("live", WHEP_OFFER, 1.0)
        harness.router.handle_timer(30.9)
        assert session.id in harness.router.sessions
        harness.router.handle_timer(31.0)
        assert session.id not in harness.router.sessions
    finally:
        harness.close()


def test_counter_offer_expires_when_unanswered() -> None:
    harness = Harness(connect_timeout=60.0)  # the TTL, not the connect deadline, comes first
    try:
        harness.router.publish("live", WHIP_OFFER, 0.0)
        session, offer = harness.router.counter_offer("live", 5.0)
        assert "a=sendonly" in offer and "a=setup:actpass" in offer
        harness.router.handle_timer(34.99)
        assert session.id in harness.router.sessions
        harness.router.handle_timer(35.0)
        with pytest.raises(NotFound):
            harness.router.get_session(session.id)
        assert harness.router.counters["sessions_ended_counter-offer-expired"] == 1
    finally:
        harness.close()


def test_viewer_of_a_stream_without_publisher_gets_409_and_capacity_gets_503() -> None:
    h = Harness(max_viewers=1)
    try:
        with pytest.raises(Conflict) as not_live:
            h.router.view("live", WHEP_OFFER, 0.0)
        assert not_live.value.status == 409 and not_live.value.retry_after
        h.router.publish("live", WHIP_OFFER, 0.0)
        h.router.view("live", WHEP_OFFER, 0.0)
        with pytest.raises(ServiceUnavailable) as full:
            h.router.view("live", WHEP_OFFER, 0.0)
        assert full.value.status == 503 and full.value.retry_after
        # A failed request leaves nothing behind.
        assert len(h.router.sessions) == 2
    finally:
        h.close()


def test_second_publisher_is_refused_and_leaves_no_session(harness: Harness) -> None:
    harness.router.publish("live", WHIP_OFFER, 0.0)
    with pytest.raises(Conflict):
        harness.router.publish("live", WHIP_OFFER, 0.0)
    assert len(harness.router.sessions) == 1


def test_unknown_traffic_is_counted_and_dropped(harness: Harness) -> None:
    router = harness.router
    router.datagram_received(b"\x80" + os.urandom(40), CLIENT, 0.0)  # RTP from nobody
    router.datagram_received(b"\x16\xfe\xfd" + os.urandom(30), CLIENT, 0.0)  # DTLS from nobody
    router.datagram_received(b"\xff" * 20, CLIENT, 0.0)
    router.datagram_received(b"", CLIENT, 0.0)
    stun = IceControllingChecker(
        local_ufrag="abcd",
        local_pwd="x" * 22,
        remote_ufrag="nope",
        remote_pwd="y" * 22,
        remote_candidates=[SERVER],
    ).next_request(0.0)
    assert stun is not None
    router.datagram_received(stun[0], CLIENT, 0.0)
    assert router.counters["drop_unknown_address"] == 2
    assert router.counters["drop_unknown_kind"] == 1
    assert router.counters["drop_empty"] == 1
    assert router.counters["drop_stun_unknown_ufrag"] == 1
    assert harness.sent == []


def test_stream_events_active_viewercount_inactive(harness: Harness) -> None:
    publisher, _ = harness.router.publish("live", WHIP_OFFER, 0.0)
    viewer, _ = harness.router.view("live", WHEP_OFFER, 0.0)
    harness.router.end_session(viewer.id, 1.0)
    harness.router.end_session(publisher.id, 2.0)
    kinds = [(e.type, e.data) for e in harness.events]
    assert kinds == [("viewercount", {"viewercount": 1}), ("viewercount", {"viewercount": 0})]
    # "active" needs the publisher's media keyed; "inactive" is only sent after "active".


def test_ice_restart_issues_new_credentials_and_etag(harness: Harness) -> None:
    publisher, _ = harness.router.publish("live", WHIP_OFFER, 0.0)
    old_etag, old_ufrag = publisher.etag, publisher.local_ufrag
    fragment = sdp.parse_sdpfrag(
        "a=ice-ufrag:newU\r\na=ice-pwd:newpassword0000000000000\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
    )
    answer = sdp.parse_sdpfrag(harness.router.restart_ice(publisher.id, fragment, 1.0))
    assert answer.ufrag == publisher.local_ufrag != old_ufrag
    assert publisher.etag != old_etag
    assert answer.usable_candidates
    harness.router.end_session(publisher.id, 2.0)
    assert not harness.router._by_ufrag  # both ufrags forgotten


def test_a_throttled_keyframe_request_is_deferred_not_dropped(harness: Harness) -> None:
    """A viewer joining within the throttle interval of the last PLI must still get its
    keyframe: the request is sent when the interval ends (browsers send none unasked)."""
    publisher_address = ("127.0.0.1", 50002)
    connect_viewer(harness, 0.0, publisher=True, client=publisher_address)
    sent_at_start = harness.router.counters["keyframe_requests_sent"]
    assert sent_at_start == 1  # the publisher's first keyed moment asks for one
    harness.sent.clear()
    connect_viewer(harness, 0.1)  # within 0.5 s of that request: throttled
    assert harness.router.counters["keyframe_requests_throttled"] >= 1
    assert harness.router.counters["keyframe_requests_sent"] == sent_at_start
    last_request = harness.router.keyframes.last_request("live")
    retry_at = harness.router.get_timer()
    assert retry_at is not None
    assert retry_at == pytest.approx(last_request + 0.5)
    harness.router.handle_timer(retry_at - 0.001)
    assert harness.router.counters["keyframe_requests_sent"] == sent_at_start
    harness.router.handle_timer(retry_at)
    assert harness.router.counters["keyframe_requests_sent"] == sent_at_start + 1
    assert any(addr == publisher_address for _, addr in harness.sent)  # the PLI went upstream


def test_the_final_dtls_flight_leaves_before_the_first_keyframe_request(harness: Harness) -> None:
    """The PLI sent when a publisher becomes keyed is SRTCP; the peer can only read it
    after our Finished, so the handshake flight must be sent first."""
    publisher_address = ("127.0.0.1", 50003)
    order: list[str] = []
    send = harness.router.sender.send

    def classify(data: bytes, addr: tuple[str, int]) -> None:
        if addr == publisher_address:
            order.append("dtls" if 20 <= data[0] <= 63 else "rtcp" if data[0] >= 128 else "stun")
        send(data, addr)

    harness.router.sender.send = classify
    connect_viewer(harness, 0.0, publisher=True, client=publisher_address)
    assert "rtcp" in order
    first_rtcp = order.index("rtcp")
    assert "dtls" in order[:first_rtcp]
    assert "dtls" not in order[first_rtcp:]


class _RecordingFanout:
    """The real Fanout, with the keyframe flag of every push recorded."""

    def __init__(self, inner: _fastpath.Fanout) -> None:
        self._inner = inner
        self.pushes: list[bool] = []

    def push(
        self, track: int, packet: bytes, keyframe: bool = False, now: float | None = None
    ) -> int:
        self.pushes.append(keyframe)
        return (
            self._inner.push(track, packet, keyframe, now)
            if now is not None
            else (self._inner.push(track, packet, keyframe))
        )

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def test_a_retransmitted_keyframe_start_is_not_pushed_as_a_keyframe(harness: Harness) -> None:
    """RFC 4588 §8.3: RTX may resend old packets (Chromium pads with them when probing).
    A resent keyframe start must not start or switch a viewer: it would be renumbered from
    a stale sequence number and every live packet after it would look lost."""
    harness.router.publish("live", WHIP_OFFER, 0.0)
    stream = harness.router.streams["live"]
    track = stream.tracks["video"][0]
    recorder = _RecordingFanout(harness.router.fanout)
    harness.router.ingest.fanout = recorder  # type: ignore[assignment]
    # RTP header (PT 96, seq 1000) + VP8 descriptor with S=1, PID=0 (RFC 7741 §4.2) +
    # a keyframe's first bytes (P=0) and start code 9d 01 2a with 320x240 (RFC 6386 §9.1).
    header = bytes([0x80, 96]) + (1000).to_bytes(2, "big") + (90000).to_bytes(4, "big")
    header += (0x1234).to_bytes(4, "big")
    payload = (
        b"\x10" + bytes([0x50, 0x02, 0x00, 0x9D, 0x01, 0x2A, 0x40, 0x01, 0xF0, 0x00]) + b"\x00" * 40
    )
    harness.router.ingest.push(stream, track, 0x1234, bytearray(header + payload), 1.0)
    harness.router.ingest.push(
        stream, track, 0x1234, bytearray(header + payload), 1.1, retransmission=True
    )
    assert recorder.pushes == [True, False]
