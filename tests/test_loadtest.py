"""whepfan loadtest: the compiled receive side on loopback sockets, the report, and whole
runs against ``whepfan serve`` fed by ``whepfan publish`` and against an aiortc-based
WHEP server written here."""

from __future__ import annotations

import asyncio
import fractions
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import aioice.ice
import av
import numpy as np
import pytest
from _server import live_server
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack
from hypothesis import given, settings
from hypothesis import strategies as st

from whepfan import _fastpath
from whepfan.cli import main as whepfan_main
from whepfan.client.loadtest import (
    EXIT_EVERY_VIEWER_REFUSED,
    GIVE_UP_AFTER_REFUSALS,
    LoadTest,
    LoadTestOptions,
    ViewerResult,
    problem_summary,
    server_metrics_from_text,
)
from whepfan.client.report import (
    LoadTestReport,
    Sample,
    ServerSample,
    percentile,
    render_html,
    render_text,
    summarize,
)
from whepfan.client.stalls import StallWatch, check_interval
from whepfan.protocol.rtp import RtpPacket

TOKEN = "loadtest-token"
# The HTML report's charts without --server-metrics (charts.py, in page order).
REPORT_CHARTS = ("viewers", "bitrate", "packets", "loss", "keyframe", "viewer-loss", "viewer-gap")
GCM = _fastpath.PROFILE_AEAD_AES_128_GCM
CM80 = _fastpath.PROFILE_AES128_CM_SHA1_80


# --- the compiled receiver on loopback ---------------------------------------------------


class Bench:
    """One Receiver viewer socket and a sender socket aimed at it, with known keys."""

    def __init__(self, profile: int = GCM, verify_every: int = 1) -> None:
        key_length, salt_length = _fastpath.profile_key_lengths(profile)
        self.key, self.salt = os.urandom(key_length), os.urandom(salt_length)
        self.protect = _fastpath.SrtpSession(profile, self.key, self.salt)
        self.receiver = _fastpath.Receiver(max_viewers=4, verify_every=verify_every)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.setblocking(False)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sender.bind(("127.0.0.1", 0))
        self.viewer = self.receiver.add_viewer(self.socket.fileno())
        self.receiver.set_payload_type(self.viewer, 111, kind="audio", clock_rate=48000)
        self.receiver.set_payload_type(self.viewer, 96, kind="vp8", clock_rate=90000)
        self.receiver.set_payload_type(self.viewer, 102, kind="h264", clock_rate=90000)
        self.profile = profile

    def key_receiver(self) -> None:
        self.receiver.set_keys(self.viewer, profile=self.profile, key=self.key, salt=self.salt)

    def send(self, datagram: bytes) -> None:
        self.sender.sendto(datagram, self.socket.getsockname())

    def rtp(
        self, seq: int, *, pt: int = 111, ssrc: int = 7, payload: bytes = b"\x00" * 40
    ) -> bytes:
        packet = RtpPacket(
            payload_type=pt,
            sequence_number=seq & 0xFFFF,
            timestamp=seq * 960,
            ssrc=ssrc,
            payload=payload,
        )
        return self.protect.protect(packet.serialize())

    def drain(self, expect_packets: int) -> list[tuple[int, bytes, tuple[str, int]]]:
        """Drain until the receiver has seen ``expect_packets`` datagrams (loopback UDP
        delivers in order and without loss at these volumes; the loop only waits for it)."""
        control = []
        seen = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            control += self.receiver.drain()
            stats = self.receiver.viewer_stats(self.viewer)
            kinds = ("packets", "rtcp_packets", "control_packets", "malformed")
            seen = sum(int(stats[kind] or 0) for kind in kinds)
            if seen >= expect_packets:
                return control
            # Wait on the epoll fd itself: readable as soon as the next datagram lands.
            select.select([self.receiver.fileno()], [], [], 0.5)
        raise AssertionError(f"only {seen} of {expect_packets} datagrams arrived")

    def close(self) -> None:
        self.receiver.remove_viewer(self.viewer)
        self.socket.close()
        self.sender.close()


@pytest.fixture
def bench() -> Iterator[Bench]:
    fixture = Bench()
    yield fixture
    fixture.close()


@pytest.mark.parametrize("profile", [GCM, CM80])
def test_receiver_counts_and_decrypts_every_packet(profile: int) -> None:
    bench = Bench(profile)
    try:
        bench.key_receiver()
        for seq in range(65530, 65536 + 20):  # across the 16-bit wrap (RFC 3550 §A.1)
            bench.send(bench.rtp(seq))
        bench.drain(26)
        stats = bench.receiver.viewer_stats(bench.viewer)
        assert stats["packets"] == stats["expected"] == stats["decrypted"] == 26
        assert stats["lost"] == stats["duplicates"] == stats["decrypt_failures"] == 0
        assert stats["streams"] == 1
        assert stats["first_rtp_at"] is not None and stats["first_rtp_at"] <= time.monotonic()
    finally:
        bench.close()


def test_receiver_counts_gaps_duplicates_and_late_packets(bench: Bench) -> None:
    bench.key_receiver()
    order = [*range(0, 10), 12, 13, 12, 11, *range(14, 100), 5]
    for seq in order:
        bench.send(bench.rtp(seq))
    bench.drain(len(order))
    stats = bench.receiver.viewer_stats(bench.viewer)
    # 100 expected, every one arrived; 12 twice and 5 twice (within the window): duplicates.
    assert stats["expected"] == 100
    assert stats["lost"] == 0
    assert stats["duplicates"] == 1
    assert stats["late"] == 1  # seq 5 came 94 packets late: beyond the 64-packet window
    missing = [seq for seq in range(200, 300) if seq % 10 != 3]
    for seq in missing:
        bench.send(bench.rtp(seq))
    bench.drain(len(order) + len(missing))
    stats = bench.receiver.viewer_stats(bench.viewer)
    # 100..199 never sent and ten more missing: sequence gaps.
    assert stats["lost"] == 100 + 10


