"""Media workers behind the signalling API: in this process (``--workers 1``) or as N
processes (``--workers N``, DESIGN.md §2), with admission control in front of both.

Theory of operation
-------------------
The HTTP layer calls a ``SessionRouter`` (http/backend.py). Here that is either

* :class:`InProcessWorkers`: today's single ``Router`` (media path untouched), behind the
  capacity ledger; or
* :class:`WorkerPool`: N worker processes, worker i on UDP port base+i, each running a
  ``MediaWorker`` whose router is a :class:`RelayRouter`. The main process keeps a
  registry of sessions and streams, picks a worker per new viewer from the ledger (least
  loaded), and forwards each signalling call to the session's worker over its control
  channel: a ``SOCK_SEQPACKET`` Unix socket pair (message boundaries kept by the kernel)
  carrying one orjson object per message. Calls block the HTTP loop for one worker round
  trip (an SDP negotiation, about a millisecond); the HTTP handlers call the router
  synchronously, which is what keeps a cancelled request from leaving half a session.

Media between workers::

    publisher --SRTP--> worker A (origin): unprotect once, Fanout.push for A's viewers
                           |  the same plain RTP packet, once per other worker
                           v  (Unix datagram socket relay-<i>.sock, RelayFrame)
                        worker B: Fanout.push for B's viewers (B encrypts only for them)
                           |  keyframe request (throttled per stream, as upstream PLI is)
                        <--+

A worker that is not the stream's origin holds a *relay copy* of the stream: the router's
own stream and tracks, built by the router's own ``_attach_publisher`` from the origin's
canonical offer, with a stand-in publisher session that is never registered (no ICE, no
timers, no address), so ``view()`` negotiates exactly as on the origin and relayed
packets, already rebased and renumbered by the origin, go straight to ``Fanout.push``.

Each worker sends to each other worker on its own connected datagram socket
(:class:`RelayPeer`): a burst the receiving worker cannot take yet waits, in order, in a
bounded backlog instead of being dropped at the kernel's 10-datagram queue.

The layer API (EXT §5) is forwarded to the viewer's worker like any session call; a
viewer admitted on a lower layer has its ceiling kept by its worker ("cap_layer"), which
holds every later request under it (:func:`capped_layer_request`). The
status API reads the registry plus what each worker's once-a-second stats message
reports: every worker its viewers receiving media per stream, the origin also the
publisher and its tracks; the origin's "layers" events are forwarded as they happen.

A worker process that exits is seen through its process sentinel: its sessions leave the
registry (their PATCH/DELETE answer 404), event readers of those sessions are told to
reconnect, streams it originated go inactive, and a replacement starts on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import multiprocessing
import os
import select
import shutil
import signal
import socket
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import orjson

from whepfan import _fastpath, errors
from whepfan.capacity import (
    RECEIVE_DELAY_WARNING,
    Admission,
    CapacityLedger,
    LatencyHistogram,
    LayerCost,
    RateMeter,
    ReceiveDelay,
    ServerStats,
    WorkerStats,
    warn_when_behind,
)
from whepfan.config import MediaConfig
from whepfan.errors import NotFound, ParseError, PeerError, ServiceUnavailable, WhepfanError
from whepfan.protocol import sdp
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.router import (
    LayerRequest,
    Router,
    Stream,
    StreamEvent,
    StreamListener,
    StreamListeners,
)
from whepfan.session import MediaSession, PublisherSession, SessionKind, SessionState

log = logging.getLogger("whepfan.workers")

SessionLostHook = Callable[[list[str]], object]  # return value ignored

# ====================================================================== relay wire format


class RelayKind(enum.IntEnum):
    RTP = 1  # plain RTP, origin -> other workers
    SENDER_REPORT = 2  # NTP + RTP timestamps for Fanout.send_sender_reports
    KEYFRAME_REQUEST = 3  # other worker -> origin


_RELAY_HEADER = struct.Struct("!BBBB")  # kind, flags, stream name length, track key length
_SR_BODY = struct.Struct("!QI")  # RFC 3550 §6.4.1: 64-bit NTP time, 32-bit RTP time
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
        if kind is RelayKind.SENDER_REPORT and len(body) != _SR_BODY.size:
            raise ParseError("a sender-report relay frame carries 12 bytes")
        if kind is RelayKind.RTP and len(body) < 12:
            raise ParseError("a relayed RTP packet has at least its fixed header")
        return cls(
            kind=kind, stream=stream, track=track, keyframe=bool(flags & _FLAG_KEYFRAME), body=body
        )


def relay_path(relay_dir: str, worker: int) -> str:
    return os.path.join(relay_dir, f"relay-{worker}.sock")


# Frames one peer may have waiting in this process while its relay socket is full: about
# two seconds of a 720p simulcast stream (~700 packets/s with audio). A peer further
# behind than that is stuck, and its viewers are better served by fresh packets later
# than by an ever-growing queue.
RELAY_BACKLOG_FRAMES = 1536


class RelayPeer:
    """The send side of the relay towards one other worker: a Unix datagram socket
    *connected* to that worker's relay socket, and a bounded backlog.

    Why connected, and why a backlog: Linux bounds an AF_UNIX datagram socket's receive
    queue by *datagrams*, ``net.unix.max_dgram_qlen`` (10 by default), not by SO_RCVBUF.
    A keyframe arrives from the publisher as a burst of tens of packets; when the other
    worker is busy for a millisecond (a DTLS handshake in a join storm) the eleventh
    packet of the burst would meet EAGAIN and be lost (measured: 12 packets in a
    50-viewer join, every viewer on that worker saw the gap). On a connected socket
    ``poll`` reports writable only when the peer's queue has room (the kernel's
    unix_dgram_poll peer-wake), so frames that meet EAGAIN wait here, in order, and go
    out as soon as the peer reads. Only a peer more than ``backlog_limit`` frames behind
    loses frames (``drop_relay_queue_full``)."""

    def __init__(
        self,
        *,
        path: str,
        loop: asyncio.AbstractEventLoop,
        counters: MutableMapping[str, int],
        backlog_limit: int = RELAY_BACKLOG_FRAMES,
    ) -> None:
        self.path = path
        self._loop = loop
        self._counters = counters
        self.backlog_limit = backlog_limit
        self.backlog: deque[bytes] = deque()
        self._sock: socket.socket | None = None
        self._writer_fd: int | None = None

    def send(self, frame: bytes) -> None:
        if self.backlog:
            self._queue(frame)  # behind what is waiting: the relay keeps packet order
            return
        sock = self._connected()
        if sock is None:
            self._counters["drop_relay_no_peer"] += 1
            return
        try:
            sock.send(frame)
        except BlockingIOError:
            self._queue(frame)
            self._wait_writable(sock)
        except OSError as exc:
            self._peer_gone(exc, lost=1)
        else:
            self._counters["relay_sent"] += 1

    def close(self) -> None:
        self._stop_waiting()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.backlog.clear()

    def _connected(self) -> socket.socket | None:
        """The socket, connected now if it was not (the peer may start after us, or have
        been replaced: a new process binds a new socket at the same path)."""
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()  # ENOENT/ECONNREFUSED: not (yet) there; try again next frame
            return None
        self._sock = sock
        return sock

    def _queue(self, frame: bytes) -> None:
        if len(self.backlog) >= self.backlog_limit:
            self._counters["drop_relay_queue_full"] += 1
            return
        self.backlog.append(frame)
        self._counters["relay_backlogged"] += 1

    def _wait_writable(self, sock: socket.socket) -> None:
        if self._writer_fd is None:
            self._writer_fd = sock.fileno()
            self._loop.add_writer(self._writer_fd, self._flush)

    def _stop_waiting(self) -> None:
        if self._writer_fd is not None:
            self._loop.remove_writer(self._writer_fd)
            self._writer_fd = None

    def _flush(self) -> None:
        sock = self._sock
        while self.backlog and sock is not None:
            try:
                sock.send(self.backlog[0])
            except BlockingIOError:
                return  # still full: the loop calls again when the peer has read
            except OSError as exc:
                self._peer_gone(exc, lost=0)
                return
            self.backlog.popleft()
            self._counters["relay_sent"] += 1
        self._stop_waiting()

    def _peer_gone(self, exc: OSError, *, lost: int) -> None:
        # ECONNREFUSED/ENOENT: that worker exited (its viewers are gone with it); a
        # replacement binds the path again and the next frame reconnects.
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN):
            log.warning("relay to %s failed: %s", self.path, exc)
        self._counters["drop_relay_no_peer"] += lost + len(self.backlog)
        self.close()


# ====================================================================== worker side


def stream_tracks(stream: Stream) -> list[tuple[str, Any]]:
    """(key, Track) of every track of ``stream``; the key names the track the same way
    on every worker: its kind, and ``kind/index`` for each simulcast encoding."""
    found: list[tuple[str, Any]] = []
    tracks: Mapping[str, Any] = stream.tracks
    for kind, value in tracks.items():
        if isinstance(value, list):
            found.extend((f"{kind}/{index}", track) for index, track in enumerate(value))
        else:
            found.append((kind, value))
    return found


class RelayingFanout:
    """The worker's ``Fanout`` as its router sees it: every packet the router pushes (only
    the origin's own ingest goes through here) and every sender report is also handed to
    ``relay``; relayed input is pushed on the wrapped fanout directly, so nothing loops."""

    def __init__(
        self, fanout: _fastpath.Fanout, relay: Callable[[int, RelayKind, bytes, bool], None]
    ) -> None:
        self.inner = fanout
        self._relay = relay

    def push(self, track: int, packet: bytes, keyframe: bool = False, *rest: Any) -> int:
        sent: int = self.inner.push(track, packet, keyframe, *rest)
        self._relay(track, RelayKind.RTP, packet, keyframe)
        return sent

    def send_sender_reports(self, track: int, ntp_time: int, rtp_time: int) -> int:
        sent = self.inner.send_sender_reports(track, ntp_time, rtp_time)
        self._relay(track, RelayKind.SENDER_REPORT, _SR_BODY.pack(ntp_time, rtp_time), False)
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RelayRouter(Router):
    """A worker process's router: the Router, plus relay copies of streams whose
    publisher is on another worker (see the module docstring)."""

    def __init__(self, *, forward_keyframe_request: Callable[[int, str], None], **kwargs: Any):
        super().__init__(**kwargs)
        self.forward_keyframe_request = forward_keyframe_request
        self.relayed: dict[str, int] = {}  # stream -> origin worker
        self.canonical_offers: dict[str, str] = {}  # origin streams: the offer of its tracks

    def publish(
        self, stream_name: str, offer_text: str, now: float
    ) -> tuple[PublisherSession, str]:
        if stream_name in self.relayed and self.streams.get(stream_name) is not None:
            # The publisher moved here: the relay copy's stand-in steps aside.
            self.detach_relay(stream_name, now)
        session, answer = super().publish(stream_name, offer_text, now)
        stream = self.streams[stream_name]
        ingest_ids = {id(media) for media in session.ingest}
        if any(id(track.ingest) in ingest_ids for _, track in stream_tracks(stream)) or (
            stream_name not in self.canonical_offers
        ):
            # This offer made (some of) the tracks: it is what relay copies must mirror.
            self.canonical_offers[stream_name] = offer_text
        return session, answer

    def attach_relay(self, stream_name: str, offer_text: str, origin: int, now: float) -> None:
        """Mirror ``origin``'s stream: tracks from its canonical offer, fed by relay frames."""
        stream = self.streams.get(stream_name)
        if stream is not None and stream_name not in self.relayed:
            if stream.live:
                log.warning("relay of %r ignored: its publisher is on this worker", stream_name)
                return
            self.canonical_offers.pop(stream_name, None)
        offer = sdp.SessionDescription.parse(offer_text)
        stand_in = self._new_session(
            PublisherSession, SessionKind.PUBLISHER, stream_name, offer, now
        )
        assert isinstance(stand_in, PublisherSession)
        from whepfan.protocol.negotiation import answer_publisher

        _, stand_in.ingest = answer_publisher(offer, self._local_transport(stand_in))
        if stream is None:
            stream = self.streams[stream_name] = Stream(name=stream_name)
        self._attach_publisher(stream, stand_in, now)
        for _, track in stream_tracks(stream):
            # Relayed packets arrive rebased and renumbered by the origin already.
            track.rebase_pending = False
            track.ext_remap = None
        self.relayed[stream_name] = origin

    def detach_relay(self, stream_name: str, now: float) -> None:
        """The origin's publisher left: viewers stay, waiting, as on the origin."""
        stream = self.streams.get(stream_name)
        self.relayed.pop(stream_name, None)
        if stream is not None and stream.publisher is not None:
            stream.publisher.close()
            self._detach_publisher(stream)

    def relayed_packet(self, frame: RelayFrame, now: float) -> None:
        stream = self.streams.get(frame.stream)
        if stream is None or frame.stream not in self.relayed:
            self.counters["drop_relay_unknown_stream"] += 1
            return
        track = dict(stream_tracks(stream)).get(frame.track)
        if track is None:
            self.counters["drop_relay_unknown_track"] += 1
            return
        self.counters["relay_received"] += 1
        if frame.kind is RelayKind.RTP:
            # The router's own per-packet path (receive stats, layer meters, keyframe and
            # picture-size detection, push): the relay copy behaves like the origin. Its
            # pushes skip the relay (relay copies never relay onwards).
            ssrc = int.from_bytes(frame.body[8:12], "big")
            self._ingest(stream, track, ssrc, bytearray(frame.body), now)
        elif frame.kind is RelayKind.SENDER_REPORT:
            ntp_time, rtp_time = _SR_BODY.unpack(frame.body)
            self.fanout.send_sender_reports(track.fanout_id, ntp_time, rtp_time)

    def relayed_keyframe_request(self, stream_name: str, now: float) -> None:
        stream = self.streams.get(stream_name)
        if stream is not None and stream_name not in self.relayed:
            Router._request_keyframe(self, stream, now)

    def _request_keyframe(self, stream: Stream, now: float, *args: Any, **kwargs: Any) -> bool:
        origin = self.relayed.get(stream.name)
        if origin is None:
            return Router._request_keyframe(self, stream, now, *args, **kwargs)
        # The same throttle as upstream PLI, so a join storm on this worker sends the
        # origin one request per interval, not one per viewer.
        if now - stream.last_keyframe_request < self.config.keyframe_request_interval:
            self.counters["keyframe_requests_throttled"] += 1
            return False
        stream.last_keyframe_request = now
        self.counters["keyframe_requests_relayed"] += 1
        self.forward_keyframe_request(origin, stream.name)
        return True

    def stream_status(self, now: float) -> dict[str, dict[str, Any]]:
        """What the main process's status API (http/status.py) needs of every stream
        here: viewers receiving media and subscribers per track key on every worker; the
        publisher and its tracks only where the publisher is (relay copies hold a stand-in).
        O(streams * tracks + viewers), once per stats interval."""
        report: dict[str, dict[str, Any]] = {}
        for name, stream in self.streams.items():
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
            for name, stream in self.streams.items()
            if name not in self.relayed and stream.live
        }


