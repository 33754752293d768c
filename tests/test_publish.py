"""whepfan publish: packetisers (RFC 7741, RFC 6184, RFC 7587), the synthetic source, the
client transport on virtual time, offers, and the Publisher against a live whepfan server
with aiortc viewers decoding what it sends."""

from __future__ import annotations

import asyncio
import datetime
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import aiohttp
import numpy as np
import pytest
from _peers import DecodingViewer, only_loopback_candidates
from _server import LiveServer, settings_for
from _signalling import exchange
from aioice import stun
from hypothesis import given
from hypothesis import strategies as st

from whepfan.client.packetize import (
    H264Packetizer,
    OpusPacketizer,
    RtpSender,
    Vp8Packetizer,
    split_annex_b,
)
from whepfan.client.peer import (
    ClientTransport,
    IceSelected,
    LocalParameters,
    PublishedTrack,
    TransportConnected,
    answer_binding_request,
    host_candidate,
    new_ice_credentials,
    publisher_offer,
    viewer_offer,
)
from whepfan.client.publisher import PacketHistory, Publisher, PublisherOptions, PublishError
from whepfan.client.source import GLYPH_HEIGHT, TestPattern, Tone, render_text
from whepfan.protocol import codecs
from whepfan.protocol.dtls import DtlsCertificate, DtlsConnected, DtlsSession
from whepfan.protocol.ice import IceLiteSession
from whepfan.protocol.negotiation import (
    LocalTransport,
    RemoteTransport,
    answer_publisher,
    answer_viewer,
    remote_transport,
)
from whepfan.protocol.rtp import RtpPacket
from whepfan.protocol.sdp import SessionDescription

TOKEN = "publish-test-token"

# --- reference depacketisers (written from the RFCs, independent of the packetisers) ---


def depacketize_vp8(payloads: list[bytes]) -> bytes:
    """RFC 7741 §4.2: strip each descriptor; S=1 PID=0 starts the frame."""
    first, _ = codecs.Vp8PayloadDescriptor.split(payloads[0])
    assert first.start_of_partition and first.partition_index == 0
    frame = b""
    for payload in payloads:
        descriptor, data = codecs.Vp8PayloadDescriptor.split(payload)
        assert descriptor.picture_id == first.picture_id
        frame += data
    return frame


def depacketize_h264(payloads: list[bytes]) -> list[bytes]:
    """RFC 6184 §5.6-§5.8: NAL units out of single-NAL, STAP-A and FU-A payloads."""
    units: list[bytes] = []
    fragment: bytearray | None = None
    for payload in payloads:
        nal_type = payload[0] & 0x1F
        if nal_type == 24:
            position = 1
            while position < len(payload):
                (size,) = struct.unpack_from("!H", payload, position)
                units.append(payload[position + 2 : position + 2 + size])
                position += 2 + size
            assert position == len(payload)
        elif nal_type == 28:
            indicator, header = payload[0], payload[1]
            if header & 0x80:
                assert fragment is None
                fragment = bytearray(((indicator & 0xE0) | (header & 0x1F),))
            assert fragment is not None
            fragment += payload[2:]
            if header & 0x40:
                units.append(bytes(fragment))
                fragment = None
        else:
            units.append(payload)
    assert fragment is None
    return units


# --- VP8 (RFC 7741) ---------------------------------------------------------------------


def test_vp8_descriptor_layout_rfc7741_section_4_2() -> None:
    packetizer = Vp8Packetizer(max_payload=10, picture_id=0x1234)
    payloads = packetizer.packetize(bytes(range(20)))
    # X=1, S=1, PID=0 | I=1 | M=1 + 15-bit picture id 0x1234 -> 90 80 92 34
    assert payloads[0][:4] == bytes.fromhex("90809234")
    assert payloads[0][4:] == bytes(range(6))
    # Continuation packets: S=0.
    assert payloads[1][:4] == bytes.fromhex("80809234")
    assert all(len(p) <= 10 for p in payloads)
    # The next frame has the next picture id.
    assert packetizer.packetize(b"\x00")[0][:4] == bytes.fromhex("90809235")


def test_vp8_picture_id_wraps_at_15_bits() -> None:
    packetizer = Vp8Packetizer(picture_id=0x7FFF)
    packetizer.packetize(b"x")
    assert packetizer.picture_id == 0


