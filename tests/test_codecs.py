"""Keyframe detection and payload descriptors per codec (RFC 7741, RFC 9628, RFC 6184, AV1)."""

from __future__ import annotations

import contextlib
import dataclasses
import fractions

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whepfan.errors import ParseError
from whepfan.protocol.codecs import (
    Vp8PayloadDescriptor,
    h264_keyframe_size,
    h264_sps_frame_size,
    is_keyframe_start,
    keyframe_size,
    vp8_keyframe_size,
)

# --- VP8, RFC 7741 -------------------------------------------------------------------

# S=1 PID=0 descriptor, then a keyframe: frame tag with P=0 (RFC 7741 §4.3), start code
# 9d 01 2a and 320 x 240 little-endian (RFC 6386 §9.1).
VP8_KEYFRAME_START = bytes.fromhex("105002009d012a4001f000")
# The first payload aiortc's VP8 encoder produced for a 320x240 frame: X, I with a
# 15-bit picture id, then the keyframe header.
VP8_AIORTC_KEYFRAME = bytes.fromhex("90809549f028009d012a4001f000")
VP8_AIORTC_INTERFRAME = bytes.fromhex("9080954af10d00e4718fcc")


def test_vp8_keyframe_start() -> None:
    assert is_keyframe_start("VP8", VP8_KEYFRAME_START)
    assert is_keyframe_start("video/VP8", VP8_AIORTC_KEYFRAME)
    assert is_keyframe_start("vp8", VP8_AIORTC_KEYFRAME)
    assert not is_keyframe_start("VP8", VP8_AIORTC_INTERFRAME)
    # Continuation packet (S=0) and a later partition (PID=1) do not start a frame.
    assert not is_keyframe_start("VP8", bytes.fromhex("00") + VP8_KEYFRAME_START[1:])
    assert not is_keyframe_start("VP8", bytes.fromhex("11") + VP8_KEYFRAME_START[1:])
    # Truncated payloads are not keyframe starts.
    for data in (b"", b"\x10", b"\x90", b"\x90\x80", b"\x90\x80\x95"):
        assert not is_keyframe_start("VP8", data)


def test_vp8_keyframe_size() -> None:
    assert vp8_keyframe_size(VP8_KEYFRAME_START) == (320, 240)
    assert keyframe_size("VP8", VP8_AIORTC_KEYFRAME) == (320, 240)
    assert vp8_keyframe_size(VP8_AIORTC_INTERFRAME) is None
    # The top two bits of each dimension are the scaling mode, not size.
    scaled = bytes.fromhex("105002009d012a40c1f040")
    assert vp8_keyframe_size(scaled) == (320, 240)
    with pytest.raises(ParseError):
        vp8_keyframe_size(bytes.fromhex("105002009d012b4001f000"))
    with pytest.raises(ParseError):
        vp8_keyframe_size(bytes.fromhex("105002009d012a40"))


def test_vp8_descriptor_all_fields() -> None:
    data = bytes.fromhex(
        "b0"  # X=1 N=1 S=1 PID=0
        "f0"  # I L T K
        "9234"  # M=1, picture id 0x1234
        "05"  # TL0PICIDX
        "a3"  # TID=2 Y=1 KEYIDX=3
    )
    descriptor, rest = Vp8PayloadDescriptor.split(data + b"vp8")
    assert descriptor == Vp8PayloadDescriptor(
        non_reference=True,
        start_of_partition=True,
        partition_index=0,
        picture_id=0x1234,
        long_picture_id=True,
        tl0_pic_idx=5,
        temporal_layer=2,
        layer_sync=True,
        key_index=3,
    )
    assert rest == b"vp8"
    assert descriptor.serialize() == data


def test_vp8_descriptor_short_picture_id_and_keyidx_only() -> None:
    data = bytes.fromhex("93907f1f")  # X S PID=3; I K; 7-bit id 127; KEYIDX 31
    descriptor = Vp8PayloadDescriptor.parse(data)
    assert descriptor.picture_id == 127
    assert not descriptor.long_picture_id
    assert descriptor.temporal_layer is None
    assert descriptor.key_index == 31
    assert descriptor.partition_index == 3
    assert bytes(descriptor) == data