class RouterMonitor:
    """Observes one router from outside: sessions that ended on their own (consent loss,
    DTLS failure), setup latency of sessions that connected, and the counters."""

    def __init__(self, router: Router, *, worker: int) -> None:
        self.router = router
        self.worker = worker
        self.setup_latency = LatencyHistogram()
        # The worker's socket's (MediaWorker.receive_delay); a fresh one until it is set.
        self.receive_delay = ReceiveDelay()
        self._known: dict[str, tuple[str, str]] = {}
        self._observed: set[str] = set()

    def sample(self) -> list[tuple[str, str, str]]:
        """Observe newly keyed sessions; return (id, kind, stream) of ended ones."""
        sessions = self.router.sessions
        ended = [
            (session_id, kind, stream)
            for session_id, (kind, stream) in self._known.items()
            if session_id not in sessions
        ]
        for session_id, _, _ in ended:
            del self._known[session_id]
            self._observed.discard(session_id)
        for session in sessions.values():
            if session.id not in self._known:
                self._known[session.id] = (session.kind.value, session.stream)
            if session.connected_at is not None and session.id not in self._observed:
                self._observed.add(session.id)
                self.setup_latency.observe(max(0.0, session.connected_at - session.created_at))
        return ended

    def stats(self) -> WorkerStats:
        publishers = sum(
            1 for s in self.router.sessions.values() if s.kind is SessionKind.PUBLISHER
        )
        return WorkerStats(
            worker=self.worker,
            pid=os.getpid(),
            viewers=len(self.router.sessions) - publishers,
            publishers=publishers,
            router=dict(self.router.counters),
            fanout=self.router.fanout.stats(),
            setup_latency=self.setup_latency,
            receive_delay=self.receive_delay.seconds(),
            behind=self.receive_delay.sustained(RECEIVE_DELAY_WARNING) is not None,
        )


