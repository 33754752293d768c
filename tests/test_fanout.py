"""Fanout (whepfan/_fanout.pxi) on real loopback sockets, with pylibsrtp as the oracle.

Every datagram a viewer socket receives is unprotected by libsrtp (through pylibsrtp)
with that viewer's keys; RTP/RTCP fields are then read by the small parsers below.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pylibsrtp import Error as LibsrtpError
from pylibsrtp import Policy, Session

from whepfan._fastpath import (
    PROFILE_AEAD_AES_128_GCM,
    PROFILE_AEAD_AES_256_GCM,
    PROFILE_AES128_CM_SHA1_32,
    PROFILE_AES128_CM_SHA1_80,
    Fanout,
    SrtpError,
    measure_send_limit,
    profile_key_lengths,
)

LIBSRTP_PROFILE = {
    PROFILE_AES128_CM_SHA1_80: Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    PROFILE_AES128_CM_SHA1_32: Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    PROFILE_AEAD_AES_128_GCM: Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    PROFILE_AEAD_AES_256_GCM: Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}
PROFILES = list(LIBSRTP_PROFILE)
RECEIVE_TIMEOUT = 5.0  # upper bound to wait for loopback delivery; normally instant


# --- RTP/RTCP helpers (RFC 3550 §5.1, §6.4.1; RFC 8285) ---------------------------------


def rtp_packet(
    seq: int,
    timestamp: int,
    *,
    ssrc: int = 0x11223344,
    payload_type: int = 96,
    marker: bool = False,
    payload: bytes = b"\xab" * 100,
    extension: bytes | None = None,
    padding: int = 0,
) -> bytes:
    """A plain RTP packet; ``extension`` is a whole extension block (profile, length, data)."""
    first = 0x80 | (0x20 if padding else 0) | (0x10 if extension is not None else 0)
    header = struct.pack(
        "!BBHII", first, (0x80 if marker else 0) | payload_type, seq, timestamp, ssrc
    )
    pad = b"\x00" * (padding - 1) + bytes([padding]) if padding else b""
    return header + (extension or b"") + payload + pad


@dataclass
class RtpView:
    marker: bool
    payload_type: int
    seq: int
    timestamp: int
    ssrc: int
    extension_profile: int | None
    extensions: dict[int, bytes]
    payload: bytes


def parse_rtp(packet: bytes) -> RtpView:
    """Tiny RTP parser for the tests, including RFC 8285 one- and two-byte elements."""
    assert packet[0] >> 6 == 2
    first, second, seq, timestamp, ssrc = struct.unpack_from("!BBHII", packet)
    position = 12 + 4 * (first & 0x0F)
    profile = None
    elements: dict[int, bytes] = {}
    if first & 0x10:
        profile, words = struct.unpack_from("!HH", packet, position)
        end = position + 4 + 4 * words
        position += 4
        while position < end:
            if profile == 0xBEDE:
                ext_id, size = packet[position] >> 4, (packet[position] & 0x0F) + 1
                if ext_id == 0:
                    position += 1
                    continue
                assert ext_id != 15
                data_start = position + 1
            else:
                assert profile & 0xFFF0 == 0x1000
                ext_id = packet[position]
                if ext_id == 0:
                    position += 1
                    continue
                size = packet[position + 1]
                data_start = position + 2
            assert ext_id not in elements, "an id appears twice"
            assert data_start + size <= end
            elements[ext_id] = packet[data_start : data_start + size]
            position = data_start + size
        position = end
    payload_end = len(packet) - (packet[-1] if first & 0x20 else 0)
    return RtpView(
        marker=bool(second & 0x80),
        payload_type=second & 0x7F,
        seq=seq,
        timestamp=timestamp,
        ssrc=ssrc,
        extension_profile=profile,
        extensions=elements,
        payload=packet[position:payload_end],
    )


def one_byte_extension(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(bytes([(ext_id << 4) | (len(data) - 1)]) + data for ext_id, data in elements)
    body += b"\x00" * (-len(body) % 4)
    return struct.pack("!HH", 0xBEDE, len(body) // 4) + body


def two_byte_extension(elements: list[tuple[int, bytes]], appbits: int = 0) -> bytes:
    body = b"".join(bytes([ext_id, len(data)]) + data for ext_id, data in elements)
    body += b"\x00" * (-len(body) % 4)
    return struct.pack("!HH", 0x1000 | appbits, len(body) // 4) + body


# --- loopback viewers ---------------------------------------------------------------------


@dataclass
class Viewer:
    """A viewer's end: a UDP socket and both SRTP directions as libsrtp sees them."""

    sock: socket.socket
    profile: int
    tx_key: bytes  # the fan-out's tx = what this viewer unprotects with
    tx_salt: bytes
    rx_key: bytes
    rx_salt: bytes
    slot: int = -1
    inbound: Session = field(init=False)
    outbound: Session = field(init=False)

    def __post_init__(self) -> None:
        self.inbound = self.fresh_inbound()
        self.outbound = Session(
            Policy(
                key=self.rx_key + self.rx_salt,
                ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                srtp_profile=LIBSRTP_PROFILE[self.profile],
            )
        )

    def fresh_inbound(self) -> Session:
        return Session(
            Policy(
                key=self.tx_key + self.tx_salt,
                ssrc_type=Policy.SSRC_ANY_INBOUND,
                srtp_profile=LIBSRTP_PROFILE[self.profile],
            )
        )

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def receive(self, count: int) -> list[bytes]:
        """Exactly ``count`` datagrams (waiting for loopback delivery), then none more."""
        datagrams: list[bytes] = []
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while len(datagrams) < count:
            try:
                datagrams.append(self.sock.recv(4096))
            except BlockingIOError:
                if not poller.poll(RECEIVE_TIMEOUT * 1000):
                    break
        assert len(datagrams) == count, f"received {len(datagrams)} of {count} datagrams"
        assert self.pending() == [], "more datagrams than expected"
        return datagrams

    def pending(self) -> list[bytes]:
        datagrams = []
        while True:
            try:
                datagrams.append(self.sock.recv(4096))
            except BlockingIOError:
                return datagrams

    def receive_rtp(self, count: int) -> list[bytes]:
        return [self.inbound.unprotect(datagram) for datagram in self.receive(count)]