@given(frame=st.binary(min_size=1, max_size=5000), max_payload=st.integers(8, 1400))
def test_vp8_round_trip(frame: bytes, max_payload: int) -> None:
    payloads = Vp8Packetizer(max_payload=max_payload).packetize(frame)
    assert all(len(p) <= max_payload for p in payloads)
    assert depacketize_vp8(payloads) == frame


def test_vp8_keyframe_is_recognised_by_the_server_inspector() -> None:
    # RFC 6386 §9.1: P bit 0 in the first byte of the frame tag marks a keyframe.
    keyframe = bytes.fromhex("5013009d012a4001f000") + bytes(100)
    payloads = Vp8Packetizer().packetize(keyframe)
    assert codecs.is_keyframe_start("VP8", payloads[0])
    assert not codecs.is_keyframe_start("VP8", Vp8Packetizer().packetize(b"\x31" + bytes(9))[0])


# --- H264 (RFC 6184) --------------------------------------------------------------------

SPS = bytes.fromhex("6742c01e8c8d40a0f9")
PPS = bytes.fromhex("68ce3c80")


def test_h264_small_units_share_a_stap_a_rfc6184_section_5_7_1() -> None:
    access_unit = b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x01" + PPS + b"\x00\x00\x01" + b"\x65\x88"
    payloads = H264Packetizer().packetize(access_unit)
    assert len(payloads) == 1
    # STAP-A header: F=0, NRI=max(3)=0x60, type 24 -> 0x78; then 16-bit size + unit each.
    expected = (
        b"\x78"
        + struct.pack("!H", len(SPS))
        + SPS
        + struct.pack("!H", len(PPS))
        + PPS
        + b"\x00\x02\x65\x88"
    )
    assert payloads[0] == expected
    assert codecs.is_keyframe_start("H264", payloads[0])


def test_h264_large_unit_becomes_fu_a_rfc6184_section_5_8() -> None:
    # first_mb_in_slice = 0 (ue(v) "1"): the first slice of an IDR picture.
    idr = b"\x65\x88" + bytes(range(256)) * 10
    payloads = H264Packetizer(max_payload=1000).packetize(b"\x00\x00\x00\x01" + idr)
    assert len(payloads) == 3
    # FU indicator: NRI of the unit (0x60) | 28 = 0x7C; FU header S|type 5 = 0x85, E = 0x45.
    assert payloads[0][:2] == b"\x7c\x85"
    assert payloads[1][:2] == b"\x7c\x05"
    assert payloads[2][:2] == b"\x7c\x45"
    assert all(len(p) <= 1000 for p in payloads)
    assert depacketize_h264(payloads) == [idr]
    assert codecs.is_keyframe_start("H264", payloads[0])


def test_split_annex_b_handles_both_start_code_lengths() -> None:
    stream = b"\x00\x00\x00\x01\x67\x01\x00\x00\x01\x68\x02\x00\x00\x00\x01\x65\x03"
    assert split_annex_b(stream) == [b"\x67\x01", b"\x68\x02", b"\x65\x03"]
    assert split_annex_b(b"") == []
    assert split_annex_b(b"\x01\x02") == []


nal_units = st.binary(min_size=1, max_size=3000).map(
    # A NAL unit: a header byte with F=0, then a body with no start code and no zero at
    # the end (H.264 §7.4.1 emulation prevention and the RBSP stop bit make that true).
    lambda body: (
        bytes((0x41 | (body[0] & 0x1E),))
        + body.replace(b"\x00\x00", b"\x00\x03\x00").rstrip(b"\x00")
        + b"\x80"
    )
)


@given(units=st.lists(nal_units, min_size=1, max_size=12), max_payload=st.integers(64, 1400))
def test_h264_round_trip(units: list[bytes], max_payload: int) -> None:
    access_unit = b"".join(b"\x00\x00\x00\x01" + unit for unit in units)
    assert split_annex_b(access_unit) == units
    payloads = H264Packetizer(max_payload=max_payload).packetize(access_unit)
    assert all(len(p) <= max_payload for p in payloads)
    assert depacketize_h264(payloads) == units


@given(data=st.binary(max_size=2000))
def test_split_annex_b_fuzz(data: bytes) -> None:
    units = split_annex_b(data)
    assert all(unit and b"\x00\x00\x01" not in unit for unit in units)
    H264Packetizer().packetize(data)


# --- RTP sender and Opus ------------------------------------------------------------------