def stream_layers(
    meters: dict[tuple[str, str], RateMeter],
    stream: str,
    counters: list[tuple[str, str, int, int]],
    now: float,
) -> list[LayerCost]:
    """A viewer of ``stream`` gets every audio track and one video track: one layer per
    video track (highest bitrate first), each with the audio added."""
    audio_packets = audio_bits = 0.0
    video: list[LayerCost] = []
    for key, kind, packets, octets in counters:
        meter = meters.setdefault((stream, key), RateMeter())
        meter.update(now, packets, octets)
        cost = meter.cost()
        if cost is None or cost.packets_per_second <= 0:
            continue  # not flowing (yet): the ledger keeps the last cost or the default
        if kind == "video":
            video.append(cost)
        else:
            audio_packets += cost.packets_per_second
            audio_bits += cost.bits_per_second
    if not video:
        if not audio_packets:
            return []
        return [LayerCost(packets_per_second=audio_packets, bits_per_second=audio_bits)]
    video.sort(key=lambda cost: cost.bits_per_second, reverse=True)
    return [
        LayerCost(
            packets_per_second=layer.packets_per_second + audio_packets,
            bits_per_second=layer.bits_per_second + audio_bits,
        )
        for layer in video
    ]


def capped_layer_request(
    request: LayerRequest, layers: Sequence[Any], ceiling: int
) -> LayerRequest:
    """``request`` (EXT §5) as a viewer admitted no higher than layer ``ceiling`` (index
    low to high, as the router counts) may have it: a layer named above the ceiling
    becomes the ceiling layer, and maxSpatialLayerId never exceeds it, so neither a
    manual pick nor the automatic policy (a request with nothing set) climbs over the
    cost the viewer was admitted at. A rid or index the stream does not have is left
    for the router to refuse (400)."""
    if request.rid is not None:
        named = next((i for i, track in enumerate(layers) if track.rid == request.rid), None)
    else:
        named = request.spatial_layer
    limit = (
        ceiling if request.max_spatial_layer is None else min(request.max_spatial_layer, ceiling)
    )
    if named is not None and ceiling < named < len(layers):
        return replace(request, rid=None, spatial_layer=ceiling, max_spatial_layer=limit)
    return replace(request, max_spatial_layer=limit)


# ====================================================================== in-process


