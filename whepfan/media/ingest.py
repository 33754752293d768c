"""A publisher's SRTP in, plain RTP into the Fanout, once per packet.

Python runs here once per *ingested* packet (a few hundred per second): unprotect,
bind the SSRC to its track (signalled, or learnt by MID/RID, RFC 9143 §15, RFC 8852
§3), unwrap RTX (RFC 4588 §4), keep receive statistics for our RRs, rebase a returning
publisher's sequence and timestamp lines onto the viewers' (RFC 3550 §5.1), detect
keyframes and picture sizes, and push the packet once to the compiled ``Fanout``, which
re-encrypts it for every viewer. A relay copy (relay.py) feeds the same path with
packets another worker already unprotected and rebased.

An ``IngestTap`` (the worker pool's relay) hears each packet and sender report that a
publisher on *this* worker sent, so other workers can fan it out to their viewers.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import Counter
from collections.abc import Callable, MutableMapping
from typing import Protocol

from whepfan import _fastpath
from whepfan.config import MediaConfig
from whepfan.errors import ParseError
from whepfan.media.burst import FanoutBursts
from whepfan.media.feedback import KeyframeRequests, PublisherFeedback
from whepfan.media.layers import LayerSelector
from whepfan.media.liveness import MediaLiveness
from whepfan.media.meters import IngestReceiveStats
from whepfan.media.nack import UpstreamRepair
from whepfan.media.session import PublisherSession
from whepfan.media.streams import RTP_SEQ_MOD, RTP_TS_MOD, Stream, StreamListeners, Track
from whepfan.media.timers import TimerKind, Timers
from whepfan.media.twcc import ArrivalFeedback
from whepfan.protocol import codecs, rtcp, rtp
from whepfan.protocol.negotiation import EXT_TRANSPORT_CC, IngestMedia, IngestTrack

log = logging.getLogger("whepfan.media.ingest")

_SEQ_TS = struct.Struct("!HI")
_SEQ = struct.Struct("!H")
_PAYLOAD_FORMATS = {"VP8": _fastpath.PAYLOAD_VP8, "VP9": _fastpath.PAYLOAD_VP9}


class IngestTap(Protocol):
    """Hears what a publisher on this worker sends, after the worker's own fan-out."""

    def packet(self, stream: Stream, track: Track, packet: bytes, keyframe: bool) -> None: ...

    def sender_report(self, stream: Stream, track: Track, ntp_time: int, rtp_time: int) -> None: ...


