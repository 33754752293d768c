"""WHIP/WHEP offer/answer negotiation against real and client-shaped offers."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import pytest
from _paths import SDP_FIXTURES
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

from whepfan.errors import NotAcceptable, ParseError, Unprocessable
from whepfan.protocol.negotiation import (
    EXT_ABS_SEND_TIME,
    EXT_AUDIO_LEVEL,
    EXT_MID,
    EXT_REPAIRED_RID,
    EXT_RID,
    EXT_TRANSPORT_CC,
    EXT_TRANSPORT_CC_02,
    EXT_VIDEO_ORIENTATION,
    EgressMedia,
    IngestMedia,
    IngestTrack,
    LocalTransport,
    RtpCodec,
    accept_counter_answer,
    answer_publisher,
    answer_setup,
    answer_viewer,
    build_counter_offer,
    h264_profile,
)
from whepfan.protocol.sdp import Candidate, MediaSection, SessionDescription

FIXTURES = SDP_FIXTURES
WHEP_RECVONLY = (FIXTURES / "chromium-156-whep-recvonly-offer.sdp").read_text()
WHIP_SENDONLY = (FIXTURES / "chromium-156-whip-sendonly-offer.sdp").read_text()
WHIP_SIMULCAST = (FIXTURES / "chromium-156-whip-simulcast-offer.sdp").read_text()

LOCAL = LocalTransport(
    "srvU",
    "serverpasswordserverpass",
    [("sha-256", ":".join(["4F"] * 32))],
    [Candidate.parse("1 1 udp 2130706431 198.18.0.1 40000 typ host")],
)


def _ssrcs(start: int = 1000) -> Callable[[], int]:
    counter = itertools.count(start)
    return lambda: next(counter)


def _opus(pt: int = 111) -> RtpCodec:
    return RtpCodec("opus", 48000, 2, pt, (("minptime", "10"), ("useinbandfec", "1")))


def _video(
    name: str, pt: int, fmtp: tuple[tuple[str, str], ...] = (), rtx: int | None = None
) -> RtpCodec:
    return RtpCodec(name, 90000, None, pt, fmtp, ("nack", "nack pli"), rtx)


def _ingest(kind: str, codec: RtpCodec, mid: str, ext: dict[str, int] | None = None) -> IngestMedia:
    return IngestMedia(mid, kind, codec, ext or {}, (IngestTrack(ssrc=11),))


AUDIO = _ingest("audio", _opus(), "0", {EXT_AUDIO_LEVEL: 1, EXT_MID: 4})
VP8 = _ingest("video", _video("VP8", 96, rtx=97), "1", {EXT_ABS_SEND_TIME: 2, EXT_MID: 4})
H264_CB = _ingest(
    "video",
    _video("H264", 108, (("packetization-mode", "1"), ("profile-level-id", "42e01f")), 109),
    "1",
)
H264_CHIGH = _ingest(
    "video", _video("H264", 102, (("packetization-mode", "1"), ("profile-level-id", "640c1f"))), "1"
)


def _check_transport(answer: SessionDescription, setup: str = "passive") -> None:
    assert answer.ice_lite
    for section in answer.media:
        if section.rejected:
            continue
        assert section.ice_ufrag == "srvU" and section.ice_pwd == "serverpasswordserverpass"
        assert section.setup == setup
        assert section.rtcp_mux and section.rtcp_mux_only
        assert [c.address for c in section.candidates] == ["198.18.0.1"]
        assert section.end_of_candidates


# ---------------------------------------------------------------- WHIP


def test_whip_sendonly_fixture() -> None:
    answer, ingest = answer_publisher(SessionDescription.parse(WHIP_SENDONLY), LOCAL)
    answer = SessionDescription.parse(str(answer))
    _check_transport(answer)
    assert answer.bundle_mids == ["0", "1"]
    audio, video = answer.media
    assert audio.direction == video.direction == "recvonly"
    # One codec per section (+ its rtx): the first supported one in offer order.
    assert audio.formats == ["111"] and video.formats == ["96", "97"]
    assert video.codec(97) is not None and video.codec(97).fmtp == [("apt", "96")]  # type: ignore[union-attr]
    # Offered extension ids are kept; transport-cc is not (no TWCC feedback by default).
    assert video.extmap_id(EXT_RID) == 10 and video.extmap_id(EXT_TRANSPORT_CC) is None
    assert "transport-cc" not in video.codec(96).rtcp_fb  # type: ignore[union-attr]
    assert [m.kind for m in ingest] == ["audio", "video"]
    assert ingest[0].ssrc == 412631864 and ingest[0].rtx_ssrc is None
    assert (ingest[1].ssrc, ingest[1].rtx_ssrc) == (1750141743, 2201050024)
    assert ingest[1].codec.rtx_payload_type == 97
    assert ingest[1].extension_ids[EXT_ABS_SEND_TIME] == 2


def test_whip_simulcast_fixture_answers_every_layer() -> None:
    answer, ingest = answer_publisher(SessionDescription.parse(WHIP_SIMULCAST), LOCAL)
    text = str(answer)
    assert "a=rid:q recv\r\na=rid:h recv\r\na=rid:f recv\r\n" in text
    assert "a=simulcast:recv q;h;f\r\n" in text
    video = SessionDescription.parse(text).media[1]
    assert video.simulcast is not None and not video.simulcast.send
    assert ingest[1].rids == ("q", "h", "f") and ingest[1].simulcast
    assert (ingest[1].rid_extension_id, ingest[1].repaired_rid_extension_id) == (10, 11)


def test_whip_transport_cc_opt_in() -> None:
    answer, ingest = answer_publisher(
        SessionDescription.parse(WHIP_SENDONLY), LOCAL, transport_cc=True
    )
    assert answer.media[1].extmap_id(EXT_TRANSPORT_CC) == 3
    assert "transport-cc" in ingest[1].codec.rtcp_feedback


WHIP_TEMPLATE = """v=0
o=- 1 1 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE {mids}
m=audio 9 UDP/TLS/RTP/SAVPF 111
c=IN IP4 0.0.0.0
a=ice-ufrag:cliU
a=ice-pwd:clientpasswordclientpass
a=fingerprint:sha-256 {fp}
a=setup:{setup}
a=mid:{audio_mid}
a={direction}
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=ssrc:5 cname:x
m=video {video_port} UDP/TLS/RTP/SAVPF {video_pts}
c=IN IP4 0.0.0.0
{bundle_only}a=ice-ufrag:cliU
a=ice-pwd:clientpasswordclientpass
a=fingerprint:sha-256 {fp}
a=setup:{setup}
a=mid:{video_mid}
a=sendonly
a=rtcp-mux
{video_codecs}
"""
VP8_LINES = "a=rtpmap:96 VP8/90000\na=rtpmap:97 rtx/90000\na=fmtp:97 apt=96"


def _whip_offer(**overrides: str) -> SessionDescription:
    values = {
        "mids": "0 1",
        "fp": ":".join(["AB"] * 32),
        "setup": "actpass",
        "audio_mid": "0",
        "video_mid": "1",
        "direction": "sendonly",
        "video_port": "9",
        "video_pts": "96 97",
        "bundle_only": "",
        "video_codecs": VP8_LINES,
    }
    values.update(overrides)
    return SessionDescription.parse(WHIP_TEMPLATE.format(**values))


def test_ffmpeg_like_passive_offer_gets_active() -> None:
    # RFC 8842 §5.5: an offer of passive is answered active (FFmpeg's WHIP muxer).
    answer, _ = answer_publisher(_whip_offer(setup="passive"), LOCAL)
    _check_transport(answer, setup="active")
    assert [answer_setup(s) for s in ("actpass", "active", "passive", None)] == [
        "passive",
        "passive",
        "active",
        "passive",
    ]
    with pytest.raises(Unprocessable):
        answer_setup("holdconn")


def test_whip_answer_does_not_echo_the_publishers_sprop_parameters() -> None:
    """sprop-* describe the publisher's own stream (RFC 6184 §8.2.2, RFC 7587 §7.1): the
    recvonly answer keeps the receiving parameters and drops them; the ingest codec, which
    describes what whepfan forwards, keeps them all."""
    sprop_sets = "Z0LAH9kAoD2wFqDAwNSgAAADACAAAAeB4wZJ,aMuMsg=="
    video_codecs = (
        "a=rtpmap:106 H264/90000\n"
        "a=fmtp:106 level-asymmetry-allowed=1;packetization-mode=1;"
        f"profile-level-id=42e01f;sprop-parameter-sets={sprop_sets}"
    )
    offer_text = str(_whip_offer(video_pts="106", video_codecs=video_codecs))
    offer_text = offer_text.replace(
        "a=rtpmap:111 opus/48000/2\r\n",
        "a=rtpmap:111 opus/48000/2\r\n"
        "a=fmtp:111 minptime=10;useinbandfec=1;sprop-stereo=1;sprop-maxcapturerate=48000\r\n",
    )
    assert offer_text.count("sprop-") == 3
    answer, ingest = answer_publisher(SessionDescription.parse(offer_text), LOCAL)
    assert "sprop-" not in str(answer)
    audio, video = (media.codecs[0] for media in answer.media)
    assert audio.fmtp == [("minptime", "10"), ("useinbandfec", "1")]
    assert video.fmtp == [
        ("level-asymmetry-allowed", "1"),
        ("packetization-mode", "1"),
        ("profile-level-id", "42e01f"),
    ]
    assert ingest[0].codec.parameter("sprop-stereo") == "1"
    assert ingest[1].codec.parameter("sprop-parameter-sets") == sprop_sets


def test_gstreamer_like_bundle_only_section_is_accepted() -> None:
    offer = _whip_offer(
        mids="audio0 video1",
        audio_mid="audio0",
        video_mid="video1",
        video_port="0",
        bundle_only="a=bundle-only\n",
    )
    answer, ingest = answer_publisher(offer, LOCAL)
    assert answer.bundle_mids == ["audio0", "video1"]
    assert [m.mid for m in ingest] == ["audio0", "video1"]
    video = answer.media[1]
    assert video.port == 9 and not video.bundle_only and video.formats == ["96", "97"]


def test_h264_packetization_mode_1_preferred() -> None:
    codecs = (
        "a=rtpmap:104 H264/90000\na=fmtp:104 packetization-mode=0;profile-level-id=42e01f\n"
        "a=rtpmap:108 H264/90000\na=fmtp:108 packetization-mode=1;profile-level-id=42e01f"
    )
    _, ingest = answer_publisher(_whip_offer(video_pts="104 108", video_codecs=codecs), LOCAL)
    assert ingest[1].codec.payload_type == 108


def test_whip_rejections() -> None:
    with pytest.raises(Unprocessable):  # RFC 9725 §4.2: recvonly offer
        answer_publisher(_whip_offer(direction="recvonly"), LOCAL)
    with pytest.raises(Unprocessable):  # RFC 9725 §4.4.2: two tracks of one kind
        two_audio = str(_whip_offer()).replace("m=video", "m=audio")
        answer_publisher(
            SessionDescription.parse(two_audio.replace("VP8/90000", "opus/48000/2")), LOCAL
        )
    with pytest.raises(Unprocessable):  # RFC 9143: two sections need BUNDLE
        answer_publisher(_whip_offer(mids="0"), LOCAL)
    h265 = {"video_pts": "49", "video_codecs": "a=rtpmap:49 H265/90000"}
    with pytest.raises(Unprocessable):  # RFC 9725 §4.4.3: no partial answers by default
        answer_publisher(_whip_offer(**h265), LOCAL)
    answer, ingest = answer_publisher(_whip_offer(**h265), LOCAL, reject_partial=False)
    assert answer.media[1].port == 0 and [m.kind for m in ingest] == ["audio"]
    assert answer.bundle_mids == ["0"]
    only_h265 = SessionDescription.parse(str(_whip_offer(**h265)))
    only_h265.media = only_h265.media[1:]
    with pytest.raises(Unprocessable):
        answer_publisher(only_h265, LOCAL, reject_partial=False)


def test_whip_fid_group_with_one_ssrc_is_a_400() -> None:
    """RFC 4588 §8.7: an RTX FID group pairs two SSRCs; ``a=ssrc-group:FID 1`` alone cannot
    be paired, and is the peer's error (ParseError, a 400 naming the line)."""
    lines = VP8_LINES + "\na=ssrc-group:FID {ssrcs}\na=ssrc:1 cname:x"
    for ssrcs in ("1", "1 2 3", ""):
        offer = _whip_offer(video_codecs=lines.format(ssrcs=ssrcs))
        with pytest.raises(ParseError, match="FID"):
            answer_publisher(offer, LOCAL)
    _, ingest = answer_publisher(_whip_offer(video_codecs=lines.format(ssrcs="1 2")), LOCAL)
    assert (ingest[1].ssrc, ingest[1].rtx_ssrc) == (1, 2)


