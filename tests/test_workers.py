"""Worker processes (``--workers 2``): one publisher, viewers on both workers decode its
media (relayed as plain RTP between workers); a killed worker ends only its sessions and
a replacement serves new viewers. Plus the relay wire format: round trips and fuzz.

Media is real (aiortc peers over UDP on 127.0.0.1); signalling is the pool's
SessionRouter API, as the HTTP layer calls it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from _peers import (
    InProcessViewer,
    only_loopback_candidates,
    publish_in_process,
    wait_until,
)
from _server import live_server
from _signalling import publish, view
from aiortc import RTCPeerConnection
from hypothesis import given
from hypothesis import strategies as st

from whepfan.config import MediaConfig
from whepfan.errors import NotFound, ParseError
from whepfan.media.relay import RelayFrame, RelayKind
from whepfan.media.session import SessionKind
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.workers.capacity import CapacityLedger, CapacityPolicy
from whepfan.workers.pool import WorkerPool
from whepfan.workers.relay_peer import RelayPeer

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------- relay wire format


@given(
    kind=st.sampled_from(list(RelayKind)),
    stream=st.text(max_size=60),
    track=st.text(max_size=20),
    keyframe=st.booleans(),
    rtp=st.binary(min_size=12, max_size=1500),
)
def test_relay_frame_round_trip(
    kind: RelayKind, stream: str, track: str, keyframe: bool, rtp: bytes
) -> None:
    body = {RelayKind.RTP: rtp, RelayKind.SENDER_REPORT: rtp[:12], RelayKind.KEYFRAME_REQUEST: b""}
    frame = RelayFrame(kind=kind, stream=stream, track=track, keyframe=keyframe, body=body[kind])
    assert RelayFrame.parse(bytes(frame)) == frame


def test_relay_frame_layout() -> None:
    frame = RelayFrame(kind=RelayKind.RTP, stream="ab", track="v", keyframe=True, body=bytes(12))
    assert bytes(frame) == bytes([1, 1, 2, 1]) + b"abv" + bytes(12)


@given(st.binary(max_size=300))
def test_relay_frame_parse_fuzz(data: bytes) -> None:
    try:
        frame = RelayFrame.parse(data)
    except ParseError:
        return
    assert isinstance(frame, RelayFrame)


# ---------------------------------------------------------------------- relay send side


@pytest.fixture
def relay_dir() -> Iterator[str]:
    # Short: a Unix socket path is at most 107 bytes (pytest's tmp_path can be longer).
    path = tempfile.mkdtemp(prefix="wf-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _bound(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    return sock


def _rtp_frames(count: int) -> list[bytes]:
    """Relay frames of 1,200-byte RTP packets with sequence numbers 0..count-1."""
    return [
        bytes(
            RelayFrame(
                kind=RelayKind.RTP,
                stream="live",
                track="video/2",
                body=bytes([0x80, 96]) + seq.to_bytes(2, "big") + bytes(1196),
            )
        )
        for seq in range(count)
    ]


async def test_a_relay_burst_larger_than_the_kernel_queue_arrives_whole_and_in_order(
    relay_dir: str,
) -> None:
    """A keyframe burst to a worker that is busy (not reading): Linux queues at most
    net.unix.max_dgram_qlen datagrams (10 by default) on the receiving socket, so the
    burst meets EAGAIN; it waits in the sender's backlog and arrives whole, in order,
    once the worker reads (the relay loss of the 2-worker capacity bench)."""
    loop = asyncio.get_running_loop()
    path = os.path.join(relay_dir, "relay-1.sock")
    receiver = _bound(path)
    counters: Counter[str] = Counter()
    peer = RelayPeer(path=path, loop=loop, counters=counters)
    frames = _rtp_frames(300)
    try:
        for frame in frames:
            peer.send(frame)
        # The kernel queue filled up: the rest is waiting here, nothing was dropped.
        assert counters["relay_backlogged"] > 0 and len(peer.backlog) > 0
        assert counters["relay_sent"] + len(peer.backlog) == len(frames)
        received: list[bytes] = []
        everything = asyncio.Event()

        def on_readable() -> None:
            while True:
                try:
                    received.append(receiver.recv(65536))
                except BlockingIOError:
                    break
            if len(received) == len(frames):
                everything.set()

        loop.add_reader(receiver.fileno(), on_readable)
        try:
            await asyncio.wait_for(everything.wait(), 10)
        finally:
            loop.remove_reader(receiver.fileno())
        assert received == frames
        assert counters["relay_sent"] == len(frames)
        assert counters["drop_relay_queue_full"] == 0 and not peer.backlog
    finally:
        peer.close()
        receiver.close()


async def test_a_stuck_relay_peer_loses_only_what_overflows_the_backlog(relay_dir: str) -> None:
    loop = asyncio.get_running_loop()
    path = os.path.join(relay_dir, "relay-1.sock")
    receiver = _bound(path)  # never read: the worker is stuck
    counters: Counter[str] = Counter()
    peer = RelayPeer(path=path, loop=loop, counters=counters, backlog_limit=5)
    try:
        for frame in _rtp_frames(100):
            peer.send(frame)
        assert len(peer.backlog) == 5
        assert counters["drop_relay_queue_full"] > 0
        assert counters["relay_sent"] + 5 + counters["drop_relay_queue_full"] == 100
        # What did go out is the head of the burst, in order.
        first = receiver.recv(65536)
        assert RelayFrame.parse(first).body[2:4] == bytes(2)
    finally:
        peer.close()
        receiver.close()


async def test_a_relay_peer_that_is_absent_or_replaced_is_counted_then_reconnected(
    relay_dir: str,
) -> None:
    loop = asyncio.get_running_loop()
    path = os.path.join(relay_dir, "relay-1.sock")
    counters: Counter[str] = Counter()
    peer = RelayPeer(path=path, loop=loop, counters=counters)
    frame = _rtp_frames(1)[0]
    try:
        peer.send(frame)  # that worker has not bound its socket yet
        assert counters["drop_relay_no_peer"] == 1
        first = _bound(path)
        peer.send(frame)
        assert first.recv(65536) == frame
        # The worker exits; a replacement binds a new socket at the same path.
        first.close()
        os.unlink(path)
        peer.send(frame)
        assert counters["drop_relay_no_peer"] == 2
        second = _bound(path)
        try:
            peer.send(frame)
            assert second.recv(65536) == frame
        finally:
            second.close()
        assert counters["relay_sent"] == 2
    finally:
        peer.close()


# ---------------------------------------------------------------------- two workers


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    config = MediaConfig(udp_host="127.0.0.1", udp_port=0, public_ips=("127.0.0.1",))
    workers = WorkerPool(
        workers=2,
        config=config,
        certificate=DtlsCertificate.generate(),
        ledger=CapacityLedger(policy=CapacityPolicy(), workers=2),
        stats_interval=0.2,
        log_level="warning",
    )
    await workers.start()
    yield workers
    await workers.close()


async def _publish(pool: WorkerPool, stream: str) -> RTCPeerConnection:
    return await publish_in_process(pool, stream, 0.0)


class PoolViewer(InProcessViewer):
    """A decoding viewer signalled through the pool's ``view`` (placed on a worker)."""

    def __init__(self, pool: WorkerPool, stream: str) -> None:
        super().__init__(pool, stream, clock=lambda: 0.0)
        self.pool = pool

    @property
    def worker(self) -> int:
        return self.pool.worker_of(self.session_id)

    async def wait_frames(self, count: int, timeout: float = 15.0) -> None:
        await super().wait_frames(count, timeout)


