"""The session layer of one media worker: streams, their publisher and viewers, and the
demultiplexing of the worker's single UDP port.

Theory of operation
-------------------
Every session of the worker shares one UDP port (ICE-lite, DESIGN.md §6). A datagram is
classified by its first byte (RFC 7983 §7):

* STUN      -> the session whose local ufrag is in USERNAME (the only way to tell sessions
               apart before an address is known); the ICE agent answers it.
* DTLS      -> the session that owns the source address (learned from a verified check).
* RTP/RTCP  -> the session that owns the source address: a publisher's SRTP is unprotected
               once and pushed to the compiled ``Fanout``; a viewer's SRTCP carries
               feedback (NACK, PLI/FIR, RR, REMB).
* anything else, or an unknown address -> counted and dropped.

Media for viewers never passes through Python per viewer: ``Fanout.push`` re-encrypts and
sends for every subscriber in C. Python runs once per *ingested* packet (a few hundred per
second) and once per viewer RTCP/STUN packet (about one per viewer per second).

The router is driven like the protocol layer (``datagram_received(data, addr, now)``,
``get_timer()``, ``handle_timer(now)``); ``transport.py`` is the thin asyncio driver.
"""

from __future__ import annotations

import heapq
import logging
import math
import secrets
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from whepfan import _fastpath
from whepfan.config import MediaConfig
from whepfan.errors import Conflict, NotFound, PeerError, ServiceUnavailable, Unprocessable
from whepfan.protocol import codecs, rtcp, sdp
from whepfan.protocol.demux import PacketKind, classify, is_rtcp
from whepfan.protocol.dtls import DtlsCertificate, DtlsSession
from whepfan.protocol.ice import stun_local_ufrag
from whepfan.protocol.negotiation import (
    IngestMedia,
    LocalTransport,
    accept_counter_answer,
    answer_publisher,
    answer_setup,
    answer_viewer,
    build_counter_offer,
    remote_transport,
)
from whepfan.session import (
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

log = logging.getLogger("whepfan.router")

SendDatagram = Callable[[bytes, Address], None]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """Something players may want to hear about (WHEP core extensions, SSE): ``type`` is
    "active", "inactive" or "viewercount"; ``data`` is the event's JSON payload."""

    stream: str
    type: str
    data: dict[str, object]


StreamListener = Callable[[StreamEvent], None]

RTP_SEQ_MOD = 1 << 16
RTP_TS_MOD = 1 << 32


@dataclass(eq=False, kw_only=True)
class IngestReceiveStats:
    """Receiver-side statistics of one publisher SSRC, for our RRs (RFC 3550 §6.4.1, A.3, A.8)."""

    ssrc: int
    clock_rate: int
    base_seq: int | None = None
    max_seq: int = 0
    cycles: int = 0
    received: int = 0
    expected_prior: int = 0
    received_prior: int = 0
    jitter: float = 0.0
    last_transit: float | None = None
    last_sr_ntp_middle: int = 0
    last_sr_arrival: float | None = None

    def update(self, seq: int, rtp_timestamp: int, now: float) -> None:
        if self.base_seq is None:
            self.base_seq = self.max_seq = seq
        else:
            delta = (seq - self.max_seq) % RTP_SEQ_MOD
            if 0 < delta < RTP_SEQ_MOD // 2:
                if seq < self.max_seq:
                    self.cycles += RTP_SEQ_MOD  # RFC 3550 A.1: sequence number wrapped
                self.max_seq = seq
        self.received += 1
        # Interarrival jitter, RFC 3550 §6.4.1 / A.8, in timestamp units.
        transit = now * self.clock_rate - rtp_timestamp
        if self.last_transit is not None:
            d = abs(transit - self.last_transit)
            if d < self.clock_rate * 10:  # ignore jumps across a timestamp rebase
                self.jitter += (d - self.jitter) / 16
        self.last_transit = transit

    def report_block(self, now: float) -> rtcp.ReportBlock:
        assert self.base_seq is not None
        extended_max = self.cycles + self.max_seq
        expected = extended_max - self.base_seq + 1
        lost = max(0, expected - self.received)
        expected_interval = expected - self.expected_prior
        received_interval = self.received - self.received_prior
        self.expected_prior, self.received_prior = expected, self.received
        lost_interval = expected_interval - received_interval
        fraction = (
            0
            if expected_interval <= 0 or lost_interval <= 0
            else ((lost_interval << 8) // expected_interval)
        )
        dlsr = 0
        if self.last_sr_arrival is not None:
            dlsr = int((now - self.last_sr_arrival) * 65536)  # units of 1/65536 s
        return rtcp.ReportBlock(
            ssrc=self.ssrc,
            fraction_lost=min(fraction, 255),
            cumulative_lost=min(lost, 0x7FFFFF),
            highest_sequence=extended_max & 0xFFFFFFFF,
            jitter=int(self.jitter),
            last_sender_report=self.last_sr_ntp_middle,
            delay_since_last_sender_report=dlsr,
        )


@dataclass(eq=False, kw_only=True)
class Track:
    """One ingested media source as the Fanout knows it (a fanout track id).

    A track outlives its publisher: when a publisher leaves and another returns on the
    same stream, the track is rebased so viewers see one continuous sequence-number and
    timestamp line (RFC 3550 §5.1 requires seq +1 per packet for loss detection).
    """

    fanout_id: int
    kind: str
    ingest: IngestMedia  # the first publisher's negotiation: canonical PT and extension ids
    codec_name: str
    clock_rate: int
    seq_offset: int = 0
    ts_offset: int = 0
    last_out_seq: int | None = None
    last_out_ts: int | None = None
    last_packet_at: float = 0.0
    rebase_pending: bool = False
    # publisher ext id -> canonical id, when a returning publisher numbered them differently
    ext_remap: bytes | None = None
    packets: int = 0
    octets: int = 0


@dataclass(eq=False, kw_only=True)
class Stream:
    name: str
    tracks: dict[str, Track] = field(default_factory=dict)
    publisher: PublisherSession | None = None
    viewers: dict[str, ViewerSession] = field(default_factory=dict)
    last_keyframe_request: float = -math.inf
    keyframe_requests_sent: int = 0
    # publisher SSRC -> (track, is_rtx)
    ingest_by_ssrc: dict[int, tuple[Track, bool]] = field(default_factory=dict)
    ingest_stats: dict[int, IngestReceiveStats] = field(default_factory=dict)
    publisher_srtp_in: _fastpath.SrtpSession | None = None
    publisher_srtcp_out: _fastpath.SrtpSession | None = None
    publisher_srtcp_in: _fastpath.SrtpSession | None = None
    next_feedback_at: float = math.inf
    # True from the publisher's first keyed moment until it leaves ("active" event sent).
    active: bool = False

    @property
    def live(self) -> bool:
        return self.publisher is not None and self.publisher.state is not SessionState.CLOSED


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
    ) -> None:
        self.config = config
        # Called when a deadline earlier than any before is scheduled, so the I/O driver
        # re-arms its single timer (signalling calls create sessions outside datagram input).
        self._wake = wake
        self.certificate = certificate
        self.fanout = fanout
        self._send = send
        self.candidates = candidates
        self.streams: dict[str, Stream] = {}
        self.sessions: dict[str, MediaSession] = {}
        self._by_ufrag: dict[str, MediaSession] = {}
        self._by_address: dict[Address, MediaSession] = {}
        self._timers: list[tuple[float, int, str]] = []
        self._scheduled: dict[str, float] = {}
        self._timer_seq = 0
        # Our SSRC as RTCP sender towards publishers (RFC 3550 §8.1: random).
        self.rtcp_ssrc = secrets.randbits(32)
        self.counters: Counter[str] = Counter()
        self._listeners: list[StreamListener] = []

    # ------------------------------------------------------------------ signalling API

    def publish(
        self, stream_name: str, offer_text: str, now: float
    ) -> tuple[PublisherSession, str]:
        """WHIP POST: negotiate, create the publisher session, return it and the answer."""
        stream = self.streams.get(stream_name)
        if stream is not None and stream.live:
            raise Conflict(f"stream {stream_name!r} already has a publisher", retry_after=5)
        offer = sdp.SessionDescription.parse(offer_text)
        session = self._new_session(
            PublisherSession, SessionKind.PUBLISHER, stream_name, offer, now
        )
        answer, ingest = answer_publisher(offer, self._local_transport(session))
        if not ingest:
            raise Unprocessable("the offer carries no audio or video whepfan can receive")
        assert isinstance(session, PublisherSession)
        session.ingest = ingest
        if stream is None:
            stream = self.streams[stream_name] = Stream(name=stream_name)
        self._attach_publisher(stream, session, now)
        self._register(session, now)
        log.info(
            "publisher %s on %r: %s",
            session.id[:8],
            stream_name,
            ", ".join(f"{m.kind}/{m.codec.name}" for m in ingest),
        )
        return session, str(answer)

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[ViewerSession, str]:
        """WHEP POST: negotiate against the live stream, create the viewer session."""
        stream = self._live_stream_for_viewer(stream_name)
        offer = sdp.SessionDescription.parse(offer_text)
        session = self._new_session(ViewerSession, SessionKind.VIEWER, stream_name, offer, now)
        assert isinstance(session, ViewerSession)
        ingest = [track.ingest for track in stream.tracks.values()]
        answer, egress = answer_viewer(
            offer, self._local_transport(session), ingest, ssrc_source=self._new_ssrc
        )
        session.egress = egress
        stream.viewers[session.id] = session
        self._register(session, now)
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
        )
        assert isinstance(session, ViewerSession)
        offer = build_counter_offer(
            self._local_transport(session),
            [track.ingest for track in stream.tracks.values()],
            ssrc_source=self._new_ssrc,
        )
        session.counter_offer = str(offer)
        session.answer_deadline = now + self.config.counter_offer_ttl
        stream.viewers[session.id] = session
        self._register(session, now)
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
        self._scheduled.pop(session.id, None)
        stream = self.streams.get(session.stream)
        if isinstance(session, ViewerSession):
            if session.fanout_slot is not None:
                self.fanout.remove_viewer(session.fanout_slot)
                session.fanout_slot = None
            if stream is not None and stream.viewers.pop(session.id, None) is not None:
                self._emit_viewer_count(stream)
        elif (
            isinstance(session, PublisherSession)
            and stream is not None
            and stream.publisher is session
        ):
            self._detach_publisher(stream)
        self.counters[f"sessions_ended_{reason.split(':')[0]}"] += 1
        log.info(
            "%s %s on %r ended: %s", session.kind.value, session.id[:8], session.stream, reason
        )
        return True

    def get_session(self, session_id: str) -> MediaSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound("no such session")
        return session

    def add_listener(self, listener: StreamListener) -> None:
        """Call ``listener`` for every StreamEvent. Listeners must be cheap and must not
        raise: they run on the media worker's event loop (coalesce, queue, return)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: StreamListener) -> None:
        self._listeners.remove(listener)

    def _emit(self, stream: str, type_: str, data: dict[str, object]) -> None:
        event = StreamEvent(stream, type_, data)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener bug must not break media
                log.exception("stream event listener failed")

    def _emit_viewer_count(self, stream: Stream) -> None:
        self._emit(stream.name, "viewercount", {"viewercount": len(stream.viewers)})

    @property
    def viewer_count(self) -> int:
        return sum(len(s.viewers) for s in self.streams.values())

    # ------------------------------------------------------------------ datagram input

    def datagram_received(self, data: bytes, addr: Address, now: float) -> None:
        if not data:
            self.counters["drop_empty"] += 1
            return
        kind = classify(data[0])
        if kind is PacketKind.STUN:
            self._receive_stun(data, addr, now)
            return
        if kind is not PacketKind.DTLS and kind is not PacketKind.RTP_OR_RTCP:
            self.counters["drop_unknown_kind"] += 1  # ZRTP, TURN channel, QUIC, garbage
            return
        session = self._by_address.get(addr)
        if session is None:
            self.counters["drop_unknown_address"] += 1
            return
        if kind is PacketKind.DTLS:
            self._handle_events(session, session.receive_dtls(data, now), now)
            self._flush(session)
            self._reschedule(session)
        elif kind is PacketKind.RTP_OR_RTCP:
            if session.state is not SessionState.CONNECTED:
                self.counters["drop_media_before_keys"] += 1
            elif isinstance(session, PublisherSession):
                if is_rtcp(data):
                    self._publisher_rtcp(session, data, now)
                else:
                    self._publisher_rtp(session, data, now)
            elif isinstance(session, ViewerSession):
                if is_rtcp(data):
                    self._viewer_rtcp(session, data, now)
                else:
                    self.counters["drop_rtp_from_viewer"] += 1  # viewers are recvonly

    def _receive_stun(self, data: bytes, addr: Address, now: float) -> None:
        ufrag = stun_local_ufrag(data)
        session = self._by_ufrag.get(ufrag) if ufrag is not None else None
        if session is None:
            self.counters["drop_stun_unknown_ufrag"] += 1
            return
        response, events = session.receive_stun(data, addr, now)
        if response is not None:
            self._send(response, addr)
        self._handle_events(session, events, now)
        self._flush(session)
        self._reschedule(session)

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        while self._timers:
            deadline, _, key = self._timers[0]
            if self._scheduled.get(key) == deadline:
                return deadline
            heapq.heappop(self._timers)  # stale entry
        return None

    def handle_timer(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            deadline, _, key = heapq.heappop(self._timers)
            if self._scheduled.get(key) != deadline:
                continue
            del self._scheduled[key]
            if key.startswith("stream:"):
                stream = self.streams.get(key[7:])
                if stream is not None:
                    self._stream_timer(stream, now)
                continue
            session = self.sessions.get(key)
            if session is None:
                continue
            self._handle_events(session, session.handle_timer(now), now)
            self._flush(session)
            if session.id in self.sessions:
                self._reschedule(session)

    def _schedule(self, key: str, deadline: float | None) -> None:
        if deadline is None:
            self._scheduled.pop(key, None)
            return
        if self._scheduled.get(key) == deadline:
            return
        self._scheduled[key] = deadline
        self._timer_seq += 1
        earliest = not self._timers or deadline < self._timers[0][0]
        heapq.heappush(self._timers, (deadline, self._timer_seq, key))
        if earliest:
            self._wake()

    def _reschedule(self, session: MediaSession) -> None:
        if session.id in self.sessions:
            self._schedule(session.id, session.get_timer())

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
                if isinstance(session, ViewerSession) and session.fanout_slot is not None:
                    self.fanout.set_viewer_address(session.fanout_slot, *event.address)
            elif isinstance(event, Keyed):
                session.connected_at = now
                if isinstance(session, PublisherSession):
                    self._publisher_keyed(session, now)
                elif isinstance(session, ViewerSession):
                    self._viewer_keyed(session, now)
            elif isinstance(event, Gone):
                self.end_session(session.id, now, event.reason)
                return

    def _flush(self, session: MediaSession) -> None:
        for datagram, addr in session.datagrams_to_send():
            self._send(datagram, addr)

    # ------------------------------------------------------------------ publishers

    def _attach_publisher(self, stream: Stream, session: PublisherSession, now: float) -> None:
        stream.publisher = session
        stream.ingest_by_ssrc.clear()
        stream.ingest_stats.clear()
        for media in session.ingest:
            track = stream.tracks.get(media.kind)
            if track is not None and (
                track.codec_name.lower() != media.codec.name.lower()
                or track.clock_rate != media.codec.clock_rate
            ):
                # Viewers negotiated the old codec; they cannot decode the new one.
                self._drop_track(stream, track, now)
                track = None
            if track is None:
                cache = (
                    self.config.video_cache_packets
                    if media.kind == "video"
                    else self.config.audio_cache_packets
                )
                track = Track(
                    fanout_id=self.fanout.add_track(cache_packets=cache),
                    kind=media.kind,
                    ingest=media,
                    codec_name=media.codec.name,
                    clock_rate=media.codec.clock_rate,
                )
                stream.tracks[media.kind] = track
            else:
                track.rebase_pending = True
                track.ext_remap = _extension_remap(media, track.ingest)
            # Simulcast layers are separate sources; until per-layer tracks exist only
            # the first signalled encoding feeds the track (the others are dropped).
            for layer in media.tracks[:1]:
                if layer.ssrc is not None:
                    stream.ingest_by_ssrc[layer.ssrc] = (track, False)
                if layer.rtx_ssrc is not None:
                    stream.ingest_by_ssrc[layer.rtx_ssrc] = (track, True)
        for kind in list(stream.tracks):
            if all(m.kind != kind for m in session.ingest):
                self._drop_track(stream, stream.tracks[kind], now)

    def _drop_track(self, stream: Stream, track: Track, now: float) -> None:
        for viewer in list(stream.viewers.values()):
            if track.fanout_id in viewer.track_by_ssrc.values():
                self.end_session(viewer.id, now, "codec-changed")
        self.fanout.remove_track(track.fanout_id)
        del stream.tracks[track.kind]

    def _detach_publisher(self, stream: Stream) -> None:
        """The publisher left: viewers stay subscribed, waiting for the next one (issue:
        'viewers resume with continuous sequence numbers when a publisher returns')."""
        stream.publisher = None
        if stream.active:
            stream.active = False
            self._emit(stream.name, "inactive", {})
        stream.publisher_srtp_in = stream.publisher_srtcp_out = stream.publisher_srtcp_in = None
        stream.ingest_by_ssrc.clear()
        stream.next_feedback_at = math.inf
        self._schedule("stream:" + stream.name, None)
        if not stream.viewers:
            for track in list(stream.tracks.values()):
                self.fanout.remove_track(track.fanout_id)
            del self.streams[stream.name]

    def _publisher_keyed(self, session: PublisherSession, now: float) -> None:
        stream = self.streams.get(session.stream)
        if stream is None or stream.publisher is not session or session.keys is None:
            return
        keys = session.keys
        stream.publisher_srtp_in = _fastpath.SrtpSession(
            keys.profile, keys.remote_key, keys.remote_salt
        )
        stream.publisher_srtcp_out = _fastpath.SrtpSession(
            keys.profile, keys.local_key, keys.local_salt
        )
        stream.publisher_srtcp_in = _fastpath.SrtpSession(
            keys.profile, keys.remote_key, keys.remote_salt
        )
        stream.next_feedback_at = now + self.config.publisher_feedback_interval
        self._schedule("stream:" + stream.name, stream.next_feedback_at)
        self._request_keyframe(stream, now, force=True)
        if not stream.active:
            stream.active = True
            self._emit(stream.name, "active", {})

    def _publisher_rtp(self, session: PublisherSession, data: bytes, now: float) -> None:
        stream = self.streams.get(session.stream)
        if stream is None or stream.publisher is not session or stream.publisher_srtp_in is None:
            self.counters["drop_stale_publisher"] += 1
            return
        try:
            plain = stream.publisher_srtp_in.unprotect(data)
        except _fastpath.SrtpError as exc:
            self.counters[f"drop_ingest_srtp_{exc.reason}"] += 1
            return
        if len(plain) < 12:
            self.counters["drop_ingest_malformed"] += 1
            return
        ssrc = int.from_bytes(plain[8:12], "big")
        entry = stream.ingest_by_ssrc.get(ssrc) or self._learn_ingest_ssrc(stream, session, plain)
        if entry is None:
            self.counters["drop_ingest_unknown_ssrc"] += 1
            return
        track, is_rtx = entry
        packet = bytearray(plain)
        if is_rtx:
            # RFC 4588 §4: the original sequence number leads the RTX payload.
            unwrapped = _unwrap_rtx(packet, track.ingest.codec.payload_type)
            if unwrapped is None:
                self.counters["drop_ingest_malformed"] += 1
                return
            packet = unwrapped
        self._ingest(stream, track, ssrc, packet, now, retransmission=is_rtx)

    def _learn_ingest_ssrc(
        self, stream: Stream, session: PublisherSession, plain: bytes
    ) -> tuple[Track, bool] | None:
        """Unsignalled SSRC (e.g. Chromium simulcast): bind it by payload type / MID."""
        pt = plain[1] & 0x7F
        for media in session.ingest:
            track = stream.tracks.get(media.kind)
            if track is None:
                continue
            if pt == media.codec.payload_type:
                entry = (track, False)
            elif media.codec.rtx_payload_type is not None and pt == media.codec.rtx_payload_type:
                entry = (track, True)
            else:
                continue
            stream.ingest_by_ssrc[int.from_bytes(plain[8:12], "big")] = entry
            return entry
        return None

    def _ingest(
        self,
        stream: Stream,
        track: Track,
        ssrc: int,
        packet: bytearray,
        now: float,
        *,
        retransmission: bool = False,
    ) -> None:
        try:
            header_len = codecs_payload_offset(packet)
        except ValueError:
            self.counters["drop_ingest_malformed"] += 1
            return
        seq, timestamp = struct.unpack_from("!HI", packet, 2)
        stats = stream.ingest_stats.get(ssrc)
        if stats is None:
            stats = stream.ingest_stats[ssrc] = IngestReceiveStats(
                ssrc=ssrc, clock_rate=track.clock_rate
            )
        if not retransmission:
            stats.update(seq, timestamp, now)
        if track.rebase_pending:
            self._rebase(track, seq, timestamp, now)
        if track.seq_offset or track.ts_offset:
            struct.pack_into(
                "!HI",
                packet,
                2,
                (seq + track.seq_offset) % RTP_SEQ_MOD,
                (timestamp + track.ts_offset) % RTP_TS_MOD,
            )
        if track.ext_remap is not None:
            _remap_extension_ids(packet, track.ext_remap)
        out_seq = (seq + track.seq_offset) % RTP_SEQ_MOD
        if track.last_out_seq is None or 0 < (out_seq - track.last_out_seq) % RTP_SEQ_MOD < 0x8000:
            track.last_out_seq = out_seq
            track.last_out_ts = (timestamp + track.ts_offset) % RTP_TS_MOD
            track.last_packet_at = now
        keyframe = track.kind == "video" and codecs.is_keyframe_start(
            track.codec_name, bytes(packet[header_len:])
        )
        track.packets += 1
        track.octets += len(packet) - header_len
        self.fanout.push(track.fanout_id, bytes(packet), keyframe)

    def _rebase(self, track: Track, seq: int, timestamp: int, now: float) -> None:
        """First packet of a returning publisher: continue the viewers' sequence and
        timestamp lines where the previous publisher stopped (RFC 3550 §5.1)."""
        track.rebase_pending = False
        if track.last_out_seq is None or track.last_out_ts is None:
            track.seq_offset = track.ts_offset = 0
            return
        elapsed_ticks = int(max(now - track.last_packet_at, 0.0) * track.clock_rate) or 1
        track.seq_offset = (track.last_out_seq + 1 - seq) % RTP_SEQ_MOD
        track.ts_offset = (track.last_out_ts + elapsed_ticks - timestamp) % RTP_TS_MOD

    def _publisher_rtcp(self, session: PublisherSession, data: bytes, now: float) -> None:
        stream = self.streams.get(session.stream)
        if stream is None or stream.publisher is not session:
            return
        srtcp_in = stream.publisher_srtcp_in
        if srtcp_in is None:
            return
        try:
            plain = srtcp_in.unprotect_rtcp(data)
            packets = rtcp.parse_compound(plain)
        except (_fastpath.SrtpError, rtcp.ParseError) as exc:
            self.counters["drop_ingest_rtcp"] += 1
            log.debug("bad publisher RTCP: %s", exc)
            return
        for packet in packets:
            if isinstance(packet, rtcp.SenderReport):
                entry = stream.ingest_by_ssrc.get(packet.ssrc)
                stats = stream.ingest_stats.get(packet.ssrc)
                if stats is not None:
                    stats.last_sr_ntp_middle = (packet.ntp_timestamp >> 16) & 0xFFFFFFFF
                    stats.last_sr_arrival = now
                if entry is not None and not entry[1]:
                    track = entry[0]
                    # Relay the publisher's NTP<->RTP mapping, shifted like the media,
                    # so browsers can lip-sync audio and video (RFC 3550 §6.4.1).
                    self.fanout.send_sender_reports(
                        track.fanout_id,
                        packet.ntp_timestamp,
                        (packet.rtp_timestamp + track.ts_offset) % RTP_TS_MOD,
                    )

    def _stream_timer(self, stream: Stream, now: float) -> None:
        """Periodic feedback to the publisher: RR for loss/jitter and REMB as a cap."""
        publisher = stream.publisher
        if publisher is None or publisher.address is None or stream.publisher_srtcp_out is None:
            return
        blocks = [
            s.report_block(now) for s in stream.ingest_stats.values() if s.base_seq is not None
        ]
        packets: list[rtcp.RtcpPacket] = [
            rtcp.ReceiverReport(ssrc=self.rtcp_ssrc, reports=blocks[:31])
        ]
        media_ssrcs = [ssrc for ssrc, (_, rtx) in stream.ingest_by_ssrc.items() if not rtx]
        if media_ssrcs:
            packets.append(
                rtcp.ReceiverEstimatedMaxBitrate(
                    sender_ssrc=self.rtcp_ssrc,
                    bitrate=self.config.publisher_max_bitrate,
                    ssrcs=media_ssrcs,
                )
            )
        compound = b"".join(bytes(p) for p in packets)
        try:
            self._send(stream.publisher_srtcp_out.protect_rtcp(compound), publisher.address)
        except _fastpath.SrtpError:
            self.counters["publisher_feedback_failed"] += 1
        stream.next_feedback_at = now + self.config.publisher_feedback_interval
        self._schedule("stream:" + stream.name, stream.next_feedback_at)

    def _request_keyframe(self, stream: Stream, now: float, *, force: bool = False) -> bool:
        """PLI upstream (RFC 4585 §6.3.1), at most once per interval per stream."""
        if not force and now - stream.last_keyframe_request < self.config.keyframe_request_interval:
            self.counters["keyframe_requests_throttled"] += 1
            return False
        publisher = stream.publisher
        if publisher is None or publisher.address is None or stream.publisher_srtcp_out is None:
            return False
        video_ssrcs = [
            ssrc
            for ssrc, (track, rtx) in stream.ingest_by_ssrc.items()
            if not rtx and track.kind == "video"
        ]
        if not video_ssrcs:
            return False
        stream.last_keyframe_request = now
        stream.keyframe_requests_sent += 1
        compound = b"".join(
            bytes(rtcp.PictureLossIndication(sender_ssrc=self.rtcp_ssrc, media_ssrc=ssrc))
            for ssrc in video_ssrcs
        )
        try:
            self._send(stream.publisher_srtcp_out.protect_rtcp(compound), publisher.address)
        except _fastpath.SrtpError:
            self.counters["keyframe_request_failed"] += 1
            return False
        self.counters["keyframe_requests_sent"] += 1
        return True

    # ------------------------------------------------------------------ viewers

    def _viewer_keyed(self, session: ViewerSession, now: float) -> None:
        stream = self.streams.get(session.stream)
        keys = session.keys
        if stream is None or keys is None or session.address is None:
            self.end_session(session.id, now, "stream-gone")
            return
        slot = self.fanout.add_viewer(
            session.address[0],
            session.address[1],
            profile=keys.profile,
            tx_key=keys.local_key,
            tx_salt=keys.local_salt,
            rx_key=keys.remote_key,
            rx_salt=keys.remote_salt,
        )
        session.fanout_slot = slot
        for media in session.egress:
            track = stream.tracks.get(media.kind)
            if track is None:
                continue
            self.fanout.subscribe(
                slot,
                track.fanout_id,
                ssrc=media.ssrc,
                payload_type=media.payload_type,
                ext_map=media.ext_map_for(track.ingest),
                rtx_ssrc=media.rtx_ssrc or 0,
                rtx_payload_type=-1 if media.rtx_payload_type is None else media.rtx_payload_type,
                # Video starts on a keyframe so the first frame decodes; audio at once.
                wait_keyframe=media.kind == "video",
            )
            session.track_by_ssrc[media.ssrc] = track.fanout_id
        # A new viewer needs a keyframe now rather than at the next periodic one: this
        # is what makes time-to-first-frame about one frame interval.
        self._request_keyframe(stream, now)

    def _viewer_rtcp(self, session: ViewerSession, data: bytes, now: float) -> None:
        slot = session.fanout_slot
        if slot is None:
            return
        try:
            plain = self.fanout.unprotect_rtcp(slot, data)
            packets = rtcp.parse_compound(plain)
        except (_fastpath.SrtpError, rtcp.ParseError):
            self.counters["drop_viewer_rtcp"] += 1
            return
        stream = self.streams.get(session.stream)
        for packet in packets:
            if isinstance(packet, rtcp.GenericNack):
                track = session.track_by_ssrc.get(packet.media_ssrc)
                if track is not None:
                    lost = packet.lost_sequence_numbers()
                    session.nacks_received += len(lost)
                    self.counters["nack_requested"] += len(lost)
                    self.counters["nack_resent"] += self.fanout.resend(slot, track, lost)
            elif isinstance(packet, (rtcp.PictureLossIndication, rtcp.FullIntraRequest)):
                session.keyframe_requests += 1
                if stream is not None:
                    self._request_keyframe(stream, now)
            elif isinstance(packet, rtcp.ReceiverReport):
                for block in packet.reports:
                    if block.ssrc in session.track_by_ssrc:
                        session.fraction_lost = block.fraction_lost / 256
                        session.jitter = block.jitter
            elif isinstance(packet, rtcp.ReceiverEstimatedMaxBitrate):
                session.remb_bitrate = packet.bitrate

    # ------------------------------------------------------------------ helpers

    def _new_session(
        self,
        cls: type[MediaSession],
        kind: SessionKind,
        stream: str,
        offer: sdp.SessionDescription,
        now: float,
    ) -> MediaSession:
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
        )

    def _register(self, session: MediaSession, now: float) -> None:
        self.sessions[session.id] = session
        self._by_ufrag[session.local_ufrag] = session
        # A session that never completes ICE is gone when its consent deadline passes.
        self._reschedule(session)

    def _local_transport(self, session: MediaSession) -> LocalTransport:
        return LocalTransport(
            ice_ufrag=session.local_ufrag,
            ice_pwd=session.local_pwd,
            fingerprints=self.certificate.fingerprints,
            candidates=self.candidates,
        )

    def _new_ssrc(self) -> int:
        return secrets.randbits(32) or 1


def codecs_payload_offset(packet: bytes | bytearray) -> int:
    """Offset of the RTP payload (after CSRCs and the header extension, RFC 3550 §5.1)."""
    if len(packet) < 12 or packet[0] >> 6 != 2:
        raise ValueError("not RTP")
    offset = 12 + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10:
        if len(packet) < offset + 4:
            raise ValueError("truncated extension")
        offset += 4 + 4 * int.from_bytes(packet[offset + 2 : offset + 4], "big")
    if offset > len(packet):
        raise ValueError("truncated")
    return offset


def _unwrap_rtx(packet: bytearray, original_pt: int) -> bytearray | None:
    """RFC 4588 §4: rebuild the original packet from an RTX packet (OSN + payload)."""
    try:
        offset = codecs_payload_offset(packet)
    except ValueError:
        return None
    if len(packet) < offset + 2:
        return None
    original_seq = packet[offset : offset + 2]
    out = bytearray(packet[:offset]) + packet[offset + 2 :]
    out[1] = (out[1] & 0x80) | original_pt
    out[2:4] = original_seq
    return out


def _extension_remap(media: IngestMedia, canonical: IngestMedia) -> bytes | None:
    """Map a returning publisher's header-extension ids onto the stream's canonical ids."""
    if media.extension_ids == canonical.extension_ids:
        return None
    table = bytearray(256)
    for uri, ext_id in media.extension_ids.items():
        table[ext_id] = canonical.extension_ids.get(uri, 0)
    return bytes(table)


def _remap_extension_ids(packet: bytearray, table: bytes) -> None:
    """Renumber header extensions in place (RFC 8285 §4.2 one-byte, §4.3 two-byte);
    ids with no canonical counterpart become padding (id 0), lengths never change."""
    if not packet[0] & 0x10:
        return
    start = 12 + 4 * (packet[0] & 0x0F)
    profile = int.from_bytes(packet[start : start + 2], "big")
    end = start + 4 + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
    i = start + 4
    if profile == 0xBEDE:
        while i < end:
            ext_id, length = packet[i] >> 4, (packet[i] & 0x0F) + 1
            if ext_id == 0:
                i += 1
                continue
            if ext_id == 15:
                return  # RFC 8285 §4.2: id 15 stops parsing
            new_id = table[ext_id]
            if new_id:
                packet[i] = (new_id << 4) | (length - 1)
            else:
                packet[i : i + 1 + length] = bytes(1 + length)
            i += 1 + length
    elif profile >> 4 == 0x100:
        while i + 1 < end:
            ext_id = packet[i]
            if ext_id == 0:
                i += 1
                continue
            length = packet[i + 1]
            new_id = table[ext_id]
            if new_id:
                packet[i] = new_id
            else:
                packet[i : i + 2 + length] = bytes(2 + length)
            i += 2 + length