def test_receiver_reports_decrypt_failures_rtcp_and_unkeyed_packets(bench: Bench) -> None:
    bench.send(bench.rtp(1))  # before the keys: counted, not decrypted
    bench.drain(1)
    bench.key_receiver()
    tampered = bytearray(bench.rtp(2))
    tampered[-1] ^= 1
    bench.send(bytes(tampered))
    bench.send(bench.rtp(3))
    rtcp = bench.protect.protect_rtcp(bytes.fromhex("80c90001") + b"\x00\x00\x00\x07")
    bench.send(rtcp)
    bench.drain(4)
    stats = bench.receiver.viewer_stats(bench.viewer)
    assert stats["unkeyed"] == 1
    assert stats["decrypt_failures"] == 1
    assert stats["decrypted"] == 1
    assert stats["rtcp_packets"] == 1


def test_receiver_returns_stun_and_dtls_with_their_source(bench: Bench) -> None:
    stun_like = bytes.fromhex("0001000021122a442233445566778899aabbccdd")
    dtls_like = bytes.fromhex("16fefd0000000000000000000100")
    bench.send(stun_like)
    bench.send(dtls_like)
    control = bench.drain(2)
    source = bench.sender.getsockname()
    assert control == [(bench.viewer, stun_like, source), (bench.viewer, dtls_like, source)]


def test_receiver_samples_after_the_first_keyframe() -> None:
    bench = Bench(verify_every=4)
    try:
        bench.key_receiver()
        delta = b"\x90\x80\x80\x01\x01" + bytes(30)  # VP8 descriptor, P=1: not a keyframe
        key = b"\x90\x80\x80\x02\x10" + bytes(30)  # P=0: keyframe (RFC 7741 §4.3)
        for seq in range(3):
            bench.send(bench.rtp(seq, pt=96, ssrc=9, payload=delta))
        bench.send(bench.rtp(3, pt=96, ssrc=9, payload=key))
        for seq in range(4, 44):
            bench.send(bench.rtp(seq, pt=96, ssrc=9, payload=delta))
        bench.drain(44)
        stats = bench.receiver.viewer_stats(bench.viewer)
        assert stats["first_keyframe_at"] is not None
        assert stats["packets"] == 44 and stats["lost"] == 0
        # All four up to the keyframe, then one in four of the other 40.
        assert stats["decrypted"] == 4 + 10
        assert stats["decrypt_failures"] == 0
    finally:
        bench.close()


@pytest.mark.parametrize(
    ("payload", "keyframe"),
    [
        (b"\x7c\x85\x88\x80", True),  # FU-A start of an IDR slice (RFC 6184 §5.8)
        (b"\x7c\x05\x88\x80", False),  # FU-A continuation
        (b"\x78\x00\x03\x67\x42\x00\x00\x02\x68\xce", True),  # STAP-A with an SPS (§5.7.1)
        (b"\x41\x9a\x00", False),  # non-IDR slice
        (b"\x65\x88\x80", True),  # IDR slice alone (§5.6)
    ],
)
def test_receiver_finds_h264_keyframes(bench: Bench, payload: bytes, keyframe: bool) -> None:
    bench.key_receiver()
    bench.send(bench.rtp(1, pt=102, ssrc=3, payload=payload))
    bench.drain(1)
    stats = bench.receiver.viewer_stats(bench.viewer)
    assert (stats["first_keyframe_at"] is not None) is keyframe


@settings(max_examples=40)
@given(steps=st.lists(st.integers(-3, 5), min_size=1, max_size=60))
def test_receiver_loss_and_duplicates_match_a_reference(steps: list[int]) -> None:
    """Sequence numbers wander (gaps, repeats, reordering within the window); the counters
    must match a plain-Python model of RFC 3550 §A.3 with exact duplicate detection."""
    bench = Bench()
    try:
        bench.key_receiver()
        seq = 1000
        sent = []
        for step in steps:
            seq += step
            sent.append(seq)
            bench.send(bench.rtp(seq))
        bench.drain(len(sent))
        stats = bench.receiver.viewer_stats(bench.viewer)
        unique = set(sent)
        assert stats["expected"] == max(sent) - min(sent) + 1
        assert stats["duplicates"] == len(sent) - len(unique)
        assert stats["lost"] == stats["expected"] - len(unique)
        assert stats["decrypt_failures"] == 0
    finally:
        bench.close()


@settings(max_examples=60)
@given(datagrams=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20))
def test_receiver_fuzz_never_fails(datagrams: list[bytes]) -> None:
    bench = Bench()
    try:
        bench.key_receiver()
        for datagram in datagrams:
            bench.send(datagram)
        control = bench.drain(len(datagrams))
        stats = bench.receiver.viewer_stats(bench.viewer)
        assert stats["decrypted"] == 0  # nothing random authenticates
        assert len(control) == sum(1 for d in datagrams if not 128 <= d[0] <= 191)
    finally:
        bench.close()


