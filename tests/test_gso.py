"""UDP GSO fan-out (Fanout.push_batch, whepfan/media/gso.py) on real loopback sockets.

Every datagram a viewer socket receives is one GSO segment cut by the kernel; each is
unprotected by libsrtp (pylibsrtp) with that viewer's keys, so a segment boundary in the
wrong place, a shared keystream or a wrong tag fails here. Behaviour must equal push()
packet by packet: the same viewer-visible stream from a Fanout fed one packet at a time
is the oracle for keyframe gating and VP8 temporal dropping.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from _peers import (
    DecodingViewer,
    InProcessViewer,
    only_loopback_candidates,
    publish_in_process,
    wait_until,
)
from _server import TOKEN, live_server
from _signalling import exchange
from aiortc.rtcdtlstransport import RTCDtlsTransport
from test_fanout import (
    PROFILES,
    Viewer,
    attach,
    key_arguments,
    make_keys,
    new_viewer,
    open_sender,
    open_viewer,
    parse_rtp,
    rtp_packet,
    sender,
    viewers,
)

from whepfan._fastpath import (
    PAYLOAD_VP8,
    PROFILE_AEAD_AES_128_GCM,
    PROFILE_AES128_CM_SHA1_80,
    Fanout,
    Receiver,
    measure_send_limit,
)
from whepfan.client.publisher import Publisher, PublisherOptions
from whepfan.config import MediaConfig
from whepfan.media import gso
from whepfan.media.transport import MediaWorker
from whepfan.protocol.codecs import Vp8PayloadDescriptor
from whepfan.protocol.dtls import DtlsCertificate

__all__ = ["sender", "viewers"]  # fixtures shared with test_fanout

BENCH_FANOUT = Path(__file__).resolve().parent.parent / "bench" / "fanout.py"

SO_NO_CHECK = 11  # socket(7): no UDP checksums on send; the kernel then refuses GSO

pytestmark = pytest.mark.skipif(
    not gso.kernel_supports_gso(), reason="this kernel has no UDP_SEGMENT (Linux < 4.18)"
)


def gso_fanout(sock: socket.socket, **options: int) -> Fanout:
    return Fanout(sock.fileno(), max_viewers=64, batch_size=64, gso=True, **options)


def burst(lengths: list[int], *, first_seq: int = 100, timestamp: int = 9000) -> list[bytes]:
    """One frame's packets of the given total lengths (12-byte header + payload)."""
    return [
        rtp_packet(
            first_seq + index,
            timestamp,
            payload=bytes([index + 1]) * (length - 12),
            marker=index == len(lengths) - 1,
        )
        for index, length in enumerate(lengths)
    ]


def datagrams_with_source(viewer: Viewer, count: int) -> list[tuple[bytes, str]]:
    out = []
    viewer.sock.settimeout(5.0)
    try:
        for _ in range(count):
            data, address = viewer.sock.recvfrom(4096)
            out.append((data, address[0]))
    finally:
        viewer.sock.setblocking(False)
    assert viewer.pending() == []
    return out


@pytest.mark.parametrize("profile", PROFILES)
def test_a_run_of_equal_packets_is_one_gso_entry_per_viewer(
    sender: socket.socket, viewers: list[Viewer], profile: int
) -> None:
    fanout = gso_fanout(sender)
    track = fanout.add_track()
    audience = [new_viewer(viewers, fanout, profile) for _ in range(3)]
    for viewer in audience:
        fanout.subscribe(
            viewer.slot, track, ssrc=0xA0 + viewer.slot, payload_type=97, wait_keyframe=False
        )
    packets = burst([1200] * 6)
    assert fanout.push_batch(track, packets) == 18
    for viewer in audience:
        received = viewer.receive(6)
        # The kernel cut the entry at gso_size: every segment is one SRTP packet.
        assert len({len(datagram) for datagram in received}) == 1
        views = [parse_rtp(viewer.inbound.unprotect(datagram)) for datagram in received]
        assert [view.payload for view in views] == [packet[12:] for packet in packets]
        assert [(view.seq - views[0].seq) % 65536 for view in views] == list(range(6))
        assert {view.ssrc for view in views} == {0xA0 + viewer.slot}
        assert fanout.viewer_stats(viewer.slot)["packets_sent"] == 6
    stats = fanout.stats()
    assert stats["gso_messages"] == 3
    assert stats["gso_segments"] == 18
    assert stats["packets_sent"] == 18
    assert stats["padded_packets"] == 0