# ---------------------------------------------------------------- WHEP


def _viewer(
    ingest: list[IngestMedia], offer: str = WHEP_RECVONLY, *, transport_cc: bool = True
) -> tuple[SessionDescription, list[EgressMedia]]:
    answer, egress = answer_viewer(
        SessionDescription.parse(offer),
        LOCAL,
        ingest,
        ssrc_source=_ssrcs(),
        transport_cc=transport_cc,
    )
    return SessionDescription.parse(str(answer)), egress


def test_whep_opus_vp8() -> None:
    answer, egress = _viewer([AUDIO, VP8])
    _check_transport(answer)
    assert answer.bundle_mids == ["0", "1"]
    audio, video = answer.media
    assert audio.direction == video.direction == "sendonly"
    assert audio.formats == ["111"] and video.formats == ["96", "97"]
    # WHEP §4.5.2: one MediaStream id on every section.
    assert {m.msid.split()[0] for m in answer.media if m.msid} == {"whepfan"}
    assert video.ssrc_groups[0].semantics == "FID" and video.ssrc_groups[0].ssrcs == [1001, 1002]
    assert {(s.ssrc, s.attribute) for s in video.ssrcs} >= {(1001, "cname"), (1002, "msid")}
    # Only extensions the stream carries and that survive forwarding, and whepfan's own
    # transport-wide sequence numbers; the viewer's ids.
    assert [e.uri for e in video.extmaps] == [EXT_TRANSPORT_CC, EXT_ABS_SEND_TIME]
    assert [e.uri for e in audio.extmaps] == [EXT_TRANSPORT_CC, EXT_AUDIO_LEVEL]
    assert video.codec(96).rtcp_fb == [  # type: ignore[union-attr]
        "goog-remb",
        "transport-cc",
        "ccm fir",
        "nack",
        "nack pli",
    ]
    assert [(e.mid, e.payload_type, e.rtx_payload_type, e.ssrc, e.rtx_ssrc) for e in egress] == [
        ("0", 111, None, 1000, None),
        ("1", 96, 97, 1001, 1002),
    ]
    assert egress[1].source_mid == "1"