class InProcessWorkers:
    """``--workers 1``: the in-process router behind the capacity ledger."""

    def __init__(self, *, router: Router, ledger: CapacityLedger) -> None:
        self.router = router
        self.ledger = ledger
        self.monitor = RouterMonitor(router, worker=0)
        self._meters: dict[tuple[str, str], RateMeter] = {}
        self.lower_layer_admissions = 0
        self.layer_ceilings: dict[str, int] = {}  # viewers admitted on a lower layer

    # SessionRouter ----------------------------------------------------------------------

    @property
    def streams(self) -> Mapping[str, Stream]:
        return self.router.streams

    @property
    def fanout(self) -> _fastpath.Fanout:
        return self.router.fanout

    def __getattr__(self, name: str) -> Any:
        # Every other capability the HTTP layer looks for (the layer API, status views)
        # is the router's own: only admission sits in between.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.router, name)

    @property
    def viewer_count(self) -> int:
        return self.router.viewer_count

    def publish(self, stream_name: str, offer_text: str, now: float) -> tuple[Any, str]:
        if self.ledger.draining:
            self.ledger.reserve(stream_name)  # raises: counted as a draining refusal
        return self.router.publish(stream_name, offer_text, now)

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[Any, str]:
        return self._admit(stream_name, lambda: self.router.view(stream_name, offer_text, now), now)

    def counter_offer(self, stream_name: str, now: float) -> tuple[Any, str]:
        return self._admit(stream_name, lambda: self.router.counter_offer(stream_name, now), now)

    def accept_counter_answer(self, session_id: str, answer_text: str, now: float) -> None:
        self.router.accept_counter_answer(session_id, answer_text, now)

    def trickle(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> None:
        self.router.trickle(session_id, fragment, now)

    def restart_ice(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> str:
        return self.router.restart_ice(session_id, fragment, now)

    def end_session(self, session_id: str, now: float, reason: str = "deleted") -> bool:
        self.ledger.release(session_id)
        self.layer_ceilings.pop(session_id, None)
        return self.router.end_session(session_id, now, reason)

    def select_layer(self, session_id: str, request: LayerRequest, now: float) -> dict[str, object]:
        """The layer API (EXT §5), within the ceiling of a lower-layer admission."""
        ceiling = self.layer_ceilings.get(session_id)
        if ceiling is not None:
            session = self.router.get_session(session_id)
            stream = self.router.streams.get(session.stream)
            layers = stream.layers() if stream is not None else []
            request = capped_layer_request(request, layers, ceiling)
        return self.router.select_layer(session_id, request, now)

    def get_session(self, session_id: str) -> MediaSession:
        return self.router.get_session(session_id)

    def add_listener(self, listener: StreamListener) -> None:
        self.router.add_listener(listener)

    def remove_listener(self, listener: StreamListener) -> None:
        self.router.remove_listener(listener)

    # admission, load, stats ------------------------------------------------------------

    def _admit(
        self, stream_name: str, create: Callable[[], tuple[Any, str]], now: float
    ) -> tuple[Any, str]:
        stream = self.router.streams.get(stream_name)
        if stream is None or not stream.live:
            return create()  # the router answers 409 (WHEP §4.2.8) before any 503
        try:
            admission = self.ledger.reserve(stream_name, count_refusal=False)
        except ServiceUnavailable:
            # Sessions that ended without a DELETE may still be on the books: settle once.
            self.tick(None)
            admission = self.ledger.reserve(stream_name)
        session, answer = create()
        self.ledger.commit(session.id, stream_name, admission)
        if admission.layer > 0:
            self._cap_layer(session.id, stream, admission.layer, now)
        return session, answer

    def _cap_layer(self, session_id: str, stream: Any, from_top: int, now: float) -> None:
        """Admitted below the top layer (``admit_lower_layer``): the viewer may not climb
        above what it was admitted at, or the budget it was admitted under would not hold.
        The ledger counts layers from the top, the router from the bottom."""
        layers = stream.layers()
        if len(layers) < 2:
            return
        ceiling = max(0, len(layers) - 1 - from_top)
        try:
            self.router.select_layer(session_id, LayerRequest(max_spatial_layer=ceiling), now)
        except PeerError:
            return  # an audio-only viewer: nothing to cap
        # Kept, not just applied once: every later layer request is held under it.
        self.layer_ceilings[session_id] = ceiling
        self.lower_layer_admissions += 1

    def tick(self, now: float | None) -> None:
        """Once a second: settle ended sessions, observe setup latency, measure streams."""
        for session_id, _, _ in self.monitor.sample():
            self.layer_ceilings.pop(session_id, None)
        # A worker whose socket has queued media for a while takes no new viewers.
        self.ledger.set_behind(
            0, self.monitor.receive_delay.sustained(RECEIVE_DELAY_WARNING) is not None
        )
        self.ledger.retain(
            s.id for s in self.router.sessions.values() if s.kind is SessionKind.VIEWER
        )
        if now is None:
            return
        for name, stream in self.router.streams.items():
            counters = [(k, t.kind, t.packets, t.octets) for k, t in stream_tracks(stream)]
            layers = stream_layers(self._meters, name, counters, now)
            if layers:
                self.ledger.set_stream_layers(name, layers)

    def begin_drain(self) -> None:
        self.ledger.draining = True

    def stats(self) -> ServerStats:
        return _server_stats(self.ledger, [self.monitor.stats()], restarts=0)

    async def close(self) -> None:
        return None


def _server_stats(
    ledger: CapacityLedger, workers: list[WorkerStats], *, restarts: int
) -> ServerStats:
    return ServerStats(
        workers=workers,
        loads=[ledger.load(worker) for worker in ledger.workers],
        egress_bit_budget=ledger.policy.egress_bit_budget,
        refusals=dict(ledger.refusals),
        admissions=dict(ledger.admissions),
        worker_restarts=restarts,
        draining=ledger.draining,
    )


# ====================================================================== worker processes


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """Everything a worker process starts from (pickled once at spawn)."""

    index: int
    config: MediaConfig
    key_pem: bytes
    cert_pem: bytes
    relay_dir: str
    workers: int
    stats_interval: float = 1.0
    log_level: str = "info"


def certificate_pem(certificate: DtlsCertificate) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization

    key = certificate.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, certificate.certificate.public_bytes(serialization.Encoding.PEM)


def _certificate_from_pem(key_pem: bytes, cert_pem: bytes) -> DtlsCertificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem, password=None)
    return DtlsCertificate(
        private_key=key,  # type: ignore[arg-type]
        certificate=x509.load_pem_x509_certificate(cert_pem),
    )


def worker_process_main(spec: WorkerSpec, control: socket.socket) -> None:
    """Entry point of a worker process (multiprocessing spawn target)."""
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker{spec.index} %(name)s: %(message)s",
    )
    # Ctrl-C reaches the whole process group; the main process decides how workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import uvloop

    uvloop.run(_run_worker(spec, control))


async def _run_worker(spec: WorkerSpec, control: socket.socket) -> None:
    from whepfan.transport import MediaWorker

    certificate = _certificate_from_pem(spec.key_pem, spec.cert_pem)
    media = MediaWorker(config=spec.config, certificate=certificate)
    node = WorkerNode(spec=spec, media=media, control=control)
    await media.start()
    await node.run()


