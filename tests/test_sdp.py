"""SDP parsing/serialisation (RFC 8866) and trickle fragments (RFC 8840)."""

from __future__ import annotations

import pytest
from _paths import SDP_FIXTURES
from hypothesis import given
from hypothesis import strategies as st

from whepfan.errors import ParseError
from whepfan.protocol.sdp import (
    Candidate,
    Extmap,
    Rid,
    SdpFragment,
    SessionDescription,
    Simulcast,
    SimulcastStream,
    parse_sdpfrag,
    serialize_sdpfrag,
)

FIXTURES = SDP_FIXTURES
WHEP_RECVONLY = (FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()
WHIP_SENDONLY = (FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
WHIP_SIMULCAST = (FIXTURES / "chromium-156-whip-simulcast-offer.sdp").read_text()
ALL_FIXTURES = [WHEP_RECVONLY, WHIP_SENDONLY, WHIP_SIMULCAST]


def _lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


# ---------------------------------------------------------------- whole descriptions


@pytest.mark.parametrize("text", ALL_FIXTURES, ids=["whep", "whip", "simulcast"])
def test_fixture_round_trip(text: str) -> None:
    parsed = SessionDescription.parse(text)
    serialized = parsed.serialize()
    assert SessionDescription.parse(serialized) == parsed
    assert serialized.endswith("\r\n") and "\n" not in serialized.replace("\r\n", "")
    # Nothing is lost: every input line comes back (order of known attributes may change).
    assert sorted(_lines(text)) == sorted(_lines(serialized))


def test_whip_sendonly_fields() -> None:
    offer = SessionDescription.parse(WHIP_SENDONLY)
    assert offer.origin.session_id == 8241999378582735258
    assert offer.bundle_mids == ["0", "1"]
    assert offer.extmap_allow_mixed
    assert offer.msid_semantic == "WMS"
    audio, video = offer.media
    assert (audio.kind, audio.port, audio.proto, audio.mid) == (
        "audio",
        33620,
        "UDP/TLS/RTP/SAVPF",
        "0",
    )
    assert audio.direction == "sendonly"
    assert audio.connection is not None and audio.connection.address == "192.0.2.2"
    assert audio.ice_ufrag == "/5MN" and audio.ice_pwd == "6tWv0p1XUlCJIzUq3Njly2CM"
    assert audio.ice_options == ["trickle"]
    assert audio.fingerprints[0][0] == "sha-256"
    assert audio.setup == "actpass"
    assert audio.rtcp_mux and audio.rtcp_rsize and not audio.rtcp_mux_only
    assert audio.msid == "- e064eb8c-674b-46fc-a321-261ea6aa104f"
    assert ("rtcp", "9 IN IP4 0.0.0.0") in audio.attributes
    assert ("rtcp-xr", "rcvr-rtt=all") in audio.attributes

    tcp = audio.candidates[2]
    assert (tcp.foundation, tcp.component, tcp.transport, tcp.priority) == (
        "2267460030",
        1,
        "tcp",
        1518214911,
    )
    assert (tcp.address, tcp.port, tcp.type, tcp.tcptype) == ("192.0.2.2", 9, "host", "active")
    assert tcp.extensions == (("tcptype", "active"), ("generation", "0"), ("network-id", "1"))

    opus = audio.codec(111)
    assert opus is not None
    assert (opus.name, opus.clock_rate, opus.channels) == ("opus", 48000, 2)
    assert opus.fmtp == [("minptime", "10"), ("useinbandfec", "1")]
    assert opus.rtcp_fb == ["transport-cc"]
    red = audio.codec(63)
    assert red is not None and red.fmtp == [("111/111", "")]

    assert video.ssrc_groups[0].semantics == "FID"
    assert video.ssrc_groups[0].ssrcs == [1750141743, 2201050024]
    assert video.ssrcs[0].ssrc == 1750141743 and video.ssrcs[0].attribute == "cname"
    assert video.ssrcs[0].value == "Jcre4gfy9nEHdJAI"
    h264 = video.codec(108)
    assert h264 is not None and h264.parameter("profile-level-id") == "42e01f"
    assert h264.rtcp_fb == ["goog-remb", "transport-cc", "ccm fir", "nack", "nack pli"]
    assert [e.id for e in video.extmaps][:3] == [14, 2, 13]
    assert video.extmap_id("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id") == 10
    assert [c.payload_type for c in video.codecs_in_format_order()][:3] == [96, 97, 102]


def test_simulcast_fixture_rids() -> None:
    video = SessionDescription.parse(WHIP_SIMULCAST).media[1]
    assert [(r.id, r.direction) for r in video.rids] == [
        ("q", "send"),
        ("h", "send"),
        ("f", "send"),
    ]
    assert video.simulcast is not None
    assert video.simulcast.send == [
        [SimulcastStream("q")],
        [SimulcastStream("h")],
        [SimulcastStream("f")],
    ]
    assert video.simulcast.recv == []


def test_tolerates_lf_and_trailing_blanks_and_bytes() -> None:
    lf = WHIP_SENDONLY.replace("\r\n", "\n").replace("\n", "  \n")
    assert SessionDescription.parse(lf) == SessionDescription.parse(WHIP_SENDONLY)
    assert SessionDescription.parse(WHIP_SENDONLY.encode()) == SessionDescription.parse(
        WHIP_SENDONLY
    )


def test_missing_optional_lines() -> None:
    minimal = "v=0\nm=audio 9 UDP/TLS/RTP/SAVPF 111\na=rtpmap:111 opus/48000/2\n"
    parsed = SessionDescription.parse(minimal)
    assert parsed.name == "-" and parsed.timing == "0 0"
    assert parsed.media[0].codecs_in_format_order()[0].name == "opus"
    assert SessionDescription.parse(parsed.serialize()) == parsed


def test_bundle_only_section_is_not_rejected() -> None:
    # RFC 9143 §6: port 0 + a=bundle-only is a live section sharing the BUNDLE transport.
    text = "v=0\nm=video 0 UDP/TLS/RTP/SAVPF 96\na=bundle-only\nm=audio 0 RTP/AVP 0\n"
    video, audio = SessionDescription.parse(text).media
    assert video.bundle_only and not video.rejected
    assert audio.rejected


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("", None),
        ('{"candidate": "x"}', 1),
        ("o=- 1 1 IN IP4 1.2.3.4\nv=0\n", 1),
        ("v=1\n", 1),
        ("v=0\nx=what\n", 2),
        ("v=0\nt=0\n", 2),
        ("v=0\nm=audio nine RTP/AVP 0\n", 2),
        ("v=0\nm=audio 9 RTP/AVP 0\na=rtpmap:111 opus\n", 3),
        ("v=0\nm=audio 9 RTP/AVP 0\na=rtpmap:300 opus/48000\n", 3),
        ("v=0\nm=audio 9 RTP/AVP 0\na=extmap:0 urn:x\n", 3),
        ("v=0\nm=audio 9 RTP/AVP 0\na=candidate:1 1 udp 1 1.2.3.4 70000 typ host\n", 3),
        ("v=0\nm=audio 9 RTP/AVP 0\na=setup:sideways\n", 3),
        ("v=0\nm=audio 9 RTP/AVP 0\na=fingerprint:sha-256 nothex\n", 3),
        ("v=0\nm=video 9 RTP/AVP 96\na=simulcast:send\n", 3),
        ("v=0\nm=video 9 RTP/AVP 96\na=rid:q both\n", 3),
        ("v=0\nm=video 9 RTP/AVP 96\ns=late\n", 3),
        ("v=0\nm=video 9 RTP/AVP 96\nc=IN IP4 0.0.0.0\nc=IN IP4 192.0.2.1\n", 4),
    ],
)
def test_garbage_raises_parse_error_naming_the_line(text: str, line: int | None) -> None:
    with pytest.raises(ParseError) as info:
        SessionDescription.parse(text)
    if line is not None:
        assert f"line {line}:" in info.value.detail


