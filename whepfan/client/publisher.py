"""``Publisher``: a WHIP client sending a synthetic live stream (``whepfan publish``, also
used by ``whepfan demo`` and the benchmarks).

One pass per frame: draw the test pattern once, encode it once per encoding (one, or
three with simulcast), packetise (RFC 7741 / RFC 6184 / RFC 7587), SRTP-protect with the
compiled core and send on one asyncio UDP socket. Encoding runs on a worker thread (PyAV
releases the GIL inside the codec) so ICE, DTLS and RTCP keep flowing on the event loop.

RTCP from the server is answered as a browser would: PLI (RFC 4585 §6.3.1) and FIR
(RFC 5104 §4.3.1) make the named encoding's next frame a keyframe; a generic NACK
(RFC 4585 §6.2.1) re-sends the packets from a short history. A Sender Report with an SDES
CNAME goes out every second per SSRC (RFC 3550 §6.1, §6.4.1) so that viewers can
synchronise audio and video.

A session can end without a word from the server: the server or the media worker that
held it died, so no DTLS close_notify comes and ICE consent would only expire 30 s
later (RFC 7675 §5.1). So the publisher also watches for silence: nothing at all from
the server (no RTCP, whose receiver reports whepfan sends every second, no STUN
response, no DTLS) for ``silence_timeout`` makes it ask the server about its session
(GET on the session URL); a 404 or 409, or no server at all, ends the session there.

``ReconnectingPublisher`` (``whepfan publish`` without ``--no-reconnect``) publishes again
whenever a session ends that way or fails (ICE, DTLS, a refused or unreachable POST),
after an exponential backoff with jitter (``ReconnectPolicy``), honouring the server's
Retry-After; viewers of a whepfan server resume on the same sessions. Before its first
session it retries only what the server asked it to retry later (409 while a previous
publisher is still live, 429, 503, ...): a server it cannot reach or connect to at all
is a mistake to report at once, with what was tried, not to retry in silence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from whepfan import _fastpath
from whepfan.client.packetize import (
    H264Packetizer,
    RtpSender,
    Vp8Packetizer,
)
from whepfan.client.peer import (
    EXTENSION_ID_MID,
    EXTENSION_ID_RID,
    H264_PAYLOAD_TYPE,
    OPUS_PAYLOAD_TYPE,
    SIMULCAST_RIDS,
    VP8_PAYLOAD_TYPE,
    Address,
    ClientTransport,
    LocalParameters,
    PublishedTrack,
    TransportConnected,
    TransportFailed,
    host_candidate,
    new_ice_credentials,
    publisher_offer,
)
from whepfan.client.signalling import delete_session, local_address_towards, post_offer
from whepfan.client.source import (
    AUDIO_CLOCK_RATE,
    AUDIO_FRAME_SAMPLES,
    VIDEO_CLOCK_RATE,
    AudioEncoder,
    TestPattern,
    Tone,
    VideoEncoder,
)
from whepfan.errors import ParseError
from whepfan.protocol import rtcp
from whepfan.protocol.demux import is_rtcp
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.protocol.negotiation import remote_transport
from whepfan.protocol.sdp import SessionDescription

log = logging.getLogger("whepfan.publish")

SENDER_REPORT_INTERVAL = 1.0  # seconds; RFC 3550 §6.2 allows this for a lone sender
EARLY_RTCP_LIMIT = 16  # SRTCP packets kept while the DTLS handshake finishes
HISTORY_PACKETS = 512  # per encoding: ~1-2 s of video for NACK answers
# POST answers worth trying again: timeouts, conflicts (the stream's previous publisher
# is still live, RFC 9725 §4.2), rate limits and server trouble. Anything else (400, 401,
# 403, 404, 415, 422, ...) will not change by waiting.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Answers to the session probe that say the session is gone (RFC 9725 §4.3: the resource
# is the session; whepfan answers 404 once it ended).
SESSION_GONE_STATUSES = frozenset({404, 409})


class PublishError(Exception):
    """The publisher could not start or lost its session; ``status`` is the HTTP status
    of the failed POST, if that is what failed, and ``retry_after`` its Retry-After in
    seconds (RFC 9110 §10.2.3, the delay-seconds form), if it gave one."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth publishing again later: no HTTP answer at all (unreachable, ICE or DTLS
        failed), or one of ``RETRYABLE_STATUSES``."""
        return self.status is None or self.status in RETRYABLE_STATUSES


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconnectPolicy:
    """Exponential backoff with jitter between publish attempts: ``initial`` seconds
    before the first retry, times ``factor`` per failed attempt up to ``maximum``, each
    spread over +/- ``jitter`` of itself so that many publishers cut off at once (a
    server restart) do not come back in lockstep."""

    initial: float = 0.5
    maximum: float = 8.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError("need 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")

    def delay(self, attempt: int, uniform: float, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt`` + 1 (``attempt`` >= 1 failures so
        far); ``uniform`` is a random number in [0, 1). A server's Retry-After, when
        longer, wins (capped at ``maximum``: a publisher should come back soon)."""
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        wait = base * (1 + self.jitter * (2 * uniform - 1))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.maximum))
        return wait