def test_near_equal_packets_are_padded_into_one_run(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    # Chromium's packetizer: sizes a byte apart, the frame's last packet shorter.
    fanout = gso_fanout(sender)
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=7, payload_type=96, wait_keyframe=False)
    lengths = [1180, 1181, 1181, 1180, 1181, 700]
    packets = burst(lengths)
    padded_publisher = rtp_packet(106, 9000, payload=b"\x07" * 1160, padding=8)  # 1180 long
    packets.insert(5, padded_publisher)
    assert fanout.push_batch(track, packets) == 7
    received = viewer.receive(7)
    sizes = [len(datagram) for datagram in received]
    assert len(set(sizes[:-1])) == 1 and sizes[-1] < sizes[0]
    plain = [viewer.inbound.unprotect(datagram) for datagram in received]
    # RFC 3550 §5.1: the viewer strips the padding and gets the publisher's payload.
    assert [parse_rtp(packet).payload for packet in plain] == [
        parse_rtp(packet).payload for packet in packets
    ]
    # Padded to 1181: the count octet (with the publisher's own 8 octets of padding in
    # the sixth); the others end in payload.
    assert [packet[-1] for packet in plain[:-1]] == [1, 2, 3, 1, 5, 9]
    assert [bool(packet[0] & 0x20) for packet in plain] == [
        True,
        False,
        False,
        True,
        False,
        True,
        False,
    ]
    stats = fanout.stats()
    assert stats["gso_messages"] == 1 and stats["gso_segments"] == 7
    assert stats["padded_packets"] == 3 and stats["padding_bytes"] == 3
    # RFC 3550 §6.4.1: the sender's octet count is payload only, without our padding.
    fanout.send_sender_reports(track, 1 << 32, 0)
    report = viewer.inbound.unprotect_rtcp(viewer.receive(1)[0])
    assert struct.unpack_from("!I", report, 24)[0] == sum(len(p) - 12 for p in packets[:5]) + (
        1160 + 688
    )


def test_unequal_packets_go_as_plain_entries(sender: socket.socket, viewers: list[Viewer]) -> None:
    fanout = gso_fanout(sender, pad_limit=0)
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=7, payload_type=96, wait_keyframe=False)
    # 1000 then 1100 cannot share an entry (a longer segment after a shorter one);
    # 1100 + 900 can (the last segment may be shorter), and that closes the entry; the
    # two 800s share one; 1200 is longer again.
    lengths = [1000, 1100, 900, 800, 800, 1200]
    assert fanout.push_batch(track, burst(lengths)) == 6
    plain = viewer.receive_rtp(6)
    assert [len(packet) for packet in plain] == lengths
    stats = fanout.stats()
    assert stats["gso_messages"] == 2 and stats["gso_segments"] == 4
    assert stats["padded_packets"] == 0
    # A single packet is a plain entry.
    fanout.push_batch(track, burst([1000], first_seq=200))
    assert len(viewer.receive_rtp(1)) == 1
    assert fanout.stats()["gso_messages"] == 2


def test_gso_off_sends_the_same_runs_one_datagram_per_entry(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno(), max_viewers=8, batch_size=64, gso=False)
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=7, payload_type=96, wait_keyframe=False)
    packets = burst([1181, 1180, 1181])
    assert fanout.push_batch(track, packets) == 3
    assert [len(packet) for packet in viewer.receive_rtp(3)] == [1181, 1180, 1181]
    stats = fanout.stats()
    assert stats["gso"] is False
    assert stats["gso_messages"] == 0 and stats["padded_packets"] == 0
    assert stats["sendmmsg_calls"] == 1