# ---------------------------------------------------------------- attribute formats


def test_candidate_rfc8839_examples() -> None:
    # RFC 8839 §5.1 grammar; values in the style of its examples (host and srflx).
    host = Candidate.parse("a=candidate:1 1 UDP 2130706431 203.0.113.141 8998 typ host")
    assert (host.component, host.transport, host.priority, host.port, host.type) == (
        1,
        "UDP",
        2130706431,
        8998,
        "host",
    )
    srflx = Candidate.parse(
        "candidate:2 1 UDP 1694498815 192.0.2.3 45664 typ srflx raddr 203.0.113.141 rport 8998"
    )
    assert (srflx.related_address, srflx.related_port) == ("203.0.113.141", 8998)
    assert str(srflx) == (
        "2 1 UDP 1694498815 192.0.2.3 45664 typ srflx raddr 203.0.113.141 rport 8998"
    )
    assert host.usable and not Candidate.parse("1 0 udp 1 192.0.2.1 9 typ host").usable


def test_extmap_rfc8285_examples() -> None:
    # RFC 8285 §5 examples.
    plain = Extmap.parse("1 http://example.com/082005/ext.htm#ttime")
    assert (plain.id, plain.direction, plain.uri, plain.attributes) == (
        1,
        None,
        "http://example.com/082005/ext.htm#ttime",
        "",
    )
    with_dir = Extmap.parse("2/sendrecv http://example.com/082005/ext.htm#xmeta short")
    assert (with_dir.id, with_dir.direction, with_dir.attributes) == (2, "sendrecv", "short")
    assert str(with_dir) == "2/sendrecv http://example.com/082005/ext.htm#xmeta short"


