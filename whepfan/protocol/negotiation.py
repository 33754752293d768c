"""WHIP / WHEP offer-answer negotiation (RFC 3264 as profiled by JSEP, RFC 9429).

Theory of operation: whepfan never transcodes, so negotiation is about *agreeing on what
already flows*. A publisher's offer (WHIP, RFC 9725) is answered ``recvonly`` with exactly
one codec per m= section; what was agreed is returned as :class:`IngestMedia`. A viewer's
offer (WHEP draft-ietf-wish-whep-03) is answered ``sendonly`` by finding, for each stream
track, the viewer's payload type that can carry the publisher's codec unchanged; what was
agreed is returned as :class:`EgressMedia`, which holds everything the fan-out core needs to
rewrite a packet for that viewer (SSRC, payload type, header-extension id map).

The server is ICE-lite on one port with every session bundled (WHEP §4.5.1, RFC 9143
max-bundle; RFC 8858 rtcp-mux-only), and it never trickles: each answer carries all local
candidates and ``a=end-of-candidates``.

Sans-IO: no clocks and no randomness here; SSRCs come from the caller's ``ssrc_source``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from whepfan.errors import NotAcceptable, ParseError, Unprocessable, WhepfanError
from whepfan.protocol import rtp
from whepfan.protocol.sdp import (
    Candidate,
    Codec,
    Connection,
    Extmap,
    Group,
    MediaSection,
    Origin,
    Rid,
    SessionDescription,
    Simulcast,
    SsrcAttribute,
    SsrcGroup,
)

__all__ = [
    "DEFAULT_CODECS",
    "FORWARDED_EXTENSIONS",
    "PER_TRANSPORT_EXTENSIONS",
    "CodecCapability",
    "EgressMedia",
    "IngestMedia",
    "IngestTrack",
    "LocalTransport",
    "RemoteTransport",
    "RtpCodec",
    "accept_counter_answer",
    "answer_publisher",
    "answer_setup",
    "answer_viewer",
    "build_counter_offer",
    "h264_profile",
    "remote_transport",
]

# --------------------------------------------------------------------------------------------
# Header extensions (RFC 8285) by URI
# --------------------------------------------------------------------------------------------

# The names negotiation uses for protocol/rtp.py's URIs (defined there, once).
EXT_MID = rtp.URI_MID
EXT_RID = rtp.URI_RTP_STREAM_ID
EXT_REPAIRED_RID = rtp.URI_REPAIRED_RTP_STREAM_ID
EXT_TRANSPORT_CC = rtp.URI_TRANSPORT_WIDE_CC
EXT_TRANSPORT_CC_02 = rtp.URI_TRANSPORT_WIDE_CC_02
EXT_AUDIO_LEVEL = rtp.URI_SSRC_AUDIO_LEVEL
EXT_ABS_SEND_TIME = rtp.URI_ABS_SEND_TIME
EXT_TOFFSET = rtp.URI_TOFFSET
EXT_VIDEO_ORIENTATION = rtp.URI_VIDEO_ORIENTATION
EXT_PLAYOUT_DELAY = rtp.URI_PLAYOUT_DELAY
EXT_DEPENDENCY_DESCRIPTOR = rtp.URI_DEPENDENCY_DESCRIPTOR
EXT_COLOR_SPACE = rtp.URI_COLOR_SPACE
EXT_VIDEO_CONTENT_TYPE = rtp.URI_VIDEO_CONTENT_TYPE
EXT_VIDEO_TIMING = rtp.URI_VIDEO_TIMING

# Extensions that describe the media itself, so they stay true after forwarding.
FORWARDED_EXTENSIONS = frozenset(
    {
        EXT_AUDIO_LEVEL,
        EXT_ABS_SEND_TIME,
        EXT_TOFFSET,
        EXT_VIDEO_ORIENTATION,
        EXT_PLAYOUT_DELAY,
        EXT_DEPENDENCY_DESCRIPTOR,
        EXT_COLOR_SPACE,
        EXT_VIDEO_CONTENT_TYPE,
        EXT_VIDEO_TIMING,
    }
)
# Extensions whose values belong to one transport: the publisher's mid/rid (RFC 9143 §15,
# RFC 8852) and its transport-wide sequence numbers mean nothing on a viewer's transport.
PER_TRANSPORT_EXTENSIONS = frozenset(
    {EXT_MID, EXT_RID, EXT_REPAIRED_RID, EXT_TRANSPORT_CC, EXT_TRANSPORT_CC_02}
)
_INGEST_EXTENSIONS = FORWARDED_EXTENSIONS | {EXT_MID, EXT_RID, EXT_REPAIRED_RID}

# RTCP feedback whepfan acts on (RFC 4585 §4.2, RFC 5104 §7.1, draft-alvestrand-rmcat-remb).
_AGREED_FEEDBACK = ("goog-remb", "ccm fir", "nack", "nack pli")

_RTP_PROTOS = frozenset({"UDP/TLS/RTP/SAVPF", "UDP/TLS/RTP/SAVP"})
_MEDIA_KINDS = ("audio", "video")


# --------------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodecCapability:
    """A codec whepfan can forward (it never decodes, so "support" means packetisation it
    understands well enough to find keyframes and layers)."""

    kind: str
    name: str
    clock_rate: int
    channels: int | None = None

    def accepts(self, kind: str, codec: Codec) -> bool:
        return (
            kind == self.kind
            and codec.name.lower() == self.name.lower()
            and codec.clock_rate == self.clock_rate
            and _channels(kind, codec.channels) == _channels(kind, self.channels)
        )


DEFAULT_CODECS: tuple[CodecCapability, ...] = (
    CodecCapability("audio", "opus", 48000, 2),  # RFC 7587 §7: always opus/48000/2
    CodecCapability("video", "VP8", 90000),
    CodecCapability("video", "VP9", 90000),
    CodecCapability("video", "H264", 90000),
    CodecCapability("video", "AV1", 90000),
)


def _channels(kind: str, channels: int | None) -> int | None:
    # RFC 8866 §6.6: audio encoding parameters default to one channel; video has none.
    return (channels or 1) if kind == "audio" else None


@dataclass(frozen=True, slots=True)
class RtpCodec:
    """A negotiated codec: payload type numbers are those of the SDP it was agreed in."""

    name: str
    clock_rate: int
    channels: int | None
    payload_type: int
    fmtp: tuple[tuple[str, str], ...] = ()
    rtcp_feedback: tuple[str, ...] = ()
    rtx_payload_type: int | None = None

    def parameter(self, key: str) -> str | None:
        lowered = key.lower()
        return next((v for k, v in self.fmtp if k.lower() == lowered), None)


# RFC 6184 §8.1 Table 5: (profile_idc, profile-iop mask, profile-iop value) -> sub-profile.
# profile-iop carries constraint_set0..5 flags (MSB first); "x" bits in the RFC's table are
# the ones left out of the mask.
_H264_PROFILES: tuple[tuple[int, int, int, str], ...] = (
    (0x42, 0x4F, 0x40, "constrained-baseline"),  # 42 x1xx0000
    (0x4D, 0x8F, 0x80, "constrained-baseline"),  # 4D 1xxx0000
    (0x58, 0xCF, 0xC0, "constrained-baseline"),  # 58 11xx0000
    (0x42, 0x4F, 0x00, "baseline"),  # 42 x0xx0000
    (0x58, 0xCF, 0x80, "baseline"),  # 58 10xx0000
    (0x4D, 0xAF, 0x00, "main"),  # 4D 0x0x0000
    (0x58, 0xCF, 0x00, "extended"),  # 58 00xx0000
    # H.264 (2011) A.2.4.2: High with constraint_set4+5 is Constrained High (not in Table 5).
    (0x64, 0xFF, 0x0C, "constrained-high"),
    (0x64, 0xFF, 0x00, "high"),  # 64 00000000
    (0x6E, 0xFF, 0x00, "high-10"),
    (0x7A, 0xFF, 0x00, "high-4:2:2"),
    (0xF4, 0xFF, 0x00, "high-4:4:4"),
    (0x6E, 0xFF, 0x10, "high-10-intra"),
    (0x7A, 0xFF, 0x10, "high-4:2:2-intra"),
    (0xF4, 0xFF, 0x10, "high-4:4:4-intra"),
    (0x2C, 0xFF, 0x10, "cavlc-4:4:4-intra"),
)
# Decoders of these profiles also decode a constrained-baseline stream (H.264 A.2.1.1:
# constraint_set0/1 flags mark it conformant to Baseline and Main, hence High too).
_CONSTRAINED_BASELINE_DECODERS = frozenset({"baseline", "main", "extended", "high"})


def h264_profile(profile_level_id: str | None) -> str | None:
    """The RFC 6184 §8.1 Table 5 sub-profile named by a ``profile-level-id`` (absent means
    ``42000A``, Baseline level 1.0, RFC 6184 §8.1), or None if it names none."""
    text = profile_level_id if profile_level_id is not None else "42000a"
    if len(text) != 6:
        return None
    try:
        value = int(text, 16)
    except ValueError:
        return None
    profile_idc, profile_iop = value >> 16, (value >> 8) & 0xFF
    for idc, mask, bits, name in _H264_PROFILES:
        if profile_idc == idc and profile_iop & mask == bits:
            return name
    return None


def _packetization_mode(parameter: str | None) -> str:
    return parameter or "0"  # RFC 6184 §8.1: absent means 0


def _codec_match_rank(kind: str, stream: RtpCodec, offered: Codec) -> int | None:
    """How well ``offered`` (the viewer's) can carry ``stream`` unchanged: 0 exact, 1 usable,
    None not at all."""
    if (
        offered.name.lower() != stream.name.lower()
        or offered.clock_rate != stream.clock_rate
        or _channels(kind, offered.channels) != _channels(kind, stream.channels)
    ):
        return None
    name = stream.name.upper()
    if name == "H264":
        # RFC 6184 §8.2.2: packetization-mode must be equal; profiles must be compatible,
        # levels may differ (level-asymmetry-allowed, RFC 6184 §8.1).
        if _packetization_mode(offered.parameter("packetization-mode")) != _packetization_mode(
            stream.parameter("packetization-mode")
        ):
            return None
        stream_profile = h264_profile(stream.parameter("profile-level-id"))
        viewer_profile = h264_profile(offered.parameter("profile-level-id"))
        if stream_profile is None or viewer_profile is None:
            return None
        if stream_profile == viewer_profile:
            return 0
        if (
            stream_profile == "constrained-baseline"
            and viewer_profile in _CONSTRAINED_BASELINE_DECODERS
        ):
            return 1
        return None
    if name == "VP9" and (offered.parameter("profile-id") or "0") != (
        stream.parameter("profile-id") or "0"
    ):
        return None  # RFC 9628 §6: profile-id defaults to 0 and must match
    if name == "AV1" and (offered.parameter("profile") or "0") != (
        stream.parameter("profile") or "0"
    ):
        return None  # AV1 RTP spec §7.2: profile defaults to 0
    return 0


def _rtx_for(section: MediaSection, payload_type: int) -> Codec | None:
    """The offered rtx codec whose ``apt`` is ``payload_type`` (RFC 4588 §8.6)."""
    for codec in section.codecs_in_format_order():
        if codec.name.lower() == "rtx" and codec.parameter("apt") == str(payload_type):
            return codec
    return None


def _feedback(offered: Codec, section: MediaSection, allowed: Iterable[str]) -> tuple[str, ...]:
    allowed_set = set(allowed)
    agreed: list[str] = []
    for feedback in [*offered.rtcp_fb, *section.rtcp_fb_all]:
        if feedback in allowed_set and feedback not in agreed:
            agreed.append(feedback)
    return tuple(agreed)


# --------------------------------------------------------------------------------------------
# What was agreed
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestTrack:
    """One encoding the publisher sends in an m= section: a simulcast layer (identified by
    its rid, RFC 8851; its RTX by the same value in repaired-rid, RFC 8852 §3.2) or, without
    simulcast, the SSRCs signalled with a=ssrc / a=ssrc-group:FID (RFC 5576, RFC 4588 §8)."""

    rid: str | None = None
    ssrc: int | None = None
    rtx_ssrc: int | None = None
    paused: bool = False
    # RFC 8851 §5 "max-br" restriction of the rid, in bits/s: the encoder's target ceiling.
    max_bitrate: int | None = None


@dataclass(frozen=True, slots=True)
class IngestMedia:
    """One accepted m= section of a publisher."""

    mid: str | None
    kind: str
    codec: RtpCodec
    # URI -> the publisher's extension id (RFC 8285 §5); excluded from hashing (a dict).
    extension_ids: dict[str, int] = field(default_factory=dict, hash=False)
    tracks: tuple[IngestTrack, ...] = ()

    @property
    def rids(self) -> tuple[str, ...]:
        """Simulcast rids in a=simulcast order (RFC 8853 §5.1: highest priority first)."""
        return tuple(t.rid for t in self.tracks if t.rid is not None)

    @property
    def simulcast(self) -> bool:
        return len(self.tracks) > 1

    @property
    def ssrc(self) -> int | None:
        return self.tracks[0].ssrc if self.tracks else None

    @property
    def rtx_ssrc(self) -> int | None:
        return self.tracks[0].rtx_ssrc if self.tracks else None

    @property
    def ssrcs(self) -> tuple[int, ...]:
        """Every signalled media SSRC (one per track that has one)."""
        return tuple(t.ssrc for t in self.tracks if t.ssrc is not None)

    @property
    def rid_extension_id(self) -> int | None:
        return self.extension_ids.get(EXT_RID)

    @property
    def repaired_rid_extension_id(self) -> int | None:
        return self.extension_ids.get(EXT_REPAIRED_RID)

    @property
    def mid_extension_id(self) -> int | None:
        return self.extension_ids.get(EXT_MID)


@dataclass(frozen=True, slots=True)
class EgressMedia:
    """One sending m= section of a viewer session; ``source_mid`` names the IngestMedia it
    carries. Payload types and extension ids are the viewer's."""

    mid: str | None
    kind: str
    source_mid: str | None
    codec: RtpCodec
    ssrc: int
    rtx_ssrc: int | None = None
    extension_ids: dict[str, int] = field(default_factory=dict, hash=False)

    @property
    def payload_type(self) -> int:
        return self.codec.payload_type

    @property
    def rtx_payload_type(self) -> int | None:
        return self.codec.rtx_payload_type

    @property
    def rtcp_feedback(self) -> tuple[str, ...]:
        return self.codec.rtcp_feedback

    @property
    def transport_cc_id(self) -> int | None:
        """The viewer's id for transport-wide sequence numbers (draft-holmer-rmcat-
        transport-wide-cc-extensions-01 §2), agreed with its ``transport-cc`` feedback;
        None when not agreed. The Fanout stamps it (``Fanout.set_transport_cc``); it is
        never in ``ext_map_for``: the publisher's numbers belong to its own transport."""
        return self.extension_ids.get(EXT_TRANSPORT_CC)

    def ext_map_for(self, ingest: IngestMedia) -> bytes:
        """256-byte table for ``Fanout.subscribe``: index = publisher's extension id, value =
        this viewer's id for the same URI, 0 = strip. Only media-describing extensions are
        forwarded; per-transport ones (mid, rid, repaired-rid, transport-cc) never are."""
        table = bytearray(256)
        for uri, ingest_id in ingest.extension_ids.items():
            viewer_id = self.extension_ids.get(uri)
            if (
                uri in FORWARDED_EXTENSIONS
                and viewer_id is not None
                and 0 < ingest_id < 256
                and 0 < viewer_id < 256
            ):
                table[ingest_id] = viewer_id
        return bytes(table)


# --------------------------------------------------------------------------------------------
# Transport (ICE + DTLS)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalTransport:
    """whepfan's side of the bundled transport, the same in every answer it writes."""

    ice_ufrag: str
    ice_pwd: str
    fingerprints: list[tuple[str, str]]
    candidates: list[Candidate]
    ice_lite: bool = True

    @property
    def session_id(self) -> int:
        # RFC 8866 §5.2 wants a unique numeric sess-id; the random ufrag already is unique,
        # and deriving it keeps this module free of randomness.
        digest = hashlib.sha256(self.ice_ufrag.encode()).digest()
        return int.from_bytes(digest[:7], "big")


@dataclass(frozen=True, slots=True)
class RemoteTransport:
    """The peer's ICE and DTLS parameters, taken from its bundle-tag m= section."""

    ice_ufrag: str
    ice_pwd: str
    fingerprints: tuple[tuple[str, str], ...]
    setup: str | None
    candidates: tuple[Candidate, ...]
    ice_options: tuple[str, ...] = ()


def remote_transport(description: SessionDescription) -> RemoteTransport:
    """ICE/DTLS parameters of an offer or answer (media level wins over session level,
    RFC 8839 §5.4, RFC 8122 §5); raises Unprocessable if a WebRTC peer left them out."""
    live = [m for m in description.media if not m.rejected]
    if not live:
        raise Unprocessable("SDP has no active m= section")
    bundle = description.bundle_mids
    tagged = next((m for m in live if bundle and m.mid == bundle[0]), live[0])
    ufrag = tagged.ice_ufrag or description.ice_ufrag
    pwd = tagged.ice_pwd or description.ice_pwd
    fingerprints = tagged.fingerprints or description.fingerprints
    if not ufrag or not pwd:
        raise Unprocessable("SDP lacks a=ice-ufrag / a=ice-pwd (RFC 8839 §5.4)")
    if not fingerprints:
        raise Unprocessable("SDP lacks a=fingerprint (RFC 8122 §5)")
    return RemoteTransport(
        ice_ufrag=ufrag,
        ice_pwd=pwd,
        fingerprints=tuple(fingerprints),
        setup=tagged.setup or description.setup,
        candidates=tuple(c for m in live for c in m.candidates),
        ice_options=tuple(tagged.ice_options or description.ice_options),
    )


def answer_setup(offer_setup: str | None) -> str:
    """The answerer's DTLS role (RFC 8842 §5.5, RFC 9725 §4.4.4): passive to actpass or
    active; active to passive (FFmpeg offers passive). An absent attribute means the
    offerer is active (RFC 4145 §4)."""
    if offer_setup in (None, "actpass", "active"):
        return "passive"
    if offer_setup == "passive":
        return "active"
    raise Unprocessable(f"cannot answer a=setup:{offer_setup}")


# --------------------------------------------------------------------------------------------
# Answer building blocks
# --------------------------------------------------------------------------------------------


def _is_live_rtp(section: MediaSection) -> bool:
    return not section.rejected and section.kind in _MEDIA_KINDS and section.proto in _RTP_PROTOS


def _rejected_answer(offered: MediaSection, local: LocalTransport, *, setup: str) -> MediaSection:
    """RFC 3264 §6: a rejected stream keeps its media and formats but gets port 0; JSEP
    (RFC 9429 §5.3.1) keeps its a=mid, and RFC 9143 §7.3.3 leaves it out of the answer's
    BUNDLE group (``_check_bundle`` lists accepted sections only).

    It still carries the session's ICE credentials, fingerprint and setup role, rtcp-mux
    where the offer had it, and the offered formats' rtpmap/fmtp lines (RFC 8866 §6.6:
    dynamic payload types are described where they are listed), although RFC 8839 §5.4
    needs the transport attributes only on sections in use: strict parsers read all of
    them from every m= section (aiortc refuses such an answer with "ICE username fragment
    or password is missing", "RTCP mux is not enabled" or "Failed to set remote audio
    description send parameters"), and the values are the session's and the offer's own,
    so they cannot mislead anyone. ``a=end-of-candidates`` without candidates (the RFC 8838
    end-of-candidates indication, in SDP as RFC 8840 writes it) says no address will
    ever come for it: aiortc (balanced bundle policy) starts
    ICE on a transport of its own for the rejected section and would otherwise wait for
    trickled candidates forever, before it starts the transport of the sections we accept.
    """
    return MediaSection(
        kind=offered.kind,
        port=0,
        proto=offered.proto,
        formats=list(offered.formats),
        connection=Connection(),
        mid=offered.mid,
        direction="inactive",
        ice_ufrag=local.ice_ufrag,
        ice_pwd=local.ice_pwd,
        fingerprints=list(local.fingerprints),
        setup=setup,
        rtcp_mux=offered.rtcp_mux,
        end_of_candidates=True,
        codecs=[
            Codec(
                payload_type=codec.payload_type,
                name=codec.name,
                clock_rate=codec.clock_rate,
                channels=codec.channels,
                fmtp=list(codec.fmtp),
            )
            for codec in offered.codecs
            # Only what writes a line: a payload type the offer gave only a=rtcp-fb (no
            # rtpmap, no fmtp) would be an entry of the answer that its text lacks.
            if codec.has_rtpmap or codec.fmtp
        ],
    )


def _accepted_answer(
    offered: MediaSection, local: LocalTransport, *, setup: str, direction: str
) -> MediaSection:
    return MediaSection(
        kind=offered.kind,
        port=9,  # RFC 8840 §4.1.1: 9 ("discard") when ICE decides the real address
        proto=offered.proto,
        connection=Connection(),
        direction=direction,
        mid=offered.mid,
        ice_ufrag=local.ice_ufrag,
        ice_pwd=local.ice_pwd,
        fingerprints=list(local.fingerprints),
        setup=setup,
        # RFC 8858 §3 / WHEP §4.5.1: RTP and RTCP share the bundled 5-tuple only.
        rtcp_mux=True,
        rtcp_mux_only=True,
        rtcp_rsize=offered.rtcp_rsize,
        candidates=list(local.candidates),
        end_of_candidates=True,
    )


def _add_codec(section: MediaSection, codec: RtpCodec, offered: Codec | None) -> None:
    section.formats.append(str(codec.payload_type))
    section.codecs.append(
        Codec(
            payload_type=codec.payload_type,
            name=codec.name,
            clock_rate=codec.clock_rate,
            channels=codec.channels,
            fmtp=list(codec.fmtp),
            rtcp_fb=list(codec.rtcp_feedback),
        )
    )
    if codec.rtx_payload_type is not None:
        section.formats.append(str(codec.rtx_payload_type))
        rtx_fmtp = [("apt", str(codec.payload_type))]
        if offered is not None and offered.parameter("rtx-time") is not None:
            rtx_fmtp.append(("rtx-time", offered.parameter("rtx-time") or ""))
        section.codecs.append(
            Codec(
                payload_type=codec.rtx_payload_type,
                name="rtx",
                clock_rate=codec.clock_rate,
                fmtp=rtx_fmtp,
            )
        )


def _session(local: LocalTransport, offer: SessionDescription | None) -> SessionDescription:
    return SessionDescription(
        origin=Origin(session_id=local.session_id, session_version=1),
        ice_lite=local.ice_lite,
        extmap_allow_mixed=offer.extmap_allow_mixed if offer is not None else True,
        msid_semantic="WMS *",
    )


def _check_bundle(offer: SessionDescription, accepted: list[MediaSection]) -> list[str]:
    """BUNDLE group for the answer: the accepted mids in the offer's group order. Everything
    must share one transport (WHEP §4.5.1, RFC 9725 §4.4.1: max-bundle)."""
    offered_group = offer.bundle_mids
    if len(accepted) > 1:
        for section in accepted:
            if section.mid is None or section.mid not in offered_group:
                raise Unprocessable("every m= section must be in one BUNDLE group (RFC 9143)")
    mids = {s.mid for s in accepted if s.mid is not None}
    return [mid for mid in offered_group if mid in mids]


def _check_rtcp_mux(section: MediaSection) -> None:
    if not (section.rtcp_mux or section.rtcp_mux_only):
        raise Unprocessable(f"m= section {section.mid!r} lacks a=rtcp-mux (RFC 8858)")


class _SsrcAllocator:
    """Distinct SSRCs from the caller's source (RFC 3550 §8.1: unique within the session)."""

    def __init__(self, source: Callable[[], int]) -> None:
        self._source = source
        self._used: set[int] = set()

    def __call__(self) -> int:
        for _ in range(64):
            ssrc = self._source() & 0xFFFFFFFF
            if ssrc and ssrc not in self._used:
                self._used.add(ssrc)
                return ssrc
        raise WhepfanError("ssrc_source keeps returning used SSRCs")


def _add_sending_ssrcs(
    section: MediaSection,
    ssrc: int,
    rtx_ssrc: int | None,
    *,
    cname: str,
    msid: str,
) -> None:
    # RFC 5576 §4.1 a=ssrc with cname (RFC 7022) and msid (RFC 8830 §2) so legacy receivers
    # demux by SSRC; RFC 4588 §8.6 / RFC 5576 §4.2 FID ties the RTX SSRC to the media one.
    if rtx_ssrc is not None:
        section.ssrc_groups.append(SsrcGroup(semantics="FID", ssrcs=[ssrc, rtx_ssrc]))
    for value in (ssrc, rtx_ssrc):
        if value is None:
            continue
        section.ssrcs.append(SsrcAttribute(ssrc=value, attribute="cname", value=cname))
        section.ssrcs.append(SsrcAttribute(ssrc=value, attribute="msid", value=msid))


def _default_cname(local: LocalTransport) -> str:
    return f"whepfan-{local.session_id:x}"


# --------------------------------------------------------------------------------------------
# WHIP: answering a publisher
# --------------------------------------------------------------------------------------------


def _choose_ingest_codec(
    section: MediaSection, supported: Sequence[CodecCapability], feedback: Sequence[str]
) -> tuple[RtpCodec, Codec] | None:
    """The first offered codec whepfan supports (the offer's order is the publisher's
    preference, RFC 3264 §6.1), except that H264 other than packetization-mode 1 only wins
    when nothing else is offered: mode 0 cannot fragment a NAL unit (RFC 6184 §6.2)."""
    ranked: list[tuple[int, int, Codec]] = []
    for index, codec in enumerate(section.codecs_in_format_order()):
        if not any(cap.accepts(section.kind, codec) for cap in supported):
            continue
        single_nal = codec.name.upper() == "H264" and codec.parameter("packetization-mode") != "1"
        ranked.append((int(single_nal), index, codec))
    if not ranked:
        return None
    offered = min(ranked, key=lambda item: item[:2])[2]
    return _agreed_codec(section, offered, feedback), offered


def _without_sender_properties(fmtp: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """fmtp for a recvonly answer: without the ``sprop-*`` parameters, which describe the
    stream their author sends (RFC 6184 §8.2.2: sprop-parameter-sets and the other sprop
    ones "describe the properties of the RTP packet stream that the offerer or answerer is
    sending"; RFC 7587 §7.1: sprop-stereo and sprop-maxcapturerate, likewise; RFC 7798
    §7.2.2 for H.265). Echoed on an m-line that sends nothing they claim a stream that does
    not exist. The ingest codec keeps them: they do describe what whepfan forwards."""
    return tuple((key, value) for key, value in fmtp if not key.lower().startswith("sprop-"))


def _agreed_codec(section: MediaSection, offered: Codec, feedback: Iterable[str]) -> RtpCodec:
    """The codec an answer agrees to: the peer's payload type and its own fmtp (they
    describe what its encoder or decoder was set up for; the caller matched them), the
    feedback both sides do, and the peer's rtx for it (RFC 4588 §8.6) on video."""
    rtx = _rtx_for(section, offered.payload_type) if section.kind == "video" else None
    return RtpCodec(
        name=offered.name,
        clock_rate=offered.clock_rate,
        channels=offered.channels,
        payload_type=offered.payload_type,
        fmtp=tuple(offered.fmtp),
        rtcp_feedback=_feedback(offered, section, feedback),
        rtx_payload_type=rtx.payload_type if rtx is not None else None,
    )


def _rid_max_bitrate(rid: Rid) -> int | None:
    """The rid's max-br restriction (RFC 8851 §5), bits/s, if given and well-formed."""
    for key, value in rid.restrictions:
        if key == "max-br" and value.isdigit():
            return int(value)
    return None


def _fid_pairs(section: MediaSection) -> dict[int, int]:
    """Media SSRC -> its RTX SSRC from ``a=ssrc-group:FID`` (RFC 5576 §4.2, RFC 4588 §8.7).

    An RTX FID group names exactly two SSRCs, the original stream then the repair one; a
    group of another size cannot be paired, so the offer is refused with a 400 saying so
    rather than guessing which SSRC carries what (a guess that is wrong leaves the video
    undecodable with no error anywhere).
    """
    pairs: dict[int, int] = {}
    for group in section.ssrc_groups:
        if group.semantics != "FID":
            continue
        if len(group.ssrcs) != 2:
            listed = " ".join(map(str, group.ssrcs)) or "no SSRC"
            raise ParseError(
                f"m= section {section.mid!r}: a=ssrc-group:FID lists {listed}; it needs "
                "the media SSRC and its RTX SSRC (RFC 4588 §8.7, RFC 5576 §4.2)"
            )
        media, repair = group.ssrcs
        if media != repair:
            pairs[media] = repair
    return pairs


def _ingest_tracks(section: MediaSection, answer: MediaSection) -> tuple[IngestTrack, ...]:
    """Encodings of one publisher m= section; fills the answer's rid/simulcast lines."""
    send_rids = {rid.id: rid for rid in section.rids if rid.direction == "send"}
    if section.simulcast is not None and section.simulcast.send:
        streams = section.simulcast.send
        tracks = []
        for alternatives in streams:
            for stream in alternatives:
                if stream.rid not in send_rids:
                    raise Unprocessable(f"a=simulcast names undeclared rid {stream.rid!r}")
                answer.rids.append(Rid(id=stream.rid, direction="recv"))
            first = alternatives[0]
            tracks.append(
                IngestTrack(
                    rid=first.rid,
                    paused=first.paused,
                    max_bitrate=_rid_max_bitrate(send_rids[first.rid]),
                )
            )
        # RFC 8853 §5.3.2: the answer mirrors the offer, send becoming recv, so that the
        # sender keeps every layer (Chromium sends one layer otherwise).
        answer.simulcast = Simulcast(recv=[list(alt) for alt in streams])
        return tuple(tracks)
    if send_rids:
        for rid_id in send_rids:
            answer.rids.append(Rid(id=rid_id, direction="recv"))
        return tuple(
            IngestTrack(rid=rid_id, max_bitrate=_rid_max_bitrate(rid))
            for rid_id, rid in send_rids.items()
        )
    fid = _fid_pairs(section)
    sim = next((g.ssrcs for g in section.ssrc_groups if g.semantics == "SIM"), None)
    if sim:
        # Legacy SSRC-signalled simulcast (a=ssrc-group:SIM, lowest layer first).
        return tuple(IngestTrack(ssrc=ssrc, rtx_ssrc=fid.get(ssrc)) for ssrc in sim)
    repair_ssrcs = set(fid.values())
    media_ssrc = next((s.ssrc for s in section.ssrcs if s.ssrc not in repair_ssrcs), None)
    if media_ssrc is None:
        return (IngestTrack(),)
    return (IngestTrack(ssrc=media_ssrc, rtx_ssrc=fid.get(media_ssrc)),)


def answer_publisher(
    offer: SessionDescription,
    local: LocalTransport,
    *,
    supported: Sequence[CodecCapability] = DEFAULT_CODECS,
    transport_cc: bool = False,
    reject_partial: bool = True,
) -> tuple[SessionDescription, list[IngestMedia]]:
    """Answer a WHIP offer (RFC 9725 §4.2) ``recvonly`` with one codec per section.

    ``transport_cc`` keeps transport-wide-cc (extension and feedback) for sessions that
    send its RTCP feedback; otherwise the publisher's estimate comes from REMB.
    ``reject_partial`` follows RFC 9725 §4.4.3 (reject the POST rather than one m= section
    the server cannot use); with False such sections get port 0 as long as one remains.
    """
    remote = remote_transport(offer)
    setup = answer_setup(remote.setup)
    feedback = (*_AGREED_FEEDBACK, "transport-cc") if transport_cc else _AGREED_FEEDBACK
    # Only the -01 extension: whepfan reports periodically (media/twcc.py), while -02
    # senders ask for each feedback and may leave out the timing.
    understood = _INGEST_EXTENSIONS | ({EXT_TRANSPORT_CC} if transport_cc else set())
    answer = _session(local, offer)
    ingest: list[IngestMedia] = []
    accepted: list[MediaSection] = []
    kinds_seen: set[str] = set()
    unusable: list[str] = []
    for section in offer.media:
        if section.rejected:
            answer.media.append(_rejected_answer(section, local, setup=setup))
            continue
        direction = section.direction or "sendrecv"
        chosen = (
            _choose_ingest_codec(section, supported, feedback) if _is_live_rtp(section) else None
        )
        if chosen is None:
            unusable.append(f"{section.kind} {section.mid!r}")
            answer.media.append(_rejected_answer(section, local, setup=setup))
            continue
        if direction not in ("sendonly", "sendrecv"):
            # RFC 9725 §4.2: the publisher's offer MUST NOT be recvonly or inactive.
            raise Unprocessable(f"WHIP offer m= section {section.mid!r} is {direction}")
        if section.kind in kinds_seen:
            # RFC 9725 §4.4.2: one MediaStream with at most one track of each kind.
            raise Unprocessable(f"more than one {section.kind} track")
        kinds_seen.add(section.kind)
        _check_rtcp_mux(section)
        codec, _ = chosen
        reply = _accepted_answer(section, local, setup=setup, direction="recvonly")
        answered = replace(codec, fmtp=_without_sender_properties(codec.fmtp))
        _add_codec(reply, answered, _rtx_for(section, codec.payload_type))
        extension_ids: dict[str, int] = {}
        for extmap in section.extmaps:
            if extmap.uri in understood and extmap.direction in (None, "sendonly", "sendrecv"):
                # RFC 8285 §6: the answer uses the offerer's ids.
                reply.extmaps.append(Extmap(id=extmap.id, uri=extmap.uri))
                extension_ids.setdefault(extmap.uri, extmap.id)
        tracks = _ingest_tracks(section, reply)
        answer.media.append(reply)
        accepted.append(reply)
        ingest.append(
            IngestMedia(
                mid=section.mid,
                kind=section.kind,
                codec=codec,
                extension_ids=extension_ids,
                tracks=tracks,
            )
        )
    if not accepted:
        raise Unprocessable("no m= section offers a codec whepfan supports")
    if unusable and reject_partial:
        raise Unprocessable(
            "cannot receive " + ", ".join(unusable) + " (RFC 9725 §4.4.3: no partial answers)"
        )
    bundle = _check_bundle(offer, accepted)
    if bundle:
        answer.groups.append(Group(semantics="BUNDLE", mids=bundle))
    return answer, ingest


# --------------------------------------------------------------------------------------------
# WHEP: answering a viewer, or offering to one (406 counter-offer)
# --------------------------------------------------------------------------------------------


def _viewer_codec(
    section: MediaSection, stream: RtpCodec, feedback: Sequence[str] = _AGREED_FEEDBACK
) -> tuple[RtpCodec, Codec] | None:
    """The viewer payload type that carries ``stream`` unchanged (best match first, then the
    viewer's preference order), with its rtx if offered."""
    best: tuple[int, int, Codec] | None = None
    for index, offered in enumerate(section.codecs_in_format_order()):
        rank = _codec_match_rank(section.kind, stream, offered)
        if rank is not None and (best is None or (rank, index) < best[:2]):
            best = (rank, index, offered)
    if best is None:
        return None
    offered = best[2]
    # The matching above ensures the stream fits the viewer's own parameters.
    return _agreed_codec(section, offered, feedback), offered


def _without_transport_cc(codec: RtpCodec) -> RtpCodec:
    return replace(
        codec, rtcp_feedback=tuple(fb for fb in codec.rtcp_feedback if fb != "transport-cc")
    )


def _transport_cc_extmap(section: MediaSection) -> Extmap | None:
    """The offer's transport-wide cc -01 extmap that lets whepfan send the numbers (RFC
    8285 §5 directions: the viewer receives them)."""
    for extmap in section.extmaps:
        if (
            extmap.uri == EXT_TRANSPORT_CC
            and extmap.direction in (None, "recvonly", "sendrecv")
            and 0 < extmap.id < 256
        ):
            return extmap
    return None


def answer_viewer(
    offer: SessionDescription,
    local: LocalTransport,
    ingest: Sequence[IngestMedia],
    *,
    ssrc_source: Callable[[], int],
    stream_id: str = "whepfan",
    cname: str | None = None,
    transport_cc: bool = True,
) -> tuple[SessionDescription, list[EgressMedia]]:
    """Answer a WHEP offer (draft-ietf-wish-whep-03 §4.2) ``sendonly``.

    Each offered audio/video section gets the first unused stream track of its kind whose
    codec the viewer can decode; the others are answered with port 0. Raises NotAcceptable
    (406, WHEP §4.2.2) when no section can carry any track.

    ``transport_cc``: where the offer has both the transport-wide cc -01 extension and
    ``transport-cc`` feedback for the chosen codec, the answer keeps both (the offer's id,
    RFC 8285 §6), so whepfan stamps its own numbers on everything it sends the viewer and
    the viewer reports their arrival (EgressMedia.transport_cc_id). Only -01, as for
    publishers: -02 receivers send feedback only when a packet asks for it. One without
    the other is dropped: numbers nobody reports on, or feedback on nothing.
    """
    feedback = (*_AGREED_FEEDBACK, "transport-cc") if transport_cc else _AGREED_FEEDBACK
    remote = remote_transport(offer)
    setup = answer_setup(remote.setup)
    allocate = _SsrcAllocator(ssrc_source)
    cname = cname or _default_cname(local)
    answer = _session(local, offer)
    egress: list[EgressMedia] = []
    accepted: list[MediaSection] = []
    used_sources: set[int] = set()
    for section in offer.media:
        if not _is_live_rtp(section):
            answer.media.append(_rejected_answer(section, local, setup=setup))
            continue
        direction = section.direction or "sendrecv"
        if direction not in ("recvonly", "sendrecv"):
            # WHEP §4.2.5: the viewer's offer MUST NOT be sendonly or inactive.
            raise Unprocessable(f"WHEP offer m= section {section.mid!r} is {direction}")
        match = None
        for index, source in enumerate(ingest):
            if index in used_sources or source.kind != section.kind:
                continue
            found = _viewer_codec(section, source.codec, feedback)
            if found is not None:
                match = (index, source, found)
                break
        if match is None:
            if any(
                source.kind == section.kind and index not in used_sources
                for index, source in enumerate(ingest)
            ):
                # The viewer asked for a kind the stream carries but can decode none of its
                # codecs: answering without it would play silently without video (or audio).
                # WHEP §4.2.2: 406 with a counter-offer lets the client decide.
                raise NotAcceptable(
                    f"the offer's {section.kind} section has no codec matching the stream's "
                    "(a counter-offer follows)"
                )
            answer.media.append(_rejected_answer(section, local, setup=setup))
            continue
        index, source, (codec, _) = match
        used_sources.add(index)
        _check_rtcp_mux(section)
        transport_cc_extmap = _transport_cc_extmap(section) if transport_cc else None
        if transport_cc_extmap is None or "transport-cc" not in codec.rtcp_feedback:
            codec = _without_transport_cc(codec)
            transport_cc_extmap = None
        reply = _accepted_answer(section, local, setup=setup, direction="sendonly")
        _add_codec(reply, codec, _rtx_for(section, codec.payload_type))
        extension_ids: dict[str, int] = {}
        if transport_cc_extmap is not None:
            # RFC 8285 §6: the offerer's id. No direction: whepfan sends, the viewer
            # receives, as the offer said.
            reply.extmaps.append(Extmap(id=transport_cc_extmap.id, uri=EXT_TRANSPORT_CC))
            extension_ids[EXT_TRANSPORT_CC] = transport_cc_extmap.id
        for extmap in section.extmaps:
            if (
                extmap.uri in FORWARDED_EXTENSIONS
                and extmap.uri in source.extension_ids
                and extmap.direction in (None, "recvonly", "sendrecv")
                and extmap.id < 256
            ):
                reply.extmaps.append(Extmap(id=extmap.id, uri=extmap.uri))
                extension_ids.setdefault(extmap.uri, extmap.id)
        ssrc = allocate()
        rtx_ssrc = allocate() if codec.rtx_payload_type is not None else None
        # WHEP §4.5.2: one MediaStream, so every section carries the same msid stream id.
        msid = f"{stream_id} {stream_id}-{section.kind}"
        reply.msid = msid
        _add_sending_ssrcs(reply, ssrc, rtx_ssrc, cname=cname, msid=msid)
        answer.media.append(reply)
        accepted.append(reply)
        egress.append(
            EgressMedia(
                mid=section.mid,
                kind=section.kind,
                source_mid=source.mid,
                codec=codec,
                ssrc=ssrc,
                rtx_ssrc=rtx_ssrc,
                extension_ids=extension_ids,
            )
        )
    if not accepted:
        raise NotAcceptable("no offered m= section can carry this stream's codecs")
    bundle = _check_bundle(offer, accepted)
    if bundle:
        answer.groups.append(Group(semantics="BUNDLE", mids=bundle))
    return answer, egress


def _free_payload_type(taken: set[int]) -> int:
    # RFC 3551 §3: 96-127 are dynamic; Chromium also uses 35-63 (RFC 5761 §4 safe range).
    for payload_type in (*range(96, 128), *range(35, 64)):
        if payload_type not in taken:
            return payload_type
    raise WhepfanError("no free dynamic payload type")


def build_counter_offer(
    local: LocalTransport,
    ingest: Sequence[IngestMedia],
    *,
    ssrc_source: Callable[[], int],
    stream_id: str = "whepfan",
    cname: str | None = None,
    transport_cc: bool = True,
) -> SessionDescription:
    """whepfan's own ``sendonly`` offer (WHEP §4.2.2, the 406 path, and the legacy
    server-offer mode) with the stream's codecs.

    mids and extension ids are the publisher's, so the counter-offer describes the stream
    exactly; the client answers ``recvonly`` by PATCH, see :func:`accept_counter_answer`.
    ``transport_cc`` offers whepfan's own transport-wide sequence numbers (-01) with
    ``transport-cc`` feedback on every section, under one id for the whole BUNDLE (its
    sections share one RTP session, so an id names one URI in all of them): the
    publisher's transport-cc id when no forwarded extension uses it, else the lowest free.
    """
    if not ingest:
        raise WhepfanError("no stream tracks to offer")
    allocate = _SsrcAllocator(ssrc_source)
    cname = cname or _default_cname(local)
    offer = _session(local, None)
    mids: list[str] = []
    transport_cc_id = _counter_offer_transport_cc_id(ingest) if transport_cc else None
    for index, source in enumerate(ingest):
        mid = source.mid if source.mid is not None else str(index)
        section = MediaSection(
            kind=source.kind,
            connection=Connection(),
            direction="sendonly",
            mid=mid,
            ice_ufrag=local.ice_ufrag,
            ice_pwd=local.ice_pwd,
            fingerprints=list(local.fingerprints),
            # RFC 8842 §5.5: an offerer says actpass and lets the answerer pick.
            setup="actpass",
            rtcp_mux=True,
            rtcp_mux_only=True,
            rtcp_rsize=True,
            candidates=list(local.candidates),
            end_of_candidates=True,
        )
        feedback: tuple[str, ...] = _AGREED_FEEDBACK if source.kind == "video" else ()
        if transport_cc_id is not None:
            feedback = (*feedback, "transport-cc")
        rtx_payload_type = None
        if source.kind == "video":
            rtx_payload_type = source.codec.rtx_payload_type
            if rtx_payload_type is None:
                rtx_payload_type = _free_payload_type({source.codec.payload_type})
        codec = RtpCodec(
            name=source.codec.name,
            clock_rate=source.codec.clock_rate,
            channels=source.codec.channels,
            payload_type=source.codec.payload_type,
            fmtp=source.codec.fmtp,
            rtcp_feedback=feedback,
            rtx_payload_type=rtx_payload_type,
        )
        _add_codec(section, codec, None)
        for uri, ext_id in source.extension_ids.items():
            if uri in FORWARDED_EXTENSIONS and ext_id < 256:
                section.extmaps.append(Extmap(id=ext_id, uri=uri))
        if transport_cc_id is not None:
            section.extmaps.append(Extmap(id=transport_cc_id, uri=EXT_TRANSPORT_CC))
        ssrc = allocate()
        rtx_ssrc = allocate() if rtx_payload_type is not None else None
        msid = f"{stream_id} {stream_id}-{source.kind}"
        section.msid = msid
        _add_sending_ssrcs(section, ssrc, rtx_ssrc, cname=cname, msid=msid)
        offer.media.append(section)
        mids.append(mid)
    offer.groups.append(Group(semantics="BUNDLE", mids=mids))
    return offer


def _counter_offer_transport_cc_id(ingest: Sequence[IngestMedia]) -> int | None:
    """One id for transport-cc in every section of a counter-offer (see build_counter_offer),
    one-byte if possible (RFC 8285 §4.2: 1..14); None if every id is taken."""
    taken = {
        ext_id
        for source in ingest
        for uri, ext_id in source.extension_ids.items()
        if uri in FORWARDED_EXTENSIONS
    }
    preferred = [
        source.extension_ids[EXT_TRANSPORT_CC]
        for source in ingest
        if EXT_TRANSPORT_CC in source.extension_ids
    ]
    for ext_id in (*preferred, *range(1, 15), *range(16, 256)):
        if 0 < ext_id < 256 and ext_id != 15 and ext_id not in taken:
            return ext_id
    return None


def accept_counter_answer(
    counter_offer: SessionDescription, answer: SessionDescription
) -> list[EgressMedia]:
    """What a viewer agreed to in its ``recvonly`` answer to a counter-offer (WHEP §4.2.2).

    RFC 3264 §6.1: the answer to a sendonly stream is recvonly (or rejects it) and uses the
    offer's payload type numbers; extensions it keeps keep the offer's ids (RFC 8285 §6).
    """
    if len(answer.media) != len(counter_offer.media):
        raise Unprocessable("answer must have one m= section per offered one (RFC 3264 §6)")
    egress: list[EgressMedia] = []
    for offered, answered in zip(counter_offer.media, answer.media, strict=True):
        if answered.rejected or offered.rejected:
            continue
        if answered.kind != offered.kind or answered.mid != offered.mid:
            raise Unprocessable(f"answer m= section {answered.mid!r} does not match the offer")
        direction = answered.direction or "sendrecv"
        if direction == "inactive":
            continue
        if direction != "recvonly":
            raise Unprocessable(f"answer to a sendonly offer is {direction} (RFC 3264 §6.1)")
        media_codecs = [
            c for c in offered.codecs_in_format_order() if c.name.lower() not in ("rtx",)
        ]
        answered_pts = set(answered.payload_types)
        chosen = next((c for c in media_codecs if c.payload_type in answered_pts), None)
        if chosen is None:
            raise Unprocessable(f"answer m= section {answered.mid!r} has no offered codec")
        rtx = _rtx_for(offered, chosen.payload_type)
        if rtx is not None and rtx.payload_type not in answered_pts:
            rtx = None
        answered_codec = answered.codec(chosen.payload_type)
        agreed_feedback = tuple(
            fb
            for fb in chosen.rtcp_fb
            if answered_codec is not None
            and (fb in answered_codec.rtcp_fb or fb in answered.rtcp_fb_all)
        )
        offered_ids = {e.uri: e.id for e in offered.extmaps}
        extension_ids = {
            e.uri: e.id
            for e in answered.extmaps
            if e.uri in offered_ids and offered_ids[e.uri] == e.id
        }
        if "transport-cc" not in agreed_feedback or EXT_TRANSPORT_CC not in extension_ids:
            # Numbers without their feedback (or the reverse) would serve nothing.
            extension_ids.pop(EXT_TRANSPORT_CC, None)
            agreed_feedback = tuple(fb for fb in agreed_feedback if fb != "transport-cc")
        fid = next((g.ssrcs for g in offered.ssrc_groups if g.semantics == "FID"), None)
        ssrc = fid[0] if fid else offered.ssrcs[0].ssrc if offered.ssrcs else None
        if ssrc is None:
            raise WhepfanError("counter-offer section without a=ssrc")
        egress.append(
            EgressMedia(
                mid=offered.mid,
                kind=offered.kind,
                source_mid=offered.mid,
                codec=RtpCodec(
                    name=chosen.name,
                    clock_rate=chosen.clock_rate,
                    channels=chosen.channels,
                    payload_type=chosen.payload_type,
                    fmtp=tuple(chosen.fmtp),
                    rtcp_feedback=agreed_feedback,
                    rtx_payload_type=rtx.payload_type if rtx is not None else None,
                ),
                ssrc=ssrc,
                rtx_ssrc=fid[1] if fid and rtx is not None and len(fid) > 1 else None,
                extension_ids=extension_ids,
            )
        )
    if not egress:
        raise NotAcceptable("the answer accepted no m= section")
    remote_transport(answer)  # the accepted sections must carry ICE and DTLS parameters
    return egress
