"""Which session a datagram is for, and which engine method handles it.

Theory of operation
-------------------
Every session of the worker shares one UDP port (ICE-lite, DESIGN.md §6). A datagram is
classified by its first byte (RFC 7983 §7):

* STUN      -> the session whose local ufrag is in USERNAME (the only way to tell sessions
               apart before an address is known); the ICE agent answers it.
* DTLS      -> the session that owns the source address (learned from a verified check).
* RTP/RTCP  -> the session that owns the source address: a publisher's SRTP goes to
               ``Ingest`` (unprotected once, pushed to the compiled ``Fanout``); a
               viewer's SRTCP to ``Egress`` (NACK, PLI/FIR, RR, REMB).
* anything else, or an unknown address -> counted and dropped.

The router owns the registry (streams, sessions, the ufrag and address maps) and the
signalling API the HTTP layer calls through a backend (publish, view, counter-offers,
trickle, ICE restart, end, the layer API). It composes the engine's parts, each with its
own state: ``Ingest`` (publishers), ``Egress`` (viewers), ``LayerSelector`` (layer
choice), ``KeyframeRequests`` + ``PublisherFeedback`` + ``UpstreamRepair`` (what goes
upstream: PLIs, RR/REMB, NACKs for what the publisher's link lost), ``Timers`` (one heap
of typed deadlines) and ``Sender`` (how datagrams leave).

It is driven like the protocol layer (``datagram_received(data, addr, now, local)``,
``get_timer()``, ``handle_timer(now)``); ``transport.py`` is the thin asyncio driver.
``local`` is the address of ours a datagram was sent to (sender.py).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Callable

from whepfan import _fastpath
from whepfan.config import MediaConfig
from whepfan.errors import Conflict, NotFound, PeerError, ServiceUnavailable, Unprocessable
from whepfan.media.egress import Egress
from whepfan.media.feedback import KeyframeRequests, PublisherFeedback
from whepfan.media.ingest import Ingest
from whepfan.media.layers import LayerPolicy, LayerRequest, LayerSelector
from whepfan.media.liveness import MediaLiveness
from whepfan.media.nack import NackPolicy, UpstreamRepair
from whepfan.media.sender import DefaultSource, SendDatagram, SendDatagramFrom, Sender
from whepfan.media.session import (
    CONNECT_TIMEOUT,
    Address,
    AddressLearned,
    Gone,
    Keyed,
    MediaSession,
    PublisherSession,
    SessionEvent,
    SessionKind,
    SessionState,
    ViewerSession,
)
from whepfan.media.streams import Stream, StreamListener, StreamListeners, Track
from whepfan.media.timers import TimerKind, Timers
from whepfan.protocol import sdp
from whepfan.protocol.demux import PacketKind, classify, is_rtcp
from whepfan.protocol.dtls import DtlsCertificate, DtlsSession
from whepfan.protocol.ice import stun_local_ufrag
from whepfan.protocol.negotiation import (
    EgressMedia,
    LocalTransport,
    accept_counter_answer,
    answer_publisher,
    answer_setup,
    answer_viewer,
    build_counter_offer,
    remote_transport,
)

log = logging.getLogger("whepfan.router")


class Router:
    """Streams and sessions of one worker (see the module docstring)."""

    def __init__(
        self,
        *,
        config: MediaConfig,
        certificate: DtlsCertificate,
        fanout: _fastpath.Fanout,
        send: SendDatagram,
        candidates: list[sdp.Candidate],
        wake: Callable[[], None] = lambda: None,
        layer_policy: LayerPolicy | None = None,
        send_from: SendDatagramFrom | None = None,
        default_source: DefaultSource | None = None,
        nack_policy: NackPolicy | None = None,
    ) -> None:
        self.config = config
        self.certificate = certificate
        self.fanout = fanout
        self.candidates = candidates
        self.streams: dict[str, Stream] = {}
        self.sessions: dict[str, MediaSession] = {}
        self._by_ufrag: dict[str, MediaSession] = {}
        self._by_address: dict[Address, MediaSession] = {}
        self.counters: Counter[str] = Counter()
        self.listeners = StreamListeners()
        self.sender = Sender(send=send, send_from=send_from, default_source=default_source)
        self.timers = Timers(wake)
        # Our SSRC as RTCP sender towards publishers (RFC 3550 §8.1: random).
        self.rtcp_ssrc = secrets.randbits(32)
        self.feedback = PublisherFeedback(
            sender=self.sender,
            counters=self.counters,
            rtcp_ssrc=self.rtcp_ssrc,
            max_bitrate=config.publisher_max_bitrate,
        )
        self.keyframes = KeyframeRequests(
            interval=config.keyframe_request_interval,
            timers=self.timers,
            counters=self.counters,
            upstream=self.feedback.request_keyframes,
        )
        self.layers = LayerSelector(
            fanout=fanout,
            policy=layer_policy or LayerPolicy(),
            keyframes=self.keyframes,
            subscribe=self._subscribe,
            emit=self.listeners.emit,
            counters=self.counters,
        )
        self.egress = Egress(
            fanout=fanout,
            streams=self.streams,
            sender=self.sender,
            keyframes=self.keyframes,
            layers=self.layers,
            end_viewer=self.end_session,
            timers=self.timers,
            counters=self.counters,
        )
        self.liveness = MediaLiveness(
            timeout=config.media_timeout,
            timers=self.timers,
            listeners=self.listeners,
            counters=self.counters,
        )
        self.repair = UpstreamRepair(
            policy=nack_policy or NackPolicy(),
            timers=self.timers,
            feedback=self.feedback,
            keyframes=self.keyframes,
            counters=self.counters,
        )
        self.ingest = Ingest(
            liveness=self.liveness,
            repair=self.repair,
            config=config,
            fanout=fanout,
            streams=self.streams,
            timers=self.timers,
            keyframes=self.keyframes,
            feedback=self.feedback,
            layers=self.layers,
            listeners=self.listeners,
            end_viewer=self.end_session,
            counters=self.counters,
        )

    @property
    def layer_policy(self) -> LayerPolicy:
        return self.layers.policy

    # ------------------------------------------------------------------ signalling API

    def publish(
        self, stream_name: str, offer_text: str, now: float
    ) -> tuple[PublisherSession, str]:
        """WHIP POST: negotiate, create the publisher session, return it and the answer."""
        stream = self.streams.get(stream_name)
        stalled = None
        if stream is not None and stream.live:
            if not self.liveness.stalled(stream, now):
                raise Conflict(
                    f"stream {stream_name!r} already has a publisher",
                    retry_after=self.liveness.replaceable_in(stream, now),
                )
            # Its media stopped (liveness.py): the newcomer replaces it, once its offer
            # has been answered (a bad offer must not end the old session).
            stalled = stream.publisher
        offer = sdp.SessionDescription.parse(offer_text)
        session = self.new_session(PublisherSession, SessionKind.PUBLISHER, stream_name, offer, now)
        answer, ingest = answer_publisher(offer, self.local_transport(session), transport_cc=True)
        if not ingest:
            raise Unprocessable("the offer carries no audio or video whepfan can receive")
        assert isinstance(session, PublisherSession)
        session.ingest = ingest
        if stalled is not None:
            self.end_session(stalled.id, now, "publisher-replaced")
        stream = self.stream(stream_name)
        self.ingest.attach(stream, session, now)
        self.liveness.watch(stream, now)
        self._register(session)
        log.info(
            "publisher %s on %r: %s",
            session.id[:8],
            stream_name,
            ", ".join(f"{m.kind}/{m.codec.name}" for m in ingest),
        )
        return session, str(answer)

    def stream(self, stream_name: str) -> Stream:
        """The stream called ``stream_name``, created empty if this worker has none."""
        stream = self.streams.get(stream_name)
        if stream is None:
            stream = self.streams[stream_name] = Stream(name=stream_name)
        return stream

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[ViewerSession, str]:
        """WHEP POST: negotiate against the live stream, create the viewer session."""
        stream = self._live_stream_for_viewer(stream_name)
        offer = sdp.SessionDescription.parse(offer_text)
        session = self.new_session(ViewerSession, SessionKind.VIEWER, stream_name, offer, now)
        assert isinstance(session, ViewerSession)
        answer, egress = answer_viewer(
            offer,
            self.local_transport(session),
            stream.canonical_ingest(),
            ssrc_source=self._new_ssrc,
        )
        session.egress = egress
        self.layers.new_choice(stream, session)
        stream.viewers[session.id] = session
        self._register(session)
        self.counters["viewers_created"] += 1
        self._emit_viewer_count(stream)
        return session, str(answer)

    def _live_stream_for_viewer(self, stream_name: str) -> Stream:
        stream = self.streams.get(stream_name)
        if stream is None or not stream.live or not stream.tracks:
            # WHEP draft-03 §4.2.8: 409 + Retry-After when the stream is not live.
            raise Conflict(f"stream {stream_name!r} is not live", retry_after=5)
        if self.viewer_count >= self.config.max_viewers:
            raise ServiceUnavailable("no viewer capacity left on this server", retry_after=10)
        return stream

    def counter_offer(self, stream_name: str, now: float) -> tuple[ViewerSession, str]:
        """WHEP draft-03 §4.2.2: the viewer's offer had no codec the stream carries, so the
        server offers its own (sendonly, actpass) and waits for a PATCHed answer."""
        stream = self._live_stream_for_viewer(stream_name)
        session = ViewerSession.create(
            kind=SessionKind.VIEWER,
            stream=stream_name,
            certificate=self.certificate,
            dtls_role="server",  # replaced once the answer says which side is active
            remote_fingerprints=[],
            remote_ufrag=None,
            remote_pwd=None,
            consent_timeout=self.config.consent_timeout,
            now=now,
            # From the POST, not the answer: a counter-offer nobody answers must not hold
            # its slot longer than any other session that never connects.
            connect_timeout=self.config.connect_timeout,
        )
        assert isinstance(session, ViewerSession)
        offer = build_counter_offer(
            self.local_transport(session),
            stream.canonical_ingest(),
            ssrc_source=self._new_ssrc,
        )
        session.counter_offer = str(offer)
        session.answer_deadline = now + self.config.counter_offer_ttl
        stream.viewers[session.id] = session
        self._register(session)
        self._emit_viewer_count(stream)
        return session, session.counter_offer

    def accept_counter_answer(self, session_id: str, answer_text: str, now: float) -> None:
        """The client's recvonly answer to our counter-offer (PATCH application/sdp)."""
        session = self.get_session(session_id)
        if not isinstance(session, ViewerSession) or session.counter_offer is None:
            raise Conflict("this session has no pending counter-offer")
        if session.answer_deadline is not None and now >= session.answer_deadline:
            self.end_session(session.id, now, "counter-offer-expired")
            raise NotFound("the counter-offer expired")
        answer = sdp.SessionDescription.parse(answer_text)
        offer = sdp.SessionDescription.parse(session.counter_offer)
        egress = accept_counter_answer(offer, answer)
        remote = remote_transport(answer)
        # We offered actpass; the answerer picked its side (RFC 8842 §5.3).
        role = "client" if remote.setup == "passive" else "server"
        session.dtls = DtlsSession(
            certificate=self.certificate,
            role=role,
            remote_fingerprints=list(remote.fingerprints),
        )
        session.ice.set_remote_credentials(remote.ice_ufrag, remote.ice_pwd)
        session.egress = egress
        stream = self.streams.get(session.stream)
        if stream is not None:
            self.layers.new_choice(stream, session)
        session.counter_offer = None
        session.answer_deadline = None
        self._reschedule(session)

    def trickle(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> None:
        """Trickled client candidates (RFC 8840, WHEP §4.4.2). An ICE-lite server does not
        run checks, so candidates need no action: the client's checks reveal its address.
        Credentials sent here complete an offer that lacked them (RFC 8839 §5.4)."""
        session = self.get_session(session_id)
        if fragment.ufrag and fragment.pwd and session.ice.remote_ufrag is None:
            session.ice.set_remote_credentials(fragment.ufrag, fragment.pwd)
        self.counters["trickled_candidates"] += len(fragment.usable_candidates)

    def restart_ice(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> str:
        """ICE restart (WHEP §4.4.3): new server credentials, all candidates again, and a new
        ETag; the old ICE session keeps working until the new one is used."""
        session = self.get_session(session_id)
        if not fragment.ufrag or not fragment.pwd:
            raise PeerError("an ICE restart needs a=ice-ufrag and a=ice-pwd (RFC 8840 §4.4)")
        ufrag, pwd = session.restart_ice(remote_ufrag=fragment.ufrag, remote_pwd=fragment.pwd)
        self._by_ufrag[ufrag] = session
        self.counters["ice_restarts"] += 1
        return sdp.serialize_sdpfrag(
            ufrag,
            pwd,
            self.candidates,
            fragment.mid or "0",
            ice_options=fragment.ice_options,
        )

    def end_session(self, session_id: str, now: float, reason: str = "deleted") -> bool:
        """DELETE (or consent loss, DTLS failure): free everything the session holds."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self._flush(session)  # nothing pending should be lost...
        session.close()
        self._flush(session)  # ...and close_notify goes out (RFC 6347 §4.2.7)
        for ufrag in session.ufrags:
            if self._by_ufrag.get(ufrag) is session:
                del self._by_ufrag[ufrag]
        if session.address is not None and self._by_address.get(session.address) is session:
            del self._by_address[session.address]
        self.timers.cancel((TimerKind.SESSION, session.id))
        stream = self.streams.get(session.stream)
        if isinstance(session, ViewerSession):
            self.egress.remove(session, stream)
            if stream is not None and stream.viewers.pop(session.id, None) is not None:
                self._emit_viewer_count(stream)
        elif (
            isinstance(session, PublisherSession)
            and stream is not None
            and stream.publisher is session
        ):
            self.liveness.forget(stream.name)
            self.ingest.detach(stream)
        self.counters[f"sessions_ended_{reason.split(':')[0]}"] += 1
        detail = ""
        if reason == CONNECT_TIMEOUT:
            self.counters[f"connect_timeouts_{session.kind.value}"] += 1
            detail = f" ({session.connect_diagnosis()})"
        log.info(
            "%s %s on %r ended: %s%s",
            session.kind.value,
            session.id[:8],
            session.stream,
            reason,
            detail,
        )
        return True

    def get_session(self, session_id: str) -> MediaSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound("no such session")
        return session

    def add_listener(self, listener: StreamListener) -> None:
        """Call ``listener`` for every StreamEvent (see StreamListeners)."""
        self.listeners.add(listener)

    def remove_listener(self, listener: StreamListener) -> None:
        self.listeners.remove(listener)

    def _emit_viewer_count(self, stream: Stream) -> None:
        self.listeners.emit(stream.name, "viewercount", {"viewercount": len(stream.viewers)})

    @property
    def viewer_count(self) -> int:
        return sum(len(s.viewers) for s in self.streams.values())

    # ------------------------------------------------------------------ the layer API

    def _viewer_and_stream(self, session_id: str) -> tuple[ViewerSession, Stream]:
        session = self.get_session(session_id)
        if not isinstance(session, ViewerSession):
            raise NotFound("no such viewer session")
        stream = self.streams.get(session.stream)
        if stream is None:
            raise PeerError("this session receives no video")
        return session, stream

    def select_layer(self, session_id: str, request: LayerRequest, now: float) -> dict[str, object]:
        """The WHEP layer extension (EXT §5): pin a viewer to a layer, constrain it, or
        (nothing set) return it to automatic choice. Raises NotFound for an unknown
        session and PeerError (400) for a media or layer the stream does not have.
        Returns the viewer's layer state (``layer_status``)."""
        session, stream = self._viewer_and_stream(session_id)
        return self.layers.select(stream, session, request, now)

    def layer_status(self, session_id: str, now: float) -> dict[str, object]:
        """One viewer's layer state for the layer API (GET on the layer URL)."""
        session = self.get_session(session_id)
        stream = self.streams.get(session.stream)
        if stream is None or not isinstance(session, ViewerSession):
            raise NotFound("this session receives no video")
        return self.layers.status(stream, session, now)

    def stream_layers(self, stream_name: str, now: float) -> dict[str, object]:
        """The SSE ``layers`` payload of a stream (LayerSelector.stream_layers)."""
        stream = self.streams.get(stream_name)
        return {} if stream is None else self.layers.stream_layers(stream, now)

    # ------------------------------------------------------------------ datagram input

    def begin_burst(self) -> None:
        """The driver starts reading what is queued on its socket: publisher packets are
        held per track until ``end_burst`` and fanned out together (media/burst.py)."""
        self.ingest.bursts.begin()

    def end_burst(self) -> None:
        """Everything queued was read: fan out what the burst held."""
        self.ingest.bursts.end()

    def datagram_received(
        self, data: bytes, addr: Address, now: float, local: str | None = None
    ) -> None:
        """One datagram from ``addr`` to our address ``local`` (None when the socket is
        bound to one address: then it is that one)."""
        if not data:
            self.counters["drop_empty"] += 1
            return
        kind = classify(data[0])
        if kind is PacketKind.STUN:
            self._receive_stun(data, addr, now, local)
            return
        if kind is not PacketKind.DTLS and kind is not PacketKind.RTP_OR_RTCP:
            self.counters["drop_unknown_kind"] += 1  # ZRTP, TURN channel, QUIC, garbage
            return
        session = self._by_address.get(addr)
        if session is None:
            self.counters["drop_unknown_address"] += 1
            return
        if kind is PacketKind.DTLS:
            events = session.receive_dtls(data, now)
            # Our last handshake flight goes out before anything the events trigger (the
            # first PLI is SRTCP: a peer without keys yet would have to buffer or drop it).
            self._flush(session)
            self._handle_events(session, events, now)
            self._flush(session)
            self._reschedule(session)
        elif kind is PacketKind.RTP_OR_RTCP:
            if session.state is not SessionState.CONNECTED:
                self.counters["drop_media_before_keys"] += 1
            elif isinstance(session, PublisherSession):
                if is_rtcp(data):
                    self.ingest.rtcp_received(session, data, now)
                else:
                    self.ingest.rtp_received(session, data, now)
            elif isinstance(session, ViewerSession):
                if is_rtcp(data):
                    self.egress.rtcp_received(session, data, now)
                else:
                    self.counters["drop_rtp_from_viewer"] += 1  # viewers are recvonly

    def _receive_stun(self, data: bytes, addr: Address, now: float, local: str | None) -> None:
        ufrag = stun_local_ufrag(data)
        session = self._by_ufrag.get(ufrag) if ufrag is not None else None
        if session is None:
            self.counters["drop_stun_unknown_ufrag"] += 1
            return
        response, events = session.receive_stun(data, addr, now, local)
        if response is not None:
            # RFC 8489 §6.3.3: the response goes from the address the request reached,
            # whichever pair it checks (the peer matches it to that pair, RFC 8445 §7.2.5.2.1).
            self.sender.transmit(response, addr, local)
        self._handle_events(session, events, now)
        self._flush(session)
        self._reschedule(session)

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        return self.timers.next_deadline()

    def handle_timer(self, now: float) -> None:
        for kind, name in self.timers.due(now):
            if kind is TimerKind.SESSION:
                session = self.sessions.get(name)
                if session is None:
                    continue
                self._handle_events(session, session.handle_timer(now), now)
                self._flush(session)
                self._reschedule(session)
            elif kind is TimerKind.PUBLISHER_FEEDBACK:
                stream = self.streams.get(name)
                if stream is not None:
                    self.ingest.feedback_due(stream, now)
            elif kind is TimerKind.TRANSPORT_FEEDBACK:
                stream = self.streams.get(name)
                if stream is not None:
                    self.ingest.transport_feedback_due(stream, now)
            elif kind is TimerKind.KEYFRAME_RETRY:
                self.keyframes.handle_timer(self.streams.get(name), name, now)
            elif kind is TimerKind.MEDIA_TIMEOUT:
                self.liveness.handle_timer(self.streams.get(name), name, now)
            elif kind is TimerKind.NACK:
                self.repair.handle_timer(self.streams.get(name), name, now)
            elif kind is TimerKind.HEADROOM_PROBE:
                viewer = self.sessions.get(name)
                if isinstance(viewer, ViewerSession):
                    self.egress.headroom.handle_timer(viewer, self.streams.get(viewer.stream), now)

    def _reschedule(self, session: MediaSession) -> None:
        if session.id in self.sessions:
            self.timers.schedule((TimerKind.SESSION, session.id), session.get_timer())

    # ------------------------------------------------------------------ session events

    def _handle_events(self, session: MediaSession, events: list[SessionEvent], now: float) -> None:
        for event in events:
            if isinstance(event, AddressLearned):
                previous = self._by_address.get(event.address)
                if previous is not None and previous is not session:
                    self.counters["address_taken_over"] += 1
                for addr, owner in list(self._by_address.items()):
                    if owner is session and addr != event.address and event.nominated:
                        del self._by_address[addr]
                self._by_address[event.address] = session
                # The event comes whenever the selected pair changes, also when only its
                # local half moved: the fan-out then keeps the address and takes the source.
                if isinstance(session, ViewerSession):
                    self.egress.moved(session, event.address, event.local)
            elif isinstance(event, Keyed):
                session.connected_at = now
                if isinstance(session, PublisherSession):
                    self.ingest.keyed(session, now)
                elif isinstance(session, ViewerSession):
                    self.egress.keyed(session, now)
            elif isinstance(event, Gone):
                self.end_session(session.id, now, event.reason)
                return

    def _flush(self, session: MediaSession) -> None:
        for datagram, addr in session.datagrams_to_send():
            self.sender.transmit(datagram, addr, session.local_address)

    # ------------------------------------------------------------------ helpers

    def _subscribe(self, session: ViewerSession, media: EgressMedia, track: Track) -> None:
        # The layer selector is built before the egress it subscribes through.
        self.egress.subscribe(session, media, track)

    def new_session(
        self,
        cls: type[MediaSession],
        kind: SessionKind,
        stream: str,
        offer: sdp.SessionDescription,
        now: float,
    ) -> MediaSession:
        """A session answering ``offer`` (not registered: ``publish``/``view`` do that)."""
        remote = remote_transport(offer)
        return cls.create(
            kind=kind,
            stream=stream,
            certificate=self.certificate,
            # RFC 8842 §5.5: answering "active" makes us the DTLS client.
            dtls_role="client" if answer_setup(remote.setup) == "active" else "server",
            remote_fingerprints=list(remote.fingerprints),
            remote_ufrag=remote.ice_ufrag,
            remote_pwd=remote.ice_pwd,
            consent_timeout=self.config.consent_timeout,
            now=now,
            connect_timeout=self.config.connect_timeout,
        )

    def _register(self, session: MediaSession) -> None:
        self.sessions[session.id] = session
        self._by_ufrag[session.local_ufrag] = session
        # A session that never connects is gone at its connect deadline (session.py).
        self._reschedule(session)

    def local_transport(self, session: MediaSession) -> LocalTransport:
        """What our answers say about our side of ``session``'s transport."""
        return LocalTransport(
            ice_ufrag=session.local_ufrag,
            ice_pwd=session.local_pwd,
            fingerprints=self.certificate.fingerprints,
            candidates=self.candidates,
        )

    def _new_ssrc(self) -> int:
        return secrets.randbits(32) or 1
