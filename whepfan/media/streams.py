"""Stream, Track, listeners: the data every media module shares.

A ``Stream`` is one named broadcast on one worker: its publisher (or a relay copy's
stand-in), its viewers, and its ``Track`` s, one per simulcast encoding of each media
kind. A track is a compiled ``Fanout`` track (``fanout_id``) plus what Python knows of
it: the canonical negotiation, the rebase offsets that keep viewers' sequence and
timestamp lines continuous across publishers, and the measured layer meter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from whepfan import _fastpath
from whepfan.media.meters import IngestReceiveStats, LayerMeter
from whepfan.media.session import PublisherSession, SessionState, ViewerSession
from whepfan.protocol.negotiation import IngestMedia

if TYPE_CHECKING:
    from whepfan.media.layers import LayerChoice

log = logging.getLogger("whepfan.media")

# RFC 3550 §5.1: 16-bit sequence numbers and 32-bit timestamps wrap.
RTP_SEQ_MOD = 1 << 16
RTP_TS_MOD = 1 << 32


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """Something players may want to hear about (WHEP core extensions, SSE): ``type`` is
    "active", "inactive", "viewercount" or "layers"; ``data`` is the event's JSON payload."""

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
    keyframes: int = 0

    @property
    def key(self) -> str:
        """The track's name on every worker and in relay frames: ``kind/encoding``."""
        return f"{self.kind}/{self.encoding_index}"

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


class KeyframeUpstream(Protocol):
    """Where a stream's keyframe requests go once the throttle lets them through
    (feedback.KeyframeRequests): the publisher as SRTCP PLI on the origin worker, the
    origin worker for a relay copy. Returns False when nobody could be asked (no
    connected publisher), so the request is not counted as made."""

    def __call__(self, stream: Stream, tracks: Sequence[Track], now: float) -> bool: ...


@dataclass(eq=False, kw_only=True)
class Stream:
    name: str
    # kind -> its tracks: one per simulcast encoding, in the publisher's signalled order
    tracks: dict[str, list[Track]] = field(default_factory=dict)
    publisher: PublisherSession | None = None
    viewers: dict[str, ViewerSession] = field(default_factory=dict)
    # publisher SSRC -> (track, is_rtx)
    ingest_by_ssrc: dict[int, tuple[Track, bool]] = field(default_factory=dict)
    ingest_stats: dict[int, IngestReceiveStats] = field(default_factory=dict)
    publisher_srtp_in: _fastpath.SrtpSession | None = None
    publisher_srtcp_out: _fastpath.SrtpSession | None = None
    publisher_srtcp_in: _fastpath.SrtpSession | None = None
    next_feedback_at: float = float("inf")
    # True from the publisher's first keyed moment until it leaves ("active" event sent).
    active: bool = False
    # viewer session id -> its layer choice for the stream's video (simulcast or not)
    choices: dict[str, LayerChoice] = field(default_factory=dict)
    layers_reported_at: float = float("-inf")
    layers_reported: object = None
    # None: keyframe requests go to this worker's publisher (the default upstream).
    keyframe_upstream: KeyframeUpstream | None = None

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

    def all_tracks(self) -> list[Track]:
        """Every track of every kind, active or not, in signalled order."""
        return [track for tracks in self.tracks.values() for track in tracks]

    def canonical_ingest(self) -> list[IngestMedia]:
        """The negotiation viewers are answered against: one IngestMedia per kind."""
        return [tracks[0].ingest for tracks in self.tracks.values() if tracks]


def stream_tracks(stream: Stream) -> list[tuple[str, Track]]:
    """(key, Track) of every track of ``stream``; the key names the track the same way
    on every worker (``Track.key``)."""
    return [(track.key, track) for track in stream.all_tracks()]