def test_whep_h264_constrained_baseline_picks_viewer_pt() -> None:
    _, egress = _viewer([AUDIO, H264_CB])
    # Chromium's 42e01f packetization-mode=1 is PT 108 with rtx 109 in the fixture.
    assert (egress[1].payload_type, egress[1].rtx_payload_type) == (108, 109)


def test_whep_video_only_and_audio_only_streams() -> None:
    answer, egress = _viewer([VP8])
    assert answer.media[0].port == 0 and answer.media[0].rejected
    assert answer.bundle_mids == ["1"] and [e.kind for e in egress] == ["video"]
    answer, egress = _viewer([AUDIO])
    assert answer.media[1].rejected and answer.bundle_mids == ["0"]
    assert [e.kind for e in egress] == ["audio"]


def test_whep_constrained_high_does_not_match_chromium_profiles() -> None:
    # 640c1f is Constrained High; Chromium offers B, CB, Main and High 4:4:4 only.
    with pytest.raises(NotAcceptable):
        _viewer([H264_CHIGH])
    # A viewer that asked for video must not silently get audio only: 406 (counter-offer).
    with pytest.raises(NotAcceptable):
        _viewer([AUDIO, H264_CHIGH])


def test_whep_vp9_profile_must_match() -> None:
    vp9_p2 = _ingest("video", _video("VP9", 100, (("profile-id", "2"),)), "1")
    _, egress = _viewer([vp9_p2])
    assert (egress[0].payload_type, egress[0].rtx_payload_type) == (100, 101)


