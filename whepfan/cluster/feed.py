"""Upstream WHEP sessions' media into a router, exactly as a WHIP publisher's.

An edge pulls a stream as a WHEP *client* of another node (upstream.py): one session
per simulcast layer, each pinned to its layer, or one session for a single-layer
stream. What those sessions receive must reach the edge's viewers through the path a
publisher's SRTP takes on the origin (``Ingest``: RTX, receive statistics, rebase,
keyframe and picture-size detection, ``Fanout.push``, the packet cache that serves the
edge viewers' NACKs), so that layers, NACK, PLI throttling, events and status behave as
on the origin. ``media/relay.py`` does the same for a stream relayed between workers;
this module follows it:

* Each session's **answer** to our recvonly offer is, seen from the edge, the
  description of what will be sent to us: sendonly sections, one codec each, the
  extension ids and (usually) the sending SSRCs (RFC 5576 §4.1). It is negotiated with
  ``answer_publisher`` as if it were a WHIP offer, which gives its ``IngestMedia``.
* A **stand-in publisher session** holds the stream's negotiation: the first session's
  audio, and its video with one encoding per layer (``rid``), so the stream has one
  ``Track`` per layer as with a WHIP simulcast publisher, and the edge's own layer
  policy, layer API and ``layers`` event work on them. It is never registered with the
  router (no ICE, no timers, no address: the upstream transports live on their own
  sockets), so the router never sends it anything; the router's ``MediaLiveness``
  watches its media as a publisher's, so the SSE active/inactive events follow the
  origin's publisher (within the media timeout).
* Each session is a **leg** (``FeedLeg``): its own SRTP contexts from its own DTLS
  handshake, its SSRCs bound to the tracks it feeds (signalled, or learnt from the
  payload type: a leg carries one encoding per kind), its packets handed to
  ``Ingest.bound_rtp`` and its sender reports to ``Ingest.sender_report``.
* The stream's ``keyframe_upstream`` strategy sends keyframe requests (PLI, RFC 4585
  §6.3.1), after the edge's own ``KeyframeRequests`` throttle, on the session of each
  layer asked for.

A leg that returns (re-pull after a loss) feeds the same track again, rebased
(``Track.rebase_pending``), so edge viewers see one continuous sequence-number and
timestamp line (RFC 3550 §5.1) and never renegotiate; the other legs flow on untouched.
A change of the layer set (``set_layers``) re-attaches the stand-in, keeping each
continuing leg on the track it fed (simulcast.track_order).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace

from whepfan import _fastpath
from whepfan.cluster.simulcast import track_order
from whepfan.errors import ParseError
from whepfan.media.meters import LayerMeter
from whepfan.media.router import Router
from whepfan.media.session import PublisherSession, SessionKind, SessionState, SrtpKeys
from whepfan.media.streams import Stream, Track
from whepfan.protocol import rtcp, rtp, sdp
from whepfan.protocol.demux import is_rtcp
from whepfan.protocol.dtls import DtlsConnected
from whepfan.protocol.negotiation import IngestMedia, IngestTrack, answer_publisher

# Sends one protected SRTCP compound on the upstream session.
SendRtcp = Callable[[bytes], None]

# Each router's feeds by stream: the sessions of one stream find their feed here, in
# whichever process holds them (a worker's router with --workers N).
_FEEDS: weakref.WeakKeyDictionary[Router, dict[str, UpstreamFeed]] = weakref.WeakKeyDictionary()


class FeedLeg:
    """One upstream session's part of a stream's feed (see the module docstring): the
    session calls ``keyed`` once its DTLS handshake is done, ``srtp`` for every
    SRTP/SRTCP datagram, and ``detach`` when it ends."""

    def __init__(
        self, feed: UpstreamFeed, rid: str | None, media: list[IngestMedia], send_rtcp: SendRtcp
    ) -> None:
        self.feed = feed
        self.rid = rid  # the layer it is pinned to (None: a single layer, or not yet)
        self.media = media
        self._send_rtcp = send_rtcp
        self.srtp_in: _fastpath.SrtpSession | None = None
        self.srtcp_in: _fastpath.SrtpSession | None = None
        self.srtcp_out: _fastpath.SrtpSession | None = None
        self.tracks: dict[str, Track] = {}  # kind -> the stream's track this leg feeds
        self.bindings: dict[int, tuple[Track, bool]] = {}  # SSRC -> (track, is RTX)
        self.detached = False
        self.keyframe_requests_sent = 0
        self.counters: Counter[str] = Counter()

    @property
    def kinds(self) -> set[str]:
        return {media.kind for media in self.media}

    @property
    def keyed_up(self) -> bool:
        return self.srtp_in is not None and not self.detached

    def keyed(self, keys: DtlsConnected, now: float) -> None:
        """The upstream DTLS handshake is done: SRTP contexts (RFC 5764 §4.2)."""
        if self.detached:
            return
        self.srtp_in = _fastpath.SrtpSession(keys.profile, keys.remote_key, keys.remote_salt)
        self.srtcp_in = _fastpath.SrtpSession(keys.profile, keys.remote_key, keys.remote_salt)
        self.srtcp_out = _fastpath.SrtpSession(keys.profile, keys.local_key, keys.local_salt)
        self.feed._leg_keyed(self, keys, now)

    def srtp(self, data: bytes, now: float) -> None:
        """One SRTP or SRTCP datagram from upstream (RFC 5761 §4 tells them apart)."""
        stream = self.feed.stream
        if stream is None or not self.keyed_up or not self.tracks:
            self.feed.router.counters["drop_upstream_detached"] += 1
            return
        router = self.feed.router
        if is_rtcp(data):
            self._rtcp(stream, data, now)
            return
        assert self.srtp_in is not None
        try:
            plain = self.srtp_in.unprotect(data)
        except _fastpath.SrtpError as exc:
            router.counters[f"drop_ingest_srtp_{exc.reason}"] += 1
            return
        router.liveness.packet(stream, now)  # the publisher's media clock (liveness.py)
        if len(plain) < 12:
            router.counters["drop_ingest_malformed"] += 1
            return
        ssrc = int.from_bytes(plain[8:12], "big")
        entry = self.bindings.get(ssrc) or self._learn(stream, ssrc, plain[1] & 0x7F)
        if entry is None:
            router.counters["drop_ingest_unknown_ssrc"] += 1
            return
        router.ingest.bound_rtp(stream, entry[0], ssrc, plain, now, rtx=entry[1])

    def _rtcp(self, stream: Stream, data: bytes, now: float) -> None:
        assert self.srtcp_in is not None
        router = self.feed.router
        try:
            packets = rtcp.parse_compound(self.srtcp_in.unprotect_rtcp(data))
        except (_fastpath.SrtpError, rtcp.ParseError):
            router.counters["drop_ingest_rtcp"] += 1
            return
        for packet in packets:
            if isinstance(packet, rtcp.SenderReport):
                # Sender reports: the NTP <-> RTP mapping, shifted like the media, goes on
                # to edge viewers for lip sync (RFC 3550 §6.4.1).
                entry = self.bindings.get(packet.ssrc)
                track = entry[0] if entry is not None and not entry[1] else None
                router.ingest.sender_report(stream, track, packet, now)

    def _learn(self, stream: Stream, ssrc: int, payload_type: int) -> tuple[Track, bool] | None:
        """An SSRC the answer did not signal: a leg sends one encoding per kind, so the
        payload type alone says which track (and whether RTX, RFC 4588 §4)."""
        for media in self.media:
            track = self.tracks.get(media.kind)
            if track is None:
                continue
            if payload_type == media.codec.payload_type:
                entry = (track, False)
            elif payload_type == media.codec.rtx_payload_type:
                entry = (track, True)
            else:
                continue
            self.bindings[ssrc] = entry
            stream.ingest_by_ssrc[ssrc] = entry
            return entry
        return None

    def bind(
        self, stream: Stream, tracks: dict[str, Track], *, continuing: Collection[str]
    ) -> None:
        """Feed ``tracks`` (kind -> track) from now on. A track this leg did not feed
        until now starts on a new sequence line: rebased (RFC 3550 §5.1); the kinds in
        ``continuing`` it goes on feeding are not (``Ingest.attach`` marked them all)."""
        self.tracks = tracks
        self.bindings.clear()
        for media in self.media:
            track = tracks.get(media.kind)
            if track is None:
                continue
            track.rebase_pending = media.kind not in continuing
            # A session of its own may number extensions unlike the first (RFC 8285 §5).
            track.ext_remap = rtp.extension_id_table(
                media.extension_ids, track.ingest.extension_ids
            )
            encoding = media.tracks[0] if media.tracks else IngestTrack()
            if encoding.ssrc is not None:
                self.bindings[encoding.ssrc] = (track, False)
            if encoding.rtx_ssrc is not None:
                self.bindings[encoding.rtx_ssrc] = (track, True)
        stream.ingest_by_ssrc.update(self.bindings)

    def request_keyframe(self, tracks: Sequence[Track]) -> bool:
        """A PLI per media SSRC of ``tracks`` this leg feeds, SRTCP-protected with its
        key (RFC 3711 §3.4). False when it cannot ask (not keyed, SSRC not seen yet)."""
        if self.srtcp_out is None or self.detached:
            return False
        wanted = {id(track) for track in tracks}
        ssrcs = [
            ssrc for ssrc, (track, rtx) in self.bindings.items() if not rtx and id(track) in wanted
        ]
        if not ssrcs:
            return False
        sender = self.feed.router.rtcp_ssrc
        compound = b"".join(
            bytes(rtcp.PictureLossIndication(sender_ssrc=sender, media_ssrc=ssrc)) for ssrc in ssrcs
        )
        self._send_rtcp(self.srtcp_out.protect_rtcp(compound))
        self.keyframe_requests_sent += 1
        return True

    def detach(self, now: float) -> None:
        """The session ended: its tracks get nothing until a leg feeds them again."""
        if self.detached:
            return
        self.detached = True
        self.feed._leg_gone(self, now)


class UpstreamFeed:
    """The upstream sessions of one stream on ``router`` (see the module docstring).

    ``add_leg`` for each session's answer (the first one carries audio and fixes the
    stream's negotiation); ``set_layers`` when the origin's layers are known or change.
    """

    def __init__(self, router: Router, stream_name: str) -> None:
        self.router = router
        self.stream_name = stream_name
        self.session: PublisherSession | None = None  # the stand-in, once attached
        self.attached = False
        self.layers: list[str | None] = [None]  # the video tracks' layers, in track order
        self.legs: dict[str | None, FeedLeg] = {}
        self._canonical: dict[str, IngestMedia] = {}  # kind -> the first leg's negotiation
        # video track index -> the leg that fed it (track_order keeps legs in place)
        self._fed: list[FeedLeg | None] = []
        self._audio_leg: FeedLeg | None = None  # the leg that feeds the audio track
        self._leg_keys: dict[int, SrtpKeys] = {}  # id(leg) -> its DTLS keys, once keyed
        self._description: sdp.SessionDescription | None = None  # the first answer
        self._attached_layers: list[str | None] = []  # self.layers as last attached

    @classmethod
    def of(cls, router: Router, stream_name: str) -> UpstreamFeed:
        """The feed of ``stream_name`` on ``router``, made on the first session's answer
        and forgotten when its last session ends."""
        feeds = _FEEDS.setdefault(router, {})
        feed = feeds.get(stream_name)
        if feed is None:
            feed = feeds[stream_name] = cls(router, stream_name)
        return feed

    @staticmethod
    def find(router: Router, stream_name: str) -> UpstreamFeed | None:
        """The feed of ``stream_name`` on ``router`` while a session feeds it."""
        return _FEEDS.get(router, {}).get(stream_name)

    @property
    def stream(self) -> Stream | None:
        stream = self.router.streams.get(self.stream_name)
        if stream is None or self.session is None or stream.publisher is not self.session:
            return None
        return stream

    @property
    def keyframe_requests_sent(self) -> int:
        return sum(leg.keyframe_requests_sent for leg in self.legs.values())

    def description(self) -> str | None:
        """The stream's tracks as one publisher offer (None before the first answer): the
        first session's answer, its video with one ``a=rid`` per layer in track order
        under ``a=simulcast:send`` (RFC 8851 §4, RFC 8853 §5.1) and no SSRCs (each leg
        binds its own). With ``--workers N`` the other workers' relay copies are made
        from it (media/relay.py), so that they have one track per layer, keyed
        ``video/<index>`` as here, exactly as for a WHIP simulcast publisher's offer."""
        if self._description is None:
            return None
        description = sdp.SessionDescription.parse(self._description.serialize())
        rids = [rid for rid in self.layers if rid is not None]
        for section in description.media:
            if section.kind != "video" or section.rejected or not rids:
                continue
            section.ssrcs.clear()
            section.ssrc_groups.clear()
            section.rids = [sdp.Rid(id=rid, direction="send") for rid in rids]
            section.simulcast = sdp.Simulcast(send=[[sdp.SimulcastStream(rid)] for rid in rids])
        return description.serialize()

    # legs ------------------------------------------------------------------------------

    def add_leg(
        self,
        rid: str | None,
        answer_text: str,
        now: float,
        send_rtcp: SendRtcp,
        *,
        layers: Sequence[str] = (),
    ) -> FeedLeg:
        """The answer of a new session for layer ``rid`` of ``layers`` (the origin's, low
        to high; empty: a single layer); raises ``ParseError`` / ``WhepfanError`` /
        ``ValueError`` for an answer that cannot feed the stream (no usable media, or a
        codec other than the one the stream's other sessions have)."""
        description = sdp.SessionDescription.parse(answer_text)
        media = self._negotiate(description, now)
        old = self.legs.get(rid)
        if old is not None:
            old.detach(now)  # replaced (the puller ends a lost session first)
        for item in media:
            canonical = self._canonical.get(item.kind)
            if canonical is not None and (
                canonical.codec.name.lower() != item.codec.name.lower()
                or canonical.codec.clock_rate != item.codec.clock_rate
            ):
                raise ParseError(
                    f"the {item.kind} of layer {rid!r} is {item.codec.name}, "
                    f"the stream's other sessions have {canonical.codec.name}"
                )
        for item in media:
            self._canonical.setdefault(item.kind, item)
        if self._description is None:
            self._description = description
        leg = FeedLeg(self, rid, media, send_rtcp)
        self.legs[rid] = leg
        _FEEDS.setdefault(self.router, {})[self.stream_name] = self
        self.layers = self._order(layers)
        stream = self.stream
        if stream is None or self.layers != self._attached_layers:
            self._attach(now)
        else:
            self._bind_leg(stream, leg, continuing=set())
        return leg

    def rename_leg(self, leg: FeedLeg, rid: str | None) -> None:
        """``leg`` carries layer ``rid`` from now on (its session was pinned to it); the
        next ``set_layers`` puts it in place."""
        if self.legs.get(leg.rid) is leg:
            del self.legs[leg.rid]
        video = leg.tracks.get("video")
        if video is not None and rid != leg.rid:
            # The track it feeds (it stays on it: its viewers keep their line) changes
            # layer at the origin's next keyframe: what was measured there is forgotten
            # until then (Stream.layers orders the layers by it).
            video.width = video.height = None
            video.meter = LayerMeter()
        leg.rid = rid
        self.legs[rid] = leg

    def set_layers(self, wanted: Sequence[str], now: float) -> None:
        """The origin's layers, low to high (empty: a single layer). Re-attaches the
        stand-in with one video encoding per layer when they changed: continuing legs
        keep their tracks, un-fed tracks turn inactive (their viewers are moved)."""
        self.layers = self._order(wanted)
        if self.stream is not None and self.layers != self._attached_layers:
            self._attach(now)

    def _order(self, wanted: Sequence[str]) -> list[str | None]:
        if not wanted:
            return [None]
        fed: list[str | None] = [
            leg.rid if leg is not None and not leg.detached else None for leg in self._fed
        ]
        if not self._fed:
            # A new feed for a stream whose tracks remain (every session had ended):
            # each layer goes back to the track it had.
            stream = self.router.streams.get(self.stream_name)
            fed = [track.rid for track in stream.tracks.get("video", [])] if stream else []
        return list(track_order(fed, wanted))

    def _negotiate(self, description: sdp.SessionDescription, now: float) -> list[IngestMedia]:
        scratch = self.router.new_session(
            PublisherSession, SessionKind.PUBLISHER, self.stream_name, description, now
        )
        assert isinstance(scratch, PublisherSession)
        _, media = answer_publisher(
            description, self.router.local_transport(scratch), reject_partial=False
        )
        return media

    # the stand-in ---------------------------------------------------------------------------

    def _composite(self) -> list[IngestMedia]:
        """The stand-in's negotiation: audio as the first leg has it, and video with one
        encoding per layer (rid-named, SSRCs bound by the legs)."""
        composite: list[IngestMedia] = []
        for kind, media in self._canonical.items():
            if kind == "video":
                encodings = tuple(IngestTrack(rid=rid) for rid in self.layers)
                composite.append(replace(media, tracks=encodings))
            else:
                composite.append(replace(media, tracks=(IngestTrack(),)))
        return composite

    def _attach(self, now: float) -> None:
        router = self.router
        stream = router.stream(self.stream_name)
        if stream.live and stream.publisher is not self.session:
            # A WHIP publisher came here first: it wins, the feed stays unattached.
            self.attached = False
            return
        first = self.session is None or self.session.state is SessionState.CLOSED
        if first:
            assert self._description is not None
            stand_in = router.new_session(
                PublisherSession, SessionKind.PUBLISHER, self.stream_name, self._description, now
            )
            assert isinstance(stand_in, PublisherSession)
            self.session = stand_in
        assert self.session is not None
        self.session.ingest = self._composite()
        self._attached_layers = list(self.layers)
        fed_before, audio_before = self._fed, self._audio_track(stream)
        router.ingest.attach(stream, self.session, now)
        if first:
            # Its media clock (media/liveness.py): when the origin's publisher stops, edge
            # viewers hear "inactive" within the media timeout, and "active" on its return.
            router.liveness.watch(stream, now)
        stream.keyframe_upstream = self._request_keyframes
        self.attached = True
        self._fed = []
        audio = self._audio_track(stream)
        for leg in list(self.legs.values()):
            continuing: set[str] = set()
            if leg.rid in self.layers:
                index = self.layers.index(leg.rid)
                if index < len(fed_before) and fed_before[index] is leg:
                    continuing.add("video")
            if leg is self._audio_leg and audio is not None and audio is audio_before:
                continuing.add("audio")
            self._bind_leg(stream, leg, continuing=continuing)
        if self.session.state is not SessionState.CONNECTED:
            keyed = next((leg for leg in self.legs.values() if id(leg) in self._leg_keys), None)
            if keyed is not None:
                self._keyed_stand_in(self._leg_keys[id(keyed)], now)

    @staticmethod
    def _audio_track(stream: Stream) -> Track | None:
        audio = stream.tracks.get("audio")
        return audio[0] if audio else None

    def _bind_leg(self, stream: Stream, leg: FeedLeg, *, continuing: set[str]) -> None:
        tracks: dict[str, Track] = {}
        if "video" in leg.kinds and leg.rid in self.layers:
            video = stream.tracks.get("video", [])
            index = self.layers.index(leg.rid)
            if index < len(video):
                tracks["video"] = video[index]
                while len(self._fed) <= index:
                    self._fed.append(None)
                self._fed[index] = leg
        audio = self._audio_track(stream)
        if (
            "audio" in leg.kinds
            and audio is not None
            and (self._audio_leg is None or self._audio_leg is leg or self._audio_leg.detached)
        ):
            # One leg carries the audio (the others are offered none): the first.
            tracks["audio"] = audio
            self._audio_leg = leg
        leg.bind(stream, tracks, continuing=continuing)

    # keys, keyframes, departures ----------------------------------------------------------

    def _leg_keyed(self, leg: FeedLeg, keys: DtlsConnected, now: float) -> None:
        self._leg_keys[id(leg)] = SrtpKeys(
            profile=keys.profile,
            local_key=keys.local_key,
            local_salt=keys.local_salt,
            remote_key=keys.remote_key,
            remote_salt=keys.remote_salt,
        )
        stream = self.stream
        if stream is None or self.session is None:
            return
        if self.session.state is not SessionState.CONNECTED:
            self._keyed_stand_in(self._leg_keys[id(leg)], now)
            return
        # A layer (re)joined a flowing stream: its viewers wait for its keyframe.
        video = leg.tracks.get("video")
        if video is not None:
            self.router.keyframes.request(stream, now, tracks=[video], force=True)

    def _keyed_stand_in(self, keys: SrtpKeys, now: float) -> None:
        """The first leg is keyed: the stream is active (SSE "active"), and every layer
        is asked for a keyframe (Ingest.keyed)."""
        assert self.session is not None
        self.session.keys = keys
        self.session.state = SessionState.CONNECTED
        self.session.connected_at = now
        self.router.ingest.keyed(self.session, now)

    def _leg_gone(self, leg: FeedLeg, now: float) -> None:
        self._leg_keys.pop(id(leg), None)
        if self.legs.get(leg.rid) is leg:
            del self.legs[leg.rid]
        if self._audio_leg is leg:
            self._audio_leg = None
        if any(not other.detached for other in self.legs.values()):
            return
        # The last session ended: viewers stay subscribed, waiting for the next, whose
        # feed starts afresh (its codec may differ: Ingest.attach then ends them).
        stream = self.stream
        if self.session is not None:
            self.session.close()
        if stream is not None:
            stream.keyframe_upstream = None
            self.router.liveness.forget(stream.name)
            self.router.ingest.detach(stream)
        self._canonical.clear()
        self._description = None
        self._fed, self._attached_layers = [], []
        feeds = _FEEDS.get(self.router, {})
        if feeds.get(self.stream_name) is self:
            del feeds[self.stream_name]

    def _request_keyframes(self, stream: Stream, tracks: Sequence[Track], now: float) -> bool:
        """The stream's ``KeyframeUpstream``: each layer's PLI on its own session."""
        if stream.publisher is not self.session:
            return False
        asked = False
        for leg in list(self.legs.values()):
            fed = [track for track in tracks if track in leg.tracks.values()]
            if fed and leg.request_keyframe(fed):
                asked = True
        if asked:
            self.router.counters["upstream_keyframe_requests"] += 1
        return asked