class WorkerNode:
    """The worker process around its MediaWorker: control channel, relay socket, stats."""

    def __init__(self, *, spec: WorkerSpec, media: Any, control: socket.socket) -> None:
        self.spec = spec
        self.media = media
        self.control = control
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self.relay = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = relay_path(spec.relay_dir, spec.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.relay.bind(path)
        self.relay.setblocking(False)
        # Bursts wait on the sender's side (RelayPeer): an AF_UNIX datagram queue is
        # bounded by net.unix.max_dgram_qlen datagrams, whatever SO_RCVBUF says.
        self._track_names: dict[int, tuple[str, str]] = {}
        # The MediaWorker built a plain Router; this worker's is the relaying one, on the
        # same fanout (wrapped), socket, candidates and timer.
        plain: Router = media.router
        self.router = RelayRouter(
            forward_keyframe_request=self._send_keyframe_request,
            config=plain.config,
            certificate=plain.certificate,
            fanout=cast(_fastpath.Fanout, RelayingFanout(media.fanout, self._relay_out)),
            send=media._sendto,
            # Replies leave from the address the peer reached (transport.py docstring).
            send_from=media._sendto_from,
            default_source=media.default_source if media.learns_local_address else None,
            candidates=plain.candidates,
            wake=media.arm_timer,
        )
        self._peers: dict[int, RelayPeer] = {
            index: RelayPeer(
                path=relay_path(spec.relay_dir, index),
                loop=self._loop,
                counters=self.router.counters,
            )
            for index in range(spec.workers)
            if index != spec.index
        }
        media.router = self.router
        # Viewers admitted on a lower layer (the main process's "cap_layer"): session ->
        # highest layer index allowed, held here because only this worker knows the rids.
        self.layer_ceilings: dict[str, int] = {}
        self.monitor = RouterMonitor(self.router, worker=spec.index)
        self.monitor.receive_delay = media.receive_delay
        self.router.add_listener(self._on_stream_event)
        self._sweep_pending = False

    async def run(self) -> None:
        self.control.setblocking(False)
        self._loop.add_reader(self.control.fileno(), self._on_control)
        self._loop.add_reader(self.relay.fileno(), self._on_relay)
        self._send({"event": "ready", "port": self.media.port, "pid": os.getpid()})
        stats_task = asyncio.ensure_future(self._stats_loop())
        lag_task = asyncio.ensure_future(
            warn_when_behind(self.monitor.receive_delay, worker=self.spec.index)
        )
        try:
            await self._done.wait()
        finally:
            stats_task.cancel()
            lag_task.cancel()
            self._loop.remove_reader(self.control.fileno())
            self._loop.remove_reader(self.relay.fileno())
            self.media.close()
            self.relay.close()
            for peer in self._peers.values():
                peer.close()

    # control channel ---------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message)
        try:
            self.control.send(data)
        except BlockingIOError:
            # The main process reads continuously; a full buffer means it is stuck.
            self.control.setblocking(True)
            try:
                self.control.send(data)
            finally:
                self.control.setblocking(False)
        except OSError:
            self._done.set()  # the main process is gone

    def _on_control(self) -> None:
        while True:
            try:
                data = self.control.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._done.set()  # main process gone: nobody to serve
                return
            try:
                message = orjson.loads(data)
            except orjson.JSONDecodeError:
                log.error("unreadable control message dropped")
                continue
            self._handle(message)
            self.media.arm_timer()

    def _handle(self, message: dict[str, Any]) -> None:
        op, request_id, args = message.get("op"), message.get("id"), message.get("args", {})
        now = self._loop.time()
        try:
            result = self._dispatch(str(op), args, now)
        except WhepfanError as exc:
            reply: dict[str, Any] = {
                "id": request_id,
                "error": {
                    "class": type(exc).__name__,
                    "detail": exc.detail,
                    "retry_after": exc.retry_after,
                },
            }
        except Exception:
            log.exception("control operation %r failed", op)
            reply = {"id": request_id, "error": {"class": "internal", "detail": "worker bug"}}
        else:
            reply = {"id": request_id, "result": result}
        if request_id is not None:
            self._send(reply)

    def _dispatch(self, op: str, args: dict[str, Any], now: float) -> Any:
        router = self.router
        if op == "publish":
            publisher, answer = router.publish(args["stream"], args["offer"], now)
            return {
                "session": _session_json(publisher),
                "answer": answer,
                "canonical_offer": router.canonical_offers.get(args["stream"], args["offer"]),
            }
        if op == "view":
            viewer, answer = router.view(args["stream"], args["offer"], now)
            return {"session": _session_json(viewer), "answer": answer}
        if op == "counter_offer":
            viewer, offer = router.counter_offer(args["stream"], now)
            return {"session": _session_json(viewer), "answer": offer}
        if op == "accept_counter_answer":
            router.accept_counter_answer(args["session"], args["answer"], now)
            return {"session": _session_json(router.get_session(args["session"]))}
        if op == "trickle":
            router.trickle(args["session"], _fragment_from_json(args["fragment"]), now)
            return {"session": _session_json(router.get_session(args["session"]))}
        if op == "restart_ice":
            answer = router.restart_ice(args["session"], _fragment_from_json(args["fragment"]), now)
            return {"session": _session_json(router.get_session(args["session"])), "answer": answer}
        if op == "end_session":
            return {"ended": router.end_session(args["session"], now, args["reason"])}
        if op == "select_layer":
            request = _layer_request_from_json(args["request"])
            ceiling = self.layer_ceilings.get(args["session"])
            if ceiling is not None:
                request = capped_layer_request(request, self._layers_of(args["session"]), ceiling)
            return router.select_layer(args["session"], request, now)
        if op == "cap_layer":
            ceiling = int(args["ceiling"])
            status = router.select_layer(
                args["session"], LayerRequest(max_spatial_layer=ceiling), now
            )
            self.layer_ceilings[args["session"]] = ceiling
            return status
        if op == "layer_status":
            return router.layer_status(args["session"], now)
        if op == "attach_relay":
            router.attach_relay(args["stream"], args["offer"], args["origin"], now)
            return None
        if op == "detach_relay":
            router.detach_relay(args["stream"], now)
            return None
        if op == "shutdown":
            self._done.set()
            return None
        raise errors.PeerError(f"unknown control operation {op!r}")

    def _layers_of(self, session_id: str) -> list[Any]:
        stream = self.router.streams.get(self.router.get_session(session_id).stream)
        return stream.layers() if stream is not None else []

    # stats and ended sessions --------------------------------------------------------------

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.spec.stats_interval)
            self._sweep()
            self._send(
                {
                    "event": "stats",
                    "stats": self.monitor.stats().to_json(),
                    "streams": self.router.origin_stream_counters(),
                    "status": self.router.stream_status(self._loop.time()),
                }
            )

    def _sweep(self) -> None:
        self._sweep_pending = False
        ended = self.monitor.sample()
        for session_id, _, _ in ended:
            self.layer_ceilings.pop(session_id, None)
        if ended:
            self._send({"event": "ended", "sessions": ended})

    def _on_stream_event(self, event: StreamEvent) -> None:
        if (
            event.type in ("active", "inactive", "layers")
            and event.stream not in self.router.relayed
        ):
            # "layers" (EXT §4.3.3) only from the origin: it measures the publisher's
            # encodings; relay copies measure the same packets again.
            self._send(
                {"event": "stream", "stream": event.stream, "type": event.type, "data": event.data}
            )
        # Every viewer leave emits viewercount: settle ended sessions soon, once per batch.
        if not self._sweep_pending:
            self._sweep_pending = True
            self._loop.call_soon(self._sweep)

    # relay ----------------------------------------------------------------------------------

    def _relay_out(self, track: int, kind: RelayKind, body: bytes, keyframe: bool) -> None:
        if not self._peers:
            return
        names = self._track_names.get(track)
        if names is None or names[0] not in self.router.streams:
            self._track_names = {
                t.fanout_id: (name, key)
                for name, stream in self.router.streams.items()
                for key, t in stream_tracks(stream)
            }
            names = self._track_names.get(track)
            if names is None:
                return
        if names[0] in self.router.relayed:
            return
        frame = bytes(
            RelayFrame(kind=kind, stream=names[0], track=names[1], keyframe=keyframe, body=body)
        )
        for peer in self._peers.values():
            peer.send(frame)

    def _send_keyframe_request(self, origin: int, stream: str) -> None:
        peer = self._peers.get(origin)
        if peer is not None:
            peer.send(bytes(RelayFrame(kind=RelayKind.KEYFRAME_REQUEST, stream=stream)))

    def _on_relay(self) -> None:
        now = self._loop.time()
        for _ in range(256):  # bounded, so control messages interleave under load
            try:
                data = self.relay.recv(65536)
            except BlockingIOError:
                break
            try:
                frame = RelayFrame.parse(data)
            except ParseError:
                self.router.counters["drop_relay_malformed"] += 1
                continue
            if frame.kind is RelayKind.KEYFRAME_REQUEST:
                self.router.relayed_keyframe_request(frame.stream, now)
            else:
                self.router.relayed_packet(frame, now)
        self.media.arm_timer()


def _session_json(session: MediaSession) -> dict[str, Any]:
    return {
        "id": session.id,
        "kind": session.kind.value,
        "stream": session.stream,
        "etag": session.etag,
        "remote_ufrag": session.ice.remote_ufrag,
        "closed": session.state is SessionState.CLOSED,
    }


def _fragment_from_json(data: dict[str, Any]) -> sdp.SdpFragment:
    def candidates(items: list[dict[str, Any]]) -> list[sdp.Candidate]:
        return [
            sdp.Candidate(**{**c, "extensions": tuple(tuple(e) for e in c["extensions"])})
            for c in items
        ]

    media = [
        sdp.FragmentMedia(**{**m, "candidates": candidates(m["candidates"])}) for m in data["media"]
    ]
    return sdp.SdpFragment(**{**data, "candidates": candidates(data["candidates"]), "media": media})


def _layer_request_json(request: LayerRequest) -> dict[str, Any]:
    return {item.name: getattr(request, item.name) for item in fields(LayerRequest)}