def test_h264_profiles_rfc6184_table5() -> None:
    # RFC 6184 §8.1 Table 5: profile_idc + profile-iop name the sub-profile; level ignored.
    assert h264_profile("42e01f") == "constrained-baseline"  # 42, x1xx0000
    assert h264_profile("4de01f") == "constrained-baseline"  # 4D, 1xxx0000
    assert h264_profile("58c01f") == "constrained-baseline"  # 58, 11xx0000
    assert h264_profile("42001f") == "baseline"  # 42, x0xx0000
    assert h264_profile("42a01e") == "baseline"
    assert h264_profile("4d001f") == "main"
    assert h264_profile("640032") == "high"
    assert h264_profile("f4001f") == "high-4:4:4"
    assert h264_profile(None) == "baseline"  # default 42000A
    assert h264_profile("zz") is None and h264_profile("ff0000") is None


def _single_h264_offer(profile_level_id: str, mode: str = "1") -> str:
    return (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 102\r\na=mid:v\r\na=recvonly\r\na=rtcp-mux\r\n"
        "a=ice-ufrag:cliU\r\na=ice-pwd:clientpasswordclientpass\r\n"
        f"a=fingerprint:sha-256 {':'.join(['AB'] * 32)}\r\na=setup:actpass\r\n"
        "a=rtpmap:102 H264/90000\r\n"
        f"a=fmtp:102 packetization-mode={mode};profile-level-id={profile_level_id}\r\n"
    )


