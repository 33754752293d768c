"""Replies leave from the address the peer reached, on a socket bound to the wildcard.

Every 127.x.y.z address is local on Linux loopback, and a datagram to 127.0.0.1 from a
wildcard-bound socket leaves from 127.0.0.1 unless told otherwise. So a peer that checks
our 127.0.0.2 and gets its answers from 127.0.0.1 is exactly the multi-homed failure
(RFC 8445 §7.2.5.2.1: a response from another address fails the check), with no root
and no extra interfaces. The tests look at the source address of what arrives.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import select
import socket
import struct
from collections.abc import AsyncIterator, Iterator

import pytest
from _paths import SDP_FIXTURES
from _peers import (
    DecodingViewer,
    accept_answer,
    only_loopback_candidates,
    sending_peer,
    wait_until,
)
from aioice import stun
from hypothesis import given
from hypothesis import strategies as st
from pylibsrtp import Policy, Session

from whepfan import _fastpath
from whepfan._fastpath import (
    PROFILE_AEAD_AES_128_GCM,
    PROFILE_AEAD_AES_256_GCM,
    PROFILE_AES128_CM_SHA1_32,
    PROFILE_AES128_CM_SHA1_80,
    Fanout,
)
from whepfan.config import MediaConfig
from whepfan.media.router import Router
from whepfan.media.session import SessionState, ViewerSession
from whepfan.media.transport import (
    IP_PKTINFO,
    MediaWorker,
    _pktinfo_address,
    receivable_addresses,
    source_control,
)
from whepfan.protocol import rtp, sdp
from whepfan.protocol.dtls import DtlsCertificate, DtlsConnected, DtlsSession
from whepfan.protocol.ice import IceConnected, IceControllingChecker

WHIP_OFFER = (SDP_FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
WHEP_OFFER = (SDP_FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()

KERNEL_DEFAULT = "127.0.0.1"  # the source the route picks towards a 127.0.0.1 viewer
REACHED = "127.0.0.2"  # the address the viewer's checks went to
OTHER = "127.0.0.3"

LIBSRTP_PROFILE = {
    PROFILE_AES128_CM_SHA1_80: Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    PROFILE_AES128_CM_SHA1_32: Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    PROFILE_AEAD_AES_128_GCM: Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    PROFILE_AEAD_AES_256_GCM: Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}


def inbound_session(profile: int, key: bytes, salt: bytes) -> Session:
    """libsrtp as the viewer: it unprotects what the server protected."""
    return Session(
        Policy(
            key=key + salt,
            ssrc_type=Policy.SSRC_ANY_INBOUND,
            srtp_profile=LIBSRTP_PROFILE[profile],
        )
    )


def rtp_packet(seq: int, *, ssrc: int = 0x1234, payload_type: int = 111) -> bytes:
    # RFC 3550 §5.1: V=2, no padding/extension/CSRC, marker 0.
    return struct.pack("!BBHII", 0x80, payload_type, seq, seq * 960, ssrc) + bytes(range(160))


def receive_all(sock: socket.socket, wait: float = 1.0) -> list[tuple[bytes, tuple[str, int]]]:
    """Everything queued on ``sock`` (waiting up to ``wait`` for the first datagram:
    loopback delivery completes inside the send call, the wait only guards a race)."""
    out: list[tuple[bytes, tuple[str, int]]] = []
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while poller.poll(0 if out else int(wait * 1000)):
        try:
            data, addr = sock.recvfrom(65535)
        except BlockingIOError:
            break
        out.append((data, (addr[0], addr[1])))
    return out


def udp_socket(host: str, family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


# --- the compiled fan-out ---------------------------------------------------------------


class FanoutViewer:
    """A viewer socket on 127.0.0.1 with its keys, attached to a Fanout."""

    def __init__(self, fanout: Fanout, *, source: str | None, rtx: bool = False) -> None:
        self.sock = udp_socket(KERNEL_DEFAULT)
        self.port = self.sock.getsockname()[1]
        self.key, self.salt = os.urandom(16), os.urandom(12)
        self.slot = fanout.add_viewer(
            KERNEL_DEFAULT,
            self.port,
            profile=PROFILE_AEAD_AES_128_GCM,
            tx_key=self.key,
            tx_salt=self.salt,
            rx_key=os.urandom(16),
            rx_salt=os.urandom(12),
            source=source,
        )
        self.ssrc = 0x5000 + self.slot
        self.rtx_ssrc = 0x6000 + self.slot

    def inbound(self) -> Session:
        return inbound_session(PROFILE_AEAD_AES_128_GCM, self.key, self.salt)

    def receive(self) -> list[tuple[bytes, tuple[str, int]]]:
        return receive_all(self.sock)


@pytest.fixture
def server_sock() -> Iterator[socket.socket]:
    sock = udp_socket("0.0.0.0")
    yield sock
    sock.close()


@pytest.fixture
def fanout(server_sock: socket.socket) -> Fanout:
    return Fanout(server_sock.fileno(), max_viewers=8, max_tracks=4)


def subscribe(fanout: Fanout, viewer: FanoutViewer, track: int, *, rtx: bool = False) -> None:
    fanout.subscribe(
        viewer.slot,
        track,
        ssrc=viewer.ssrc,
        payload_type=111,
        rtx_ssrc=viewer.rtx_ssrc if rtx else 0,
        rtx_payload_type=97 if rtx else -1,
        wait_keyframe=False,
    )


def test_fanout_sends_from_a_viewers_source_and_leaves_the_others_to_the_kernel(
    server_sock: socket.socket, fanout: Fanout
) -> None:
    port = server_sock.getsockname()[1]
    sourced = FanoutViewer(fanout, source=REACHED)
    plain = FanoutViewer(fanout, source=None)
    track = fanout.add_track(clock_rate=48000)
    subscribe(fanout, sourced, track)
    subscribe(fanout, plain, track)
    for seq in range(5):
        assert fanout.push(track, rtp_packet(seq)) == 2

    for viewer, expected_source in ((sourced, REACHED), (plain, KERNEL_DEFAULT)):
        received = viewer.receive()
        assert [addr for _, addr in received] == [(expected_source, port)] * 5
        inbound = viewer.inbound()
        plain_packets = [inbound.unprotect(data) for data, _ in received]
        assert [struct.unpack_from("!I", p, 8)[0] for p in plain_packets] == [viewer.ssrc] * 5
        assert all(p[12:] == bytes(range(160)) for p in plain_packets)
    assert fanout.stats()["send_errors"] == 0


def test_resends_rtx_and_sender_reports_leave_from_the_source_too(
    server_sock: socket.socket, fanout: Fanout
) -> None:
    port = server_sock.getsockname()[1]
    sourced = FanoutViewer(fanout, source=REACHED)
    plain = FanoutViewer(fanout, source=None)
    track = fanout.add_track(clock_rate=48000)
    subscribe(fanout, sourced, track, rtx=True)
    subscribe(fanout, plain, track)
    for seq in range(4):
        fanout.push(track, rtp_packet(seq))
    first_sourced = sourced.receive()
    first_plain = plain.receive()
    sourced_inbound, plain_inbound = sourced.inbound(), plain.inbound()
    lost_sourced = struct.unpack_from("!H", sourced_inbound.unprotect(first_sourced[1][0]), 2)[0]
    lost_plain = struct.unpack_from("!H", plain_inbound.unprotect(first_plain[2][0]), 2)[0]

    # RFC 4588 §4: the RTX packet carries the original sequence number first.
    assert fanout.resend(sourced.slot, track, [lost_sourced]) == 1
    assert fanout.resend(plain.slot, track, [lost_plain]) == 1
    [(rtx, rtx_from)] = sourced.receive()
    [(resent, resent_from)] = plain.receive()
    assert rtx_from == (REACHED, port)
    assert resent_from == (KERNEL_DEFAULT, port)
    rtx_plain = sourced_inbound.unprotect(rtx)
    assert struct.unpack_from("!I", rtx_plain, 8)[0] == sourced.rtx_ssrc
    assert struct.unpack_from("!H", rtx_plain, 12)[0] == lost_sourced
    assert struct.unpack_from("!H", plain.inbound().unprotect(resent), 2)[0] == lost_plain

    # RFC 3550 §6.4.1 sender reports and protected RTCP take the same path.
    assert fanout.send_sender_reports(track, 0x1234_5678_9ABC_DEF0, 12345) == 2
    bye = struct.pack("!BBHI", 0x81, 203, 1, sourced.ssrc)  # RFC 3550 §6.6 BYE
    assert fanout.send_rtcp(sourced.slot, bye) == 1
    sourced_rtcp = sourced.receive()
    assert [addr for _, addr in sourced_rtcp] == [(REACHED, port)] * 2
    assert sourced_inbound.unprotect_rtcp(sourced_rtcp[0][0])[1] == 200
    assert sourced_inbound.unprotect_rtcp(sourced_rtcp[1][0]) == bye
    [(_, report_from)] = plain.receive()
    assert report_from == (KERNEL_DEFAULT, port)


def test_a_new_selected_pair_changes_or_clears_the_source(
    server_sock: socket.socket, fanout: Fanout
) -> None:
    port = server_sock.getsockname()[1]
    viewer = FanoutViewer(fanout, source=REACHED)
    track = fanout.add_track(clock_rate=48000)
    subscribe(fanout, viewer, track)
    seen = []
    for seq, source in enumerate((OTHER, None, REACHED)):
        fanout.set_viewer_address(viewer.slot, KERNEL_DEFAULT, viewer.port, source=source)
        fanout.push(track, rtp_packet(seq))
        [(_, addr)] = viewer.receive()
        seen.append(addr[0])
    assert seen == [OTHER, KERNEL_DEFAULT, REACHED]
    assert addr == (REACHED, port)


def test_a_bad_source_is_refused_and_leaves_the_viewer_as_it_was(
    server_sock: socket.socket, fanout: Fanout
) -> None:
    viewer = FanoutViewer(fanout, source=REACHED)
    track = fanout.add_track(clock_rate=48000)
    subscribe(fanout, viewer, track)
    for bad in ("localhost", "::1", "not an address", "127.0.0.256"):
        with pytest.raises(ValueError):
            fanout.set_viewer_address(viewer.slot, KERNEL_DEFAULT, viewer.port, source=bad)
        with pytest.raises(ValueError):
            FanoutViewer(fanout, source=bad)
    assert fanout.viewer_count == 1
    fanout.push(track, rtp_packet(0))
    [(_, addr)] = viewer.receive()
    assert addr[0] == REACHED


def test_dual_stack_socket_sends_from_an_ipv4_mapped_source() -> None:
    try:
        server = udp_socket("::", socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 on this host")
    try:
        fanout = Fanout(server.fileno(), max_viewers=4, max_tracks=2)
        sourced = FanoutViewer(fanout, source=REACHED)  # given as IPv4: mapped on send
        mapped = FanoutViewer(fanout, source=f"::ffff:{OTHER}")
        plain = FanoutViewer(fanout, source=None)
        track = fanout.add_track(clock_rate=48000)
        for viewer in (sourced, mapped, plain):
            subscribe(fanout, viewer, track)
        assert fanout.push(track, rtp_packet(0)) == 3
        assert [v.receive()[0][1][0] for v in (sourced, mapped, plain)] == [
            REACHED,
            OTHER,
            KERNEL_DEFAULT,
        ]
    finally:
        server.close()


# --- the transport's pktinfo encoding -----------------------------------------------------


@given(st.ip_addresses(v=4))
def test_ipv4_source_control_is_an_in_pktinfo_naming_the_source(address: object) -> None:
    [(level, kind, data)] = source_control(socket.AF_INET, str(address))
    assert (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO)
    # struct in_pktinfo: ifindex 0 (route's choice), ipi_spec_dst = source, ipi_addr unused.
    ifindex, spec_dst, header_dst = struct.unpack("=i4s4s", data)
    assert (ifindex, header_dst) == (0, bytes(4))
    # Received, the header's destination is ipi_addr (ipi_spec_dst the routing source).
    received = struct.pack("=i4s4s", 1, bytes(4), spec_dst)
    assert ipaddress.ip_address(_pktinfo_address(received)) == address


@given(st.ip_addresses(v=6))
def test_ipv6_source_control_round_trips_through_the_received_form(address: object) -> None:
    [(level, kind, data)] = source_control(socket.AF_INET6, str(address))
    assert (level, kind) == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)
    assert len(data) == 20  # struct in6_pktinfo
    # inet_ntop and ipaddress spell some addresses differently (::ffff:0.0.0.0 / ::ffff:0:0).
    assert ipaddress.ip_address(_pktinfo_address(data)) == address


def test_ipv6_link_local_source_keeps_its_interface() -> None:
    [(_, _, data)] = source_control(socket.AF_INET6, "fe80::1%1")
    assert struct.unpack_from("=I", data, 16)[0] == 1
    assert _pktinfo_address(data) == "fe80::1%1"
    [(_, _, mapped)] = source_control(socket.AF_INET6, REACHED)
    assert _pktinfo_address(mapped) == f"::ffff:{REACHED}"
    with pytest.raises(ValueError):
        source_control(socket.AF_INET, "::1")


# --- the router, sans-IO ------------------------------------------------------------------


class RecordingRouter:
    """A Router whose sends are recorded with the source they were given."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sent: list[tuple[bytes, tuple[str, int], str | None]] = []
        self.router = Router(
            # Sessions here are checked (STUN) but mostly never keyed: the connect deadline
            # (10 s) is pushed out so the consent rules of RFC 7675 are what these tests see.
            config=MediaConfig(udp_host="0.0.0.0", udp_port=0, connect_timeout=60.0),
            certificate=DtlsCertificate.generate(),
            fanout=_fastpath.Fanout(self.sock.fileno(), max_viewers=8),
            send=lambda data, addr: self.sent.append((data, addr, None)),
            send_from=lambda data, addr, source: self.sent.append((data, addr, source)),
            candidates=[
                sdp.Candidate.parse(f"1 1 udp 2130706431 {REACHED} 40000 typ host"),
                sdp.Candidate.parse(f"2 1 udp 2130706175 {OTHER} 40000 typ host"),
            ],
        )
        self.router.publish("live", WHIP_OFFER, 0.0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def recording() -> Iterator[RecordingRouter]:
    harness = RecordingRouter()
    yield harness
    harness.close()


def credentials(sdp_text: str) -> tuple[str, str]:
    ufrag = re.search(r"a=ice-ufrag:(\S+)", sdp_text)
    pwd = re.search(r"a=ice-pwd:(\S+)", sdp_text)
    assert ufrag and pwd
    return ufrag.group(1), pwd.group(1)


def binding_request(session: ViewerSession, offer: str, *, nominate: bool) -> bytes:
    """A connectivity check from the viewer (RFC 8445 §7.2.2), USE-CANDIDATE if nominating."""
    ufrag, _ = credentials(offer)
    attributes: dict[str, object] = {
        "USERNAME": f"{session.local_ufrag}:{ufrag}",
        "PRIORITY": 2130706431,
        "ICE-CONTROLLING": 1,
    }
    if nominate:
        attributes["USE-CANDIDATE"] = None
    request = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.REQUEST,
        attributes=attributes,
    )
    request.add_message_integrity(session.local_pwd.encode())
    return bytes(request)