def test_vp8_descriptor_rewrite_for_a_layer_switch() -> None:
    descriptor, rest = Vp8PayloadDescriptor.split(VP8_AIORTC_KEYFRAME)
    rewritten = bytes(dataclasses.replace(descriptor, picture_id=7)) + rest
    assert Vp8PayloadDescriptor.parse(rewritten).picture_id == 7
    assert len(rewritten) == len(VP8_AIORTC_KEYFRAME)
    assert vp8_keyframe_size(rewritten) == (320, 240)
    with pytest.raises(ValueError):
        Vp8PayloadDescriptor(picture_id=200, long_picture_id=False).serialize()


vp8_descriptors = st.builds(
    lambda fields, picture, tl0, tid, key, sync: Vp8PayloadDescriptor(
        non_reference=fields[0],
        start_of_partition=fields[1],
        partition_index=fields[2],
        picture_id=None if picture is None else picture[0],
        long_picture_id=True if picture is None else picture[1],
        tl0_pic_idx=tl0,
        temporal_layer=tid,
        key_index=key,
        layer_sync=sync and (tid is not None or key is not None),
    ),
    st.tuples(st.booleans(), st.booleans(), st.integers(0, 7)),
    st.none()
    | st.one_of(
        st.tuples(st.integers(0, 0x7F), st.just(False)),
        st.tuples(st.integers(0, 0x7FFF), st.just(True)),
    ),
    st.none() | st.integers(0, 255),
    st.none() | st.integers(0, 3),
    st.none() | st.integers(0, 31),
    st.booleans(),
)


@given(vp8_descriptors, st.binary(max_size=20))
def test_vp8_descriptor_round_trip(descriptor: Vp8PayloadDescriptor, rest: bytes) -> None:
    assert Vp8PayloadDescriptor.split(descriptor.serialize() + rest) == (descriptor, rest)


@given(st.binary(max_size=16))
def test_fuzz_vp8_descriptor(data: bytes) -> None:
    try:
        descriptor, rest = Vp8PayloadDescriptor.split(data)
    except ParseError:
        return
    assert len(rest) < len(data)
    assert descriptor.partition_index == data[0] & 0x07


# --- VP9, RFC 9628 §4.2 ----------------------------------------------------------------


def test_vp9_keyframe_start() -> None:
    # I=1 P=0 L=1 F=0 B=1 E=0 V=1 Z=0, 15-bit picture id, layer byte SID=0, TL0PICIDX.
    assert is_keyframe_start("VP9", bytes.fromhex("aa80010000"))
    # Same picture, spatial layer 1: not where a decoder can start.
    assert not is_keyframe_start("VP9", bytes.fromhex("aa80010200"))
    # P set (inter-picture predicted) or B clear (not the start of a frame).
    assert not is_keyframe_start("VP9", bytes.fromhex("ea80010000"))
    assert not is_keyframe_start("VP9", bytes.fromhex("a280010000"))
    # No layer indices: a single spatial layer; 7-bit picture id.
    assert is_keyframe_start("VP9", bytes.fromhex("8805"))
    assert is_keyframe_start("VP9", bytes.fromhex("a80500"))
    for data in (b"", b"\xa8", b"\xa8\x85", b"\xa8\x85\x00"):
        assert not is_keyframe_start("VP9", data)


# --- H.264, RFC 6184 ---------------------------------------------------------------------

# SPS and PPS from the first STAP-A aiortc's H.264 encoder (libx264) sent for 320 x 240.
H264_SPS_320X240 = bytes.fromhex("6742c01fd90141fa10000003001000000303c8f1832480")
H264_PPS = bytes.fromhex("68cb8cb2")


def stap_a(*units: bytes) -> bytes:
    return b"\x78" + b"".join(len(unit).to_bytes(2, "big") + unit for unit in units)