def test_rtp_sender_numbers_packets_and_marks_frame_ends() -> None:
    sender = RtpSender(
        ssrc=0x11223344,
        payload_type=96,
        clock_rate=90000,
        extensions=[(4, b"1")],
        first_sequence_number=0xFFFF,
    )
    packets = [RtpPacket.parse(p) for p in sender.packets([b"a", b"b"], 3000)]
    assert [p.sequence_number for p in packets] == [0xFFFF, 0]
    assert [p.marker for p in packets] == [False, True]
    assert all(p.ssrc == 0x11223344 and p.timestamp == 3000 for p in packets)
    assert packets[0].extension(4) == b"1"
    assert sender.packets_sent == 2 and sender.octets_sent == 2
    audio = RtpPacket.parse(
        sender.packets(OpusPacketizer().packetize(b"\xfc\x01"), 960, marker=False)[0]
    )
    assert not audio.marker and audio.payload == b"\xfc\x01"


def test_packet_history_keeps_the_newest() -> None:
    history = PacketHistory(capacity=3)
    for seq in range(5):
        history.add(seq, bytes((seq,)))
    assert history.get(0) is None and history.get(1) is None
    assert history.get(4) == b"\x04"


# --- source -------------------------------------------------------------------------------


def test_pattern_burns_in_clock_and_frame_counter() -> None:
    pattern = TestPattern(width=320, height=240)
    moment = datetime.datetime(2024, 5, 6, 12, 34, 56, 789000, tzinfo=datetime.UTC)
    luma, u, v = pattern.luma_and_chroma(42, moment)
    assert luma.shape == (240, 320) and u.shape == v.shape == (120, 160)
    scale = max(1, 240 // 120)
    clock = render_text("12:34:56.789", scale)
    top = left = 4 * scale
    region = luma[top : top + clock.shape[0], left : left + clock.shape[1]]
    assert np.array_equal(region == 235, clock)
    counter = render_text("#0000042", scale)
    top2 = top + (GLYPH_HEIGHT + 3) * scale
    region2 = luma[top2 : top2 + counter.shape[0], left : left + counter.shape[1]]
    assert np.array_equal(region2 == 235, counter)
    # The pattern moves.
    later, _, _ = pattern.luma_and_chroma(43, moment)
    assert np.abs(later.astype(int) - luma.astype(int)).mean() > 1


def test_tone_is_440_hz_with_a_beep_each_second() -> None:
    tone = Tone()
    samples = tone.samples(48000 // 2, 4800)  # mid-second: the 440 Hz tone
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 48000 / 4800 - 440) <= 10
    beep = np.abs(np.fft.rfft(tone.samples(0, 4800)))
    assert abs(np.argmax(beep) * 48000 / 4800 - 880) <= 10


# --- client transport on virtual time --------------------------------------------------------


def _remote(ufrag: str, pwd: str, cert: DtlsCertificate, port: int) -> RemoteTransport:
    return RemoteTransport(
        ice_ufrag=ufrag,
        ice_pwd=pwd,
        fingerprints=tuple(cert.fingerprints),
        setup="passive",
        candidates=(host_candidate("192.0.2.1", port),),
    )


def test_client_transport_connects_to_an_ice_lite_dtls_server_on_virtual_time() -> None:
    client_cert, server_cert = DtlsCertificate.generate(), DtlsCertificate.generate()
    client_ufrag, client_pwd = new_ice_credentials()
    server_ufrag, server_pwd = new_ice_credentials()
    server_addr, client_addr = ("192.0.2.1", 5000), ("192.0.2.2", 6000)
    client = ClientTransport(
        certificate=client_cert,
        local_ufrag=client_ufrag,
        local_pwd=client_pwd,
        remote=_remote(server_ufrag, server_pwd, server_cert, 5000),
        dtls_role="client",
    )
    lite = IceLiteSession(local_ufrag=server_ufrag, local_pwd=server_pwd)
    dtls = DtlsSession(
        certificate=server_cert, role="server", remote_fingerprints=client_cert.fingerprints
    )
    now = 0.0
    client.start(now)
    events: list[object] = []
    server_keys = None
    for _ in range(50):
        for datagram, address in client.datagrams_to_send():
            assert address == server_addr
            if datagram[0] < 4:
                reply = lite.receive_stun(datagram, client_addr, now)
                if reply is not None:
                    client.receive(reply, server_addr, now)
            else:
                dtls.receive(datagram, now)
                for answer in dtls.datagrams_to_send():
                    client.receive(answer, server_addr, now)
        while (server_event := dtls.next_event()) is not None:
            server_keys = server_event
        while (client_event := client.next_event()) is not None:
            events.append(client_event)
        if any(isinstance(e, TransportConnected) for e in events):
            break
        now += 0.01
    assert isinstance(events[0], IceSelected)
    connected = events[-1]
    assert isinstance(connected, TransportConnected)
    assert connected.address == server_addr
    assert isinstance(server_keys, DtlsConnected)
    assert connected.keys.local_key == server_keys.remote_key
    assert connected.keys.remote_salt == server_keys.local_salt


def _check(username: str, key: bytes, *, controlling: bool = False) -> bytes:
    attributes: dict[str, object] = {"USERNAME": username, "PRIORITY": 1}
    attributes["ICE-CONTROLLING" if controlling else "ICE-CONTROLLED"] = 7
    request = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.REQUEST,
        attributes=attributes,
    )
    request.add_message_integrity(key)
    return bytes(request)