VIEWER = ("127.0.0.1", 50001)


def test_router_answers_each_check_from_the_address_it_reached(
    recording: RecordingRouter,
) -> None:
    session, _ = recording.router.view("live", WHEP_OFFER, 0.0)
    assert isinstance(session, ViewerSession)
    for local in (OTHER, REACHED):
        recording.router.datagram_received(
            binding_request(session, WHEP_OFFER, nominate=False), VIEWER, 0.1, local
        )
    assert [(addr, source) for _, addr, source in recording.sent] == [
        (VIEWER, OTHER),
        (VIEWER, REACHED),
    ]
    assert all(data[:2] == b"\x01\x01" for data, _, _ in recording.sent)  # success responses
    # The first verified pair carries DTLS until one is nominated (RFC 8445 §7.3.1.5).
    assert (session.address, session.local_address) == (VIEWER, OTHER)


def test_nomination_of_a_pair_with_the_same_remote_address_moves_the_local_one(
    recording: RecordingRouter,
) -> None:
    session, _ = recording.router.view("live", WHEP_OFFER, 0.0)
    assert isinstance(session, ViewerSession)
    recording.router.datagram_received(
        binding_request(session, WHEP_OFFER, nominate=False), VIEWER, 0.1, OTHER
    )
    recording.router.datagram_received(
        binding_request(session, WHEP_OFFER, nominate=True), VIEWER, 0.2, REACHED
    )
    assert (session.address, session.local_address) == (VIEWER, REACHED)
    assert session.state is SessionState.CHECKED