def test_h264_single_nal_units() -> None:
    assert is_keyframe_start("H264", H264_SPS_320X240)
    assert is_keyframe_start("H264", H264_PPS)
    # IDR slice with first_mb_in_slice = 0 (first bit of the slice header set).
    assert is_keyframe_start("H264", bytes.fromhex("658884"))
    # A later slice of the same IDR picture, a non-IDR slice, SEI, and a bare header.
    assert not is_keyframe_start("H264", bytes.fromhex("650142"))
    assert not is_keyframe_start("H264", bytes.fromhex("4188"))
    assert not is_keyframe_start("H264", bytes.fromhex("0605ff"))
    assert not is_keyframe_start("H264", bytes.fromhex("65"))
    assert not is_keyframe_start("H264", b"")


def test_h264_stap_a() -> None:
    assert is_keyframe_start("H264", stap_a(H264_SPS_320X240, H264_PPS))
    assert is_keyframe_start("H264", stap_a(bytes.fromhex("0605ff"), bytes.fromhex("658884")))
    assert not is_keyframe_start("H264", stap_a(bytes.fromhex("0605ff"), bytes.fromhex("4188")))
    # Aggregation unit running past the payload, and a zero-size unit.
    assert not is_keyframe_start("H264", b"\x78\x00\x09\x67")
    assert not is_keyframe_start("H264", b"\x78\x00\x00\x67")


def test_h264_fu_a() -> None:
    # FU indicator 0x7c (NRI 3, type 28), FU header |S|E|R|Type|.
    assert is_keyframe_start("H264", bytes.fromhex("7c8588"))  # start of an IDR
    assert not is_keyframe_start("H264", bytes.fromhex("7c05ee"))  # middle
    assert not is_keyframe_start("H264", bytes.fromhex("7c45ee"))  # end
    assert not is_keyframe_start("H264", bytes.fromhex("5c8188"))  # start, non-IDR
    assert not is_keyframe_start("H264", bytes.fromhex("7c8501"))  # start, later slice
    assert not is_keyframe_start("H264", bytes.fromhex("7c"))


# libx264 SPSs (captured through PyAV) covering the SPS syntax branches.
LIBX264_SPS = [
    # High, 4:2:0, 1920x1080: cropped from 1088 lines.
    ("6764003eacb200f0044fcb08000003000800f4240478402124", (1920, 1080)),
    # Constrained baseline, 322x182: horizontal and vertical cropping.
    ("6742c03ed901519e226840000003004007a12023c2010920", (322, 182)),
    # High 4:4:4 Predictive (chroma_format_idc 3): crop units of one pixel.
    ("67f4003e919640290bf8f9e10000030001001e84808f08042480", (642, 362)),
    # High 4:2:2: horizontal crop unit 2, vertical 1.
    ("677a003ebcb201405ff3c20000030002003d09011e100849", (640, 362)),
    # Interlaced (frame_mbs_only_flag 0): heights count field macroblock pairs.
    ("6764003eacd940b424d08000000300800f42400f8f1ecb", (720, 576)),
]


@pytest.mark.parametrize(("sps_hex", "size"), LIBX264_SPS)
def test_h264_sps_frame_size_from_libx264(sps_hex: str, size: tuple[int, int]) -> None:
    assert h264_sps_frame_size(bytes.fromhex(sps_hex)) == size