def make_keys(profile: int) -> tuple[bytes, bytes, bytes, bytes]:
    key_len, salt_len = profile_key_lengths(profile)
    return os.urandom(key_len), os.urandom(salt_len), os.urandom(key_len), os.urandom(salt_len)


def key_arguments(profile: int) -> dict[str, bytes]:
    """Fresh keys as ``add_viewer`` keyword arguments, for viewers nobody listens to."""
    tx_key, tx_salt, rx_key, rx_salt = make_keys(profile)
    return {"tx_key": tx_key, "tx_salt": tx_salt, "rx_key": rx_key, "rx_salt": rx_salt}


def open_viewer(profile: int, host: str = "127.0.0.1") -> Viewer:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, 0))
    sock.setblocking(False)
    return Viewer(sock, profile, *make_keys(profile))


def attach(fanout: Fanout, viewer: Viewer, host: str = "127.0.0.1") -> int:
    viewer.slot = fanout.add_viewer(
        host,
        viewer.port,
        profile=viewer.profile,
        tx_key=viewer.tx_key,
        tx_salt=viewer.tx_salt,
        rx_key=viewer.rx_key,
        rx_salt=viewer.rx_salt,
    )
    return viewer.slot


@pytest.fixture(scope="module", autouse=True)
def _lift_fd_limit() -> None:
    # A socket per simulated viewer: 1,000+ descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_sender(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    sock = open_sender()
    yield sock
    sock.close()


@pytest.fixture
def viewers() -> Iterator[list[Viewer]]:
    opened: list[Viewer] = []
    yield opened
    for viewer in opened:
        viewer.sock.close()


def new_viewer(
    opened: list[Viewer], fanout: Fanout, profile: int = PROFILE_AEAD_AES_128_GCM
) -> Viewer:
    viewer = open_viewer(profile)
    opened.append(viewer)
    attach(fanout, viewer)
    return viewer


# --- the acceptance test ------------------------------------------------------------------


@pytest.mark.slow
def test_one_stream_to_a_thousand_viewers(sender: socket.socket, viewers: list[Viewer]) -> None:
    fanout = Fanout(sender.fileno(), max_viewers=1000)
    track = fanout.add_track()
    for index in range(1000):
        viewer = new_viewer(viewers, fanout, PROFILES[index % len(PROFILES)])
        fanout.subscribe(viewer.slot, track, ssrc=0x10000 + index, payload_type=96 + index % 32)
    assert fanout.viewer_count == 1000

    sent_packets = [
        rtp_packet(
            seq=1000 + n,
            timestamp=90_000 + 3000 * n,
            marker=n % 5 == 4,
            payload=bytes([n]) * (600 + 10 * n),
        )
        for n in range(50)
    ]
    received: list[list[bytes]] = [[] for _ in viewers]
    # Push in small groups and drain between, so no receive queue overflows.
    for group_start in range(0, 50, 5):
        group = sent_packets[group_start : group_start + 5]
        for n, packet in enumerate(group):
            assert fanout.push(track, packet, keyframe=group_start + n == 0) == 1000
        for index, viewer in enumerate(viewers):
            received[index] += viewer.receive_rtp(len(group))

    for index, viewer in enumerate(viewers):
        views = [parse_rtp(packet) for packet in received[index]]
        first = views[0]
        for n, (view, original) in enumerate(zip(views, sent_packets, strict=True)):
            source = parse_rtp(original)
            assert view.ssrc == 0x10000 + index
            assert view.payload_type == 96 + index % 32
            assert view.marker == source.marker
            assert view.seq == (first.seq + n) % 65536
            assert (view.timestamp - source.timestamp) % 2**32 == (first.timestamp - 90_000) % 2**32
            assert view.payload == source.payload
        stats = fanout.viewer_stats(viewer.slot)
        assert stats["packets_sent"] == 50
        assert stats["send_errors"] == stats["protect_errors"] == 0

    # RFC 3550 §5.1: every viewer starts at its own random sequence number.
    first_seqs = {parse_rtp(packets[0]).seq for packets in received}
    assert len(first_seqs) > 900
    totals = fanout.stats()
    assert totals["packets_sent"] == 50_000
    assert totals["pushed"] == 50
    assert totals["send_errors"] == 0
    assert totals["sendmmsg_calls"] >= 50_000 // 32