def vp8_stream(count: int, seed: int) -> list[tuple[bytes, bool]]:
    """A VP8 stream with temporal layers L1T3 (TIDs 0 2 1 2 ...), several packets per
    picture, a keyframe every 10 pictures, unequal packet sizes."""
    rng = random.Random(seed)
    out: list[tuple[bytes, bool]] = []
    picture = 0
    seq = 65530  # crosses the 16-bit wrap
    while len(out) < count:
        tid = (0, 2, 1, 2)[picture % 4]
        keyframe_picture = picture % 10 == 0
        parts = rng.randint(1, 5)
        for part in range(parts):
            descriptor = Vp8PayloadDescriptor(
                start_of_partition=part == 0,
                picture_id=picture & 0x7FFF,
                tl0_pic_idx=(picture // 4) & 0xFF,
                temporal_layer=tid,
                layer_sync=tid > 0 and picture % 8 == 1,
            )
            body = bytes([picture & 0xFF]) * rng.choice([1000, 1000, 1001, 600])
            packet = rtp_packet(seq & 0xFFFF, picture * 3000, payload=descriptor.serialize() + body)
            out.append((packet, keyframe_picture and part == 0))
            seq += 1
        picture += 1
    return out[:count]


def relative(views: list[bytes]) -> list[tuple[int, int, bytes]]:
    parsed = [parse_rtp(packet) for packet in views]
    return [
        (
            (view.seq - parsed[0].seq) % 65536,
            (view.timestamp - parsed[0].timestamp) % (1 << 32),
            view.payload,
        )
        for view in parsed
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_per_packet_rules_match_push_one_by_one(viewers: list[Viewer], seed: int) -> None:
    # Keyframe start, the temporal limit (lowered mid-stream) and picture-id rewriting
    # apply per packet exactly as in push(): the viewer fed by push_batch in random
    # bursts sees the same stream as the viewer fed by push.
    stream = vp8_stream(200, seed)
    results = []
    for batched in (False, True):
        rng = random.Random(seed)  # the same bursts, and the limit lowered at the same packet
        sock = open_sender()
        fanout = gso_fanout(sock)
        track = fanout.add_track(payload_format=PAYLOAD_VP8)
        viewer = new_viewer(viewers, fanout)
        fanout.subscribe(viewer.slot, track, ssrc=5, payload_type=96)
        position, received = 1, []  # the first packet is not a keyframe start ...
        fanout.push(track, rtp_packet(65529, 0, payload=b"\x10\x00"), False, 0.0)
        bursts = []
        while position < len(stream):
            size = rng.randint(1, 9)
            bursts.append(stream[position : position + size])
            position += size
        for number, group in enumerate(bursts):
            if number == len(bursts) // 2:
                fanout.set_temporal_layer(viewer.slot, track, 0)
            if batched:
                fanout.push_batch(track, [p for p, _ in group], [k for _, k in group], 1.0)
            else:
                for packet, keyframe in group:
                    fanout.push(track, packet, keyframe, 1.0)
            received += viewer.pending()
        results.append(relative([viewer.inbound.unprotect(d) for d in received]))
        assert fanout.stats()["dropped_temporal_layer"] > 0
        sock.close()
    assert results[0] == results[1]


def test_a_waiting_viewer_starts_at_the_keyframe_inside_a_burst(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = gso_fanout(sender)
    track = fanout.add_track()
    waiting, watching = new_viewer(viewers, fanout), new_viewer(viewers, fanout)
    fanout.subscribe(waiting.slot, track, ssrc=1, payload_type=96)
    fanout.subscribe(watching.slot, track, ssrc=2, payload_type=96, wait_keyframe=False)
    packets = burst([1200] * 5)
    fanout.push_batch(track, packets, [False, False, True, False, False])
    assert [parse_rtp(p).payload for p in waiting.receive_rtp(3)] == [p[12:] for p in packets[2:]]
    assert len(watching.receive_rtp(5)) == 5
    assert fanout.viewer_stats(waiting.slot)["dropped_waiting_keyframe"] == 2


def test_nack_answers_and_sender_reports_after_a_gso_burst(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = gso_fanout(sender)
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(
        viewer.slot,
        track,
        ssrc=9,
        payload_type=96,
        rtx_ssrc=10,
        rtx_payload_type=97,
        wait_keyframe=False,
    )
    packets = burst([1200] * 4)
    fanout.push_batch(track, packets)
    views = [parse_rtp(p) for p in viewer.receive_rtp(4)]
    # RFC 4588 §4: the RTX copy of the third packet, from the cache, as a plain entry.
    assert fanout.resend(viewer.slot, track, [views[2].seq]) == 1
    rtx = parse_rtp(viewer.receive_rtp(1)[0])
    assert rtx.ssrc == 10 and rtx.payload[:2] == struct.pack("!H", views[2].seq)
    assert rtx.payload[2:] == packets[2][12:]
    assert fanout.send_sender_reports(track, 5 << 32, 0) == 1
    report = viewer.inbound.unprotect_rtcp(viewer.receive(1)[0])
    assert struct.unpack_from("!II", report, 20) == (4, 4 * 1188)


def test_source_address_and_segment_size_in_one_msghdr(viewers: list[Viewer]) -> None:
    # A wildcard-bound socket on a multi-homed host: IP_PKTINFO names the source
    # (RFC 3542 §6.1) next to UDP_SEGMENT; every segment must leave from it.
    sock = open_sender(host="0.0.0.0")
    try:
        fanout = gso_fanout(sock)
        track = fanout.add_track()
        viewer = open_viewer(PROFILE_AES128_CM_SHA1_80)
        viewers.append(viewer)
        viewer.slot = fanout.add_viewer(
            "127.0.0.1",
            viewer.port,
            profile=viewer.profile,
            tx_key=viewer.tx_key,
            tx_salt=viewer.tx_salt,
            rx_key=viewer.rx_key,
            rx_salt=viewer.rx_salt,
            source="127.0.0.2",
        )
        fanout.subscribe(viewer.slot, track, ssrc=3, payload_type=96, wait_keyframe=False)
        fanout.push_batch(track, burst([1100] * 6))
        received = datagrams_with_source(viewer, 6)
        assert {source for _, source in received} == {"127.0.0.2"}
        assert len([viewer.inbound.unprotect(data) for data, _ in received]) == 6
        assert fanout.stats()["gso_messages"] == 1
    finally:
        sock.close()


def test_ipv6_socket_sends_gso_runs_to_ipv4_and_ipv6_viewers(viewers: list[Viewer]) -> None:
    sock = open_sender(socket.AF_INET6, "::")
    try:
        fanout = gso_fanout(sock)
        track = fanout.add_track()
        four, six = (
            open_viewer(PROFILE_AEAD_AES_128_GCM),
            open_viewer(PROFILE_AEAD_AES_128_GCM, "::1"),
        )
        viewers.extend([four, six])
        attach(fanout, four)
        attach(fanout, six, "::1")
        for viewer in (four, six):
            fanout.subscribe(viewer.slot, track, ssrc=4, payload_type=96, wait_keyframe=False)
        fanout.push_batch(track, burst([1000] * 3))
        assert len(four.receive_rtp(3)) == 3 and len(six.receive_rtp(3)) == 3
        assert fanout.stats()["gso_messages"] == 2
    finally:
        sock.close()


def test_a_refused_gso_entry_is_resent_one_datagram_per_entry(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    # udp(7): GSO needs UDP checksums; with SO_NO_CHECK the kernel refuses the entry
    # (EINVAL). Its segments go out one per entry and the viewer misses nothing.
    sender.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    fanout = gso_fanout(sender)
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=7, payload_type=96, wait_keyframe=False)
    assert fanout.push_batch(track, burst([1200] * 4)) == 4
    assert len(viewer.receive_rtp(4)) == 4
    stats = fanout.stats()
    assert stats["gso_refused"] == 1 and stats["gso_messages"] == 0
    assert stats["send_errors"] == 0
    # EINVAL is about the entry (it could be a small-MTU route), not the path: GSO stays on.
    assert fanout.gso and fanout.gso_error == 0


def test_runs_longer_than_the_batch_are_split_not_lost(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno(), max_viewers=8, batch_size=8, gso=True)
    track = fanout.add_track()
    audience = [new_viewer(viewers, fanout) for _ in range(3)]
    for viewer in audience:
        fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    packets = burst([900] * 20)
    assert fanout.push_batch(track, packets) == 60
    for viewer in audience:
        views = [parse_rtp(p) for p in viewer.receive_rtp(20)]
        assert [v.payload for v in views] == [p[12:] for p in packets]
    assert fanout.stats()["gso_segments"] == 60


def test_malformed_packets_in_a_burst_are_dropped_alone(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = gso_fanout(sender)
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    packets = burst([800] * 3)
    assert (
        fanout.push_batch(
            track, [packets[0], b"", b"\x00" * 20, packets[1], b"x" * 1501, packets[2]]
        )
        == 3
    )
    assert len(viewer.receive_rtp(3)) == 3
    stats = fanout.stats()
    assert stats["dropped_malformed"] == 2 and stats["dropped_too_large"] == 1
    with pytest.raises(ValueError):
        fanout.push_batch(track, packets, [True])


@pytest.mark.parametrize("segments", [1, 4, 6])
def test_measure_send_limit_with_gso_entries_sends_every_datagram(
    viewers: list[Viewer], segments: int
) -> None:
    sock = open_sender()
    try:
        targets = [open_viewer(PROFILE_AEAD_AES_128_GCM) for _ in range(5)]
        viewers.extend(targets)
        sent, seconds = measure_send_limit(
            sock.fileno(),
            [("127.0.0.1", v.port) for v in targets],
            profile=PROFILE_AEAD_AES_128_GCM,
            packet_size=1200,
            packets=12,
            segments=segments,
        )
        assert sent == 60 and seconds >= 0
        for viewer in targets:
            assert {len(d) for d in viewer.receive(12)} == {1216}
    finally:
        sock.close()


# --- start-up detection and --gso -----------------------------------------------------------


@pytest.fixture
def bound() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_probe_finds_gso_on_this_kernel(bound: socket.socket) -> None:
    assert gso.probe(bound) is None


def test_probe_reports_a_refusing_socket(bound: socket.socket) -> None:
    bound.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    assert gso.probe(bound) is not None


def test_modes(bound: socket.socket, caplog: pytest.LogCaptureFixture) -> None:
    assert gso.resolve("off", bound) is False
    assert gso.resolve("auto", bound) is True
    assert gso.resolve("on", bound) is True
    bound.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    with caplog.at_level("WARNING", logger="whepfan.media.gso"):
        assert gso.resolve("auto", bound) is False
    assert "UDP GSO unavailable" in caplog.text
    with pytest.raises(gso.GsoUnavailable):
        gso.resolve("on", bound)
    with pytest.raises(ValueError):
        gso.resolve("maybe", bound)


def test_unsubscribed_keys_do_not_matter(sender: socket.socket) -> None:
    # push_batch with nobody subscribed caches and counts, sends nothing.
    fanout = gso_fanout(sender)
    track = fanout.add_track()
    fanout.add_viewer(
        "127.0.0.1", 9, profile=PROFILE_AEAD_AES_128_GCM, **key_arguments(PROFILE_AEAD_AES_128_GCM)
    )
    assert fanout.push_batch(track, burst([500] * 3)) == 0
    assert fanout.stats()["pushed"] == 3


# --- end to end: aiortc publisher, aiortc viewers, a real MediaWorker --------------------


@asynccontextmanager
async def gso_worker(mode: str) -> AsyncIterator[MediaWorker]:
    config = MediaConfig(udp_host="127.0.0.1", udp_port=0, public_ips=("127.0.0.1",), gso=mode)
    media = MediaWorker(config=config, certificate=DtlsCertificate.generate())
    await media.start()
    try:
        yield media
    finally:
        media.close()


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus text exposition's samples of ``name``."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


@pytest.mark.slow
async def test_aiortc_viewers_decode_with_gso_and_recover_from_5_percent_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real server (its own loop thread, so the publisher's packets queue up as bursts
    # on its socket), whepfan's publisher at 640x360 / 1.5 Mbit/s (several packets per
    # frame), three aiortc viewers over WHEP; each loses 5 % of its video packets on
    # arrival and gets them back through NACK + RTX from the cache.
    only_loopback_candidates(monkeypatch)
    rng = random.Random(17)
    video_pts: set[int] = set()
    rtx_pts: set[int] = set()
    dropped: set[tuple[int, int]] = set()
    recovered: set[tuple[int, int]] = set()
    original = RTCDtlsTransport._handle_rtp_data

    async def lossy(self: RTCDtlsTransport, data: bytes, arrival_time_ms: int) -> None:
        payload_type = data[1] & 0x7F
        key = id(self)
        if payload_type in video_pts:
            seq = int.from_bytes(data[2:4], "big")
            if (key, seq) not in dropped and rng.random() < 0.05:
                dropped.add((key, seq))
                return
        elif payload_type in rtx_pts and len(data) >= 14:
            header = 12 + 4 * (data[0] & 0x0F)
            if data[0] & 0x10:
                header += 4 + 4 * int.from_bytes(data[header + 2 : header + 4], "big")
            recovered.add((key, int.from_bytes(data[header : header + 2], "big")))
        await original(self, data, arrival_time_ms)

    monkeypatch.setattr(RTCDtlsTransport, "_handle_rtp_data", lossy)
    server = live_server(gso="on")
    viewers = [DecodingViewer() for _ in range(3)]
    try:
        options = PublisherOptions(
            url=f"{server.url}/whip/live", token=TOKEN, bitrate=1_500_000, keyframe_interval=2.0
        )
        async with Publisher(options), aiohttp.ClientSession() as http:
            for viewer in viewers:
                _, answer = await exchange(
                    http, f"{server.url}/whep/live", await viewer.offer(["video", "audio"])
                )
                video_pts.update(int(pt) for pt in re.findall(r"a=rtpmap:(\d+) VP8/", answer))
                rtx_pts.update(int(pt) for pt in re.findall(r"a=rtpmap:(\d+) rtx/", answer))
                await viewer.accept(answer)
            for viewer in viewers:
                await viewer.wait_frames(60, timeout=30.0)
            assert await wait_until(lambda: len(dropped) >= 15, timeout=20.0)
            await wait_until(lambda: dropped <= recovered, timeout=5.0)
            async with http.get(f"{server.url}/metrics") as response:
                exposition = await response.text()
        gso_sent = metric(exposition, "whepfan_gso_sent_packets_total")
        sent = metric(exposition, "whepfan_sent_packets_total")
        assert 'whepfan_worker_send_path{path="gso",worker="0"} 1.0' in exposition
        # Frames' runs of packets went out as GSO entries.
        assert gso_sent > 0
        assert len(dropped & recovered) >= 0.8 * len(dropped), (len(dropped), len(recovered))
        for viewer in viewers:
            frame_a = viewer.video_frames[5].to_ndarray(format="gray")
            frame_b = viewer.video_frames[55].to_ndarray(format="gray")
            assert np.abs(frame_a.astype(int) - frame_b.astype(int)).mean() > 1.0
        print(
            f"GSO: {gso_sent:.0f} of {sent:.0f} packets in GSO entries; "
            f"dropped {len(dropped)}, recovered {len(dropped & recovered)}"
        )
    finally:
        for viewer in viewers:
            await viewer.close()
        server.close()


async def test_gso_off_serves_viewers_one_datagram_per_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    only_loopback_candidates(monkeypatch)
    async with gso_worker("off") as worker:
        assert not worker.gso and not worker.fanout.gso
        publisher = await publish_in_process(worker.router, "live", worker.now(), audio=False)
        viewer = InProcessViewer(worker.router, "live", clock=worker.now)
        try:
            await viewer.start(audio=False)
            await viewer.wait_frames(20, timeout=20.0)
            stats = worker.fanout.stats()
            assert stats["packets_sent"] > 0 and stats["gso_messages"] == 0
        finally:
            await viewer.close()
            await publisher.close()


@pytest.mark.slow
def test_bench_fanout_prints_one_gso_line_per_profile() -> None:
    # bench/fanout.py as a user runs it: the same run's sendmmsg and GSO limits and
    # whepfan with GSO off and on; one line per (viewers, burst, profile) in this form.
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCH_FANOUT),
            "--gso-only",
            "--smoke",
            "--viewers",
            "20",
            "--bursts",
            "1",
            "6",
            "--runs",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = re.findall(
        r"^gso @ 20 viewers, burst (\d), (GCM|CM): (\d+\.\d\d)x the sendmmsg limit, "
        r"(\d+\.\d\d) of the gso limit$",
        completed.stdout,
        re.MULTILINE,
    )
    assert sorted((burst, profile) for burst, profile, _, _ in lines) == [
        ("1", "CM"),
        ("1", "GCM"),
        ("6", "CM"),
        ("6", "GCM"),
    ]
    assert all(float(multiple) > 0 and float(ratio) > 0 for _, _, multiple, ratio in lines)


@pytest.mark.parametrize("gro", [True, False])
def test_load_generator_counts_every_datagram_of_a_gro_run(
    sender: socket.socket, gro: bool
) -> None:
    # The loadtest receiver with UDP_GRO: the kernel hands it the GSO entry as one read
    # with its segment size; split by it, every datagram is counted and SRTP-verified.
    profile = PROFILE_AEAD_AES_128_GCM
    tx_key, tx_salt, rx_key, rx_salt = make_keys(profile)
    fanout = gso_fanout(sender)
    track = fanout.add_track()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    receiver = Receiver(max_viewers=4, gro=gro)
    try:
        slot = receiver.add_viewer(sock.fileno())
        assert receiver.stats()["gro_sockets"] == (1 if gro else 0)
        receiver.set_keys(slot, profile=profile, key=tx_key, salt=tx_salt)
        receiver.set_payload_type(slot, 96, kind="video", clock_rate=90000)
        viewer = fanout.add_viewer(
            "127.0.0.1",
            sock.getsockname()[1],
            profile=profile,
            tx_key=tx_key,
            tx_salt=tx_salt,
            rx_key=rx_key,
            rx_salt=rx_salt,
        )
        fanout.subscribe(viewer, track, ssrc=0x77, payload_type=96, wait_keyframe=False)
        assert fanout.push_batch(track, burst([1200] * 6)) == 6
        assert fanout.push_batch(track, burst([900, 900, 500], first_seq=106)) == 3
        assert receiver.drain() == []
        stats = receiver.viewer_stats(slot)
        assert stats["packets"] == 9 and stats["expected"] == 9 and stats["lost"] == 0
        assert stats["decrypted"] == 9 and stats["decrypt_failures"] == 0
        assert stats["bytes"] == 6 * 1216 + 2 * 916 + 516
        assert (stats["coalesced_reads"] == 2) if gro else (stats["coalesced_reads"] == 0)
    finally:
        sock.close()