def test_without_a_local_address_the_router_sends_as_before(recording: RecordingRouter) -> None:
    session, _ = recording.router.view("live", WHEP_OFFER, 0.0)
    assert isinstance(session, ViewerSession)
    recording.router.datagram_received(
        binding_request(session, WHEP_OFFER, nominate=True), VIEWER, 0.1
    )
    assert [(addr, source) for _, addr, source in recording.sent] == [(VIEWER, None)]
    assert session.local_address is None


def test_the_fanout_gets_a_source_only_where_the_kernel_would_pick_another(
    recording: RecordingRouter,
) -> None:
    # Every datagram with a source carries a control message the kernel must read; a
    # viewer that reached the address the route would use anyway needs none.
    router = recording.router
    router.sender.default_source = lambda peer: "127.0.0.1"
    assert router.sender.fanout_source("127.0.0.1", VIEWER) is None
    assert router.sender.fanout_source(REACHED, VIEWER) == REACHED
    assert router.sender.fanout_source(None, VIEWER) is None
    router.sender.default_source = lambda peer: None  # no route: keep the learned address
    assert router.sender.fanout_source(REACHED, VIEWER) == REACHED
    router.sender.default_source = None  # a driver that cannot tell: always the learned one
    assert router.sender.fanout_source("127.0.0.1", VIEWER) == "127.0.0.1"


