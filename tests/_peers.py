"""aiortc test peers shared by the media tests: a moving test pattern, a sending peer, a
decoding recvonly viewer, and the patch that keeps aioice's candidates on 127.0.0.1.

Signalling in process (the router's or the worker pool's own ``publish``/``view``) is here
too, as :func:`publish_in_process` and :class:`InProcessViewer`; WHIP/WHEP over HTTP is in
tests/_signalling.py.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import aioice.ice
import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack

VIDEO_CLOCK = 90000
FPS = 30
POLL_INTERVAL = 0.05


def only_loopback_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice skips loopback when gathering host candidates; the media tests must stay on
    127.0.0.1 (the server advertises 127.0.0.1 and the peers must reach it)."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def new_peer() -> RTCPeerConnection:
    """An aiortc peer with no STUN/TURN servers: host candidates only."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_INTERVAL)
    return predicate()


class MovingPatternTrack(MediaStreamTrack):
    """A 320x240 test pattern that changes every frame (so every frame decodes distinctly)."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._start: float | None = None
        self._index = 0

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._index / FPS
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        image = np.zeros((240, 320, 3), dtype=np.uint8)
        x = (self._index * 4) % 320
        image[:, x : x + 16] = (255, 255, 255)
        image[:, :, 1] = ((image[:, :, 1].astype(np.int32) // 2 + self._index) % 256).astype(
            np.uint8
        )
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = self._index * (VIDEO_CLOCK // FPS)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self._index += 1
        return frame


async def sending_peer(
    pc: RTCPeerConnection | None = None, *, video: bool = True, audio: bool = True
) -> RTCPeerConnection:
    """A publisher peer (``pc``, or a new one) sending the moving pattern, then a tone,
    with its offer already set as the local description: the caller sends
    ``pc.localDescription.sdp`` and then :func:`accept_answer`."""
    pc = pc or new_peer()
    if video:
        pc.addTransceiver(MovingPatternTrack(), direction="sendonly")
    if audio:
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def accept_answer(pc: RTCPeerConnection, answer: str) -> None:
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))


class DecodingViewer:
    """A recvonly aiortc peer that decodes everything it receives: video frames kept (in
    arrival order, the first one's arrival time noted), audio frames counted. Host
    candidates only, unless ``configuration`` gives it ICE servers."""

    def __init__(self, configuration: RTCConfiguration | None = None) -> None:
        self.pc = new_peer() if configuration is None else RTCPeerConnection(configuration)
        self.video_frames: list[av.VideoFrame] = []
        self.audio_frames = 0
        self.first_frame_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", self.on_track)

    def on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.ensure_future(self._consume(track)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except Exception:
                return  # the track ended (MediaStreamError) or the peer closed
            if isinstance(frame, av.VideoFrame):  # the video track's decoded frames
                if self.first_frame_at is None:
                    self.first_frame_at = time.monotonic()
                self.video_frames.append(frame)
            else:
                self.audio_frames += 1

    async def offer(
        self, kinds: Sequence[str] = ("video", "audio"), *, video_codec: str | None = None
    ) -> str:
        """A recvonly offer with one m-section per entry of ``kinds``, in that order;
        ``video_codec`` (e.g. "H264") restricts the video section to that codec."""
        for kind in kinds:
            transceiver = self.pc.addTransceiver(kind, direction="recvonly")
            if kind == "video" and video_codec is not None:
                codecs = RTCRtpSender.getCapabilities("video").codecs
                transceiver.setCodecPreferences(
                    [c for c in codecs if c.mimeType.lower() == f"video/{video_codec.lower()}"]
                )
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer: str) -> None:
        await accept_answer(self.pc, answer)

    async def wait_frames(self, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` video frames have decoded; fails the test after ``timeout``."""
        decoded = await wait_until(lambda: len(self.video_frames) >= count, timeout)
        assert decoded, f"only {len(self.video_frames)} frames decoded"

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()


class InProcessSignalling(Protocol):
    """The WHIP and WHEP POSTs without HTTP: what the router and the worker pool share."""

    def publish(self, stream_name: str, offer_text: str, now: float) -> tuple[Any, str]: ...

    def view(self, stream_name: str, offer_text: str, now: float) -> tuple[Any, str]: ...


async def publish_in_process(
    signalling: InProcessSignalling,
    stream: str,
    now: float,
    *,
    audio: bool = True,
    video: bool = True,
) -> RTCPeerConnection:
    """A :func:`sending_peer` publishing ``stream`` through ``signalling``, answer applied."""
    pc = await sending_peer(video=video, audio=audio)
    _, answer = signalling.publish(stream, pc.localDescription.sdp, now)
    await accept_answer(pc, answer)
    return pc


class InProcessViewer(DecodingViewer):
    """A decoding viewer of ``stream`` signalled through ``signalling.view`` at ``clock()``;
    it keeps its session id and when it asked."""

    def __init__(
        self, signalling: InProcessSignalling, stream: str, *, clock: Callable[[], float]
    ) -> None:
        super().__init__()
        self.signalling = signalling
        self.stream = stream
        self.clock = clock
        self.started_at = 0.0
        self.session_id = ""

    async def start(self, *, audio: bool = True, video: bool = True) -> None:
        kinds = [kind for kind, wanted in (("video", video), ("audio", audio)) if wanted]
        offer = await self.offer(kinds)
        self.started_at = time.monotonic()
        session, answer = self.signalling.view(self.stream, offer, self.clock())
        self.session_id = session.id
        await self.accept(answer)