async def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    assert await wait_until(condition, timeout)


async def test_viewers_on_both_workers_decode_one_publisher(pool: WorkerPool) -> None:
    assert len(set(pool.ports.values())) == 2
    publisher = await _publish(pool, "live")
    viewers = [PoolViewer(pool, "live") for _ in range(4)]
    try:
        for viewer in viewers:
            await viewer.start()
        # Least-loaded placement alternates: both workers carry viewers.
        assert {viewer.worker for viewer in viewers} == {0, 1}
        for viewer in viewers:
            await viewer.wait_frames(15)
        frame = viewers[-1].video_frames[-1].to_ndarray(format="gray")
        assert frame.shape == (240, 320)
        # Stats arrive from both workers: each sent media to its own viewers, and the
        # publisher's worker relayed to the other.
        await _wait_for(lambda: len(pool.stats().workers) == 2)
        stats = {w.worker: w for w in pool.stats().workers}
        assert all(w.fanout["packets_sent"] > 0 for w in stats.values())
        origin = pool.streams["live"].origin
        assert origin is not None
        assert stats[origin].router.get("relay_sent", 0) > 0
        assert stats[1 - origin].router.get("relay_received", 0) > 0
        assert pool.viewer_count == 4
    finally:
        for viewer in viewers:
            await viewer.close()
        await publisher.close()