def test_h264_matching_rules() -> None:
    # Level may differ (42e034 vs 42e01f); a CB stream also plays on a Baseline decoder;
    # a Baseline stream does not fit a CB-only decoder; packetization-mode must be equal.
    _, egress = _viewer([H264_CB], _single_h264_offer("42e034"))
    assert egress[0].payload_type == 102
    _, egress = _viewer([H264_CB], _single_h264_offer("42001f"))
    assert egress[0].payload_type == 102
    baseline = _ingest(
        "video",
        _video("H264", 102, (("packetization-mode", "1"), ("profile-level-id", "42001f"))),
        "1",
    )
    with pytest.raises(NotAcceptable):
        _viewer([baseline], _single_h264_offer("42e01f"))
    with pytest.raises(NotAcceptable):
        _viewer([H264_CB], _single_h264_offer("42e01f", mode="0"))


def test_ext_map_strips_per_transport_extensions() -> None:
    ingest = IngestMedia(
        "1",
        "video",
        _video("VP8", 96),
        {
            EXT_MID: 1,
            EXT_RID: 2,
            EXT_REPAIRED_RID: 3,
            EXT_TRANSPORT_CC: 5,
            EXT_ABS_SEND_TIME: 6,
            EXT_VIDEO_ORIENTATION: 9,
        },
    )
    viewer = EgressMedia(
        "1",
        "video",
        "1",
        _video("VP8", 96),
        ssrc=7,
        extension_ids={
            EXT_MID: 4,
            EXT_RID: 10,
            EXT_TRANSPORT_CC: 3,
            EXT_ABS_SEND_TIME: 2,
            EXT_VIDEO_ORIENTATION: 13,
        },
    )
    table = viewer.ext_map_for(ingest)
    assert len(table) == 256
    expected = bytearray(256)
    expected[6], expected[9] = 2, 13
    assert table == bytes(expected)


def test_ext_map_from_real_negotiations() -> None:
    _, ingest = answer_publisher(SessionDescription.parse(WHIP_SIMULCAST), LOCAL)
    _, egress = _viewer(ingest)
    table = egress[1].ext_map_for(ingest[1])
    # Same Chromium ids on both sides for forwarded ones; mid(4), rid(10), rrid(11),
    # twcc(3) and DD(12, the viewer offered none) are stripped.
    assert {i: table[i] for i in range(256) if table[i]} == {
        14: 14,
        2: 2,
        13: 13,
        5: 5,
        6: 6,
        7: 7,
        8: 8,
    }


def test_whep_keeps_the_viewers_transport_cc() -> None:
    # Chromium offers transport-cc -01 as id 3 on both sections, with transport-cc
    # feedback on opus and every video codec.
    _, ingest = answer_publisher(SessionDescription.parse(WHIP_SENDONLY), LOCAL, transport_cc=True)
    offer = WHEP_RECVONLY.replace(
        "a=extmap:3 http://www.ietf.org/id/draft-holmer",
        "a=extmap:9 http://www.ietf.org/id/draft-holmer",
    )
    answer, egress = _viewer(ingest, offer)
    for section, media in zip(answer.media, egress, strict=True):
        # RFC 8285 §6: the offerer's id; without a direction (sendonly by the section).
        assert [(e.id, e.direction) for e in section.extmaps if e.uri == EXT_TRANSPORT_CC] == [
            (9, None)
        ]
        assert "transport-cc" in section.codec(media.payload_type).rtcp_fb  # type: ignore[union-attr]
        assert "transport-cc" in media.rtcp_feedback
        assert media.transport_cc_id == 9
        assert media.extension_ids[EXT_TRANSPORT_CC] == 9
    # The Fanout stamps the viewer's numbers: the publisher's element (id 3) is never
    # forwarded through the extension map.
    assert ingest[1].extension_ids[EXT_TRANSPORT_CC] == 3
    table = egress[1].ext_map_for(ingest[1])
    assert table[3] == 0 and 9 not in table


