"""Write the seed corpora of ``fuzz/corpus/<target>/``: ``python -m fuzz.seeds``.

Seeds are real traffic where we have it and RFC examples where the RFC gives one:
Chromium 156 offers (``tests/data/sdp/``), the RFC 5769 §2.1 STUN request, the RFC 3550 /
RFC 4585 / RFC 5104 / REMB packets and libx264 parameter sets of the unit tests, a real
OpenSSL DTLS 1.2 handshake between two ``DtlsSession``\\ s, and what whepfan itself emits
(its sdpfrag answer, its STUN checks, its RTCP). The files are committed; rerun this after
a format gains a feature so the fuzzer starts from it. Existing files are kept, new ones
are named by content (``seed-<sha1>``), so rerunning is idempotent for fixed inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from aioice import stun

from whepfan.protocol import codecs, dtls, ice, negotiation, rtcp, rtp, sdp

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "fuzz" / "corpus"
SDP_CAPTURES = REPO / "tests" / "data" / "sdp"

# RFC 5769 §2.1 sample request: USERNAME "evtj:h6vY", SOFTWARE, PRIORITY, ICE-CONTROLLED,
# MESSAGE-INTEGRITY (password "VOkJxbRl1RmTxUk/WvJxBt") and FINGERPRINT.
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)


def _sdp() -> Iterator[bytes]:
    for path in sorted(SDP_CAPTURES.glob("*.sdp")):
        yield path.read_bytes()
    # whepfan's own answer shape: ice-lite, candidates, end-of-candidates.
    yield (
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
        "a=ice-lite\r\na=msid-semantic: WMS *\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n"
        "a=candidate:1 1 udp 2130706431 192.0.2.10 40000 typ host\r\n"
        "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdef012345\r\n"
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:passive\r\n"
        "a=mid:0\r\na=sendonly\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\n"
        "a=fmtp:111 minptime=10;useinbandfec=1\r\na=end-of-candidates\r\n"
        "m=video 0 UDP/TLS/RTP/SAVPF 96 97\r\nb=AS:2500\r\na=mid:1\r\na=bundle-only\r\n"
        "a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack pli\r\na=rtpmap:97 rtx/90000\r\n"
        "a=fmtp:97 apt=96\r\na=ssrc-group:FID 1 2\r\na=ssrc:1 cname:x\r\n"
        "a=rid:h send pt=96;max-width=1280\r\na=simulcast:send h;~l\r\n"
    ).encode()


def _offer() -> Iterator[bytes]:
    # The first byte picks the entry point (fuzz/targets.py fuzz_offer): 0x01 a WHIP offer,
    # 0x02 a WHEP offer (0x04: against the simulcast stream, 0x08: without transport-cc),
    # 0x00 an answer to whepfan's counter-offer.
    from fuzz import targets

    for path in sorted(SDP_CAPTURES.glob("*.sdp")):
        text = path.read_bytes()
        if b"a=sendonly" in text:
            yield b"\x01" + text
        else:
            for mode in (0x02, 0x06, 0x0A):
                yield bytes([mode]) + text
    for mode in (0x00, 0x04):
        counter = negotiation.build_counter_offer(
            targets._local_transport(),
            targets._stream_ingest(bool(mode & 0x04)),
            ssrc_source=targets._ssrc_source(),
        )
        # A client that keeps everything answers recvonly and active (RFC 3264 §6.1).
        for section in counter.media:
            section.direction = "recvonly"
            section.setup = "active"
        yield bytes([mode]) + counter.serialize().encode()


_CHROMIUM_CANDIDATES = (
    "4192817958 1 udp 2122194687 192.0.2.2 33620 typ host generation 0 network-id 1",
    "2267460030 1 tcp 1518214911 192.0.2.2 9 typ host tcptype active generation 0",
    "842163049 1 udp 1686052607 198.51.100.7 50000 typ srflx raddr 192.0.2.2 rport 33620",
)


def _sdpfrag() -> Iterator[bytes]:
    candidates = [sdp.Candidate.parse(text) for text in _CHROMIUM_CANDIDATES]
    yield sdp.serialize_sdpfrag(
        "abcd", "0123456789abcdef012345", candidates, "0", ["trickle"], bundle_mids=["0", "1"]
    ).encode()
    # A browser's trickle PATCH (WHEP §4.4.2): credentials at media level, one candidate.
    yield (
        "a=ice-options:trickle ice2\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n"
        "a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n"
        f"a=candidate:{_CHROMIUM_CANDIDATES[0]}\r\na=end-of-candidates\r\n"
    ).encode()
    # Session-level credentials, a candidate before any m= line (spec notes §2.2).
    yield (
        f"a=ice-ufrag:x1\na=ice-pwd:y2y2y2y2y2y2y2y2y2y2y2y2\na=candidate:{_CHROMIUM_CANDIDATES[2]}\n"
    ).encode()


def _stun() -> Iterator[bytes]:
    # The first byte of a STUN seed steers the target's fix-ups (fuzz.targets.fuzz_stun).
    yield b"\x00" + RFC5769_REQUEST
    yield b"\x07" + RFC5769_REQUEST
    checker = ice.IceControllingChecker(
        local_ufrag="h6vY",
        local_pwd="local-password-of-22-chars",
        remote_ufrag="evtj",
        remote_pwd="VOkJxbRl1RmTxUk/WvJxBt",
    )
    checker.add_remote_candidate(("192.0.2.10", 40000))
    request = checker.next_request(0.0)
    if request is not None:
        yield b"\x07" + request[0]
    indication = stun.Message(
        message_method=stun.Method.BINDING, message_class=stun.Class.INDICATION
    )
    indication.add_fingerprint()
    yield b"\x00" + bytes(indication)
    response = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.RESPONSE,
        attributes={"XOR-MAPPED-ADDRESS": ("2001:db8::1", 40000)},
    )
    response.add_message_integrity(b"VOkJxbRl1RmTxUk/WvJxBt")
    yield b"\x0f" + bytes(response)


def _rtp() -> Iterator[bytes]:
    # RFC 8285 §4.2 / §4.3 extension blocks behind a fixed header with X set.
    header = bytes.fromhex("906012340000d4315e1f2a3b")
    yield header + bytes.fromhex("bede000310aa21bbbb000033cccccccc") + b"payload"
    yield header + bytes.fromhex("1000000301000201dd000304eeeeeeee") + b"payload"
    # Chromium-like VP8: abs-send-time, transport-wide-cc, mid, rid.
    yield bytes.fromhex("906012340000d4315e1f2a3bbede0003221a2b3c3100014030a0680090808001109d012a")
    yield bytes(
        rtp.RtpPacket(
            payload_type=97,
            sequence_number=65535,
            timestamp=2**32 - 1,
            ssrc=2,
            marker=True,
            csrcs=[1, 2, 3],
            extensions=[(3, b"1"), (20, b"")],
            payload=rtp.wrap_rtx(4660, b"\x90\x80\x80\x01"),
            padding_length=7,
        )
    )
    yield bytes(rtp.RtpPacket(payload_type=111, sequence_number=1, timestamp=960, ssrc=1))


def _rtcp() -> Iterator[bytes]:
    sender = bytes.fromhex(
        "81c8000c12345678e1a2b3c48000000000015f90000000640000fa00"
        "9abcdef0050000070001234500000010a1b2c3d400008000"
    )
    yield sender
    yield (
        bytes.fromhex("80c9000112345678")
        + bytes.fromhex("81ca0006123456780110")
        + (b"abcdefghijklmnop\0\0")
    )
    yield bytes.fromhex("81cb00031234567804") + b"done\0\0\0"
    yield bytes.fromhex("81cd0003000000011234567803e80005")
    yield bytes.fromhex("81ce00020000000112345678")
    yield bytes.fromhex("84ce000400000001000000001234567807000000")
    yield bytes.fromhex("8fce0005000000010000000052454d42010bd09012345678")
    yield bytes.fromhex("8fcd00050000000112345678000100020000010020020000")
    yield bytes.fromhex("80c9000112345678a1ce0003000000011234567800000004")
    yield bytes.fromhex("80cc000212345678") + b"name" + bytes.fromhex("80cf000112345678")
    yield rtcp.serialize_compound(
        [
            rtcp.ReceiverReport(ssrc=1, reports=[rtcp.ReportBlock(ssrc=2, cumulative_lost=-3)]),
            rtcp.SourceDescription(chunks=[rtcp.SdesChunk(ssrc=1, items=[(1, b"cname")])]),
            rtcp.GenericNack.from_sequence_numbers(
                sender_ssrc=1, media_ssrc=2, sequence_numbers=[65534, 65535, 0, 1, 40]
            ),
        ]
    )


def _codecs() -> Iterator[bytes]:
    for text in (
        "105002009d012a4001f000",  # VP8 keyframe start (RFC 7741 §4.3)
        "90809549f028009d012a4001f000",  # aiortc VP8 keyframe: X, I, 15-bit picture id
        "9080954af10d00e4718fcc",  # aiortc VP8 interframe
        "93907f1f",  # VP8 X S PID=3; I K; 7-bit picture id; KEYIDX
        "aa80010000",  # VP9 B, layer indices, TL0PICIDX
        "8805",  # VP9 B with a 7-bit picture id
        "6742c01fd90141fa10000003001000000303c8f1832480",  # H.264 SPS 320x240
        "6764003eacb200f0044fcb08000003000800f4240478402124",  # libx264 High 1080p
        "67f4003e919640290bf8f9e10000030001001e84808f08042480",  # High 4:4:4
        "6764003eacd940b424d08000000300800f42400f8f1ecb",  # interlaced
        "68cb8cb2",  # PPS
        "7c8588",  # FU-A start of an IDR slice
        "180a0b",  # AV1 aggregation header with N set
    ):
        yield bytes.fromhex(text)
    # STAP-A (RFC 6184 §5.7.1) carrying an SPS and a PPS.
    sps = bytes.fromhex("6742c01fd90141fa10000003001000000303c8f1832480")
    pps = bytes.fromhex("68cb8cb2")
    yield b"\x18" + len(sps).to_bytes(2, "big") + sps + len(pps).to_bytes(2, "big") + pps
    # VP9 keyframe with a scalability structure (RFC 9628 §4.2.1): 3 spatial layers,
    # their sizes and an L1T3 group of frames; then a flexible-mode inter frame.
    structure = codecs.Vp9ScalabilityStructure(
        spatial_layers=3,
        resolutions=((320, 180), (640, 360), (1280, 720)),
        pictures=(
            codecs.Vp9GroupPicture(temporal_layer=0, reference_diffs=(4,)),
            codecs.Vp9GroupPicture(temporal_layer=2, switching_up=True, reference_diffs=(1,)),
            codecs.Vp9GroupPicture(temporal_layer=1, switching_up=True, reference_diffs=(2,)),
        ),
    )
    keyframe = codecs.Vp9PayloadDescriptor(
        picture_id=300,
        start_of_frame=True,
        temporal_layer=0,
        tl0_pic_idx=7,
        scalability_structure=structure,
    )
    yield bytes(keyframe) + b"\x82\x49\x83\x42"
    inter = codecs.Vp9PayloadDescriptor(
        picture_id=301,
        inter_picture_predicted=True,
        flexible=True,
        start_of_frame=True,
        end_of_frame=True,
        temporal_layer=2,
        spatial_layer=1,
        reference_diffs=(1, 2),
    )
    yield bytes(inter) + b"\x87"


def _dtls() -> Iterator[bytes]:
    # A real DTLS 1.2 handshake between our own client and server sessions. The first
    # byte of a DTLS seed picks the role that receives it (0x10: client) and the MTU.
    certificate = dtls.DtlsCertificate.generate()
    peer = dtls.DtlsCertificate.generate()
    client = dtls.DtlsSession(
        certificate=peer, role="client", remote_fingerprints=certificate.fingerprints
    )
    server = dtls.DtlsSession(
        certificate=certificate, role="server", remote_fingerprints=peer.fingerprints
    )
    client.start(0.0)
    server.start(0.0)
    for _ in range(4):
        for datagram in client.datagrams_to_send():
            yield b"\x0a" + datagram
            server.receive(datagram, 0.1)
        for datagram in server.datagrams_to_send():
            yield b"\x1a" + datagram
            client.receive(datagram, 0.1)
    client.close()
    for datagram in client.datagrams_to_send():
        yield b"\x0a" + datagram  # close_notify


def _json() -> Iterator[bytes]:
    documents: Iterable[object] = (
        {"mediaId": "1", "rid": "h"},
        {"mediaId": 1, "encodingId": "l"},
        {"spatialLayerId": 1, "temporalLayerId": 2, "maxSpatialLayerId": 2},
        {"maxTemporalLayerId": 1, "maxWidth": 1280, "maxHeight": 720, "unknown": [None]},
        {},
        ["active", "inactive", "layers", "viewercount", "reconnect"],
        ["layers"],
    )
    for document in documents:
        yield json.dumps(document).encode()


def _if_match() -> Iterator[bytes]:
    for value in ('"a1b2c3d4"', "*", '"*"', 'W/"weak", "a1b2c3d4"', '"a,b" , "c"', "a1b2c3d4"):
        yield value.encode()


def _headers() -> Iterator[bytes]:
    # Each seed is read as every header the target knows: real values of each.
    for value in (
        "application/sdp",
        "application/trickle-ice-sdpfrag; charset=UTF-8",
        'application/json; x="a\\"b"; ;y=z',
        'for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db8:cafe::17]:4711"',
        "for=unknown, for=_hidden;by=10.0.0.1, For=10.1.2.3",
        "203.0.113.195, 70.41.3.18, 10.0.0.7",
        "2001:db8::1, [2001:db8::2]:443, 10.0.0.9:8080",
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoidmlldyJ9.c2ln",
        "raw-token-without-scheme",
    ):
        yield value.encode()


SEEDS = {
    "sdp": _sdp,
    "offer": _offer,
    "sdpfrag": _sdpfrag,
    "stun": _stun,
    "rtp": _rtp,
    "rtcp": _rtcp,
    "codecs": _codecs,
    "dtls": _dtls,
    "json": _json,
    "if-match": _if_match,
    "headers": _headers,
}


def main() -> None:
    for target, seeds in SEEDS.items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for data in seeds():
            path = directory / f"seed-{hashlib.sha1(data).hexdigest()}"
            if not path.exists():
                path.write_bytes(data)
        print(f"{target}: {len(list(directory.iterdir()))} seeds")


if __name__ == "__main__":
    main()