def test_receiver_rejects_bad_arguments() -> None:
    receiver = _fastpath.Receiver(max_viewers=1)
    with pytest.raises(KeyError):
        receiver.viewer_stats(0)
    with pytest.raises(ValueError):
        _fastpath.Receiver(verify_every=0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        viewer = receiver.add_viewer(sock.fileno())
        with pytest.raises(ValueError):
            receiver.add_viewer(sock.fileno())  # one slot only
        with pytest.raises(ValueError):
            receiver.set_payload_type(viewer, 200, kind="audio", clock_rate=48000)
        with pytest.raises(ValueError):
            receiver.set_keys(viewer, profile=GCM, key=b"short", salt=b"x" * 12)
    finally:
        sock.close()


def _poll_until(bench: Bench, expect_packets: int) -> list[tuple[int, bytes, tuple[str, int]]]:
    """poll() until ``expect_packets`` datagrams were read (loopback delivery is
    synchronous with sendto, so this normally takes one call)."""
    control = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        control += bench.receiver.poll()
        stats = bench.receiver.viewer_stats(bench.viewer)
        if int(stats["packets"] or 0) + int(stats["control_packets"] or 0) >= expect_packets:
            return control
        time.sleep(0.01)
    raise AssertionError(f"fewer than {expect_packets} datagrams arrived")


def test_polled_viewer_leaves_the_epoll_set_and_is_read_by_poll(bench: Bench) -> None:
    bench.key_receiver()
    bench.receiver.set_polled(bench.viewer, True)
    for seq in range(10):
        bench.send(bench.rtp(seq))
    stun_like = bytes.fromhex("0001000021122a442233445566778899aabbccdd")
    bench.send(stun_like)
    # No waiter on the socket any more: the epoll fd stays quiet, drain() reads nothing.
    assert select.select([bench.receiver.fileno()], [], [], 0.05)[0] == []
    assert bench.receiver.drain() == []
    assert bench.receiver.viewer_stats(bench.viewer)["packets"] == 0
    control = _poll_until(bench, 11)
    assert control == [(bench.viewer, stun_like, bench.sender.getsockname())]
    stats = bench.receiver.viewer_stats(bench.viewer)
    assert stats["packets"] == stats["decrypted"] == stats["expected"] == 10
    assert bench.receiver.stats()["polls"] >= 1
    # And back: watched again, the epoll fd signals the next datagram.
    bench.receiver.set_polled(bench.viewer, False)
    bench.send(bench.rtp(10))
    assert select.select([bench.receiver.fileno()], [], [], 5)[0] == [bench.receiver.fileno()]
    bench.drain(12)
    assert bench.receiver.poll() == []


def test_arrival_times_are_the_kernels_receive_timestamps(bench: Bench) -> None:
    bench.key_receiver()
    bench.receiver.set_polled(bench.viewer, True)
    sent_at = time.monotonic()
    bench.send(bench.rtp(1))
    # Read it well after it arrived: the recorded time must be the arrival, not the read.
    time.sleep(0.2)
    read_at = time.monotonic()
    _poll_until(bench, 1)
    first = bench.receiver.viewer_stats(bench.viewer)["first_rtp_at"]
    assert first is not None
    assert sent_at - 0.01 <= first < read_at - 0.1


def test_socket_drops_are_counted_apart_and_show_as_loss() -> None:
    bench = Bench()
    try:
        bench.key_receiver()
        bench.receiver.set_polled(bench.viewer, True)
        # The smallest buffer the kernel allows holds a few datagrams: flood it unread.
        bench.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        payload = b"\x00" * 1000
        for seq in range(200):
            bench.send(bench.rtp(seq, payload=payload))
        bench.receiver.poll()
        bench.send(bench.rtp(200, payload=payload))  # after the gap: the loss is visible
        _poll_until(bench, 1)
        stats = bench.receiver.viewer_stats(bench.viewer)
        drops, lost = int(stats["socket_drops"] or 0), int(stats["lost"] or 0)
        assert drops > 0
        # Every datagram was RTP: each one the socket dropped is a sequence gap.
        assert lost == drops
        assert int(stats["packets"] or 0) + lost == 201
    finally:
        bench.close()


# --- report -------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None


def _result(index: int, **fields: object) -> ViewerResult:
    result = ViewerResult(index=index)
    for name, value in fields.items():
        setattr(result, name, value)
    return result


def test_summary_reports_failures_and_answers() -> None:
    viewers = [
        _result(
            0,
            outcome="connected",
            status=201,
            answered=0.002,
            ice_connected=0.004,
            dtls_connected=0.006,
            first_rtp=0.01,
            first_keyframe=0.3,
            bitrate=5e5,
            counters={"packets": 100, "bytes": 1000, "lost": 2, "expected": 100},
        ),
        _result(1, outcome="rejected", status=503, error="HTTP 503"),
        _result(2, outcome="failed", status=201, error="not connected within 10 s"),
    ]
    samples = [Sample(1.0, 3, 1, 1, 1, 1000, 2, 100), Sample(2.0, 3, 1, 1, 1, 126000, 2, 200)]
    report = summarize(
        url="http://x/whep/a",
        options={},
        viewers=viewers,
        samples=samples,
        wall_seconds=2.0,
        cpu_seconds=0.5,
    )
    summary = report.summary
    assert summary["answers"] == {"201": 2, "503": 1}
    assert (summary["connected"], summary["rejected"], summary["failed"]) == (1, 1, 1)
    assert summary["latency_ms"]["first_keyframe"]["p50"] == pytest.approx(300)
    assert summary["loss_percent"]["max"] == pytest.approx(2.0)
    assert summary["harness_cpu_percent"] == pytest.approx(25.0)
    assert report.timeline[1]["mbps"] == pytest.approx(1.0)
    assert not report.all_viewers_received_media
    text = render_text(report)
    assert "503 x1" in text and "not connected within 10 s x1" in text
    page = render_html(report)
    assert page.count("<svg") == len(REPORT_CHARTS) and "<script" not in page
    assert all(f'id="chart-{name}"' in page for name in REPORT_CHARTS)
    assert json.loads(report.to_json())["summary"]["viewers"] == 3


def test_loadtest_options_are_validated() -> None:
    with pytest.raises(ValueError):
        LoadTestOptions(url="http://x/whep/a", viewers=0)
    with pytest.raises(ValueError):
        LoadTestOptions(url="http://x/whep/a", viewers=1, verify_every=0)
    with pytest.raises(ValueError):
        LoadTestOptions(url="http://x/whep/a", viewers=1, poll_interval=-0.001)
    with pytest.raises(ValueError):
        LoadTestOptions(url="http://x/whep/a", viewers=1, poll_interval=1.0)
    assert LoadTestOptions(url="http://x/whep/a", viewers=1, poll_interval=0).poll_interval == 0


# --- whole runs -------------------------------------------------------------------------------


def _wait_for_line(path: Path, pattern: str, process: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text(errors="replace"))
        if match:
            return match
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {path}:\n{path.read_text(errors='replace')}")


class Deployment:
    """``whepfan serve`` and ``whepfan publish`` as the user runs them, on loopback."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        serve_log = workdir / "serve.log"
        serve = self._start(
            serve_log,
            "serve",
            "--http",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--public-ip",
            "127.0.0.1",
            "--publish-token",
            TOKEN,
            "--log-level",
            "info",
            *extra,
        )
        self.url = _wait_for_line(serve_log, r"WHIP on (http://127\.0\.0\.1:\d+)/whip", serve)[1]
        publish_log = workdir / "publish.log"
        publish = self._start(
            publish_log,
            "publish",
            f"{self.url}/whip/live",
            "--token",
            TOKEN,
            "--size",
            "320x240",
            "--bitrate",
            "400k",
            "--keyframe-interval",
            "1",
            "--duration",
            "60",
        )
        _wait_for_line(publish_log, r"publishing to", publish)

    def _start(self, log: Path, *args: str) -> subprocess.Popen[bytes]:
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "whepfan.cli", *args], stdout=output, stderr=output
            )
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def _loadtest(url: str, tmp_path: Path, *args: str) -> tuple[int, dict[str, object]]:
    report = tmp_path / "report.json"
    status = whepfan_main(
        [
            "loadtest",
            url,
            "--json",
            str(report),
            "--html",
            str(tmp_path / "report.html"),
            "--quiet",
            *args,
        ]
    )
    return status, json.loads(report.read_text())


@pytest.mark.slow
def test_fifty_viewers_against_whepfan_serve_fed_by_whepfan_publish(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path)
    try:
        status, report = _loadtest(
            f"{deployment.url}/whep/live",
            tmp_path,
            "--viewers",
            "50",
            "--ramp",
            "50",
            "--duration",
            "3",
        )
    finally:
        deployment.close()
    viewers = report["viewers"]
    assert isinstance(viewers, list) and len(viewers) == 50
    assert status == 0
    for viewer in viewers:
        assert viewer["outcome"] == "connected", viewer
        assert viewer["status"] == 201
        counters = viewer["counters"]
        assert counters["packets"] > 50, viewer
        assert counters["decrypt_failures"] == 0, viewer
        assert counters["lost"] == 0, viewer
        assert counters["socket_drops"] == 0, viewer
        # SRTP can arrive in the same recvmmsg batch as the DTLS Finished, before the
        # keys are set: counted as unkeyed, never as a failure.
        verified = counters["decrypted"] + counters["unkeyed"]
        assert verified == counters["packets"] - counters["duplicates"], viewer
        assert viewer["first_keyframe"] is not None, viewer
    summary = report["summary"]
    assert isinstance(summary, dict)
    assert summary["connected"] == summary["received_media"] == 50
    assert (tmp_path / "report.html").read_text().count("<svg") == len(REPORT_CHARTS)


@pytest.mark.slow
def test_server_limited_to_ten_viewers_answers_503_to_the_rest(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, "--max-viewers", "10")
    try:
        status, report = _loadtest(
            f"{deployment.url}/whep/live",
            tmp_path,
            "--viewers",
            "15",
            "--ramp",
            "30",
            "--duration",
            "1",
            "--verify-every",
            "8",
        )
    finally:
        deployment.close()
    assert status == 3  # not every viewer got media
    viewers = report["viewers"]
    assert isinstance(viewers, list)
    connected = [v for v in viewers if v["outcome"] == "connected"]
    rejected = [v for v in viewers if v["outcome"] == "rejected"]
    assert len(connected) == 10
    assert len(rejected) == 5 and all(v["status"] == 503 for v in rejected)
    assert all(v["counters"]["decrypt_failures"] == 0 for v in connected)
    assert report["summary"]["answers"] == {"201": 10, "503": 5}  # type: ignore[index]


# --- an aiortc-based WHEP server ------------------------------------------------------------


class SmallPattern(MediaStreamTrack):
    """A 160x120 moving bar at 15 fps: cheap for aiortc to encode once per viewer."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._index / 15
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        # Straight into yuv420p: MediaRelay hands the same frame object to every viewer's
        # encoder thread, and aiortc would otherwise reformat it in each of them at once
        # (PyAV frames are not thread-safe; that crashes the interpreter).
        planes = np.full((180, 160), 128, dtype=np.uint8)
        planes[:120] = 16
        planes[:120, (self._index * 4) % 150 : (self._index * 4) % 150 + 10] = 235
        frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
        frame.pts = self._index * 6000
        frame.time_base = fractions.Fraction(1, 90000)
        self._index += 1
        return frame


class AiortcWhepServer:
    """A WHEP server as the aiortc examples build one: an RTCPeerConnection per viewer,
    a MediaRelay fanning out one source, aiohttp for signalling; on its own loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.peers: dict[str, RTCPeerConnection] = {}
        self.url = ""
        ready = threading.Event()
        self.stop = asyncio.Event()

        async def serve() -> None:
            relay = MediaRelay()
            video, audio = SmallPattern(), AudioStreamTrack()

            async def offer(request: web.Request) -> web.Response:
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                await pc.setRemoteDescription(
                    RTCSessionDescription(sdp=await request.text(), type="offer")
                )
                for transceiver in pc.getTransceivers():
                    source = video if transceiver.kind == "video" else audio
                    transceiver.sender.replaceTrack(relay.subscribe(source))
                    transceiver.direction = "sendonly"
                await pc.setLocalDescription(await pc.createAnswer())
                session = f"s{len(self.peers)}"
                self.peers[session] = pc
                return web.Response(
                    status=201,
                    text=pc.localDescription.sdp,
                    content_type="application/sdp",
                    headers={"Location": f"/whep/live/{session}"},
                )

            async def delete(request: web.Request) -> web.Response:
                pc = self.peers.pop(request.match_info["session"], None)
                if pc is None:
                    return web.Response(status=404)
                await pc.close()
                return web.Response(status=200)

            app = web.Application()
            app.router.add_post("/whep/live", offer)
            app.router.add_delete("/whep/live/{session}", delete)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}/whep/live"
            ready.set()
            await self.stop.wait()
            for pc in list(self.peers.values()):
                await pc.close()
            video.stop()
            audio.stop()
            await runner.cleanup()
            current = asyncio.current_task()
            pending = [task for task in asyncio.all_tasks() if task is not current]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        self.thread = threading.Thread(
            target=lambda: self.loop.run_until_complete(serve()), daemon=True
        )
        self.thread.start()
        assert ready.wait(10), "aiortc WHEP server did not start"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(20)


@pytest.fixture
def aiortc_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[AiortcWhepServer]:
    # aioice skips loopback when gathering; everything here stays on 127.0.0.1.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    server = AiortcWhepServer()
    yield server
    server.close()


async def test_loadtest_against_an_aiortc_whep_server(aiortc_server: AiortcWhepServer) -> None:
    # aiortc encodes once per viewer in Python threads: few viewers, time for the first
    # keyframe even on a busy machine.
    options = LoadTestOptions(url=aiortc_server.url, viewers=2, ramp=10, duration=5)
    report = await LoadTest(options).run()
    assert report.summary["connected"] == 2, report.summary
    for viewer in report.viewers:
        counters = viewer["counters"]
        assert viewer["dtls_connected"] is not None
        assert counters["packets"] > 20, viewer
        assert counters["decrypted"] > 0 and counters["decrypt_failures"] == 0, viewer
        assert counters["streams"] == 2, viewer  # audio and video
        assert viewer["first_keyframe"] is not None, viewer
    assert report.all_viewers_received_media
    # The run ended every session with DELETE.
    await asyncio.sleep(0.2)
    assert not aiortc_server.peers


# --- stalls (issue 15), on virtual time ---------------------------------------------------


def _watch(gap: float = 2.0, ready_at: float = 10.0) -> StallWatch:
    return StallWatch(gap=gap, ready_at=ready_at)


def test_a_steady_stream_never_stalls() -> None:
    watch = _watch()
    now = 10.0
    for _ in range(100):
        now += 0.25
        watch.observe(now, now - 0.02)  # a packet 20 ms before every check
    watch.finish(now + 0.25, now)
    assert (watch.stalls, watch.stalled) == (0, False)
    assert watch.longest_gap == pytest.approx(0.25)


def test_a_silence_over_the_gap_is_one_stall_however_many_checks_see_it() -> None:
    watch = _watch()
    watch.observe(11.0, 10.9)
    for now in (12.0, 13.0, 14.0, 15.0):  # nothing after 10.9
        watch.observe(now, 10.9)
    assert watch.stalls == 1 and watch.stalled
    watch.observe(15.5, 15.4)  # media again: the stall is over
    assert not watch.stalled
    watch.finish(16.0, 15.9)
    assert watch.stalls == 1 and not watch.stalled
    # Seen up to the last silent check (15.0); the packet at 15.4 came after it.
    assert watch.longest_gap == pytest.approx(15.0 - 10.9)


def test_two_separate_silences_are_two_stalls_and_the_longest_is_kept() -> None:
    watch = _watch()
    watch.observe(13.0, 10.0)  # 3 s quiet
    watch.observe(13.5, 13.4)
    watch.observe(19.0, 13.4)  # 5.6 s quiet
    watch.observe(19.5, 19.4)
    assert watch.stalls == 2
    assert watch.longest_gap == pytest.approx(5.6)


def test_a_silence_exactly_at_the_gap_is_not_a_stall() -> None:
    watch = _watch(gap=2.0)
    watch.observe(12.0, 10.0)
    assert watch.stalls == 0
    watch.observe(12.25, 10.0)
    assert watch.stalls == 1


def test_a_viewer_that_stops_until_the_end_of_the_run_is_stalled_at_the_end() -> None:
    """The issue's case: the last check is the end of the run, and a silence that has not
    ended by then counts up to it, even if no check in between saw it pass the gap."""
    watch = _watch(gap=2.0)
    watch.observe(11.0, 10.95)
    watch.observe(12.0, 11.5)  # the last packet, at 11.5
    watch.finish(30.5, 11.5)  # 19 s later the run ends
    assert watch.stalls == 1 and watch.stalled
    assert watch.longest_gap == pytest.approx(19.0)
    watch.observe(40.0, 39.0)  # after finish(): nothing changes
    assert watch.longest_gap == pytest.approx(19.0) and watch.stalled


def test_a_viewer_that_never_receives_is_silent_from_when_its_keys_were_set() -> None:
    watch = _watch(gap=2.0, ready_at=10.0)
    watch.observe(11.0, None)
    assert watch.stalls == 0
    watch.finish(15.0, None)
    assert watch.stalls == 1 and watch.longest_gap == pytest.approx(5.0)


def test_stall_checks_happen_four_times_per_gap_and_at_least_every_quarter_second() -> None:
    assert check_interval(2.0) == 0.25
    assert check_interval(0.5) == 0.125
    assert check_interval(60.0) == 0.25


def test_the_stall_gap_is_validated() -> None:
    assert LoadTestOptions(url="http://x/whep/a", viewers=1).stall_gap == 2.0
    with pytest.raises(ValueError, match="stall-gap"):
        LoadTestOptions(url="http://x/whep/a", viewers=1, stall_gap=0.1)


# --- refusals and the server's /metrics, as data -----------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "retry_after", "summary"),
    [
        (
            409,
            '{"title":"Conflict","status":409,"detail":"stream \'live\' is not live"}',
            "5",
            "HTTP 409 Conflict: stream 'live' is not live (Retry-After 5)",
        ),
        (503, '{"title":"Service Unavailable","status":503}', None, "HTTP 503 Service Unavailable"),
        (  # cut short at 300 characters: not JSON any more, said as text
            400,
            '{"title":"Bad Request","detail":"x',
            None,
            'HTTP 400 Bad Request: {"title":"Bad Request","detail":"x',
        ),
        (502, "<html><body><h1>502 Bad Gateway</h1></body></html>", None, "HTTP 502 Bad Gateway"),
        (403, "no such\n token ", None, "HTTP 403 Forbidden: no such token"),
        (599, "", None, "HTTP 599"),
    ],
)
def test_an_error_answer_reads_as_the_servers_problem_detail(
    status: int, body: str, retry_after: str | None, summary: str
) -> None:
    assert problem_summary(status, body, retry_after=retry_after) == summary


METRICS_TEXT = """\
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
# HELP whepfan_viewers Viewer sessions (any state) per worker.
# TYPE whepfan_viewers gauge
whepfan_viewers{worker="0"} 3.0
whepfan_viewers{worker="1"} 4.0
# HELP whepfan_worker_receive_delay_seconds Longest a datagram waited.
# TYPE whepfan_worker_receive_delay_seconds gauge
whepfan_worker_receive_delay_seconds{worker="0"} 0.004
whepfan_worker_receive_delay_seconds{worker="1"} 0.25
"""


def test_server_metrics_are_read_from_the_prometheus_text() -> None:
    assert server_metrics_from_text(METRICS_TEXT) == {
        "cpu_seconds": 12.5,
        "receive_delay": 0.25,  # the worst worker
        "server_viewers": 7.0,
    }
    # Another exporter: nothing of ours in it, so nothing to plot.
    other = "# TYPE up gauge\nup 1\n"
    assert server_metrics_from_text(other) == dict.fromkeys(
        ("cpu_seconds", "receive_delay", "server_viewers")
    )
    with pytest.raises(ValueError):
        server_metrics_from_text("this is { not prometheus text\n")


def test_server_cpu_is_a_rate_and_a_counter_reset_has_none() -> None:
    samples = [
        ServerSample(time=1.0, viewers=0, cpu_seconds=10.0),
        ServerSample(time=2.0, viewers=5, cpu_seconds=10.5),
        ServerSample(time=4.0, viewers=10, cpu_seconds=11.5),
        ServerSample(time=5.0, viewers=10, cpu_seconds=0.2),  # the server restarted
        ServerSample(time=6.0, viewers=10, cpu_seconds=None),
    ]
    report = summarize(
        url="http://x/whep/a",
        options={},
        viewers=[],
        samples=[],
        wall_seconds=6.0,
        cpu_seconds=0.1,
        server_samples=samples,
    )
    assert [row["cpu_percent"] for row in report.server_timeline] == [
        None,
        pytest.approx(50.0),
        pytest.approx(50.0),
        None,
        None,
    ]


def _stalled_report() -> LoadTestReport:
    """Three viewers: one fine, one that stalled and recovered, one silent to the end."""
    counters = {"packets": 500, "bytes": 400_000, "lost": 5, "expected": 505}
    common = {
        "outcome": "connected",
        "status": 201,
        "answered": 0.01,
        "ice_connected": 0.02,
        "dtls_connected": 0.03,
        "first_rtp": 0.05,
        "first_keyframe": 0.4,
        "bitrate": 4e5,
        "counters": counters,
    }
    viewers = [
        _result(0, **common, longest_gap=0.1),
        _result(1, **common, stalls=1, longest_gap=3.5),
        _result(2, **common, stalls=1, longest_gap=19.0, stalled_at_end=True),
    ]
    samples = [
        Sample(float(t), 3, 3, 0, 0, t * 100_000, t, t * 100, packets=t * 120, stalled=t // 5)
        for t in range(1, 12)
    ]
    server = [
        ServerSample(time=float(t), viewers=3, cpu_seconds=t * 0.3, receive_delay=0.002 * t)
        for t in range(1, 12)
    ]
    return summarize(
        url="http://x/whep/a",
        options={},
        viewers=viewers,
        samples=samples,
        wall_seconds=11.0,
        cpu_seconds=0.5,
        server_samples=server,
        stall_gap=2.0,
        measured_until=11.0,
    )


def test_stalls_count_against_the_run() -> None:
    report = _stalled_report()
    stalls = report.summary["stalls"]
    assert stalls == {
        "gap_seconds": 2.0,
        "viewers": 2,
        "stalls": 2,
        "stalled_at_end": 1,
        "longest_gap_seconds": 19.0,
    }
    # Everyone connected and got media: only the stalls fail it.
    assert report.all_viewers_received_media
    assert not report.passed
    assert report.problems == ["2 of 3 viewers stalled (no media for over 2 s; 1 until the end)"]
    text = render_text(report)
    assert "3 connected, 3 received media, 0 failed, 0 rejected, 2 stalled" in text
    assert "#2 19.0 s (to the end), #1 3.5 s" in text
    assert text.splitlines()[-1] == "verdict: FAIL: " + report.problems[0]


def test_the_html_report_has_every_chart_with_unique_ids() -> None:
    page = render_html(_stalled_report())
    charts = (*REPORT_CHARTS, "server-cpu", "server-delay")
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "duplicate ids across the inline SVGs"
    for name in charts:
        figure = page[page.index(f'id="chart-{name}"') :]
        figure = figure[: figure.index("</figure>")]
        # Axes with ticks and units, and a line, area or markers drawn on them.
        assert figure.count("<svg") == 1
        assert f'id="{name}-xtick_1"' in figure and f'id="{name}-ytick_1"' in figure
        assert re.search(r"\((s|ms|%|Mbit/s)[ )]|packets/s", figure), name
        assert re.search(r'<g id="[^"]*(line2d|patch|PathCollection)_\d+">\s*<path', figure), name
    assert 'class="verdict fail"' in page and '<tr class="stalled">' in page
    assert "<script" not in page


async def test_every_viewer_refused_stops_the_run_early_with_the_problem_detail(
    tmp_path: Path,
) -> None:
    server = await asyncio.to_thread(live_server)
    try:
        options = LoadTestOptions(
            url=f"{server.url}/whep/nobody-publishes", viewers=200, ramp=50, duration=30
        )
        started = time.monotonic()
        report = await LoadTest(options).run()
        elapsed = time.monotonic() - started
    finally:
        await asyncio.to_thread(server.close)
    summary = report.summary
    # The ramp alone would take 4 s and the run 34 s; it stopped once ten were refused.
    assert GIVE_UP_AFTER_REFUSALS <= summary["viewers"] < 200
    assert elapsed < options.duration
    assert summary["rejected"] == summary["viewers"]
    assert summary["stopped_early"].startswith("the server refused every viewer")
    [(error, count)] = summary["errors"].items()
    assert error.startswith("HTTP 409 Conflict: ") and "nobody-publishes" in error, error
    assert count == summary["viewers"]
    assert not report.passed
    text = render_text(report)
    assert f"{error} x{count}" in text and "stopped early" in text


async def test_a_server_nobody_reaches_stops_the_run_early() -> None:
    """Nothing listens on the port (the server is down): every POST fails to connect, and
    the run stops after the first few instead of waiting out its 30 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    options = LoadTestOptions(
        url=f"http://127.0.0.1:{port}/whep/live", viewers=200, ramp=50, duration=30
    )
    started = time.monotonic()
    report = await LoadTest(options).run()
    assert time.monotonic() - started < 10
    summary = report.summary
    assert GIVE_UP_AFTER_REFUSALS <= summary["viewers"] < 200
    assert summary["stopped_early"].startswith("no viewer reached the server (POST failed: ")
    assert summary["failed"] == summary["viewers"] and not report.passed


def test_whepfan_loadtest_exits_4_when_every_viewer_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = live_server()
    try:
        status, report = _loadtest(
            f"{server.url}/whep/nobody-publishes", tmp_path, "--viewers", "20", "--ramp", "40"
        )
    finally:
        server.close()
    assert status == EXIT_EVERY_VIEWER_REFUSED
    assert report["summary"]["stopped_early"]  # type: ignore[index]
    assert "HTTP 409 Conflict: " in capsys.readouterr().out


@pytest.mark.slow
def test_viewers_whose_sessions_end_mid_run_are_reported_stalled(tmp_path: Path) -> None:
    """Two of six viewers' sessions are DELETEd out of band while the run goes on: they
    stop receiving until its end, which loss cannot show (no sequence gap follows). The
    run also scrapes the server's /metrics, behind its token."""
    deployment = Deployment(tmp_path, "--metrics-token", "scrape-me")
    ended: list[int] = []

    async def run() -> LoadTestReport:
        options = LoadTestOptions(
            url=f"{deployment.url}/whep/live",
            viewers=6,
            ramp=20,
            duration=8,
            stall_gap=2.0,
            server_metrics=f"{deployment.url}/metrics",
            server_metrics_token="scrape-me",
        )
        test = LoadTest(options)
        running = asyncio.create_task(test.run())

        def receiving() -> bool:
            return len(test.viewers) == 6 and all(
                viewer.counters_now().get("last_rtp_at") is not None for viewer in test.viewers
            )

        while not receiving():
            assert not running.done(), running
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            for viewer in test.viewers[:2]:
                assert viewer.location is not None
                async with http.delete(viewer.location) as response:
                    assert response.status == 200
                ended.append(viewer.result.index)
        return await running

    try:
        report = asyncio.run(run())
    finally:
        deployment.close()
    html_page = render_html(report)
    (tmp_path / "report.html").write_text(html_page)
    summary = report.summary
    measured_until = summary["measured_until"]
    assert summary["connected"] + summary["failed"] == 6
    assert summary["received_media"] == 6
    for viewer in report.viewers:
        if viewer["index"] in ended:
            assert viewer["stalls"] == 1, viewer
            assert viewer["stalled_at_end"], viewer
            # The gap runs from its last packet to the end of the run.
            last = viewer["started_at"] + viewer["last_rtp"]
            assert viewer["longest_gap"] == pytest.approx(measured_until - last)
            assert viewer["longest_gap"] > 2.0
            assert viewer["counters"]["lost"] == 0  # what made the stall invisible before
        else:
            assert viewer["stalls"] == 0 and not viewer["stalled_at_end"], viewer
            assert viewer["longest_gap"] < 2.0, viewer
    assert summary["stalls"]["viewers"] == summary["stalls"]["stalled_at_end"] == 2
    assert not report.passed
    assert report.problems[-1] == "2 of 6 viewers stalled (no media for over 2 s; 2 until the end)"
    # /metrics was scraped with the token: CPU as a rate, the worker's receive delay.
    assert summary["server_metrics_errors"] == {}
    server = report.server_timeline
    assert len(server) >= 8
    assert all(row["cpu_percent"] is not None for row in server[1:])
    assert all(row["receive_delay"] is not None for row in server)
    assert 'id="chart-server-cpu"' in html_page and 'id="chart-server-delay"' in html_page


def _viewer_only_worker(serve_log: Path) -> int:
    """The pid of a worker of ``whepfan serve --workers 2`` that does not hold the
    publisher, from the log lines "worker N (pid P)" and "workerN ...: publisher"."""
    text = serve_log.read_text()
    pids = {int(n): int(pid) for n, pid in re.findall(r"worker (\d+) \(pid (\d+)\)", text)}
    publishing = {int(n) for n in re.findall(r"worker(\d+) whepfan\.router: publisher", text)}
    assert len(pids) == 2 and len(publishing) == 1, text
    [pid] = [pid for worker, pid in pids.items() if worker not in publishing]
    return pid


@pytest.mark.slow
def test_viewers_of_a_killed_worker_are_reported_stalled_to_the_end(tmp_path: Path) -> None:
    """Issue 15 as reported: a worker dies mid-run; its viewers get no close_notify, no
    ICE failure within the run (consent lasts 30 s, RFC 7675 §5.1) and no sequence gap,
    so they looked "connected, 0 loss" while receiving nothing until the end."""
    deployment = Deployment(tmp_path, "--workers", "2")
    gap = 2.0

    async def run() -> LoadTestReport:
        options = LoadTestOptions(
            url=f"{deployment.url}/whep/live", viewers=6, ramp=20, duration=8, stall_gap=gap
        )
        test = LoadTest(options)
        running = asyncio.create_task(test.run())
        while len(test.viewers) < 6 or any(
            viewer.counters_now().get("last_rtp_at") is None for viewer in test.viewers
        ):
            assert not running.done(), running
            await asyncio.sleep(0.05)
        os.kill(_viewer_only_worker(tmp_path / "serve.log"), signal.SIGKILL)
        return await running

    try:
        report = asyncio.run(run())
    finally:
        deployment.close()
    summary = report.summary
    end = summary["measured_until"]
    stalled = [v for v in report.viewers if v["stalls"]]
    # Least-loaded placement spreads six viewers over both workers; the killed one did
    # not hold the publisher, so the viewers of the other kept receiving.
    assert 1 <= len(stalled) <= 5
    for viewer in report.viewers:
        silent_for = end - (viewer["started_at"] + viewer["last_rtp"])
        if viewer in stalled:
            assert viewer["outcome"] == "connected", viewer  # nothing told it otherwise
            assert viewer["counters"]["lost"] == 0, viewer
            assert viewer["stalls"] == 1 and viewer["stalled_at_end"], viewer
            assert viewer["longest_gap"] == pytest.approx(silent_for) and silent_for > gap
        else:
            assert viewer["longest_gap"] < gap and silent_for < gap, viewer
    assert summary["stalls"]["viewers"] == summary["stalls"]["stalled_at_end"] == len(stalled)
    assert summary["connected"] == 6
    assert not report.passed
    assert f"{len(stalled)} of 6 viewers stalled" in render_text(report)


async def test_a_refused_scrape_is_reported_with_its_reason_and_no_token_is_in_the_report() -> None:
    server = await asyncio.to_thread(live_server, metrics_token="the-right-one")
    try:
        options = LoadTestOptions(
            url=f"{server.url}/whep/nobody-publishes",
            viewers=1,
            token="viewer-secret",
            server_metrics=f"{server.url}/metrics",
            server_metrics_token="a-wrong-one",
        )
        report = await LoadTest(options).run()
    finally:
        await asyncio.to_thread(server.close)
    errors = report.summary["server_metrics_errors"]
    [(reason, count)] = errors.items()
    assert reason.startswith("HTTP 401 Unauthorized"), errors
    assert count >= 1 and report.server_timeline == []
    assert f"server metrics: {reason} x{count}" in render_text(report)
    serialized = report.to_json()
    assert "viewer-secret" not in serialized and "a-wrong-one" not in serialized
    assert report.options["token"] == report.options["server_metrics_token"] == "(set)"