# --- the media worker on a wildcard socket, end to end ------------------------------------


@pytest.fixture
async def wildcard_worker() -> AsyncIterator[MediaWorker]:
    config = MediaConfig(udp_host="0.0.0.0", udp_port=0, public_ips=(REACHED,))
    worker = MediaWorker(config=config, certificate=DtlsCertificate.generate())
    await worker.start()
    yield worker
    worker.close()


async def receive_from(
    sock: socket.socket, wait: float = 2.0
) -> tuple[bytes, tuple[str, int]] | None:
    loop = asyncio.get_running_loop()
    try:
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), wait)
    except TimeoutError:
        return None
    return data, (addr[0], addr[1])


async def test_stun_dtls_and_srtp_all_arrive_from_the_address_the_viewer_checked(
    wildcard_worker: MediaWorker,
) -> None:
    """A viewer on 127.0.0.1 checks our 127.0.0.2 candidate on a 0.0.0.0 socket: without
    pktinfo every reply would come from 127.0.0.1 and fail its 5-tuple checks."""
    worker = wildcard_worker
    assert worker.learns_local_address
    server = (REACHED, worker.port)
    [candidate] = worker.router.candidates
    assert (candidate.address, candidate.port) == server
    worker.router.publish("live", WHIP_OFFER, worker.now())
    client_certificate = DtlsCertificate.generate()
    algorithm, value = client_certificate.fingerprints[0]
    offer = re.sub(r"a=fingerprint:\S+ \S+", f"a=fingerprint:{algorithm} {value}", WHEP_OFFER)
    session, answer = worker.router.view("live", offer, worker.now())
    ufrag, pwd = credentials(offer)
    checker = IceControllingChecker(
        local_ufrag=ufrag,
        local_pwd=pwd,
        remote_ufrag=session.local_ufrag,
        remote_pwd=session.local_pwd,
        remote_candidates=[server],
    )
    fingerprints = re.findall(r"a=fingerprint:(\S+) (\S+)", answer)
    dtls = DtlsSession(
        certificate=client_certificate, role="client", remote_fingerprints=fingerprints
    )
    sock = udp_socket(KERNEL_DEFAULT)
    sources: list[tuple[str, int]] = []
    keys: DtlsConnected | None = None
    try:
        for _ in range(100):
            now = worker.now()
            while (request := checker.next_request(now)) is not None:
                sock.sendto(request[0], request[1])
            for datagram in dtls.datagrams_to_send():
                sock.sendto(datagram, server)
            if keys is not None:
                break
            received = await receive_from(sock, wait=0.2)
            if received is None:
                continue
            data, addr = received
            sources.append(addr)
            if data[0] < 4:  # RFC 7983 §7: STUN
                checker.receive_stun(data, addr, worker.now())
            else:
                dtls.receive(data, worker.now())
            while (event := checker.next_event()) is not None:
                if isinstance(event, IceConnected):
                    dtls.start(worker.now())
            while (dtls_event := dtls.next_event()) is not None:
                if isinstance(dtls_event, DtlsConnected):
                    keys = dtls_event
        assert keys is not None, "viewer did not connect"
        assert sources and set(sources) == {server}
        assert len(sources) >= 2  # at least one STUN response and one DTLS flight

        # Media from the compiled fan-out: the audio track, decrypted by libsrtp.
        for _ in range(50):
            if session.state is SessionState.CONNECTED:
                break
            await asyncio.sleep(0.02)  # the client's last DTLS flight is on its way
        assert isinstance(session, ViewerSession) and session.fanout_slot is not None
        assert session.local_address == REACHED
        stream = worker.router.streams["live"]
        audio = stream.tracks["audio"][0]
        assert worker.fanout.push(audio.fanout_id, rtp_packet(1, payload_type=111)) == 1
        inbound = inbound_session(keys.profile, keys.remote_key, keys.remote_salt)
        while (media := await receive_from(sock)) is not None:
            data, addr = media
            assert addr == server
            if 128 <= data[0] < 192 and not 192 <= data[1] <= 223:  # RTP, not RTCP
                plain = inbound.unprotect(data)
                # The payload as pushed; the header gained the viewer's transport-wide
                # sequence number (its Chromium offer negotiated transport-cc).
                assert rtp.RtpPacket.parse(plain).payload == bytes(range(160))
                break
        else:
            raise AssertionError("no SRTP media arrived")
    finally:
        sock.close()