def _retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After in delay-seconds (what whepfan sends); an HTTP-date is ignored."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


@dataclass(frozen=True, slots=True, kw_only=True)
class PublisherOptions:
    url: str  # the WHIP endpoint
    token: str | None = None
    codec: str = "vp8"  # "vp8" or "h264"
    simulcast: bool = False
    bitrate: int = 1_000_000  # bits/s of the (top) video encoding
    width: int = 640
    height: int = 360
    fps: int = 30
    audio: bool = True
    video: bool = True
    keyframe_interval: float = 10.0  # seconds between unrequested keyframes
    connect_timeout: float = 10.0
    # Nothing from the server for this long: ask it whether the session still exists.
    silence_timeout: float = 3.0

    def __post_init__(self) -> None:
        if self.codec not in ("vp8", "h264"):
            raise ValueError(f"unknown codec {self.codec!r} (vp8 or h264)")
        if not self.audio and not self.video:
            raise ValueError("nothing to publish: audio and video are both off")
        if self.fps < 1 or VIDEO_CLOCK_RATE % self.fps:
            raise ValueError("fps must divide 90000 (e.g. 15, 24, 25, 30, 60)")
        divisor = 8 if self.simulcast else 2
        if self.width % divisor or self.height % divisor or min(self.width, self.height) < 32:
            raise ValueError(f"width and height must be multiples of {divisor}, at least 32")
        if self.bitrate < 10_000:
            raise ValueError("bitrate below 10 kbit/s")
        if not self.silence_timeout > 0:
            raise ValueError("the silence timeout must be positive")


class PacketHistory:
    """The last ``capacity`` plain RTP packets of one SSRC by sequence number (NACK cache)."""

    def __init__(self, capacity: int = HISTORY_PACKETS) -> None:
        self.capacity = capacity
        self._packets: OrderedDict[int, bytes] = OrderedDict()

    def add(self, sequence_number: int, packet: bytes) -> None:
        self._packets[sequence_number] = packet
        self._packets.move_to_end(sequence_number)
        while len(self._packets) > self.capacity:
            self._packets.popitem(last=False)

    def get(self, sequence_number: int) -> bytes | None:
        return self._packets.get(sequence_number)


@dataclass(eq=False)
class VideoLayer:
    """One video encoding (the only one, or a simulcast layer named by ``rid``)."""

    rid: str | None
    width: int
    height: int
    encoder: VideoEncoder
    packetizer: Vp8Packetizer | H264Packetizer
    sender: RtpSender
    history: PacketHistory = field(default_factory=PacketHistory)
    keyframe_requested: bool = True  # the first frame is a keyframe anyway


