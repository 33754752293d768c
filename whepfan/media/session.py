"""One WHIP or WHEP session: its ICE-lite agent, its DTLS association and, once keyed,
its SRTP state. Sessions are sans-IO like the protocol layer below them: the router feeds
them datagrams and ``now``, and sends what they return.

A session's transport path is the ICE-selected pair: the peer's ``address`` and, when the
worker's socket is bound to a wildcard address on a host with several, ``local_address``,
the address of ours that the peer's checks reached (RFC 8445 §4: a candidate pair is a
local and a remote transport address). Everything sent to the peer leaves from it; the
local address comes in with each datagram, as the remote one does.

Lifecycle (both kinds)::

    NEW ──verified STUN check──▶ CHECKED ──DTLS handshake──▶ CONNECTED ──▶ CLOSED
     │                      │                                               ▲
     ├──────────────────────┴─ not CONNECTED by the connect deadline ───────┤
     └──────────── consent expired (RFC 7675 §5.1) / DELETE / DTLS failure ─┘

The connect deadline is what keeps sessions that never connect from holding a slot: a
POST costs a client one request, and without it the session would live until consent
expires (30 s, RFC 7675 §5.1), which is a slot held for 30 s per request. Real clients
check within a round trip of the answer (ICE-lite: we never check first, RFC 8445 §2.5)
and finish DTLS in two more, so ``connect_timeout`` (10 s by default) leaves room for
TURN allocation and several lost DTLS flights (RFC 6347 §4.2.4.1: 1 s, doubling).
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

from whepfan.media.bandwidth import ViewerBandwidth
from whepfan.protocol.dtls import (
    DtlsCertificate,
    DtlsClosed,
    DtlsConnected,
    DtlsFailed,
    DtlsSession,
)
from whepfan.protocol.ice import IceConsentExpired, IceLiteSession, IceNominated
from whepfan.protocol.negotiation import EgressMedia, IngestMedia

Address = tuple[str, int]


class SessionState(enum.Enum):
    NEW = "new"
    CHECKED = "checked"
    CONNECTED = "connected"
    CLOSED = "closed"


class SessionKind(enum.Enum):
    PUBLISHER = "publisher"
    VIEWER = "viewer"


def new_session_id() -> str:
    """An unguessable resource id: 192 bits from the CSPRNG (WHEP draft-03 §5, RFC 4086)."""
    return secrets.token_urlsafe(24)


def new_etag() -> str:
    """A strong entity-tag for the session's current ICE credentials (RFC 9110 §8.8.3)."""
    return '"' + secrets.token_hex(12) + '"'


def new_ice_credentials() -> tuple[str, str]:
    """ice-ufrag (>= 4 ice-chars) and ice-pwd (>= 22 ice-chars), RFC 8839 §5.4."""
    return secrets.token_hex(4), secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class SrtpKeys:
    """Keys exported from DTLS (RFC 5764 §4.2), already assigned by our role."""

    profile: int
    local_key: bytes
    local_salt: bytes
    remote_key: bytes
    remote_salt: bytes


# Events a session reports to the router.
@dataclass(frozen=True, slots=True)
class AddressLearned:
    """The peer's selected ``address`` changed, and ``local``: our address that pair uses
    (None: the socket is bound to one address, or the local address is unknown)."""

    address: Address
    nominated: bool
    local: str | None = None


@dataclass(frozen=True, slots=True)
class Keyed:
    keys: SrtpKeys


@dataclass(frozen=True, slots=True)
class Gone:
    reason: str


# Gone.reason of a session that was not CONNECTED by its connect deadline.
CONNECT_TIMEOUT = "connect-timeout"


SessionEvent = AddressLearned | Keyed | Gone