def test_rid_rfc8851_restrictions() -> None:
    # RFC 8851 §10 grammar: pt list first, then restrictions, ";"-separated.
    rid = Rid.parse("1 send pt=97,98;max-width=1280;max-height=720")
    assert rid.payload_types == [97, 98]
    assert rid.restrictions == [("max-width", "1280"), ("max-height", "720")]
    assert str(rid) == "1 send pt=97,98;max-width=1280;max-height=720"
    assert Rid.parse("lo recv depend=hi").restrictions == [("depend", "hi")]


def test_simulcast_rfc8853_alternatives_and_paused() -> None:
    # RFC 8853 §5.1: ";" separates streams, "," alternatives, "~" pauses a stream.
    simulcast = Simulcast.parse("send 1,~4;2;3 recv c")
    assert simulcast.send == [
        [SimulcastStream("1"), SimulcastStream("4", paused=True)],
        [SimulcastStream("2")],
        [SimulcastStream("3")],
    ]
    assert simulcast.recv == [[SimulcastStream("c")]]
    assert str(simulcast) == "send 1,~4;2;3 recv c"
    assert Simulcast.parse("recv a;b send c").recv[1] == [SimulcastStream("b")]
    for bad in ("send", "both a", "send a send b", "send a;;b", "send ~"):
        with pytest.raises(ParseError):
            Simulcast.parse(bad)


# ---------------------------------------------------------------- trickle fragments

# Spec notes §2.4 (shape of WHEP W03 / RFC 9725 examples).
TRICKLE_EXAMPLE = """a=ice-options:trickle ice2
a=group:BUNDLE 0 1
m=audio 9 UDP/TLS/RTP/SAVPF 111
a=mid:0
a=ice-ufrag:EsAw
a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1
a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0
a=end-of-candidates
"""
RESTART_ANSWER_EXAMPLE = """a=ice-lite
a=ice-options:trickle ice2
a=group:BUNDLE 0 1
m=audio 9 UDP/TLS/RTP/SAVPF 111
a=mid:0
a=ice-ufrag:289b31b7
a=ice-pwd:0b66f472495ef0ccac7bda653ab6be49
a=candidate:1 1 UDP 2130706431 198.51.100.1 39132 typ host
a=end-of-candidates
"""


