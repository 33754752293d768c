"""A viewer's slot in the Fanout, and what its RTCP asks for.

Once a viewer's DTLS handshake completes it gets a Fanout slot (its SRTP keys, address
and source) and subscriptions: audio at once, video through its ``LayerChoice`` so it
starts on a keyframe. Its SRTCP then carries feedback handled here: NACK -> resend from
the track's packet cache (RFC 4585 §6.2.1, RFC 4588), PLI/FIR -> a throttled keyframe
request (RFC 4585 §6.3.1, RFC 5104 §4.3.1), RR and REMB -> the automatic layer policy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from whepfan import _fastpath
from whepfan.media.feedback import KeyframeRequests
from whepfan.media.headroom import HeadroomProbes
from whepfan.media.layers import LayerSelector
from whepfan.media.sender import Sender
from whepfan.media.session import ViewerSession
from whepfan.media.streams import Stream, Track
from whepfan.media.timers import Timers
from whepfan.protocol import rtcp
from whepfan.protocol.negotiation import EgressMedia


def transport_cc_id_of(egress: Sequence[EgressMedia]) -> int | None:
    """The id under which the Fanout stamps the viewer's transport-wide sequence numbers
    (one counter for its whole BUNDLE transport). Browsers give every section the same
    id; should they differ, the video section's wins (its packets are nearly all of them),
    and the other sections' receivers ignore an id they did not negotiate (RFC 8285 §5)."""
    ids = {media.kind: media.transport_cc_id for media in egress if media.transport_cc_id}
    return ids.get("video") or next(iter(ids.values()), None)


class Egress:
    """The viewers of one worker, as the Fanout and their RTCP see them."""

    def __init__(
        self,
        *,
        fanout: _fastpath.Fanout,
        streams: Mapping[str, Stream],
        sender: Sender,
        keyframes: KeyframeRequests,
        layers: LayerSelector,
        end_viewer: Callable[[str, float, str], object],
        timers: Timers,
        counters: Counter[str],
    ) -> None:
        self.fanout = fanout
        self.headroom = HeadroomProbes(
            fanout=fanout, layers=layers, timers=timers, counters=counters
        )
        self._streams = streams
        self._sender = sender
        self._keyframes = keyframes
        self._layers = layers
        self._end_viewer = end_viewer
        self._counters = counters

    def keyed(self, session: ViewerSession, now: float) -> None:
        """The viewer's DTLS handshake completed: add it to the Fanout and subscribe."""
        stream = self._streams.get(session.stream)
        keys = session.keys
        if stream is None or keys is None or session.address is None:
            self._end_viewer(session.id, now, "stream-gone")
            return
        slot = self.fanout.add_viewer(
            session.address[0],
            session.address[1],
            profile=keys.profile,
            tx_key=keys.local_key,
            tx_salt=keys.local_salt,
            rx_key=keys.remote_key,
            rx_salt=keys.remote_salt,
            source=self._sender.fanout_source(session.local_address, session.address),
        )
        session.fanout_slot = slot
        transport_cc_id = transport_cc_id_of(session.egress)
        if transport_cc_id is not None:
            self.fanout.set_transport_cc(slot, transport_cc_id)
        choice = stream.choices.get(session.id) or self._layers.new_choice(stream, session)
        if choice is not None:
            self._layers.bind_slot(slot, choice)
        for media in session.egress:
            if choice is not None and media is choice.egress:
                # Video starts on a keyframe of the chosen layer (LayerSelector.apply).
                self._layers.apply(stream, choice, now)
                continue
            tracks = stream.tracks.get(media.kind)
            if not tracks:
                continue
            self.subscribe(session, media, tracks[0])
        if transport_cc_id is not None:
            self.headroom.attach(session, stream, now)
        if choice is None:
            # A new viewer needs a keyframe now rather than at the next periodic one: this
            # is what makes time-to-first-frame about one frame interval.
            self._keyframes.request(stream, now)

    def subscribe(self, session: ViewerSession, media: EgressMedia, track: Track) -> None:
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

    def moved(self, session: ViewerSession, address: tuple[str, int], local: str | None) -> None:
        """The viewer's selected pair changed (also when only our half moved: RFC 8445
        §6.1.2.2 pairs): the fan-out follows with the address and the source."""
        if session.fanout_slot is not None:
            self.fanout.set_viewer_address(
                session.fanout_slot,
                address[0],
                address[1],
                source=self._sender.fanout_source(local, address),
            )

    def remove(self, session: ViewerSession, stream: Stream | None) -> None:
        """The viewer's session ended: free its slot and choice."""
        self._layers.release(stream, session)
        self.headroom.release(session)
        if session.fanout_slot is not None:
            self.fanout.remove_viewer(session.fanout_slot)
            session.fanout_slot = None

    def rtcp_received(self, session: ViewerSession, data: bytes, now: float) -> None:
        slot = session.fanout_slot
        if slot is None:
            return
        try:
            plain = self.fanout.unprotect_rtcp(slot, data)
            packets = rtcp.parse_compound(plain)
        except (_fastpath.SrtpError, rtcp.ParseError):
            self._counters["drop_viewer_rtcp"] += 1
            return
        stream = self._streams.get(session.stream)
        choice = stream.choices.get(session.id) if stream is not None else None
        reported = False
        for packet in packets:
            if isinstance(packet, rtcp.GenericNack):
                track = session.track_by_ssrc.get(packet.media_ssrc)
                if track is not None:
                    lost = packet.lost_sequence_numbers()
                    session.nacks_received += len(lost)
                    self._counters["nack_requested"] += len(lost)
                    self._counters["nack_resent"] += self.fanout.resend(slot, track, lost)
            elif isinstance(packet, (rtcp.PictureLossIndication, rtcp.FullIntraRequest)):
                session.keyframe_requests += 1
                if stream is not None:
                    wanted = None
                    if choice is not None and choice.egress.ssrc == packet.media_ssrc:
                        wanted = [t for t in (choice.current, choice.pending) if t is not None]
                    self._keyframes.request(stream, now, tracks=wanted)
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
            elif isinstance(packet, rtcp.TransportWideFeedback):
                # draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1 (headroom.py).
                used = self.headroom.feedback(session, stream, choice, packet, now)
                reported = reported or used
        if reported and stream is not None and choice is not None:
            self._layers.viewer_reported(stream, choice, now)
            self.headroom.decided(session, stream, choice, now)