@dataclass
class PublisherStats:
    frames_encoded: int = 0
    frames_skipped: int = 0  # late frames dropped to stay live
    keyframes_sent: int = 0
    keyframe_requests: int = 0  # PLI + FIR received
    nacked_packets: int = 0
    retransmitted_packets: int = 0
    audio_packets: int = 0
    video_packets: int = 0
    bytes_sent: int = 0
    rtcp_received: int = 0
    rtcp_errors: int = 0
    remb_bitrate: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.publisher._datagram_received(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("socket error: %s", exc)


class Publisher:
    """A WHIP publisher of the synthetic source. ``async with Publisher(options) as p``
    starts it (POST, ICE, DTLS, media); leaving the block ends the session (DELETE)."""

    def __init__(
        self, options: PublisherOptions, *, certificate: DtlsCertificate | None = None
    ) -> None:
        self.options = options
        self.certificate = certificate or DtlsCertificate.generate()
        self.stats = PublisherStats()
        self.location: str | None = None
        self.failure: str | None = None
        self.cname = secrets.token_hex(8)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: asyncio.DatagramTransport | None = None
        self._transport: ClientTransport | None = None
        self._remote: Address | None = None
        self._srtp_out: _fastpath.SrtpSession | None = None
        self._srtcp_in: _fastpath.SrtpSession | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._connected: asyncio.Future[TransportConnected] | None = None
        self._ended = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="whepfan-encoder"
        )
        self._http: aiohttp.ClientSession | None = None
        self.layers: list[VideoLayer] = []
        self.audio_sender: RtpSender | None = None
        self._audio_history = PacketHistory(64)
        self._early_rtcp: list[bytes] = []
        self._started_at = 0.0
        self._last_heard_at = 0.0
        self._timestamp_base: dict[int, int] = {}

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        options = self.options
        loop = self._loop = asyncio.get_running_loop()
        local_host = local_address_towards(options.url)
        socket_transport, _ = await loop.create_datagram_endpoint(
            lambda: _Socket(self), local_addr=(local_host, 0)
        )
        self._socket = socket_transport
        local_port = socket_transport.get_extra_info("sockname")[1]
        ufrag, pwd = new_ice_credentials()
        local = LocalParameters(
            ice_ufrag=ufrag,
            ice_pwd=pwd,
            fingerprints=self.certificate.fingerprints,
            candidate=host_candidate(local_host, local_port),
        )
        tracks = self._build_tracks()
        offer = publisher_offer(local, tracks, cname=self.cname, stream_id=secrets.token_hex(4))
        self._http = aiohttp.ClientSession()
        try:
            result = await post_offer(self._http, options.url, offer, token=options.token)
        except (aiohttp.ClientError, OSError) as exc:
            await self.close()
            raise PublishError(f"cannot reach {options.url}: {exc}") from exc
        if result.status != 201 or result.answer is None:
            await self.close()
            raise PublishError(
                f"WHIP POST answered {result.status}: {result.detail}",
                status=result.status,
                retry_after=_retry_after_seconds(result.retry_after),
            )
        self.location = result.location
        try:
            answer = SessionDescription.parse(result.answer)
            remote = remote_transport(answer)
        except (ParseError, ValueError) as exc:
            await self.close()
            raise PublishError(f"unusable SDP answer: {exc}") from exc
        # RFC 8842 §5.5 / RFC 4145 §4: an answer without a=setup is active.
        dtls_role = "client" if remote.setup == "passive" else "server"
        self._transport = ClientTransport(
            certificate=self.certificate,
            local_ufrag=ufrag,
            local_pwd=pwd,
            remote=remote,
            dtls_role=dtls_role,
            local_address=(local_host, local_port),
        )
        self._connected = loop.create_future()
        self._transport.start(loop.time())
        self._after_io()
        try:
            connected = await asyncio.wait_for(
                asyncio.shield(self._connected), options.connect_timeout
            )
        except (TimeoutError, PublishError) as exc:
            # Say what was tried (candidates, checks, ICE/DTLS states) before closing.
            diagnosis = self._transport.diagnosis()
            await self.close()
            reason = str(exc) or f"not connected within {options.connect_timeout:g} s"
            raise PublishError(f"{reason}: {diagnosis}") from exc
        self._remote = connected.address
        self._started_at = self._last_heard_at = loop.time()
        if self.layers:
            self._tasks.append(loop.create_task(self._video_loop()))
        if self.audio_sender is not None:
            self._tasks.append(loop.create_task(self._audio_loop()))
        self._tasks.append(loop.create_task(self._report_loop()))
        self._tasks.append(loop.create_task(self._watch_server()))
        log.info("publishing to %s (%s)", options.url, self.location)

    async def wait(self, duration: float | None = None) -> None:
        """Until ``duration`` seconds pass or the session ends (``failure`` says why)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), duration)

    @property
    def ended(self) -> bool:
        """The session is over: closed, failed, or found gone (``failure`` says why)."""
        return self._ended.is_set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        # return_exceptions collects the tasks' own CancelledError, while a cancellation
        # of the caller (Ctrl-C) still propagates: close must not swallow it.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._transport is not None:
            self._transport.close()
            self._after_io()
        if self._http is not None:
            if self.location is not None:
                await delete_session(self._http, self.location, token=self.options.token)
                self.location = None
            await self._http.close()
            self._http = None
        if self._timer is not None:
            self._timer.cancel()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._executor.shutdown(wait=True)
        self._ended.set()

    # -- setup -------------------------------------------------------------------------

    def _build_tracks(self) -> list[PublishedTrack]:
        options = self.options
        tracks = []
        if options.audio:
            self.audio_sender = RtpSender(
                ssrc=_random_ssrc(),
                payload_type=OPUS_PAYLOAD_TYPE,
                clock_rate=AUDIO_CLOCK_RATE,
                extensions=[(EXTENSION_ID_MID, b"0")],
            )
            tracks.append(
                PublishedTrack(kind="audio", codec="opus", ssrcs=(self.audio_sender.ssrc,))
            )
        if options.video:
            mid = str(len(tracks)).encode()
            gop = max(1, round(options.keyframe_interval * options.fps))
            rids: tuple[str | None, ...] = SIMULCAST_RIDS if options.simulcast else (None,)
            for index, rid in enumerate(rids):
                # Simulcast layers, lowest first: a quarter, half and full size, each at
                # about a third of the bitrate of the one above.
                shift = len(rids) - 1 - index
                width, height = options.width >> shift, options.height >> shift
                extensions = [(EXTENSION_ID_MID, mid)]
                if rid is not None:
                    extensions.append((EXTENSION_ID_RID, rid.encode()))
                self.layers.append(
                    VideoLayer(
                        rid=rid,
                        width=width,
                        height=height,
                        encoder=VideoEncoder(
                            codec=options.codec,
                            width=width,
                            height=height,
                            fps=options.fps,
                            bitrate=max(30_000, options.bitrate // 3**shift),
                            keyframe_interval=gop,
                        ),
                        packetizer=Vp8Packetizer() if options.codec == "vp8" else H264Packetizer(),
                        sender=RtpSender(
                            ssrc=_random_ssrc(),
                            payload_type=VP8_PAYLOAD_TYPE
                            if options.codec == "vp8"
                            else H264_PAYLOAD_TYPE,
                            clock_rate=VIDEO_CLOCK_RATE,
                            extensions=extensions,
                        ),
                    )
                )
            tracks.append(
                PublishedTrack(
                    kind="video",
                    codec=options.codec,
                    ssrcs=tuple(layer.sender.ssrc for layer in self.layers),
                    rids=SIMULCAST_RIDS if options.simulcast else (),
                )
            )
        for sender in self._senders():
            # RFC 3550 §5.1: the first timestamp is random.
            self._timestamp_base[sender.ssrc] = random.getrandbits(32)
        return tracks

    def _senders(self) -> list[RtpSender]:
        senders = [layer.sender for layer in self.layers]
        if self.audio_sender is not None:
            senders.append(self.audio_sender)
        return senders

    # -- I/O ---------------------------------------------------------------------------

    def _datagram_received(self, data: bytes, addr: Address) -> None:
        transport, loop = self._transport, self._loop
        if transport is None or loop is None:
            return
        self._last_heard_at = loop.time()
        media = transport.receive(data, addr, loop.time())
        if media is not None and is_rtcp(media):
            if self._srtcp_in is None:
                # SRTCP can overtake the last DTLS flight (whepfan sends its first PLI
                # in the same tick); keep a few until the keys exist.
                if len(self._early_rtcp) < EARLY_RTCP_LIMIT:
                    self._early_rtcp.append(media)
            else:
                self._rtcp_received(media)
        self._after_io()

    def _after_io(self) -> None:
        transport, loop = self._transport, self._loop
        if transport is None or loop is None:
            return
        if self._socket is not None:
            for datagram, address in transport.datagrams_to_send():
                self._socket.sendto(datagram, address)
        while (event := transport.next_event()) is not None:
            if isinstance(event, TransportConnected):
                # Keyed at once: the server's first PLI may be in the very next datagram.
                keys = event.keys
                self._srtp_out = _fastpath.SrtpSession(
                    keys.profile, keys.local_key, keys.local_salt
                )
                self._srtcp_in = _fastpath.SrtpSession(
                    keys.profile, keys.remote_key, keys.remote_salt
                )
                early, self._early_rtcp = self._early_rtcp, []
                for packet in early:
                    self._rtcp_received(packet)
                if self._connected is not None and not self._connected.done():
                    self._connected.set_result(event)
            elif isinstance(event, TransportFailed):
                if self._connected is not None and not self._connected.done():
                    self.failure = event.reason
                    self._connected.set_exception(PublishError(event.reason))
                    self._ended.set()
                else:
                    self._session_lost(event.reason)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = transport.get_timer()
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is not None and self._loop is not None:
            self._transport.handle_timer(self._loop.time())
            self._after_io()

    def _send_rtp(self, packets: list[bytes], history: PacketHistory) -> None:
        if self._srtp_out is None or self._socket is None or self._remote is None:
            return
        for packet in packets:
            history.add(int.from_bytes(packet[2:4], "big"), packet)
            protected = self._srtp_out.protect(packet)
            self._socket.sendto(protected, self._remote)
            self.stats.bytes_sent += len(protected)

    def _send_rtcp(self, compound: bytes) -> None:
        if self._srtp_out is None or self._socket is None or self._remote is None:
            return
        self._socket.sendto(self._srtp_out.protect_rtcp(compound), self._remote)

    # -- media -------------------------------------------------------------------------

    def _rtp_timestamp(self, sender: RtpSender, elapsed: float) -> int:
        return (self._timestamp_base[sender.ssrc] + round(elapsed * sender.clock_rate)) & (
            0xFFFFFFFF
        )

    async def _video_loop(self) -> None:
        assert self._loop is not None
        options = self.options
        pattern = TestPattern(width=options.width, height=options.height)
        index = 0
        while True:
            due = self._started_at + index / options.fps
            delay = due - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0 / options.fps:
                # Encoding fell behind: skip to the current frame rather than send late.
                skipped = int(-delay * options.fps)
                self.stats.frames_skipped += skipped
                index += skipped
            requested = [layer.keyframe_requested for layer in self.layers]
            for layer in self.layers:
                layer.keyframe_requested = False
            encoded = await self._loop.run_in_executor(
                self._executor, self._encode, pattern, index, requested
            )
            for layer, (data, keyframe) in zip(self.layers, encoded, strict=True):
                if not data:
                    continue
                self.stats.frames_encoded += 1
                self.stats.keyframes_sent += keyframe
                timestamp = self._timestamp_base[layer.sender.ssrc] + index * (
                    VIDEO_CLOCK_RATE // options.fps
                )
                packets = layer.sender.packets(layer.packetizer.packetize(data), timestamp)
                self.stats.video_packets += len(packets)
                self._send_rtp(packets, layer.history)
            index += 1

    def _encode(
        self, pattern: TestPattern, index: int, keyframes: list[bool]
    ) -> list[tuple[bytes, bool]]:
        """Worker thread: draw the frame once and encode it for every layer."""
        frame = pattern.frame(index, datetime.datetime.now(datetime.UTC))
        results = []
        for layer, keyframe in zip(self.layers, keyframes, strict=True):
            scaled = (
                frame
                if (layer.width, layer.height) == (pattern.width, pattern.height)
                else frame.reformat(width=layer.width, height=layer.height)
            )
            results.append(layer.encoder.encode(scaled, index, keyframe=keyframe))
        return results

    async def _audio_loop(self) -> None:
        assert self._loop is not None and self.audio_sender is not None
        sender = self.audio_sender
        encoder = AudioEncoder()
        tone = Tone()
        frame_duration = AUDIO_FRAME_SAMPLES / AUDIO_CLOCK_RATE
        index = 0
        sent = 0
        while True:
            due = self._started_at + index * frame_duration
            delay = due - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            first_sample = index * AUDIO_FRAME_SAMPLES
            for packet in encoder.encode(tone.samples(first_sample), first_sample):
                timestamp = self._timestamp_base[sender.ssrc] + sent * AUDIO_FRAME_SAMPLES
                packets = sender.packets([packet], timestamp, marker=False)
                self.stats.audio_packets += 1
                self._send_rtp(packets, self._audio_history)
                sent += 1
            index += 1

    async def _report_loop(self) -> None:
        assert self._loop is not None
        while True:
            await asyncio.sleep(SENDER_REPORT_INTERVAL)
            elapsed = self._loop.time() - self._started_at
            ntp = rtcp.unix_to_ntp(time.time())
            for sender in self._senders():
                if not sender.packets_sent:
                    continue
                report = rtcp.SenderReport(
                    ssrc=sender.ssrc,
                    ntp_timestamp=ntp,
                    rtp_timestamp=self._rtp_timestamp(sender, elapsed),
                    packet_count=sender.packets_sent & 0xFFFFFFFF,
                    octet_count=sender.octets_sent & 0xFFFFFFFF,
                )
                description = rtcp.SourceDescription(
                    chunks=[
                        rtcp.SdesChunk(
                            ssrc=sender.ssrc, items=[(rtcp.SDES_CNAME, self.cname.encode())]
                        )
                    ]
                )
                self._send_rtcp(report.serialize() + description.serialize())

    async def _watch_server(self) -> None:
        """End the session when the server went silent and says, or shows by not
        answering, that the session is gone (see the module docstring)."""
        assert self._loop is not None
        timeout = self.options.silence_timeout
        while True:
            await asyncio.sleep(max(0.0, self._last_heard_at + timeout - self._loop.time()))
            silent_for = self._loop.time() - self._last_heard_at
            if silent_for < timeout:
                continue
            status = await self._probe_session()
            if status == 0 or status in SESSION_GONE_STATUSES:
                answer = "no answer" if status == 0 else f"{status} for the session"
                self._session_lost(f"nothing from the server for {silent_for:.1f} s and {answer}")
                return
            # Alive as far as HTTP knows (a server that sends little RTCP): ICE consent
            # still ends it if the media path is dead. Probe again a timeout from now.
            self._last_heard_at = self._loop.time()

    async def _probe_session(self) -> int:
        """GET on the session URL: its status, or 0 when the server cannot be reached."""
        if self._http is None or self.location is None:
            return 0
        headers = {"Authorization": f"Bearer {self.options.token}"} if self.options.token else {}
        try:
            async with self._http.get(
                self.location, headers=headers, timeout=aiohttp.ClientTimeout(total=5.0)
            ) as response:
                return response.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0

    def _session_lost(self, reason: str) -> None:
        if self._ended.is_set():
            return
        self.failure = reason
        log.warning("session ended: %s", reason)
        self._ended.set()

    # -- feedback ----------------------------------------------------------------------

    def _rtcp_received(self, data: bytes) -> None:
        if self._srtcp_in is None:
            return
        try:
            packets = rtcp.parse_compound(self._srtcp_in.unprotect_rtcp(data))
        except (_fastpath.SrtpError, ParseError):
            self.stats.rtcp_errors += 1
            return
        self.stats.rtcp_received += 1
        for packet in packets:
            if isinstance(packet, rtcp.PictureLossIndication):
                self._keyframe_requested(packet.media_ssrc)
            elif isinstance(packet, rtcp.FullIntraRequest):
                for entry in packet.entries:
                    self._keyframe_requested(entry.ssrc)
            elif isinstance(packet, rtcp.GenericNack):
                self._resend(packet.media_ssrc, packet.lost_sequence_numbers())
            elif isinstance(packet, rtcp.ReceiverEstimatedMaxBitrate):
                self.stats.remb_bitrate = packet.bitrate

    def _keyframe_requested(self, ssrc: int) -> None:
        for layer in self.layers:
            if layer.sender.ssrc == ssrc:
                self.stats.keyframe_requests += 1
                layer.keyframe_requested = True

    def _resend(self, ssrc: int, sequence_numbers: list[int]) -> None:
        self.stats.nacked_packets += len(sequence_numbers)
        if self.audio_sender is not None and ssrc == self.audio_sender.ssrc:
            history = self._audio_history
        else:
            layer = next((layer for layer in self.layers if layer.sender.ssrc == ssrc), None)
            if layer is None:
                return
            history = layer.history
        # Without negotiated RTX the original packet goes again under its own sequence
        # number (RFC 4585 §3.1 leaves the repair method open); the receiver's SRTP replay
        # window accepts it because it never arrived.
        found = [packet for seq in sequence_numbers if (packet := history.get(seq)) is not None]
        if found and self._srtp_out is not None and self._socket is not None and self._remote:
            for packet in found:
                self._socket.sendto(self._srtp_out.protect(packet), self._remote)
            self.stats.retransmitted_packets += len(found)


def _random_ssrc() -> int:
    return secrets.randbits(32) or 1


class ReconnectingPublisher:
    """``Publisher`` sessions one after the other: whenever one fails or is found gone,
    publish again after ``policy``'s backoff (see the module docstring). ``run`` returns
    when ``duration`` passes or ``stop`` is set; it raises the ``PublishError`` of an
    attempt that waiting cannot fix (a wrong token: 401), and, before the first session
    connected, of one the server did not answer with a status to retry (see the module
    docstring)."""

    def __init__(
        self,
        options: PublisherOptions,
        *,
        policy: ReconnectPolicy | None = None,
        certificate: DtlsCertificate | None = None,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.options = options
        self.policy = policy or ReconnectPolicy()
        # One certificate for every session: its fingerprint identifies this publisher.
        self.certificate = certificate or DtlsCertificate.generate()
        self._uniform = uniform
        self.current: Publisher | None = None
        self.sessions = 0  # sessions that connected
        self.attempts = 0  # publish attempts that failed (POST, ICE, DTLS)
        self.failures: list[str] = []  # why each session or attempt ended, in order

    async def run(self, duration: float | None = None, stop: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if duration is None else loop.time() + duration
        stop = stop or asyncio.Event()
        failed_in_a_row = 0
        while not stop.is_set():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            publisher = Publisher(self.options, certificate=self.certificate)
            retry_after = None
            reason: str | None
            try:
                await publisher.start()
            except PublishError as exc:
                if not exc.retryable or (self.sessions == 0 and exc.status is None):
                    raise
                reason, retry_after = str(exc), exc.retry_after
                self.attempts += 1
            else:
                self.current = publisher
                self.sessions += 1
                failed_in_a_row = 0
                try:
                    await _first_of(publisher.wait(remaining), stop.wait())
                finally:  # also when cancelled (Ctrl-C): the session is DELETEd
                    reason = publisher.failure
                    await publisher.close()
                if reason is None:
                    return  # the duration passed, or we were stopped
            failed_in_a_row += 1
            self.failures.append(reason)
            delay = self.policy.delay(failed_in_a_row, self._uniform(), retry_after)
            log.warning(
                "%s; publishing again in %.1f s (attempt %d)", reason, delay, failed_in_a_row + 1
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    @property
    def stats(self) -> dict[str, Any]:
        current = self.current.stats.as_dict() if self.current is not None else {}
        return {**current, "sessions": self.sessions, "failed_attempts": self.attempts}


async def _first_of(*awaitables: Awaitable[Any]) -> None:
    """Until the first of ``awaitables`` completes; the others are cancelled."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