def test_whep_transport_cc_off() -> None:
    answer, egress = _viewer([AUDIO, VP8], transport_cc=False)
    assert "transport-cc" not in str(answer)
    assert EXT_TRANSPORT_CC not in str(answer)
    assert all(media.transport_cc_id is None for media in egress)


def test_whep_transport_cc_needs_the_extension_and_its_feedback() -> None:
    # Feedback without numbers to report on, then numbers nobody reports: neither kept.
    no_extension = WHEP_RECVONLY.replace(f"a=extmap:3 {EXT_TRANSPORT_CC}\n", "")
    assert no_extension != WHEP_RECVONLY
    no_feedback = re.sub(r"a=rtcp-fb:\d+ transport-cc\n", "", WHEP_RECVONLY)
    assert no_feedback != WHEP_RECVONLY
    for offer in (no_extension, no_feedback):
        answer, egress = _viewer([AUDIO, VP8], offer)
        assert "transport-cc" not in str(answer) and EXT_TRANSPORT_CC not in str(answer)
        assert all(media.transport_cc_id is None for media in egress)
    # -02 only: its receivers send feedback when a packet asks (not what whepfan does).
    only_02 = WHEP_RECVONLY.replace(EXT_TRANSPORT_CC, EXT_TRANSPORT_CC_02)
    answer, egress = _viewer([AUDIO, VP8], only_02)
    assert EXT_TRANSPORT_CC_02 not in str(answer) and "transport-cc" not in str(answer)
    assert all(media.transport_cc_id is None for media in egress)
    # A receiver-only extmap direction of the viewer's own (sendonly) is not ours to use.
    sendonly = WHEP_RECVONLY.replace(
        f"a=extmap:3 {EXT_TRANSPORT_CC}", f"a=extmap:3/sendonly {EXT_TRANSPORT_CC}"
    )
    _, egress = _viewer([AUDIO, VP8], sendonly)
    assert all(media.transport_cc_id is None for media in egress)


def test_whep_transport_cc_feedback_for_every_payload_type() -> None:
    # RFC 4585 §4.2: a=rtcp-fb:* applies to every payload type of the section.
    offer = re.sub(r"a=rtcp-fb:\d+ transport-cc\n", "", WHEP_RECVONLY)
    offer = offer.replace("a=rtcp-mux\n", "a=rtcp-mux\na=rtcp-fb:* transport-cc\n")
    answer, egress = _viewer([AUDIO, VP8], offer)
    assert offer.count("transport-cc") == 2
    assert [media.transport_cc_id for media in egress] == [3, 3]
    assert all(
        "transport-cc" in section.codec(media.payload_type).rtcp_fb  # type: ignore[union-attr]
        for section, media in zip(answer.media, egress, strict=True)
    )
    assert all("transport-cc" in media.rtcp_feedback for media in egress)


def test_whep_offer_direction_and_duplicate_ssrcs() -> None:
    with pytest.raises(Unprocessable):  # WHEP §4.2.5: sendonly offer
        _viewer([AUDIO, VP8], WHEP_RECVONLY.replace("a=recvonly", "a=sendonly"))
    repeating = iter([5, 5, 5, 6, 6, 7])
    _, egress = answer_viewer(
        SessionDescription.parse(WHEP_RECVONLY),
        LOCAL,
        [AUDIO, VP8],
        ssrc_source=lambda: next(repeating),
    )
    assert [e.ssrc for e in egress] + [egress[1].rtx_ssrc] == [5, 6, 7]


# ---------------------------------------------------------------- counter-offer (406 path)


