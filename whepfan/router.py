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

Simulcast: every encoding of a publisher's media is its own Fanout track (a "layer"),
bound to its SSRC by a=ssrc-group:SIM, or on first sight by the RID / repaired-RID header
extension (RFC 8852 §3). Each viewer receives one layer per media under its one SSRC: a
``LayerChoice`` records which, chosen by the layer extension (``select_layer``) or by the
``LayerPolicy`` from its RTCP, and ``Fanout.switch`` moves it keyframe-aligned in C.
Layers are ordered low to high by measured resolution, then bitrate, then signalling.

The router is driven like the protocol layer (``datagram_received(data, addr, now,
local)``, ``get_timer()``, ``handle_timer(now)``); ``transport.py`` is the thin asyncio
driver. ``local`` is the address of ours a datagram was sent to, known when the socket is
bound to a wildcard address (IP_PKTINFO): a session remembers the one its selected pair
uses, and every reply, DTLS flight, RTCP packet and fan-out datagram to that peer leaves
from it (``send_from`` here, the viewer's ``source`` in the Fanout), because peers accept
only datagrams from the transport address they checked (RFC 8445 §4, §7.2.5.2.1).
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import secrets
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from whepfan import _fastpath
from whepfan.config import MediaConfig
from whepfan.errors import (
    Conflict,
    NotFound,
    ParseError,
    PeerError,
    ServiceUnavailable,
    Unprocessable,
)
from whepfan.protocol import codecs, rtcp, rtp, sdp
from whepfan.protocol.demux import PacketKind, classify, is_rtcp
from whepfan.protocol.dtls import DtlsCertificate, DtlsSession
from whepfan.protocol.ice import stun_local_ufrag
from whepfan.protocol.negotiation import (
    EgressMedia,
    IngestMedia,
    IngestTrack,
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
# (datagram, peer address, our source address): send from that address of this host.
SendDatagramFrom = Callable[[bytes, Address, str], None]
# (peer address) -> the source address the kernel's routing would give a datagram to it.
DefaultSource = Callable[[Address], str | None]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """Something players may want to hear about (WHEP core extensions, SSE): ``type`` is
    "active", "inactive" or "viewercount"; ``data`` is the event's JSON payload."""

    stream: str
    type: str
    data: dict[str, object]


StreamListener = Callable[[StreamEvent], None]


class StreamListeners:
    """Who hears StreamEvents (the SSE hub, the worker pool's forwarding). Listeners must
    be cheap and must not raise: they run on a media worker's event loop (coalesce, queue,
    return); one that raises is logged and the others still hear the event."""

    def __init__(self) -> None:
        self._listeners: list[StreamListener] = []

    def add(self, listener: StreamListener) -> None:
        self._listeners.append(listener)

    def remove(self, listener: StreamListener) -> None:
        self._listeners.remove(listener)

    def emit(self, stream: str, type_: str, data: dict[str, object]) -> None:
        event = StreamEvent(stream, type_, data)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener bug must not break media
                log.exception("stream event listener failed")


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
class LayerMeter:
    """Measured rates of one ingest track over fixed windows (RFC 3550 §6.4.1 counts the
    same octets: payload only). A track that went quiet reads as zero."""

    window: float = 1.0
    window_start: float | None = None
    octets: int = 0
    packets: int = 0
    frames: int = 0
    last_timestamp: int | None = None
    last_packet_at: float = -math.inf
    bitrate: float = 0.0  # bits/s
    packet_rate: float = 0.0  # packets/s
    frame_rate: float = 0.0  # pictures/s: distinct RTP timestamps (RFC 3550 §5.1)

    def add(self, payload_octets: int, timestamp: int, now: float) -> None:
        if self.window_start is None:
            self.window_start = now
        elapsed = now - self.window_start
        if elapsed >= self.window:
            self.bitrate = self.octets * 8 / elapsed
            self.packet_rate = self.packets / elapsed
            self.frame_rate = self.frames / elapsed
            self.window_start = now
            self.octets = self.packets = self.frames = 0
        self.octets += payload_octets
        self.packets += 1
        if timestamp != self.last_timestamp:
            self.frames += 1
            self.last_timestamp = timestamp
        self.last_packet_at = now

    def flowing(self, now: float) -> bool:
        return now - self.last_packet_at <= 2 * self.window

    def rates(self, now: float) -> tuple[float, float, float]:
        """(bits/s, packets/s, frames/s), zero once the track has been silent a while."""
        if not self.flowing(now):
            return 0.0, 0.0, 0.0
        return self.bitrate, self.packet_rate, self.frame_rate


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerRequest:
    """A viewer's layer choice (WHEP layer extension, EXT §5; spec notes §4.3). Nothing
    set means "automatic"; max* fields constrain the automatic choice too."""

    media_id: str | None = None
    rid: str | None = None
    spatial_layer: int | None = None
    temporal_layer: int | None = None
    max_spatial_layer: int | None = None
    max_temporal_layer: int | None = None
    max_width: int | None = None
    max_height: int | None = None

    @property
    def automatic(self) -> bool:
        return self.rid is None and self.spatial_layer is None


@dataclass(eq=False, kw_only=True)
class LayerPolicyState:
    """Per-viewer memory of the automatic policy (see ``LayerPolicy``)."""

    up_wait: float
    clean_since: float | None = None
    moved_at: float = -math.inf
    raised_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerPolicy:
    """Automatic simulcast layer choice from what the viewer reports, with hysteresis.

    Down at once (after ``hold`` on the current layer) when an RTCP RR shows more than
    ``loss_down`` of the interval's packets lost (RFC 3550 §6.4.1 fraction lost), or when
    the viewer's REMB estimate (draft-alvestrand-rmcat-remb §2) falls below
    ``remb_margin`` times what the current layer sends; as far down as the REMB requires.
    Up one layer after ``up_wait`` of clean reports (loss at most ``loss_clean``) and no
    REMB congestion. A REMB is not required to exceed the next layer's rate: it is a
    receive-side estimate, about the rate received while the link is clear, so without
    probing it never shows room for more. Instead, an upswitch followed by a downswitch
    within ``failed_up_window`` doubles the wait before the next try (up to
    ``max_up_wait``), so a viewer on a marginal link does not oscillate.
    """

    loss_down: float = 0.10
    loss_clean: float = 0.02
    up_wait: float = 5.0
    max_up_wait: float = 60.0
    failed_up_window: float = 10.0
    remb_margin: float = 0.85
    hold: float = 2.0

    def new_state(self) -> LayerPolicyState:
        return LayerPolicyState(up_wait=self.up_wait)

    @staticmethod
    def initial(count: int) -> int:
        """New viewers start in the middle (index into layers ordered low to high)."""
        return max(count - 1, 0) // 2

    def decide(
        self,
        state: LayerPolicyState,
        *,
        bitrates: Sequence[float],
        current: int,
        ceiling: int,
        fraction_lost: float | None,
        remb: int | None,
        now: float,
    ) -> int:
        """The layer index (``bitrates`` ordered low to high) the viewer should be on."""
        if current > ceiling:
            state.moved_at = now
            return ceiling
        congested = (fraction_lost is not None and fraction_lost > self.loss_down) or (
            remb is not None and remb < bitrates[current] * self.remb_margin
        )
        if congested:
            state.clean_since = None
            if current == 0 or now - state.moved_at < self.hold:
                return current
            target = current - 1
            if remb is not None:
                while target > 0 and bitrates[target] > remb:
                    target -= 1
            if state.raised_at is not None and now - state.raised_at < self.failed_up_window:
                state.up_wait = min(state.up_wait * 2, self.max_up_wait)
            state.raised_at = None
            state.moved_at = now
            return target
        if fraction_lost is not None and fraction_lost > self.loss_clean:
            state.clean_since = None
            return current
        if state.clean_since is None:
            state.clean_since = now
        if (
            current >= ceiling
            or now - state.clean_since < state.up_wait
            or now - state.moved_at < self.hold
        ):
            return current
        state.clean_since = state.moved_at = state.raised_at = now
        return current + 1


@dataclass(eq=False, kw_only=True)
class LayerChoice:
    """Which layer of a simulcast media one viewer receives, and why."""

    session: ViewerSession
    egress: EgressMedia
    policy: LayerPolicyState
    current: Track | None = None  # forwarding (Fanout subscription state 2 or 1 at start)
    pending: Track | None = None  # Fanout.switch() issued, waiting for its keyframe
    manual: Track | None = None  # chosen through the layer extension; None: automatic
    temporal_limit: int = -1  # -1: every temporal layer
    max_spatial_layer: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    fraction_lost: float | None = None
    remb: int | None = None

    @property
    def target(self) -> Track | None:
        return self.pending or self.current


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
    # Simulcast: this track is one encoding of its media (RFC 8853), named by ``rid``.
    rid: str | None = None
    # The encoder's target ceiling when the publisher signalled one (a=rid max-br).
    max_bitrate: int | None = None
    encoding_index: int = 0  # position among the publisher's encodings (signalled order)
    active: bool = True  # bound to an encoding of the current (or last) publisher
    width: int | None = None  # from the last keyframe (codecs.keyframe_size)
    height: int | None = None
    max_temporal_layer: int | None = None  # highest VP8/VP9 TID seen
    meter: LayerMeter = field(default_factory=LayerMeter)
    last_keyframe_request: float = -math.inf
    keyframes: int = 0

    def layer_info(self, now: float, spatial_layer: int) -> dict[str, object]:
        """This layer as the SSE ``layers`` event and the layer API describe it (EXT
        §4.3.3: rid, spatialLayerId, temporalLayerId, bitrate, width, height)."""
        bitrate, _, frame_rate = self.meter.rates(now)
        info: dict[str, object] = {
            "rid": self.rid,
            "encodingId": self.rid,  # the M02-W01 name of the same thing
            "spatialLayerId": spatial_layer,
            "temporalLayerId": self.max_temporal_layer or 0,
            "bitrate": int(bitrate),
            "framerate": round(frame_rate, 1),
        }
        if self.max_bitrate is not None:
            # The SFU cannot see the encoder's target; the publisher's signalled
            # ceiling is the closest it is told (omitted rather than guessed).
            info["targetBitrate"] = self.max_bitrate
        if self.width is not None and self.height is not None:
            info["width"], info["height"] = self.width, self.height
        return info


@dataclass(eq=False, kw_only=True)
class Stream:
    name: str
    # kind -> its tracks: one per simulcast encoding, in the publisher's signalled order
    tracks: dict[str, list[Track]] = field(default_factory=dict)
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
    # viewer session id -> its layer choice for the stream's video (simulcast or not)
    choices: dict[str, LayerChoice] = field(default_factory=dict)
    layers_reported_at: float = -math.inf
    layers_reported: object = None

    @property
    def live(self) -> bool:
        return self.publisher is not None and self.publisher.state is not SessionState.CLOSED

    def layers(self, kind: str = "video") -> list[Track]:
        """The active layers of ``kind``, low to high: by measured resolution, then
        measured bitrate, then signalled order (RFC 8853 leaves the order to the sender;
        a=ssrc-group:SIM lists lowest first)."""
        return sorted(
            (track for track in self.tracks.get(kind, ()) if track.active),
            key=lambda t: ((t.width or 0) * (t.height or 0), t.meter.bitrate, t.encoding_index),
        )

    def canonical_ingest(self) -> list[IngestMedia]:
        """The negotiation viewers are answered against: one IngestMedia per kind."""
        return [tracks[0].ingest for tracks in self.tracks.values() if tracks]


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
        layer_policy: LayerPolicy = LayerPolicy(),
        send_from: SendDatagramFrom | None = None,
        default_source: DefaultSource | None = None,
    ) -> None:
        self.config = config
        self.layer_policy = layer_policy
        # Called when a deadline earlier than any before is scheduled, so the I/O driver
        # re-arms its single timer (signalling calls create sessions outside datagram input).
        self._wake = wake
        self.certificate = certificate
        self.fanout = fanout
        self._send = send
        self._send_from = send_from
        self._default_source = default_source
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
        self._listeners = StreamListeners()
        # stream name -> layers whose keyframe request was throttled and is still owed.
        self._keyframe_retry: dict[str, list[Track]] = {}
        self._choice_by_slot: dict[int, LayerChoice] = {}

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
        answer, egress = answer_viewer(
            offer,
            self._local_transport(session),
            stream.canonical_ingest(),
            ssrc_source=self._new_ssrc,
        )
        session.egress = egress
        self._new_layer_choice(stream, session)
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
            stream.canonical_ingest(),
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
        stream = self.streams.get(session.stream)
        if stream is not None:
            self._new_layer_choice(stream, session)
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
                self._choice_by_slot.pop(session.fanout_slot, None)
                session.fanout_slot = None
            if stream is not None:
                stream.choices.pop(session.id, None)
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
        """Call ``listener`` for every StreamEvent (see StreamListeners)."""
        self._listeners.add(listener)

    def remove_listener(self, listener: StreamListener) -> None:
        self._listeners.remove(listener)

    def _emit(self, stream: str, type_: str, data: dict[str, object]) -> None:
        self._listeners.emit(stream, type_, data)

    def _emit_viewer_count(self, stream: Stream) -> None:
        self._emit(stream.name, "viewercount", {"viewercount": len(stream.viewers)})

    @property
    def viewer_count(self) -> int:
        return sum(len(s.viewers) for s in self.streams.values())

    # ------------------------------------------------------------------ datagram input

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
                    self._publisher_rtcp(session, data, now)
                else:
                    self._publisher_rtp(session, data, now)
            elif isinstance(session, ViewerSession):
                if is_rtcp(data):
                    self._viewer_rtcp(session, data, now)
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
            self._transmit(response, addr, local)
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
            if key.startswith("keyframe:"):
                stream = self.streams.get(key[9:])
                pending = self._keyframe_retry.pop(key[9:], [])
                current = [t for layers in stream.tracks.values() for t in layers] if stream else []
                live = [t for t in pending if t in current]
                if stream is not None and live:
                    self._request_keyframe(stream, now, tracks=live)
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
                # The event comes whenever the selected pair changes, also when only its
                # local half moved (same remote address, another of ours: RFC 8445
                # §6.1.2.2 pairs): the fan-out then keeps the address and takes the source.
                if isinstance(session, ViewerSession) and session.fanout_slot is not None:
                    host, port = event.address[0], event.address[1]
                    self.fanout.set_viewer_address(
                        session.fanout_slot,
                        host,
                        port,
                        source=self._fanout_source(event.local, event.address),
                    )
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
            self._transmit(datagram, addr, session.local_address)

    def _fanout_source(self, local: str | None, peer: Address) -> str | None:
        """The source the fan-out must set on every datagram to ``peer``: ``local`` only
        when the kernel would choose another. A source costs the kernel a control message
        per datagram (~5 % of a send, measured); on a host with one address per route,
        which is most, the kernel's choice already is the address the viewer reached."""
        if local is None or self._default_source is None:
            return local
        chosen = self._default_source(peer)
        return None if chosen is not None and _same_address(chosen, local) else local

    def _transmit(self, datagram: bytes, addr: Address, local: str | None) -> None:
        """Send ``datagram`` to ``addr`` from our address ``local`` when one is known."""
        if local is not None and self._send_from is not None:
            self._send_from(datagram, addr, local)
        else:
            self._send(datagram, addr)

    # ------------------------------------------------------------------ publishers

    def _attach_publisher(self, stream: Stream, session: PublisherSession, now: float) -> None:
        stream.publisher = session
        stream.ingest_by_ssrc.clear()
        stream.ingest_stats.clear()
        for media in session.ingest:
            tracks = stream.tracks.get(media.kind, [])
            if tracks and (
                tracks[0].codec_name.lower() != media.codec.name.lower()
                or tracks[0].clock_rate != media.codec.clock_rate
            ):
                # Viewers negotiated the old codec; they cannot decode the new one.
                self._drop_tracks(stream, media.kind, now)
                tracks = []
            encodings = media.tracks or (IngestTrack(),)
            for index, encoding in enumerate(encodings):
                if index < len(tracks):
                    track = tracks[index]
                    track.rebase_pending = True
                    track.ext_remap = _extension_remap(media, track.ingest)
                    track.active = True
                    track.rid = encoding.rid
                else:
                    track = self._new_track(media, index, encoding.rid)
                    tracks.append(track)
                track.max_bitrate = encoding.max_bitrate
                # SSRCs signalled in the SDP (a=ssrc, SIM and FID groups, RFC 5576 §4.2,
                # RFC 4588 §8); rid-only encodings are bound on first sight instead.
                if encoding.ssrc is not None:
                    stream.ingest_by_ssrc[encoding.ssrc] = (track, False)
                if encoding.rtx_ssrc is not None:
                    stream.ingest_by_ssrc[encoding.rtx_ssrc] = (track, True)
            # A returning publisher with fewer encodings: the extra tracks stay (viewers
            # on them are moved) but get nothing until a publisher sends them again.
            for track in tracks[len(encodings) :]:
                track.active = False
            stream.tracks[media.kind] = tracks
        for kind in list(stream.tracks):
            if all(m.kind != kind for m in session.ingest):
                self._drop_tracks(stream, kind, now)
        for choice in list(stream.choices.values()):
            if choice.target is not None and not choice.target.active:
                self._apply_choice(stream, choice, now)

    def _new_track(self, media: IngestMedia, encoding_index: int, rid: str | None) -> Track:
        video = media.kind == "video"
        cache = self.config.video_cache_packets if video else self.config.audio_cache_packets
        payload_format = {"VP8": _fastpath.PAYLOAD_VP8, "VP9": _fastpath.PAYLOAD_VP9}.get(
            media.codec.name.upper() if video else "", _fastpath.PAYLOAD_OPAQUE
        )
        return Track(
            fanout_id=self.fanout.add_track(
                cache_packets=cache,
                clock_rate=media.codec.clock_rate,
                payload_format=payload_format,
            ),
            kind=media.kind,
            ingest=media,
            codec_name=media.codec.name,
            clock_rate=media.codec.clock_rate,
            rid=rid,
            encoding_index=encoding_index,
        )

    def _drop_tracks(self, stream: Stream, kind: str, now: float) -> None:
        tracks = stream.tracks.pop(kind, [])
        fanout_ids = {track.fanout_id for track in tracks}
        for viewer in list(stream.viewers.values()):
            if fanout_ids.intersection(viewer.track_by_ssrc.values()):
                self.end_session(viewer.id, now, "codec-changed")
        for track in tracks:
            self.fanout.remove_track(track.fanout_id)

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
            for tracks in stream.tracks.values():
                for track in tracks:
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
        """An SSRC the SDP did not name (browsers signal simulcast by rid only): bind it
        to its media by MID (RFC 9143 §15) or payload type, and to its encoding by the
        RID or, for RTX, repaired-RID header extension (RFC 8852 §3.1, §3.2)."""
        try:
            packet = rtp.RtpPacket.parse(plain)
        except ParseError:
            return None
        for media in session.ingest:
            tracks = stream.tracks.get(media.kind)
            if not tracks:
                continue
            try:
                mid = rtp.read_sdes_string(packet, media.mid_extension_id)
                rid = rtp.read_sdes_string(packet, media.rid_extension_id)
                repaired_rid = rtp.read_sdes_string(packet, media.repaired_rid_extension_id)
            except ParseError:
                self.counters["drop_ingest_bad_sdes"] += 1
                return None
            if mid is not None and media.mid is not None and mid != media.mid:
                continue
            if packet.payload_type == media.codec.payload_type:
                is_rtx, layer_rid = False, rid
            elif packet.payload_type == media.codec.rtx_payload_type:
                is_rtx, layer_rid = True, repaired_rid
            else:
                continue
            active = [track for track in tracks if track.active]
            if not active:
                return None
            if media.rids:
                # Simulcast: only the RID says which encoding this is. Packets before the
                # first one carrying it are dropped rather than guessed.
                track = next((t for t in active if t.rid == layer_rid), None)
                if track is None:
                    self.counters["drop_ingest_unbound_rid"] += 1
                    return None
            else:
                track = active[0]
            entry = (track, is_rtx)
            stream.ingest_by_ssrc[packet.ssrc] = entry
            log.debug(
                "stream %r: ssrc %08x is %s%s%s",
                stream.name,
                packet.ssrc,
                media.kind,
                f" rid {track.rid}" if track.rid else "",
                " (rtx)" if is_rtx else "",
            )
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
        keyframe = False
        if track.kind == "video":
            payload = bytes(packet[header_len:])
            keyframe = codecs.is_keyframe_start(track.codec_name, payload)
            if keyframe:  # VP8 keyframe header, or an H.264 SPS (a keyframe start too)
                self._measure_picture(track, payload)
            # A retransmitted keyframe start is an old picture (Chromium also resends
            # old packets as RTX padding, RFC 4588 §8.3): a viewer starting or switching
            # there would be renumbered from a stale sequence number and timestamp, and
            # every live packet after it would land past a gap of the packets in between.
            keyframe = keyframe and not retransmission
            if track.codec_name.upper() in ("VP8", "VP9") and not retransmission:
                self._note_temporal_layer(track, payload)
        track.packets += 1
        track.octets += len(packet) - header_len
        if not retransmission:
            track.meter.add(len(packet) - header_len, timestamp, now)
        self.fanout.push(track.fanout_id, bytes(packet), keyframe, now)
        if track.kind == "video":
            for slot, _, to_track in self.fanout.take_switches():
                self._switch_completed(slot, to_track)

    def _measure_picture(self, track: Track, payload: bytes) -> None:
        """Resolution from the keyframe header (VP8) or SPS (H.264): simulcast layers are
        told apart and ordered by it."""
        try:
            size = codecs.keyframe_size(track.codec_name, payload)
        except ParseError:
            self.counters["ingest_unreadable_keyframe"] += 1
            return
        if size is not None:
            if size != (track.width, track.height):
                log.debug("track %d (rid %s) is %dx%d", track.fanout_id, track.rid, *size)
            track.width, track.height = size
            track.keyframes += 1

    @staticmethod
    def _note_temporal_layer(track: Track, payload: bytes) -> None:
        """The highest temporal layer id seen (VP8 TID, RFC 7741 §4.2; VP9 TID,
        RFC 9628 §4.2), for the layers event and the layer API's bounds."""
        descriptor: codecs.Vp8PayloadDescriptor | codecs.Vp9PayloadDescriptor
        try:
            if track.codec_name.upper() == "VP9":
                descriptor = codecs.Vp9PayloadDescriptor.parse(payload)
            else:
                descriptor = codecs.Vp8PayloadDescriptor.parse(payload)
        except ParseError:
            return
        layer = descriptor.temporal_layer
        if layer is not None and layer >= (track.max_temporal_layer or 0):
            track.max_temporal_layer = layer

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
        self._send_to_publisher(stream, compound, failure="publisher_feedback_failed")
        stream.next_feedback_at = now + self.config.publisher_feedback_interval
        self._schedule("stream:" + stream.name, stream.next_feedback_at)
        self._report_layers(stream, now)

    def _request_keyframe(
        self,
        stream: Stream,
        now: float,
        *,
        tracks: Sequence[Track] | None = None,
        force: bool = False,
    ) -> bool:
        """PLI upstream (RFC 4585 §6.3.1) for ``tracks`` (default: every video layer), at
        most once per interval per layer: a storm of joining viewers or layer switches
        must not make the publisher send keyframes back to back."""
        candidates = [
            track
            for track in (tracks if tracks is not None else stream.tracks.get("video", ()))
            if track.kind == "video"
        ]
        due = [
            track
            for track in candidates
            if force or now - track.last_keyframe_request >= self.config.keyframe_request_interval
        ]
        throttled = [track for track in candidates if track not in due]
        if throttled:
            # Deferred, never dropped: a viewer waiting for a keyframe gets no video until one
            # comes, and browser publishers send none unasked. Ask again when the interval ends.
            self.counters["keyframe_requests_throttled"] += 1
            pending = self._keyframe_retry.setdefault(stream.name, [])
            pending.extend(t for t in throttled if t not in pending)
            retry_at = min(t.last_keyframe_request for t in throttled)
            self._schedule(
                "keyframe:" + stream.name, retry_at + self.config.keyframe_request_interval
            )
        if not due:
            return False
        publisher = stream.publisher
        if publisher is None or publisher.address is None or stream.publisher_srtcp_out is None:
            return False
        wanted = {id(track) for track in due}
        video_ssrcs = [
            ssrc
            for ssrc, (track, rtx) in stream.ingest_by_ssrc.items()
            if not rtx and id(track) in wanted
        ]
        if not video_ssrcs:
            return False
        for track in due:
            track.last_keyframe_request = now
        stream.last_keyframe_request = now
        stream.keyframe_requests_sent += 1
        compound = b"".join(
            bytes(rtcp.PictureLossIndication(sender_ssrc=self.rtcp_ssrc, media_ssrc=ssrc))
            for ssrc in video_ssrcs
        )
        if not self._send_to_publisher(stream, compound, failure="keyframe_request_failed"):
            return False
        self.counters["keyframe_requests_sent"] += 1
        return True

    def _send_to_publisher(self, stream: Stream, compound: bytes, *, failure: str) -> bool:
        """SRTCP-protect ``compound`` (RFC 3711 §3.4) and send it to the stream's publisher
        from the address its checks reached; a protect failure is counted as ``failure``.
        The caller has checked that the publisher is connected."""
        publisher = stream.publisher
        assert publisher is not None and publisher.address is not None
        assert stream.publisher_srtcp_out is not None
        try:
            protected = stream.publisher_srtcp_out.protect_rtcp(compound)
        except _fastpath.SrtpError:
            self.counters[failure] += 1
            return False
        self._transmit(protected, publisher.address, publisher.local_address)
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
            source=self._fanout_source(session.local_address, session.address),
        )
        session.fanout_slot = slot
        choice = stream.choices.get(session.id) or self._new_layer_choice(stream, session)
        if choice is not None:
            self._choice_by_slot[slot] = choice
        for media in session.egress:
            if choice is not None and media is choice.egress:
                # Video starts on a keyframe of the chosen layer (see _apply_choice).
                self._apply_choice(stream, choice, now)
                continue
            tracks = stream.tracks.get(media.kind)
            if not tracks:
                continue
            self._subscribe(session, media, tracks[0])
        if choice is None:
            # A new viewer needs a keyframe now rather than at the next periodic one: this
            # is what makes time-to-first-frame about one frame interval.
            self._request_keyframe(stream, now)

    def _subscribe(self, session: ViewerSession, media: EgressMedia, track: Track) -> None:
        assert session.fanout_slot is not None
        self.fanout.subscribe(
            session.fanout_slot,
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
        choice = stream.choices.get(session.id) if stream is not None else None
        reported = False
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
                    wanted = None
                    if choice is not None and choice.egress.ssrc == packet.media_ssrc:
                        wanted = [t for t in (choice.current, choice.pending) if t is not None]
                    self._request_keyframe(stream, now, tracks=wanted)
            elif isinstance(packet, rtcp.ReceiverReport):
                for block in packet.reports:
                    if block.ssrc in session.track_by_ssrc:
                        session.fraction_lost = block.fraction_lost / 256
                        session.jitter = block.jitter
                        if choice is not None and block.ssrc == choice.egress.ssrc:
                            choice.fraction_lost = block.fraction_lost / 256
                            reported = True
            elif isinstance(packet, rtcp.ReceiverEstimatedMaxBitrate):
                session.remb_bitrate = packet.bitrate
                if choice is not None:
                    choice.remb = packet.bitrate
                    reported = True
        if reported and stream is not None and choice is not None and choice.manual is None:
            self._automatic_layer(stream, choice, now)

    # ------------------------------------------------------------------ simulcast layers

    def _new_layer_choice(self, stream: Stream, session: ViewerSession) -> LayerChoice | None:
        """Every viewer's video gets a LayerChoice (one layer or many), so the layer API
        answers the same way whether or not the stream is simulcast."""
        video = next((m for m in session.egress if m.kind == "video"), None)
        if video is None:
            return None
        choice = LayerChoice(session=session, egress=video, policy=self.layer_policy.new_state())
        stream.choices[session.id] = choice
        return choice

    def select_layer(self, session_id: str, request: LayerRequest, now: float) -> dict[str, object]:
        """The WHEP layer extension (EXT §5): pin a viewer to a layer, constrain it, or
        (nothing set) return it to automatic choice. Raises NotFound for an unknown
        session and PeerError (400) for a media or layer the stream does not have.
        Returns the viewer's layer state (``layer_status``)."""
        session = self.get_session(session_id)
        if not isinstance(session, ViewerSession):
            raise NotFound("no such viewer session")
        stream = self.streams.get(session.stream)
        choice = stream.choices.get(session.id) if stream is not None else None
        if stream is None or choice is None:
            raise PeerError("this session receives no video")
        if request.media_id is not None and not self._names_media(session, choice, request):
            raise PeerError(f"mediaId {request.media_id!r} is not a video m-line of the session")
        layers = stream.layers()
        manual: Track | None = None
        if request.rid is not None:
            manual = next((t for t in layers if t.rid == request.rid), None)
            if manual is None:
                known = ", ".join(t.rid for t in layers if t.rid) or "none"
                raise PeerError(f"no layer with rid {request.rid!r} (layers: {known})")
        elif request.spatial_layer is not None:
            if not 0 <= request.spatial_layer < len(layers):
                raise PeerError(f"no spatial layer {request.spatial_layer}")
            manual = layers[request.spatial_layer]
        if request.max_spatial_layer is not None and request.max_spatial_layer < 0:
            raise PeerError("maxSpatialLayerId is not negative")
        temporal = request.temporal_layer
        if request.max_temporal_layer is not None:
            temporal = (
                request.max_temporal_layer
                if temporal is None
                else min(temporal, request.max_temporal_layer)
            )
        # TID is 2 bits in VP8 (RFC 7741 §4.2) and 3 bits in VP9 (RFC 9628 §4.2).
        highest_tid = 7 if any(t.codec_name.upper() == "VP9" for t in layers) else 3
        if temporal is not None and not 0 <= temporal <= highest_tid:
            raise PeerError(f"a temporal layer id is 0..{highest_tid} for this codec")
        choice.manual = manual
        choice.temporal_limit = -1 if temporal is None else temporal
        choice.max_spatial_layer = request.max_spatial_layer
        choice.max_width, choice.max_height = request.max_width, request.max_height
        choice.policy = self.layer_policy.new_state()
        self.counters["layer_selections" if manual is not None else "layer_automatic"] += 1
        self._apply_choice(stream, choice, now)
        return self.layer_status(session_id, now)

    @staticmethod
    def _names_media(session: ViewerSession, choice: LayerChoice, request: LayerRequest) -> bool:
        """mediaId is the m-line index (EXT §5); players also send the mid, often equal."""
        if request.media_id == choice.egress.mid:
            return True
        return request.media_id == str(session.egress.index(choice.egress))

    def layer_status(self, session_id: str, now: float) -> dict[str, object]:
        """One viewer's layer state for the layer API (GET on the layer URL)."""
        session = self.get_session(session_id)
        stream = self.streams.get(session.stream)
        choice = stream.choices.get(session.id) if stream is not None else None
        if stream is None or choice is None:
            raise NotFound("this session receives no video")
        layers = stream.layers()
        return {
            "mediaId": choice.egress.mid,
            "automatic": choice.manual is None,
            "rid": choice.current.rid if choice.current is not None else None,
            "pendingRid": choice.pending.rid if choice.pending is not None else None,
            "temporalLayerId": choice.temporal_limit if choice.temporal_limit >= 0 else None,
            "maxWidth": choice.max_width,
            "maxHeight": choice.max_height,
            "layers": [track.layer_info(now, index) for index, track in enumerate(layers)],
        }

    def stream_layers(self, stream_name: str, now: float) -> dict[str, object]:
        """The SSE ``layers`` payload (EXT §4.3.3): keyed by the m-line index of the
        publisher's video, a list of layers low to high with measured bitrate, size and
        frame rate. Viewers of a WHEP session number m-lines the same way in practice
        (audio, then video)."""
        stream = self.streams.get(stream_name)
        if stream is None or stream.publisher is None:
            return {}
        report: dict[str, object] = {}
        for index, media in enumerate(stream.publisher.ingest):
            if media.kind == "video":
                layers = stream.layers()
                report[str(index)] = [t.layer_info(now, i) for i, t in enumerate(layers)]
        return report

    def viewer_egress_bitrate(self, session_id: str, now: float) -> float:
        """What the viewer currently costs in bits/s of payload: its layers' measured
        rates (capacity accounting follows the layer it is on)."""
        session = self.get_session(session_id)
        stream = self.streams.get(session.stream)
        if stream is None or not isinstance(session, ViewerSession):
            return 0.0
        by_id = {t.fanout_id: t for tracks in stream.tracks.values() for t in tracks}
        return sum(
            by_id[fanout_id].meter.rates(now)[0]
            for fanout_id in set(session.track_by_ssrc.values())
            if fanout_id in by_id
        )

    def _ceiling(self, choice: LayerChoice, layers: list[Track]) -> int:
        """The highest layer index allowed by maxSpatialLayerId / maxWidth / maxHeight (at
        least the lowest layer, so a too-small limit still gets a picture)."""
        ceiling = len(layers) - 1
        if choice.max_spatial_layer is not None:
            ceiling = min(ceiling, choice.max_spatial_layer)
        while ceiling > 0:
            track = layers[ceiling]
            too_wide = choice.max_width is not None and (track.width or 0) > choice.max_width
            too_tall = choice.max_height is not None and (track.height or 0) > choice.max_height
            if not (too_wide or too_tall):
                break
            ceiling -= 1
        return max(ceiling, 0)

    def _automatic_layer(self, stream: Stream, choice: LayerChoice, now: float) -> None:
        layers = stream.layers()
        current = choice.target
        if len(layers) < 2 or current is None or current not in layers:
            return
        index = layers.index(current)
        target = self.layer_policy.decide(
            choice.policy,
            bitrates=[track.meter.rates(now)[0] for track in layers],
            current=index,
            ceiling=self._ceiling(choice, layers),
            fraction_lost=choice.fraction_lost,
            remb=choice.remb,
            now=now,
        )
        choice.fraction_lost = None  # each report is used once
        if target != index:
            self.counters["layer_auto_down" if target < index else "layer_auto_up"] += 1
            self._move(stream, choice, layers[target], now)

    def _apply_choice(self, stream: Stream, choice: LayerChoice, now: float) -> None:
        """Bring the viewer's subscription in line with its choice (manual or automatic)."""
        layers = stream.layers()
        if not layers:
            return
        ceiling = self._ceiling(choice, layers)
        if choice.manual is not None and choice.manual.active:
            target = choice.manual
        elif choice.target is not None and choice.target in layers:
            target = layers[min(layers.index(choice.target), ceiling)]
        else:
            target = layers[min(self.layer_policy.initial(len(layers)), ceiling)]
        self._move(stream, choice, target, now)

    def _move(self, stream: Stream, choice: LayerChoice, target: Track, now: float) -> None:
        """Subscribe, or switch keyframe-aligned (Fanout.switch), to ``target``."""
        slot = choice.session.fanout_slot
        if slot is None:
            # Not keyed yet: remember; _viewer_keyed subscribes to the choice.
            choice.current = target
            return
        if choice.pending is not None and choice.pending is not target:
            self.fanout.unsubscribe(slot, choice.pending.fanout_id)
            choice.pending = None
        if choice.current is None or not self.fanout.subscription_state(
            slot, choice.current.fanout_id
        ):
            self._subscribe(choice.session, choice.egress, target)
            choice.current = target
        elif choice.current is not target and choice.pending is None:
            self.fanout.switch(slot, choice.current.fanout_id, target.fanout_id)
            choice.pending = target
            self.counters["layer_switches_started"] += 1
        for track in (choice.current, choice.pending):
            if track is not None:
                self.fanout.set_temporal_layer(slot, track.fanout_id, choice.temporal_limit)
        waiting = [
            track
            for track in (choice.current, choice.pending)
            if track is not None and self.fanout.subscription_state(slot, track.fanout_id) == 1
        ]
        if waiting:
            # The switch (or the start) completes on the target's next keyframe: ask now.
            self._request_keyframe(stream, now, tracks=waiting)

    def _switch_completed(self, slot: int, to_track: int) -> None:
        choice = self._choice_by_slot.get(slot)
        if choice is None or choice.pending is None or choice.pending.fanout_id != to_track:
            return
        choice.current, choice.pending = choice.pending, None
        choice.session.track_by_ssrc[choice.egress.ssrc] = to_track
        self.counters["layer_switches_completed"] += 1

    def _report_layers(self, stream: Stream, now: float) -> None:
        """The SSE ``layers`` event, when the layers changed or every few seconds (EXT
        §4.3.3 allows either); the event hub drops repeats of an unchanged payload."""
        report = self.stream_layers(stream.name, now)
        if not report:
            return
        shape = {
            key: [(layer["rid"], layer.get("width"), layer.get("height")) for layer in value]
            for key, value in report.items()
            if isinstance(value, list)
        }
        if shape != stream.layers_reported or now - stream.layers_reported_at >= 5.0:
            stream.layers_reported, stream.layers_reported_at = shape, now
            self._emit(stream.name, "layers", report)

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


def _same_address(a: str, b: str) -> bool:
    """The same IP address, however written (``::ffff:127.0.0.1`` vs ``127.0.0.1`` are not:
    the socket family differs, so they are never compared here)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b  # a scoped (link-local) address: compare as written
