"""The client side of one WHIP/WHEP session's transport, sans-IO: full ICE in the
controlling role, the DTLS-SRTP handshake in whichever role the answer leaves us, and
the SDP offers the client tools send.

Theory of operation
-------------------
A WHIP/WHEP client is the offerer, so with two full ICE agents it is the controlling one
(RFC 8445 §6.1.1); against an ICE-lite server it is controlling anyway (§6.1.1 again).
``ClientTransport`` combines:

- ``IceControllingChecker`` (protocol/ice.py) for our checks to the server's candidates,
  with aggressive nomination;
- a responder for the checks a *full* ICE server sends us (aiortc, Janus, ...): a
  controlled agent completes only once its own triggered check on the nominated pair
  succeeds (RFC 8445 §7.3.1.4, §7.3.1.5), and keeps sending consent checks that need
  answers (RFC 7675 §5.1);
- ``DtlsSession``: we offer ``a=setup:actpass`` and the answer picks our role
  (RFC 8842 §5.5): ``passive`` makes us the DTLS client, ``active`` the server.

Datagrams are demultiplexed by their first byte (RFC 7983 §7); SRTP and SRTCP are
handed back to the caller untouched, since media belongs to the I/O driver (the
publisher protects in Python, the load-test viewers unprotect in the compiled core).
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from aioice import stun

from whepfan.errors import ParseError
from whepfan.protocol import ice, rtp
from whepfan.protocol.demux import PacketKind, classify_datagram
from whepfan.protocol.dtls import (
    DtlsCertificate,
    DtlsClosed,
    DtlsConnected,
    DtlsFailed,
    DtlsSession,
)
from whepfan.protocol.negotiation import RemoteTransport
from whepfan.protocol.sdp import (
    Candidate,
    Codec,
    Extmap,
    Group,
    MediaSection,
    Origin,
    Rid,
    SessionDescription,
    Simulcast,
    SimulcastStream,
    SsrcAttribute,
)

Address = ice.Address

# Header extension URIs the client tools put in offers (RFC 8843 §15, RFC 8852 §3.1/§3.2).
URI_MID = rtp.URI_MID
URI_RID = rtp.URI_RTP_STREAM_ID
URI_REPAIRED_RID = rtp.URI_REPAIRED_RTP_STREAM_ID
# Chromium's ids, so servers that special-case them see familiar numbers.
EXTENSION_ID_MID = 4
EXTENSION_ID_RID = 10
EXTENSION_ID_REPAIRED_RID = 11

OPUS_PAYLOAD_TYPE = 111
VP8_PAYLOAD_TYPE = 96
H264_PAYLOAD_TYPE = 102
VIDEO_FEEDBACK = ("goog-remb", "ccm fir", "nack", "nack pli")

#: Video codecs of the client tools: SDP encoding name and format parameters.
VIDEO_CODECS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "vp8": ("VP8", ()),
    # Constrained Baseline 3.1, packetization-mode 1: what every WebRTC H.264 decoder
    # takes (RFC 6184 §8.1; RFC 7742 §6.2 makes Constrained Baseline mandatory).
    "h264": (
        "H264",
        (
            ("level-asymmetry-allowed", "1"),
            ("packetization-mode", "1"),
            ("profile-level-id", "42e01f"),
        ),
    ),
}

#: Default number of simulcast encodings and their rids, lowest first, as Chromium names
#: and orders them (RFC 8853 §5.1: the order in a=simulcast is the sender's preference).
SIMULCAST_RIDS = ("q", "h", "f")


def new_ice_credentials() -> tuple[str, str]:
    """A ufrag (24 bits of randomness minimum, RFC 8445 §5.3) and a password (128 bits)."""
    return secrets.token_hex(4), secrets.token_hex(16)


def host_candidate(address: str, port: int) -> Candidate:
    """Our single host candidate; priority per RFC 8445 §5.1.2.1 (type preference 126)."""
    return Candidate(
        foundation="1",
        component=1,
        transport="udp",
        priority=(126 << 24) | (65535 << 8) | 255,
        address=address,
        port=port,
        type="host",
    )


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportConnected:
    """ICE selected ``address`` and DTLS produced SRTP keys."""

    address: Address
    keys: DtlsConnected


@dataclass(frozen=True)
class TransportFailed:
    reason: str


@dataclass(frozen=True)
class IceSelected:
    """ICE is connected (the nominated check succeeded); DTLS may still be running."""

    address: Address


TransportEvent = TransportConnected | TransportFailed | IceSelected


# --- diagnosis -------------------------------------------------------------------------


def format_address(address: Address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateAttempt:
    """What became of one remote candidate from the answer."""

    address: Address
    checks_sent: int  # Binding requests, retransmissions included (RFC 8489 §6.2.1)
    datagrams_heard: int  # anything received from this address
    selected: bool = False
    failed: bool = False
    error_code: int | None = None  # STUN error response code, when that failed it

    def __str__(self) -> str:
        where = format_address(self.address)
        if self.selected:
            return f"{where} selected"
        if self.error_code is not None:
            outcome = f"check failed with STUN error {self.error_code}"
        elif self.failed:
            outcome = f"no answer to {self.checks_sent} checks"
        elif self.checks_sent:
            outcome = f"{self.checks_sent} checks sent, no answer yet"
        else:
            outcome = "not checked yet"
        heard = f", {self.datagrams_heard} datagrams heard" if self.datagrams_heard else ""
        return f"{where} {outcome}{heard}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportDiagnosis:
    """Where one session's connection stands: for the error of a client that did not
    connect in time ("not connected within 10 s" alone leaves the operator guessing)."""

    ice_state: str  # "checking", "connected", "failed" or "disconnected" (consent lost)
    dtls_state: str  # DtlsSession.state: "new", "connecting", "connected", ...
    dtls_role: str  # "client" or "server"
    local_address: Address | None
    candidates: tuple[CandidateAttempt, ...]
    skipped: tuple[str, ...] = ()  # answer candidates ICE cannot pair, and why

    def __str__(self) -> str:
        parts = [f"ICE {self.ice_state}, DTLS {self.dtls_state} (as DTLS {self.dtls_role})"]
        if self.local_address is not None:
            parts.append(f"local candidate {format_address(self.local_address)}")
        tried = "; ".join(str(c) for c in self.candidates) or "none usable"
        parts.append(f"remote candidates from the answer: {tried}")
        if self.skipped:
            parts.append("skipped: " + "; ".join(self.skipped))
        if self.ice_state == "checking" and not any(c.datagrams_heard for c in self.candidates):
            # The likeliest cause, said plainly: the server advertises an address its
            # socket does not listen on, or something between drops UDP.
            parts.append(
                "nothing came back from any candidate: is the server's media port reachable "
                "at these addresses (its --udp / --public-ip), and is UDP allowed between?"
            )
        return "; ".join(parts)


class ClientTransport:
    """ICE + DTLS of one client session, driven by datagrams and ``now``.

    Driving it: ``start(now)``; send ``datagrams_to_send(now)``; feed every datagram from
    the socket to ``receive`` (it returns SRTP/SRTCP for the caller, None otherwise);
    call ``handle_timer`` at ``get_timer()``; read ``next_event()`` after each call.
    """

    def __init__(
        self,
        *,
        certificate: DtlsCertificate,
        local_ufrag: str,
        local_pwd: str,
        remote: RemoteTransport,
        dtls_role: str,
        local_address: Address | None = None,
    ) -> None:
        self.local_ufrag = local_ufrag
        self.local_pwd = local_pwd
        self.dtls_role = dtls_role
        # Our host candidate, only to report it (diagnosis()).
        self.local_address = local_address
        self._remote = remote
        candidates: list[Address] = []
        self._skipped: list[str] = []
        for c in remote.candidates:
            if c.usable and c.component == 1 and c.transport.lower() == "udp":
                candidates.append((c.address, c.port))
            else:
                # One component with rtcp-mux (RFC 8843 §9.3), UDP only: the rest is
                # listed in the diagnosis, not silently ignored.
                self._skipped.append(f"{c.transport} {c.address}:{c.port} component {c.component}")
        self._candidate_count = len(candidates)
        self._failed_candidates: set[Address] = set()
        self._check_errors: dict[Address, int | None] = {}
        self._checks_sent: dict[Address, int] = dict.fromkeys(candidates, 0)
        self._heard: dict[Address, int] = {}
        self._ice_state = "checking"
        self.checker = ice.IceControllingChecker(
            local_ufrag=local_ufrag,
            local_pwd=local_pwd,
            remote_ufrag=remote.ice_ufrag,
            remote_pwd=remote.ice_pwd,
            remote_candidates=candidates,
        )
        self.dtls = DtlsSession(
            certificate=certificate,
            role=dtls_role,
            remote_fingerprints=remote.fingerprints,
        )
        self._dtls_address: Address | None = None
        self._outgoing: list[tuple[bytes, Address]] = []
        self._events: deque[TransportEvent] = deque()
        self._done = False
        self.stun_requests_answered = 0

    @property
    def selected_address(self) -> Address | None:
        return self.checker.selected_address

    def start(self, now: float) -> None:
        if self._candidate_count == 0:
            self._ice_state = "failed"
            skipped = f" (it has {'; '.join(self._skipped)})" if self._skipped else ""
            self._fail(f"the answer has no UDP candidate for component 1{skipped}")
            return
        self._pump(now)

    def receive(self, data: bytes, addr: Address, now: float) -> bytes | None:
        key = (addr[0], addr[1])
        self._heard[key] = self._heard.get(key, 0) + 1
        kind = classify_datagram(data)
        if kind is PacketKind.STUN:
            if data[0:2] == b"\x00\x01":
                reply = answer_binding_request(
                    data, addr, local_ufrag=self.local_ufrag, local_pwd=self.local_pwd
                )
                if reply is not None:
                    self.stun_requests_answered += 1
                    self._outgoing.append((reply, addr))
            else:
                self.checker.receive_stun(data, addr, now)
        elif kind is PacketKind.DTLS:
            if self._dtls_address is None:
                # A DTLS server hears the ClientHello before or just after ICE picks
                # the pair; the pair is the same 5-tuple (RFC 8445 §12).
                self._dtls_address = addr
            self.dtls.receive(data, now)
        elif kind is PacketKind.RTP_OR_RTCP:
            return data
        self._pump(now)
        return None

    def get_timer(self) -> float | None:
        deadlines = [t for t in (self.checker.get_timer(), self.dtls.get_timer()) if t is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        self.checker.handle_timer(now)
        self.dtls.handle_timer(now)
        self._pump(now)

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        datagrams, self._outgoing = self._outgoing, []
        return datagrams

    def next_event(self) -> TransportEvent | None:
        return self._events.popleft() if self._events else None

    def diagnosis(self) -> TransportDiagnosis:
        """What was tried and how far it got (for a client that gives up waiting)."""
        selected = self.checker.selected_address
        attempts = tuple(
            CandidateAttempt(
                address=address,
                checks_sent=sent,
                datagrams_heard=self._heard.get((address[0], address[1]), 0),
                selected=address == selected,
                failed=address in self._failed_candidates,
                error_code=self._check_errors.get(address),
            )
            for address, sent in self._checks_sent.items()
        )
        return TransportDiagnosis(
            ice_state=self._ice_state,
            dtls_state=self.dtls.state,
            dtls_role=self.dtls_role,
            local_address=self.local_address,
            candidates=attempts,
            skipped=tuple(self._skipped),
        )

    def close(self) -> None:
        """Queue DTLS close_notify (sent by the next ``datagrams_to_send``)."""
        self.dtls.close()
        self._flush_dtls()
        self._done = True

    # -- internals ---------------------------------------------------------------------

    def _pump(self, now: float) -> None:
        while (request := self.checker.next_request(now)) is not None:
            self._outgoing.append(request)
            target = request[1]
            self._checks_sent[target] = self._checks_sent.get(target, 0) + 1
        while (ice_event := self.checker.next_event()) is not None:
            if isinstance(ice_event, ice.IceConnected):
                self._ice_state = "connected"
                self._events.append(IceSelected(ice_event.address))
                if self._dtls_address is None:
                    self._dtls_address = ice_event.address
                self.dtls.start(now)
            elif isinstance(ice_event, ice.IceCheckFailed):
                self._failed_candidates.add(ice_event.address)
                self._check_errors[ice_event.address] = ice_event.error_code
                if (
                    self.checker.selected_address is None
                    and len(self._failed_candidates) >= self._candidate_count
                ):
                    self._ice_state = "failed"
                    code = ice_event.error_code
                    self._fail(
                        "ICE failed: every candidate pair failed"
                        + (f" (last STUN error {code})" if code is not None else "")
                    )
            elif isinstance(ice_event, ice.IceConsentExpired):
                self._ice_state = "disconnected"
                self._fail("ICE consent expired (RFC 7675 §5.1)")
        while (dtls_event := self.dtls.next_event()) is not None:
            if isinstance(dtls_event, DtlsConnected):
                address = self.checker.selected_address or self._dtls_address
                assert address is not None
                self._events.append(TransportConnected(address, dtls_event))
            elif isinstance(dtls_event, DtlsFailed):
                self._fail(f"DTLS failed: {dtls_event.reason}")
            elif isinstance(dtls_event, DtlsClosed):
                self._fail("the server closed DTLS (close_notify)")
        self._flush_dtls()

    def _flush_dtls(self) -> None:
        datagrams = self.dtls.datagrams_to_send()
        address = self.checker.selected_address or self._dtls_address
        if address is not None:
            self._outgoing.extend((datagram, address) for datagram in datagrams)

    def _fail(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self._events.append(TransportFailed(reason))


def answer_binding_request(
    data: bytes, addr: Address, *, local_ufrag: str, local_pwd: str
) -> bytes | None:
    """Answer a full ICE peer's connectivity check to us (RFC 8445 §7.3), or None to drop.

    The USERNAME must be "OUR-UFRAG:THEIR-UFRAG" (§7.2.2) and MESSAGE-INTEGRITY must
    verify with our password (RFC 8489 §9.1.3). A peer that also claims the controlling
    role gets 487 (§7.3.1.1): the offerer keeps it (§6.1.1). Never raises.
    """
    try:
        request = ice.parse_stun(data)
    except ParseError:
        return None
    if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
        return None
    username = request.attributes.get("USERNAME")
    key = local_pwd.encode("utf-8")
    if (
        not isinstance(username, str)
        or username.partition(":")[0] != local_ufrag
        or "MESSAGE-INTEGRITY" not in request.attributes
        or not request.check_message_integrity(key)
    ):
        return None
    if "ICE-CONTROLLING" in request.attributes:
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.ERROR,
            transaction_id=request.transaction_id,
            attributes={"ERROR-CODE": (487, "Role Conflict")},
        )
    else:
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
            attributes={"XOR-MAPPED-ADDRESS": (addr[0], addr[1])},
        )
    response.add_message_integrity(key)
    return bytes(response)


# --- offers ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalParameters:
    """What every offer carries about our transport."""

    ice_ufrag: str
    ice_pwd: str
    fingerprints: Sequence[tuple[str, str]]
    candidate: Candidate


def _session() -> SessionDescription:
    return SessionDescription(
        origin=Origin(session_id=secrets.randbits(62), session_version=2),
        msid_semantic="WMS *",
        extmap_allow_mixed=True,
    )


def _section(kind: str, mid: str, direction: str, local: LocalParameters) -> MediaSection:
    return MediaSection(
        kind=kind,
        mid=mid,
        direction=direction,
        ice_ufrag=local.ice_ufrag,
        ice_pwd=local.ice_pwd,
        ice_options=["trickle"],
        fingerprints=list(local.fingerprints),
        # RFC 8842 §5.3: the offerer must offer actpass.
        setup="actpass",
        rtcp_mux=True,
        rtcp_rsize=True,
        candidates=[local.candidate],
        end_of_candidates=True,
        extmaps=[Extmap(id=EXTENSION_ID_MID, uri=URI_MID)],
    )


def _opus() -> Codec:
    return Codec(
        payload_type=OPUS_PAYLOAD_TYPE,
        name="opus",
        clock_rate=48000,
        channels=2,
        fmtp=[("minptime", "10"), ("useinbandfec", "1")],
    )


def _video_codec(name: str) -> Codec:
    encoding_name, fmtp = VIDEO_CODECS[name]
    return Codec(
        payload_type=VP8_PAYLOAD_TYPE if name == "vp8" else H264_PAYLOAD_TYPE,
        name=encoding_name,
        clock_rate=90000,
        fmtp=list(fmtp),
        rtcp_fb=list(VIDEO_FEEDBACK),
    )


def _finish(session: SessionDescription) -> str:
    session.groups.append(Group(semantics="BUNDLE", mids=[m.mid or "" for m in session.media]))
    return session.serialize()


def viewer_offer(
    local: LocalParameters,
    *,
    audio: bool = True,
    video: bool = True,
    video_codecs: Sequence[str] = ("vp8", "h264"),
) -> str:
    """A WHEP offer (draft-ietf-wish-whep-03 §4.2): recvonly audio and/or video, bundled,
    rtcp-mux, every codec the load-test receiver can inspect for keyframes."""
    session = _session()
    if audio:
        section = _section("audio", str(len(session.media)), "recvonly", local)
        section.codecs = [_opus()]
        section.formats = [str(OPUS_PAYLOAD_TYPE)]
        session.media.append(section)
    if video:
        section = _section("video", str(len(session.media)), "recvonly", local)
        section.codecs = [_video_codec(name) for name in video_codecs]
        section.formats = [str(codec.payload_type) for codec in section.codecs]
        session.media.append(section)
    if not session.media:
        raise ValueError("a viewer offer needs audio or video")
    return _finish(session)


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedTrack:
    """One sending m= section of a publisher offer."""

    kind: str
    codec: str  # "opus", "vp8" or "h264"
    ssrcs: tuple[int, ...]  # one per encoding (a single one without simulcast)
    rids: tuple[str, ...] = ()


def publisher_offer(
    local: LocalParameters, tracks: Sequence[PublishedTrack], *, cname: str, stream_id: str
) -> str:
    """A WHIP offer (RFC 9725 §4.2): sendonly, bundled, rtcp-mux. A single encoding is
    signalled by its SSRC (RFC 5576 §4.1); simulcast encodings by rid (RFC 8851 §4) and
    ``a=simulcast`` (RFC 8853 §5.1), their SSRCs left for the RID header extension."""
    session = _session()
    for track in tracks:
        section = _section(track.kind, str(len(session.media)), "sendonly", local)
        section.codecs = [_opus() if track.codec == "opus" else _video_codec(track.codec)]
        section.formats = [str(section.codecs[0].payload_type)]
        track_id = f"{track.kind}-{stream_id}"
        section.msid = f"{stream_id} {track_id}"
        if track.rids:
            section.extmaps += [
                Extmap(id=EXTENSION_ID_RID, uri=URI_RID),
                Extmap(id=EXTENSION_ID_REPAIRED_RID, uri=URI_REPAIRED_RID),
            ]
            section.rids = [Rid(id=rid, direction="send") for rid in track.rids]
            section.simulcast = Simulcast(send=[[SimulcastStream(rid)] for rid in track.rids])
        else:
            for ssrc in track.ssrcs:
                section.ssrcs += [
                    SsrcAttribute(ssrc=ssrc, attribute="cname", value=cname),
                    SsrcAttribute(ssrc=ssrc, attribute="msid", value=f"{stream_id} {track_id}"),
                ]
        session.media.append(section)
    return _finish(session)