def test_checks_from_a_full_ice_server_are_answered_rfc8445_section_7_3() -> None:
    addr = ("192.0.2.7", 4000)

    def answer(username: str, key: bytes, *, controlling: bool = False) -> bytes | None:
        request = _check(username, key, controlling=controlling)
        return answer_binding_request(request, addr, local_ufrag="mine", local_pwd="pw")

    reply = answer("mine:theirs", b"pw")
    assert reply is not None
    response = stun.parse_message(reply)
    assert response.message_class == stun.Class.RESPONSE
    assert response.attributes["XOR-MAPPED-ADDRESS"] == addr
    assert response.check_message_integrity(b"pw")
    # Wrong password or someone else's ufrag: dropped.
    assert answer("mine:theirs", b"no") is None
    assert answer("other:theirs", b"pw") is None
    # Both controlling: the offerer keeps the role, 487 (RFC 8445 §7.3.1.1).
    conflict = answer("mine:theirs", b"pw", controlling=True)
    assert conflict is not None
    assert stun.parse_message(conflict).attributes["ERROR-CODE"][0] == 487


@given(data=st.binary(max_size=300))
def test_answer_binding_request_fuzz(data: bytes) -> None:
    reply = answer_binding_request(data, ("192.0.2.1", 1), local_ufrag="u", local_pwd="p")
    assert reply is None or isinstance(reply, bytes)


@given(data=st.binary(max_size=300))
def test_client_transport_receive_fuzz(data: bytes) -> None:
    result = _FUZZ_CLIENT.receive(data, ("192.0.2.1", 5000), 1.0)
    assert result is None or result == data


_FUZZ_CLIENT = ClientTransport(
    certificate=DtlsCertificate.generate(),
    local_ufrag="u",
    local_pwd="p" * 22,
    remote=_remote("r", "q" * 22, DtlsCertificate.generate(), 5000),
    dtls_role="server",
)


# --- offers -------------------------------------------------------------------------------


def _local() -> LocalParameters:
    ufrag, pwd = new_ice_credentials()
    return LocalParameters(
        ice_ufrag=ufrag,
        ice_pwd=pwd,
        fingerprints=DtlsCertificate.generate().fingerprints,
        candidate=host_candidate("127.0.0.1", 5000),
    )


_SERVER = LocalTransport(
    ice_ufrag="srv1", ice_pwd="s" * 24, fingerprints=[("sha-256", "AB:CD")], candidates=[]
)


@pytest.mark.parametrize("codec", ["vp8", "h264"])
@pytest.mark.parametrize("simulcast", [False, True])
def test_publisher_offer_negotiates_with_whepfan(codec: str, simulcast: bool) -> None:
    tracks = [
        PublishedTrack(kind="audio", codec="opus", ssrcs=(1,)),
        PublishedTrack(
            kind="video",
            codec=codec,
            ssrcs=(2, 3, 4) if simulcast else (2,),
            rids=("q", "h", "f") if simulcast else (),
        ),
    ]
    offer = SessionDescription.parse(publisher_offer(_local(), tracks, cname="c", stream_id="s"))
    assert remote_transport(offer).setup == "actpass"
    _, ingest = answer_publisher(offer, _SERVER)
    assert [m.kind for m in ingest] == ["audio", "video"]
    assert ingest[1].codec.name.lower() == codec
    if simulcast:
        assert ingest[1].rids == ("q", "h", "f")
    else:
        assert ingest[1].ssrc == 2