async def test_a_wildcard_worker_reads_the_kernels_default_source_per_peer(
    wildcard_worker: MediaWorker,
) -> None:
    # On loopback the route to any 127/8 peer gives 127.0.0.1 (REACHED is another address).
    assert wildcard_worker.default_source(("127.0.0.1", 9)) == "127.0.0.1"
    assert wildcard_worker.default_source(("127.0.0.1", 9)) != REACHED
    assert wildcard_worker.router.sender.fanout_source(REACHED, ("127.0.0.1", 9)) == REACHED
    assert wildcard_worker.router.sender.fanout_source("127.0.0.1", ("127.0.0.1", 9)) is None


async def test_a_worker_bound_to_one_address_does_not_ask_for_pktinfo() -> None:
    config = MediaConfig(udp_host="127.0.0.1", udp_port=0, public_ips=("127.0.0.1",))
    worker = MediaWorker(config=config, certificate=DtlsCertificate.generate())
    try:
        assert not worker.learns_local_address
        assert not worker.sock.getsockopt(socket.IPPROTO_IP, IP_PKTINFO)
    finally:
        worker.close()


# --- real WebRTC peers (aiortc) -----------------------------------------------------------


async def test_aiortc_publisher_and_viewer_connect_through_a_secondary_address(
    wildcard_worker: MediaWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aioice fails a check whose response comes from another address than it checked
    (RFC 8445 §7.2.5.2.1): both peers sit on 127.0.0.1 and reach only our 127.0.0.2."""
    only_loopback_candidates(monkeypatch)
    worker = wildcard_worker
    publisher_pc = await sending_peer()
    publisher, answer = worker.router.publish(
        "live", publisher_pc.localDescription.sdp, worker.now()
    )
    await accept_answer(publisher_pc, answer)
    assert await wait_until(lambda: publisher.state is SessionState.CONNECTED)
    viewer = DecodingViewer()
    try:
        offer = await viewer.offer()
        session, answer = worker.router.view("live", offer, worker.now())
        await viewer.accept(answer)
        await viewer.wait_frames(3)
        assert publisher.local_address == REACHED
        assert session.local_address == REACHED
        assert worker.router.counters["send_buffer_full"] == 0
    finally:
        await viewer.close()
        await publisher_pc.close()


async def test_a_dual_stack_worker_learns_and_answers_from_an_ipv4_mapped_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = MediaConfig(udp_host="::", udp_port=0, public_ips=(REACHED,))
    try:
        worker = MediaWorker(config=config, certificate=DtlsCertificate.generate())
    except OSError:
        pytest.skip("no IPv6 on this host")
    received: list[tuple[bytes, tuple[str, int], str | None]] = []

    def record(data: bytes, addr: tuple[str, int], now: float, local: str | None) -> None:
        received.append((data, addr, local))

    monkeypatch.setattr(worker.router, "datagram_received", record)
    await worker.start()
    sock = udp_socket(KERNEL_DEFAULT)
    try:
        assert worker.learns_local_address
        sock.sendto(b"\x17hello", (REACHED, worker.port))
        assert await wait_until(lambda: bool(received), timeout=2.0)
        [(data, addr, local)] = received
        assert (data, addr) == (b"\x17hello", (f"::ffff:{KERNEL_DEFAULT}", sock.getsockname()[1]))
        assert local == f"::ffff:{REACHED}"
        worker._sendto_from(b"\x17reply", addr, local)
        reply = await receive_from(sock)
        assert reply == (b"\x17reply", (REACHED, worker.port))
    finally:
        sock.close()
        worker.close()


class FullOnce:
    """The worker's socket, whose send buffer is full for the first ``full`` sends."""

    def __init__(self, sock: socket.socket, full: int) -> None:
        self.sock = sock
        self.full = full

    def _maybe_full(self) -> None:
        if self.full:
            self.full -= 1
            raise BlockingIOError

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self._maybe_full()
        return self.sock.sendto(data, addr)

    def sendmsg(self, buffers: list[bytes], control: object, flags: int, addr: object) -> int:
        self._maybe_full()
        return self.sock.sendmsg(buffers, control, flags, addr)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


async def test_replies_that_meet_a_full_send_buffer_wait_and_leave_in_order(
    wildcard_worker: MediaWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = wildcard_worker
    monkeypatch.setattr(worker, "sock", FullOnce(worker.sock, full=1))
    sock = udp_socket(KERNEL_DEFAULT)
    viewer = (KERNEL_DEFAULT, sock.getsockname()[1])
    try:
        worker._sendto_from(b"\x16first", viewer, REACHED)  # meets the full buffer: held
        worker._sendto(b"\x16second", viewer)  # queued behind it, not ahead
        worker._sendto_from(b"\x16third", viewer, REACHED)
        arrived = [await receive_from(sock) for _ in range(3)]
        assert arrived == [
            (b"\x16first", (REACHED, worker.port)),
            (b"\x16second", (KERNEL_DEFAULT, worker.port)),
            (b"\x16third", (REACHED, worker.port)),
        ]
        assert worker.router.counters["send_buffer_full"] == 0
        assert not worker._backlog
    finally:
        sock.close()


# --- the selected pair is (local address, remote address) ---------------------------------


class RecordingFanout:
    """The router's Fanout, with the addresses and sources it is given recorded."""

    def __init__(self, fanout: _fastpath.Fanout) -> None:
        self._fanout = fanout
        self.addresses: list[tuple[int, str, int, str | None]] = []

    def set_viewer_address(self, slot: int, host: str, port: int, *, source: str | None) -> None:
        self.addresses.append((slot, host, port, source))
        self._fanout.set_viewer_address(slot, host, port, source=source)

    def __getattr__(self, name: str) -> object:
        return getattr(self._fanout, name)


def keyed_viewer(recording: RecordingRouter, local: str) -> ViewerSession:
    """A viewer that nominated (``local``, VIEWER) and finished DTLS, all in memory."""
    client_certificate = DtlsCertificate.generate()
    algorithm, value = client_certificate.fingerprints[0]
    offer = re.sub(r"a=fingerprint:\S+ \S+", f"a=fingerprint:{algorithm} {value}", WHEP_OFFER)
    router = recording.router
    session, answer = router.view("live", offer, 0.0)
    assert isinstance(session, ViewerSession)
    router.datagram_received(binding_request(session, offer, nominate=True), VIEWER, 0.1, local)
    dtls = DtlsSession(
        certificate=client_certificate,
        role="client",
        remote_fingerprints=re.findall(r"a=fingerprint:(\S+) (\S+)", answer),
    )
    dtls.start(0.1)
    for _ in range(10):
        for datagram in dtls.datagrams_to_send():
            router.datagram_received(datagram, VIEWER, 0.2, local)
        replies, recording.sent[:] = list(recording.sent), []
        for data, addr, source in replies:
            assert (addr, source) == (VIEWER, local)
            if 20 <= data[0] <= 63:  # RFC 7983 §7: DTLS
                dtls.receive(data, 0.2)
        if session.state is SessionState.CONNECTED:
            break
    assert session.state is SessionState.CONNECTED and session.fanout_slot is not None
    return session


def test_nomination_moving_only_the_local_address_repoints_a_keyed_viewer(
    recording: RecordingRouter,
) -> None:
    # RFC 8445 §7.3.1.5: (OTHER, VIEWER) after (REACHED, VIEWER) is a new selected pair,
    # though the remote address is the same: media, RTCP and replies move to OTHER.
    session = keyed_viewer(recording, REACHED)
    fanout = RecordingFanout(recording.router.fanout)
    recording.router.egress.fanout = fanout  # type: ignore[assignment]
    recording.router.datagram_received(
        binding_request(session, WHEP_OFFER, nominate=True), VIEWER, 1.0, OTHER
    )
    assert (session.address, session.local_address) == (VIEWER, OTHER)
    assert fanout.addresses == [(session.fanout_slot, VIEWER[0], VIEWER[1], OTHER)]
    assert [(addr, source) for _, addr, source in recording.sent] == [(VIEWER, OTHER)]
    # Nominating the same pair again (aggressive nomination) changes nothing.
    recording.router.datagram_received(
        binding_request(session, WHEP_OFFER, nominate=True), VIEWER, 2.0, OTHER
    )
    assert len(fanout.addresses) == 1


def test_checks_on_a_non_selected_local_address_do_not_keep_the_viewer(
    recording: RecordingRouter,
) -> None:
    # RFC 7675 §5.1: consent belongs to the selected pair. Checks keep arriving from the
    # viewer's address at our other address, and are answered, but the session ends
    # 30 s after the last check on (REACHED, VIEWER).
    router = recording.router
    session, _ = router.view("live", WHEP_OFFER, 0.0)
    assert isinstance(session, ViewerSession)
    router.datagram_received(
        binding_request(session, WHEP_OFFER, nominate=True), VIEWER, 0.5, REACHED
    )
    for now in (5.0, 10.0, 15.0, 20.0, 25.0, 30.0):
        router.datagram_received(
            binding_request(session, WHEP_OFFER, nominate=False), VIEWER, now, OTHER
        )
    assert [source for _, _, source in recording.sent] == [REACHED] + [OTHER] * 6
    assert session.get_timer() == 30.5
    router.handle_timer(30.499)
    assert session.id in router.sessions
    router.handle_timer(30.5)
    assert session.id not in router.sessions
    assert session.local_address == REACHED  # a check is not a nomination


def test_a_wildcard_ipv4_socket_advertises_no_ipv6_address() -> None:
    """An IPv4 socket bound to 0.0.0.0 cannot receive what a peer sends to an IPv6
    candidate; a dual-stack ``::`` socket receives both (IPv4-mapped)."""
    found = ["192.0.2.7", "2001:db8::7", "198.51.100.1"]
    assert receivable_addresses(found, socket.AF_INET) == ["192.0.2.7", "198.51.100.1"]
    assert receivable_addresses(found, socket.AF_INET6) == found


async def test_a_wildcard_ipv4_worker_offers_only_ipv4_candidates() -> None:
    worker = MediaWorker(
        config=MediaConfig(udp_host="0.0.0.0", udp_port=0), certificate=DtlsCertificate.generate()
    )
    try:
        addresses = [c.address for c in worker.router.candidates]
        assert addresses and all(ipaddress.ip_address(a).version == 4 for a in addresses)
    finally:
        worker.close()