@dataclass(eq=False, kw_only=True)
class MediaSession:
    """State shared by publishers and viewers: transport (ICE + DTLS) and bookkeeping."""

    id: str
    kind: SessionKind
    stream: str
    ice: IceLiteSession
    dtls: DtlsSession
    local_ufrag: str
    local_pwd: str
    etag: str = field(default_factory=new_etag)
    created_at: float = 0.0
    state: SessionState = SessionState.NEW
    address: Address | None = None
    # Our address that the selected pair's checks reached (see the module docstring).
    local_address: str | None = None
    keys: SrtpKeys | None = None
    connected_at: float | None = None
    # When a session not CONNECTED by then is ended ("connect-timeout"); None once keyed
    # or for a session without one (a relay stand-in, never registered).
    connect_deadline: float | None = None
    # Set while a WHEP counter-offer awaits the client's answer (draft-03 §4.2.2).
    answer_deadline: float | None = None
    # Every local ufrag this session answered to (ICE restarts add one), for demux cleanup.
    ufrags: list[str] = field(default_factory=list)
    _dtls_started: bool = False

    @classmethod
    def create(
        cls,
        *,
        kind: SessionKind,
        stream: str,
        certificate: DtlsCertificate,
        dtls_role: str,
        remote_fingerprints: list[tuple[str, str]],
        remote_ufrag: str | None,
        remote_pwd: str | None,
        consent_timeout: float,
        now: float,
        connect_timeout: float | None = None,
    ) -> MediaSession:
        ufrag, pwd = new_ice_credentials()
        return cls(
            id=new_session_id(),
            kind=kind,
            stream=stream,
            ice=IceLiteSession(
                local_ufrag=ufrag,
                local_pwd=pwd,
                remote_ufrag=remote_ufrag,
                remote_pwd=remote_pwd,
                consent_timeout=consent_timeout,
                now=now,
            ),
            dtls=DtlsSession(
                certificate=certificate,
                role=dtls_role,
                remote_fingerprints=remote_fingerprints,
            ),
            local_ufrag=ufrag,
            local_pwd=pwd,
            created_at=now,
            connect_deadline=None if connect_timeout is None else now + connect_timeout,
            ufrags=[ufrag],
        )

    def connect_diagnosis(self) -> str:
        """What this session saw of its client, for the log line of a session that never
        connected: the operator's half of what a client's "not connected" says it tried."""
        if self.address is None:
            # RFC 8445 §7.3: an ICE-lite agent only answers checks; none verified here.
            return "no ICE check from the client reached us: its candidates, a firewall or a NAT"
        where = f"ICE checks from {self.address[0]}:{self.address[1]}"
        if self.local_address is not None:
            where += f" to {self.local_address}"
        if self.dtls.role == "server" and self.dtls.state == "new":
            return f"{where}, but no DTLS ClientHello came (we are the DTLS server)"
        if self.dtls.state in ("new", "connecting"):
            # RFC 6347 §4.2.4: flights are retransmitted; none completed the handshake.
            return f"{where}, DTLS handshake unfinished (we are the {self.dtls.role})"
        return f"{where}, DTLS {self.dtls.state}"

    # -- input ----------------------------------------------------------------------

    def receive_stun(
        self, data: bytes, addr: Address, now: float, local: str | None = None
    ) -> tuple[bytes | None, list[SessionEvent]]:
        """A STUN datagram for this session from ``addr`` to our address ``local``: the
        response to send (from ``local``, RFC 8489 §6.3.3), and what happened."""
        # The ICE agent sees the whole pair: nomination and consent are per (local,
        # remote) pair (RFC 8445 §6.1.2.2, RFC 7675 §5.1), not per remote address.
        response = self.ice.receive_stun(data, addr, now, local)
        events: list[SessionEvent] = []
        # A Binding success response starts with type 0x0101 (RFC 8489 §5): the check
        # verified, so this pair may carry our DTLS and media even before nomination
        # (Chromium starts DTLS on the first writable pair, before USE-CANDIDATE).
        if response is not None and response[:2] == b"\x01\x01" and self.address is None:
            self.address = addr
            self.local_address = local
            events.append(AddressLearned(addr, nominated=False, local=local))
        events.extend(self._drain_ice())
        if self.address is not None and self.state is SessionState.NEW:
            self.state = SessionState.CHECKED
            if self.dtls.role == "client" and not self._dtls_started:
                self._dtls_started = True
                self.dtls.start(now)
        return response, events

    def receive_dtls(self, data: bytes, now: float) -> list[SessionEvent]:
        if self.state is SessionState.CLOSED:
            return []
        self.dtls.receive(data, now)
        return list(self._drain_dtls())

    def handle_timer(self, now: float) -> list[SessionEvent]:
        events: list[SessionEvent] = []
        if self.connect_deadline is not None and now >= self.connect_deadline:
            return [Gone(CONNECT_TIMEOUT)]
        if self.answer_deadline is not None and now >= self.answer_deadline:
            return [Gone("counter-offer-expired")]
        ice_deadline = self.ice.get_timer()
        if ice_deadline is not None and now >= ice_deadline:
            self.ice.handle_timer(now)
            events.extend(self._drain_ice())
        dtls_deadline = self.dtls.get_timer()
        if dtls_deadline is not None and now >= dtls_deadline:
            self.dtls.handle_timer(now)
            events.extend(self._drain_dtls())
        return events

    def get_timer(self) -> float | None:
        candidates = (
            self.ice.get_timer(),
            self.dtls.get_timer(),
            self.answer_deadline,
            self.connect_deadline,
        )
        deadlines = [t for t in candidates if t is not None]
        return min(deadlines) if deadlines else None

    def datagrams_to_send(self) -> Iterator[tuple[bytes, Address]]:
        """DTLS flights waiting to go to the peer's address."""
        if self.address is None:
            return
        for datagram in self.dtls.datagrams_to_send():
            yield datagram, self.address

    def restart_ice(self, *, remote_ufrag: str, remote_pwd: str) -> tuple[str, str]:
        """ICE restart (RFC 8445 §9, WHEP §4.4.3): new local credentials; the old ones stay
        valid until the peer's first check with the new ones verifies."""
        ufrag, pwd = new_ice_credentials()
        self.ice.restart(
            local_ufrag=ufrag, local_pwd=pwd, remote_ufrag=remote_ufrag, remote_pwd=remote_pwd
        )
        self.local_ufrag, self.local_pwd = ufrag, pwd
        self.ufrags.append(ufrag)
        self.etag = new_etag()
        return ufrag, pwd

    def close(self) -> None:
        """End the session: send close_notify, and stop answering (consent revoked,
        RFC 7675 §5.2, because the router forgets the ufrag and the address)."""
        if self.state is not SessionState.CLOSED:
            if self.state is SessionState.CONNECTED:
                self.dtls.close()
            self.state = SessionState.CLOSED

    # -- internals --------------------------------------------------------------------

    def _drain_ice(self) -> Iterator[SessionEvent]:
        while (event := self.ice.next_event()) is not None:
            if isinstance(event, IceNominated):
                # The nominated pair may share the remote address of the current one and
                # differ in its local address (an ICE restart, or a peer checking each of
                # our candidates from one port): the pair, not just the address, moves.
                changed = (event.address, event.local) != (self.address, self.local_address)
                self.address = event.address
                self.local_address = event.local
                if changed or self.state is SessionState.NEW:
                    yield AddressLearned(event.address, nominated=True, local=event.local)
            elif isinstance(event, IceConsentExpired):
                yield Gone("ice-consent-expired")

    def _drain_dtls(self) -> Iterator[SessionEvent]:
        while (event := self.dtls.next_event()) is not None:
            if isinstance(event, DtlsConnected):
                self.keys = SrtpKeys(
                    profile=event.profile,
                    local_key=event.local_key,
                    local_salt=event.local_salt,
                    remote_key=event.remote_key,
                    remote_salt=event.remote_salt,
                )
                self.state = SessionState.CONNECTED
                self.connect_deadline = None
                yield Keyed(self.keys)
            elif isinstance(event, DtlsFailed):
                yield Gone(f"dtls-failed: {event.reason}")
            elif isinstance(event, DtlsClosed):
                yield Gone("dtls-closed")


@dataclass(eq=False, kw_only=True)
class PublisherSession(MediaSession):
    """A WHIP publisher: what it negotiated, and its SRTP contexts once keyed."""

    ingest: list[IngestMedia] = field(default_factory=list)


@dataclass(eq=False, kw_only=True)
class ViewerSession(MediaSession):
    """A WHEP viewer: its negotiated media and, once keyed, its Fanout slot."""

    counter_offer: str | None = None
    egress: list[EgressMedia] = field(default_factory=list)
    fanout_slot: int | None = None
    # viewer out-SSRC -> fanout track, to route NACKs (RFC 4585 §6.2.1 media SSRC).
    track_by_ssrc: dict[int, int] = field(default_factory=dict)
    fraction_lost: float = 0.0
    jitter: int = 0
    remb_bitrate: int | None = None
    # With transport-wide cc: its send-side estimate (media/headroom.py drives it).
    bandwidth: ViewerBandwidth | None = None
    nacks_received: int = 0
    keyframe_requests: int = 0