def _layer_request_from_json(data: Any) -> LayerRequest:
    if not isinstance(data, dict):
        raise ParseError("a layer request is a JSON object")
    return LayerRequest(**{item.name: data.get(item.name) for item in fields(LayerRequest)})


# ====================================================================== main side


@dataclass(slots=True)
class ProxyIce:
    remote_ufrag: str | None


# eq=False keeps identity hashing and weakref_slot lets the HTTP layer key weak maps by
# session, as it does for the router's own sessions.
@dataclass(slots=True, kw_only=True, eq=False, weakref_slot=True)
class ProxySession:
    """The main process's record of a session living on a worker."""

    id: str
    kind: SessionKind
    stream: str
    etag: str
    ice: ProxyIce
    worker: int
    # Publishers only, for the status API: from the origin worker's stats messages.
    state: SessionState = SessionState.NEW
    connected_at: float | None = None

    def update(self, data: dict[str, Any]) -> None:
        self.etag = data["etag"]
        self.ice.remote_ufrag = data["remote_ufrag"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyTrack:
    """One ingested track as the origin worker last reported it (http/status.py's
    TrackStatusView). ``fanout_id`` numbers the stream's tracks in the origin's order:
    the status API only needs it to tell one track's counters from another's."""

    fanout_id: int
    key: str
    kind: str
    codec_name: str
    clock_rate: int
    packets: int
    octets: int


@dataclass(slots=True, kw_only=True)
class ProxyStream:
    name: str
    origin: int | None = None
    publisher: ProxySession | None = None
    canonical_offer: str | None = None
    active: bool = False
    viewers: dict[str, ProxySession] = field(default_factory=dict)
    # From the workers' stats messages: the origin's tracks, and per worker the viewers
    # receiving media and the subscribers per track key.
    reported_tracks: dict[str, ProxyTrack] = field(default_factory=dict)
    reported_viewers: dict[int, tuple[int, dict[str, int]]] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.publisher is not None

    @property
    def tracks(self) -> Mapping[str, ProxyTrack]:
        return self.reported_tracks if self.live else {}

    def subscriptions(self) -> tuple[int, Mapping[int, int]]:
        """Viewers receiving media on every worker, and subscribers per track
        (``fanout_id``): the workers' counts added up (http/status.py)."""
        connected = 0
        subscribers: dict[int, int] = {}
        for count, by_key in self.reported_viewers.values():
            connected += count
            for key, number in by_key.items():
                track = self.reported_tracks.get(key)
                if track is not None:
                    subscribers[track.fanout_id] = subscribers.get(track.fanout_id, 0) + number
        return connected, subscribers

    def report(self, worker: int, entry: dict[str, Any], now: float) -> None:
        """One worker's ``stream_status`` entry for this stream."""
        self.reported_viewers[worker] = (
            int(entry.get("connected", 0)),
            {str(k): int(v) for k, v in entry.get("subscribers", {}).items()},
        )
        if worker != self.origin:
            return
        publisher = entry.get("publisher")
        if publisher is not None and self.publisher is not None:
            self.publisher.state = SessionState(publisher["state"])
            connected_for = publisher.get("connected_for")
            self.publisher.connected_at = (
                None if connected_for is None else now - float(connected_for)
            )
        rows = entry.get("tracks")
        if rows is not None:
            self.reported_tracks = {
                str(key): ProxyTrack(
                    fanout_id=index,
                    key=str(key),
                    kind=str(kind),
                    codec_name=str(codec),
                    clock_rate=int(clock_rate),
                    packets=int(packets),
                    octets=int(octets),
                )
                for index, (key, kind, codec, clock_rate, packets, octets) in enumerate(rows)
            }


class PoolFanoutStats:
    """The workers' Fanout counters added up (http/status.py's FanoutStatsView). A
    replaced worker starts its counters from zero: totals only ever grow, by each
    worker's increase since its previous report, so rates over them stay right."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self._last: dict[int, tuple[int, dict[str, int]]] = {}  # worker -> (pid, counters)

    def update(self, worker: int, pid: int, counters: Mapping[str, int]) -> None:
        last_pid, last = self._last.get(worker, (pid, {}))
        if last_pid != pid:
            last = {}
        for name, value in counters.items():
            before = last.get(name, 0)
            increase = value - before if value >= before else value
            self.totals[name] = self.totals.get(name, 0) + increase
        self._last[worker] = (pid, dict(counters))

    def stats(self) -> dict[str, int]:
        return {"bytes_sent": 0, **self.totals}


class WorkerGone(Exception):
    """The worker's control channel closed (the process exited)."""


class WorkerHandle:
    """Main side of one worker process: its control socket and sentinel."""

    def __init__(self, *, index: int, process: Any, control: socket.socket) -> None:
        self.index = index
        self.process = process
        self.control = control
        self.control.setblocking(False)
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.stats: WorkerStats | None = None
        self.alive = True
        self._next_id = 0

    def send(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message)
        try:
            self.control.send(data)
        except BlockingIOError:
            _, writable, _ = select.select([], [self.control], [], 5.0)
            if not writable:
                raise ServiceUnavailable("media worker not reading", retry_after=5) from None
            self.control.send(data)
        except OSError:
            raise WorkerGone from None

    def receive(self) -> dict[str, Any] | None:
        """One pending message, or None when there is none right now."""
        try:
            data = self.control.recv(1 << 20)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            raise WorkerGone
        return cast(dict[str, Any], orjson.loads(data))

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id


class WorkerPool:
    """``--workers N``: the SessionRouter of the main process (see the module docstring)."""

    def __init__(
        self,
        *,
        workers: int,
        config: MediaConfig,
        certificate: DtlsCertificate,
        ledger: CapacityLedger,
        request_timeout: float = 5.0,
        stats_interval: float = 1.0,
        log_level: str = "info",
    ) -> None:
        if workers < 2:
            raise ValueError("a worker pool has at least two workers")
        self.size = workers
        self.config = config
        self.ledger = ledger
        self.request_timeout = request_timeout
        self.stats_interval = stats_interval
        self.log_level = log_level
        self.key_pem, self.cert_pem = certificate_pem(certificate)
        self.relay_dir = tempfile.mkdtemp(prefix="whepfan-")
        self.handles: dict[int, WorkerHandle] = {}
        self.ports: dict[int, int] = {}
        self.sessions: dict[str, ProxySession] = {}
        self._streams: dict[str, ProxyStream] = {}
        self._listeners = StreamListeners()
        self._meters: dict[tuple[str, str], RateMeter] = {}
        self._fanout_stats = PoolFanoutStats()
        self.on_sessions_lost: SessionLostHook | None = None
        self.restarts = 0
        self.lower_layer_admissions = 0
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._context = multiprocessing.get_context("spawn")
        self._restart_tasks: set[asyncio.Task[None]] = set()

    # lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn(index) for index in range(self.size)))

    async def _spawn(self, index: int) -> None:
        port = self.config.udp_port + index if self.config.udp_port else 0
        spec = WorkerSpec(
            index=index,
            config=replace(self.config, udp_port=port),
            key_pem=self.key_pem,
            cert_pem=self.cert_pem,
            relay_dir=self.relay_dir,
            workers=self.size,
            stats_interval=self.stats_interval,
            log_level=self.log_level,
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        process = self._context.Process(
            target=worker_process_main,
            args=(spec, theirs),
            name=f"whepfan-worker-{index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        handle = WorkerHandle(index=index, process=process, control=ours)
        self.handles[index] = handle
        self._loop.add_reader(ours.fileno(), self._on_readable, handle)
        self._loop.add_reader(process.sentinel, self._on_exit, handle)
        try:
            ready = await asyncio.wait_for(asyncio.shield(handle.ready), timeout=60.0)
        except (TimeoutError, WorkerGone):
            log.error("worker %d did not start", index)
            process.kill()
            raise
        self.ports[index] = int(ready["port"])
        self.ledger.add_worker(index)
        # Streams published elsewhere get a relay copy on the (new) worker.
        for stream in self._streams.values():
            if stream.live and stream.origin != index and stream.canonical_offer is not None:
                self._notify(
                    handle,
                    "attach_relay",
                    {
                        "stream": stream.name,
                        "offer": stream.canonical_offer,
                        "origin": stream.origin,
                    },
                )
        log.info("worker %d (pid %d) on udp port %d", index, process.pid, self.ports[index])

    async def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        for task in self._restart_tasks:
            task.cancel()
        for handle in self.handles.values():
            if handle.alive:
                with contextlib.suppress(WorkerGone, ServiceUnavailable):
                    handle.send({"op": "shutdown", "args": {}})
        deadline = self._loop.time() + timeout
        for handle in self.handles.values():
            while handle.process.is_alive() and self._loop.time() < deadline:
                await asyncio.sleep(0.02)
            if handle.process.is_alive():
                handle.process.kill()
            self._forget(handle)
        shutil.rmtree(self.relay_dir, ignore_errors=True)

    def _forget(self, handle: WorkerHandle) -> None:
        handle.alive = False
        for fd in (handle.control.fileno(), handle.process.sentinel):
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
        handle.control.close()

    def kill_worker(self, index: int) -> int:
        """Kill worker ``index`` (tests and operators); returns its pid."""
        process = self.handles[index].process
        process.kill()
        return int(process.pid)

    def _on_exit(self, handle: WorkerHandle) -> None:
        if not handle.alive:
            return
        self._forget(handle)
        if self._closing:
            return
        if not handle.ready.done() or handle.ready.exception() is not None:
            # It died starting: whoever awaits it hears so (no respawn loop on a bug).
            if not handle.ready.done():
                handle.ready.set_exception(WorkerGone())
            return
        handle.process.join(0)
        log.error(
            "worker %d (pid %d) exited with %s",
            handle.index,
            handle.process.pid,
            handle.process.exitcode,
        )
        self._worker_lost(handle.index)
        self.restarts += 1
        task = asyncio.ensure_future(self._respawn(handle.index))
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def _respawn(self, index: int) -> None:
        try:
            await self._spawn(index)
        except Exception:
            log.exception("worker %d could not be replaced", index)

    def _worker_lost(self, index: int) -> None:
        self.ledger.remove_worker(index)
        lost = [sid for sid, session in self.sessions.items() if session.worker == index]
        if lost and self.on_sessions_lost is not None:
            # Before unregistering: the event hub must hear of them while they are known.
            self.on_sessions_lost(lost)
        for session_id in lost:
            self._unregister(session_id)
        for stream in list(self._streams.values()):
            stream.reported_viewers.pop(index, None)
            if stream.origin == index:
                stream.origin = None
                stream.canonical_offer = None
                stream.reported_tracks = {}

    # channel ------------------------------------------------------------------------------

    def _on_readable(self, handle: WorkerHandle) -> None:
        while handle.alive:
            try:
                message = handle.receive()
            except WorkerGone:
                self._on_exit(handle)
                return
            if message is None:
                return
            self._on_message(handle, message)

    def _on_message(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            if not handle.ready.done():
                handle.ready.set_result(message)
        elif event == "stats":
            self._on_stats(handle, message)
        elif event == "ended":
            for session_id, _, _ in message.get("sessions", []):
                session = self.sessions.get(session_id)
                if session is not None and session.worker == handle.index:
                    self._unregister(session_id)
        elif event == "stream":
            stream = self._streams.get(message["stream"])
            if stream is not None and stream.origin == handle.index:
                type_ = str(message["type"])
                if type_ in ("active", "inactive"):
                    stream.active = type_ == "active"
                self._emit(stream.name, type_, message.get("data") or {})
        # Replies outside a request (one that timed out) are dropped here.

    def _on_stats(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        try:
            stats = WorkerStats.from_json(message["stats"])
        except (KeyError, ValueError):
            log.error("unreadable stats from worker %d", handle.index)
            return
        handle.stats = stats
        self.ledger.set_behind(handle.index, stats.behind)
        now = self._loop.time()
        self._fanout_stats.update(handle.index, stats.pid, stats.fanout)
        reported = message.get("status", {})
        for name, proxy in self._streams.items():
            entry = reported.get(name)
            if entry is not None:
                proxy.report(handle.index, entry, now)
            else:
                proxy.reported_viewers.pop(handle.index, None)  # none left there
        for name, counters in message.get("streams", {}).items():
            stream = self._streams.get(name)
            if stream is None or stream.origin != handle.index:
                continue
            rows = [(str(k), str(kind), int(p), int(o)) for k, kind, p, o in counters]
            layers = stream_layers(self._meters, name, rows, now)
            if layers:
                self.ledger.set_stream_layers(name, layers)

    def _request(self, index: int, op: str, args: dict[str, Any]) -> Any:
        handle = self.handles.get(index)
        if handle is None or not handle.alive:
            raise ServiceUnavailable("that media worker is restarting", retry_after=2)
        request_id = handle.new_id()
        try:
            handle.send({"op": op, "id": request_id, "args": args})
            deadline = self._loop.time() + self.request_timeout
            while True:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    raise ServiceUnavailable("media worker did not answer", retry_after=5)
                readable, _, _ = select.select([handle.control], [], [], remaining)
                if not readable:
                    continue
                message = handle.receive()
                while message is not None:
                    if message.get("id") == request_id:
                        return _result(message)
                    self._on_message(handle, message)
                    message = handle.receive()
        except WorkerGone:
            self._on_exit(handle)
            raise ServiceUnavailable("the media worker stopped", retry_after=2) from None

    def _notify(self, handle: WorkerHandle, op: str, args: dict[str, Any]) -> None:
        try:
            handle.send({"op": op, "args": args})
        except (WorkerGone, ServiceUnavailable):
            log.warning("worker %d missed %s", handle.index, op)

    def _notify_others(self, origin: int | None, op: str, args: dict[str, Any]) -> None:
        for index, handle in self.handles.items():
            if index != origin and handle.alive:
                self._notify(handle, op, args)

    # registry ------------------------------------------------------------------------------

    def _register(self, worker: int, data: dict[str, Any]) -> ProxySession:
        session = ProxySession(
            id=data["id"],
            kind=SessionKind(data["kind"]),
            stream=data["stream"],
            etag=data["etag"],
            ice=ProxyIce(data["remote_ufrag"]),
            worker=worker,
        )
        self.sessions[session.id] = session
        stream = self._streams.setdefault(session.stream, ProxyStream(name=session.stream))
        if session.kind is SessionKind.VIEWER:
            stream.viewers[session.id] = session
            self._emit_viewer_count(stream)
        return session

    def _unregister(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        self.ledger.release(session_id)
        stream = self._streams.get(session.stream)
        if stream is None:
            return
        if session.kind is SessionKind.VIEWER:
            if stream.viewers.pop(session_id, None) is not None:
                self._emit_viewer_count(stream)
        elif stream.publisher is session:
            stream.publisher = None
            if stream.active:
                stream.active = False
                self._emit(stream.name, "inactive", {})
            self._notify_others(stream.origin, "detach_relay", {"stream": stream.name})
        if not stream.live and not stream.viewers:
            del self._streams[stream.name]

    # SessionRouter ----------------------------------------------------------------------------

    @property
    def streams(self) -> Mapping[str, ProxyStream]:
        return self._streams

    @property
    def viewer_count(self) -> int:
        return sum(len(stream.viewers) for stream in self._streams.values())

    def publish(self, stream_name: str, offer_text: str, now: float) -> tuple[ProxySession, str]:
        if self.ledger.draining:
            self.ledger.reserve(stream_name)  # raises: counted as a draining refusal
        stream = self._streams.get(stream_name)
        origin = stream.origin if stream is not None else None
        if origin is None or not self.handles[origin].alive:
            # A returning publisher goes back to its previous worker (viewers there see one
            # continuous sequence line); a new one to the least-loaded worker.
            origin = min(
                (i for i, h in self.handles.items() if h.alive),
                key=lambda i: (self.ledger.load(i).packets_per_second, i),
                default=None,
            )
            if origin is None:
                raise ServiceUnavailable("no media worker is running", retry_after=2)
        result = self._request(origin, "publish", {"stream": stream_name, "offer": offer_text})
        session = self._register(origin, result["session"])
        stream = self._streams[stream_name]
        stream.publisher, stream.origin = session, origin
        stream.canonical_offer = result["canonical_offer"]
        self._notify_others(
            origin,
            "attach_relay",
            {"stream": stream_name, "offer": stream.canonical_offer, "origin": origin},
        )
        return session, str(result["answer"])

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[ProxySession, str]:
        return self._admit(stream_name, "view", {"stream": stream_name, "offer": offer_text}, now)

    def counter_offer(self, stream_name: str, now: float) -> tuple[ProxySession, str]:
        return self._admit(stream_name, "counter_offer", {"stream": stream_name}, now)

    def _admit(
        self, stream_name: str, op: str, args: dict[str, Any], now: float
    ) -> tuple[ProxySession, str]:
        stream = self._streams.get(stream_name)
        if stream is None or not stream.live:
            # WHEP draft-03 §4.2.8: 409 + Retry-After when the stream is not live.
            raise errors.Conflict(f"stream {stream_name!r} is not live", retry_after=5)
        if self.viewer_count >= self.config.max_viewers:
            raise ServiceUnavailable("no viewer capacity left on this server", retry_after=10)
        admission: Admission = self.ledger.reserve(stream_name)
        result = self._request(admission.worker, op, args)
        session = self._register(admission.worker, result["session"])
        self.ledger.commit(session.id, stream_name, admission)
        if admission.layer > 0:
            # As in-process (InProcessWorkers._cap_layer): no climbing above the admitted cost.
            video_layers = sum(1 for t in stream.tracks.values() if t.kind == "video")
            if video_layers > 1:
                ceiling = max(0, video_layers - 1 - admission.layer)
                try:
                    # The worker keeps the ceiling and holds later layer requests under it.
                    self._request(
                        session.worker, "cap_layer", {"session": session.id, "ceiling": ceiling}
                    )
                    self.lower_layer_admissions += 1
                except errors.PeerError:
                    pass  # an audio-only viewer: nothing to cap
        return session, str(result["answer"])

    def accept_counter_answer(self, session_id: str, answer_text: str, now: float) -> None:
        session = self.get_session(session_id)
        result = self._session_request(
            session, "accept_counter_answer", {"session": session_id, "answer": answer_text}
        )
        session.update(result["session"])

    def trickle(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> None:
        session = self.get_session(session_id)
        result = self._session_request(
            session, "trickle", {"session": session_id, "fragment": _fragment_json(fragment)}
        )
        session.update(result["session"])

    def restart_ice(self, session_id: str, fragment: sdp.SdpFragment, now: float) -> str:
        session = self.get_session(session_id)
        result = self._session_request(
            session, "restart_ice", {"session": session_id, "fragment": _fragment_json(fragment)}
        )
        session.update(result["session"])
        return str(result["answer"])

    def end_session(self, session_id: str, now: float, reason: str = "deleted") -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        try:
            ended = self._request(
                session.worker, "end_session", {"session": session_id, "reason": reason}
            )["ended"]
        except (NotFound, ServiceUnavailable):
            ended = False
        self._unregister(session_id)
        return bool(ended)

    # layer API (EXT §5, http/layers.py) -------------------------------------------------

    def select_layer(self, session_id: str, request: LayerRequest, now: float) -> dict[str, object]:
        """The viewer's worker decides (its router holds the layers and the choice);
        its NotFound/PeerError come back as themselves, so HTTP answers as in-process."""
        session = self.get_session(session_id)
        # Not _session_request: a NotFound here may mean "receives no video" of a session
        # that lives on; one that ended is unregistered by the worker's "ended" report.
        args = {"session": session_id, "request": _layer_request_json(request)}
        return cast(dict[str, object], self._request(session.worker, "select_layer", args))

    def layer_status(self, session_id: str, now: float) -> dict[str, object]:
        session = self.get_session(session_id)
        result = self._request(session.worker, "layer_status", {"session": session_id})
        return cast(dict[str, object], result)

    @property
    def fanout(self) -> PoolFanoutStats:
        """Every worker's Fanout counters added up (the status API's egress bitrate)."""
        return self._fanout_stats

    def get_session(self, session_id: str) -> ProxySession:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound("no such session")
        return session

    def _session_request(self, session: ProxySession, op: str, args: dict[str, Any]) -> Any:
        try:
            return self._request(session.worker, op, args)
        except NotFound:
            self._unregister(session.id)  # it ended on the worker before we heard
            raise

    # events ---------------------------------------------------------------------------------

    def add_listener(self, listener: StreamListener) -> None:
        self._listeners.add(listener)

    def remove_listener(self, listener: StreamListener) -> None:
        self._listeners.remove(listener)

    def _emit(self, stream: str, type_: str, data: dict[str, object]) -> None:
        self._listeners.emit(stream, type_, data)

    def _emit_viewer_count(self, stream: ProxyStream) -> None:
        self._emit(stream.name, "viewercount", {"viewercount": len(stream.viewers)})

    # load and stats ----------------------------------------------------------------------------

    def tick(self, now: float | None) -> None:
        """Nothing to poll: workers push stats and ended sessions."""

    def begin_drain(self) -> None:
        self.ledger.draining = True

    def stats(self) -> ServerStats:
        workers = [
            handle.stats
            for handle in self.handles.values()
            if handle.alive and handle.stats is not None
        ]
        return _server_stats(self.ledger, workers, restarts=self.restarts)

    def worker_of(self, session_id: str) -> int:
        return self.get_session(session_id).worker


def _fragment_json(fragment: sdp.SdpFragment) -> Any:
    return orjson.loads(orjson.dumps(fragment))


def _result(message: dict[str, Any]) -> Any:
    error = message.get("error")
    if error is None:
        return message.get("result")
    name = error.get("class")
    cls = getattr(errors, str(name), None)
    if isinstance(cls, type) and issubclass(cls, WhepfanError):
        raise cls(str(error.get("detail", "")), retry_after=error.get("retry_after"))
    raise RuntimeError(f"media worker failed: {error.get('detail')}")
