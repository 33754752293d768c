"""Relayed copies of a stream in another worker (frames, RelayCopies).

With ``--workers N`` (DESIGN.md §2) the publisher's SRTP lands on one worker, the
stream's *origin*, which unprotects it once and hands every plain RTP packet and sender
report to the other workers over Unix datagram sockets (workers/relay_peer.py)::

    publisher --SRTP--> worker A (origin): unprotect once, Fanout.push for A's viewers
                           |  the same plain RTP packet, once per other worker
                           v  (RelayFrame)
                        worker B: Fanout.push for B's viewers (B encrypts only for them)
                           |  keyframe request (through B's own keyframe throttle)
                        <--+

A worker that is not the stream's origin holds a *relay copy*: the router's own stream
and tracks, attached from the origin's canonical offer with a stand-in publisher session
that is never registered (no ICE, no timers, no address), so ``view()`` negotiates
exactly as on the origin. Relayed packets, already rebased and renumbered by the origin,
go through the router's ingest path (``Ingest.push(relayed=True)``). Nothing here
overrides the router: the origin side is an ``IngestTap``, and a relay copy's keyframe
requests reach the origin through the stream's ``keyframe_upstream`` strategy.
"""

from __future__ import annotations

import enum
import functools
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from whepfan.errors import ParseError
from whepfan.media.router import Router
from whepfan.media.session import PublisherSession, SessionKind
from whepfan.media.streams import Stream, Track, stream_tracks
from whepfan.protocol import sdp
from whepfan.protocol.negotiation import answer_publisher

log = logging.getLogger("whepfan.relay")


class RelayKind(enum.IntEnum):
    RTP = 1  # plain RTP, origin -> other workers
    SENDER_REPORT = 2  # NTP + RTP timestamps for Fanout.send_sender_reports
    KEYFRAME_REQUEST = 3  # other worker -> origin


_RELAY_HEADER = struct.Struct("!BBBB")  # kind, flags, stream name length, track key length
SENDER_REPORT_BODY = struct.Struct("!QI")  # RFC 3550 §6.4.1: 64-bit NTP time, 32-bit RTP time
_FLAG_KEYFRAME = 0x01


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayFrame:
    """One datagram between workers::

         0       1       2        3
        +-------+-------+--------+--------+---------------+-------------+---------+
        | kind  | flags | n_len  | k_len  | stream (UTF-8)| track key   | body    |
        +-------+-------+--------+--------+---------------+-------------+---------+

    flags bit 0: the RTP packet starts a keyframe. Body: the RTP packet (RTP), 12 bytes
    NTP + RTP time (SENDER_REPORT), nothing (KEYFRAME_REQUEST)."""

    kind: RelayKind
    stream: str
    track: str = ""
    keyframe: bool = False
    body: bytes = b""

    def __bytes__(self) -> bytes:
        name = self.stream.encode()
        track = self.track.encode()
        if len(name) > 255 or len(track) > 255:
            raise ValueError("stream names and track keys are at most 255 bytes")
        flags = _FLAG_KEYFRAME if self.keyframe else 0
        return (
            _RELAY_HEADER.pack(self.kind, flags, len(name), len(track)) + name + track + self.body
        )

    @classmethod
    def parse(cls, data: bytes) -> RelayFrame:
        if len(data) < _RELAY_HEADER.size:
            raise ParseError("relay frame shorter than its header")
        kind_value, flags, name_len, track_len = _RELAY_HEADER.unpack_from(data)
        try:
            kind = RelayKind(kind_value)
        except ValueError:
            raise ParseError(f"unknown relay frame kind {kind_value}") from None
        start = _RELAY_HEADER.size
        body_at = start + name_len + track_len
        if len(data) < body_at:
            raise ParseError("relay frame names run past its end")
        try:
            stream = data[start : start + name_len].decode()
            track = data[start + name_len : body_at].decode()
        except UnicodeDecodeError:
            raise ParseError("relay frame names are not UTF-8") from None
        body = bytes(data[body_at:])
        if kind is RelayKind.SENDER_REPORT and len(body) != SENDER_REPORT_BODY.size:
            raise ParseError("a sender-report relay frame carries 12 bytes")
        if kind is RelayKind.RTP and len(body) < 12:
            raise ParseError("a relayed RTP packet has at least its fixed header")
        return cls(
            kind=kind, stream=stream, track=track, keyframe=bool(flags & _FLAG_KEYFRAME), body=body
        )


