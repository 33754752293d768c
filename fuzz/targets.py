"""One fuzz target per parser: what each parser may do with any input, and what it must not.

A target is a function of one ``bytes`` input. It hands the input to a parser and returns
normally when the parser either produced a value or raised the documented peer-error type,
:class:`whepfan.errors.ParseError` ("Parsers raise only this (or return a value) for any
input", errors.py; the h11 split of STYLE.md). Anything else escaping a target is a crash:
an IndexError or struct.error out of a parser, a ValueError out of a serializer given what
its own parser produced, or an AssertionError from a property the module promises, chiefly
the round trip ``parse(serialize(parse(x))) == parse(x)`` of the formats that have both
halves (SDP, candidates, RTP, RTCP, payload descriptors, entity-tags).

Paths that checksums would hide from a mutating fuzzer are opened the way libFuzzer
targets usually do it: the STUN target may recompute MESSAGE-INTEGRITY and FINGERPRINT
(RFC 8489 §14.5, §14.7) after mutation, as directed by its first input byte, so that the
authenticated half of ``IceLiteSession.receive_stun`` is reached too.

Each target stays small (str0m keeps one three-line target per parser); the runner
(``fuzz/run.py``) and the regression replay (``tests/test_fuzz_regressions.py``) call the
same functions through :data:`TARGETS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from whepfan.errors import ParseError, PeerError
from whepfan.http import clientaddr, etag
from whepfan.http.auth import presented_token
from whepfan.http.events import EVENT_TYPES, parse_subscription
from whepfan.http.headers import MediaType, media_type_essence
from whepfan.http.layers import parse_layer_request
from whepfan.protocol import codecs, demux, dtls, ice, negotiation, rtcp, rtp, sdp

__all__ = ["TARGETS", "FuzzTarget"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FuzzTarget:
    """A parser under test: its entry point and the input size worth exploring."""

    name: str
    function: Callable[[bytes], None]
    # libFuzzer's -max_len: what the format carries in practice (one UDP datagram for the
    # packet formats, a few KB for an SDP offer, a header line for If-Match), with room.
    max_len: int
    description: str


# --------------------------------------------------------------------------- SDP


def fuzz_sdp(data: bytes) -> None:
    """Offer or answer text (RFC 8866): parse, and the sdp module's promise that
    ``parse(serialize(parse(x))) == parse(x)``; the serialisation is then a fixed point."""
    try:
        description = sdp.SessionDescription.parse(data)
    except ParseError:
        return
    text = description.serialize()
    again = sdp.SessionDescription.parse(text)
    assert again == description, f"SDP does not survive serialize/parse:\n{text}"
    assert again.serialize() == text


# The streams a fuzzed WHEP offer is answered against: Chromium's single-layer and
# simulcast WHIP offers, as answered by whepfan (tests/data/sdp/).
_PUBLISHER_OFFERS = (
    "chromium-156-whip-sendonly-offer.sdp",
    "chromium-156-whip-simulcast-offer.sdp",
)
_SDP_CAPTURES = Path(__file__).resolve().parent.parent / "tests" / "data" / "sdp"
_OFFER_PUBLISHER, _OFFER_VIEWER = 0x01, 0x02
_OFFER_SIMULCAST_STREAM, _OFFER_NO_TRANSPORT_CC = 0x04, 0x08


def _local_transport() -> negotiation.LocalTransport:
    return negotiation.LocalTransport(
        ice_ufrag="srvU",
        ice_pwd="serverpasswordserverpass",
        fingerprints=[("sha-256", ":".join(["4F"] * 32))],
        candidates=[sdp.Candidate.parse("1 1 udp 2130706431 192.0.2.10 40000 typ host")],
    )


@cache
def _stream_ingest(simulcast: bool) -> list[negotiation.IngestMedia]:
    text = (_SDP_CAPTURES / _PUBLISHER_OFFERS[simulcast]).read_bytes()
    _, ingest = negotiation.answer_publisher(sdp.SessionDescription.parse(text), _local_transport())
    return ingest


def _ssrc_source() -> Callable[[], int]:
    ssrcs = iter(range(1000, 1_000_000))
    return lambda: next(ssrcs)


def fuzz_offer(data: bytes) -> None:
    """A peer's SDP through offer/answer (``protocol/negotiation.py``), as the router hands
    it over: a WHIP offer (``answer_publisher``), a WHEP offer (``answer_viewer``) or a
    viewer's answer to whepfan's counter-offer (``accept_counter_answer``, WHEP §4.2.2).
    Each ends in a value or a PeerError, the 4xx the HTTP layer answers; anything else is
    a 500 (a one-SSRC ``a=ssrc-group:FID`` was an IndexError here, issue 16). What whepfan
    answers or offers parses back. The first byte picks the entry point and the stream."""
    if not data:
        return
    mode, text = data[0], data[1:]
    try:
        description = sdp.SessionDescription.parse(text)
    except ParseError:
        return
    local = _local_transport()
    ingest = _stream_ingest(bool(mode & _OFFER_SIMULCAST_STREAM))
    transport_cc = not mode & _OFFER_NO_TRANSPORT_CC
    written: sdp.SessionDescription | None = None
    try:
        if mode & _OFFER_PUBLISHER:
            written, _ = negotiation.answer_publisher(description, local, transport_cc=True)
        elif mode & _OFFER_VIEWER:
            written, _ = negotiation.answer_viewer(
                description, local, ingest, ssrc_source=_ssrc_source(), transport_cc=transport_cc
            )
        else:
            counter_offer = negotiation.build_counter_offer(
                local, ingest, ssrc_source=_ssrc_source(), transport_cc=transport_cc
            )
            negotiation.accept_counter_answer(counter_offer, description)
            negotiation.remote_transport(description)
    except PeerError:
        return
    if written is not None:
        text_out = written.serialize()
        assert sdp.SessionDescription.parse(text_out) == written, text_out


def fuzz_sdpfrag(data: bytes) -> None:
    """A trickle/restart PATCH body (RFC 8840): parse leniently; every candidate survives
    ``str``/``parse``; the server's own fragment (``serialize_sdpfrag``) built from what was
    read parses back to the same ICE credentials, options and candidates."""
    try:
        fragment = sdp.parse_sdpfrag(data)
    except ParseError:
        return
    candidates = fragment.all_candidates
    for candidate in candidates:
        assert sdp.Candidate.parse(str(candidate)) == candidate, str(candidate)
        assert sdp.Candidate.parse(f"a=candidate:{candidate}") == candidate
    ufrag, pwd = fragment.ufrag, fragment.pwd
    if ufrag is None or pwd is None:
        return
    body = sdp.serialize_sdpfrag(ufrag, pwd, candidates, fragment.mid or "0", fragment.ice_options)
    echoed = sdp.parse_sdpfrag(body)
    assert (echoed.ufrag, echoed.pwd, echoed.ice_options, echoed.all_candidates) == (
        ufrag,
        pwd,
        fragment.ice_options,
        candidates,
    ), body
    assert echoed.complete and echoed.ice_lite


# --------------------------------------------------------------------------- STUN

# RFC 5769 §2.1 credentials, so that the RFC's sample request in the seed corpus (and its
# mutations) authenticate: USERNAME "evtj:h6vY" names local ufrag "evtj".
STUN_LOCAL_UFRAG = "evtj"
STUN_LOCAL_PWD = "VOkJxbRl1RmTxUk/WvJxBt"
_STUN_HEADER = 20
_FIX_LENGTH, _FIX_INTEGRITY, _FIX_FINGERPRINT, _IPV6_SOURCE = 0x01, 0x02, 0x04, 0x08


def _set_stun_length(message: bytearray, end: int) -> None:
    struct.pack_into("!H", message, 2, (end - _STUN_HEADER) & 0xFFFF)


def _fix_up_stun(message: bytearray, mode: int) -> None:
    """Make a mutated message pass the checks a mutation almost never satisfies by chance:
    the header length (RFC 8489 §5), MESSAGE-INTEGRITY (§14.5: HMAC-SHA1 over the message
    up to the attribute, the length field counting up to its end) and FINGERPRINT (§14.7:
    CRC-32 XOR 0x5354554E, the length counting the fingerprint too)."""
    if len(message) < _STUN_HEADER:
        return
    if mode & _FIX_LENGTH:
        _set_stun_length(message, len(message))
    declared = struct.unpack_from("!H", message, 2)[0]
    key = STUN_LOCAL_PWD.encode()
    position = _STUN_HEADER
    while position + 4 <= len(message):
        attribute_type, length = struct.unpack_from("!HH", message, position)
        value = position + 4
        if value + length > len(message):
            break
        if attribute_type == 0x0008 and length == 20 and mode & _FIX_INTEGRITY:
            _set_stun_length(message, value + 20)
            digest = hmac.new(key, bytes(message[:position]), hashlib.sha1).digest()
            message[value : value + 20] = digest
        elif attribute_type == 0x8028 and length == 4 and mode & _FIX_FINGERPRINT:
            _set_stun_length(message, value + 4)
            crc = (zlib.crc32(bytes(message[:position])) ^ 0x5354554E) & 0xFFFFFFFF
            struct.pack_into("!I", message, value, crc)
        position = value + length + (-length % 4)
    struct.pack_into("!H", message, 2, declared)


def fuzz_stun(data: bytes) -> None:
    """A datagram in the STUN range (RFC 8489), as ``whepfan.protocol.ice`` meets it: the
    ufrag router never raises, ``parse_stun`` returns or raises ParseError, the ICE-lite
    session answers or drops (never raises), and whatever it answers is well-formed STUN
    for the same transaction. The first byte steers the fix-ups and the source family."""
    if not data:
        return
    mode, message = data[0], bytearray(data[1:])
    _fix_up_stun(message, mode)
    datagram = bytes(message)
    ufrag = ice.stun_local_ufrag(datagram)
    assert ufrag is None or isinstance(ufrag, str)
    with contextlib.suppress(ParseError):
        ice.parse_stun(datagram)
    session = ice.IceLiteSession(local_ufrag=STUN_LOCAL_UFRAG, local_pwd=STUN_LOCAL_PWD, now=0.0)
    source = ("2001:db8::1", 40000, 0, 0) if mode & _IPV6_SOURCE else ("192.0.2.1", 40000)
    reply = session.receive_stun(datagram, source, 1.0, local="192.0.2.10")
    if reply is not None:
        answer = ice.parse_stun(reply)
        assert answer.transaction_id == datagram[8:20]
        assert ice.stun_local_ufrag(reply) is None  # a response routes to no session
    while session.next_event() is not None:
        pass


# --------------------------------------------------------------------------- RTP / RTCP

_EXTENSION_MAP = rtp.HeaderExtensionMap(
    {rtp.URI_MID: 1, rtp.URI_RTP_STREAM_ID: 2, rtp.URI_REPAIRED_RTP_STREAM_ID: 3}
)


def fuzz_rtp(data: bytes) -> None:
    """An RTP datagram (RFC 3550 §5.1, RFC 8285 extensions, RFC 4588 RTX): demux and
    header length agree with the parser, ``parse(serialize(p)) == p``, the Python-side
    header rewrite changes exactly the fields asked for, and the SDES readers return text
    or ParseError."""
    demux.classify_datagram(data)
    demux.is_rtcp(data)
    try:
        header_length: int | None = rtp.rtp_header_length(data)
    except ParseError:
        header_length = None
    try:
        packet = rtp.RtpPacket.parse(data)
    except ParseError:
        return
    assert header_length == len(data) - len(packet.payload) - packet.padding_length
    encoded = packet.serialize()
    assert rtp.RtpPacket.parse(encoded) == packet, encoded.hex()
    rewritten = rtp.RtpPacket.parse(
        rtp.rewrite_header_fields(
            data,
            payload_type=packet.payload_type ^ 0x7F,
            sequence_number=(packet.sequence_number + 1) & 0xFFFF,
            ssrc=packet.ssrc ^ 0xFFFFFFFF,
            marker=not packet.marker,
        )
    )
    assert rewritten.payload == packet.payload and rewritten.extensions == packet.extensions
    assert rewritten.ssrc == packet.ssrc ^ 0xFFFFFFFF
    assert rewritten.marker is not packet.marker
    for read in (
        _EXTENSION_MAP.read_mid,
        _EXTENSION_MAP.read_rid,
        _EXTENSION_MAP.read_repaired_rid,
    ):
        with contextlib.suppress(ParseError):
            read(packet)
    if len(packet.payload) >= 2:
        original_sequence, original = rtp.unwrap_rtx(packet.payload)
        assert rtp.wrap_rtx(original_sequence, original) == packet.payload


def fuzz_rtcp(data: bytes) -> None:
    """A compound RTCP datagram (RFC 3550 §6, RFC 4585, RFC 5104, REMB): parse, the
    compound round trip (its serialisation a fixed point), NACK (PID, BLP) packing, and
    the report-block arithmetic the server runs on what it read."""
    try:
        packets = rtcp.parse_compound(data)
    except ParseError:
        return
    encoded = rtcp.serialize_compound(packets)
    assert rtcp.parse_compound(encoded) == packets, encoded.hex()
    assert rtcp.serialize_compound(rtcp.parse_compound(encoded)) == encoded
    for packet in packets:
        if isinstance(packet, rtcp.GenericNack):
            lost = packet.lost_sequence_numbers()
            packed = rtcp.GenericNack.from_sequence_numbers(
                sender_ssrc=packet.sender_ssrc, media_ssrc=packet.media_ssrc, sequence_numbers=lost
            )
            assert set(packed.lost_sequence_numbers()) == set(lost)
        elif isinstance(packet, rtcp.SenderReport | rtcp.ReceiverReport):
            if isinstance(packet, rtcp.SenderReport):
                rtcp.ntp_to_unix(packet.ntp_timestamp)
            for block in packet.reports:
                rtt = rtcp.round_trip_time(
                    arrival_ntp=0xE1A2B3C480000000,
                    last_sender_report=block.last_sender_report,
                    delay_since_last_sender_report=block.delay_since_last_sender_report,
                )
                assert rtt is None or rtt >= 0.0


# --------------------------------------------------------------------------- codecs

_CODEC_NAMES = ("VP8", "video/VP9", "H264", "AV1", "opus")


def fuzz_codecs(data: bytes) -> None:
    """An RTP payload read by the ingest side: keyframe detection is a plain bool for
    any bytes (codecs.py: short payloads "are simply not keyframe starts"), frame sizes
    are a value, None or ParseError, and the VP8/VP9 descriptors survive
    ``split``/``bytes`` with the data after them untouched."""
    for name in _CODEC_NAMES:
        assert codecs.is_keyframe_start(name, data) in (True, False)
        with contextlib.suppress(ParseError):
            codecs.keyframe_size(name, data)
    try:
        vp8, rest = codecs.Vp8PayloadDescriptor.split(data)
    except ParseError:
        pass
    else:
        assert codecs.Vp8PayloadDescriptor.split(bytes(vp8) + rest) == (vp8, rest)
    try:
        vp9, rest = codecs.Vp9PayloadDescriptor.split(data)
    except ParseError:
        pass
    else:
        assert codecs.Vp9PayloadDescriptor.split(bytes(vp9) + rest) == (vp9, rest)
    with contextlib.suppress(ParseError):
        codecs.h264_sps_frame_size(data)


# --------------------------------------------------------------------------- DTLS


@cache
def _dtls_certificate() -> dtls.DtlsCertificate:
    # One key for the whole run: generating one per input would dominate the run time.
    return dtls.DtlsCertificate.generate()


# A fingerprint no fuzzed certificate has: the handshake may go far, never to keys.
_UNMATCHED_FINGERPRINT = [("sha-256", ":".join(["00"] * 32))]


def fuzz_dtls(data: bytes) -> None:
    """A datagram in the DTLS range (RFC 6347 §4.1 records): record regrouping keeps every
    byte in order within the MTU, and a ``DtlsSession`` in either role takes it without
    raising (dtls.py: "Never raises: failures become events"). The first byte picks the
    role and the MTU."""
    if not data:
        return
    mode, datagram = data[0], data[1:]
    mtu = 200 + 100 * (mode & 0x0F)
    datagrams = dtls._pack_records(datagram, mtu)
    assert b"".join(datagrams) == datagram
    assert all(datagrams)
    demux.classify_datagram(datagram)
    session = dtls.DtlsSession(
        certificate=_dtls_certificate(),
        role="client" if mode & 0x10 else "server",
        remote_fingerprints=_UNMATCHED_FINGERPRINT,
        mtu=mtu,
    )
    session.start(0.0)
    session.datagrams_to_send()
    session.receive(datagram, 0.5)
    for event in iter(session.next_event, None):
        assert isinstance(event, dtls.DtlsFailed | dtls.DtlsClosed), event
    for reply in session.datagrams_to_send():
        assert demux.classify_datagram(reply) is demux.PacketKind.DTLS
    session.handle_timer(1_000.0)
    session.close()


# --------------------------------------------------------------------------- HTTP bodies


def fuzz_json(data: bytes) -> None:
    """A JSON request body: the layer selection POST (WHEP EXT §5) and the events
    subscription POST (EXT §4.2) return their typed values or raise ParseError."""
    try:
        request = parse_layer_request(data)
    except ParseError:
        pass
    else:
        assert request.media_id is None or isinstance(request.media_id, str)
        assert request.rid is None or (isinstance(request.rid, str) and request.rid)
        for number in (
            request.spatial_layer,
            request.temporal_layer,
            request.max_spatial_layer,
            request.max_temporal_layer,
            request.max_width,
            request.max_height,
        ):
            assert number is None or (type(number) is int and number >= 0)
    try:
        names = parse_subscription(data)
    except ParseError:
        pass
    else:
        assert names and names <= set(EVENT_TYPES)


_CURRENT_ETAG = '"a1b2c3d4"'


def fuzz_if_match(data: bytes) -> None:
    """An If-Match (or ETag) request header as aiohttp hands it over (UTF-8, undecodable
    bytes kept as surrogates): ``IfMatch`` parses or raises ParseError, every tag survives
    ``str``/``EntityTag.parse``, and the PATCH precondition check (routes.py, strict mode)
    ends in a value or a 412/428 peer error (RFC 9110 §13.1.1, RFC 6585 §3)."""
    value = data.decode("utf-8", "surrogateescape")
    try:
        condition = etag.IfMatch.parse(value)
    except ParseError:
        pass
    else:
        assert condition.wildcard or condition.tags
        for tag in condition.tags:
            assert etag.EntityTag.parse(str(tag)) == tag, str(tag)
        condition.matches(_CURRENT_ETAG)
    try:
        etag.check_if_match(if_match=value, etag_header=None, current=_CURRENT_ETAG, strict=True)
    except PeerError as error:
        assert error.status in (412, 428), error


# A proxy in 10.0.0.0/8 and one on this host: the walk past trusted hops is exercised.
_PROXIES = clientaddr.parse_networks(["10.0.0.0/8", "127.0.0.1"])
_PROXY_PEER = "10.0.0.1"


def fuzz_headers(data: bytes) -> None:
    """The other request headers whepfan reads, each given the whole input as aiohttp hands
    it over: ``Content-Type`` (``MediaType``: a value or ParseError; the essence helper
    never raises and agrees with it), ``Forwarded`` and ``X-Forwarded-For`` behind a
    trusted proxy (clientaddr.py: "Nothing here raises on header contents"; the client is
    an address, or the peer itself), and ``Authorization`` (``presented_token``)."""
    value = data.decode("utf-8", "surrogateescape")
    try:
        media_type = MediaType.parse(value)
    except ParseError:
        assert media_type_essence(value) is None
    else:
        kind, _, subtype = media_type.essence.partition("/")
        assert kind and subtype and media_type.essence == media_type.essence.lower()
        assert all(name == name.lower() for name, _ in media_type.parameters)
        assert media_type_essence(value) == media_type.essence
    for header in clientaddr.ForwardedHeader:
        proxies = clientaddr.TrustedProxies(networks=_PROXIES, header=header)
        client = proxies.client(_PROXY_PEER, [value])
        # An address (a hop's, or the proxy's own), never a name or garbage from the value.
        assert client.forwarded and clientaddr._address(client.address) is not None, client
        client.key(exempt_loopback=True)
    token = presented_token(value)
    assert token is None or (token and token == token.strip())


TARGETS: dict[str, FuzzTarget] = {
    target.name: target
    for target in (
        FuzzTarget(name="sdp", function=fuzz_sdp, max_len=16384, description="SDP offers"),
        FuzzTarget(name="offer", function=fuzz_offer, max_len=16384, description="offer/answer"),
        FuzzTarget(
            name="sdpfrag", function=fuzz_sdpfrag, max_len=4096, description="trickle sdpfrag"
        ),
        FuzzTarget(name="stun", function=fuzz_stun, max_len=1500, description="STUN / ICE-lite"),
        FuzzTarget(name="rtp", function=fuzz_rtp, max_len=1500, description="RTP packets"),
        FuzzTarget(name="rtcp", function=fuzz_rtcp, max_len=1500, description="compound RTCP"),
        FuzzTarget(
            name="codecs", function=fuzz_codecs, max_len=1500, description="payload descriptors"
        ),
        FuzzTarget(name="dtls", function=fuzz_dtls, max_len=2048, description="DTLS records"),
        FuzzTarget(name="json", function=fuzz_json, max_len=2048, description="JSON bodies"),
        FuzzTarget(
            name="if-match", function=fuzz_if_match, max_len=512, description="If-Match header"
        ),
        FuzzTarget(
            name="headers", function=fuzz_headers, max_len=1024, description="other headers"
        ),
    )
}
