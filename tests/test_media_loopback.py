"""End to end on loopback with real WebRTC peers: aiortc publishes, aiortc viewers decode.

Signalling here is the router's in-process API (the HTTP layer has its own tests); media,
ICE, DTLS and SRTP are real, over real UDP sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from _peers import (
    InProcessViewer,
    only_loopback_candidates,
    publish_in_process,
    wait_until,
)
from _server import media_worker
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import RTCDtlsTransport

from whepfan.media.transport import MediaWorker


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture
async def worker() -> AsyncIterator[MediaWorker]:
    async with media_worker() as media:
        yield media


async def start_publisher(
    worker: MediaWorker, stream: str, *, audio: bool = True, video: bool = True
) -> RTCPeerConnection:
    return await publish_in_process(worker.router, stream, worker.now(), audio=audio, video=video)


class Viewer(InProcessViewer):
    """A decoding viewer signalled through the router's in-process ``view``."""

    def __init__(self, worker: MediaWorker, stream: str) -> None:
        super().__init__(worker.router, stream, clock=worker.now)


async def test_aiortc_publisher_to_aiortc_viewers_decode_video_and_audio(
    worker: MediaWorker,
) -> None:
    publisher = await start_publisher(worker, "live")
    viewers = [Viewer(worker, "live") for _ in range(3)]
    try:
        for viewer in viewers:
            await viewer.start()
        for viewer in viewers:
            await viewer.wait_frames(20)
        # Frames are the publisher's 320x240 pattern, and they move.
        frame_a = viewers[0].video_frames[2].to_ndarray(format="gray")
        frame_b = viewers[0].video_frames[12].to_ndarray(format="gray")
        assert frame_a.shape == (240, 320)
        assert np.abs(frame_a.astype(int) - frame_b.astype(int)).mean() > 1.0
        deadline = time.monotonic() + 5
        while any(v.audio_frames == 0 for v in viewers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert all(v.audio_frames > 0 for v in viewers)
        stats = worker.fanout.stats()
        assert stats["packets_sent"] > 0
    finally:
        for viewer in viewers:
            await viewer.close()
        await publisher.close()


async def test_viewer_joining_mid_stream_decodes_its_first_frame_within_one_second(
    worker: MediaWorker,
) -> None:
    publisher = await start_publisher(worker, "live")
    early = Viewer(worker, "live")
    late = Viewer(worker, "live")
    try:
        await early.start()
        await early.wait_frames(10)
        # Well past the publisher's first keyframe: only a keyframe request helps now.
        await asyncio.sleep(2.0)
        await late.start()
        await late.wait_frames(1, timeout=5.0)
        assert late.first_frame_at is not None
        time_to_first_frame = late.first_frame_at - late.started_at
        print(f"time to first frame (mid-stream join): {time_to_first_frame * 1000:.0f} ms")
        assert time_to_first_frame < 1.0
        assert worker.router.counters["keyframe_requests_sent"] >= 2
    finally:
        await early.close()
        await late.close()
        await publisher.close()


async def test_nack_from_a_viewer_gets_the_packet_resent(
    worker: MediaWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drop some video packets on their way into one viewer; its NACKs must bring them back."""
    publisher = await start_publisher(worker, "live", audio=False)
    viewer = Viewer(worker, "live")
    dropped: list[int] = []
    recovered: list[int] = []
    rtx_payload_type: int | None = None  # known once the viewer's session exists
    original = RTCDtlsTransport._handle_rtp_data

    async def lossy(self: RTCDtlsTransport, data: bytes, arrival_time_ms: int) -> None:
        seq = int.from_bytes(data[2:4], "big")
        pt = data[1] & 0x7F
        is_rtx = rtx_payload_type is not None and pt == rtx_payload_type
        if is_rtx and len(data) >= 14:
            header = 12 + 4 * (data[0] & 0x0F)
            if data[0] & 0x10:
                header += 4 + 4 * int.from_bytes(data[header + 2 : header + 4], "big")
            recovered.append(int.from_bytes(data[header : header + 2], "big"))
        elif not is_rtx and len(dropped) < 5 and seq % 7 == 0 and seq not in dropped:
            dropped.append(seq)
            return
        await original(self, data, arrival_time_ms)

    monkeypatch.setattr(RTCDtlsTransport, "_handle_rtp_data", lossy)
    try:
        await viewer.start(audio=False)
        for media in worker.router.get_session(viewer.session_id).egress:  # type: ignore[attr-defined]
            rtx_payload_type = media.rtx_payload_type
        await viewer.wait_frames(5)
        # Wait for the drops themselves (frame sizes vary, so frame counts say little).
        assert await wait_until(lambda: len(dropped) == 5, timeout=15.0), dropped
        await wait_until(lambda: set(dropped) <= set(recovered), timeout=5.0)
        assert worker.router.counters["nack_resent"] >= 1
        assert set(dropped) & set(recovered), (dropped, recovered)
    finally:
        await viewer.close()
        await publisher.close()


async def test_deleted_viewer_frees_its_fanout_slot(worker: MediaWorker) -> None:
    publisher = await start_publisher(worker, "live")
    viewer = Viewer(worker, "live")
    try:
        await viewer.start()
        await viewer.wait_frames(5)
        assert worker.fanout.viewer_count == 1
        assert worker.router.end_session(viewer.session_id, worker.now())
        assert worker.fanout.viewer_count == 0
        assert viewer.session_id not in worker.router.sessions
        assert not worker.router.end_session(viewer.session_id, worker.now())
    finally:
        await viewer.close()
        await publisher.close()


async def test_audio_only_stream(worker: MediaWorker) -> None:
    publisher = await start_publisher(worker, "radio", video=False)
    viewer = Viewer(worker, "radio")
    try:
        await viewer.start(video=False)
        assert await wait_until(lambda: viewer.audio_frames >= 20, timeout=5.0)
        assert not viewer.video_frames
    finally:
        await viewer.close()
        await publisher.close()


async def test_video_only_stream(worker: MediaWorker) -> None:
    publisher = await start_publisher(worker, "silent", audio=False)
    viewer = Viewer(worker, "silent")
    try:
        await viewer.start(audio=False)
        await viewer.wait_frames(10)
        assert viewer.audio_frames == 0
    finally:
        await viewer.close()
        await publisher.close()


async def test_sender_reports_and_receiver_reports_flow_per_viewer(worker: MediaWorker) -> None:
    """RFC 3550 §6.4: the publisher's SRs are relayed to each viewer under the viewer's own
    SSRC (aiortc sends SRs every ~1 s), and each viewer's RRs land in its session stats."""
    publisher = await start_publisher(worker, "live")
    viewer = Viewer(worker, "live")
    try:
        await viewer.start()
        await viewer.wait_frames(5)
        slot = worker.router.get_session(viewer.session_id).fanout_slot  # type: ignore[attr-defined]
        assert await wait_until(
            lambda: worker.fanout.viewer_stats(slot)["sender_reports_sent"] >= 2, timeout=8.0
        )
        assert await wait_until(
            lambda: worker.fanout.viewer_stats(slot)["rtcp_received"] >= 1, timeout=8.0
        )
        # aiortc's receiver derives RTT from our relayed SR's LSR/DLSR: it parsed them.
        session = worker.router.get_session(viewer.session_id)
        assert session.fraction_lost == 0.0  # type: ignore[attr-defined]
    finally:
        await viewer.close()
        await publisher.close()


async def test_viewers_resume_with_continuous_sequence_when_a_publisher_returns(
    worker: MediaWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher leaves; the viewer stays; a new publisher continues the same sequence
    and timestamp lines (RFC 3550 §5.1), and frames keep decoding."""
    seen: list[tuple[int, int]] = []
    original = RTCDtlsTransport._handle_rtp_data

    async def record(self: RTCDtlsTransport, data: bytes, arrival_time_ms: int) -> None:
        if data[1] & 0x7F == video_pt[0]:
            seen.append((int.from_bytes(data[2:4], "big"), int.from_bytes(data[4:8], "big")))
        await original(self, data, arrival_time_ms)

    video_pt = [-1]
    monkeypatch.setattr(RTCDtlsTransport, "_handle_rtp_data", record)
    first = await start_publisher(worker, "live", audio=False)
    viewer = Viewer(worker, "live")
    try:
        await viewer.start(audio=False)
        session = worker.router.get_session(viewer.session_id)
        video_pt[0] = session.egress[0].payload_type  # type: ignore[attr-defined]
        await viewer.wait_frames(10)
        stream = worker.router.streams["live"]
        assert stream.publisher is not None
        worker.router.end_session(stream.publisher.id, worker.now())
        await first.close()
        await asyncio.sleep(0.3)
        before = len(seen)
        frames_before = len(viewer.video_frames)
        second = await start_publisher(worker, "live", audio=False)
        try:
            await viewer.wait_frames(frames_before + 10)
        finally:
            await second.close()
        last_old, first_new = seen[before - 1], seen[before]
        assert first_new[0] == (last_old[0] + 1) % 65536
        # The timestamp moves forward by about the real gap, not by a random jump.
        gap_ticks = (first_new[1] - last_old[1]) % (1 << 32)
        assert 0 < gap_ticks < 90000 * 5
        assert viewer.session_id in worker.router.sessions
    finally:
        await viewer.close()