class RelayCopies:
    """A worker's side of the relay: the IngestTap of the streams it originates, and the
    relay copies of streams originated elsewhere (see the module docstring)."""

    def __init__(
        self,
        router: Router,
        *,
        send_frame: Callable[[bytes], None],
        forward_keyframe_request: Callable[[int, str], None],
    ) -> None:
        self.router = router
        self._send_frame = send_frame
        self._forward_keyframe_request = forward_keyframe_request
        self.relayed: dict[str, int] = {}  # stream -> origin worker
        self.canonical_offers: dict[str, str] = {}  # origin streams: the offer of its tracks
        # Relay copies: stream -> track key -> track, kept from attach to detach.
        self._tracks: dict[str, dict[str, Track]] = {}
        router.ingest.tap = self

    # the origin side (IngestTap) ---------------------------------------------------------

    def packet(self, stream: Stream, track: Track, packet: bytes, keyframe: bool) -> None:
        if stream.name in self.relayed:
            return  # relay copies never relay onwards
        self._send_frame(
            bytes(
                RelayFrame(
                    kind=RelayKind.RTP,
                    stream=stream.name,
                    track=track.key,
                    keyframe=keyframe,
                    body=packet,
                )
            )
        )

    def sender_report(self, stream: Stream, track: Track, ntp_time: int, rtp_time: int) -> None:
        if stream.name in self.relayed:
            return
        self._send_frame(
            bytes(
                RelayFrame(
                    kind=RelayKind.SENDER_REPORT,
                    stream=stream.name,
                    track=track.key,
                    body=SENDER_REPORT_BODY.pack(ntp_time, rtp_time),
                )
            )
        )

    def publish(
        self, stream_name: str, offer_text: str, now: float
    ) -> tuple[PublisherSession, str]:
        """WHIP on this worker: it becomes (or stays) the stream's origin."""
        if stream_name in self.relayed and self.router.streams.get(stream_name) is not None:
            # The publisher moved here: the relay copy's stand-in steps aside.
            self.detach_relay(stream_name, now)
        session, answer = self.router.publish(stream_name, offer_text, now)
        stream = self.router.streams[stream_name]
        ingest_ids = {id(media) for media in session.ingest}
        if any(id(track.ingest) in ingest_ids for track in stream.all_tracks()) or (
            stream_name not in self.canonical_offers
        ):
            # This offer made (some of) the tracks: it is what relay copies must mirror.
            self.canonical_offers[stream_name] = offer_text
        return session, answer

    def relayed_keyframe_request(self, stream_name: str, now: float) -> None:
        """Another worker's viewers want a keyframe of a stream published here."""
        stream = self.router.streams.get(stream_name)
        if stream is not None and stream_name not in self.relayed:
            self.router.keyframes.request(stream, now)

    # relay copies -----------------------------------------------------------------------

    def attach_relay(self, stream_name: str, offer_text: str, origin: int, now: float) -> None:
        """Mirror ``origin``'s stream: tracks from its canonical offer, fed by relay frames."""
        router = self.router
        stream = router.streams.get(stream_name)
        if stream is not None and stream_name not in self.relayed:
            if stream.live:
                log.warning("relay of %r ignored: its publisher is on this worker", stream_name)
                return
            self.canonical_offers.pop(stream_name, None)
        offer = sdp.SessionDescription.parse(offer_text)
        stand_in = router.new_session(
            PublisherSession, SessionKind.PUBLISHER, stream_name, offer, now
        )
        assert isinstance(stand_in, PublisherSession)
        # The origin accepted this description already; a copy mirrors what it accepted
        # and refuses nothing (an upstream pull's answer may carry sections the origin
        # worker rejected with port 0: cluster/feed.py negotiates it the same way).
        # transport_cc: the tracks learn the publisher's transport-cc id, which relayed
        # packets still carry (viewers here get it rewritten rather than a second one).
        _, stand_in.ingest = answer_publisher(
            offer, router.local_transport(stand_in), reject_partial=False, transport_cc=True
        )
        stream = router.stream(stream_name)
        router.ingest.attach(stream, stand_in, now)
        for track in stream.all_tracks():
            # Relayed packets arrive rebased and renumbered by the origin already.
            track.rebase_pending = False
            track.ext_remap = None
        self._tracks[stream_name] = {track.key: track for track in stream.all_tracks()}
        # Keyframe requests of this worker's viewers go to the origin, throttled here.
        stream.keyframe_upstream = functools.partial(self._ask_origin, origin)
        self.relayed[stream_name] = origin

    def _ask_origin(self, origin: int, stream: Stream, tracks: Sequence[Track], now: float) -> bool:
        self.router.counters["keyframe_requests_relayed"] += 1
        self._forward_keyframe_request(origin, stream.name)
        return True

    def detach_relay(self, stream_name: str, now: float) -> None:
        """The origin's publisher left: viewers stay, waiting, as on the origin."""
        stream = self.router.streams.get(stream_name)
        self.relayed.pop(stream_name, None)
        self._tracks.pop(stream_name, None)
        if stream is not None:
            stream.keyframe_upstream = None
            if stream.publisher is not None:
                stream.publisher.close()
                self.router.ingest.detach(stream)

    def relayed_packet(self, frame: RelayFrame, now: float) -> None:
        stream = self.router.streams.get(frame.stream)
        tracks = self._tracks.get(frame.stream)
        if stream is None or tracks is None:
            self.router.counters["drop_relay_unknown_stream"] += 1
            return
        track = tracks.get(frame.track)
        if track is None:
            self.router.counters["drop_relay_unknown_track"] += 1
            return
        self.router.counters["relay_received"] += 1
        if frame.kind is RelayKind.RTP:
            # The router's own per-packet path (receive stats, layer meters, keyframe and
            # picture-size detection, push): the relay copy behaves like the origin.
            ssrc = int.from_bytes(frame.body[8:12], "big")
            self.router.ingest.push(stream, track, ssrc, bytearray(frame.body), now, relayed=True)
        elif frame.kind is RelayKind.SENDER_REPORT:
            ntp_time, rtp_time = SENDER_REPORT_BODY.unpack(frame.body)
            self.router.fanout.send_sender_reports(track.fanout_id, ntp_time, rtp_time)

    # what the main process hears -----------------------------------------------------------

    def stream_status(self, now: float) -> dict[str, dict[str, Any]]:
        """What the main process's status API (http/status.py) needs of every stream
        here: viewers receiving media and subscribers per track key on every worker; the
        publisher and its tracks only where the publisher is (relay copies hold a stand-in).
        O(streams * tracks + viewers), once per stats interval."""
        report: dict[str, dict[str, Any]] = {}
        for name, stream in self.router.streams.items():
            keys = {track.fanout_id: key for key, track in stream_tracks(stream)}
            subscribers: dict[str, int] = {}
            connected = 0
            for viewer in stream.viewers.values():
                if viewer.fanout_slot is None:
                    continue
                connected += 1
                for fanout_id in set(viewer.track_by_ssrc.values()):
                    key = keys.get(fanout_id)
                    if key is not None:
                        subscribers[key] = subscribers.get(key, 0) + 1
            entry: dict[str, Any] = {"connected": connected, "subscribers": subscribers}
            publisher = stream.publisher
            if name not in self.relayed and publisher is not None:
                entry["publisher"] = {
                    "state": publisher.state.value,
                    # A duration, not a time: the two processes' clocks need not agree.
                    "connected_for": None
                    if publisher.connected_at is None
                    else max(0.0, now - publisher.connected_at),
                }
                entry["tracks"] = [
                    [key, t.kind, t.codec_name, t.clock_rate, t.packets, t.octets]
                    for key, t in stream_tracks(stream)
                ]
            report[name] = entry
        return report

    def origin_stream_counters(self) -> dict[str, list[tuple[str, str, int, int]]]:
        """(track key, kind, packets, payload octets) of the streams published here."""
        return {
            name: [(key, t.kind, t.packets, t.octets) for key, t in stream_tracks(stream)]
            for name, stream in self.router.streams.items()
            if name not in self.relayed and stream.live
        }