class Ingest:
    """Publishers of one worker's streams: attach/detach, SRTP and SRTCP in, feedback."""

    def __init__(
        self,
        *,
        config: MediaConfig,
        fanout: _fastpath.Fanout,
        streams: MutableMapping[str, Stream],
        timers: Timers,
        keyframes: KeyframeRequests,
        feedback: PublisherFeedback,
        layers: LayerSelector,
        listeners: StreamListeners,
        end_viewer: Callable[[str, float, str], object],
        counters: Counter[str],
        liveness: MediaLiveness,
        repair: UpstreamRepair | None = None,
    ) -> None:
        self.config = config
        self._liveness = liveness
        self._repair = repair  # NACKs upstream for what the publisher's link lost (nack.py)
        self.fanout = fanout
        self._streams = streams
        self._timers = timers
        self._keyframes = keyframes
        self._feedback = feedback
        self._layers = layers
        self._listeners = listeners
        self._end_viewer = end_viewer
        self._counters = counters
        self.tap: IngestTap | None = None
        # Packets of the read burst in progress, pushed per track at its end (burst.py).
        self.bursts = FanoutBursts(lambda: self.fanout, flushed=layers.switches_completed)
        # Streams whose publisher negotiated transport-wide cc: its extension id and the
        # arrival record the TRANSPORT_FEEDBACK timer reports (twcc.py).
        self._arrivals: dict[str, tuple[int, ArrivalFeedback]] = {}

    # attach and detach -------------------------------------------------------------------

    def attach(self, stream: Stream, session: PublisherSession, now: float) -> None:
        """``session`` becomes the stream's publisher: bind its encodings to the stream's
        tracks (reusing them, so viewers stay subscribed) or create new ones."""
        stream.publisher = session
        if self._repair is not None:
            self._repair.forget(stream.name)
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
                    track.ext_remap = rtp.extension_id_table(
                        media.extension_ids, track.ingest.extension_ids
                    )
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
        self._layers.apply_all_inactive(stream, now)

    def _new_track(self, media: IngestMedia, encoding_index: int, rid: str | None) -> Track:
        video = media.kind == "video"
        cache = self.config.video_cache_packets if video else self.config.audio_cache_packets
        payload_format = _PAYLOAD_FORMATS.get(
            media.codec.name.upper() if video else "", _fastpath.PAYLOAD_OPAQUE
        )
        return Track(
            fanout_id=self.fanout.add_track(
                cache_packets=cache,
                clock_rate=media.codec.clock_rate,
                payload_format=payload_format,
                # The publisher's own transport-wide numbers: transport-cc viewers get
                # that element rewritten with theirs (track.ingest's ids are the ones
                # every later publisher's packets are remapped to).
                transport_cc_id=media.extension_ids.get(EXT_TRANSPORT_CC, 0),
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
                self._end_viewer(viewer.id, now, "codec-changed")
        self.bursts.flush()
        for track in tracks:
            self.fanout.remove_track(track.fanout_id)

    def detach(self, stream: Stream) -> None:
        """The publisher left: viewers stay subscribed, waiting for the next one, and
        resume with continuous sequence numbers when one returns."""
        stream.publisher = None
        if self._repair is not None:
            self._repair.forget(stream.name)
        if stream.active:
            stream.active = False
            self._listeners.emit(stream.name, "inactive", {})
        stream.publisher_srtp_in = stream.publisher_srtcp_out = stream.publisher_srtcp_in = None
        stream.ingest_by_ssrc.clear()
        stream.next_feedback_at = math.inf
        self._timers.cancel((TimerKind.PUBLISHER_FEEDBACK, stream.name))
        self._arrivals.pop(stream.name, None)
        self._timers.cancel((TimerKind.TRANSPORT_FEEDBACK, stream.name))
        if not stream.viewers:
            self.bursts.flush()
            for track in stream.all_tracks():
                self.fanout.remove_track(track.fanout_id)
            del self._streams[stream.name]
            self._keyframes.forget(stream.name)

    def keyed(self, session: PublisherSession, now: float) -> None:
        """The publisher's DTLS handshake completed: SRTP contexts, feedback, a first
        keyframe request, and the "active" event."""
        stream = self._streams.get(session.stream)
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
        self._schedule_feedback(stream, now)
        transport_cc = next(
            (
                m.extension_ids[EXT_TRANSPORT_CC]
                for m in session.ingest
                if EXT_TRANSPORT_CC in m.extension_ids
            ),
            None,
        )
        if transport_cc is None:
            self._arrivals.pop(stream.name, None)
        else:
            self._arrivals[stream.name] = (
                transport_cc,
                ArrivalFeedback(sender_ssrc=self._feedback.rtcp_ssrc),
            )
        self._keyframes.request(stream, now, force=True)
        if not stream.active:
            stream.active = True
            self._listeners.emit(stream.name, "active", {})

    def _schedule_feedback(self, stream: Stream, now: float) -> None:
        stream.next_feedback_at = now + self.config.publisher_feedback_interval
        self._timers.schedule((TimerKind.PUBLISHER_FEEDBACK, stream.name), stream.next_feedback_at)

    def feedback_due(self, stream: Stream, now: float) -> None:
        """The stream's ``PUBLISHER_FEEDBACK`` timer: RR + REMB, and the layers event."""
        if not PublisherFeedback.connected(stream):
            return
        self._feedback.report(stream, now)
        self._schedule_feedback(stream, now)
        self._layers.report(stream, now)

    def transport_feedback_due(self, stream: Stream, now: float) -> None:
        """The stream's ``TRANSPORT_FEEDBACK`` timer: what arrived since the last
        (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1), in one compound."""
        entry = self._arrivals.get(stream.name)
        if entry is None or not PublisherFeedback.connected(stream):
            return
        arrivals = entry[1]
        packets = arrivals.poll(now)
        if packets:
            compound = b"".join(packet.serialize() for packet in packets)
            self._feedback.send(stream, compound, failure="transport_feedback_failed")
        self._timers.schedule((TimerKind.TRANSPORT_FEEDBACK, stream.name), arrivals.deadline())

    # SRTP in ------------------------------------------------------------------------------

    def rtp_received(self, session: PublisherSession, data: bytes, now: float) -> None:
        stream = self._streams.get(session.stream)
        if stream is None or stream.publisher is not session or stream.publisher_srtp_in is None:
            self._counters["drop_stale_publisher"] += 1
            return
        try:
            plain = stream.publisher_srtp_in.unprotect(data)
        except _fastpath.SrtpError as exc:
            self._counters[f"drop_ingest_srtp_{exc.reason}"] += 1
            return
        self._liveness.packet(stream, now)  # the publisher's media clock (liveness.py)
        if len(plain) < 12:
            self._counters["drop_ingest_malformed"] += 1
            return
        transport_cc = self._arrivals.get(stream.name)
        if transport_cc is not None:
            # Every packet of the transport counts, RTX and probing padding included.
            sequence = rtp.transport_sequence(plain, transport_cc[0])
            if sequence is not None:
                transport_cc[1].record(sequence, now)
                self._timers.schedule(
                    (TimerKind.TRANSPORT_FEEDBACK, stream.name), transport_cc[1].deadline()
                )
        ssrc = int.from_bytes(plain[8:12], "big")
        entry = stream.ingest_by_ssrc.get(ssrc) or self._learn_ssrc(stream, session, plain)
        if entry is None:
            self._counters["drop_ingest_unknown_ssrc"] += 1
            return
        track, is_rtx = entry
        if transport_cc is not None and not is_rtx:
            # libwebrtc acts on transport feedback only when its media SSRC is one of
            # its own media streams' (RTCPReceiver::HandleTransportFeedback), as its
            # receive side sets it: the last media SSRC that arrived.
            transport_cc[1].media_ssrc = ssrc
        self.bound_rtp(stream, track, ssrc, plain, now, rtx=is_rtx)

    def bound_rtp(
        self, stream: Stream, track: Track, ssrc: int, plain: bytes, now: float, *, rtx: bool
    ) -> None:
        """One unprotected RTP packet of ``track`` (its RTX stream when ``rtx``): RTX
        unwrapped, gaps noted for upstream repair, pushed. ``rtp_received`` ends here
        once it has bound the SSRC; an upstream pull's per-layer session
        (cluster/feed.py) comes here directly, with its own SRTP context and binding."""
        packet = bytearray(plain)
        if rtx:
            try:
                if rtp.padding_only(packet):
                    # A bandwidth probe, not a repair: no OSN to unwrap (RFC 4588 §4).
                    self._counters["drop_ingest_rtx_padding"] += 1
                    return
                packet = rtp.unwrap_rtx_packet(packet, track.ingest.codec.payload_type)
            except ParseError:
                self._counters["drop_ingest_malformed"] += 1
                return
        if self._repair is not None and not self._repair.received(
            stream, track, ssrc, _SEQ.unpack_from(packet, 2)[0], now, retransmission=rtx
        ):
            self._counters["drop_ingest_rtx_duplicate"] += 1  # repairs nothing (nack.py)
            return
        self.push(stream, track, ssrc, packet, now, retransmission=rtx)

    def _learn_ssrc(
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
                self._counters["drop_ingest_bad_sdes"] += 1
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
                    self._counters["drop_ingest_unbound_rid"] += 1
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

    def push(
        self,
        stream: Stream,
        track: Track,
        ssrc: int,
        packet: bytearray,
        now: float,
        *,
        retransmission: bool = False,
        relayed: bool = False,
    ) -> None:
        """One plain RTP packet of ``track`` to every subscribed viewer (``relayed``: it
        came from the origin worker, already rebased; it is not tapped again)."""
        try:
            header_len = rtp.rtp_header_length(packet)
        except ParseError:
            self._counters["drop_ingest_malformed"] += 1
            return
        seq, timestamp = _SEQ_TS.unpack_from(packet, 2)
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
            _SEQ_TS.pack_into(
                packet,
                2,
                (seq + track.seq_offset) % RTP_SEQ_MOD,
                (timestamp + track.ts_offset) % RTP_TS_MOD,
            )
        if track.ext_remap is not None:
            rtp.remap_extension_ids(packet, track.ext_remap)
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
                _note_temporal_layer(track, payload)
        track.packets += 1
        track.octets += len(packet) - header_len
        if not retransmission:
            track.meter.add(len(packet) - header_len, timestamp, now)
        data = bytes(packet)
        held = self.bursts.push(track.fanout_id, data, keyframe, now)
        if self.tap is not None and not relayed:
            self.tap.packet(stream, track, data, keyframe)
        if track.kind == "video" and not held:
            self._layers.switches_completed()

    def _measure_picture(self, track: Track, payload: bytes) -> None:
        """Resolution from the keyframe header (VP8) or SPS (H.264): simulcast layers are
        told apart and ordered by it."""
        try:
            size = codecs.keyframe_size(track.codec_name, payload)
        except ParseError:
            self._counters["ingest_unreadable_keyframe"] += 1
            return
        if size is not None:
            if size != (track.width, track.height):
                log.debug("track %d (rid %s) is %dx%d", track.fanout_id, track.rid, *size)
            track.width, track.height = size
            track.keyframes += 1

    @staticmethod
    def _rebase(track: Track, seq: int, timestamp: int, now: float) -> None:
        """First packet of a returning publisher: continue the viewers' sequence and
        timestamp lines where the previous publisher stopped (RFC 3550 §5.1)."""
        track.rebase_pending = False
        if track.last_out_seq is None or track.last_out_ts is None:
            track.seq_offset = track.ts_offset = 0
            return
        elapsed_ticks = int(max(now - track.last_packet_at, 0.0) * track.clock_rate) or 1
        track.seq_offset = (track.last_out_seq + 1 - seq) % RTP_SEQ_MOD
        track.ts_offset = (track.last_out_ts + elapsed_ticks - timestamp) % RTP_TS_MOD

    # SRTCP in ---------------------------------------------------------------------------------

    def rtcp_received(self, session: PublisherSession, data: bytes, now: float) -> None:
        stream = self._streams.get(session.stream)
        if stream is None or stream.publisher is not session:
            return
        srtcp_in = stream.publisher_srtcp_in
        if srtcp_in is None:
            return
        try:
            plain = srtcp_in.unprotect_rtcp(data)
            packets = rtcp.parse_compound(plain)
        except (_fastpath.SrtpError, rtcp.ParseError) as exc:
            self._counters["drop_ingest_rtcp"] += 1
            log.debug("bad publisher RTCP: %s", exc)
            return
        for packet in packets:
            if isinstance(packet, rtcp.SenderReport):
                entry = stream.ingest_by_ssrc.get(packet.ssrc)
                self.sender_report(
                    stream, entry[0] if entry is not None and not entry[1] else None, packet, now
                )

    def sender_report(
        self, stream: Stream, track: Track | None, report: rtcp.SenderReport, now: float
    ) -> None:
        """A sender report of ``track``'s media SSRC (None: an SSRC bound to no media
        track): noted for our RR's LSR/DLSR, and its NTP<->RTP mapping, shifted like the
        media, relayed to viewers so browsers can lip-sync audio and video (RFC 3550
        §6.4.1). An upstream pull's per-layer session (cluster/feed.py) calls it too."""
        stats = stream.ingest_stats.get(report.ssrc)
        if stats is not None:
            stats.last_sr_ntp_middle = (report.ntp_timestamp >> 16) & 0xFFFFFFFF
            stats.last_sr_arrival = now
        if track is None:
            return
        rtp_time = (report.rtp_timestamp + track.ts_offset) % RTP_TS_MOD
        self.bursts.flush()  # the SR's counts include what came before it
        self.fanout.send_sender_reports(track.fanout_id, report.ntp_timestamp, rtp_time)
        if self.tap is not None:
            self.tap.sender_report(stream, track, report.ntp_timestamp, rtp_time)


def _note_temporal_layer(track: Track, payload: bytes) -> None:
    """The highest temporal layer id seen (VP8 TID, RFC 7741 §4.2; VP9 TID, RFC 9628
    §4.2), for the layers event and the layer API's bounds."""
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
