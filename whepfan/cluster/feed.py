"""An upstream WHEP session's media into a router, exactly as a WHIP publisher's.

An edge pulls a stream as a WHEP *client* of another node (upstream.py). What that
session receives must reach the edge's viewers through the same path a publisher's
SRTP takes on the origin (``Ingest``: SSRC binding, RTX, receive statistics, rebase,
keyframe and picture-size detection, ``Fanout.push``, the packet cache that serves the
edge viewers' NACKs), so that layers, NACK, PLI throttling, events and status behave as
on the origin. ``media/relay.py`` does the same for a stream relayed between workers;
this module follows it:

* The origin's **answer** to our recvonly offer is, seen from the edge, the description
  of what will be sent to us: sendonly sections, one codec each, the extension ids and
  the sending SSRCs (RFC 5576 §4.1). It is negotiated with ``answer_publisher`` as if it
  were a WHIP offer, which builds the ``IngestMedia`` the tracks are made from.
* A **stand-in publisher session** holds that negotiation. It is never registered with
  the router (no ICE, no timers, no address: the upstream transport lives on its own
  socket), so the router never sends it anything; ``keyed`` gives it the SRTP keys of
  the upstream DTLS handshake and ``Ingest.keyed`` makes the stream active; the
  router's ``MediaLiveness`` watches its media as a publisher's, so the SSE
  active/inactive events follow the origin's publisher (within the media timeout).
* The stream's ``keyframe_upstream`` strategy sends keyframe requests (PLI, RFC 4585
  §6.3.1) on the upstream session, after the edge's own ``KeyframeRequests`` throttle.

A returning upstream (re-pull after a loss) attaches a new stand-in to the same stream:
``Ingest.attach`` keeps the tracks and rebases them, so edge viewers see one continuous
sequence-number and timestamp line (RFC 3550 §5.1) and never renegotiate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from whepfan.media.router import Router
from whepfan.media.session import PublisherSession, SessionKind, SessionState, SrtpKeys
from whepfan.media.streams import Stream, Track
from whepfan.protocol import rtcp, sdp
from whepfan.protocol.demux import is_rtcp
from whepfan.protocol.dtls import DtlsConnected
from whepfan.protocol.negotiation import answer_publisher

# Sends one protected SRTCP compound on the upstream session.
SendRtcp = Callable[[bytes], None]


class UpstreamFeed:
    """One upstream session's stand-in publisher on ``router`` (see the module docstring).

    Drive it with ``keyed`` once the upstream DTLS handshake is done, then ``srtp`` for
    every SRTP/SRTCP datagram the upstream transport hands back; ``detach`` when the
    session ends (viewers stay, waiting, as when a publisher leaves)."""

    def __init__(
        self, router: Router, stream_name: str, answer_text: str, now: float, send_rtcp: SendRtcp
    ) -> None:
        self.router = router
        self.stream_name = stream_name
        self._send_rtcp = send_rtcp
        description = sdp.SessionDescription.parse(answer_text)
        stand_in = router.new_session(
            PublisherSession, SessionKind.PUBLISHER, stream_name, description, now
        )
        assert isinstance(stand_in, PublisherSession)
        _, stand_in.ingest = answer_publisher(
            description, router.local_transport(stand_in), reject_partial=False
        )
        self.session = stand_in
        stream = router.stream(stream_name)
        if stream.live and stream.publisher is not stand_in:
            # A WHIP publisher came here first: it wins, this feed stays unattached.
            self.attached = False
            return
        router.ingest.attach(stream, stand_in, now)
        # Its media clock (media/liveness.py): when the origin's publisher stops, edge
        # viewers hear "inactive" within the media timeout, and "active" on its return.
        router.liveness.watch(stream, now)
        stream.keyframe_upstream = self._request_keyframes
        self.attached = True
        self.keyframe_requests_sent = 0

    @property
    def stream(self) -> Stream | None:
        stream = self.router.streams.get(self.stream_name)
        if stream is None or stream.publisher is not self.session:
            return None
        return stream

    def keyed(self, keys: DtlsConnected, now: float) -> None:
        """The upstream DTLS handshake is done: SRTP contexts, "active", a keyframe."""
        if self.stream is None:
            return
        self.session.keys = SrtpKeys(
            profile=keys.profile,
            local_key=keys.local_key,
            local_salt=keys.local_salt,
            remote_key=keys.remote_key,
            remote_salt=keys.remote_salt,
        )
        self.session.state = SessionState.CONNECTED
        self.session.connected_at = now
        self.router.ingest.keyed(self.session, now)

    def srtp(self, data: bytes, now: float) -> None:
        """One SRTP or SRTCP datagram from upstream (RFC 5761 §4 tells them apart)."""
        if self.stream is None:
            self.router.counters["drop_upstream_detached"] += 1
            return
        if is_rtcp(data):
            # Sender reports: the NTP <-> RTP mapping, shifted like the media, goes on
            # to edge viewers for lip sync (RFC 3550 §6.4.1).
            self.router.ingest.rtcp_received(self.session, data, now)
        else:
            self.router.ingest.rtp_received(self.session, data, now)

    def detach(self, now: float) -> None:
        """The upstream session ended: viewers stay subscribed, waiting for the next."""
        stream = self.stream
        self.session.close()
        if stream is not None:
            stream.keyframe_upstream = None
            self.router.liveness.forget(stream.name)
            self.router.ingest.detach(stream)

    def _request_keyframes(self, stream: Stream, tracks: Sequence[Track], now: float) -> bool:
        """The stream's ``KeyframeUpstream``: a PLI per media SSRC of ``tracks`` on the
        upstream session, SRTCP-protected with our key (RFC 3711 §3.4)."""
        srtcp_out = stream.publisher_srtcp_out
        if stream.publisher is not self.session or srtcp_out is None:
            return False
        wanted = {id(track) for track in tracks}
        ssrcs = [
            ssrc
            for ssrc, (track, rtx) in stream.ingest_by_ssrc.items()
            if not rtx and id(track) in wanted
        ]
        if not ssrcs:
            return False
        compound = b"".join(
            bytes(rtcp.PictureLossIndication(sender_ssrc=self.router.rtcp_ssrc, media_ssrc=ssrc))
            for ssrc in ssrcs
        )
        self._send_rtcp(srtcp_out.protect_rtcp(compound))
        self.keyframe_requests_sent += 1
        self.router.counters["upstream_keyframe_requests"] += 1
        return True