class BitWriter:
    """Builds an SPS bit by bit, to reach branches libx264 never writes."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, count: int, value: int) -> None:
        self.bits += [(value >> (count - 1 - index)) & 1 for index in range(count)]

    def ue(self, value: int) -> None:
        code = value + 1
        self.u(2 * code.bit_length() - 1, code)

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def rbsp(self) -> bytes:
        bits = [*self.bits, 1]  # rbsp_stop_one_bit
        bits += [0] * (-len(bits) % 8)
        return bytes(
            int("".join(map(str, bits[index : index + 8])), 2) for index in range(0, len(bits), 8)
        )


def test_h264_sps_with_scaling_lists_and_poc_type_1() -> None:
    # H.264 §7.3.2.1.1: High profile, scaling matrix with one explicit 4x4 list and
    # one 8x8 list, pic_order_cnt_type 1 with a 2-entry cycle, 4:2:0, cropping.
    writer = BitWriter()
    writer.u(8, 100)  # profile_idc High
    writer.u(16, 0x0028)  # constraint flags, level 4.0
    writer.ue(0)  # seq_parameter_set_id
    writer.ue(1)  # chroma_format_idc 4:2:0
    writer.ue(0)  # bit_depth_luma_minus8
    writer.ue(0)  # bit_depth_chroma_minus8
    writer.u(1, 0)  # qpprime_y_zero_transform_bypass_flag
    writer.u(1, 1)  # seq_scaling_matrix_present_flag
    for index in range(8):
        present = index in (0, 6)
        writer.u(1, int(present))
        if present:
            # Scales 8 -> 11 -> 9 -> 0: a 0 ends the explicit part of the list.
            writer.se(3)
            writer.se(-2)
            writer.se(-9)
    writer.ue(0)  # log2_max_frame_num_minus4
    writer.ue(1)  # pic_order_cnt_type
    writer.u(1, 0)  # delta_pic_order_always_zero_flag
    writer.se(-1)  # offset_for_non_ref_pic
    writer.se(2)  # offset_for_top_to_bottom_field
    writer.ue(2)  # num_ref_frames_in_pic_order_cnt_cycle
    writer.se(5)
    writer.se(-5)
    writer.ue(1)  # max_num_ref_frames
    writer.u(1, 0)  # gaps_in_frame_num_value_allowed_flag
    writer.ue(79)  # pic_width_in_mbs_minus1: 1280
    writer.ue(44)  # pic_height_in_map_units_minus1: 720
    writer.u(1, 1)  # frame_mbs_only_flag
    writer.u(1, 1)  # direct_8x8_inference_flag
    writer.u(1, 1)  # frame_cropping_flag
    for offset in (1, 2, 0, 3):  # left, right, top, bottom in 2-pixel units
        writer.ue(offset)
    writer.u(1, 0)  # vui_parameters_present_flag
    sps = b"\x67" + writer.rbsp()
    assert h264_sps_frame_size(sps) == (1280 - 6, 720 - 6)


def test_h264_emulation_prevention_bytes_are_removed() -> None:
    # The libx264 SPSs above contain 00 00 03; the size is only right if they are removed.
    assert b"\x00\x00\x03" in bytes.fromhex(LIBX264_SPS[0][0])


def test_h264_keyframe_size_from_payloads() -> None:
    assert h264_keyframe_size(H264_SPS_320X240) == (320, 240)
    assert keyframe_size("H264", stap_a(H264_SPS_320X240, H264_PPS)) == (320, 240)
    assert keyframe_size("H264", stap_a(bytes.fromhex("0605ff"), H264_PPS)) is None
    assert keyframe_size("H264", bytes.fromhex("658884")) is None
    assert keyframe_size("H264", b"") is None
    assert keyframe_size("opus", b"\x78") is None
    with pytest.raises(ParseError):
        h264_keyframe_size(b"\x78\x00\x09\x67")


@pytest.mark.parametrize(
    "sps",
    [
        b"",
        bytes.fromhex("68ce"),  # a PPS
        bytes.fromhex("6742"),  # truncated
        bytes.fromhex("6742c01f00000000"),  # exp-Golomb run longer than 32 bits
        bytes.fromhex("6764001f88"),  # chroma_format_idc 4 is not defined
    ],
)
def test_h264_sps_errors(sps: bytes) -> None:
    with pytest.raises(ParseError):
        h264_sps_frame_size(sps)


@given(st.binary(max_size=40))
def test_fuzz_h264_sps(data: bytes) -> None:
    try:
        width, height = h264_sps_frame_size(b"\x67" + data)
    except ParseError:
        return
    assert width > 0 and height > 0


@given(st.binary(max_size=40))
def test_fuzz_keyframe_size(data: bytes) -> None:
    for codec in ("VP8", "H264", "VP9", "AV1", "opus"):
        with contextlib.suppress(ParseError):
            keyframe_size(codec, data)


# --- AV1 and audio -------------------------------------------------------------------------


def test_av1_new_coded_video_sequence() -> None:
    # Aggregation header |Z|Y|W W|N|-|-|-|: N=1 starts a coded video sequence.
    assert is_keyframe_start("AV1", bytes.fromhex("180a0b"))
    assert not is_keyframe_start("AV1", bytes.fromhex("100a0b"))
    assert not is_keyframe_start("AV1", bytes.fromhex("50"))
    assert not is_keyframe_start("AV1", b"")


def test_audio_and_unknown_codecs_are_never_keyframe_starts() -> None:
    for codec in ("opus", "audio/opus", "PCMU", "G722", "H265"):
        assert not is_keyframe_start(codec, VP8_KEYFRAME_START)


@given(st.sampled_from(["VP8", "VP9", "H264", "AV1", "opus"]), st.binary(max_size=24))
def test_fuzz_is_keyframe_start(codec: str, data: bytes) -> None:
    assert isinstance(is_keyframe_start(codec, data), bool)


# --- Real packets from aiortc's encoders -------------------------------------------------


def encode_frames(mime_type: str, *, noisy: bool) -> list[list[bytes]]:
    """RTP payloads of three 320x240 frames; the third is a forced keyframe."""
    av = pytest.importorskip("av")
    numpy = pytest.importorskip("numpy")
    from aiortc.codecs import get_encoder
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    encoder = get_encoder(
        RTCRtpCodecParameters(mimeType=mime_type, clockRate=90000, payloadType=96)
    )
    random = numpy.random.default_rng(7)
    frames = []
    for index in range(3):
        if noisy:
            # Noise defeats compression, so H.264 NAL units exceed the MTU and use FU-A.
            pixels = random.integers(0, 256, (240, 320, 3), dtype=numpy.uint8)
        else:
            pixels = numpy.zeros((240, 320, 3), dtype=numpy.uint8)
            pixels[:, :, 0] = numpy.arange(320, dtype=numpy.uint16)[None, :] % 256
            pixels[:, :, 1] = index * 40
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = index * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        payloads, _ = encoder.encode(frame, force_keyframe=index == 2)
        frames.append(payloads)
    return frames


@pytest.mark.parametrize("mime_type", ["video/VP8", "video/H264"])
@pytest.mark.parametrize("noisy", [False, True])
def test_keyframes_from_aiortc_encoders(mime_type: str, noisy: bool) -> None:
    first, second, forced = encode_frames(mime_type, noisy=noisy)
    for keyframe in (first, forced):
        assert is_keyframe_start(mime_type, keyframe[0])
        assert keyframe_size(mime_type, keyframe[0]) == (320, 240)
    assert not any(is_keyframe_start(mime_type, payload) for payload in second)
    assert keyframe_size(mime_type, second[0]) is None
    for payloads in (first, second, forced):
        # Past the opening packets (SPS/PPS, first IDR slice) nothing starts a keyframe.
        assert not any(is_keyframe_start(mime_type, payload) for payload in payloads[2:])


def test_aiortc_h264_keyframe_uses_fu_a_when_large() -> None:
    first, _, _ = encode_frames("video/H264", noisy=True)
    fragments = [payload for payload in first if payload[0] & 0x1F == 28]
    assert fragments, "a noisy 320x240 keyframe is larger than one packet"
    starts = [payload for payload in fragments if payload[1] & 0x80]
    assert any(is_keyframe_start("H264", payload) for payload in starts)
    middles = [payload for payload in fragments if not payload[1] & 0x80]
    assert middles and not any(is_keyframe_start("H264", payload) for payload in middles)