@pytest.mark.slow
def test_sequence_continues_across_the_16_bit_wrap(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    # 65,600 packets: both the publisher's and (whatever its offset) each viewer's
    # sequence number wrap, so the SRTP rollover counter must advance (RFC 3711 §3.3.1).
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    group = [new_viewer(viewers, fanout, profile) for profile in PROFILES[:2]]
    for viewer in group:
        fanout.subscribe(viewer.slot, track, ssrc=7, payload_type=100, wait_keyframe=False)
    previous: dict[int, int] = {}
    total = 65_600
    for start in range(0, total, 200):
        for n in range(start, min(start + 200, total)):
            fanout.push(track, rtp_packet((60_000 + n) % 65536, n * 10, payload=b"w" * 40))
        for viewer in group:
            for packet in viewer.receive_rtp(min(200, total - start)):
                view = parse_rtp(packet)
                if viewer.slot in previous:
                    assert view.seq == (previous[viewer.slot] + 1) % 65536
                previous[viewer.slot] = view.seq
    assert fanout.stats()["packets_sent"] == 2 * total


# --- header extensions (RFC 8285) ---------------------------------------------------------


def ext_map(mapping: dict[int, int]) -> bytes:
    table = bytearray(max(mapping) + 1)
    for publisher_id, viewer_id in mapping.items():
        table[publisher_id] = viewer_id
    return bytes(table)


def test_one_byte_extensions_are_remapped_and_stripped(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    first, second, bare = (new_viewer(viewers, fanout) for _ in range(3))
    # Viewer ids: `first` renumbers 1->7, 5->2 and did not negotiate 3; `second` took
    # 3->4 and asked 5->20, which a one-byte element cannot carry (RFC 8285 §4.2).
    fanout.subscribe(first.slot, track, ssrc=1, payload_type=96, ext_map=ext_map({1: 7, 5: 2}))
    fanout.subscribe(second.slot, track, ssrc=2, payload_type=96, ext_map=ext_map({3: 4, 5: 20}))
    fanout.subscribe(bare.slot, track, ssrc=3, payload_type=96)
    elements = [(1, b"\x01\x02"), (3, b"\x33"), (5, b"\x55\x55\x55\x55")]
    packet = rtp_packet(9, 900, extension=one_byte_extension(elements), payload=b"data")
    assert fanout.push(track, packet, keyframe=True) == 3

    (out_first,) = first.receive_rtp(1)
    (out_second,) = second.receive_rtp(1)
    (out_bare,) = bare.receive_rtp(1)
    for out in (out_first, out_second, out_bare):
        assert len(out) == len(packet)  # stripped elements became padding in place
        assert parse_rtp(out).extension_profile == 0xBEDE
        assert parse_rtp(out).payload == b"data"
    assert parse_rtp(out_first).extensions == {7: b"\x01\x02", 2: b"\x55\x55\x55\x55"}
    assert parse_rtp(out_second).extensions == {4: b"\x33"}
    assert parse_rtp(out_bare).extensions == {}


def test_two_byte_extensions_are_remapped_and_stripped(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout, PROFILE_AES128_CM_SHA1_80)
    fanout.subscribe(
        viewer.slot, track, ssrc=5, payload_type=97, ext_map=ext_map({1: 14, 20: 30, 200: 0})
    )
    elements = [(1, b"\x10"), (20, b""), (200, b"\xc8" * 17), (20 + 1, b"\x21\x21")]
    packet = rtp_packet(
        3, 30, extension=two_byte_extension(elements, appbits=0x3), payload=b"p" * 33
    )
    assert fanout.push(track, packet, keyframe=True) == 1
    (out,) = viewer.receive_rtp(1)
    view = parse_rtp(out)
    assert len(out) == len(packet)
    assert view.extension_profile == 0x1003  # appbits kept (RFC 8285 §4.3)
    assert view.extensions == {14: b"\x10", 30: b""}
    assert view.payload == b"p" * 33


@st.composite
def rtp_with_extensions(draw: st.DrawFn) -> tuple[bytes, dict[int, bytes], bool]:
    two_byte = draw(st.booleans())
    max_id = 255 if two_byte else 14
    ids = draw(st.lists(st.integers(1, max_id), unique=True, max_size=8))
    elements = [
        (ext_id, draw(st.binary(min_size=0 if two_byte else 1, max_size=16))) for ext_id in ids
    ]
    extension = two_byte_extension(elements) if two_byte else one_byte_extension(elements)
    packet = rtp_packet(
        draw(st.integers(0, 65535)),
        draw(st.integers(0, 2**32 - 1)),
        marker=draw(st.booleans()),
        payload_type=draw(st.integers(0, 127)),
        extension=extension,
        payload=draw(st.binary(max_size=200)),
        padding=draw(st.integers(0, 8)),
    )
    return packet, dict(elements), two_byte


@given(
    case=rtp_with_extensions(),
    mapping=st.dictionaries(st.integers(1, 255), st.integers(0, 255), max_size=12),
    profile=st.sampled_from(PROFILES),
)
def test_rewrite_matches_a_python_reference(
    case: tuple[bytes, dict[int, bytes], bool], mapping: dict[int, int], profile: int
) -> None:
    packet, elements, two_byte = case
    with open_sender() as sender:
        viewer = open_viewer(profile)
        with viewer.sock:
            fanout = Fanout(sender.fileno())
            track = fanout.add_track()
            attach(fanout, viewer)
            fanout.subscribe(
                viewer.slot,
                track,
                ssrc=0xCAFE,
                payload_type=111,
                ext_map=ext_map(mapping) if mapping else b"",
            )
            assert fanout.push(track, packet, keyframe=True) == 1
            (out,) = viewer.receive_rtp(1)
    # Reference: the viewer's id if it has one that the packet's form can carry.
    expected = {}
    for publisher_id, data in elements.items():
        viewer_id = mapping.get(publisher_id, 0)
        if viewer_id and (two_byte or viewer_id <= 14):
            expected[viewer_id] = data
    source, view = parse_rtp(packet), parse_rtp(out)
    assert len(out) == len(packet)
    assert view.extensions == expected
    assert (view.ssrc, view.payload_type, view.marker) == (0xCAFE, 111, source.marker)
    assert view.payload == source.payload
    if packet[0] & 0x20:  # RTP padding (RFC 3550 §5.1) untouched
        assert out[-packet[-1] :] == packet[-packet[-1] :]


# --- keyframe gating, NACK service ---------------------------------------------------------


def test_waiting_viewer_starts_at_a_keyframe(sender: socket.socket, viewers: list[Viewer]) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    waiting, immediate = new_viewer(viewers, fanout), new_viewer(viewers, fanout)
    fanout.subscribe(waiting.slot, track, ssrc=1, payload_type=96, wait_keyframe=True)
    fanout.subscribe(immediate.slot, track, ssrc=2, payload_type=96, wait_keyframe=False)
    for seq in range(3):
        assert fanout.push(track, rtp_packet(seq, seq)) == 1
    assert waiting.receive(0) == []
    assert len(immediate.receive(3)) == 3
    assert fanout.push(track, rtp_packet(3, 3), keyframe=True) == 2
    assert fanout.push(track, rtp_packet(4, 4)) == 2
    first, second = (parse_rtp(packet) for packet in waiting.receive_rtp(2))
    assert second.seq == (first.seq + 1) % 65536
    assert fanout.viewer_stats(waiting.slot)["dropped_waiting_keyframe"] == 3
    assert fanout.viewer_stats(immediate.slot)["dropped_waiting_keyframe"] == 0
    assert fanout.stats()["dropped_waiting_keyframe"] == 3


def test_resend_repeats_the_packet_when_there_is_no_rtx(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout, PROFILE_AES128_CM_SHA1_80)
    fanout.subscribe(viewer.slot, track, ssrc=77, payload_type=96, wait_keyframe=False)
    for seq in range(100, 105):
        fanout.push(track, rtp_packet(seq, seq * 10, payload=bytes([seq]) * 50))
    # Pretend packets 1 and 3 were lost: only the others reach the oracle.
    protected = viewer.receive(5)
    originals = {}
    for datagram in protected:
        plain = viewer.fresh_inbound().unprotect(datagram)
        originals[parse_rtp(plain).seq] = plain
    lost = [parse_rtp(originals[seq]).seq for seq in sorted(originals)][1:4:2]

    assert fanout.resend(viewer.slot, track, lost) == 2
    oracle = viewer.fresh_inbound()
    repeats = [oracle.unprotect(datagram) for datagram in viewer.receive(2)]
    assert repeats == [originals[seq] for seq in lost]
    stats = fanout.viewer_stats(viewer.slot)
    assert (stats["resent"], stats["rtx_sent"], stats["resend_misses"]) == (2, 0, 0)


def test_resend_as_rtx_carries_the_original_sequence_number(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout, PROFILE_AEAD_AES_256_GCM)
    fanout.subscribe(
        viewer.slot,
        track,
        ssrc=0xAAAA,
        payload_type=96,
        rtx_ssrc=0xBBBB,
        rtx_payload_type=97,
        wait_keyframe=False,
        ext_map=ext_map({2: 3}),
    )
    extension = one_byte_extension([(2, b"\x02\x02\x02")])
    for seq in range(65533, 65533 + 6):  # across the publisher's wrap
        fanout.push(
            track,
            rtp_packet(
                seq % 65536,
                5000,
                marker=seq % 2 == 0,
                payload=bytes([seq % 256]) * 80,
                extension=extension,
                padding=4,
            ),
        )
    sent = [parse_rtp(packet) for packet in viewer.receive_rtp(6)]
    nacked = [sent[1].seq, sent[4].seq]
    assert fanout.resend(viewer.slot, track, nacked) == 2
    rtx = [parse_rtp(packet) for packet in viewer.receive_rtp(2)]
    # RFC 4588 §4: RTX SSRC/PT, its own consecutive sequence numbers, the original
    # timestamp and marker, payload = OSN (the seq the viewer asked for) + original payload.
    assert [packet.ssrc for packet in rtx] == [0xBBBB, 0xBBBB]
    assert [packet.payload_type for packet in rtx] == [97, 97]
    assert rtx[1].seq == (rtx[0].seq + 1) % 65536
    for retransmission, original in zip(rtx, [sent[1], sent[4]], strict=True):
        assert retransmission.timestamp == original.timestamp
        assert retransmission.marker == original.marker
        assert retransmission.extensions == {3: b"\x02\x02\x02"}
        osn = struct.unpack("!H", retransmission.payload[:2])[0]
        assert osn == original.seq
        assert retransmission.payload[2:] == original.payload
    assert fanout.viewer_stats(viewer.slot)["rtx_sent"] == 2


def test_resend_misses_once_the_cache_slot_is_overwritten(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track(cache_packets=4)
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    for seq in range(10):
        fanout.push(track, rtp_packet(seq, seq))
    viewer_seqs = [parse_rtp(packet).seq for packet in viewer.receive_rtp(10)]
    # Publisher seq 2 shared a slot with 6, which replaced it; 9 is still cached.
    assert fanout.resend(viewer.slot, track, [viewer_seqs[2]]) == 0
    assert fanout.resend(viewer.slot, track, [(viewer_seqs[9] + 1) % 65536]) == 0
    assert fanout.resend(viewer.slot, track, [viewer_seqs[9]]) == 1
    assert parse_rtp(viewer.fresh_inbound().unprotect(viewer.receive(1)[0])).seq == viewer_seqs[9]
    stats = fanout.viewer_stats(viewer.slot)
    assert (stats["resend_misses"], stats["resent"]) == (2, 1)
    assert fanout.stats()["resend_misses"] == 2
    with pytest.raises(ValueError):
        fanout.resend(viewer.slot, track, [65536])


# --- RTCP ---------------------------------------------------------------------------------


def test_sender_reports_carry_each_viewers_mapping_and_counts(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    group = [new_viewer(viewers, fanout, profile) for profile in PROFILES]
    for index, viewer in enumerate(group):
        fanout.subscribe(
            viewer.slot, track, ssrc=0x5000 + index, payload_type=96, wait_keyframe=False
        )
    waiting = new_viewer(viewers, fanout)
    fanout.subscribe(waiting.slot, track, ssrc=0x6000, payload_type=96, wait_keyframe=True)
    payloads = [b"a" * 100, b"b" * 250, b"c" * 7]
    for seq, payload in enumerate(payloads):
        fanout.push(track, rtp_packet(seq, 1000 + seq, payload=payload, padding=3 * seq))
    ntp_time = 0xE8D4A51000000000 | 0x12345678
    assert fanout.send_sender_reports(track, ntp_time, 1000) == len(group)
    for index, viewer in enumerate(group):
        *media, report_datagram = viewer.receive(4)
        first_ts = parse_rtp(viewer.inbound.unprotect(media[0])).timestamp
        report = viewer.inbound.unprotect_rtcp(report_datagram)
        # RFC 3550 §6.4.1: V=2 RC=0, PT=200, length 6, SSRC, NTP, RTP ts, counts.
        header, length, ssrc, ntp_high, ntp_low, rtp_ts, packets, octets = struct.unpack(
            "!BxHIIIIII", report
        )
        assert report[1] == 200 and header == 0x80 and length == 6
        assert ssrc == 0x5000 + index
        assert (ntp_high << 32) | ntp_low == ntp_time
        assert rtp_ts == first_ts  # rtp_time 1000 is the first packet's timestamp
        assert packets == 3
        assert octets == sum(len(payload) for payload in payloads)  # padding excluded
        assert fanout.viewer_stats(viewer.slot)["sender_reports_sent"] == 1
    assert waiting.pending() == []  # not a sender to it yet (RFC 3550 §6.4)
    assert fanout.stats()["sender_reports_sent"] == len(group)


@pytest.mark.parametrize("profile", PROFILES)
def test_viewer_rtcp_unprotects_and_answers_are_protected(
    sender: socket.socket, viewers: list[Viewer], profile: int
) -> None:
    fanout = Fanout(sender.fileno())
    viewer = new_viewer(viewers, fanout, profile)
    # An RR with one report block (RFC 3550 §6.4.2) as the viewer's browser sends it.
    receiver_report = struct.pack("!BBHI", 0x81, 201, 7, 0xDEAD) + struct.pack(
        "!IIIIII", 0x5000, 0x01000002, 65_540, 20, 0, 0
    )
    protected = viewer.outbound.protect_rtcp(receiver_report)
    assert fanout.unprotect_rtcp(viewer.slot, protected) == receiver_report
    with pytest.raises(SrtpError):
        fanout.unprotect_rtcp(viewer.slot, protected)  # RFC 3711 §3.3.2 replay
    tampered = bytearray(viewer.outbound.protect_rtcp(receiver_report))
    tampered[10] ^= 1
    with pytest.raises(SrtpError):
        fanout.unprotect_rtcp(viewer.slot, bytes(tampered))
    stats = fanout.viewer_stats(viewer.slot)
    assert (stats["rtcp_received"], stats["rtcp_errors"]) == (1, 2)

    # A PLI (RFC 4585 §6.3.1) towards the viewer.
    picture_loss = struct.pack("!BBHII", 0x81, 206, 2, 0x5000, 0x1234)
    assert fanout.send_rtcp(viewer.slot, picture_loss) == 1
    assert viewer.inbound.unprotect_rtcp(viewer.receive(1)[0]) == picture_loss
    assert fanout.viewer_stats(viewer.slot)["rtcp_sent"] == 1


@given(garbage=st.binary(max_size=300))
def test_unprotect_rtcp_garbage_raises_srtp_error_only(garbage: bytes) -> None:
    with open_sender() as sender:
        fanout = Fanout(sender.fileno())
        profile = PROFILE_AES128_CM_SHA1_80
        slot = fanout.add_viewer(
            "127.0.0.1",
            9,
            profile=profile,
            **key_arguments(profile),
        )
        try:
            plain = fanout.unprotect_rtcp(slot, garbage)
        except SrtpError:
            assert fanout.viewer_stats(slot)["rtcp_errors"] == 1
        else:  # a forged tag would have to match: practically impossible
            assert isinstance(plain, bytes)


# --- lifecycle, counters, robustness -------------------------------------------------------


def test_removed_viewer_gets_nothing_and_its_slot_is_reused(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    staying, leaving = new_viewer(viewers, fanout), new_viewer(viewers, fanout)
    for viewer in (staying, leaving):
        fanout.subscribe(
            viewer.slot, track, ssrc=viewer.slot + 1, payload_type=96, wait_keyframe=False
        )
    assert fanout.push(track, rtp_packet(1, 1)) == 2
    fanout.remove_viewer(leaving.slot)
    assert fanout.viewer_count == 1
    assert fanout.push(track, rtp_packet(2, 2)) == 1
    assert len(leaving.receive(1)) == 1
    assert len(staying.receive(2)) == 2
    with pytest.raises(KeyError):
        fanout.viewer_stats(leaving.slot)

    newcomer = open_viewer(PROFILE_AES128_CM_SHA1_32)
    viewers.append(newcomer)
    assert attach(fanout, newcomer) == leaving.slot
    assert fanout.viewer_stats(newcomer.slot)["packets_sent"] == 0
    fanout.subscribe(newcomer.slot, track, ssrc=99, payload_type=98, wait_keyframe=False)
    assert fanout.push(track, rtp_packet(3, 3)) == 2
    assert parse_rtp(newcomer.receive_rtp(1)[0]).ssrc == 99
    assert leaving.pending() == []

    fanout.unsubscribe(staying.slot, track)
    assert fanout.push(track, rtp_packet(4, 4)) == 1
    assert fanout.stats()["subscriptions"] == 1
    fanout.remove_track(track)
    with pytest.raises(KeyError):
        fanout.push(track, rtp_packet(5, 5))


def test_address_change_moves_delivery(sender: socket.socket, viewers: list[Viewer]) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    moved = open_viewer(viewer.profile)
    viewers.append(moved)
    fanout.set_viewer_address(viewer.slot, "127.0.0.1", moved.port)
    fanout.push(track, rtp_packet(1, 1))
    assert viewer.pending() == []
    assert len(moved.receive(1)) == 1


def test_ipv6_socket_reaches_ipv4_and_ipv6_viewers(viewers: list[Viewer]) -> None:
    with open_sender(socket.AF_INET6, "::") as sender:
        fanout = Fanout(sender.fileno())
        track = fanout.add_track()
        v4 = open_viewer(PROFILE_AEAD_AES_128_GCM)
        v6 = open_viewer(PROFILE_AEAD_AES_128_GCM, "::1")
        viewers += [v4, v6]
        attach(fanout, v4, "127.0.0.1")  # sent to ::ffff:127.0.0.1 (RFC 4291 §2.5.5.2)
        attach(fanout, v6, "::1")
        for viewer in (v4, v6):
            fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
        assert fanout.push(track, rtp_packet(1, 1)) == 2
        assert len(v4.receive_rtp(1)) == len(v6.receive_rtp(1)) == 1
    with open_sender() as ipv4_only, pytest.raises(ValueError):
        Fanout(ipv4_only.fileno()).add_viewer(
            "::1",
            5000,
            profile=PROFILE_AES128_CM_SHA1_80,
            **key_arguments(PROFILE_AES128_CM_SHA1_80),
        )


def test_counters_match_what_the_viewers_received(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno(), batch_size=3)  # several full batches + a partial one
    track = fanout.add_track()
    group = [new_viewer(viewers, fanout, PROFILES[n % 4]) for n in range(7)]
    for viewer in group:
        fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    for seq in range(4):
        assert fanout.push(track, rtp_packet(seq, seq, payload=b"z" * (10 * seq))) == 7
    total_bytes = 0
    for viewer in group:
        datagrams = viewer.receive(4)
        stats = fanout.viewer_stats(viewer.slot)
        assert stats["packets_sent"] == 4
        assert stats["bytes_sent"] == sum(map(len, datagrams))
        total_bytes += stats["bytes_sent"]
    totals = fanout.stats()
    assert (totals["packets_sent"], totals["bytes_sent"]) == (28, total_bytes)
    assert totals["sendmmsg_calls"] == 4 * 3  # ceil(7 / 3) per push


def test_send_errors_are_counted_not_raised(sender: socket.socket) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    keys = key_arguments(PROFILE_AES128_CM_SHA1_80)
    # 255.255.255.255 without SO_BROADCAST: sendmmsg fails with EACCES for it alone.
    unreachable = fanout.add_viewer("255.255.255.255", 9, profile=PROFILE_AES128_CM_SHA1_80, **keys)
    fine = open_viewer(PROFILE_AES128_CM_SHA1_80)
    with fine.sock:
        attach(fanout, fine)
        for slot in (unreachable, fine.slot):
            fanout.subscribe(slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
        assert fanout.push(track, rtp_packet(1, 1)) == 1
        assert len(fine.receive(1)) == 1
    assert fanout.viewer_stats(unreachable)["send_errors"] == 1
    assert fanout.viewer_stats(unreachable)["packets_sent"] == 0
    assert fanout.stats()["send_errors"] == 1


MALFORMED = [
    b"",
    b"\x80\x60\x00",  # shorter than the fixed header
    bytes([0x40, 96]) + bytes(20),  # version 1
    bytes([0x8F, 96]) + bytes(20),  # 15 CSRCs announced, 2 present
    rtp_packet(1, 1, extension=struct.pack("!HH", 0xBEDE, 9) + bytes(4)),  # block overflows
    rtp_packet(
        1, 1, extension=struct.pack("!HHBB", 0xBEDE, 1, 0x1F, 0) + bytes(2)
    ),  # element overflows
    rtp_packet(1, 1, payload=b"", padding=1)[:-1] + b"\x40",  # padding longer than packet
    rtp_packet(1, 1, payload=b"x", padding=1)[:-1] + b"\x00",  # padding count 0
]


def test_malformed_and_oversized_packets_are_dropped(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    viewer = new_viewer(viewers, fanout)
    fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    for packet in MALFORMED:
        assert fanout.push(track, packet) == 0
    assert fanout.push(track, rtp_packet(1, 1, payload=bytes(1500 - 12 + 1))) == 0
    assert fanout.push(track, rtp_packet(1, 1, payload=bytes(1500 - 12))) == 1
    assert fanout.push(track, rtp_packet(2, 2)[:12]) == 1  # an empty payload is valid
    assert len(viewer.receive(2)) == 2
    totals = fanout.stats()
    assert totals["dropped_malformed"] == len(MALFORMED)
    assert totals["dropped_too_large"] == 1


def rtp_like(data: bytes) -> bytes:
    """Random bytes with V=2 and X=1, and half the time an RFC 8285 profile, so the
    fuzzer reaches the extension walk instead of failing the version check."""
    if len(data) < 16:
        return bytes([0x90 | (data[0] & 0x2F)]) + data[1:] if data else data
    profile = (b"\xbe\xde", b"\x10\x00", data[12:14])[data[1] % 3]
    return bytes([0x90 | (data[0] & 0x20)]) + data[1:12] + profile + data[14:]


@given(
    data=st.one_of(st.binary(max_size=1600), st.binary(max_size=200).map(rtp_like)),
    keyframe=st.booleans(),
)
def test_random_bytes_pushed_never_crash(data: bytes, keyframe: bool) -> None:
    with open_sender() as sender:
        viewer = open_viewer(PROFILE_AES128_CM_SHA1_80)
        with viewer.sock:
            fanout = Fanout(sender.fileno())
            track = fanout.add_track(cache_packets=8)
            attach(fanout, viewer)
            fanout.subscribe(
                viewer.slot,
                track,
                ssrc=1,
                payload_type=96,
                ext_map=bytes(range(16)),
                rtx_ssrc=2,
                rtx_payload_type=97,
            )
            sent = fanout.push(track, data, keyframe=keyframe)
            totals = fanout.stats()
            assert sent in (0, 1)
            if sent:
                assert keyframe
                assert len(viewer.receive_rtp(1)) == 1
                assert fanout.resend(viewer.slot, track, [0, 1, 65535]) <= 3
            else:
                dropped = totals["dropped_malformed"] + totals["dropped_too_large"]
                assert dropped + totals["dropped_waiting_keyframe"] == 1


def test_invalid_ids_and_arguments_are_caller_errors(sender: socket.socket) -> None:
    fanout = Fanout(sender.fileno(), max_viewers=1, max_tracks=1)
    keys = key_arguments(PROFILE_AEAD_AES_128_GCM)
    track = fanout.add_track()
    with pytest.raises(ValueError):
        fanout.add_track()  # all tracks in use
    for bad_id in (-1, 1, 5000):
        with pytest.raises(KeyError):
            fanout.push(bad_id, rtp_packet(1, 1))
        with pytest.raises(KeyError):
            fanout.remove_viewer(bad_id)
    with pytest.raises(ValueError):
        fanout.add_viewer("127.0.0.1", 9, profile=PROFILE_AES128_CM_SHA1_80, **keys)
    with pytest.raises(ValueError):
        fanout.add_viewer("localhost", 9, profile=PROFILE_AEAD_AES_128_GCM, **keys)
    with pytest.raises(ValueError):
        fanout.add_viewer("127.0.0.1", 0, profile=PROFILE_AEAD_AES_128_GCM, **keys)
    slot = fanout.add_viewer("127.0.0.1", 9, profile=PROFILE_AEAD_AES_128_GCM, **keys)
    with pytest.raises(ValueError):
        fanout.add_viewer("127.0.0.1", 9, profile=PROFILE_AEAD_AES_128_GCM, **keys)  # full
    with pytest.raises(KeyError):
        fanout.resend(slot, track, [1])  # not subscribed
    fanout.subscribe(slot, track, ssrc=1, payload_type=96)
    with pytest.raises(ValueError):
        fanout.subscribe(slot, track, ssrc=1, payload_type=96)
    with pytest.raises(ValueError):
        fanout.subscribe(slot, track, ssrc=1, payload_type=128)
    with open("/dev/null") as not_a_socket, pytest.raises(ValueError):
        Fanout(not_a_socket.fileno())


def test_measure_send_limit_sends_every_datagram(viewers: list[Viewer]) -> None:
    group = [open_viewer(PROFILE_AEAD_AES_128_GCM) for _ in range(5)]
    viewers += group
    with open_sender() as sender:
        sent, seconds = measure_send_limit(
            sender.fileno(),
            [("127.0.0.1", viewer.port) for viewer in group],
            profile=PROFILE_AEAD_AES_128_GCM,
            packet_size=200,
            packets=10,
            batch_size=4,
        )
    assert sent == 50
    assert seconds > 0
    for viewer in group:
        assert {len(datagram) for datagram in viewer.receive(10)} == {200 + 16}  # GCM tag


def test_push_when_nobody_listens(sender: socket.socket) -> None:
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    assert fanout.push(track, rtp_packet(1, 1)) == 0
    assert fanout.stats()["pushed"] == 1


def test_libsrtp_oracle_rejects_the_wrong_keys(
    sender: socket.socket, viewers: list[Viewer]
) -> None:
    # Guards the oracle itself: a viewer's datagrams do not unprotect with another's keys.
    fanout = Fanout(sender.fileno())
    track = fanout.add_track()
    first, second = new_viewer(viewers, fanout), new_viewer(viewers, fanout)
    for viewer in (first, second):
        fanout.subscribe(viewer.slot, track, ssrc=1, payload_type=96, wait_keyframe=False)
    fanout.push(track, rtp_packet(1, 1))
    (datagram,) = first.receive(1)
    second.receive(1)
    with pytest.raises(LibsrtpError):
        second.inbound.unprotect(datagram)