def test_sdpfrag_spec_example() -> None:
    fragment = parse_sdpfrag(TRICKLE_EXAMPLE)
    assert fragment.ice_options == ["trickle", "ice2"]
    assert fragment.bundle_mids == ["0", "1"]
    assert (fragment.ufrag, fragment.pwd, fragment.mid) == ("EsAw", "P2uYro0UCOQ4zxjKXaWCBui1", "0")
    assert [c.port for c in fragment.all_candidates] == [61764]
    assert fragment.complete


def test_serialize_sdpfrag_reproduces_restart_answer() -> None:
    text = serialize_sdpfrag(
        "289b31b7",
        "0b66f472495ef0ccac7bda653ab6be49",
        [Candidate.parse("1 1 UDP 2130706431 198.51.100.1 39132 typ host")],
        "0",
        ["trickle", "ice2"],
        bundle_mids=["0", "1"],
    )
    expected = RESTART_ANSWER_EXAMPLE.replace("UDP/TLS/RTP/SAVPF 111", "UDP/TLS/RTP/SAVPF 0")
    assert text == expected.replace("\n", "\r\n")
    parsed = parse_sdpfrag(text)
    assert parsed.ice_lite and parsed.ufrag == "289b31b7" and parsed.complete


def test_sdpfrag_session_level_credentials_medooze_style() -> None:
    fragment = parse_sdpfrag(
        "a=ice-ufrag:abcd\r\na=ice-pwd:secretsecretsecretsecret\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
        "a=candidate:1 1 udp 2122260223 192.0.2.1 61764 typ host\r\n"
    )
    assert fragment.ice_ufrag == "abcd" and fragment.media[0].ice_ufrag is None
    assert fragment.ufrag == "abcd" and fragment.pwd == "secretsecretsecretsecret"
    assert not fragment.complete


def test_sdpfrag_quirks_index_mid_any_proto_component_zero() -> None:
    # MediaMTX: m-line index as a=mid, no end-of-candidates; Meetecho: RTP/AVP 0.
    fragment = parse_sdpfrag(
        "m=video 9 RTP/AVP 0\na=mid:1\na=ice-ufrag:u1\na=ice-pwd:p1\n"
        "a=candidate:1 0 udp 1 192.0.2.7 5000 typ host\n"
        "a=candidate:2 1 udp 2 192.0.2.7 5002 typ host\n"
    )
    assert fragment.mid == "1" and fragment.media[0].kind == "video"
    assert [c.component for c in fragment.all_candidates] == [0, 1]
    assert [c.port for c in fragment.usable_candidates] == [5002]
    assert not fragment.complete


def test_sdpfrag_end_of_candidates_only() -> None:
    assert parse_sdpfrag("a=end-of-candidates\r\n").complete


@pytest.mark.parametrize(
    "body",
    [
        "",
        "\r\n",
        '{"candidate":"candidate:1 1 udp 1 192.0.2.1 5000 typ host","sdpMid":"0"}',
        "<html><body>hi</body></html>",
        "a=candidate:garbage",
        "m=audio 9 UDP/TLS/RTP/SAVPF 0\nb=AS:30\n",
    ],
)
def test_sdpfrag_rejects_non_sdp(body: str) -> None:
    with pytest.raises(ParseError):
        parse_sdpfrag(body)


# ---------------------------------------------------------------- property-based

_token_text = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEF0123456789+/", min_size=1, max_size=12
)
_rid_text = st.text(alphabet="abcxyzQHF019_-", min_size=1, max_size=8)