async def test_killed_worker_ends_only_its_sessions_and_is_replaced(pool: WorkerPool) -> None:
    publisher = await _publish(pool, "live")
    viewers = [PoolViewer(pool, "live") for _ in range(4)]
    late: PoolViewer | None = None
    try:
        for viewer in viewers:
            await viewer.start()
        for viewer in viewers:
            await viewer.wait_frames(5)
        origin = pool.streams["live"].origin
        assert origin is not None
        victim = 1 - origin  # keep the publisher: its stream goes on for the others
        lost_ids: list[str] = []
        pool.on_sessions_lost = lost_ids.extend
        killed = [v for v in viewers if v.worker == victim]
        kept = [v for v in viewers if v.worker != victim]
        old_pid = pool.kill_worker(victim)
        await _wait_for(lambda: not pool.handles[victim].alive or bool(lost_ids))
        await _wait_for(lambda: all(v.session_id not in pool.sessions for v in killed))
        assert sorted(lost_ids) == sorted(v.session_id for v in killed)
        for viewer in killed:
            # Its PATCH/DELETE now answer 404.
            with pytest.raises(NotFound):
                pool.get_session(viewer.session_id)
        assert all(pool.get_session(v.session_id).kind is SessionKind.VIEWER for v in kept)
        # The others keep receiving.
        counts = [len(v.video_frames) for v in kept]
        await _wait_for(
            lambda: all(len(v.video_frames) > c + 10 for v, c in zip(kept, counts, strict=True))
        )
        # A replacement starts on the same port and serves new viewers.
        await _wait_for(lambda: pool.handles[victim].alive and victim in pool.ledger.workers)
        assert pool.handles[victim].process.pid != old_pid
        assert pool.restarts == 1
        for _ in range(len(kept) + 1):
            late = PoolViewer(pool, "live")
            await late.start()
            if late.worker == victim:
                break
            await late.close()
            late = None
        assert late is not None, "no new viewer was placed on the replacement"
        await late.wait_frames(10)
    finally:
        for viewer in viewers:
            await viewer.close()
        if late is not None:
            await late.close()
        await publisher.close()
    assert os.path.isdir(pool.relay_dir)


async def test_http_over_two_workers_creates_and_deletes_sessions() -> None:
    live = live_server(workers="2")
    try:
        async with aiohttp.ClientSession(base_url=live.url) as http:
            publisher = await publish(http, "cam")
            answers = [await view(http, "cam") for _ in range(2)]
            assert [a.status for a in answers] == [201, 201]
            pool = live.info.backend if live.info is not None else None
            assert isinstance(pool, WorkerPool)
            placed = {pool.worker_of(a.headers["Location"].rsplit("/", 1)[1]) for a in answers}
            assert placed == {0, 1}
            for answer in answers:
                async with http.delete(answer.headers["Location"]) as response:
                    assert response.status == 200
                async with http.delete(answer.headers["Location"]) as response:
                    assert response.status == 404
            assert pool.viewer_count == 0
            await publisher.close()
    finally:
        live.close()


async def test_a_crashed_workers_viewers_are_told_to_reconnect_over_sse() -> None:
    """Issue 8: a worker dies -> its sessions end and their event readers get `reconnect`
    (EXT §4.3.5), so players come back through signalling to a live worker. The player's
    DELETE of the ended session is a normal teardown (200 once, within the ended-session
    grace, RFC 9725 §4.3); the session is gone after it (404)."""
    live = live_server(workers="2")
    try:
        async with aiohttp.ClientSession(base_url=live.url) as http:
            publisher = await publish(http, "cam")
            answer = await view(http, "cam")
            assert answer.status == 201
            location = answer.headers["Location"]
            pool = live.info.backend if live.info is not None else None
            assert isinstance(pool, WorkerPool)
            worker = pool.worker_of(location.rsplit("/", 1)[1])
            async with http.get(location + "/events") as events:
                assert events.status == 200
                await events.content.readline()  # the stream is open
                live.loop.call_soon_threadsafe(pool.kill_worker, worker)
                received = b""
                deadline = asyncio.get_running_loop().time() + 10
                while b"event: reconnect" not in received:
                    remaining = deadline - asyncio.get_running_loop().time()
                    assert remaining > 0, received
                    received += await asyncio.wait_for(events.content.readline(), remaining)
            async with http.delete(location) as response:
                assert response.status == 200
            async with http.delete(location) as response:
                assert response.status == 404
            await publisher.close()
    finally:
        live.close()