def test_counter_offer_shape() -> None:
    offer = SessionDescription.parse(
        str(build_counter_offer(LOCAL, [AUDIO, H264_CB], ssrc_source=_ssrcs()))
    )
    _check_transport(offer, setup="actpass")
    assert offer.bundle_mids == ["0", "1"]
    assert all(m.direction == "sendonly" for m in offer.media)
    video: MediaSection = offer.media[1]
    assert video.formats == ["108", "109"]
    assert video.codec(108).parameter("profile-level-id") == "42e01f"  # type: ignore[union-attr]


# ---------------------------------------------------------------- aiortc as a real client


def _pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def test_aiortc_viewer_accepts_answer() -> None:
    pc = _pc()
    try:
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        answer, egress = answer_viewer(
            SessionDescription.parse(pc.localDescription.sdp),
            LOCAL,
            [AUDIO, VP8],
            ssrc_source=_ssrcs(),
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=str(answer), type="answer"))
        assert pc.signalingState == "stable"
        assert [t.currentDirection for t in pc.getTransceivers()] == ["recvonly", "recvonly"]
        assert [(e.kind, e.codec.name) for e in egress] == [("audio", "opus"), ("video", "VP8")]
    finally:
        await pc.close()


def test_a_rejected_section_answers_only_payload_types_it_writes_a_line_for() -> None:
    """A payload type the offer gave only ``a=rtcp-fb`` (no rtpmap, no fmtp) is left out
    of the rejected section, whose feedback lines are not copied: it was an entry of the
    answer its text did not have, so the answer did not read back equal (found by the
    offer fuzz target; its input kept in tests/data/fuzz/offer/)."""
    offer = WHEP_RECVONLY.replace(
        "a=rtcp-fb:111 transport-cc", "a=rtcp-fb:111 transport-cc\r\na=rtcp-fb:77 transport-cc"
    )
    assert offer != WHEP_RECVONLY
    answer, _ = answer_viewer(SessionDescription.parse(offer), LOCAL, [VP8], ssrc_source=_ssrcs())
    audio = answer.media[0]
    assert audio.rejected
    assert 77 not in [codec.payload_type for codec in audio.codecs]
    assert [codec.name for codec in audio.codecs] == [
        codec.name for codec in SessionDescription.parse(offer).media[0].codecs if codec.name
    ]
    assert SessionDescription.parse(str(answer)) == answer


async def test_aiortc_viewer_accepts_answer_rejecting_audio_of_a_video_only_stream() -> None:
    """The rejected m=audio 0 carries the session's ICE and DTLS attributes (aiortc raises
    "ICE username fragment or password is missing" without them) and leaves the BUNDLE
    group (RFC 9143 §7.3.3)."""
    pc = _pc()
    try:
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        answer, egress = answer_viewer(
            SessionDescription.parse(pc.localDescription.sdp), LOCAL, [VP8], ssrc_source=_ssrcs()
        )
        audio = SessionDescription.parse(str(answer)).media[0]
        assert audio.rejected and audio.direction == "inactive"
        assert (audio.ice_ufrag, audio.ice_pwd, audio.setup) == (
            "srvU",
            "serverpasswordserverpass",
            "passive",
        )
        assert audio.fingerprints == LOCAL.fingerprints
        assert audio.end_of_candidates and not audio.candidates
        assert answer.bundle_mids == ["1"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=str(answer), type="answer"))
        assert pc.signalingState == "stable"
        assert [(e.kind, e.codec.name) for e in egress] == [("video", "VP8")]
    finally:
        await pc.close()


async def test_aiortc_publisher_accepts_answer() -> None:
    pc = _pc()
    try:
        pc.addTrack(AudioStreamTrack())
        pc.addTrack(VideoStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        offer = SessionDescription.parse(pc.localDescription.sdp)
        answer, ingest = answer_publisher(offer, LOCAL)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=str(answer), type="answer"))
        assert [t.currentDirection for t in pc.getTransceivers()] == ["sendonly", "sendonly"]
        assert [m.codec.name for m in ingest] == ["opus", "VP8"]
        assert ingest[1].ssrc is not None and ingest[1].rtx_ssrc is not None
    finally:
        await pc.close()