@given(
    foundation=_token_text,
    component=st.integers(0, 256),
    transport=st.sampled_from(["udp", "UDP", "tcp"]),
    priority=st.integers(0, 2**32 - 1),
    port=st.integers(0, 65535),
    kind=st.sampled_from(["host", "srflx", "prflx", "relay"]),
    related=st.one_of(st.none(), st.tuples(st.just("192.0.2.9"), st.integers(0, 65535))),
    extensions=st.lists(st.tuples(st.sampled_from(["generation", "ufrag"]), _token_text)),
)
def test_candidate_round_trip(
    foundation: str,
    component: int,
    transport: str,
    priority: int,
    port: int,
    kind: str,
    related: tuple[str, int] | None,
    extensions: list[tuple[str, str]],
) -> None:
    candidate = Candidate(
        foundation=foundation,
        component=component,
        transport=transport,
        priority=priority,
        address="198.51.100.4",
        port=port,
        type=kind,
        related_address=related[0] if related else None,
        related_port=related[1] if related else None,
        extensions=tuple(extensions),
    )
    assert Candidate.parse(str(candidate)) == candidate


@given(
    send=st.lists(
        st.lists(st.tuples(_rid_text, st.booleans()), min_size=1, max_size=3), max_size=4
    ),
    recv=st.lists(
        st.lists(st.tuples(_rid_text, st.booleans()), min_size=1, max_size=3), max_size=4
    ),
)
def test_simulcast_round_trip(
    send: list[list[tuple[str, bool]]], recv: list[list[tuple[str, bool]]]
) -> None:
    simulcast = Simulcast(
        send=[[SimulcastStream(r, p) for r, p in alt] for alt in send],
        recv=[[SimulcastStream(r, p) for r, p in alt] for alt in recv],
    )
    if not send and not recv:
        return
    assert Simulcast.parse(str(simulcast)) == simulcast


def _value_or_parse_error(data: str | bytes) -> None:
    """Both parsers either return their value type or raise ParseError with a message."""
    try:
        assert isinstance(SessionDescription.parse(data), SessionDescription)
    except ParseError as exc:
        assert exc.detail
    try:
        assert isinstance(parse_sdpfrag(data), SdpFragment)
    except ParseError as exc:
        assert exc.detail


@given(st.text(max_size=400))
def test_random_text_parses_or_raises_parse_error(text: str) -> None:
    _value_or_parse_error(text)


@given(
    st.lists(st.sampled_from(["v=0", "m=audio 9 RTP/AVP 0", "a=", "a=candidate:", "c="])).flatmap(
        lambda starts: st.tuples(
            st.just(starts),
            st.lists(st.text(max_size=30), min_size=len(starts), max_size=len(starts)),
        )
    )
)
def test_sdp_shaped_random_lines_parse_or_raise(pair: tuple[list[str], list[str]]) -> None:
    starts, tails = pair
    _value_or_parse_error("\r\n".join(s + t for s, t in zip(starts, tails, strict=True)))


@given(st.binary(max_size=300))
def test_random_bytes_parse_or_raise_parse_error(data: bytes) -> None:
    _value_or_parse_error(data)


_fixture_lines = [_lines(text) for text in ALL_FIXTURES]


@given(
    fixture=st.sampled_from(range(len(_fixture_lines))),
    data=st.data(),
)
def test_mutated_fixture_lines_parse_or_raise(fixture: int, data: st.DataObject) -> None:
    lines = list(_fixture_lines[fixture])
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(lines) - 1))
        line = lines[index]
        mutation = data.draw(st.sampled_from(["truncate", "replace", "insert", "drop"]))
        if mutation == "truncate":
            lines[index] = line[: data.draw(st.integers(0, len(line)))]
        elif mutation == "replace":
            position = data.draw(st.integers(0, max(0, len(line) - 1)))
            char = data.draw(st.characters(codec="utf-8"))
            lines[index] = line[:position] + char + line[position + 1 :]
        elif mutation == "insert":
            lines[index] = line[:2] + data.draw(st.text(max_size=20)) + line[2:]
        else:
            del lines[index]
            if not lines:
                lines.append("v=0")
    text = "\r\n".join(lines)
    try:
        parsed = SessionDescription.parse(text)
    except ParseError:
        return
    # Whatever parses must survive its own serialisation.
    assert SessionDescription.parse(parsed.serialize()) == parsed