@pytest.mark.parametrize("codec", ["vp8", "h264"])
def test_viewer_offer_negotiates_with_whepfan(codec: str) -> None:
    published = [
        PublishedTrack(kind="audio", codec="opus", ssrcs=(1,)),
        PublishedTrack(kind="video", codec=codec, ssrcs=(2,)),
    ]
    publisher = SessionDescription.parse(
        publisher_offer(_local(), published, cname="c", stream_id="s")
    )
    _, ingest = answer_publisher(publisher, _SERVER)
    offer = SessionDescription.parse(viewer_offer(_local()))
    assert [m.direction for m in offer.media] == ["recvonly", "recvonly"]
    assert offer.bundle_mids == ["0", "1"]
    ssrcs = iter(range(100, 200))
    _, egress = answer_viewer(offer, _SERVER, ingest, ssrc_source=lambda: next(ssrcs))
    assert [(m.kind, m.codec.name.lower()) for m in egress] == [("audio", "opus"), ("video", codec)]


def test_publisher_options_are_validated() -> None:
    with pytest.raises(ValueError):
        PublisherOptions(url="http://x/whip/a", codec="av1")
    with pytest.raises(ValueError):
        PublisherOptions(url="http://x/whip/a", audio=False, video=False)
    with pytest.raises(ValueError):
        PublisherOptions(url="http://x/whip/a", simulcast=True, width=644)
    with pytest.raises(ValueError):
        PublisherOptions(url="http://x/whip/a", fps=7)


# --- against a live whepfan server ------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(settings_for(token=TOKEN))
    yield live
    live.close()


async def start_viewer(viewer: DecodingViewer, url: str) -> None:
    """WHEP POST of the viewer's offer (audio, then video) and its answer applied."""
    offer = await viewer.offer(["audio", "video"])
    async with aiohttp.ClientSession() as http:
        _, answer = await exchange(http, url, offer)
    await viewer.accept(answer)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_loopback_candidates(monkeypatch)


@pytest.mark.parametrize("codec", ["vp8", "h264"])
async def test_publisher_stream_decodes_in_an_aiortc_viewer(server: LiveServer, codec: str) -> None:
    options = PublisherOptions(
        url=f"{server.url}/whip/decode-{codec}",
        token=TOKEN,
        codec=codec,
        width=320,
        height=240,
        # whepfan drops a viewer's keyframe request that falls within 0.5 s of the last
        # one instead of deferring it; periodic keyframes keep the test independent of that.
        keyframe_interval=1.0,
    )
    async with Publisher(options) as publisher:
        viewer = DecodingViewer()
        try:
            await start_viewer(viewer, f"{server.url}/whep/decode-{codec}")
            deadline = time.monotonic() + 10
            while (
                len(viewer.video_frames) < 10 or not viewer.audio_frames
            ) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(viewer.video_frames) >= 10, f"{len(viewer.video_frames)} frames decoded"
            assert viewer.audio_frames > 0
            frame = viewer.video_frames[-1]
            assert (frame.width, frame.height) == (320, 240)
        finally:
            await viewer.close()
        # whepfan asks for a keyframe when the publisher is keyed and when a viewer joins.
        assert publisher.stats.keyframe_requests >= 1
        assert publisher.stats.rtcp_received >= 1
        assert publisher.failure is None


async def test_simulcast_publisher_sends_three_encodings(server: LiveServer) -> None:
    options = PublisherOptions(
        url=f"{server.url}/whip/simulcast", token=TOKEN, simulcast=True, width=320, height=240
    )
    async with Publisher(options) as publisher:
        await publisher.wait(1.0)
        assert [layer.rid for layer in publisher.layers] == ["q", "h", "f"]
        assert [(layer.width, layer.height) for layer in publisher.layers] == [
            (80, 60),
            (160, 120),
            (320, 240),
        ]
        assert all(layer.sender.packets_sent > 0 for layer in publisher.layers)
        assert publisher.failure is None


async def test_publish_with_a_wrong_token_reports_401(server: LiveServer) -> None:
    options = PublisherOptions(url=f"{server.url}/whip/denied", token="wrong")
    with pytest.raises(PublishError) as caught:
        await Publisher(options).start()
    assert caught.value.status == 401


def test_whepfan_publish_command_runs_for_its_duration(server: LiveServer) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "whepfan.cli",
            "publish",
            f"{server.url}/whip/cli",
            "--token",
            TOKEN,
            "--codec",
            "h264",
            "--size",
            "160x120",
            "--duration",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "frames_encoded" in result.stderr
    assert time.monotonic() - started >= 1.5