async def test_aiortc_answers_counter_offer() -> None:
    counter = build_counter_offer(LOCAL, [AUDIO, VP8], ssrc_source=_ssrcs())
    pc = _pc()
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=str(counter), type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = SessionDescription.parse(pc.localDescription.sdp)
        assert answer.media[0].setup == "active"
        egress = accept_counter_answer(counter, answer)
        assert [(e.mid, e.payload_type, e.rtx_payload_type) for e in egress] == [
            ("0", 111, None),
            ("1", 96, 97),
        ]
        assert egress[1].ssrc == counter.media[1].ssrc_groups[0].ssrcs[0]
        assert egress[1].rtx_ssrc == counter.media[1].ssrc_groups[0].ssrcs[1]
        assert EXT_ABS_SEND_TIME in egress[1].extension_ids
        assert "nack" in egress[1].rtcp_feedback
    finally:
        await pc.close()


def _recvonly_answer(counter: SessionDescription) -> SessionDescription:
    """The counter-offer answered by a client that keeps everything (RFC 3264 §6.1)."""
    answer = SessionDescription.parse(str(counter))
    for section in answer.media:
        section.direction = "recvonly"
        section.setup = "active"
    return answer


def test_counter_offer_offers_transport_cc_under_one_id() -> None:
    _, ingest = answer_publisher(SessionDescription.parse(WHIP_SENDONLY), LOCAL, transport_cc=True)
    counter = build_counter_offer(LOCAL, ingest, ssrc_source=_ssrcs())
    # The publisher's id (3) is free among the forwarded extensions: every section uses it.
    for section in counter.media:
        assert section.extmap_id(EXT_TRANSPORT_CC) == 3
        assert all(
            "transport-cc" in codec.rtcp_fb for codec in section.codecs if codec.name != "rtx"
        )
    egress = accept_counter_answer(counter, _recvonly_answer(counter))
    assert [media.transport_cc_id for media in egress] == [3, 3]
    # An answer without the feedback: no numbers either.
    stripped = _recvonly_answer(counter)
    for section in stripped.media:
        for codec in section.codecs:
            codec.rtcp_fb = [fb for fb in codec.rtcp_fb if fb != "transport-cc"]
    egress = accept_counter_answer(counter, stripped)
    assert all(media.transport_cc_id is None for media in egress)
    assert all("transport-cc" not in media.rtcp_feedback for media in egress)


def test_counter_offer_transport_cc_id_avoids_forwarded_ids() -> None:
    audio = _ingest("audio", _opus(), "0", {EXT_AUDIO_LEVEL: 1})
    video = _ingest(
        "video", _video("VP8", 96, rtx=97), "1", {EXT_ABS_SEND_TIME: 2, EXT_TRANSPORT_CC: 2}
    )
    counter = build_counter_offer(LOCAL, [audio, video], ssrc_source=_ssrcs())
    assert [section.extmap_id(EXT_TRANSPORT_CC) for section in counter.media] == [3, 3]
    counter = build_counter_offer(LOCAL, [audio, video], ssrc_source=_ssrcs(), transport_cc=False)
    assert "transport-cc" not in str(counter)
    egress = accept_counter_answer(counter, _recvonly_answer(counter))
    assert all(media.transport_cc_id is None for media in egress)


def test_counter_answer_must_be_recvonly() -> None:
    counter = build_counter_offer(LOCAL, [AUDIO], ssrc_source=_ssrcs())
    bogus = SessionDescription.parse(str(counter))
    bogus.media[0].setup = "active"
    with pytest.raises(Unprocessable):  # a sendonly "answer" to a sendonly offer
        accept_counter_answer(counter, bogus)
    bogus.media[0].direction = "recvonly"
    bogus.media[0].port = 0
    with pytest.raises(NotAcceptable):
        accept_counter_answer(counter, bogus)


def test_rid_max_br_becomes_the_layers_target_bitrate() -> None:
    """RFC 8851 §5: a=rid ... max-br=N is the publisher's ceiling for that encoding; it is
    what the SSE `layers` event can honestly call targetBitrate."""
    offer = SessionDescription.parse(
        WHIP_SIMULCAST.replace("a=rid:q send", "a=rid:q send max-br=150000")
    )
    _, ingest = answer_publisher(offer, LOCAL)
    video = next(media for media in ingest if media.kind == "video")
    by_rid = {track.rid: track.max_bitrate for track in video.tracks}
    assert by_rid["q"] == 150000
    assert by_rid["h"] is None and by_rid["f"] is None
